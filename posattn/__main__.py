"""python -m posattn: the first thing to run.

1. Prints the environment (device, torch, triton, interpreter or compiled).
2. Runs every PE, forward and backward, through the Triton kernels and checks them against the
   float64 reference with flash-attention's rule: max|kernel - ref64| must be at most
   2x (3x for gradients) max|naive - ref64|, where "naive" is the same math done by the
   reference in the input dtype, plus a rounding floor (1 eps of the input dtype times
   max(1, max|ref|)), the rule the test suite uses (posattn.testing). Small odd shapes, GQA, a KV-cache
   (Sq < Sk) case, learnable ALiBi / KERPLE parameters. On a CPU-only machine this runs in the
   Triton interpreter (float16; the interpreter's bfloat16 dot is broken), on a GPU compiled
   (bfloat16).
3. On a GPU, times posattn against torch SDPA without a PE (one shape; ``python -m bench`` for more).

Exit status 1 if any check fails. Options: ``--pe rope,alibi`` (subset), ``--no-bench``,
``--dtype``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from posattn._env import interpreter_on  # imports no triton


def select_device() -> tuple:
    """(device, interpreted). Without CUDA, switch Triton to its interpreter (TRITON_INTERPRET=1).

    Must run before anything imports triton: posattn imports it only on the first Triton call.
    A user who sets TRITON_INTERPRET=1 on a GPU machine gets the interpreter on the CPU.
    """
    interpreted = interpreter_on()
    if not interpreted and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        interpreted = True
    return ("cpu" if interpreted else "cuda"), interpreted


import posattn  # noqa: E402  (after the function above is defined; importing posattn loads no triton)
from posattn import reference  # noqa: E402
from posattn.positions import parse_positions  # noqa: E402
from posattn.testing import error_tolerance  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Correctness checks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One check: a PE (built fresh per precision by ``make_pe``), a shape, a mask."""

    pe: str
    label: str
    make_pe: Callable  # (params or None) -> PE spec
    params: Sequence[Sequence[float]] = ()  # learnable per-head parameters (base values)
    B: int = 1
    Hq: int = 2
    Hkv: int = 2
    Sq: int = 47
    Sk: int = 47
    D: int = 32
    causal: bool = True

    def shape(self) -> str:
        heads = f"H{self.Hq}" if self.Hq == self.Hkv else f"H{self.Hq}/{self.Hkv}"
        s = f"S{self.Sq}" if self.Sq == self.Sk else f"Sq{self.Sq} Sk{self.Sk}"
        return f"B{self.B} {heads} {s} D{self.D} {'causal' if self.causal else 'full'}"


def _yarn():
    return posattn.RoPE(scaling=posattn.YaRN(4.0, 32))


CASES: List[Case] = [
    Case("none", "no PE", lambda p: posattn.NoPE(), B=2, Sq=67, Sk=67, causal=False),
    Case("none", "no PE, GQA", lambda p: posattn.NoPE(), Hq=4, Hkv=2, Sq=50, Sk=50),
    Case("rope", "RoPE + YaRN(4, 32), GQA", lambda p: _yarn(), Hq=4, Hkv=2, Sq=70, Sk=70),
    Case("rope", "RoPE interleaved, rotary_dim 16", lambda p: posattn.RoPE(rotary_dim=16, interleaved=True),
         Sq=33, Sk=33, causal=False),
    Case("alibi", "ALiBi, learnable slopes, KV cache", lambda p: posattn.ALiBi(p[0]),
         params=[[0.5, 0.125]], Sq=33, Sk=70),
    Case("alibi", "ALiBi, default slopes", lambda p: posattn.ALiBi(), Sq=61, Sk=61, causal=False),
    Case("kerple", "KERPLE log, learnable r1, r2", lambda p: posattn.KERPLE("log", p[0], p[1]),
         params=[[1.5, 0.7], [0.8, 0.2]], Sq=65, Sk=65),
    Case("kerple", "KERPLE power, learnable r1, r2", lambda p: posattn.KERPLE("power", p[0], p[1]),
         params=[[0.9, 0.4], [0.6, 1.3]], Sq=47, Sk=47, causal=False),
]


