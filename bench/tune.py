"""python -m bench.tune: time candidate tile configs for each kernel and PE on this GPU.

    python -m bench.tune                         # D=128, S=8k, every PE and kernel (~1-2 min, H200)
    python -m bench.tune --head-dims 64,128 --pes rope --kernels fwd
    python -m bench.tune --dry-run               # print the candidates (no GPU needed)

The shipped tiles (posattn.kernels.configs) were chosen by static checks only: spill-free,
wgmma that computes nothing twice, shared memory that fits, fewest issued instructions per
score (bench.sass_loop). This measures them. For each kernel (forward; backward with the
dK/dV tile varied; backward with the dQ tile varied) and each PE, it times the shipped tile and
every candidate in ``CANDIDATES`` on bf16 inputs (B·S = 16k tokens, 16 heads, non-causal by
default), each through the launchers in ``posattn.kernels.launch`` under
``configs.override``. A backward time is the whole backward (preprocess, dK/dV, dQ), with the
other kernel at its shipped tile. Every candidate's outputs are compared with the shipped
tile's (a guard against a tile that computes something else: ``bad`` rows are never picked).

Candidates compile in parallel worker processes first (``--jobs``; Triton's on-disk cache
then serves the timing process), so compile time does not eat the budget.

Writes, after every measurement so that a run cut short keeps what it has:
  OUT/tune.md     one table per (kernel, head dim): ms and TFLOP/s per PE, vs the shipped tile
  OUT/tune.json   every row, plus the environment
  OUT/tiles.json  the picks: per (kernel, PE family, head dim) -- the families are the bench's
                  PEs, none / rope / alibi / kerple -- the fastest candidate, where it beats
                  the shipped tile by at least ``--min-gain``. POSATTN_TILES=OUT/tiles.json makes posattn use them
                  (configs.load_tiles reads it); copy them into configs.py to ship them.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import plan as P
from .measure import _first_line, bench_ms

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, split]): configs.TileConfig's fields; a missing
# split is False (only dK/dV tiles split)
TileTuple = Tuple[int, ...]


def norm_tile(tile) -> TileTuple:
    """The 5-field form of a tile tuple (split defaults to False)."""
    t = tuple(tile)
    return t if len(t) == 5 else t + (False,)

# Hopper-class (sm_90) bf16 candidates per (kernel, padded head dim): (tile, the PE families it is
# listed for), the shipped tile among them. Each was compiled for sm_90 with every PE variant of
# each family that an override applies to (contiguous positions, the forward's key tiles through
# TMA except for RoPE -- configs.tile_config: explicit positions and unaligned inputs keep the
# shipped tile): RoPE; ALiBi; KERPLE log and power, causal, on triton 3.6 and 3.9, and is listed
# for a family only where all of those spill nothing and fit 227 KiB (python -m bench.tune --vet
# reruns that check on a CPU). The PE parameters are fixed, as in the benchmark: the dQ kernel
# carries no parameter gradients (tile_config's pe_grad=False; KERPLE's dQ candidates were vetted
# with them, the heavier case, except 128 x 32 at D=128 and 128 x 64 at D=64, which are clean only
# without). Some compute S twice (8 warps on a 64-row slab: bench.sass_loop's mma% below 100); they
# stay, so that the GPU says what the static model predicts.
_ALL = ("none", "rope", "alibi", "kerple")
CANDIDATES: Dict[Tuple[str, int], List[Tuple[TileTuple, Tuple[str, ...]]]] = {}


def _fill_candidates() -> None:
    c = CANDIDATES
    c[("fwd", 128)] = [
        ((128, 128, 8, 2), ("none", "alibi", "kerple")),
        ((128, 64, 8, 2), ("none", "rope", "alibi")),
        ((128, 64, 8, 3), _ALL),
        ((128, 64, 8, 4), ("none", "rope", "alibi")),
        ((64, 64, 4, 3), ("none", "alibi")),
        ((128, 32, 8, 3), _ALL),
    ]
    c[("bwd_dkdv", 128)] = [
        ((32, 128, 8, 2, True), ("rope",)),  # split: dV and dK in two launches
        ((16, 128, 8, 2, True), ("rope",)),
        ((32, 128, 8, 2), ("none", "alibi", "kerple")),
        ((64, 64, 8, 2), ("none",)),  # ALiBi spills 16 B on triton 3.9
        ((16, 128, 8, 2), ("none", "alibi", "kerple")),
        ((32, 64, 4, 2), ("none",)),
        ((32, 64, 8, 1), ("none", "alibi")),
        ((32, 64, 8, 2), _ALL),
        ((32, 64, 8, 3), _ALL),
        ((16, 64, 4, 2), ("none", "alibi", "kerple")),
        ((16, 64, 8, 2), _ALL),
    ]
    c[("bwd_dq", 128)] = [
        ((128, 64, 8, 2), ("none", "alibi")),
        ((128, 64, 8, 3), ("none", "alibi")),
        ((64, 64, 4, 2), ("none",)),
        ((64, 64, 8, 2), ("none", "alibi")),
        ((128, 32, 8, 2), _ALL),
        ((64, 32, 4, 2), ("none", "alibi")),
        ((64, 32, 8, 2), _ALL),
        ((64, 32, 8, 3), _ALL),
        ((64, 16, 4, 2), _ALL),
        ((64, 16, 8, 2), _ALL),
        ((128, 32, 8, 1), ("kerple",)),  # trainable KERPLE's shipped tile (configs._hopper)
    ]
    c[("fwd", 64)] = [
        ((128, 128, 8, 2), _ALL),
        ((128, 128, 8, 3), ("none",)),
        ((128, 64, 8, 3), _ALL),
        ((128, 64, 8, 4), _ALL),
        ((64, 64, 4, 3), _ALL),
    ]
    c[("bwd_dkdv", 64)] = [
        ((64, 128, 8, 2), ("none", "alibi", "kerple")),
        ((32, 128, 8, 2), _ALL),
        ((64, 64, 4, 2), ("none", "alibi", "kerple")),
        ((64, 64, 8, 2), _ALL),
        ((64, 64, 8, 3), ("none", "rope", "alibi")),
        ((32, 64, 4, 2), _ALL),
    ]
    c[("bwd_dq", 64)] = [
        ((128, 128, 8, 2), ("none",)),
        ((128, 64, 8, 2), _ALL),
        ((64, 64, 4, 2), ("none", "rope", "alibi")),
        ((64, 64, 8, 3), _ALL),
        ((128, 32, 8, 2), _ALL),
        ((64, 32, 4, 2), _ALL),
        ((64, 32, 8, 2), _ALL),
    ]


_fill_candidates()

# The bench's PE names (none / rope / alibi / kerple) are exactly configs.FAMILIES, the key
# tile_config and the overrides use.
KERNEL_MODES = {"fwd": "fwd", "bwd_dkdv": "bwd", "bwd_dq": "bwd"}
KERNEL_TITLES = {"fwd": "forward", "bwd_dkdv": "backward, dK/dV tile varied",
                 "bwd_dq": "backward, dQ tile varied"}


@dataclass(frozen=True)
class Task:
    kernel: str
    pe: str
    head_dim: int
    tile: TileTuple
    shipped: bool


# ---------------------------------------------------------------------------------------------
# one case: inputs and the kernel record for a PE
# ---------------------------------------------------------------------------------------------


class Case:
    """Inputs for one (PE, head dim): q, k, v, dout (B, H, S, D) bf16, the kernel PE record,
    contiguous positions, and the shipped forward's out and lse (what the backward takes)."""

    def __init__(self, pe: str, head_dim: int, args, device):
        from posattn import _triton
        from posattn.kernels import launch
        from posattn.positions import Positions

        from .peers import pe_spec

        self.launch = launch
        shape = P.Shape(B=max(1, args.tokens // args.seqlen), H=args.heads, S=args.seqlen,
                        D=head_dim, causal=args.causal, mode="fwd", dtype="bf16")
        self.shape = shape
        x = P.make_inputs(shape, device)
        dtype = P.DTYPES[args.dtype]
        self.q, self.k, self.v, self.dout = (t.detach().to(dtype) for t in (x.q, x.k, x.v, x.dout))
        spec = pe_spec(pe, shape.H, device)
        self.kpe = _triton.kernel_pe(spec, head_dim, shape.H, device, shape.S)
        self.pos = _triton.kernel_positions(Positions(shape.S, start=0),
                                            Positions(shape.S, start=0), shape.B, device)
        # fixed PE parameters, as the benchmark times them (bench.peers): no gradient terms in
        # dQ, so the tiles measured are the ones tile_config ships for pe_grad=False
        self.need_pe_grad = False
        self.scale = head_dim ** -0.5
        self.width = launch._layout_meta(self.kpe, head_dim, head_dim)[1]
        self.arch = launch._arch(self.q)
        self.out, _, self.lse = self.fwd()  # the backward takes the forward's row_lse

    def fwd(self):
        return self.launch.attn_fwd(self.q, self.k, self.v, self.kpe, self.pos,
                                    self.launch.Mask(causal=self.shape.causal), self.scale)

    def bwd(self):
        dq, dk, dv, g = self.launch.attn_bwd(self.dout, self.q, self.k, self.v, self.out,
                                             self.lse, self.kpe, self.pos,
                                             self.launch.Mask(causal=self.shape.causal),
                                             self.scale, self.need_pe_grad)
        return [t for t in (dq, dk, dv, g) if t is not None]

    def runner(self, kernel: str):
        return self.fwd if kernel == "fwd" else self.bwd

    def override(self, task: Task):
        from posattn.kernels import configs
        key = (task.kernel, task.pe, self.width, self.arch)
        return configs.override({key: configs.TileConfig(*task.tile)})

    def flops(self, kernel: str) -> float:
        s = self.shape
        return P.attention_flops(s.B, s.H, s.S, s.S, s.D, s.causal, KERNEL_MODES[kernel])


def _outputs(res) -> List[torch.Tensor]:
    return list(res) if isinstance(res, (list, tuple)) else [res]


def same_result(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], rtol: float = 0.02) -> Tuple[bool, float]:
    """A different tile sums in a different order, nothing more: every output within
    ``rtol`` of the largest |value| of the shipped tile's output. Returns (ok, worst ratio)."""
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.float(), w.float()
        if g.shape != w.shape or not torch.isfinite(g).all():
            return False, float("inf")
        scale = float(w.abs().max()) + 1e-6
        worst = max(worst, float((g - w).abs().max()) / scale)
    return worst <= rtol, worst


