"""FIRE (posattn.FIRE, posattn.nn.FIREBias): a learned MLP of a normalised distance.

1. The reference against FIRE as its paper's reference module computes it, written here from
   the paper's formula (float64).
2. The kernels' table of cubics against the exact MLP: its interpolation error is below the
   bias's fp32 rounding (FIRE.interpolation_error), for every allowed activation, and the
   measurement can fail (a coarse grid of a steep MLP does).
3. The Triton kernels and the cpu backend against the float64 reference by the error rule:
   outputs, dQ/dK/dV, and the gradients of every parameter (the MLP's, c, L) through
   posattn.nn.FIREBias; positions on both sides of L, explicit and saturated (u = 1)
   positions, non-causal, windows, soft caps, GQA, packed sequences, a paged KV cache;
   deterministic parameter gradients.
4. What a user can get wrong, by name.
"""

import pytest
import torch

import posattn
from posattn import FIRE
from conftest import DEVICE
from attn_harness import check, plain, qkv
from helpers import check_fwd_bwd, check_paged_decode, check_varlen_causal

FP16, FP32 = torch.float16, torch.float32


def _module(H, seed=0, L=24.0, c=0.3, cells=16, activation="gelu"):
    torch.manual_seed(seed)
    m = posattn.nn.FIREBias(H, 16, init_c=c, init_L=L, num_cells=cells,
                            activation=activation).to(DEVICE)
    return m


def _papers_fire(m, S):
    """The FIRE bias (H, S, S) of the paper's reference module, from its formula (float64):
    positions 0..S-1, rel = q - k, u = log(|c rel| + 1) / (log(|c max(q, L)| + 1) + eps),
    bias = MLP(u), L = |L_multiplier * init_L|."""
    pos = torch.arange(S, dtype=torch.float64)
    rel = pos[:, None] - pos[None, :]
    c = m.c.double()
    L = (m.L_multiplier * m.init_L).abs().double()
    norm = torch.max(pos, L)[:, None]
    u = torch.log((c * rel).abs() + 1) / (torch.log((c * norm).abs() + 1) + m.eps)
    h = torch.nn.functional.gelu(u[..., None] * m.mlp_in.weight[:, 0].double() + m.mlp_in.bias.double())
    return (h @ m.mlp_out.weight.double().T + m.mlp_out.bias.double()).permute(2, 0, 1)


def test_reference_is_the_papers_fire():
    m = _module(3, L=20.0)
    S, D = 45, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 3, S, D, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    with torch.no_grad():
        got = posattn.attention(q, k, v, pe=m.spec(), causal=True, backend="reference")
        s = q @ k.transpose(-1, -2) * D ** -0.5 + _papers_fire(m, S).to(DEVICE)[None]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
        want = torch.softmax(s, -1) @ v
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation,cells", [("gelu", 64), ("silu", 64), ("tanh", 128)])
def test_table_is_exact_to_fp32_rounding(activation, cells):
    """The grid against the exact MLP, for nn.Linear's initialisation and for weights grown
    8x (a trained model's are larger than its initial ones): the default 64 cells for GELU
    and SiLU; tanh's steeper derivatives take 128 (at 64 cells it is 3.9x the rounding)."""
    m = posattn.nn.FIREBias(8, activation=activation, num_cells=cells)
    assert m.interpolation_error() < 1.0
    with torch.no_grad():
        for p in (m.mlp_in.weight, m.mlp_in.bias, m.mlp_out.weight):
            p.mul_(8.0)
    assert m.interpolation_error() < 1.0


def test_interpolation_error_can_fail():
    """A steep MLP on a coarse grid is measured as it is: well above the fp32 rounding."""
    m = posattn.nn.FIREBias(4, activation="tanh", num_cells=8)
    with torch.no_grad():
        for p in (m.mlp_in.weight, m.mlp_in.bias, m.mlp_out.weight):
            p.mul_(10.0)
    assert m.interpolation_error() > 10.0


def _spec(H, seed, L=24.0, c=0.3):
    """A FIRE spec whose tensors are trainable leaves (the harness differentiates them)."""
    m = _module(H, seed, L=L, c=c)
    lf = lambda t: t.detach().requires_grad_()  # noqa: E731
    return FIRE(lf(m.mlp_in.weight[:, 0]), lf(m.mlp_in.bias), lf(m.mlp_out.weight),
                lf(m.mlp_out.bias), c=lf(m.c), L=lf(torch.tensor(L, device=DEVICE)),
                num_cells=m.num_cells)


def _check(dtype, shapes, seed, causal=True, **kw):
    """attn_harness.check (Triton): out, LSE (2x) and the gradients of q, k, v and of every
    FIRE tensor (w1, b1, w2, b2, c, L; 3x) against the float64 reference by the rule, with
    flash-attention's own rounding as slack (FlashSlack; FIRE's: a jvp per parameter)."""
    B, Hq, Hkv, Sq, Sk, D = shapes
    return check(qkv(B, Hq, Hkv, Sq, Sk, D, seed=seed), plain, _spec(Hq, seed), dtype,
                 causal=causal, **kw)


