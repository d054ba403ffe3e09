"""Naive PyTorch attention with every PE: materialises the (Sq, Sk) scores. The oracle.

Written for clarity, not speed. It shares nothing with the kernels except the PE spec math in
``posattn.pe``. Autograd gives gradients for q, k, v, ALiBi slopes and KERPLE r1/r2.

Math is done in float32 (float64 when the inputs are float64) unless ``compute_dtype`` says
otherwise: the tests pass the input dtype there to get "the same naive math in the input dtype",
the yardstick of flash-attention's error rule. RoPE angles are always formed in float64
(position * inv_freq, exact even at position 1e6) and only cos/sin are cast.

Order of operations on a logit (Gemma 2's): s = scale * q.k (RoPE-rotated q, k), then the soft
cap s = c * tanh(s / c), then the bias PE (ALiBi / KERPLE) is added, then the causal and
sliding-window masks. ``attention_varlen`` runs packed variable-length sequences one at a time.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .pe import PE, RoPE
from .positions import Positions


def rope_cos_sin(spec: RoPE, head_dim: int, pos: torch.Tensor, cur_len: Optional[int],
                 xpos_side: int = 0, xpos_centre: int = 0):
    """cos, sin of shape (B, S, rotary_dim // 2), float64, already multiplied by the attention
    factor. xPos (spec.xpos) with xpos_side +1 (queries) or -1 (keys): also by its decay
    zeta_j^(side (pos - centre) / scale_base) (0: none; the product of a query's and a key's is zeta_j^((q - k)
    / scale_base) whatever the centre: xpos_centre only keeps float64 in range)."""
    inv_freq, factor = spec.frequencies(head_dim, cur_len)
    angle = pos.to(torch.float64)[..., None] * inv_freq.to(pos.device)
    cos, sin = torch.cos(angle) * factor, torch.sin(angle) * factor
    if spec.xpos and xpos_side:
        rel = xpos_side * (pos.to(torch.float64) - xpos_centre)
        z = torch.exp2(rel[..., None] * spec.decay(head_dim).to(pos.device))
        cos, sin = cos * z, sin * z
    return cos, sin


def _xpos_logits(spec: RoPE, qr, kr, qp, kp):
    """xPos's q.k^T (B, Hq, Sq, Sk) as its definition reads: the rotated pairs' dot products,
    pair j times zeta_j^((q - k) / scale_base) per (query, key), at any positions (no factor
    of one position alone is formed, so nothing over- or underflows that the product does not).
    qr, kr: rotated (B, Hq, S, D), heads repeated."""
    D = qr.shape[-1]
    r2 = spec.resolve_rotary_dim(D) // 2
    if spec.interleaved:
        pairs = [(qr[..., 0:2 * r2:2], kr[..., 0:2 * r2:2]), (qr[..., 1:2 * r2:2], kr[..., 1:2 * r2:2])]
    else:
        pairs = [(qr[..., :r2], kr[..., :r2]), (qr[..., r2:2 * r2], kr[..., r2:2 * r2])]
    # (B, Sq, Sk); keys after their query (always masked: xPos is causal) at 0, not a factor
    # that grows without bound
    rel = (qp[:, :, None] - kp[:, None, :]).clamp(min=0).to(torch.float64)
    z = torch.exp2(rel[..., None] * spec.decay(D).to(rel.device)).to(qr.dtype)  # (B, Sq, Sk, r2)
    s = sum(torch.einsum("bhqj,bhkj,bqkj->bhqk", a, b, z) for a, b in pairs)
    return s + torch.matmul(qr[..., 2 * r2:], kr[..., 2 * r2:].transpose(-1, -2))


def xpos_centre(*positions: torch.Tensor) -> int:
    """The middle of the positions' range: xPos's factors relative to it stay within float64
    (spans up to ~5e5 positions at scale_base 512)."""
    lo = min(int(p.min()) for p in positions if p.numel())
    hi = max(int(p.max()) for p in positions if p.numel())
    return (lo + hi) // 2


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


def far_rotate(spec: RoPE, x: torch.Tensor, pos: torch.Tensor, query: bool,
               cur_len: Optional[int], piece: int = 0) -> torch.Tensor:
    """x (B, H, S, D) rotated at a RoPE extension's far positions of integer ``pos`` (B, S)
    (spec.extend.far_positions; query or key side, the query's in far region piece + 1) with
    the frequencies times freq_scale, float64 angles."""
    ext = spec.extend
    inv_freq, factor = spec.frequencies(x.shape[-1], cur_len)
    ang = (ext.far_positions(pos, query, piece).to(torch.float64)[..., None]
           * (inv_freq * ext.freq_scale).to(pos.device))
    return apply_rope(x, torch.cos(ang) * factor, torch.sin(ang) * factor, spec.interleaved)


def _far_logits(spec: RoPE, q, k, q_pos, k_pos, cur_len, group):
    """q.k^T (B, Hq, Sq, Sk) of a RoPE extension's far passes, as its authors wrote them: Q
    and K rotated at their far positions (far_rotate), every pair of them, one tensor per far
    region (the caller selects each region's pairs)."""
    kf = far_rotate(spec, k, k_pos, False, cur_len).repeat_interleave(group, dim=1)
    return [torch.matmul(far_rotate(spec, q, q_pos, True, cur_len, piece), kf.transpose(-1, -2))
            for piece in range(spec.extend.n_far)]


def bias(spec: PE, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype) -> Optional[torch.Tensor]:
    """Additive bias (B, H, Sq, Sk) in ``dtype`` of a bias PE (its ``reference_bias``: the spec
    owns its formula, posattn.pe), else None."""
    if spec.bias == "none":
        return None
    return spec.reference_bias_at(num_heads, q_pos, k_pos, dtype)


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
               window: Optional[Tuple[Optional[int], Optional[int]]]) -> Optional[torch.Tensor]:
    """(B, 1, Sq, Sk) bool, True where key j is visible to query i, or None (everything visible).

    causal: ``k_pos[j] <= q_pos[i]``. window ``(left, right)``:
    ``q_pos[i] - left <= k_pos[j] <= q_pos[i] + right``, a None side unbounded. Both are ANDed.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # (B, Sq, 1), (B, 1, Sk) int64
    visible = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        visible = both(visible, kp <= qp)
    if window is not None:
        left, right = window
        if left is not None:
            visible = both(visible, kp >= qp - int(left))
        if right is not None:
            visible = both(visible, kp <= qp + int(right))
    return None if visible is None else visible[:, None]


def attention_bhsd(q, k, v, spec: PE, *, causal: bool, scale: float, q_pos: Positions,
                   k_pos: Positions, compute_dtype=None,
                   window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                   softcap: Optional[float] = None, cur_len: Optional[int] = None):
    """Reference attention on (B, H, S, D) tensors. Returns (out in q.dtype, lse).

    cur_len: a length-dependent RoPE scaling's max position + 1 (dynamic NTK); default: from
    these positions.

    window: None or ``(left, right)``, each an int >= 0 or None (unbounded): key j is visible to
    query i iff ``q_pos[i] - left <= k_pos[j] <= q_pos[i] + right`` (and, when causal,
    ``k_pos[j] <= q_pos[i]``).
    softcap: None (or 0: off) or c > 0: the scaled logit s becomes ``c * tanh(s / c)`` before
    the bias PE is added.

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

    group = Hq // Hkv
    far = None
    if isinstance(spec, RoPE):
        if not spec.needs_cur_len:
            cur_len = None
        elif cur_len is None:
            cur_len = max(q_pos.max_position(), k_pos.max_position()) + 1
        if spec.extend is not None:  # the far pass's logits, before the near rotation
            far = [f * scale for f in _far_logits(spec, qc, kc, qp, kp, cur_len, group)]
        qc = apply_rope(qc, *rope_cos_sin(spec, D, qp, cur_len), spec.interleaved)
        kc = apply_rope(kc, *rope_cos_sin(spec, D, kp, cur_len), spec.interleaved)

    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)

    if getattr(spec, "xpos", False):
        s = _xpos_logits(spec, qc, kc, qp, kp) * scale
    else:
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if far is not None:  # the methods' selection: near pairs (region 0) keep RoPE's logits
        region = spec.extend.region(qp[:, :, None], kp[:, None, :])[:, None]
        for r, f in enumerate(far, 1):
            s = torch.where(region == r, f, s)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    b = bias(spec, Hq, qp, kp, compute_dtype)
    if b is not None:
        s = s + b
    visible = visibility(qp, kp, causal, window)  # (B, 1, Sq, Sk) or None
    if visible is not None:
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


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, spec: PE, *, causal: bool, scale: float,
                     window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                     softcap: Optional[float] = None, q_positions: Optional[torch.Tensor] = None,
                     k_positions: Optional[torch.Tensor] = None, compute_dtype=None):
    """Reference attention on packed variable-length sequences, one ``attention_bhsd`` call each.

    q: (total_q, Hq, D), k: (total_k, Hkv, D), v: (total_k, Hkv, Dv); cu_seqlens_q / _k: integer
    (B + 1,) cumulative starts (``cu[0] = 0``, ``cu[-1] = total``). Sequence b's queries
    ``cu_q[b]:cu_q[b+1]`` attend only to its keys ``cu_k[b]:cu_k[b+1]``.

    Positions restart in every sequence: keys at 0..len_k-1, queries at len_k-len_q..len_k-1
    (end-aligned to their own keys), unless explicit integer tensors q_positions (total_q,) /
    k_positions (total_k,) are given (sliced per sequence). A length-dependent RoPE scaling
    (dynamic NTK) sees the packed batch's max position, as a padded batch would (and as
    transformers does with packed position_ids).

    Returns (out (total_q, Hq, Dv) in q.dtype, lse (Hq, total_q) float32, float64 for float64
    math). A query whose sequence has no visible key gets out 0 and lse -inf.
    """
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cu_q) != len(cu_k) or len(cu_q) < 1:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length >= 1, got "
                         f"{len(cu_q)} and {len(cu_k)}")
    Hq, Dv = q.shape[1], v.shape[2]
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32

    if q_positions is None:
        cur_len = max([cu_k[b + 1] - cu_k[b] for b in range(len(cu_k) - 1)], default=0)
    else:
        cur_len = int(max(q_positions.max().item() if q_positions.numel() else -1,
                          k_positions.max().item() if k_positions.numel() else -1)) + 1
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        len_q, len_k = q1 - q0, k1 - k0
        if len_q == 0:
            continue  # no queries: nothing to output (its keys are seen by no one)
        # (len, H, D) -> (1, H, len, D) views
        qb, kb, vb = (t[a:e].transpose(0, 1)[None] for t, a, e in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        if q_positions is None:
            qpos = Positions(len_q, start=len_k - len_q)
        else:
            qpos = Positions(len_q, tensor=q_positions[q0:q1][None])
        if k_positions is None:
            kpos = Positions(len_k, start=0)
        else:
            kpos = Positions(len_k, tensor=k_positions[k0:k1][None])
        out, lse = attention_bhsd(qb, kb, vb, spec, causal=causal, scale=scale, q_pos=qpos, k_pos=kpos,
                                  compute_dtype=compute_dtype, window=window, softcap=softcap,
                                  cur_len=cur_len)
        outs.append(out[0].transpose(0, 1))  # (len_q, Hq, Dv)
        lses.append(lse[0])  # (Hq, len_q)
    if not outs:
        return q.new_zeros((0, Hq, Dv)), torch.zeros((Hq, 0), dtype=lse_dtype, device=q.device)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
