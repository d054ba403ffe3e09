"""Seeded random differential fuzz: the Triton kernels (the interpreter on CPU) against the
float64 reference, judged by the harness's rule (attn_harness.check: flash-attention's rule plus
FlashSlack) on out, LSE and every gradient (q, k, v and the trainable PE parameters), and with
no input modified in place.

Each case draws everything at random: B, Hq, Hkv (GQA), Sq, Sk (small and odd, 1 included), D and
Dv, dtype (fp16 / fp32: the interpreter's bf16 dot is wrong), layout, causal, scale, a PE of every
kind (none; RoPE with every scaling, partial and interleaved; ALiBi default and trainable; KERPLE
log / power, trainable or not), positions (default, int offsets, explicit (S,) or (B, S)
tensors, shuffled, sparse random sorted ones from a range >> S as randomized PE draws them, and
queries far past the keys or keys far past the queries, up to 10**6 apart), inputs and dout as
strided views (slices of bigger tensors, the other layout's storage, a batch-expanded k / v),
and sometimes a forced split-K forward.

Budget: POSATTN_FUZZ_CASES cases (default 60, ~40 s on a 2-core CPU with -n 0) from POSATTN_FUZZ_SEED
(default fixed, so CI is reproducible). A case depends only on (seed, index), so a failure
reproduces with ``POSATTN_FUZZ_SEED=<seed> pytest 'tests/test_fuzz.py::test_fuzz[case<index>]'`` at
any budget; its message prints the whole case. Longer runs: ``POSATTN_FUZZ_CASES=500``.
"""
import math
import os
import random
from contextlib import contextmanager

import pytest
import torch

import posattn
from posattn import (ALiBi, DynamicNTK, FIRE, KERPLE, Llama3, LongRoPE, NTK, PI, RoPE, Sandwich, T5Bias,
                     XPos, YaRN)
from conftest import DEVICE
from attn_harness import check
from pe_cases import REGISTERED

CASES = int(os.environ.get("POSATTN_FUZZ_CASES", "60"))
SEED = int(os.environ.get("POSATTN_FUZZ_SEED", "20240611"))

LENGTHS = [1, 1, 3, 5, 7, 9, 11, 13, 17, 21, 23, 29, 33, 37, 41]
HEAD_DIMS = [16, 24, 32]
FAR = [1000, 4000, 20000, 10 ** 5, 10 ** 6]
# Largest |bias| for which the naive math in the input dtype is still a yardstick (past it the
# bias rounds by more than 0.06), and the largest fp16 distance: the naive math forms |q - k| in
# the input dtype, inf past 65504 (its gradients then NaN). A case past them runs in fp32.
BIAS_LIMIT = {torch.float16: 250.0, torch.float32: 2e6}
FP16_MAX_DIST = 60000


# --------------------------------------------------------------------------------------------
# drawing a case: a plain dict of Python values (printable, and rebuilt the same by run_case)
# --------------------------------------------------------------------------------------------

def _draw_scaling(rng, rotary_dim):
    half = rotary_dim // 2
    kind = rng.choice(["none", "pi", "ntk", "dynamic_ntk", "yarn", "llama3", "longrope"])
    if kind in ("ntk", "dynamic_ntk") and rotary_dim <= 2:
        kind = "pi"  # NTK needs rotary_dim > 2
    factor = round(rng.uniform(1.5, 16.0), 3)
    L0 = rng.choice([8, 16, 32, 4096])
    if kind == "none":
        return None
    if kind in ("pi", "ntk"):
        return (kind, factor)
    if kind in ("dynamic_ntk", "yarn", "llama3"):
        return (kind, factor, L0)
    short = [round(rng.uniform(1.0, 2.0), 3) for _ in range(half)]
    long_ = [round(rng.uniform(1.0, 8.0), 3) for _ in range(half)]
    return ("longrope", short, long_, L0, rng.choice([None, factor]))


# What _draw_pe draws from: every registered PE, each followed by extra draws of its own (RoPE
# twice as often: it has the most forms; ALiBi's trainable variant).
EXTRA_DRAWS = {"rope": ["rope"], "alibi": ["alibi_trainable"]}
PE_KINDS = [k for name in REGISTERED for k in [name] + EXTRA_DRAWS.get(name, [])]


