"""The two PE axes (kernels/rotary.py, kernels/bias.py): every registered spec maps onto known
kinds, and a kind no hook knows is refused -- by the launcher's record in Python, and by a
tl.static_assert in the hooks themselves, never by running another PE's math."""
import pytest
import torch
import triton
import triton.language as tl

from posattn.kernels import launch
from posattn.kernels.bias import bias_shape
from posattn.kernels.rotary import qk_columns
from posattn.pe import REGISTRY, axes, registered
from conftest import DEVICE


def test_every_registered_spec_maps_to_kernel_kinds():
    for name in registered():
        rot, bias, family = axes(name)
        assert rot in launch.ROT_CODES and bias in launch.BIAS_CODES, name
        spec = REGISTRY[name]()
        rec = launch.KernelPE(rot=rot, bias=bias, family=family,
                              params=spec.bias_params(4, "cpu"), buckets=spec.bias_buckets())
        codes = rec.codes()
        assert codes["ROT"] == launch.ROT_CODES[rot] and codes["BIAS"] == launch.BIAS_CODES[bias]
        assert (rec.params is None) == (bias == "none")


def test_a_table_bias_needs_its_buckets():
    with pytest.raises(ValueError, match="buckets"):
        launch.KernelPE(bias="t5", params=torch.ones(2, 32))
    with pytest.raises(ValueError, match="buckets"):
        launch.KernelPE(bias="alibi", params=torch.ones(2, 1), buckets=torch.zeros(3, dtype=torch.long))


def test_codes_are_numbered_once_and_distinct():
    assert len(set(launch.ROT_CODES.values())) == len(launch.ROT_CODES)
    assert len(set(launch.BIAS_CODES.values())) == len(launch.BIAS_CODES)


@pytest.mark.parametrize("kw", [dict(rot="xpos"), dict(bias="fourier")])
def test_unknown_kind_is_refused_by_the_record(kw):
    with pytest.raises(ValueError, match="unknown"):
        launch.KernelPE(**kw)


@triton.jit
def _bias_probe(OUT, BIAS: tl.constexpr):
    d = tl.arange(0, 16).to(tl.float32)
    tl.store(OUT + tl.arange(0, 16), bias_shape(BIAS, d, 0.5))


@triton.jit
def _rot_probe(OUT, ROT: tl.constexpr):
    a, b = qk_columns(ROT, False, 8, 16)
    tl.store(OUT + tl.arange(0, 16), a + b)


def test_unknown_kind_does_not_compile():
    """A BIAS or ROT value no hook knows fails at compile time (the interpreter runs the same
    static_assert), where a fall-through would have run KERPLE power's math."""
    out = torch.empty(16, device=DEVICE)
    _bias_probe[(1,)](out, BIAS=launch.BIAS_CODES["alibi"])
    assert torch.equal(out.cpu(), torch.arange(16.0))  # ALiBi's f is the distance
    with pytest.raises(Exception, match="unknown bias kind"):
        _bias_probe[(1,)](out, BIAS=17)
    _rot_probe[(1,)](out, ROT=launch.ROT_CODES["none"])
    with pytest.raises(Exception, match="unknown rotary kind"):
        _rot_probe[(1,)](out, ROT=17)


def test_every_launch_asks_for_fp_fusion():
    """FMA contraction is requested per launch (launch.FP_FUSION), not left to triton's
    default, which triton 3.10 turns off: the tuned tiles and instruction counts assume it."""
    q = torch.empty(1, 2, 40, 32, device="meta", dtype=torch.float16)
    rec = launch.KernelPE(bias="alibi", params=torch.ones(2, 1, device="meta"), family="alibi")
    with launch.capture(90) as launches:
        launch.attn_fwd(q, q, q, rec, launch.KernelPositions(q_start=50), launch.Mask(), 0.2)
        lse = torch.empty(1, 2, 40, device="meta")
        launch.attn_bwd(q, q, q, q, q, lse, rec, launch.KernelPositions(q_start=50),
                        launch.Mask(causal=True, left=5, softcap=3.0), 0.2, True)
    assert len(launches) >= 4  # forward, preprocess, dK/dV, dQ
    assert all(ln.kwargs.get("enable_fp_fusion") is True for ln in launches)
