"""The implementations the benchmark times, and the PE math each peer needs.

Every implementation is an :class:`Impl`: a name, the PEs it serves, a role, and ``build``, which
takes a shape and its inputs and returns a forward callable ``() -> out (B, H, S, D)``; anything
it needs besides the inputs (a materialised mask, cos/sin tables, a block mask) is built there,
outside the timed region, as a model would build it once and share it across layers.
``build`` raises :class:`Unavailable` when the implementation cannot run here.

Roles:
  posattn    the fused kernel, ``posattn.attention(..., backend="triton")``
  ceiling    torch SDPA with no PE, one row per backend (flash, cudnn, efficient)
  unfused    what people do today: a bias PE materialised as SDPA's ``attn_mask`` (efficient,
             cudnn; flash takes no mask), RoPE rotated in a separate pass before SDPA
  flex       ``torch.compile(flex_attention)`` with the equivalent ``score_mod``
  flash-attn ``flash_attn_func`` (ALiBi slopes); usually not installed, which its row says

The PE parameters are the same numbers for every implementation: RoPE = YaRN(factor 4,
original 4096) on the full head dim, half-split (Llama) pairs; ALiBi = the paper's slopes;
KERPLE = log kind with per-head r1, r2 (:func:`kerple_params`). They are fixed (no gradient),
except in the trainable variants ``alibi-train`` / ``kerple-train`` (plan.TRAINABLE_PES,
fwd+bwd only): there they are leaves that require grad, so every implementation also returns
their gradients -- posattn from its dQ kernel, SDPA through the materialised mask (built in
the timed step, as a training step must rebuild it from the parameters), FlexAttention
through its captured-buffer gradients; flash-attn has none (its row says so).
Positions are token indices (Sq = Sk, so SDPA's top-left causal mask is posattn's).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import posattn

from .plan import TRAINABLE_PES, Inputs, Shape, base_pe, is_trainable

YARN_FACTOR = 4.0
YARN_ORIGINAL = 4096
KERPLE_KIND = "log"


class Unavailable(Exception):
    """The implementation cannot run here. ``status`` is a short word, the message says why."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Impl:
    name: str
    role: str
    pes: Tuple[str, ...]
    build: Callable[[str, Shape, Inputs], Callable[[], torch.Tensor]]
    doc: str = ""


# ---------------------------------------------------------------------------------------------
# PE parameters and the math the peers need (pure torch, CPU-testable)
# ---------------------------------------------------------------------------------------------


