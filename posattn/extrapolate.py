"""Length-extrapolation study: small byte-level LMs that differ only in their PE.

    python -m posattn.extrapolate                 # CPU default: 5 models, ~5 min on 2 cores
    python -m posattn.extrapolate --large         # GPU: L = 2048, eval to 32k, Triton kernels
    python -m posattn.extrapolate --tiny          # seconds: smoke test of the whole pipeline

Five decoder-only transformers, identical except for the positional encoding (NoPE, RoPE, ALiBi,
KERPLE-log, KERPLE-power; the KERPLE r1/r2 are trained through posattn's gradients), are trained
at one length L with the same seed, the same initial weights and the same batches, then evaluated
at L, 2L, 4L, 8L and 16L. RoPE is also evaluated with inference-time scalings (no retraining):

* PI, NTK, YaRN: ``factor = eval_len / L`` (YaRN with ``original_max_position = L``), one forward
  per window, as a perplexity evaluation in transformers does.
* DynamicNTK(factor=1, original_max_position=L). transformers' rule ``base * (factor * cur_len
  / L - (factor - 1)) ** (d / (d - 2))`` with factor = 1 stretches the frequencies exactly to the
  length seen so far (``cur_len / L``), and not at all up to L. One forward over a whole window
  would make it identical to static NTK(eval_len / L), so perplexity is scored as generation
  sees it, in growing prefixes: the tokens of ``(c/2, c]`` are predicted by a forward over the
  first ``c`` tokens (no KV cache), ``c = L, 2L, 4L, ..., eval_len``; each token thus sees the
  dynamic frequencies for a cur_len between its own context length and twice it, and the first
  L tokens see the unscaled model. (Chunks of L instead of doubling cost S/L forwards per window;
  too slow for the CPU budget.) The passkey query is the window's last token, so there
  cur_len = eval_len and dynamic NTK equals NTK(eval_len / L) by construction.

Data (nothing downloaded): the Python standard library's own ``.py`` files, as bytes, split *by
file* into train and held-out (crc32 of the relative path, 1 in 10 held out), concatenated with a
document token between files. Metrics:

* held-out byte perplexity, over the same tokens at every eval length (fixed segments of 16L+1
  tokens cut into non-overlapping windows of the eval length), plus the perplexity of only the
  tokens past position L;
* passkey retrieval: ``<KEY><V>`` (``<V>`` one of 32 value tokens that occur nowhere else) hidden
  in held-out text at a controlled distance; the window ends with ``<KEY>`` and the model must
  produce ``<V>`` (accuracy; chance 1/32). Every training window carries three copies of one
  passkey block at random places, the last at its end (two retrieval examples at distances < L;
  the inserts replace 6 of 65 bytes, the rest is text). One value token makes it a one-hop
  lookup that a 2-layer model learns within the CPU budget; a multi-token passkey
  (``passkey_len``) needs an induction circuit (previous-token head + copy), which 400-600 CPU
  steps did not form in our trials.

Outputs in ``--out`` (default ``results/extrapolate_cpu``, ``results/extrapolate_gpu`` with
``--large``): ``results.md`` (tables), ``results.json`` (every figure, the configuration, the
corpus hash and the environment) and ``ppl_vs_length.png``.

Every attention call goes through :func:`posattn.attention` with ``causal=True`` (CPU: backend
"cpu", blockwise on torch's CPU kernels, O(S) memory; ``--large``: backend "triton", so no silent
fallback).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import posattn

# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

PE_NAMES = ("nope", "rope", "alibi", "kerple_log", "kerple_power")
ROPE_SCALINGS = ("pi", "ntk", "dynamic_ntk", "yarn")
LABELS = {
    "nope": "NoPE", "rope": "RoPE", "alibi": "ALiBi", "kerple_log": "KERPLE-log",
    "kerple_power": "KERPLE-power", "rope+pi": "RoPE + PI", "rope+ntk": "RoPE + NTK",
    "rope+dynamic_ntk": "RoPE + dynamic NTK", "rope+yarn": "RoPE + YaRN",
}

DOC = 256   # document separator (between source files)
KEY = 257   # passkey marker
VALUE0 = 258  # first passkey value token
N_VALUES = 32
VOCAB = VALUE0 + N_VALUES


@dataclass
class Config:
    # model
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    rope_base: float = 10000.0
    # training
    train_len: int = 64
    batch_size: int = 32
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    passkey_frac: float = 1.0
    passkey_len: int = 1             # value tokens per passkey
    passkey_copies: int = 3          # blocks per training window (the last one at the end)
    # evaluation
    eval_mults: Tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_segments: int = 12          # segments of max_eval_len + 1 held-out tokens, same at every length
    passkey_eval: int = 48           # passkey windows per eval length
    eval_elems: int = 1 << 23        # B * H * S * S per eval forward (the reference materialises S x S)
    eval_batch_tokens: int = 1 << 19 # B * S per eval forward
    # what to run
    pes: Tuple[str, ...] = PE_NAMES
    rope_scalings: Tuple[str, ...] = ROPE_SCALINGS
    dynamic_factor: float = 1.0
    # machinery
    seed: int = 0
    device: str = "cpu"
    backend: str = "cpu"             # posattn.attention backend (CPU: exact, O(S) memory)
    amp_bf16: bool = False           # autocast to bf16 (GPU)
    corpus_max_bytes: int = 0        # 0 = the whole corpus
    log_every: int = 50
    name: str = "cpu"

    @property
    def eval_lens(self) -> List[int]:
        return [self.train_len * m for m in self.eval_mults]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @staticmethod
    def large() -> "Config":
        """GPU configuration: L = 2048, eval to 16L = 32k tokens, Triton kernels, bf16."""
        return Config(n_layers=4, d_model=384, n_heads=6, d_ff=1536, train_len=2048, batch_size=16,
                      steps=3000, lr=1.5e-3, warmup=200, eval_segments=8, passkey_eval=48,
                      eval_elems=1 << 40, device="cuda", backend="triton", amp_bf16=True,
                      log_every=100, name="gpu")

    @staticmethod
    def tiny() -> "Config":
        """Seconds: for tests and smoke runs."""
        return Config(n_layers=1, d_model=32, n_heads=2, d_ff=64, train_len=16, batch_size=4, steps=3,
                      warmup=1, eval_mults=(1, 2), eval_segments=2, passkey_eval=4,
                      corpus_max_bytes=200_000, log_every=1, name="tiny")


# ------------------------------------------------------------------------------------------------
# Data: the Python standard library as bytes, split by file
# ------------------------------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "encodings", "pydoc_data", "__pycache__"}


def corpus_files(root: Optional[str] = None) -> List[Tuple[str, str]]:
    """``(relative path, absolute path)`` of the stdlib's ``.py`` files, sorted.

    Skips installed packages, the generated codec tables (``encodings``), ``pydoc_data`` and the
    build-specific ``_sysconfigdata*``.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                full = os.path.join(dirpath, f)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    out.sort()
    return out


