"""posattn.attention_varlen: packed variable-length sequences, vs posattn.reference.attention_varlen.

Sequence b's queries ``cu_q[b]:cu_q[b+1]`` attend only to its keys ``cu_k[b]:cu_k[b+1]``; default
positions restart per sequence (keys 0..len_k-1, queries end-aligned to them). Lengths include
0 and 1 on both sides: a sequence with no queries must leave its keys' dk / dv exactly 0, one with
no keys gives its queries out 0, LSE -inf and dq 0 (conftest fills torch.empty with NaN, so an
unwritten row fails).

Judged like tests/test_window_softcap.py (flash-attention's rule plus FlashSlack's slack, per
sequence), on out, LSE (Hq, total_q), dq, dk, dv and the PE parameters' gradients.
"""
import itertools

import pytest
import torch

import posattn
from posattn import reference
from posattn.pe import resolve_pe
from posattn.positions import Positions
from posattn.testing import error_tolerance
from conftest import DEVICE
from helpers import leaf, pe_leaves, with_params
from attn_harness import PES, rand
from test_window_softcap import (CAP, FP16, FP32, HEADS, KERNEL, Slack, assert_quantities, explicit_positions,
                                 grads_of, make_dout)

MIXED = ([5, 0, 1, 17, 3, 9], [5, 3, 1, 40, 0, 4])  # len_q 0 / len_k 0 / len 1 / len_q > len_k
TRAIN = ([13, 1, 0, 30, 2], [13, 1, 0, 30, 2])  # the causal training case: len_q == len_k


def cu(lens, dtype=torch.int32):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=dtype, device=DEVICE)


def packed_base(lens_q, lens_k, Hq, Hkv, D, Dv=None, seed=0, q_scale=1.0):
    return {"q": rand(sum(lens_q), Hq, D, seed=seed, scale=q_scale), "k": rand(sum(lens_k), Hkv, D, seed=seed + 1),
            "v": rand(sum(lens_k), Hkv, Dv or D, seed=seed + 2)}


def varlen_positions(lens_q, lens_k, seed, shuffled=False, dtype=torch.int64):
    """Explicit per-sequence positions: keys on [0, 3 len_k + 3) with gaps, queries over the same
    range (``shuffled``: in a random order), concatenated to (total_q,), (total_k,)."""
    qs, ks = [], []
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        ks.append(explicit_positions(1, lk, seed + 2 * b, shuffled=shuffled)[0])
        qs.append(explicit_positions(1, lq, seed + 2 * b + 1, hi=max(3 * lk + 3, lq), shuffled=shuffled)[0])
    return dict(q_positions=torch.cat(qs).to(dtype), k_positions=torch.cat(ks).to(dtype))


def run_varlen(base, pe, dtype, backend, cu_q, cu_k, compute_dtype=None, max_seqlen=(None, None), **kw):
    """(out, lse, grads) of posattn.attention_varlen(backend) or, for backend "naive", of
    posattn.reference.attention_varlen in ``compute_dtype`` (inputs rounded to ``dtype``)."""
    leaves = {n: t.to(DEVICE).to(dtype).to(compute_dtype or dtype).requires_grad_() for n, t in base.items()}
    pe_run = with_params(pe, lambda t: leaf(t, torch.float64 if compute_dtype == torch.float64 else None))
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if backend == "naive":
        kw = dict(kw)
        scale = kw.pop("scale", None)
        out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, resolve_pe(pe_run),
                                              scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                              compute_dtype=compute_dtype, **kw)
    else:
        out, lse = posattn.attention_varlen(q, k, v, cu_q, cu_k, *max_seqlen, pe_run, return_lse=True,
                                            backend=backend, **kw)
    dout = make_dout(out.shape, dtype)
    return out.detach(), lse.detach(), grads_of(out, leaves, pe_run, dout)


