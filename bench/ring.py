"""python -m bench.ring: ring attention (posattn.distributed) per step, and how much of its
communication the compute hides.

    python -m bench.ring                       # every GPU: world sizes 1 and N, S = 32k, D = 128
    python -m bench.ring --seqlen 128k --pes none,rope,alibi --world 1,8
    python -m bench.ring --dry-run             # the plan (no GPU needed)
    python -m bench.ring --device cpu --world 1,2 --seqlen 256 --heads 2 --head-dim 16   # gloo, CPU backend

It spawns one process per rank itself (NCCL on CUDA, gloo on CPU; no torchrun needed) and, for
each world size W and PE, times three things per training step (forward + backward of one
layer's attention over a global sequence of S tokens, zigzag-sharded, causal, bf16):

* ``step``: ``ring_attention`` as users run it (exchanges overlapped with compute);
* ``compute``: the same pieces with the exchanges replaced by no-ops (each rank attends its
  own K/V in place of the peers': the same work, no transfer);
* ``comm``: the exchanges alone (2 (W - 1) K/V transfers and W dK/dV transfers, no compute);
* at W = 1, ``posattn.attention`` on the same sequence: the ring's own overhead (zigzag
  pieces, fp32 merging) where there is nothing to hide.

hidden = 1 - (step - compute) / comm (clipped to [0, 1]): the fraction of the communication
time the compute covered. Time: median over ``--reps`` steps after ``--warmup``, the slowest
rank's. Memory: the peak CUDA memory of rank 0 over a step (O(S / W)). Writes OUT/ring.md and
OUT/ring.json (OUT default out/ring).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .plan import parse_int_list

PES = ("none", "rope", "alibi", "kerple_log")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", help="comma list of world sizes (default: 1 and every GPU)")
    ap.add_argument("--seqlen", default="32k", help="global sequence length (default 32k)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--pes", default=",".join(PES))
    ap.add_argument("--causal", choices=("true", "false"), default="true")
    ap.add_argument("--load-balance", choices=("zigzag", "none"), default="zigzag")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", default="out/ring")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    args.seqlen = parse_int_list(args.seqlen)[0]
    args.pes = [p for p in args.pes.split(",") if p]
    n_gpu = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.world:
        args.world = parse_int_list(args.world)
    else:
        args.world = sorted({1, max(n_gpu, 1)})
    args.kv_heads = args.kv_heads or args.heads
    return args


def plan_lines(args) -> List[str]:
    lines = []
    for w in args.world:
        n = args.seqlen // w
        lines.append(f"W={w}: {args.batch}x{args.heads}x{args.seqlen}x{args.head_dim} {args.dtype}, "
                     f"shard {n} tokens/rank, causal={args.causal}, load_balance={args.load_balance}, "
                     f"PEs {','.join(args.pes)} -- step, compute-only, comm-only")
    return lines


class _NoComm:
    """A ring whose exchanges do nothing: each rank keeps its own K/V (same compute, no transfer)."""

    def __init__(self, group, rank, world):
        self.group, self.rank, self.world = group, rank, world

    def start(self, tensors):
        return None, list(tensors)

    @staticmethod
    def finish(handle):
        return handle[1]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, warmup, reps) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's
    return float(t.item()) * 1e3


def _measure(pd, pe, args, rank, world, device, backend, q, k, v, do) -> dict:
    """One PE's row: step, compute-only, comm-only (and at W = 1 posattn.attention)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    causal = args.causal == "true"

    def step():
        out = pd.ring_attention(*leaves, pe, causal=causal, load_balance=args.load_balance,
                                backend=backend)
        torch.autograd.grad(out, leaves, do)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_step = _timed(step, device, args.warmup, args.reps)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None
    real_ring = pd._Ring
    pd._Ring = _NoComm
    try:
        t_comp = _timed(step, device, args.warmup, args.reps)
    finally:
        pd._Ring = real_ring
    t_comm = 0.0
    if world > 1:
        ring = pd._Ring(None, rank, world)
        dk = torch.zeros_like(k, dtype=torch.float32)

        def comm():  # forward W-1, backward W-1 K/V and W dK/dV transfers
            for _ in range(2 * (world - 1)):
                ring.finish(ring.start([k, v]))
            for _ in range(world):
                ring.finish(ring.start([dk, dk]))

        t_comm = _timed(comm, device, args.warmup, args.reps)
    t_plain = None
    if world == 1:  # the baseline: one posattn.attention call over the same sequence
        from posattn import attention

        def plain():
            out = attention(*leaves, pe, causal=causal, backend=backend)
            torch.autograd.grad(out, leaves, do)

        t_plain = _timed(plain, device, args.warmup, args.reps)
    hidden = None
    if t_comm > 0:
        hidden = min(1.0, max(0.0, 1.0 - (t_step - t_comp) / t_comm))
    if rank == 0:
        print(f"W={world} {pe:<10} step {t_step:8.2f} ms  compute {t_comp:8.2f} ms  comm "
              f"{t_comm:8.2f} ms  hidden {'-' if hidden is None else f'{hidden:.0%}'}"
              + (f"  peak {peak:.0f} MiB" if peak is not None else ""), flush=True)
    return dict(world=world, pe=pe, seqlen=args.seqlen, shard=q.shape[2], step_ms=t_step,
                compute_ms=t_comp, comm_ms=t_comm, hidden=hidden, peak_mib=peak, attention_ms=t_plain)


