"""Backward kernels: preprocess (Delta = rowsum(O * dO)), dK/dV, dQ. No atomics anywhere.

FlashAttention-2's split: the dK/dV program owns one key block and walks the query tiles of
every query head in its GQA group (so dK/dV are summed over the group in registers); the dQ
program owns one query block and walks the key tiles. Both recompute P from the saved LSE
(as NLSE2 = -LSE * log2(e), written by the preprocess: P = exp2(s + NLSE2)).

RoPE: Q and K are rotated on load exactly as in the forward; dQ and dK are accumulated in the
rotated frame and rotated back (transpose rotation, same cos/sin with -sin) before the store.
Bias PEs: the dQ program also accumulates sum(dS * d(bias)/d(param)) over its query block and
stores it into a partials buffer (query_blocks, B, Hq, NP) that torch sums: deterministic
(bias.store_param_grads; the gradient of the one parameter channel PARAMS (Hq, NP)). The dQ
kernel, not dK/dV, because dK/dV's register budget is the tighter one (its dK and dV
accumulators): there the gradient terms forced tiles half as tall (bench.sass_loop).
KERPLE with contiguous positions reads f and df/dr2 from per-distance tables BIAS_F, BIAS_G
(Hq, bias_len) when BIAS_TABLE (bias.bias_table_kernel); a table bias (T5) reads its f and
buckets from them, and dQ sums its gradient per bucket (bias.py, "Table biases").

dS below is the gradient of the natural-unit logits s = scale * q.k + bias:
dS = P * (dP - Delta), dQ = scale * dS @ K, dK = scale * dS^T @ Q, dV = P^T @ dO. With a
softcap (s = c tanh(scale q.k / c) + bias) the q.k side takes dS (1 - tanh^2), the bias
parameters dS itself. Geometry (packed sequences, windows) as in the forward: the same
prologue (geometry.seq_geometry) and tile ranges (geometry.tile_range; dK/dV walks the
query tiles of its key block's band).
With CENTER the bias rows are centred as in the forward (bias.py, "Centring"): the same
f - f_ref, and NLSE2 from the centred LSE the forward stored, so P sums to 1 over each row to
fp32 rounding however far the keys are; the parameter gradients use the centred f and df/dr2.
"""
import triton
import triton.language as tl

from .attn_fwd import tile_logits
from .bias import (BIAS_NONE, bias_params, bias_row_ref, param_grad_init, param_grad_update,
                   store_param_grads, table_row,
                   tile_bias_centred, tile_bias_grad_inputs)
from .fmath import LOG2E, softcap_logits
from .geometry import (key_band, load_positions, query_key_tiles, seq_geometry, tile_range,
                       tile_run, visible)
from .loader import load_qk, load_tile, pair_mask, qk_dot
from .rotary import (ROT_ROPE, block_ref, offset_table, qk_columns, rope_cos_sin, rope_rotate,
                     rope_start_cos_sin, tile_rope)


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
def store_groups(ptr, rows, row_mask, stride_row, stride_col, xa, xb, xc, colA, colB, maskA,
                 colC, maskC, ROT: tl.constexpr, HAS_PASS: tl.constexpr,
                 INTERLEAVED: tl.constexpr = False):
    """Store a gradient held as dot groups (see load_qk) back into its head-dim columns
    (interleaved pairs joined in registers and stored contiguously: loader.load_pairs)."""
    base = ptr + rows.to(tl.int64)[:, None] * stride_row
    if ROT == ROT_ROPE and INTERLEAVED:
        cols = tl.arange(0, 2 * colA.shape[0])
        x = tl.reshape(tl.join(xa, xb), [xa.shape[0], 2 * colA.shape[0]])
        tl.store(base + cols[None, :] * stride_col, x.to(ptr.dtype.element_ty),
                 mask=row_mask[:, None] & pair_mask(maskA)[None, :])
    else:
        tl.store(base + colA[None, :] * stride_col, xa.to(ptr.dtype.element_ty),
                 mask=row_mask[:, None] & maskA[None, :])
    if ROT == ROT_ROPE:
        if not INTERLEAVED:
            tl.store(base + colB[None, :] * stride_col, xb.to(ptr.dtype.element_ty),
                     mask=row_mask[:, None] & maskA[None, :])
        if HAS_PASS:
            tl.store(base + colC[None, :] * stride_col, xc.to(ptr.dtype.element_ty),
                     mask=row_mask[:, None] & maskC[None, :])


