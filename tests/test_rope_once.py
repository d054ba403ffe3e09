"""RoPE's two strategies (kernels/launch.py, "RoPE strategies"): "tile" rotates K (Q) tiles inside
the attention kernels, "once" rotates Q and K once by a pass and runs pe="none"'s kernels, then
rotates dQ / dK back. The in-tile strategy is what every other test runs (their shapes are
below ROPE_ONCE_MIN_Q); here "once" is forced and judged by the same error rule, forward and
backward, for every scaling, partial and interleaved rotary, GQA, explicit positions, windows,
softcap, packed sequences and both dtypes (pairwise-ish: each value in some case).
"""
import pytest
import torch

import posattn
from posattn.kernels import launch
from conftest import DEVICE
from test_window_softcap import CAP, HEADS, W, check_bhsd, position_kw, qkv_base
from test_varlen import check_varlen, packed_base, varlen_positions

FP16, FP32 = torch.float16, torch.float32


@pytest.fixture
def once(monkeypatch):
    monkeypatch.setattr(launch, "ROPE_STRATEGY", "once")


SCALINGS = {
    "plain": None,
    "pi": posattn.PI(2.0),
    "ntk": posattn.NTK(3.0),
    "dynamic_ntk": posattn.DynamicNTK(2.0, 8),
    "yarn": posattn.YaRN(4.0, 16),
    "llama3": posattn.Llama3(8.0, 16, 1.0, 4.0),
    "longrope": "longrope",
}


def _rope(name, D, rotary_dim=None, interleaved=False):
    scaling = SCALINGS[name]
    rd = rotary_dim or D
    if scaling == "longrope":
        scaling = posattn.LongRoPE([1.0 + 0.1 * i for i in range(rd // 2)],
                                   [2.0 + 0.2 * i for i in range(rd // 2)], 16)
    return posattn.RoPE(scaling=scaling, rotary_dim=rotary_dim, interleaved=interleaved)


# scaling, rotary (full / partial / interleaved partial), causal, window, softcap, dtype, heads,
# positions, B, Sq, Sk, D
CASES = [
    ("plain", "full", True, "None", None, FP16, "gqa", "default", 2, 37, 37, 32),
    ("pi", "partial", False, "4_2", CAP, FP32, "mha", "offset", 1, 29, 45, 40),
    ("ntk", "interleaved", True, "left5", None, FP32, "gqa", "explicit", 2, 33, 40, 32),
    ("dynamic_ntk", "full", False, "None", CAP, FP16, "mha", "explicit", 1, 41, 30, 16),
    ("yarn", "partial", True, "right3", None, FP16, "gqa", "offset", 1, 1, 67, 32),  # decode shape
    ("llama3", "interleaved", False, "0_0", None, FP32, "mha", "default", 1, 45, 45, 16),
    ("longrope", "full", True, "None", CAP, FP32, "gqa", "explicit", 1, 50, 50, 32),
]


def _case_id(c):
    return f"{c[0]}-{c[1]}-{'causal' if c[2] else 'full'}-w{c[3]}-{'cap' if c[4] else 'nocap'}-{c[7]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_once_matches_reference(once, case):
    scaling, rot, causal, win, cap, dtype, heads, pos, B, Sq, Sk, D = case
    Hq, Hkv = HEADS[heads]
    seed = CASES.index(case)
    rd = {"full": None, "partial": D // 2, "interleaved": D // 2}[rot]
    pe = _rope(scaling, D, rd, rot == "interleaved")
    base = qkv_base(B, Hq, Hkv, Sq, Sk, D, seed=30 + seed, q_scale=3.0 if cap else 1.0)
    kw = dict(causal=causal, window=W[win], softcap=cap, **position_kw(pos, B, Sq, Sk, seed))
    check_bhsd(base, pe, dtype, **kw)


@pytest.mark.parametrize("positions", ["default", "explicit"])
def test_once_varlen(once, positions):
    lens_q, lens_k = [5, 0, 17, 9], [5, 3, 17, 20]
    base = packed_base(lens_q, lens_k, 4, 2, 32, seed=7)
    kw = dict(causal=True)
    if positions == "explicit":
        kw.update(varlen_positions(lens_q, lens_k, seed=3))
    check_varlen(lens_q, lens_k, base, _rope("yarn", 32, 16), FP16, **kw)


def test_strategies_agree_and_once_runs_none_kernels(monkeypatch):
    """The same call under both strategies: outputs and gradients within a few ulps of each other
    (the rotations round differently: rotated then stored vs rotated in registers), and "once"
    launches the rotation pass and pe="none"'s attention kernels (ROT = none)."""
    base = qkv_base(1, 4, 2, 40, 40, 32, seed=3)
    pe = _rope("yarn", 32)
    res = {}
    for strategy in launch.ROPE_STRATEGIES:
        monkeypatch.setattr(launch, "ROPE_STRATEGY", strategy)
        q, k, v = (base[n].to(DEVICE, FP32).requires_grad_() for n in "qkv")
        out = posattn.attention(q, k, v, pe, causal=True, backend="triton")
        res[strategy] = (out,) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for a, b in zip(res["tile"], res["once"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)

    from posattn import _triton
    rec = _triton.kernel_pe(pe, 32, 4, "meta", None)
    q, k, v = (torch.empty(1, h, 2048, 32, device="meta", dtype=FP16) for h in (4, 2, 2))
    for strategy, want_rot in (("tile", 1), ("once", 0)):
        with launch.capture(90, rope=strategy) as launches:
            launch.attn_fwd(q, k, v, rec, launch.KernelPositions(), launch.Mask(causal=True), 0.1)
        names = [ln.fn.__name__ if hasattr(ln.fn, "__name__") else ln.fn.fn.__name__ for ln in launches]
        assert ("rope_apply_kernel" in names) == (strategy == "once"), names
        attn = [ln for ln in launches if ln.fn is launch.attn_fwd_kernel]
        assert attn and attn[0].kwargs["ROT"] == want_rot


def test_rule_and_override(monkeypatch):
    rec = launch.KernelPE(rot="rope", theta=torch.ones(4, dtype=torch.float64), rot_dim=8)
    pos = launch.KernelPositions()
    monkeypatch.delenv("POSATTN_ROPE", raising=False)
    n = launch.ROPE_ONCE_MIN_VISITS * launch.ROPE_VISIT_ROWS  # 4096

    def pick(Sq, Sk, causal=False, pe=rec):
        return launch.rope_strategy(pe, pos, Sq, Sk, causal)

    assert pick(1, 10 ** 5) == "tile"  # decode
    assert pick(n - 1, 10 ** 5) == "tile"  # a short chunk against a long cache
    assert pick(n, 10 ** 5) == "once"  # a long chunk: each K tile visited 32 times
    assert pick(n, n) == "once" and pick(n, n, causal=True) == "tile"  # causal: half the visits
    assert pick(2 * n, 2 * n, causal=True) == "once"  # causal training / prefill at 8k
    assert pick(n, 4 * n, causal=True) == "once"  # a chunk at the end of a cache sees it all
    assert pick(10 ** 6, 10 ** 6, pe=launch.KernelPE()) == "tile"  # not RoPE: no choice
    monkeypatch.setenv("POSATTN_ROPE", "once")
    assert pick(1, 1) == "once"
    monkeypatch.setenv("POSATTN_ROPE", "twice")
    with pytest.raises(ValueError, match="POSATTN_ROPE"):
        pick(1, 1)
