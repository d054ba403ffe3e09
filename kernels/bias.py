"""The bias axis: hooks that add a position bias to the logits (all ``@triton.jit``, inlined).

The kind is the ``BIAS`` constexpr (BIAS_NONE, BIAS_ALIBI, BIAS_KERPLE_LOG, BIAS_KERPLE_POWER,
BIAS_T5, BIAS_SANDWICH, BIAS_FIRE; posattn.pe's registry maps spec classes to them); a kind no hook knows is a
``tl.static_assert`` at compile time, never a fall-through. Every bias here is
``bias = -a f(q, k; b)`` with the head's parameters read from one channel, PARAMS (Hq, NP)
(:func:`bias_params`), and the gradients written to one buffer of partials of the same
shape (:func:`store_param_grads`): for ALiBi / KERPLE f is a function of |q - k|, for T5
(a = 1) a per-head table read by bucket of k - q, the table being PARAMS itself ("Table
biases" below). Hooks, one signature each:

* :func:`bias_params` (prepare): the head's (a, b);
* :func:`bias_shape` / :func:`tile_bias_centred` (tile bias): f of a tile;
* :func:`tile_bias_grad_inputs` + :func:`param_grad_init` / :func:`param_grad_update` /
  :func:`store_param_grads` (gradient terms, accumulated, stored).

Scores live in the exp2 domain, ``s2 = (scale * q.k + bias) * log2(e)``: the kernels fold
log2(e) into ``a`` (one FMA per element). A new bias kind adds its case to these hooks, its
BIAS_* value, and a spec class in posattn.pe.
"""
import triton
import triton.language as tl

from .fmath import LN2, expm1_acc, fast_div, log1p_pos
from .geometry import load_positions, seq_bounds, visible
from .rotary import sincos_reduced

# Bias kinds (values of the BIAS constexpr); posattn.pe's registry names them.
BIAS_NONE = tl.constexpr(0)
BIAS_ALIBI = tl.constexpr(1)
BIAS_KERPLE_LOG = tl.constexpr(2)
BIAS_KERPLE_POWER = tl.constexpr(3)
BIAS_T5 = tl.constexpr(4)  # a learnable per-head table read by bucket (see "Table biases")
BIAS_SANDWICH = tl.constexpr(5)  # a (head-shared) per-distance table, always (see "Sandwich")
BIAS_FIRE = tl.constexpr(6)  # a learned function of a normalised distance, tabulated (see "FIRE")
# by the names posattn.pe's specs give their bias axis (the launcher maps names to codes here)
KINDS = {"none": BIAS_NONE, "alibi": BIAS_ALIBI, "kerple_log": BIAS_KERPLE_LOG,
         "kerple_power": BIAS_KERPLE_POWER, "t5": BIAS_T5, "sandwich": BIAS_SANDWICH,
         "fire": BIAS_FIRE}


@triton.jit
def check_bias(BIAS: tl.constexpr):
    """Compile-time guard: the hooks call it, so an unknown BIAS never runs another's math."""
    tl.static_assert(BIAS == BIAS_NONE or BIAS == BIAS_ALIBI or BIAS == BIAS_KERPLE_LOG
                     or BIAS == BIAS_KERPLE_POWER or BIAS == BIAS_T5 or BIAS == BIAS_SANDWICH
                     or BIAS == BIAS_FIRE,
                     "unknown bias kind (BIAS constexpr)")


@triton.jit
def table_row(BIAS: tl.constexpr, h, bias_len):
    """Offset of head h's row in the bias tables (Hq, bias_len): h * bias_len, or 0 for
    Sandwich, whose one row serves every head."""
    if BIAS == BIAS_SANDWICH:
        return h * 0
    else:
        return h * bias_len


