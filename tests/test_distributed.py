"""Ring attention (posattn.distributed) over gloo in spawned processes, vs the float64 reference.

Each case shards one full problem over W ranks (posattn.distributed.shard), runs
``ring_attention`` forward and backward on every rank, and judges every rank's output, LSE and
gradients -- q, k, v shards and the PE parameters (all-reduced: the full sequence's) -- by the
error rule against the float64 reference of the *whole* sequence in one process, with the
slack of tests/test_window_softcap.py (flash-attention's own rounding).

The table is a pairwise covering set over PE x backend x world size x load balance x causal x
layout x heads x dtype x positions x window x softcap (test_cases_cover_every_pair); one spawn
per world size runs its cases. Positions: "default" (implied by the layout), "explicit"
(sorted with gaps, the same for q and k) and "far" (queries 300 past their keys: every row is
centred, in one frame for every piece; kernels/bias.py "Centring").
"""
import itertools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import posattn
from posattn import distributed as pd
from conftest import DEVICE, HAS_CUDA
from attn_harness import PES
from helpers import leaf, with_params
from pe_cases import cases as pe_cases
from test_window_softcap import (CAP, HEADS, Slack, assert_quantities, explicit_positions, grads_of,
                                 make_dout, qkv_base, run_bhsd)

FAR = 300
FACTORS = {
    "pe": ["none", "rope", "dynamic_ntk", "alibi", "kerple_log", "kerple_power", "t5", "sandwich"],
    "backend": ["triton", "cpu"],
    "world": [2, 4],
    "lb": ["zigzag", "none"],
    "causal": [False, True],
    "layout": ["bhsd", "bshd"],
    "heads": ["mha", "gqa"],
    "dtype": ["fp16", "fp32"],
    "pos": ["default", "explicit", "far"],
    "window": [None, "w"],
    "softcap": [None, "cap"],
}
CASES = [
    ("t5", "triton", 2, "zigzag", False, "bshd", "gqa", "fp32", "far", "w", "cap"),
    ("alibi", "cpu", 4, "none", True, "bhsd", "mha", "fp16", "default", None, None),
    ("kerple_log", "cpu", 4, "zigzag", False, "bshd", "mha", "fp32", "explicit", None, "cap"),
    ("dynamic_ntk", "triton", 2, "none", True, "bhsd", "gqa", "fp16", "explicit", "w", None),
    ("kerple_power", "triton", 4, "none", False, "bhsd", "mha", "fp32", "default", "w", "cap"),
    ("rope", "cpu", 4, "zigzag", True, "bshd", "gqa", "fp16", "far", None, None),
    ("none", "cpu", 2, "zigzag", True, "bshd", "gqa", "fp32", "default", "w", None),
    ("none", "triton", 2, "none", False, "bhsd", "mha", "fp16", "far", None, "cap"),
    ("kerple_power", "cpu", 2, "none", False, "bshd", "gqa", "fp16", "explicit", None, None),
    ("alibi", "triton", 2, "zigzag", True, "bhsd", "gqa", "fp32", "far", "w", "cap"),
    ("rope", "triton", 2, "none", False, "bhsd", "mha", "fp32", "default", "w", "cap"),
    ("dynamic_ntk", "cpu", 4, "zigzag", False, "bshd", "mha", "fp32", "far", None, "cap"),
    ("kerple_log", "triton", 2, "none", True, "bhsd", "gqa", "fp16", "default", "w", None),
    ("t5", "cpu", 4, "none", True, "bhsd", "mha", "fp16", "default", None, None),
    ("alibi", "cpu", 4, "none", False, "bshd", "mha", "fp16", "explicit", "w", None),
    ("kerple_power", "cpu", 4, "zigzag", True, "bhsd", "gqa", "fp32", "far", "w", None),
    ("none", "cpu", 4, "none", True, "bhsd", "gqa", "fp32", "explicit", "w", None),
    ("kerple_log", "cpu", 4, "none", True, "bshd", "gqa", "fp16", "far", "w", None),
    ("rope", "triton", 4, "zigzag", True, "bshd", "gqa", "fp32", "explicit", "w", "cap"),
    ("t5", "triton", 4, "zigzag", False, "bhsd", "mha", "fp32", "explicit", "w", None),
    ("dynamic_ntk", "triton", 2, "zigzag", True, "bhsd", "gqa", "fp16", "default", "w", "cap"),
    ("sandwich", "triton", 2, "zigzag", True, "bshd", "mha", "fp16", "far", None, "cap"),
    ("sandwich", "cpu", 4, "none", False, "bhsd", "gqa", "fp32", "default", "w", None),
    ("sandwich", "triton", 4, "zigzag", False, "bhsd", "gqa", "fp32", "explicit", "w", "cap"),
    # RoPE extensions (not a FACTORS value: the cpu backend does not run them), causal only
    ("self_extend", "triton", 2, "zigzag", True, "bshd", "gqa", "fp32", "default", None, None),
    ("leaky_rerope", "triton", 4, "none", True, "bhsd", "mha", "fp16", "explicit", "w", "cap"),
    ("dca", "triton", 4, "zigzag", True, "bshd", "gqa", "fp16", "explicit", None, "cap"),
    # FIRE (not a FACTORS value: one row per backend, its gradient centred as a ring piece)
    ("fire", "triton", 2, "zigzag", True, "bhsd", "gqa", "fp32", "far", "w", None),
    ("fire", "cpu", 2, "none", False, "bshd", "mha", "fp16", "explicit", None, "cap"),
]
EXTENSIONS = {"self_extend": lambda: posattn.SelfExtend(2, 5),
              "leaky_rerope": lambda: posattn.LeakyReRoPE(4, 3),
              "dca": lambda: posattn.DualChunk(5, 1)}  # chunks of 4 positions
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def test_cases_cover_every_pair():
    names = list(FACTORS)
    rows = [dict(zip(names, c)) for c in CASES]
    missing = [(a, x, b, y) for a, b in itertools.combinations(names, 2)
               for x in FACTORS[a] for y in FACTORS[b]
               if not any(r[a] == x and r[b] == y for r in rows)]
    assert not missing, missing


