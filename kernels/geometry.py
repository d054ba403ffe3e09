"""Geometry shared by every attention kernel (all ``@triton.jit``, inlined): which tokens a
program's sequence holds, their positions, which tiles can be visible and which need a mask.

Visibility (``visible``): key j is visible to query i iff ::

    causal:          k_pos[j] <= q_pos[i]
    window left  L:  k_pos[j] >= q_pos[i] - L        (WIN_L; a None side is no test at all)
    window right R:  k_pos[j] <= q_pos[i] + R        (WIN_R)

and j, i inside their sequence. With contiguous positions that is a band of the (query, key)
plane, and a block of rows visits only the tiles the band touches (``tile_range``)::

    keys ->      t_lo     f_lo          f_hi      t_hi
    rows    |  . |  m  m  |  F  F  F  F  |  m  m  |  .  .  |
      .  = skipped (outside the band: O(S * window) work, not O(S^2))
      m  = straddles an edge of the band (or the end of the keys): masked per element
      F  = every row sees every column: no mask at all

Explicit positions (any order) skip nothing: every tile is masked.

Sequences: dense batches have one (Sq, Sk) and batch b's tokens at b * stride_b; packed
(varlen) batches read sequence b's bounds from cumulative offsets CU_Q / CU_K (B + 1,), its
tokens at rows cu[b]:cu[b + 1] of a (1, H, total, D) view, and its default positions restart:
keys 0..len_k - 1, queries end-aligned to them (len_k - len_q + i).
"""
import triton
import triton.language as tl


@triton.jit
def seq_bounds(CU, b, S, VARLEN: tl.constexpr):
    """(first token's row, length) of sequence b: (0, S) dense, (cu[b], cu[b+1] - cu[b])
    varlen (the row as int64: it is multiplied by strides)."""
    if VARLEN:
        start = tl.load(CU + b)
        return start.to(tl.int64), tl.load(CU + b + 1) - start
    else:
        return 0, S


@triton.jit
def seq_geometry(CU_Q, CU_K, b, Sq, Sk, q_start, k_start, lse_len, VARLEN: tl.constexpr):
    """The geometry prologue: (q_row0, Sq, k_row0, Sk, q_start, k_start, lse_rows) of
    sequence b -- its first query / key rows, lengths, the positions of its first query / key
    (contiguous positions; varlen: len_k - len_q and 0, end-aligned per sequence), and the
    row length of the LSE-shaped buffers: Sq dense, lse_len = total_q packed (lse_len is None
    for dense launches: an argument the dense kernels do not carry)."""
    lse_rows = Sq
    if VARLEN:
        lse_rows = lse_len
    q_row0, Sq = seq_bounds(CU_Q, b, Sq, VARLEN)
    k_row0, Sk = seq_bounds(CU_K, b, Sk, VARLEN)
    if VARLEN:
        q_start = Sk - Sq
        k_start = 0
    return q_row0, Sq, k_row0, Sk, q_start, k_start, lse_rows


@triton.jit
def load_positions(POS, row0, offs, mask, stride):
    """Explicit positions of rows row0 + offs, int64 (any int64 position is exact)."""
    return tl.load(POS + (row0 + offs).to(tl.int64) * stride, mask=mask, other=0).to(tl.int64)


@triton.jit
def visible(vis, qpos, kpos, win_left, win_right, CAUSAL: tl.constexpr, WIN_L: tl.constexpr,
            WIN_R: tl.constexpr):
    """``vis`` (a tile's bounds mask) AND the visibility rules above; qpos / kpos broadcast
    to the tile ((R, 1) and (1, C), or transposed for dK/dV). Window tests on k - q: with
    contiguous int32 positions (|p| < 2**30) the difference cannot overflow, and a window
    side >= 2**31 - 1 is clamped by the launcher (it is then unbounded anyway)."""
    if CAUSAL:
        vis = vis & (kpos <= qpos)
    if WIN_L:
        vis = vis & (kpos - qpos >= -win_left)
    if WIN_R:
        vis = vis & (kpos - qpos <= win_right)
    return vis


