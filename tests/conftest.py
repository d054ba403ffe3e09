"""Test set-up. Runs the Triton kernels in the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton is first imported: torch does not import triton,
and posattn imports it lazily, so it is set here (conftest is imported first). Triton also
decides interpreted-or-compiled when each @triton.jit kernel is defined, so the kernels are
imported here too: otherwise a test that unsets TRITON_INTERPRET (the bench CLI test) and
happens to import them first would leave every later kernel test on that worker compiled
for a GPU that is not there.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import posattn._triton  # noqa: E402,F401  (defines the kernels now, under the setting above)

DEVICE = "cuda" if HAS_CUDA else "cpu"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _nan_fill(t):
    if t.dtype in _FLOATS:
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Every torch.empty* allocation starts as NaN, so an element a kernel forgets to write
    fails the test instead of passing on whatever memory happened to hold."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_fill(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _nan_fill(new_empty(self, *a, **k)))
    yield
