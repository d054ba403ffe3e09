"""The repository's top-level kernels/ folder never shadows Hugging Face's `kernels`.

transformers (>= 5.25) imports the PyPI distribution `kernels`. Run from the repository root
(python -m posattn, python -m pytest), the root is first on sys.path; when kernels/ was a
regular package (it had an __init__.py), `import kernels` found it there first and
`transformers.integrations.hub_kernels` failed with "cannot import name 'CUDAProperties' from
'kernels' (<repo>/kernels/__init__.py)". Now kernels/ is no regular package: at most a PEP 420
namespace portion, which loses to a regular package of the same name anywhere on sys.path.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run as a fresh interpreter from the repository root: `python -c` puts the working directory
# first on sys.path, as `python -m posattn` and `python -m pytest` do.
_SCRIPT = r"""
import os, sys
root = os.getcwd()
assert sys.path[0] in ("", root), sys.path[:3]
import posattn, transformers
from transformers.integrations import hub_kernels  # failed here when kernels/ shadowed
import posattn.kernels.launch as launch
import kernels
assert kernels.__file__ is not None, "kernels resolved to a namespace package"
assert not kernels.__file__.startswith(os.path.join(root, "kernels")), kernels.__file__
from kernels import CUDAProperties  # what hub_kernels needs of the PyPI distribution
print(posattn.__file__)
print(launch.__file__)
print(kernels.__file__)
"""


def _run(code):
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_hf_kernels_is_installed():
    """The test below proves nothing without the distribution: the test extra installs it."""
    assert importlib.metadata.version("kernels")


def test_repo_root_does_not_shadow_hf_kernels():
    pkg, launch, hf = _run(_SCRIPT)
    assert pkg == str(ROOT / "posattn" / "__init__.py")
    assert launch == str(ROOT / "kernels" / "launch.py")  # this project's Triton code
    assert "site-packages" in hf or "dist-packages" in hf, hf


def test_hf_kernels_first_then_posattn():
    """The other import order: the PyPI `kernels` already imported, posattn.kernels still ours."""
    code = ("import kernels, posattn.kernels.configs as c, transformers\n"
            "from transformers.integrations import hub_kernels\n"
            "print(kernels.__file__); print(c.__file__)")
    hf, cfg = _run(code)
    assert not hf.startswith(str(ROOT / "kernels")), hf
    assert cfg == str(ROOT / "kernels" / "configs.py")


def test_no_regular_package_named_kernels_at_the_root():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package that shadows Hugging Face's "
        "`kernels` when run from the repository root (see this file's docstring)")
