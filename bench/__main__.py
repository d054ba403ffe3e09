"""python -m bench: time posattn against SDPA, the unfused PE paths and FlexAttention.

    python -m bench                  # the full sweep (S 512..16k, D 64/128, both masks, fwd and fwd+bwd)
    python -m bench --quick          # D=128, S in {8k, 2k}; stops starting shapes after 4 min
    python -m bench --quick --dry-run    # print the plan (works without a GPU)
    python -m bench --pes alibi --seqlens 4k,16k --head-dims 128 --modes fwd   # any subset
    python -m bench --pes kerple-train --modes fwd+bwd   # learnable r1, r2: their gradients too
    python -m bench --cpu            # the CPU backend vs torch SDPA on CPU (bench/cpu.py; no GPU)

Estimated, not yet measured: the full sweep (~900 measurements) takes tens of minutes on an
H100/H200, most of it torch.compile of FlexAttention once per shape (static shapes: the
peer's best case); --quick skips flex where no target reads it.

Writes OUT/bench.md, OUT/bench.json and OUT/bench_d{D}.png (OUT = --out, default out/bench),
rewriting the markdown and JSON after every shape, so a run cut short keeps what it measured.
Each line of progress goes to stdout as it is measured.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import plan as P
from . import report
from .peers import IMPLS, IMPLS_BY_NAME, Impl, impls_for


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, write what we have."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"D={','.join(map(str, P.QUICK_HEAD_DIMS))}, S={','.join(map(str, P.QUICK_SEQLENS))} "
                         "(largest first), shorter timing, flex only for bias PEs at S >= 4096, 4-minute budget "
                         "(explicit options still win)")
    ap.add_argument("--seqlens", help="comma list, '1k' = 1024 (default 512,1k,2k,4k,8k,16k)")
    ap.add_argument("--head-dims", help="comma list (default 64,128)")
    ap.add_argument("--pes", help="comma list of " + ",".join(P.ALL_PES) + " (default: all; "
                    "quick: " + ",".join(P.PES) + "). *-train: learnable bias parameters, whose "
                    "gradients every implementation also computes (fwd+bwd shapes only)")
    ap.add_argument("--impls", help="comma list of implementations (default all): "
                                    + ", ".join(i.name for i in IMPLS))
    ap.add_argument("--modes", default=",".join(P.MODES), help="comma list of fwd,fwd+bwd")
    ap.add_argument("--causal", choices=("both", "true", "false"), default="both")
    ap.add_argument("--tokens", type=int, default=P.TOKENS, help="B·S per shape (default 16384)")
    ap.add_argument("--heads", type=int, default=P.HEADS)
    ap.add_argument("--dtype", choices=sorted(P.DTYPES), default="bf16")
    ap.add_argument("--warmup-ms", type=float, help="do_bench warm-up (default 25; quick 10)")
    ap.add_argument("--rep-ms", type=float, help="do_bench repetition time (default 100; quick 40)")
    ap.add_argument("--max-minutes", type=float,
                    help="stop starting new measurements after this long; the rest get 'skipped' rows "
                         "(default: none; quick 4)")
    ap.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests run the loop on CPU
    args = ap.parse_args(argv)

    q = args.quick
    args.seqlens = P.parse_int_list(args.seqlens) if args.seqlens else list(P.QUICK_SEQLENS if q else P.FULL_SEQLENS)
    args.head_dims = P.parse_int_list(args.head_dims) if args.head_dims else list(P.QUICK_HEAD_DIMS if q else P.FULL_HEAD_DIMS)
    try:
        args.pes = P.parse_choices(args.pes or ",".join(P.PES if q else P.ALL_PES), P.ALL_PES, "PE")
        args.modes = P.parse_choices(args.modes, P.MODES, "mode")
        args.impls = P.parse_choices(args.impls, IMPLS_BY_NAME, "implementation") if args.impls else None
    except ValueError as e:
        ap.error(str(e))
    args.causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    if args.warmup_ms is None:
        args.warmup_ms = 10.0 if q else 25.0
    if args.rep_ms is None:
        args.rep_ms = 40.0 if q else 100.0
    if args.max_minutes is None and q:
        args.max_minutes = 4.0
    return args


Task = Tuple[P.Shape, str, Impl]


def quick_skip(shape: P.Shape, pe: str, impl: Impl) -> bool:
    """--quick leaves out what no target reads and costs a torch.compile per shape:
    FlexAttention without a PE, and FlexAttention below the targets' S >= 4096."""
    return impl.name == "flex" and (pe == "none" or shape.S < 4096)