# --------------------------------------------------------------------------------------------
# what every rank runs
# --------------------------------------------------------------------------------------------

def _make_pe(name, H, D):
    if name in EXTENSIONS:
        return posattn.RoPE(extend=EXTENSIONS[name]())
    return PES[name](H, D) if name in PES else pe_cases("harness")[name].make(H, D)


def _problem(c, world, seed):
    """The full problem of a case: base tensors, PE factory arguments and attention kwargs."""
    pe_name, _, _, lb, causal, _, heads, dt, pos, win, cap = c
    Hq, Hkv = HEADS[heads]
    n = 6 if lb == "zigzag" else 5 + 2 * (seed % 2)  # shard length (zigzag: two chunks)
    S, B, D = world * n, 1 + seed % 2, 16
    base = qkv_base(B, Hq, Hkv, S, S, D, seed=seed, q_scale=3.0 if cap else 1.0)
    kw = dict(causal=causal, softcap=CAP if cap else None)
    if pos != "default":
        kp = explicit_positions(B, S, seed)  # sorted, with gaps
        qp = kp + FAR if pos == "far" else kp
        kw.update(q_positions=qp, k_positions=kp)
    if win:  # far queries need a window that reaches back to their keys
        kw["window"] = (FAR + 4, 2) if pos == "far" else (3, 1)
    return base, kw, DTYPES[dt], (Hq, D)


def _shard(t, dim, lb):
    return None if t is None else pd.shard(t, dim, load_balance=lb)


def _device(backend):
    """Where a case's ring runs: the cpu backend on CPU; Triton on this rank's GPU when CUDA is
    present (NCCL), else in the interpreter on CPU (gloo)."""
    if backend == "triton" and HAS_CUDA:
        return torch.device("cuda", dist.get_rank())
    return torch.device("cpu")