def _draw_pe(rng, Hq, D):
    kind = rng.choice(PE_KINDS)
    if kind == "none":
        return {"kind": "none", "form": rng.choice(["none", None, "NoPE"])}
    if kind == "rope":
        rotary_dim = rng.choice([None, None, rng.randrange(2, D + 1, 2)])
        return {"kind": "rope", "base": rng.choice([10000.0, 500000.0]),
                "scaling": _draw_scaling(rng, rotary_dim or D), "rotary_dim": rotary_dim,
                "interleaved": rng.random() < 0.5}

    def heads(lo, hi):
        return [round(rng.uniform(lo, hi), 4) for _ in range(Hq)]

    if kind == "alibi":
        return {"kind": "alibi", "slopes": None, "form": rng.choice(["alibi", "ALiBi()"])}
    if kind == "alibi_trainable":
        return {"kind": "alibi", "slopes": heads(0.005, 1.0)}
    if kind == "t5":  # a trainable table; few buckets or T5's 32, short or T5's max_distance
        nb = rng.choice([8, 32])
        return {"kind": "t5", "table": [[round(rng.uniform(-3.0, 3.0), 3) for _ in range(nb)]
                                        for _ in range(Hq)],
                "bidirectional": rng.random() < 0.5, "max_distance": rng.choice([20, 128])}
    if kind == "sandwich":  # parameter-free; the paper's width or a narrow one
        return {"kind": "sandwich", "d_bar": rng.choice([16, 128]), "heads": Hq}
    if kind == "xpos":  # causal only (draw_case); torchscale's scale base or a strong decay
        rotary_dim = rng.choice([None, None, rng.randrange(2, D + 1, 2)])
        return {"kind": "xpos", "base": 10000.0, "scale_base": rng.choice([512.0, 64.0]),
                "scaling": _draw_scaling(rng, rotary_dim or D), "rotary_dim": rotary_dim,
                "interleaved": rng.random() < 0.7}
    if kind == "fire":  # an MLP from a seed: the paper's width or a narrow one, L short or long
        return {"kind": "fire", "heads": Hq, "seed": rng.randrange(1000), "width": rng.choice([8, 32]),
                "c": round(rng.uniform(0.05, 1.0), 4), "L": rng.choice([16.0, 512.0]),
                "activation": rng.choice(["gelu", "silu", "tanh"]), "cells": rng.choice([16, 64])}
    if not kind.startswith("kerple"):
        raise NotImplementedError(f"test_fuzz draws no {kind!r} case: teach _draw_pe, make_pe and "
                                  "_bias_bound about it")
    trainable = rng.choice(["r1", "r2", "both", "both"])
    r1 = heads(0.1, 2.0) if trainable in ("r1", "both") else round(rng.uniform(0.1, 2.0), 4)
    r2 = heads(0.05, 1.5) if trainable in ("r2", "both") else round(rng.uniform(0.05, 1.5), 4)
    return {"kind": "kerple", "type": kind.split("_")[1], "r1": r1, "r2": r2}


def _draw_positions(rng, B, S):
    """One side's positions before any far shift: None, an int start, or explicit values."""
    mode = rng.choice(["default", "default", "int", "vector", "per_batch", "shuffled", "sparse"])
    if mode == "default":
        return None
    if mode == "int":
        return rng.randint(-40, 3000)
    n = B if mode == "per_batch" else 1
    if mode == "shuffled":
        start = rng.randint(-20, 100)
        rows = [rng.sample(range(start, start + S), S) for _ in range(n)]
    elif mode == "sparse":  # randomized PE: sorted draws from a range >> S
        hi = rng.choice([1000, 20000, 10 ** 6])
        rows = [sorted(rng.randrange(hi) for _ in range(S)) for _ in range(n)]
    else:
        rows = [[rng.randint(-30, 90) for _ in range(S)] for _ in range(n)]
        if rng.random() < 0.5:
            rows = [sorted(r) for r in rows]
    return {"values": rows if mode == "per_batch" else rows[0],
            "dtype": rng.choice(["int32", "int64"]), "strided": rng.random() < 0.3}