def tasks_for_shape(shape: P.Shape, pes: List[str], names: Optional[List[str]],
                    skip=lambda shape, pe, impl: False) -> List[Task]:
    """posattn first for each PE (its output is the reference the others are diffed against);
    the SDPA no-PE ceiling always, since every ratio is taken against it."""
    tasks: List[Task] = []
    ceilings = [i for i in impls_for("none", names) if i.role == "ceiling"]
    if "none" not in pes:
        tasks += [(shape, "none", i) for i in ceilings]
    for pe in pes:
        if P.is_trainable(pe) and shape.mode == "fwd":  # no gradient, the fixed PE's forward
            continue
        tasks += [(shape, pe, i) for i in impls_for(pe, names) if not skip(shape, pe, i)]
    return tasks


def make_plan(args) -> List[List[Task]]:
    shapes = P.make_shapes(args.seqlens, args.head_dims, args.causals, args.modes,
                           tokens=args.tokens, heads=args.heads, dtype=args.dtype,
                           largest_first=args.quick)
    if args.quick:
        return [tasks_for_shape(s, args.pes, args.impls, quick_skip) for s in shapes]
    return [tasks_for_shape(s, args.pes, args.impls) for s in shapes]


def config_of(args) -> dict:
    return dict(seqlens=args.seqlens, head_dims=args.head_dims, pes=args.pes, modes=args.modes,
                causal=args.causals, tokens=args.tokens, heads=args.heads, dtype=args.dtype,
                impls=args.impls or [i.name for i in IMPLS], warmup_ms=args.warmup_ms,
                rep_ms=args.rep_ms, max_minutes=args.max_minutes, quick=args.quick)


def print_plan(groups: List[List[Task]], args) -> None:
    n = sum(len(g) for g in groups)
    print(f"{len(groups)} shapes, {n} measurements; outputs in {args.out}/")
    for pe in dict.fromkeys(t[1] for g in groups for t in g):
        names = dict.fromkeys(t[2].name for g in groups for t in g if t[1] == pe)
        print(f"  {pe:<12} " + ", ".join(names))
    for g in groups:
        if g:
            print(f"  {g[0][0].describe()}  {len(g)} measurements")


def progress_line(i: int, n: int, t0: float, shape: P.Shape, pe: str, row: dict) -> str:
    el = int(time.perf_counter() - t0)
    head = f"[{i:>4}/{n}] {el // 60:>3}:{el % 60:02d}  {shape.describe()} {pe:<12} {row['impl']:<23}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    diff = "" if row.get("max_abs_diff") is None else f"  Δ={row['max_abs_diff']:.1e}"
    return (f"{head} {row['ms']:9.3f} ms {row['tflops']:6.0f} TFLOP/s {row['peak_mib']:9.0f} MiB"
            f"  (build {row['build_s']:.1f}s){diff}")


def skipped_row(shape: P.Shape, pe: str, impl: Impl, reason: str) -> dict:
    return dict(shape.as_dict(), pe=pe, impl=impl.name, role=impl.role, status="skipped",
                reason=reason, ms=None, ms_p20=None, ms_p80=None, tflops=None, peak_mib=None,
                max_abs_diff=None, build_s=None)


