"""backend="cpu" (posattn/_cpu.py): exact blockwise attention on torch's CPU kernels.

Judged like tests/test_window_softcap.py and tests/test_varlen.py judge the Triton kernels:
flash-attention's rule (2x the naive in-dtype error for out / LSE, 3x for gradients, plus a floor)
plus FlashSlack's float32-eps slack, against the float64 reference, on out, LSE, dq, dk, dv and
every trainable PE tensor's gradient.

The main table is a pairwise covering set generated from the factors below (every pair of values
of any two factors appears in some case; ``test_cases_cover_every_pair``), with the PE factor
taken from the registry (tests/pe_cases.py), so a newly registered PE is covered with no edit.
Every test runs with ``_cpu.BLOCK_Q = 16`` so that the sequences (17..70 tokens) cross query
blocks, and the ``engine`` factor forces each of the CPU backend's two engines (torch's CPU
flash op with the block's bias as attn_mask, and the explicit blockwise matmuls).

conftest.py sets TRITON_INTERPRET=1, so ``auto`` means Triton in this process: every call here
names ``backend="cpu"``, and the auto rule is tested by monkeypatching ``interpreter_on``.
"""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import posattn
from posattn import _cpu, api
from posattn.positions import Positions
from helpers import leaf, pe_leaves, with_params
from attn_harness import PES
from pe_cases import invalid_pair
from test_window_softcap import CAP, HEADS, W, assert_quantities, make_dout, position_kw, qkv_base, run_bhsd, Slack
from test_varlen import CASES as VARLEN_CASES, case_inputs as varlen_case_inputs, cu, run_varlen, varlen_slack

