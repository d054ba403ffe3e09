"""A real client: a tiny random-weight Hugging Face BLOOM whose attention runs posattn's fused
ALiBi kernels (backend="triton"), against transformers' own eager BLOOM: logits and the
gradient of every parameter, float32.

The fused copy takes its slopes the way BLOOM hands them out: from the alibi tensor that
``BloomModel`` builds (``build_alibi_tensor``, shape (B * H, 1, S), ``slope[h] * k_pos``), as
``alibi[:H, 0, 1]`` -- a view with stride S and storage offset 1, the shape of view that the
issue "Strided PE parameters are read as if contiguous" found the kernels reading as if dense.
No download: the model is built from a config with random weights.
"""
import copy
import types

import pytest
import torch

import posattn
from conftest import DEVICE

transformers = pytest.importorskip("transformers")
from transformers import BloomConfig, BloomForCausalLM  # noqa: E402
from transformers.models.bloom import modeling_bloom  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS = 64, 64, 2, 4  # head dim 16
B, S = 2, 17


def fused_bloom_attention(self, hidden_states, residual, alibi, attention_mask=None, layer_past=None,
                          use_cache=False, output_attentions=False, **kwargs):
    """BloomAttention.forward (no cache, no dropout) with posattn's fused causal ALiBi.

    BLOOM adds ``slope * k_pos`` to the scaled logits (then its causal mask); posattn's ALiBi
    adds ``-slope * |q_pos - k_pos|``, which for every visible key (k_pos <= q_pos) is
    ``slope * k_pos - slope * q_pos``: the same bias minus a constant per query row, and
    softmax is invariant to a per-row constant. So the two agree up to fp32 rounding."""
    assert layer_past is None and not use_cache and not output_attentions
    assert attention_mask is not None  # the all-ones mask: BLOOM's causal mask, no padding
    batch, length, _ = hidden_states.shape
    # (B, H, S, D) views of the fused projection (strided: BLOOM interleaves q, k, v per head)
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    # The slopes as BLOOM builds them: alibi[b * H + h, 0, j] = slope[h] * j (all-ones mask),
    # so position 1 holds the slope itself (times 1.0: exact). A strided view, passed as is.
    slopes = alibi[:self.num_heads, 0, 1]
    assert slopes.stride() == (length,) and slopes.storage_offset() == 1
    out = posattn.attention(q, k, v, posattn.ALiBi(slopes), causal=True, scale=self.inv_norm_factor,
                            backend="triton")
    self.fused_calls += 1
    context = out.transpose(1, 2).reshape(batch, length, self.hidden_size)
    output = modeling_bloom.dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None


def _models():
    config = BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                         hidden_dropout=0.0, attention_dropout=0.0,
                         # weights large enough that q . k matters next to the ALiBi bias
                         initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        eager = BloomForCausalLM(config).to(DEVICE, torch.float32).eval()
    fused = copy.deepcopy(eager)
    for block in fused.transformer.h:
        attn = block.self_attention
        attn.forward = types.MethodType(fused_bloom_attention, attn)
        attn.fused_calls = 0
    return eager, fused


def test_bloom_fused_alibi_matches_transformers_eager():
    eager, fused = _models()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=g).to(DEVICE)
    labels = torch.randint(0, VOCAB, (B, S), generator=g).to(DEVICE)
    mask = torch.ones(B, S, dtype=torch.long, device=DEVICE)

    results = []
    for model in (eager, fused):
        res = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        res.loss.backward()  # cross entropy of the (shifted) random labels
        results.append((res.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert all(block.self_attention.fused_calls == 1 for block in fused.transformer.h)
    (logits_e, grads_e), (logits_f, grads_f) = results

    # Both run in float32 end to end and differ only in how attention rounds (online softmax in
    # the exp2 domain, the per-row constant in the bias, another summation order): a few float32
    # ulps (eps 1.2e-7) per logit, carried through two layers. Observed: 2.5e-6 at |logits| up
    # to 5.6 (~4 ulps). rtol 1e-4 / atol 1e-5 allows ~800 ulps, far below what a real error
    # does: the slopes read as if contiguous move the logits by 4.1.
    torch.testing.assert_close(logits_f, logits_e, rtol=1e-4, atol=1e-5)

    # The same rounding in the backward, through softmax's gradient, whose sums cancel: an
    # element near 0 is off by eps times the terms' size, not its own. So atol is 1e-5 of each
    # tensor's largest gradient (observed: at most 1.3e-6 of it; wrong slopes: 0.15 to 1.4 of
    # it), rtol 1e-4 as for the logits.
    assert grads_e.keys() == grads_f.keys()
    for name, ge in grads_e.items():
        gf = grads_f[name]
        assert ge is not None and gf is not None and ge.abs().max() > 0, name
        torch.testing.assert_close(gf, ge, rtol=1e-4, atol=1e-5 * ge.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")
