"""Static cost of each PE: the instruction mix of the kernels' hot loop in SASS, next to pe="none".

    python -m bench.sass_loop                 # sm_90, D=128, every kernel, causal and not
    python -m bench.sass_loop --arch 80 --head-dim 64 --json

On a GPU the question "is every PE within 5 % of pe='none'?" is answered by ``python -m bench``.
Without one, this is the proxy: at D=128 the forward's 8 warps issue about as many instructions
per key tile as the tensor cores need cycles for its two MMAs, so a PE's extra per-element
instructions (and extra MUFU ops, the quarter-rate unit exp2 already loads) show up as time
unless the scheduler hides them. The report counts, per loop iteration of one warp:

  instr   every SASS instruction in the loop body (the unmasked key / query tiles: see hot_loop)
  mma     HGMMA (sm_90) or HMMA (sm_80): tensor-core instructions
  mufu    MUFU: ex2 / lg2 / rcp on the special-function unit
  fp64    DFMA / DMUL / DADD (RoPE's tile-start angle)
  smem    LDS / STS / LDSM / STSM
  per 1k  instr x warps x 1024 / (BLOCK_M x BLOCK_N): warp instructions per 1024 scores, the
          comparable number when a PE ships with a different tile than pe="none"
  vs none per 1k / per 1k of pe="none" for the same kernel and mask
  tile    BLOCK_M x BLOCK_N; a trailing "s": a split dK/dV tile, whose two launches' loops are
          counted together
  mma%    useful / issued tensor-core FLOPs per iteration. Useful: the kernel's GEMMs on one
          tile (forward 2, dK/dV 4, dQ 3, each BLOCK_M x BLOCK_N x D). Issued: the sum over
          the loop's HGMMA m64nNk16 (2*64*N*16 per warpgroup) or HMMA m16n8k16 (per warp).
          Below 100 % the warps compute something twice: with 8 warps (two warpgroups) and a
          64-row MMA side, Triton gives each warpgroup the whole S tile (the A operand of the
          next product must live in the warpgroup's registers), so S and dP are computed, and
          softmax'd, twice.

The loop is found as the shortest backward-branch body that holds tensor-core instructions:
every kernel has an unmasked and a masked loop over tiles, the masked one is the unmasked one
plus the mask, and at the sequence lengths that matter nearly every tile is unmasked.
ALiBi is compiled with fixed slopes (no PE gradient), KERPLE with trainable r1, r2.
Compiles with bench.compile_report's shipped configs; needs no GPU.
"""
import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile

from posattn.kernels.configs import KERNELS  # torch only: safe under TRITON_INTERPRET

# every registered PE (posattn.pe: torch only, safe under TRITON_INTERPRET)
from posattn.pe import registered  # noqa: E402

PES = registered()
CLASSES = {"HGMMA": "mma", "HMMA": "mma", "MUFU": "mufu", "DFMA": "fp64", "DMUL": "fp64",
           "DADD": "fp64", "LDS": "smem", "STS": "smem", "LDSM": "smem", "STSM": "smem"}


