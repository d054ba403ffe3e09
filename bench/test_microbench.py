"""pytest-benchmark microbenchmarks: ``pytest bench/ --benchmark-only`` (skipped without CUDA).

One shape, B=4 H=16 S=4096 D=128 bf16 causal: posattn with each PE, forward and
forward+backward, beside torch SDPA without PE. ``extra_info`` carries TFLOP/s (same FLOP
convention as ``python -m bench``). pytest-benchmark times on the host clock, so each round
ends with ``torch.cuda.synchronize()``; ``python -m bench`` (CUDA events) is the reference.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, H, S, D = 4, 16, 4096, 128
CAUSAL = True


def _flops(mode: str) -> float:
    from bench.plan import attention_flops

    return attention_flops(B, H, S, S, D, CAUSAL, mode)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn((B, H, S, D), generator=g, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    return q, k, v, dout


def _step(fwd, mode, leaves, dout):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fwd()
            torch.cuda.synchronize()
    else:
        def step():
            for t in leaves:
                t.grad = None
            fwd().backward(dout)
            torch.cuda.synchronize()
    return step


def _run(benchmark, fwd, mode, leaves, dout):
    step = _step(fwd, mode, leaves, dout)
    step()  # compile / autotune outside the timed rounds
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    if benchmark.disabled or benchmark.stats is None:  # --benchmark-disable, or under xdist:
        return  # pedantic ran the step once, a smoke test; there are no timings
    benchmark.extra_info["tflops_median"] = _flops(mode) / benchmark.stats.stats.median / 1e12
    benchmark.extra_info["shape"] = f"B={B} H={H} S={S} D={D} causal={CAUSAL} bf16"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("pe", ["none", "rope", "alibi", "kerple"])
def test_posattn(benchmark, inputs, pe, mode):
    import posattn
    from bench.peers import pe_spec

    q, k, v, dout = inputs
    leaves = [t.detach().requires_grad_(mode != "fwd") for t in (q, k, v)]
    spec = pe_spec(pe, H, q.device)
    benchmark.group = f"attention {mode}"
    _run(benchmark, lambda: posattn.attention(*leaves, spec, causal=CAUSAL, backend="triton"),
         mode, leaves, dout)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_sdpa_no_pe(benchmark, inputs, mode):
    import torch.nn.functional as F

    q, k, v, dout = inputs
    leaves = [t.detach().requires_grad_(mode != "fwd") for t in (q, k, v)]
    benchmark.group = f"attention {mode}"
    _run(benchmark, lambda: F.scaled_dot_product_attention(*leaves, is_causal=CAUSAL), mode, leaves, dout)