def varlen_slack(base, dtype, ref, pe, cu_q, cu_k, *, causal=False, scale=None, window=None, softcap=None,
                 q_positions=None, k_positions=None, fire_ref="row"):
    """Slack per sequence (test_window_softcap.Slack), assembled: out (total_q, Hq, 1),
    lse (Hq, total_q), and a function name -> slack of that gradient. fire_ref: where the
    backend centres FIRE's gradient (attn_harness.FlashSlack.fire_ref)."""
    q64, k64, v64 = (base[n].to(DEVICE).to(dtype).double() for n in "qkv")
    out64, lse64 = ref[0], ref[1]
    dout = make_dout(out64.shape, dtype).double()
    Tq, Hq, _ = q64.shape
    scale = q64.shape[-1] ** -0.5 if scale is None else scale
    out_s = torch.zeros(Tq, Hq, 1, dtype=torch.float64, device=DEVICE)
    lse_s = torch.zeros(Hq, Tq, dtype=torch.float64, device=DEVICE)
    scal = {"q": 0.0, "k": 0.0, "v": 0.0}
    pe_s = {}
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue  # nothing computed: exact zeros / -inf, no slack

        def seq(t, a, e):
            return t[a:e].transpose(0, 1)[None]

        qpos = (Positions(q1 - q0, start=(k1 - k0) - (q1 - q0)) if q_positions is None
                else Positions(q1 - q0, tensor=q_positions[q0:q1][None]))
        kpos = (Positions(k1 - k0, start=0) if k_positions is None
                else Positions(k1 - k0, tensor=k_positions[k0:k1][None]))
        s = Slack(seq(q64, q0, q1), seq(k64, k0, k1), seq(v64, k0, k1), seq(out64, q0, q1),
                  lse64[:, q0:q1][None], seq(dout, q0, q1), pe, causal=causal, scale=scale, qpos=qpos,
                  kpos=kpos, window=window, softcap=softcap)
        s.fire_ref = fire_ref
        out_s[q0:q1] = s.out[0].transpose(0, 1)
        lse_s[:, q0:q1] = s.lse[0]
        for n in scal:
            scal[n] = max(scal[n], getattr(s, n))
        for n in pe_leaves(pe):
            pe_s[n] = pe_s.get(n, 0.0) + s.pe(n)
    return out_s, lse_s, lambda n: scal[n] if n in scal else pe_s.get(n, 0.0)


def check_varlen(lens_q, lens_k, base, pe, dtype, cu_dtype=torch.int32, max_seqlen=(None, None), **kw):
    cu_q, cu_k = cu(lens_q, cu_dtype), cu(lens_k, cu_dtype)
    got = run_varlen(base, pe, dtype, KERNEL, cu_q, cu_k, max_seqlen=max_seqlen, **kw)
    ref = run_varlen(base, pe, dtype, "naive", cu_q, cu_k, torch.float64, **kw)
    naive = run_varlen(base, pe, dtype, "naive", cu_q, cu_k, dtype, **kw)
    Tq, Hq = base["q"].shape[:2]
    assert got[0].shape == (Tq, Hq, base["v"].shape[-1]) and got[1].shape == (Hq, Tq)
    out_s, lse_s, grad_s = varlen_slack(base, dtype, ref, pe, cu_q, cu_k, **kw)
    assert_quantities(got, ref, naive, dtype, out_s, lse_s, grad_s)

    # exact zeros where a sequence has no queries or no keys
    out, lse, g = got
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens_q)):
        if lens_q[b] == 0 and lens_k[b]:
            for n in "kv":
                assert g[n] is not None and not g[n][ck[b]:ck[b + 1]].any(), f"d{n} of sequence {b} (no queries)"
        if lens_k[b] == 0 and lens_q[b]:
            sl = slice(cq[b], cq[b + 1])
            assert not out[sl].any() and torch.isneginf(lse[:, sl]).all(), f"sequence {b} (no keys)"
            assert g["q"] is not None and not g["q"][sl].any(), f"dq of sequence {b} (no keys)"
    return got