def is_heldout(relpath: str) -> bool:
    return zlib.crc32(relpath.encode()) % 10 == 0


@dataclass
class Corpus:
    train: torch.Tensor      # int16 token stream (bytes + DOC between files)
    heldout: torch.Tensor
    info: dict


def load_corpus(max_bytes: int = 0, root: Optional[str] = None) -> Corpus:
    """Both streams as int16 tensors. ``max_bytes`` > 0 caps each split (first files in order)."""
    streams = {"train": [], "heldout": []}
    sizes = {"train": 0, "heldout": 0}
    nfiles = {"train": 0, "heldout": 0}
    digest = hashlib.sha256()
    for rel, full in corpus_files(root):
        split = "heldout" if is_heldout(rel) else "train"
        if max_bytes and sizes[split] >= max_bytes:
            continue
        with open(full, "rb") as fh:
            data = fh.read()
        if not data:
            continue
        digest.update(rel.encode() + b"\0" + data)
        streams[split].append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16))
        streams[split].append(torch.tensor([DOC], dtype=torch.int16))
        sizes[split] += len(data) + 1
        nfiles[split] += 1
    if not streams["train"] or not streams["heldout"]:
        raise RuntimeError(f"no Python source files found under {root or sysconfig.get_paths()['stdlib']}")
    train, heldout = (torch.cat(streams[s]) for s in ("train", "heldout"))
    info = {"source": "Python standard library .py files (bytes), split by file: crc32(path) % 10 == 0 held out",
            "python": platform.python_version(), "train_files": nfiles["train"],
            "heldout_files": nfiles["heldout"], "train_tokens": int(train.numel()),
            "heldout_tokens": int(heldout.numel()), "sha256": digest.hexdigest()}
    return Corpus(train, heldout, info)


