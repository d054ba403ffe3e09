"""Tile overrides (posattn.kernels.configs) and the tile tuner (python -m bench.tune).

The tuner's numbers mean something only on a GPU; here it runs end to end in the interpreter
on a tiny shape, which checks the plumbing: overrides reach the launchers, the outputs of every
candidate are compared, the picks and the tile file round-trip through POSATTN_TILES.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from posattn.kernels import configs, launch
from posattn.kernels.configs import TileConfig

import bench.tune as tune

ROOT = Path(__file__).resolve().parent.parent


def test_override_wins_for_16_bit_only_and_restores():
    key = ("fwd", "rope", 128, 90)
    shipped = configs.tile_config("fwd", 128, True, torch.bfloat16, 90, "rope")
    mine = TileConfig(64, 32, 4, 2)
    assert mine != shipped
    with configs.override({key: mine}):
        assert configs.tile_config("fwd", 128, False, torch.bfloat16, 90, "rope") == mine
        assert configs.tile_config("fwd", 128, True, torch.float16, 90, "rope") == mine
        # other keys and fp32 (FMA dots, its own table) are untouched
        assert configs.tile_config("fwd", 128, True, torch.bfloat16, 90, "none") != mine
        assert configs.tile_config("fwd", 128, True, torch.bfloat16, 80, "rope") != mine
        assert configs.tile_config("fwd", 128, True, torch.float32, 90, "rope") != mine
        with configs.override({key: TileConfig(32, 32, 4, 1)}):  # nests
            assert configs.tile_config("fwd", 128, True, torch.bfloat16, 90, "rope").BLOCK_M == 32
        assert configs.tile_config("fwd", 128, True, torch.bfloat16, 90, "rope") == mine
    assert configs.tile_config("fwd", 128, True, torch.bfloat16, 90, "rope") == shipped


@pytest.mark.parametrize("key", [("fwd", "bias", 64, 90), ("dq", "none", 64, 90)])
def test_override_rejects_unknown_kernel_or_family(key):
    with pytest.raises(ValueError, match="kernel must be one of"):
        with configs.override({key: TileConfig(64, 64, 4, 2)}):
            pass


def test_tiles_env_is_read_on_first_launch(tmp_path, monkeypatch):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"tiles": [{"kernel": "bwd_dq", "family": "alibi", "head_dim": 64,
                                           "arch": 90, "tile": [128, 32, 8, 2]}]}))
    monkeypatch.setenv(configs.TILES_ENV, str(path))
    monkeypatch.setattr(configs, "_env_loaded", False)
    monkeypatch.setattr(configs, "_overrides", {})
    assert configs.tile_config("bwd_dq", 64, True, torch.float16, 90, "alibi") == TileConfig(128, 32, 8, 2)
    assert configs.tile_config("bwd_dq", 64, True, torch.float16, 90, "none") != TileConfig(128, 32, 8, 2)


def test_override_reaches_the_launcher_and_stays_correct(monkeypatch):
    """An overridden tile is what the kernel runs with, and the result is still right."""
    from test_kernels import SHAPES, check_case

    seen = []
    real = configs.tile_config

    def spy(*a, **kw):
        cfg = real(*a, **kw)
        seen.append((a[0], cfg))
        return cfg

    monkeypatch.setattr(launch, "tile_config", spy)
    arch = launch._arch(torch.empty(0, device=DEVICE))  # None in the interpreter, 90 on an H200
    tiles = {("fwd", "alibi", 32, arch): TileConfig(16, 64, 4, 1),
             ("bwd_dkdv", "alibi", 32, arch): TileConfig(64, 16, 4, 1),
             ("bwd_dq", "alibi", 32, arch): TileConfig(16, 16, 4, 1)}
    # default positions: the variant the tuner measures (SHAPES["offset_pos_d32"] puts the
    # queries past the keys, whose centred bias rows keep the shipped, spill-checked tiles)
    with configs.override(tiles):
        check_case(lambda D, H: "alibi", (1, 4, 2, 40, 40, 32, "bhsd", None), True, torch.float16)
    assert {k: c for k, c in seen} == {k[0]: c for k, c in tiles.items()}
    seen.clear()
    with configs.override(tiles):
        check_case(lambda D, H: "alibi", SHAPES["offset_pos_d32"], True, torch.float16)
    assert not any(c == tiles[(k, "alibi", 32, arch)] for k, c in seen)


def test_overrides_skip_the_variants_the_tuner_does_not_measure():
    """The tuner measures contiguous positions with aligned inputs (the forward's key tiles
    through TMA on Hopper, except RoPE): explicit positions, and a Hopper forward on the
    pointer path, keep the shipped tile, which is spill-free for them."""
    tile = TileConfig(128, 128, 8, 2)
    key = ("fwd", "alibi", 128, 90)
    bf16 = torch.bfloat16
    with configs.override({key: tile, ("bwd_dq", "alibi", 128, 90): tile,
                           ("fwd", "rope", 128, 90): tile}):
        assert configs.tile_config("fwd", 128, True, bf16, 90, "alibi", tma=True) == tile
        assert configs.tile_config("fwd", 128, True, bf16, 90, "alibi", tma=False) != tile
        assert configs.tile_config("fwd", 128, True, bf16, 90, "alibi", explicit=True,
                                   tma=True) != tile
        assert configs.tile_config("bwd_dq", 128, True, bf16, 90, "alibi") == tile
        assert configs.tile_config("bwd_dq", 128, True, bf16, 90, "alibi", explicit=True) != tile
        assert configs.tile_config("fwd", 128, True, bf16, 90, "rope") == tile  # RoPE: no TMA


def test_hopper_forward_tiles_follow_tma_and_positions():
    """ALiBi and KERPLE at D=128: 128 keys with TMA and contiguous positions (the address
    registers TMA frees), fewer otherwise; RoPE 64 always; no PE 128 always."""
    bf16 = torch.bfloat16

    def keys(pe, **kw):
        return configs.tile_config("fwd", 128, True, bf16, 90, pe, **kw).BLOCK_N

    for pe in ("alibi", "kerple"):
        assert keys(pe, tma=True) == 128
        assert keys(pe, explicit=True, tma=True) == keys(pe, explicit=True) == 64
    assert keys("alibi", tma=False) == 64 and keys("kerple", tma=False) == 32
    assert configs.tile_config("fwd", 128, True, bf16, 90, "rope").BLOCK_N == 64
    assert configs.tile_config("fwd", 128, True, bf16, 90, "none").BLOCK_N == 128


def _row(kernel, pe, tile, ms, shipped=False, status="ok"):
    return dict(kernel=kernel, pe=pe, head_dim=128, tile=list(tile), shipped=shipped,
                status=status, ms=ms)


def test_pick_takes_the_fastest_good_tile_past_min_gain():
    A, B, C = (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)
    rows = [_row("fwd", "alibi", A, 1.0, True), _row("fwd", "alibi", B, 0.8),
            _row("fwd", "alibi", C, 0.5, status="bad"),            # bad: never picked
            _row("fwd", "kerple", A, 1.0, True), _row("fwd", "kerple", B, 0.5, status="error"),
            _row("fwd", "none", A, 1.0, True), _row("fwd", "none", B, 0.99)]  # 1 %: under min_gain
    picks = tune.pick(rows, 0.03, 90, lambda pe, hd: hd)
    assert [(p["family"], tuple(p["tile"])) for p in picks] == [("alibi", B)]
    assert picks[0]["gain"] == pytest.approx(0.2, abs=1e-4)
    assert picks[0]["shipped"] == list(A) and picks[0]["arch"] == 90
    # no shipped measurement, no pick
    assert tune.pick(rows[1:3], 0.0, 90, lambda pe, hd: hd) == []


def test_same_result_flags_a_tile_that_computes_something_else():
    a = torch.randn(4, 8)
    assert tune.same_result([a + 1e-4], [a])[0]
    assert not tune.same_result([a.flip(0)], [a])[0]
    assert not tune.same_result([a * float("nan")], [a])[0]


def test_candidates_are_valid_and_include_the_shipped_hopper_tiles():
    assert tune.CANDIDATES
    for (kernel, hd), cands in tune.CANDIDATES.items():
        assert kernel in configs.KERNELS
        for tile, fams in cands:
            m, n, w, s, split = tune.norm_tile(tile)
            assert not split or kernel == "bwd_dkdv", tile
            assert all(x >= 16 and x & (x - 1) == 0 for x in (m, n)), tile
            assert w in (4, 8) and 1 <= s <= 4, tile
            assert set(fams) <= set(configs.FAMILIES) and fams, tile
        for pe in configs.FAMILIES:
            ship = tune.shipped_tile(kernel, pe, hd, 90, torch.bfloat16)
            listed = [tune.norm_tile(t) for t, fams in cands if pe in fams]
            assert ship in listed, f"shipped {kernel} {pe} D={hd} {ship} not among the vetted candidates"


def test_dry_run_plans_the_hopper_sweep(capsys):
    assert tune.main(["--dry-run", "--head-dims", "64,128"]) == 0
    out = capsys.readouterr().out
    assert "(shipped)" in out and "bwd_dkdv" in out and "kerple" in out


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter run; on a GPU, gpu_check.sh runs the real tune")
def test_tune_end_to_end_in_the_interpreter(tmp_path, monkeypatch):
    cands = {("fwd", 16): [((16, 16, 4, 1), tune._ALL)],
             ("bwd_dkdv", 16): [((16, 32, 4, 1), ("none", "alibi", "kerple"))],
             ("bwd_dq", 16): [((16, 16, 4, 1), ("alibi", "kerple"))]}
    out = tmp_path / "tune"
    rc = tune.main(["--device", DEVICE, "--seqlen", "40", "--tokens", "40", "--heads", "2",
                    "--head-dims", "16", "--pes", "none,alibi,kerple", "--dtype", "fp16",
                    "--jobs", "1", "--min-gain", "-10", "--out", str(out)], candidates=cands)
    assert rc == 0
    data = json.loads((out / "tune.json").read_text())
    rows = data["rows"]
    assert len(rows) == 3 * 3 + 3 + 3 + 2  # shipped per (kernel, PE) + each listed candidate
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    assert all(r["diff"] is not None and r["diff"] < 0.02 for r in rows if not r["shipped"])
    md = (out / "tune.md").read_text()
    assert "## forward, D=16" in md and "## Picks" in md
    # min-gain -10 picks every (kernel, family) that has a candidate
    picked = {(p["kernel"], p["family"]) for p in data["picks"]}
    assert picked == {(k, f) for k in ("fwd", "bwd_dkdv") for f in ("none", "alibi", "kerple")} | \
        {("bwd_dq", "alibi"), ("bwd_dq", "kerple")}
    tiles = configs.load_tiles(str(out / "tiles.json"))
    assert tiles[("bwd_dq", "kerple", 16, None)] == TileConfig(16, 16, 4, 1)


@pytest.mark.parametrize("tiles", [None, "valid", "empty"])
def test_gpu_check_reports_tune_and_bench_without_a_gpu(tmp_path, tiles):
    """gpu_check.sh's plumbing on a CPU: setup/tests/main skipped, tune and bench refuse
    (no CUDA, exit 2), the summary still names both and the script exits 1. The bench runs
    with POSATTN_TILES only when tune/tiles.json holds a tile posattn reads back (here the
    file is left in place beforehand, as a tuner run would have written it)."""
    if HAS_CUDA:
        pytest.skip("on a GPU this would run the real check")
    if tiles:
        (tmp_path / "tune").mkdir()
        entries = [{"kernel": "fwd", "family": "none", "head_dim": 128, "arch": 90,
                    "tile": [128, 64, 8, 3]}] if tiles == "valid" else []
        (tmp_path / "tune" / "tiles.json").write_text(json.dumps({"tiles": entries}))
    env = dict(os.environ, SKIP="setup tests main", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "summary.txt").read_text()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "tune   FAILED    rc=2" in summary and "bench  FAILED    rc=2" in summary, summary
    assert "tma    FAILED    rc=2" in summary, summary  # the POSATTN_TMA=0 forward A/B
    assert "decode FAILED    rc=2" in summary, summary
    assert "needs a CUDA GPU" in (tmp_path / "decode.log").read_text()
    assert "ring   FAILED    rc=1" in summary, summary  # bench.ring: needs 1 GPU, found 0
    for strategy in ("tile", "once"):  # RoPE's strategies side by side
        assert f"rope_{strategy} FAILED    rc=2" in summary, summary
    assert "needs a CUDA GPU" in (tmp_path / "tune.log").read_text()
    assert ("bench runs with POSATTN_TILES" in summary) == (tiles == "valid"), summary


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter run")
def test_precompile_processes_run_every_task():
    """The spawned compile processes (pickled args and tasks, one case per process) come back
    without errors; on a GPU they fill Triton's cache before the timing pass."""
    args = tune.parse_args(["--device", DEVICE, "--seqlen", "40", "--tokens", "40", "--heads", "2",
                            "--head-dims", "16", "--pes", "none,rope", "--kernels", "fwd",
                            "--dtype", "fp16"])
    tasks = tune.make_tasks(args, None, {("fwd", 16): [((16, 16, 4, 1), tune._ALL)]})
    assert len(tasks) == 4
    assert tune.precompile(args, tasks, 2) == []
