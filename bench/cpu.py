"""python -m bench.cpu (or python -m bench --cpu): posattn's CPU backend vs torch SDPA on CPU.

    python -m bench.cpu                          # S = 1k..8k, causal and not, fwd and fwd+bwd
    python -m bench.cpu --seqlens 1k,16k --modes fwd --runs 3

For each PE (none, rope, alibi, kerple_log: B=1, H=8, D=64, fp32 by default) it times
``posattn.attention(..., backend="cpu")`` against its SDPA baseline:

* none: ``F.scaled_dot_product_attention`` (its best CPU backend: the flash kernel);
* rope: the same RoPE rotation (``posattn.reference.rope_cos_sin`` + ``apply_rope``, angles in
  float64 as posattn does) then SDPA -- the rotation is inside both timings;
* bias PEs: SDPA given the PE's bias, causal mask folded in, as a materialised float
  ``attn_mask`` (B, H, S, S); building it is *not* in SDPA's time (reported apart), its memory
  is in SDPA's peak. Above ``--mask-gib`` the mask is not built: "mask would not fit".

Time: median of ``--runs`` calls after one warm-up call. Peak memory: the rise of the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs before each measured call) over the RSS
before it, inputs excluded. The machine's load average is recorded with every row (other jobs
share the cores). Writes OUT/cpu.md, OUT/cpu.json and OUT/cpu.png (OUT default bench/results/cpu).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

import posattn
from posattn import reference
from posattn.pe import resolve_pe
from posattn.positions import Positions

PES = ("none", "rope", "alibi", "kerple_log")
TARGETS = {"none": 1.3, "rope": 1.3}  # posattn time / SDPA time; bias PEs: 1.5 (vs SDPA + mask)
BIAS_TARGET = 1.5
MEM_TARGET = 1.10


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def peak_rise(fn: Callable[[], object]) -> int:
    """Bytes the peak RSS rises above the current RSS while ``fn()`` runs (its result freed)."""
    _reset_peak()
    base = _status("VmRSS")
    res = fn()
    peak = _status("VmHWM")
    del res
    return peak - base


def median_time(fn: Callable[[], object], runs: int) -> float:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t)
        del res
    return statistics.median(ts)


# --------------------------------------------------------------------------------------------
# the implementations
# --------------------------------------------------------------------------------------------

def inputs(S: int, B: int, H: int, D: int, dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3))
    return q, k, v, torch.randn(B, H, S, D, generator=g, dtype=dtype)


def run_posattn(pe, q, k, v, dout, causal, bwd):
    out = posattn.attention(q, k, v, pe, causal=causal, backend="cpu")
    if bwd:
        out.backward(dout)
    return out


def sdpa_rope(q, k, v, causal):
    """The unfused RoPE path: rotate with posattn.reference's functions (float64 angles), then SDPA."""
    B, H, S, D = q.shape
    spec = resolve_pe("rope")
    pos = Positions(S, start=0).as_tensor(B, S, q.device)
    cs = reference.rope_cos_sin(spec, D, pos, None)
    qr, kr = (reference.apply_rope(t, *cs, spec.interleaved) for t in (q, k))
    return F.scaled_dot_product_attention(qr, kr, v, is_causal=causal)


def build_mask(pe: str, H: int, S: int, causal: bool, dtype):
    """(1, H, S, S) float: the PE's bias, -inf above the diagonal when causal."""
    pos = torch.arange(S)[None]
    with torch.no_grad():
        bias = reference.bias(resolve_pe(pe), H, pos, pos, dtype)
    if causal:
        bias.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu_(1), float("-inf"))
    return bias


def run_sdpa(pe, q, k, v, dout, causal, bwd, mask):
    if pe == "rope":
        out = sdpa_rope(q, k, v, causal)
    elif mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if bwd:
        out.backward(dout)
    return out


# --------------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------------

def measure(pe: str, S: int, causal: bool, mode: str, args) -> dict:
    bwd = mode == "fwd+bwd"
    q, k, v, dout = inputs(S, args.batch, args.heads, args.head_dim, torch.float32, bwd)
    has_bias = pe not in ("none", "rope") and resolve_pe(pe).bias != "none"
    row = dict(pe=pe, S=S, causal=causal, mode=mode, load_before=os.getloadavg()[0])
    runs = args.runs if S <= 4096 else max(1, args.runs - 1)

    def ours():
        return run_posattn(pe, q, k, v, dout, causal, bwd)

    ours()  # warm-up
    row["posattn_mem"] = peak_rise(ours)
    row["posattn_s"] = median_time(ours, runs)

    mask_bytes = args.batch * args.heads * S * S * 4 if has_bias else 0
    row["mask_gib"] = mask_bytes / 2 ** 30
    if has_bias and mask_bytes > args.mask_gib * 2 ** 30:
        row["sdpa_s"] = row["sdpa_mem"] = None
        row["note"] = f"mask {mask_bytes / 2 ** 30:.0f} GiB would not fit"
    else:
        mask_box = {}

        def theirs():
            mask = None
            if has_bias:
                t = time.perf_counter()
                mask = build_mask(pe, args.heads, S, causal, torch.float32)
                mask_box["build"] = time.perf_counter() - t
            t = time.perf_counter()
            out = run_sdpa(pe, q, k, v, dout, causal, bwd, mask)
            mask_box["call"] = time.perf_counter() - t
            return out

        theirs()
        row["sdpa_mem"] = peak_rise(theirs)
        calls, builds = [], []
        for _ in range(runs):
            theirs()
            calls.append(mask_box["call"])
            builds.append(mask_box.get("build", 0.0))
        row["sdpa_s"] = statistics.median(calls)
        row["mask_build_s"] = statistics.median(builds) if has_bias else None
        row["note"] = ""
    row["load_after"] = os.getloadavg()[0]
    if row["sdpa_s"]:
        row["time_ratio"] = row["posattn_s"] / row["sdpa_s"]
        row["mem_ratio"] = row["posattn_mem"] / max(row["sdpa_mem"], 1)
        row["target"] = BIAS_TARGET if has_bias else TARGETS.get(pe, BIAS_TARGET)
    return row


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------

