"""Backward kernels: preprocess (Delta = rowsum(O * dO)), dK/dV, dQ. No atomics anywhere.

FlashAttention-2's split: the dK/dV program owns one key block and walks the query tiles of
every query head in its GQA group (so dK/dV are summed over the group in registers); the dQ
program owns one query block and walks the key tiles. Both recompute P from the saved LSE
(as NLSE2 = -LSE * log2(e), written by the preprocess: P = exp2(s + NLSE2)).

RoPE: Q and K are rotated on load exactly as in the forward; dQ and dK are accumulated in the
rotated frame and rotated back (transpose rotation, same cos/sin with -sin) before the store.
Bias PEs: the dQ program also accumulates sum(dS * d(bias)/d(param)) over its query block and
stores it into a partials buffer (query_blocks, B, Hq) that torch sums: deterministic. The dQ
kernel, not dK/dV, because dK/dV's register budget is the tighter one (its dK and dV
accumulators): there the gradient terms forced tiles half as tall (bench.sass_loop).
KERPLE with contiguous positions reads f and df/dr2 from per-distance tables BIAS_F, BIAS_G
(Hq, bias_len) when BIAS_TABLE (pe_helpers.bias_table_kernel).

dS below is the gradient of the natural-unit scaled logits s = scale * q.k + bias:
dS = P * (dP - Delta), dQ = scale * dS @ K, dK = scale * dS^T @ Q, dV = P^T @ dO.
With CENTER the bias rows are centred as in the forward (pe_helpers, "Centring"): the same
f - f_ref, and NLSE2 from the centred LSE the forward stored, so P sums to 1 over each row to
fp32 rounding however far the keys are; the parameter gradients use the centred f and df/dr2.
"""
import triton
import triton.language as tl

from .attn_fwd import key_tiles, load_qk, load_tile, qk_dot, tile_logits, tile_rope
from .pe_helpers import (LOG2E, PE_ALIBI, PE_KERPLE_LOG, PE_KERPLE_POWER, PE_NONE, PE_ROPE,
                         bias_grad_terms, bias_row_ref, qk_columns, rope_angle_cos_sin,
                         rope_rotate, tile_bias_centred, tile_bias_grad_inputs)


