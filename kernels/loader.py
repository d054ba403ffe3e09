"""Q / K / V tile loads (all ``@triton.jit``, inlined): pointers or TMA, rotated on load.

A tile is held as *dot groups* (see rotary.qk_columns): group A (all columns without a
rotation; RoPE: x1 of every rotated pair), B (RoPE: the partners x2) and C (RoPE: the
pass-through columns of a partial rotary dim). q @ k^T is the sum of the groups' products.
"""
import triton
import triton.language as tl

from .rotary import ROT_ROPE, rope_rotate


@triton.jit
def load_tile(ptr, rows, row_mask, cols, col_mask, stride_row, stride_col, MASKED: tl.constexpr):
    """Load a (rows, cols) tile; rows beyond the sequence and padded columns read 0."""
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :] * stride_col
    if MASKED:
        return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=col_mask[None, :], other=0.0)


@triton.jit
def pair_mask(maskA):
    """The (2 BLOCK_A,) column mask of interleaved pairs (2j, 2j + 1) from the pairs' mask."""
    return tl.reshape(tl.join(maskA, maskA), [2 * maskA.shape[0]])


@triton.jit
def load_pairs(ptr, rows, row_mask, stride_row, stride_col, colA, colB, maskA,
               MASKED: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The rotated pairs' two groups (x1 of every pair, its partner x2), (BLOCK, BLOCK_A) each.
    Interleaved pairs (2j, 2j + 1) are loaded as one contiguous (BLOCK, 2 BLOCK_A) tile and
    split in registers: two stride-2 column gathers cost address registers that spilled the
    sm_90 tiles (forward D=64: 168 B, dQ D=128: 192 B, triton 3.9)."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * colA.shape[0])
        x = load_tile(ptr, rows, row_mask, cols, pair_mask(maskA), stride_row, stride_col, MASKED)
        return tl.split(tl.reshape(x, [x.shape[0], colA.shape[0], 2]))
    a = load_tile(ptr, rows, row_mask, colA, maskA, stride_row, stride_col, MASKED)
    b = load_tile(ptr, rows, row_mask, colB, maskA, stride_row, stride_col, MASKED)
    return a, b


@triton.jit
def load_qk(ptr, rows, row_mask, stride_row, stride_col, cos, sin, c0, s0, colA, colB, maskA,
            colC, maskC, ROT: tl.constexpr, HAS_PASS: tl.constexpr, MASKED: tl.constexpr,
            SHIFT: tl.constexpr, INTERLEAVED: tl.constexpr = False):
    """Load Q or K as its dot groups, rotated for RoPE, in the input dtype.

    RoPE rotates by (cos, sin) (BLOCK, BLOCK_A) and then, when SHIFT, by the tile-start
    rotation (c0, s0) (BLOCK_A,) (see rotary.tile_rope).
    Returns (a, b, c): a = group A (all columns without a rotation), b = the rotated partners,
    c = RoPE pass-through columns (partial rotary). Unused groups are returned as ``a``.
    """
    if ROT == ROT_ROPE:
        a, b = load_pairs(ptr, rows, row_mask, stride_row, stride_col, colA, colB, maskA, MASKED,
                          INTERLEAVED)
        ra, rb = rope_rotate(a.to(tl.float32), b.to(tl.float32), cos, sin)
        if SHIFT:
            ra, rb = rope_rotate(ra, rb, c0[None, :], s0[None, :])
        if HAS_PASS:
            c = load_tile(ptr, rows, row_mask, colC, maskC, stride_row, stride_col, MASKED)
        else:
            c = a
        return ra.to(a.dtype), rb.to(a.dtype), c
    else:
        a = load_tile(ptr, rows, row_mask, colA, maskA, stride_row, stride_col, MASKED)
        return a, a, a


@triton.jit
def load_groups(ptr, rows, row_mask, stride_row, stride_col, colA, colB, maskA, colC, maskC,
                ROT: tl.constexpr, HAS_PASS: tl.constexpr, MASKED: tl.constexpr,
                INTERLEAVED: tl.constexpr = False):
    """Q or K as its dot groups (a, b, c) as load_qk returns them, but not rotated: a tensor a
    pass already rotated (launch.rope_apply)."""
    if ROT == ROT_ROPE:
        a, b = load_pairs(ptr, rows, row_mask, stride_row, stride_col, colA, colB, maskA, MASKED,
                          INTERLEAVED)
        c = a
        if HAS_PASS:
            c = load_tile(ptr, rows, row_mask, colC, maskC, stride_row, stride_col, MASKED)
    else:
        a = load_tile(ptr, rows, row_mask, colA, maskA, stride_row, stride_col, MASKED)
        b = a
        c = a
    return a, b, c


@triton.jit
def load_box(desc, b, h, row0, col0, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr):
    """TMA load of rows [row0, row0 + BLOCK_R) and columns [col0, col0 + BLOCK_COL) of head
    (b, h) of a (B, H, S, D) descriptor, as (BLOCK_R, BLOCK_COL). Out of bounds reads 0, so
    rows past S and padded head-dim columns need no mask. Coordinates are int32 (the
    hardware forms the 64-bit address)."""
    return desc.load([b, h, row0, col0]).reshape(BLOCK_R, BLOCK_COL)


@triton.jit
def qk_dot(qa, qb, qc, ka, kb, kc, ROT: tl.constexpr, HAS_PASS: tl.constexpr,
           PREC: tl.constexpr):
    """q @ k^T summed over the dot groups: (BLOCK_M, BLOCK_N) float32."""
    s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
    if ROT == ROT_ROPE:
        s = tl.dot(qb, tl.trans(kb), s, input_precision=PREC)
        if HAS_PASS:
            s = tl.dot(qc, tl.trans(kc), s, input_precision=PREC)
    return s
