"""``python -m posattn.extrapolate``: the study's command line (:func:`.study.main`).

The driver lives in ``study.py``, not here: the package ``__init__`` re-exports ``run_study`` and
``main``, and a package whose ``__init__`` imports its own ``__main__`` makes ``python -m`` warn
(runpy finds the module already imported)."""
from posattn.extrapolate.study import main

if __name__ == "__main__":
    main()
