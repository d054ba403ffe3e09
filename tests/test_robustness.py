"""Robustness of posattn.attention: bad input gets a clear error, edge cases stay exact.

1. Bad input: every argument of ``posattn.attention`` and of the PE specs, through the public
   function and both backends. Each raises TypeError / ValueError naming the argument and what was
   expected, before any kernel launch, without touching the inputs.
2. Edge cases, forward and backward, kernel vs the float64 reference by flash-attention's rule
   (``helpers.assert_rule``) plus exact structural facts: decode (Sq = 1), Sk = 1, causal with
   Sq > Sk (rows that see no key), empty inputs (no launch), inputs x100, NaN inputs, non-contiguous
   q/k/v/dout, q and k the same tensor, RoPE positions at 1e6 for every scaling.
3. The NaN-filling fixture of conftest is active and reaches the launchers' allocations.
4. Determinism (CUDA only): forward and backward bitwise identical over 100 repeats.

Every kernel run also checks that no input (tensors, positions, PE parameters, dout) was modified.
Shapes are tiny and odd: on CPU the kernels run in the Triton interpreter.
"""
import ast
import os
import re

import pytest
import torch

import posattn
from posattn import (ALiBi, DynamicNTK, KERPLE, Llama3, LongRoPE, NTK, PI, RoPE, YaRN,
                     reference)
from posattn.testing import error_tolerance
from conftest import DEVICE, HAS_CUDA
from helpers import assert_rule, leaf, naive_attention, with_params
from attn_harness import (PES, assert_unmodified, gen, plain, rand, snapshot, check, dout_maker,
                          fwd_bwd, qkv, run_kernel)
from pe_cases import REGISTERED, pe_factory, with_causal

KERNEL_DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
OTHER_DEVICE = "cpu" if HAS_CUDA else "meta"
NAN, INF = float("nan"), float("inf")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# 1. Bad input
# --------------------------------------------------------------------------------------------

def _inputs(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=16, Dv=None, dtype=torch.float32):
    t = qkv(B, Hq, Hkv, Sq, Sk, D, Dv)
    return [t[n].to(DEVICE, dtype) for n in "qkv"]


def _bshd(q, k, v):
    return [t.transpose(1, 2) for t in (q, k, v)]


def _with(i, fn):
    """Replace argument i of (q, k, v) by fn(it)."""
    def mutate(q, k, v):
        a = [q, k, v]
        a[i] = fn(a[i])
        return a
    return mutate


QKV_ERRORS = [
    # (id, mutate(q, k, v) -> [q, k, v], extra kwargs, exception, match)
    ("q_3d", _with(0, lambda t: t[0]), {}, ValueError, r"q must be 4-D \(B, H, S, D\) for layout='bhsd', got shape \(4, 5, 16\)"),
    ("k_5d", _with(1, lambda t: t[None]), {}, ValueError, r"k must be 4-D .*got shape \(1, 2, 2, 7, 16\)"),
    ("v_2d", _with(2, lambda t: t[0, 0]), {}, ValueError, r"v must be 4-D .*got shape \(7, 16\)"),
    ("q_3d_bshd", lambda q, k, v: [q[0]] + _bshd(q, k, v)[1:], dict(layout="bshd"), ValueError,
     r"q must be 4-D \(B, S, H, D\) for layout='bshd'"),
    ("batch_k", _with(1, lambda t: t[:1]), {}, ValueError, r"batch sizes differ: q 2, k 1, v 2"),
    ("batch_v", _with(2, lambda t: t[:1]), {}, ValueError, r"batch sizes differ: q 2, k 2, v 1"),
    ("head_dim_k", _with(1, lambda t: t[..., :8]), {}, ValueError, r"head dim of k \(8\) differs from q \(16\)"),
    ("heads_v", _with(2, lambda t: t[:, :1]), {}, ValueError, r"v \(heads, length\) \(1, 7\) must match k's \(2, 7\)"),
    ("length_v", _with(2, lambda t: t[:, :, :6]), {}, ValueError, r"v \(heads, length\) \(2, 6\) must match k's \(2, 7\)"),
    ("length_v_bshd", lambda q, k, v: _bshd(q, k, v[:, :, :6]), dict(layout="bshd"), ValueError,
     r"v \(heads, length\) \(2, 6\) must match k's \(2, 7\)"),
    ("gqa_ratio", lambda q, k, v: [q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3]], {},
     ValueError, r"Hq=4 must be a positive multiple of Hkv=3"),
    ("hkv_gt_hq", lambda q, k, v: [q, k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1)], {}, ValueError,
     r"Hq=4 must be a positive multiple of Hkv=8"),
    ("hkv_zero", lambda q, k, v: [q, k[:, :0], v[:, :0]], {}, ValueError, r"positive multiple of Hkv=0"),
    ("layout_mismatch", lambda q, k, v: [q, k, v], dict(layout="bshd"), ValueError,
     r"Hq=5 must be a positive multiple of Hkv=7"),  # bhsd tensors read as bshd
    ("head_dim_zero", lambda q, k, v: [q[..., :0], k[..., :0], v], {}, ValueError, r"head dims must be positive, got D=0"),
    ("value_dim_zero", _with(2, lambda t: t[..., :0]), {}, ValueError, r"head dims must be positive, got D=16, Dv=0"),
    ("q_int32", _with(0, lambda t: t.int()), {}, TypeError, r"q must be float16, bfloat16, float32 or float64, got torch.int32"),
    ("k_int64", _with(1, lambda t: t.long()), {}, TypeError, r"k must be float16, .*got torch.int64"),
    ("v_bool", _with(2, lambda t: t > 0), {}, TypeError, r"v must be float16, .*got torch.bool"),
    ("v_uint8", _with(2, lambda t: t.to(torch.uint8)), {}, TypeError, r"v must be float16, .*got torch.uint8"),
    ("q_complex64", _with(0, lambda t: t.to(torch.complex64)), {}, TypeError, r"q must be float16, .*got torch.complex64"),
    ("k_complex128", _with(1, lambda t: t.to(torch.complex128)), {}, TypeError, r"k must be float16, .*got torch.complex128"),
    ("k_dtype_mismatch", _with(1, lambda t: t.half()), {}, TypeError, r"k.dtype=torch.float16 differs from q.dtype=torch.float32"),
    ("v_dtype_mismatch", _with(2, lambda t: t.double()), {}, TypeError, r"v.dtype=torch.float64 differs from q.dtype=torch.float32"),
    ("q_numpy", _with(0, lambda t: t.cpu().numpy()), {}, TypeError, r"q must be a torch.Tensor, got ndarray"),
    ("k_list", _with(1, lambda t: t.tolist()), {}, TypeError, r"k must be a torch.Tensor, got list"),
    ("v_none", _with(2, lambda t: None), {}, TypeError, r"v must be a torch.Tensor, got NoneType"),
    ("k_other_device", _with(1, lambda t: t.to(OTHER_DEVICE)), {}, ValueError, rf"k is on {OTHER_DEVICE}.* but q is on {DEVICE}"),
    ("v_other_device", _with(2, lambda t: t.to(OTHER_DEVICE)), {}, ValueError, rf"v is on {OTHER_DEVICE}.* but q is on {DEVICE}"),
]

