"""Forward kernel: FlashAttention-2 style online softmax (exp2 domain) with the PE in the tile.

One program = one BLOCK_M block of queries of one (batch, query head). It loads Q once (and
rotates it once for RoPE), then walks the key tiles it can see: first the tiles that need no
mask at all, then the tiles that straddle the causal diagonal or the end of the keys.

Shapes (strides are passed, so bhsd and bshd views both work without copies):
    Q (B, Hq, Sq, D)   K (B, Hkv, Sk, D)   V (B, Hkv, Sk, DV)   O (B, Hq, Sq, DV)
    LSE (B, Hq, Sq) float32, natural log   QPOS (B|1, Sq), KPOS (B|1, Sk) int (explicit only)
    THETA (ROT_HALF,) float64 inv_freq (RoPE)   PA, PB (Hq,) PE parameters (bias PEs)
    KD, VD: TMA descriptors of K and V, blocks (1, 1, BLOCK_N, BLOCK_A / BLOCK_DV), when TMA
    (else None; see launch.tma_ready): the loop loads each key tile with one bulk
    copy into shared memory instead of per-thread addresses and cp.async
    ROPE_TILES (cdiv(Sk, TILE_STEP), 2, BLOCK_A) float32: cos/sin of the key tile starts
    (RoPE with contiguous positions; see pe_helpers.rope_tile_table_kernel)
    BIAS_F (Hq, bias_len) float32: KERPLE's f per distance when BIAS_TABLE (contiguous positions;
    see pe_helpers.bias_table_kernel)
    DREF (B, Sq) float32: with CENTER, each query's distance to its nearest visible key; the
    bias PE's rows are centred on the bias there (pe_helpers, "Centring"), and LSE holds the
    centred rows' log-sum-exp (the launcher subtracts a f_ref for the caller); None otherwise
    (a constexpr: the kernel without CENTER has exactly its former arguments)
    O_PART (B * Hq, n_splits, Sq, DV), LSE_PART (B * Hq, n_splits, Sq) float32: with SPLIT,
    program (m, bh, s) walks only the s-th run of tiles_per_split key tiles and writes its
    normalised partial output and LSE there; attn_combine_kernel merges the splits into O and
    LSE (flash-decoding: a decode step has too few query blocks to fill the GPU otherwise)
"""
import triton
import triton.language as tl

from .pe_helpers import (LN2, LOG2E, PE_ALIBI, PE_KERPLE_LOG, PE_KERPLE_POWER, PE_NONE, PE_ROPE,
                         alibi_causal_split, bias_row_ref, bias_shape, qk_columns,
                         rope_angle_cos_sin, rope_rotate, rope_tile_start, tile_bias_centred)


@triton.jit
def load_tile(ptr, rows, row_mask, cols, col_mask, stride_row, stride_col, MASKED: tl.constexpr):
    """Load a (rows, cols) tile; rows beyond the sequence and padded columns read 0."""
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :] * stride_col
    if MASKED:
        return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=col_mask[None, :], other=0.0)


@triton.jit
def load_qk(ptr, rows, row_mask, stride_row, stride_col, cos, sin, c0, s0, colA, colB, maskA,
            colC, maskC, PE: tl.constexpr, HAS_PASS: tl.constexpr, MASKED: tl.constexpr,
            SHIFT: tl.constexpr):
    """Load Q or K as its dot groups, rotated for RoPE, in the input dtype.

    RoPE rotates by (cos, sin) (BLOCK, BLOCK_A) and then, when SHIFT, by the tile-start
    rotation (c0, s0) (BLOCK_A,) (see pe_helpers.rope_tile_start).
    Returns (a, b, c): a = group A (all columns for non-RoPE PEs), b = the rotated partners,
    c = RoPE pass-through columns (partial rotary). Unused groups are returned as ``a``.
    """
    a = load_tile(ptr, rows, row_mask, colA, maskA, stride_row, stride_col, MASKED)
    if PE == PE_ROPE:
        b = load_tile(ptr, rows, row_mask, colB, maskA, stride_row, stride_col, MASKED)
        ra, rb = rope_rotate(a.to(tl.float32), b.to(tl.float32), cos, sin)
        if SHIFT:
            ra, rb = rope_rotate(ra, rb, c0[None, :], s0[None, :])
        if HAS_PASS:
            c = load_tile(ptr, rows, row_mask, colC, maskC, stride_row, stride_col, MASKED)
        else:
            c = a
        return ra.to(a.dtype), rb.to(a.dtype), c
    else:
        return a, a, a


