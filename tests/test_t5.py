"""T5's bucketed relative-position bias (posattn.T5Bias) against code we did not write:
transformers' own bucket function and its eager T5Attention module, forward and every
gradient, by the error rule. The registry-wide suites (test_kernels, test_window_softcap,
test_varlen, test_far_positions, test_strided, ...) run T5 beside the other bias PEs; this
file holds what is T5's own."""
import copy

import pytest
import torch

import posattn
from posattn.pe import T5Bias, t5_bucket
from conftest import DEVICE
from helpers import assert_rule

transformers = pytest.importorskip("transformers")
from transformers.models.t5.configuration_t5 import T5Config  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402


def _hf_bucket(rel, bidirectional, num_buckets, max_distance):
    return T5Attention._relative_position_bucket(rel, bidirectional=bidirectional,
                                                 num_buckets=num_buckets, max_distance=max_distance)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (64, 256), (8, 20), (33, 129)])
def test_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    """Every relative position in [-3000, 3000], plus ones far past int32 and float32's exact
    integers: the same bucket as transformers' T5Attention._relative_position_bucket."""
    rel = torch.cat([torch.arange(-3000, 3001),
                     torch.tensor([-2 ** 40, -10 ** 9, -(2 ** 24) - 1, 2 ** 24 + 1, 10 ** 9, 2 ** 40])])
    ours = t5_bucket(rel, num_buckets, bidirectional, max_distance)
    assert torch.equal(ours, _hf_bucket(rel, bidirectional, num_buckets, max_distance))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (33, 129)])
def test_kernel_bucket_map_saturates(bidirectional, num_buckets, max_distance):
    """The kernels read a clamped map over k - q in [-R, R] (T5Bias.bias_buckets): every
    position past R must have the bucket at +-R, as transformers computes it."""
    spec = T5Bias(torch.zeros(2, num_buckets), bidirectional, max_distance)
    R = spec.radius()
    m = spec.bias_buckets()
    assert m.shape == (2 * R + 1,)
    rel = torch.tensor([-10 ** 12, -5 * R, -R - 1, R + 1, 7 * R, 10 ** 12])
    clamped = rel.clamp(-R, R) + R
    assert torch.equal(m[clamped], _hf_bucket(rel, bidirectional, num_buckets, max_distance))
    assert torch.equal(m, _hf_bucket(torch.arange(-R, R + 1), bidirectional, num_buckets, max_distance))


def _t5_layer(decoder: bool, seed=0):
    cfg = T5Config(d_model=48, d_kv=16, num_heads=3, relative_attention_num_buckets=32,
                   relative_attention_max_distance=20, dropout_rate=0.0, is_decoder=decoder)
    torch.manual_seed(seed)
    layer = T5Attention(cfg, has_relative_attention_bias=True).eval()
    with torch.no_grad():  # a trained table's magnitude (the default init is ~N(0, 1))
        layer.relative_attention_bias.weight.mul_(2.0)
    return layer.to(DEVICE)


def _posattn_forward(layer, x, causal):
    """The layer's own projections around posattn.attention with its table as a T5Bias
    (weight.T: a transposed view, (H, buckets)); T5 does not scale its logits."""
    B, S, _ = x.shape
    H, d = layer.n_heads, layer.key_value_proj_dim
    q, k, v = (proj(x).view(B, S, H, d) for proj in (layer.q, layer.k, layer.v))
    spec = T5Bias(layer.relative_attention_bias.weight.T, bidirectional=not layer.is_decoder,
                  max_distance=layer.relative_attention_max_distance)
    out = posattn.attention(q, k, v, spec, causal=causal, scale=1.0, layout="bshd", backend="triton")
    return layer.o(out.reshape(B, S, H * d))


def _hf_forward(layer, x, causal):
    S = x.shape[1]
    mask = None
    if causal:  # T5's decoder passes an additive mask; the layer adds it to its bias
        mask = torch.zeros(S, S, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1),
                                torch.finfo(x.dtype).min)[None, None]
    return layer(x, mask=mask)[0]


def _grads(layer, x, fn, causal, dout):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad()
    out = fn(layer, x, causal)
    out.backward(dout)
    g = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    g["x"] = x.grad
    return out.detach(), g


@pytest.mark.parametrize("decoder,causal", [(False, False), (True, True), (True, False)],
                         ids=["encoder", "decoder_causal", "decoder_unmasked"])
def test_matches_transformers_t5_attention(decoder, causal):
    """A T5 self-attention layer run through posattn equals transformers' eager T5Attention:
    output and the gradients of the input and every weight, the relative-attention table
    included, by the error rule against the float64 eager layer (fp32 eager the yardstick).
    33 tokens with max_distance 20: the exact, log-spaced and saturated buckets all occur."""
    layer = _t5_layer(decoder)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 33, 48, generator=g).to(DEVICE)
    dout = torch.randn(2, 33, 48, generator=g).to(DEVICE)
    out, grads = _grads(layer, x, _posattn_forward, causal, dout)
    outn, gradsn = _grads(layer, x, _hf_forward, causal, dout)
    layer64 = copy.deepcopy(layer).double()
    out64, grads64 = _grads(layer64, x.double(), _hf_forward, causal, dout.double())
    assert_rule("out", out, out64, outn, 2, torch.float32)
    assert grads["relative_attention_bias.weight"].abs().sum() > 0
    for name in grads64:
        assert_rule(f"d{name}", grads[name], grads64[name], gradsn[name], 3, torch.float32)


def test_table_gradient_is_deterministic():
    """Per-program partials summed by torch, no atomics: the same bits every run."""
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, 2, 45, 16, generator=g).to(DEVICE) for _ in range(4))
    table = (2 * torch.randn(2, 32, generator=g)).to(DEVICE)
    runs = []
    for _ in range(2):
        t = table.clone().requires_grad_()
        posattn.attention(q, k, v, T5Bias(t, max_distance=20), causal=True,
                          backend="triton").backward(dout)
        runs.append(t.grad)
    assert torch.equal(runs[0], runs[1])


def test_user_errors():
    with pytest.raises(ValueError, match="T5Bias"):
        posattn.attention(*(torch.zeros(1, 2, 3, 8),) * 3, pe="t5")
    with pytest.raises(TypeError, match="table"):
        T5Bias([[0.0] * 32])
    with pytest.raises(TypeError, match="table"):
        T5Bias(torch.zeros(2, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_buckets"):
        T5Bias(torch.zeros(32))
    with pytest.raises(ValueError, match="max_distance"):
        T5Bias(torch.zeros(2, 32), max_distance=4)
    with pytest.raises(TypeError, match="bidirectional"):
        T5Bias(torch.zeros(2, 32), bidirectional=1)
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match=r"table must have shape \(num_heads, num_buckets\) = \(3, 32\)"):
        posattn.attention(q, q, q, T5Bias(torch.zeros(2, 32)), backend="reference")
    with pytest.raises(ValueError, match="finite"):
        posattn.attention(q, q, q, T5Bias(torch.full((3, 32), float("nan"))), backend="reference")
