"""flash-attention's error rule, shared by the test suite and ``python -m posattn``.

A kernel's max error against the float64 reference must be at most ``mult`` (2 for outputs,
3 for gradients) times the max error of the same naive math done in the input dtype, plus a
rounding floor of one eps of the input dtype times max(1, max|ref|), so that a naive error
that happens to be zero does not demand bit-exactness.
"""
import torch

FLOOR_EPS = 1.0


def error_tolerance(naive_err: float, ref: torch.Tensor, dtype: torch.dtype, mult: float) -> float:
    """The largest kernel error the rule allows (see module docstring)."""
    ref = ref.detach()
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, float(finite.abs().max()) if finite.numel() else 0.0)
    return mult * naive_err + FLOOR_EPS * torch.finfo(dtype).eps * scale