@pytest.mark.parametrize("dtype,shapes", [
    (FP32, (1, 2, 2, 45, 45, 16)),   # rows on both sides of L = 24
    (FP16, (2, 4, 2, 37, 53, 16)),   # GQA, Sq < Sk (queries at 16..52)
])
def test_triton_every_gradient(dtype, shapes):
    grads = _check(dtype, shapes, seed=3)["kernel"][2]
    assert set(grads) == {"q", "k", "v", "w1", "b1", "w2", "b2", "c", "L"}


def test_triton_explicit_saturated_positions():
    """Explicit positions, keys at negative positions and queries before their keys
    (non-causal): u passes 1 and saturates there, in the kernels as in the reference."""
    S = 33
    qp = (torch.arange(S) * 3 + 5)[None].to(DEVICE)
    kp = (torch.arange(S) * 3 - 40)[None].to(DEVICE)
    _check(FP32, (1, 2, 2, S, S, 16), seed=4, causal=False,
           q_positions=qp, k_positions=kp)


@pytest.mark.parametrize("kw", [dict(window=(9, 0)), dict(softcap=5.0)])
def test_triton_window_softcap(kw):
    """(The PE-parameter gradients under windows and soft caps: test_window_softcap's
    pairwise matrix, which draws FIRE from the registry.)"""
    check_fwd_bwd(_spec(2, 5), "triton", FP32, (1, 2, 1, 40, 40, 16), seed=5, causal=True, **kw)


def test_module_gradients_reach_every_parameter():
    """posattn.nn.FIREBias: the kernels' gradients reach the MLP, c and L_multiplier, the
    same numbers as the spec's tensors get, through L = |L_multiplier * init_L|."""
    m = _module(2, 6)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(DEVICE) for _ in range(3))
    out = posattn.attention(q, k, v, pe=m.spec(), causal=True)
    got = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    spec = _spec(2, 6)
    out = posattn.attention(q, k, v, pe=spec, causal=True)
    want = torch.autograd.grad(out.square().sum(), [spec.c, spec.L, spec.w1, spec.b1, spec.w2,
                                                    spec.b2])
    want = [want[0], want[1] * m.init_L, want[2][:, None]] + list(want[3:])
    assert [n for n, _ in m.named_parameters()] == ["c", "L_multiplier", "mlp_in.weight",
                                                   "mlp_in.bias", "mlp_out.weight",
                                                   "mlp_out.bias"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        assert a.abs().max() > 0


def test_cpu_backend():
    spec = _spec(2, 6)
    check_fwd_bwd(spec, "cpu", FP32, (1, 2, 2, 40, 40, 16), seed=6, causal=True)


def test_far_positions_no_overflow():
    """Queries 10^6 positions in: the normaliser is psi(q), every u stays finite."""
    m = _module(2, 7)
    check_fwd_bwd(m.spec(), "triton", FP32, (1, 2, 2, 20, 30, 16), seed=7, causal=True,
                  q_positions=torch.arange(10 ** 6, 10 ** 6 + 20)[None].to(DEVICE),
                  k_positions=torch.arange(10 ** 6 - 10, 10 ** 6 + 20)[None].to(DEVICE))


def test_varlen_and_paged_decode():
    g = torch.Generator().manual_seed(8)
    spec = _module(2, 8).spec()
    check_varlen_causal(spec, g)
    check_paged_decode(spec, g)


def test_parameter_gradients_are_deterministic():
    m = _module(2, 9)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g).to(DEVICE) for _ in range(3))

    def grads():
        out = posattn.attention(q, k, v, pe=m.spec(), causal=True)
        return torch.autograd.grad(out.sum(), list(m.parameters()))
    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_user_errors():
    m = _module(3)
    q = torch.zeros(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="w2 must have shape"):
        posattn.attention(q, q, q, pe=m.spec(), causal=True)
    with pytest.raises(ValueError, match="needs the model's parameters"):
        posattn.attention(q, q, q, pe="fire", causal=True)
    with pytest.raises(ValueError, match="relu"):
        posattn.nn.FIREBias(2, activation="relu")
    with pytest.raises(ValueError, match="num_cells"):
        posattn.nn.FIREBias(2, num_cells=48)
    with pytest.raises(ValueError, match="L must be"):
        FIRE(m.mlp_in.weight[:, 0], m.mlp_in.bias, m.mlp_out.weight, m.mlp_out.bias, L=-1.0)
    with pytest.raises(ValueError, match="shapes disagree"):
        FIRE(m.mlp_in.weight[:, 0], m.mlp_in.bias[:3], m.mlp_out.weight, m.mlp_out.bias)