# ---------------------------------------------------------------------------------------------
# plan, parallel compile, timing
# ---------------------------------------------------------------------------------------------


def _kernel_pe(pe: str, head_dim: int):
    """A kernel PE record standing for the family ``pe`` (the bias PEs share their layout)."""
    from posattn.kernels import launch
    if pe == "rope":
        return launch.KernelPE(rot="rope", rot_dim=head_dim, family="rope")
    return launch.KernelPE(family=pe)  # bias families share the no-PE head layout


def padded_width(pe: str, head_dim: int) -> int:
    """The head width tile_config is keyed on for ``pe`` (full rotary dim for RoPE)."""
    from posattn.kernels import launch
    return launch._layout_meta(_kernel_pe(pe, head_dim), head_dim, head_dim)[1]


def shipped_tile(kernel: str, pe: str, head_dim: int, arch: Optional[int], dtype) -> TileTuple:
    """The tile shipped for the tuner's case: contiguous positions, aligned inputs (the
    forward's key tiles through TMA where launch.tma_planned takes them)."""
    from posattn.kernels import configs, launch
    tma = kernel == "fwd" and launch.tma_planned(arch, _kernel_pe(pe, head_dim), dtype, False)
    cfg = configs.tile_config(kernel, padded_width(pe, head_dim), False, dtype, arch, pe,
                              tma=tma)
    return (cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps, cfg.num_stages, cfg.split)


