"""CPU-side performance guard: every shipped kernel config compiles for Hopper (sm_90) with
wgmma and for Ampere (sm_80) with mma.sync, without register spills and within the arch's
shared memory (99 KiB for the Ampere table, so sm_86/89 run it too), and without issuing any
tensor-core work twice (bench.sass_loop's mma%). Runs
bench.compile_report in a subprocess because it compiles real kernels, which the interpreter
(set by conftest) would replace. One test per arch, so pytest-xdist compiles each arch once,
on its own worker.

CI compiles a pairwise cover (bench.compile_report --half: every config at each head dim for
one of the two archs, each arch at one head dim per config), half the work of the whole
matrix, which CUDA machines and POSATTN_STATIC_FULL=1 run (and bench/results/static records)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from posattn.pe import axes, registered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FULL = os.environ.get("POSATTN_STATIC_FULL") == "1" or torch.cuda.is_available()


def _report(arch: int):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # no TRITON_DEFAULT_FP_FUSION: every launch asks for FMA fusion itself (launch.FP_FUSION)
    half = [] if FULL else ["--half", "0" if arch == 90 else "1"]
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", "--json", "--arch", str(arch)]
                          + half, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert lines, f"compile_report printed no JSON (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("arch,mma,smem_kib", [(90, "wgmma", 227), (80, "mma.sync", 99)])
def test_shipped_configs_compile_clean(arch, mma, smem_kib):
    rows = _report(arch)
    kinds = {(r["kernel"], r["head_dim"]) for r in rows}
    assert kinds == {(k, d) for k in ("fwd", "bwd_dkdv", "bwd_dq") for d in (64, 128)}
    assert {r["pe"] for r in rows} == set(registered())  # every registered PE
    assert {r["arch"] for r in rows} == {arch}
    # the verdict, spelled out here rather than trusting the report's own "ok"
    bad = [r for r in rows if not r["mma"] or r["stack"] != 0 or r["local"] != 0
           or r["shared"] > smem_kib * 1024]
    assert not bad, f"sm_{arch} configs that spill, miss {mma} or overflow {smem_kib} KiB:\n" + \
        "\n".join(map(str, bad))
    assert all(r["ok"] for r in rows)
    # No tensor-core work issued twice (kernels/configs.py: the S side of every product gets
    # its own rows per warpgroup / warp). The one documented exception: the RoPE family's dK/dV
    # at D=128 on sm_80 (RoPE, xPos), where every tile that avoids it spills (sm_90 runs it
    # split instead).
    dup = [r for r in rows if r["mma_util"] != 1.0
           and not (arch == 80 and r["kernel"] == "bwd_dkdv" and r["head_dim"] == 128
                    and axes(r["pe"])[2] == "rope")]
    assert not dup, f"sm_{arch} configs that compute S / dP twice (useful MMA < 100 %):\n" + \
        "\n".join(f"{r['kernel']} {r['pe']} D={r['head_dim']} {r['BLOCK_M']}x{r['BLOCK_N']} "
                  f"w{r['num_warps']}: {r['mma_util']}" for r in dup)



SASS_SNIPPET = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   FMUL R3, R2, R2 ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0060*/                   MUFU.EX2 R5, R3 ;
        /*0070*/              @!P1 BRA 0x40 ;
        /*0080*/                   EXIT ;
"""

# Two MMA loops, the longer (masked: an extra FSEL) first, as the dK/dV kernel compiles.
SASS_TWO_LOOPS = """
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0010*/                   FSEL R3, R3, -INF , !P2 ;
        /*0020*/                   MUFU.EX2 R5, R3 ;
        /*0030*/               @P0 BRA 0x0 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/                   MUFU.EX2 R5, R3 ;
        /*0060*/              @!P1 BRA 0x40 ;
        /*0070*/                   EXIT ;
"""


def test_sass_loop_finds_the_mma_loop():
    """bench.sass_loop's parser: the hot loop is the shortest backward-branch body that holds a
    tensor-core MMA (the loop at 0x10 has none and is skipped; of two MMA loops the unmasked,
    shorter one wins wherever it sits); predicates and modifiers are stripped from opcodes."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.sass_loop import hot_loop, opcode

    assert opcode("@!P1 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24") == "HGMMA"
    assert hot_loop(SASS_SNIPPET) == ["FMUL", "HGMMA", "MUFU", "BRA"]
    assert hot_loop(SASS_SNIPPET.replace("HGMMA.64x64x16.F32.BF16", "FADD")) == []
    assert hot_loop(SASS_TWO_LOOPS) == ["HGMMA", "MUFU", "BRA"]


def test_issued_mma_flops_counts_each_wgmma_once_per_warpgroup():
    """mma%: a wgmma m64nNk16 is listed by each of its warpgroup's 4 warps but runs once;
    mma.sync m16n8k16 runs per warp."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.sass_loop import issued_mma_flops

    wg = ["HGMMA.64x32x16.F32.BF16 R104, gdesc[UR44], R104"]
    assert issued_mma_flops(wg, 8) == 2 * 64 * 32 * 16 * 2
    assert issued_mma_flops(wg * 3 + ["FADD R1, R2, R3"], 4) == 3 * 2 * 64 * 32 * 16
    assert issued_mma_flops(["HMMA.16816.F32.BF16 R4, R8, R12, R4"], 8) == 2 * 16 * 8 * 16 * 8


def test_rope_pass_compiles_clean():
    """The RoPE rotate-once pass (launch.rope_apply) for sm_90 and sm_80: no spills, every
    rotary layout, both directions (bench.compile_report --rope-pass)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", "--json", "--rope-pass"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert lines, f"compile_report --rope-pass printed no JSON (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    rows = json.loads(lines[-1])
    assert {r["arch"] for r in rows} == {90, 80} and len(rows) == 16
    bad = [r for r in rows if r["stack"] != 0 or r["local"] != 0]
    assert not bad, bad
