"""Environment facts read at call time (never at import: no CUDA query, no triton import)."""
import os


def interpreter_on() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
