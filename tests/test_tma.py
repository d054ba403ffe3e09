"""TMA key tiles (kernels/launch.py: tma_ready). On sm_90+ and in the interpreter the
forward loads its K and V tiles through TMA descriptors where the inputs allow it, and
through pointers otherwise (Ampere, RoPE, unaligned inputs, POSATTN_TMA=0). Both paths must
give the same answers: in the interpreter bit for bit (the loads return the same values, the
arithmetic is the same), compiled by the error rule."""
import pytest
import torch

from conftest import DEVICE, HAS_CUDA
import posattn
from helpers import assert_rule, naive_attention, run_attention
from test_kernels import SHAPES, _pes, _positions, check_case

from posattn.kernels import launch


def _spy_tma(monkeypatch):
    """Record, per forward launch, whether it loads its key tiles through TMA."""
    taken = []
    real = launch.tma_ready

    def spy(*args, **kw):
        out = real(*args, **kw)
        taken.append(out)
        return out

    monkeypatch.setattr(launch, "tma_ready", spy)
    return taken


def _inputs(shape, seed=0):
    B, Hq, Hkv, Sq, Sk, D, layout, pos_kind = shape
    g = torch.Generator().manual_seed(seed)
    shp = (lambda H, S: (B, H, S, D)) if layout == "bhsd" else (lambda H, S: (B, S, H, D))
    q, k, v = (torch.randn(*shp(H, S), generator=g).to(DEVICE, torch.float16).requires_grad_()
               for H, S in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    dout = torch.randn(*q.shape, generator=g).to(DEVICE, torch.float16)
    return q, k, v, dout


# (pe, shape, whether the key tiles can go through TMA)
CASES = [("none", "gqa_sq<sk_d40_bshd", True),
         ("alibi_trainable", "explicit_pos_d64", False),  # explicit positions: pointers
         ("kerple_log", "mqa_sq>sk_d80", True),  # D = 80: the box's columns past 80 read 0
         ("kerple_power", "offset_pos_d32", True),
         ("rope", "offset_pos_d32", False)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pe,shape,tma", CASES, ids=[f"{p}-{s}" for p, s, _ in CASES])
def test_tma_matches_pointer_path(pe, shape, tma, causal, monkeypatch):
    taken = _spy_tma(monkeypatch)
    q, k, v, dout = _inputs(SHAPES[shape])
    B, Hq, Hkv, Sq, Sk, D, layout, pos_kind = SHAPES[shape]
    spec = _pes()[pe](D, Hq)
    kw = dict(causal=causal, layout=layout, **_positions(pos_kind, B, Sq, Sk))
    results = []
    for env in ("1", "0"):
        monkeypatch.setenv("POSATTN_TMA", env)
        results.append(run_attention(q, k, v, spec, "triton", dout, **kw))
    assert taken == [tma, False], taken  # the forward with TMA on, then off
    (out_t, lse_t, gr_t), (out_p, lse_p, gr_p) = results
    if not HAS_CUDA:
        assert torch.equal(out_t, out_p) and torch.equal(lse_t, lse_p)
        for name in gr_p:
            assert torch.equal(gr_t[name], gr_p[name]), name


@pytest.mark.parametrize("pe,shape", [("none", "gqa_sq<sk_d40_bshd"), ("alibi", "offset_pos_d32"),
                                      ("kerple_power", "mqa_sq>sk_d80")], ids=str)
def test_pointer_path_passes_the_rule(pe, shape, monkeypatch):
    """The pointer path (what Ampere runs) against the fp64 reference, on cases that would
    otherwise take TMA."""
    taken = _spy_tma(monkeypatch)
    monkeypatch.setenv("POSATTN_TMA", "0")
    check_case(_pes()[pe], SHAPES[shape], True, torch.float16)
    assert taken == [False]


def test_unaligned_views_take_the_pointer_path(monkeypatch):
    """q, k, v starting 2 bytes past a 16-byte boundary cannot be TMA boxes: the launcher
    falls back to pointers (no copy) and the answer still passes the error rule."""
    taken = _spy_tma(monkeypatch)
    B, H, S, D = 1, 2, 37, 32
    g = torch.Generator().manual_seed(2)
    buf = torch.randn(3, B, H, S, D + 8, generator=g).to(DEVICE, torch.float16)
    q, k, v = (buf[i, ..., 1:D + 1] for i in range(3))
    assert all(t.data_ptr() % 16 for t in (q, k, v))
    out = posattn.attention(q, k, v, "alibi", causal=True, backend="triton")
    assert taken == [False]
    want = posattn.attention(q.double(), k.double(), v.double(), "alibi", causal=True,
                             backend="reference")
    naive, _ = naive_attention(q, k, v, "alibi", torch.float16, causal=True)
    assert_rule("out", out, want, naive, 2, torch.float16)


def test_descriptor_eligibility():
    """Which views TMA can address: 16-byte aligned base and strides, contiguous head dim, no
    broadcast dim; size-1 dims may have any stride."""
    t = torch.zeros(2, 3, 40, 64, dtype=torch.float16, device=DEVICE)
    assert launch._tma_descriptor(t, 32, 64) is not None  # bhsd
    assert launch._tma_descriptor(t.view(2, 40, 3, 64).transpose(1, 2), 32, 64) is not None  # bshd
    assert launch._tma_descriptor(t[:, :, :, 1:33], 32, 32) is None  # base 2 bytes off
    assert launch._tma_descriptor(t[..., :20], 32, 32) is not None  # a narrower view: fine
    odd = torch.zeros(2, 3, 40, 20, dtype=torch.float16, device=DEVICE)  # rows 40 bytes apart
    assert launch._tma_descriptor(odd, 32, 32) is None
    assert launch._tma_descriptor(t.transpose(2, 3), 32, 64) is None  # head dim strided
    assert launch._tma_descriptor(t[:, :1].expand(2, 3, 40, 64), 32, 64) is None  # stride 0
    one = t[:1, :1]  # size-1 batch and head dims: their strides are never stepped over
    d = launch._tma_descriptor(one.as_strided(one.shape, (7, 5, 64, 1)), 32, 64)
    assert d is not None and all(s % 8 == 0 for s in d.strides[:3])


def test_tma_applies_without_rope():
    assert all(launch.tma_applies(launch.KernelPE(bias=bias)) for bias in launch.BIAS_CODES)
    assert not launch.tma_applies(launch.KernelPE(rot="rope", rot_dim=64))


def test_fp32_keeps_the_pointer_path():
    """fp32 inputs run their dots on the FMA units from registers: no TMA (launch.tma_ready)."""
    k = torch.zeros(1, 2, 40, 64, device=DEVICE)
    assert launch._tma_strides(k) is not None
    dense = launch.KernelPositions()
    explicit = launch.KernelPositions(qpos=torch.zeros(1, 1), kpos=torch.zeros(1, 1))
    packed = launch.KernelPositions(cu_q=torch.zeros(2), cu_k=torch.zeros(2), lens_q=(40,),
                                    lens_k=(40,))
    assert not launch.tma_ready(None, launch.KernelPE(), k, k, dense)
    assert launch.tma_ready(None, launch.KernelPE(), k.half(), k.half(), dense)
    assert not launch.tma_ready(None, launch.KernelPE(), k.half(), k.half(), explicit)
    assert not launch.tma_ready(None, launch.KernelPE(), k.half(), k.half(), packed)  # varlen


def test_tma_switch(monkeypatch):
    monkeypatch.delenv("POSATTN_TMA", raising=False)
    assert launch.tma_enabled(90) and launch.tma_enabled(None)
    assert not launch.tma_enabled(80) and not launch.tma_enabled(120)
    monkeypatch.setenv("POSATTN_TMA", "0")
    assert not launch.tma_enabled(90) and not launch.tma_enabled(None)
