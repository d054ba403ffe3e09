"""Static Hopper report: compile every shipped kernel config for sm_90 on this (CPU) machine.

    python -m bench.compile_report            # table
    python -m bench.compile_report --json     # rows as JSON (used by tests/test_compile_sm90.py)

For each (kernel, PE, head dim, causal) it compiles the kernel with the tile config that
``posattn.kernels.configs.tile_config`` ships for arch 90 and reports registers per thread,
spills (cuobjdump's STACK / LOCAL), shared memory, and whether the PTX uses wgmma (Hopper's
asynchronous tensor-core MMA). Needs no GPU: triton.compile with GPUTarget("cuda", 90, 32)
and the cuobjdump that ships inside triton's nvidia backend.

Must run with TRITON_INTERPRET unset (it compiles real kernels); the test runs it in a
subprocess for that reason.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench.compile_report compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from posattn.kernels import launch  # noqa: E402
from posattn.kernels.attn_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel  # noqa: E402
from posattn.kernels.attn_fwd import attn_fwd_kernel  # noqa: E402
from posattn.kernels.configs import tile_config  # noqa: E402

ARCH = 90
KERNELS = {"fwd": attn_fwd_kernel, "bwd_dkdv": attn_bwd_dkdv_kernel, "bwd_dq": attn_bwd_dq_kernel}
PES = {"none": launch.PE_NONE, "rope": launch.PE_ROPE, "alibi": launch.PE_ALIBI,
       "kerple_log": launch.PE_KERPLE_LOG, "kerple_power": launch.PE_KERPLE_POWER}
# Pointer arguments and their element types (bf16 inputs); everything else is an int or float.
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16",
            "DQ": "*bf16", "DK_OUT": "*bf16", "DV_OUT": "*bf16", "LSE": "*fp32", "DELTA": "*fp32",
            "QPOS": "*i32", "KPOS": "*i32", "THETA": "*fp64", "PA": "*fp32", "PB": "*fp32",
            "GPA": "*fp32", "GPB": "*fp32"}
FLOATS = {"scale", "scale_log2", "rope_factor"}


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def compile_one(kernel: str, pe: str, head_dim: int, causal: bool, explicit: bool = False, cfg=None):
    """Compile one shipped config (or ``cfg``, a TileConfig to try) for sm_90; returns a row.

    explicit: explicit position tensors (RoPE then evaluates cos/sin per element, not per tile).
    """
    fn = KERNELS[kernel]
    kpe = launch.KernelPE(PES[pe], rot_dim=head_dim if pe == "rope" else 0)
    meta, width = launch._layout_meta(kpe, head_dim, head_dim)
    cfg = cfg or tile_config(kernel, width, causal, torch.bfloat16, ARCH, launch._family(kpe))
    constexprs = dict(meta, PE=PES[pe], CAUSAL=causal, EXPLICIT_POS=explicit,
                      BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, PREC="tf32")
    if kernel == "bwd_dkdv":
        constexprs["NEED_PE_GRAD"] = pe not in ("none", "rope")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name] = "constexpr"  # the head dim is contiguous: launches specialise it to 1
            constexprs[name] = 1
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    seconds = time.time() - t0
    ptx = ck.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout

    def field(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else None

    return dict(kernel=kernel, pe=pe, head_dim=head_dim, causal=causal, explicit=explicit,
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, registers=field("REG"), stack=field("STACK"),
                local=field("LOCAL"), shared=ck.metadata.shared,
                wgmma="wgmma.mma_async" in ptx, compile_s=round(seconds, 1),
                triton=triton.__version__)


def shipped_configs(quick: bool = False):
    """(kernel, pe, head_dim, causal, explicit) to check: every PE causal with contiguous
    positions, plus non-causal without PE, and RoPE and KERPLE-power with explicit positions
    (per-element cos/sin; int64 position differences). quick: none / rope / kerple_power (the heaviest bias) only."""
    pes = ("none", "rope", "kerple_power") if quick else tuple(PES)
    for kernel in KERNELS:
        for head_dim in (64, 128):
            for pe in pes:
                yield kernel, pe, head_dim, True, False
            yield kernel, "none", head_dim, False, False
            yield kernel, "rope", head_dim, True, True
            yield kernel, "kerple_power", head_dim, True, True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--quick", action="store_true", help="none/rope/kerple_power only")
    args = ap.parse_args(argv)
    rows = []
    if not args.json:
        print(f"sm_{ARCH} compile report, triton {triton.__version__}, bf16", flush=True)
    for kernel, pe, hd, causal, explicit in shipped_configs(args.quick):
        rows.append(compile_one(kernel, pe, hd, causal, explicit))
        if not args.json:
            r = rows[-1]
            print(f"{r['kernel']:9s} {r['pe']:13s} D={r['head_dim']:<4d} causal={int(r['causal'])} "
                  f"pos={'explicit' if r['explicit'] else 'contig  '} "
                  f"tile {r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']}  "
                  f"regs {r['registers']:>3} stack {r['stack']} local {r['local']} "
                  f"smem {r['shared']:>6} wgmma {'yes' if r['wgmma'] else 'NO'}  ({r['compile_s']}s)",
                  flush=True)
    if args.json:
        print(json.dumps(rows))
    bad = [r for r in rows if r["stack"] or r["local"] or not r["wgmma"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
