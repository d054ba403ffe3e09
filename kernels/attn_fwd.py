"""Forward kernel: FlashAttention-2 style online softmax (exp2 domain) with the PE in the tile.

One program = one BLOCK_M block of queries of one (sequence, query head). It runs the geometry
prologue (geometry.seq_geometry: the sequence's rows and positions), loads Q once (and rotates
it once for RoPE), then walks the key tiles it can see (geometry.tile_range): the masked tiles
before a window's band, the tiles that need no mask at all, then the tiles that straddle the
causal diagonal, the window's right edge or the end of the keys.

Shapes (strides are passed, so bhsd and bshd views both work without copies):
    Q (B, Hq, Sq, D)   K (B, Hkv, Sk, D)   V (B, Hkv, Sk, DV)   O (B, Hq, Sq, DV)
    LSE (B, Hq, Sq) float32, natural log, lse_len = Sq
    VARLEN: Q (1, Hq, total_q, D) etc. (views of flash-attn's (total, H, D)), CU_Q / CU_K
    (B + 1,) int32 sequence offsets, LSE (Hq, total_q), lse_len = total_q; the grid's query
    blocks cover the longest sequence and the others' surplus programs return at once
    QPOS (B|1, Sq), KPOS (B|1, Sk) int (explicit only; varlen (1, total))
    THETA (ROT_HALF,) float64 inv_freq (rotary axis, rotary.py)
    PARAMS (Hq, NP) the bias's per-head parameters (bias axis, bias.py)
    KD, VD: TMA descriptors of K and V, blocks (1, 1, BLOCK_N, BLOCK_A / BLOCK_DV), when TMA
    (else None; see launch.tma_ready): the loop loads each key tile with one bulk
    copy into shared memory instead of per-thread addresses and cp.async
    ROPE_TILES (cdiv(Sk, TILE_STEP), 2, BLOCK_A) float32: cos/sin of the key tile starts
    (RoPE with contiguous positions; see rotary.rope_tile_table_kernel)
    BIAS_F (Hq, bias_len) float32: KERPLE's f per distance when BIAS_TABLE (contiguous positions;
    see bias.bias_table_kernel); a table bias's f per clamped k - q (always; bias.py, "Table
    biases")
    DREF (B, Sq) (varlen (1, total_q)) float32: with CENTER, each query's distance to its
    nearest visible key; the bias's rows are centred on the bias there (bias.py, "Centring"),
    and LSE holds the centred rows' log-sum-exp (the launcher subtracts a f_ref for the
    caller); None otherwise (a constexpr: the kernel without CENTER has none of its cost)
    win_left, win_right: the window (WIN_L / WIN_R: that side is bounded; geometry.visible)
    cap_in = scale / c, cap_log2 = c log2 e: the logit softcap c (SOFTCAP; fmath.softcap_logits)
    O_PART (B * Hq, n_splits, Sq, DV), LSE_PART (B * Hq, n_splits, Sq) float32: with SPLIT,
    program (m, bh, s) walks only the s-th run of tiles_per_split key tiles and writes its
    normalised partial output and LSE there; attn_combine_kernel merges the splits into O and
    LSE (flash-decoding: a decode step has too few query blocks to fill the GPU otherwise)
"""
import triton
import triton.language as tl

from .bias import (BIAS_ALIBI, BIAS_NONE, BIAS_T5, alibi_causal_split, bias_params, bias_row_ref,
                   bias_shape, table_row, tile_bias_centred)
from .fmath import LN2, LOG2E, softcap_logits
from .geometry import (floor_div, in_region, load_positions, query_key_tiles, region_gap,
                       region_tiles, seq_geometry, tile_run, visible)
from .loader import load_box, load_groups, load_qk, load_tile, qk_dot
from .rotary import (ROT_ROPE, block_ref, far_positions, offset_table, qk_columns,
                     rope_angle_cos_sin, rope_cos_sin, tile_rope)


