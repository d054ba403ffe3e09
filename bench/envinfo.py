"""The environment a benchmark ran in: GPU, driver, library versions, date."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

import posattn


def _run(cmd, timeout: float = 10.0) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return res.stdout.strip() if res.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def driver_version() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else "unknown"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    return _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]) or "unknown"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as e:  # noqa: BLE001
        return f"not importable ({type(e).__name__})"


def tile_overrides() -> str:
    """The tile overrides POSATTN_TILES applies (posattn.kernels.configs), or 'shipped'."""
    path = os.environ.get("POSATTN_TILES")
    if not path:
        return "shipped"
    try:
        from posattn.kernels.configs import load_tiles
        tiles = load_tiles(path)
    except Exception as e:  # noqa: BLE001 - the bench itself will fail on it and say so
        return f"POSATTN_TILES={path} (unreadable: {type(e).__name__})"
    items = "; ".join(f"{k[0]}/{k[1]}/D{k[2]}/sm_{k[3]}={c.BLOCK_M}x{c.BLOCK_N} w{c.num_warps} "
                      f"s{c.num_stages}" for k, c in sorted(tiles.items(), key=str))
    return f"POSATTN_TILES={path}: {items or 'no entries'}"


def environment() -> dict:
    """Everything needed to read the numbers later. Queries CUDA only if it is available."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "posattn": getattr(posattn, "__version__", "?"),
        "git_commit": git_commit(),
        "host": platform.node(),
        "tiles": tile_overrides(),
        # the forward's K/V load path on Hopper (posattn.kernels.launch.tma_enabled)
        "tma": "off (POSATTN_TMA=0)" if os.environ.get("POSATTN_TMA", "1") in ("", "0")
        else ("on where it applies (Hopper-class GPU, no RoPE, contiguous positions, 16-bit "
              "16-byte-aligned inputs)"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            driver=driver_version(),
        )
    else:
        env.update(gpu="none", driver="none")
    return env