class Writer:
    """Rewrites bench.md / bench.json (and, at the end, the plots) from the rows so far."""

    def __init__(self, out: Path, env: dict, config: dict):
        self.out, self.env, self.config = out, env, config
        out.mkdir(parents=True, exist_ok=True)

    def write(self, rows: List[dict], final: bool = False, plot: bool = True) -> List[dict]:
        report.add_ratios(rows)
        targets = report.check_targets(rows)
        report.write_json(self.out / "bench.json", self.env, self.config, rows, targets)
        report.write_text(self.out / "bench.md", report.markdown(self.env, self.config, rows, targets))
        if final and plot:
            try:
                report.plot(rows, lambda D: self.out / f"bench_d{D}.png", title=self.env.get("gpu", ""))
            except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
                print(f"plot skipped: {type(e).__name__}: {e}")
        return targets


def run(args) -> int:
    from .envinfo import environment
    from .measure import free_memory, measure

    groups = make_plan(args)
    env = environment()
    writer = Writer(Path(args.out), env, config_of(args))
    n = sum(len(g) for g in groups)
    print(f"posattn bench on {env['gpu']} (driver {env['driver']}), torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['cuda']}")
    print_plan(groups, args)
    sys.stdout.flush()

    rows: List[dict] = []
    t0 = time.perf_counter()
    deadline = t0 + args.max_minutes * 60 if args.max_minutes else None
    stop_reason = None
    i = 0

    def out_of_time() -> bool:
        """Checked before every measurement (one fwd+bwd shape with its torch.compile builds
        can take a minute): past the deadline, the rest get 'skipped' rows."""
        nonlocal stop_reason
        if stop_reason is None and deadline and time.perf_counter() > deadline:
            stop_reason = f"time budget ({args.max_minutes:g} min) used up"
            print(f"{stop_reason}: {n - i} measurements not started (rows say 'skipped')", flush=True)
        return stop_reason is not None

    try:
        for group in groups:
            if not group:
                continue
            if out_of_time():
                rows += [skipped_row(s, pe, impl, stop_reason) for s, pe, impl in group]
                i += len(group)
                continue
            shape = group[0][0]
            x = P.make_inputs(shape, args.device)
            refs = {}
            for s, pe, impl in group:
                if out_of_time():
                    rows.append(skipped_row(s, pe, impl, stop_reason))
                    i += 1
                    continue
                i += 1
                row = measure(impl, pe, s, x, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                              reference=refs.get(pe))
                out = row.pop("out")
                if impl.name == "posattn" and out is not None:
                    refs[pe] = out
                rows.append(row)
                print(progress_line(i, n, t0, s, pe, row), flush=True)
            del x, refs
            free_memory()
            writer.write(rows)
    except (Interrupted, KeyboardInterrupt):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the files below be written
        print("interrupted: writing what was measured", flush=True)
        stop_reason = "interrupted"
        done = {(r["S"], r["D"], r["causal"], r["mode"], r["pe"], r["impl"]) for r in rows}
        rows += [skipped_row(s, pe, impl, stop_reason) for g in groups for s, pe, impl in g
                 if (s.S, s.D, s.causal, s.mode, pe, impl.name) not in done]
    targets = writer.write(rows, final=True, plot=not args.no_plot)

    print()
    print("\n".join(report.targets_markdown(targets)))
    print()
    print(f"{report.targets_summary(targets)}; {sum(r['status'] == 'ok' for r in rows)} of "
          f"{len(rows)} measurements ran; elapsed {time.perf_counter() - t0:.0f} s")
    print(f"wrote {args.out}/bench.md, bench.json" + ("" if args.no_plot else ", bench_d*.png"))
    return 130 if stop_reason == "interrupted" else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--cpu" in argv:  # the CPU backend's benchmark (bench/cpu.py), its own options
        from . import cpu

        return cpu.main([a for a in argv if a != "--cpu"])
    args = parse_args(argv)
    if args.dry_run:
        print_plan(make_plan(args), args)
        return 0
    if not torch.cuda.is_available():
        print("python -m bench needs a CUDA GPU (none found): nothing to time. "
              "`python -m bench --dry-run` prints the plan; `python -m posattn` checks the kernels on CPU.")
        return 2

    def on_term(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
