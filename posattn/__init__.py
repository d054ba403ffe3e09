"""posattn: positional encodings fused into FlashAttention-style Triton attention.

    out = posattn.attention(q, k, v, pe="alibi", causal=True)
    out = posattn.attention(q, k, v, pe=posattn.RoPE(scaling=posattn.YaRN(8.0, 4096)))

Importing posattn never queries CUDA and never imports Triton; the kernels load on first use.
"""
import os as _os

# The Triton code lives in the repository's top-level kernels/ folder and is only ever the
# subpackage `posattn.kernels`. That folder has no __init__.py on purpose: run from the
# repository root (python -m posattn, python -m pytest), the root is first on sys.path, and a
# regular package named `kernels` there would shadow Hugging Face's `kernels` distribution
# (which transformers imports). A folder without __init__.py is at most a PEP 420 namespace
# portion, and the import system takes any regular package of that name over it, wherever
# it sits on sys.path (tests/test_kernels_name.py). Importing posattn.kernels imports Triton:
# set TRITON_INTERPRET=1 before that to run on CPU.
# setup.py installs ../kernels as posattn.kernels. A source checkout used without installing
# (python -m posattn from the repository root, or a machine where pip cannot build) has no
# posattn/kernels: there the repository root joins this package's search path, so that
# `posattn.kernels` resolves to ../kernels all the same.
_here = _os.path.dirname(_os.path.abspath(__file__))
if (not _os.path.isdir(_os.path.join(_here, "kernels"))
        and _os.path.isfile(_os.path.join(_os.path.dirname(_here), "kernels", "attn_fwd.py"))):
    __path__.append(_os.path.dirname(_here))
from .api import attention, attention_varlen
from .kvcache import attention_with_kvcache
from .pe import (
    PE, NoPE, RoPE, XPos, ALiBi, KERPLE, T5Bias, Sandwich, FIRE,
    RoPEScaling, PI, NTK, DynamicNTK, YaRN, Llama3, LongRoPE,
    RoPEExtension, ReRoPE, LeakyReRoPE, SelfExtend, DualChunk,
    alibi_slopes,
)
from . import reference
from . import distributed  # ring attention (context parallelism) over torch.distributed

try:  # posattn.nn (KERPLEBias) is being written alongside; keep import-time robust meanwhile
    from . import nn
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_varlen", "attention_with_kvcache", "PE", "NoPE", "RoPE", "XPos", "ALiBi", "KERPLE", "T5Bias", "Sandwich", "FIRE",
    "RoPEScaling", "PI", "NTK", "DynamicNTK", "YaRN", "Llama3", "LongRoPE",
    "RoPEExtension", "ReRoPE", "LeakyReRoPE", "SelfExtend", "DualChunk",
    "alibi_slopes", "reference", "nn", "distributed",
]
