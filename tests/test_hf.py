"""posattn.hf against transformers' own eager attention, on tiny random-weight models built from
configs (nothing downloaded), float32 on CPU (the Triton interpreter).

The rule (tests/helpers.assert_rule): posattn's fp32 model and transformers' eager fp32 model
are both compared with an eager float64 copy; posattn's error may be at most 2x eager fp32's
(3x for gradients) plus a rounding floor. Logits are compared at real (unpadded) tokens only;
padded rows carry no loss, so every parameter gradient is compared in full.

Features are covered pairwise (family x rope_type x padding x GQA), not as a product, to keep
the file under its time budget.
"""
import copy
import importlib

import pytest
import torch

from helpers import assert_rule

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import posattn  # noqa: E402
import posattn.hf as phf  # noqa: E402

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# hidden 32, head_dim 16, 2 layers for every family (names differ per config class)
LLAMA_LIKE = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                  initializer_range=0.1, attention_dropout=0.0)
FAMILIES = {
    "llama": dict(LLAMA_LIKE, head_dim=16, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(LLAMA_LIKE, num_key_value_heads=1, sliding_window=4),
    "qwen2": dict(LLAMA_LIKE, num_key_value_heads=1),
    "qwen3": dict(LLAMA_LIKE, head_dim=16, num_key_value_heads=1),
    "gemma2": dict(LLAMA_LIKE, head_dim=16, num_key_value_heads=1, sliding_window=4,
                   attn_logit_softcapping=2.0, query_pre_attn_scalar=24, final_logit_softcapping=None),
    "phi3": dict(LLAMA_LIKE, num_key_value_heads=2),
    "gpt_neox": dict(LLAMA_LIKE, rotary_pct=0.5, hidden_dropout=0.0),
    "gptj": dict(n_embd=32, n_head=2, n_layer=2, rotary_dim=8, initializer_range=0.1, attn_pdrop=0.0,
                 resid_pdrop=0.0, embd_pdrop=0.0),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, new_decoder_architecture=True,
                   num_kv_heads=1, initializer_range=0.1, alibi=False),
    "falcon_alibi": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                         initializer_range=0.1),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, initializer_range=0.2),
    "mpt": dict(d_model=64, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=32, initializer_range=0.1),
}
S = 9


def _config(family, **extra):
    model_type = "falcon" if family == "falcon_alibi" else family
    return AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[family], **extra})


def _model(family, attn="eager", **extra):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(_config(family, **extra), attn_implementation=attn).eval()


def _batch(B=2, left_pad=(0, 3), right_pad=(0, 0), seed=1):
    """input_ids (B, S), attention_mask (B, S), labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        mask[b, :left_pad[b]] = 0
        if right_pad[b]:
            mask[b, S - right_pad[b]:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    # No loss on a real token predicted from a padded position (the shifted label of a left-padded
    # row's first token): padded rows' outputs are arbitrary (eager: uniform attention; posattn: 0).
    first = mask.cumsum(1) == 1
    return ids, mask, ids.masked_fill((mask == 0) | first, -100)


def _run(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _eager64(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers' eager attention, but with the softmax in the inputs' dtype: its own eager
    code takes the softmax in float32 even for a float64 model (and turns the float64 mask's
    minimum into -inf there: NaN rows under left padding)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    logits = query @ key.transpose(2, 3) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if attention_mask is not None:
        logits = logits + attention_mask
    return (logits.softmax(-1) @ value).transpose(1, 2).contiguous(), None


def _softmax_in_input_dtype(monkeypatch):
    """BLOOM's own attention code: F.softmax(..., dtype=float32) keeps float64 instead."""
    real = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return real(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)
    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


def _reference64(eager):
    ref = copy.deepcopy(eager).double()
    if type(ref).__name__.startswith(("Bloom", "Mpt")):
        return ref
    ref.set_attn_implementation("eager64")
    return ref


def _check_against_eager(eager, candidate, ids, mask, labels):
    """candidate fp32 vs eager fp32, both against eager fp64: logits (real tokens) and every
    parameter gradient, by the error rule."""
    with pytest.MonkeyPatch.context() as mp:
        _softmax_in_input_dtype(mp)
        logits64, grads64 = _run(_reference64(eager), ids, mask, labels)
    logits32, grads32 = _run(eager, ids, mask, labels)
    logits, grads = _run(candidate, ids, mask, labels)
    real = mask.bool()
    assert_rule("logits", logits[real], logits64[real], logits32[real], 2, torch.float32)
    assert grads.keys() == grads64.keys()
    for name, g64 in grads64.items():
        assert g64 is not None and grads[name] is not None, name
        assert_rule(f"grad {name}", grads[name], g64, grads32[name], 3, torch.float32)


# --------------------------------------------------------------------------------------------
# 1. register(): attn_implementation="posattn", q/k rotated by transformers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    phf.register()
    AttentionInterface.register("eager64", _eager64)
    AttentionMaskInterface.register("eager64", eager_mask)