BACKEND = "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """16-row query blocks: every case below crosses block boundaries."""
    monkeypatch.setattr(_cpu, "BLOCK_Q", 16)


def force_engine(monkeypatch, engine):
    """"sdpa": torch's flash op wherever it can run (the default); "explicit": the blockwise
    matmuls everywhere (forward and backward), as a soft cap or Dv != D would choose."""
    monkeypatch.setattr(_cpu, "FORCE_EXPLICIT", engine == "explicit")


# --------------------------------------------------------------------------------------------
# the pairwise table, generated
# --------------------------------------------------------------------------------------------

FACTORS = {
    "pe": list(PES),  # every registered PE (+ the harness's variants)
    "trainable": [True, False],  # the harness spec (trainable tensors) or the registry default by name
    "causal": [False, True],
    "window": list(W),
    "softcap": [None, CAP],
    "dtype": list(DTYPES),
    "heads": list(HEADS),
    "pos": ["default", "offset", "explicit"],
    "engine": ["sdpa", "explicit"],
}


def pairwise(factors):
    """A covering array of strength 2, built greedily and deterministically: each new row starts
    from the first uncovered pair and fills the other factors with the value that covers the most
    still-uncovered pairs (ties: the first value)."""
    names = list(factors)
    todo = {(a, x, b, y) for a, b in itertools.combinations(names, 2) for x in factors[a] for y in factors[b]
            if not invalid_pair(a, x, b, y)}
    order = {n: i for i, n in enumerate(names)}
    rows = []
    while todo:
        a, x, b, y = min(todo, key=lambda p: (order[p[0]], factors[p[0]].index(p[1]), order[p[2]],
                                             factors[p[2]].index(p[3])))
        row = {a: x, b: y}
        for n in names:
            if n in row:
                continue

            def gain(val, row=row, n=n, todo=todo):
                return sum(((m, row[m], n, val) if order[m] < order[n] else (n, val, m, row[m])) in todo
                           for m in row)
            ok = [v for v in factors[n] if not any(invalid_pair(m, row[m], n, v) for m in row)]
            row[n] = max(ok, key=gain)
        row = {n: row[n] for n in names}
        rows.append(row)
        todo -= {(m, row[m], n, row[n]) for m, n in itertools.combinations(names, 2)}
    return rows


CASES = pairwise(FACTORS)
SHAPES = [(1, 17, 17, 16, None), (2, 33, 40, 32, None), (1, 45, 29, 16, 24), (1, 23, 61, 32, None),
          (2, 37, 37, 16, None), (1, 1, 67, 32, None), (1, 70, 70, 16, None), (1, 41, 19, 32, 16)]


def case_id(c):
    return "-".join(str(c[n]) if not isinstance(c[n], bool) else (n if c[n] else f"no{n}") for n in c)


def test_cases_cover_every_pair():
    rows = CASES
    missing = [(a, x, b, y) for a, b in itertools.combinations(FACTORS, 2)
               for x in FACTORS[a] for y in FACTORS[b] if not any(r[a] == x and r[b] == y for r in rows)
               and not invalid_pair(a, x, b, y)]
    assert not missing and len(rows) < 60, (missing, len(rows))
    assert not any(invalid_pair(a, r[a], b, r[b]) for r in rows for a, b in itertools.combinations(FACTORS, 2))


def check_cpu(base, pe, dtype, **kw):
    """The cpu backend vs the float64 reference by the harness's rule (test_window_softcap's
    check_bhsd with backend="cpu")."""
    got = run_bhsd(base, pe, dtype, BACKEND, **kw)
    ref = run_bhsd(base, pe, dtype, "naive", torch.float64, **kw)
    naive = run_bhsd(base, pe, dtype, "naive", dtype, **kw)
    q64, k64, v64 = (base[n].to(dtype).double() for n in "qkv")
    B, Sq, Sk, D = q64.shape[0], q64.shape[2], k64.shape[2], q64.shape[3]
    from posattn.positions import parse_positions
    qpos = parse_positions(kw.get("q_positions"), "q_positions", B, Sq, Sk - Sq, q64.device)
    kpos = parse_positions(kw.get("k_positions"), "k_positions", B, Sk, 0, q64.device)
    slack = Slack(q64, k64, v64, ref[0], ref[1], make_dout(ref[0].shape, dtype), pe, causal=kw.get("causal", False),
                  scale=kw.get("scale") or D ** -0.5, qpos=qpos, kpos=kpos, window=kw.get("window"),
                  softcap=kw.get("softcap"))
    slack.fire_ref = "none"  # the cpu backend does not centre FIRE's gradient (attn_harness)
    assert_quantities(got, ref, naive, dtype, slack.out, slack.lse,
                      lambda n: getattr(slack, n) if n in "qkv" else slack.pe(n))
    return got


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_pairwise(case, monkeypatch):
    i = CASES.index(case)
    B, Sq, Sk, D, Dv = SHAPES[i % len(SHAPES)]
    (Hq, Hkv), dtype = HEADS[case["heads"]], DTYPES[case["dtype"]]
    cap = case["softcap"]
    base = qkv_base(B, Hq, Hkv, Sq, Sk, D, Dv, seed=10 * i, q_scale=3.0 if cap else 1.0)
    pe = PES[case["pe"]](Hq, D)
    if not case["trainable"]:  # the same spec with fixed tensors: nothing needs a PE gradient
        pe = with_params(pe, lambda t: t.detach())
    force_engine(monkeypatch, case["engine"])
    kw = dict(causal=case["causal"], window=W[case["window"]], softcap=cap,
              **position_kw(case["pos"], B, Sq, Sk, i))
    check_cpu(base, pe, dtype, **kw)


# --------------------------------------------------------------------------------------------
# layouts, float64, the whole-problem fast path, tiny blocks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_bshd_equals_bhsd(pe):
    """layout="bshd" computes the same as bhsd on the transposed views (and returns bshd)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 40, 16, generator=g) for i in range(3))
    spec = PES[pe](4, 16)
    res = []
    for layout in ("bhsd", "bshd"):
        leaves = [t.clone().requires_grad_() if layout == "bhsd" else t.transpose(1, 2).clone().requires_grad_()
                  for t in (q, k, v)]
        out, lse = posattn.attention(*leaves, spec, causal=True, layout=layout, return_lse=True, backend=BACKEND)
        dout = torch.ones_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
        if layout == "bshd":
            assert out.shape == (2, 40, 4, 16)
            out, grads = out.transpose(1, 2), [t.transpose(1, 2) for t in grads]
        res.append((out, lse, grads))
    (o1, l1, g1), (o2, l2, g2) = res
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["sdpa", "explicit"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=True, q_positions=0, k_positions=0),
                                dict(window=(3, 0), causal=True), dict()],
                         ids=["causal", "top_left", "window", "full"])
