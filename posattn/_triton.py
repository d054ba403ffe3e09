"""Triton backend: PE spec -> kernel record, and a thin autograd.Function over the launchers.

Saved for backward: q, k, v, out, lse (never an S x S tensor, never a rotated Q or K).
Importing this module imports Triton; posattn.api imports it lazily, on first use.
"""
from __future__ import annotations

import dataclasses

import torch

from ._env import MIN_CUDA_ARCH, check_cuda_arch, cuda_arch, interpreter_on
from .pe import PE, RoPE
from .positions import Positions
from . import _ops
from .kernels import launch
from .kernels.launch import KernelPE, KernelPositions

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_runnable(q: torch.Tensor) -> None:
    """backend='triton' runs Triton or raises: never a silent fallback to the reference."""
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 inputs, got {q.dtype} "
                        "(use backend='reference' for float64)")
    if q.device.type == "cuda":
        arch = cuda_arch(q.device)
        if arch < MIN_CUDA_ARCH:  # the name only for the message: Dynamo cannot trace it
            check_cuda_arch(arch, torch.cuda.get_device_name(q.device))
        return
    if q.device.type == "cpu" and interpreter_on():
        return
    raise ValueError(f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                     f"before triton is imported; q is on {q.device}")


def _state(x):
    """A hashable description of a spec's state (its attributes, recursively; tensors by value).
    Specs are plain objects a caller may build per call or mutate, so the cache below keys on
    what they hold, not on their identity."""
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype), tuple(x.shape), tuple(x.detach().flatten().tolist()))
    if isinstance(x, (list, tuple)):
        return tuple(_state(i) for i in x)
    if hasattr(x, "__dict__"):
        return (type(x).__qualname__,) + tuple((k, _state(v)) for k, v in sorted(vars(x).items()))
    return x


_DEVICE_CONSTANTS: dict = {}
_DEVICE_CONSTANTS_MAX = 1024  # entries of at most 1 KiB (inv_freq at D=256)


def _device_constant(key_fn, make):
    """``make()`` (a tuple holding small device tensors: RoPE's inv_freq, default ALiBi slopes),
    made once per key and kept. They are computed on the CPU, and a host-to-device copy per
    call costs host time and is illegal inside CUDA-graph capture (a warm-up call before
    capture fills the cache). Entries are never evicted: a captured graph may hold their
    addresses. Once the cache is full (a length-dependent RoPE over 1000+ lengths) new keys
    are made per call, as if uncached. Under torch.compile the graph holds them instead."""
    if torch.compiler.is_compiling():
        return make()
    key = key_fn()
    hit = _DEVICE_CONSTANTS.get(key)
    if hit is None:
        hit = make()
        if len(_DEVICE_CONSTANTS) < _DEVICE_CONSTANTS_MAX:
            _DEVICE_CONSTANTS[key] = hit
    return hit


def kernel_pe(spec: PE, head_dim: int, num_heads: int, device, cur_len) -> KernelPE:
    """Reduce a PE spec to the kernel record: its axes (spec.rotary, spec.bias), RoPE's
    inv_freq + factor, and the bias's per-head parameters as one (H, P) tensor
    (spec.bias_params; differentiable into the spec's own tensors)."""
    rope = {}
    if spec.rotary == "rope":
        def make():
            inv_freq, factor = spec.frequencies(head_dim, cur_len)
            if spec.xpos:  # its decay after the frequencies (launch.KernelPE)
                inv_freq = torch.cat((inv_freq, spec.decay(head_dim)))
            return inv_freq.to(device=device, dtype=torch.float64), float(factor)

        theta, factor = _device_constant(
            lambda: ("rope", _state(spec), head_dim, cur_len, torch.device(device)), make)
        rope = dict(theta=theta, factor=factor, rot_dim=spec.resolve_rotary_dim(head_dim),
                    interleaved=spec.interleaved, xpos=spec.xpos,
                    xpos_rate=-float(spec.decay(head_dim)[0]) if spec.xpos else 0.0)
        if spec.extend is not None:  # a RoPE extension: its far passes
            rope.update(remap=spec.extend, theta_far=theta * spec.extend.freq_scale)
    params = None
    if spec.bias != "none":
        if any(isinstance(x, torch.Tensor) for x in vars(spec).values()):
            params = spec.bias_params(num_heads, device)  # the caller's tensors: per call
        else:  # derived from Python numbers only (default ALiBi slopes, float r1/r2): once
            params, = _device_constant(
                lambda: ("params", _state(spec), num_heads, torch.device(device)),
                lambda: (spec.bias_params(num_heads, device),))
    buckets = None
    if spec.bias in launch.TABLE_BIASES:  # a table bias (T5): its column per relative position
        # keyed on everything but the table's values (the buckets depend on its width only)
        buckets, = _device_constant(
            lambda: ("buckets", type(spec).__name__, params.shape[1],
                     tuple(sorted((k, _state(v)) for k, v in vars(spec).items()
                                  if not isinstance(v, torch.Tensor))),
                     torch.device(device)),
            lambda: (spec.bias_buckets().to(device),))
    return KernelPE(rot=spec.rotary, bias=spec.bias, params=params, family=spec.tile_family,
                    buckets=buckets, **rope)