@triton.jit
def attn_bwd_preprocess_kernel(O, DO, LSE, DELTA, NLSE2,
                               stride_ob, stride_oh, stride_om, stride_od,
                               stride_dob, stride_doh, stride_dom, stride_dod,
                               Hq, Sq, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_DV: tl.constexpr):
    """DELTA (B, Hq, Sq) float32 = rowsum(O * dO), and NLSE2 = -LSE * log2(e) with a query
    that saw no key (LSE -inf) mapped to -inf, so that its P = exp2(s + NLSE2) is exactly 0.
    Negated so that the loops add it in the FFMA that applies the scale, with no negation of
    their own.

    NLSE2 once per query here rather than per query tile in the dK/dV loop, which visits every
    query tile once per key block: there the -inf test and its select cost ~4 instructions per
    column a thread holds, every iteration."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Sq
    cols = tl.arange(0, BLOCK_DV)
    c_mask = cols < DV
    o = load_tile(O + b * stride_ob + h * stride_oh, offs_m, m_mask, cols, c_mask,
                  stride_om, stride_od, True)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, m_mask, cols, c_mask,
                   stride_dom, stride_dod, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Sq + offs_m, delta, mask=m_mask)
    lse = tl.load(LSE + bh * Sq + offs_m, mask=m_mask, other=0.0)
    tl.store(NLSE2 + bh * Sq + offs_m, tl.where(lse == float("-inf"), float("-inf"), -lse * LOG2E),
             mask=m_mask)


@triton.jit
def load_pe_params(PE: tl.constexpr, PA, PB, h):
    """(a, b) natural-unit PE parameters of head h: slope / r1 and r2 (0 when unused)."""
    a = 0.0
    b = 0.0
    if PE == PE_ALIBI:
        a = tl.load(PA + h).to(tl.float32)
    elif PE == PE_KERPLE_LOG or PE == PE_KERPLE_POWER:
        a = tl.load(PA + h).to(tl.float32)
        b = tl.load(PB + h).to(tl.float32)
    return a, b


@triton.jit
def store_groups(ptr, rows, row_mask, stride_row, stride_col, xa, xb, xc, colA, colB, maskA,
                 colC, maskC, PE: tl.constexpr, HAS_PASS: tl.constexpr):
    """Store a gradient held as dot groups (see load_qk) back into its head-dim columns."""
    base = ptr + rows.to(tl.int64)[:, None] * stride_row
    tl.store(base + colA[None, :] * stride_col, xa.to(ptr.dtype.element_ty),
             mask=row_mask[:, None] & maskA[None, :])
    if PE == PE_ROPE:
        tl.store(base + colB[None, :] * stride_col, xb.to(ptr.dtype.element_ty),
                 mask=row_mask[:, None] & maskA[None, :])
        if HAS_PASS:
            tl.store(base + colC[None, :] * stride_col, xc.to(ptr.dtype.element_ty),
                     mask=row_mask[:, None] & maskC[None, :])


@triton.jit
def grad_dot(ds16, xa, xb, xc, acc_a, acc_b, acc_c, PE: tl.constexpr, HAS_PASS: tl.constexpr,
             PREC: tl.constexpr):
    """acc += dS @ X per dot group (X = Q for dK, K for dQ; see load_qk's groups)."""
    acc_a = tl.dot(ds16, xa, acc_a, input_precision=PREC)
    if PE == PE_ROPE:
        acc_b = tl.dot(ds16, xb, acc_b, input_precision=PREC)
        if HAS_PASS:
            acc_c = tl.dot(ds16, xc, acc_c, input_precision=PREC)
    return acc_a, acc_b, acc_c


@triton.jit
def store_grad_groups(ptr, rows, row_mask, pos, stride_row, stride_col, xa, xb, xc, scale, THETA,
                      rope_factor, colA, colB, maskA, colC, maskC, PE: tl.constexpr,
                      HAS_PASS: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr):
    """dQ or dK, accumulated as dot groups in the rotated frame: times the logit scale, rotated
    back for RoPE (the transpose rotation of the rows at ``pos``), stored (store_groups).
    The cos/sin are recomputed here rather than kept live through the loop: registers are the
    scarce resource there."""
    xa *= scale
    xb *= scale
    xc *= scale
    if PE == PE_ROPE:
        c, s = rope_angle_cos_sin(pos, THETA, rope_factor, ROT_HALF, BLOCK_A)
        xa, xb = rope_rotate(xa, xb, c, -s)
    store_groups(ptr, rows, row_mask, stride_row, stride_col, xa, xb, xc, colA, colB, maskA,
                 colC, maskC, PE, HAS_PASS)


@triton.jit
def _dkdv_tiles(dka, dkb, dkc, dv, ka, kb, kc, v, kpos, n_mask,
                Q, DO, NLSE2, DELTA, QPOS, THETA, ROPE_TILES, PA, PB, BIAS_F, DREF, bias_len,
                c_tab, s_tab,
                stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_qpm,
                Sq, q_start, rope_factor, scale_log2, lse_row0, h0,
                n_iters, tiles_per_head, t_lo, t_split, t_jump,
                colA, colB, maskA, colC, maskC, colV, maskV,
                PE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                EXPLICIT_POS: tl.constexpr, HAS_PASS: tl.constexpr,
                ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
                PREC: tl.constexpr, BIAS_TABLE: tl.constexpr, DO_DK: tl.constexpr,
                DO_DV: tl.constexpr, CENTER: tl.constexpr):
    """Accumulate dK, dV of one key block.

    One flat loop over (query head of the GQA group, query tile): iteration i is head
    h0 + i // tiles_per_head and tile j = i % tiles_per_head, mapped to t_lo + j, jumping to
    t_jump + (j - t_split) once j >= t_split (so one loop covers two disjoint tile ranges).
    A flat loop instead of a loop over heads around a loop over tiles keeps the software
    pipeline to one level and the register budget to one set of accumulators.
    """
    # (head, tile) as loop-carried counters rather than i // tiles_per_head and
    # i % tiles_per_head: an integer division by a runtime value is ~20 instructions a tile.
    h = h0
    j = 0
    for _ in range(0, n_iters):
        t = tl.where(j < t_split, t_lo + j, t_jump + j - t_split)
        Qh = Q + h * stride_qh
        DOh = DO + h * stride_doh
        row0 = lse_row0 + h * Sq
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Sq
        q0 = q_start + t * BLOCK_M  # position of the tile's first query (contiguous positions)
        if EXPLICIT_POS:
            qpos = tl.load(QPOS + offs_m.to(tl.int64) * stride_qpm, mask=m_mask, other=0).to(tl.int64)
        else:
            qpos = q0 + tl.arange(0, BLOCK_M)
        cos, sin, c0, s0 = tile_rope(qpos, t * BLOCK_M, c_tab, s_tab, THETA, ROPE_TILES, rope_factor,
                                     PE, EXPLICIT_POS, ROT_HALF, BLOCK_A)
        qa, qb, qc = load_qk(Qh, offs_m, m_mask, stride_qm, stride_qd, cos, sin, c0, s0, colA, colB,
                             maskA, colC, maskC, PE, HAS_PASS, MASKED, not EXPLICIT_POS)
        do = load_tile(DOh, offs_m, m_mask, colV, maskV, stride_dom, stride_dod, MASKED)
        if MASKED:  # rows past Sq: P = exp2(s - inf) = 0
            nlse2 = tl.load(NLSE2 + row0 + offs_m, mask=m_mask, other=float("-inf"))
        else:  # every row of an unmasked tile is < Sq: no predicates to carry through the loop
            nlse2 = tl.load(NLSE2 + row0 + offs_m)
        pa, pb = load_pe_params(PE, PA, PB, h)

        # the exp2 argument of P^T, (BLOCK_N, BLOCK_M): scale and NLSE2 in one FFMA, a bias in
        # one more (tl.fma: the compiler does not contract them on its own)
        sT = tl.fma(qk_dot(ka, kb, kc, qa, qb, qc, PE, HAS_PASS, PREC), scale_log2, nlse2[None, :])
        if PE != PE_NONE and PE != PE_ROPE:
            dref, fref = bias_row_ref(PE, CENTER, DREF, offs_m, m_mask, pb)  # tile's queries
            fT = tile_bias_centred(PE, BIAS_TABLE, CENTER, 1, BIAS_F + h * bias_len, kpos, qpos,
                                   q0, EXPLICIT_POS, pb, dref, fref)
            sT = tl.fma(fT, -(pa * LOG2E), sT)
        if MASKED:
            visible = n_mask[:, None] & m_mask[None, :]
            if CAUSAL:
                visible = visible & (kpos[:, None] <= qpos[None, :])
            sT = tl.where(visible, sT, float("-inf"))
        pT = tl.math.exp2(sT)

        if DO_DV:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        if DO_DK:
            if MASKED:
                delta = tl.load(DELTA + row0 + offs_m, mask=m_mask, other=0.0)
            else:
                delta = tl.load(DELTA + row0 + offs_m)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dka, dkb, dkc = grad_dot(dsT.to(qa.dtype), qa, qb, qc, dka, dkb, dkc, PE, HAS_PASS,
                                     PREC)
        head_done = j == tiles_per_head - 1
        h = tl.where(head_done, h + 1, h)
        j = tl.where(head_done, 0, j + 1)
    return dka, dkb, dkc, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, NLSE2, DELTA, DK_OUT, DV_OUT, QPOS, KPOS, THETA, ROPE_TILES, PA, PB, BIAS_F,
    DREF,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_qpb, stride_qpm, stride_kpb, stride_kpn,
    Hq, Hkv, GROUP, Sq, Sk, q_start, k_start, scale, rope_factor, bias_len,
    PE: tl.constexpr, CAUSAL: tl.constexpr, EXPLICIT_POS: tl.constexpr, BIAS_TABLE: tl.constexpr,
    CENTER: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr, ROT_DIM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr,
):
    """dK and dV of one key block (DO_DK / DO_DV: both, or one of them -- see
    configs.TileConfig.split: a program that computes only one holds half the accumulators)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hkv
    hk = bhk % Hkv
    h0 = hk * GROUP  # first query head of this KV head's group
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    DK_OUT += b * stride_dkb + hk * stride_dkh
    DV_OUT += b * stride_dvb + hk * stride_dvh
    QPOS += b * stride_qpb
    KPOS += b * stride_kpb
    if CENTER:  # DREF (B, Sq), or None without CENTER
        DREF += b * Sq
    scale_log2 = scale * LOG2E

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Sk
    colA, colB = qk_columns(PE, INTERLEAVED, ROT_HALF, BLOCK_A)
    maskA = tl.arange(0, BLOCK_A) < (ROT_HALF if PE == PE_ROPE else D)
    colC = ROT_DIM + tl.arange(0, BLOCK_C)
    maskC = colC < D
    colV = tl.arange(0, BLOCK_DV)
    maskV = colV < DV

    if EXPLICIT_POS:
        kpos = tl.load(KPOS + offs_n.to(tl.int64) * stride_kpn, mask=n_mask, other=0).to(tl.int64)
    else:
        kpos = k_start + offs_n
    c_k = 0.0
    s_k = 0.0
    c_tab = 0.0
    s_tab = 0.0
    if PE == PE_ROPE:
        c_k, s_k = rope_angle_cos_sin(kpos, THETA, rope_factor, ROT_HALF, BLOCK_A)
        if not EXPLICIT_POS:
            c_tab, s_tab = rope_angle_cos_sin(tl.arange(0, BLOCK_M), THETA, 1.0, ROT_HALF, BLOCK_A)
    ka, kb, kc = load_qk(K, offs_n, n_mask, stride_kn, stride_kd, c_k, s_k, 0.0, 0.0, colA, colB,
                         maskA, colC, maskC, PE, HAS_PASS, True, False)
    v = load_tile(V, offs_n, n_mask, colV, maskV, stride_vn, stride_vd, True)

    # Query tiles: [lo, u0) straddle the diagonal (masked), [u0, u1) need no mask,
    # [u1, m_tiles) is the partial last tile (masked).
    m_tiles = tl.cdiv(Sq, BLOCK_M)
    lo = 0
    u0 = 0
    if CAUSAL:
        if EXPLICIT_POS:
            u0 = m_tiles
        else:
            off = q_start - k_start  # query i sees key j iff i >= j - off
            n0 = pid_n * BLOCK_N
            lo = tl.maximum(n0 - off, 0) // BLOCK_M
            u0 = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M)
    if (pid_n + 1) * BLOCK_N > Sk:  # partial key block: every tile needs the key mask
        u0 = m_tiles
    lo = tl.minimum(lo, m_tiles)
    u0 = tl.minimum(tl.maximum(u0, lo), m_tiles)
    u1 = tl.maximum(u0, Sq // BLOCK_M)
    n_masked = (u0 - lo) + (m_tiles - u1)

    dka = tl.zeros([BLOCK_N, BLOCK_A], tl.float32)
    dkb = tl.zeros([BLOCK_N, BLOCK_A], tl.float32)
    dkc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lse_row0 = b * Hq * Sq
    Qb = Q + b * stride_qb
    DOb = DO + b * stride_dob
    dka, dkb, dkc, dv = _dkdv_tiles(
        dka, dkb, dkc, dv, ka, kb, kc, v, kpos, n_mask,
        Qb, DOb, NLSE2, DELTA, QPOS, THETA, ROPE_TILES, PA, PB, BIAS_F, DREF, bias_len,
        c_tab, s_tab,
        stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_qpm,
        Sq, q_start, rope_factor, scale_log2, lse_row0, h0,
        GROUP * n_masked, tl.maximum(n_masked, 1), lo, u0 - lo, u1,
        colA, colB, maskA, colC, maskC, colV, maskV,
        PE, True, CAUSAL, EXPLICIT_POS, HAS_PASS, ROT_HALF, BLOCK_A, BLOCK_M, PREC, BIAS_TABLE,
        DO_DK, DO_DV, CENTER)
    dka, dkb, dkc, dv = _dkdv_tiles(
        dka, dkb, dkc, dv, ka, kb, kc, v, kpos, n_mask,
        Qb, DOb, NLSE2, DELTA, QPOS, THETA, ROPE_TILES, PA, PB, BIAS_F, DREF, bias_len,
        c_tab, s_tab,
        stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_qpm,
        Sq, q_start, rope_factor, scale_log2, lse_row0, h0,
        GROUP * (u1 - u0), tl.maximum(u1 - u0, 1), u0, u1 - u0, u1,
        colA, colB, maskA, colC, maskC, colV, maskV,
        PE, False, CAUSAL, EXPLICIT_POS, HAS_PASS, ROT_HALF, BLOCK_A, BLOCK_M, PREC, BIAS_TABLE,
        DO_DK, DO_DV, CENTER)

    if DO_DK:
        store_grad_groups(DK_OUT, offs_n, n_mask, kpos, stride_dkn, stride_dkd, dka, dkb, dkc,
                          scale, THETA, rope_factor, colA, colB, maskA, colC, maskC, PE, HAS_PASS,
                          ROT_HALF, BLOCK_A)
    if DO_DV:
        tl.store(DV_OUT + offs_n.to(tl.int64)[:, None] * stride_dvn + colV[None, :] * stride_dvd,
                 dv.to(DV_OUT.dtype.element_ty), mask=n_mask[:, None] & maskV[None, :])


@triton.jit
def _dq_tiles(dqa, dqb, dqc, g1, g2, qa, qb, qc, do, nlse2, delta, qpos, m_mask,
              K, V, KPOS, THETA, ROPE_TILES, BIAS_F, BIAS_G, c_tab, s_tab,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
              Sk, k_start, rope_factor, scale_log2, pa, pb, dref, fref, tile_lo, tile_hi,
              colA, colB, maskA, colC, maskC, colV, maskV,
              PE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              EXPLICIT_POS: tl.constexpr, HAS_PASS: tl.constexpr, ROT_HALF: tl.constexpr,
              BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
              BIAS_TABLE: tl.constexpr, NEED_PE_GRAD: tl.constexpr, CENTER: tl.constexpr):
    """Accumulate dQ of one query block over key tiles [tile_lo, tile_hi), and with
    NEED_PE_GRAD the per-query sums g1, g2 (BLOCK_M,) of dS * d(bias)/d(param)."""
    for t in range(tile_lo, tile_hi):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Sk
        if EXPLICIT_POS:
            kpos = tl.load(KPOS + offs_n.to(tl.int64) * stride_kpn, mask=n_mask, other=0).to(tl.int64)
        else:
            kpos = k_start + offs_n
        cos, sin, c0, s0 = tile_rope(kpos, t * BLOCK_N, c_tab, s_tab, THETA, ROPE_TILES, rope_factor,
                                     PE, EXPLICIT_POS, ROT_HALF, BLOCK_A)
        ka, kb, kc = load_qk(K, offs_n, n_mask, stride_kn, stride_kd, cos, sin, c0, s0, colA, colB,
                             maskA, colC, maskC, PE, HAS_PASS, MASKED, not EXPLICIT_POS)
        v = load_tile(V, offs_n, n_mask, colV, maskV, stride_vn, stride_vd, MASKED)

        qk = qk_dot(qa, qb, qc, ka, kb, kc, PE, HAS_PASS, PREC)
        s = tile_logits(qk, scale_log2, pa * LOG2E, pb, qpos, kpos, k_start + t * BLOCK_N,
                        BIAS_F, nlse2[:, None], dref, fref, PE, CAUSAL, EXPLICIT_POS, BIAS_TABLE,
                        K.dtype.element_ty == tl.float32, CENTER)  # plus NLSE2: exp2(s) = P
        if MASKED:
            visible = n_mask[None, :] & m_mask[:, None]
            if CAUSAL:
                visible = visible & (kpos[None, :] <= qpos[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if NEED_PE_GRAD:
            # f re-read / recomputed rather than kept live across the dots (registers)
            f, r2_term = tile_bias_grad_inputs(PE, BIAS_TABLE, CENTER, BIAS_F, BIAS_G, qpos,
                                               kpos, k_start + t * BLOCK_N, EXPLICIT_POS, pb,
                                               dref, fref)
            t1, t2 = bias_grad_terms(PE, ds, f, r2_term, pa)
            g1 += t1
            g2 += t2
        dqa, dqb, dqc = grad_dot(ds.to(qa.dtype), ka, kb, kc, dqa, dqb, dqc, PE, HAS_PASS, PREC)
    return dqa, dqb, dqc, g1, g2


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, NLSE2, DELTA, DQ, QPOS, KPOS, THETA, ROPE_TILES, PA, PB, BIAS_F, BIAS_G, DREF,
    GPA, GPB,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_qpb, stride_qpm, stride_kpb, stride_kpn,
    Hq, GROUP, Sq, Sk, q_start, k_start, scale, rope_factor, bias_len,
    PE: tl.constexpr, CAUSAL: tl.constexpr, EXPLICIT_POS: tl.constexpr, BIAS_TABLE: tl.constexpr,
    CENTER: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr, ROT_DIM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PASS: tl.constexpr, NEED_PE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """dQ of one query block; with NEED_PE_GRAD also this block's share of the PE-parameter
    gradients, stored at GPA/GPB[pid_m, b, h] (every program writes its slot)."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    BIAS_F += h * bias_len
    BIAS_G += h * bias_len
    QPOS += b * stride_qpb
    KPOS += b * stride_kpb
    scale_log2 = scale * LOG2E

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
    pa, pb = load_pe_params(PE, PA, PB, h)
    dref, fref = bias_row_ref(PE, CENTER, DREF, b * Sq + offs_m, m_mask, pb)
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
    do = load_tile(DO, offs_m, m_mask, colV, maskV, stride_dom, stride_dod, True)
    nlse2 = tl.load(NLSE2 + bh * Sq + offs_m, mask=m_mask, other=float("-inf"))
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=m_mask, other=0.0)

    # Key tiles, as in the forward: [0, n_full) unmasked, [n_full, n_tiles) masked.
    n_full, n_tiles = key_tiles(pid_m, Sk, q_start, k_start, CAUSAL, EXPLICIT_POS, BLOCK_M, BLOCK_N)

    dqa = tl.zeros([BLOCK_M, BLOCK_A], tl.float32)
    dqb = tl.zeros([BLOCK_M, BLOCK_A], tl.float32)
    dqc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    g1 = tl.zeros([BLOCK_M], tl.float32)
    g2 = tl.zeros([BLOCK_M], tl.float32)
    dqa, dqb, dqc, g1, g2 = _dq_tiles(dqa, dqb, dqc, g1, g2, qa, qb, qc, do, nlse2, delta, qpos,
                              m_mask, K, V, KPOS, THETA, ROPE_TILES, BIAS_F, BIAS_G, c_tab, s_tab,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
                              Sk, k_start, rope_factor, scale_log2, pa, pb, dref, fref,
                              0, n_full,
                              colA, colB, maskA, colC, maskC, colV, maskV,
                              PE, False, CAUSAL, EXPLICIT_POS, HAS_PASS, ROT_HALF, BLOCK_A,
                              BLOCK_N, PREC, BIAS_TABLE, NEED_PE_GRAD, CENTER)
    dqa, dqb, dqc, g1, g2 = _dq_tiles(dqa, dqb, dqc, g1, g2, qa, qb, qc, do, nlse2, delta, qpos,
                              m_mask, K, V, KPOS, THETA, ROPE_TILES, BIAS_F, BIAS_G, c_tab, s_tab,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
                              Sk, k_start, rope_factor, scale_log2, pa, pb, dref, fref,
                              n_full, n_tiles,
                              colA, colB, maskA, colC, maskC, colV, maskV,
                              PE, True, CAUSAL, EXPLICIT_POS, HAS_PASS, ROT_HALF, BLOCK_A,
                              BLOCK_N, PREC, BIAS_TABLE, NEED_PE_GRAD, CENTER)
    store_grad_groups(DQ, offs_m, m_mask, qpos, stride_dqm, stride_dqd, dqa, dqb, dqc, scale,
                      THETA, rope_factor, colA, colB, maskA, colC, maskC, PE, HAS_PASS, ROT_HALF,
                      BLOCK_A)
    if NEED_PE_GRAD:  # partials (query blocks, B, Hq); torch sums them
        slot = pid_m * tl.num_programs(1) + bh
        tl.store(GPA + slot, tl.sum(g1, 0))
        tl.store(GPB + slot, tl.sum(g2, 0))