def _worker(rank, world, init_file, args, results_file):
    from posattn import distributed as pd

    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    try:
        dtype = DTYPES[args.dtype]
        n = args.seqlen // world
        B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
        g = torch.Generator(device="cpu").manual_seed(rank)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        q, k, v, do = rnd(B, H, n, D), rnd(B, Hkv, n, D), rnd(B, Hkv, n, D), rnd(B, H, n, D)
        backend = "triton" if device == "cuda" else "cpu"
        rows = [_measure(pd, pe, args, rank, world, device, backend, q, k, v, do) for pe in args.pes]
        if rank == 0:
            Path(results_file).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def write_report(rows, args, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "ring.json").write_text(json.dumps(dict(args={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, list))},
                                                   rows=rows), indent=1))
    lines = ["# Ring attention: time per step (fwd + bwd), communication hidden", "",
             f"{args.batch}x{args.heads}x{args.seqlen}x{args.head_dim} {args.dtype}, causal={args.causal}, "
             f"load_balance={args.load_balance}, device {args.device}", "",
             "| W | PE | shard | step ms | compute-only ms | comm-only ms | hidden | peak MiB | posattn.attention ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hidden = "-" if r["hidden"] is None else f"{r['hidden']:.0%}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        plain = "-" if r["attention_ms"] is None else f"{r['attention_ms']:.2f}"
        lines.append(f"| {r['world']} | {r['pe']} | {r['shard']} | {r['step_ms']:.2f} | {r['compute_ms']:.2f} | "
                     f"{r['comm_ms']:.2f} | {hidden} | {peak} | {plain} |")
    (out / "ring.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    for line in plan_lines(args):
        print(line)
    if args.dry_run:
        return 0
    if args.device == "cuda" and torch.cuda.device_count() < max(args.world):
        print(f"needs {max(args.world)} GPUs, found {torch.cuda.device_count()}")
        return 1
    rows = []
    for w in args.world:
        with tempfile.TemporaryDirectory() as d:
            res = os.path.join(d, "rows.json")
            mp.start_processes(_worker, args=(w, os.path.join(d, "init"), args, res), nprocs=w,
                               start_method="spawn")
            rows += json.loads(Path(res).read_text())
    write_report(rows, args, Path(args.out))
    print(f"wrote {args.out}/ring.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
