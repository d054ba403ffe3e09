"""Sandwich (posattn.Sandwich): the bias against the paper's own construction, the kernels'
distance table at far distances, and the errors a user can cause. Attention over every
geometry is judged with the other bias PEs (test_window_softcap, test_kernels, test_far_positions,
test_kvcache, test_distributed, test_cpu enumerate the registry)."""
import math

import pytest
import torch

import posattn
from posattn import Sandwich
from conftest import DEVICE
from posattn.kernels import launch


def _paper_bias(H, d_bar, q_pos, k_pos):
    """The paper's construction, written from its definition and not from posattn.pe: the
    sinusoidal embeddings p_m = [sin(m w_i), cos(m w_i)]_i, their dot product p_q . p_k per
    (query, key), divided by 8 h / H (head h = 1 .. H). float64; (H, Sq, Sk)."""
    i = torch.arange(d_bar // 2, dtype=torch.float64)
    w = torch.pow(torch.tensor(10000.0, dtype=torch.float64), -2.0 * i / d_bar)

    def embed(pos):
        ang = pos.double()[:, None] * w[None, :]
        return torch.cat([ang.sin(), ang.cos()], 1)  # (S, d_bar)

    dot = embed(q_pos) @ embed(k_pos).T  # (Sq, Sk)
    h = torch.arange(1, H + 1, dtype=torch.float64)
    return dot[None] / (8.0 * h / H)[:, None, None]


@pytest.mark.parametrize("d_bar", [16, 128])
def test_bias_is_the_papers_up_to_a_row_constant(d_bar):
    """reference_bias = the paper's p_q . p_k / (8h/H) - a_h d_bar / 2: the same softmax."""
    H = 6
    q_pos = torch.tensor([0, 3, 17, 1000, 123456])
    k_pos = torch.tensor([0, 1, 5, 999, 4000, 123000, 200000])
    rel = (k_pos[None, :] - q_pos[:, None]).double()[None, None]  # (1, 1, Sq, Sk)
    got = Sandwich(d_bar=d_bar).reference_bias(H, rel)[0]  # (H, Sq, Sk)
    a = H / (8.0 * torch.arange(1, H + 1, dtype=torch.float64))
    want = _paper_bias(H, d_bar, q_pos, k_pos) - (a * d_bar / 2)[:, None, None]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * d_bar)
    assert got.max() <= 1e-12 and got[:, 0, 0].abs().max() == 0  # 0 at distance 0, never above


def test_distance_table_matches_float64_at_far_distances():
    """The kernels' f(d) = sum_i (1 - cos(d w_i)) (bias.sandwich_row: float64 angles, range
    reduced) against float64, at distances up to 10**6: within a few fp32 ulps of
    d_bar (f's scale), where a float32 angle would be radians off."""
    spec = Sandwich()
    params = spec.bias_params(4, DEVICE)
    pe = launch.KernelPE(bias="sandwich", params=params, family="kerple")
    d = torch.tensor([0, 1, 2, 7, 100, 4095, 65537, 10 ** 6 + 1])
    # explicit positions: the table spans 0 .. max distance (+ the tiles' pad)
    pos = launch.KernelPositions(qpos=d[None].to(DEVICE), kpos=torch.zeros(1, 1, dtype=torch.int64, device=DEVICE))
    dummy = torch.empty(0, device=DEVICE)
    bt = launch._bias_tables(pe, pos, d.numel(), 1, False, dummy)
    assert bt.f.shape[0] == 1 and bt.length >= int(d.max()) + 1
    got = bt.f[0, d].double().cpu()
    w = spec.frequencies()
    want = (1.0 - torch.cos(d.double()[:, None] * w[None, :])).sum(1)
    assert (got - want).abs().max() <= 8 * spec.d_bar * 2.0 ** -24, (got, want)


def test_far_explicit_positions_past_the_table_raise():
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"sandwich.*2\*\*24"):
        posattn.attention(q, q, q, pe=Sandwich(), backend="triton",
                          q_positions=torch.tensor([0, 1, 2 ** 25]), k_positions=torch.tensor([0, 1, 2]))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="d_bar must be even"):
        Sandwich(d_bar=15)
    with pytest.raises(TypeError, match="d_bar"):
        Sandwich(d_bar=1.5)
    with pytest.raises(ValueError, match="base"):
        Sandwich(base=1.0)
    assert posattn.pe.resolve_pe("sandwich").d_bar == 128  # a string works: no model data


def test_far_keys_are_suppressed_like_the_paper_says():
    """The method's point (the paper's 'log-decaying' temporal pattern): averaged over far
    distances the bias sits near -a_h d_bar / 2, far below its 0 at the diagonal."""
    spec = Sandwich()
    rel = torch.arange(0, 20000, dtype=torch.float64)[None, None, None]
    b = spec.reference_bias(8, rel)[0, :, 0]  # (H, 20000)
    a = spec.head_scales(8)
    far = b[:, 2000:].mean(1) / a
    assert (far < -0.4 * spec.d_bar).all() and (far > -0.6 * spec.d_bar).all(), far
    assert math.isclose(b[0, 0].item(), 0.0)