def _mib(x):
    return "-" if x is None else f"{x / 2 ** 20:.0f}"


def _ms(x):
    return "-" if x is None else f"{1e3 * x:.0f}"


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [
        "# posattn CPU backend vs torch SDPA (CPU)",
        "",
        f"B={meta['batch']}, H={meta['heads']}, D={meta['head_dim']}, fp32, torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['cpu']}. Load average at start {meta['load_start']:.2f} "
        "(other engineers' jobs share the cores: see the load columns).",
        "",
        "Time: median ms (after a warm-up call). Memory: peak RSS rise in MiB during one call "
        "(inputs excluded; SDPA's includes its materialised mask for bias PEs). Targets: none/rope "
        f"time <= {TARGETS['none']}x SDPA; bias PEs <= {BIAS_TARGET}x SDPA with the mask prebuilt "
        "(its build time in its own column); memory <= 1.1x SDPA's.",
        "",
        "| PE | S | causal | mode | posattn ms | SDPA ms | ratio | target | mask build ms | posattn MiB | SDPA MiB "
        "| mem ratio | load | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r.get("time_ratio")
        ok = "" if ratio is None else (" ok" if ratio <= r["target"] else " **miss**")
        mr = r.get("mem_ratio")
        lines.append(
            f"| {r['pe']} | {r['S']} | {r['causal']} | {r['mode']} | {_ms(r['posattn_s'])} | {_ms(r['sdpa_s'])} "
            f"| {'-' if ratio is None else f'{ratio:.2f}'}{ok} | {r.get('target', '-')} "
            f"| {_ms(r.get('mask_build_s'))} | {_mib(r['posattn_mem'])} | {_mib(r['sdpa_mem'])} "
            f"| {'-' if mr is None else f'{mr:.2f}'} | {r['load_before']:.1f}/{r['load_after']:.1f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    causals = sorted({r["causal"] for r in rows})
    fig, axes = plt.subplots(len(modes), len(causals), figsize=(5.5 * len(causals), 4 * len(modes)),
                             squeeze=False, sharey=True)
    for i, mode in enumerate(modes):
        for j, causal in enumerate(causals):
            ax = axes[i][j]
            for pe in PES:
                pts = [(r["S"], r["time_ratio"]) for r in rows
                       if r["pe"] == pe and r["mode"] == mode and r["causal"] == causal and r.get("time_ratio")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=pe)
            ax.axhline(TARGETS["none"], color="gray", ls=":", lw=0.8)
            ax.axhline(BIAS_TARGET, color="gray", ls="--", lw=0.8)
            ax.axhline(1.0, color="black", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, causal={causal}")
            ax.set_xlabel("S")
            ax.set_ylabel("posattn cpu time / SDPA time")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None):
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="1k,2k,4k,8k", help="comma list, 1k = 1024 (default 1k,2k,4k,8k)")
    ap.add_argument("--pes", default=",".join(PES))
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--causal", choices=("both", "true", "false"), default="both")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="timed calls per row (one fewer above S=4k)")
    ap.add_argument("--mask-gib", type=float, default=2.0, help="largest SDPA mask to materialise")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's). On a machine "
                    "shared with other jobs, 1 avoids OpenMP barriers waiting on a descheduled thread")
    ap.add_argument("--out", default="bench/results/cpu")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    a.seqlens = [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in a.seqlens.split(",")]
    a.pes = a.pes.split(",")
    a.modes = a.modes.split(",")
    a.causals = {"both": [False, True], "true": [True], "false": [False]}[a.causal]
    return a


def _reexec_with_exact_malloc(argv: List[str]) -> None:
    """glibc keeps freed large blocks resident once its mmap threshold has adapted, so a second
    call's peak RSS would not show what it allocates. Re-run this module with a fixed threshold
    (every block >= 64 KiB is its own mapping, returned on free) before measuring anything."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    os.execve(sys.executable, [sys.executable, "-m", "bench.cpu", *argv], env)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    _reexec_with_exact_malloc(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET is set; backend='cpu' is used explicitly, so it does not matter here")
    meta = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, torch=torch.__version__,
                threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), load_start=os.getloadavg()[0], python=sys.version.split()[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for S in args.seqlens:
        for causal in args.causals:
            for mode in args.modes:
                for pe in args.pes:
                    r = measure(pe, S, causal, mode, args)
                    rows.append(r)
                    print(f"{pe:>10} S={S:>5} causal={causal!s:5} {mode:7}: posattn {_ms(r['posattn_s'])} ms "
                          f"/ SDPA {_ms(r['sdpa_s'])} ms, mem {_mib(r['posattn_mem'])} / {_mib(r['sdpa_mem'])} MiB "
                          f"load {r['load_before']:.1f} {r['note']}", flush=True)
                    (out / "cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
                    (out / "cpu.md").write_text(markdown(rows, meta))
    if not args.no_plot:
        plot(rows, out / "cpu.png")
    print(f"wrote {out}/cpu.md, cpu.json" + ("" if args.no_plot else ", cpu.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
