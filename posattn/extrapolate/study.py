"""The driver: train every PE model of ``cfg.pes``, evaluate it (and, for RoPE models, every RoPE
method of ``cfg.rope_scalings``), write the reports; and the command line (``main``)."""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Callable, Optional, Sequence

import torch

from .config import STUDY_PES, Config, label, rope_scaling_rules, study_pe
from .data import eval_segments, load_corpus
from .evaluate import evaluate
from .report import environment, markdown_tables, write_outputs
from .train import train_model


def run_study(cfg: Config, out_dir: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    t_start = time.time()
    if cfg.device.startswith("cuda") and cfg.backend == "triton":
        log("attention: posattn.attention(backend='triton') -- fused Triton kernels")
    else:
        log(f"attention: posattn.attention(backend={cfg.backend!r}) on {cfg.device}")
    corpus = load_corpus(cfg.corpus_max_bytes)
    log(f"corpus: {corpus.info['train_files']} train files ({corpus.info['train_tokens']:,} tokens), "
        f"{corpus.info['heldout_files']} held-out files ({corpus.info['heldout_tokens']:,} tokens)")
    segments = eval_segments(corpus, cfg)
    runs = {}
    for pe in cfg.pes:
        log(f"training {label(pe)} at L = {cfg.train_len} ...")
        model, tr = train_model(cfg, pe, corpus, log)
        runs[pe] = {"train": tr, "pe_params": model.pe_parameters(),
                    "eval": {str(k): v for k, v in evaluate(model, corpus, segments, cfg, None, log, label(pe)).items()}}
        if study_pe(pe).rope_methods:
            for sc in cfg.rope_scalings:
                key = f"{pe}+{sc}"
                runs[key] = {"eval": {str(k): v for k, v in
                                      evaluate(model, corpus, segments, cfg, sc, log, label(key)).items()}}
        del model
    results = {
        "config": dataclasses.asdict(cfg),
        "eval_lens": cfg.eval_lens,
        "eval_tokens": int(segments.shape[0] * (segments.shape[1] - 1)),
        "rope_scaling_rule": rope_scaling_rules(cfg),
        "corpus": corpus.info,
        "environment": environment(cfg),
        "runs": runs,
        "wall_seconds": time.time() - t_start,
    }
    if out_dir:
        write_outputs(results, out_dir, log)
    log(markdown_tables(results))
    log(f"total {time.time() - t_start:.0f}s")
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from . import __doc__ as package_doc

    ap = argparse.ArgumentParser(prog="python -m posattn.extrapolate", description=package_doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="GPU configuration (L=2048, eval to 32k, Triton)")
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    ap.add_argument("--out", default=None, help="output folder (default results/extrapolate_{cpu,gpu})")
    ap.add_argument("--steps", type=int, help="training steps per model")
    ap.add_argument("--train-len", type=int, help="training length L")
    ap.add_argument("--pes", help=f"comma-separated subset of {','.join(STUDY_PES)}")
    ap.add_argument("--recall", action="store_true",
                    help="also train and evaluate the multi-token-key recall probe (off by default: it did not "
                         "train within the CPU budget, see docs/extrapolate.md)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device")
    ap.add_argument("--backend", choices=("auto", "triton", "cpu", "reference"))
    a = ap.parse_args(argv)
    cfg = Config.large() if a.large else (Config.tiny() if a.tiny else Config())
    for k, v in (("steps", a.steps), ("train_len", a.train_len), ("seed", a.seed), ("device", a.device),
                 ("backend", a.backend)):
        if v is not None:
            setattr(cfg, k, v)
    if a.recall:
        cfg.recall = True
    if a.pes:
        cfg.pes = tuple(p.strip() for p in a.pes.split(","))
        bad = [p for p in cfg.pes if p not in STUDY_PES]
        if bad:
            ap.error(f"unknown PE(s) {bad}; choose from {tuple(STUDY_PES)}")
    if cfg.device.startswith("cuda") and a.backend is None and cfg.backend == "cpu":
        cfg.backend = "auto"  # --device cuda without --large: the CPU default does not apply
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--large needs a CUDA GPU (use --device cpu --backend auto to try it on CPU)")
    out = a.out or (None if a.tiny else f"results/extrapolate_{cfg.name}")
    return run_study(cfg, out)