def _check_case(c, seed, world):
    pe_name, backend, _, lb, causal, layout, *_ = c
    base, kw, dtype, (Hq, D) = _problem(c, world, seed)
    pe = _make_pe(pe_name, Hq, D)
    dev = _device(backend)

    # the whole sequence in one process: float64 reference, naive in-dtype math, slack
    ref = run_bhsd(base, pe, dtype, "naive", torch.float64, **kw)
    naive = run_bhsd(base, pe, dtype, "naive", dtype, **kw)
    q64, k64, v64 = (base[n].to(dtype).double() for n in "qkv")
    B, S = q64.shape[0], q64.shape[2]
    from posattn.positions import parse_positions
    qpos = parse_positions(kw.get("q_positions"), "q_positions", B, S, 0, q64.device)
    kpos = parse_positions(kw.get("k_positions"), "k_positions", B, S, 0, q64.device)
    slack = Slack(q64, k64, v64, ref[0], ref[1], make_dout(ref[0].shape, dtype), pe, causal=causal,
                  scale=D ** -0.5, qpos=qpos, kpos=kpos, window=kw.get("window"), softcap=kw.get("softcap"))
    # FIRE's gradient: the Triton pieces centre it at u = 0 (attn_harness.FlashSlack.fire_ref)
    slack.fire_ref = "zero" if backend == "triton" else "none"

    # the ring: this rank's shards (on its device; compared on the reference's), stored in the
    # call's layout -- bshd leaves are real (B, n, H, D) tensors, not views of bhsd ones
    bshd = layout == "bshd"

    def as_layout(t):  # bhsd -> the layout's storage (a fresh leaf)
        return t.transpose(1, 2).contiguous() if bshd else t

    def as_bhsd(t):
        return None if t is None else (t.transpose(1, 2) if bshd else t)

    leaves = {n: as_layout(_shard(base[n].to(dtype), 2, lb)).to(dev).detach().requires_grad_() for n in "qkv"}
    pe_run = with_params(pe, lambda t: t.detach().to(dev).requires_grad_(t.requires_grad))
    rkw = dict(kw)
    for name in ("q_positions", "k_positions"):
        if name in rkw:
            rkw[name] = _shard(rkw[name], 1, lb).to(dev)
    out, lse = pd.ring_attention(leaves["q"], leaves["k"], leaves["v"], pe_run, load_balance=lb,
                                 layout=layout, return_lse=True, backend=backend, **rkw)
    dout = as_layout(_shard(make_dout(ref[0].shape, dtype), 2, lb)).to(dev)
    grads = grads_of(out, leaves, pe_run, dout)
    here = ref[0].device
    out, lse = as_bhsd(out).to(here), lse.to(here)
    grads = {n: None if g is None else (as_bhsd(g) if n in "qkv" else g).to(here) for n, g in grads.items()}

    def sh(t, dim=2):
        return _shard(t, dim, lb)

    gref = {n: (sh(g) if n in "qkv" else g) for n, g in ref[2].items()}
    gnaive = {n: (sh(g) if n in "qkv" else g) for n, g in naive[2].items()}
    assert_quantities((out.detach(), lse.detach(), grads), (sh(ref[0]), sh(ref[1]), gref),
                      (sh(naive[0]), sh(naive[1]), gnaive), dtype, sh(slack.out), sh(slack.lse),
                      lambda n: getattr(slack, n) if n in "qkv" else slack.pe(n))
    return out.detach(), grads


def _extra_checks(world):
    """Determinism, per-rank PE gradient shares, shard / unshard, errors (one small problem)."""
    rank = dist.get_rank()
    c = ("alibi", "triton", world, "zigzag", True, "bhsd", "gqa", "fp32", "default", None, None)
    base, kw, dtype, (Hq, D) = _problem(c, world, 1)
    pe = PES["alibi"](Hq, D)

    dev = _device("triton")

    def run(reduce=True):
        p = with_params(pe, lambda t: t.detach().to(dev).requires_grad_())
        q, k, v = (_shard(base[n], 2, "zigzag").to(dev).requires_grad_() for n in "qkv")
        out = pd.ring_attention(q, k, v, p, causal=True, reduce_pe_grads=reduce, backend="triton")
        dout = _shard(make_dout((base["q"].shape[0], Hq, base["q"].shape[2], D), dtype), 2, "zigzag").to(dev)
        return (out,) + torch.autograd.grad(out, [q, k, v, p.slopes], dout)

    a, b = run(), run()
    for x, y in zip(a, b):  # deterministic: bit for bit
        assert torch.equal(x, y)
    share = run(reduce=False)[4]
    assert not torch.equal(share, a[4])  # each rank's own rows' share ...
    total = share.clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, a[4], rtol=1e-6, atol=1e-7)  # ... summing to the full gradient

    # shard / unshard are inverse, and unshard's gradient is the sum over ranks' copies
    full = torch.arange(2 * world * 3 * 2, dtype=torch.float32).view(1, 2 * world * 3, 2)
    for lb in pd.LOAD_BALANCES:
        x = pd.shard(full, 1, load_balance=lb).requires_grad_()
        torch.testing.assert_close(pd.positions(x.shape[1], load_balance=lb).float(), x[0, :, 0] / 2)
        y = pd.unshard(x, 1, load_balance=lb)
        assert torch.equal(y, full)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y) * (rank + 1))
        assert torch.equal(g, torch.full_like(x, world * (world + 1) / 2))

    # errors a user can cause
    q = torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match="even shard length"):
        pd.ring_attention(q, q, q, load_balance="zigzag")
    with pytest.raises(ValueError, match="load_balance"):
        pd.ring_attention(q, q, q, load_balance="head-tail")
    with pytest.raises(ValueError, match="both q and k"):
        pd.ring_attention(q, q, q, load_balance="none", q_positions=torch.arange(5))
    with pytest.raises(ValueError, match="q_positions must have shape"):
        pd.ring_attention(q, q, q, load_balance="none", q_positions=torch.arange(4),
                          k_positions=torch.arange(4))
    with pytest.raises(ValueError, match="same length"):
        pd.ring_attention(q, q[:, :, :4], q[:, :, :4], load_balance="none")
    with pytest.raises(ValueError, match="does not split"):
        pd.shard(torch.zeros(1, 2 * world + 1), 1, load_balance="zigzag")


