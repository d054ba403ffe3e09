"""Reports: the markdown tables (perplexity, passkey, recall), the plot, the environment record and the output files. Row
labels and line styles come from the registries (:func:`~.config.label`)."""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Callable

import torch

from .config import N_VALUES, Config, is_method_run, label


def _fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 100 else (f"{x:.0f}" if x < 1e5 else f"{x:.1e}")


def markdown_tables(results: dict) -> str:
    cfg = results["config"]
    lens = [cfg["train_len"] * m for m in cfg["eval_mults"]]
    head = "| PE | " + " | ".join(f"{n} ({n // cfg['train_len']}L)" for n in lens) + " |\n"
    head += "|---|" + "---:|" * len(lens) + "\n"
    rows = list(results["runs"].items())

    def table(title, cell):
        s = f"**{title}**\n\n" + head
        for key, run in rows:
            s += f"| {label(key)} | " + " | ".join(cell(run["eval"][str(n)], n) for n in lens) + " |\n"
        return s + "\n"

    L = cfg["train_len"]
    out = (f"Byte-level LMs on Python stdlib source, trained at L = {L} "
           f"({cfg['n_layers']} layers, width {cfg['d_model']}, {cfg['n_heads']} heads, {cfg['steps']} steps "
           f"of {cfg['batch_size']}x{L} tokens). Held-out files; every length scores the same "
           f"{results['eval_tokens']} tokens.\n\n")
    out += table("Held-out perplexity (bytes), whole window", lambda r, n: _fmt_ppl(r["ppl"]))
    out += table(f"Held-out perplexity of the tokens past position L = {L} (beyond the training length)",
                 lambda r, n: _fmt_ppl(r["ppl_past_L"]) if "ppl_past_L" in r else "—")
    out += table(f"Passkey retrieval accuracy (chance 1/{N_VALUES}; {cfg['passkey_eval']} windows per length, "
                 f"key at distances spread evenly over the window)", lambda r, n: f"{r['passkey']['acc']:.2f}")
    out += table("Passkey accuracy, key in the far half of the window (distance >= n/2)",
                 lambda r, n: f"{r['passkey']['acc_far_half']:.2f}")
    if _has_recall(results):
        m, k = cfg["recall_pairs"], cfg["recall_key_len"]
        out += table(f"Multi-token-key recall accuracy ({m} pairs with {k}-symbol keys, every distractor "
                     f"shares all but one symbol with the queried key; chance 1/{m} copying a value of the "
                     f"window, at most 1/2 matching one symbol; {cfg['recall_eval']} windows per length, the queried pair at distances "
                     f"spread evenly over the window)",
                     lambda r, n: f"{r['recall']['acc']:.2f}" if "recall" in r else "—")
        out += table("Recall accuracy, queried pair in the far half of the window (distance >= n/2)",
                     lambda r, n: f"{r['recall']['acc_far_half']:.2f}" if "recall" in r else "—")
    return out


def _has_recall(results: dict) -> bool:
    return any("recall" in e for run in results["runs"].values() for e in run["eval"].values())


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    L = cfg["train_len"]
    lens = [L * m for m in cfg["eval_mults"]]
    recall = _has_recall(results)
    fig, axes = plt.subplots(1, 3 if recall else 2, figsize=(18 if recall else 12, 5.2))
    keys = list(results["runs"])
    markers = "osD^v<>Xp*hPd8H"
    colors = plt.get_cmap("tab20")  # 20 distinct colours: the default cycle repeats after 10
    for i, key in enumerate(keys):
        run = results["runs"][key]
        style = dict(ls="--" if is_method_run(key) else "-", marker=markers[i % len(markers)],
                     color=colors(i % 20), label=label(key), ms=5)
        ppl = [run["eval"][str(n)]["ppl"] for n in lens]
        acc = [run["eval"][str(n)]["passkey"]["acc"] for n in lens]
        axes[0].plot(lens, ppl, **style)
        # accuracies often coincide (all 1.0): dodge each series a little along x so all show
        dodge = 2 ** (0.035 * (i - (len(keys) - 1) / 2))
        axes[1].plot([n * dodge for n in lens], acc, **style)
        if recall:
            rec = [run["eval"][str(n)].get("recall", {}).get("acc", float("nan")) for n in lens]
            axes[2].plot([n * dodge for n in lens], rec, **style)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, [f"{n}\n({n // L}L)" for n in lens])
        ax.minorticks_off()
        ax.axvline(L, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("evaluation length (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("held-out byte perplexity (log scale)")
    axes[0].set_title(f"Perplexity vs length (trained at L = {L})")
    axes[1].set_ylabel("passkey accuracy")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].axhline(1 / N_VALUES, color="gray", lw=0.8, ls=":")
    axes[1].set_title("Passkey retrieval (series dodged in x to show overlaps)")
    if recall:
        axes[2].set_ylabel("multi-token-key recall accuracy")
        axes[2].set_ylim(-0.02, 1.02)
        axes[2].axhline(1 / cfg["recall_pairs"], color="gray", lw=0.8, ls=":")
        axes[2].set_title(f"Recall, {cfg['recall_key_len']}-symbol keys (chance 1/{cfg['recall_pairs']})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=(len(keys) + 1) // 2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(cfg: Config) -> dict:
    """What the figures were computed on (recorded in results.json)."""
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "device": (torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu")}


def write_outputs(results: dict, out_dir: str, log: Callable[[str], None] = print) -> None:
    """results.json, results.md and ppl_vs_length.png in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(markdown_tables(results))
    plot(results, os.path.join(out_dir, "ppl_vs_length.png"))
    log(f"wrote {out_dir}/results.md, results.json, ppl_vs_length.png")