def make_tasks(args, arch: Optional[int], candidates=None) -> List[Task]:
    """Shipped tile first, then each candidate listed for the PE's family, per (kernel, D, PE).
    CANDIDATES were vetted for Hopper: on another arch only the shipped tiles are timed."""
    if candidates is None:
        from posattn.kernels.configs import HOPPER_CLASS
        candidates = CANDIDATES if arch in HOPPER_CLASS else {}
    tasks = []
    for kernel in args.kernels:
        for hd in args.head_dims:
            for pe in args.pes:
                ship = shipped_tile(kernel, pe, hd, arch, P.DTYPES[args.dtype])
                tasks.append(Task(kernel, pe, hd, ship, True))
                for tile, fams in candidates.get((kernel, hd), []):
                    if pe in fams and norm_tile(tile) != ship:
                        tasks.append(Task(kernel, pe, hd, norm_tile(tile), False))
    return tasks


_CASES: Dict[Tuple[str, int], Case] = {}


def _case(args, pe: str, head_dim: int, device) -> Case:
    key = (pe, head_dim)
    if key not in _CASES:
        _CASES.clear()  # one case alive at a time: memory stays small
        _CASES[key] = Case(pe, head_dim, args, device)
    return _CASES[key]


def _warm(args, tasks: List[Task]) -> List[str]:
    """Worker: run each task once (compiling it into Triton's on-disk cache). Returns errors."""
    errors = []
    for t in tasks:
        try:
            case = _case(args, t.pe, t.head_dim, args.device)
            with case.override(t):
                case.runner(t.kernel)()
            if args.device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported; the timing pass records the row
            errors.append(f"{t}: {type(e).__name__}: {_first_line(e)}")
    _CASES.clear()
    return errors