@dataclass
class Check:
    case: Case
    errors: dict = field(default_factory=dict)  # name -> (err, tol)
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.note and bool(self.errors) and all(e <= t for e, t in self.errors.values())

    def worst(self, names) -> tuple:
        """(name, err, tol) of the entry among ``names`` closest to (or furthest past) its bound."""
        items = [(n, *self.errors[n]) for n in names if n in self.errors]
        if not items:
            return ("", math.nan, math.nan)
        return max(items, key=lambda it: it[1] / it[2] if it[2] > 0 else math.inf)


tolerance = error_tolerance  # the rule the test suite applies (posattn.testing)


def triton_attention(q, k, v, spec, causal):
    return posattn.attention(q, k, v, spec, causal=causal, backend="triton")


def _inputs(case: Case, dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(case.B, case.Hq, case.Sq, case.D), (case.B, case.Hkv, case.Sk, case.D),
              (case.B, case.Hkv, case.Sk, case.D), (case.B, case.Hq, case.Sq, case.D)]
    q, k, v, dout = (torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)
    return q, k, v, dout


def _run(case, attn, q, k, v, dout, param_dtype, device):
    """Forward + backward of one precision; returns {name: tensor} (out and every gradient)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    params = [torch.tensor(p, dtype=param_dtype, device=device, requires_grad=True) for p in case.params]
    out = attn(q, k, v, case.make_pe(params), case.causal)
    out.backward(dout.to(out.dtype))
    res = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for i, p in enumerate(params):
        res[f"d{_param_names(case)[i]}"] = p.grad
    return res


def _param_names(case: Case) -> List[str]:
    return ["slopes"] if case.pe == "alibi" else ["r1", "r2"]


def check_case(case: Case, dtype, device, attn: Callable = triton_attention, seed: int = 0) -> Check:
    """Kernel (``attn``) vs the float64 reference, bounded by the naive in-dtype error."""
    chk = Check(case)
    q, k, v, dout = _inputs(case, dtype, device, seed)
    scale = 1.0 / math.sqrt(case.D)
    qpos = parse_positions(None, "q_positions", case.B, case.Sq, case.Sk - case.Sq, device)
    kpos = parse_positions(None, "k_positions", case.B, case.Sk, 0, device)

    def naive(q_, k_, v_, spec, causal):
        return reference.attention_bhsd(q_, k_, v_, spec, causal=causal, scale=scale, q_pos=qpos,
                                        k_pos=kpos, compute_dtype=dtype)[0]

    def ref64(q_, k_, v_, spec, causal):
        return posattn.attention(q_, k_, v_, spec, causal=causal, backend="reference")

    try:
        got = _run(case, attn, q, k, v, dout, torch.float32, device)
    except Exception as e:  # noqa: BLE001 - a broken kernel is a failed check, not a crash
        chk.note = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]
        return chk
    nai = _run(case, naive, q, k, v, dout, torch.float32, device)
    ref = _run(case, ref64, q.double(), k.double(), v.double(), dout.double(), torch.float64, device)
    for name, r in ref.items():
        g, n = got.get(name), nai[name]
        if g is None:
            chk.note = f"no gradient for {name}"
            return chk
        if g.shape != r.shape:
            chk.note = f"{name} has shape {tuple(g.shape)}, expected {tuple(r.shape)}"
            return chk
        err = float((g.double() - r).abs().max()) if r.numel() else 0.0
        if not math.isfinite(err):
            err = math.inf
        naive_err = float((n.double() - r).abs().max()) if r.numel() else 0.0
        chk.errors[name] = (err, tolerance(naive_err, r, dtype, 2.0 if name == "out" else 3.0))
    return chk


def _fmt_err(err: float, tol: float) -> str:
    return "—" if math.isnan(err) else f"{err:.1e} ≤ {tol:.1e}" if err <= tol else f"{err:.1e} > {tol:.1e}"


def check_table(checks: List[Check]) -> str:
    rows = [("PE", "case", "shape", "forward max err", "backward max err (worst)", "result")]
    for c in checks:
        _, fe, ft = c.worst(["out"])
        gname, ge, gt = c.worst([n for n in c.errors if n != "out"])
        back = "—" if not gname else f"{_fmt_err(ge, gt)} ({gname})"
        result = "PASS" if c.passed else ("FAIL: " + c.note if c.note else "FAIL")
        rows.append((c.case.pe, c.case.label, c.case.shape(), _fmt_err(fe, ft), back, result))
    return _render(rows)


def _render(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Short benchmark (GPU)
# ---------------------------------------------------------------------------------------------

BENCH_PES = [("none", lambda H: posattn.NoPE()), ("rope+YaRN", lambda H: _yarn()),
             ("alibi", lambda H: posattn.ALiBi()),
             ("kerple-log", lambda H: posattn.KERPLE("log", 1.0, 0.5))]


def _time_ms(fn, leaves) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, grad_to_none=leaves, return_mode="median"))


def bench_table(B=4, H=16, S=4096, D=128, causal=True, dtype=torch.bfloat16) -> str:
    """posattn (each PE) vs torch SDPA without PE (its default backend choice), one shape."""
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn((B, H, S, D), generator=g, device="cuda", dtype=dtype) for _ in range(4))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    impls = [("SDPA (no PE)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))]
    for name, make in BENCH_PES:
        spec = make(H)
        impls.append((f"posattn {name}", lambda spec=spec: posattn.attention(q, k, v, spec, causal=causal)))
    times = {}
    rows = [("implementation", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "vs SDPA fwd / fwd+bwd")]
    for name, fwd in impls:
        try:
            with torch.no_grad():
                tf = _time_ms(fwd, None)

            def step(fwd=fwd):
                fwd().backward(dout)
            tb = _time_ms(step, leaves)
        except Exception as e:  # noqa: BLE001
            rows.append((name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", "", "", ""))
            continue
        times[name] = (tf, tb)
        base = times.get("SDPA (no PE)")
        ratio = f"{base[0] / tf:.2f}× / {base[1] / tb:.2f}×" if base else "—"
        rows.append((name, f"{tf:.3f}", f"{flops / tf / 1e9:.0f}", f"{tb:.3f}", f"{3.5 * flops / tb / 1e9:.0f}", ratio))
    title = (f"B={B} H={H} S={S} D={D} {'causal' if causal else 'full'} {str(dtype).replace('torch.', '')}; "
             "FLOPs 4·B·H·S²·D (×0.5 causal, ×3.5 fwd+bwd); ratio > 1: faster than SDPA without PE")
    return title + "\n" + _render(rows)


# ---------------------------------------------------------------------------------------------


def environment_lines(device: str, interpreted: bool, dtype) -> List[str]:
    import triton  # after select_device(): TRITON_INTERPRET is already decided

    if device == "cuda":
        dev = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        dev = "CPU" + ("" if torch.cuda.is_available() else " (no CUDA device)")
    mode = "Triton interpreter (TRITON_INTERPRET=1)" if interpreted else "compiled Triton kernels"
    return [f"posattn {posattn.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
            f"triton {triton.__version__}",
            f"device: {dev}; running: {mode}; checks in {str(dtype).replace('torch.', '')}"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m posattn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pe", help="comma list of PEs to check (none,rope,alibi,kerple); default all")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                    help="default: bfloat16 compiled, float16 in the interpreter")
    ap.add_argument("--no-bench", action="store_true", help="skip the GPU timing table")
    args = ap.parse_args(argv)
    names = {c.pe for c in CASES}
    args.pe = [p.strip() for p in args.pe.split(",")] if args.pe else sorted(names)
    bad = [p for p in args.pe if p not in names]
    if bad:
        ap.error(f"unknown PE {bad}; choose from {sorted(names)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    device, interpreted = select_device()  # first: before anything imports triton
    args = parse_args(argv)
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.float16 if interpreted else torch.bfloat16
    if interpreted and dtype == torch.bfloat16:
        print("note: the Triton interpreter's bfloat16 tl.dot is wrong; expect bfloat16 checks to fail there")
    print("\n".join(environment_lines(device, interpreted, dtype)))
    print()

    t0 = time.perf_counter()
    checks = []
    for case in (c for c in CASES if c.pe in args.pe):
        checks.append(check_case(case, dtype, device))
        print(f"  checked {case.pe:<7} {case.label:<36} {'PASS' if checks[-1].passed else 'FAIL'}", flush=True)
    print()
    print(check_table(checks))
    failed = [c for c in checks if not c.passed]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed "
          f"(forward ≤ 2×, gradients ≤ 3× the naive {str(dtype).replace('torch.', '')} error vs float64, "
          f"+ 1 eps·max(1, |ref|)) in {time.perf_counter() - t0:.1f} s")

    if device == "cuda" and not args.no_bench:
        print()
        try:
            print(bench_table())
        except Exception as e:  # noqa: BLE001 - the timing table is informative, not a check
            print(f"benchmark skipped: {type(e).__name__}: {e}")
        print("\nMore: python -m bench --quick (or the full sweep: python -m bench)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