def random_windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(n, length) int64 windows at random offsets."""
    starts = torch.randint(0, stream.numel() - length, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(length)
    return stream[idx].long()


def make_passkey(filler: torch.Tensor, key_pos: Sequence[Sequence[int]], gen: torch.Generator,
                 n_values: int) -> torch.Tensor:
    """Plant the block ``<KEY><V>..<V>`` at each of ``key_pos[i]`` in row i, and end the row with it.

    filler: (n, T) int64. The final block (the query: the model must produce the values after its
    ``<KEY>``) occupies the last ``n_values + 1`` tokens; the planted copies must not overlap it
    or each other. Returns a new (n, T) tensor.
    """
    x = filler.clone()
    n, T = x.shape
    code = torch.randint(VALUE0, VALUE0 + N_VALUES, (n, n_values), generator=gen)
    block = torch.cat([torch.full((n, 1), KEY, dtype=torch.long), code], dim=1)
    w = n_values + 1
    for i, row in enumerate(key_pos):
        for j, p in enumerate(sorted(row)):
            if not 0 <= p <= T - 2 * w or (j and p < sorted(row)[j - 1] + w):
                raise ValueError(f"passkey positions {list(row)} overlap or leave a window of {T} tokens")
            x[i, p:p + w] = block[i]
    x[:, T - w:] = block
    return x


def passkey_distance(key_pos: int, total: int, n_values: int) -> int:
    """Distance from the final ``<KEY>`` (the query) back to the planted ``<KEY>``."""
    return (total - n_values - 1) - key_pos


def _spaced_positions(count: int, avail: int, w: int, gen: torch.Generator) -> List[int]:
    """Sorted starts of ``count`` non-overlapping w-token blocks inside [0, avail), uniformly."""
    slots = avail - count * (w - 1)   # stars and bars: r_0 < r_1 < ..., p_j = r_j + j (w - 1)
    r = sorted(torch.randperm(slots, generator=gen)[:count].tolist())
    return [rj + j * (w - 1) for j, rj in enumerate(r)]


def train_batch(corpus: Corpus, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """(B, L + 1) int64 text windows; a ``passkey_frac`` share carries ``passkey_copies`` copies of
    a passkey block, the last at the end (every copy after the first is a retrieval example at a
    distance < L). The inserts replace a few bytes; the rest of the window is text."""
    x = random_windows(corpus.train, cfg.batch_size, cfg.train_len + 1, gen)
    npk = int(round(cfg.passkey_frac * cfg.batch_size))
    if npk:
        T, w = cfg.train_len + 1, cfg.passkey_len + 1
        pos = [_spaced_positions(cfg.passkey_copies - 1, T - w, w, gen) for _ in range(npk)]
        x[:npk] = make_passkey(x[:npk], pos, gen, cfg.passkey_len)
    return x


def eval_segments(corpus: Corpus, cfg: Config) -> torch.Tensor:
    """(n, 16L + 1) held-out segments at evenly spaced offsets; every eval length scores the same
    16L targets of each segment."""
    seg = max(cfg.eval_lens) + 1
    n = cfg.eval_segments
    room = corpus.heldout.numel() - seg
    if room < 0:
        raise RuntimeError(f"held-out stream ({corpus.heldout.numel()} tokens) is shorter than one eval segment ({seg})")
    starts = [room * i // max(n - 1, 1) for i in range(n)]
    return torch.stack([corpus.heldout[s:s + seg].long() for s in starts])


def passkey_eval_set(corpus: Corpus, cfg: Config, length: int) -> Tuple[torch.Tensor, List[int]]:
    """(n, length + 1) passkey windows on held-out text, key positions spread evenly over the
    window (distances from ~0 to ~length); deterministic in (seed, length)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + length)
    T = length + 1
    hi = T - 2 * (cfg.passkey_len + 1)
    n = cfg.passkey_eval
    pos = [round(hi * i / max(n - 1, 1)) for i in range(n)]
    filler = random_windows(corpus.heldout, n, T, gen)
    return make_passkey(filler, [[p] for p in pos], gen, cfg.passkey_len), pos


