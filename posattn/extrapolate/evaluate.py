"""Evaluation: held-out perplexity, passkey retrieval and multi-token-key recall at every eval
length, with or without a RoPE method (:data:`~.config.ROPE_METHODS`)."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

import posattn

from .config import Config, rope_method
from .data import Corpus, passkey_distance, passkey_eval_set, recall_distance, recall_eval_set
from .model import ByteLM
from .train import _autocast


def rope_options_for(kind: Optional[str], eval_len: int, cfg: Config) -> dict:
    """Keyword arguments for ``posattn.RoPE`` under RoPE method ``kind`` at ``eval_len`` ({} for
    plain RoPE): the method's ``options``."""
    if kind is None:
        return {}
    return rope_method(kind).options(eval_len, cfg)


def rope_scaling_for(kind: Optional[str], eval_len: int, cfg: Config) -> Optional[posattn.RoPEScaling]:
    """The inference-time RoPE scaling spec for ``eval_len`` (None for plain RoPE)."""
    return rope_options_for(kind, eval_len, cfg).get("scaling")


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
        nll[i:i + bs] = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt[i:i + bs].reshape(-1).to(cfg.device),
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
    far = [i for i, d in enumerate(dist) if d >= length // 2]
    return {"acc": correct.float().mean().item(), "exact": ok.float().mean().item(),
            "acc_far_half": ok[far].float().mean().item(), "n": len(pos),
            "acc_by_distance": _by_distance(ok, dist, length, cfg),
            "items": [[d, bool(c)] for d, c in zip(dist, ok.tolist())]}


def _by_distance(ok: torch.Tensor, dist, length: int, cfg: Config) -> Dict[str, float]:
    """Accuracy in distance buckets [0, L), [L, 2L), [2L, 4L), ..."""
    L, by, lo = cfg.train_len, {}, 0
    while lo < length:
        hi = max(L, 2 * lo)
        sel = [i for i, d in enumerate(dist) if lo <= d < hi]
        if sel:
            by[f"{lo}-{hi}"] = ok[sel].float().mean().item()
        lo = hi
    return by


@torch.no_grad()
def eval_recall(model: ByteLM, corpus: Corpus, length: int, cfg: Config) -> dict:
    """Multi-token-key recall accuracy on ``recall_eval`` held-out windows of ``length`` tokens
    (:func:`~.data.recall_eval_set`): the prediction after the final key (the window's last
    token, one forward as :func:`eval_passkey`) must be the queried pair's value. ``distractor``:
    the share of windows answered with a distractor's value (a partial key match or a wrong
    pair); ``acc`` + ``distractor`` is the share that retrieved some pair's value."""
    x, pos, values = recall_eval_set(corpus, cfg, length)
    pred = torch.empty(x.shape[0], dtype=torch.long)
    bs = _eval_batch(cfg, length)
    for i in range(0, x.shape[0], bs):
        xb = x[i:i + bs, :-1].to(cfg.device)
        with _autocast(cfg):
            pred[i:i + bs] = model(xb, last=1).float()[:, -1].argmax(-1).cpu()
    ok = pred == values[:, 0]
    wrong_pair = (pred[:, None] == values[:, 1:]).any(1)
    dist = [recall_distance(p, length + 1, cfg.recall_key_len) for p in pos]
    far = [i for i, d in enumerate(dist) if d >= length // 2]
    return {"acc": ok.float().mean().item(), "distractor": wrong_pair.float().mean().item(),
            "acc_far_half": ok[far].float().mean().item(), "n": len(pos),
            "acc_by_distance": _by_distance(ok, dist, length, cfg),
            "items": [[d, bool(c)] for d, c in zip(dist, ok.tolist())]}


def evaluate(model: ByteLM, corpus: Corpus, segments: torch.Tensor, cfg: Config, scaling: Optional[str] = None,
             log: Callable[[str], None] = print, label: str = "") -> Dict[int, dict]:
    """Perplexity, passkey and recall at every eval length; ``scaling``: a :data:`ROPE_METHODS`
    name (None: the model as trained)."""
    res = {}
    chunked = scaling is not None and rope_method(scaling).chunked
    for length in cfg.eval_lens:
        t0 = time.time()
        model.rope_options = rope_options_for(scaling, length, cfg)
        try:
            r = eval_perplexity(model, segments, length, cfg, chunked)
            r["passkey"] = eval_passkey(model, corpus, length, cfg)
            if cfg.recall:
                r["recall"] = eval_recall(model, corpus, length, cfg)
        finally:
            model.rope_options = {}
        r["seconds"] = time.time() - t0
        res[length] = r
        log(f"  [{label:>18}] len {length:6d}: ppl {r['ppl']:7.3f}  passkey {r['passkey']['acc']:.2f} "
            + (f"recall {r['recall']['acc']:.2f} " if "recall" in r else "") + f"({r['seconds']:.1f}s)")
    return res
