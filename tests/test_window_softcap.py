"""Sliding-window masks and logit soft-capping, fused into the kernels, vs the float64 reference.

``window=(left, right)``: key j is visible to query i iff
``q_pos[i] - left <= k_pos[j] <= q_pos[i] + right`` (a None side unbounded), ANDed with causal.
``softcap=c``: the scaled logit s becomes ``c * tanh(s / c)`` before the bias PE is added
(Gemma 2's order), then the masks.

The kernel runs are judged like tests/attn_harness.check: flash-attention's rule (2x the naive
in-dtype error for out / LSE, 3x for gradients, plus one eps floor) plus FlashSlack's
float32-eps-sized slack for the rounding flash-attention's algorithm does differently from the
naive math. ``Slack`` below is FlashSlack with the window and the soft cap taken into account
(its P, and each row's nearest *visible* key for bias centring); a window of (0, 0) makes every
row one-hot, exactly the case that slack exists for.

The main table is a pairwise covering set: every pair of values of any two of the factors
(PE x causal x window x softcap x dtype x GQA x positions) appears in some case
(test_cases_cover_every_pair checks it), 25 cases instead of the 1200 of the product.

tests/test_varlen.py imports ``Slack``, ``KERNEL`` and the input helpers from here.
"""
import itertools
import math

import pytest
import torch

import posattn
from posattn import reference
from posattn.pe import resolve_pe
from posattn.positions import Positions, parse_positions
from conftest import DEVICE
from helpers import leaf, pe_leaves, with_params
from attn_harness import FlashSlack, PES, assert_rule_with_slack, gen, rand
from pe_cases import invalid_pair

KERNEL = "triton"  # the backend under test (the float64 and in-dtype yardsticks call posattn.reference)
FP16, FP32 = torch.float16, torch.float32
CAP = 2.5  # soft cap: active with q scaled x3 (scaled logits ~ N(0, 9))
HEADS = {"mha": (2, 2), "gqa": (4, 2)}


# --------------------------------------------------------------------------------------------
# harness: kernel vs float64 reference vs the naive in-dtype math, forward and backward
# --------------------------------------------------------------------------------------------

class Slack(FlashSlack):
    """attn_harness.FlashSlack for one (B, H, S, D) problem with a window and a soft cap.

    Every tensor is float64 bhsd; qpos / kpos are posattn.positions.Positions. P comes from the
    reference with the same window / softcap, and a bias PE's row centre is its bias at the
    nearest key the row can see (window and causal). The soft cap only shrinks dS (by
    1 - tanh^2), so the q / k slack stays an upper bound; the kernel's tanh is assumed accurate
    to ~1 fp32 eps, which the L_i-proportional out / LSE slack (L_i >= 1) absorbs.
    """

    def __init__(self, q, k, v, out, lse, dout, pe, *, causal, scale, qpos: Positions, kpos: Positions,
                 window=None, softcap=None):
        self.spec = with_params(resolve_pe(pe), lambda t: t.detach().double())
        q, k, v, out, dout = (t.detach().double() for t in (q, k, v, out, dout))
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        g = Hq // Hkv
        self.qp = qpos.as_tensor(B, Sq, q.device)
        self.kp = kpos.as_tensor(B, Sk, q.device)
        self.visible = reference.visibility(self.qp, self.kp, causal, window)
        eye = torch.eye(Sk, dtype=torch.float64, device=q.device).expand(B, Hkv, Sk, Sk)
        with torch.no_grad():  # P (the softmax rows) is the output for V = identity
            P, _ = reference.attention_bhsd(q, k, eye, self.spec, causal=causal, scale=scale, q_pos=qpos,
                                            k_pos=kpos, compute_dtype=torch.float64, window=window,
                                            softcap=softcap)
        self._from_rows(P, lse, q, k, v, out, dout, scale, g, causal)

    def _row_centre(self, Hq, Sk, causal, lse):
        bias = reference.bias(self.spec, Hq, self.qp, self.kp, torch.float64)
        if bias is None or Sk == 0:
            return torch.zeros_like(lse)
        if self.visible is not None:
            bias = torch.where(self.visible, bias, torch.full_like(bias, float("-inf")))
        c = bias.amax(-1, keepdim=True)
        return torch.where(torch.isfinite(c), c, torch.zeros_like(c))

    def pe(self, name):
        if self.kp.shape[1] == 0:
            return 0.0
        return super().pe(name)