def test_float64_matches_reference(kw, engine, monkeypatch):
    """float64 is allowed on the cpu backend and matches the reference to float64 rounding,
    including the whole-problem paths (no mask; causal whose mask is the op's top-left one,
    here Sq < Sk with queries starting at key 0)."""
    force_engine(monkeypatch, engine)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 29, 16, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, 2, 45, 16, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    slopes = torch.linspace(0.1, 0.7, 4, dtype=torch.float64).requires_grad_()
    for pe in ("none", "rope", posattn.ALiBi(slopes)):
        res = []
        for backend in (BACKEND, "reference"):
            out, lse = posattn.attention(q, k, v, pe, return_lse=True, backend=backend, **kw)
            assert lse.dtype == torch.float64
            leaves = [q, k, v] + ([slopes] if not isinstance(pe, str) else [])
            res.append((out, lse, torch.autograd.grad(out, leaves, torch.ones_like(out))))
        (o1, l1, g1), (o2, l2, g2) = res
        torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mask_budget_shrinks_blocks(monkeypatch):
    """A block whose mask would pass MASK_BYTES gets fewer rows (down to MIN_BLOCK_Q)."""
    monkeypatch.setattr(_cpu, "MIN_BLOCK_Q", 4)
    monkeypatch.setattr(_cpu, "MASK_BYTES", 4 * 2 * 5 * 64)  # 5 rows of 2 heads x 64 keys
    assert [b[1] - b[0] for b in _cpu._blocks(1, 2, 13, 64)] == [4, 4, 4, 1]
    base = qkv_base(1, 2, 2, 13, 64, 16, seed=3)
    check_cpu(base, PES["alibi"](2, 16), torch.float32, causal=True)


def test_key_ranges_skip_invisible_keys():
    """causal / window narrow each block's key range (sorted keys), nothing does for unsorted keys."""
    geo = _cpu.make_geometry(Positions(64, start=0), Positions(64, start=0), 1, 64, 64, causal=True,
                             window=(8, 0), scale=1.0, softcap=None)
    assert _cpu._key_range(geo, 32, 48) == (24, 48)
    shuffled = Positions(64, tensor=torch.randperm(64, generator=torch.Generator().manual_seed(0))[None])
    geo = _cpu.make_geometry(Positions(64, start=0), shuffled, 1, 64, 64, causal=True, window=(8, 0), scale=1.0,
                             softcap=None)
    assert _cpu._key_range(geo, 32, 48) == (0, 64)


# --------------------------------------------------------------------------------------------
# the LSE is differentiable
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pe,dtype", [("alibi", torch.float64), ("rope", torch.float64), ("kerple_log", torch.float32)])
def test_lse_gradient_matches_reference(pe, dtype):
    """A loss on out and on the LSE (a query that sees no key excluded): gradients of q, k, v and
    the PE tensors equal the reference's autograd (float64: to rounding; float32: by the rule's
    order of magnitude)."""
    g = torch.Generator().manual_seed(2)
    base = {n: torch.randn(1, 4 if n == "q" else 2, 37 if n == "q" else 41, 16, generator=g) for n in "qkv"}
    res = []
    for backend in (BACKEND, "reference"):
        L = {n: t.to(dtype).requires_grad_() for n, t in base.items()}
        spec = with_params(PES[pe](4, 16), lambda t: leaf(t, dtype))
        out, lse = posattn.attention(L["q"], L["k"], L["v"], spec, causal=True, window=(6, None),
                                     q_positions=torch.arange(37) * 2 - 20, return_lse=True, backend=backend)
        w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
        loss = (out * out).sum() + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * w).sum()
        targets = {**L, **pe_leaves(spec)}
        res.append(dict(zip(targets, torch.autograd.grad(loss, list(targets.values())))))
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for n in res[1]:
        torch.testing.assert_close(res[0][n], res[1][n].to(res[0][n].dtype), rtol=tol, atol=tol, msg=n)


# --------------------------------------------------------------------------------------------
# varlen
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_matches_reference(name):
    """tests/test_varlen.py's table on backend="cpu" (lengths 0 and 1 on both sides, every PE,
    causal / window / soft cap, GQA, explicit and shuffled positions, Dv != D)."""
    case, base, Hq, kw = varlen_case_inputs(name)
    (lens_q, lens_k), pe, _, _, _, dtype, _, D, _, _, cu_dtype, _, _ = case
    spec = PES[pe](Hq, D)
    cu_q, cu_k = cu(lens_q, cu_dtype), cu(lens_k, cu_dtype)
    got = run_varlen(base, spec, dtype, BACKEND, cu_q, cu_k, **kw)
    ref = run_varlen(base, spec, dtype, "naive", cu_q, cu_k, torch.float64, **kw)
    naive = run_varlen(base, spec, dtype, "naive", cu_q, cu_k, dtype, **kw)
    out_s, lse_s, grad_s = varlen_slack(base, dtype, ref, spec, cu_q, cu_k, fire_ref="none", **kw)
    assert_quantities(got, ref, naive, dtype, out_s, lse_s, grad_s)


# --------------------------------------------------------------------------------------------
# the auto rule and errors
# --------------------------------------------------------------------------------------------