def _shift(pos, offset, default_start):
    """``pos`` moved by ``offset`` (a default becomes an int start)."""
    if pos is None:
        return default_start + offset
    if isinstance(pos, int):
        return pos + offset
    vals = pos["values"]
    shifted = [[v + offset for v in r] for r in vals] if isinstance(vals[0], list) else [v + offset for v in vals]
    return dict(pos, values=shifted)


def _position_rows(pos, B, S, default_start):
    """The positions as B rows of S ints (what the reference sees)."""
    if pos is None or isinstance(pos, int):
        start = default_start if pos is None else pos
        return [list(range(start, start + S))] * B
    vals = pos["values"]
    return vals if isinstance(vals[0], list) else [vals] * B


def _bias_bound(pe, max_dist):
    """Largest |bias| the PE gives at distances up to max_dist (0 for RoPE / none)."""
    def mx(x):
        return max(x) if isinstance(x, list) else x

    if pe["kind"] == "alibi":
        return (mx(pe["slopes"]) if pe["slopes"] is not None else 1.0) * max_dist
    if pe["kind"] == "t5":
        return max(abs(x) for row in pe["table"] for x in row)
    if pe["kind"] == "sandwich":  # a_1 = H / 8 times at most d_bar
        return pe["heads"] / 8 * pe["d_bar"]
    if pe["kind"] == "fire":  # bounded by its MLP on u in [0, 1], whatever the distance
        f = FIRE.random(pe["heads"], pe["width"], pe["seed"], activation=pe["activation"])
        return float(f.mlp(torch.linspace(0, 1, 257, dtype=torch.float64)).abs().max())
    if pe["kind"] == "kerple":
        if pe["type"] == "log":
            return mx(pe["r1"]) * math.log1p(mx(pe["r2"]) * max_dist)
        return mx(pe["r1"]) * max_dist ** mx(pe["r2"])
    return 0.0


def draw_case(rng):
    """A random case (a dict of plain values; see the module docstring)."""
    B, Hkv = rng.randint(1, 3), rng.randint(1, 2)
    Hq = Hkv * rng.choice([1, 1, 2, 3])
    Sq, Sk = rng.choice(LENGTHS), rng.choice(LENGTHS)
    D, Dv = rng.choice(HEAD_DIMS), rng.choice(HEAD_DIMS)
    pe = _draw_pe(rng, Hq, D)
    qpos, kpos = _draw_positions(rng, B, Sq), _draw_positions(rng, B, Sk)
    far = rng.choice(["near", "near", "q_far", "k_far"])
    if far != "near":  # one side moved far past the other (causal then sees all keys or none)
        offset = rng.choice(FAR) + rng.randint(0, 99)
        if far == "q_far":
            qpos = _shift(qpos, offset, Sk - Sq)
        else:
            kpos = _shift(kpos, offset, 0)
    dtype = rng.choice(["float16", "float32"])
    q_rows, k_rows = _position_rows(qpos, B, Sq, Sk - Sq), _position_rows(kpos, B, Sk, 0)
    max_dist = max(abs(a - b) for qr, kr in zip(q_rows, k_rows) for a in qr for b in kr)
    if pe["kind"] == "kerple" and pe["type"] == "power" and _bias_bound(pe, max_dist) > BIAS_LIMIT[torch.float32]:
        pe["r2"] = [min(x, 1.0) for x in pe["r2"]] if isinstance(pe["r2"], list) else min(pe["r2"], 1.0)
    if _bias_bound(pe, max_dist) > BIAS_LIMIT[getattr(torch, dtype)] or (
            dtype == "float16" and pe["kind"] in ("alibi", "kerple", "sandwich", "fire")
            and max_dist > FP16_MAX_DIST):
        dtype = "float32"
    causal = rng.random() < 0.5
    if pe["kind"] == "xpos":  # causal only; explicit positions within the kernels' block span
        causal = True
        span = max(max(r[i:i + 128]) - min(r[i:i + 128]) for rows in (q_rows, k_rows)
                   for r in rows for i in range(max(1, len(r) - 127)) if r)
        if span > XPos(scale_base=pe["scale_base"]).max_span(torch.float16):
            dtype = "float32"
        limit = XPos(scale_base=pe["scale_base"]).max_span(torch.float32)
        if span > limit:
            pe["scale_base"] = float(math.ceil(pe["scale_base"] * span / limit))
    return {
        "B": B, "Hq": Hq, "Hkv": Hkv, "Sq": Sq, "Sk": Sk, "D": D, "Dv": Dv, "dtype": dtype,
        "layout": rng.choice(["bhsd", "bshd"]), "causal": causal,
        "scale": rng.choice([None, None, None, round(rng.uniform(0.02, 0.5), 4), 1e-3, 2.5, 6.0, -0.3]),
        "pe": pe, "far": far, "q_positions": qpos, "k_positions": kpos,
        "view": rng.choice(["contiguous", "contiguous", "sliced", "other_storage", "expanded"]),
        "dout_view": rng.random() < 0.3, "input_scale": rng.choice([1.0, 1.0, 1.0, 0.1, 4.0]),
        "splits": rng.choice([None, None, None, 2, 3]) if Sk > 32 else None,
        "seed": rng.randrange(2 ** 31),
    }