def qkv_base(B, Hq, Hkv, Sq, Sk, D, Dv=None, seed=0, q_scale=1.0):
    """float32 CPU base tensors (rounded to the kernel dtype later, identically for every run)."""
    return {"q": rand(B, Hq, Sq, D, seed=seed, scale=q_scale), "k": rand(B, Hkv, Sk, D, seed=seed + 1),
            "v": rand(B, Hkv, Sk, Dv or D, seed=seed + 2)}


def make_dout(shape, dtype, seed=123):
    return rand(*shape, seed=seed).to(dtype).to(DEVICE)


def grads_of(out, leaves, pe, dout):
    """Gradients of every leaf and trainable PE tensor, by name (None where unused)."""
    targets = {**leaves, **pe_leaves(pe)}
    g = torch.autograd.grad(out, list(targets.values()), dout.to(out.dtype), allow_unused=True)
    return dict(zip(targets, g))


def assert_quantities(got, ref, naive, dtype, slack_out, slack_lse, slack_grad):
    """The harness's rule on out, LSE and every gradient; ``slack_grad(name)`` is the slack of one."""
    (out, lse, grads), (out64, lse64, g64), (outn, lsen, gn) = got, ref, naive
    assert out.dtype == dtype and out.shape == out64.shape
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    assert set(grads) == set(g64)
    assert_rule_with_slack("out", out, out64, outn, dtype, slack_out, factor=2)
    assert_rule_with_slack("lse", lse, lse64, lsen, dtype, slack_lse, factor=2)
    for name in g64:
        if g64[name] is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name] is not None and grads[name].shape == g64[name].shape, name
        assert grads[name].dtype == (dtype if name in ("q", "k", "v") else torch.float32), name
        assert_rule_with_slack(f"d{name}", grads[name], g64[name], gn[name], dtype, slack_grad(name))


def run_bhsd(base, pe, dtype, backend, compute_dtype=None, **kw):
    """(out, lse, grads) of one run: ``backend`` is a posattn.attention backend, or "naive"
    (the reference math in ``compute_dtype``, inputs rounded to ``dtype``)."""
    leaves = {n: t.to(DEVICE).to(dtype).to(compute_dtype or dtype).requires_grad_() for n, t in base.items()}
    # PE parameters stay float32 (as a user passes them) except in the float64 reference
    pe_run = with_params(pe, lambda t: leaf(t, torch.float64 if compute_dtype == torch.float64 else None))
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if backend == "naive":
        out, lse = naive_bhsd(q, k, v, pe_run, compute_dtype, **kw)
    else:
        out, lse = posattn.attention(q, k, v, pe_run, return_lse=True, backend=backend, **kw)
    dout = make_dout(out.shape, dtype)
    return out.detach(), lse.detach(), grads_of(out, leaves, pe_run, dout)


def naive_bhsd(q, k, v, pe, compute_dtype, *, causal=False, scale=None, q_positions=None, k_positions=None,
               window=None, softcap=None):
    """posattn.reference in ``compute_dtype`` with posattn.attention's argument conventions."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    qpos = parse_positions(q_positions, "q_positions", B, Sq, Sk - Sq, q.device)
    kpos = parse_positions(k_positions, "k_positions", B, Sk, 0, q.device)
    return reference.attention_bhsd(q, k, v, resolve_pe(pe), causal=causal, scale=D ** -0.5 if scale is None else scale,
                                    q_pos=qpos, k_pos=kpos, compute_dtype=compute_dtype, window=window,
                                    softcap=softcap)


def check_bhsd(base, pe, dtype, **kw):
    """Kernel vs float64 reference by the harness's rule, forward and backward (out, LSE, dq, dk,
    dv, PE parameters). Returns the kernel's (out, lse, grads)."""
    got = run_bhsd(base, pe, dtype, KERNEL, **kw)
    ref = run_bhsd(base, pe, dtype, "naive", torch.float64, **kw)
    naive = run_bhsd(base, pe, dtype, "naive", dtype, **kw)
    q64, k64, v64 = (base[n].to(DEVICE).to(dtype).double() for n in "qkv")
    B, Sq, Sk, D = q64.shape[0], q64.shape[2], k64.shape[2], q64.shape[3]
    qpos = parse_positions(kw.get("q_positions"), "q_positions", B, Sq, Sk - Sq, q64.device)
    kpos = parse_positions(kw.get("k_positions"), "k_positions", B, Sk, 0, q64.device)
    scale = kw.get("scale") or D ** -0.5
    slack = Slack(q64, k64, v64, ref[0], ref[1], make_dout(ref[0].shape, dtype), pe, causal=kw.get("causal", False),
                  scale=scale, qpos=qpos, kpos=kpos, window=kw.get("window"), softcap=kw.get("softcap"))
    assert_quantities(got, ref, naive, dtype, slack.out, slack.lse,
                      lambda n: getattr(slack, n) if n in "qkv" else slack.pe(n))
    return got