def test_auto_picks_cpu_without_the_interpreter(monkeypatch):
    q = torch.zeros(1, 1, 2, 8)
    monkeypatch.setattr(api, "interpreter_on", lambda: False)
    assert api._pick_backend("auto", q) == "cpu"
    assert api._pick_backend("auto", q.double()) == "cpu"
    called = []
    real = _cpu.attention_bhsd
    monkeypatch.setattr(_cpu, "attention_bhsd", lambda *a, **k: called.append(1) or real(*a, **k))
    posattn.attention(q, q, q, "alibi", causal=True)
    assert called
    monkeypatch.setattr(api, "interpreter_on", lambda: True)
    assert api._pick_backend("auto", q) == "triton"
    assert api._pick_backend("auto", q.double()) == "cpu"
    assert api._pick_backend("reference", q) == "reference"


def test_cpu_backend_refuses_other_devices():
    q = torch.zeros(1, 1, 2, 8, device="meta")
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        posattn.attention(q, q, q, backend=BACKEND)
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        api._pick_backend("cpu", q)  # the same check serves attention_varlen


def test_unknown_backend_lists_cpu():
    q = torch.zeros(1, 1, 2, 8)
    with pytest.raises(ValueError, match=r"backend must be one of .*'cpu'"):
        posattn.attention(q, q, q, backend="cpython")


# --------------------------------------------------------------------------------------------
# memory: nothing S x S
# --------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import os, resource, sys, torch
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    import posattn

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024

    def reset_peak():  # Linux: "5" resets VmHWM to the current RSS (import transients forgotten)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    S = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, S, 8, generator=g) for _ in range(3))
    slopes = torch.tensor([0.3], requires_grad=True)
    q.requires_grad_()
    posattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], posattn.ALiBi(slopes), causal=True,
                      backend="cpu").sum().backward()  # warm up allocator and kernels
    exact = reset_peak()
    base = status("VmRSS")
    out = posattn.attention(q, k, v, posattn.ALiBi(slopes), causal=True, window=(S // 8, 0), backend="cpu")
    out.sum().backward()
    # without the reset, the lifetime peak (an over-estimate: it includes the imports)
    peak = status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - base)
""")


def test_16k_tokens_stay_in_linear_memory():
    """S = 16384, trainable ALiBi, causal sliding window, forward + backward, in a subprocess:
    its peak RSS grows by less than 160 MiB (measured: ~30 MiB), while one S x S float32 score
    matrix alone is 1 GiB (the reference materialises several): materialising S x S fails
    this test."""
    S = 16384
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(S)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    grew = int(res.stdout.split()[-1])
    assert grew < 160 * 2 ** 20, f"peak RSS grew by {grew / 2 ** 20:.0f} MiB (S x S fp32 = {S * S * 4 / 2 ** 30:.0f} GiB)"


# --------------------------------------------------------------------------------------------
# the relative-position table (contiguous positions): the same masks as per score, bit for bit
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pe,causal,window,qstart", [
    ("alibi", True, None, None), ("kerple_log", False, (5, 3), 11), ("t5", True, (9, None), None),
    ("kerple_power", False, None, -4), ("none", False, (0, 0), 7), ("rope", True, (6, 0), None)])
def test_rel_table_masks_equal_per_score_masks(pe, causal, window, qstart, monkeypatch):
    """With contiguous positions the op's block masks come from one row per head over the
    relative positions (_cpu.rel_table, a strided view per block); they must equal the masks
    built per score (reference.bias + reference.visibility) exactly, on blocks that cut the
    diagonal and windows (BLOCK_Q 16)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 4, S, 16, generator=g) for S in (37, 45, 45, 37))
    spec = posattn.pe.resolve_pe(PES[pe](4, 16)) if pe != "none" else "none"
    if not isinstance(spec, str):  # fixed PE tensors: the op's paths (no PE gradient)
        spec = with_params(spec, lambda t: t.detach())
    kw = dict(causal=causal, window=window, q_positions=qstart, return_lse=True, backend=BACKEND)
    runs, tables = [], []
    real = _cpu.rel_table
    monkeypatch.setattr(_cpu, "rel_table", lambda *a: tables.append(real(*a)) or tables[-1])
    for use in (True, False):
        monkeypatch.setattr(_cpu, "USE_REL_TABLE", use)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = posattn.attention(qq, kk, vv, spec, **kw)
        out.backward(dout)
        runs.append((out, lse, qq.grad, kk.grad, vv.grad))
    assert tables and all(t is not None for t in tables)
    # out, LSE and dq bit for bit: the same masks; dk and dv sum over the block's query rows,
    # which the table path hands the op in reverse order (another summation order)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        if name in ("dk", "dv"):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
        else:
            assert torch.equal(a, b), name