def kernel_positions(q_pos: Positions, k_pos: Positions, batch: int, device) -> KernelPositions:
    """Both contiguous -> two ints; otherwise both become explicit tensors (O(S)).

    Explicit tensors keep their integer dtype: the kernels widen loaded positions to int64
    before differencing, so any int64 position is exact (no range check, no device sync)."""
    if q_pos.is_contiguous and k_pos.is_contiguous:
        return KernelPositions(q_start=q_pos.start, k_start=k_pos.start)

    def explicit(p: Positions):
        if p.is_contiguous:
            return torch.arange(p.length, device=device, dtype=torch.int64)[None] + p.start
        return p.tensor

    return KernelPositions(qpos=explicit(q_pos), kpos=explicit(k_pos))


def _stride1(t: torch.Tensor) -> torch.Tensor:
    """Copy only when the last dim is strided (the kernels take any other strides)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _detached(pe: KernelPE, params) -> KernelPE:
    """The record with the autograd input ``params`` swapped in, detached (kernels take raw
    data)."""
    return dataclasses.replace(pe, params=params.detach() if params is not None else None)


_TWICE = ("posattn's fused backward is not differentiable (a second derivative through it, e.g. "
          "a gradient penalty with create_graph=True); use backend='reference' for that")


def _no_double_backward(grads):
    """With create_graph=True (grad mode on during backward) the kernels' gradients would be
    constants to autograd, and a second derivative through them silently 0. Give them a
    grad_fn that raises instead, as @once_differentiable would if dout required grad (here
    it usually does not: a gradient penalty differentiates dq with respect to q)."""
    if not torch.is_grad_enabled():
        return grads
    live = [g for g in grads if isinstance(g, torch.Tensor)]
    if not live:
        return grads
    err = torch._C._functions.DelayedError(_TWICE, len(live))
    wrapped = iter(err(*[g.detach().requires_grad_() for g in live]))
    return tuple(next(wrapped) if isinstance(g, torch.Tensor) else g for g in grads)


class _NoLaunch(torch.autograd.Function):
    """Sk == 0 or an empty batch: output 0, LSE -inf, zero gradients; no kernel launch."""

    @staticmethod
    def forward(ctx, q, k, v, DV: int):
        B, Hq, Sq, _ = q.shape
        ctx.save_for_backward(q, k, v)
        lse = torch.full((B, Hq, Sq), float("-inf"), device=q.device, dtype=torch.float32)
        ctx.mark_non_differentiable(lse)
        return launch.new_output(q, DV).zero_(), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v = ctx.saved_tensors
        return _no_double_backward((torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None))


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, params, pe: KernelPE, pos: KernelPositions, mask: launch.Mask,
                scale: float):
        out, lse, row_lse = launch.attn_fwd(q, k, v, _detached(pe, params), pos, mask, scale)
        ctx.save_for_backward(q, k, v, out, row_lse, params)
        ctx.pe, ctx.pos, ctx.mask, ctx.scale = pe, pos, mask, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, params = ctx.saved_tensors
        need_pe_grad = bool(ctx.needs_input_grad[3])
        dq, dk, dv, g = launch.attn_bwd(_stride1(dout), q, k, v, out, lse,
                                        _detached(ctx.pe, params), ctx.pos, ctx.mask, ctx.scale,
                                        need_pe_grad)
        dparams = g.to(params.dtype) if need_pe_grad else None
        return _no_double_backward((dq, dk, dv, dparams, None, None, None, None))


def attention_bhsd(q, k, v, spec: PE, *, causal: bool, scale: float, q_pos: Positions,
                   k_pos: Positions, window=None, softcap=None):
    """Fused attention on (B, H, S, D) views. Returns (out (B, Hq, Sq, Dv), lse (B, Hq, Sq) fp32).
    window: None or (left, right) (each an int or None); softcap: None or c > 0."""
    _check_runnable(q)
    B, Hq, Sq, D = q.shape
    Sk, DV = k.shape[2], v.shape[3]
    cur_len = None
    if isinstance(spec, RoPE) and spec.needs_cur_len:
        cur_len = max(q_pos.max_position(), k_pos.max_position()) + 1
    pe = kernel_pe(spec, D, Hq, q.device, cur_len)

    if B * Hq * Sq == 0 or Sk == 0:
        # Nothing to launch: empty output, or every query sees no key (output 0, LSE -inf).
        return _NoLaunch.apply(q, k, v, DV)

    q, k, v = _stride1(q), _stride1(k), _stride1(v)
    pos = kernel_positions(q_pos, k_pos, B, q.device)
    if pos.explicit:
        check_xpos_span(spec, q.dtype, ("q_positions", pos.qpos, None),
                        ("k_positions", pos.kpos, None))
    mask = kernel_mask(causal, window, softcap)
    if torch.compiler.is_compiling():  # the same launchers as opaque graph nodes (see _ops)
        if pe.remap is not None:
            raise ValueError("RoPE(extend=...) does not run under torch.compile yet (the custom "
                             "ops carry no far pass); call it eagerly")
        if pe.xpos:
            raise ValueError("XPos does not run under torch.compile yet (the custom ops carry "
                             "no decay); call it eagerly")
        out, lse, _ = _ops.fwd(q, k, v, *_ops.flat_args(pe, pos, mask), scale)
        return out, lse
    return _FusedAttention.apply(q, k, v, pe.params, pe, pos, mask, scale)


XPOS_ROWS = 128  # the largest block of rows a kernel program holds (configs)


def check_xpos_span(spec: PE, dtype, *named_positions) -> None:
    """xPos with explicit positions: every block of rows a program holds (at most XPOS_ROWS
    consecutive rows of one sequence) takes its decays relative to its first position, so the
    positions in any XPOS_ROWS consecutive rows may span at most spec.max_span(dtype)
    (a ValueError naming the argument otherwise). named_positions: (name, (B|1, S) tensor or
    None, host lengths of packed sequences or None). One host sync; refused during CUDA-graph
    capture."""
    if not getattr(spec, "xpos", False):
        return
    limit = spec.max_span(dtype)
    for name, p, lens in named_positions:
        if p is None or p.numel() == 0:
            continue
        if p.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"XPos with explicit {name}: their span is checked on the host, "
                             f"which CUDA-graph capture does not allow; capture with implied "
                             f"positions")
        rows = [p.reshape(-1, p.shape[-1])] if lens is None else \
            [s[None] for s in torch.split(p.reshape(-1), list(lens)) if s.numel()]
        worst = 0
        for x in rows:
            x = x.to(torch.float64)[:, None]  # (B, 1, S): windows of XPOS_ROWS rows
            k = min(XPOS_ROWS, x.shape[-1])
            hi = torch.nn.functional.max_pool1d(x, k, 1)
            lo = -torch.nn.functional.max_pool1d(-x, k, 1)
            worst = max(worst, int((hi - lo).max()))
        if worst > limit:
            raise ValueError(f"XPos with explicit {name}: positions within {XPOS_ROWS} "
                             f"consecutive rows span {worst} > {limit}, the most the kernels "
                             f"take for {dtype} at scale_base {spec.scale_base} (their decay "
                             f"is relative to each block); use backend='reference' or 'cpu'")


def kernel_mask(causal: bool, window, softcap) -> launch.Mask:
    left, right = window if window is not None else (None, None)
    return launch.Mask(causal=causal, left=left, right=right, softcap=float(softcap or 0.0))


# Packed sequences run eagerly under torch.compile (a graph break): their launch plan depends
# on the host-side lengths (validated from cu_seqlens), and there is no custom op for them yet.
@torch.compiler.disable
def attention_varlen(q, k, v, cu_q, cu_k, lens_q, lens_k, spec: PE, *, causal: bool,
                     scale: float, window=None, softcap=None, q_positions=None,
                     k_positions=None):
    """Fused attention over packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D),
    v (total_k, Hkv, Dv); cu_q / cu_k (B + 1,) int32 offsets on q's device, lens_q / lens_k
    their lengths (host ints, validated by the caller); explicit positions (total,) int
    tensors or None. Returns (out (total_q, Hq, Dv), lse (Hq, total_q) float32)."""
    _check_runnable(q)
    total_q, Hq, D = q.shape
    DV = v.shape[2]
    cur_len = None
    if spec.rotary == "rope" and spec.needs_cur_len:
        if q_positions is not None:
            cur_len = int(max(q_positions.max().item() if q_positions.numel() else -1,
                              k_positions.max().item() if k_positions.numel() else -1)) + 1
        else:
            cur_len = max(lens_k, default=0)
    pe = kernel_pe(spec, D, Hq, q.device, cur_len)
    # (1, H, total, D) views: the kernels' dense layout with one packed batch
    qv, kv, vv = (_stride1(t).unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    if total_q == 0 or k.shape[0] == 0:
        out, lse = _NoLaunch.apply(qv, kv, vv, DV)
        return out[0].transpose(0, 1), lse[0]
    if q_positions is not None:
        q_positions, k_positions = q_positions[None], k_positions[None]
    pos = KernelPositions(qpos=q_positions, kpos=k_positions, cu_q=cu_q, cu_k=cu_k,
                          lens_q=tuple(lens_q), lens_k=tuple(lens_k))
    if pos.explicit:
        check_xpos_span(spec, q.dtype, ("q_positions", q_positions, lens_q),
                        ("k_positions", k_positions, lens_k))
    mask = kernel_mask(causal, window, softcap)
    out, lse = _FusedAttention.apply(qv, kv, vv, pe.params, pe, pos, mask, scale)
    return out[0].transpose(0, 1), lse[0]
