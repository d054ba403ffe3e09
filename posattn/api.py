"""The public entry point: ``posattn.attention``. Validates, resolves the PE, picks the backend."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from . import reference
from ._env import MIN_CUDA_ARCH, cuda_arch, interpreter_on
from .pe import PE, resolve_pe
from .positions import parse_positions

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "triton", "cpu", "reference")
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
    window=None,
    softcap: Optional[float] = None,
):
    """Attention with a positional encoding computed inside the attention tile.

    Args:
        q: (B, Hq, Sq, D) for ``layout="bhsd"`` (torch SDPA's), (B, Sq, Hq, D) for ``"bshd"``
            (flash-attn's). float16 / bfloat16 / float32 (float64: cpu and reference backends only).
        k: (B, Hkv, Sk, D) or (B, Sk, Hkv, D). Hq must be a multiple of Hkv (GQA / MQA).
        v: (B, Hkv, Sk, Dv) or (B, Sk, Hkv, Dv); Dv may differ from D.
        pe: a registered name, ``"none" | "rope" | "alibi" | "kerple_log" | "kerple_power"``
            (``"kerple"`` = ``"kerple_log"``; ``posattn.pe.registered()``), or a spec: ``NoPE()``, ``RoPE(...)``,
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
        backend: ``"triton"`` (Triton or an error, never a silent fallback), ``"cpu"`` (CPU
            tensors only: exact blockwise attention on torch's CPU kernels, O(S) extra memory,
            any dtype incl. float64; posattn/_cpu.py), ``"reference"`` (naive PyTorch,
            materialises S x S), ``"auto"`` (CUDA tensors on an Ampere or newer GPU -> Triton,
            on older GPUs -> the reference; CPU tensors -> Triton when TRITON_INTERPRET=1,
            else the cpu backend).
        window: ``None`` or ``(left, right)``, each an int >= 0 or ``None`` (unbounded): key j
            is visible to query i iff ``q_pos[i] - left <= k_pos[j] <= q_pos[i] + right``,
            ANDed with ``causal`` (Mistral's sliding window is ``(W - 1, 0)`` with causal;
            flash-attn's ``window_size=(l, r)`` with -1 for unbounded is ``(l, r)`` with None).
            Tiles outside the window are skipped.
        softcap: ``None`` / ``0.0`` (off) or c > 0: the scaled logit s = scale * q.k becomes
            ``c * tanh(s / c)`` *before* the PE's bias is added (Gemma 2's order).

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
    scale = _check_heads_causal_scale(Hq, Hkv, D, v.shape[3], causal, scale)

    window = _check_window(window)
    softcap = _check_softcap(softcap)

    spec = resolve_pe(pe)
    spec.check(Hq, D, q.device)
    spec.check_mask(causal, window)
    qpos = parse_positions(q_positions, "q_positions", B, Sq, Sk - Sq, q.device)
    kpos = parse_positions(k_positions, "k_positions", B, Sk, 0, q.device)
    backend = _pick_backend(backend, q)
    geo = dict(causal=causal, scale=scale, window=window, softcap=softcap)

    if backend in ("reference", "cpu"):
        if backend == "reference":
            out, lse = reference.attention_bhsd(q, k, v, spec, q_pos=qpos, k_pos=kpos, **geo)
        else:
            from . import _cpu

            out, lse = _cpu.attention_bhsd(q, k, v, spec, q_pos=qpos, k_pos=kpos, **geo)
        if layout == "bshd":  # stored bshd, as the Triton backend returns it
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        from . import _triton  # imports triton; only now, so CPU-only machines import posattn freely

        out, lse = _triton.attention_bhsd(q, k, v, spec, q_pos=qpos, k_pos=kpos, **geo)

    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _check_heads_causal_scale(Hq: int, Hkv: int, D: int, Dv: int, causal, scale) -> float:
    """GQA head counts, positive head dims, a bool causal; returns the scale (default
    1 / sqrt(D)) as a float."""
    if Hq == 0 or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a positive multiple of Hkv={Hkv} (GQA/MQA)")
    if D == 0 or Dv == 0:
        raise ValueError(f"head dims must be positive, got D={D}, Dv={Dv}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _pick_backend(backend: str, q: torch.Tensor) -> str:
    """"auto" -> Triton on Ampere+ GPUs and in the interpreter, the cpu backend on CPU tensors
    otherwise (and for float64 CPU tensors), the reference elsewhere. "cpu" with non-CPU tensors
    is a ValueError (no hidden fallback)."""
    if backend == "cpu":
        if q.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors; q is on {q.device} "
                             f"(use backend='triton' or 'auto')")
        return backend
    if backend != "auto":
        return backend
    use_triton = ((q.is_cuda and cuda_arch(q.device) >= MIN_CUDA_ARCH)
                  or (q.device.type == "cpu" and interpreter_on()))
    if use_triton and q.dtype != torch.float64:
        return "triton"
    return "cpu" if q.device.type == "cpu" else "reference"


def _check_window(window):
    """None or (left, right) with each side an int >= 0 or None; (None, None) -> None."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right) of ints >= 0 or None, got {window!r}")
    sides = []
    for name, x in zip(("left", "right"), window):
        if x is None:
            sides.append(None)
            continue
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"window {name} side must be an int >= 0 or None, got {type(x).__name__} {x!r}")
        if x < 0:
            raise ValueError(f"window {name} side must be >= 0 (None for unbounded), got {x}")
        sides.append(int(x))
    return None if sides == [None, None] else tuple(sides)


def _check_softcap(softcap):
    """None for off (None or 0), else a finite float > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be None or a float > 0, got {type(softcap).__name__} {softcap!r}")
    c = float(softcap)
    if c == 0.0:
        return None
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"softcap must be a finite float > 0 (None or 0.0 for off), got {softcap!r}")
    return c


def _check_cu_seqlens(name: str, cu, total: int, device):
    """cu_seqlens -> (int32 tensor on device, host lengths). (B + 1,) integer, starting at 0,
    non-decreasing, ending at ``total``. Reads it on the host (one synchronisation)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor (B + 1,), got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (B + 1,) with B >= 0, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    host = cu.tolist()
    if host[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {host[0]}")
    lens = [b - a for a, b in zip(host[:-1], host[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{name} must be non-decreasing, got {host}")
    if host[-1] != total:
        raise ValueError(f"{name}[-1] = {host[-1]} must equal the number of tokens, {total}")
    if host[-1] >= 2 ** 31:
        raise ValueError(f"{name}: {host[-1]} tokens do not fit int32 offsets")
    return cu.to(torch.int32).contiguous(), lens


def _check_max_seqlen(name: str, value, lens):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    longest = max(lens, default=0)
    if value < longest:
        raise ValueError(f"{name}={value} is smaller than the longest sequence, {longest}")


def _varlen_positions(arg, name: str, total: int, device):
    if arg is None:
        return None
    if not isinstance(arg, torch.Tensor) or arg.dtype not in (torch.int32, torch.int64, torch.int16):
        raise TypeError(f"{name} must be None or an integer tensor ({total},), got "
                        f"{type(arg).__name__ if not isinstance(arg, torch.Tensor) else arg.dtype}")
    if arg.dim() != 1 or arg.shape[0] != total:
        raise ValueError(f"{name} must have shape ({total},) (one position per packed token), got {tuple(arg.shape)}")
    if arg.device != device:
        raise ValueError(f"{name} is on {arg.device} but q is on {device}")
    return arg


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    pe: Union[str, PE, None] = "none",
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window=None,
    softcap: Optional[float] = None,
    q_positions=None,
    k_positions=None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over packed sequences (flash-attn's ``flash_attn_varlen_func`` layout).

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv) -- B sequences
            concatenated along the first dim. Hq a multiple of Hkv.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 cumulative starts: sequence b is rows
            ``cu[b]:cu[b + 1]``; ``cu[0] = 0``, ``cu[-1]`` = total. Read on the host to validate
            them (one synchronisation per call).
        max_seqlen_q, max_seqlen_k: optional; a value smaller than a real length is a
            ValueError (flash-attn would silently compute garbage).
        pe, causal, scale, window, softcap, backend: as :func:`attention`, per sequence.
        q_positions, k_positions: ``None`` (positions restart per sequence: keys 0..len_k - 1,
            queries end-aligned to their own keys, len_k - len_q + i) or integer tensors
            (total_q,) / (total_k,) of explicit positions (both or neither).

    Each sequence is independent: no query attends across sequences. A query whose sequence
    has no visible key outputs 0 with LSE -inf.

    Returns:
        out (total_q, Hq, Dv) in q's dtype, or ``(out, lse)`` with lse (Hq, total_q) float32.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    q, k, v = _autocast(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, H, D) for attention_varlen, got shape {tuple(t.shape)}")
    _check_tensors(q[None], k[None], v[None], "bshd")  # dtypes, devices
    total_q, Hq, D = q.shape
    total_k, Hkv, Dk = k.shape
    if Dk != D:
        raise ValueError(f"head dim of k ({Dk}) differs from q ({D}); q {tuple(q.shape)}, k {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (total_k, Hkv):
        raise ValueError(f"v (tokens, heads) {tuple(v.shape[:2])} must match k's {(total_k, Hkv)}")
    scale = _check_heads_causal_scale(Hq, Hkv, D, v.shape[2], causal, scale)
    window = _check_window(window)
    softcap = _check_softcap(softcap)
    cu_q, lens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, q.device)
    cu_k, lens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, q.device)
    if len(lens_q) != len(lens_k):
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must describe the same number of sequences")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, lens_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, lens_k)
    qp = _varlen_positions(q_positions, "q_positions", total_q, q.device)
    kp = _varlen_positions(k_positions, "k_positions", total_k, q.device)
    if (qp is None) != (kp is None):
        raise ValueError("attention_varlen takes explicit positions for both q and k, or neither "
                         "(q_positions and k_positions)")

    spec = resolve_pe(pe)
    spec.check(Hq, D, q.device)
    spec.check_mask(causal, window)
    backend = _pick_backend(backend, q)
    geo = dict(causal=causal, scale=scale, window=window, softcap=softcap, q_positions=qp,
               k_positions=kp)
    if backend == "reference":
        out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, spec, **geo)
    elif backend == "cpu":
        from . import _cpu

        out, lse = _cpu.attention_varlen(q, k, v, lens_q, lens_k, spec, **geo)
    else:
        from . import _triton

        out, lse = _triton.attention_varlen(q, k, v, cu_q, cu_k, lens_q, lens_k, spec, **geo)
    return (out, lse) if return_lse else out