# ------------------------------------------------------------------------------------------------
# Model: pre-norm decoder; attention is posattn.attention(..., causal=True)
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: Config, pe: str):
        super().__init__()
        self.pe, self.n_heads, self.rope_base, self.backend = pe, cfg.n_heads, cfg.rope_base, cfg.backend
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kerple = None
        if pe.startswith("kerple"):
            # r1, r2 per head with the paper's init and clamping; trained through posattn's gradients
            self.kerple = posattn.nn.KERPLEBias(cfg.n_heads, kind=pe.split("_")[1])

    def pe_spec(self, rope_scaling=None) -> posattn.PE:
        if self.pe == "nope":
            return posattn.NoPE()
        if self.pe == "rope":
            return posattn.RoPE(base=self.rope_base, scaling=rope_scaling)
        if self.pe == "alibi":
            return posattn.ALiBi()          # the paper's fixed slopes
        return self.kerple.spec()

    def forward(self, x: torch.Tensor, rope_scaling=None, last: Optional[int] = None) -> torch.Tensor:
        """x (B, S, C) -> (B, S, C); with ``last``, only the last ``last`` queries (B, last, C):
        posattn aligns the queries to the end of the keys, as a KV cache would."""
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, C // self.n_heads).unbind(2)  # (B, S, H, D)
        if last is not None:
            q = q[:, S - last:]
        y = posattn.attention(q, k, v, self.pe_spec(rope_scaling), causal=True, layout="bshd",
                              backend=self.backend)
        return self.proj(y.reshape(B, q.shape[1], C))


