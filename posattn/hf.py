"""Hugging Face transformers integration: ``attn_implementation="posattn"`` and fused PEs.

Two ways to use it::

    import posattn.hf
    posattn.hf.register()                       # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="posattn")
    # or: model.set_attn_implementation("posattn")

    model = posattn.hf.fuse(model)              # also fuse the model's RoPE / ALiBi into the kernel
    model = posattn.hf.unfuse(model)            # back to the model's own PE code

``register()`` replaces only the attention math: q/k arrive already rotated by the model, as for
sdpa / flash_attention_2. Padding never becomes an S x S mask: the registered mask function hands
the attention function the 2-D padding mask (B, Sk) (or None), which becomes per-sequence lengths
(``posattn.attention_varlen`` over the unpadded tokens), as flash-attn does.

``fuse()`` additionally removes the model's own rotation (its rotary module returns cos = 1,
sin = 0, so q/k pass through unrotated; BLOOM / MPT / Falcon-ALiBi get posattn's ALiBi instead
of their bias tensors) and the kernel applies the PE from token positions. Consequence: the KV
cache holds **unrotated** keys, and a length-dependent scaling (dynamic NTK, LongRoPE's
short/long switch) rotates every cached key with the frequencies of the current length, as the
method defines it (transformers' own cached path keeps keys rotated with the frequencies of the
step that wrote them; in models of more than one layer the cached tokens' deeper hidden states
still come from earlier steps, under any implementation). A fused model's cache is therefore
not interchangeable with another implementation's.

transformers is imported here only: ``import posattn`` never imports it.
"""
from __future__ import annotations

import math
import types
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .api import attention, attention_varlen
from .pe import PE, ALiBi, NoPE, RoPE, RoPEExtension

__all__ = ["NAME", "register", "fuse", "unfuse", "attention_forward", "mask_forward", "FUSABLE"]

NAME = "posattn"

# Families fuse() knows: model_type -> how its PE is swapped (see _FUSERS at the bottom).
FUSABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt_neox", "gptj", "falcon",
           "bloom", "mpt")

