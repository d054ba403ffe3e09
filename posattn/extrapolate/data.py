"""Data: the Python standard library's own ``.py`` files as bytes, split by file into train and
held-out; training windows with planted passkeys or recall pairs; the fixed evaluation sets."""
from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .config import DOC, KEY, N_RKEYS, N_VALUES, RKEY0, VALUE0, Config

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


def recall_keys(n_pairs: int, key_len: int, gen: torch.Generator) -> torch.Tensor:
    """(n_pairs, key_len) distinct keys over the ``N_RKEYS`` recall symbols; row 0 is the queried
    key. Row 1 + j (j < key_len) equals row 0 except at symbol j, so every key symbol of the
    query is shared with some distractor: only a match on the whole key singles out row 0. Further
    rows (if n_pairs > key_len + 1) are random keys."""
    if n_pairs > N_RKEYS ** key_len:
        raise ValueError(f"{n_pairs} distinct keys of {key_len} symbols over {N_RKEYS} do not exist")
    target = torch.randint(0, N_RKEYS, (key_len,), generator=gen)
    keys = [target]
    for j in range(min(key_len, n_pairs - 1)):
        k = target.clone()
        k[j] = (target[j] + torch.randint(1, N_RKEYS, (1,), generator=gen)) % N_RKEYS   # != target[j]
        keys.append(k)
    while len(keys) < n_pairs:
        k = torch.randint(0, N_RKEYS, (key_len,), generator=gen)
        if not any(torch.equal(k, o) for o in keys):
            keys.append(k)
    return torch.stack(keys) + RKEY0


def make_recall(filler: torch.Tensor, blocks: Sequence[Sequence[Tuple[int, int]]], gen: torch.Generator,
                key_len: int, n_pairs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-token-key associative recall: plant pair blocks ``k_1..k_m <V>`` in each row and end
    the row with the queried pair (pair 0).

    filler: (n, T) int64. ``blocks[i]``: ``(position, pair)`` of every planted block of row i,
    ``pair`` in [0, n_pairs); pair 0 is the queried one. Each row gets its own keys
    (:func:`recall_keys`: every distractor shares all but one symbol with the queried key) and
    n_pairs distinct value tokens. The final block (the query: the model must produce ``<V>``
    after ``k_1..k_m``) occupies the last ``key_len + 1`` tokens; the planted blocks must not
    overlap it or each other. A block that repeats a pair planted earlier in the row is a
    retrieval example too. Returns the new (n, T) tensor, the keys (n, n_pairs, key_len) and the
    values (n, n_pairs).
    """
    x = filler.clone()
    n, T = x.shape
    w = key_len + 1
    if n_pairs > N_VALUES:
        raise ValueError(f"{n_pairs} pairs need distinct values, there are {N_VALUES}")
    keys = torch.empty(n, n_pairs, key_len, dtype=torch.long)
    values = torch.empty(n, n_pairs, dtype=torch.long)
    for i in range(n):
        keys[i] = recall_keys(n_pairs, key_len, gen)
        values[i] = torch.randperm(N_VALUES, generator=gen)[:n_pairs] + VALUE0
    pair_blocks = torch.cat([keys, values[:, :, None]], dim=2)      # (n, n_pairs, w)
    for i, row in enumerate(blocks):
        starts = sorted(p for p, _ in row)
        if any(not 0 <= p <= T - 2 * w for p in starts) or any(b < a + w for a, b in zip(starts, starts[1:])):
            raise ValueError(f"recall positions {starts} overlap or leave a window of {T} tokens")
        for p, j in row:
            x[i, p:p + w] = pair_blocks[i, j]
    x[:, T - w:] = pair_blocks[:, 0]
    return x, keys, values


def recall_distance(pos: int, total: int, key_len: int) -> int:
    """Distance from the query (the final block's first key symbol) back to the queried pair."""
    return (total - key_len - 1) - pos


def train_batch(corpus: Corpus, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """(B, L + 1) int64 text windows; a ``passkey_frac`` share carries ``passkey_copies`` copies of
    a passkey block, the last at the end (every copy after the first is a retrieval example at a
    distance < L). With ``cfg.recall``, the last ``recall_frac`` share instead carries
    ``recall_pairs`` recall pairs followed by ``recall_repeats`` (>= 1) repeats of them, the last
    (the queried pair) at the end: every repeat is a retrieval example with all distractors
    before it. The inserts replace a few bytes; the rest of the window is text. Without
    ``cfg.recall`` the batches are those of the passkey-only study."""
    x = random_windows(corpus.train, cfg.batch_size, cfg.train_len + 1, gen)
    T = cfg.train_len + 1
    nrc = int(round(cfg.recall_frac * cfg.batch_size)) if cfg.recall else 0
    npk = min(int(round(cfg.passkey_frac * cfg.batch_size)), cfg.batch_size - nrc)
    if npk:
        w = cfg.passkey_len + 1
        pos = [_spaced_positions(cfg.passkey_copies - 1, T - w, w, gen) for _ in range(npk)]
        x[:npk] = make_passkey(x[:npk], pos, gen, cfg.passkey_len)
    if nrc:
        if cfg.recall_repeats < 1:
            raise ValueError("recall_repeats must be >= 1 (the last repeat is the query at the end)")
        w, m = cfg.recall_key_len + 1, cfg.recall_pairs
        blocks = []
        for _ in range(nrc):
            pos = _spaced_positions(m + cfg.recall_repeats - 1, T - w, w, gen)
            order = torch.randperm(m, generator=gen).tolist()          # first occurrences
            rep = torch.randint(0, m, (cfg.recall_repeats - 1,), generator=gen).tolist()
            blocks.append(list(zip(pos, order + rep)))
        x[-nrc:] = make_recall(x[-nrc:], blocks, gen, cfg.recall_key_len, m)[0]
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


def recall_eval_set(corpus: Corpus, cfg: Config, length: int) -> Tuple[torch.Tensor, List[int], torch.Tensor]:
    """(n, length + 1) recall windows on held-out text: the queried pair at distances spread evenly
    over the window (as :func:`passkey_eval_set`), its ``recall_pairs - 1`` distractors at random
    places; deterministic in (seed, length). Returns the windows, the queried pair's positions and
    the values (n, recall_pairs), column 0 the answer."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + length + 7_919)
    T, w, m = length + 1, cfg.recall_key_len + 1, cfg.recall_pairs
    hi = T - 2 * w
    n = cfg.recall_eval
    pos = [round(hi * i / max(n - 1, 1)) for i in range(n)]
    filler = random_windows(corpus.heldout, n, T, gen)
    blocks = []
    for p in pos:
        taken = [p]
        for _ in range(1000 * m):                       # rejection: distractors anywhere else
            if len(taken) == m:
                break
            q = int(torch.randint(0, hi + 1, (1,), generator=gen))
            if all(abs(q - t) >= w for t in taken):
                taken.append(q)
        if len(taken) < m:
            raise ValueError(f"cannot place {m} recall pairs of {w} tokens in a window of {T}")
        blocks.append([(q, j) for j, q in enumerate(taken)])
    x, _, values = make_recall(filler, blocks, gen, cfg.recall_key_len, m)
    return x, pos, values