# --------------------------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------------------------

def make_pe(desc):
    """The PE spec of a case's description (fresh trainable leaves)."""
    def param(x):
        return torch.tensor(x, dtype=torch.float32, device=DEVICE).requires_grad_() if isinstance(x, list) else x

    kind = desc["kind"]
    if kind == "none":
        return posattn.NoPE() if desc["form"] == "NoPE" else desc["form"]
    if kind == "alibi":
        if desc["slopes"] is None:  # the paper's slopes for the call's head count
            return ALiBi() if desc["form"] == "ALiBi()" else "alibi"
        return ALiBi(param(desc["slopes"]))
    if kind == "kerple":
        return KERPLE(desc["type"], param(desc["r1"]), param(desc["r2"]))
    if kind == "t5":
        return T5Bias(param(desc["table"]), desc["bidirectional"], desc["max_distance"])
    if kind == "sandwich":
        return Sandwich(desc["d_bar"])
    if kind == "fire":  # every tensor a trainable leaf
        f = FIRE.random(desc["heads"], desc["width"], desc["seed"])
        def lf(t):
            return t.detach().to(DEVICE).requires_grad_()
        return FIRE(lf(f.w1), lf(f.b1), lf(f.w2), lf(f.b2), c=lf(torch.tensor(desc["c"])),
                    L=lf(torch.tensor(desc["L"])), activation=desc["activation"],
                    num_cells=desc["cells"])
    scaling = desc["scaling"]
    if kind == "xpos":
        return XPos(base=desc["base"], scale_base=desc["scale_base"], scaling=_make_scaling(scaling),
                    rotary_dim=desc["rotary_dim"], interleaved=desc["interleaved"])
    return RoPE(base=desc["base"], scaling=_make_scaling(scaling), rotary_dim=desc["rotary_dim"],
                interleaved=desc["interleaved"])


def _make_scaling(scaling):
    if scaling is None:
        return None
    name, *args = scaling
    return {"pi": PI, "ntk": NTK, "dynamic_ntk": DynamicNTK, "yarn": YaRN, "llama3": Llama3,
            "longrope": lambda s, lg, L0, f: LongRoPE(s, lg, L0, factor=f)}[name](*args)


def make_positions(pos):
    if pos is None or isinstance(pos, int):
        return pos
    t = torch.tensor(pos["values"], dtype=getattr(torch, pos["dtype"]))
    if pos["strided"]:  # the same values, every other element of a bigger tensor
        t = torch.stack((t, torch.full_like(t, 7)), -1)[..., 0]
    return t.to(DEVICE)


