"""Positional-encoding helpers called from the attention kernels (all ``@triton.jit``, inlined).

The PE kind is a ``tl.constexpr``, so Triton specialises every kernel per kind and an unused
PE costs nothing. Conventions:

* Scores live in the exp2 domain: ``s2 = (scale * q.k + bias) * log2(e)``. Biases here return
  ``bias * log2(e)`` (the log2(e) is folded into the per-head parameter, one FMA per element).
* RoPE rotates pairs (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) where c, s already carry the
  attention factor. Which head-dim columns form a pair (half-split or interleaved) is decided by
  the column index vectors (:func:`qk_columns`); the dot product over all dims does not care
  about the order of the dims, so both layouts share one code path.
* Angles: ``pos * inv_freq`` is formed in float64 and reduced mod pi/2 before cos/sin in
  float32 (:func:`sincos_reduced`), so positions of 1e6 and beyond keep their precision (an fp32 product is off by
  ~0.03 rad there). For contiguous positions the loop tiles rotate in two steps: by a
  per-program table cos/sin(j * theta), j < BLOCK, then by cos/sin(p0 * theta) of the tile
  start, read from a small table made by one launch before the attention kernel
  (:func:`rope_tile_table_kernel`), so the loop evaluates no cos/sin at all.
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
HALF_PI = tl.constexpr(1.5707963267948966)
TWO_OVER_PI = tl.constexpr(0.6366197723675814)


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
def rope_rotate(x1, x2, c, s):
    """Rotate pairs: (x1 c - x2 s, x2 c + x1 s). Pass -s for the inverse (transpose) rotation."""
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def tile_dist(row_pos, col_pos, col0, EXPLICIT_POS: tl.constexpr):
    """|row position - column position| of a tile, (BLOCK_R, BLOCK_C) float32.

    row_pos (BLOCK_R,), col_pos (BLOCK_C,) integer positions; col0 = col_pos[0] for contiguous
    positions. Explicit positions: an int64 difference (any position), then float. Contiguous:
    rel = float(row_pos - col0) per row and per tile, then one FADD per element against the
    float column offsets (the abs folds into its consumer) -- instead of an integer subtract,
    abs and convert per element. Bitwise the same distance below 2**24, within an fp32
    rounding of it above.
    """
    if EXPLICIT_POS:
        return tl.abs(row_pos[:, None] - col_pos[None, :]).to(tl.float32)
    else:
        rel = (row_pos - col0).to(tl.float32)
        cols = tl.arange(0, col_pos.shape[0]).to(tl.float32)
        return tl.abs(rel[:, None] - cols[None, :])


@triton.jit
def alibi_causal_split(qk, scale_log2, pa2, q_rel, row_add, BLOCK_N: tl.constexpr):
    """Causal ALiBi scores in the exp2 domain, qk * scale_log2 - pa2 |q - k| + row_add (a
    (BLOCK_M, 1) column or a scalar), as one FFMA and one FADD per element: every key a causal
    query sees has k <= q, so
    -pa2 |q - k| = -pa2 (q - k0) + pa2 j (k = k0 + j) -- a row vector per tile plus a
    loop-invariant column vector, instead of a subtract, abs and FFMA per element.

    Keys past the diagonal get a wrong bias here; the caller's causal mask discards them.
    16-bit inputs only: the split rounds at the scale of pa2 * (tile span), ~1e-5 relative
    to the diagonal tile's scores, far below 16-bit rounding but not below fp32's.
    qk (BLOCK_M, BLOCK_N) float32; q_rel (BLOCK_M,) float32: q - k0, the rows' distances to the
    tile's first key (centred rows: q - k0 - d_ref, since |q - k| - d_ref = (q - k0 - d_ref) - j).
    """
    row = -pa2 * q_rel
    col = pa2 * tl.arange(0, BLOCK_N).to(tl.float32)
    return tl.fma(qk, scale_log2, row[:, None] + row_add) + col[None, :]


@triton.jit
def bias_shape(PE: tl.constexpr, dist, b):
    """The bias without its leading parameter: bias = -a * f, f (BLOCK_R, BLOCK_C) float32.

    dist: :func:`tile_dist`, b = r2. ALiBi: f = |d| (a = slope). KERPLE log: f = log(1 + r2 |d|);
    power: f = |d|^r2, 0 at d = 0 (a = r1). Kept separate from the parameter so the backward
    reuses f for both the scores and d(bias)/d(a).
    """
    if PE == PE_ALIBI:
        return dist
    elif PE == PE_KERPLE_LOG:
        return tl.log(1.0 + b * dist)
    else:  # PE_KERPLE_POWER
        return tl.where(dist > 0, tl.exp2(b * tl.log2(tl.maximum(dist, 1.0))), 0.0)


@triton.jit
def bias_r2_term(PE: tl.constexpr, f, dist):
    """d f / d r2 for KERPLE (f = :func:`bias_shape`): |d| / (1 + r2 |d|) = |d| exp(-f) (log, no
    division), |d|^r2 ln|d| (power, 0 at d = 0). ALiBi has no r2: returns f, never read."""
    if PE == PE_KERPLE_LOG:
        return dist * tl.exp(-f)
    elif PE == PE_KERPLE_POWER:
        return f * tl.log(tl.maximum(dist, 1.0))
    else:
        return f


# Centring a bias PE's rows (the far-positions error analysis)
# ------------------------------------------------------------
# The softmax of a row is unchanged when a row constant is subtracted from its logits. A bias
# PE's logits are s = scale * q.k - a f(|q - k|); when every key a query sees is far away
# (int offsets, sparse or randomized positions, chunks of a context-parallel ring) the bias is
# large -- a f ~ 1e3 at 4000 positions -- and s, formed in fp32 at that magnitude, keeps only
# ~6e-5 of q.k's absolute precision. The forward and the backward form s in different orders
# (the forward in units of 1/scale, the backward with -LSE folded in), so at that magnitude
# their roundings differ per element: the backward's P = exp(s - LSE) no longer sums to 1 over
# the row, the rows of dS = P (dP - Delta) no longer sum to 0, and a parameter gradient
# -sum(dS f) multiplies that residual by f ~ |q - k|: 100-350x the naive fp32 error. The LSE
# itself, stored at magnitude ~1e3, also carries a row-constant error of ~ulp(1e3) into every
# P, hence into dV.
# So such rows are centred on the bias of their nearest visible key: f_ref = f(d_ref), d_ref =
# min |q - k| over the keys the query sees, and the kernels use f - f_ref throughout. Every
# visible key then has 0 <= f - f_ref (f grows with distance), the keys that carry the softmax
# have small centred logits, both passes round them at that small magnitude, and the LSE they
# share (the centred one, kept for the backward) is exact to its own ulp. The parameter
# gradients use the centred f (and df/dr2) as well: sum_j dS_ij = 0, so -sum dS (f - f_ref) is
# the same gradient, without the residual times a large f. The caller gets the true LSE back:
# LSE_centred - a f_ref (launch).
# f - f_ref is never formed as a difference of two large fp32 values (each off by an ulp of
# itself): x = d - d_ref is an exact integer (fp32, below 2**24), and
#   ALiBi        x
#   KERPLE log   log(1 + r2 d) - log(1 + r2 d_ref) = log1p(r2 x / (1 + r2 d_ref))
#   KERPLE power d^r2 - c^r2 = f(c) expm1(r2 log1p((d - c) / c)),  c = max(d_ref, 1)
# and df/dr2 likewise: x / ((1 + r2 d)(1 + r2 d_ref)) (log); f(c) log1p((d - c) / c) +
# (f - f(c)) ln d (power). Each is accurate to a few ulps of its own (small) value, as
# torch's correctly rounded pow and log are in the naive math: exp2(r2 log2 d) at d = 4000
# alone is ~20 ulps off, 10x the naive error (tests/test_far_positions.py found it). These
# cost a log, an exp and a division per element, only in centred launches.


@triton.jit
def bias_ref_kernel(QPOS, KPOS, DREF, stride_qpb, stride_qpm, stride_kpb, stride_kpn, Sq, Sk,
                    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DREF (Bp, Sq) float32: the distance from each query to its nearest visible key (0 for a
    query that sees none), for explicit positions QPOS (Bp|1, Sq), KPOS (Bp|1, Sk) (strides
    passed; stride 0 broadcasts). O(Sq * Sk) integer work, no matmul: a small fraction of the
    attention's own cost. Grid (cdiv(Sq, BLOCK_M), Bp)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Sq
    qpos = tl.load(QPOS + b * stride_qpb + offs_m.to(tl.int64) * stride_qpm, mask=m_mask,
                   other=0).to(tl.int64)
    none = 0x3FFFFFFFFFFFFFFF  # "no visible key yet"
    best = tl.full([BLOCK_M], none, tl.int64)
    for t in range(0, tl.cdiv(Sk, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Sk
        kpos = tl.load(KPOS + b * stride_kpb + offs_n.to(tl.int64) * stride_kpn, mask=n_mask,
                       other=0).to(tl.int64)
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (kpos[None, :] <= qpos[:, None])
        d = tl.where(visible, tl.abs(qpos[:, None] - kpos[None, :]), none)
        best = tl.minimum(best, tl.min(d, 1))
    dref = tl.where(best == none, 0, best).to(tl.float32)
    tl.store(DREF + b * Sq + offs_m, dref, mask=m_mask)


@triton.jit
def bias_row_ref(PE: tl.constexpr, CENTER: tl.constexpr, DREF, rows, row_mask, b):
    """(d_ref, f_ref) of ``rows`` (queries; offsets into DREF, the batch row included): their
    nearest visible key's distance, read from DREF, and f there (:func:`bias_shape`, with b = r2) --
    what a centred row subtracts from every f. KERPLE power centres at max(d_ref, 1) instead
    (launch.caller_lse does the same). (0.0, 0.0) without CENTER."""
    dref = 0.0
    fref = 0.0
    if CENTER:
        dref = tl.load(DREF + rows, mask=row_mask, other=0.0)
        if PE == PE_KERPLE_POWER:  # centred at max(d_ref, 1): f(1) = 1, no d_ref = 0 branch
            dref = tl.maximum(dref, 1.0)
        fref = bias_shape(PE, dref, b)
    return dref, fref


@triton.jit
def bias_table_kernel(F, G, PB, L, PE: tl.constexpr, NEED_G: tl.constexpr, BLOCK: tl.constexpr):
    """Per-distance KERPLE tables, F and G (Hq, L) float32: F[h, d] = f(d) (:func:`bias_shape`)
    and G[h, d] = df/dr2 (:func:`bias_r2_term`, when NEED_G) for d = 0..L-1 with head h's r2.

    With contiguous positions a KERPLE bias depends on |q - k| only, so the attention loops
    read f from here (one integer subtract, abs and L1/L2-resident load per element) instead
    of evaluating a log polynomial per element (~25 instructions). The same helpers compute
    the same fp32 values, so the two paths agree bit for bit. O(Hq * S) memory, never S^2.
    """
    h = tl.program_id(1)
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = d < L
    dist = d.to(tl.float32)
    f = bias_shape(PE, dist, tl.load(PB + h).to(tl.float32))
    row = h.to(tl.int64) * L
    tl.store(F + row + d, f, mask=mask)
    if NEED_G:
        tl.store(G + row + d, bias_r2_term(PE, f, dist), mask=mask)


@triton.jit
def tile_bias(PE: tl.constexpr, BIAS_TABLE: tl.constexpr, FT, row_pos, col_pos, col0,
              EXPLICIT_POS: tl.constexpr, b):
    """f of a tile (bias = -a f), (BLOCK_R, BLOCK_C) float32: read from head's row FT of the
    per-distance table when BIAS_TABLE (contiguous int32 positions, distance < its length by
    construction), else computed from :func:`tile_dist`. Not centred (see centred)."""
    if BIAS_TABLE:
        return tl.load(FT + tl.abs(row_pos[:, None] - col_pos[None, :]))
    else:
        return bias_shape(PE, tile_dist(row_pos, col_pos, col0, EXPLICIT_POS), b)


@triton.jit
def fast_div(x, y):
    """x / y to ~2 ulps without the IEEE-rounding division's refinement (a reciprocal and a
    multiply on the GPU): the centred forms below need a few ulps, not correct rounding, and
    their per-element divisions are what registers and instructions go to."""
    return tl.math.fdiv(x, y, ieee_rounding=False)


@triton.jit
def log1p_pos(x):
    """log(1 + x) for x >= -1, accurate to a few ulps also for tiny x (Goldberg's trick: the
    rounding of 1 + x cancels in log(u) * x / (u - 1)); -inf at x = -1. Pure tl ops:
    libdevice's log1p does not run in the interpreter."""
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * fast_div(x, tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def expm1_acc(y):
    """exp(y) - 1, accurate to a few ulps for small |y| (Kahan's trick); -1 at y = -inf."""
    u = tl.exp(y)
    exact = u == 1.0
    r = tl.where(exact, y, (u - 1.0) * fast_div(y, tl.where(exact | (u == 0.0), 1.0, tl.log(u))))
    return tl.where(u == 0.0, -1.0, r)


@triton.jit
def query_axis(v, QUERY_AXIS: tl.constexpr):
    """A per-query vector broadcast against a tile: queries are the tile's rows (QUERY_AXIS 0:
    forward, dQ) or its columns (1: dK/dV)."""
    if QUERY_AXIS == 0:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def centred_shape(PE: tl.constexpr, dist, dref, fref, b):
    """(f(dist) - f(c), ln(dist / c)) of a tile, c the row's centre (bias_row_ref: d_ref, or
    max(d_ref, 1) for KERPLE power), dref = c and fref = f(c) broadcast to the tile
    (query_axis); see "Centring" above for the closed forms. The second value is KERPLE
    power's (centred_r2_term reuses it), 0.0 otherwise. Per-row factors are formed on the
    (rows, 1) vectors, per element only a subtract, a log1p (and an expm1). Keys nearer than
    c (invisible ones, or d = 0 < c = 1) stay finite: the caller masks them."""
    if PE == PE_ALIBI:
        return dist - dref, 0.0
    elif PE == PE_KERPLE_LOG:
        w = fast_div(b, 1.0 + b * dref)  # per row
        return log1p_pos(tl.maximum(dist - dref, 0.0) * w), 0.0
    else:  # PE_KERPLE_POWER: f(c) expm1(r2 ln(d / c)), ln(d / c) = log1p((d - c) / c)
        lr = log1p_pos(tl.maximum((dist - dref) * fast_div(1.0, dref), -1.0))  # -inf at d = 0
        return fref * expm1_acc(b * lr), lr


@triton.jit
def centred_r2_term(PE: tl.constexpr, dist, dref, fref, fc, lr, b):
    """df/dr2 (dist) - df/dr2 (c) of a tile for KERPLE (closed forms under "Centring"); fc, lr =
    centred_shape of the tile. ALiBi: fc (never read)."""
    if PE == PE_KERPLE_LOG:  # d / (1 + r2 d) - c / (1 + r2 c) = (d - c) / ((1 + r2 d)(1 + r2 c))
        return fast_div(tl.maximum(dist - dref, 0.0) * fast_div(1.0, 1.0 + b * dref),
                        1.0 + b * dist)
    elif PE == PE_KERPLE_POWER:  # d^r2 ln d - c^r2 ln c = f(c) ln(d / c) + (f(d) - f(c)) ln d
        gc = fref * lr + fc * tl.log(tl.maximum(dist, 1.0))
        return tl.where(dist > 0, gc, -fref * tl.log(dref))  # g(0) = 0
    else:
        return fc


@triton.jit
def tile_bias_centred(PE: tl.constexpr, BIAS_TABLE: tl.constexpr, CENTER: tl.constexpr,
                      QUERY_AXIS: tl.constexpr, FT, row_pos, col_pos, col0,
                      EXPLICIT_POS: tl.constexpr, b, dref, fref):
    """f of a tile, centred on the queries' nearest visible keys when CENTER (centred_shape,
    computed in the tile: no table), else :func:`tile_bias`. dref, fref (per query, see
    bias_row_ref) and QUERY_AXIS as in query_axis."""
    if CENTER:
        dist = tile_dist(row_pos, col_pos, col0, EXPLICIT_POS)
        f, _ = centred_shape(PE, dist, query_axis(dref, QUERY_AXIS), query_axis(fref, QUERY_AXIS), b)
        return f
    else:
        return tile_bias(PE, BIAS_TABLE, FT, row_pos, col_pos, col0, EXPLICIT_POS, b)


@triton.jit
def tile_bias_grad_inputs(PE: tl.constexpr, BIAS_TABLE: tl.constexpr, CENTER: tl.constexpr, FT,
                          GT, row_pos, col_pos, col0, EXPLICIT_POS: tl.constexpr, b, dref, fref):
    """(f, df/dr2) of a tile (queries are its rows) for :func:`bias_grad_terms`: centred on the
    queries' nearest visible keys when CENTER (computed in the tile), else from the tables or
    computed."""
    if CENTER:
        dist = tile_dist(row_pos, col_pos, col0, EXPLICIT_POS)
        fc, lr = centred_shape(PE, dist, dref[:, None], fref[:, None], b)
        return fc, centred_r2_term(PE, dist, dref[:, None], fref[:, None], fc, lr, b)
    elif BIAS_TABLE:
        d = tl.abs(row_pos[:, None] - col_pos[None, :])
        return tl.load(FT + d), tl.load(GT + d)
    else:
        dist = tile_dist(row_pos, col_pos, col0, EXPLICIT_POS)
        f = bias_shape(PE, dist, b)
        return f, bias_r2_term(PE, f, dist)


@triton.jit
def bias_grad_terms(PE: tl.constexpr, ds, f, r2_term, a):
    """Row sums of dS * d(bias)/d(param) for the PE's one or two parameters.

    ds: (BLOCK_R, BLOCK_C) gradient of the natural-unit scaled logits, zero where masked;
    f, r2_term: :func:`tile_bias_grad_inputs` of the tile. a = slope or r1. Returns two
    (BLOCK_R,) vectors summed over axis 1 only: the caller accumulates them across tiles and
    reduces the last axis once, so no tile pays for a cross-warp reduction. Terms:
    d/da = -f for every bias PE; d/dr2 = -r1 df/dr2 (KERPLE); 0 for ALiBi.
    """
    # Constant factors (-1, r1) are applied to the row sums, not per element.
    g1 = -tl.sum(ds * f, 1)
    if PE == PE_ALIBI:
        return g1, g1 * 0.0
    return g1, -a * tl.sum(ds * r2_term, 1)