def precompile(args, tasks: List[Task], jobs: int) -> List[str]:
    """Compile every task in ``jobs`` spawned processes (grouped by case, so each worker builds
    few inputs). Returns the workers' error lines; failures here are only a slower timing pass."""
    if jobs <= 1:
        return []
    groups: Dict[Tuple[str, int], List[Task]] = {}
    for t in tasks:
        groups.setdefault((t.pe, t.head_dim), []).append(t)
    chunks: List[List[Task]] = [[] for _ in range(jobs)]
    i = 0
    for grp in groups.values():  # round-robin inside each case: every worker shares the work
        for t in grp:
            chunks[i % jobs].append(t)
            i += 1
    errors = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for errs in pool.map(_warm, [args] * jobs, [c for c in chunks]):
            errors += errs
    return errors


def time_ms(fn, device: str, warmup_ms: float, rep_ms: float) -> float:
    if device == "cuda":
        return bench_ms(fn, None, warmup_ms, rep_ms)[0]  # median, as the bench times
    t0 = time.perf_counter()  # CPU (the interpreter, in tests): one call
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(args, task: Task, reference: Optional[List[torch.Tensor]]) -> Tuple[dict, Optional[list]]:
    """One row for ``task``; never raises. Returns (row, outputs when task is the shipped tile)."""
    row = dict(asdict(task), tile=list(task.tile), status="ok", reason="", ms=None, tflops=None,
               vs_shipped=None, diff=None)
    try:
        case = _case(args, task.pe, task.head_dim, args.device)
        fn = case.runner(task.kernel)
        with case.override(task):
            outs = _outputs(fn())
            if task.shipped:
                reference = [o.clone() for o in outs]
            else:
                ok, worst = same_result(outs, reference or [])
                row["diff"] = worst
                if not ok:
                    row.update(status="bad", reason=f"differs from the shipped tile by {worst:.3g} "
                                                    "of the largest value")
            del outs
            ms = time_ms(fn, args.device, args.warmup_ms, args.rep_ms)
        row.update(ms=ms, tflops=case.flops(task.kernel) / (ms * 1e-3) / 1e12)
    except Exception as e:  # noqa: BLE001
        row.update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row, (reference if task.shipped else None)


