"""Token positions: either contiguous (``start + index``) or an explicit integer tensor.

Contiguous positions are what a plain forward or a KV cache needs and let the kernel skip
fully masked causal tiles and build RoPE angles by angle addition; explicit tensors express
chunked prefill with gaps, context parallelism, randomized PE and PoSE.
"""
from __future__ import annotations

from typing import Optional

import torch

_INT32_LIMIT = 2 ** 31 - 1


class Positions:
    """Positions of S tokens.

    Exactly one of ``start`` (int) and ``tensor`` ((1, S) or (B, S) integer) is set.
    """

    def __init__(self, length: int, start: Optional[int] = None, tensor: Optional[torch.Tensor] = None):
        self.length = length
        self.start = start
        self.tensor = tensor

    @property
    def is_contiguous(self) -> bool:
        return self.tensor is None

    def as_tensor(self, batch: int, length: int, device) -> torch.Tensor:
        """(batch, length) int64 on ``device`` (an expanded view when possible)."""
        if self.tensor is None:
            return (torch.arange(length, device=device, dtype=torch.int64) + self.start).expand(batch, length)
        return self.tensor.to(torch.int64).expand(batch, length)

    def max_position(self) -> int:
        """Largest position (synchronises on a GPU tensor; only length-dependent RoPE asks)."""
        if self.tensor is None:
            return self.start + self.length - 1
        if self.tensor.numel() == 0:
            return -1
        return int(self.tensor.max().item())


def parse_positions(arg, name: str, batch: int, length: int, default_start: int, device) -> Positions:
    """Validate a ``q_positions`` / ``k_positions`` argument.

    None -> contiguous from ``default_start``; int -> contiguous from it (|start| < 2**30: the
    kernels form contiguous positions in int32); integer tensor (S,) or (B, S) -> explicit, any
    int64 value (the kernels widen explicit positions to int64).
    """
    if arg is None:
        arg = default_start
    if isinstance(arg, bool):
        raise TypeError(f"{name} must be None, an int or an integer tensor of shape ({length},) or "
                        f"({batch}, {length}); got a bool")
    if isinstance(arg, int):
        if abs(arg) > _INT32_LIMIT // 2 or abs(arg + length) > _INT32_LIMIT // 2:
            raise ValueError(f"{name}={arg} with {length} tokens does not fit in int32 positions")
        return Positions(length, start=int(arg))
    if not isinstance(arg, torch.Tensor):
        raise TypeError(f"{name} must be None, an int or an integer tensor; got {type(arg).__name__}")
    if arg.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got dtype {arg.dtype}")
    if arg.device != device:
        raise ValueError(f"{name} is on {arg.device} but q is on {device}")
    if arg.dim() == 1 and arg.shape[0] == length:
        t = arg[None]
    elif arg.dim() == 2 and tuple(arg.shape) == (batch, length):
        t = arg
    else:
        raise ValueError(f"{name} must have shape ({length},) or ({batch}, {length}), got {tuple(arg.shape)}")
    return Positions(length, tensor=t)
