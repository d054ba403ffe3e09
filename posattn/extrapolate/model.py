"""Model: a pre-norm byte-level decoder; every attention is ``posattn.attention(..., causal=True)``
with the ``pe=`` argument built by the PE's :data:`~.config.STUDY_PES` entry."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import posattn

from .config import Config, study_pe

PE_MODULE = "pe_module"   # attribute (and state-dict name part) of a layer's learnable PE module


class Attention(nn.Module):
    def __init__(self, cfg: Config, pe: str):
        super().__init__()
        self.pe, self.n_heads, self.cfg, self.backend = pe, cfg.n_heads, cfg, cfg.backend
        self.study_pe = study_pe(pe)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # built after the projections: its init may draw from the global RNG
        make = self.study_pe.module
        self.pe_module = make(cfg) if make is not None else None

    def pe_spec(self, rope_options: Optional[dict] = None) -> posattn.PE:
        """The ``pe=`` argument of this layer's attention call (``rope_options``: keyword
        arguments of the active RoPE method for ``posattn.RoPE``)."""
        return self.study_pe.spec(self.pe_module, self.cfg, rope_options or {})

    def forward(self, x: torch.Tensor, rope_options: Optional[dict] = None, last: Optional[int] = None) -> torch.Tensor:
        """x (B, S, C) -> (B, S, C); with ``last``, only the last ``last`` queries (B, last, C):
        posattn aligns the queries to the end of the keys, as a KV cache would."""
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, C // self.n_heads).unbind(2)  # (B, S, H, D)
        if last is not None:
            q = q[:, S - last:]
        y = posattn.attention(q, k, v, self.pe_spec(rope_options), causal=True, layout="bshd",
                              backend=self.backend)
        return self.proj(y.reshape(B, q.shape[1], C))


class Block(nn.Module):
    def __init__(self, cfg: Config, pe: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, pe)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x, rope_options: Optional[dict] = None, last: Optional[int] = None):
        x = (x if last is None else x[:, x.shape[1] - last:]) + self.attn(self.ln1(x), rope_options, last)
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """Decoder-only LM over 256 bytes + <DOC> + <KEY> + 32 values (+ 8 recall-key symbols with
    ``cfg.recall``: ``cfg.vocab`` tokens), tied embedding, pre-norm blocks.

    ``rope_options`` (keyword arguments for ``posattn.RoPE``, from a RoPE method) is applied at
    inference by RoPE models; ``rope_scaling`` reads and sets its ``scaling`` entry.
    """

    def __init__(self, cfg: Config, pe: str):
        super().__init__()
        study_pe(pe)          # ValueError for an unknown PE
        self.pe = pe
        self.emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, pe) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.rope_options: dict = {}
        # Own generator: the same weights for every PE (a PE module's init draws from the global RNG).
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, p in self.named_parameters():
            if PE_MODULE in name.split(".") or "ln" in name:
                continue
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                nn.init.zeros_(p)

    @property
    def rope_scaling(self) -> Optional[posattn.RoPEScaling]:
        return self.rope_options.get("scaling")

    @rope_scaling.setter
    def rope_scaling(self, scaling: Optional[posattn.RoPEScaling]) -> None:
        self.rope_options = {} if scaling is None else {"scaling": scaling}

    def forward(self, idx: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
        """idx (B, S) -> logits (B, S, V); ``last``: logits of the last ``last`` positions only
        (the final block then attends from those queries alone)."""
        x = self.emb(idx)
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rope_options, last if i == len(self.blocks) - 1 else None)
        return F.linear(self.ln_f(x), self.emb.weight)

    def pe_parameters(self) -> Dict[str, dict]:
        """Learned PE values per layer (the PE's ``params``; empty for PEs without a module)."""
        entry = study_pe(self.pe)
        return {f"layer{i}": entry.params(blk.attn.pe_module)
                for i, blk in enumerate(self.blocks) if blk.attn.pe_module is not None}


def build_model(cfg: Config, pe: str) -> ByteLM:
    torch.manual_seed(cfg.seed)         # same initial weights for every PE (PE params aside)
    return ByteLM(cfg, pe).to(cfg.device)