@triton.jit
def load_box(desc, b, h, row0, col0, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr):
    """TMA load of rows [row0, row0 + BLOCK_R) and columns [col0, col0 + BLOCK_COL) of head
    (b, h) of a (B, H, S, D) descriptor, as (BLOCK_R, BLOCK_COL). Out of bounds reads 0, so
    rows past S and padded head-dim columns need no mask. Coordinates are int32 (the
    hardware forms the 64-bit address)."""
    return desc.load([b, h, row0, col0]).reshape(BLOCK_R, BLOCK_COL)


@triton.jit
def qk_dot(qa, qb, qc, ka, kb, kc, PE: tl.constexpr, HAS_PASS: tl.constexpr,
           PREC: tl.constexpr):
    """q @ k^T summed over the dot groups: (BLOCK_M, BLOCK_N) float32."""
    s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
    if PE == PE_ROPE:
        s = tl.dot(qb, tl.trans(kb), s, input_precision=PREC)
        if HAS_PASS:
            s = tl.dot(qc, tl.trans(kc), s, input_precision=PREC)
    return s


@triton.jit
def key_tiles(pid_m, Sk, q_start, k_start, CAUSAL: tl.constexpr, EXPLICIT_POS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles query block pid_m visits: [0, n_full) need no mask, [n_full, n_tiles) do.

    Causal with contiguous positions skips the tiles past the diagonal and leaves unmasked the
    tiles every query of the block sees; explicit positions can skip nothing (order unknown).
    Returns (n_full, n_tiles).
    """
    n_tiles = tl.cdiv(Sk, BLOCK_N)
    n_full = Sk // BLOCK_N
    if CAUSAL:
        if EXPLICIT_POS:
            n_full = 0
        else:
            off = q_start - k_start  # key j visible to query i iff j <= i + off
            last_visible = tl.minimum(off + pid_m * BLOCK_M + BLOCK_M, Sk)
            n_tiles = tl.cdiv(tl.maximum(last_visible, 0), BLOCK_N)
            n_full = tl.minimum(tl.maximum(off + pid_m * BLOCK_M + 1, 0) // BLOCK_N, n_full)
    return tl.minimum(n_full, n_tiles), n_tiles


@triton.jit
def tile_rope(pos, offset, c_tab, s_tab, THETA, ROPE_TILES, rope_factor, PE: tl.constexpr,
              EXPLICIT_POS: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """RoPE rotation of a loop tile ``offset`` positions after its sequence's start, as load_qk
    takes it: (cos, sin, c0, s0). Explicit positions: per-element cos/sin (no tile-start
    step); contiguous: the per-offset table plus the tile-start row of ROPE_TILES."""
    cos = c_tab
    sin = s_tab
    c0 = 0.0
    s0 = 0.0
    if PE == PE_ROPE:
        if EXPLICIT_POS:
            cos, sin = rope_angle_cos_sin(pos, THETA, rope_factor, ROT_HALF, BLOCK_A)
        else:
            c0, s0 = rope_tile_start(ROPE_TILES, offset, BLOCK_A)
    return cos, sin, c0, s0


@triton.jit
def tile_logits(qk, scale_log2, pa2, pb, qpos, kpos, k0, BIAS_F, row_add, dref, fref,
                PE: tl.constexpr, CAUSAL: tl.constexpr, EXPLICIT_POS: tl.constexpr,
                BIAS_TABLE: tl.constexpr, FP32: tl.constexpr, CENTER: tl.constexpr):
    """Scores of a (query rows, key columns) tile in the exp2 domain, qk * scale_log2 minus the
    bias, plus ``row_add``: the backward's NLSE2 (-LSE * log2 e) as a (BLOCK_M, 1) column, so
    that exp2 of the result is P; 0.0 in the forward. pa2 = the bias's leading parameter x
    log2(e), pb = r2; k0 = the tile's first key position. The scale and the shift are one
    FFMA, a bias one more (written as tl.fma: the compiler does not contract them on its
    own). Causal ALiBi on 16-bit inputs takes alibi_causal_split (one FFMA + one FADD).
    dref, fref: the rows' centring (pe_helpers.bias_row_ref; used with CENTER)."""
    if PE == PE_ALIBI and CAUSAL and not EXPLICIT_POS and not FP32:
        q_rel = (qpos - k0).to(tl.float32)
        if CENTER:
            q_rel = q_rel - dref
        s = alibi_causal_split(qk, scale_log2, pa2, q_rel, row_add, kpos.shape[0])
    else:
        s = tl.fma(qk, scale_log2, row_add)
        if PE != PE_NONE and PE != PE_ROPE:
            f = tile_bias_centred(PE, BIAS_TABLE, CENTER, 0, BIAS_F, qpos, kpos, k0,
                                  EXPLICIT_POS, pb, dref, fref)
            s = tl.fma(f, -pa2, s)
    return s


@triton.jit
def _fwd_tiles(acc, l_i, m_i, qa, qb, qc, qpos, K, V, KD, VD, b, hk, KPOS, THETA, ROPE_TILES,
               BIAS_F, c_tab, s_tab,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
               Sk, k_start, rope_factor, scale_log2, pa2, pb, dref, fref, tile_lo, tile_hi,
               colA, colB, maskA, colC, maskC, colV, maskV,
               PE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               EXPLICIT_POS: tl.constexpr, HAS_PASS: tl.constexpr, ROT_HALF: tl.constexpr,
               BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
               BIAS_TABLE: tl.constexpr, FOLD_SCALE: tl.constexpr, TMA: tl.constexpr,
               CENTER: tl.constexpr):
    """Online-softmax update over key tiles [tile_lo, tile_hi).

    MASKED=False tiles are fully inside the keys and fully visible (no per-element mask).
    FOLD_SCALE (scale > 0): the scores are held in units of 1/scale, s = q.k + bias / scale
    (the bias as one FFMA, bias / scale = -(a / scale) f), the row max is taken over them and
    the scale applied inside the exp2 argument: one FFMA per score there instead of an FMUL
    and an FADD (max(c x) = c max(x) for c > 0). Otherwise (a zero or negative scale) the
    scores are formed by tile_logits in the exp2 domain.
    There, with 128-key tiles, contiguous positions form |q - k| as q_rel - float(k - q_base):
    the query side loop-invariant (a few registers), the key side converted per tile (two
    instructions per column a thread holds) rather than kept live across the loop as
    pe_helpers.tile_dist does -- 32 registers a thread at 128 keys, the difference between
    128 x 128 ALiBi tiles spilling or not; smaller tiles keep the cheaper tile_dist. Exact
    below 2**24, like tile_dist.
    """
    exp_scale = 1.0  # what s is multiplied by inside max and exp2 (1: s is already scaled)
    pa_u = 0.0  # FOLD_SCALE: the bias's leading parameter in units of 1/scale
    q_base = tl.min(qpos, 0)  # contiguous positions: the block's first query
    q_rel = (qpos - q_base).to(tl.float32)
    if FOLD_SCALE:
        exp_scale = scale_log2
        pa_u = pa2 / scale_log2
    for t in range(tile_lo, tile_hi):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Sk
        if EXPLICIT_POS:
            kpos = tl.load(KPOS + offs_n.to(tl.int64) * stride_kpn, mask=n_mask, other=0).to(tl.int64)
        else:
            kpos = k_start + offs_n
        cos, sin, c0, s0 = tile_rope(kpos, t * BLOCK_N, c_tab, s_tab, THETA, ROPE_TILES,
                                     rope_factor, PE, EXPLICIT_POS, ROT_HALF, BLOCK_A)
        if TMA:  # one dot group (no RoPE): see launch.tma_ready
            ka = load_box(KD, b, hk, t * BLOCK_N, 0, BLOCK_N, BLOCK_A)
            kb = ka
            kc = ka
            v = load_box(VD, b, hk, t * BLOCK_N, 0, BLOCK_N, colV.shape[0])
        else:
            ka, kb, kc = load_qk(K, offs_n, n_mask, stride_kn, stride_kd, cos, sin, c0, s0, colA,
                                 colB, maskA, colC, maskC, PE, HAS_PASS, MASKED, not EXPLICIT_POS)
            v = load_tile(V, offs_n, n_mask, colV, maskV, stride_vn, stride_vd, MASKED)

        qk = qk_dot(qa, qb, qc, ka, kb, kc, PE, HAS_PASS, PREC)
        if FOLD_SCALE:  # in units of 1/scale: see the docstring
            s = qk
            if PE != PE_NONE and PE != PE_ROPE:
                if CENTER or BIAS_TABLE or EXPLICIT_POS or BLOCK_N < 128:
                    f = tile_bias_centred(PE, BIAS_TABLE, CENTER, 0, BIAS_F, qpos, kpos,
                                          k_start + t * BLOCK_N, EXPLICIT_POS, pb, dref, fref)
                else:  # |q - k| from the invariant rows and this tile's columns (docstring)
                    f = bias_shape(PE, tl.abs(q_rel[:, None]
                                              - (kpos - q_base).to(tl.float32)[None, :]), pb)
                # as tl.fma: left alone, the compiler emits FMUL + FADD
                s = tl.fma(f, -pa_u, s)
        else:
            s = tile_logits(qk, scale_log2, pa2, pb, qpos, kpos, k_start + t * BLOCK_N, BIAS_F,
                            0.0, dref, fref, PE, CAUSAL, EXPLICIT_POS, BIAS_TABLE,
                            K.dtype.element_ty == tl.float32, CENTER)
        if MASKED:
            visible = n_mask[None, :]
            if CAUSAL:
                visible = visible & (kpos[None, :] <= qpos[:, None])
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1) * exp_scale)
        # A row that has seen no visible key yet keeps m = -inf; shift it by 0 instead so
        # exp2(-inf - -inf) never makes a NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * exp_scale - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