@triton.jit
def tile_range(r0, R: tl.constexpr, C, lo_off, hi_off, HAS_LO: tl.constexpr,
               HAS_HI: tl.constexpr, BLOCK_C: tl.constexpr):
    """Column tiles a block of rows [r0, r0 + R) visits when row i sees columns j with
    i + lo_off <= j (HAS_LO) and j <= i + hi_off (HAS_HI), j < C (contiguous positions).
    Returns (t_lo, f_lo, f_hi, t_hi): tiles [t_lo, t_hi) are visited, [f_lo, f_hi) need no
    mask (every row of the block sees every column; rows past the sequence are the caller's
    concern), the rest straddle an edge. t_lo <= f_lo <= f_hi <= t_hi."""
    # Without a lower edge t_lo = f_lo stay the constant 0 and f_hi is clamped to t_hi only:
    # the loops then start at a constant, as before windows existed -- a runtime start
    # (min(0, t_hi)) cost the sm_90 D=128 forward 136 B of spills at 255 registers.
    t_lo = 0
    f_lo = 0
    t_hi = tl.cdiv(C, BLOCK_C)
    f_hi = C // BLOCK_C
    if HAS_LO:
        t_lo = tl.maximum(r0 + lo_off, 0) // BLOCK_C
        f_lo = tl.cdiv(tl.maximum(r0 + R - 1 + lo_off, 0), BLOCK_C)
    if HAS_HI:
        hi0 = hi_off + r0  # the first row's last visible column (one shared add)
        t_hi = tl.cdiv(tl.maximum(tl.minimum(hi0 + R, C), 0), BLOCK_C)
        f_hi = tl.minimum(tl.maximum(hi0 + 1, 0) // BLOCK_C, f_hi)
    if HAS_LO:
        t_lo = tl.minimum(t_lo, t_hi)
        f_lo = tl.minimum(tl.maximum(f_lo, t_lo), t_hi)
        f_hi = tl.maximum(f_hi, f_lo)
    f_hi = tl.minimum(f_hi, t_hi)
    return t_lo, f_lo, f_hi, t_hi


@triton.jit
def key_band(off, win_left, win_right, CAUSAL: tl.constexpr, WIN_L: tl.constexpr,
             WIN_R: tl.constexpr):
    """(lo_off, hi_off) for tile_range over keys (rows = queries), off = q_start - k_start:
    query i sees key j iff i + off - L <= j <= i + off + min(R, 0 if causal)."""
    lo_off = off
    hi_off = off
    if WIN_L:
        lo_off = off - win_left
    if WIN_R:
        hi_off = off + win_right
        if CAUSAL:
            hi_off = tl.minimum(hi_off, off)
    return lo_off, hi_off


@triton.jit
def query_key_tiles(m0, Sk, q_start, k_start, win_left, win_right, CAUSAL: tl.constexpr,
                    WIN_L: tl.constexpr, WIN_R: tl.constexpr, EXPLICIT_POS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(t_lo, f_lo, f_hi, t_hi) of the key tiles the query block starting at row m0 visits
    (the forward and dQ): tile_range over keys, or, for causal / windowed explicit positions
    (no order known), every tile masked."""
    if EXPLICIT_POS and (CAUSAL or WIN_L or WIN_R):
        t_hi = tl.cdiv(Sk, BLOCK_N)
        # a runtime 0: a constant one cost the sm_90 forward 50 registers
        return 0, 0, tl.minimum(0, t_hi), t_hi
    else:
        lo_off, hi_off = key_band(q_start - k_start, win_left, win_right, CAUSAL, WIN_L, WIN_R)
        return tile_range(m0, BLOCK_M, Sk, lo_off, hi_off, WIN_L, CAUSAL or WIN_R, BLOCK_N)


@triton.jit
def tile_run(RUN: tl.constexpr, t_lo, f_lo, f_hi, t_hi):
    """(lo, hi) of run RUN of a block's tiles (tile_range): 0 = masked before the band,
    1 = unmasked, 2 = masked after it. The kernels unroll their runs (tl.static_range)."""
    if RUN == 0:
        return t_lo, f_lo
    elif RUN == 1:
        return f_lo, f_hi
    else:
        return f_hi, t_hi


# Regions of a RoPE extension (posattn.pe.RoPEExtension; attn_fwd's REMAP passes)
# -------------------------------------------------------------------------------
# Pair (q, k) is in region r by g = q // unit - k // unit (floor; unit 1: the distance q - k,
# CHUNKED: the chunk indices): region 1 (the near pass) g < w, region r >= 2 (far) g >= w + r - 2,
# and below w + r - 1 unless it is the last (r = N_FAR + 1). With contiguous positions a
# block of rows meets a region only in a run of key tiles (region_tiles); a tile wholly in
# one region is computed once, one that straddles a boundary once per region it meets.


@triton.jit
def floor_div(x, d):
    """x // d rounded down (x any integer, d > 0): integer division truncates toward 0."""
    q = x // d
    return tl.where((x % d != 0) & (x < 0), q - 1, q)


@triton.jit
def region_gap(qpos, kpos, unit, CHUNKED: tl.constexpr):
    """g of every (query, key) pair of a tile, (BLOCK_M, BLOCK_N): q - k, or CHUNKED the chunk
    index difference (a division per row and per column, not per element)."""
    if CHUNKED:
        return floor_div(qpos, unit)[:, None] - floor_div(kpos, unit)[None, :]
    else:
        return qpos[:, None] - kpos[None, :]


@triton.jit
def in_region(g, w, REGION: tl.constexpr, N_FAR: tl.constexpr):
    """The pairs of region REGION (1: near; 2 .. N_FAR + 1: far) among gaps g."""
    if REGION == 1:
        return g < w
    elif REGION == N_FAR + 1:
        return g >= w + REGION - 2
    else:
        return (g >= w + REGION - 2) & (g < w + REGION - 1)


@triton.jit
def region_tiles(q_first, q_last, k_start, unit, w, t_lo, t_hi, REGION: tl.constexpr,
                 N_FAR: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """The run [lo, hi) of key tiles within [t_lo, t_hi) that hold a pair of region REGION
    for rows at contiguous positions q_first .. q_last: g in [g_lo, g_hi) needs
    k >= (q_first // unit - g_hi + 1) unit and k < (q_last // unit - g_lo + 1) unit."""
    c_lo = q_first
    c_hi = q_last
    if CHUNKED:
        c_lo = floor_div(q_first, unit)
        c_hi = floor_div(q_last, unit)
    lo = t_lo
    hi = t_hi
    if REGION <= N_FAR:  # bounded above: g < w + REGION - 1
        k_lo = (c_lo - (w + REGION - 1) + 1) * unit - k_start
        lo = tl.maximum(t_lo, tl.maximum(k_lo, 0) // BLOCK_N)
    if REGION >= 2:  # bounded below: g >= w + REGION - 2
        k_hi = (c_hi - (w + REGION - 2) + 1) * unit - k_start  # exclusive
        hi = tl.minimum(t_hi, tl.where(k_hi > 0, (k_hi - 1) // BLOCK_N + 1, 0))
    return lo, hi