# name: (lens, pe, causal, window, softcap, dtype, heads, D, Dv, positions, cu dtype, max_seqlen, scale)
CASES = {
    "mixed-none-fp16": (MIXED, "none", False, None, None, FP16, "mha", 16, None, "default", torch.int32, None, None),
    "mixed-rope-causal-w4_2-fp32-gqa": (MIXED, "rope", True, (4, 2), None, FP32, "gqa", 32, None, "default",
                                        torch.int32, "exact", None),
    "train-alibi-causal-w8_0-cap-fp16-gqa": (TRAIN, "alibi", True, (8, 0), CAP, FP16, "gqa", 40, None, "default",
                                             torch.int64, None, None),
    "mixed-kerple_log-right3-fp32-explicit-dv24": (MIXED, "kerple_log", False, (None, 3), None, FP32, "mha", 16, 24,
                                                   "explicit", torch.int32, "larger", None),
    "train-kerple_power-causal-left5-cap-fp16-gqa-shuffled32": (TRAIN, "kerple_power", True, (5, None), CAP, FP16,
                                                                "gqa", 32, None, "shuffled_int32", torch.int32,
                                                                "exact", None),
    "train-none-causal-cap-fp32-scale": (TRAIN, "none", True, None, CAP, FP32, "mha", 16, None, "default",
                                         torch.int32, None, 0.3),
    "mixed-rope-w0_0-cap-fp16-gqa-shuffled": (MIXED, "rope", False, (0, 0), CAP, FP16, "gqa", 16, None, "shuffled",
                                              torch.int32, None, None),
    "train-kerple_log-causal-fp16": (TRAIN, "kerple_log", True, None, None, FP16, "mha", 32, None, "default",
                                     torch.int32, None, None),
    "mixed-alibi-cap-fp32-gqa-explicit": (MIXED, "alibi", False, None, CAP, FP32, "gqa", 40, None, "explicit",
                                          torch.int64, None, None),
    "mixed-kerple_power-w4_2-fp32": (MIXED, "kerple_power", False, (4, 2), None, FP32, "mha", 16, None, "default",
                                     torch.int32, None, None),
    # FIRE: every parameter's gradient summed over packed sequences (L = 24 inside them)
    "train-fire-causal-fp32-gqa": (TRAIN, "fire", True, None, None, FP32, "gqa", 16, None, "default",
                                   torch.int32, None, None),
    "mixed-fire-w4_2-cap-fp16-explicit": (MIXED, "fire", False, (4, 2), CAP, FP16, "mha", 16, None,
                                          "explicit", torch.int64, None, None),
}


def case_inputs(name):
    """A CASES entry's inputs: (the entry, base tensors, Hq, the call's keyword arguments); the
    CPU backend's tests (test_cpu.py) run the same table."""
    case = CASES[name]
    (lens_q, lens_k), pe, causal, window, cap, dtype, heads, D, Dv, pos, cu_dtype, maxlen, scale = case
    Hq, Hkv = HEADS[heads]
    seed = list(CASES).index(name)
    base = packed_base(lens_q, lens_k, Hq, Hkv, D, Dv, seed=20 * seed, q_scale=3.0 if cap else 1.0)
    kw = dict(causal=causal, window=window, softcap=cap)
    if scale is not None:
        kw["scale"] = scale
    if pos != "default":
        kw.update(varlen_positions(lens_q, lens_k, seed=seed, shuffled=pos.startswith("shuffled"),
                                   dtype=torch.int32 if pos.endswith("int32") else torch.int64))
    return case, base, Hq, kw


