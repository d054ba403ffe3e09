"""Elementwise math in pure ``tl`` ops, accurate to a few ulps (all ``@triton.jit``, inlined).

Pure tl ops rather than libdevice: libdevice's log1p / tanh do not run in Triton's interpreter
(the CPU tests), and these run the same arithmetic there and on the GPU.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def fast_div(x, y):
    """x / y to ~2 ulps without the IEEE-rounding division's refinement (a reciprocal and a
    multiply on the GPU): the centred forms and tanh need a few ulps, not correct rounding,
    and their per-element divisions are what registers and instructions go to."""
    return tl.math.fdiv(x, y, ieee_rounding=False)


@triton.jit
def log1p_pos(x):
    """log(1 + x) for x >= -1, accurate to a few ulps also for tiny x (Goldberg's trick: the
    rounding of 1 + x cancels in log(u) * x / (u - 1)); -inf at x = -1."""
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
def tanh_acc(x):
    """tanh(x) to a few ulps for every x: -expm1(-2|x|) / (2 + expm1(-2|x|)) with x's sign.
    No overflow (the exponent is never positive), and no cancellation near 0, where
    (1 - e) / (1 + e) with e = exp(-2|x|) would lose log2(1 / |x|) bits."""
    e = expm1_acc(-2.0 * tl.abs(x))
    t = fast_div(-e, 2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def softcap_logits(qk, scale_log2, cap_in, cap_log2, SOFTCAP: tl.constexpr):
    """(x, mult) with the exp2-domain scaled logit = x * mult: (q.k, scale * log2 e) without a
    softcap; with one, x = tanh(q.k * scale / c) and mult = c log2 e (cap_in = scale / c,
    cap_log2 = c log2 e): the logit c tanh(s / c) of Gemma 2, before the bias is added."""
    if SOFTCAP:
        return tanh_acc(qk * cap_in), cap_log2
    else:
        return qk, scale_log2