def explicit_positions(B, S, seed, lo=0, hi=None, shuffled=False):
    """(B, S) int64 positions: sorted random distinct values in [lo, hi) (default hi = lo + 3 S + 3),
    or the same values in a random order per row (``shuffled``: nothing monotone to rely on)."""
    g = gen(seed)
    hi = lo + 3 * S + 3 if hi is None else hi
    rows = []
    for _ in range(B):
        p = torch.randperm(hi - lo, generator=g)[:S].sort().values + lo
        rows.append(p[torch.randperm(S, generator=g)] if shuffled else p)
    return torch.stack(rows).to(DEVICE) if rows else torch.zeros(0, S, dtype=torch.int64, device=DEVICE)


def position_kw(kind, B, Sq, Sk, seed):
    if kind == "default":
        return {}
    if kind == "offset":
        return dict(q_positions=7, k_positions=3)
    # explicit: keys on [0, 3 Sk + 3) with gaps, queries spread over the same range. seed even:
    # sorted (S,) tensors; odd: shuffled (B, S) tensors
    shuffled = seed % 2 == 1
    kp = explicit_positions(B, Sk, seed, shuffled=shuffled)
    qp = explicit_positions(B, Sq, seed + 1, lo=0, hi=max(3 * Sk + 3, Sq), shuffled=shuffled)
    return dict(q_positions=qp, k_positions=kp) if shuffled else dict(q_positions=qp[0], k_positions=kp[0])


# --------------------------------------------------------------------------------------------
# the pairwise covering table
# --------------------------------------------------------------------------------------------

