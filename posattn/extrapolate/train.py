"""Training: AdamW, linear warmup then cosine to 10%, the same batches for every PE."""
from __future__ import annotations

import math
import time
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from .config import Config, label
from .data import Corpus, train_batch
from .model import ByteLM, build_model


def _autocast(cfg: Config):
    if cfg.amp_bf16:
        return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def lm_loss(model: ByteLM, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    with _autocast(cfg):
        logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train_model(cfg: Config, pe: str, corpus: Corpus, log: Callable[[str], None] = print) -> Tuple[ByteLM, dict]:
    model = build_model(cfg, pe)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step):  # linear warmup, cosine to 10%
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(cfg.seed + 1)   # same batches for every PE
    losses, t0, run = [], time.time(), 0.0
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = train_batch(corpus, cfg, gen).to(cfg.device)
        loss = lm_loss(model, x, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()          # KERPLEBias.spec() clamps r1/r2 at the next forward, as the paper's code
        li = loss.item()
        losses.append(li)
        run = li if step == 0 else 0.95 * run + 0.05 * li
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            el = time.time() - t0
            eta = el / (step + 1) * (cfg.steps - step - 1)
            log(f"  [{label(pe):>12}] step {step + 1:5d}/{cfg.steps}  loss {run:.3f} "
                f"({run / math.log(2):.2f} bits/byte)  {el:5.0f}s  eta {eta:4.0f}s")
    model.eval()
    return model, {"train_seconds": time.time() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                   "loss_curve": losses[:: max(1, cfg.steps // 100)]}
