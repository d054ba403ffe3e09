"""CPU backend: exact attention with any PE in O(S) extra memory, on torch's own CPU kernels.

Work is done one **query block** at a time (``BLOCK_Q`` rows, every head): a block sees the key
range its causal / window masks leave visible (``_key_range``; keys outside it are skipped), and
its additive mask -- the PE's bias from ``posattn.reference.bias`` plus -inf where invisible -- is
(B, Hq | 1, Bq, Bk): nothing S x S is ever alive. Two engines run a block:

* ``sdpa``: torch's CPU flash-attention op (``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward) with the block's mask as ``attn_mask``. It is blocked, vectorised and
  multi-threaded inside, and returns the LSE. Used whenever it can express the math: no soft cap
  (tanh sits *between* the logits and the bias), Dv == D, and in backward no PE parameter that
  needs a gradient and no gradient flowing into the LSE (the op forms dS internally).
  Without a bias and with no mask, or a causal mask that is the op's own top-left one, the whole
  problem is one call (no blocks, no mask at all).
* ``explicit``: blockwise matmuls with the block's full row of visible keys (so the softmax is
  exact in one pass, no online rescaling), for everything else. Its backward forms
  dS = P * (dP - D + dlse) per block, which also gives the PE parameters' gradients:
  ``autograd.grad(bias_block, params, dS_block)`` accumulated over blocks, so any PE spec whose
  ``reference_bias`` is differentiable gets gradients with no code here.

Nothing here switches on a PE name: the rotary axis asks ``spec.rotary == "rope"`` (rotate Q and K
once, float64 angles, ``reference.rope_cos_sin`` / ``apply_rope``; backward rotates dQ / dK back),
the bias axis is whatever ``reference.bias`` returns. Math runs in float32 (float64 for float64
inputs); forward saves q, k, v, out and lse only, backward recomputes every block.

GQA: the op takes Hkv < Hq itself; the explicit engine folds each group of Hq / Hkv query heads
into the rows of one matmul against its K/V head, so K and V are never repeated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import reference
from .pe import PE
from .positions import Positions

# Query rows per block. The block's mask is B * Hq * BLOCK_Q * Sk_visible floats; MASK_BYTES caps
# it (rows shrink for long keys, never below MIN_BLOCK_Q). Tests set both small to cross blocks.
BLOCK_Q = 128
MIN_BLOCK_Q = 16
MASK_BYTES = 32 << 20
# Run the explicit engine everywhere (tests: both engines on every case).
FORCE_EXPLICIT = False
# The op's masks from a relative-position table where positions are contiguous (rel_table);
# tests turn it off to compare with the per-score masks.
USE_REL_TABLE = True

_fa_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_fa_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# --------------------------------------------------------------------------------------------
# geometry: positions, visible key ranges, block masks
# --------------------------------------------------------------------------------------------

@dataclass
class Geometry:
    """One (B, H, S, D) problem's geometry.

    qpos (B, Sq), kpos (B, Sk): int64 positions (expanded views allowed). ``k_sorted``: every
    row of kpos is non-decreasing, so a query block's visible keys are one range found by
    binary search. ``top_left_causal``: the mask is exactly "key j visible to query i iff
    j <= i" with every query seeing key 0 (contiguous positions starting together, Sq <= Sk).
    """
    qpos: torch.Tensor
    kpos: torch.Tensor
    causal: bool
    window: Optional[Tuple[Optional[int], Optional[int]]]
    scale: float
    softcap: Optional[float]
    k_sorted: bool
    top_left_causal: bool
    # both sides contiguous (the same for every batch row): the first positions, else None
    q_start: Optional[int] = None
    k_start: Optional[int] = None

    @property
    def masked(self) -> bool:
        return self.causal or self.window is not None


def make_geometry(q_pos: Positions, k_pos: Positions, B: int, Sq: int, Sk: int, *, causal, window,
                  scale, softcap) -> Geometry:
    qp = q_pos.as_tensor(B, Sq, "cpu")
    kp = k_pos.as_tensor(B, Sk, "cpu")
    k_sorted = k_pos.is_contiguous or Sk < 2 or bool((kp[:, 1:] >= kp[:, :-1]).all())
    top_left = (causal and window is None and q_pos.is_contiguous and k_pos.is_contiguous
                and q_pos.start == k_pos.start and 0 < Sq <= Sk)
    contiguous = q_pos.is_contiguous and k_pos.is_contiguous
    return Geometry(qp, kp, causal, window, scale, softcap, k_sorted, top_left,
                    q_pos.start if contiguous else None, k_pos.start if contiguous else None)


def _key_range(geo: Geometry, i0: int, i1: int) -> Tuple[int, int]:
    """[j0, j1): the keys any query of rows [i0, i1) may see (all keys unless masks and sorted
    keys let a binary search narrow it). Keys outside it are invisible to the whole block."""
    Sk = geo.kpos.shape[1]
    if not geo.masked or not geo.k_sorted or Sk == 0:
        return 0, Sk
    qb = geo.qpos[:, i0:i1]
    left, right = geo.window if geo.window is not None else (None, None)
    lo = hi = None
    if left is not None:
        lo = qb.min(dim=1).values - left  # (B,)
    if right is not None:
        hi = qb.max(dim=1).values + right
    if geo.causal:
        qmax = qb.max(dim=1).values
        hi = qmax if hi is None else torch.minimum(hi, qmax)
    kp = geo.kpos.contiguous()
    j0 = 0 if lo is None else int(torch.searchsorted(kp, lo[:, None].contiguous()).min())
    j1 = Sk if hi is None else int(torch.searchsorted(kp, hi[:, None].contiguous(), right=True).max())
    return j0, max(j0, j1)


def _block_visible(geo: Geometry, i0, i1, j0, j1) -> Optional[torch.Tensor]:
    """(B, 1, Bq, Bk) bool where key j is visible to query i, or None when all are."""
    if not geo.masked:
        return None
    vis = reference.visibility(geo.qpos[:, i0:i1], geo.kpos[:, j0:j1], geo.causal, geo.window)
    return None if vis is None or bool(vis.all()) else vis


def _block_bias(spec: PE, Hq: int, geo: Geometry, i0, i1, j0, j1, dtype) -> Optional[torch.Tensor]:
    """(B, Hq, Bq, Bk) the PE's bias of the block (differentiable into spec.tensors() when grad
    is enabled), or None for a PE without one."""
    return reference.bias(spec, Hq, geo.qpos[:, i0:i1], geo.kpos[:, j0:j1], dtype)


# The op's mask from a table over relative positions (contiguous positions)
# ------------------------------------------------------------------------
# Every bias PE is a function of k - q (PE.reference_bias takes the relative position), and so
# is visibility (causal: k - q <= 0; a window: -left <= k - q <= right). With contiguous
# positions a block's additive mask is then a Toeplitz matrix of one row per head over the
# Sq + Sk - 1 relative positions of the call: the PE's math runs once per relative position,
# not per score. With the block's query rows taken in reverse order that matrix is a strided
# view of the row with unit strides (torch has no negative strides), which torch's CPU flash
# op reads as its attn_mask as is: no mask is ever materialised. The reversed rows cost a
# reversed copy of the block's q (and out, dO, LSE in the backward) -- Bq x D, not Bq x Bk.
# Same values bit for bit as the per-score masks (the same elementwise math on the same
# relative positions; tests/test_cpu.py).


def rel_table(spec: PE, Hq: int, geo: Geometry, dtype) -> Optional[torch.Tensor]:
    """(Hq | 1, Sq + Sk - 1) the additive mask (bias, and -inf where invisible) at relative
    positions k - q from k_first - q_last up; None unless positions are contiguous and there is
    a bias or a mask. Not differentiable (the op's paths; PE gradients take the explicit one)."""
    if geo.q_start is None or not spec.relative_only:  # (FIRE's bias reads q too)
        return None
    Sq, Sk = geo.qpos.shape[1], geo.kpos.shape[1]
    rel = torch.arange(Sq + Sk - 1, dtype=torch.int64) + (geo.k_start - (geo.q_start + Sq - 1))
    zero = torch.zeros(1, 1, dtype=torch.int64)
    with torch.no_grad():
        bias = reference.bias(spec, Hq, zero, rel[None], dtype)  # (1, Hq, 1, L)
    vis = reference.visibility(zero, rel[None], geo.causal, geo.window)  # (1, 1, 1, L)
    if bias is None and vis is None:
        return None
    t = torch.zeros(1, 1, 1, rel.numel(), dtype=dtype) if bias is None else bias.to(dtype)
    if vis is not None:
        t = t.masked_fill(~vis, float("-inf"))
    return t[0, :, 0].contiguous()


@dataclass
class BlockMask:
    """A query block's attn_mask for the op (B|1, Hq|1, Bq, Bk) or None; ``empty``: (B|1, Bq)
    bool, the rows that see no key (their LSE is -inf), or None; ``reversed``: the mask is for
    the block's rows in reverse order (the caller reverses q's rows, and the results back)."""
    mask: Optional[torch.Tensor]
    empty: Optional[torch.Tensor]
    reversed: bool = False

    def rows(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """x's block rows in the order the mask wants (and back: the reversal is its own
        inverse)."""
        return x.flip(dim) if self.reversed else x


def _toeplitz_mask(table: torch.Tensor, finite: torch.Tensor, Sq: int, i0, i1, j0, j1) -> BlockMask:
    """The block's mask for its rows reversed: M[h, i', j] = table[h, (j0 + j) - (i1 - 1 - i')
    + Sq - 1], unit strides in both i' and j: a view, nothing copied. ``finite``: prefix counts
    of the visible relative positions (L + 1,), for the empty rows."""
    H, L = table.shape
    Bq, Bk = i1 - i0, j1 - j0
    first = j0 + Sq - i1  # index of (i' = 0, j = 0); >= 0, and the last, first + Bq + Bk - 2, < L
    view = table.as_strided((H, Bq, Bk), (L, 1, 1), table.storage_offset() + first)
    rows = torch.arange(i0, i1)
    lo = j0 - rows + Sq - 1  # each row's first and last table index (original row order)
    empty = (finite[lo + Bk] - finite[lo]) == 0
    return BlockMask(view[None], empty[None], reversed=True)


def _block_mask(pb, Hq, i0, i1, j0, j1, dtype) -> BlockMask:
    """The op's attn_mask for a block: a view of the relative-position table when there is one,
    else built per score from reference.bias and reference.visibility."""
    geo = pb.geo
    if pb.table is not None:
        return _toeplitz_mask(pb.table, pb.finite, geo.qpos.shape[1], i0, i1, j0, j1)
    visible = _block_visible(geo, i0, i1, j0, j1)
    bias = _block_bias(pb.spec, Hq, geo, i0, i1, j0, j1, dtype)
    empty = None if visible is None else ~visible[:, 0].any(-1)
    return BlockMask(_additive_mask(bias, visible, dtype), empty)


def _blocks(B: int, Hq: int, Sq: int, Sk: int, pb=None) -> List[Tuple[int, int]]:
    """Query row blocks [i0, i1): BLOCK_Q rows, fewer when the block mask would pass MASK_BYTES.
    One block when the op reads its mask as a view of the relative-position table (nothing is
    materialised) and no mask leaves keys to skip: the op's own blocking then does the rest,
    without a call, and a dK/dV accumulation, per query block."""
    if pb is not None and pb.table is not None and not pb.geo.masked and pb.sdpa_fwd:
        return [(0, Sq)] if Sq else []
    rows = BLOCK_Q
    while rows > MIN_BLOCK_Q and B * Hq * rows * Sk * 4 > MASK_BYTES:
        rows //= 2
    return [(i, min(Sq, i + rows)) for i in range(0, Sq, rows)]


# --------------------------------------------------------------------------------------------
# RoPE: rotate once, rotate gradients back
# --------------------------------------------------------------------------------------------

@dataclass
class Rotation:
    """cos/sin (B, S, R/2) float64 (attention factor included) for q and k, or None (no RoPE)."""
    q: Optional[Tuple[torch.Tensor, torch.Tensor]]
    k: Optional[Tuple[torch.Tensor, torch.Tensor]]
    interleaved: bool = False

    def apply(self, x: torch.Tensor, which: str, inverse: bool = False) -> torch.Tensor:
        """Rotate x (B, H, S, D); ``inverse``: by the transpose (f R(-theta)), which maps a
        gradient w.r.t. the rotated tensor to one w.r.t. the unrotated."""
        cs = getattr(self, which)
        if cs is None:
            return x
        cos, sin = cs
        return reference.apply_rope(x, cos, -sin if inverse else sin, self.interleaved)


XPOS_MAX_LOG2 = 60  # xPos: the largest |log2| of a factor the cpu backend forms (float32 math)


def make_rotation(spec: PE, head_dim: int, geo: Geometry, cur_len: Optional[int]) -> Rotation:
    if spec.rotary != "rope":
        return Rotation(None, None)
    if getattr(spec, "extend", None) is not None:  # (attention_bhsd splits it first)
        raise AssertionError("a RoPE extension reached make_rotation")
    if not spec.needs_cur_len:
        cur_len = None
    elif cur_len is None:  # as reference.attention_bhsd: max position + 1 of this call
        top = max([int(t.max()) for t in (geo.qpos, geo.kpos) if t.numel()], default=-1)
        cur_len = top + 1
    if spec.xpos:  # queries and keys take opposite decays about one centre
        c = reference.xpos_centre(geo.qpos, geo.kpos)
        reach = max(abs(int(t.min()) - c) for t in (geo.qpos, geo.kpos) if t.numel())
        reach = max([reach] + [abs(int(t.max()) - c) for t in (geo.qpos, geo.kpos) if t.numel()])
        if reach * -float(spec.decay(head_dim)[0]) > XPOS_MAX_LOG2:
            raise ValueError(f"XPos on backend='cpu': positions span {2 * reach}, past what its "
                             f"decays about one centre keep in float32 (2**+-{XPOS_MAX_LOG2}); "
                             f"use backend='triton' (per-block decays) or 'reference'")
        cs_q = reference.rope_cos_sin(spec, head_dim, geo.qpos, cur_len, 1, c)
        cs_k = reference.rope_cos_sin(spec, head_dim, geo.kpos, cur_len, -1, c)
        return Rotation(cs_q, cs_k, spec.interleaved)
    cs_q = reference.rope_cos_sin(spec, head_dim, geo.qpos, cur_len)
    # self-attention: the same positions, the same angles (cos/sin in float64 cost as much as a
    # rotation)
    same = geo.qpos.shape == geo.kpos.shape and torch.equal(geo.qpos, geo.kpos)
    cs_k = cs_q if same else reference.rope_cos_sin(spec, head_dim, geo.kpos, cur_len)
    return Rotation(cs_q, cs_k, spec.interleaved)


# --------------------------------------------------------------------------------------------
# the explicit engine: one block's logits, forward and backward
# --------------------------------------------------------------------------------------------

def _fold(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, Hq, R, C) -> (B, Hkv, g * R, C): each K/V head's query group as rows of one matmul."""
    B, Hq, R, C = x.shape
    return x.reshape(B, Hkv, (Hq // Hkv) * R, C)


def _unfold(x: torch.Tensor, Hq: int) -> torch.Tensor:
    """(B, Hkv, g * R, C) -> (B, Hq, R, C)."""
    B, Hkv, GR, C = x.shape
    return x.reshape(B, Hq, GR // (Hq // Hkv), C)


def _block_logits(qb, kr, geo: Geometry, bias, visible):
    """Scaled, soft-capped, biased, masked logits (B, Hq, Bq, Bk) of query block qb (B, Hq, Bq, D)
    against keys kr (B, Hkv, Bk, D); also tanh(s / c) of the soft cap (None without one)."""
    Hq, Hkv = qb.shape[1], kr.shape[1]
    s = _unfold(torch.matmul(_fold(qb, Hkv), kr.transpose(-1, -2)), Hq).mul_(geo.scale)
    t = None
    if geo.softcap:
        t = torch.tanh(s / geo.softcap)
        s = t * geo.softcap
    if bias is not None:
        s = s.add_(bias)
    if visible is not None:
        s = s.masked_fill_(~visible, float("-inf"))
    return s, t


def _explicit_fwd(qb, kr, vr, geo, bias, visible):
    """out (B, Hq, Bq, Dv), lse (B, Hq, Bq) of one block; a row that sees no key gets 0, -inf."""
    s, _ = _block_logits(qb, kr, geo, bias, visible)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s.sub_(m))
    l = p.sum(dim=-1, keepdim=True)
    o = _unfold(torch.matmul(_fold(p, kr.shape[1]), vr), qb.shape[1])
    o = o / torch.where(l == 0, torch.ones_like(l), l)
    return o, (m + torch.log(l)).squeeze(-1)


def _explicit_bwd(qb, kr, vr, dob, lse_b, delta_b, geo, bias, visible):
    """One block's backward. lse_b, delta_b (B, Hq, Bq): the saved LSE and rowsum(dO * O) - dlse.

    Returns dq (B, Hq, Bq, D), dk (B, Hkv, Bk, D), dv (B, Hkv, Bk, Dv) and dS (B, Hq, Bq, Bk)
    (the gradient w.r.t. the biased logits, which is the bias's gradient)."""
    Hq, Hkv = qb.shape[1], kr.shape[1]
    s, t = _block_logits(qb, kr, geo, bias, visible)
    lse_safe = torch.where(torch.isfinite(lse_b), lse_b, torch.full_like(lse_b, float("inf")))
    p = torch.exp(s.sub_(lse_safe[..., None]))  # exactly 0 on masked keys and empty rows
    dp = _unfold(torch.matmul(_fold(dob, Hkv), vr.transpose(-1, -2)), Hq)
    ds = p * dp.sub_(delta_b[..., None])
    dv = torch.matmul(_fold(p, Hkv).transpose(-1, -2), _fold(dob, Hkv))
    dsr = ds if t is None else ds * (1 - t * t)  # d(c tanh(x / c)) = 1 - tanh^2
    dq = _unfold(torch.matmul(_fold(dsr, Hkv), kr), Hq).mul_(geo.scale)
    dk = torch.matmul(_fold(dsr, Hkv).transpose(-1, -2), _fold(qb, Hkv)).mul_(geo.scale)
    return dq, dk, dv, ds


# --------------------------------------------------------------------------------------------
# the block loops
# --------------------------------------------------------------------------------------------

@dataclass
class Problem:
    """Everything but the tensors: the PE spec, geometry, rotation and which engine runs."""
    spec: PE
    geo: Geometry
    rot: Rotation
    has_bias: bool
    sdpa_fwd: bool  # the op can run the forward (no soft cap, Dv == D)
    table: Optional[torch.Tensor] = None  # rel_table (the op's paths), or None
    finite: Optional[torch.Tensor] = None  # prefix counts of the table's visible entries


def _additive_mask(bias, visible, dtype):
    """The op's attn_mask (same dtype as q) from a block's bias and visibility: bias, 0 or -inf
    ((B, Hq | 1, Bq, Bk)); None if neither."""
    if bias is None and visible is None:
        return None
    if bias is None:
        return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    bias = bias.to(dtype)
    # out of place: a spec may hand back a broadcast view
    return bias if visible is None else bias.masked_fill(~visible, float("-inf"))


def _forward(pb: Problem, q, k, v):
    """q (B, Hq, Sq, D), k, v (B, Hkv, Sk, D|Dv), rotated, in the math dtype ->
    out (B, Hq, Sq, Dv) math dtype, lse (B, Hq, Sq)."""
    B, Hq, Sq, _ = q.shape
    Sk, Dv = k.shape[2], v.shape[3]
    geo = pb.geo
    if pb.sdpa_fwd and not pb.has_bias and Sk > 0 and (not geo.masked or geo.top_left_causal):
        return _fa_fwd(q, k, v, 0.0, geo.causal, scale=geo.scale)  # one call, no mask at all
    out = q.new_zeros(B, Hq, Sq, Dv)
    lse = q.new_full((B, Hq, Sq), float("-inf"))
    for i0, i1 in _blocks(B, Hq, Sq, Sk, pb):
        j0, j1 = _key_range(geo, i0, i1)
        if j1 == j0:
            continue  # no key visible: out 0, lse -inf
        qb, kr, vr = q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1]
        if pb.sdpa_fwd:
            bm = _block_mask(pb, Hq, i0, i1, j0, j1, q.dtype)
            o, l = _fa_fwd(bm.rows(qb), kr, vr, 0.0, False, attn_mask=bm.mask, scale=geo.scale)[:2]
            o, l = bm.rows(o), bm.rows(l, -1)
            if bm.empty is not None:  # the op gives LSE 0 to a row that sees no key
                l = l.masked_fill(bm.empty[:, None], float("-inf"))
        else:
            visible = _block_visible(geo, i0, i1, j0, j1)
            bias = _block_bias(pb.spec, Hq, geo, i0, i1, j0, j1, q.dtype)
            o, l = _explicit_fwd(qb, kr, vr, geo, bias, visible)
        out[:, :, i0:i1] = o
        lse[:, :, i0:i1] = l
    return out, lse


def _backward(pb: Problem, q, k, v, out, lse, dout, dlse, params):
    """Gradients of q, k, v (rotated, math dtype) and of ``params`` (the PE tensors that need
    one; list of tensors or None). dlse (B, Hq, Sq) or None."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    geo = pb.geo
    explicit = not pb.sdpa_fwd or bool(params) or dlse is not None
    lse0 = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # the op's convention
    if not explicit and not pb.has_bias and Sk > 0 and (not geo.masked or geo.top_left_causal):
        dq, dk, dv = _fa_bwd(dout, q, k, v, out, lse0, 0.0, geo.causal, scale=geo.scale)
        return dq, dk, dv, []
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    pgrads = [torch.zeros_like(p) for p in params or []]
    delta = None
    if explicit:
        delta = (dout * out).sum(-1)
        if dlse is not None:
            delta = delta - dlse
    # (the explicit engine materialises its blocks' scores: never one S x S block)
    for i0, i1 in _blocks(B, Hq, Sq, Sk, None if explicit else pb):
        j0, j1 = _key_range(geo, i0, i1)
        if j1 == j0:
            continue
        qb, kr, vr, dob = q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1], dout[:, :, i0:i1]
        if not explicit:
            bm = _block_mask(pb, Hq, i0, i1, j0, j1, q.dtype)
            r = bm.rows
            dqb, dkb, dvb = _fa_bwd(r(dob), r(qb), kr, vr, r(out[:, :, i0:i1]),
                                    r(lse0[:, :, i0:i1], -1).contiguous(), 0.0, False,
                                    attn_mask=bm.mask, scale=geo.scale)
            dqb = r(dqb)
        else:
            visible = _block_visible(geo, i0, i1, j0, j1)
            with torch.enable_grad():
                bias = _block_bias(pb.spec, Hq, geo, i0, i1, j0, j1, q.dtype)
            dqb, dkb, dvb, ds = _explicit_bwd(qb, kr, vr, dob, lse[:, :, i0:i1], delta[:, :, i0:i1], geo,
                                              bias.detach() if bias is not None else None, visible)
            if params and bias is not None:
                gs = torch.autograd.grad(bias, params, grad_outputs=ds, allow_unused=True)
                for acc, gp in zip(pgrads, gs):
                    if gp is not None:
                        acc += gp
        dq[:, :, i0:i1] = dqb
        dk[:, :, j0:j1] += dkb
        dv[:, :, j0:j1] += dvb
    return dq, dk, dv, pgrads


class _CpuAttention(torch.autograd.Function):
    """(q, k, v, problem, *pe_tensors) -> (out, lse). Saves q, k, v, out, lse only."""

    @staticmethod
    def forward(ctx, q, k, v, pb: Problem, *pe_tensors):
        mdt = _math_dtype(q.dtype)
        qr = pb.rot.apply(q.to(mdt), "q")
        kr = pb.rot.apply(k.to(mdt), "k")
        out, lse = _forward(pb, qr, kr, v.to(mdt))
        out = out.to(q.dtype)
        lse = lse.to(mdt)
        ctx.pb = pb
        ctx.save_for_backward(q, k, v, out, lse, *pe_tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *pe_tensors = ctx.saved_tensors
        pb: Problem = ctx.pb
        mdt = _math_dtype(q.dtype)
        want = [i for i in range(len(pe_tensors)) if ctx.needs_input_grad[4 + i]]
        # the spec's own tensor objects: the recomputed bias is built from them
        params = [pb.spec.tensors()[i] for i in want]
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None and not bool(dlse.any()):
            dlse = None  # the common case: nothing flows into the LSE, the op can run
        qr = pb.rot.apply(q.to(mdt), "q")
        kr = pb.rot.apply(k.to(mdt), "k")
        dq, dk, dv, pgrads = _backward(pb, qr, kr, v.to(mdt), out.to(mdt), lse, dout.to(mdt),
                                       None if dlse is None else dlse.to(mdt), params)
        del qr, kr  # before the rotations back allocate theirs (peak memory)
        dq = pb.rot.apply(dq, "q", inverse=True).to(q.dtype)
        dk = pb.rot.apply(dk, "k", inverse=True).to(k.dtype)
        grads = [None] * len(pe_tensors)
        for i, g in zip(want, pgrads):
            grads[i] = g.to(pe_tensors[i].dtype)
        return (dq, dk, dv.to(v.dtype), None, *grads)


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# entry points (called by posattn.api after validation)
# --------------------------------------------------------------------------------------------

def check_runnable(q: torch.Tensor) -> None:
    """backend='cpu' runs on CPU tensors or raises (no hidden fallback)."""
    if q.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors; q is on {q.device} (use backend='triton' or "
                         f"'auto' for {q.device.type} tensors)")


def attention_bhsd(q, k, v, spec: PE, *, q_pos: Positions, k_pos: Positions, causal: bool, scale: float,
                   window=None, softcap=None, cur_len: Optional[int] = None):
    """(B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv) in q.dtype (q's
    strides need not be contiguous), lse (B, Hq, Sq) float32 (float64 for float64 inputs)."""
    check_runnable(q)
    if getattr(spec, "extend", None) is not None:
        return _extended(q, k, v, spec, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale,
                         window=window, softcap=softcap, cur_len=cur_len)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    geo = make_geometry(q_pos, k_pos, B, Sq, Sk, causal=causal, window=window, scale=scale, softcap=softcap)
    mdt = _math_dtype(q.dtype)
    pb = Problem(spec=spec, geo=geo, rot=make_rotation(spec, D, geo, cur_len),
                 has_bias=spec.bias != "none",  # the spec's bias axis
                 sdpa_fwd=not softcap and v.shape[3] == D and not FORCE_EXPLICIT)
    if pb.sdpa_fwd and USE_REL_TABLE:
        pb.table = rel_table(spec, Hq, geo, mdt)
        if pb.table is not None:
            fin = (~torch.isneginf(pb.table[0])).to(torch.int64).cumsum(0)
            pb.finite = torch.cat((fin.new_zeros(1), fin))
    return _CpuAttention.apply(q, k, v, pb, *spec.tensors())


def _extended(q, k, v, spec, *, q_pos: Positions, k_pos: Positions, causal, scale, window,
              softcap, cur_len):
    """A RoPE extension (posattn.pe.RoPEExtension) as pieces of one attention, one per region,
    merged by their LSEs in torch (differentiable: each piece's backward takes its LSE's
    gradient). A piece is a call with the region's mask (RoPEExtension.piece_mask: a window on
    the distance, or on chunk-spread positions): the near pairs with the model's RoPE, each
    far region on Q and K rotated at their far positions (reference.far_rotate, float64
    angles) with no PE."""
    from .pe import NoPE

    ext = spec.extend
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if spec.needs_cur_len and cur_len is None:  # as reference.attention_bhsd
        cur_len = max(q_pos.max_position(), k_pos.max_position()) + 1
    far_len = cur_len if spec.needs_cur_len else None
    left, right = window if window is not None else (None, None)
    qp, kp = q_pos.as_tensor(B, Sq, "cpu"), k_pos.as_tensor(B, Sk, "cpu")

    def side(mine, theirs):
        return theirs if mine is None else (mine if theirs is None else min(mine, theirs))

    outs, lses = [], []
    for r in range(ext.n_far + 1):
        vis, p_left, p_right = ext.piece_mask(r)
        pq, pk = q_pos, k_pos
        if vis is not None:  # chunk regions: the mask on spread positions
            pq, pk = Positions(Sq, tensor=vis(qp)), Positions(Sk, tensor=vis(kp))
        piece_window = (side(p_left, left), side(p_right, right))
        if r == 0:
            o, lse = attention_bhsd(q, k, v, spec.with_extend(None), q_pos=pq, k_pos=pk,
                                    causal=causal, scale=scale, window=piece_window,
                                    softcap=softcap, cur_len=cur_len)
        else:
            qf = reference.far_rotate(spec, q, qp, True, far_len, r - 1)
            kf = reference.far_rotate(spec, k, kp, False, far_len)
            o, lse = attention_bhsd(qf, kf, v, NoPE(), q_pos=pq, k_pos=pk, causal=causal,
                                    scale=scale, window=piece_window, softcap=softcap)
        outs.append(o)
        lses.append(lse)
    lse = torch.stack(lses)
    m = lse.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # no key in any: 0
    w = torch.exp(lse - m)
    tot = w.sum(0)
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    out = sum(wi[..., None] * o.to(w.dtype) for wi, o in zip(w, outs)) / safe[..., None]
    return out.to(q.dtype), m + torch.log(tot)


def attention_varlen(q, k, v, lens_q, lens_k, spec: PE, *, causal: bool, scale: float, window=None,
                     softcap=None, q_positions=None, k_positions=None):
    """Packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), host
    lengths per sequence. Each sequence is one ``attention_bhsd`` on (1, H, len, D) views, with
    positions and the dynamic-RoPE length chosen as reference.attention_varlen chooses them.
    Returns out (total_q, Hq, Dv), lse (Hq, total_q)."""
    check_runnable(q)
    Hq, Dv = q.shape[1], v.shape[2]
    if q_positions is None:
        cur_len = max(lens_k, default=0)
    else:
        cur_len = int(max(q_positions.max().item() if q_positions.numel() else -1,
                          k_positions.max().item() if k_positions.numel() else -1)) + 1
    outs, lses = [], []
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        q1, k1 = q0 + lq, k0 + lk
        if lq:
            qb, kb, vb = (t[a:e].transpose(0, 1)[None] for t, a, e in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
            qpos = (Positions(lq, start=lk - lq) if q_positions is None
                    else Positions(lq, tensor=q_positions[q0:q1][None]))
            kpos = Positions(lk, start=0) if k_positions is None else Positions(lk, tensor=k_positions[k0:k1][None])
            out, lse = attention_bhsd(qb, kb, vb, spec, q_pos=qpos, k_pos=kpos, causal=causal, scale=scale,
                                      window=window, softcap=softcap, cur_len=cur_len)
            outs.append(out[0].transpose(0, 1))
            lses.append(lse[0])
        q0, k0 = q1, k1
    if not outs:
        lse_dtype = _math_dtype(q.dtype)
        return q.new_zeros((0, Hq, Dv)), torch.zeros((Hq, 0), dtype=lse_dtype)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
