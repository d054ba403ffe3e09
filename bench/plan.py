"""What the benchmark measures: the cases (shape, PE, mode), their FLOPs and their inputs."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Iterable, List, Sequence

import torch

PES = ("none", "rope", "alibi", "kerple")
# The bias PEs with learnable parameters (slopes; r1, r2) that require grad: the backward also
# returns their gradients. fwd+bwd only (a forward does not differ from the fixed PE's).
TRAINABLE_PES = ("alibi-train", "kerple-train")
ALL_PES = PES + TRAINABLE_PES
MODES = ("fwd", "fwd+bwd")
FULL_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
FULL_HEAD_DIMS = (64, 128)
QUICK_SEQLENS = (2048, 8192)
QUICK_HEAD_DIMS = (128,)
TOKENS = 16384  # B * S, the same work per sequence length
HEADS = 16

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# FLOP convention of flash-attn and the Triton benchmarks: two matmuls of 2*Sq*Sk*D each,
# half of it under a causal mask; backward is 2.5x forward.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass(frozen=True)
class Shape:
    """One attention problem: q, k, v of shape (B, H, S, D), self-attention (Sq = Sk = S)."""

    B: int
    H: int
    S: int
    D: int
    causal: bool
    mode: str  # "fwd" | "fwd+bwd"
    dtype: str = "bf16"

    @property
    def key(self):
        """Identifies the shape; every implementation of every PE at this key is comparable."""
        return (self.D, self.causal, self.mode, self.S)

    def describe(self) -> str:
        c = "causal" if self.causal else "full"
        return f"S={self.S:<5} D={self.D:<3} B={self.B:<2} {c:<6} {self.mode:<7}"

    def as_dict(self) -> dict:
        return asdict(self)


def attention_flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool, mode: str) -> float:
    """FLOPs = 4·B·H·Sq·Sk·D, ×0.5 causal, ×2.5 backward, ×3.5 forward+backward."""
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {sorted(MODE_FLOP_FACTOR)}, got {mode!r}")
    f = 4.0 * B * H * Sq * Sk * D
    if causal:
        f *= 0.5
    return f * MODE_FLOP_FACTOR[mode]


def base_pe(pe: str) -> str:
    """'kerple-train' -> 'kerple': the PE whose math a trainable variant shares."""
    return pe[: -len("-train")] if pe.endswith("-train") else pe


def is_trainable(pe: str) -> bool:
    return pe in TRAINABLE_PES


def shape_flops(shape: Shape) -> float:
    return attention_flops(shape.B, shape.H, shape.S, shape.S, shape.D, shape.causal, shape.mode)


def make_shapes(seqlens: Sequence[int], head_dims: Sequence[int], causals: Sequence[bool],
                modes: Sequence[str], tokens: int = TOKENS, heads: int = HEADS,
                dtype: str = "bf16", largest_first: bool = False) -> List[Shape]:
    """The sweep, S outermost: ascending (a cut-short run keeps every (D, mask, mode) at small
    S) or, with ``largest_first``, descending (a cut-short quick run keeps the target sizes).

    The batch is ``max(1, tokens // S)``: every S does the same number of tokens.
    """
    shapes = []
    seqs = sorted(seqlens, reverse=largest_first)
    for S, D, causal, mode in itertools.product(seqs, sorted(head_dims, reverse=True), causals, modes):
        shapes.append(Shape(B=max(1, tokens // S), H=heads, S=S, D=D, causal=causal, mode=mode,
                            dtype=dtype))
    return shapes


@dataclass
class Inputs:
    """q, k, v (B, H, S, D) and the output gradient; leaves require grad for fwd+bwd shapes.
    ``params``: the learnable PE parameters of the implementation being timed (a trainable
    PE's builder sets them), leaves too: their gradients are reset between calls as well."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    params: List[torch.Tensor] = field(default_factory=list)

    @property
    def leaves(self) -> List[torch.Tensor]:
        return [self.q, self.k, self.v] + list(self.params)

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v, self.dout))


def make_inputs(shape: Shape, device, seed: int = 0) -> Inputs:
    """Standard-normal inputs (never zeros: they hide bugs and run faster than real data)."""
    g = torch.Generator(device=device).manual_seed(seed + shape.S * 131 + shape.D)
    dtype = DTYPES[shape.dtype]
    dims = (shape.B, shape.H, shape.S, shape.D)
    grad = shape.mode != "fwd"
    q, k, v, dout = (torch.randn(dims, generator=g, device=device, dtype=dtype) for _ in range(4))
    return Inputs(q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad), dout)


def parse_int_list(text: str) -> List[int]:
    """'512,1k,2k' -> [512, 1024, 2048]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def parse_choices(text: str, allowed: Iterable[str], what: str) -> List[str]:
    allowed = list(allowed)
    items = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in items if p not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad}; choose from {allowed}")
    return items
