"""Turn result rows into ratios, the target check, a markdown report, a JSON file and plots.

Pure Python + matplotlib (optional): runs on CPU on synthetic rows (tests/test_main_cmd.py).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .peers import IMPLS
from .plan import ALL_PES, PES, TRAINABLE_PES

# Targets (issue: H200, bf16, D = 128, S >= 4k).
TARGET_D = 128
TARGET_MIN_S = 4096
FWD_TFLOPS = 450.0
FWDBWD_TFLOPS = 300.0
BIAS_VS_FLEX = 1.5
ROPE_VS_UNFUSED = 1.1
ROPE_SAME_CLASS = "rope+sdpa-flash"  # posattn is a flash-style kernel: SDPA's FLASH backend
MEMORY_EXPONENT_MAX = 0.5  # at fixed B*S, an O(S)-per-sequence method has exponent ~0

_IMPL_ORDER = {i.name: n for n, i in enumerate(IMPLS)}
_PE_ORDER = {p: n for n, p in enumerate(ALL_PES)}


def _key(row) -> tuple:
    return (row["D"], row["causal"], row["mode"], row["S"], row["B"], row["H"], row["dtype"])


def _ok(row) -> bool:
    return row.get("status") == "ok" and row.get("ms")


def add_ratios(rows: List[dict]) -> None:
    """Add ``ratio_vs_sdpa`` (best SDPA-no-PE time / this time; > 1 = faster than the ceiling),
    ``ceiling_impl`` and ``posattn_speedup`` (this time / posattn's, same PE and shape)."""
    best: Dict[tuple, dict] = {}
    posattn: Dict[tuple, dict] = {}
    for r in rows:
        if not _ok(r):
            continue
        if r["role"] == "ceiling" and (_key(r) not in best or r["ms"] < best[_key(r)]["ms"]):
            best[_key(r)] = r
        if r["impl"] == "posattn":
            posattn[_key(r) + (r["pe"],)] = r
    for r in rows:
        c = best.get(_key(r))
        p = posattn.get(_key(r) + (r["pe"],))
        r["ceiling_impl"] = c["impl"] if c else None
        r["ratio_vs_sdpa"] = c["ms"] / r["ms"] if (c and _ok(r)) else None
        r["posattn_speedup"] = r["ms"] / p["ms"] if (p and _ok(r)) else None


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def _rng(values: List[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if math.isclose(lo, hi) else f"{fmt.format(lo)} – {fmt.format(hi)}"


def _target(name, pe, causal, mode, values, threshold, fmt, unit, detail="", informational=False):
    if not values:
        return dict(target=name, pe=pe, causal=causal, mode=mode, measured="no data", worst=None,
                    threshold=threshold, met=None, detail=detail or "not measured in this run")
    worst = min(values)
    return dict(target=name, pe=pe, causal=causal, mode=mode,
                measured=_rng(values, fmt) + unit, worst=worst, threshold=threshold,
                met=None if informational else bool(worst >= threshold), detail=detail)


def _target_rows(rows, D):
    return [r for r in rows if _ok(r) and r["D"] == D and r["S"] >= TARGET_MIN_S]


def _pair_ratios(rows, pe, causal, mode, peer: str) -> List[tuple]:
    """[(S, peer_ms / posattn_ms)] over the shapes where both ran."""
    by_s = defaultdict(dict)
    for r in rows:
        if r["pe"] == pe and r["causal"] == causal and r["mode"] == mode:
            by_s[r["S"]][r["impl"]] = r["ms"]
    return [(s, d[peer] / d["posattn"]) for s, d in sorted(by_s.items()) if peer in d and "posattn" in d]


def _best_unfused_rope(rows, causal, mode) -> List[tuple]:
    by_s = defaultdict(dict)
    for r in rows:
        if r["pe"] == "rope" and r["causal"] == causal and r["mode"] == mode:
            by_s[r["S"]][r["impl"]] = r["ms"]
    out = []
    for s, d in sorted(by_s.items()):
        peers = [ms for name, ms in d.items() if name != "posattn"]
        if peers and "posattn" in d:
            out.append((s, min(peers) / d["posattn"]))
    return out


def memory_exponent(rows, impl: str, pe: str, D: int, causal: bool, mode: str) -> Optional[dict]:
    """Peak extra memory at the smallest and largest S, and e in mem ∝ S^e (fixed B·S)."""
    pts = sorted((r["S"], r["peak_mib"]) for r in rows
                 if r["impl"] == impl and r["pe"] == pe and r["D"] == D and r["causal"] == causal
                 and r["mode"] == mode and r.get("status") == "ok" and r.get("peak_mib"))
    if len(pts) < 2 or pts[0][0] == pts[-1][0]:
        return None
    (s0, m0), (s1, m1) = pts[0], pts[-1]
    e = math.log(max(m1, 1e-3) / max(m0, 1e-3)) / math.log(s1 / s0)
    return dict(S0=s0, S1=s1, mib0=m0, mib1=m1, exponent=e)


def check_targets(rows: List[dict], D: int = TARGET_D) -> List[dict]:
    """Each target, measured on this run's rows (D, S >= 4096), worst case first-class."""
    sel = _target_rows(rows, D)
    out = []
    causals = sorted({r["causal"] for r in rows})
    for mode, thr, label in (("fwd", FWD_TFLOPS, "posattn forward TFLOP/s"),
                             ("fwd+bwd", FWDBWD_TFLOPS, "posattn fwd+bwd TFLOP/s")):
        for pe in PES:
            for c in causals:
                vals = [r["tflops"] for r in sel if r["impl"] == "posattn" and r["pe"] == pe
                        and r["causal"] == c and r["mode"] == mode]
                out.append(_target(label, pe, c, mode, vals, thr, "{:.0f}", ""))
    modes = sorted({r["mode"] for r in rows})
    for pe in ("alibi", "kerple"):
        for c in causals:
            for mode in modes:
                pairs = _pair_ratios(sel, pe, c, mode, "flex")
                out.append(_target("bias PE: flex time / posattn time", pe, c, mode,
                                   [v for _, v in pairs], BIAS_VS_FLEX, "{:.2f}", "×",
                                   detail=", ".join(f"S={s}: {v:.2f}×" for s, v in pairs)))
    for pe in TRAINABLE_PES:  # no target of the issue: the cost of learnable biases, reported
        for c in causals:
            if not any(r["pe"] == pe and r["causal"] == c for r in rows):
                continue
            for peer in ("flex", "mask+sdpa-efficient"):
                pairs = _pair_ratios(sel, pe, c, "fwd+bwd", peer)
                out.append(_target(f"learnable bias: {peer} time / posattn time (info)", pe, c,
                                   "fwd+bwd", [v for _, v in pairs], BIAS_VS_FLEX, "{:.2f}", "×",
                                   detail=", ".join(f"S={s}: {v:.2f}×" for s, v in pairs),
                                   informational=True))
    for c in causals:
        for mode in modes:
            pairs = _pair_ratios(sel, "rope", c, mode, ROPE_SAME_CLASS)
            out.append(_target(f"RoPE: ({ROPE_SAME_CLASS}) time / posattn time", "rope", c, mode,
                               [v for _, v in pairs], ROPE_VS_UNFUSED, "{:.2f}", "×",
                               detail=", ".join(f"S={s}: {v:.2f}×" for s, v in pairs)))
            pairs = _best_unfused_rope(sel, c, mode)
            out.append(_target("RoPE: best unfused (any backend) / posattn (info)", "rope", c, mode,
                               [v for _, v in pairs], ROPE_VS_UNFUSED, "{:.2f}", "×",
                               detail=", ".join(f"S={s}: {v:.2f}×" for s, v in pairs),
                               informational=True))
    out.extend(_memory_targets(rows, D))
    return out


def _memory_targets(rows, D) -> List[dict]:
    out = []
    mem_mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in rows) else "fwd"
    causal = False if any(not r["causal"] for r in rows) else True
    for pe in PES:
        m = memory_exponent(rows, "posattn", pe, D, causal, mem_mode)
        peers = []
        for impl in ("mask+sdpa-efficient", "mask+sdpa-cudnn"):
            pm = memory_exponent(rows, impl, pe, D, causal, mem_mode)
            if pm:
                peers.append(f"{impl}: {pm['mib0']:.0f} → {pm['mib1']:.0f} MiB, e={pm['exponent']:.2f}")
        if m is None:
            out.append(dict(target="memory: peak ∝ S^e at fixed B·S (posattn)", pe=pe, causal=causal,
                            mode=mem_mode, measured="no data", worst=None, threshold=MEMORY_EXPONENT_MAX,
                            met=None, detail="needs two sequence lengths"))
            continue
        detail = (f"posattn {m['mib0']:.0f} → {m['mib1']:.0f} MiB (S {m['S0']} → {m['S1']})"
                  + ("; " + "; ".join(peers) if peers else ""))
        out.append(dict(target="memory: peak ∝ S^e at fixed B·S (posattn)", pe=pe, causal=causal,
                        mode=mem_mode, measured=f"e={m['exponent']:.2f}", worst=m["exponent"],
                        threshold=MEMORY_EXPONENT_MAX, met=bool(m["exponent"] <= MEMORY_EXPONENT_MAX),
                        detail=detail))
    return out


def targets_summary(targets: List[dict]) -> str:
    judged = [t for t in targets if t["met"] is not None]
    met = sum(t["met"] for t in judged)
    nodata = sum(t["measured"] == "no data" for t in targets)
    return f"{met} of {len(judged)} target checks met ({nodata} without data)"


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _fmt(v, spec="{:.2f}", empty="—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return empty
    return spec.format(v)


def _table(header: List[str], body: Iterable[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return lines


def targets_markdown(targets: List[dict]) -> List[str]:
    met_word = {True: "**yes**", False: "**NO**", None: "—"}
    body = []
    for t in targets:
        cmp = "≤" if t["target"].startswith("memory") else "≥"
        body.append([t["target"], t["pe"], "causal" if t["causal"] else "full", t["mode"],
                     t["measured"], f"{cmp} {t['threshold']}", met_word[t["met"]], t.get("detail", "")])
    return _table(["target", "PE", "mask", "mode", "measured (min – max over S)", "threshold",
                   "met", "detail"], body)


def results_markdown(rows: List[dict]) -> List[str]:
    lines = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["D"], r["causal"], r["mode"], r["dtype"])].append(r)
    for (D, causal, mode, dtype) in sorted(groups, key=lambda g: (-g[0], g[1], g[2])):
        g = sorted(groups[(D, causal, mode, dtype)],
                   key=lambda r: (_PE_ORDER.get(r["pe"], 99), r["S"], _IMPL_ORDER.get(r["impl"], 99)))
        lines += ["", f"### D={D}, {'causal' if causal else 'non-causal'}, {mode}, {dtype}", ""]
        body = []
        for r in g:
            status = "ok" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            body.append([r["pe"], r["impl"], r["S"], r["B"], _fmt(r["ms"], "{:.3f}"),
                         _fmt(r["tflops"], "{:.0f}"), _fmt(r.get("ratio_vs_sdpa")),
                         _fmt(r.get("posattn_speedup")), _fmt(r["peak_mib"], "{:.0f}"),
                         _fmt(r.get("max_abs_diff"), "{:.1e}"), status])
        lines += _table(["PE", "implementation", "S", "B", "ms", "TFLOP/s", "× SDPA no-PE",
                         "posattn speed-up", "peak MiB", "max abs diff vs posattn", "status"], body)
    return lines


def markdown(env: dict, config: dict, rows: List[dict], targets: List[dict]) -> str:
    lines = ["# posattn benchmark", ""]
    lines.append(f"{env.get('gpu', '?')} (driver {env.get('driver', '?')}), torch {env.get('torch')}, "
                 f"triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
                 f"posattn {env.get('posattn')} ({env.get('git_commit')}), {env.get('date')}.")
    if env.get("tiles", "shipped") != "shipped":
        lines += ["", f"Tiles: the shipped configs except {env['tiles']}."]
    if "tma" in env:
        lines += ["", f"TMA key tiles in the forward: {env['tma']}."]
    lines.append("")
    lines.append(f"H={config.get('heads')} heads, B·S={config.get('tokens')} tokens, {config.get('dtype')}; "
                 "FLOPs = 4·B·H·S²·D (×0.5 causal, ×3.5 fwd+bwd); time = median of "
                 "`triton.testing.do_bench`; peak MiB = device memory beyond q, k, v, dout during one "
                 "call (a materialised mask counts); '× SDPA no-PE' = fastest SDPA backend without PE / "
                 "this time; 'posattn speed-up' = this time / posattn's time (same PE); masks, "
                 "cos/sin tables and block masks are built once outside the timed region.")
    used = {r["impl"] for r in rows}
    lines += [""] + [f"- `{i.name}` ({i.role}): {i.doc}" for i in IMPLS if i.name in used]
    lines += ["", f"## Targets (D={TARGET_D}, S ≥ {TARGET_MIN_S}) — {targets_summary(targets)}", ""]
    lines += targets_markdown(targets)
    lines += ["", "## Results"]
    lines += results_markdown(rows)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, env: dict, config: dict, rows: List[dict], targets: List[dict]) -> None:
    data = {"env": env, "config": config, "targets": targets,
            "results": [{k: _clean(v) for k, v in r.items() if k != "out"} for r in rows]}
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _line_style(impl: str) -> dict:
    """posattn thick red; every other implementation its own colour in every panel."""
    if impl == "posattn":
        return dict(lw=2.5, color="C3", ls="-", zorder=5)
    n = _IMPL_ORDER.get(impl, 0)
    colors = [f"C{i}" for i in range(10) if i != 3]
    return dict(lw=1.2, color=colors[n % len(colors)], ls="-" if n < len(colors) else ":")


def plot(rows: List[dict], path_for_d, title: str = "") -> List[Path]:
    """One PNG per head dim: TFLOP/s vs S, a panel per (mask, mode) × PE, a line per
    implementation; the best SDPA-no-PE time at each S is the dashed black 'ceiling'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in rows if _ok(r) and r.get("tflops")]
    for D in sorted({r["D"] for r in ok}):
        rd = [r for r in ok if r["D"] == D]
        combos = sorted({(r["causal"], r["mode"]) for r in rd}, key=lambda c: (c[1], c[0]))
        pes = [p for p in ALL_PES if any(r["pe"] == p for r in rd)]
        fig, axes = plt.subplots(len(combos), len(pes), figsize=(4.2 * len(pes), 3.2 * len(combos)),
                                 squeeze=False, sharex=True)
        for i, (causal, mode) in enumerate(combos):
            rc = [r for r in rd if r["causal"] == causal and r["mode"] == mode]
            ceiling = defaultdict(float)
            for r in rc:
                if r["role"] == "ceiling":
                    ceiling[r["S"]] = max(ceiling[r["S"]], r["tflops"])
            for j, pe in enumerate(pes):
                ax = axes[i][j]
                if ceiling:
                    xs = sorted(ceiling)
                    ax.plot(xs, [ceiling[s] for s in xs], "k--", lw=1, label="SDPA no-PE (best)")
                for impl in sorted({r["impl"] for r in rc if r["pe"] == pe}, key=_IMPL_ORDER.get):
                    pts = sorted((r["S"], r["tflops"]) for r in rc if r["pe"] == pe and r["impl"] == impl)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=impl,
                            **_line_style(impl))
                ax.set_xscale("log", base=2)
                seqs = sorted({r["S"] for r in rd})
                ax.set_xticks(seqs, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqs])
                ax.set_title(f"{pe} · {'causal' if causal else 'full'} · {mode}", fontsize=9)
                ax.grid(alpha=0.3)
                ax.set_ylim(bottom=0)
                ax.legend(fontsize=6)
                if j == 0:
                    ax.set_ylabel("TFLOP/s")
                if i == len(combos) - 1:
                    ax.set_xlabel("sequence length S")
        fig.suptitle(f"{title} D={D}".strip(), fontsize=11)
        fig.tight_layout()
        path = Path(path_for_d(D))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