# ---------------------------------------------------------------------------------------------
# picks and report
# ---------------------------------------------------------------------------------------------


def pick(rows: List[dict], min_gain: float, arch: Optional[int], width_of) -> List[dict]:
    """Per (kernel, PE, head dim): the fastest candidate measured ok, when its time is at most
    (1 - min_gain) x the shipped tile's (measured ok too). width_of(pe, head_dim) -> the
    padded width tile_config is keyed on."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["pe"], r["head_dim"]), []).append(r)
    picks = []
    for (kernel, pe, hd), rs in sorted(groups.items()):
        ship = next((r for r in rs if r["shipped"]), None)
        ok = [r for r in rs if not r["shipped"] and r["status"] == "ok"]
        if ship is None or ship["status"] != "ok" or not ok:
            continue
        best = min(ok, key=lambda r: r["ms"])
        if best["ms"] <= (1 - min_gain) * ship["ms"]:
            picks.append(dict(kernel=kernel, family=pe, head_dim=width_of(pe, hd), arch=arch,
                              tile=list(best["tile"]), shipped=list(ship["tile"]),
                              gain=round(1 - best["ms"] / ship["ms"], 4)))
    return picks


def _fmt_tile(t) -> str:
    return f"{t[0]}x{t[1]} w{t[2]} s{t[3]}" + (" split" if len(t) > 4 and t[4] else "")


def render(rows: List[dict], picks: List[dict], env: dict, args) -> str:
    lines = ["# Tile tuning", "",
             f"{env.get('gpu', '?')} · torch {env.get('torch')} · triton {env.get('triton')} · "
             f"posattn {env.get('git_commit')} · {env.get('date')}", "",
             f"{args.dtype}, S={args.seqlen}, B·S={args.tokens}, H={args.heads}, "
             f"{'causal' if args.causal else 'non-causal'}; median ms (triton do_bench); "
             "backward = preprocess + dK/dV + dQ, the other kernel at its shipped tile; "
             "`*` = shipped tile; `bad` = output differs from the shipped tile's.", ""]
    by_kd: Dict[tuple, List[dict]] = {}
    for r in rows:
        by_kd.setdefault((r["kernel"], r["head_dim"]), []).append(r)
    for (kernel, hd), rs in by_kd.items():
        pes = list(dict.fromkeys(r["pe"] for r in rs))
        lines += [f"## {KERNEL_TITLES[kernel]}, D={hd}", "",
                  "| tile | " + " | ".join(f"{pe} ms (TFLOP/s, ×shipped)" for pe in pes) + " |",
                  "|---|" + "---|" * len(pes)]
        tiles = list(dict.fromkeys((tuple(r["tile"]), r["shipped"]) for r in rs))
        tiles.sort(key=lambda t: not t[1])
        for tile, shipped in tiles:
            cells = []
            for pe in pes:
                r = next((r for r in rs if r["pe"] == pe and tuple(r["tile"]) == tile
                          and r["shipped"] == shipped), None)
                ship = next((r for r in rs if r["pe"] == pe and r["shipped"]), None)
                if r is None:
                    cells.append("")
                elif r["status"] == "error":
                    cells.append("error")
                elif r["ms"] is None:
                    cells.append(r["status"])
                else:
                    rel = (f", {ship['ms'] / r['ms']:.2f}×" if ship and ship.get("ms") and not shipped
                           else "")
                    flag = " bad" if r["status"] == "bad" else ""
                    cells.append(f"{r['ms']:.3f} ({r['tflops']:.0f}{rel}){flag}")
            lines.append(f"| {_fmt_tile(tile)}{' *' if shipped else ''} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Picks (tiles.json)", ""]
    if picks:
        lines += ["| kernel | family | head dim | shipped | pick | gain |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['kernel']} | {p['family']} | {p['head_dim']} | {_fmt_tile(p['shipped'])} | "
                  f"{_fmt_tile(p['tile'])} | {100 * p['gain']:.1f} % |" for p in picks]
    else:
        lines.append(f"none: no candidate beat a shipped tile by {100 * args.min_gain:.0f} % "
                     "(or nothing finished).")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['kernel']} {r['pe']} D={r['head_dim']} "
                                         f"{_fmt_tile(r['tile'])}: {r['reason']}" for r in errors]
    return "\n".join(lines) + "\n"


def write(out: Path, rows, picks, env, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.md").write_text(render(rows, picks, env, args))
    cfg = {k: v for k, v in vars(args).items() if k not in ("out",)}
    (out / "tune.json").write_text(json.dumps(dict(environment=env, config=cfg, rows=rows,
                                                   picks=picks), indent=1, default=str))
    (out / "tiles.json").write_text(json.dumps(dict(
        source=f"python -m bench.tune on {env.get('gpu', '?')} ({env.get('date')})",
        tiles=[{k: p[k] for k in ("kernel", "family", "head_dim", "arch", "tile")} for p in picks]),
        indent=1))


# ---------------------------------------------------------------------------------------------
# static vetting (CPU) and CLI
# ---------------------------------------------------------------------------------------------

VET_VARIANTS = {"none": [("none", False)], "rope": [("rope", False)], "alibi": [("alibi", False)],
                "kerple": [("kerple_log", False), ("kerple_power", False)]}


def vet(echo=print) -> int:
    """Compile every candidate for sm_90 with every variant of each family it is listed for;
    print the ones that spill, miss wgmma or overflow shared memory. Needs no GPU
    (bench.compile_report). Returns the number of failures."""
    from posattn.kernels.configs import TileConfig

    from .compile_report import compile_one, launches
    bad = 0
    for (kernel, hd), cands in CANDIDATES.items():
        for tile, fams in cands:
            for fam in fams:
                for pe, explicit in VET_VARIANTS[fam]:
                    cfg = TileConfig(*norm_tile(tile))
                    for part in launches(kernel, cfg):
                        r = compile_one(kernel, pe, hd, True, explicit, cfg=cfg, pe_grad=False,
                                        part=part)
                        status = "ok" if r["ok"] else "FAIL"
                        bad += not r["ok"]
                        echo(f"{status:4s} {kernel:8s} D={hd:<3d} {_fmt_tile(tile):20s} {pe:12s} "
                             f"{'explicit' if explicit else 'contig':8s} {part:4s} regs "
                             f"{r['registers']} stack {r['stack']} smem {r['shared']}")
    return bad


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dims", default="128", help="comma list (default 128)")
    ap.add_argument("--pes", default=",".join(P.PES), help="comma list of none,rope,alibi,kerple")
    ap.add_argument("--kernels", default="fwd,bwd_dkdv,bwd_dq", help="comma list of fwd,bwd_dkdv,bwd_dq")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=P.TOKENS, help="B·S (default 16384)")
    ap.add_argument("--heads", type=int, default=P.HEADS)
    ap.add_argument("--causal", action="store_true", help="causal mask (default non-causal)")
    ap.add_argument("--dtype", choices=sorted(P.DTYPES), default="bf16")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=50.0)
    ap.add_argument("--min-gain", type=float, default=0.03,
                    help="pick a candidate only if it is this much faster in total (default 0.03)")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes that compile candidates first (default min(8, CPUs); 1 = none)")
    ap.add_argument("--max-minutes", type=float, help="stop starting measurements after this long")
    ap.add_argument("--out", default="out/tune")
    ap.add_argument("--dry-run", action="store_true", help="print the tasks and exit (no GPU needed)")
    ap.add_argument("--vet", action="store_true",
                    help="compile every candidate for sm_90 on this machine (no GPU) and exit")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests run on CPU
    args = ap.parse_args(argv)
    try:
        args.head_dims = P.parse_int_list(args.head_dims)
        args.pes = P.parse_choices(args.pes, P.PES, "PE")
        args.kernels = P.parse_choices(args.kernels, KERNEL_MODES, "kernel")
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None, candidates=None) -> int:
    args = parse_args(argv)
    if args.vet:
        return 1 if vet() else 0
    arch = None
    if args.device == "cuda":
        if not args.dry_run and not torch.cuda.is_available():
            print("python -m bench.tune needs a CUDA GPU (or --dry-run / --vet)", file=sys.stderr)
            return 2
        if torch.cuda.is_available():
            from posattn._env import cuda_arch
            arch = cuda_arch(torch.device("cuda"))
        else:
            arch = 90  # dry run on a CPU machine: the Hopper plan
    tasks = make_tasks(args, arch, candidates)
    if args.dry_run:
        for t in tasks:
            print(f"{t.kernel:8s} D={t.head_dim:<3d} {t.pe:6s} {_fmt_tile(t.tile)}{' (shipped)' if t.shipped else ''}")
        print(f"{len(tasks)} measurements")
        return 0

    from .envinfo import environment
    env = environment()
    out = Path(args.out)
    t0 = time.time()
    if args.jobs > 1 and args.device == "cuda":
        try:
            errs = precompile(args, tasks, args.jobs)
        except Exception as e:  # noqa: BLE001 - the timing pass compiles what is missing
            errs = [f"the compile processes failed: {type(e).__name__}: {e}"]
        print(f"compiled {len(tasks)} tasks in {args.jobs} processes in {time.time() - t0:.0f} s"
              + (f"; {len(errs)} failed there (timed anyway)" if errs else ""), flush=True)
        for e in errs[:10]:
            print("  " + e, flush=True)

    rows: List[dict] = []
    picks: List[dict] = []
    ref: Dict[tuple, list] = {}
    for t in tasks:
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
            rows.append(dict(asdict(t), tile=list(t.tile), status="skipped", reason="time budget",
                             ms=None, tflops=None, vs_shipped=None, diff=None))
            continue
        row, outs = measure(args, t, ref.get((t.kernel, t.pe, t.head_dim)))
        if outs is not None:
            ref[(t.kernel, t.pe, t.head_dim)] = outs
        if not t.shipped:
            ship = next((r for r in rows if r["shipped"] and r["kernel"] == t.kernel
                         and r["pe"] == t.pe and r["head_dim"] == t.head_dim), None)
            if ship and ship["ms"] and row["ms"]:
                row["vs_shipped"] = ship["ms"] / row["ms"]
        rows.append(row)
        print(f"{t.kernel:8s} D={t.head_dim:<3d} {t.pe:6s} {_fmt_tile(t.tile):14s}"
              f"{'*' if t.shipped else ' '} {row['status']:5s} "
              + (f"{row['ms']:8.3f} ms {row['tflops']:6.1f} TFLOP/s" if row["ms"] else row["reason"])
              + (f"  x{row['vs_shipped']:.2f}" if row["vs_shipped"] else ""), flush=True)
        picks = pick(rows, args.min_gain, arch, padded_width)
        write(out, rows, picks, env, args)
    _CASES.clear()
    picks = pick(rows, args.min_gain, arch, padded_width)
    write(out, rows, picks, env, args)
    print(f"\n{len(picks)} picks -> {out / 'tiles.json'}; table: {out / 'tune.md'}")
    for p in picks:
        print(f"  {p['kernel']:8s} {p['family']:5s} D={p['head_dim']:<3d} {_fmt_tile(p['shipped'])} -> "
              f"{_fmt_tile(p['tile'])} ({100 * p['gain']:.1f} % faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
