"""CPU-side performance guard: every shipped kernel config compiles for Hopper (sm_90) with
wgmma and without register spills. Runs bench.compile_report in a subprocess because it
compiles real kernels, which the interpreter (set by conftest) would replace."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; fusion is the default
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert lines, f"compile_report printed no JSON (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_covers_shipped_configs(report):
    kinds = {(r["kernel"], r["head_dim"]) for r in report}
    assert kinds == {(k, d) for k in ("fwd", "bwd_dkdv", "bwd_dq") for d in (64, 128)}
    assert {r["pe"] for r in report} == {"none", "rope", "alibi", "kerple_log", "kerple_power"}


def test_wgmma_and_no_spills(report):
    bad = [r for r in report if not r["wgmma"] or r["stack"] != 0 or r["local"] != 0]
    assert not bad, "configs that spill or miss wgmma:\n" + "\n".join(map(str, bad))


def test_fits_shared_memory(report):
    # H100/H200: 227 KiB of shared memory per block at most
    assert max(r["shared"] for r in report) <= 227 * 1024
