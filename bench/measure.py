"""Time one implementation on one shape: warm-up, peak memory, median time. Never raises.

A failure becomes a row with a status and the reason: ``oom`` (out of memory), ``unsupported``
(e.g. an SDPA backend that refuses the shape; SDPA's own warnings say why), ``not installed``,
``error`` (anything else, with the exception's first line).
"""
from __future__ import annotations

import gc
import time
import warnings
from typing import Callable, Optional

import torch

from .peers import Impl, Unavailable
from .plan import Inputs, Shape, shape_flops


def _first_line(text: str, limit: int = 300) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line[:limit]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "outofresources" in type(exc).__name__.lower()


def classify_failure(exc: BaseException, caught_warnings=()) -> tuple:
    """(status, reason) for an exception raised while building or running an implementation."""
    if isinstance(exc, Unavailable):
        return exc.status, exc.reason
    if _is_oom(exc):
        return "oom", _first_line(exc)
    msg = _first_line(exc)
    low = str(exc).lower()
    if "no available kernel" in low or "no viable backend" in low:  # SDPA refused this backend
        why = [_first_line(w.message) for w in caught_warnings
               if "sdp" in str(w.message).lower() or "kernel" in str(w.message).lower()]
        return "unsupported", "; ".join(dict.fromkeys(why)) or msg
    return "error", f"{type(exc).__name__}: {msg}"


def make_step(fwd: Callable[[], torch.Tensor], shape: Shape, x: Inputs) -> Callable[[], torch.Tensor]:
    """The timed unit: forward (no autograd graph) or forward + backward with ``x.dout``."""
    if shape.mode == "fwd":
        def step():
            with torch.no_grad():
                return fwd()
    elif shape.mode == "fwd+bwd":
        def step():
            out = fwd()
            out.backward(x.dout)
            return out
    else:
        raise ValueError(f"unknown mode {shape.mode!r}")
    return step


def bench_ms(step: Callable, leaves, warmup_ms: float, rep_ms: float):
    """(median, p20, p80) milliseconds by ``triton.testing.do_bench`` (CUDA events, L2 flushed
    between calls, gradients of ``leaves`` reset to None so they are not accumulated)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves,
                             quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def free_memory() -> None:
    """Collect cycles (a traceback holds tensors) and return cached blocks to the driver.
    ~0.1 s with torch loaded, so only after failures and between shapes."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(impl: Impl, pe: str, shape: Shape, x: Inputs, *, warmup_ms: float = 25,
            rep_ms: float = 100, reference: Optional[torch.Tensor] = None) -> dict:
    """One result row (a dict) for ``impl`` on ``pe`` at ``shape``; never raises.

    peak_mib: the most device memory held beyond the inputs (q, k, v, dout) during one warm
    call, counting what the implementation keeps between calls (a materialised mask), the
    output and, for fwd+bwd, the gradients. max_abs_diff: max |out - reference| (fwd only).
    The returned ``out`` (fwd only) lets the caller keep posattn's output as the reference.
    """
    row = dict(shape.as_dict(), pe=pe, impl=impl.name, role=impl.role, status="ok", reason="",
               ms=None, ms_p20=None, ms_p80=None, tflops=None, peak_mib=None, max_abs_diff=None,
               build_s=None)
    out = None
    fwd = step = None
    x.clear_grads()
    x.params = []  # a trainable PE's builder sets its own
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fwd = impl.build(pe, shape, x)
            step = make_step(fwd, shape, x)
            step()  # warm-up: compiles Triton kernels / torch.compile graphs
            torch.cuda.synchronize()
            row["build_s"] = round(time.perf_counter() - t0, 2)
            x.clear_grads()
            torch.cuda.reset_peak_memory_stats()
            out = step()
            torch.cuda.synchronize()
            row["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            if shape.mode == "fwd" and reference is not None:
                row["max_abs_diff"] = float((out.float() - reference.float()).abs().max())
            if shape.mode != "fwd":
                out = None
            x.clear_grads()
            ms, p20, p80 = bench_ms(step, x.leaves, warmup_ms, rep_ms)
            row.update(ms=ms, ms_p20=p20, ms_p80=p80, tflops=shape_flops(shape) / (ms * 1e-3) / 1e12)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row
            row["status"], row["reason"] = classify_failure(exc, caught)
            out = None
    del fwd, step
    x.clear_grads()
    if row["status"] != "ok":
        free_memory()
    return dict(row, out=out)