def sass_of(ck) -> str:
    from bench.compile_report import _cuobjdump  # compiles real kernels: imported only here

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        return subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def opcode(text: str) -> str:
    """'@!P2 HGMMA.64x64x16.F32.BF16 R24, ...' -> 'HGMMA'."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def hot_loop(sass: str, raw: bool = False):
    """Opcodes (raw: the instruction texts) of the shortest loop body (backward branch) that
    contains tensor-core MMAs: the unmasked loop. (The kernels' source order differs: dK/dV
    runs its masked tiles first.)"""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            if any(opcode(t) in ("HGMMA", "HMMA") for t in body):
                loops.append(body)
    body = min(loops, key=len) if loops else []
    return body if raw else [opcode(t) for t in body]


GEMMS = {"fwd": 2, "bwd_dkdv": 4, "bwd_dq": 3}  # BLOCK_M x BLOCK_N x D products per tile
# a split dK/dV tile (configs.TileConfig.split): the dV launch does S and P^T dO, the dK launch
# S, dP and dS^T Q; together they are the 4 products (S twice is the price of the split)
PART_GEMMS = {"both": None, "dv": 2, "dk": 3, "split": None}


def useful_flops(kernel: str, cfg, head_dim: int, part: str = "both") -> float:
    return 2.0 * (PART_GEMMS[part] or GEMMS[kernel]) * cfg.BLOCK_M * cfg.BLOCK_N * head_dim


def issued_mma_flops(body_text, num_warps: int) -> float:
    """Tensor-core FLOPs the loop body issues per iteration, all warps together."""
    total = 0.0
    for t in body_text:
        m = re.search(r"\bHGMMA\.(\d+)x(\d+)x(\d+)", t)
        if m:  # one wgmma per warpgroup; each of its 4 warps lists it
            total += 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) * num_warps / 4
        elif re.search(r"\bHMMA\.16816", t):  # one mma.sync m16n8k16 per warp
            total += 2 * 16 * 8 * 16 * num_warps
    return total


def _utilisation(body_text, kernel: str, cfg, head_dim: int, part: str = "both"):
    """Useful / issued tensor-core FLOPs of a loop body (None when it has no MMA)."""
    issued = issued_mma_flops(body_text, cfg.num_warps)
    return round(useful_flops(kernel, cfg, head_dim, part) / issued, 2) if issued else None


def mma_utilisation(ck, kernel: str, cfg, head_dim: int, part: str = "both"):
    """Useful / issued tensor-core FLOPs in the hot loop of compiled kernel ``ck`` (None
    when the loop has no MMA). part: which launch of a split dK/dV tile ``ck`` is."""
    return _utilisation(hot_loop(sass_of(ck), raw=True), kernel, cfg, head_dim, part)


def loop_row(kernel: str, pe: str, head_dim: int, causal: bool, arch: int, cfg=None, **opts):
    """One table row. A split dK/dV tile counts both launches' loops (instr and per 1k are
    their sums; mma% is over both). opts: window / softcap / varlen (compile_report)."""
    from bench.compile_report import compile_kernel, launches, shipped_tile

    cfg = cfg or shipped_tile(kernel, pe, head_dim, causal, arch, **opts)
    text = []
    for part in launches(kernel, cfg):
        ck, _, _ = compile_kernel(kernel, pe, head_dim, causal, cfg=cfg, arch=arch, part=part,
                                  **opts)
        text += hot_loop(sass_of(ck), raw=True)
    body = [opcode(t) for t in text]
    cls = collections.Counter(CLASSES.get(op, "other") for op in body)
    per_k = len(body) * cfg.num_warps * 1024 / (cfg.BLOCK_M * cfg.BLOCK_N)
    tile = f"{cfg.BLOCK_M}x{cfg.BLOCK_N}" + ("s" if cfg.split else "")
    return dict(arch=arch, kernel=kernel, pe=pe, head_dim=head_dim, causal=causal,
                tile=tile, num_warps=cfg.num_warps, instr=len(body),
                mma=cls["mma"], mufu=cls["mufu"], fp64=cls["fp64"], smem=cls["smem"],
                per_kscore=round(per_k), mma_util=_utilisation(text, kernel, cfg, head_dim))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=(80, 90))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--geometry", action="store_true",
                    help="also the window / softcap / varlen variants (compile_report.GEOMETRY_ROWS)")
    args = ap.parse_args(argv)
    rows = []
    if not args.json:
        import triton

        print(f"hot-loop instructions per iteration per warp, sm_{args.arch}, D={args.head_dim}, "
              f"bf16, triton {triton.__version__}")
        print(f"{'kernel':9s} {'causal':6s} {'pe':13s} {'tile':7s} {'warps':>5s} {'instr':>5s} "
              f"{'mma':>4s} {'mufu':>4s} {'fp64':>4s} {'smem':>4s} {'per 1k':>6s} {'vs none':>7s} "
              f"{'mma%':>5s}")
    for kernel in KERNELS:
        for causal in (False, True):
            base = None
            # RoPE under the rotate-once strategy (launch.rope_strategy): pe="none"'s kernels
            for pe, opts in [(pe, {}) for pe in PES] + [("rope", dict(rope="once"))]:
                r = loop_row(kernel, pe, args.head_dim, causal, args.arch, **opts)
                if opts:
                    r["pe"] = pe = "rope (once)"
                base = base or r["per_kscore"]
                r["vs_none"] = round(r["per_kscore"] / base, 2) if base else None
                rows.append(r)
                if not args.json:
                    print(f"{kernel:9s} {int(causal):<6d} {pe:13s} {r['tile']:7s} "
                          f"{r['num_warps']:5d} {r['instr']:5d} {r['mma']:4d} {r['mufu']:4d} "
                          f"{r['fp64']:4d} {r['smem']:4d} {r['per_kscore']:6d} "
                          f"{r['vs_none']:7.2f} {100 * (r['mma_util'] or 0):4.0f}%", flush=True)
    if args.geometry:  # the window / softcap / varlen variants (compile_report.GEOMETRY_ROWS)
        from bench.compile_report import GEOMETRY_ROWS

        for kernel in KERNELS:
            for pe, causal, explicit, opts in GEOMETRY_ROWS:
                if explicit:
                    continue
                r = loop_row(kernel, pe, args.head_dim, causal, args.arch, **opts)
                r.update(opts=opts)
                rows.append(r)
                if not args.json:
                    tag = " ".join(f"{k}={v}" for k, v in opts.items())
                    print(f"{kernel:9s} {int(causal):<6d} {pe:13s} {r['tile']:7s} "
                          f"{r['num_warps']:5d} {r['instr']:5d} {r['mma']:4d} {r['mufu']:4d} "
                          f"{r['fp64']:4d} {r['smem']:4d} {r['per_kscore']:6d} {'':7s} "
                          f"{100 * (r['mma_util'] or 0):4.0f}%  {tag}", flush=True)
    if args.geometry:  # attention_with_kvcache's forward: paged (16-token pages), and its
        # decode step with the GQA group packed into the rows (compile_report.KVCACHE_ROWS)
        for pe in PES:
            for decode in (0, 1):
                r = loop_row("fwd", pe, args.head_dim, True, args.arch, kvcache=16, decode=decode)
                r.update(opts=dict(kvcache=16, decode=decode))
                rows.append(r)
                if not args.json:
                    print(f"{'fwd':9s} {1:<6d} {pe:13s} {r['tile']:7s} "
                          f"{r['num_warps']:5d} {r['instr']:5d} {r['mma']:4d} {r['mufu']:4d} "
                          f"{r['fp64']:4d} {r['smem']:4d} {r['per_kscore']:6d} {'':7s} "
                          f"{100 * (r['mma_util'] or 0):4.0f}%  kvcache page16"
                          + (" decode1" + (" (GQA packed)" if pe != "t5" else "") if decode else ""),
                          flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