def make_inputs(case):
    """(base tensors, build(leaves) -> (q, k, v), dout re-layout or None) for attn_harness.check."""
    B, Hq, Hkv, Sq, Sk, D, Dv = (case[n] for n in ("B", "Hq", "Hkv", "Sq", "Sk", "D", "Dv"))
    bshd, view = case["layout"] == "bshd", case["view"]
    g = torch.Generator().manual_seed(case["seed"])

    def shape(H, S, d):
        return (B, S, H, d) if bshd else (B, H, S, d)

    shapes = {"q": shape(Hq, Sq, D), "k": shape(Hkv, Sk, D), "v": shape(Hkv, Sk, Dv)}
    seq = 1 if bshd else 2
    if view == "sliced":  # every other row of a longer tensor, from a wider head dim
        base = {}
        for n, s in shapes.items():
            s = list(s)
            s[seq], s[-1] = 2 * s[seq] + 1, s[-1] + 8
            base[n] = torch.randn(*s, generator=g)

        def build(L):
            out = []
            for n in "qkv":
                idx = [slice(None)] * 4
                idx[seq], idx[-1] = slice(1, 1 + 2 * shapes[n][seq], 2), slice(3, 3 + shapes[n][-1])
                out.append(L[n][tuple(idx)])
            return tuple(out)
    elif view == "other_storage":  # contiguous in the other layout, viewed in this one
        base = {n: torch.randn(*s, generator=g).transpose(1, 2).contiguous() for n, s in shapes.items()}

        def build(L):
            return tuple(L[n].transpose(1, 2) for n in "qkv")
    elif view == "expanded" and B > 1:  # k and v shared by the batch (stride 0)
        base = {n: torch.randn(*((1,) + s[1:] if n != "q" else s), generator=g) for n, s in shapes.items()}

        def build(L):
            return L["q"], L["k"].expand(shapes["k"]), L["v"].expand(shapes["v"])
    else:
        base = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}

        def build(L):
            return L["q"], L["k"], L["v"]
    base = {n: t * case["input_scale"] for n, t in base.items()}
    arrange = (lambda d: d.transpose(1, 2).contiguous().transpose(1, 2)) if case["dout_view"] else None
    return base, build, arrange


@contextmanager
def forced_splits(splits):
    """Force the split-K forward (launch.FORCE_SPLITS) for the duration, then restore it."""
    from posattn.kernels import launch

    saved = launch.FORCE_SPLITS
    launch.FORCE_SPLITS = splits
    try:
        yield
    finally:
        launch.FORCE_SPLITS = saved


def describe(case, index=None):
    head = (f"fuzz case {index}: POSATTN_FUZZ_SEED={SEED} pytest 'tests/test_fuzz.py::test_fuzz[case{index}]'\n"
            if index is not None else "")
    return head + "\n".join(f"  {k} = {v!r}" for k, v in case.items())


def run_case(case):
    """The kernel vs the float64 reference by the harness's rule, forward and backward."""
    base, build, arrange = make_inputs(case)
    kw = {n: case[n] for n in ("causal", "scale", "layout")}
    kw["q_positions"] = make_positions(case["q_positions"])
    kw["k_positions"] = make_positions(case["k_positions"])
    dtype = getattr(torch, case["dtype"])
    with forced_splits(case["splits"]):
        res = check(base, build, make_pe(case["pe"]), dtype, seed=case["seed"],
                    arrange=arrange, **kw)
    # the yardstick must be one: a naive result that overflowed where the reference is finite
    # would make the rule's tolerance infinite (a case that cannot fail)
    for got, ref, name in zip(res["naive"][:2], res["ref"][:2], ("out", "lse")):
        finite = torch.isfinite(ref)
        assert torch.isfinite(got.double()[finite]).all(), f"the naive {name} overflowed: no yardstick"


@pytest.mark.parametrize("index", range(CASES), ids=lambda i: f"case{i}")
def test_fuzz(index):
    case = draw_case(random.Random(f"{SEED}:{index}"))
    try:
        run_case(case)
    except Exception as e:  # a failed rule or a crash: print the case so it can be reproduced
        raise AssertionError(f"{describe(case, index)}\n{type(e).__name__}: {e}") from e
