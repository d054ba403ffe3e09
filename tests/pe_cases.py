"""The tests' PE specs, in one place: a factory for every registered PE (posattn.pe.REGISTRY)
plus named variants, each variant recording the registry name it is a variant of.

Tests and bench enumerate the registry rather than keeping lists of PE names, so that a newly
registered PE (say a T5 bucketed bias) cannot be forgotten by a test: lists of "every PE" or
"every bias PE" come from :func:`names` / :func:`every_pe` / :func:`bias_pes`, and
tests/test_pe.py fails while a registered name has no factory here, or a factory's spec reports
other axes than ``posattn.pe.axes(name)``.

A factory is ``make(H, D) -> pe``: what ``posattn.attention`` takes as ``pe`` (a name or a spec)
for H query heads of head dim D, with fresh trainable leaves on every call.

Two suites, whose values differ for the same names (each kept as its tests have always used it):

* ``"harness"`` (attn_harness.PES: test_robustness, test_far_positions, ...): trainable
  parameters drawn from a fixed seed per parameter, on every call the same (so "alibi" is
  trainable, and its variant "alibi_trainable" is the same spec by its explicit name); RoPE
  partial and interleaved.
* ``"kernel"`` (test_kernels._pes, test_tma): RoPE and ALiBi by name (the defaults), trainable
  variants, and KERPLE parameters drawn from one seed-7 generator per table
  (:func:`kernel_cases` makes a fresh table), in the order the factories are called.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

import posattn
from posattn.pe import axes, registered
from conftest import DEVICE

REGISTERED = registered()  # every registered PE name, in registration order


class Case(NamedTuple):
    name: str       # the registry name, or the variant's own name
    base: str       # the registry name it is (a variant of)
    make: Callable  # (H, D) -> pe: a PE name or spec (fresh trainable leaves every call)

    @property
    def variant(self) -> bool:
        return self.name != self.base


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _table(cases: Iterable[Case]) -> dict[str, Case]:
    return {c.name: c for c in cases}


# ---------------------------------------------------------------------------------------------
# "harness" suite (attn_harness.PES)
# ---------------------------------------------------------------------------------------------

def _param(H, lo, hi, seed):
    return (lo + (hi - lo) * torch.rand(H, generator=_gen(seed))).to(DEVICE).requires_grad_()


def _fire(H, seed):
    """A FIRE with trainable leaves (nn.Linear's initialisation from ``seed``), c 0.3, L 24,
    16 cells."""
    base = posattn.FIRE.random(H, width=16, seed=seed)
    def leaf(t):
        return t.detach().to(DEVICE).requires_grad_()
    return posattn.FIRE(leaf(base.w1), leaf(base.b1), leaf(base.w2), leaf(base.b2),
                        c=leaf(torch.tensor(0.3)), L=leaf(torch.tensor(24.0)), num_cells=16)


def _t5_table(H, buckets, seed):
    """A T5 table (H, buckets) of a trained model's magnitude (entries of a few units)."""
    return (2.0 * torch.randn(H, buckets, generator=_gen(seed))).to(DEVICE).requires_grad_()


HARNESS = _table([
    Case("none", "none", lambda H, D: "none"),
    Case("rope", "rope", lambda H, D: posattn.RoPE(rotary_dim=2 * max(1, (3 * D) // 8), interleaved=True)),
    Case("alibi", "alibi", lambda H, D: posattn.ALiBi(_param(H, 0.05, 0.5, 1))),
    Case("kerple_log", "kerple_log",
         lambda H, D: posattn.KERPLE("log", _param(H, 0.2, 2.0, 2), _param(H, 0.05, 1.0, 3))),
    Case("kerple_power", "kerple_power",
         lambda H, D: posattn.KERPLE("power", _param(H, 0.2, 1.0, 4), _param(H, 0.3, 1.5, 5))),
    # T5: max_distance 20, so that short test sequences reach the log-spaced buckets and
    # the saturated last one
    Case("t5", "t5", lambda H, D: posattn.T5Bias(_t5_table(H, 32, 6), max_distance=20)),
    # d_bar 32, not the paper's 128: the same kernel path, a 4x cheaper distance table in the
    # interpreter (far-positions cases build 10**6 entries); 128 in test_sandwich and the fuzz
    Case("sandwich", "sandwich", lambda H, D: posattn.Sandwich(d_bar=32)),
    # xPos: scale_base 32, not 512, so that test lengths see the decay; causal only
    Case("xpos", "xpos", lambda H, D: posattn.XPos(scale_base=32.0, interleaved=True)),
    # FIRE: L 24 and c 0.3, so that test lengths have rows on both sides of the threshold;
    # 16 cells (a quarter of the default: a shorter gradient walk in the interpreter)
    Case("fire", "fire", lambda H, D: _fire(H, 8)),
    # variants
    Case("t5_decoder", "t5",
         lambda H, D: posattn.T5Bias(_t5_table(H, 32, 6), bidirectional=False, max_distance=20)),
    Case("alibi_trainable", "alibi", lambda H, D: posattn.ALiBi(_param(H, 0.05, 0.5, 1))),  # = "alibi"
    Case("dynamic_ntk", "rope", lambda H, D: posattn.RoPE(scaling=posattn.DynamicNTK(2.0, 4))),
])


# ---------------------------------------------------------------------------------------------
# "kernel" suite (test_kernels._pes)
# ---------------------------------------------------------------------------------------------

def kernel_cases() -> dict[str, Case]:
    """A fresh "kernel" table: its factories share one seed-7 generator (as test_kernels._pes
    always did: each test makes a fresh table, so a factory called once draws the same values)."""
    g = _gen(7)

    def param(H, lo, hi):
        return (lo + (hi - lo) * torch.rand(H, generator=g)).to(DEVICE).requires_grad_()

    return _table([
        Case("none", "none", lambda H, D: "none"),
        Case("rope", "rope", lambda H, D: "rope"),
        # partial rotary, GPT-J pairs: rotate 3/4 of the head dim (rounded to even)
        Case("rope_interleaved_partial", "rope",
             lambda H, D: posattn.RoPE(rotary_dim=2 * max(1, (3 * D) // 8), interleaved=True)),
        Case("rope_yarn_partial", "rope",
             lambda H, D: posattn.RoPE(base=500000.0, scaling=posattn.YaRN(4.0, 32),
                                       rotary_dim=2 * max(1, D // 4))),
        Case("alibi", "alibi", lambda H, D: "alibi"),
        Case("alibi_trainable", "alibi", lambda H, D: posattn.ALiBi(param(H, 0.05, 0.5))),
        Case("kerple_log", "kerple_log",
             lambda H, D: posattn.KERPLE("log", param(H, 0.2, 2.0), param(H, 0.05, 1.0))),
        Case("kerple_power", "kerple_power",
             lambda H, D: posattn.KERPLE("power", param(H, 0.2, 1.0), param(H, 0.3, 1.5))),
        Case("t5", "t5", lambda H, D: posattn.T5Bias(
            (2.0 * torch.randn(H, 32, generator=g)).to(DEVICE).requires_grad_(), max_distance=20)),
        Case("sandwich", "sandwich", lambda H, D: posattn.Sandwich(d_bar=32)),
        Case("xpos", "xpos", lambda H, D: posattn.XPos(scale_base=64.0, interleaved=False)),
        Case("fire", "fire", lambda H, D: _fire(H, 9)),
    ])


SUITES = {"harness": lambda: HARNESS, "kernel": kernel_cases}


def cases(suite: str = "harness") -> dict[str, Case]:
    """Case name -> Case of a suite (the registered names first-class, variants after their base)."""
    try:
        return SUITES[suite]()
    except KeyError:
        raise ValueError(f"unknown suite {suite!r}; one of {sorted(SUITES)}") from None


def pe_factory(name: str, suite: str = "harness") -> Callable:
    """The factory ``make(H, D)`` of a registered PE or a variant. A registered PE that has no
    factory here yet gets one that raises when called, so each test of it fails and says why
    (and tests/test_pe.py fails too) while the other PEs' tests still run."""
    table = cases(suite)
    if name in table:
        return table[name].make
    msg = (f"tests/pe_cases.py: suite {suite!r} has no factory for {name!r} "
           f"(registered: {list(REGISTERED)}; cases: {list(table)})")
    if name not in REGISTERED:
        raise KeyError(msg)

    def missing(H, D):
        raise NotImplementedError(msg)

    return missing


def base_of(name: str, suite: str | None = None) -> str:
    """The registry name a case (registered name or variant) is of."""
    if name in REGISTERED:
        return name
    for s in ([suite] if suite else list(SUITES)):
        table = cases(s)
        if name in table:
            return table[name].base
    raise KeyError(f"tests/pe_cases.py has no PE case {name!r}")


def _wanted(base: str, rotary, bias, family) -> bool:
    """Does the registered PE ``base`` have these axes? ``rotary`` / ``bias``: True (any but
    "none"), False ("none"), a kind name, or None (either); ``family``: a tile family or None."""
    r, b, f = axes(base)
    for want, got in ((rotary, r), (bias, b)):
        if want is True and got == "none" or want is False and got != "none":
            return False
        if isinstance(want, str) and got != want:
            return False
    return family is None or f == family


def names(suite: str = "harness", *, variants: bool | Iterable[str] = False,
          substitute: dict[str, str | list[str]] | None = None,
          rotary=None, bias=None, family: str | None = None) -> list[str]:
    """Every registered PE name (registration order) with the given axes, each followed by its
    variants: all of the suite's (``variants=True``), none (False), or the named ones.
    ``substitute`` maps a registered name to the variant(s) to use instead of it (e.g. ALiBi as
    its trainable variant). Filters: ``rotary`` / ``bias`` True (has one), False (has none) or a
    kind; ``family`` a tile family."""
    table = cases(suite)
    substitute = {k: [v] if isinstance(v, str) else list(v) for k, v in (substitute or {}).items()}
    if variants is True:
        picked = [n for n, c in table.items() if c.variant]
    else:
        picked = list(variants or [])
    for n in picked + [v for vs in substitute.values() for v in vs]:
        if n not in table or not table[n].variant:
            raise KeyError(f"tests/pe_cases.py: suite {suite!r} has no variant {n!r}")
    for k, vs in substitute.items():
        if k not in REGISTERED or any(table[v].base != k for v in vs):
            raise ValueError(f"substitute {k!r} -> {vs}: not variants of a registered name")
    out = []
    for base in REGISTERED:
        if not _wanted(base, rotary, bias, family):
            continue
        out += substitute.get(base, [base])
        out += [n for n in picked if table[n].base == base and n not in out]
    return out


def every_pe(variants: bool | Iterable[str] = False, suite: str = "harness") -> list[str]:
    """Every registered PE name (optionally plus variants, each after its base)."""
    return names(suite, variants=variants)


def bias_pes(variants: bool | Iterable[str] = False, suite: str = "harness", **kw) -> list[str]:
    """Every registered PE with a bias (posattn.pe.axes(name)[1] != "none")."""
    return names(suite, variants=variants, bias=True, **kw)


def causal_only(name: str, suite: str | None = None) -> bool:
    """Is the registered PE a case is of defined for causal attention only (xPos)? Its
    non-causal cases are a ValueError, which the suites check instead of running them."""
    from posattn.pe import REGISTRY
    return REGISTRY[base_of(name, suite)]().causal_only


def invalid_pair(a: str, x, b: str, y) -> bool:
    """A pair of factor values no case can hold (the pairwise tables skip it; the suites check
    that the API refuses it): a causal-only PE (factor "pe") without the causal mask."""
    vals = {a: x, b: y}
    return ("pe" in vals and "causal" in vals and vals["causal"] is False
            and causal_only(vals["pe"]))


def with_causal(names_: Iterable[str], suite: str | None = None) -> list:
    """(name, causal) pytest params for every name and mask, but a causal-only PE's
    non-causal one (invalid_pair; the refusal is tested on its own), ids "name-full" /
    "name-causal"."""
    import pytest
    return [pytest.param(n, c, id=f"{n}-{'causal' if c else 'full'}")
            for n in names_ for c in (False, True)
            if c or not causal_only(n, suite)]
