"""xPos (posattn.XPos): RoPE with the per-pair decay zeta_j^((q - k) / scale_base).

1. The reference against xPos as torchscale computes it, written here: queries scaled by
   zeta^(n / scale_base) and keys by zeta^(-n / scale_base) at positions n counted from the
   middle of the sequence, pairs interleaved (rotate-every-two).
2. The Triton kernels (forward, dQ, dK/dV) and the cpu backend against the float64 reference
   by the error rule: dtypes, GQA, positions up to 10^6 (no overflow: the kernels' decays are
   relative to each block), explicit positions, windows, soft caps, packed sequences, a paged
   KV cache and split-K.
3. What a user can get wrong, by name.
"""
import pytest
import torch

import posattn
from posattn import XPos
from conftest import DEVICE
from helpers import (assert_rule, check_fwd_bwd, check_paged_decode, check_varlen_causal,
                     force_splits)

FP16, FP32 = torch.float16, torch.float32


def _torchscale_xpos(q, k, v, scale_base, scale):
    """Causal attention with xPos as microsoft/torchscale applies it (float64, (H, S, D), queries
    and keys at positions 0..S-1): scale_j = (2j + 0.4 D) / (1.4 D); positions counted from
    min_pos = -S // 2; q rotated then scaled by scale^(n / scale_base), k by scale^(-n /
    scale_base); pairs (2j, 2j + 1) rotated by n * 10000^(-2j / D)."""
    H, S, D = q.shape
    zeta = (torch.arange(0, D, 2, dtype=torch.float64) + 0.4 * D) / (1.4 * D)
    n = torch.arange(S, dtype=torch.float64) + (-S // 2)
    z = zeta[None, :] ** (n[:, None] / scale_base)  # (S, D/2)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, D, 2, dtype=torch.float64) / D)

    def rot(x, up):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s = torch.cos(ang), torch.sin(ang)
        f = z if up else 1.0 / z
        return torch.stack(((x1 * c - x2 * s) * f, (x2 * c + x1 * s) * f), -1).flatten(-2)

    s = rot(q, True) @ rot(k, False).transpose(-1, -2) * scale
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def test_reference_is_torchscales_xpos():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 3, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for scale_base in (512.0, 8.0):  # 8: a decay strong enough to matter at 40 positions
        got = posattn.attention(q, k, v, pe=XPos(scale_base=scale_base, interleaved=True), causal=True,
                                backend="reference")
        want = _torchscale_xpos(q[0], k[0], v[0], scale_base, 16 ** -0.5)
        torch.testing.assert_close(got[0], want, rtol=0, atol=1e-12)
    plain = posattn.attention(q, k, v, pe=posattn.RoPE(interleaved=True), causal=True,
                              backend="reference")
    assert (got - plain).abs().max() > 1e-2  # the decay is there


def _positions(kind, Sq, Sk, seed):
    if kind == "default":
        return {}
    if kind == "far":  # 10^6 positions in: torchscale's absolute factors would be 0 or inf
        return dict(q_positions=10**6 + Sk - Sq, k_positions=10**6)
    g = torch.Generator().manual_seed(seed)  # sorted, with gaps, queries among the keys
    kp = torch.sort(torch.randperm(3 * Sk, generator=g)[:Sk]).values + 500
    qp = torch.sort(torch.randperm(3 * Sk, generator=g)[:Sq]).values + 505
    return dict(q_positions=qp.to(DEVICE), k_positions=kp.to(DEVICE))


# dtype, heads (Hq, Hkv), positions, window, softcap, spec | Sq, Sk, D
CASES = [
    (FP16, (2, 2), "default", None, None, XPos(scale_base=24.0), 45, 45, 16),  # (GPU tiles: >= 19)
    (FP32, (4, 2), "explicit", (9, 0), 20.0, XPos(), 21, 40, 32),
    (FP16, (2, 1), "far", None, None, XPos(scale_base=32.0), 17, 50, 16),
    (FP32, (2, 2), "far", (12, 0), None, XPos(rotary_dim=8, interleaved=False), 33, 33, 16),
    (FP16, (4, 2), "explicit", None, 20.0, XPos(scale_base=64.0, scaling=posattn.PI(2.0)),
     30, 30, 32),
]


def _ids(c):
    return f"{str(c[0])[6:]}-{c[1]}-{c[2]}-w{c[3]}-cap{c[4]}"


def _judge(got, q, k, v, pe, dtype, **kw):
    ref = posattn.attention(q.double(), k.double(), v.double(), pe=pe, backend="reference", **kw)
    naive = posattn.attention(q, k, v, pe=pe, backend="reference", **kw)
    assert_rule("out", got, ref, naive, 2, dtype)


# every case on Triton; the cpu backend (one code path per dtype) on the fp32 cases and one fp16
RUNS = [(c, "triton") for c in CASES] + [(c, "cpu") for c in CASES if c[0] == FP32] + [
    (CASES[0], "cpu")]


@pytest.mark.parametrize("case,backend", RUNS, ids=lambda x: x if isinstance(x, str) else _ids(x))
def test_forward_and_backward_match_reference(case, backend):
    """out, lse (2x) and dq, dk, dv (3x) by the error rule."""
    dtype, (Hq, Hkv), kind, window, cap, pe, Sq, Sk, D = case
    kw = dict(causal=True, window=window, softcap=cap, **_positions(kind, Sq, Sk, Sq))
    check_fwd_bwd(pe, backend, dtype, (2, Hq, Hkv, Sq, Sk, D), Sq + Sk, finite=True, **kw)


def test_varlen_kvcache_and_split_k(monkeypatch):
    """Packed sequences (positions restart per sequence), a paged KV cache decoding at
    positions past 10^3 (the keys' decays in the tile from the query block's position), and
    the forward split over runs of key tiles."""
    g = torch.Generator().manual_seed(9)
    pe = XPos(scale_base=24.0)
    check_varlen_causal(pe, g)
    check_paged_decode(pe, g)

    merges = force_splits(monkeypatch, 3)
    q = torch.randn(1, 2, 3, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 2, 100, 16, generator=g).to(DEVICE) for _ in range(2))
    with torch.no_grad():
        got = posattn.attention(q, k, v, pe=pe, causal=True, backend="triton")
    assert merges, "the split path did not run"
    _judge(got, q, k, v, pe, FP32, causal=True)


