"""Positional-encoding helpers called from the attention kernels (all ``@triton.jit``, inlined).

The PE kind is a ``tl.constexpr``, so Triton specialises every kernel per kind and an unused
PE costs nothing. Conventions:

* Scores live in the exp2 domain: ``s2 = (scale * q.k + bias) * log2(e)``. Biases here return
  ``bias * log2(e)`` (the log2(e) is folded into the per-head parameter, one FMA per element).
* RoPE rotates pairs (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) where c, s already carry the
  attention factor. Which head-dim columns form a pair (half-split or interleaved) is decided by
  the column index vectors (:func:`qk_columns`); the dot product over all dims does not care
  about the order of the dims, so both layouts share one code path.
* Angles: ``pos * inv_freq`` is formed in float64 and reduced mod 2*pi before cos/sin in
  float32, so positions of 1e6 and beyond keep their precision (an fp32 product is off by
  ~0.03 rad there). For contiguous positions the loop tiles use angle addition: a per-program
  table cos/sin(j * theta), j < BLOCK, combined with cos/sin(p0 * theta) of the tile start
  (HALF values per tile), so cos/sin are evaluated per tile, not per element.
"""
import triton
import triton.language as tl

# PE kinds (values of the PE constexpr)
PE_NONE = tl.constexpr(0)
PE_ROPE = tl.constexpr(1)
PE_ALIBI = tl.constexpr(2)
PE_KERPLE_LOG = tl.constexpr(3)
PE_KERPLE_POWER = tl.constexpr(4)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
TWO_PI = tl.constexpr(6.283185307179586)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def qk_columns(PE: tl.constexpr, INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr,
               BLOCK_A: tl.constexpr):
    """Column indices of the two head-dim groups the q.k dot is split into.

    RoPE: group A holds x1 of every rotated pair, group B its partner x2 (half-split: j and
    j + ROT_HALF; interleaved: 2j and 2j + 1). Other PEs: A = all columns, B unused.
    """
    j = tl.arange(0, BLOCK_A)
    if PE == PE_ROPE:
        if INTERLEAVED:
            return 2 * j, 2 * j + 1
        else:
            return j, j + ROT_HALF
    else:
        return j, j


@triton.jit
def rope_angle_cos_sin(pos, THETA, factor, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """cos/sin of pos * theta for every (row, frequency): (BLOCK, BLOCK_A) float32, x factor.

    pos: (BLOCK,) integer positions. THETA: pointer to float64 inv_freq (ROT_HALF,).
    Angle formed in float64 and reduced mod 2*pi (exact at large positions).
    """
    j = tl.arange(0, BLOCK_A)
    theta = tl.load(THETA + j, mask=j < ROT_HALF, other=0.0)
    ang = pos.to(tl.float64)[:, None] * theta[None, :]
    turns = (ang * INV_TWO_PI).to(tl.int64).to(tl.float64)
    ang = (ang - turns * TWO_PI).to(tl.float32)
    return tl.cos(ang) * factor, tl.sin(ang) * factor


@triton.jit
def rope_shift(c_tab, s_tab, p0, THETA, factor, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """Angle addition: cos/sin((p0 + j) * theta) from the table cos/sin(j * theta).

    c_tab, s_tab: (BLOCK, BLOCK_A) from :func:`rope_angle_cos_sin` with pos = 0..BLOCK-1 and
    factor 1. p0: tile start position (scalar). Costs BLOCK_A cos/sin per tile.
    """
    j = tl.arange(0, BLOCK_A)
    theta = tl.load(THETA + j, mask=j < ROT_HALF, other=0.0)
    ang = p0.to(tl.float64) * theta
    turns = (ang * INV_TWO_PI).to(tl.int64).to(tl.float64)
    ang = (ang - turns * TWO_PI).to(tl.float32)
    c0 = (tl.cos(ang) * factor)[None, :]
    s0 = (tl.sin(ang) * factor)[None, :]
    return c0 * c_tab - s0 * s_tab, s0 * c_tab + c0 * s_tab


@triton.jit
def rope_rotate(x1, x2, c, s):
    """Rotate pairs: (x1 c - x2 s, x2 c + x1 s). Pass -s for the inverse (transpose) rotation."""
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def bias_log2(PE: tl.constexpr, qpos, kpos, a2, b):
    """Bias * log2(e) for a tile: (BLOCK_M, BLOCK_N) float32.

    qpos (BLOCK_M,), kpos (BLOCK_N,): integer positions. ``a2`` = slope * log2(e) (ALiBi) or
    r1 * log2(e) (KERPLE); ``b`` = r2 (KERPLE).
    """
    dist = tl.abs(qpos[:, None] - kpos[None, :]).to(tl.float32)
    if PE == PE_ALIBI:
        return -a2 * dist
    elif PE == PE_KERPLE_LOG:
        return -a2 * tl.log(1.0 + b * dist)
    else:  # PE_KERPLE_POWER: |d|^r2, and 0 at d = 0
        return tl.where(dist > 0, -a2 * tl.exp2(b * tl.log2(tl.maximum(dist, 1.0))), 0.0)


@triton.jit
def bias_grad_terms(PE: tl.constexpr, ds, qpos, kpos, a, b):
    """Per-tile sums of dS * d(bias)/d(param) for the PE's one or two parameters.

    ds: (BLOCK_M, BLOCK_N) gradient of the (natural-unit) scaled logits, already zero where
    masked. a = slope or r1 and b = r2, in natural units. Returns two scalars (second 0 for ALiBi).
    """
    dist = tl.abs(qpos[:, None] - kpos[None, :]).to(tl.float32)
    if PE == PE_ALIBI:
        return tl.sum(tl.sum(-ds * dist, 1), 0), 0.0
    elif PE == PE_KERPLE_LOG:
        one_p = 1.0 + b * dist
        g1 = -ds * tl.log(one_p)
        g2 = -ds * (a * dist / one_p)
        return tl.sum(tl.sum(g1, 1), 0), tl.sum(tl.sum(g2, 1), 0)
    else:  # PE_KERPLE_POWER: d/dr1 = -d^r2, d/dr2 = -r1 d^r2 ln d (both 0 at d = 0)
        logd = tl.log(tl.maximum(dist, 1.0))
        powd = tl.where(dist > 0, tl.exp(b * logd), 0.0)
        g1 = -ds * powd
        g2 = -ds * (a * powd * logd)
        return tl.sum(tl.sum(g1, 1), 0), tl.sum(tl.sum(g2, 1), 0)