@triton.jit
def bias_params(BIAS: tl.constexpr, PARAMS, h, NP: tl.constexpr, bias_len):
    """(a, b) of head h, float32, from PARAMS (Hq, NP) contiguous: a = slope (ALiBi), r1
    (KERPLE) or the head's scale (Sandwich), b = r2 (KERPLE); 0.0 where the kind has no such
    parameter. A table bias (T5) has a = 1
    (its table holds -bias) and b = R, its table's radius (bias_len = 2R + 1)."""
    check_bias(BIAS)
    a = 0.0
    b = 0.0
    if BIAS == BIAS_T5:
        a = 1.0
        b = ((bias_len - 1) // 2).to(tl.float32)
    elif BIAS == BIAS_SANDWICH:
        a = tl.load(PARAMS + h * NP).to(tl.float32)
        b = (bias_len - 1).to(tl.float32)  # the distance table's last entry (tile_bias)
    elif BIAS == BIAS_FIRE:  # bias = +f (the table's value), b = |c| ("FIRE")
        a = -1.0
        b = tl.load(PARAMS + h * NP).to(tl.float32)
    elif BIAS != BIAS_NONE:
        a = tl.load(PARAMS + h * NP).to(tl.float32)
        if NP > 1:
            b = tl.load(PARAMS + h * NP + 1).to(tl.float32)
    return a, b


@triton.jit
def param_grad_init(BIAS: tl.constexpr, BLOCK_M: tl.constexpr, NP: tl.constexpr,
                    TABLE_REF: tl.constexpr):
    """The dQ program's accumulators of d(loss)/d(PARAMS[h]) (param_grad_update): two
    (BLOCK_M,) row sums, or for a table bias one (BLOCK_M, NP) tile, a column per bucket.
    TABLE_REF: -1, or a fixed reference bucket for every row (table_grad_centred)."""
    if BIAS == BIAS_T5:  # g2: per row, the sum of dS and its reference bucket (table_grad_update)
        tl.static_assert((NP & (NP - 1)) == 0, "table biases: NP must be a power of two")
        two = tl.arange(0, 2)
        # a fixed reference is stored as TABLE_REF + 2 NP: above every bucket, so the running
        # max of table_grad_update keeps it
        if TABLE_REF < 0:
            ref0 = -1.0
        else:
            ref0 = TABLE_REF + 2.0 * NP
        return (tl.zeros([BLOCK_M, NP], tl.float32),
                tl.where(two[None, :] == 1, ref0, tl.zeros([BLOCK_M, 2], tl.float32)))
    elif BIAS == BIAS_FIRE:  # the cells' coefficients, and per row the two sums of fire_grad_update
        # per row: S_c, S_L, the sum of dS, its reference score's x (-1: none yet; fixed at
        # u = 0 with TABLE_REF >= 0: above any x, never replaced) and dx/dc (fire_store)
        eight = tl.arange(0, 8)
        return (tl.zeros([(NP - 4) // 2], tl.float32),
                tl.where(eight[None, :] == 3, -1.0 if TABLE_REF < 0 else 2.0 * FIXED_REF,
                         tl.zeros([BLOCK_M, 8], tl.float32)))
    else:
        return tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M], tl.float32)


@triton.jit
def param_grad_update(BIAS: tl.constexpr, g1, g2, ds, f, r2_term, a, NP: tl.constexpr, FT,
                      fref):
    """Add a tile's dS * d(bias)/d(param) to the accumulators (param_grad_init); f, r2_term:
    :func:`tile_bias_grad_inputs` of the tile; FT, fref: the head's table row and
    bias_row_ref's fref (FIRE)."""
    if BIAS == BIAS_T5:
        g1, g2 = table_grad_update(g1, g2, ds, r2_term, NP)
    elif BIAS == BIAS_FIRE:
        g1, g2 = fire_grad_update(g1, g2, ds, f, r2_term, FT, fref, NP)
    else:
        t1, t2 = bias_grad_terms(BIAS, ds, f, r2_term, a)
        g1 += t1
        g2 += t2
    return g1, g2


@triton.jit
def store_param_grads(BIAS: tl.constexpr, GPARAM, slot, g1, g2, NP: tl.constexpr,
                      TABLE_REF: tl.constexpr, FT=None, row_pos=0, row_mask=True):
    """One program's share of d(loss)/d(PARAMS[h]) at GPARAM (slots, NP): the accumulators
    of param_grad_update, reduced here once. Torch sums the slots: no atomics,
    deterministic. FIRE: FT (the head's row) and the rows' positions and mask (its c and L
    gradients, fire_store)."""
    if BIAS == BIAS_T5:
        tl.store(GPARAM + slot * NP + tl.arange(0, NP),
                 tl.sum(table_grad_centred(g1, g2, NP, TABLE_REF), 0))
    elif BIAS == BIAS_FIRE:
        fire_store(GPARAM + slot * NP, g1, g2, FT, row_pos, row_mask, NP, TABLE_REF)
    else:
        tl.store(GPARAM + slot * NP, tl.sum(g1, 0))
        if NP > 1:
            tl.store(GPARAM + slot * NP + 1, tl.sum(g2, 0))


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
def bias_shape(BIAS: tl.constexpr, dist, b):
    """The bias without its leading parameter: bias = -a * f, f (BLOCK_R, BLOCK_C) float32.

    dist: :func:`tile_dist`, b = r2. ALiBi: f = |d| (a = slope). KERPLE log: f = log(1 + r2 |d|);
    power: f = |d|^r2, 0 at d = 0 (a = r1). Kept separate from the parameter so the backward
    reuses f for both the scores and d(bias)/d(a).
    """
    check_bias(BIAS)
    if BIAS == BIAS_ALIBI:
        return dist
    elif BIAS == BIAS_KERPLE_LOG:
        return tl.log(1.0 + b * dist)
    else:
        tl.static_assert(BIAS == BIAS_KERPLE_POWER, "bias_shape: no f for this BIAS")
        return tl.where(dist > 0, tl.exp2(b * tl.log2(tl.maximum(dist, 1.0))), 0.0)


@triton.jit
def bias_r2_term(BIAS: tl.constexpr, f, dist):
    """d f / d r2 for KERPLE (f = :func:`bias_shape`): |d| / (1 + r2 |d|) = |d| exp(-f) (log, no
    division), |d|^r2 ln|d| (power, 0 at d = 0). ALiBi has no r2: returns f, never read."""
    if BIAS == BIAS_KERPLE_LOG:
        return dist * tl.exp(-f)
    elif BIAS == BIAS_KERPLE_POWER:
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
def bias_ref_kernel(QPOS, KPOS, DREF, CU_Q, CU_K, stride_qpb, stride_qpm, stride_kpb, stride_kpn,
                    Sq, Sk, dref_len, win_left, win_right, CAUSAL: tl.constexpr,
                    WIN_L: tl.constexpr, WIN_R: tl.constexpr, VARLEN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DREF float32, each query's distance to its nearest *visible* key (0 for a query that
    sees none), for explicit positions QPOS, KPOS: dense (Bp, Sq) from (Bp|1, Sq) / (Bp|1, Sk)
    positions (strides passed; stride 0 broadcasts); varlen (1, total_q) from (1, total)
    positions and the sequences' bounds (geometry.seq_bounds). O(Sq * Sk) integer work, no
    matmul: a small fraction of the attention's own cost. Grid (cdiv(Sq, BLOCK_M), Bp | B)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_off, Sq = seq_bounds(CU_Q, b, Sq, VARLEN)
    k_off, Sk = seq_bounds(CU_K, b, Sk, VARLEN)
    if pid_m * BLOCK_M >= Sq:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Sq
    qpos = load_positions(QPOS + b * stride_qpb, q_off, offs_m, m_mask, stride_qpm)
    none = 0x3FFFFFFFFFFFFFFF  # "no visible key yet"
    best = tl.full([BLOCK_M], none, tl.int64)
    for t in range(0, tl.cdiv(Sk, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Sk
        kpos = load_positions(KPOS + b * stride_kpb, k_off, offs_n, n_mask, stride_kpn)
        vis = visible(m_mask[:, None] & n_mask[None, :], qpos[:, None], kpos[None, :], win_left,
                      win_right, CAUSAL, WIN_L, WIN_R)
        d = tl.where(vis, tl.abs(qpos[:, None] - kpos[None, :]), none)
        best = tl.minimum(best, tl.min(d, 1))
    dref = tl.where(best == none, 0, best).to(tl.float32)
    row = (0 if VARLEN else b) * dref_len + q_off
    tl.store(DREF + row + offs_m, dref, mask=m_mask)


@triton.jit
def bias_row_ref(BIAS: tl.constexpr, CENTER: tl.constexpr, DREF, rows, row_mask, b, qpos=0,
                 FT=None):
    """(d_ref, f_ref) of ``rows`` (queries; offsets into DREF, the batch row included): their
    nearest visible key's distance, read from DREF, and f there (:func:`bias_shape`, with b = r2) --
    what a centred row subtracts from every f. KERPLE power centres at max(d_ref, 1) instead
    (launch.caller_lse does the same). (0.0, 0.0) without CENTER.
    FIRE (never centred) has per-query data instead: (R, n) of fire_rows for the queries at
    ``qpos``, FT the head's row."""
    dref = 0.0
    fref = 0.0
    if BIAS == BIAS_FIRE:
        dref, fref, _, _ = fire_rows(qpos, FT)
    elif CENTER:
        dref = tl.load(DREF + rows, mask=row_mask, other=0.0)
        if BIAS == BIAS_KERPLE_POWER:  # centred at max(d_ref, 1): f(1) = 1, no d_ref = 0 branch
            dref = tl.maximum(dref, 1.0)
        fref = bias_shape(BIAS, dref, b)
    return dref, fref


# Sandwich (Chi et al. 2023)
# -------------------------
# bias_h(k - q) = a_h (sum_i cos((k - q) w_i) - d_bar / 2): the dot product of two sinusoidal
# embeddings, shifted to 0 at distance 0; w_i = base^(-2i / d_bar), a_h = H / (8 h)
# (posattn.pe.Sandwich). Evaluating d_bar / 2 cosines per score would cost more than the
# attention, so every launch reads it from a per-distance table, f(d) = sum_i (1 - cos(d w_i)),
# d = 0 .. L - 1: one row shared by every head (table_row), the head's a_h its one parameter
# (bias = -a_h f, as for every bias here), made by bias_table_kernel from PARAMS
# (Hq, 1 + d_bar / 2) float64: a_h, then the w_i. Bounded (0 <= f <= d_bar) and not monotone
# in d: never centred (the nearest key is not the row's largest bias).


@triton.jit
def sandwich_row(d, PARAMS, NP: tl.constexpr, BLOCK_W: tl.constexpr):
    """f(d) = sum_i (1 - cos(d w_i)) for integer distances d (BLOCK,), float32 (BLOCK,): the
    angles in float64, range-reduced (rotary.sincos_reduced: exact at any distance), the
    terms summed in float32. w_i = PARAMS[0, 1:NP] (float64)."""
    j = 1 + tl.arange(0, BLOCK_W)
    w = tl.load(PARAMS + j, mask=j < NP, other=0.0).to(tl.float64)
    c, _ = sincos_reduced(d.to(tl.float64)[:, None] * w[None, :])
    return tl.sum(tl.where((j < NP)[None, :], 1.0 - c, 0.0), 1)


@triton.jit
def bias_table_kernel(F, G, PARAMS, L, BIAS: tl.constexpr, NP: tl.constexpr, NEED_G: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_W: tl.constexpr = 1):
    """Per-distance KERPLE tables, F and G (Hq, L) float32: F[h, d] = f(d) (:func:`bias_shape`)
    and G[h, d] = df/dr2 (:func:`bias_r2_term`, when NEED_G) for d = 0..L-1 with head h's r2;
    Sandwich: F (1, L) (:func:`sandwich_row`; BLOCK_W >= its frequency count).

    With contiguous positions a KERPLE bias depends on |q - k| only, so the attention loops
    read f from here (one integer subtract, abs and L1/L2-resident load per element) instead
    of evaluating a log polynomial per element (~25 instructions). The same helpers compute
    the same fp32 values, so the two paths agree bit for bit. O(Hq * S) memory, never S^2.
    """
    h = tl.program_id(1)
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = d < L
    row = h.to(tl.int64) * L
    if BIAS == BIAS_SANDWICH:  # one head-shared row (grid (., 1)), no gradient
        tl.store(F + row + d, sandwich_row(d, PARAMS, NP, BLOCK_W), mask=mask)
    else:
        dist = d.to(tl.float32)
        _, b = bias_params(BIAS, PARAMS, h, NP, L)
        f = bias_shape(BIAS, dist, b)
        tl.store(F + row + d, f, mask=mask)
        if NEED_G:
            tl.store(G + row + d, bias_r2_term(BIAS, f, dist), mask=mask)


# Table biases (T5)
# ------------------
# T5's bias is a learnable per-head table read by bucket: bias = table[h, bucket(k - q)].
# The launcher hands the kernels two per-relative-position rows per head, for k - q in
# [-R, R] (R = posattn.pe.T5Bias.radius: every further distance shares the bucket of +-R, so
# a clamped index is exact at any position): BIAS_F = -table[h, bucket] (f, with a = 1, as
# every bias here is -a f) and BIAS_G = the bucket itself (float32, small exact integers).
# The forward reads f per score (one clamp and one L1-resident load, no log). The dQ kernel
# accumulates the table's gradient: dS summed per bucket, over the buckets a tile spans
# (table_grad_update); a tile far from the diagonal spans one bucket, one near it a few.


@triton.jit
def table_index(row_pos, col_pos, R, QUERY_AXIS: tl.constexpr):
    """Index of k - q clamped to [-R, R], shifted to [0, 2R], (BLOCK_R, BLOCK_C) int32: queries
    are the tile's rows (QUERY_AXIS 0) or its columns (1). Integer positions of any width: the
    difference is clamped before it is narrowed."""
    rel = col_pos[None, :] - row_pos[:, None]
    if QUERY_AXIS == 1:
        rel = -rel
    return (tl.minimum(tl.maximum(rel, -R), R) + R).to(tl.int32)


@triton.jit
def table_grad_update(g, rows, ds, bucket, NP: tl.constexpr):
    """g (BLOCK_M, NP) += this tile's dS summed per bucket: g[:, j] gets each row's sum of dS
    over its scores in bucket j (bucket: the tile's BIAS_G, float). Walks only the buckets the
    tile's live scores (dS != 0) span: one, far from the diagonal; none in a masked-out tile.
    Each pass is a select and a row sum (no cross-warp reduction: rows are reduced once, at
    the store). rows (BLOCK_M, 2): each row's running sum of dS and the largest bucket of its
    live scores, for table_grad_centred."""
    bk = bucket.to(tl.int32)
    live = ds != 0.0
    row_hi = tl.max(tl.where(live, bk, -1), 1)  # each row's largest live bucket (its reference)
    lo = tl.min(tl.min(tl.where(live, bk, NP), 1), 0)
    hi = tl.max(row_hi, 0)
    cols = tl.arange(0, NP)
    for j in range(lo, hi + 1):
        r = tl.sum(tl.where(bk == j, ds, 0.0), 1)
        g += tl.where(cols[None, :] == j, r[:, None], 0.0)
    two = tl.arange(0, 2)
    rows = tl.where(two[None, :] == 0, rows + tl.sum(ds, 1)[:, None],
                    tl.maximum(rows, row_hi.to(tl.float32)[:, None]))
    return g, rows


@triton.jit
def table_grad_centred(g, rows, NP: tl.constexpr, TABLE_REF: tl.constexpr):
    """g minus each row's sum of dS in its reference bucket (one its live scores fall in).

    A softmax row's dS sums to 0 (the LSE is not differentiable), so this is the same
    gradient -- but the kernels' dS rows sum to ~eps |dP|, not 0, and where all of a row's
    keys share one bucket (every key beyond max_distance, or a single key) the naive math's
    gradient is 0 to the last bit while an uncentred sum would keep that residual, summed
    over every row. The same argument as the distance biases' centring (above), for a
    table.

    TABLE_REF >= 0: every row's reference is that bucket. A call that is one piece of a row
    (ring attention: the row's keys over several calls) has dS rows that do not sum to 0;
    the correction still cancels over the pieces, but only if every piece subtracts its sum
    in the same bucket."""
    two = tl.arange(0, 2)
    total = tl.sum(tl.where(two[None, :] == 0, rows, 0.0), 1)
    ref = tl.sum(tl.where(two[None, :] == 1, rows, 0.0), 1).to(tl.int32)
    if TABLE_REF >= 0:
        ref = ref - 2 * NP  # (param_grad_init's encoding)
    cols = tl.arange(0, NP)
    return g - tl.where(cols[None, :] == ref[:, None], total[:, None], 0.0)


@triton.jit
def tile_bias(BIAS: tl.constexpr, BIAS_TABLE: tl.constexpr, FT, row_pos, col_pos, col0,
              EXPLICIT_POS: tl.constexpr, b, QUERY_AXIS: tl.constexpr):
    """f of a tile (bias = -a f), (BLOCK_R, BLOCK_C) float32: read from head's row FT of the
    per-distance table when BIAS_TABLE (KERPLE: contiguous int32 positions; Sandwich: always,
    any positions; distance < its length by construction; a table bias: always, by clamped
    k - q, b = its radius), else computed from :func:`tile_dist`. Not centred (see centred). QUERY_AXIS as in query_axis."""
    if BIAS == BIAS_T5:
        return tl.load(FT + table_index(row_pos, col_pos, b.to(tl.int32), QUERY_AXIS))
    elif BIAS == BIAS_SANDWICH:  # |k - q| clamped (padded rows / columns read position 0)
        R = b.to(tl.int32)
        return tl.load(FT + tl.abs(table_index(row_pos, col_pos, R, QUERY_AXIS) - R))
    elif BIAS_TABLE:
        return tl.load(FT + tl.abs(row_pos[:, None] - col_pos[None, :]))
    else:
        return bias_shape(BIAS, tile_dist(row_pos, col_pos, col0, EXPLICIT_POS), b)


@triton.jit
def query_axis(v, QUERY_AXIS: tl.constexpr):
    """A per-query vector broadcast against a tile: queries are the tile's rows (QUERY_AXIS 0:
    forward, dQ) or its columns (1: dK/dV)."""
    if QUERY_AXIS == 0:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def centred_shape(BIAS: tl.constexpr, dist, dref, fref, b):
    """(f(dist) - f(c), ln(dist / c)) of a tile, c the row's centre (bias_row_ref: d_ref, or
    max(d_ref, 1) for KERPLE power), dref = c and fref = f(c) broadcast to the tile
    (query_axis); see "Centring" above for the closed forms. The second value is KERPLE
    power's (centred_r2_term reuses it), 0.0 otherwise. Per-row factors are formed on the
    (rows, 1) vectors, per element only a subtract, a log1p (and an expm1). Keys nearer than
    c (invisible ones, or d = 0 < c = 1) stay finite: the caller masks them."""
    if BIAS == BIAS_ALIBI:
        return dist - dref, 0.0
    elif BIAS == BIAS_KERPLE_LOG:
        w = fast_div(b, 1.0 + b * dref)  # per row
        return log1p_pos(tl.maximum(dist - dref, 0.0) * w), 0.0
    else:  # KERPLE power: f(c) expm1(r2 ln(d / c)), ln(d / c) = log1p((d - c) / c)
        tl.static_assert(BIAS == BIAS_KERPLE_POWER, "centred_shape: no form for this BIAS")
        lr = log1p_pos(tl.maximum((dist - dref) * fast_div(1.0, dref), -1.0))  # -inf at d = 0
        return fref * expm1_acc(b * lr), lr


@triton.jit
def centred_r2_term(BIAS: tl.constexpr, dist, dref, fref, fc, lr, b):
    """df/dr2 (dist) - df/dr2 (c) of a tile for KERPLE (closed forms under "Centring"); fc, lr =
    centred_shape of the tile. ALiBi: fc (never read)."""
    if BIAS == BIAS_KERPLE_LOG:  # d / (1 + r2 d) - c / (1 + r2 c) = (d - c) / ((1 + r2 d)(1 + r2 c))
        return fast_div(tl.maximum(dist - dref, 0.0) * fast_div(1.0, 1.0 + b * dref),
                        1.0 + b * dist)
    elif BIAS == BIAS_KERPLE_POWER:  # d^r2 ln d - c^r2 ln c = f(c) ln(d / c) + (f(d) - f(c)) ln d
        gc = fref * lr + fc * tl.log(tl.maximum(dist, 1.0))
        return tl.where(dist > 0, gc, -fref * tl.log(dref))  # g(0) = 0
    else:
        return fc


@triton.jit
def tile_bias_centred(BIAS: tl.constexpr, BIAS_TABLE: tl.constexpr, CENTER: tl.constexpr,
                      QUERY_AXIS: tl.constexpr, FT, row_pos, col_pos, col0,
                      EXPLICIT_POS: tl.constexpr, b, dref, fref):
    """f of a tile, centred on the queries' nearest visible keys when CENTER (centred_shape,
    computed in the tile: no table), else :func:`tile_bias`. dref, fref (per query, see
    bias_row_ref) and QUERY_AXIS as in query_axis. FIRE: its table ("FIRE"; dref, fref =
    bias_row_ref's (R, n))."""
    if BIAS == BIAS_FIRE:
        x, _ = fire_coords(row_pos, col_pos, b, query_axis(dref, QUERY_AXIS))
        return fire_value(FT, x, fref)
    elif CENTER:
        dist = tile_dist(row_pos, col_pos, col0, EXPLICIT_POS)
        f, _ = centred_shape(BIAS, dist, query_axis(dref, QUERY_AXIS), query_axis(fref, QUERY_AXIS), b)
        return f
    else:
        return tile_bias(BIAS, BIAS_TABLE, FT, row_pos, col_pos, col0, EXPLICIT_POS, b,
                         QUERY_AXIS)


@triton.jit
def tile_bias_grad_inputs(BIAS: tl.constexpr, BIAS_TABLE: tl.constexpr, CENTER: tl.constexpr, FT,
                          GT, row_pos, col_pos, col0, EXPLICIT_POS: tl.constexpr, b, dref, fref):
    """(f, df/dr2) of a tile (queries are its rows) for :func:`bias_grad_terms`: centred on the
    queries' nearest visible keys when CENTER (computed in the tile), else from the tables or
    computed. A table bias: (f, its bucket) by clamped k - q (b = the table's radius)."""
    tl.static_assert(BIAS != BIAS_SANDWICH, "Sandwich has no learnable parameter")
    if BIAS == BIAS_FIRE:  # (x, dx/dc): fire_grad_update's inputs
        return fire_grad_inputs(row_pos, col_pos, b, dref, FT)
    elif BIAS == BIAS_T5:
        idx = table_index(row_pos, col_pos, b.to(tl.int32), 0)
        return tl.load(FT + idx), tl.load(GT + idx)
    elif CENTER:
        dist = tile_dist(row_pos, col_pos, col0, EXPLICIT_POS)
        fc, lr = centred_shape(BIAS, dist, dref[:, None], fref[:, None], b)
        return fc, centred_r2_term(BIAS, dist, dref[:, None], fref[:, None], fc, lr, b)
    elif BIAS_TABLE:
        d = tl.abs(row_pos[:, None] - col_pos[None, :])
        return tl.load(FT + d), tl.load(GT + d)
    else:
        dist = tile_dist(row_pos, col_pos, col0, EXPLICIT_POS)
        f = bias_shape(BIAS, dist, b)
        return f, bias_r2_term(BIAS, f, dist)


@triton.jit
def bias_grad_terms(BIAS: tl.constexpr, ds, f, r2_term, a):
    """Row sums of dS * d(bias)/d(param) for the PE's one or two parameters.

    ds: (BLOCK_R, BLOCK_C) gradient of the natural-unit scaled logits, zero where masked;
    f, r2_term: :func:`tile_bias_grad_inputs` of the tile. a = slope or r1. Returns two
    (BLOCK_R,) vectors summed over axis 1 only: the caller accumulates them across tiles and
    reduces the last axis once, so no tile pays for a cross-warp reduction. Terms:
    d/da = -f for every bias PE; d/dr2 = -r1 df/dr2 (KERPLE); 0 for ALiBi.
    """
    # Constant factors (-1, r1) are applied to the row sums, not per element.
    g1 = -tl.sum(ds * f, 1)
    if BIAS == BIAS_ALIBI:
        return g1, g1 * 0.0
    return g1, -a * tl.sum(ds * r2_term, 1)


# FIRE (Li et al. 2023)
# ---------------------
# bias_h(q, k) = f_h(u), u = min(psi(|q - k|) / (psi(max(L, q)) + eps), 1), psi(x) = log(c x + 1)
# (posattn.pe.FIRE), f an MLP that torch tabulates: PARAMS is the table itself, (Hq, NP)
# float32, row h = [|c|, L, eps, n, then n cells x 4 coefficients, then n x 4 more], cell i
# holding the cubic a0 + a1 t + a2 t^2 + a3 t^3 of f_h on u in [i / n, (i + 1) / n],
# t = n u - i (through f at t = 0, 1/3, 2/3, 1: FIRE.coefficients), and the same of df/dt,
# from the MLP's exact derivative (c's and L's gradients: the value cubic's own slope is
# good to ~h^3 only, 1e-5 at 16 cells). The launcher hands the same tensor in as BIAS_F
# (the tables' channel), so the hooks read everything from the head's row FT.
# Per score: x = n u = log2(1 + c |d|) R_q, R_q = n ln2 / (ln(c max(L, q) + 1) + eps) per
# query (fire_rows, once per query block), u saturated at 1 (x at n); the cell is floor(x)
# (at most n - 1), t = x - cell: an FMA, a log2, a multiply, a floor, 4 L1-resident loads and
# 3 FMAs. log2(1 + c |d|) rounds 1 + c |d|: an absolute error of ~1e-7 in the log, as the
# naive fp32 formula has.
# Gradients (dQ program): the coefficients' by the cells the tile's live scores span (a pass
# per cell: the four sums of dS t^k, each reduced over the whole tile -- T5's bucket walk, but
# n x 4 columns per row would not fit in registers); c's and L's by the chain rule through x,
# with f'(x) from the slope table (fire_slope):
#   dx/dc = (R_q / ln2) |d| / (1 + c |d|) - x M_q / ((c M_q + 1) psi_q),  M_q = max(L, q)
#   dx/dL = -x c / ((c L + 1) psi_q) where q <= L (else 0),           psi_q = ln(c M_q + 1) + eps
# each row sums S_c = sum dS f' dx/dc (formed per score) and S_L = sum dS f' x, times its
# factor at the store (fire_store, which also centres every sum). A saturated score (u = 1)
# has f' = 0.
FIXED_REF = tl.constexpr(1e30)  # a reference x above this: the fixed one, u = 0 (fire_store)


@triton.jit
def fire_rows(qpos, FT):
    """Per query at ``qpos`` (BLOCK,), head row FT: (R, n, B, C) float32 -- R = n ln2 / psi_q
    (x = log2(1 + c |d|) R), the cell count n (a scalar), and the factors of dx/dc and dx/dL
    ("FIRE"): B = M_q / ((c M_q + 1) psi_q), C = c / ((c L + 1) psi_q) where q <= L, else 0."""
    c = tl.load(FT).to(tl.float32)
    L = tl.load(FT + 1).to(tl.float32)
    eps = tl.load(FT + 2).to(tl.float32)
    n = tl.load(FT + 3).to(tl.float32)
    q = qpos.to(tl.float32)
    above = q > L
    m = tl.where(above, q, L)  # max(L, q), L's branch at a tie (as the reference)
    psi = tl.log(c * m + 1.0) + eps
    r = n * LN2 / psi
    bq = m / ((c * m + 1.0) * psi)
    cq = tl.where(above, 0.0, c / ((c * L + 1.0) * psi))
    return r, n, bq, cq


@triton.jit
def fire_coords(row_pos, col_pos, c, R):
    """(x, w) of a tile: x = log2(1 + c |d|) R (R broadcast along the query axis), not yet
    saturated, and w = |d| / (1 + c |d|) (dx/dc's per-score factor), |d| = |row - column
    position| (integer positions of any width: differenced, then converted)."""
    d = tl.abs(row_pos[:, None] - col_pos[None, :]).to(tl.float32)
    cd1 = c * d + 1.0
    return tl.log2(cd1) * R, d / cd1


@triton.jit
def fire_grad_inputs(row_pos, col_pos, c, R, FT):
    """(x, dx/dc) of a tile whose rows are queries (R: theirs, fire_rows):
    dx/dc = (R / ln2) |d| / (1 + c |d|) - x M_q / ((c M_q + 1) psi_q), per score ("FIRE")."""
    x, w = fire_coords(row_pos, col_pos, c, R[:, None])
    _, _, bq, _ = fire_rows(row_pos, FT)
    return x, (R / LN2)[:, None] * w - bq[:, None] * x


@triton.jit
def fire_cell(x, n):
    """(cell int32, t) of cell coordinates x, u saturated at 1 (x at n)."""
    xc = tl.minimum(x, n)
    cell = tl.minimum(tl.floor(xc), n - 1.0)
    return cell.to(tl.int32), xc - cell


@triton.jit
def fire_coeffs(A, cell):
    """The 4 coefficients of each score's cell from the table at A (cells of 4 floats): four
    L1-resident gathers. (One 16-byte load per score split in registers, tl.reshape +
    tl.split, made the sm_90 forward spill 3 KB: its 3-D layouts go through shared memory.)"""
    a = A + 4 * cell
    return tl.load(a), tl.load(a + 1), tl.load(a + 2), tl.load(a + 3)


@triton.jit
def fire_value(FT, x, n):
    """f of a tile from its cell coordinates x: its cell's cubic at t (Horner: 3 FMAs)."""
    cell, t = fire_cell(x, n)
    a0, a1, a2, a3 = fire_coeffs(FT + 4, cell)
    return tl.fma(tl.fma(tl.fma(a3, t, a2), t, a1), t, a0)


@triton.jit
def fire_slope(FT, cell, t, n):
    """df/dx at (cell, t), from the derivative table (after the n x 4 value coefficients)."""
    a0, a1, a2, a3 = fire_coeffs(FT + 4 + 4 * n.to(tl.int32), cell)
    return tl.fma(tl.fma(tl.fma(a3, t, a2), t, a1), t, a0)


@triton.jit
def cell_columns(cols, j, m0, m1, m2, m3):
    """The four sums of cell j placed at its coefficients' columns 4j .. 4j + 3 of ``cols``
    (the coefficients' gradient vector), zero elsewhere."""
    k = cols - 4 * j
    return tl.where(k == 0, m0, tl.where(k == 1, m1, tl.where(k == 2, m2,
                                                              tl.where(k == 3, m3, 0.0))))


@triton.jit
def fire_grad_update(g, rows, ds, x, w, FT, n, NP: tl.constexpr):
    """g ((NP - 4) / 2,) += this tile's sums of dS t^k per cell, k = 0..3 (the coefficients'
    gradient), walking only the cells the tile's live scores (dS != 0) span; rows
    (BLOCK_M, 8) += per row (S_c, S_L, sum dS) = (sum dS f' dx/dc, sum dS f' x, sum dS), and
    its reference score's (x, dx/dc) (fire_store). x, w = x, dx/dc: fire_grad_inputs."""
    cell, t = fire_cell(x, n)
    fp = tl.where(x < n, fire_slope(FT, cell, t, n), 0.0)  # df/dx (0 where u is saturated)
    dsf = ds * fp
    live = ds != 0.0
    # each row's reference score (fire_store): its live score of largest x so far, and its w
    tx = tl.max(tl.where(live, x, -1.0), 1)
    tw = tl.max(tl.where(live & (x == tx[:, None]), w, float("-inf")), 1)
    col = tl.arange(0, 8)[None, :]
    old = tl.sum(tl.where(col == 3, rows, 0.0), 1)
    new = tx > old
    rows = tl.where((col == 3) & new[:, None], tx[:, None],
                    tl.where((col == 4) & new[:, None], tw[:, None], rows))
    rows += tl.where(col == 0, tl.sum(dsf * w, 1)[:, None],
                     tl.where(col == 1, tl.sum(dsf * x, 1)[:, None],
                              tl.where(col == 2, tl.sum(ds, 1)[:, None], 0.0)))
    lo = tl.min(tl.min(tl.where(live, cell, NP), 1), 0)
    hi = tl.max(tl.max(tl.where(live, cell, -1), 1), 0)
    t2 = t * t
    cols = tl.arange(0, (NP - 4) // 2)
    for j in range(lo, hi + 1):
        dj = tl.where(cell == j, ds, 0.0)
        s0 = tl.sum(tl.sum(dj, 1), 0)
        s1 = tl.sum(tl.sum(dj * t, 1), 0)
        s2 = tl.sum(tl.sum(dj * t2, 1), 0)
        s3 = tl.sum(tl.sum(dj * t2 * t, 1), 0)
        g += cell_columns(cols, j, s0, s1, s2, s3)
    return g, rows


@triton.jit
def fire_store(G, g, rows, FT, row_pos, row_mask, NP: tl.constexpr, TABLE_REF: tl.constexpr):
    """One program's FIRE gradient at G (NP,): dc, dL, 0, 0, then the coefficients'.

    Centred, as T5's table gradient (table_grad_centred) and for the same reason: a row's dS
    sums to 0 in exact math, so subtracting that sum times every gradient term at one of the
    row's own scores is the same gradient -- but the kernels' rows sum to ~eps |dP| (Delta
    comes from the rounded output), and where a row's keys all sit at one u (a single key,
    or keys far away) the naive math's gradient is exact while an uncentred sum would keep
    that residual times the terms. The reference score is the row's live score of largest
    x; with TABLE_REF >= 0 (one piece of a row: ring attention) it is u = 0 in every piece,
    where the c and L terms vanish and the coefficients' is cell 0's a0."""
    _, n, _, cq = fire_rows(row_pos, FT)
    col = tl.arange(0, 8)[None, :]
    s1 = tl.sum(tl.where(col == 0, rows, 0.0), 1)
    s2 = tl.sum(tl.where(col == 1, rows, 0.0), 1)
    total = tl.where(row_mask, tl.sum(tl.where(col == 2, rows, 0.0), 1), 0.0)
    x_ref = tl.sum(tl.where(col == 3, rows, 0.0), 1)  # -1: none live (total 0); FIXED: u = 0
    x_ref = tl.where(x_ref > FIXED_REF, 0.0, tl.maximum(x_ref, 0.0))
    w_ref = tl.sum(tl.where(col == 4, rows, 0.0), 1)  # its dx/dc (0 unless a live score set it)
    cell, t = fire_cell(x_ref, n)
    fp = tl.where(x_ref < n, fire_slope(FT, cell, t, n), 0.0)
    dc = tl.sum(tl.where(row_mask, s1 - total * fp * w_ref, 0.0), 0)
    dl = tl.sum(tl.where(row_mask, -cq * (s2 - total * fp * x_ref), 0.0), 0)
    four = tl.arange(0, 4)
    tl.store(G + four, tl.where(four == 0, dc, tl.where(four == 1, dl, 0.0)))
    # each row's total at its reference, -total t_ref^k in its cell: a walk over the rows'
    # reference cells (a few; one in the fixed mode), not a (rows, 4 n) tile
    cols = tl.arange(0, (NP - 4) // 2)
    lo = tl.min(tl.where(total != 0.0, cell, NP), 0)
    hi = tl.max(tl.where(total != 0.0, cell, -1), 0)
    for j in range(lo, hi + 1):
        tj = tl.where(cell == j, total, 0.0)
        m0 = tl.sum(tj, 0)
        tj = tj * t
        m1 = tl.sum(tj, 0)
        tj = tj * t
        m2 = tl.sum(tj, 0)
        m3 = tl.sum(tj * t, 0)
        g -= cell_columns(cols, j, m0, m1, m2, m3)
    tl.store(G + 4 + cols, g)
    # (the derivative table is data, no parameter: its slots are zero)
    tl.store(G + 4 + (NP - 4) // 2 + tl.arange(0, (NP - 4) // 2), tl.zeros([(NP - 4) // 2], tl.float32))