def kerple_params(H: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-head KERPLE r1 in [0.5, 2], r2 in [0.05, 1] (float32)."""
    r1 = torch.linspace(0.5, 2.0, H, dtype=torch.float32, device=device)
    r2 = torch.linspace(0.05, 1.0, H, dtype=torch.float32, device=device)
    return r1, r2


def alibi_params(H: int, device) -> torch.Tensor:
    """The paper's ALiBi slopes as float32 (what posattn uses by default)."""
    return posattn.alibi_slopes(H).to(device=device, dtype=torch.float32)


def rope_spec():
    return posattn.RoPE(scaling=posattn.YaRN(YARN_FACTOR, YARN_ORIGINAL))


def pe_spec(pe: str, H: int, device, params: Optional[List[torch.Tensor]] = None):
    """The posattn spec for a PE name, with the parameters every peer shares (or ``params``,
    from :func:`learnable_params`, for a trainable PE)."""
    if pe == "none":
        return posattn.NoPE()
    if pe == "rope":
        return rope_spec()
    if base_pe(pe) == "alibi":
        return posattn.ALiBi(params[0] if params else alibi_params(H, device))
    if base_pe(pe) == "kerple":
        r1, r2 = params if params else kerple_params(H, device)
        return posattn.KERPLE(KERPLE_KIND, r1, r2)
    raise ValueError(f"unknown PE {pe!r}")


def learnable_params(pe: str, H: int, device) -> List[torch.Tensor]:
    """A trainable bias PE's parameters as fresh float32 leaves that require grad: [slopes]
    or [r1, r2], the fixed PE's values."""
    return [p.detach().clone().requires_grad_() for p in bias_params(base_pe(pe), H, device)
            if p is not None]


def bias_from_distance(pe: str, dist: torch.Tensor, p1: torch.Tensor, p2: Optional[torch.Tensor]):
    """The bias for |q_pos - k_pos| = ``dist``; ``p1``/``p2`` broadcast against it.

    alibi: -slope·dist (p1 = slope); kerple log: -r1·log(1 + r2·dist) (p1 = r1, p2 = r2).
    Shared by the materialised mask and the FlexAttention score_mod, so both are one formula.
    """
    if pe == "alibi":
        return -p1 * dist
    if pe == "kerple":
        return -p1 * torch.log1p(p2 * dist)
    raise ValueError(f"{pe!r} is not a bias PE")


def bias_params(pe: str, H: int, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if pe == "alibi":
        return alibi_params(H, device), None
    return kerple_params(H, device)


def materialised_bias(pe: str, H: int, S: int, causal: bool, dtype, device) -> torch.Tensor:
    """The additive ``attn_mask`` (1, H, S, S) people build for SDPA: bias, -inf above the diagonal.

    Built head by head (float32 math, stored in ``dtype``, which SDPA requires to match q) so the
    build itself never holds more than one float32 S×S plane.
    """
    p1, p2 = bias_params(pe, H, device)
    idx = torch.arange(S, device=device)
    dist = (idx[:, None] - idx[None, :]).abs().to(torch.float32)
    mask = torch.empty((1, H, S, S), dtype=dtype, device=device)
    hidden = (idx[None, :] > idx[:, None]) if causal else None
    for h in range(H):
        plane = bias_from_distance(pe, dist, p1[h], None if p2 is None else p2[h])
        if hidden is not None:
            plane = plane.masked_fill(hidden, float("-inf"))
        mask[0, h].copy_(plane)
        del plane
    return mask


def differentiable_bias(pe: str, S: int, causal: bool, dtype, p1: torch.Tensor,
                        p2: Optional[torch.Tensor]) -> torch.Tensor:
    """The (1, H, S, S) ``attn_mask`` as a function of learnable (H,) parameters, what a
    training step with SDPA must build each step so that autograd reaches the parameters:
    float32 math over all heads at once, then ``dtype`` (SDPA's mask dtype must match q)."""
    idx = torch.arange(S, device=p1.device)
    dist = (idx[:, None] - idx[None, :]).abs().to(torch.float32)
    bias = bias_from_distance(base_pe(pe), dist, p1[:, None, None],
                              None if p2 is None else p2[:, None, None])
    if causal:
        bias = bias.masked_fill(idx[None, :] > idx[:, None], float("-inf"))
    return bias.to(dtype)[None]


def rope_tables(S: int, D: int, dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face-style (S, D) cos/sin tables (attention factor folded in), in ``dtype``."""
    inv_freq, factor = rope_spec().frequencies(D)
    angle = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat((angle, angle), dim=-1)
    return ((emb.cos() * factor).to(device=device, dtype=dtype),
            (emb.sin() * factor).to(device=device, dtype=dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The separate RoPE pass (transformers' ``apply_rotary_pos_emb``, half-split pairs)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------------------------------------
# torch.compile helpers (loaded on first use)
# ---------------------------------------------------------------------------------------------


def _raise_recompile_limits() -> None:
    """One process compiles flex / the rotation once per shape: keep Dynamo from giving up
    (past its limit it silently runs eager, which for flex materialises S×S)."""
    import torch._dynamo.config as cfg

    for name, value in (("recompile_limit", 512), ("cache_size_limit", 512),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        try:
            setattr(cfg, name, max(int(getattr(cfg, name)), value))
        except (AttributeError, TypeError):
            pass


@functools.lru_cache(maxsize=None)
def compiled_flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        raise Unavailable("not installed", f"torch.nn.attention.flex_attention: {e}") from None
    _raise_recompile_limits()
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=None)
def compiled_rotary():
    _raise_recompile_limits()
    return torch.compile(apply_rotary, dynamic=False)


@functools.lru_cache(maxsize=None)
def causal_block_mask(S: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, None, None, S, S, device=device)


@functools.lru_cache(maxsize=None)
def flex_score_mod(pe: str, H: int, device: str):
    """(score_mod, learnable parameters): the score_mod adds the bias to the scaled logits;
    one object per (pe, H, device), so Dynamo sees the same function (and its captured
    parameter tensors) every call. A trainable PE captures leaves that require grad (Flex
    then computes their gradients); the list is empty otherwise."""
    if pe == "none":
        return None, []
    if is_trainable(pe):
        params = learnable_params(pe, H, device)
        p1, p2 = (params + [None])[:2]
    else:
        params = []
        p1, p2 = bias_params(pe, H, device)
    pe = base_pe(pe)
    if p2 is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias_from_distance(pe, (q_idx - kv_idx).abs(), p1[h], None)
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias_from_distance(pe, (q_idx - kv_idx).abs(), p1[h], p2[h])
    return score_mod, params


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _sdpa_backend(name: str):
    try:
        from torch.nn.attention import SDPBackend
    except ImportError as e:  # torch < 2.3
        raise Unavailable("not installed", f"torch.nn.attention.SDPBackend: {e}") from None
    backend = getattr(SDPBackend, _SDPA_BACKENDS[name], None)
    if backend is None:
        raise Unavailable("unsupported", f"this torch has no SDPBackend.{_SDPA_BACKENDS[name]}")
    return backend


def _sdpa_call(backend_name: str):
    """SDPA restricted to one backend: it runs there or raises (never a silent fallback)."""
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(backend_name)

    def call(q, k, v, attn_mask=None, is_causal=False):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    return call


def build_posattn(pe: str, shape: Shape, x: Inputs):
    if is_trainable(pe):
        x.params = learnable_params(pe, shape.H, x.q.device)
    spec = pe_spec(pe, shape.H, x.q.device, x.params)
    causal = shape.causal
    return lambda: posattn.attention(x.q, x.k, x.v, spec, causal=causal, backend="triton")


def sdpa_builder(backend_name: str):
    def build(pe: str, shape: Shape, x: Inputs):
        call = _sdpa_call(backend_name)
        return lambda: call(x.q, x.k, x.v, is_causal=shape.causal)
    return build


def mask_builder(backend_name: str):
    def build(pe: str, shape: Shape, x: Inputs):
        call = _sdpa_call(backend_name)
        if is_trainable(pe):  # rebuilt from the parameters in every step (autograd)
            x.params = learnable_params(pe, shape.H, x.q.device)
            p1, p2 = (x.params + [None])[:2]
            return lambda: call(x.q, x.k, x.v, attn_mask=differentiable_bias(
                pe, shape.S, shape.causal, x.q.dtype, p1, p2))
        mask = materialised_bias(pe, shape.H, shape.S, shape.causal, x.q.dtype, x.q.device)
        return lambda: call(x.q, x.k, x.v, attn_mask=mask)
    return build


def rope_builder(backend_name: str, compiled: bool):
    def build(pe: str, shape: Shape, x: Inputs):
        call = _sdpa_call(backend_name)
        rotate = compiled_rotary() if compiled else apply_rotary
        cos, sin = rope_tables(shape.S, shape.D, x.q.dtype, x.q.device)

        def run():
            q, k = rotate(x.q, x.k, cos, sin)
            return call(q, k, x.v, is_causal=shape.causal)
        return run
    return build


def build_flex(pe: str, shape: Shape, x: Inputs):
    flex = compiled_flex()
    device = str(x.q.device)
    score_mod, x.params = flex_score_mod(pe, shape.H, device)
    block_mask = causal_block_mask(shape.S, device) if shape.causal else None
    return lambda: flex(x.q, x.k, x.v, score_mod=score_mod, block_mask=block_mask)


def build_flash_attn(pe: str, shape: Shape, x: Inputs):
    if is_trainable(pe):
        raise Unavailable("unsupported", "flash-attn computes no gradient for alibi_slopes")
    if importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("not installed", "flash-attn is not installed (pip install flash-attn)")
    from flash_attn import flash_attn_func

    slopes = alibi_params(shape.H, x.q.device) if pe == "alibi" else None
    # flash-attn takes (B, S, H, D); a transposed view has a unit last stride, which it needs.
    return lambda: flash_attn_func(x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2),
                                   causal=shape.causal, alibi_slopes=slopes).transpose(1, 2)


BIAS_PES = ("alibi", "kerple") + TRAINABLE_PES

IMPLS: List[Impl] = [
    Impl("posattn", "posattn", ("none", "rope") + BIAS_PES, build_posattn,
         "posattn.attention(backend='triton'): PE fused in the kernel"),
    Impl("sdpa-flash", "ceiling", ("none",), sdpa_builder("flash"), "SDPA, no PE, FLASH backend"),
    Impl("sdpa-cudnn", "ceiling", ("none",), sdpa_builder("cudnn"), "SDPA, no PE, CUDNN backend"),
    Impl("sdpa-efficient", "ceiling", ("none",), sdpa_builder("efficient"),
         "SDPA, no PE, EFFICIENT backend"),
    Impl("rope+sdpa-flash", "unfused", ("rope",), rope_builder("flash", compiled=True),
         "compiled rotation pass (one fused kernel), then SDPA FLASH"),
    Impl("rope+sdpa-cudnn", "unfused", ("rope",), rope_builder("cudnn", compiled=True),
         "compiled rotation pass, then SDPA CUDNN"),
    Impl("rope+sdpa-efficient", "unfused", ("rope",), rope_builder("efficient", compiled=True),
         "compiled rotation pass, then SDPA EFFICIENT"),
    Impl("rope(eager)+sdpa-flash", "unfused", ("rope",), rope_builder("flash", compiled=False),
         "transformers' eager apply_rotary_pos_emb, then SDPA FLASH"),
    Impl("mask+sdpa-efficient", "unfused", BIAS_PES, mask_builder("efficient"),
         "bias materialised as a (1, H, S, S) attn_mask, SDPA EFFICIENT"),
    Impl("mask+sdpa-cudnn", "unfused", BIAS_PES, mask_builder("cudnn"),
         "bias materialised as a (1, H, S, S) attn_mask, SDPA CUDNN"),
    Impl("flex", "flex", ("none",) + BIAS_PES, build_flex,
         "torch.compile(flex_attention), bias as score_mod, causal as block_mask"),
    Impl("flash-attn", "flash-attn", ("none", "alibi", "alibi-train"), build_flash_attn,
         "flash_attn_func (alibi_slopes for ALiBi)"),
]

IMPLS_BY_NAME: Dict[str, Impl] = {i.name: i for i in IMPLS}


def impls_for(pe: str, names: Optional[List[str]] = None) -> List[Impl]:
    """The implementations serving ``pe`` (filtered to ``names`` when given), in table order."""
    return [i for i in IMPLS if pe in i.pes and (names is None or i.name in names)]