# tiles_per_split varies with Sk under a split; specialising it (== 1, % 16) would add
# compiles in the middle of a generation as the cache grows
@triton.jit(do_not_specialize=["tiles_per_split"])
def attn_fwd_kernel(
    Q, K, V, O, LSE, QPOS, KPOS, THETA, ROPE_TILES, PA, PB, BIAS_F, DREF, KD, VD, O_PART,
    LSE_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_qpb, stride_qpm, stride_kpb, stride_kpn,
    Hq, GROUP, Sq, Sk, q_start, k_start, scale_log2, rope_factor, bias_len, tiles_per_split,
    PE: tl.constexpr, CAUSAL: tl.constexpr, EXPLICIT_POS: tl.constexpr, BIAS_TABLE: tl.constexpr,
    CENTER: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr, ROT_DIM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    FOLD_SCALE: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)  # int64: offsets below may exceed 2**31
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    b32 = b.to(tl.int32)  # TMA coordinates
    hk32 = hk.to(tl.int32)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh * Sq
    QPOS += b * stride_qpb
    KPOS += b * stride_kpb
    BIAS_F += h * bias_len

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Sq
    colA, colB = qk_columns(PE, INTERLEAVED, ROT_HALF, BLOCK_A)
    maskA = tl.arange(0, BLOCK_A) < (ROT_HALF if PE == PE_ROPE else D)
    colC = ROT_DIM + tl.arange(0, BLOCK_C)
    maskC = colC < D
    colV = tl.arange(0, BLOCK_DV)
    maskV = colV < DV

    if EXPLICIT_POS:
        qpos = tl.load(QPOS + offs_m.to(tl.int64) * stride_qpm, mask=m_mask, other=0).to(tl.int64)
    else:
        qpos = q_start + offs_m

    # PE parameters, per head, with log2(e) folded in where the bias is linear in them.
    pa2 = 0.0
    pb = 0.0
    if PE == PE_ALIBI:
        pa2 = tl.load(PA + h).to(tl.float32) * LOG2E
    elif PE == PE_KERPLE_LOG or PE == PE_KERPLE_POWER:
        pa2 = tl.load(PA + h).to(tl.float32) * LOG2E
        pb = tl.load(PB + h).to(tl.float32)
    dref, fref = bias_row_ref(PE, CENTER, DREF, b * Sq + offs_m, m_mask, pb)

    # RoPE: rotate the Q tile once; build the per-offset table for the key tiles.
    c_q = 0.0
    s_q = 0.0
    c_tab = 0.0
    s_tab = 0.0
    if PE == PE_ROPE:
        c_q, s_q = rope_angle_cos_sin(qpos, THETA, rope_factor, ROT_HALF, BLOCK_A)
        if not EXPLICIT_POS:
            c_tab, s_tab = rope_angle_cos_sin(tl.arange(0, BLOCK_N), THETA, 1.0, ROT_HALF, BLOCK_A)
    qa, qb, qc = load_qk(Q, offs_m, m_mask, stride_qm, stride_qd, c_q, s_q, 0.0, 0.0, colA, colB,
                         maskA, colC, maskC, PE, HAS_PASS, True, False)

    n_full, n_tiles = key_tiles(pid_m, Sk, q_start, k_start, CAUSAL, EXPLICIT_POS, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    full_hi = n_full  # unmasked tiles [0, full_hi), then masked ones [masked_lo, masked_hi)
    masked_lo = n_full
    masked_hi = n_tiles
    if SPLIT:  # this program's run of key tiles only (may be empty), all through the masked
        # loop: the unmasked one gets no trips (a constant: its body compiles away), so one
        # loop body instead of two (registers), and a decode step is memory-bound anyway
        full_hi = 0
        masked_lo = tl.program_id(2) * tiles_per_split
        masked_hi = tl.minimum(masked_lo + tiles_per_split, n_tiles)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, qa, qb, qc, qpos, K, V, KD, VD, b32, hk32, KPOS,
                               THETA, ROPE_TILES, BIAS_F, c_tab, s_tab,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
                               Sk, k_start, rope_factor, scale_log2, pa2, pb, dref, fref,
                               0, full_hi,
                               colA, colB, maskA, colC, maskC, colV, maskV,
                               PE, False, CAUSAL, EXPLICIT_POS, HAS_PASS, ROT_HALF, BLOCK_A,
                               BLOCK_N, PREC, BIAS_TABLE, FOLD_SCALE, TMA, CENTER)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, qa, qb, qc, qpos, K, V, KD, VD, b32, hk32, KPOS,
                               THETA, ROPE_TILES, BIAS_F, c_tab, s_tab,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
                               Sk, k_start, rope_factor, scale_log2, pa2, pb, dref, fref,
                               masked_lo, masked_hi,
                               colA, colB, maskA, colC, maskC, colV, maskV,
                               PE, True, CAUSAL, EXPLICIT_POS, HAS_PASS, ROT_HALF, BLOCK_A,
                               BLOCK_N, PREC, BIAS_TABLE, FOLD_SCALE, TMA, CENTER)

    # Rows that saw no key: output 0 and LSE -inf. (l_i != 0, not > 0: a NaN row stays NaN.)
    seen = l_i != 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    if SPLIT:
        row = (bh * tl.num_programs(2) + tl.program_id(2)) * Sq + offs_m
        o_ptrs = O_PART + row.to(tl.int64)[:, None] * DV + colV[None, :]
        tl.store(o_ptrs, out, mask=m_mask[:, None] & maskV[None, :])
        tl.store(LSE_PART + row, lse, mask=m_mask)
    else:
        o_ptrs = O + offs_m.to(tl.int64)[:, None] * stride_om + colV[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & maskV[None, :])
        tl.store(LSE + offs_m, lse, mask=m_mask)


