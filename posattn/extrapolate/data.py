"""Data: the Python standard library's own ``.py`` files as bytes, split by file into train and
held-out; training windows with planted passkeys; the fixed evaluation sets."""
from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .config import DOC, KEY, N_VALUES, VALUE0, Config

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