@triton.jit
def grad_dot(ds16, xa, xb, xc, acc_a, acc_b, acc_c, ROT: tl.constexpr, HAS_PASS: tl.constexpr,
             PREC: tl.constexpr):
    """acc += dS @ X per dot group (X = Q for dK, K for dQ; see load_qk's groups)."""
    acc_a = tl.dot(ds16, xa, acc_a, input_precision=PREC)
    if ROT == ROT_ROPE:
        acc_b = tl.dot(ds16, xb, acc_b, input_precision=PREC)
        if HAS_PASS:
            acc_c = tl.dot(ds16, xc, acc_c, input_precision=PREC)
    return acc_a, acc_b, acc_c


@triton.jit
def store_grad_groups(ptr, rows, row_mask, pos, stride_row, stride_col, xa, xb, xc, scale, THETA,
                      rope_factor, colA, colB, maskA, colC, maskC, ROT: tl.constexpr,
                      HAS_PASS: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr,
                      xref=0, XPOS: tl.constexpr = False, QUERY: tl.constexpr = False,
                      span=0, INTERLEAVED: tl.constexpr = False):
    """dQ or dK, accumulated as dot groups in the rotated frame: times the logit scale, rotated
    back for RoPE (the transpose rotation of the rows at ``pos``), stored (store_groups).
    The cos/sin are recomputed here rather than kept live through the loop: registers are the
    scarce resource there. xPos: the rows' decay from ``xref`` (QUERY: they are queries;
    ``span``: the key block's) is part of the rotation, so of its transpose."""
    xa *= scale
    xb *= scale
    xc *= scale
    if ROT == ROT_ROPE:
        c, s = rope_cos_sin(pos, xref, THETA, rope_factor, XPOS, QUERY, ROT_HALF, BLOCK_A, span)
        xa, xb = rope_rotate(xa, xb, c, -s)
    store_groups(ptr, rows, row_mask, stride_row, stride_col, xa, xb, xc, colA, colB, maskA,
                 colC, maskC, ROT, HAS_PASS, INTERLEAVED)


