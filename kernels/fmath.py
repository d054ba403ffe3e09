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
    """tanh(x) to a few ulps for every x, with one exp2 and one fast division per element:
    |x| < 1/2: x p(x^2), p a degree-5 least-squares fit of tanh(sqrt t) / sqrt t on
    [0, 1/4] (relative error 3e-10, fitted in float64); else (1 - e) / (1 + e) with
    e = exp(-2|x|) <= 1/e, where 1 - e loses at most a bit. No overflow (the exponent is never
    positive), no cancellation near 0. About 16 instructions a score where the expm1 form
    (exp, log, two divisions) took ~70 on sm_90 (bench.sass_loop)."""
    ax = tl.abs(x)
    t = x * x
    p = 1.0 + t * (-0.3333332426937494 + t * (0.1333290500355026 + t * (
        -0.05389375384147212 + t * (0.021276234121156593 + t * -0.006615864146020394))))
    e = tl.exp2(ax * -2.8853900817779268)  # exp(-2|x|)
    big = fast_div(1.0 - e, 1.0 + e)
    return tl.where(ax < 0.5, x * p, tl.where(x < 0, -big, big))


@triton.jit
def softcap_logits(qk, scale_log2, cap_in, cap_log2, SOFTCAP: tl.constexpr):
    """(x, mult) with the exp2-domain scaled logit = x * mult: (q.k, scale * log2 e) without a
    softcap; with one, x = tanh(q.k * scale / c) and mult = c log2 e (cap_in = scale / c,
    cap_log2 = c log2 e): the logit c tanh(s / c) of Gemma 2, before the bias is added."""
    if SOFTCAP:
        return tanh_acc(qk * cap_in), cap_log2
    else:
        return qk, scale_log2