@triton.jit
def attn_combine_kernel(O_PART, LSE_PART, O, LSE, stride_ob, stride_oh, stride_om, stride_od,
                        Hq, Sq, n_splits, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_DV: tl.constexpr):
    """Merge the SPLIT partials of attn_fwd_kernel: lse = log sum_s exp(lse_s), out = sum_s
    exp(lse_s - lse) out_s, in split order (deterministic). A query no split saw gets 0 and
    -inf; a NaN in any split reaches the sum. One program per (query block, b * Hq + h)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Sq
    colV = tl.arange(0, BLOCK_DV)
    mask = m_mask[:, None] & (colV < DV)[None, :]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(LSE_PART + (bh * n_splits + s) * Sq + offs_m, mask=m_mask,
                                  other=float("-inf")))
    m_shift = tl.where(m == float("-inf"), 0.0, m)  # no split saw the query: weights 0, not NaN
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s in range(n_splits):
        row = (bh * n_splits + s) * Sq + offs_m
        w = tl.exp(tl.load(LSE_PART + row, mask=m_mask, other=float("-inf")) - m_shift)
        part = tl.load(O_PART + row.to(tl.int64)[:, None] * DV + colV[None, :], mask=mask, other=0.0)
        l += w
        acc += w[:, None] * part
    seen = l != 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    lse = tl.where(seen, m_shift + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
    b = bh // Hq
    h = bh % Hq
    o_ptrs = (O + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_om
              + colV[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + bh * Sq + offs_m, lse, mask=m_mask)
