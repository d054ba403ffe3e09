"""Tile configurations: one plain function you can read and override.

``tile_config(kernel, head_dim, causal, dtype, arch)`` -> TileConfig. ``arch`` is the CUDA
compute capability as an int (80 = A100, 90 = H100/H200) or None for the CPU interpreter.
Nothing here queries CUDA: the launcher passes the arch of the tensor's device.

``head_dim`` is the padded width of one dot group (for RoPE that is half the rotary dim
rounded up to a power of two; see ``posattn._triton``), plus the padded V width — the
launcher passes the larger padded width, which is what drives register use.

Why these numbers (Hopper, checked statically by tests/test_compile_sm90.py for spills and
wgmma; re-measure with ``python -m bench`` on a GPU before changing them):
  * forward: BLOCK_M=128 rows per program with 8 warps feeds wgmma's 64-row granularity
    twice; BLOCK_N=64 keeps S/P and the RoPE cos/sin table in registers without spilling.
  * dK/dV: the program holds K, V and the dK, dV accumulators for 64 keys over 32-query
    tiles, 8 warps; at D=128 the bias PEs (whose backward also keeps the bias and its
    parameter-gradient terms live) need 16-query tiles to stay clear of spills on both
    triton 3.6 (CUDA torch 2.11) and the newest triton. dQ: 64 queries x 32-key tiles.
  * D=256 (not a target): forward 64 x 32 with 8 warps is spill-free; the backward keeps wgmma
    but spills (dK + dV alone are 128 registers per thread at 64 keys).
  * interpreter: 32 x 32 tiles, so that tests with S in {17, 65, 130} cross tile boundaries
    and exercise both the masked and the unmasked loops.
"""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")


def tile_config(kernel: str, head_dim: int, causal: bool, dtype: torch.dtype,
                arch: Optional[int], pe: str = "none") -> TileConfig:
    """Tile config for ``kernel`` in KERNELS. head_dim: padded (power of two) head width.

    pe: "none", "rope" or "bias" (ALiBi / KERPLE) -- the family, because a bias PE's backward
    keeps its bias terms live next to dK/dV and needs a smaller query tile at D=128.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if arch is None:  # Triton interpreter on CPU
        return TileConfig(32, 32, 4, 1)
    big = head_dim > 64
    huge = head_dim > 128
    wide = dtype == torch.float32  # fp32 tiles take twice the registers / shared memory
    if kernel == "fwd":
        if wide:
            return TileConfig(64, 32, 4, 2)
        if huge:
            return TileConfig(64, 32, 8, 2)
        if arch >= 90:
            return TileConfig(128, 64, 8, 3)
        return TileConfig(128, 64 if not big else 32, 4 if not big else 8, 3 if not big else 2)
    # backward kernels
    if wide:
        return TileConfig(32, 32, 4, 1)
    if kernel == "bwd_dkdv":
        # D=256 keeps dK + dV (64 x 256 fp32 each) live: it spills some; 64 keys keep wgmma.
        return TileConfig(16 if huge or (big and pe == "bias") else 32, 64, 8, 2)
    if huge:
        return TileConfig(64, 16, 8, 2)
    return TileConfig(64, 32, 8 if big else 4, 2)