@pytest.mark.parametrize("name", list(CASES))
def test_varlen_matches_reference(name):
    case, base, Hq, kw = case_inputs(name)
    (lens_q, lens_k), pe, _, _, _, dtype, _, D, _, _, cu_dtype, maxlen, _ = case
    max_seqlen = {None: (None, None), "exact": (max(lens_q), max(lens_k)),
                  "larger": (max(lens_q) + 7, max(lens_k) + 30)}[maxlen]
    check_varlen(lens_q, lens_k, base, PES[pe](Hq, D), dtype, cu_dtype, max_seqlen, **kw)


# --------------------------------------------------------------------------------------------
# the oracle: reference.attention_varlen is posattn.attention run on each sequence by itself
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pe_name", ["alibi", "rope_dynamic_ntk"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_varlen_is_attention_per_sequence(pe_name, causal):
    """Each sequence of reference.attention_varlen equals posattn.attention (reference backend,
    default positions: keys 0.., queries end-aligned) on that sequence alone; a sequence with no
    keys gives out 0 and LSE -inf. Dynamic NTK sees the packed batch's max position (its 40-key
    sequence is past original_max_position=16), as a padded batch and transformers' packed
    position_ids do: every sequence is rotated with the frequencies of cur_len = 40."""
    lens_q, lens_k = MIXED
    pe = (posattn.ALiBi(torch.linspace(0.1, 0.6, 4, dtype=torch.float64)) if pe_name == "alibi"
          else posattn.RoPE(scaling=posattn.DynamicNTK(4.0, 16)))
    base = packed_base(lens_q, lens_k, 4, 2, 16, seed=3)
    q, k, v = (base[n].double().to(DEVICE) for n in "qkv")
    out, lse = reference.attention_varlen(q, k, v, cu(lens_q), cu(lens_k), resolve_pe(pe), causal=causal,
                                          scale=0.25)
    assert out.shape == (sum(lens_q), 4, 16) and lse.shape == (4, sum(lens_q)) and lse.dtype == torch.float64
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    for b in range(len(lens_q)):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lens_k[b] == 0:
            assert not out[sq].any() and torch.isneginf(lse[:, sq]).all()
            continue
        want, want_lse = reference.attention_bhsd(
            q[sq].transpose(0, 1)[None], k[sk].transpose(0, 1)[None], v[sk].transpose(0, 1)[None],
            resolve_pe(pe), causal=causal, scale=0.25, q_pos=Positions(lens_q[b], start=lens_k[b] - lens_q[b]),
            k_pos=Positions(lens_k[b], start=0), cur_len=max(lens_k))
        if pe_name == "alibi":  # the same as posattn.attention on the sequence alone
            alone = posattn.attention(q[sq].transpose(0, 1)[None], k[sk].transpose(0, 1)[None],
                                      v[sk].transpose(0, 1)[None], pe, causal=causal, scale=0.25,
                                      return_lse=True, backend="reference")
            torch.testing.assert_close(alone[0], want, rtol=0, atol=0)
        torch.testing.assert_close(out[sq], want[0].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(lse[:, sq], want_lse[0], rtol=0, atol=0)


def test_reference_varlen_explicit_positions_and_float32():
    """Explicit positions are sliced per sequence; float32 inputs give a float32 LSE."""
    lens_q, lens_k = [3, 4], [5, 2]
    base = packed_base(lens_q, lens_k, 2, 2, 8, seed=4)
    pos = dict(q_positions=torch.tensor([9, 2, 4, 0, 1, 7, 3]), k_positions=torch.tensor([0, 2, 4, 6, 8, 1, 5]))
    out, lse = reference.attention_varlen(base["q"], base["k"], base["v"], cu(lens_q), cu(lens_k),
                                          resolve_pe("alibi"), causal=True, scale=0.5, window=(4, None), **pos)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    for sq, sk in [(slice(0, 3), slice(0, 5)), (slice(3, 7), slice(5, 7))]:
        want, want_lse = reference.attention_bhsd(
            base["q"][sq].transpose(0, 1)[None], base["k"][sk].transpose(0, 1)[None],
            base["v"][sk].transpose(0, 1)[None], resolve_pe("alibi"), causal=True, scale=0.5,
            q_pos=Positions(sq.stop - sq.start, tensor=pos["q_positions"][sq][None]),
            k_pos=Positions(sk.stop - sk.start, tensor=pos["k_positions"][sk][None]), window=(4, None))
        torch.testing.assert_close(out[sq], want[0].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(lse[:, sq], want_lse[0], rtol=0, atol=0)
    # query 3 (position 0) sees key 5 only (position 1 > 0 is in the future): no key, -inf
    assert torch.isneginf(lse[:, 3]).all() and not out[3].any()


# --------------------------------------------------------------------------------------------
# a padded batch of equal-length sequences and the same tokens packed
# --------------------------------------------------------------------------------------------

BATCHED = [
    # pe, causal, window, softcap, dtype
    ("alibi", True, (5, 0), None, FP16),
    ("rope", False, None, CAP, FP32),
    ("kerple_power", True, None, None, FP32),
]


@pytest.mark.parametrize("case", BATCHED, ids=lambda c: f"{c[0]}-{'causal' if c[1] else 'full'}-{c[2]}-{c[3]}")
def test_batched_equals_varlen(case):
    """posattn.attention on (B, S, H, D) (bshd) and attention_varlen on the same tokens packed to
    (B S, H, D) agree, out, LSE and every gradient, to within the rule's budget (the naive
    in-dtype error against float64), whatever each of them is."""
    pe_name, causal, window, cap, dtype = case
    B, S, Hq, Hkv, D = 3, 13, 4, 2, 32
    pe = PES[pe_name](Hq, D)
    base = {"q": rand(B, S, Hq, D, seed=1, scale=3.0 if cap else 1.0), "k": rand(B, S, Hkv, D, seed=2),
            "v": rand(B, S, Hkv, D, seed=3)}
    flat = {n: t.reshape(B * S, *t.shape[2:]) for n, t in base.items()}
    kw = dict(causal=causal, window=window, softcap=cap)

    leaves = {n: t.to(DEVICE).to(dtype).requires_grad_() for n, t in base.items()}
    pe_b = with_params(pe, leaf)
    out_b, lse_b = posattn.attention(*leaves.values(), pe_b, layout="bshd", return_lse=True, backend=KERNEL, **kw)
    g_b = grads_of(out_b, leaves, pe_b, make_dout(out_b.shape, dtype))
    cu_s = cu([S] * B)
    out_v, lse_v, g_v = run_varlen(flat, pe, dtype, KERNEL, cu_s, cu_s, max_seqlen=(S, S), **kw)
    ref = run_varlen(flat, pe, dtype, "naive", cu_s, cu_s, torch.float64, **kw)
    naive = run_varlen(flat, pe, dtype, "naive", cu_s, cu_s, dtype, **kw)

    def flat_of(t):  # (B, S, ...) -> (B S, ...)
        return t.reshape(B * S, *t.shape[2:])

    pairs = [("out", out_v, flat_of(out_b), 0, 2),
             ("lse", lse_v, lse_b.permute(1, 0, 2).reshape(Hq, B * S), 1, 2)]  # (B, Hq, S) -> (Hq, B S)
    pairs += [(f"d{n}", g_v[n], flat_of(g_b[n]) if n in base else g_b[n], 2, 3) for n in g_v]
    for name, a, b, idx, factor in pairs:
        r, nv = (ref[idx], naive[idx]) if idx < 2 else (ref[2][name[1:]], naive[2][name[1:]])
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        fin = torch.isfinite(r)
        err_naive = (nv.double() - r)[fin].abs().max().item()
        diff = (a.double() - b.double())[fin].abs().max().item()
        tol = error_tolerance(err_naive, r, dtype, factor)
        assert diff <= tol, f"{name}: varlen and batched differ by {diff:.3e} > {tol:.3e}"


# --------------------------------------------------------------------------------------------
# max_seqlen
# --------------------------------------------------------------------------------------------

def _small(lens_q=(4, 6, 0), lens_k=(4, 9, 2), dtype=torch.float32):
    base = packed_base(list(lens_q), list(lens_k), 2, 2, 16)
    q, k, v = (base[n].to(DEVICE).to(dtype) for n in "qkv")
    return q, k, v, cu(lens_q), cu(lens_k)


@pytest.mark.parametrize("which", ["q", "k"])
def test_max_seqlen_smaller_than_a_sequence_raises(which):
    q, k, v, cu_q, cu_k = _small()
    maxlen = (5, None) if which == "q" else (None, 8)  # the longest are 6 and 9
    with pytest.raises(ValueError, match=f"max_seqlen_{which}"):
        posattn.attention_varlen(q, k, v, cu_q, cu_k, *maxlen, causal=True, backend=KERNEL)


def test_max_seqlen_exact_or_larger_changes_nothing():
    q, k, v, cu_q, cu_k = _small()
    want = posattn.attention_varlen(q, k, v, cu_q, cu_k, pe="alibi", causal=True, return_lse=True, backend=KERNEL)
    for maxlen in [(6, 9), (40, 100)]:
        got = posattn.attention_varlen(q, k, v, cu_q, cu_k, *maxlen, pe="alibi", causal=True, return_lse=True,
                                       backend=KERNEL)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), maxlen


# --------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------

def _cu_bad(kind):
    """(cu_seqlens for q, k) with total q 10 (lens 4, 6, 0) and total k 15 (4, 9, 2), one of them broken."""
    good = cu([4, 6, 0]), cu([4, 9, 2])
    return {
        "2d": good[0][None],
        "float": good[0].float(),
        "not_from_0": torch.tensor([1, 4, 10, 10], dtype=torch.int32, device=DEVICE),
        "decreasing": torch.tensor([0, 7, 4, 10], dtype=torch.int32, device=DEVICE),
        "last_not_total": torch.tensor([0, 4, 9, 9], dtype=torch.int32, device=DEVICE),
        "too_short": cu([4, 6]),
    }[kind]


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("kind", ["2d", "float", "not_from_0", "decreasing", "last_not_total", "too_short"])
def test_bad_cu_seqlens_raises(kind, which):
    q, k, v, cu_q, cu_k = _small()
    bad = _cu_bad(kind)
    if which == "k":  # same defects, rebuilt for the key total (15)
        bad = bad.clone()
        if kind in ("not_from_0", "decreasing"):
            bad[-1] = 15
        elif kind == "too_short":
            bad = cu([4, 11])
        elif kind == "last_not_total":
            bad = torch.tensor([0, 4, 13, 14], dtype=torch.int32, device=DEVICE)
        elif kind in ("2d", "float"):
            bad = cu_k[None] if kind == "2d" else cu_k.float()
        cu_k = bad
    else:
        cu_q = bad
    name = "cu_seqlens" if kind == "too_short" else f"cu_seqlens_{which}"
    with pytest.raises((TypeError, ValueError), match=name):
        posattn.attention_varlen(q, k, v, cu_q, cu_k, backend=KERNEL)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_3d_inputs_raise(which):
    q, k, v, cu_q, cu_k = _small()
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which][None]
    with pytest.raises((TypeError, ValueError), match=which):
        posattn.attention_varlen(args["q"], args["k"], args["v"], cu_q, cu_k, backend=KERNEL)


