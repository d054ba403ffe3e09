"""The naive reference against torch SDPA (an independent implementation) and fp64 gradcheck.

Everything here runs the reference backend in float64; the kernels are tested against it
elsewhere, so this file is what makes the oracle trustworthy.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import posattn
from helpers import with_params
from pe_cases import REGISTERED, pe_factory, with_causal
from posattn.pe import resolve_pe

B, Hq, Hkv, D = 2, 4, 2, 16


def _qkv(Sq, Sk, dtype=torch.float64, seed=0, hkv=Hkv, d=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, d, generator=g, dtype=dtype)
    k = torch.randn(B, hkv, Sk, d, generator=g, dtype=dtype)
    v = torch.randn(B, hkv, Sk, d, generator=g, dtype=dtype)
    return q, k, v


def _sdpa(q, k, v, mask=None):
    """SDPA with GQA by repeating K/V heads (works on every torch >= 2.4)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _end_aligned_causal(Sq, Sk):
    qpos = torch.arange(Sq) + Sk - Sq
    return torch.arange(Sk)[None, :] <= qpos[:, None]  # (Sq, Sk) bool, True = visible


def _delta(Sq, Sk):
    qpos = torch.arange(Sq, dtype=torch.float64) + Sk - Sq
    return (qpos[:, None] - torch.arange(Sk, dtype=torch.float64)[None, :]).abs()