def test_keys_after_every_query_stay_finite():
    """Explicit positions: keys 10^6 positions after the only query (none visible) take a
    bounded factor (rotary.xpos_offset), not an Inf that a zero dS turns into NaN gradients."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, s, 16, generator=g).to(DEVICE).requires_grad_() for s in (1, 9, 9))
    out = posattn.attention(q, k, v, pe=XPos(scale_base=64.0), causal=True, backend="triton",
                            q_positions=torch.tensor([718], device=DEVICE),
                            k_positions=torch.arange(9, device=DEVICE) + 10**6)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert not out.any() and all(torch.isfinite(t).all() and not t.any() for t in grads)


def test_errors_name_the_argument():
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="causal=True"):
        posattn.attention(q, q, q, pe=XPos(), causal=False, backend="reference")
    with pytest.raises(ValueError, match="scale_base"):
        XPos(scale_base=0.0)
    with pytest.raises(ValueError, match="extension"):
        XPos().with_extend(posattn.ReRoPE(4))
    assert repr(XPos()).startswith("XPos(base=10000.0, scale_base=512.0")
    # explicit positions spread further than a block's decays can carry in fp16
    pos = torch.arange(5, device=DEVICE) * 1000
    with pytest.raises(ValueError, match="q_positions.*span 4000 > 2048"):
        posattn.attention(q.half(), q.half(), q.half(), pe=XPos(), causal=True, backend="triton",
                          q_positions=pos, k_positions=pos)
    # a scale base too small for fp16 in a block of 128 rows (the GPU tiles): refused by name
    from posattn.kernels import launch
    rec = launch.KernelPE(rot="rope", xpos=True, xpos_rate=1.807 / 8.0)
    with pytest.raises(ValueError, match="scale_base too small"):
        launch.check_xpos_block(rec, 128, torch.float16)
    launch.check_xpos_block(rec, 32, torch.float16)  # the interpreter's tiles: 2**7
    launch.check_xpos_block(rec, 128, torch.float32)
    # torch.compile has no decay in its custom ops: refused, never plain RoPE
    with pytest.raises(Exception, match="XPos does not run under torch.compile"):
        torch.compile(lambda a: posattn.attention(a, a, a, pe=XPos(), causal=True,
                                                  backend="triton"), fullgraph=True)(q)
    # the same positions in fp32 (16384) run
    out = posattn.attention(q, q, q, pe=XPos(), causal=True, backend="triton",
                            q_positions=pos, k_positions=pos)
    assert torch.isfinite(out).all()