@pytest.mark.parametrize("family, batch", [
    ("llama", dict(left_pad=(0, 3))),                # GQA 4/2, left padding
    ("mistral", dict(left_pad=(0, 0), right_pad=(0, 2))),  # sliding window 4 < S, right padding
    ("gemma2", dict(left_pad=(2, 0))),               # softcap, query_pre_attn_scalar, mixed windows
])
def test_register_logits_and_grads(family, batch):
    eager = _model(family)
    candidate = copy.deepcopy(eager)
    candidate.set_attn_implementation("posattn")
    assert candidate.config._attn_implementation == "posattn"
    _check_against_eager(eager, candidate, *_batch(**batch))


@pytest.mark.parametrize("family, cache", [("qwen3", "dynamic"), ("llama", "static")])
def test_register_from_config_generate_left_padding(family, cache):
    """from_config(attn_implementation="posattn"), batched greedy generate() with left padding,
    a DynamicCache or a StaticCache (unwritten slots: a padding mask shorter than the keys):
    token for token the eager model's."""
    eager = _model(family)
    model = _model(family, attn="posattn")
    model.load_state_dict(eager.state_dict())
    ids, mask, _ = _batch(left_pad=(0, 3))
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation=cache)
    out = model.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
    ref = eager.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _packed_and_padded(lens=(5, 3)):
    """Two sequences: as one packed row (position_ids restarting) and as a right-padded batch."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lens]
    packed = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    L = max(lens)
    padded = torch.zeros(len(lens), L, dtype=torch.long)
    mask = torch.zeros(len(lens), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        padded[b, :len(s)] = s
        mask[b, :len(s)] = 1
    return packed, pos, padded, mask, lens


@pytest.mark.parametrize("fused", [False, True])
def test_packed_equals_padded(fused):
    """Packed sequences (position_ids restarting; and cu_seq_lens kwargs, unfused) give the
    padded batch's logits."""
    model = _model("qwen2", attn="posattn")
    if fused:
        phf.fuse(model)
    packed, pos, padded, mask, lens = _packed_and_padded()
    with torch.no_grad():
        ref = model(input_ids=padded, attention_mask=mask).logits
        ref = torch.cat([ref[b, :n] for b, n in enumerate(lens)])
        got = model(input_ids=packed, position_ids=pos).logits[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        if not fused:
            cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
            got = model(input_ids=packed, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=max(lens), max_length_k=max(lens)).logits[0]
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_register_refuses_what_it_cannot_run():
    """BLOOM (own eager ALiBi) and Falcon alibi=True (ALiBi in a 4-D mask) only run fused; a
    dropout > 0 is refused, never silently dropped."""
    for family in ("bloom", "falcon_alibi"):
        model = _model(family, attn="posattn")
        with pytest.raises(ValueError, match="posattn.hf.fuse"):
            model(torch.ones(1, 3, dtype=torch.long))
    q = torch.zeros(1, 2, 3, 16)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="dropout"):
        phf.attention_forward(module, q, q, q, None, dropout=0.1)


# --------------------------------------------------------------------------------------------
# 2. fuse(): the model's RoPE / ALiBi replaced by posattn's, from the model's config
# --------------------------------------------------------------------------------------------

def _rope(rope_type, **kw):
    return {"rope_type": rope_type, "rope_theta": 10000.0, **kw}


SHORT, LONG = [1.0, 1.5, 2.0, 1.2], [2.0, 3.0, 4.0, 6.0]  # LongRoPE factors for rotary dim 8

# (family, config overrides, batch): each family once, each rope_type once, padding / GQA /
# partial rotary / interleaving spread over them.
FUSE_CASES = [
    ("llama", dict(rope_parameters=_rope("default")), dict(left_pad=(0, 3))),
    ("llama", dict(rope_parameters=_rope("llama3", factor=4.0, original_max_position_embeddings=4,
                                         low_freq_factor=1.0, high_freq_factor=4.0)), dict(left_pad=(0, 0))),
    ("mistral", dict(rope_parameters=_rope("linear", factor=2.0)), dict(left_pad=(0, 3))),
    ("qwen2", dict(rope_parameters=_rope("dynamic", factor=2.0), max_position_embeddings=6),
     dict(left_pad=(0, 0))),
    ("qwen3", dict(rope_parameters=_rope("yarn", factor=4.0, original_max_position_embeddings=4)),
     dict(left_pad=(0, 2))),
    ("gemma2", dict(), dict(left_pad=(0, 0))),
    ("phi3", dict(rope_parameters=_rope("longrope", short_factor=SHORT, long_factor=LONG,
                                        partial_rotary_factor=0.5), original_max_position_embeddings=6,
                  max_position_embeddings=24), dict(left_pad=(0, 3))),
    ("gpt_neox", dict(), dict(left_pad=(0, 3))),
    ("gptj", dict(), dict(left_pad=(2, 0))),
    ("falcon", dict(), dict(left_pad=(0, 3))),
    ("falcon_alibi", dict(), dict(left_pad=(0, 3))),
    ("bloom", dict(), dict(left_pad=(0, 3))),
    # MPT's own attention takes the softmax of .float() scores: a float64 copy has NaN rows
    # under left padding, so right padding here (left padding: the generate test)
    ("mpt", dict(), dict(left_pad=(0, 0), right_pad=(3, 0))),
]