@pytest.mark.parametrize("Sq,Sk", [(9, 9), (5, 12), (1, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_no_pe_matches_sdpa(Sq, Sk, causal):
    q, k, v = _qkv(Sq, Sk)
    mask = _end_aligned_causal(Sq, Sk) if causal else None
    out = posattn.attention(q, k, v, "none", causal=causal, backend="reference")
    torch.testing.assert_close(out, _sdpa(q, k, v, mask), rtol=1e-12, atol=1e-12)


def test_bshd_layout_matches_bhsd():
    q, k, v = _qkv(7, 11)
    ref = posattn.attention(q, k, v, "alibi", causal=True, backend="reference")
    out = posattn.attention(*(t.transpose(1, 2) for t in (q, k, v)), "alibi", causal=True,
                            layout="bshd", backend="reference")
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_matches_materialised_mask(causal):
    Sq, Sk = 6, 10
    q, k, v = _qkv(Sq, Sk)
    slopes = posattn.alibi_slopes(Hq)
    bias = -slopes[:, None, None] * _delta(Sq, Sk)  # (H, Sq, Sk)
    if causal:
        bias = bias.masked_fill(~_end_aligned_causal(Sq, Sk), float("-inf"))
    out = posattn.attention(q, k, v, "alibi", causal=causal, backend="reference")
    torch.testing.assert_close(out, _sdpa(q, k, v, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["log", "power"])
def test_kerple_matches_materialised_mask(kind):
    Sq, Sk = 8, 8
    q, k, v = _qkv(Sq, Sk)
    r1 = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    r2 = torch.tensor([0.2, 0.7, 1.1, 1.9], dtype=torch.float64)
    d = _delta(Sq, Sk)
    if kind == "log":
        bias = -r1[:, None, None] * torch.log1p(r2[:, None, None] * d)
    else:
        bias = -r1[:, None, None] * d ** r2[:, None, None]
    out = posattn.attention(q, k, v, posattn.KERPLE(kind, r1, r2), backend="reference")
    torch.testing.assert_close(out, _sdpa(q, k, v, bias), rtol=1e-12, atol=1e-12)


def _rotate(x, pos, inv_freq, factor, rot, interleaved):
    """An independent RoPE: complex multiplication of dim pairs (not the reference's code)."""
    ang = pos.double()[:, None] * inv_freq[None, :]  # (S, rot/2)
    rotor = torch.polar(torch.full_like(ang, factor), ang)
    xr, rest = x[..., :rot], x[..., rot:]
    if interleaved:
        pairs = torch.view_as_complex(xr.reshape(*xr.shape[:-1], rot // 2, 2).contiguous())
        y = torch.view_as_real(pairs * rotor).flatten(-2)
    else:
        pairs = torch.complex(xr[..., : rot // 2], xr[..., rot // 2:])
        z = pairs * rotor
        y = torch.cat((z.real, z.imag), -1)
    return torch.cat((y, rest), -1)


@pytest.mark.parametrize("spec", [
    posattn.RoPE(),
    posattn.RoPE(base=500000.0, rotary_dim=8, interleaved=True),
    posattn.RoPE(scaling=posattn.YaRN(4.0, 8)),
    posattn.RoPE(scaling=posattn.Llama3(8.0, 8), rotary_dim=12),
], ids=["default", "partial_interleaved", "yarn", "llama3_partial"])
def test_rope_matches_prerotated_sdpa(spec):
    Sq, Sk = 5, 13
    q, k, v = _qkv(Sq, Sk)
    inv_freq, factor = spec.frequencies(D)
    rot = 2 * inv_freq.numel()
    qpos, kpos = torch.arange(Sq) + Sk - Sq, torch.arange(Sk)
    q_r = _rotate(q, qpos, inv_freq, factor, rot, spec.interleaved)
    k_r = _rotate(k, kpos, inv_freq, factor, rot, spec.interleaved)
    mask = _end_aligned_causal(Sq, Sk)
    out = posattn.attention(q, k, v, spec, causal=True, backend="reference")
    torch.testing.assert_close(out, _sdpa(q_r, k_r, v, mask), rtol=1e-12, atol=1e-12)


def test_explicit_positions_equal_offsets():
    q, k, v = _qkv(4, 6)
    a = posattn.attention(q, k, v, "rope", q_positions=100, k_positions=98, causal=True,
                          backend="reference")
    b = posattn.attention(q, k, v, "rope", q_positions=torch.arange(100, 104),
                          k_positions=torch.arange(98, 104).expand(B, 6), causal=True,
                          backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lse_and_empty_rows():
    q, k, v = _qkv(6, 3)  # causal, end-aligned: queries at -3..2, the first 3 see no key
    out, lse = posattn.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    assert torch.all(out[:, :, :3] == 0) and torch.all(lse[:, :, :3] == float("-inf"))
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) / math.sqrt(D)
    s = s.masked_fill(~_end_aligned_causal(6, 3), float("-inf"))
    torch.testing.assert_close(lse[:, :, 3:], torch.logsumexp(s, -1)[:, :, 3:].double())


@pytest.mark.parametrize("pe_name,causal", with_causal(REGISTERED))
def test_gradcheck(pe_name, causal):
    """fp64 gradcheck of the reference, including every PE's parameters (spec.tensors())."""
    Sq, Sk = 4, 6
    q, k, v = (t.requires_grad_() for t in _qkv(Sq, Sk, d=8))
    # the registry's spec (tests/pe_cases.py), its tensors as float64 leaves
    spec = resolve_pe(pe_factory(pe_name)(Hq, 8))
    params = [t.detach().double().requires_grad_() for t in spec.tensors()]

    def make(*p):
        it = iter(p)
        return with_params(spec, lambda t: next(it))

    def f(q, k, v, *p):
        return posattn.attention(q, k, v, make(*p), causal=causal, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v, *params))


def test_kerple_power_gradient_finite_at_zero_distance():
    q, k, v = _qkv(3, 3)
    r1 = torch.ones(Hq, dtype=torch.float64, requires_grad=True)
    r2 = torch.full((Hq,), 0.5, dtype=torch.float64, requires_grad=True)
    out = posattn.attention(q, k, v, posattn.KERPLE("power", r1, r2), backend="reference")
    g1, g2 = torch.autograd.grad(out.sum() + (out ** 2).sum(), (r1, r2))
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