# (id, kwargs factory, exception, match); inputs B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=16
KW_ERRORS = [
    ("layout_unknown", lambda: dict(layout="sbhd"), ValueError, r"layout must be one of \('bhsd', 'bshd'\), got 'sbhd'"),
    ("layout_case", lambda: dict(layout="BHSD"), ValueError, r"layout must be one of"),
    ("layout_none", lambda: dict(layout=None), ValueError, r"layout must be one of .*got None"),
    ("backend_unknown", lambda: dict(backend="flash"), ValueError,
     r"backend must be one of \('auto', 'triton', 'cpu', 'reference'\), got 'flash'"),
    ("causal_int", lambda: dict(causal=1), TypeError, r"causal must be a bool, got int"),
    ("causal_str", lambda: dict(causal="yes"), TypeError, r"causal must be a bool, got str"),
    ("causal_none", lambda: dict(causal=None), TypeError, r"causal must be a bool, got NoneType"),
    ("scale_nan", lambda: dict(scale=NAN), ValueError, r"scale must be a finite float or None, got nan"),
    ("scale_inf", lambda: dict(scale=INF), ValueError, r"scale must be a finite float or None, got inf"),
    ("scale_neg_inf", lambda: dict(scale=-INF), ValueError, r"scale must be a finite float"),
    ("scale_str", lambda: dict(scale="0.1"), (TypeError, ValueError), r"scale must be a finite float"),
    ("scale_bool", lambda: dict(scale=True), (TypeError, ValueError), r"scale must be a finite float"),
    ("scale_tensor", lambda: dict(scale=torch.tensor(0.5)), (TypeError, ValueError), r"scale must be a finite float"),
    # the names listed: every registered PE and the alias "kerple" (KERPLE's default kind)
    ("pe_unknown", lambda: dict(pe="no_such_pe"), ValueError,
     r"pe must be one of " + re.escape(str(sorted(set(REGISTERED) | {"kerple"}))) + r".*got 'no_such_pe'"),
    ("pe_int", lambda: dict(pe=3), TypeError, r"pe must be a str or a posattn PE spec .*got int"),
    ("pe_class", lambda: dict(pe=RoPE), TypeError, r"pe must be a str or a posattn PE spec .*got type"),
    ("pe_dict", lambda: dict(pe={"rope": 1}), TypeError, r"pe must be a str or a posattn PE spec .*got dict"),
    # positions
    ("qpos_length", lambda: dict(q_positions=torch.arange(4)), ValueError,
     r"q_positions must have shape \(5,\) or \(2, 5\), got \(4,\)"),
    ("kpos_batch", lambda: dict(k_positions=torch.zeros(3, 7, dtype=torch.long)), ValueError,
     r"k_positions must have shape \(7,\) or \(2, 7\), got \(3, 7\)"),
    ("qpos_transposed", lambda: dict(q_positions=torch.zeros(5, 2, dtype=torch.long)), ValueError,
     r"q_positions must have shape \(5,\) or \(2, 5\), got \(5, 2\)"),
    ("qpos_3d", lambda: dict(q_positions=torch.zeros(1, 2, 5, dtype=torch.long)), ValueError,
     r"q_positions must have shape \(5,\) or \(2, 5\), got \(1, 2, 5\)"),
    ("kpos_0d", lambda: dict(k_positions=torch.tensor(3)), ValueError, r"k_positions must have shape \(7,\)"),
    ("qpos_float", lambda: dict(q_positions=torch.arange(5.0)), TypeError,
     r"q_positions must be an integer tensor.*got dtype torch.float32"),
    ("kpos_bool", lambda: dict(k_positions=torch.ones(7, dtype=torch.bool)), TypeError,
     r"k_positions must be an integer tensor.*got dtype torch.bool"),
    ("kpos_complex", lambda: dict(k_positions=torch.zeros(7, dtype=torch.complex64)), TypeError,
     r"k_positions must be an integer tensor"),
    ("qpos_float_scalar", lambda: dict(q_positions=1.5), TypeError, r"q_positions must be None, an int or an integer tensor"),
    ("qpos_bool_scalar", lambda: dict(q_positions=True), TypeError, r"q_positions must be None, an int.*got a bool"),
    ("kpos_list", lambda: dict(k_positions=list(range(7))), TypeError, r"k_positions must be None, an int or an integer tensor; got list"),
    ("kpos_int_too_big", lambda: dict(k_positions=2 ** 31), ValueError, r"k_positions=2147483648 with 7 tokens does not fit in int32"),
    ("qpos_int_too_small", lambda: dict(q_positions=-(2 ** 31)), ValueError, r"q_positions=-2147483648 .* does not fit in int32"),
    ("qpos_other_device", lambda: dict(q_positions=torch.arange(5, device=OTHER_DEVICE)), ValueError,
     rf"q_positions is on {OTHER_DEVICE}.* but q is on {DEVICE}"),
    # RoPE
    ("rope_rotary_odd", lambda: dict(pe=RoPE(rotary_dim=7)), ValueError, r"rotary_dim must be even and in \[2, head_dim=16\], got 7"),
    ("rope_rotary_big", lambda: dict(pe=RoPE(rotary_dim=32)), ValueError, r"rotary_dim must be even and in \[2, head_dim=16\], got 32"),
    ("rope_rotary_zero", lambda: dict(pe=RoPE(rotary_dim=0)), ValueError, r"rotary_dim must be even"),
    ("rope_rotary_float", lambda: dict(pe=RoPE(rotary_dim=8.0)), TypeError, r"rotary_dim must be an int or None"),
    ("rope_base_nan", lambda: dict(pe=RoPE(base=NAN)), ValueError, r"base must be a finite number > 1, got nan"),
    ("rope_base_inf", lambda: dict(pe=RoPE(base=INF)), ValueError, r"base must be a finite number > 1, got inf"),
    ("rope_base_one", lambda: dict(pe=RoPE(base=1.0)), ValueError, r"base must be a finite number > 1, got 1.0"),
    ("rope_base_str", lambda: dict(pe=RoPE(base="1e4")), TypeError, r"base must be a real number"),
    ("rope_scaling_str", lambda: dict(pe=RoPE(scaling="yarn")), TypeError, r"scaling must be None or a RoPEScaling"),
    ("pi_factor_zero", lambda: dict(pe=RoPE(scaling=PI(0.0))), ValueError, r"factor must be a finite number > 0, got 0.0"),
    ("pi_factor_nan", lambda: dict(pe=RoPE(scaling=PI(NAN))), ValueError, r"factor must be a finite number > 0, got nan"),
    ("ntk_factor_neg", lambda: dict(pe=RoPE(scaling=NTK(-2.0))), ValueError, r"factor must be a finite number > 0"),
    ("ntk_rotary_two", lambda: dict(pe=RoPE(rotary_dim=2, scaling=NTK(2.0))), ValueError, r"NTK needs rotary_dim > 2"),
    ("dyn_orig_zero", lambda: dict(pe=RoPE(scaling=DynamicNTK(2.0, 0))), ValueError,
     r"original_max_position must be a positive integer, got 0"),
    ("dyn_orig_float", lambda: dict(pe=RoPE(scaling=DynamicNTK(2.0, 1.5))), TypeError,
     r"original_max_position must be a positive integer"),
    ("yarn_factor_inf", lambda: dict(pe=RoPE(scaling=YaRN(INF, 4096))), ValueError, r"factor must be a finite number > 0, got inf"),
    ("yarn_betas", lambda: dict(pe=RoPE(scaling=YaRN(4.0, 4096, beta_fast=1, beta_slow=32))), ValueError,
     r"beta_fast must be >= beta_slow"),
    ("yarn_attention_factor_nan", lambda: dict(pe=RoPE(scaling=YaRN(4.0, 4096, attention_factor=NAN))), ValueError,
     r"attention_factor must be a finite number > 0"),
    ("llama3_bands", lambda: dict(pe=RoPE(scaling=Llama3(8.0, 8192, low_freq_factor=4.0, high_freq_factor=1.0))),
     ValueError, r"high_freq_factor must be > low_freq_factor"),
    ("longrope_length", lambda: dict(pe=RoPE(scaling=LongRoPE([1.0] * 3, [2.0] * 3, 16))), ValueError,
     r"short_factor must have rotary_dim // 2 = 8 entries, got 3"),
    ("longrope_nan", lambda: dict(pe=RoPE(scaling=LongRoPE([1.0] * 8, [NAN] * 8, 16))), ValueError,
     r"long_factor entries must be finite and > 0"),
    ("longrope_zero", lambda: dict(pe=RoPE(scaling=LongRoPE([0.0] * 8, [1.0] * 8, 16))), ValueError,
     r"short_factor entries must be finite and > 0"),
    # ALiBi
    ("slopes_length", lambda: dict(pe=ALiBi(torch.ones(3, device=DEVICE))), ValueError,
     r"slopes must have shape \(num_heads,\) = \(4,\), got \(3,\)"),
    ("slopes_broadcast", lambda: dict(pe=ALiBi(torch.ones(1, device=DEVICE))), ValueError,
     r"slopes must have shape \(num_heads,\) = \(4,\), got \(1,\)"),
    ("slopes_per_batch", lambda: dict(pe=ALiBi(torch.ones(2, 4, device=DEVICE))), ValueError,
     r"slopes must have shape \(num_heads,\) = \(4,\), got \(2, 4\)"),
    ("slopes_nan", lambda: dict(pe=ALiBi(torch.tensor([0.5, NAN, 0.1, 0.2], device=DEVICE))), ValueError,
     r"slopes must be finite"),
    ("slopes_inf", lambda: dict(pe=ALiBi(torch.tensor([0.5, INF, 0.1, 0.2], device=DEVICE))), ValueError,
     r"slopes must be finite"),
    ("slopes_int", lambda: dict(pe=ALiBi(torch.ones(4, dtype=torch.int64, device=DEVICE))), TypeError,
     r"slopes must be a floating tensor"),
    ("slopes_list", lambda: dict(pe=ALiBi([0.5] * 4)), TypeError, r"slopes must be None or a floating torch.Tensor"),
    ("slopes_other_device", lambda: dict(pe=ALiBi(torch.ones(4, device=OTHER_DEVICE))), ValueError,
     r"slopes must be on the inputs' device"),
    # KERPLE
    ("kerple_kind", lambda: dict(pe=KERPLE("cubic")), ValueError, r"kind must be one of \('log', 'power'\), got 'cubic'"),
    ("kerple_r1_zero", lambda: dict(pe=KERPLE("log", 0.0)), ValueError, r"r1 must be a finite number > 0, got 0.0"),
    ("kerple_r1_nan", lambda: dict(pe=KERPLE("log", NAN)), ValueError, r"r1 must be a finite number > 0, got nan"),
    ("kerple_r2_neg", lambda: dict(pe=KERPLE("power", 1.0, -1.0)), ValueError, r"r2 must be a finite number > 0, got -1.0"),
    ("kerple_r2_inf", lambda: dict(pe=KERPLE("power", 1.0, INF)), ValueError, r"r2 must be a finite number > 0, got inf"),
    ("kerple_r1_tensor_neg", lambda: dict(pe=KERPLE("log", torch.tensor([1.0, -1.0, 1.0, 1.0], device=DEVICE))),
     ValueError, r"r1 must be > 0 for every head"),
    ("kerple_r2_tensor_zero", lambda: dict(pe=KERPLE("power", 1.0, torch.tensor([1.0, 0.0, 1.0, 1.0], device=DEVICE))),
     ValueError, r"r2 must be > 0 for every head"),
    ("kerple_r2_tensor_nan", lambda: dict(pe=KERPLE("log", 1.0, torch.tensor([1.0, NAN, 1.0, 1.0], device=DEVICE))),
     ValueError, r"r2 must be finite"),
    ("kerple_r1_shape", lambda: dict(pe=KERPLE("log", torch.ones(2, device=DEVICE))), ValueError,
     r"r1 must have shape \(num_heads,\) = \(4,\), got \(2,\)"),
    ("kerple_r2_int", lambda: dict(pe=KERPLE("log", 1.0, torch.ones(4, dtype=torch.int32))), TypeError,
     r"r2 must be a floating tensor"),
    ("kerple_r1_str", lambda: dict(pe=KERPLE("log", "1")), TypeError, r"r1 must be a real number"),
    ("kerple_r1_other_device", lambda: dict(pe=KERPLE("log", torch.ones(4, device=OTHER_DEVICE))), ValueError,
     r"r1 must be on the inputs' device"),
]


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test (errors must come before; empty inputs launch nothing)."""
    from posattn.kernels import launch

    def fail(*a, **k):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(launch, "attn_fwd", fail)
    monkeypatch.setattr(launch, "attn_bwd", fail)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", QKV_ERRORS, ids=[c[0] for c in QKV_ERRORS])
def test_tensor_argument_errors(case, backend, no_launch):
    _, mutate, kw, exc, match = case
    args = mutate(*_inputs())
    snap = snapshot(*[a for a in args if isinstance(a, torch.Tensor)])
    with pytest.raises(exc, match=match):
        posattn.attention(*args, backend=backend, **kw)
    assert_unmodified(snap)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", KW_ERRORS, ids=[c[0] for c in KW_ERRORS])
def test_keyword_argument_errors(case, backend, no_launch):
    """Spec constructors run inside ``pytest.raises``: an error from the constructor or from the
    call both count, as long as it names the argument and what was expected."""
    _, make_kw, exc, match = case
    q, k, v = _inputs()
    snap = snapshot(q, k, v)
    with pytest.raises(exc, match=match):
        kw = dict(dict(backend=backend), **make_kw())
        posattn.attention(q, k, v, **kw)
    assert_unmodified(snap)


def test_rope_on_odd_head_dim_names_head_dim(no_launch):
    q, k, v = _inputs(D=15)
    with pytest.raises(ValueError, match=r"rotary_dim must be even and in \[2, head_dim=15\], got 15"):
        posattn.attention(q, k, v, "rope", backend="triton")


# BUG (minor): Hq = 0 passes posattn/api.py's GQA check (``Hkv == 0 or Hq % Hkv``: 0 % Hkv == 0,
# although the message says "a positive multiple"), so pe="none" returns an empty result while
# every other PE raises "num_heads must be a positive integer, got 0" from PE.check -- an argument
# posattn.attention does not have. Either outcome is defensible; they should agree (and an error
# should name Hq / q).
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_zero_query_heads_consistent_across_pes(backend):
    q, k, v = _inputs(Hq=0, Hkv=2)
    outcomes = {}
    for pe in REGISTERED:
        try:
            out = posattn.attention(q, k, v, pe, backend=backend)
            outcomes[pe] = f"empty {tuple(out.shape)}"
        except ValueError as e:
            outcomes[pe] = "ValueError" + (" naming Hq/q" if ("Hq" in str(e) or "q " in str(e)) else f": {e}")
    kinds = len(set(outcomes.values()))
    assert kinds == 1, f"Hq=0 handled differently per PE: {outcomes}"


def test_triton_backend_rejects_float64(no_launch):
    q, k, v = _inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"backend='triton' supports float16, bfloat16 and float32 inputs, got torch.float64"):
        posattn.attention(q, k, v, backend="triton")


# BUG: explicit position tensors are not range-checked. Their values are cast to int32 for the
# kernels (posattn/_triton.py, kernel_positions: ``p.tensor.to(torch.int32)``) and the kernels
# form q_pos - k_pos in int32, but posattn/positions.py parse_positions only checks the tensor's
# dtype and shape (the int path refuses |start| > 2**30). So positions past 2**31 wrap silently
# (wrong causal mask, wrong RoPE angles) and in-range positions whose difference overflows int32
# give wrong ALiBi / KERPLE distances. The reference (int64) gets them right.
@pytest.mark.parametrize("pe,causal,qpos,kpos", [
    ("none", True, [2 ** 31 - 2 + i for i in range(5)], [2 ** 31 - 4 + i for i in range(7)]),
    ("rope", False, [2 ** 31 - 2 + i for i in range(5)], [2 ** 31 - 4 + i for i in range(7)]),
    ("alibi", False, [2 ** 31 - 1 - i for i in range(5)], [-(2 ** 31) + 1] + [2 ** 31 - 10 * i for i in range(1, 7)]),
], ids=["beyond_int32_causal", "beyond_int32_rope", "difference_overflows_alibi"])
def test_position_tensors_beyond_int32_are_refused_or_exact(pe, causal, qpos, kpos):
    q, k, v = _inputs(B=1)
    kw = dict(causal=causal, q_positions=torch.tensor(qpos, device=DEVICE),
              k_positions=torch.tensor(kpos, device=DEVICE))
    try:
        out = posattn.attention(q, k, v, pe, backend="triton", **kw)
    except ValueError as e:  # refusing is fine, if the message names the argument
        assert "_positions" in str(e), str(e)
        return
    ref = posattn.attention(q.double(), k.double(), v.double(), pe, backend="reference", **kw)
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-4, f"silently wrong result for positions beyond int32 (max error {err:.3g})"


def test_validation_survives_python_O():
    """User errors are raised with if/raise, never ``assert`` (stripped by ``python -O``)."""
    for rel in ("posattn/api.py", "posattn/pe.py", "posattn/positions.py", "posattn/_triton.py"):
        tree = ast.parse(open(os.path.join(ROOT, rel), encoding="utf-8").read())
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not asserts, f"{rel} validates with assert at lines {asserts}"


# --------------------------------------------------------------------------------------------
# 2. Edge cases, exact against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pe,causal", with_causal(REGISTERED))
def test_decode_single_query(pe, causal, dtype):
    """Sq = 1 (decode step with a KV cache), GQA, Sk crossing a tile boundary."""
    check(qkv(1, 2, 1, 1, 37, 16), plain, PES[pe](2, 16), dtype, causal=causal)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pe,causal", with_causal(REGISTERED))
def test_single_key(pe, causal, dtype):
    """Sk = 1: with causal and the default alignment only the last query sees the key."""
    res = check(qkv(1, 2, 1, 5, 1, 16, Dv=8), plain, PES[pe](2, 16), dtype, causal=causal)
    out, lse, grads = res["kernel"]
    if causal:
        assert (out[:, :, :4] == 0).all() and (lse[:, :, :4] == -INF).all()
        assert (grads["q"][:, :, :4] == 0).all()


@pytest.mark.parametrize("pe", REGISTERED)
@pytest.mark.parametrize("positions", ["default", "explicit"])
def test_causal_rows_that_see_no_key(pe, positions):
    """Causal with Sq > Sk (default positions: the first Sq - Sk queries precede every key), and
    explicit positions where scattered queries precede every key: those rows output exactly 0,
    LSE -inf, and get exactly zero (finite) gradients; the rest follows the rule."""
    B, Hq, Hkv, Sq, Sk, D = 2, 2, 1, 45, 20, 16
    kw = dict(causal=True)
    if positions == "default":
        blind = torch.zeros(B, Sq, dtype=torch.bool)
        blind[:, :Sq - Sk] = True
    else:
        qp = torch.randint(-10, 30, (B, Sq), generator=gen(5))
        kp = torch.sort(torch.randint(0, 30, (B, Sk), generator=gen(6)), dim=1).values
        blind = qp < kp.min(dim=1, keepdim=True).values
        assert blind.any() and not blind.all()
        kw.update(q_positions=qp.to(DEVICE), k_positions=kp.to(DEVICE))
    res = check(qkv(B, Hq, Hkv, Sq, Sk, D), plain, PES[pe](Hq, D), torch.float16, **kw)
    out, lse, grads = res["kernel"]
    rows = blind.to(DEVICE)[:, None, :].expand(B, Hq, Sq)
    assert (out[rows] == 0).all()
    assert (lse[rows] == -INF).all() and torch.isfinite(lse[~rows]).all()
    assert (grads["q"][rows] == 0).all()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"d{name} not finite"


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("pe", ["none", "rope", "alibi", "kerple_power", "dynamic_ntk"])
@pytest.mark.parametrize("shape", [(0, 4, 2, 5, 7), (2, 4, 2, 0, 7), (2, 4, 2, 5, 0), (0, 4, 2, 0, 0)],
                         ids=["B0", "Sq0", "Sk0", "all0"])
def test_empty_inputs(shape, pe, backend, no_launch):
    """B = 0 or S = 0: an empty (or all-zero, LSE -inf) result and zero gradients, no launch."""
    B, Hq, Hkv, Sq, Sk = shape
    spec = pe_factory(pe)(Hq, 16)  # dynamic_ntk: a RoPE variant (tests/pe_cases.py)
    q, k, v = (t.requires_grad_() for t in _inputs(B, Hq, Hkv, Sq, Sk, 16, Dv=8))
    out, lse = posattn.attention(q, k, v, spec, return_lse=True, backend=backend)
    assert out.shape == (B, Hq, Sq, 8) and out.dtype == q.dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert (out == 0).all() and (lse == -INF).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)
    for t, g in ((q, dq), (k, dk), (v, dv)):
        assert g is None or (g.shape == t.shape and (g == 0).all())
    # explicit positions too (they are validated, then nothing runs)
    out = posattn.attention(q, k, v, spec, backend=backend, q_positions=torch.arange(Sq, device=DEVICE),
                            k_positions=torch.zeros(B, Sk, dtype=torch.int32, device=DEVICE))
    assert out.shape == (B, Hq, Sq, 8) and (out == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pe", ["none", "rope", "alibi", "kerple_log"])
def test_inputs_times_100(pe, causal):
    """q, k, v x100 (logits ~1e4, one-hot softmax rows): nothing overflows in fp16 (where the
    naive fp16 math does) or fp32; fp32 exact against the reference (forward by the rule, backward
    by the rule plus flash-attention's rounding terms); fp16 forward within one fp16 rounding."""
    B, Hq, Hkv, S, D = 1, 2, 1, 37, 16
    base = qkv(B, Hq, Hkv, S, S, D, scale=100.0)
    spec = PES[pe](Hq, D)
    kw = dict(causal=causal)

    # fp16: no overflow anywhere, while the naive fp16 math overflows
    out, lse, grads = run_kernel(base, plain, spec, torch.float16, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    qh, kh, vh = (base[n].to(DEVICE, torch.float16) for n in "qkv")
    outn16, _ = naive_attention(qh, kh, vh, with_params(spec, leaf), torch.float16, **kw)
    assert not torch.isfinite(outn16).all(), "x100 should overflow the naive fp16 math"
    with torch.no_grad():
        out64 = posattn.attention(qh.double(), kh.double(), vh.double(),
                                  with_params(spec, lambda t: leaf(t, torch.float64)),
                                  backend="reference", **kw)
    err = (out.double() - out64).abs().max().item()
    assert err <= error_tolerance(0.0, out64, torch.float16, 2), f"fp16 out error {err:.3g}"

    # fp32: forward by the rule; backward by the rule + flash-attention's rounding terms
    # (attn_harness.BackwardTerms: at logits ~1e4 the fp32 LSE that the backward recomputes P
    # from carries ~1e-3 relative error, and dS cancels on one-hot rows)
    check(base, plain, spec, torch.float32, **kw)


def _nan_rows_and_keys(which, S, Hq, Hkv):
    """For a NaN at (b=0, head 0, position 5): the (head, query) rows that attend to it and the
    (kv head, key) rows those rows attend to (causal, default positions, Sq = Sk = S)."""
    g = Hq // Hkv
    rows = torch.zeros(Hq, S, dtype=torch.bool)
    if which == "q":
        rows[0, 5] = True
    else:  # a key / value at position 5 of kv head 0 is seen by its group's queries 5..S-1
        rows[:g, 5:] = True
    keys = torch.zeros(Hkv, S, dtype=torch.bool)
    for h, i in rows.nonzero().tolist():
        keys[h // g, :i + 1] = True
    return rows, keys


# BUG: a NaN in q or k is hidden in the LSE and in dK/dV. In kernels/attn_fwd.py (end of
# attn_fwd_kernel) ``seen = l_i > 0`` is False for l_i = NaN, so a row whose scores contain a NaN
# is classified as "saw no key": its LSE is stored as -inf (the reference gives NaN). The backward
# kernels then map LSE -inf to P = 0 (``lse2 = where(lse == -inf, +inf, ...)``) and drop that
# row's contribution, so dV (and dK) of the keys it attends to come out finite instead of NaN.
# Fix: test ``l_i == 0`` (or ``~(l_i > 0) & (l_i == l_i)``) instead of ``l_i > 0``.
@pytest.mark.parametrize("pe", ["none", "rope", "alibi"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nan_input_is_never_hidden(which, pe):
    """Every row that attends to a NaN reports NaN (output, LSE for q/k, gradients); slices that
    do not share the NaN's batch stay finite."""
    B, Hq, Hkv, S, D = 2, 2, 1, 37, 16
    L = {n: t.to(DEVICE, torch.float16) for n, t in qkv(B, Hq, Hkv, S, S, D).items()}
    L[which][0, 0, 5, 3] = NAN
    L = {n: t.requires_grad_() for n, t in L.items()}
    out, lse = posattn.attention(L["q"], L["k"], L["v"], PES[pe](Hq, D), causal=True,
                                 return_lse=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (L["q"], L["k"], L["v"]), rand(*out.shape, seed=9).to(out))
    rows, keys = _nan_rows_and_keys(which, S, Hq, Hkv)
    rows, keys = rows.to(DEVICE), keys.to(DEVICE)
    nan_rows = lambda t: torch.isnan(t).any(-1)  # noqa: E731
    assert nan_rows(out[0])[rows].all(), "an output row that attends to the NaN is not NaN"
    assert nan_rows(dq[0])[rows].all(), "a dq row that attends to the NaN is not NaN"
    assert nan_rows(dk[0])[keys].all(), "dk of a key attended by a NaN row is not NaN"
    if which in "qk":
        hidden = lse[0][rows & ~torch.isnan(lse[0])]
        assert hidden.numel() == 0, f"LSE hides the NaN in {hidden.numel()} rows: {hidden[:4].tolist()} (expected nan)"
        assert nan_rows(dv[0])[keys].all(), "dv of a key attended by a NaN row is not NaN"
    # batch 1 holds no NaN and shares nothing with batch 0
    for t in (out[1], lse[1], dq[1], dk[1], dv[1]):
        assert torch.isfinite(t).all()


def _bshd_storage(L):
    """bshd-contiguous storage read as (B, H, S, D) views."""
    return tuple(L[n].transpose(1, 2) for n in "qkv")


LAYOUTS = {
    # name: (base tensors, build(L) -> q, k, v, layout kwarg, dout re-layout)
    "bshd_storage_as_bhsd": (
        {n: t.transpose(1, 2).contiguous() for n, t in qkv(2, 4, 2, 17, 23, 16).items()},
        _bshd_storage, "bhsd", lambda d: d.transpose(1, 2).contiguous().transpose(1, 2)),
    "bhsd_storage_as_bshd": (
        qkv(2, 4, 2, 17, 23, 16), lambda L: tuple(L[n].transpose(1, 2) for n in "qkv"), "bshd", None),
    "sliced_rows": (
        qkv(1, 2, 2, 34, 46, 16),
        lambda L: (L["q"][:, :, ::2], L["k"][:, :, 1::2], L["v"][:, :, 1::2]), "bhsd",
        lambda d: torch.stack((d, d), 3).flatten(2, 3)[:, :, ::2]),
    "sliced_head_dim": (  # q: last-dim stride 2 (copied); k, v: padded rows (stride 24, no copy)
        {"q": rand(1, 2, 17, 32), "k": rand(1, 2, 23, 24, seed=1), "v": rand(1, 2, 23, 24, seed=2)},
        lambda L: (L["q"][..., ::2], L["k"][..., 4:20], L["v"][..., :16]), "bhsd",
        lambda d: torch.stack((d, d), -1).flatten(-2)[..., ::2]),
    "expanded_batch_and_heads": (  # k shared by the batch, v by the kv heads: stride 0
        {"q": rand(2, 4, 17, 16), "k": rand(1, 2, 23, 16, seed=1), "v": rand(2, 1, 23, 16, seed=2)},
        lambda L: (L["q"], L["k"].expand(2, 2, 23, 16), L["v"].expand(2, 2, 23, 16)), "bhsd",
        lambda d: d[:, :, :1].expand_as(d)),  # dout constant along the sequence: stride 0
    "dout_all_stride0": (
        qkv(1, 2, 1, 17, 23, 16), plain, "bhsd", lambda d: d.new_ones(()).expand_as(d)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_noncontiguous_inputs(name):
    """Transposed, sliced and expanded q/k/v/dout: bitwise the same result as the same values in
    contiguous memory, and exact against the reference."""
    base, build, layout, arrange = LAYOUTS[name]
    q = build(base)[0]
    Hq = q.shape[1] if layout == "bhsd" else q.shape[2]
    pe = PES[REGISTERED[list(LAYOUTS).index(name) % len(REGISTERED)]](Hq, 16)
    kw = dict(causal=True, layout=layout)
    res = check(base, build, pe, torch.float16, arrange=arrange, **kw)

    def contiguous_build(L):
        return tuple(t.contiguous() for t in build(L))

    def contiguous_arrange(d):
        return (arrange(d) if arrange is not None else d).contiguous()

    out_c, lse_c, g_c = run_kernel(base, contiguous_build, pe, torch.float16,
                                   arrange=contiguous_arrange, **kw)
    out, lse, grads = res["kernel"]
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for n in grads:
        assert torch.equal(grads[n], g_c[n]), f"d{n} depends on the memory layout"


@pytest.mark.parametrize("shared", ["q_is_k", "q_is_k_is_v"])
@pytest.mark.parametrize("pe", ["none", "rope", "alibi"])
def test_same_tensor_as_q_and_k(pe, shared):
    """The same tensor (one autograd leaf) passed as q and k (and v): gradients add up."""
    base = {"x": rand(1, 2, 21, 16), "v": rand(1, 2, 21, 16, seed=1)}
    if shared == "q_is_k":
        build = lambda L: (L["x"], L["x"], L["v"])  # noqa: E731
    else:
        base.pop("v")
        build = lambda L: (L["x"], L["x"], L["x"])  # noqa: E731
    check(base, build, PES[pe](2, 16), torch.float16, causal=True)


ROPE_SCALINGS = {
    "default": None,
    "pi": PI(4.0),
    "ntk": NTK(4.0),
    "dynamic_ntk": DynamicNTK(4.0, 4096),
    "yarn": YaRN(8.0, 4096),
    "llama3": Llama3(8.0, 8192),
    "longrope": LongRoPE([1.0 + 0.1 * i for i in range(8)], [2.0 + 0.5 * i for i in range(8)], 4096,
                         factor=16.0),
}


def _fp32_angle_cos_sin(spec, head_dim, pos, cur_len):
    """reference.rope_cos_sin with the angle position * inv_freq formed in float32."""
    inv_freq, factor = spec.frequencies(head_dim, cur_len)
    angle = (pos.to(torch.float32)[..., None] * inv_freq.to(device=pos.device, dtype=torch.float32)).double()
    return torch.cos(angle) * factor, torch.sin(angle) * factor


@pytest.mark.parametrize("positions", ["contiguous", "explicit"])
@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_rope_at_position_1e6(scaling, positions, monkeypatch):
    """Positions ~1e6 (far beyond any training length), every RoPE scaling, forward and backward:
    the kernel matches the fp64 reference by the rule in fp32. The test would catch fp32 angles:
    the same rotation with position * inv_freq rounded to fp32 (off by up to ~0.03 rad at 1e6) is
    shown to miss the tolerance used here by more than 100x."""
    B, H, Sq, Sk, D = 1, 2, 13, 21, 16
    pe = RoPE(scaling=ROPE_SCALINGS[scaling])
    if positions == "contiguous":  # the kernels' angle-addition path
        kw = dict(causal=True, q_positions=10 ** 6 + 8, k_positions=10 ** 6)
    else:  # explicit tensors: the direct (per-element angle) path
        kp = 10 ** 6 + torch.cumsum(torch.randint(1, 5, (B, Sk), generator=gen(1)), 1)
        qp = 10 ** 6 + 11 + torch.cumsum(torch.randint(1, 4, (B, Sq), generator=gen(2)), 1)
        kw = dict(causal=True, q_positions=qp.to(DEVICE), k_positions=kp.to(DEVICE))
    dtype = torch.float32
    res = check(qkv(B, H, H, Sq, Sk, D), plain, pe, dtype, **kw)
    out64, outn = res["ref"][0], res["naive"][0]
    tol = error_tolerance((outn.double() - out64).abs().max().item(), out64, dtype, 2)

    monkeypatch.setattr(reference, "rope_cos_sin", _fp32_angle_cos_sin)
    q, k, v = (qkv(B, H, H, Sq, Sk, D)[n].to(DEVICE).double() for n in "qkv")
    out_fp32_angles = posattn.attention(q, k, v, pe, backend="reference", **kw)
    err = (out_fp32_angles - out64).abs().max().item()
    assert err > 100 * tol, f"fp32 angles would pass unnoticed: error {err:.3g} vs tolerance {tol:.3g}"


# --------------------------------------------------------------------------------------------
# 3. the NaN-filling fixture (conftest) is active and reaches the launchers
# --------------------------------------------------------------------------------------------


def test_nan_fill_fixture_is_active():
    x = torch.zeros(3, device=DEVICE)
    for t in (torch.empty(4, 3, device=DEVICE), torch.empty((5,), dtype=torch.float16, device=DEVICE),
              torch.empty(2, dtype=torch.bfloat16, device=DEVICE), torch.empty(2, dtype=torch.float64),
              torch.empty_like(x), x.new_empty((2, 2))):
        assert torch.isnan(t).all(), t.dtype
    assert torch.empty(3, dtype=torch.int32).shape == (3,)  # integer allocations still work


def test_unwritten_output_is_caught(monkeypatch):
    """A forward kernel that writes nothing leaves NaN everywhere (the launchers allocate with
    torch.empty / new_empty), and the error rule rejects it."""
    from posattn.kernels import launch

    class _WritesNothing:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    q, k, v = _inputs(B=1, Hq=2, Hkv=2, Sq=5, Sk=5)
    ref, lse_ref = posattn.attention(q.double(), k.double(), v.double(), return_lse=True,
                                     backend="reference")
    monkeypatch.setattr(launch, "attn_fwd_kernel", _WritesNothing())
    out, lse = posattn.attention(q, k, v, return_lse=True, backend="triton")
    assert torch.isnan(out).all() and torch.isnan(lse).all()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_rule("out", out, ref, ref, 2, torch.float32)


# --------------------------------------------------------------------------------------------
# 4. Determinism (compiled kernels only)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pe", REGISTERED)
def test_deterministic_over_100_repeats(pe, dtype):
    """Forward and backward (incl. PE-parameter gradients) bitwise identical over 100 repeats,
    GQA, causal, shapes with partial tiles."""
    B, Hq, Hkv, Sq, Sk, D = 2, 8, 2, 301, 517, 64
    base = qkv(B, Hq, Hkv, Sq, Sk, D)
    spec = PES[pe](Hq, D)
    leaves = {n: t.to(DEVICE, dtype).requires_grad_() for n, t in base.items()}
    make = dout_maker(3, dtype)
    first = None
    for _ in range(100):
        out, lse, grads, _ = fwd_bwd(leaves, plain, spec, "triton", make, causal=True)
        now = [out, lse] + [grads[n] for n in sorted(grads)]
        if first is None:
            first = [t.clone() for t in now]
        else:
            for a, b in zip(first, now):
                assert torch.equal(a, b), "run-to-run difference"
