"""Environment facts read at call time (never at import: no CUDA query, no triton import)."""
import os


def interpreter_on() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# posattn's compiled kernels need mma.sync with bf16 and >= 99 KiB of shared memory per block:
# Ampere (sm_80) or newer. Mirrors posattn.kernels.configs.MIN_ARCH (this module must not import
# the kernels, which import triton).
MIN_CUDA_ARCH = 80


def cuda_arch(device) -> int:
    """Compute capability of a CUDA device as an int (sm_90 -> 90)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def check_cuda_arch(arch: int, name: str) -> None:
    """Raise ValueError when the GPU is older than the kernels support."""
    if arch < MIN_CUDA_ARCH:
        raise ValueError(f"backend='triton' needs an Ampere (sm_80) or newer GPU; q is on {name} "
                         f"(sm_{arch}). Use backend='reference' (materialises the S x S scores).")
