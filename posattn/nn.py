"""torch.nn modules holding learnable PE parameters.

    bias = posattn.nn.KERPLEBias(num_heads=12, kind="log")
    out = posattn.attention(q, k, v, pe=bias.spec(), causal=True)   # gradients reach bias.r1 / bias.r2
    fire = posattn.nn.FIREBias(num_heads=12)                         # FIRE: an MLP, c and L
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .pe import FIRE, KERPLE, _KERPLE_KINDS, _positive_int

__all__ = ["KERPLEBias", "FIREBias"]


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


class FIREBias(nn.Module):
    """Learnable FIRE bias (Li et al. 2023, arXiv 2310.04418), laid out and initialised as the
    paper's reference module: an MLP ``Linear(1, mlp_width) -> activation -> Linear(mlp_width,
    num_heads)`` (torch's default initialisation), ``c`` learnable (init 0.1), the threshold
    ``L = |L_multiplier * init_L|`` with ``init_L`` fixed (512) and ``L_multiplier`` learnable
    (init 1).

    One difference, on purpose: the activation defaults to GELU, not the paper's ReLU; the
    kernels read f_theta from a table of cubics, exact to fp32 rounding only for a smooth
    MLP (posattn.FIRE explains why, and refuses ReLU).

        fire = posattn.nn.FIREBias(num_heads=12)
        out = posattn.attention(q, k, v, pe=fire.spec(), causal=True)  # gradients reach fire's
                                                                       # MLP, c and L_multiplier
    Args:
        num_heads: query heads H.
        mlp_width: the MLP's hidden width (default 32, the paper's).
        init_c, init_L, eps: as the paper (0.1, 512, 1e-6).
        activation: "gelu" (default) | "silu" | "tanh".
        num_cells: the kernels' table cells (posattn.FIRE; default 64).
        device, dtype: of the parameters.
    """

    def __init__(self, num_heads: int, mlp_width: int = 32, *, init_c: float = 0.1,
                 init_L: float = 512.0, eps: float = 1e-6, activation: str = "gelu",
                 num_cells: int = 64, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_heads = _positive_int("num_heads", num_heads)
        factory = {"device": device, "dtype": dtype}
        self.mlp_in = nn.Linear(1, _positive_int("mlp_width", mlp_width), **factory)
        self.mlp_out = nn.Linear(mlp_width, self.num_heads, **factory)
        self.c = nn.Parameter(torch.tensor(float(init_c), **factory))
        self.register_buffer("init_L", torch.tensor(float(init_L), **factory))
        self.L_multiplier = nn.Parameter(torch.tensor(1.0, **factory))
        self.eps = eps
        self.activation = activation
        self.num_cells = num_cells
        self.spec()  # validate the options now, not at the first forward

    def spec(self) -> FIRE:
        """A :class:`posattn.FIRE` holding the live parameters (gradients flow)."""
        return FIRE(self.mlp_in.weight[:, 0], self.mlp_in.bias, self.mlp_out.weight,
                    self.mlp_out.bias, c=self.c, L=(self.L_multiplier * self.init_L).abs(),
                    eps=self.eps, activation=self.activation, num_cells=self.num_cells)

    def forward(self) -> FIRE:
        """Same as :meth:`spec`."""
        return self.spec()

    def interpolation_error(self) -> float:
        """The kernels' table against the exact MLP, in units of the bias's fp32 rounding
        (posattn.FIRE.interpolation_error): below 1 is exact to fp32."""
        return self.spec().interpolation_error()

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, activation={self.activation!r}, "
                f"num_cells={self.num_cells}")