@pytest.mark.parametrize("bad", ["q_long", "q_2d", "k_short"])
def test_bad_explicit_positions_raise(bad):
    q, k, v, cu_q, cu_k = _small()
    pos = varlen_positions([4, 6, 0], [4, 9, 2], seed=0)
    if bad == "q_long":
        pos["q_positions"] = torch.arange(11, device=DEVICE)
    elif bad == "q_2d":
        pos["q_positions"] = pos["q_positions"][:, None]
    else:
        pos["k_positions"] = pos["k_positions"][:-1]
    name = "k_positions" if bad.startswith("k") else "q_positions"
    with pytest.raises((TypeError, ValueError), match=name):
        posattn.attention_varlen(q, k, v, cu_q, cu_k, pe="alibi", causal=True, backend=KERNEL, **pos)


@pytest.mark.parametrize("kw", [dict(window=(-1, 0)), dict(window=3), dict(softcap=-1.0), dict(softcap=float("nan"))],
                         ids=repr)
def test_bad_window_or_softcap_raise(kw):
    q, k, v, cu_q, cu_k = _small()
    with pytest.raises((TypeError, ValueError), match=next(iter(kw))):
        posattn.attention_varlen(q, k, v, cu_q, cu_k, backend=KERNEL, **kw)


def test_dynamic_ntk_kernel_uses_the_packed_batch_length():
    """The kernel rotates every packed sequence with the frequencies of the batch's max
    position (cur_len), as the reference does: fp32 agreement at fp32 rounding."""
    lens_q, lens_k = MIXED
    pe = posattn.RoPE(scaling=posattn.DynamicNTK(4.0, 16))
    base = packed_base(lens_q, lens_k, 4, 2, 16, seed=5)
    q, k, v = (base[n].to(DEVICE) for n in "qkv")
    got, got_lse = posattn.attention_varlen(q, k, v, cu(lens_q), cu(lens_k), pe=pe, causal=True,
                                            return_lse=True, backend="triton")
    want, want_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu(lens_q),
                                                cu(lens_k), resolve_pe(pe), causal=True, scale=0.25)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    fin = torch.isfinite(want_lse)
    assert torch.equal(fin, torch.isfinite(got_lse))
    torch.testing.assert_close(got_lse.double()[fin], want_lse[fin], rtol=0, atol=2e-6)


