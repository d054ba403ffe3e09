"""torch.nn modules holding learnable PE parameters.

    bias = posattn.nn.KERPLEBias(num_heads=12, kind="log")
    out = posattn.attention(q, k, v, pe=bias.spec(), causal=True)   # gradients reach bias.r1 / bias.r2
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .pe import KERPLE, _KERPLE_KINDS, _positive_int

__all__ = ["KERPLEBias"]


class KERPLEBias(nn.Module):
    """Learnable per-head KERPLE bias (Chi et al. 2022), initialised and constrained as the paper's
    reference code (``ParallelKerpleLog`` / ``ParallelKerplePower`` in the KERPLE GPT-NeoX fork).

    kind="log":   bias ``-r1 * log(1 + r2 * |Δ|)``; init ``r1 ~ 2·U(0,1)``, ``r2 ~ U(0,1)``.
    kind="power": bias ``-r1 * |Δ| ** r2``;        init ``r1 ~ U(0,1)``,  ``r2 ~ 2·U(0,1)``.

    (The reference code names the log kernel's multiplier ``bias_p`` (init 2·U) and its inner
    scale ``bias_a`` (U); for the power kernel ``bias_a`` (U) is the multiplier and ``bias_p``
    (2·U) the exponent. Mapped to r1 = multiplier, r2 = inner parameter, that gives the above.)

    Constraints ``r1, r2 >= 1e-2`` and, for power, ``r2 <= 2`` (the kernel is conditionally
    positive definite for exponents in (0, 2]). They are applied in place, outside autograd, each
    time :meth:`spec` is called, as the reference code clamps at the top of ``forward``: the
    optimizer may step a parameter out of range, and the next forward pulls it back.

    Args:
        num_heads: query heads H.
        kind: "log" or "power".
        device, dtype: of the parameters (default: torch's defaults; fp32 recommended).

    Parameters:
        r1, r2: (num_heads,).
    """

    eps: float = 1e-2          # lower bound of r1 and r2, as the reference code
    power_max: float = 2.0     # upper bound of the power kernel's exponent r2

    def __init__(self, num_heads: int, kind: str = "log", *, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_heads = _positive_int("num_heads", num_heads)
        if kind not in _KERPLE_KINDS:
            raise ValueError(f"kind must be one of {_KERPLE_KINDS}, got {kind!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.kind = kind
        factory = {"device": device, "dtype": dtype}
        self.r1 = nn.Parameter(torch.empty(self.num_heads, **factory))
        self.r2 = nn.Parameter(torch.empty(self.num_heads, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw r1, r2 as the reference code: the 2·U(0,1) one is the log multiplier / power exponent."""
        r1_scale, r2_scale = (2.0, 1.0) if self.kind == "log" else (1.0, 2.0)
        with torch.no_grad():
            self.r1.uniform_(0.0, 1.0).mul_(r1_scale)
            self.r2.uniform_(0.0, 1.0).mul_(r2_scale)
        self.clamp_()

    def clamp_(self) -> None:
        """Project r1, r2 into their allowed range, in place and outside autograd.

        Writes through ``.data`` (as the reference code): a ``no_grad`` in-place op would bump the
        parameters' version counters, and then a second ``spec()`` call within one forward (a
        bias module shared by several layers) would fail backward with "modified by an inplace
        operation" even though clamping an in-range value changes nothing.
        """
        self.r1.data.clamp_(min=self.eps)
        if self.kind == "power":
            self.r2.data.clamp_(min=self.eps, max=self.power_max)
        else:
            self.r2.data.clamp_(min=self.eps)

    def spec(self) -> KERPLE:
        """Clamp, then return a :class:`posattn.KERPLE` holding the live parameters (gradients flow)."""
        self.clamp_()
        return KERPLE(self.kind, self.r1, self.r2)

    def forward(self) -> KERPLE:
        """Same as :meth:`spec` (so ``bias()`` works and module hooks fire)."""
        return self.spec()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kind={self.kind!r}"