@triton.jit
def _dkdv_tiles(dka, dkb, dkc, dv, ka, kb, kc, v, kpos, n_mask,
                Q, DO, NLSE2, DELTA, QPOS, THETA, ROPE_TILES, PARAMS, BIAS_F, DREF, bias_len,
                c_tab, s_tab, c_seq, s_seq,
                stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_qpm,
                Sq, q_start, rope_factor, scale_log2, cap_in, cap_log2,
                win_left, win_right, lse_row0, lse_len, h0,
                n_iters, tiles_per_head, t_lo, t_split, t_jump, cols, xref,
                ROT: tl.constexpr, BIAS: tl.constexpr, NP: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, WIN_L: tl.constexpr, WIN_R: tl.constexpr,
                SOFTCAP: tl.constexpr, EXPLICIT_POS: tl.constexpr, SEQ_SHIFT: tl.constexpr,
                HAS_PASS: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr,
                BLOCK_M: tl.constexpr, PREC: tl.constexpr, BIAS_TABLE: tl.constexpr,
                DO_DK: tl.constexpr, DO_DV: tl.constexpr, CENTER: tl.constexpr,
                XPOS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Accumulate dK, dV of one key block.

    One flat loop over (query head of the GQA group, query tile): iteration i is head
    h0 + i // tiles_per_head and tile j = i % tiles_per_head, mapped to t_lo + j, jumping to
    t_jump + (j - t_split) once j >= t_split (so one loop covers two disjoint tile ranges).
    A flat loop instead of a loop over heads around a loop over tiles keeps the software
    pipeline to one level and the register budget to one set of accumulators.
    Q, DO, QPOS, DREF point at the sequence's first query row; its LSE rows of head h start
    at lse_row0 + h * lse_len.
    """
    colA, colB, maskA, colC, maskC, colV, maskV = cols  # head-dim columns
    # (head, tile) as loop-carried counters rather than i // tiles_per_head and
    # i % tiles_per_head: an integer division by a runtime value is ~20 instructions a tile.
    h = h0
    j = 0
    for _ in range(0, n_iters):
        t = tl.where(j < t_split, t_lo + j, t_jump + j - t_split)
        Qh = Q + h * stride_qh
        DOh = DO + h * stride_doh
        row0 = lse_row0 + h * lse_len
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Sq
        q0 = q_start + t * BLOCK_M  # position of the tile's first query (contiguous positions)
        if EXPLICIT_POS:
            qpos = load_positions(QPOS, 0, offs_m, m_mask, stride_qpm)
        else:
            qpos = q0 + tl.arange(0, BLOCK_M)
        cos, sin, c0, s0 = tile_rope(qpos, t * BLOCK_M, c_tab, s_tab, THETA, ROPE_TILES,
                                     rope_factor, c_seq, s_seq, ROT, EXPLICIT_POS, SEQ_SHIFT,
                                     ROT_HALF, BLOCK_A, xref, q0, XPOS, True)
        qa, qb, qc = load_qk(Qh, offs_m, m_mask, stride_qm, stride_qd, cos, sin, c0, s0, colA, colB,
                             maskA, colC, maskC, ROT, HAS_PASS, MASKED, not EXPLICIT_POS, INTERLEAVED=INTERLEAVED)
        do = load_tile(DOh, offs_m, m_mask, colV, maskV, stride_dom, stride_dod, MASKED)
        if MASKED:  # rows past Sq: P = exp2(s - inf) = 0
            nlse2 = tl.load(NLSE2 + row0 + offs_m, mask=m_mask, other=float("-inf"))
        else:  # every row of an unmasked tile is < Sq: no predicates to carry through the loop
            nlse2 = tl.load(NLSE2 + row0 + offs_m)
        pa_h, pb_h = bias_params(BIAS, PARAMS, h, NP, bias_len)  # GQA: the loop walks the group's heads

        # the exp2 argument of P^T, (BLOCK_N, BLOCK_M): scale and NLSE2 in one FFMA, a bias in
        # one more (tl.fma: the compiler does not contract them on its own)
        xT, mult = softcap_logits(qk_dot(ka, kb, kc, qa, qb, qc, ROT, HAS_PASS, PREC), scale_log2,
                                  cap_in, cap_log2, SOFTCAP)
        sT = tl.fma(xT, mult, nlse2[None, :])
        if BIAS != BIAS_NONE:
            FT = BIAS_F + table_row(BIAS, h, bias_len)
            dref, fref = bias_row_ref(BIAS, CENTER, DREF, offs_m, m_mask, pb_h, qpos, FT)  # tile's queries
            fT = tile_bias_centred(BIAS, BIAS_TABLE, CENTER, 1, FT, kpos, qpos,
                                   q0, EXPLICIT_POS, pb_h, dref, fref)
            sT = tl.fma(fT, -(pa_h * LOG2E), sT)
        if MASKED:
            vis = visible(n_mask[:, None] & m_mask[None, :], qpos[None, :], kpos[:, None],
                          win_left, win_right, CAUSAL, WIN_L, WIN_R)
            sT = tl.where(vis, sT, float("-inf"))
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
            if SOFTCAP:  # d(c tanh(x)) = c (1 - tanh^2) dx: back to the scaled q.k
                dsT = dsT * (1.0 - xT * xT)
            dka, dkb, dkc = grad_dot(dsT.to(qa.dtype), qa, qb, qc, dka, dkb, dkc, ROT, HAS_PASS,
                                     PREC)
        head_done = j == tiles_per_head - 1
        h = tl.where(head_done, h + 1, h)
        j = tl.where(head_done, 0, j + 1)
    return dka, dkb, dkc, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, NLSE2, DELTA, DK_OUT, DV_OUT, QPOS, KPOS, CU_Q, CU_K, THETA, ROPE_TILES, PARAMS,
    BIAS_F, DREF,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_qpb, stride_qpm, stride_kpb, stride_kpn,
    Hq, Hkv, GROUP, Sq, Sk, lse_len, q_start, k_start, scale, rope_factor, bias_len,
    win_left, win_right, cap_in, cap_log2,
    ROT: tl.constexpr, BIAS: tl.constexpr, NP: tl.constexpr, CAUSAL: tl.constexpr,
    WIN_L: tl.constexpr, WIN_R: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    EXPLICIT_POS: tl.constexpr, BIAS_TABLE: tl.constexpr, CENTER: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr, ROT_DIM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr, XPOS: tl.constexpr = False,
):
    """dK and dV of one key block (DO_DK / DO_DV: both, or one of them -- see
    configs.TileConfig.split: a program that computes only one holds half the accumulators)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hkv
    hk = bhk % Hkv
    h0 = hk * GROUP  # first query head of this KV head's group
    q_row0, Sq, k_row0, Sk, q_start, k_start, lse_rows = seq_geometry(
        CU_Q, CU_K, b, Sq, Sk, q_start, k_start, lse_len, VARLEN)
    if VARLEN:
        if pid_n * BLOCK_N >= Sk:  # the grid covers the longest sequence
            return
    bt = 0 if VARLEN else b  # batch index into the tensors (varlen: one packed batch)
    K += bt * stride_kb + hk * stride_kh + k_row0 * stride_kn
    V += bt * stride_vb + hk * stride_vh + k_row0 * stride_vn
    DK_OUT += bt * stride_dkb + hk * stride_dkh + k_row0 * stride_dkn
    DV_OUT += bt * stride_dvb + hk * stride_dvh + k_row0 * stride_dvn
    QPOS += bt * stride_qpb + q_row0 * stride_qpm
    KPOS += bt * stride_kpb + k_row0 * stride_kpn
    if CENTER:  # DREF (B, Sq) or varlen (1, total_q); None without CENTER
        DREF += bt * lse_rows + q_row0
    scale_log2 = scale * LOG2E

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Sk
    colA, colB = qk_columns(ROT, INTERLEAVED, ROT_HALF, BLOCK_A)
    maskA = tl.arange(0, BLOCK_A) < (ROT_HALF if ROT == ROT_ROPE else D)
    colC = ROT_DIM + tl.arange(0, BLOCK_C)
    maskC = colC < D
    colV = tl.arange(0, BLOCK_DV)
    maskV = colV < DV
    cols = (colA, colB, maskA, colC, maskC, colV, maskV)  # loop-invariant: one argument

    if EXPLICIT_POS:
        kpos = load_positions(KPOS, 0, offs_n, n_mask, stride_kpn)
    else:
        kpos = k_start + offs_n
    c_k = 0.0
    s_k = 0.0
    c_tab = 0.0
    s_tab = 0.0
    c_seq = 0.0
    s_seq = 0.0
    xref = 0
    kspan = 0
    if ROT == ROT_ROPE:  # xPos: every decay relative to the block's first key (rotary.py)
        if XPOS:
            xref, kspan = block_ref(kpos, n_mask, k_start + pid_n * BLOCK_N, EXPLICIT_POS, BLOCK_N)
        c_k, s_k = rope_cos_sin(kpos, xref, THETA, rope_factor, XPOS, False, ROT_HALF, BLOCK_A,
                                kspan)
        if not EXPLICIT_POS:
            c_tab, s_tab = offset_table(THETA, XPOS, True, ROT_HALF, BLOCK_A, BLOCK_M)
            if VARLEN:  # the Q tile-start table starts at 0; this sequence's queries at q_start
                c_seq, s_seq = rope_start_cos_sin(q_start, THETA, ROT_HALF, BLOCK_A)
    ka, kb, kc = load_qk(K, offs_n, n_mask, stride_kn, stride_kd, c_k, s_k, 0.0, 0.0, colA, colB,
                         maskA, colC, maskC, ROT, HAS_PASS, True, False, INTERLEAVED=INTERLEAVED)
    v = load_tile(V, offs_n, n_mask, colV, maskV, stride_vn, stride_vd, True)

    # Query tiles (geometry.tile_range, rows = this key block): masked [t_lo, f_lo), unmasked
    # [f_lo, f_hi), masked [f_hi, t_hi). Key j sees query i iff j - hi <= i <= j - lo, with
    # (lo, hi) the forward's band (geometry.key_band).
    m_tiles = tl.cdiv(Sq, BLOCK_M)
    if EXPLICIT_POS and (CAUSAL or WIN_L or WIN_R):  # no order known: every tile masked
        t_lo = 0
        f_lo = m_tiles
        # an empty unmasked range the compiler cannot prove empty (f_hi - f_lo folded to 0
        # cost 8 B of spills on sm_80, KERPLE power D=128)
        f_hi = tl.maximum(f_lo, Sq // BLOCK_M)
        t_hi = m_tiles
    else:
        lo_off, hi_off = key_band(q_start - k_start, win_left, win_right, CAUSAL, WIN_L, WIN_R)
        t_lo, f_lo, f_hi, t_hi = tile_range(pid_n * BLOCK_N, BLOCK_N, Sq, -hi_off, -lo_off,
                                            CAUSAL or WIN_R, WIN_L, BLOCK_M)
    if (pid_n + 1) * BLOCK_N > Sk:  # partial key block: every tile needs the key mask
        f_hi = f_lo
    n_masked = (f_lo - t_lo) + (t_hi - f_hi)

    dka = tl.zeros([BLOCK_N, BLOCK_A], tl.float32)
    dkb = tl.zeros([BLOCK_N, BLOCK_A], tl.float32)
    dkc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lse_row0 = bt * Hq * lse_rows + q_row0
    Qb = Q + bt * stride_qb + q_row0 * stride_qm
    DOb = DO + bt * stride_dob + q_row0 * stride_dom
    # Two runs (unrolled): the masked tiles, [t_lo, f_lo) then [f_hi, t_hi) in one flat loop
    # (the jump at f_lo), and the unmasked [f_lo, f_hi).
    for run in tl.static_range(2):
        if run == 0:
            n_run = n_masked
            lo = t_lo
            split = f_lo - t_lo
        else:
            n_run = f_hi - f_lo
            lo = f_lo
            split = f_hi - f_lo
        dka, dkb, dkc, dv = _dkdv_tiles(
            dka, dkb, dkc, dv, ka, kb, kc, v, kpos, n_mask,
            Qb, DOb, NLSE2, DELTA, QPOS, THETA, ROPE_TILES, PARAMS, BIAS_F, DREF, bias_len,
            c_tab, s_tab, c_seq, s_seq,
            stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_qpm,
            Sq, q_start, rope_factor, scale_log2, cap_in, cap_log2, win_left, win_right,
            lse_row0, lse_rows, h0,
            GROUP * n_run, tl.maximum(n_run, 1), lo, split, f_hi, cols, xref,
            ROT=ROT, BIAS=BIAS, NP=NP, MASKED=run == 0, CAUSAL=CAUSAL, WIN_L=WIN_L,
            WIN_R=WIN_R, SOFTCAP=SOFTCAP, EXPLICIT_POS=EXPLICIT_POS, SEQ_SHIFT=VARLEN,
            HAS_PASS=HAS_PASS, ROT_HALF=ROT_HALF, BLOCK_A=BLOCK_A, BLOCK_M=BLOCK_M, PREC=PREC,
            BIAS_TABLE=BIAS_TABLE, DO_DK=DO_DK, DO_DV=DO_DV, CENTER=CENTER, XPOS=XPOS,
            INTERLEAVED=INTERLEAVED)

    if DO_DK:
        store_grad_groups(DK_OUT, offs_n, n_mask, kpos, stride_dkn, stride_dkd, dka, dkb, dkc,
                          scale, THETA, rope_factor, colA, colB, maskA, colC, maskC, ROT, HAS_PASS,
                          ROT_HALF, BLOCK_A, xref, XPOS, False, kspan, INTERLEAVED)
    if DO_DV:
        tl.store(DV_OUT + offs_n.to(tl.int64)[:, None] * stride_dvn + colV[None, :] * stride_dvd,
                 dv.to(DV_OUT.dtype.element_ty), mask=n_mask[:, None] & maskV[None, :])


@triton.jit
def _dq_tiles(dqa, dqb, dqc, g1, g2, qa, qb, qc, do, nlse2, delta, qpos, m_mask,
              K, V, KPOS, THETA, ROPE_TILES, BIAS_F, BIAS_G, c_tab, s_tab,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
              Sk, k_start, rope_factor, scale_log2, pa, pb, dref, fref, cap_in, cap_log2,
              win_left, win_right, tile_lo, tile_hi, cols, xref,
              ROT: tl.constexpr, BIAS: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, WIN_L: tl.constexpr, WIN_R: tl.constexpr,
              SOFTCAP: tl.constexpr, EXPLICIT_POS: tl.constexpr, HAS_PASS: tl.constexpr,
              ROT_HALF: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr,
              PREC: tl.constexpr, BIAS_TABLE: tl.constexpr, NEED_PE_GRAD: tl.constexpr,
              CENTER: tl.constexpr, NP: tl.constexpr, XPOS: tl.constexpr,
              INTERLEAVED: tl.constexpr):
    """Accumulate dQ of one query block over key tiles [tile_lo, tile_hi), and with
    NEED_PE_GRAD the accumulators g1, g2 of dS * d(bias)/d(param) (bias.param_grad_init)."""
    colA, colB, maskA, colC, maskC, colV, maskV = cols  # head-dim columns
    for t in range(tile_lo, tile_hi):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Sk
        if EXPLICIT_POS:
            kpos = load_positions(KPOS, 0, offs_n, n_mask, stride_kpn)
        else:
            kpos = k_start + offs_n
        cos, sin, c0, s0 = tile_rope(kpos, t * BLOCK_N, c_tab, s_tab, THETA, ROPE_TILES,
                                     rope_factor, 0.0, 0.0, ROT, EXPLICIT_POS, False, ROT_HALF,
                                     BLOCK_A, xref[0], k_start + t * BLOCK_N, XPOS, False,
                                     xref[1])
        ka, kb, kc = load_qk(K, offs_n, n_mask, stride_kn, stride_kd, cos, sin, c0, s0, colA, colB,
                             maskA, colC, maskC, ROT, HAS_PASS, MASKED, not EXPLICIT_POS, INTERLEAVED=INTERLEAVED)
        v = load_tile(V, offs_n, n_mask, colV, maskV, stride_vn, stride_vd, MASKED)

        qk = qk_dot(qa, qb, qc, ka, kb, kc, ROT, HAS_PASS, PREC)
        s, x = tile_logits(qk, scale_log2, pa * LOG2E, pb, qpos, kpos, k_start + t * BLOCK_N,
                           BIAS_F, nlse2[:, None], dref, fref, cap_in, cap_log2, BIAS, CAUSAL,
                           EXPLICIT_POS, BIAS_TABLE, K.dtype.element_ty == tl.float32, CENTER,
                           SOFTCAP)  # plus NLSE2: exp2(s) = P
        if MASKED:
            vis = visible(n_mask[None, :] & m_mask[:, None], qpos[:, None], kpos[None, :],
                          win_left, win_right, CAUSAL, WIN_L, WIN_R)
            s = tl.where(vis, s, float("-inf"))
        p = tl.math.exp2(s)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if NEED_PE_GRAD:
            # f re-read / recomputed rather than kept live across the dots (registers)
            f, r2_term = tile_bias_grad_inputs(BIAS, BIAS_TABLE, CENTER, BIAS_F, BIAS_G, qpos,
                                               kpos, k_start + t * BLOCK_N, EXPLICIT_POS, pb,
                                               dref, fref)
            g1, g2 = param_grad_update(BIAS, g1, g2, ds, f, r2_term, pa, NP, BIAS_F, fref)
        if SOFTCAP:  # d(c tanh(x)) = c (1 - tanh^2) dx: back to the scaled q.k
            ds = ds * (1.0 - x * x)
        dqa, dqb, dqc = grad_dot(ds.to(qa.dtype), ka, kb, kc, dqa, dqb, dqc, ROT, HAS_PASS, PREC)
    return dqa, dqb, dqc, g1, g2


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, NLSE2, DELTA, DQ, QPOS, KPOS, CU_Q, CU_K, THETA, ROPE_TILES, PARAMS, BIAS_F,
    BIAS_G, DREF, GPARAM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_qpb, stride_qpm, stride_kpb, stride_kpn,
    Hq, GROUP, Sq, Sk, lse_len, q_start, k_start, scale, rope_factor, bias_len,
    win_left, win_right, cap_in, cap_log2,
    ROT: tl.constexpr, BIAS: tl.constexpr, NP: tl.constexpr, CAUSAL: tl.constexpr,
    WIN_L: tl.constexpr, WIN_R: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    EXPLICIT_POS: tl.constexpr, BIAS_TABLE: tl.constexpr, CENTER: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROT_HALF: tl.constexpr, ROT_DIM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PASS: tl.constexpr, NEED_PE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    TABLE_REF: tl.constexpr = -1, XPOS: tl.constexpr = False,
):
    """dQ of one query block; with NEED_PE_GRAD also this block's share of the PE-parameter
    gradients, stored at GPARAM[pid_m, b, h, :] (every program of a dense batch writes its
    slot; varlen's surplus programs return early, so the launcher zero-fills the buffer)."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    q_row0, Sq, k_row0, Sk, q_start, k_start, lse_rows = seq_geometry(
        CU_Q, CU_K, b, Sq, Sk, q_start, k_start, lse_len, VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= Sq:  # the grid covers the longest sequence
            return
    bt = 0 if VARLEN else b  # batch index into the tensors (varlen: one packed batch)
    Q += bt * stride_qb + h * stride_qh + q_row0 * stride_qm
    K += bt * stride_kb + hk * stride_kh + k_row0 * stride_kn
    V += bt * stride_vb + hk * stride_vh + k_row0 * stride_vn
    DO += bt * stride_dob + h * stride_doh + q_row0 * stride_dom
    DQ += bt * stride_dqb + h * stride_dqh + q_row0 * stride_dqm
    BIAS_F += table_row(BIAS, h, bias_len)
    BIAS_G += table_row(BIAS, h, bias_len)
    QPOS += bt * stride_qpb + q_row0 * stride_qpm
    KPOS += bt * stride_kpb + k_row0 * stride_kpn
    lse_row = (h if VARLEN else bh) * lse_rows + q_row0  # (see attn_fwd_kernel)
    scale_log2 = scale * LOG2E

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Sq
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
    pa, pb = bias_params(BIAS, PARAMS, h, NP, bias_len)
    dref, fref = bias_row_ref(BIAS, CENTER, DREF, bt * lse_rows + q_row0 + offs_m, m_mask, pb,
                              qpos, BIAS_F)
    c_q = 0.0
    s_q = 0.0
    c_tab = 0.0
    s_tab = 0.0
    xref = 0
    xspan = 0
    if ROT == ROT_ROPE:  # xPos: every decay relative to the block's first query (rotary.py)
        if XPOS:
            xref, xspan = block_ref(qpos, m_mask, q_start + pid_m * BLOCK_M, EXPLICIT_POS,
                                    BLOCK_M)
        c_q, s_q = rope_cos_sin(qpos, xref, THETA, rope_factor, XPOS, True, ROT_HALF, BLOCK_A)
        if not EXPLICIT_POS:
            c_tab, s_tab = offset_table(THETA, XPOS, False, ROT_HALF, BLOCK_A, BLOCK_N)
    qa, qb, qc = load_qk(Q, offs_m, m_mask, stride_qm, stride_qd, c_q, s_q, 0.0, 0.0, colA, colB,
                         maskA, colC, maskC, ROT, HAS_PASS, True, False, INTERLEAVED=INTERLEAVED)
    do = load_tile(DO, offs_m, m_mask, colV, maskV, stride_dom, stride_dod, True)
    nlse2 = tl.load(NLSE2 + lse_row + offs_m, mask=m_mask, other=float("-inf"))
    delta = tl.load(DELTA + lse_row + offs_m, mask=m_mask, other=0.0)

    # Key tiles, as in the forward: masked [t_lo, f_lo), unmasked [f_lo, f_hi), masked
    # [f_hi, t_hi).
    t_lo, f_lo, f_hi, t_hi = query_key_tiles(pid_m * BLOCK_M, Sk, q_start, k_start, win_left,
                                             win_right, CAUSAL, WIN_L, WIN_R, EXPLICIT_POS,
                                             BLOCK_M, BLOCK_N)

    dqa = tl.zeros([BLOCK_M, BLOCK_A], tl.float32)
    dqb = tl.zeros([BLOCK_M, BLOCK_A], tl.float32)
    dqc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    g1, g2 = param_grad_init(BIAS, BLOCK_M, NP, TABLE_REF)
    # Runs of key tiles, as in the forward (unrolled; run 0 only with a window's left edge):
    # 0 = masked before the band, 1 = unmasked, 2 = masked.
    for run in tl.static_range(3):
        if run != 0 or WIN_L:
            lo, hi = tile_run(run, t_lo, f_lo, f_hi, t_hi)
            dqa, dqb, dqc, g1, g2 = _dq_tiles(
                dqa, dqb, dqc, g1, g2, qa, qb, qc, do, nlse2, delta, qpos, m_mask,
                K, V, KPOS, THETA, ROPE_TILES, BIAS_F, BIAS_G, c_tab, s_tab,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
                Sk, k_start, rope_factor, scale_log2, pa, pb, dref, fref, cap_in, cap_log2,
                win_left, win_right, lo, hi, cols, (xref, xspan),
                ROT=ROT, BIAS=BIAS, MASKED=run != 1, CAUSAL=CAUSAL, WIN_L=WIN_L, WIN_R=WIN_R,
                SOFTCAP=SOFTCAP, EXPLICIT_POS=EXPLICIT_POS, HAS_PASS=HAS_PASS,
                ROT_HALF=ROT_HALF, BLOCK_A=BLOCK_A, BLOCK_N=BLOCK_N, PREC=PREC,
                BIAS_TABLE=BIAS_TABLE, NEED_PE_GRAD=NEED_PE_GRAD, CENTER=CENTER, NP=NP,
                XPOS=XPOS, INTERLEAVED=INTERLEAVED)
    store_grad_groups(DQ, offs_m, m_mask, qpos, stride_dqm, stride_dqd, dqa, dqb, dqc, scale,
                      THETA, rope_factor, colA, colB, maskA, colC, maskC, ROT, HAS_PASS, ROT_HALF,
                      BLOCK_A, xref, XPOS, True, 0, INTERLEAVED)
    if NEED_PE_GRAD:  # partials (query blocks, B, Hq, NP); torch sums them
        store_param_grads(BIAS, GPARAM, pid_m * tl.num_programs(1) + bh, g1, g2, NP, TABLE_REF,
                          BIAS_F, qpos, m_mask)
