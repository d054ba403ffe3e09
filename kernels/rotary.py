"""The rotary axis: hooks that rotate Q and K tiles (all ``@triton.jit``, inlined).

The kind is the ``ROT`` constexpr (ROT_NONE, ROT_ROPE), so Triton specialises every kernel per
kind and an unused rotation costs nothing; a kind no hook knows is a ``tl.static_assert``.
Hooks (one signature each, called by the attention kernels and loader.load_qk):

* :func:`qk_columns` (prepare): which head-dim columns form the dot groups;
* :func:`tile_rope` (per loop tile): the rotation of a K (or, in dK/dV, Q) tile;
* :func:`rope_rotate` (rotate / unrotate with -sin).

All RoPE scalings reduce to (inv_freq, attention factor) in Python; the kernels never know which
scaling produced them. Conventions:

* RoPE rotates pairs (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) where c, s already carry the
  attention factor. Which head-dim columns form a pair (half-split or interleaved) is decided by
  the column index vectors (:func:`qk_columns`); the dot product over all dims does not care
  about the order of the dims, so both layouts share one code path.
* xPos (the XPOS constexpr, with ROT_ROPE): pair j of a query at q and a key at k is also
  scaled by zeta_j^((q - k) / gamma), split as zeta_j^((q - ref) / gamma) on the query and
  zeta_j^((ref - k) / gamma) on the key, ``ref`` the first position of the program's own
  block (its queries in the forward and dQ, its keys in dK/dV): the factors stay near 1
  inside the block and decay (never grow past zeta^(-BLOCK / gamma)) across the causal
  triangle, at any absolute position. THETA then holds log2(zeta_j) / gamma after the
  ROT_HALF frequencies (:func:`xpos_decay`). The decay multiplies cos and sin, so every
  rotation and its transpose (the gradients' way back) carry it with no other change.
* Angles: ``pos * inv_freq`` is formed in float64 and reduced mod pi/2 before cos/sin in
  float32 (:func:`sincos_reduced`), so positions of 1e6 and beyond keep their precision (an fp32 product is off by
  ~0.03 rad there). For contiguous positions the loop tiles rotate in two steps: by a
  per-program table cos/sin(j * theta), j < BLOCK, then by cos/sin(p0 * theta) of the tile
  start, read from a small table made by one launch before the attention kernel
  (:func:`rope_tile_table_kernel`), so the loop evaluates no cos/sin at all.
"""
import triton
import triton.language as tl

# Rotary kinds (values of the ROT constexpr); posattn.pe's registry names them.
ROT_NONE = tl.constexpr(0)
ROT_ROPE = tl.constexpr(1)
# by the names posattn.pe's specs give their rotary axis (the launcher maps names to codes here)
KINDS = {"none": ROT_NONE, "rope": ROT_ROPE}

HALF_PI = tl.constexpr(1.5707963267948966)
TWO_OVER_PI = tl.constexpr(0.6366197723675814)


@triton.jit
def check_rot(ROT: tl.constexpr):
    """Compile-time guard: every hook below calls it, so an unknown ROT never runs."""
    tl.static_assert(ROT == ROT_NONE or ROT == ROT_ROPE, "unknown rotary kind (ROT constexpr)")


@triton.jit
def qk_columns(ROT: tl.constexpr, INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr,
               BLOCK_A: tl.constexpr):
    """Column indices of the two head-dim groups the q.k dot is split into.

    RoPE: group A holds x1 of every rotated pair, group B its partner x2 (half-split: j and
    j + ROT_HALF; interleaved: 2j and 2j + 1). Other PEs: A = all columns, B unused.
    """
    check_rot(ROT)
    j = tl.arange(0, BLOCK_A)
    if ROT == ROT_ROPE:
        if INTERLEAVED:
            return 2 * j, 2 * j + 1
        else:
            return j, j + ROT_HALF
    else:
        return j, j


@triton.jit
def sincos_reduced(ang):
    """(cos, sin) of float64 angles, as float32, by exact range reduction + polynomials.

    ang is reduced in float64 to r in [-pi/4, pi/4] plus a quadrant, then cos/sin(r) are
    Taylor polynomials in float32 (truncation error < 3e-9, below fp32 rounding). Pure FMA
    arithmetic: no libdevice sinf/cosf, whose slow path for large arguments needs local
    memory (a stack frame in every kernel that calls it), and identical in the interpreter.
    """
    k = tl.floor(ang * TWO_OVER_PI + 0.5)
    r = (ang - k * HALF_PI).to(tl.float32)
    quadrant = k.to(tl.int64) & 3
    r2 = r * r
    sin_r = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880)))))
    cos_r = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320
                                                                     + r2 * (-1.0 / 3628800)))))
    # rotate by quadrant * pi/2: q=0 (c, s), 1 (-s, c), 2 (-c, -s), 3 (s, -c)
    swap = (quadrant & 1) != 0
    c = tl.where(swap, sin_r, cos_r)
    s = tl.where(swap, cos_r, sin_r)
    c = tl.where(((quadrant + 1) & 2) != 0, -c, c)
    s = tl.where((quadrant & 2) != 0, -s, s)
    return c, s