W = {"None": None, "left5": (5, None), "right3": (None, 3), "4_2": (4, 2), "0_0": (0, 0)}
FACTORS = {
    "pe": list(PES),
    "causal": [False, True],
    "window": list(W),
    "softcap": [None, CAP],
    "dtype": ["fp16", "fp32"],
    "heads": list(HEADS),
    "pos": ["default", "offset", "explicit"],
}
# pe, causal, window, softcap, dtype, heads, pos | B, Sq, Sk, D, Dv (None: = D)
CASES = [
    ("none", False, "None", None, "fp16", "gqa", "default", 2, 17, 17, 16, None),
    ("none", True, "left5", CAP, "fp32", "mha", "offset", 1, 33, 40, 32, None),
    ("none", False, "right3", None, "fp32", "mha", "explicit", 1, 45, 29, 40, None),
    ("none", True, "4_2", CAP, "fp16", "gqa", "explicit", 2, 23, 61, 16, None),
    ("none", True, "0_0", None, "fp32", "mha", "default", 1, 37, 37, 32, None),
    ("rope", False, "None", CAP, "fp16", "mha", "offset", 1, 1, 67, 32, None),
    ("rope", True, "left5", None, "fp32", "gqa", "explicit", 2, 29, 35, 40, None),
    ("rope", True, "right3", CAP, "fp16", "gqa", "default", 1, 70, 70, 16, None),
    ("rope", False, "4_2", None, "fp32", "mha", "offset", 1, 41, 19, 32, 16),
    ("rope", False, "0_0", CAP, "fp16", "gqa", "offset", 1, 21, 33, 40, None),
    ("alibi", True, "None", CAP, "fp32", "gqa", "explicit", 1, 31, 47, 16, None),
    ("alibi", False, "left5", None, "fp16", "mha", "default", 2, 9, 70, 32, None),
    ("alibi", False, "right3", None, "fp32", "mha", "offset", 1, 38, 38, 40, None),
    ("alibi", False, "4_2", CAP, "fp16", "gqa", "default", 1, 65, 66, 16, None),
    ("alibi", False, "0_0", None, "fp32", "mha", "explicit", 1, 25, 50, 32, None),
    ("kerple_log", False, "None", CAP, "fp32", "mha", "explicit", 1, 53, 17, 16, None),
    ("kerple_log", True, "left5", None, "fp16", "gqa", "default", 2, 35, 35, 32, None),
    ("kerple_log", True, "right3", None, "fp32", "gqa", "offset", 1, 1, 1, 16, None),
    ("kerple_log", True, "4_2", None, "fp16", "gqa", "explicit", 1, 44, 64, 40, None),
    ("kerple_log", False, "0_0", None, "fp16", "mha", "explicit", 1, 27, 27, 16, None),
    ("kerple_power", True, "None", CAP, "fp16", "mha", "default", 1, 63, 34, 32, None),
    ("kerple_power", False, "left5", None, "fp32", "gqa", "explicit", 1, 19, 43, 16, 24),
    ("kerple_power", True, "right3", CAP, "fp16", "gqa", "offset", 2, 16, 48, 40, None),
    ("kerple_power", False, "4_2", CAP, "fp32", "mha", "explicit", 1, 57, 57, 32, None),
    ("kerple_power", False, "0_0", CAP, "fp32", "gqa", "default", 1, 5, 69, 16, None),
    ("t5", False, "None", None, "fp16", "mha", "explicit", 1, 39, 39, 16, None),
    ("t5", True, "left5", CAP, "fp32", "gqa", "default", 2, 27, 45, 32, None),
    ("t5", False, "right3", CAP, "fp16", "gqa", "offset", 1, 33, 21, 16, None),
    ("t5", True, "4_2", None, "fp32", "mha", "explicit", 1, 50, 50, 32, None),
    ("t5", False, "0_0", None, "fp16", "gqa", "default", 1, 31, 66, 16, None),
    ("sandwich", True, "None", None, "fp32", "gqa", "offset", 1, 29, 41, 32, None),
    ("sandwich", False, "left5", CAP, "fp16", "mha", "explicit", 1, 37, 26, 16, None),
    ("sandwich", True, "right3", None, "fp16", "mha", "default", 2, 22, 22, 32, None),
    ("sandwich", False, "4_2", None, "fp32", "gqa", "explicit", 1, 43, 43, 16, None),
    ("sandwich", True, "0_0", CAP, "fp32", "gqa", "default", 1, 18, 55, 16, None),
    # xPos is causal only (pe_cases.invalid_pair; test_causal_only_pes_refuse_full_attention)
    ("xpos", True, "None", CAP, "fp32", "gqa", "explicit", 1, 33, 47, 16, None),
    ("xpos", True, "left5", None, "fp32", "mha", "offset", 2, 25, 25, 32, None),
    ("xpos", True, "right3", CAP, "fp32", "gqa", "default", 1, 40, 52, 16, None),
    ("xpos", True, "4_2", None, "fp16", "mha", "default", 1, 45, 45, 32, 16),
    ("xpos", True, "0_0", CAP, "fp16", "gqa", "offset", 1, 19, 30, 16, None),
    ("fire", False, "None", CAP, "fp16", "gqa", "default", 1, 35, 30, 16, None),
    ("fire", True, "left5", None, "fp32", "mha", "explicit", 1, 41, 41, 16, None),
    ("fire", False, "right3", None, "fp32", "gqa", "offset", 1, 26, 39, 32, None),
    ("fire", True, "4_2", CAP, "fp16", "mha", "offset", 2, 30, 30, 16, None),
    ("fire", True, "0_0", None, "fp32", "gqa", "explicit", 1, 21, 45, 16, None),
]
DTYPES = {"fp16": FP16, "fp32": FP32}


def case_id(c):
    pe, causal, win, cap, dt, heads, pos, B, Sq, Sk, D, Dv = c
    return (f"{pe}-{'causal' if causal else 'full'}-w{win}-{'cap' if cap else 'nocap'}-{dt}-{heads}-{pos}"
            f"-{B}x{Sq}x{Sk}x{D}" + (f"v{Dv}" if Dv else ""))


