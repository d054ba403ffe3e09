"""Tile configurations: one plain function you can read and override.

``tile_config(kernel, head_dim, causal, dtype, arch, pe)`` -> TileConfig. ``arch`` is the CUDA
compute capability as an int (80 = A100, 86/89 = RTX 30xx/40xx, 90 = H100/H200) or None for
the CPU interpreter. Nothing here queries CUDA: the launcher passes the arch of the tensor's
device.

``head_dim`` is the padded width of one dot group (for RoPE that is half the rotary dim
rounded up to a power of two; see ``posattn._triton``), plus the padded V width -- the
launcher passes the larger padded width, which is what drives register use.

Two tables, by shared memory per block, which is what decides how many K/V stages fit:
  * HOPPER (sm_90, and the datacenter Blackwells sm_100/103, 227 KiB): checked statically for
    sm_90 by tests/test_compile_static.py -- wgmma, no spills, fits;
  * AMPERE (sm_80, 86, 87, 89, the consumer Blackwells sm_120/121; 99 KiB on all but sm_80/87):
    checked for sm_80 -- mma.sync, no spills, <= 99 KiB so the same tiles run on sm_86/89.
Neither table has been timed on a GPU yet (``python -m bench.tune`` does that); re-run
``python -m bench.compile_report`` after changing them.

Why these numbers (each table is clean on triton 3.6, which CUDA torch 2.11 pins, and on 3.9):
  * Hopper: wgmma works on 64-row slabs, one per warpgroup (4 warps). The S / dP products'
    row dimension (forward and dQ: BLOCK_M; dK/dV, which computes S^T: BLOCK_N) must give each
    warpgroup its own slab: with 8 warps and 64 such rows Triton hands both warpgroups the
    whole S tile (the next product takes it as a register operand) and computes S, dP and
    the softmax twice -- 67 % (dK/dV) or 60 % (dQ) of the issued tensor-core work is useful
    (``python -m bench.sass_loop``, column mma%). So every Hopper tile below is 128 rows x 8
    warps or 64 rows x 4 warps on that side; within that, the tile with the fewest issued
    instructions per score that spills nothing for any PE variant (contiguous and explicit
    positions) on either triton, from the candidates in ``bench.tune.CANDIDATES``:
      forward 128 x 128 (at D=128, 64 keys for RoPE, whose per-offset cos/sin tables hold 64
      registers a thread at 128 keys, and for ALiBi and KERPLE with explicit positions or
      without TMA key tiles -- unaligned inputs, where KERPLE takes 32 -- and for no PE with
      explicit positions (the causal mask from int64 positions spills 8 B at 128 keys on
      triton 3.6); ALiBi and KERPLE with TMA and contiguous positions keep 128: TMA frees the
      K / V address registers); dK/dV
      32 x 128 at D=128, 64 x 128 at D=64 (RoPE: 32 x 128 at D=64; at D=128 every RoPE
      tile that computes S once spills --
      the rotated K tile is a register operand of wgmma, 32 registers a thread, where
      pe="none" reads K from shared memory -- so it runs 32 x 128 *split*: one launch
      accumulates dV, a second dK, each with half the accumulators: five products per tile
      instead of four, against six issued by the 64-key tile that computes S twice, and 1448
      instead of 2036 instructions per 1k scores); dQ 128 x 64 (at D=128, RoPE, KERPLE and
      trainable ALiBi: 128 x 32; trainable KERPLE, whose r1/r2 gradient terms need registers:
      128 x 32 at D=64, 64 x 16 on 4 warps at D=128).
    Static choices: ``python -m bench.tune`` times them against the other candidates on a GPU.
  * Ampere: mma.sync keeps both operands in registers, so the PE kernels shrink a tile
    dimension where Hopper does not, and the same rule holds: the backward's S side gets
    128 rows on 8 warps or 64 on 4 (mma% 100), picked like the Hopper tiles (fewest
    instructions per score, spill-free for every variant on both tritons, <= 99 KiB). The
    forward is 128 query rows (64 keys without a PE at D=64, else 32; RoPE 16 at D=128).
    dK/dV 32 x 128 (ALiBi at D=128: 32 x 64 on 4 warps); RoPE keeps 16 x 128 at D=64 and
    32 x 32 at D=128 (67 %: every 4-warp RoPE tile spills there). dQ 64 x 32 on 4 warps at
    D=64 (RoPE 64 x 16), 128 x 32 at D=128 (KERPLE 128 x 16, RoPE 32 x 32 on 4 warps).
  * D=256 (not a target): forward 64 x 32 with 8 warps; backward 16 x 64 (dK/dV) and
    64 x 16 (dQ). dK + dV alone are 128 fp32 registers per thread at 64 keys, so on Hopper the
    dK/dV kernel spills (smaller key tiles lose wgmma and still spill), and RoPE's backward at
    D=256 spills on both archs, whatever the tile: its rotation tables grow with D.
  * fp32 inputs run IEEE fp32 dots on the FMA units (no TF32; fp32 users ask for accuracy):
    small tiles, found spill-free by the same static check for most kernels (not a CI gate:
    ``python -m bench.compile_report --dtype fp32`` shows the rest).
  * interpreter: 32 x 32 tiles, so that tests with S in {17, 65, 130} cross tile boundaries
    and exercise both the masked and the unmasked loops.

Overrides, for tuning on a GPU without editing this file: ``python -m bench.tune`` measures
candidate tiles and writes the ones that beat these tables to a JSON file; point
``POSATTN_TILES`` at it (read on the first launch) or pass the entries to ``override`` (a
context manager). An override is keyed on (kernel, PE family, padded head dim, arch) and applies
to 16-bit inputs only; see ``load_tiles`` for the file format.
"""
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    # dK/dV only: compute dV and dK in two launches of the kernel, each holding one set of
    # accumulators (one more S product, no tile that computes S twice; see _hopper)
    split: bool = False


KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
FAMILIES = ("none", "rope", "alibi", "kerple")  # the tuned families (bench.tune's PE names)
# T5's family: KERPLE's tiles but for one (tile_config), not tuned on its own
TABLE_FAMILY = "table"
# FIRE's family: four table reads and a cubic per score, a cell walk in dQ (_fire)
FIRE_FAMILY = "fire"
_KNOWN_FAMILIES = FAMILIES + (TABLE_FAMILY, FIRE_FAMILY)

# Archs with ~227 KiB of shared memory per block; every other arch >= 80 gets the Ampere table.
HOPPER_CLASS = (90, 100, 103)
MIN_ARCH = 80  # mma.sync with bf16 and >= 99 KiB of shared memory (posattn._env checks it)


TileKey = Tuple[str, str, int, Optional[int]]  # (kernel, family, padded head dim, arch)

_overrides: Dict[TileKey, TileConfig] = {}
_env_loaded = False
TILES_ENV = "POSATTN_TILES"


def tile_config(kernel: str, head_dim: int, causal: bool, dtype: torch.dtype,
                arch: Optional[int], pe: str = "none", pe_grad: bool = False,
                explicit: bool = False, tma: bool = False, geometry: bool = False) -> TileConfig:
    """Tile config for ``kernel`` in KERNELS. head_dim: padded (power of two) head width.

    pe: the PE family in FAMILIES -- "none", "rope", "alibi", "kerple" (log and power) or
    "table" (T5: KERPLE's tiles, but for one). RoPE keeps rotation tables and a bias PE its
    bias terms live, so they may need smaller tiles.
    pe_grad: the dQ kernel also accumulates the bias parameters' gradients (trainable ALiBi
    slopes / KERPLE r1, r2), which costs registers.
    explicit: explicit position tensors (the bias PEs then form distances in int64: more
    registers), or any launch whose bias rows are centred (launch.roomy_tile).
    tma: the forward loads K / V through TMA (launch.tma_ready: sm_90+, no
    RoPE, 16-byte-aligned inputs), which frees the registers that held their addresses.
    geometry: packed sequences, a window's left edge or a logit softcap (launch.geometry_tile):
    extra work per tile or per score that the tightest tiles have no registers for.
    causal is accepted for tuning per mask; no shipped config depends on it yet.
    An active override (``override`` / ``POSATTN_TILES``) for (kernel, pe, head_dim, arch)
    wins for fp16 and bf16 inputs with contiguous positions and the forward's usual load path
    (TMA where it applies): what ``bench.tune`` measures. Explicit positions and unaligned
    inputs keep the shipped tile, which is spill-free for them too.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if pe not in _KNOWN_FAMILIES:
        raise ValueError(f"pe must be one of {_KNOWN_FAMILIES}, got {pe!r}")
    if not _env_loaded:
        _load_env()
    if dtype != torch.float32 and _overrides and not explicit and (
            tma or kernel != "fwd" or pe == "rope" or arch not in HOPPER_CLASS):
        hit = _overrides.get((kernel, pe, head_dim, arch))
        if hit is not None:
            return hit
    if arch is None:  # Triton interpreter on CPU
        return TileConfig(32, 32, 4, 1)
    if pe == FIRE_FAMILY:
        if dtype == torch.float32 or head_dim > 128:
            pe = "kerple"  # (fp32's and D=256's small tiles; not compiled by the report)
        else:
            return _fire(kernel, head_dim > 64, arch in HOPPER_CLASS, explicit)
    if pe == TABLE_FAMILY:  # a table read per score and a bucket per score in dQ, as KERPLE's
        if (kernel == "bwd_dkdv" and explicit and head_dim > 64 and arch in HOPPER_CLASS
                and dtype != torch.float32 and not geometry):
            # the clamped int64 k - q per score: 32 x 128 spills 32 B (triton 3.9)
            return TileConfig(16, 128, 8, 2)
        if (kernel == "bwd_dkdv" and explicit and geometry and arch not in HOPPER_CLASS
                and dtype != torch.float32):
            # the clamped |k - q| next to a window's tests: 32 x 128 spills 8 B, 32 x 64 on 4
            # warps 16 B (Sandwich, D=64, triton 3.9); 16 query rows: 172 registers
            return TileConfig(16, 128, 8, 2)
        if (kernel == "bwd_dq" and pe_grad and head_dim > 64 and arch in HOPPER_CLASS
                and dtype != torch.float32):
            # the (rows, buckets) gradient accumulator: KERPLE's former 64 x 16 on 4 warps
            return TileConfig(64, 16, 4, 2)
        pe = "kerple"
    if dtype == torch.float32:
        return _fp32(kernel, pe, head_dim > 64)
    if head_dim > 128:
        return _d256(kernel, pe, arch in HOPPER_CLASS)
    big = head_dim > 64
    if arch in HOPPER_CLASS:
        return _hopper(kernel, pe, big, pe_grad, explicit, tma, geometry)
    return _ampere(kernel, pe, big, explicit, geometry)


def _hopper(kernel: str, pe: str, big: bool, pe_grad: bool, explicit: bool,
            tma: bool, geometry: bool = False) -> TileConfig:
    # See the module docstring: 128-row slabs over 8 warps (or 64 over 4), never 64 over 8.
    if kernel == "fwd":
        if geometry:  # 128 keys spill (softcap RoPE D=64: 656 B, ALiBi D=128: 712 B; varlen
            # RoPE D=64: 16 B); at D=128 RoPE and KERPLE take 32 (64: 24-40 B)
            return TileConfig(128, 32 if big and pe in ("rope", "kerple") else 64, 8, 3)
        if pe == "kerple" and explicit and not big:  # centred rows' log1p/expm1: 128 keys spill
            return TileConfig(128, 64, 8, 2)
        if not big or (pe == "none" and not explicit) or (
                tma and not explicit and pe in ("alibi", "kerple")):
            return TileConfig(128, 128, 8, 2)
        if pe == "kerple" and not tma and not explicit:  # unaligned inputs: 64 keys spill on 3.9
            return TileConfig(128, 32, 8, 3)
        return TileConfig(128, 64, 8, 3)
    if kernel == "bwd_dkdv":
        if geometry:  # (launch.geometry_tile) the tiles below spill 8-64 B (varlen KERPLE
            # D=64, RoPE D=128): D=128 16 query rows a tile, D=64 64 keys on 4 warps (64 S^T
            # rows a warpgroup: no duplicated S)
            if big:
                return TileConfig(16, 128, 8, 2, split=pe == "rope")
            return TileConfig(32, 64, 4, 2)
        if pe == "rope":
            return TileConfig(32, 128, 8, 2, split=True) if big else TileConfig(32, 128, 8, 2)
        return TileConfig(32, 128, 8, 2) if big else TileConfig(64, 128, 8, 2)
    # bwd_dq: at D=128, 64 keys spill (triton 3.9) for KERPLE and for trainable ALiBi.
    # Trainable KERPLE's gradient terms (two row sums of dS times f and df/dr2, both read
    # from the per-distance tables): 128 x 32 on 8 warps spills 88 B on triton 3.9 with two
    # stages, none with one; per 1k scores (bench.sass_loop, sm_90, causal) 820 instead of
    # 64 x 16's 1304 on 3.6 (3.9: 1210 vs 1688): 16 rows x 64 keys of loop overhead per
    # iteration amortised over 4x the scores. The price is an unpipelined K/V load
    # (num_stages=1), which bench.tune times against 64 x 16 x 2 stages on a GPU. Centred rows
    # (explicit) and the geometry variants keep 64 x 16.
    if pe == "kerple" and pe_grad:
        if big and not explicit and not geometry:
            return TileConfig(128, 32, 8, 1)
        return TileConfig(64, 16, 4, 2) if big else TileConfig(128, 32, 8, 2)
    if geometry:  # softcap's tanh and 1 - tanh^2 per score: RoPE D=64 128 x 64 spills 56 B;
        # RoPE D=128 (varlen, softcap) 128 x 32 8-16 B
        return TileConfig(128, 16 if big and pe == "rope" else 32, 8, 2)
    if big and (pe in ("rope", "kerple") or (pe == "alibi" and pe_grad)):
        return TileConfig(128, 32, 8, 2)
    return TileConfig(128, 64, 8, 2)


def _ampere(kernel: str, pe: str, big: bool, explicit: bool = False,
            geometry: bool = False) -> TileConfig:
    # mma.sync keeps both operands in registers, and triton 3.6 allocates a few more than 3.9.
    # Backward: 8 warps on a 64-row S side compute S twice here too (mma% 50-67), so the
    # backward tiles put 32 query rows per warp pair: 128 keys on 8 warps or 64 on 4.
    if kernel == "fwd":
        if big:
            return TileConfig(128, 16 if pe == "rope" else 32, 8, 2)
        if pe == "none":  # geometry (a window's masked loop, softcap): 4 warps spill 168 B
            return TileConfig(128, 64, 8, 3) if geometry else TileConfig(128, 64, 4, 3)
        # RoPE: registers; bias: KERPLE's f tile (fp32, pipelined through shared memory) must
        # fit 99 KiB next to three K/V stages
        return TileConfig(128, 32, 8, 3)
    if kernel == "bwd_dkdv":
        if pe == "rope":  # no RoPE dK/dV tile without duplicated S is spill-free at D=128
            return TileConfig(32, 32, 8, 2) if big else TileConfig(16, 128, 8, 2)
        if big and (pe == "alibi" or geometry or (pe == "kerple" and explicit)):
            return TileConfig(32, 64, 4, 2)  # 32 x 128 spills 8-16 B
        return TileConfig(32, 128, 8, 2)
    # bwd_dq
    if not big:  # (centred KERPLE rows, explicit: their closed forms spill 64 x 32 by 24 B)
        return (TileConfig(64, 16, 4, 2) if pe == "rope" or (pe == "kerple" and explicit)
                else TileConfig(64, 32, 4, 2))
    if pe == "rope":
        return TileConfig(32, 32, 4, 2)
    if pe == "kerple" and explicit:  # centred rows: 128 x 16 spills 56-72 B (KERPLE power, 3.6)
        return TileConfig(32, 32, 4, 1)
    if pe == "kerple" or geometry:  # 128 x 32 overflows 99 KiB with the gathered f tile;
        # a window's third loop spills 32 B there
        return TileConfig(128, 16, 8, 2)
    return TileConfig(128, 32, 8, 2)


def _fire(kernel: str, big: bool, hopper: bool, explicit: bool = False) -> TileConfig:
    # FIRE's score holds a cell index, its fraction and four gathered coefficients (and in
    # dQ the slope's four and the walk's sums): T5's tiles spill 72-1080 B (sm_90 forward
    # 128 x 128: 1 KB). These are the compile report's clean ones, triton 3.9 (registers):
    if kernel == "fwd":  # sm_90 D=64 220, D=128 208; sm_80 168 / 255
        return TileConfig(128, 32 if hopper and not big else 16, 8, 2)
    if kernel == "bwd_dkdv":  # sm_90 223 / 252; sm_80 (32 x 128 overflows 99 KiB) 255 / 255
        if hopper:
            return TileConfig(16 if big else 32, 128, 8, 2)
        if explicit:  # int64 distances: 32 x 64 spills 56 / 144 B; these 233 / 248
            return TileConfig(32, 32, 4, 2) if big else TileConfig(16, 128, 8, 2)
        return TileConfig(32, 64, 4, 2)
    # bwd_dq: 64 x 16 (sm_90 252 / 254, sm_80 D=64 254); sm_80 D=128 128 x 16 (64 x 16
    # spills 248 B there), explicit 32 x 32 (128 x 16 spills 48 B)
    if big and not hopper:
        return TileConfig(32, 32, 4, 2) if explicit else TileConfig(128, 16, 8, 2)
    return TileConfig(64, 16, 4, 2)


def _fp32(kernel: str, pe: str, big: bool) -> TileConfig:
    # IEEE fp32 dots run on the FMA units with both operands in registers, on every arch:
    # small tiles, 8 warps where that spills less.
    if kernel == "fwd":
        return TileConfig(32, 16, 8, 1) if big else TileConfig(64, 32, 8, 2)
    if kernel == "bwd_dkdv":
        if big:
            return TileConfig(16, 16, 4, 1) if pe == "rope" else TileConfig(16, 32, 8, 1)
        return TileConfig(32, 32, 8, 1)
    if big:  # bwd_dq
        if pe == "rope":
            return TileConfig(16, 16, 8, 1)
        return TileConfig(32, 16, 4 if pe == "none" else 8, 1)
    return TileConfig(32, 32, 8 if pe == "rope" else 4, 1)


def _d256(kernel: str, pe: str, hopper: bool) -> TileConfig:
    if kernel == "fwd":
        return TileConfig(64, 32, 8, 2)
    if kernel == "bwd_dkdv":
        # Ampere's bias backward is spill-free on 32-key tiles; Hopper keeps 64 for wgmma.
        return TileConfig(16, 32 if pe in ("alibi", "kerple") and not hopper else 64, 8, 2)
    return TileConfig(64, 16, 8, 2)


# --- overrides ---------------------------------------------------------------------------------

def _check_key(key) -> TileKey:
    kernel, family, head_dim, arch = key
    if kernel not in KERNELS or family not in _KNOWN_FAMILIES:
        raise ValueError(f"tile override key {key!r}: kernel must be one of {KERNELS} and family "
                         f"one of {_KNOWN_FAMILIES}")
    return kernel, family, int(head_dim), None if arch is None else int(arch)


@contextmanager
def override(tiles: Mapping[TileKey, TileConfig]) -> Iterator[None]:
    """Within the block, ``tile_config`` returns ``tiles[(kernel, family, head_dim, arch)]``
    where present (16-bit inputs). Nests; restores the previous overrides on exit."""
    saved = dict(_overrides)
    _overrides.update({_check_key(k): v for k, v in tiles.items()})
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def load_tiles(path: str) -> Dict[TileKey, TileConfig]:
    """Read a tile file: a JSON object with a list ``"tiles"`` of entries
    ``{"kernel": "fwd", "family": "rope", "head_dim": 128, "arch": 90,
    "tile": [BLOCK_M, BLOCK_N, num_warps, num_stages(, split)]}`` (what ``python -m bench.tune``
    writes)."""
    with open(path) as f:
        data = json.load(f)
    tiles = {}
    for e in data.get("tiles", []):
        key = _check_key((e["kernel"], e["family"], e["head_dim"], e["arch"]))
        m, n, w, st, *split = e["tile"]
        tiles[key] = TileConfig(int(m), int(n), int(w), int(st), bool(split and split[0]))
    return tiles


def _load_env() -> None:
    """Apply POSATTN_TILES once, on the first tile_config call (not at import)."""
    global _env_loaded
    _env_loaded = True
    path = os.environ.get(TILES_ENV)
    if path:
        _overrides.update(load_tiles(path))


def remap_tile(cfg: TileConfig, head_dim: int, dtype, arch: Optional[int],
               explicit: bool, chunked: bool = False, kvcache: bool = False) -> TileConfig:
    """The forward tile of a RoPE extension (attn_fwd REMAP: a near pass and one per far region, the
    (query, key) region tested per score; launch.attn_fwd asks for the geometry tiles first).
    On Ampere with explicit positions the per-element angles of the near pass and the int64
    region test spill the geometry tiles (D=128 128 x 16: 32 B on triton 3.9; D=64 128 x 32:
    16 B on 3.6): 64 x 32 on 4 warps. DCA (chunked: a floor division of every position by
    the chunk length, per row and per column, and a third pass) with explicit positions: on
    Hopper the D=64 geometry tile 128 x 64 spilled 8 B on triton 3.6: 128 x 32; on Ampere at
    D=128 64 x 32 on 4 warps spilled 120 B (3.6): 128 x 16 on 8 warps. DCA over a KV cache
    on Ampere (its keys rotated in the tile, k mod L): the D=128 split-K forward at 128 x 16
    spilled 16 B (triton 3.9): one stage (its K/V loads unpipelined; a decode step is
    memory-bound either way), clean on 3.9; on 3.6 every tile tried keeps 16-64 B at D=128."""
    if arch is None or dtype == torch.float32:
        return cfg
    if chunked and kvcache and arch not in HOPPER_CLASS:
        return TileConfig(cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps, 1)
    if not explicit:
        return cfg
    if arch not in HOPPER_CLASS:
        if chunked and head_dim > 64:
            return TileConfig(128, 16, 8, 2)
        return TileConfig(64, 32, 4, 2)
    if chunked and cfg.BLOCK_N > 32:
        return TileConfig(cfg.BLOCK_M, 32, cfg.num_warps, cfg.num_stages)
    return cfg


def xpos_tile(cfg: TileConfig, kernel: str, head_dim: int, dtype, arch: Optional[int],
              explicit: bool) -> TileConfig:
    """xPos's tile (it takes the geometry tiles: launch.geometry_tile), but on Ampere with
    explicit positions at D=128 the forward's 128 x 16 on 8 warps spilled 8 B on triton 3.6
    (the block's reference and span next to per-element decays): one stage (64 x 16 on 4
    warps is clean too, but computes S twice: 67 % useful MMA)."""
    if (kernel == "fwd" and explicit and head_dim > 64 and arch is not None
            and arch not in HOPPER_CLASS and dtype != torch.float32):
        return TileConfig(64, 32, 4, 1)
    return cfg
