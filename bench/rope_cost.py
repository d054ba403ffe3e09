"""python -m bench.rope_cost: RoPE's two strategies in the static cost model (no GPU).

    python -m bench.rope_cost            # markdown table: S = 1k..128k, causal and not
    python -m bench.rope_cost --json

Both strategies are priced against ``pe="none"`` on an H200 (bf16, D = 128, MHA: the worst
case for the pass; GQA moves fewer K bytes):

* time of a kernel per 1k scores = max(issue cycles, tensor-core cycles): the hot loop's SASS
  warp-instructions per 1k scores (``bench.sass_loop``, sm_90, triton 3.6, causal) over 4
  schedulers, vs the wgmma cycles of its products (64 cycles per 1k scores and product at
  D = 128: 2 products forward, 4 dK/dV, 3 dQ); 132 SMs at 1.83 GHz (989 TFLOP/s dense bf16);
* "tile": RoPE's in-tile kernels; "once": pe="none"'s kernels (the same code: bench.sass_loop's
  "rope (once)" rows) plus the rotation passes, priced by the bytes they move at
  ``BANDWIDTH`` (4.0 TB/s: ~83 % of the H200's 4.8 TB/s HBM3e peak): forward, read Q and K
  and write Q', K' (2 bytes each); backward, the same again plus dQ back (fp32 read, bf16
  write) and dK back (bf16 read and write).

These are estimates: the in-tile extra is an upper bound (issue cycles may overlap the tensor
cores), the passes assume streaming bandwidth. ``bench/gpu_check.sh`` times both strategies
(POSATTN_ROPE=tile / once) so that a GPU run can move launch.ROPE_ONCE_MIN_VISITS.
"""
from __future__ import annotations

import argparse
import json
import sys

from posattn.kernels import launch  # noqa: F401  (the rule the table reports)

SMS, CLOCK, BANDWIDTH = 132, 1.83e9, 4.0e12
D = 128
GEMM_CYCLES = 64  # per 1k scores and product, D = 128
PRODUCTS = {"fwd": 2, "bwd_dkdv": 4, "bwd_dq": 3}
# SASS warp-instructions per 1k scores, sm_90, D=128, triton 3.6, causal (bench/results/static/
# sass_loop_sm90_d128_triton36.txt; docs/internals.md)
PER_1K = {"none": {"fwd": 246, "bwd_dkdv": 612, "bwd_dq": 295},
          "rope": {"fwd": 607, "bwd_dkdv": 1448, "bwd_dq": 624}}
SEQLENS = [1024 * 2 ** i for i in range(8)]


def kernel_time(pe: str, kernel: str, scores: float) -> float:
    cycles = max(PER_1K[pe][kernel] / 4, PRODUCTS[kernel] * GEMM_CYCLES)
    return scores / 1024 * cycles / (SMS * CLOCK)


def row(S: int, causal: bool, H: int = 32) -> dict:
    scores = H * S * S * (0.5 if causal else 1.0)
    none_f = kernel_time("none", "fwd", scores)
    none_b = kernel_time("none", "bwd_dkdv", scores) + kernel_time("none", "bwd_dq", scores)
    tile_f = kernel_time("rope", "fwd", scores)
    tile_b = kernel_time("rope", "bwd_dkdv", scores) + kernel_time("rope", "bwd_dq", scores)
    elems = S * H * D  # of Q, and of K (MHA)
    pass_f = (2 * elems * 2 + 2 * elems * 2) / BANDWIDTH
    pass_b = pass_f + (elems * (4 + 2) + elems * (2 + 2)) / BANDWIDTH
    rec = launch.KernelPE(rot="rope")
    rule = launch.rope_strategy(rec, launch.KernelPositions(), S, S, causal)
    return dict(S=S, causal=causal, fwd_tile=tile_f / none_f - 1, fwd_once=pass_f / none_f,
                fwdbwd_tile=(tile_f + tile_b) / (none_f + none_b) - 1,
                fwdbwd_once=(pass_f + pass_b) / (none_f + none_b), rule=rule,
                pass_fwd_us=pass_f * 1e6, none_fwd_us=none_f * 1e6)


def table() -> list:
    return [row(S, c) for c in (False, True) for S in SEQLENS]


def markdown(rows) -> str:
    out = ["| S | mask | fwd: tile | fwd: once | fwd+bwd: tile | fwd+bwd: once | rule |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = f"{r['S'] // 1024}k"
        out.append(f"| {s} | {'causal' if r['causal'] else 'full'} | +{r['fwd_tile']:.0%} | "
                   f"+{r['fwd_once']:.1%} | +{r['fwdbwd_tile']:.0%} | +{r['fwdbwd_once']:.1%} | {r['rule']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = table()
    print(json.dumps(rows) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