@pytest.mark.parametrize("pe", ["kerple_log", "kerple_power"])
def test_varlen_reads_the_kerple_tables(pe, monkeypatch):
    """Packed KERPLE with contiguous positions reads its per-distance tables (sized for the
    batch's longest distances; forced on for these short sequences), forward and backward,
    sequences longer than a tile (the interpreter's 32) included: the rule holds as without
    them. Causal; a non-causal batch with len_q > len_k centres those rows instead (no table)."""
    from helpers import force_bias_tables

    used = force_bias_tables(monkeypatch)
    lens = ([7, 70, 0, 33], [7, 70, 2, 33])
    Hq, Hkv = HEADS["gqa"]
    base = packed_base(*lens, Hq, Hkv, 16, seed=11)
    check_varlen(*lens, base, PES[pe](Hq, 16), FP32, causal=True)
    assert used and all(used), used
    used.clear()
    lens = ([9, 40], [3, 40])  # sequence 0's queries precede its keys: centred rows, no table
    base = packed_base(*lens, Hq, Hkv, 16, seed=12)
    check_varlen(*lens, base, PES[pe](Hq, 16), FP32, causal=False)
    assert used and not any(used), used


def test_varlen_under_torch_compile_runs_eagerly():
    """Under torch.compile the packed entry point is a graph break (its launch plan reads the
    host-side lengths): the compiled function computes the same bits as eager, forward and
    backward, instead of failing to trace the launch."""
    lens = [5, 7]
    q, k, v = (torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(i)).to(DEVICE)
               .requires_grad_() for i in range(3))

    def f(q, k, v):
        return posattn.attention_varlen(q, k, v, cu(lens), cu(lens), pe="alibi", causal=True,
                                        backend=KERNEL)

    want = f(q, k, v)
    got = torch.compile(f, backend="aot_eager")(q, k, v)
    assert torch.equal(got, want)
    g_want = torch.autograd.grad(want.sum(), (q, k, v))
    g_got = torch.autograd.grad(got.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g_got, g_want))