@triton.jit
def rope_angle_cos_sin(pos, THETA, factor, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """cos/sin of pos * theta for every (row, frequency): (BLOCK, BLOCK_A) float32, x factor.

    pos: (BLOCK,) integer positions. THETA: pointer to float64 inv_freq (ROT_HALF,).
    The angle is formed in float64 (exact at large positions).
    """
    j = tl.arange(0, BLOCK_A)
    theta = tl.load(THETA + j, mask=j < ROT_HALF, other=0.0)
    c, s = sincos_reduced(pos.to(tl.float64)[:, None] * theta[None, :])
    return c * factor, s * factor


@triton.jit
def xpos_log2(THETA, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """log2(zeta_j) / gamma, (BLOCK_A,) float32, read from THETA[ROT_HALF + j] (xPos)."""
    j = tl.arange(0, BLOCK_A)
    return tl.load(THETA + ROT_HALF + j, mask=j < ROT_HALF, other=0.0).to(tl.float32)


@triton.jit
def xpos_decay(rel, THETA, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """zeta_j^(rel / gamma) = exp2(rel log2(zeta_j) / gamma) of integer offsets ``rel``
    (BLOCK,) from the block's reference: (BLOCK, BLOCK_A) float32."""
    return tl.math.exp2(rel.to(tl.float32)[:, None] * xpos_log2(THETA, ROT_HALF, BLOCK_A)[None, :])


@triton.jit
def xpos_decay_at(rel, THETA, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """zeta_j^(rel / gamma) of one offset ``rel`` (a tile's start): (BLOCK_A,) float32."""
    return tl.math.exp2(tl.cast(rel, tl.float32) * xpos_log2(THETA, ROT_HALF, BLOCK_A))


@triton.jit
def xpos_offset(pos, ref, span, QUERY: tl.constexpr):
    """The exponent's offset of xPos's decay for rows at ``pos`` from the block's ``ref``:
    pos - ref for queries, ref - pos for keys, clamped where no visible pair reaches (the
    causal mask: a query before the key block's first key, ``ref`` there, sees none of it;
    a key past the query block's last query, ref + ``span``, is seen by none of them), so
    that an invisible row's factor stays bounded (ζ^(-span / gamma) at most) instead of
    overflowing into an Inf that a zero dS would turn into NaN. Visible pairs are exact."""
    if QUERY:
        return tl.maximum(pos - ref, 0)
    return tl.maximum(ref - pos, -span)


@triton.jit
def rope_cos_sin(pos, ref, THETA, factor, XPOS: tl.constexpr, QUERY: tl.constexpr,
                 ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr, span=0):
    """cos/sin of rows at ``pos`` (:func:`rope_angle_cos_sin`, x factor), with xPos's decay
    relative to ``ref`` when XPOS: zeta^((pos - ref) / gamma) for queries (QUERY), zeta^((ref -
    pos) / gamma) for keys (:func:`xpos_offset`; ``span``: the query block's)."""
    c, s = rope_angle_cos_sin(pos, THETA, factor, ROT_HALF, BLOCK_A)
    if XPOS:
        z = xpos_decay(xpos_offset(pos, ref, span, QUERY), THETA, ROT_HALF, BLOCK_A)
        c *= z
        s *= z
    return c, s


@triton.jit
def offset_table(THETA, XPOS: tl.constexpr, QUERY: tl.constexpr, ROT_HALF: tl.constexpr,
                 BLOCK_A: tl.constexpr, BLOCK: tl.constexpr):
    """The per-offset rotation of contiguous loop tiles, cos/sin(j theta) for j < BLOCK (no
    factor), with xPos's decay of offset j from the tile's start: zeta^(j / gamma) for a
    query tile (QUERY), zeta^(-j / gamma) for a key tile."""
    j = tl.arange(0, BLOCK)
    c, s = rope_angle_cos_sin(j, THETA, 1.0, ROT_HALF, BLOCK_A)
    if XPOS:
        z = xpos_decay(j if QUERY else -j, THETA, ROT_HALF, BLOCK_A)
        c *= z
        s *= z
    return c, s


@triton.jit
def block_ref(pos, mask, first, EXPLICIT_POS: tl.constexpr, BLOCK: tl.constexpr):
    """xPos's reference of a block of rows and its span: (its first position ``first``,
    BLOCK - 1) with contiguous positions, or (the smallest valid one, largest - smallest)
    with explicit positions (any order; padded rows ignored)."""
    if EXPLICIT_POS:
        lo = tl.min(tl.where(mask, pos, tl.max(pos, 0)), 0).to(tl.int64)
        hi = tl.max(tl.where(mask, pos, tl.min(pos, 0)), 0).to(tl.int64)
        return lo, hi - lo
    return tl.cast(first, tl.int64), tl.cast(BLOCK - 1, tl.int64)


# Row spacing of the tile-start table: every tile size (BLOCK_M / BLOCK_N) is a multiple of it.
TILE_STEP = tl.constexpr(16)


@triton.jit
def rope_tile_table_kernel(OUT, THETA, start, factor, n_rows, ROT_HALF: tl.constexpr,
                           BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT (n_rows, 2, BLOCK_A) float32: cos and sin of (start + TILE_STEP * u) * theta, x factor.

    With contiguous positions a tile's rotation is R((p0 + j) theta) = R(p0 theta) R(j theta):
    the per-offset part R(j theta) is a loop-invariant table in the attention kernels
    (:func:`rope_angle_cos_sin` with pos = 0..BLOCK-1), the per-tile part R(p0 theta) is one
    row of this table, read by :func:`rope_tile_start`. Rotating in two steps keeps the 2-D
    table loop-invariant (its register layout is converted once, outside the loop). Reading
    the tile start from here instead of evaluating it per tile takes the float64 range
    reduction and the cos/sin polynomials (about 200 instructions per warp per K tile at
    D=128 on sm_90; float64 is 1/64 rate on consumer GPUs) out of the attention loop, for
    one small launch and 2 * BLOCK_A floats of L2 reads per tile (512 B at D=128: 3 % of a
    64 x 128 bf16 K tile). Same values, bit for bit, as evaluating them in the loop.
    """
    u = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pos = start + TILE_STEP * u.to(tl.int64)
    c, s = rope_angle_cos_sin(pos, THETA, factor, ROT_HALF, BLOCK_A)
    ptrs = OUT + u.to(tl.int64)[:, None] * (2 * BLOCK_A) + tl.arange(0, BLOCK_A)[None, :]
    row_ok = (u < n_rows)[:, None]
    tl.store(ptrs, c, mask=row_ok)
    tl.store(ptrs + BLOCK_A, s, mask=row_ok)


@triton.jit
def rope_tile_start(TILES, offset, BLOCK_A: tl.constexpr):
    """cos/sin x factor of the tile starting ``offset`` positions after the sequence start:
    two (BLOCK_A,) vectors from the table of :func:`rope_tile_table_kernel`."""
    j = tl.arange(0, BLOCK_A)
    # tl.cast, not .to(): offset may be a plain int (the interpreter runs loops in Python)
    row = TILES + tl.cast(offset // TILE_STEP, tl.int64) * (2 * BLOCK_A)
    return tl.load(row + j), tl.load(row + BLOCK_A + j)


@triton.jit
def far_positions(pos, a, b, group):
    """A RoPE extension's far positions (posattn.pe.RoPEExtension.far_map): (a pos + b) //
    group, int64, floor division (positions may be negative)."""
    x = a * pos.to(tl.int64) + b
    q = x // group
    return tl.where((x % group != 0) & (x < 0), q - 1, q)  # C division truncates: floor it


@triton.jit
def rope_rotate(x1, x2, c, s):
    """Rotate pairs: (x1 c - x2 s, x2 c + x1 s). Pass -s for the inverse (transpose) rotation."""
    return x1 * c - x2 * s, x2 * c + x1 * s




@triton.jit
def rope_start_cos_sin(p, THETA, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """cos/sin (no factor) of one position ``p`` times theta: two (BLOCK_A,) float32 vectors.
    Varlen dK/dV: a sequence's queries start at its own position, so the Q tile-start table
    (built from 0) is combined with this per-program rotation (:func:`tile_rope`)."""
    j = tl.arange(0, BLOCK_A)
    theta = tl.load(THETA + j, mask=j < ROT_HALF, other=0.0)
    return sincos_reduced(tl.cast(p, tl.float64) * theta)


@triton.jit
def tile_rope(pos, offset, c_tab, s_tab, THETA, ROPE_TILES, rope_factor, c_seq, s_seq,
              ROT: tl.constexpr, EXPLICIT_POS: tl.constexpr, SEQ_SHIFT: tl.constexpr,
              ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr, ref=0, p0=0,
              XPOS: tl.constexpr = False, QUERY: tl.constexpr = False, span=0):
    """Rotation of a loop tile ``offset`` positions after its sequence's first token, as
    loader.load_qk takes it: (cos, sin, c0, s0). Explicit positions: per-element cos/sin
    (no tile-start step); contiguous: the per-offset table (c_tab, s_tab) plus the tile-start
    row of ROPE_TILES, rotated further by the sequence's own start (c_seq, s_seq:
    :func:`rope_start_cos_sin`) when SEQ_SHIFT (varlen, whose table starts at 0).
    XPOS: the decay from the block's ``ref`` (QUERY: the tile holds queries; ``span``: the
    query block's, :func:`xpos_offset`), per element, or for contiguous positions on the tile
    start ``p0`` (the table carries the offsets')."""
    check_rot(ROT)
    cos = c_tab
    sin = s_tab
    c0 = 0.0
    s0 = 0.0
    if ROT == ROT_ROPE:
        if EXPLICIT_POS:
            cos, sin = rope_cos_sin(pos, ref, THETA, rope_factor, XPOS, QUERY, ROT_HALF, BLOCK_A,
                                    span)
        else:
            c0, s0 = rope_tile_start(ROPE_TILES, offset, BLOCK_A)
            if SEQ_SHIFT:  # R((p_seq + offset) theta) = R(offset theta) R(p_seq theta)
                c0, s0 = rope_rotate(c0, s0, c_seq, s_seq)
            if XPOS:
                # (not clamped: a contiguous tile straddling the block's edge needs its exact
                # start, and the causal tile range keeps every visited start within a block)
                z0 = xpos_decay_at(p0 - ref if QUERY else ref - p0, THETA, ROT_HALF, BLOCK_A)
                c0 *= z0
                s0 *= z0
    return cos, sin, c0, s0


@triton.jit
def rope_apply_kernel(X, Y, POS, THETA, stride_xb, stride_xh, stride_xs, stride_xd,
                      stride_yb, stride_yh, stride_ys, stride_yd, stride_pb, stride_ps,
                      H, S, start, factor, INVERSE: tl.constexpr, EXPLICIT_POS: tl.constexpr,
                      INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr, ROT_DIM: tl.constexpr,
                      D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
                      HAS_PASS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Y = factor R(pos theta) X for BLOCK_S rows of one (batch, head): RoPE applied once, by
    a bandwidth-bound pass (launch.rope_apply; the "once" strategy), with the angles the
    attention kernels form (:func:`rope_angle_cos_sin`: float64, range-reduced), so both
    strategies rotate by the same cos/sin. INVERSE: the transpose, factor R(-pos theta), which
    takes a gradient of the rotated tensor back to the input (Y may be X: in place).

    X, Y (B, H, S, D) by strides; POS (B|1, S) positions (stride_pb 0 broadcasts) when
    EXPLICIT_POS, else ``start + row``. Columns past ROT_DIM (partial rotary) are copied."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    m = rows < S
    if EXPLICIT_POS:
        pos = tl.load(POS + b.to(tl.int64) * stride_pb + rows.to(tl.int64) * stride_ps, mask=m, other=0)
        pos = pos.to(tl.int64)
    else:
        pos = start + rows.to(tl.int64)
    c, s = rope_angle_cos_sin(pos, THETA, factor, ROT_HALF, BLOCK_A)
    if INVERSE:
        s = -s
    colA, colB = qk_columns(ROT_ROPE, INTERLEAVED, ROT_HALF, BLOCK_A)
    maskA = m[:, None] & (tl.arange(0, BLOCK_A) < ROT_HALF)[None, :]
    xrow = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + rows.to(tl.int64)[:, None] * stride_xs
    yrow = Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh + rows.to(tl.int64)[:, None] * stride_ys
    xa = tl.load(xrow + colA[None, :] * stride_xd, mask=maskA, other=0.0).to(tl.float32)
    xb = tl.load(xrow + colB[None, :] * stride_xd, mask=maskA, other=0.0).to(tl.float32)
    ya, yb = rope_rotate(xa, xb, c, s)
    tl.store(yrow + colA[None, :] * stride_yd, ya.to(Y.dtype.element_ty), mask=maskA)
    tl.store(yrow + colB[None, :] * stride_yd, yb.to(Y.dtype.element_ty), mask=maskA)
    if HAS_PASS:  # the columns partial rotary leaves alone
        colC = ROT_DIM + tl.arange(0, BLOCK_C)
        maskC = m[:, None] & (colC < D)[None, :]
        xc = tl.load(xrow + colC[None, :] * stride_xd, mask=maskC, other=0.0)
        tl.store(yrow + colC[None, :] * stride_yd, xc.to(Y.dtype.element_ty), mask=maskC)