@triton.jit
def tile_logits(qk, scale_log2, pa2, pb, qpos, kpos, k0, BIAS_F, row_add, dref, fref, cap_in,
                cap_log2, BIAS: tl.constexpr, CAUSAL: tl.constexpr, EXPLICIT_POS: tl.constexpr,
                BIAS_TABLE: tl.constexpr, FP32: tl.constexpr, CENTER: tl.constexpr,
                SOFTCAP: tl.constexpr):
    """Scores of a (query rows, key columns) tile in the exp2 domain, the (soft-capped) scaled
    q.k minus the bias, plus ``row_add``: the backward's NLSE2 (-LSE * log2 e) as a
    (BLOCK_M, 1) column, so that exp2 of the result is P; 0.0 in the forward. pa2 = the
    bias's leading parameter x log2(e), pb = r2; k0 = the tile's first key position. The scale
    and the shift are one FFMA, a bias one more (written as tl.fma: the compiler does not
    contract them on its own). Causal ALiBi on 16-bit inputs takes alibi_causal_split (one
    FFMA + one FADD). dref, fref: the rows' centring (bias.bias_row_ref; used with CENTER).
    SOFTCAP: the scaled logit is c tanh(scale q.k / c) (fmath.softcap_logits), then the bias.
    Returns (s, x): x is tanh(scale q.k / c) with SOFTCAP (the backward's chain rule needs
    1 - x^2), else q.k."""
    x, mult = softcap_logits(qk, scale_log2, cap_in, cap_log2, SOFTCAP)
    if BIAS == BIAS_ALIBI and CAUSAL and not EXPLICIT_POS and not FP32:
        q_rel = (qpos - k0).to(tl.float32)
        if CENTER:
            q_rel = q_rel - dref
        s = alibi_causal_split(x, mult, pa2, q_rel, row_add, kpos.shape[0])
    else:
        s = tl.fma(x, mult, row_add)
        if BIAS != BIAS_NONE:
            f = tile_bias_centred(BIAS, BIAS_TABLE, CENTER, 0, BIAS_F, qpos, kpos, k0,
                                  EXPLICIT_POS, pb, dref, fref)
            s = tl.fma(f, -pa2, s)
    return s, x