def test_cases_cover_every_pair():
    names = list(FACTORS)
    rows = [dict(zip(names, c[:7])) for c in CASES]
    missing = [(a, x, b, y) for a, b in itertools.combinations(names, 2)
               for x in FACTORS[a] for y in FACTORS[b]
               if not any(r[a] == x and r[b] == y for r in rows) and not invalid_pair(a, x, b, y)]
    assert not missing, missing


@pytest.mark.parametrize("pe", [p for p in FACTORS["pe"] if invalid_pair("pe", p, "causal", False)])
@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_causal_only_pes_refuse_full_attention(pe, backend):
    """The pairs the tables leave out (pe_cases.invalid_pair) are refused by name, by every
    backend, before anything runs."""
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="causal=True"):
        posattn.attention(q, q, q, pe=PES[pe](2, 16), causal=False, backend=backend)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_window_softcap_pairwise(case):
    pe, causal, win, cap, dt, heads, pos, B, Sq, Sk, D, Dv = case
    dtype, (Hq, Hkv) = DTYPES[dt], HEADS[heads]
    seed = CASES.index(case)
    base = qkv_base(B, Hq, Hkv, Sq, Sk, D, Dv, seed=10 * seed, q_scale=3.0 if cap else 1.0)
    kw = dict(causal=causal, window=W[win], softcap=cap, **position_kw(pos, B, Sq, Sk, seed))
    check_bhsd(base, PES[pe](Hq, D), dtype, **kw)


# --------------------------------------------------------------------------------------------
# many tiles: the kernels skip the key tiles outside the window (interpreter tiles are 32 x 32)
# --------------------------------------------------------------------------------------------

# pe, dtype, causal, window, softcap, Sq, Sk
LONG = [
    ("none", FP16, True, (16, 0), None, 200, 200),
    ("alibi", FP32, True, (16, 0), CAP, 200, 200),
    ("rope", FP16, False, (5, 20), None, 150, 200),  # both sides bounded, queries end-aligned
]


@pytest.mark.parametrize("case", LONG, ids=lambda c: f"{c[0]}-{c[1]}-{'causal' if c[2] else 'full'}-{c[3]}")
def test_window_skips_tiles(case):
    pe, dtype, causal, window, cap, Sq, Sk = case
    base = qkv_base(1, 1, 1, Sq, Sk, 16, seed=77, q_scale=3.0 if cap else 1.0)
    check_bhsd(base, PES[pe](1, 16), dtype, causal=causal, window=window, softcap=cap)


# --------------------------------------------------------------------------------------------
# switched-off features are bit-identical to their absence
# --------------------------------------------------------------------------------------------

IDENTITY = [
    # pe, dtype, causal, positions, softcap, (B, Hq, Hkv, Sq, Sk, D)
    ("alibi", FP16, True, "offset", None, (1, 4, 2, 19, 37, 32)),
    ("rope", FP32, False, "explicit", CAP, (2, 2, 2, 33, 21, 16)),
]