# Families whose attention does not go through AttentionInterface (BLOOM, MPT) or that bake the
# PE into a 4-D float mask (Falcon alibi=True): they work only fused. id(config) -> config.
_FUSED_CONFIGS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def register(name: str = NAME) -> None:
    """Register ``name`` with transformers' AttentionInterface and AttentionMaskInterface.

    Idempotent. After it, ``attn_implementation=name`` works for every model that calls the
    attention interface (Llama, Mistral, Qwen2/3, Gemma 2, Phi-3, GPT-NeoX, GPT-J, Falcon, ...).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_forward)


# --------------------------------------------------------------------------------------------
# The mask function: padding as a 2-D (B, Sk) bool mask or None, never S x S
# --------------------------------------------------------------------------------------------

_NEEDS_FUSE = {"bloom": "BLOOM computes ALiBi in its own eager attention",
               "mpt": "MPT computes ALiBi in its own eager attention"}


def mask_forward(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function=None, attention_mask: Optional[torch.Tensor] = None, config=None,
                 use_vmap: bool = False, **kwargs) -> Optional[torch.Tensor]:
    """transformers' mask-interface hook. Returns None (no padding: causal / window / packing
    come from the attention call's kwargs) or the bool padding mask (B, L) of the keys, True =
    a real token, L <= kv_length (L < kv_length: a static cache's unwritten tail, cut off).

    Custom mask overlays (``or_mask_function`` / ``and_mask_function``, e.g. image tokens
    attending bidirectionally) cannot be expressed by lengths and positions: ValueError.
    """
    _refuse_unfused(config)
    if use_vmap:
        raise ValueError("posattn: this model asks for a custom mask pattern (or_mask_function / "
                         "and_mask_function), which posattn cannot express without an S x S mask; "
                         "use attn_implementation='sdpa' or 'eager' for it")
    if attention_mask is not None:
        mask = attention_mask[:, -kv_length:].to(torch.bool)
        if mask.shape[1] == kv_length and bool(mask.all()):
            mask = None
    elif kv_length > q_length + int(q_offset):
        # A static cache: keys past the tokens seen so far are unwritten slots.
        mask = torch.ones(batch_size, q_length + int(q_offset), dtype=torch.bool,
                          device=kwargs.get("device", "cpu"))
    else:
        mask = None
    model_type = getattr(config, "model_type", None)
    if mask is None and model_type == "mpt":
        # MptModel calls .to(torch.bool) on the mask; its fused attention reads None and
        # all-ones alike.
        mask = torch.ones(batch_size, kv_length, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    return mask


def _refuse_unfused(config) -> None:
    model_type = getattr(config, "model_type", None)
    if config is None or id(config) in _FUSED_CONFIGS:
        return
    why = _NEEDS_FUSE.get(model_type)
    if model_type == "falcon" and getattr(config, "alibi", False):
        why = "Falcon with alibi=True adds ALiBi to a 4-D float mask"
    if why:
        raise ValueError(f"attn_implementation='{NAME}' cannot run {model_type!r} as is: {why}. "
                         f"Call posattn.hf.fuse(model), which runs posattn's fused ALiBi instead")


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                      dropout: float = 0.0, **kwargs):
    """transformers' attention-interface hook.

    Args:
        module: the calling attention module (``is_causal``; ``_posattn_pe`` when fused).
        query: (B, Hq, Sq, D); key, value: (B, Hkv, Sk, D / Dv), the whole cache when there is
            one (the last Sq keys are the queries' own).
        attention_mask: None or the (B, L) bool padding mask from :func:`mask_forward`.
        scaling: logit scale (default 1/sqrt(D)). dropout: must be 0 (posattn has none).
        kwargs: ``is_causal``, ``sliding_window``, ``softcap``, ``position_ids`` (B or 1, Sq),
            ``cu_seq_lens_q/k``, ``max_length_q/k``; ``s_aux`` / ``position_bias`` are refused.

    Returns:
        ``(out (B, Sq, Hq, Dv), None)``.
    """
    if dropout:
        raise ValueError(f"dropout={dropout}: posattn has no attention dropout; set the config's "
                         f"attention dropout to 0 (or use attn_implementation='sdpa' to train with it)")
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"posattn does not support the {name!r} argument this model passes "
                             f"(learned sinks / a precomputed S x S bias); use 'eager' or 'sdpa'")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be the (B, L) padding mask of attn_implementation="
                         f"'{NAME}' (posattn.hf.register() registers its mask function), got shape "
                         f"{tuple(attention_mask.shape)}")
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    pe = getattr(module, "_posattn_pe", None) or NoPE()
    out = attend(query, key, value, attention_mask, pe=pe, causal=causal, scale=scaling,
                 sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"),
                 position_ids=kwargs.get("position_ids"), cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
                 cu_seq_lens_k=kwargs.get("cu_seq_lens_k"), max_length_q=kwargs.get("max_length_q"),
                 max_length_k=kwargs.get("max_length_k"))
    return out, None


def attend(q, k, v, mask, *, pe: PE, causal: bool, scale=None, sliding_window=None, softcap=None,
           position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
           max_length_k=None) -> torch.Tensor:
    """posattn on transformers' tensors. q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) bhsd views;
    mask None or (B, L) bool (L <= Sk). Returns (B, Sq, Hq, Dv).

    The PE is applied from positions only when it needs them (fused RoPE / ALiBi); a NoPE call
    (q/k rotated by the model) uses posattn's default, end-aligned positions, which is all
    causal masking and windows need.
    """
    if mask is not None and mask.shape[1] < k.shape[2]:
        k, v = k[:, :, :mask.shape[1]], v[:, :, :mask.shape[1]]  # static cache: unwritten slots
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    window = None
    if sliding_window is not None:
        left = int(sliding_window) - 1  # transformers' window counts the query itself
        window = (left, 0) if causal else (left, left)
    geo = dict(causal=causal, scale=scale, window=window, softcap=softcap or None)
    positional = not isinstance(pe, NoPE)
    qpos = kpos = None
    if positional:
        qpos, kpos = _positions(position_ids, mask, B, Sq, Sk, q.device)
        pe = _freeze(pe, qpos)
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        return _packed(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, pe,
                       qpos, kpos, geo)
    if mask is not None:
        return _unpadded(q, k, v, mask, pe, qpos, kpos, geo)
    starts = _packed_starts(position_ids, B, Sq, Sk)
    if starts is not None:
        cu = torch.tensor(starts + [Sq], dtype=torch.int32, device=q.device)
        return _packed(q, k, v, cu, cu, None, None, pe, qpos, kpos, geo)
    if positional:
        qp, kp = _contiguous(qpos, kpos)
        geo.update(q_positions=qp, k_positions=kp)
    # bshd views of transformers' tensors (q is bshd memory already): the output comes back
    # bshd, as the caller reshapes it.
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pe, layout="bshd", **geo)


def _positions(position_ids, mask, B: int, Sq: int, Sk: int, device):
    """Token positions (q (B, Sq), k (B, Sk) int64) for a position-dependent PE.

    Queries: ``position_ids`` (what transformers rotates with); without them, the count of real
    tokens before each (BLOOM's rule). Keys: the queries' own when Sk == Sq; with a cache,
    counted back from the last query over the real keys (the tokens seen are contiguous in
    position, as generate() numbers them). Padding tokens get positions too; they are dropped.
    """
    valid = mask if mask is not None else None
    if position_ids is not None:
        qpos = position_ids.to(device=device, dtype=torch.int64).expand(B, Sq)
    elif valid is not None:
        qpos = (valid.long().cumsum(1) - 1).clamp_min(0)[:, -Sq:]
    else:
        qpos = torch.arange(Sk - Sq, Sk, device=device).expand(B, Sq)
    if Sk == Sq and position_ids is not None:
        return qpos, qpos
    if valid is None:
        back = torch.arange(Sk - 1, -1, -1, device=device).expand(B, Sk)
    else:
        back = valid.long().flip(1).cumsum(1).flip(1) - 1  # real keys after each one
    return qpos, qpos[:, -1:] - back


def _freeze(pe: PE, qpos: torch.Tensor) -> PE:
    """A length-dependent RoPE at the length transformers would use: max position + 1 over the
    batch (it takes ``max(position_ids) + 1``), so that every piece of a call, and every cached
    key, is rotated with the same frequencies."""
    if isinstance(pe, RoPE) and pe.needs_cur_len:
        return pe.at_length(int(qpos.max()) + 1)
    return pe


def _contiguous(qpos, kpos):
    """Positions as ints (the kernels' contiguous fast path) when every row is start + index
    with the same start; else the tensors."""
    Sq, Sk = qpos.shape[1], kpos.shape[1]
    q0 = int(qpos[0, 0])
    ar = torch.arange(Sk, device=kpos.device)
    if bool((kpos == ar + (q0 - (Sk - Sq))).all()) and bool((qpos == ar[Sk - Sq:] + (q0 - (Sk - Sq))).all()):
        return q0, q0 - (Sk - Sq)
    return qpos, kpos


def _packed_starts(position_ids, B: int, Sq: int, Sk: int):
    """Sequence starts of a packed batch (B == 1, no cache, positions restarting), as flash-attn
    detects it from ``position_ids``; None when not packed."""
    if position_ids is None or B != 1 or Sq != Sk or Sq < 2:
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() != Sq:
        return None
    breaks = (pos[1:] - pos[:-1]) != 1
    if not bool(breaks.any()):
        return None
    return [0] + (breaks.nonzero().reshape(-1) + 1).tolist()


def _tokens(t):
    """(B, H, S, D) bhsd -> (B * S, H, D) rows in token order."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


def _packed(q, k, v, cu_q, cu_k, max_q, max_k, pe, qpos, kpos, geo):
    """Packed sequences in one row (B == 1): attention_varlen on the flattened tokens."""
    B, Hq, Sq, _ = q.shape
    if cu_q is None or cu_k is None:
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be given together")
    cu_q, cu_k = (c.to(device=q.device, dtype=torch.int32) for c in (cu_q, cu_k))
    extra = {}
    if qpos is not None:
        extra = dict(q_positions=qpos.reshape(-1), k_positions=kpos.reshape(-1))
    out = attention_varlen(_tokens(q), _tokens(k), _tokens(v), cu_q, cu_k,
                           _as_int(max_q), _as_int(max_k), pe, **extra, **geo)
    return out.reshape(B, Sq, Hq, -1)


def _as_int(x):
    return None if x is None else int(x)


def _unpadded(q, k, v, mask, pe, qpos, kpos, geo):
    """Padding as lengths: drop padded tokens, attend per sequence (attention_varlen), put the
    outputs back (padded query rows get 0, as with flash-attn)."""
    B, Hq, Sq, _ = q.shape
    valid_k = mask
    valid_q = mask[:, -Sq:]
    idx_q = valid_q.reshape(-1).nonzero().reshape(-1)
    idx_k = valid_k.reshape(-1).nonzero().reshape(-1)
    cu_q = F.pad(valid_q.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(valid_k.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    extra = {}
    if qpos is not None:
        extra = dict(q_positions=qpos.reshape(-1)[idx_q], k_positions=kpos.reshape(-1)[idx_k])
    out = attention_varlen(_tokens(q)[idx_q], _tokens(k)[idx_k], _tokens(v)[idx_k], cu_q, cu_k,
                           None, None, pe, **extra, **geo)
    full = out.new_zeros(B * Sq, Hq, out.shape[-1]).index_copy(0, idx_q, out)
    return full.reshape(B, Sq, Hq, -1)


# --------------------------------------------------------------------------------------------
# fuse / unfuse
# --------------------------------------------------------------------------------------------


def fuse(model, extend=None):
    """Swap ``model``'s own RoPE / ALiBi for posattn's fused one and run its attention through
    posattn (``attn_implementation="posattn"``, registered if needed). Returns ``model``.

    The PE is read from the model: RoPE from its config (:meth:`posattn.RoPE.from_hf_config`,
    every rope_type transformers has), ALiBi slopes from the model's own slope code. Families:
    ``posattn.hf.FUSABLE``; any other model is a ValueError (nothing is changed then).

    ``extend``: a :class:`posattn.RoPEExtension` (``posattn.ReRoPE``, ``LeakyReRoPE``,
    ``SelfExtend``, ``DualChunk``) to run a RoPE model past its trained context without retraining, e.g.
    ``fuse(model, extend=posattn.SelfExtend(group=8, window=1024))``; a ValueError for a model
    without RoPE. It works with generation's KV cache as it is, because the cache holds
    unrotated keys.

    After fuse() the KV cache holds unrotated keys (see the module docstring). Undo with
    :func:`unfuse`.
    """
    if extend is not None and not isinstance(extend, RoPEExtension):
        raise TypeError(f"extend must be None or a posattn.RoPEExtension (ReRoPE, LeakyReRoPE, "
                        f"SelfExtend, DualChunk), got {type(extend).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if getattr(model, "_posattn_undo", None) is not None:
        raise ValueError("model is already fused (posattn.hf.unfuse(model) first)")
    fuser = _FUSERS.get(model_type)
    if fuser is None:
        raise ValueError(f"posattn.hf.fuse does not know model_type {model_type!r} "
                         f"({type(model).__name__}); it fuses {', '.join(FUSABLE)}. Use "
                         f"attn_implementation='{NAME}' (posattn.hf.register()) without fuse()")
    register()
    undo = _Undo()
    try:
        fuser(model, config, undo)
        if extend is not None:
            _extend_rope(model, config, undo, extend)
        undo.impl = config._attn_implementation
        _FUSED_CONFIGS[id(config)] = config
        undo.on_undo(lambda: _FUSED_CONFIGS.pop(id(config), None))
        _set_impl(model, NAME)
    except BaseException:
        undo.run(model)
        raise
    model._posattn_undo = undo
    return model


def unfuse(model):
    """Undo :func:`fuse`: the model's own PE code and its previous attn_implementation.
    Returns ``model``. A cache filled while fused (unrotated keys) must not be reused."""
    undo = getattr(model, "_posattn_undo", None)
    if undo is None:
        raise ValueError("model is not fused by posattn.hf.fuse")
    undo.run(model)
    del model._posattn_undo
    return model


class _Undo:
    """What fuse() changed, to put back in reverse order."""

    def __init__(self):
        self.steps = []
        self.impl = None

    def set(self, obj, attr, value):
        had = attr in vars(obj)
        old = vars(obj).get(attr)
        setattr(obj, attr, value)
        self.steps.append(lambda: setattr(obj, attr, old) if had else delattr(obj, attr))

    def on_undo(self, fn):
        self.steps.append(fn)

    def run(self, model):
        for step in reversed(self.steps):
            step()
        self.steps = []
        if self.impl is not None:
            _set_impl(model, self.impl)


def _set_impl(model, name: str) -> None:
    """model.set_attn_implementation(name); BLOOM and MPT refuse it (their attention never calls
    the interface), but their mask creation reads the config's name, which is what fuse() needs."""
    can_set = getattr(model, "_can_set_attn_implementation", lambda: True)
    if can_set():
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.config._attn_implementation_internal = name


def _attention_modules(model, config):
    """The attention modules: those with a ``layer_idx`` whose class name ends in Attention."""
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not mods:
        raise ValueError(f"found no attention modules in {type(model).__name__}")
    return mods


def _extend_rope(model, config, undo, extend) -> None:
    """Give every fused attention module's RoPE spec the extension (fuse's ``extend``)."""
    for mod in _attention_modules(model, config):
        pe = getattr(mod, "_posattn_pe", None)
        if not isinstance(pe, RoPE):
            raise ValueError(f"extend= needs a RoPE model; {type(model).__name__} "
                             f"({config.model_type}) attends with {type(pe).__name__}")
        undo.set(mod, "_posattn_pe", pe.with_extend(extend))


def _rope_spec(config, module) -> RoPE:
    rope = getattr(config, "rope_parameters", None) or {}
    nested = isinstance(rope, dict) and any(isinstance(x, dict) for x in rope.values())
    layer_type = getattr(module, "layer_type", None) if nested else None
    return RoPE.from_hf_config(config, layer_type=layer_type)


def _fuse_rope(model, config, undo, spec_of=_rope_spec, sin_first=False):
    """Rotary families: every rotary-embedding module returns cos = 1, sin = 0 (so the model's
    apply_rotary_pos_emb leaves q/k as they are: exact), and each attention module carries the
    RoPE spec for the kernel to apply from positions."""
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not rotaries:
        raise ValueError(f"found no rotary embedding module in {type(model).__name__}")
    for rot in rotaries:
        undo.set(rot, "forward", types.MethodType(_identity_rotary(sin_first), rot))
    for mod in _attention_modules(model, config):
        undo.set(mod, "_posattn_pe", spec_of(config, mod))


def _rotary_width(rot) -> int:
    """Last dim of a rotary module's cos/sin: 2 * len(inv_freq) (Llama-style: cos of both halves)
    or half the GPT-J sin/cos table's width."""
    inv = getattr(rot, "inv_freq", None)
    if inv is not None:
        return 2 * inv.numel()
    return rot.embed_positions.shape[-1] // 2


def _identity_rotary(sin_first: bool):
    def forward(self, x, position_ids=None, *args, **kwargs):
        """(cos, sin) = (1, 0), (pB, S, width) expanded views: rotation by angle 0."""
        if position_ids is None:
            raise ValueError("a fused rotary embedding needs position_ids")
        shape = (position_ids.shape[0], position_ids.shape[-1], _rotary_width(self))
        one = torch.ones((), dtype=x.dtype, device=x.device).expand(shape)
        zero = torch.zeros((), dtype=x.dtype, device=x.device).expand(shape)
        return (zero, one) if sin_first else (one, zero)
    return forward


def _gptj_spec(config, module) -> RoPE:
    # GPT-J hard-codes base 10000 and rotates interleaved pairs of the first rotary_dim dims.
    return RoPE(10000.0, rotary_dim=getattr(config, "rotary_dim", None), interleaved=True)


def _fuse_gptj(model, config, undo):
    _fuse_rope(model, config, undo, spec_of=_gptj_spec, sin_first=True)


def _fuse_falcon(model, config, undo):
    if not getattr(config, "alibi", False):
        _fuse_rope(model, config, undo)
        return
    from transformers.models.falcon import modeling_falcon

    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    # Falcon's own slopes (rounded to bf16 as it does), and its bias is added after the
    # 1/sqrt(head_dim) scaling of the logits... divided by sqrt(head_dim) once more.
    ones = torch.ones(1, 2, dtype=torch.long)
    slopes = modeling_falcon.build_alibi_tensor(ones, heads, torch.float32)[:, 0, 1] / math.sqrt(head_dim)
    base = model.base_model
    undo.set(base, "use_alibi", False)  # FalconModel then builds no S x S alibi mask
    for mod in _attention_modules(model, config):
        undo.set(mod, "_posattn_pe", _ALiBiOnDevice(slopes))


class _ALiBiOnDevice(ALiBi):
    """ALiBi with fixed slopes, moved to the inputs' device on first use (the model may move)."""

    def __init__(self, slopes: torch.Tensor):
        super().__init__(slopes.to(torch.float32))

    def check(self, num_heads, head_dim, device):
        if self.slopes.device != torch.device(device):
            self.slopes = self.slopes.to(device)
        super().check(num_heads, head_dim, device)


def _fuse_bloom(model, config, undo):
    from transformers.models.bloom import modeling_bloom

    slopes = modeling_bloom._get_alibi_slopes(config.n_head, torch.device("cpu"))
    for mod in _attention_modules(model, config):
        undo.set(mod, "_posattn_pe", _ALiBiOnDevice(slopes))
        undo.set(mod, "forward", types.MethodType(_bloom_forward, mod))


def _cache_arg(kwargs):
    for name in ("layer_past", "cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _bloom_forward(self, hidden_states, residual, alibi=None, attention_mask=None, **kwargs):
    """BloomAttention.forward with posattn's causal ALiBi: BLOOM's bias ``slope * k_pos`` (k_pos
    counting real tokens) differs from ``-slope * |q_pos - k_pos|`` by a per-query constant, which
    softmax ignores."""
    from transformers.models.bloom import modeling_bloom

    q, k, v = self._reshape(self.query_key_value(hidden_states))  # (B, H, S, D) views
    cache = _cache_arg(kwargs)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    if self.training and self.attention_dropout.p:
        raise ValueError("posattn has no attention dropout; set BloomConfig.attention_dropout=0")
    out = attend(q, k, v, attention_mask, pe=self._posattn_pe, causal=True, scale=self.inv_norm_factor)
    context = out.reshape(*hidden_states.shape[:2], -1)
    if self.pretraining_tp > 1 and self.slow_but_exact:
        raise ValueError("posattn.hf.fuse: BLOOM with slow_but_exact tensor-parallel sums is not supported")
    output = modeling_bloom.dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None


def _fuse_mpt(model, config, undo):
    from transformers.models.mpt import modeling_mpt

    attn_cfg = config.attn_config
    if not getattr(attn_cfg, "alibi", True):
        raise ValueError("posattn.hf.fuse: this MPT config has alibi=False (no PE to fuse)")
    if getattr(attn_cfg, "attn_pdrop", 0.0):
        raise ValueError("posattn has no attention dropout; set attn_config.attn_pdrop=0")
    heads = config.n_heads
    # MPT's bias for a key L - 1 - j steps back is -slope * (L - 1 - j): read the slopes off it.
    table = modeling_mpt.build_mpt_alibi_tensor(heads, 2, attn_cfg.alibi_bias_max)
    slopes = -table[:, 0, 0].to(torch.float32)
    for mod in _attention_modules(model, config):
        undo.set(mod, "_posattn_pe", _ALiBiOnDevice(slopes))
        undo.set(mod, "forward", types.MethodType(_mpt_forward, mod))


def _mpt_forward(self, hidden_states, position_bias=None, attention_mask=None, **kwargs):
    """MptAttention.forward with posattn's causal ALiBi (MPT's bias is relative to the last key:
    the same softmax)."""
    B, S = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(B, S, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    cache = _cache_arg(kwargs)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    out = attend(q, k, v, attention_mask, pe=self._posattn_pe, causal=True, scale=self.softmax_scale)
    return self.out_proj(out.reshape(B, S, -1)), None


_FUSERS = {
    "llama": _fuse_rope, "mistral": _fuse_rope, "qwen2": _fuse_rope, "qwen3": _fuse_rope,
    "gemma2": _fuse_rope, "phi3": _fuse_rope, "gpt_neox": _fuse_rope, "gptj": _fuse_gptj,
    "falcon": _fuse_falcon, "bloom": _fuse_bloom, "mpt": _fuse_mpt,
}
