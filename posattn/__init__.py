"""posattn: positional encodings fused into FlashAttention-style Triton attention.

    out = posattn.attention(q, k, v, pe="alibi", causal=True)
    out = posattn.attention(q, k, v, pe=posattn.RoPE(scaling=posattn.YaRN(8.0, 4096)))

Importing posattn never queries CUDA and never imports Triton; the kernels load on first use.
"""
from .api import attention
from .pe import (
    PE, NoPE, RoPE, ALiBi, KERPLE,
    RoPEScaling, PI, NTK, DynamicNTK, YaRN, Llama3, LongRoPE,
    alibi_slopes,
)
from . import reference

try:  # posattn.nn (KERPLEBias) is being written alongside; keep import-time robust meanwhile
    from . import nn
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"

__all__ = [
    "attention", "PE", "NoPE", "RoPE", "ALiBi", "KERPLE",
    "RoPEScaling", "PI", "NTK", "DynamicNTK", "YaRN", "Llama3", "LongRoPE",
    "alibi_slopes", "reference", "nn",
]
