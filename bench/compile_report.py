"""Static GPU report: compile every shipped kernel config for sm_90 and sm_80 on this (CPU) machine.

    python -m bench.compile_report              # table, both archs
    python -m bench.compile_report --arch 90    # Hopper only
    python -m bench.compile_report --json       # rows as JSON (used by tests/test_compile_static.py)

For each (kernel, PE, head dim, causal) it compiles the kernel with the tile config that
``posattn.kernels.configs.tile_config`` ships for that arch and reports registers per thread,
spills (cuobjdump's STACK / LOCAL), shared memory, and which tensor-core instruction the PTX
uses: ``wgmma.mma_async`` (Hopper's asynchronous MMA) on sm_90, ``mma.sync`` on sm_80.
A config passes when it spills nothing, uses the arch's tensor-core instruction and fits the
arch's shared memory (``SMEM_LIMIT``; the Ampere configs must also fit sm_86/sm_89, which
have 99 KiB per block, because ``tile_config`` gives them the same tiles as sm_80).
Needs no GPU: triton.compile with GPUTarget("cuda", arch, 32) and the cuobjdump that ships
inside triton's nvidia backend.

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

ARCHS = (90, 80)
MMA = {90: "wgmma.mma_async", 80: "mma.sync"}  # the tensor-core instruction each arch must use
SMEM_LIMIT = {90: 227 * 1024, 80: 99 * 1024}  # bytes per block; 80 stands for sm_80/86/89
KERNELS = {"fwd": attn_fwd_kernel, "bwd_dkdv": attn_bwd_dkdv_kernel, "bwd_dq": attn_bwd_dq_kernel}
PES = {"none": launch.PE_NONE, "rope": launch.PE_ROPE, "alibi": launch.PE_ALIBI,
       "kerple_log": launch.PE_KERPLE_LOG, "kerple_power": launch.PE_KERPLE_POWER}
# Pointer arguments and their element types (bf16 inputs); everything else is an int or float.
# "io" is the input dtype (q, k, v and everything of their shape).
POINTERS = {"Q": "io", "K": "io", "V": "io", "O": "io", "DO": "io",
            "DQ": "io", "DK_OUT": "io", "DV_OUT": "io", "LSE": "*fp32", "NLSE2": "*fp32",
            "DELTA": "*fp32",
            "QPOS": "*i32", "KPOS": "*i32", "THETA": "*fp64", "ROPE_TILES": "*fp32",
            "PA": "*fp32", "PB": "*fp32", "GPA": "*fp32", "GPB": "*fp32", "BIAS_F": "*fp32",
            "BIAS_G": "*fp32", "DREF": "*fp32", "O_PART": "*fp32", "LSE_PART": "*fp32"}
FLOATS = {"scale", "scale_log2", "rope_factor"}
# The forward's TMA descriptor arguments (launch.tma_descriptors): (rows, columns) of a block
DESCRIPTORS = {"KD": ("BLOCK_N", "BLOCK_A"), "VD": ("BLOCK_N", "BLOCK_DV")}


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def ck_pe_grad(kernel: str, pe: str, pe_grad) -> bool:
    """Whether a compile of ``kernel`` for ``pe`` carries the bias-parameter gradients: only
    dQ, only bias PEs; by default KERPLE (trainable r1, r2) and not ALiBi (fixed slopes)."""
    if pe_grad is None:
        pe_grad = pe.startswith("kerple")
    return bool(pe_grad) and kernel == "bwd_dq" and pe not in ("none", "rope")


def shipped_tile(kernel: str, pe: str, head_dim: int, causal: bool, arch: int,
                 dtype: str = "bf16", pe_grad=None, explicit: bool = False, tma=None,
                 center=None):
    """The TileConfig tile_config ships for this compile (pe: a key of PES; pe_grad, tma,
    center as in compile_kernel)."""
    kpe = launch.KernelPE(PES[pe], rot_dim=head_dim if pe == "rope" else 0)
    width = launch._layout_meta(kpe, head_dim, head_dim)[1]
    tma = uses_tma(kernel, pe, arch, dtype, explicit) if tma is None else tma
    roomy = launch.roomy_tile(launch.KernelPositions(qpos=torch.empty(0) if explicit else None),
                              centred(pe, explicit, center))
    return tile_config(kernel, width, causal, DTYPES[dtype], arch, launch._family(kpe),
                       ck_pe_grad(kernel, pe, pe_grad), explicit=roomy, tma=tma)


def launches(kernel: str, cfg) -> tuple:
    """The ``part`` of each launch a config makes: a split dK/dV tile is two ("dv", "dk")."""
    return ("dv", "dk") if kernel == "bwd_dkdv" and cfg.split else ("both",)


def variants(kernel: str, pe: str, cfg, explicit: bool) -> tuple:
    """The parts report() compiles for a config: its launches, and for the forward also its
    split-K variant where the launcher may split it (launch.split_allowed)."""
    split = kernel == "fwd" and launch.split_allowed(
        launch.KernelPE(PES[pe]), launch.KernelPositions(qpos=torch.empty(0) if explicit else None))
    return launches(kernel, cfg) + (("split",) if split else ())


def uses_tma(kernel: str, pe: str, arch: int, dtype: str = "bf16", explicit: bool = False) -> bool:
    """Whether the launcher loads the loop tiles through TMA here (launch.tma_planned),
    for 16-byte-aligned inputs as every benchmark makes them."""
    return kernel == "fwd" and launch.tma_planned(arch, launch.KernelPE(PES[pe]), DTYPES[dtype],
                                                  explicit)


def centred(pe: str, explicit: bool, center=None) -> bool:
    """Whether the compile centres its bias rows (launch.bias_refs): always for a bias PE with
    explicit positions; with contiguous ones only when queries lie outside the key range
    (int offsets), which the shipped rows do not assume unless ``center`` says so."""
    if center is None:
        center = explicit
    return bool(center) and pe not in ("none", "rope")


def compile_kernel(kernel: str, pe: str, head_dim: int, causal: bool, explicit: bool = False,
                   cfg=None, arch: int = 90, dtype: str = "bf16", pe_grad=None, part="both",
                   tma=None, center=None):
    """triton.compile one shipped config (or ``cfg``, a TileConfig to try) for ``arch``.

    explicit: explicit position tensors (RoPE then evaluates cos/sin per element, not per tile).
    dtype: the input dtype, a key of DTYPES. pe_grad: compile the dQ kernel with the bias
    parameters' gradients (default: KERPLE yes, ALiBi no, as most use them). part: for dK/dV,
    "both" or one launch of a split tile, "dv" or "dk" (configs.TileConfig.split); for the
    forward, "split" is its split-K variant (launch.split_count: decode steps).
    tma: load the loop tiles through TMA descriptors; default: where the launcher would
    (uses_tma). False on sm_90 compiles the pointer path its unaligned inputs take.
    center: centre the bias rows (see centred; default: with explicit positions).
    Returns (compiled kernel, TileConfig, seconds).
    """
    fn = KERNELS[kernel]
    kpe = launch.KernelPE(PES[pe], rot_dim=head_dim if pe == "rope" else 0)
    meta, width = launch._layout_meta(kpe, head_dim, head_dim)
    # ALiBi as most use it (fixed slopes: no PE gradient), KERPLE with trainable r1, r2 (the
    # dQ kernel then also accumulates the parameter gradients)
    pe_grad = ck_pe_grad(kernel, pe, pe_grad)
    tma = uses_tma(kernel, pe, arch, dtype, explicit) if tma is None else tma
    cfg = cfg or shipped_tile(kernel, pe, head_dim, causal, arch, dtype, pe_grad, explicit, tma,
                              center)
    # KERPLE with contiguous positions ships with its per-distance tables (launch._bias_tables)
    # at the sequence lengths that matter; explicit positions evaluate f in the tile.
    table = pe.startswith("kerple") and not explicit and not centred(pe, explicit, center)
    constexprs = dict(meta, PE=PES[pe], CAUSAL=causal, EXPLICIT_POS=explicit,
                      BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                      PREC=launch._prec(DTYPES[dtype]), BIAS_TABLE=table,
                      CENTER=centred(pe, explicit, center))
    if kernel == "bwd_dq":
        constexprs["NEED_PE_GRAD"] = pe_grad
    if kernel == "bwd_dkdv":
        constexprs.update(DO_DK=part in ("both", "dk"), DO_DV=part in ("both", "dv"))
    if kernel == "fwd":  # the default positive scale; part "split": a split-K launch
        constexprs.update(TMA=tma, FOLD_SCALE=launch.fold_scale(1.0), SPLIT=part == "split")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name == "DREF" and not constexprs["CENTER"]:  # the launcher passes None
            signature[name] = "constexpr"
            constexprs[name] = None
        elif name in DESCRIPTORS:
            if tma:
                rows, cols = (constexprs[n] for n in DESCRIPTORS[name])
                signature[name] = f"tensordesc<{dtype}[1, 1, {rows}, {cols}]>"
            else:  # the launcher passes None
                signature[name] = "constexpr"
                constexprs[name] = None
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name] = "constexpr"  # the head dim is contiguous: launches specialise it to 1
            constexprs[name] = 1
        elif name in POINTERS:
            signature[name] = "*" + dtype if POINTERS[name] == "io" else POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return ck, cfg, time.time() - t0


def compile_one(kernel: str, pe: str, head_dim: int, causal: bool, explicit: bool = False,
                cfg=None, arch: int = 90, dtype: str = "bf16", pe_grad=None, part="both",
                tma=None, center=None):
    """Compile one config (see compile_kernel) and return its report row."""
    tma = uses_tma(kernel, pe, arch, dtype, explicit) if tma is None else tma
    ck, cfg, seconds = compile_kernel(kernel, pe, head_dim, causal, explicit, cfg, arch, dtype,
                                      pe_grad, part, tma, center)
    pe_grad = ck_pe_grad(kernel, pe, pe_grad)
    ptx = ck.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout

    def field(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else None

    row = dict(arch=arch, dtype=dtype, kernel=kernel, pe=pe, head_dim=head_dim, causal=causal,
               explicit=explicit, pe_grad=pe_grad, part=part, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages, registers=field("REG"),
               stack=field("STACK"), local=field("LOCAL"), shared=ck.metadata.shared,
               mma=MMA[arch] in ptx, compile_s=round(seconds, 1), triton=triton.__version__,
               mma_util=None, tma=tma, center=centred(pe, explicit, center))
    if dtype != "fp32":  # useful / issued tensor-core FLOPs in the hot loop (bench.sass_loop)
        from bench.sass_loop import mma_utilisation
        row["mma_util"] = mma_utilisation(ck, kernel, cfg, head_dim, part)
    # fp32 inputs take IEEE fp32 dots (launch._prec): CUDA-core FMAs, no tensor-core instruction
    row["ok"] = ((row["mma"] or dtype == "fp32") and row["stack"] == 0 and row["local"] == 0
                 and row["shared"] <= SMEM_LIMIT[arch])
    return row


def shipped_configs(quick: bool = False, head_dims=(64, 128)):
    """(kernel, pe, head_dim, causal, explicit[, pe_grad[, center]]) to check: every PE causal
    with contiguous positions, plus non-causal without PE, and no PE, RoPE and KERPLE-power
    with explicit positions (the causal mask from position tensors; per-element cos/sin; int64
    position differences; centred bias rows); ALiBi and KERPLE-power with contiguous positions
    and centred rows (int offsets that put queries past the keys: launch.bias_refs); the dQ
    kernel also with the other gradient setting of each bias PE (trainable ALiBi, fixed
    KERPLE), which tile_config gives its own tile. quick: none / rope / kerple_power (the
    heaviest bias) only."""
    pes = ("none", "rope", "kerple_power") if quick else tuple(PES)
    for kernel in KERNELS:
        for head_dim in head_dims:
            for pe in pes:
                yield kernel, pe, head_dim, True, False
            yield kernel, "none", head_dim, False, False
            yield kernel, "none", head_dim, True, True
            yield kernel, "rope", head_dim, True, True
            yield kernel, "kerple_power", head_dim, True, True
            if not quick:
                yield kernel, "alibi", head_dim, True, False, None, True
                yield kernel, "kerple_power", head_dim, True, False, None, True
            if kernel == "bwd_dq" and not quick:
                yield kernel, "alibi", head_dim, True, False, True
                yield kernel, "alibi", head_dim, True, True, True
                yield kernel, "kerple_log", head_dim, True, False, False


def report(arch: int, quick: bool = False, head_dims=(64, 128), dtype: str = "bf16", echo=None):
    """Compile every shipped config for ``arch``; returns the rows. echo: called with each row."""
    rows = []
    for kernel, pe, hd, causal, explicit, *extra in shipped_configs(quick, head_dims):
        pe_grad, center = (list(extra) + [None, None])[:2]
        # where the forward's key tiles go through TMA, unaligned inputs take the pointer path
        # (launch.tma_ready), with the tile shipped for it: both are checked
        for tma in (True, False) if uses_tma(kernel, pe, arch, dtype, explicit) else (False,):
            cfg = shipped_tile(kernel, pe, hd, causal, arch, dtype, pe_grad, explicit, tma, center)
            for part in variants(kernel, pe, cfg, explicit):  # every launch is checked
                rows.append(compile_one(kernel, pe, hd, causal, explicit, cfg, arch, dtype,
                                        pe_grad, part, tma, center))
                if echo:
                    echo(rows[-1])
    return rows


def _print_row(r):
    util = "" if r.get("mma_util") is None else f"useful mma {100 * r['mma_util']:.0f}%  "
    pe = r["pe"] + ("+grad" if r.get("pe_grad") and r["pe"] == "alibi" else
                    "-grad" if r["pe"].startswith("kerple") and not r.get("pe_grad")
                    and r["kernel"] == "bwd_dq" else "")
    if r.get("center") and not r["explicit"]:
        pe += " centred"
    if r.get("part", "both") != "both":
        pe += f" [{r['part']}-K]" if r["part"] == "split" else f" [{r['part']}]"
    print(f"sm_{r['arch']} {r['kernel']:9s} {pe:15s} D={r['head_dim']:<4d} "
          f"causal={int(r['causal'])} pos={'explicit' if r['explicit'] else 'contig  '} "
          f"tile {r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']}"
          f"{' tma' if r.get('tma') else ''}  "
          f"regs {r['registers']:>3} stack {r['stack']} local {r['local']} smem {r['shared']:>6} "
          f"{'fp32 FMA dots' if r['dtype'] == 'fp32' else MMA[r['arch']].split('.')[0]} "
          f"{'' if r['dtype'] == 'fp32' else 'yes' if r['mma'] else 'NO'}  "
          f"{util}{'ok' if r['ok'] else 'FAIL'}  ({r['compile_s']}s)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--quick", action="store_true", help="none/rope/kerple_power only")
    ap.add_argument("--arch", type=int, choices=ARCHS, action="append",
                    help="compile for this arch only (repeatable; default: all of %(choices)s)")
    ap.add_argument("--head-dim", type=int, action="append", dest="head_dims",
                    help="head dims to check (repeatable; default 64 and 128)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    rows = []
    for arch in args.arch or ARCHS:
        if not args.json:
            print(f"sm_{arch} compile report, triton {triton.__version__}, {args.dtype}, "
                  f"shared memory limit {SMEM_LIMIT[arch] // 1024} KiB", flush=True)
        rows += report(arch, args.quick, tuple(args.head_dims or (64, 128)), args.dtype,
                       None if args.json else _print_row)
    if args.json:
        print(json.dumps(rows))
    bad = [r for r in rows if not r["ok"]]
    if bad and not args.json:
        print(f"{len(bad)} of {len(rows)} configs FAIL (spill, no tensor-core MMA, or too much "
              "shared memory)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