class Block(nn.Module):
    def __init__(self, cfg: Config, pe: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, pe)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x, rope_scaling=None, last: Optional[int] = None):
        x = (x if last is None else x[:, x.shape[1] - last:]) + self.attn(self.ln1(x), rope_scaling, last)
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """Decoder-only LM over 256 bytes + <DOC> + <KEY> + 32 passkey values, tied embedding, pre-norm blocks.

    ``rope_scaling`` (a posattn RoPEScaling or None) is applied at inference by RoPE models.
    """

    def __init__(self, cfg: Config, pe: str):
        super().__init__()
        if pe not in PE_NAMES:
            raise ValueError(f"pe must be one of {PE_NAMES}, got {pe!r}")
        self.pe = pe
        self.emb = nn.Embedding(VOCAB, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, pe) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.rope_scaling = None
        # Own generator: the same weights for every PE (KERPLE's r1/r2 init draws from the global RNG).
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, p in self.named_parameters():
            if "kerple" in name or "ln" in name:
                continue
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
        """idx (B, S) -> logits (B, S, V); ``last``: logits of the last ``last`` positions only
        (the final block then attends from those queries alone)."""
        x = self.emb(idx)
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rope_scaling, last if i == len(self.blocks) - 1 else None)
        return F.linear(self.ln_f(x), self.emb.weight)

    def pe_parameters(self) -> Dict[str, List[List[float]]]:
        """Learned KERPLE r1/r2 per layer (empty for other PEs)."""
        out = {}
        for i, blk in enumerate(self.blocks):
            if blk.attn.kerple is not None:
                spec = blk.attn.kerple.spec()          # clamps first, as every forward does
                r1, r2 = (t.detach().float().cpu().tolist() for t in (spec.r1, spec.r2))
                out[f"layer{i}"] = {"r1": r1, "r2": r2}
        return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _autocast(cfg: Config):
    if cfg.amp_bf16:
        return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def lm_loss(model: ByteLM, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    with _autocast(cfg):
        logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def build_model(cfg: Config, pe: str) -> ByteLM:
    torch.manual_seed(cfg.seed)         # same initial weights for every PE (PE params aside)
    return ByteLM(cfg, pe).to(cfg.device)


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
            log(f"  [{LABELS[pe]:>12}] step {step + 1:5d}/{cfg.steps}  loss {run:.3f} "
                f"({run / math.log(2):.2f} bits/byte)  {el:5.0f}s  eta {eta:4.0f}s")
    model.eval()
    return model, {"train_seconds": time.time() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                   "loss_curve": losses[:: max(1, cfg.steps // 100)]}


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def rope_scaling_for(kind: Optional[str], eval_len: int, cfg: Config):
    """The inference-time RoPE scaling spec for ``eval_len`` (None for plain RoPE)."""
    L = cfg.train_len
    factor = eval_len / L
    if kind is None:
        return None
    if kind == "pi":
        return posattn.PI(factor) if factor > 1 else None
    if kind == "ntk":
        return posattn.NTK(factor) if factor > 1 else None
    if kind == "yarn":
        return posattn.YaRN(factor, original_max_position=L) if factor > 1 else None
    if kind == "dynamic_ntk":
        return posattn.DynamicNTK(cfg.dynamic_factor, original_max_position=L)
    raise ValueError(f"unknown RoPE scaling {kind!r}")


def _eval_batch(cfg: Config, length: int) -> int:
    return max(1, min(cfg.eval_elems // (cfg.n_heads * length * length), cfg.eval_batch_tokens // length))


@torch.no_grad()
def _logits(model: ByteLM, x: torch.Tensor, cfg: Config, chunked: bool) -> torch.Tensor:
    """(B, S, V) float32 logits.

    ``chunked`` (dynamic scalings): the tokens of (c/2, c] are predicted by a forward over the
    first c tokens, c = L, 2L, 4L, ..., S, so each prediction sees the frequencies for a cur_len
    between its own context and twice it (never more than the window); positions < L see the
    unscaled model. Costs about 2 forwards instead of S/L."""
    with _autocast(cfg):
        S = x.shape[1]
        if not chunked or S <= cfg.train_len:
            return model(x).float()
        parts, done, c = [], 0, cfg.train_len
        while done < S:
            c = min(c, S)
            parts.append(model(x[:, :c], last=c - done).float())
            done, c = c, 2 * c
        return torch.cat(parts, dim=1)


@torch.no_grad()
def eval_perplexity(model: ByteLM, segments: torch.Tensor, length: int, cfg: Config, chunked: bool = False) -> dict:
    """Byte perplexity on the segments cut into windows of ``length`` (every length scores the
    same targets). Also the perplexity of the targets past position L within each window."""
    n, T = segments.shape
    span = T - 1
    assert span % length == 0
    inp = segments[:, :-1].reshape(-1, length)
    tgt = segments[:, 1:].reshape(-1, length)
    nll = torch.empty(inp.shape, dtype=torch.float64)
    bs = _eval_batch(cfg, length)
    for i in range(0, inp.shape[0], bs):
        x = inp[i:i + bs].to(cfg.device)
        lg = _logits(model, x, cfg, chunked)
        nll[i:i + bs] = F.cross_entropy(lg.reshape(-1, VOCAB), tgt[i:i + bs].reshape(-1).to(cfg.device),
                                        reduction="none").view(x.shape).double().cpu()
    mean = nll.mean().item()
    out = {"ppl": math.exp(mean), "bits_per_byte": mean / math.log(2), "tokens": int(nll.numel())}
    if length > cfg.train_len:
        out["ppl_past_L"] = math.exp(nll[:, cfg.train_len:].mean().item())
    # NLL by position bucket [0, L), [L, 2L), [2L, 4L), ...: where in the window it breaks
    edges = [0, cfg.train_len]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    out["nll_by_position"] = {f"{a}-{b}": nll[:, a:b].mean().item() for a, b in zip(edges, edges[1:])}
    return out


@torch.no_grad()
def eval_passkey(model: ByteLM, corpus: Corpus, length: int, cfg: Config) -> dict:
    """Passkey accuracy on ``passkey_eval`` held-out windows of ``length`` tokens, the key at
    distances spread evenly from ~0 to ~length. The query is the window's last token, so a
    length-dependent scaling sees cur_len = length (one forward, final block on the last queries)."""
    x, pos = passkey_eval_set(corpus, cfg, length)
    nv = cfg.passkey_len
    inp, tgt = x[:, :-1], x[:, 1:]
    correct = torch.empty(x.shape[0], nv, dtype=torch.bool)
    bs = _eval_batch(cfg, length)
    for i in range(0, inp.shape[0], bs):
        xb = inp[i:i + bs].to(cfg.device)
        with _autocast(cfg):
            lg = model(xb, last=nv).float()
        correct[i:i + bs] = lg.argmax(-1).cpu() == tgt[i:i + bs, -nv:]
    dist = [passkey_distance(p, length + 1, nv) for p in pos]
    ok = correct.all(1)
    L, by, lo = cfg.train_len, {}, 0
    while lo < length:                    # distance buckets [0, L), [L, 2L), [2L, 4L), ...
        hi = max(L, 2 * lo)
        sel = [i for i, d in enumerate(dist) if lo <= d < hi]
        if sel:
            by[f"{lo}-{hi}"] = ok[sel].float().mean().item()
        lo = hi
    far = [i for i, d in enumerate(dist) if d >= length // 2]
    return {"acc": correct.float().mean().item(), "exact": ok.float().mean().item(),
            "acc_far_half": ok[far].float().mean().item(), "n": len(pos), "acc_by_distance": by,
            "items": [[d, bool(c)] for d, c in zip(dist, ok.tolist())]}


def evaluate(model: ByteLM, corpus: Corpus, segments: torch.Tensor, cfg: Config, scaling: Optional[str] = None,
             log: Callable[[str], None] = print, label: str = "") -> Dict[int, dict]:
    res = {}
    chunked = scaling == "dynamic_ntk"
    for length in cfg.eval_lens:
        t0 = time.time()
        model.rope_scaling = rope_scaling_for(scaling, length, cfg)
        try:
            r = eval_perplexity(model, segments, length, cfg, chunked)
            r["passkey"] = eval_passkey(model, corpus, length, cfg)
        finally:
            model.rope_scaling = None
        r["seconds"] = time.time() - t0
        res[length] = r
        log(f"  [{label:>18}] len {length:6d}: ppl {r['ppl']:7.3f}  passkey {r['passkey']['acc']:.2f} "
            f"({r['seconds']:.1f}s)")
    return res


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


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
            s += f"| {LABELS[key]} | " + " | ".join(cell(run["eval"][str(n)], n) for n in lens) + " |\n"
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
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    L = cfg["train_len"]
    lens = [L * m for m in cfg["eval_mults"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    keys = list(results["runs"])
    markers = "osD^v<>Xp*"
    for i, key in enumerate(keys):
        run = results["runs"][key]
        style = dict(ls="--" if key.startswith("rope+") else "-", marker=markers[i % len(markers)],
                     color=f"C{i % 10}", label=LABELS[key], ms=5)
        ppl = [run["eval"][str(n)]["ppl"] for n in lens]
        acc = [run["eval"][str(n)]["passkey"]["acc"] for n in lens]
        axes[0].plot(lens, ppl, **style)
        # accuracies often coincide (all 1.0): dodge each series a little along x so all show
        dodge = 2 ** (0.035 * (i - (len(keys) - 1) / 2))
        axes[1].plot([n * dodge for n in lens], acc, **style)
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
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=(len(keys) + 1) // 2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


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
        log(f"training {LABELS[pe]} at L = {cfg.train_len} ...")
        model, tr = train_model(cfg, pe, corpus, log)
        runs[pe] = {"train": tr, "pe_params": model.pe_parameters(),
                    "eval": {str(k): v for k, v in evaluate(model, corpus, segments, cfg, None, log, LABELS[pe]).items()}}
        if pe == "rope":
            for sc in cfg.rope_scalings:
                key = f"rope+{sc}"
                runs[key] = {"eval": {str(k): v for k, v in
                                      evaluate(model, corpus, segments, cfg, sc, log, LABELS[key]).items()}}
        del model
    results = {
        "config": dataclasses.asdict(cfg),
        "eval_lens": cfg.eval_lens,
        "eval_tokens": int(segments.shape[0] * (segments.shape[1] - 1)),
        "rope_scaling_rule": {
            "pi/ntk/yarn": "factor = eval_len / L (none at eval_len = L); YaRN original_max_position = L; "
                           "one forward per window",
            "dynamic_ntk": f"DynamicNTK(factor={cfg.dynamic_factor}, original_max_position=L); perplexity in "
                           f"growing prefixes: tokens in (c/2, c] predicted by a forward over the first c "
                           f"tokens (cur_len = c), c = L, 2L, 4L, ..., eval_len; passkey: one forward "
                           f"(cur_len = eval_len, the same as NTK(eval_len / L))",
        },
        "corpus": corpus.info,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "platform": platform.platform(), "threads": torch.get_num_threads(),
                        "device": (torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu")},
        "runs": runs,
        "wall_seconds": time.time() - t_start,
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as fh:
            json.dump(results, fh, indent=1)
        with open(os.path.join(out_dir, "results.md"), "w") as fh:
            fh.write(markdown_tables(results))
        plot(results, os.path.join(out_dir, "ppl_vs_length.png"))
        log(f"wrote {out_dir}/results.md, results.json, ppl_vs_length.png")
    log(markdown_tables(results))
    log(f"total {time.time() - t_start:.0f}s")
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m posattn.extrapolate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="GPU configuration (L=2048, eval to 32k, Triton)")
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    ap.add_argument("--out", default=None, help="output folder (default results/extrapolate_{cpu,gpu})")
    ap.add_argument("--steps", type=int, help="training steps per model")
    ap.add_argument("--train-len", type=int, help="training length L")
    ap.add_argument("--pes", help=f"comma-separated subset of {','.join(PE_NAMES)}")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device")
    ap.add_argument("--backend", choices=("auto", "triton", "cpu", "reference"))
    a = ap.parse_args(argv)
    cfg = Config.large() if a.large else (Config.tiny() if a.tiny else Config())
    for k, v in (("steps", a.steps), ("train_len", a.train_len), ("seed", a.seed), ("device", a.device),
                 ("backend", a.backend)):
        if v is not None:
            setattr(cfg, k, v)
    if a.pes:
        cfg.pes = tuple(p.strip() for p in a.pes.split(","))
        bad = [p for p in cfg.pes if p not in PE_NAMES]
        if bad:
            ap.error(f"unknown PE(s) {bad}; choose from {PE_NAMES}")
    if cfg.device.startswith("cuda") and a.backend is None and cfg.backend == "cpu":
        cfg.backend = "auto"  # --device cuda without --large: the CPU default does not apply
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--large needs a CUDA GPU (use --device cpu --backend auto to try it on CPU)")
    out = a.out or (None if a.tiny else f"results/extrapolate_{cfg.name}")
    return run_study(cfg, out)


if __name__ == "__main__":
    main()
