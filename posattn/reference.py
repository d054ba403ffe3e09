"""Naive PyTorch attention with every PE: materialises the (Sq, Sk) scores. The oracle.

Written for clarity, not speed. It shares nothing with the kernels except the PE spec math in
``posattn.pe``. Autograd gives gradients for q, k, v, ALiBi slopes and KERPLE r1/r2.

Math is done in float32 (float64 when the inputs are float64) unless ``compute_dtype`` says
otherwise: the tests pass the input dtype there to get "the same naive math in the input dtype",
the yardstick of flash-attention's error rule. RoPE angles are always formed in float64
(position * inv_freq, exact even at position 1e6) and only cos/sin are cast.
"""
from __future__ import annotations

from typing import Optional

import torch

from .pe import ALiBi, KERPLE, PE, RoPE
from .positions import Positions


def rope_cos_sin(spec: RoPE, head_dim: int, pos: torch.Tensor, cur_len: Optional[int]):
    """cos, sin of shape (B, S, rotary_dim // 2), float64, already multiplied by the attention factor."""
    inv_freq, factor = spec.frequencies(head_dim, cur_len)
    angle = pos.to(torch.float64)[..., None] * inv_freq.to(pos.device)
    return torch.cos(angle) * factor, torch.sin(angle) * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of x (B, H, S, D); the rest pass through.

    cos/sin: (B, S, R/2). Half-split pairs dims (j, j + R/2); interleaved pairs (2j, 2j + 1).
    """
    r2 = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    rot, rest = x[..., : 2 * r2], x[..., 2 * r2:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :r2], rot[..., r2:]
        y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((y, rest), dim=-1)


def bias(spec: PE, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype) -> Optional[torch.Tensor]:
    """Additive bias (B, H, Sq, Sk) in ``dtype`` for ALiBi / KERPLE, else None."""
    if not isinstance(spec, (ALiBi, KERPLE)):
        return None
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(dtype)[:, None]  # (B, 1, Sq, Sk)
    if isinstance(spec, ALiBi):
        slopes = spec.get_slopes(num_heads, q_pos.device).to(dtype)
        return -slopes[:, None, None] * dist
    r1, r2 = (t.to(dtype)[:, None, None] for t in spec.get_params(num_heads, q_pos.device))
    if spec.kind == "log":
        return -r1 * torch.log1p(r2 * dist)
    # |Δ|**r2 written as exp(r2 log|Δ|) away from 0, and 0 at Δ = 0, so d/dr2 stays finite there.
    pos = dist > 0
    logd = torch.log(torch.where(pos, dist, torch.ones_like(dist)))
    return -r1 * torch.where(pos, torch.exp(r2 * logd), torch.zeros_like(dist))


def attention_bhsd(q, k, v, spec: PE, *, causal: bool, scale: float, q_pos: Positions,
                   k_pos: Positions, compute_dtype=None):
    """Reference attention on (B, H, S, D) tensors. Returns (out in q.dtype, lse).

    lse: (B, Hq, Sq), float32 (float64 for float64 math), natural log; -inf for a query that sees
    no key (its output row is 0).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qp = q_pos.as_tensor(B, Sq, q.device)  # (B, Sq) int64
    kp = k_pos.as_tensor(B, Sk, q.device)
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))

    if isinstance(spec, RoPE):
        cur_len = None
        if spec.needs_cur_len:
            cur_len = max(q_pos.max_position(), k_pos.max_position()) + 1
        qc = apply_rope(qc, *rope_cos_sin(spec, D, qp, cur_len), spec.interleaved)
        kc = apply_rope(kc, *rope_cos_sin(spec, D, kp, cur_len), spec.interleaved)

    group = Hq // Hkv
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)

    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    b = bias(spec, Hq, qp, kp, compute_dtype)
    if b is not None:
        s = s + b
    if causal:
        visible = (kp[:, None, :] <= qp[:, :, None])[:, None]  # (B, 1, Sq, Sk)
        s = s.masked_fill(~visible, float("-inf"))

    # Softmax that gives 0 (not NaN) for rows that see no key. The max shift is detached: the
    # softmax and the LSE are invariant to it, so the gradient is unchanged.
    m = s.amax(dim=-1, keepdim=True).detach() if Sk > 0 else s.new_full((*s.shape[:-1], 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(l == 0, torch.ones_like(l), l)
    out = torch.matmul(p, vc)
    lse = (m + torch.log(l)).squeeze(-1)
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dtype)