def _worker(rank, world, init_file, case_ids, extra):
    if HAS_CUDA:  # CPU tensors over gloo, CUDA tensors over NCCL (one GPU per rank)
        torch.cuda.set_device(rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if HAS_CUDA else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        for i in case_ids:
            try:
                _check_case(CASES[i], i, world)
            except AssertionError as e:
                raise AssertionError(f"case {i} {CASES[i]}, rank {rank}: {e}") from e
        if extra:
            _extra_checks(world)
    finally:
        dist.destroy_process_group()


def _spawn(world, case_ids, extra=False):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, os.path.join(d, "init"), case_ids, extra), nprocs=world,
                           start_method="spawn")


@pytest.mark.parametrize("backend", FACTORS["backend"])
@pytest.mark.parametrize("world", FACTORS["world"])
def test_ring_attention_matches_reference(world, backend):
    """Every case of this world size and backend, in one spawn (process start-up is most of a
    case's cost); the Triton spawn also runs _extra_checks."""
    if backend == "triton" and HAS_CUDA and torch.cuda.device_count() < world:
        pytest.skip(f"Triton ring cases need {world} GPUs (one per rank) or the interpreter (no CUDA); "
                    f"{torch.cuda.device_count()} here -- CPU CI runs them in the interpreter")
    _spawn(world, [i for i, c in enumerate(CASES) if c[2] == world and c[1] == backend],
           extra=backend == "triton")


def test_needs_a_process_group():
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        pd.ring_attention(q, q, q)


def test_segments_and_visibility():
    assert pd.segments(6, 1, 2, "zigzag") == (pd.Segment(0, 3, 3), pd.Segment(3, 3, 6))
    assert pd.segments(5, 3, 4, "none") == (pd.Segment(0, 5, 15),)
    starts = sorted(s.start for r in range(4) for s in pd.segments(4, r, 4, "zigzag"))
    assert starts == list(range(0, 16, 2))  # the 8 chunks, each held once
    assert not pd._visible(0, 4, 5, 9, True, None)  # causal: a future block is skipped
    assert pd._visible(5, 9, 0, 4, True, None)
    assert not pd._visible(10, 14, 0, 4, False, (3, None))  # beyond the window's left edge
    assert pd._visible(10, 14, 0, 7, False, (3, None))
    assert posattn.distributed is pd


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("pe_name", ["rope", "kerple_power", "t5"])
def test_world_of_one_is_attention_bit_for_bit(world_of_one, pe_name):
    """W = 1, no load balancing: one piece, the kernels' own call -- the same bits as
    posattn.attention (out, LSE and every gradient), the fp32 accumulators notwithstanding.
    Except T5's table gradient: the ring centres every row on the bucket of k - q = 0
    (bias.table_grad_centred), one call on the row's largest live bucket; the two differ by
    where the rows' rounding residual lands (the distributed cases judge the ring's)."""
    base = qkv_base(2, 4, 2, 13, 13, 16, seed=5)
    results = []
    for fn in ("ring", "attention"):
        pe = with_params(PES[pe_name](4, 16), leaf)
        q, k, v = (base[n].to(DEVICE, torch.float16).requires_grad_() for n in "qkv")
        if fn == "ring":
            out, lse = pd.ring_attention(q, k, v, pe, causal=True, load_balance="none", return_lse=True,
                                         backend="triton")
        else:
            out, lse = posattn.attention(q, k, v, pe, causal=True, return_lse=True, backend="triton")
        leaves = [q, k, v] + [t for t in pe.tensors() if t.requires_grad]
        results.append((out, lse) + torch.autograd.grad(out, leaves, make_dout(out.shape, torch.float16)))
    n = len(results[0]) - (pe_name == "t5")
    for a, b in zip(results[0][:n], results[1][:n]):
        assert torch.equal(a, b)


def test_bench_ring_runs_on_cpu(tmp_path):
    """python -m bench.ring end to end on gloo (the GPU entry's code path, CPU backend)."""
    from bench import ring

    assert ring.main(["--dry-run"]) == 0
    assert ring.main(["--device", "cpu", "--world", "2", "--seqlen", "32", "--heads", "1", "--head-dim", "16",
                      "--pes", "alibi", "--warmup", "0", "--reps", "1", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "ring.md").read_text()
    assert "| 2 | alibi | 16 |" in md, md