@pytest.mark.parametrize("family, extra, batch", FUSE_CASES,
                         ids=[f"{f}-{(e.get('rope_parameters') or {}).get('rope_type', 'own')}"
                              for f, e, _ in FUSE_CASES])
def test_fuse_logits_and_grads(family, extra, batch):
    eager = _model(family, **extra)
    fused = phf.fuse(copy.deepcopy(eager))
    assert fused.config._attn_implementation == "posattn"
    _check_against_eager(eager, fused, *_batch(**batch))


@pytest.mark.parametrize("family", ["llama", "mistral", "bloom", "mpt", "falcon_alibi"])
def test_fuse_generate_left_padding(family):
    """Greedy batched generate() with left padding and a DynamicCache (Mistral: a sliding-window
    cache cropped below the prompt's length): token for token the eager model's (a default,
    length-independent PE, where both caches agree)."""
    eager = _model(family)
    fused = phf.fuse(copy.deepcopy(eager))
    ids, mask, _ = _batch(left_pad=(0, 3))
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    out = fused.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
    ref = eager.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_dynamic_ntk_cache_is_the_full_recomputation():
    """Dynamic NTK past max_position_embeddings: the fused model's cached generation equals
    transformers' no-cache full recomputation (every key rotated with the current length's
    frequencies); transformers' own cached generation differs (its cached keys keep the
    frequencies of the step that wrote them).

    One layer: with more, a cached token's deeper keys and values come from hidden states
    computed at an earlier length under any implementation, so no cache equals a recomputation.
    """
    eager = _model("llama", rope_parameters=_rope("dynamic", factor=4.0), max_position_embeddings=6,
                   num_hidden_layers=1)
    fused = phf.fuse(copy.deepcopy(eager))
    ids, mask, _ = _batch(B=1, left_pad=(0,))
    ids, mask = ids[:, :5], mask[:, :5]
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    full = eager.generate(ids, use_cache=False, **kw)
    cached = eager.generate(ids, use_cache=True, **kw)
    ours = fused.generate(ids, use_cache=True, **kw)
    for step, (a, b) in enumerate(zip(ours.logits, full.logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")
    assert torch.equal(ours.sequences, full.sequences)
    gap = max((a - b).abs().max().item() for a, b in zip(cached.logits, full.logits))
    assert gap > 1e-3, f"transformers' cached path should differ here (max diff {gap:.2e})"


def test_fuse_with_a_rope_extension():
    """fuse(model, extend=...): a window past every distance is the model as trained (the eager
    one, logits and gradients); a short one changes the logits, and its cached greedy
    generation equals the fused model's own no-cache recomputation (the cache holds unrotated
    keys, so each step remaps every key from its position). A model without RoPE refuses."""
    eager = _model("llama", num_hidden_layers=1)
    wide = phf.fuse(copy.deepcopy(eager), extend=posattn.SelfExtend(group=2, window=64))
    _check_against_eager(eager, wide, *_batch(left_pad=(0, 0)))
    short = phf.fuse(copy.deepcopy(eager), extend=posattn.LeakyReRoPE(window=3, factor=2))
    ids, mask, _ = _batch(B=1, left_pad=(0,))
    with torch.no_grad():
        gap = (short(ids).logits - wide(ids).logits).abs().max().item()
    assert gap > 1e-3, f"the extension should change the logits ({gap:.2e})"
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    for ext in (posattn.LeakyReRoPE(window=3, factor=2), posattn.DualChunk(4, 1)):
        model = short if isinstance(ext, posattn.LeakyReRoPE) else phf.fuse(copy.deepcopy(eager),
                                                                            extend=ext)
        cached = model.generate(ids, use_cache=True, **kw)
        full = model.generate(ids, use_cache=False, **kw)
        for a, b in zip(cached.logits, full.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs a RoPE model"):
        phf.fuse(_model("bloom"), extend=posattn.ReRoPE(4))
    with pytest.raises(TypeError, match="extend"):
        phf.fuse(_model("llama"), extend="rerope")


def test_unfuse_restores_and_unknown_models_are_refused():
    eager = _model("gpt_neox")
    model = phf.fuse(copy.deepcopy(eager))
    with pytest.raises(ValueError, match="already fused"):
        phf.fuse(model)
    assert phf.unfuse(model) is model
    assert model.config._attn_implementation == "eager"
    ids, mask, _ = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2,
                                                                 vocab_size=VOCAB))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        phf.fuse(gpt2)
    assert not hasattr(gpt2, "_posattn_undo")


def test_transformers_sees_hf_kernels_not_ours():
    """Run from the repository root, transformers' hub-kernels import still finds Hugging Face's
    `kernels` distribution, not this repository's kernels/ folder (posattn.kernels)."""
    importlib.import_module("transformers.integrations.hub_kernels")
    import posattn.kernels.launch as launch

    assert launch.__file__.endswith("launch.py")
    kernels = importlib.import_module("kernels")
    assert getattr(kernels, "__file__", None) and "site-packages" in kernels.__file__
