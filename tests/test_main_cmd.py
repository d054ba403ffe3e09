"""The main command (python -m posattn) and the CPU-side pieces of the benchmark (python -m bench).

Fast: the benchmark's peers are checked against the reference on tiny CPU shapes (so the GPU
comparison compares the same function), the report is rendered from synthetic rows, the CLIs
run as subprocesses. One subprocess runs the main command for one PE in the Triton interpreter.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not installed; it runs from the repository root
    sys.path.insert(0, str(ROOT))

import posattn  # noqa: E402
from bench import peers, plan, report  # noqa: E402
from bench.measure import classify_failure  # noqa: E402
from posattn import __main__ as main_cmd  # noqa: E402  (importing it sets nothing)
from posattn.positions import parse_positions  # noqa: E402


def _run(args, timeout=240, env=None):
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


def _ref(q, k, v, spec, causal):
    return posattn.attention(q, k, v, spec, causal=causal, backend="reference")


# ---------------------------------------------------------------------------------------------
# FLOPs and the plan
# ---------------------------------------------------------------------------------------------


def test_flop_convention():
    f = 4 * 2 * 3 * 5 * 7 * 11
    assert plan.attention_flops(2, 3, 5, 7, 11, False, "fwd") == f
    assert plan.attention_flops(2, 3, 5, 7, 11, True, "fwd") == 0.5 * f
    assert plan.attention_flops(2, 3, 5, 7, 11, False, "bwd") == 2.5 * f
    assert plan.attention_flops(2, 3, 5, 7, 11, True, "fwd+bwd") == 0.5 * 3.5 * f
    with pytest.raises(ValueError):
        plan.attention_flops(1, 1, 1, 1, 1, False, "backward")


def test_shapes_keep_tokens_constant():
    shapes = plan.make_shapes([512, 16384], [64, 128], [False, True], ["fwd", "fwd+bwd"])
    assert len(shapes) == 16
    assert {s.B * s.S for s in shapes} == {16384}
    assert [s.S for s in plan.make_shapes([512, 4096], [128], [True], ["fwd"], largest_first=True)] == [4096, 512]
    assert plan.parse_int_list("512,1k,16k") == [512, 1024, 16384]


def test_every_pe_has_posattn_and_a_peer():
    for pe in plan.ALL_PES:
        impls = peers.impls_for(pe)
        assert impls[0].name == "posattn"
        assert any(i.role != "posattn" for i in impls)


def test_bench_cli_dry_run():
    res = _run(["-m", "bench", "--quick", "--dry-run"], timeout=120)
    assert res.returncode == 0, res.stderr
    assert "S=8192" in res.stdout and "mask+sdpa-efficient" in res.stdout and "flex" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_cli_without_gpu_says_why(capsys, tmp_path):
    import bench.__main__ as cli

    assert cli.main(["--quick", "--out", str(tmp_path / "none")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_bench_cli_rejects_unknown_pe(capsys):
    import bench.__main__ as cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--pes", "t5"])
    assert "unknown PE" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The peers compute the same function as posattn (CPU, float64 / float32)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pe", ["alibi", "kerple"])
@pytest.mark.parametrize("causal", [False, True])
def test_materialised_mask_matches_reference(pe, causal):
    H, S, D = 3, 19, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = peers.materialised_bias(pe, H, S, causal, torch.float64, "cpu")
    assert mask.shape == (1, H, S, S)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = _ref(q, k, v, peers.pe_spec(pe, H, "cpu"), causal)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_unfused_rope_matches_reference(causal):
    H, S, D = 2, 23, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    cos, sin = peers.rope_tables(S, D, torch.float64, "cpu")
    qr, kr = peers.apply_rotary(q, k, cos, sin)
    got = torch.nn.functional.scaled_dot_product_attention(qr, kr, v, is_causal=causal)
    want = _ref(q, k, v, peers.pe_spec("rope", H, "cpu"), causal)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pe", ["none", "alibi", "kerple"])
@pytest.mark.parametrize("causal", [False, True])
def test_flex_score_mod_matches_reference(pe, causal):
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    H, S, D = 2, 32, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, H, S, D, generator=g) for _ in range(3))
    score_mod, params = peers.flex_score_mod(pe, H, "cpu")
    assert params == []
    block_mask = fa.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cpu") if causal else None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": eager is what we test here
        got = fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    want = _ref(q.double(), k.double(), v.double(), peers.pe_spec(pe, H, "cpu"), causal)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check (stubs the CUDA calls)")
def test_bench_run_loop_on_cpu(monkeypatch, tmp_path):
    """The whole measuring loop on CPU with the CUDA calls stubbed: peers that run give rows
    with numbers, peers that cannot (SDPA EFFICIENT on CPU, posattn without CUDA or the
    interpreter, flash-attn not installed) give rows that say why; files are written."""
    import time

    import bench.__main__ as cli
    from bench import measure

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 2**20)

    def host_timer(step, leaves, warmup_ms, rep_ms):
        t = time.perf_counter()
        step()
        ms = (time.perf_counter() - t) * 1e3
        return ms, ms, ms

    monkeypatch.setattr(measure, "bench_ms", host_timer)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = cli.parse_args(["--seqlens", "64", "--head-dims", "16", "--tokens", "128", "--heads", "2",
                           "--pes", "none,rope,alibi,alibi-train", "--causal", "true", "--device", "cpu", "--out", str(tmp_path),
                           "--impls", "posattn,sdpa-flash,sdpa-efficient,mask+sdpa-efficient,"
                                      "rope(eager)+sdpa-flash,flash-attn", "--no-plot"])
    assert cli.run(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["pe"], r["impl"], r["causal"], r["mode"]): r for r in data["results"]}
    # 2 modes x (4 none + 2 rope + 3 alibi) + fwd+bwd x 3 alibi-train
    assert len(rows) == len(data["results"]) == 2 * 9 + 3
    assert rows[("alibi-train", "flash-attn", True, "fwd+bwd")]["status"] == "unsupported"
    assert ("alibi-train", "posattn", True, "fwd") not in rows
    flash = rows[("none", "sdpa-flash", True, "fwd+bwd")]
    assert flash["status"] == "ok" and flash["ms"] > 0 and flash["tflops"] > 0 and flash["peak_mib"] == 1.0
    assert rows[("none", "sdpa-efficient", True, "fwd")]["status"] == "unsupported"
    assert rows[("alibi", "mask+sdpa-efficient", True, "fwd")]["status"] == "unsupported"
    assert rows[("rope", "rope(eager)+sdpa-flash", True, "fwd")]["status"] == "ok"
    assert rows[("alibi", "flash-attn", True, "fwd")]["status"] == "not installed"
    assert rows[("none", "posattn", True, "fwd")]["status"] == "error"  # no CUDA, no interpreter
    assert rows[("rope", "rope(eager)+sdpa-flash", True, "fwd+bwd")]["ratio_vs_sdpa"] > 0
    assert (tmp_path / "bench.md").read_text().count("| rope | rope(eager)+sdpa-flash |") == 2


def test_bench_interrupted_run_keeps_every_row(monkeypatch, tmp_path):
    """SIGTERM (gpu_check's timeout) mid-run: what was measured is written, the rest is 'skipped'."""
    import bench.__main__ as cli
    from bench import measure

    calls = []

    def fake_measure(impl, pe, shape, x, **kw):
        if len(calls) == 3:
            raise cli.Interrupted()
        calls.append(impl.name)
        return dict(cli.skipped_row(shape, pe, impl, ""), status="ok", ms=1.0, tflops=1.0,
                    peak_mib=1.0, build_s=0.0, out=None)

    monkeypatch.setattr(measure, "measure", fake_measure)
    args = cli.parse_args(["--seqlens", "32,64", "--head-dims", "16", "--tokens", "64", "--heads", "2",
                           "--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    assert cli.run(args) == 130
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert len(rows) == sum(len(g) for g in cli.make_plan(args))
    assert sum(r["status"] == "ok" for r in rows) == 3
    assert {r["reason"] for r in rows if r["status"] == "skipped"} == {"interrupted"}


def test_bench_budget_is_checked_before_every_measurement(monkeypatch, tmp_path):
    """--max-minutes stops mid-shape: one slow measurement (a torch.compile build) must not
    run the whole rest of its shape past gpu_check's timeout."""
    import bench.__main__ as cli
    from bench import measure

    clock = [0.0]
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])

    def fake_measure(impl, pe, shape, x, **kw):
        clock[0] += 25.0  # seconds per measurement
        return dict(cli.skipped_row(shape, pe, impl, ""), status="ok", ms=1.0, tflops=1.0,
                    peak_mib=1.0, build_s=0.0, out=None)

    monkeypatch.setattr(measure, "measure", fake_measure)
    args = cli.parse_args(["--seqlens", "32", "--head-dims", "16", "--tokens", "64", "--heads", "2",
                           "--device", "cpu", "--out", str(tmp_path), "--no-plot",
                           "--max-minutes", "1"])
    assert cli.run(args) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert len(rows) == sum(len(g) for g in cli.make_plan(args)) > len(cli.make_plan(args)[0])
    assert sum(r["status"] == "ok" for r in rows) == 3  # 25, 50, 75 s: the third crosses 60 s
    assert {r["reason"] for r in rows if r["status"] != "ok"} == {"time budget (1 min) used up"}


def test_classify_failure():
    assert classify_failure(peers.Unavailable("not installed", "no flash-attn")) == ("not installed", "no flash-attn")
    assert classify_failure(RuntimeError("CUDA out of memory. Tried to allocate"))[0] == "oom"
    status, reason = classify_failure(ValueError("bad\nmore"))
    assert status == "error" and reason == "ValueError: bad"


# ---------------------------------------------------------------------------------------------
# Report: ratios, targets, markdown, JSON, plot (synthetic rows)
# ---------------------------------------------------------------------------------------------


def _rows():
    """posattn runs at 500 TFLOP/s fwd, flex half as fast, masks 4x slower; rope+sdpa-flash
    1.2x slower; SDPA no-PE 1.25x faster than posattn. Memory: posattn flat, masks ∝ S²."""
    rows = []
    for S in (2048, 8192):
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                shape = plan.Shape(B=16384 // S, H=16, S=S, D=128, causal=causal, mode=mode)
                base = plan.shape_flops(shape) / 500e12 * 1e3 * (1 if mode == "fwd" else 500 / 310)

                def row(pe, impl, ms, mib, status="ok", reason="", shape=shape):
                    r = dict(shape.as_dict(), pe=pe, impl=impl, role=peers.IMPLS_BY_NAME[impl].role,
                             status=status, reason=reason, ms=ms, tflops=None, peak_mib=mib,
                             max_abs_diff=1e-3)
                    if ms:
                        r["tflops"] = plan.shape_flops(shape) / (ms * 1e-3) / 1e12
                    rows.append(r)

                row("none", "sdpa-flash", base / 1.25, 64)
                row("none", "sdpa-cudnn", None, None, "unsupported", "cuDNN refused")
                row("none", "flash-attn", None, None, "not installed", "pip install flash-attn")
                for pe in plan.PES:
                    row(pe, "posattn", base, 64)
                row("rope", "rope+sdpa-flash", base * 1.2, 100)
                row("rope", "rope+sdpa-cudnn", base * 1.05, 100)
                for pe in ("alibi", "kerple"):
                    row(pe, "flex", base * 2, 70)
                    row(pe, "mask+sdpa-efficient", base * 4, 64 + 16 * S * S * 2 / 2**20)
    return rows


def test_report_targets_and_files(tmp_path):
    rows = _rows()
    report.add_ratios(rows)
    p = next(r for r in rows if r["impl"] == "posattn" and r["pe"] == "alibi")
    assert math.isclose(p["ratio_vs_sdpa"], 0.8) and p["ceiling_impl"] == "sdpa-flash"
    flex = next(r for r in rows if r["impl"] == "flex")
    assert math.isclose(flex["posattn_speedup"], 2.0)

    targets = report.check_targets(rows)
    by = {(t["target"].split(" ")[0], t["pe"], t["causal"], t["mode"]): t for t in targets}
    fwd = next(t for t in targets if t["target"].startswith("posattn forward") and t["pe"] == "rope")
    assert fwd["met"] is True and fwd["measured"] == "500"
    fb = next(t for t in targets if t["target"].startswith("posattn fwd+bwd"))
    assert fb["met"] is True and fb["measured"] == "310"
    bias = [t for t in targets if t["target"].startswith("bias PE")]
    assert bias and all(t["met"] and math.isclose(t["worst"], 2.0) for t in bias)
    rope = [t for t in targets if t["target"].startswith("RoPE: (rope+sdpa-flash)")]
    assert rope and all(t["met"] and math.isclose(t["worst"], 1.2) for t in rope)
    info = [t for t in targets if "info" in t["target"]]
    assert info and all(t["met"] is None and math.isclose(t["worst"], 1.05) for t in info)
    mem = [t for t in targets if t["target"].startswith("memory")]
    assert all(t["met"] is True and abs(t["worst"]) < 1e-9 for t in mem)
    assert "mask+sdpa-efficient" in by[("memory:", "alibi", False, "fwd+bwd")]["detail"]
    assert report.targets_summary(targets).startswith(f"{sum(1 for t in targets if t['met'])} of ")

    env = {"gpu": "Fake GPU", "driver": "0", "torch": "x", "triton": "y", "cuda": "z"}
    md = report.markdown(env, {"heads": 16, "tokens": 16384, "dtype": "bf16"}, rows, targets)
    assert "## Targets" in md and "not installed: pip install flash-attn" in md and "**yes**" in md
    report.write_json(tmp_path / "bench.json", env, {}, rows, targets)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["env"]["gpu"] == "Fake GPU" and len(data["results"]) == len(rows)
    pytest.importorskip("matplotlib")
    written = report.plot(rows, lambda D: tmp_path / f"bench_d{D}.png")
    assert [p.name for p in written] == ["bench_d128.png"] and written[0].stat().st_size > 10_000


def test_targets_missing_and_failing_are_honest():
    rows = [r for r in _rows() if r["impl"] != "flex"]
    for r in rows:
        if r["impl"] == "posattn":
            r["ms"] *= 2  # 250 TFLOP/s: below the forward target
            r["tflops"] /= 2
    report.add_ratios(rows)
    targets = report.check_targets(rows)
    assert all(t["met"] is None and t["measured"] == "no data"
               for t in targets if t["target"].startswith("bias PE"))
    assert all(t["met"] is False for t in targets if t["target"].startswith("posattn forward"))


# ---------------------------------------------------------------------------------------------
# The main command
# ---------------------------------------------------------------------------------------------


def test_error_rule_passes_the_reference_and_flags_a_wrong_kernel():
    case = next(c for c in main_cmd.CASES if c.pe == "alibi" and c.params)

    def naive16(q, k, v, spec, causal):  # the naive fp16 math itself: within 2x of itself
        qp = parse_positions(None, "q", q.shape[0], q.shape[2], k.shape[2] - q.shape[2], q.device)
        kp = parse_positions(None, "k", q.shape[0], k.shape[2], 0, q.device)
        return posattn.reference.attention_bhsd(q, k, v, spec, causal=causal, scale=q.shape[-1] ** -0.5,
                                                q_pos=qp, k_pos=kp, compute_dtype=q.dtype)[0]

    good = main_cmd.check_case(case, torch.float16, "cpu", attn=naive16)
    assert good.passed, good.errors

    def forgets_the_bias(q, k, v, spec, causal):
        return naive16(q, k, v, posattn.NoPE(), causal) + 0 * spec.slopes.sum()

    bad = main_cmd.check_case(case, torch.float16, "cpu", attn=forgets_the_bias)
    assert not bad.passed

    def off_by_5_percent(q, k, v, spec, causal):
        return naive16(q, k, v, spec, causal) * 1.05

    assert not main_cmd.check_case(case, torch.float16, "cpu", attn=off_by_5_percent).passed
    assert "FAIL" in main_cmd.check_table([good, bad]) and "PASS" in main_cmd.check_table([good])

    def crashes(q, k, v, spec, causal):
        raise RuntimeError("kernel exploded")

    boom = main_cmd.check_case(case, torch.float16, "cpu", attn=crashes)
    assert not boom.passed and "kernel exploded" in boom.note


def test_main_cmd_one_pe_in_interpreter():
    """`python -m posattn` end to end for one PE (on a GPU machine: compiled)."""
    pytest.importorskip("triton")
    res = _run(["-m", "posattn", "--pe", "alibi", "--no-bench"], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 of 2 checks passed" in res.stdout
    if not torch.cuda.is_available():
        assert "Triton interpreter" in res.stdout


def test_source_checkout_finds_kernels_without_install(tmp_path):
    """setup.py maps kernels/ to posattn.kernels on install. A checkout that is not installed
    (pip cannot build there, or a newcomer runs python -m posattn from the root) must still
    import posattn.kernels from ../kernels: gpu_check.sh relies on it as its last resort."""
    import shutil

    for d in ("posattn", "kernels"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import posattn, posattn.kernels.configs as c; print(posattn.__file__); print(c.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pkg, cfg = proc.stdout.split()
    assert pkg == str(tmp_path / "posattn" / "__init__.py")
    assert cfg == str(tmp_path / "kernels" / "configs.py")


def _train_inputs(H, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, S, D, generator=g, dtype=torch.float64).requires_grad_()
            for _ in range(3)]


def _grads(out, leaves, seed):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("pe", plan.TRAINABLE_PES)
@pytest.mark.parametrize("causal", [False, True])
def test_trainable_peers_match_reference_gradients(pe, causal):
    """*-train: the mask SDPA rebuilds per step and Flex's captured buffers give the same
    output and the same gradients for q, k, v and the bias parameters as posattn's reference."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings

    H, S, D = 2, 32, 8
    q, k, v = _train_inputs(H, S, D, 5)
    want_params = peers.learnable_params(pe, H, "cpu")
    assert all(p.requires_grad and p.is_leaf and p.dtype == torch.float32 for p in want_params)
    assert len(want_params) == (1 if pe.startswith("alibi") else 2)
    ref_params = [p.detach().double().requires_grad_() for p in want_params]
    want = _ref(q, k, v, peers.pe_spec(pe, H, "cpu", ref_params), causal)
    want_g = _grads(want, [q, k, v] + ref_params, 6)

    p64 = [p.detach().double().requires_grad_() for p in want_params]
    mask = peers.differentiable_bias(pe, S, causal, torch.float64, *(p64 + [None])[:2])
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for a, b in zip(_grads(got, [q, k, v] + p64, 6), want_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    # Flex: its forward here; its backward has no CPU implementation, so the gradient that
    # reaches the captured parameters is checked through the score_mod evaluated on the
    # whole (H, S, S) index grid (the function Flex differentiates), fed to SDPA
    score_mod, params = peers.flex_score_mod(pe, H, "cpu")
    assert len(params) == len(want_params) and all(p.requires_grad for p in params)
    block_mask = fa.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cpu") if causal else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fa.flex_attention(*(t.detach().float() for t in (q, k, v)), score_mod=score_mod,
                                block_mask=block_mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    idx = torch.arange(S)
    bias = score_mod(torch.zeros(H, S, S), 0, torch.arange(H)[:, None, None], idx[None, :, None],
                     idx[None, None, :]).double()
    if causal:
        bias = bias.masked_fill(idx[None, :] > idx[:, None], float("-inf"))
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
    for a, b in zip(_grads(got, [q, k, v] + params, 6), want_g):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_trainable_pes_plan_fwd_bwd_only():
    import bench.__main__ as cli

    args = cli.parse_args(["--seqlens", "1k", "--head-dims", "64", "--pes", "kerple-train",
                           "--dry-run"])
    tasks = [t for g in cli.make_plan(args) for t in g]
    assert {s.mode for s, pe, _ in tasks if pe == "kerple-train"} == {"fwd+bwd"}
    assert {i.name for s, pe, i in tasks if pe == "kerple-train"} == {
        "posattn", "mask+sdpa-efficient", "mask+sdpa-cudnn", "flex"}
    assert cli.parse_args([]).pes == list(plan.ALL_PES)
    assert cli.parse_args(["--quick"]).pes == list(plan.PES)


def test_decode_bench_rows(monkeypatch):
    """python -m bench.decode's loop on a tiny shape (interpreter on CPU, compiled with CUDA):
    posattn rows for each PE, with and without split-K, and SDPA rows that run or say why;
    past the time budget the rest are 'skipped'."""
    from conftest import DEVICE

    from bench import decode

    items = decode.plan(shapes=[(1, 4, 2, 70)], pes=["none", "alibi"])
    assert len(items) == 2 * 4 + 2 + len(decode.SDPA_BACKENDS)
    written = []
    rows = decode.measure_all(items, DEVICE, timer=lambda fn: 0.5, echo=None,
                              each=lambda rows: written.append(len(rows)))
    assert written == list(range(1, len(items) + 1))  # the files follow every measurement
    by = {(r["impl"], r["pe"]): r for r in rows}
    flash = by[("sdpa-flash", "none")]
    assert flash["status"] != "ok" or flash["max_abs_diff"] < 1e-2  # checked against posattn
    for pe in ("none", "alibi"):
        for impl in ("posattn", "posattn (no split)", "posattn kvcache", "posattn kvcache paged16"):
            r = by[(impl, pe)]
            assert r["status"] == "ok", r
            assert r["gbps"] == decode.kv_bytes(1, 2, 70) / 0.5e-3 / 1e9
        fa = by[("flash-attn kvcache", pe)]
        assert fa["status"] in ("ok", "unavailable"), fa
    assert all(r["status"] in ("ok", "unsupported", "error", "unavailable") for r in rows)
    assert "| 1 | 4/2 | 70 | posattn | alibi |" in decode.markdown(rows, {})
    late = decode.measure_all(items, DEVICE, timer=lambda fn: 0.5, out_of_time=lambda: True, echo=None)
    assert {r["status"] for r in late} == {"skipped"}
    res = _run(["-m", "bench.decode", "--dry-run"], timeout=120)
    assert res.returncode == 0 and "Sk=131072" in res.stdout and "sdpa-flash" in res.stdout
