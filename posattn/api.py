"""The public entry point: ``posattn.attention``. Validates, resolves the PE, picks the backend."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import reference
from ._env import MIN_CUDA_ARCH, cuda_arch, interpreter_on
from .pe import PE, resolve_pe
from .positions import parse_positions

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "triton", "reference")
_LAYOUTS = ("bhsd", "bshd")


def _check_tensors(q, k, v, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != 4:
            dims = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
            raise ValueError(f"{name} must be 4-D {dims} for layout={layout!r}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype={t.dtype} differs from q.dtype={q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _autocast(q, k, v):
    """torch.autocast's policy for SDPA (a lower-precision op): inside an autocast region of
    q's device type, floating q, k, v other than float64 run in the autocast dtype (fp32
    activations in bf16 mixed precision take the tensor-core kernels, as SDPA would). The
    cast is differentiable; gradients come back in the inputs' dtypes."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return q, k, v  # _check_tensors names the culprit
    dev = q.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return q, k, v
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (q, k, v))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pe: Union[str, PE, None] = "none",
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    q_positions=None,
    k_positions=None,
    layout: str = "bhsd",
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention with a positional encoding computed inside the attention tile.

    Args:
        q: (B, Hq, Sq, D) for ``layout="bhsd"`` (torch SDPA's), (B, Sq, Hq, D) for ``"bshd"``
            (flash-attn's). float16 / bfloat16 / float32 (float64: reference backend only).
        k: (B, Hkv, Sk, D) or (B, Sk, Hkv, D). Hq must be a multiple of Hkv (GQA / MQA).
        v: (B, Hkv, Sk, Dv) or (B, Sk, Hkv, Dv); Dv may differ from D.
        pe: ``"none" | "rope" | "alibi" | "kerple"`` or a spec: ``NoPE()``, ``RoPE(...)``,
            ``ALiBi(slopes)``, ``KERPLE(kind, r1, r2)``. Bias PEs are added to the scaled logits.
        causal: key j is visible to query i iff ``k_pos[j] <= q_pos[i]``. A query that sees no
            key outputs 0, its LSE is -inf and it gets zero gradients.
        scale: logit scale, default ``1 / sqrt(D)``.
        q_positions, k_positions: ``None`` (keys at 0..Sk-1, queries at Sk-Sq..Sk-1: queries
            aligned to the end of the keys, as a KV cache needs), an ``int`` (position of the
            first token, then contiguous) or an integer tensor (S,) or (B, S) of explicit
            positions (any int64 value; an int start must satisfy |start| < 2**30).
        layout: ``"bhsd"`` or ``"bshd"``; the output has the input's layout (strides are used,
            nothing is copied).
        return_lse: also return the log-sum-exp of the scaled, biased logits, (B, Hq, Sq)
            float32, natural log.
        backend: ``"triton"`` (Triton or an error, never a silent fallback), ``"reference"``
            (naive PyTorch), ``"auto"`` (CUDA tensors on an Ampere or newer GPU -> Triton,
            on older GPUs -> the reference; CPU tensors -> Triton when TRITON_INTERPRET=1,
            else the reference).

    Under ``torch.autocast`` (q's device type), q, k and v run in the autocast dtype, as in
    torch SDPA (float64 excepted); the output then has that dtype.

    Returns:
        out with q's shape and dtype (Dv as last dim), or ``(out, lse)``.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    q, k, v = _autocast(q, k, v)
    _check_tensors(q, k, v, layout)
    if layout == "bshd":  # views, no copies
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if Dk != D:
        raise ValueError(f"head dim of k ({Dk}) differs from q ({D}); q {tuple(q.shape)}, k {tuple(k.shape)} (bhsd)")
    if tuple(v.shape[1:3]) != (Hkv, Sk):
        raise ValueError(f"v (heads, length) {tuple(v.shape[1:3])} must match k's {(Hkv, Sk)} (bhsd view)")
    if Hq == 0 or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a positive multiple of Hkv={Hkv} (GQA/MQA)")
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be positive, got D={D}, Dv={v.shape[3]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    scale = float(scale)

    spec = resolve_pe(pe)
    spec.check(Hq, D, q.device)
    qpos = parse_positions(q_positions, "q_positions", B, Sq, Sk - Sq, q.device)
    kpos = parse_positions(k_positions, "k_positions", B, Sk, 0, q.device)

    if backend == "auto":
        use_triton = ((q.is_cuda and cuda_arch(q.device) >= MIN_CUDA_ARCH)
                      or (q.device.type == "cpu" and interpreter_on()))
        backend = "triton" if use_triton and q.dtype != torch.float64 else "reference"

    if backend == "reference":
        out, lse = reference.attention_bhsd(q, k, v, spec, causal=causal, scale=scale, q_pos=qpos, k_pos=kpos)
        if layout == "bshd":  # stored bshd, as the Triton backend returns it
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        from . import _triton  # imports triton; only now, so CPU-only machines import posattn freely

        out, lse = _triton.attention_bhsd(q, k, v, spec, causal=causal, scale=scale, q_pos=qpos, k_pos=kpos)

    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