@pytest.mark.parametrize("case", IDENTITY, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
def test_disabled_window_and_softcap_are_bit_identical(case):
    """window=(10**6, 10**6) / (None, None) and softcap=0.0 give exactly what None gives."""
    pe, dtype, causal, pos, cap, (B, Hq, Hkv, Sq, Sk, D) = case
    base = qkv_base(B, Hq, Hkv, Sq, Sk, D, seed=5, q_scale=3.0)
    spec = PES[pe](Hq, D)
    kw = dict(causal=causal, **position_kw(pos, B, Sq, Sk, seed=3))
    want = run_bhsd(base, spec, dtype, KERNEL, window=None, softcap=cap, **kw)
    variants = [dict(window=(10 ** 6, 10 ** 6), softcap=cap), dict(window=(None, None), softcap=cap)]
    if cap is None:
        variants.append(dict(window=None, softcap=0.0))
    for extra in variants:
        got = run_bhsd(base, spec, dtype, KERNEL, **extra, **kw)
        assert torch.equal(got[0], want[0]), f"out differs with {extra}"
        assert torch.equal(got[1], want[1]), f"lse differs with {extra}"
        for name in want[2]:
            assert torch.equal(got[2][name], want[2][name]), f"d{name} differs with {extra}"


# --------------------------------------------------------------------------------------------
# the reference itself, by hand
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_reference_softcap_and_window_by_hand(causal):
    """posattn.reference with softcap, ALiBi and a window against the formula written out in
    Python floats: s_ij = c tanh(scale q_i.k_j / c) - slope |p_i - p_j|, visible iff
    p_i - left <= p_j <= p_i + right (and p_j <= p_i when causal)."""
    g = torch.Generator().manual_seed(0)
    Sq, Sk, D, c, slope, left, right = 3, 6, 4, 1.5, 0.25, 2, 1
    q = torch.randn(1, 1, Sq, D, generator=g, dtype=torch.float64) * 3
    k = torch.randn(1, 1, Sk, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, Sk, 2, generator=g, dtype=torch.float64)
    qpos, kpos = [4, 5, 9], [0, 1, 2, 3, 4, 5]  # the query at 9 sees no key
    scale = 0.7
    out, lse = reference.attention_bhsd(
        q, k, v, posattn.ALiBi(torch.tensor([slope], dtype=torch.float64)), causal=causal, scale=scale,
        q_pos=Positions(Sq, tensor=torch.tensor([qpos])), k_pos=Positions(Sk, start=0),
        window=(left, right), softcap=c)
    for i in range(Sq):
        logits = {}
        for j in range(Sk):
            if not (qpos[i] - left <= kpos[j] <= qpos[i] + right) or (causal and kpos[j] > qpos[i]):
                continue
            s = scale * sum(q[0, 0, i, d].item() * k[0, 0, j, d].item() for d in range(D))
            logits[j] = c * math.tanh(s / c) - slope * abs(qpos[i] - kpos[j])
        if not logits:
            assert lse[0, 0, i].item() == -math.inf and not out[0, 0, i].any()
            continue
        want_lse = math.log(sum(math.exp(s) for s in logits.values()))
        want = [sum(math.exp(s - want_lse) * v[0, 0, j, e].item() for j, s in logits.items()) for e in range(2)]
        assert lse[0, 0, i].item() == pytest.approx(want_lse, rel=1e-12, abs=1e-12)
        assert out[0, 0, i].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert math.isinf(lse[0, 0, 2].item())  # the case does have an empty row


def test_reference_softcap_gradient():
    """float64 gradcheck of the reference through the soft cap, the window and KERPLE."""
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) * 3).requires_grad_()
    k = torch.randn(1, 1, 7, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(1, 1, 7, 8, generator=g, dtype=torch.float64).requires_grad_()
    r1 = torch.tensor([0.5, 1.2], dtype=torch.float64, requires_grad=True)
    r2 = torch.tensor([0.4, 1.1], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, r1, r2):
        return reference.attention_bhsd(q, k, v, posattn.KERPLE("power", r1, r2), causal=True, scale=0.35,
                                        q_pos=Positions(5, start=2), k_pos=Positions(7, start=0),
                                        window=(3, None), softcap=2.0)[0]

    assert torch.autograd.gradcheck(f, (q, k, v, r1, r2))


# --------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------

def _small():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 5, 16, generator=g).to(DEVICE) for _ in range(3)]


BAD_WINDOWS = [5, (4,), (1, 2, 3), (-1, 0), (0, -2), (True, 0), (0, False), "ab", (1.5, 2), ("4", 2)]


@pytest.mark.parametrize("window", BAD_WINDOWS, ids=repr)
def test_bad_window_raises(window):
    q, k, v = _small()
    with pytest.raises((TypeError, ValueError), match="window"):
        posattn.attention(q, k, v, causal=True, window=window, backend=KERNEL)


BAD_CAPS = [-1.0, -0.5, float("nan"), float("inf"), float("-inf"), "2.5", [2.5]]


@pytest.mark.parametrize("softcap", BAD_CAPS, ids=repr)
def test_bad_softcap_raises(softcap):
    q, k, v = _small()
    with pytest.raises((TypeError, ValueError), match="softcap"):
        posattn.attention(q, k, v, softcap=softcap, backend=KERNEL)