@triton.jit
def _fwd_tiles(acc, l_i, m_i, qa, qb, qc, qpos, K, V, KD, VD, b, hk, KPOS, THETA, ROPE_TILES,
               BIAS_F, c_tab, s_tab,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
               k_row0, Sk, k_start, rope_factor, scale_log2, pa2, pb, dref, fref, cap_in,
               cap_log2, win_left, win_right, tile_lo, tile_hi, cols, remap, xref,
               ROT: tl.constexpr, BIAS: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, WIN_L: tl.constexpr, WIN_R: tl.constexpr,
               SOFTCAP: tl.constexpr, EXPLICIT_POS: tl.constexpr, HAS_PASS: tl.constexpr,
               ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr,
               PREC: tl.constexpr, BIAS_TABLE: tl.constexpr, FOLD_SCALE: tl.constexpr,
               TMA: tl.constexpr, CENTER: tl.constexpr, BT, PAGE: tl.constexpr,
               REGION: tl.constexpr, FAR_K: tl.constexpr, N_FAR: tl.constexpr,
               CHUNKED: tl.constexpr, XPOS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Online-softmax update over key tiles [tile_lo, tile_hi) of one sequence.

    REGION (RoPE extended by remapped positions; 0: none): the pass over region REGION's pairs
    only (geometry.in_region, N_FAR far regions, CHUNKED: by chunk index): 1, the near pass,
    RoPE as trained; 2 .. N_FAR + 1, a far pass, with Q and K rotated at their far positions:
    the caller passes Q so rotated, and K comes from K_FAR (FAR_K: rotated beforehand, laid
    out as K) or is rotated here (a KV cache: rotary.far_positions, mod r_unit when CHUNKED).
    remap = (K_FAR, THETA_FAR, remap_w, rk_a, rk_b, r_group, r_unit).
    XPOS: xPos's decay on the key tiles, relative to the query block: xref = (its reference,
    its span) (rotary.tile_rope).

    PAGE > 0 (a paged KV cache): key row n of the sequence is row BT[n // PAGE] * PAGE +
    n % PAGE of K and V (flat over pages), BT the sequence's row of the block table.

    K, V, KPOS point at the sequence's first key row (k_row0 is its row in the tensor, for TMA
    coordinates). MASKED=False tiles are fully inside the keys and fully visible (no
    per-element mask; geometry.tile_range).
    FOLD_SCALE (scale > 0, no softcap): the scores are held in units of 1/scale,
    s = q.k + bias / scale (the bias as one FFMA, bias / scale = -(a / scale) f), the row max
    is taken over them and the scale applied inside the exp2 argument: one FFMA per score there
    instead of an FMUL and an FADD (max(c x) = c max(x) for c > 0). Otherwise the scores are
    formed by tile_logits in the exp2 domain.
    There, with 128-key tiles, contiguous positions form |q - k| as q_rel - float(k - q_base):
    the query side loop-invariant (a few registers), the key side converted per tile (two
    instructions per column a thread holds) rather than kept live across the loop as
    bias.tile_dist does -- 32 registers a thread at 128 keys, the difference between
    128 x 128 ALiBi tiles spilling or not; smaller tiles keep the cheaper tile_dist. Exact
    below 2**24, like tile_dist.
    """
    colA, colB, maskA, colC, maskC, colV, maskV = cols  # head-dim columns (head_columns)
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
            kpos = load_positions(KPOS, 0, offs_n, n_mask, stride_kpn)
        else:
            kpos = k_start + offs_n
        cos, sin, c0, s0 = tile_rope(kpos, t * BLOCK_N, c_tab, s_tab, THETA, ROPE_TILES,
                                     rope_factor, 0.0, 0.0, ROT, EXPLICIT_POS, False, ROT_HALF,
                                     BLOCK_A, xref[0], k_start + t * BLOCK_N, XPOS, False, xref[1])
        if TMA:  # one dot group (no RoPE): see launch.tma_ready
            ka = load_box(KD, b, hk, k_row0 + t * BLOCK_N, 0, BLOCK_N, BLOCK_A)
            kb = ka
            kc = ka
            v = load_box(VD, b, hk, k_row0 + t * BLOCK_N, 0, BLOCK_N, colV.shape[0])
        else:
            krows = offs_n
            if PAGE > 0:  # through the block table (rows past the keys read page 0: masked)
                page = tl.load(BT + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
                krows = page * PAGE + offs_n % PAGE
            if REGION >= 2 and FAR_K:  # a far pass, K rotated at its far positions
                # beforehand (launch.attn_fwd: K_FAR, laid out as K)
                K_FAR, THETA_FAR, remap_w, rk_a, rk_b, r_group, r_unit = remap
                ka, kb, kc = load_groups(K_FAR, krows, n_mask, stride_kn, stride_kd, colA, colB,
                                         maskA, colC, maskC, ROT, HAS_PASS, MASKED, INTERLEAVED=INTERLEAVED)
            elif REGION >= 2:  # a far pass over a KV cache: K rotated here, per element
                K_FAR, THETA_FAR, remap_w, rk_a, rk_b, r_group, r_unit = remap
                kf = far_positions(kpos, rk_a, rk_b, r_group)
                if CHUNKED:  # DCA: k mod chunk_len
                    kf = kf - floor_div(kf, r_unit) * r_unit
                c_f, s_f = rope_angle_cos_sin(kf, THETA_FAR, rope_factor, ROT_HALF, BLOCK_A)
                ka, kb, kc = load_qk(K, krows, n_mask, stride_kn, stride_kd, c_f, s_f, 0.0, 0.0,
                                     colA, colB, maskA, colC, maskC, ROT, HAS_PASS, MASKED, False, INTERLEAVED=INTERLEAVED)
            else:
                ka, kb, kc = load_qk(K, krows, n_mask, stride_kn, stride_kd, cos, sin, c0, s0,
                                     colA, colB, maskA, colC, maskC, ROT, HAS_PASS, MASKED,
                                     not EXPLICIT_POS, INTERLEAVED=INTERLEAVED)
            v = load_tile(V, krows, n_mask, colV, maskV, stride_vn, stride_vd, MASKED)

        qk = qk_dot(qa, qb, qc, ka, kb, kc, ROT, HAS_PASS, PREC)
        if FOLD_SCALE:  # in units of 1/scale: see the docstring
            s = qk
            if BIAS != BIAS_NONE:
                if CENTER or BIAS_TABLE or EXPLICIT_POS or BLOCK_N < 128:
                    f = tile_bias_centred(BIAS, BIAS_TABLE, CENTER, 0, BIAS_F, qpos, kpos,
                                          k_start + t * BLOCK_N, EXPLICIT_POS, pb, dref, fref)
                else:  # |q - k| from the invariant rows and this tile's columns (docstring)
                    f = bias_shape(BIAS, tl.abs(q_rel[:, None]
                                                - (kpos - q_base).to(tl.float32)[None, :]), pb)
                # as tl.fma: left alone, the compiler emits FMUL + FADD
                s = tl.fma(f, -pa_u, s)
        else:
            s, _ = tile_logits(qk, scale_log2, pa2, pb, qpos, kpos, k_start + t * BLOCK_N, BIAS_F,
                               0.0, dref, fref, cap_in, cap_log2, BIAS, CAUSAL, EXPLICIT_POS,
                               BIAS_TABLE, K.dtype.element_ty == tl.float32, CENTER, SOFTCAP)
        if MASKED:
            vis = visible(n_mask[None, :], qpos[:, None], kpos[None, :], win_left, win_right,
                          CAUSAL, WIN_L, WIN_R)
            if REGION != 0:  # this pass's pairs only (geometry.in_region)
                _, _, remap_w, _, _, _, r_unit = remap
                vis = vis & in_region(region_gap(qpos, kpos, r_unit, CHUNKED), remap_w, REGION,
                                      N_FAR)
            s = tl.where(vis, s, float("-inf"))

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
    Q, K, V, O, LSE, QPOS, KPOS, CU_Q, CU_K, THETA, ROPE_TILES, PARAMS, BIAS_F, DREF, KD, VD,
    O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_qpb, stride_qpm, stride_kpb, stride_kpn,
    Hq, GROUP, Sq, Sk, lse_len, q_start, k_start, scale_log2, rope_factor, bias_len,
    tiles_per_split, win_left, win_right, cap_in, cap_log2,
    ROT: tl.constexpr, BIAS: tl.constexpr, NP: tl.constexpr, CAUSAL: tl.constexpr,
    WIN_L: tl.constexpr, WIN_R: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    EXPLICIT_POS: tl.constexpr, BIAS_TABLE: tl.constexpr, CENTER: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr, ROT_DIM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    FOLD_SCALE: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr,
    KLEN=None, BT=None, stride_btb=None, KV_LENS: tl.constexpr = False, PAGE: tl.constexpr = 0,
    PACK_GQA: tl.constexpr = False,
    Q_FAR=None, Q_FAR2=None, K_FAR=None, THETA_FAR=None, remap_w=None, r_unit=None, rk_a=None,
    rk_b=None, r_group=None, REMAP: tl.constexpr = False, FAR_K: tl.constexpr = False,
    N_FAR: tl.constexpr = 1, CHUNKED: tl.constexpr = False, XPOS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)  # int64: offsets below may exceed 2**31
    if PACK_GQA:  # decode-shaped: one program per (batch, KV head), its GROUP query heads x Sq
        # tokens packed into the rows (row r: head hk * GROUP + r // Sq, token r % Sq), so
        # each K / V tile is read once per group and the MMA rows are not mostly padding
        b = bh // (Hq // GROUP)
        hk = bh % (Hq // GROUP)
        h = hk * GROUP
    else:
        b = bh // Hq
        h = bh % Hq
        hk = h // GROUP
    # geometry prologue: this sequence's rows, lengths and first positions
    q_row0, Sq, k_row0, Sk, q_start, k_start, lse_rows = seq_geometry(
        CU_Q, CU_K, b, Sq, Sk, q_start, k_start, lse_len, VARLEN)
    tl.static_assert(not (TMA and VARLEN), "TMA descriptors address dense batches only")
    if KV_LENS:  # a KV cache (dense queries): sequence b's first KLEN[b] keys (of Sk rows:
        # the cache's capacity), its queries continuing them
        tl.static_assert(not VARLEN and not EXPLICIT_POS, "a KV cache: dense queries, implied positions")
        Sk = tl.load(KLEN + b)
        q_start = Sk - Sq
    if PAGE > 0:  # and its key rows through the block table (K / V: flat pages, batch stride 0)
        tl.static_assert(KV_LENS and not TMA, "paged K/V: a KV cache read through pointers")
        BT += b * stride_btb
    if VARLEN:
        if pid_m * BLOCK_M >= Sq:  # the grid covers the longest sequence
            return
    bt = 0 if VARLEN else b  # batch index into the tensors (varlen: one packed batch)
    b32 = b.to(tl.int32)  # TMA coordinates
    hk32 = hk.to(tl.int32)
    if PACK_GQA:
        K += bt * stride_kb + hk * stride_kh + k_row0 * stride_kn
        V += bt * stride_vb + hk * stride_vh + k_row0 * stride_vn
        tl.static_assert(not VARLEN and not EXPLICIT_POS and not CENTER and FOLD_SCALE,
                         "packed GQA rows: dense contiguous decode, scores in units of 1/scale")
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (head, token) rows
        m_mask = rows < GROUP * Sq
        h_r = h + rows // Sq  # each row's query head
        t_r = rows % Sq  # and token
        Q += b * stride_qb
        O += b * stride_ob
        q_rows = h_r * stride_qh + t_r * stride_qm  # element offsets (loaded with stride 1)
        o_rows = h_r * stride_oh + t_r * stride_om
        lse_off = (b * Hq + h_r) * Sq + t_r  # dense (B, Hq, Sq)
        offs_m = t_r
        BIAS_F += table_row(BIAS, h_r, bias_len)[:, None]  # each row's head's table row
        q_stride = 1
    else:
        Q += bt * stride_qb + h * stride_qh + q_row0 * stride_qm
        K += bt * stride_kb + hk * stride_kh + k_row0 * stride_kn
        if REMAP:  # the far rotations, laid out as Q and K (launch.attn_fwd)
            Q_FAR += bt * stride_qb + h * stride_qh + q_row0 * stride_qm
            if N_FAR > 1:
                Q_FAR2 += bt * stride_qb + h * stride_qh + q_row0 * stride_qm
            if FAR_K:
                K_FAR += bt * stride_kb + hk * stride_kh + k_row0 * stride_kn
        V += bt * stride_vb + hk * stride_vh + k_row0 * stride_vn
        O += bt * stride_ob + h * stride_oh + q_row0 * stride_om
        # LSE (B, Hq, Sq): row bh * Sq; varlen (Hq, total_q): h * total_q + the sequence's
        # row. (bh, not (b * Hq + h): b and h would stay live across the loop -- 8 B of
        # spills, sm_80)
        lse_row = (h if VARLEN else bh) * lse_rows + q_row0
        LSE += lse_row
        QPOS += bt * stride_qpb + q_row0 * stride_qpm
        KPOS += bt * stride_kpb + k_row0 * stride_kpn
        BIAS_F += table_row(BIAS, h, bias_len)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Sq
        q_rows = offs_m
        q_stride = stride_qm
    colA, colB = qk_columns(ROT, INTERLEAVED, ROT_HALF, BLOCK_A)
    maskA = tl.arange(0, BLOCK_A) < (ROT_HALF if ROT == ROT_ROPE else D)
    colC = ROT_DIM + tl.arange(0, BLOCK_C)
    maskC = colC < D
    colV = tl.arange(0, BLOCK_DV)
    maskV = colV < DV
    cols = (colA, colB, maskA, colC, maskC, colV, maskV)  # loop-invariant: one argument

    if EXPLICIT_POS:
        qpos = load_positions(QPOS, 0, offs_m, m_mask, stride_qpm)
    else:
        qpos = q_start + offs_m

    # bias parameters of this head, with log2(e) folded in where the bias is linear in them
    if PACK_GQA and BIAS != BIAS_NONE and BIAS != BIAS_T5:  # each row's head's: (BLOCK_M, 1)
        pa, pb = bias_params(BIAS, PARAMS, h_r[:, None], NP, bias_len)
    else:
        pa, pb = bias_params(BIAS, PARAMS, h, NP, bias_len)
    pa2 = pa * LOG2E
    dref, fref = bias_row_ref(BIAS, CENTER, DREF, bt * lse_rows + q_row0 + offs_m, m_mask, pb,
                              qpos, BIAS_F)

    # RoPE: rotate the Q tile once; build the per-offset table for the key tiles. xPos: every
    # decay relative to the block's first query (rotary.py)
    c_q = 0.0
    s_q = 0.0
    c_tab = 0.0
    s_tab = 0.0
    xref = 0
    xspan = 0
    if ROT == ROT_ROPE:
        if XPOS:
            xref, xspan = block_ref(qpos, m_mask, q_start + (0 if PACK_GQA else pid_m * BLOCK_M),
                                    EXPLICIT_POS, BLOCK_M)
        c_q, s_q = rope_cos_sin(qpos, xref, THETA, rope_factor, XPOS, True, ROT_HALF, BLOCK_A)
        if not EXPLICIT_POS:
            c_tab, s_tab = offset_table(THETA, XPOS, False, ROT_HALF, BLOCK_A, BLOCK_N)
    qa, qb, qc = load_qk(Q, q_rows, m_mask, q_stride, stride_qd, c_q, s_q, 0.0, 0.0, colA, colB,
                         maskA, colC, maskC, ROT, HAS_PASS, True, False, INTERLEAVED=INTERLEAVED)
    remap = (K_FAR, THETA_FAR, remap_w, rk_a, rk_b, r_group, r_unit)

    # Key tiles (geometry.tile_range): masked [t_lo, f_lo), unmasked [f_lo, f_hi), masked
    # [f_hi, t_hi). Causal or windowed explicit positions: every tile masked, none skipped.
    # (packed rows: the block's positions lie in q_start .. q_start + Sq - 1, Sq <= BLOCK_M:
    # the tiles of rows 0 .. BLOCK_M - 1, a superset whose unmasked run is still exact)
    t_lo, f_lo, f_hi, t_hi = query_key_tiles(0 if PACK_GQA else pid_m * BLOCK_M, Sk, q_start,
                                             k_start, win_left, win_right, CAUSAL, WIN_L, WIN_R,
                                             EXPLICIT_POS, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    run_lo = 0
    run_hi = 0
    if SPLIT:  # this program's run of key tiles only (may be empty), all through the masked
        # loop: no unmasked loop is compiled, one loop body instead of two (registers), and a
        # decode step is memory-bound anyway
        run0 = tl.program_id(2) * tiles_per_split
        run_lo = tl.maximum(run0, t_lo)
        run_hi = tl.minimum(run0 + tiles_per_split, t_hi)
    if REMAP:  # RoPE extended by remapped positions: a near pass, then a pass per far region
        tl.static_assert(ROT == ROT_ROPE and CAUSAL and not PACK_GQA and not TMA and not XPOS,
                         "remapped RoPE: causal RoPE (not xPos), pointer loads, unpacked rows")
        if SPLIT:  # this program's run of the split
            t_lo = run_lo
            t_hi = run_hi
        for region in tl.static_range(1, N_FAR + 2):
            if region == 2:  # Q at its far positions, rotated beforehand (laid out as Q)
                qa, qb, qc = load_groups(Q_FAR, q_rows, m_mask, q_stride, stride_qd,
                                         colA, colB, maskA, colC, maskC, ROT, HAS_PASS, True, INTERLEAVED=INTERLEAVED)
            elif region == 3:
                qa, qb, qc = load_groups(Q_FAR2, q_rows, m_mask, q_stride, stride_qd,
                                         colA, colB, maskA, colC, maskC, ROT, HAS_PASS, True, INTERLEAVED=INTERLEAVED)
            lo = t_lo  # explicit positions: every tile, the pairs masked
            hi = t_hi
            if not EXPLICIT_POS:  # the tiles that hold a pair of this region
                q_first = q_start + pid_m * BLOCK_M
                lo, hi = region_tiles(q_first, q_first + BLOCK_M - 1, k_start, r_unit, remap_w,
                                      t_lo, t_hi, region, N_FAR, CHUNKED, BLOCK_N)
            acc, l_i, m_i = _fwd_tiles(
                acc, l_i, m_i, qa, qb, qc, qpos, K, V, KD, VD, b32, hk32, KPOS, THETA,
                ROPE_TILES, BIAS_F, c_tab, s_tab, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_kpn, k_row0, Sk, k_start, rope_factor, scale_log2, pa2, pb, dref, fref,
                cap_in, cap_log2, win_left, win_right, lo, hi, cols, remap, (xref, xspan),
                ROT=ROT, BIAS=BIAS, MASKED=True, CAUSAL=CAUSAL, WIN_L=WIN_L, WIN_R=WIN_R,
                SOFTCAP=SOFTCAP, EXPLICIT_POS=EXPLICIT_POS, HAS_PASS=HAS_PASS,
                ROT_HALF=ROT_HALF, BLOCK_A=BLOCK_A, BLOCK_N=BLOCK_N, PREC=PREC,
                BIAS_TABLE=BIAS_TABLE, FOLD_SCALE=FOLD_SCALE, TMA=TMA, CENTER=CENTER, BT=BT,
                PAGE=PAGE, REGION=region, FAR_K=FAR_K, N_FAR=N_FAR, CHUNKED=CHUNKED,
                XPOS=False, INTERLEAVED=INTERLEAVED)

    # Three runs of tiles (unrolled at compile time; a run that cannot occur is not compiled):
    # 0 = masked tiles before the band (a window's left edge), 1 = unmasked, 2 = masked.
    for run in tl.static_range(3):
        if not REMAP and ((run == 2) or (run == 1 and not SPLIT)
                          or (run == 0 and WIN_L and not SPLIT)):
            lo, hi = tile_run(run, t_lo, f_lo, f_hi, t_hi)
            if run == 2 and SPLIT:  # this program's run of the split
                lo = run_lo
                hi = run_hi
            acc, l_i, m_i = _fwd_tiles(
                acc, l_i, m_i, qa, qb, qc, qpos, K, V, KD, VD, b32, hk32, KPOS, THETA,
                ROPE_TILES, BIAS_F, c_tab, s_tab, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_kpn, k_row0, Sk, k_start, rope_factor, scale_log2, pa2, pb, dref, fref,
                cap_in, cap_log2, win_left, win_right, lo, hi, cols, remap, (xref, xspan),
                ROT=ROT, BIAS=BIAS, MASKED=run != 1, CAUSAL=CAUSAL, WIN_L=WIN_L, WIN_R=WIN_R,
                SOFTCAP=SOFTCAP, EXPLICIT_POS=EXPLICIT_POS, HAS_PASS=HAS_PASS,
                ROT_HALF=ROT_HALF, BLOCK_A=BLOCK_A, BLOCK_N=BLOCK_N, PREC=PREC,
                BIAS_TABLE=BIAS_TABLE, FOLD_SCALE=FOLD_SCALE, TMA=TMA, CENTER=CENTER, BT=BT,
                PAGE=PAGE, REGION=0, FAR_K=False, N_FAR=N_FAR, CHUNKED=False, XPOS=XPOS,
                INTERLEAVED=INTERLEAVED)

    # Rows that saw no key: output 0 and LSE -inf. (l_i != 0, not > 0: a NaN row stays NaN.)
    seen = l_i != 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    if SPLIT:
        if PACK_GQA:
            row = ((b * Hq + h_r) * tl.num_programs(2) + tl.program_id(2)) * Sq + t_r
        else:
            row = (bh * tl.num_programs(2) + tl.program_id(2)) * Sq + offs_m
        o_ptrs = O_PART + row.to(tl.int64)[:, None] * DV + colV[None, :]
        tl.store(o_ptrs, out, mask=m_mask[:, None] & maskV[None, :])
        tl.store(LSE_PART + row, lse, mask=m_mask)
    elif PACK_GQA:
        o_ptrs = O + o_rows[:, None] + colV[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & maskV[None, :])
        tl.store(LSE + lse_off, lse, mask=m_mask)
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
