"""The length-extrapolation study (posattn.extrapolate) on a minimal configuration: seconds."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import posattn
from posattn import extrapolate as ex

from conftest import DEVICE


@pytest.fixture(scope="module")
def corpus():
    return ex.load_corpus(max_bytes=100_000)


def tiny(**kw):
    # The reference backend keeps these tests to seconds; conftest sets TRITON_INTERPRET=1 on CPU,
    # under which backend "auto" would run the Triton interpreter (that path has its own test).
    cfg = ex.Config.tiny()
    cfg.backend = "reference"
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# ------------------------------------------------------------------------------------- data


def test_corpus_split_by_file_is_deterministic_and_disjoint():
    files = ex.corpus_files()
    assert len(files) > 100, "the Python standard library should be on every machine"
    rels = [r for r, _ in files]
    assert rels == sorted(rels)
    held = {r for r in rels if ex.is_heldout(r)}
    assert 0.03 < len(held) / len(rels) < 0.2
    assert held == {r for r in rels if ex.is_heldout(r)}      # a pure function of the path
    assert not any(r.startswith(("site-packages/", "encodings/")) for r in rels)


def test_load_corpus(corpus):
    for s in (corpus.train, corpus.heldout):
        assert s.dtype == torch.int16 and s.numel() > 50_000
        assert int(s.min()) >= 0 and int(s.max()) == ex.DOC     # bytes + document separators
    assert corpus.info["train_files"] > 0 and corpus.info["heldout_files"] > 0
    assert len(corpus.info["sha256"]) == 64
    again = ex.load_corpus(max_bytes=100_000)
    assert again.info["sha256"] == corpus.info["sha256"] and torch.equal(again.train, corpus.train)


def test_spaced_positions_never_overlap():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(500):
        p = ex._spaced_positions(3, 30, 2, g)
        assert p == sorted(p) and p[0] >= 0 and p[-1] + 2 <= 30
        assert all(b - a >= 2 for a, b in zip(p, p[1:]))
        seen.update(p)
    assert min(seen) == 0 and max(seen) == 28                  # the whole range is reachable


def test_make_passkey_plants_blocks():
    g = torch.Generator().manual_seed(0)
    filler = torch.randint(0, 256, (3, 20))
    x = ex.make_passkey(filler, [[0], [5, 9], [16]], g, 1)
    for i, row in enumerate([[0], [5, 9], [16]]):
        end = x[i, -2:]
        assert end[0] == ex.KEY and ex.VALUE0 <= end[1] < ex.VOCAB
        for p in row:
            assert torch.equal(x[i, p:p + 2], end)
        untouched = set(range(18)) - {q for p in row for q in (p, p + 1)}
        assert all(x[i, j] == filler[i, j] for j in untouched)
    with pytest.raises(ValueError):
        ex.make_passkey(filler, [[17]], g, 1)                   # would overlap the final block
    assert ex.passkey_distance(0, 20, 1) == 18


def test_train_batch_and_eval_sets(corpus):
    cfg = tiny(passkey_frac=0.5, passkey_copies=3)
    x = ex.train_batch(corpus, cfg, torch.Generator().manual_seed(0))
    assert x.shape == (cfg.batch_size, cfg.train_len + 1) and x.dtype == torch.long
    npk = cfg.batch_size // 2
    assert (x[:npk, -2] == ex.KEY).all() and ((x[:npk] == ex.KEY).sum(1) == 3).all()
    assert not (x[npk:] >= ex.KEY).any()
    seg = ex.eval_segments(corpus, cfg)
    assert seg.shape == (cfg.eval_segments, max(cfg.eval_lens) + 1)
    for n in cfg.eval_lens:
        pk, pos = ex.passkey_eval_set(corpus, cfg, n)
        assert pk.shape == (cfg.passkey_eval, n + 1)
        d = [ex.passkey_distance(p, n + 1, 1) for p in pos]
        assert min(d) == 2 and max(d) == n - 1                  # distances span the window
        pk2, _ = ex.passkey_eval_set(corpus, cfg, n)
        assert torch.equal(pk, pk2)                             # deterministic


# ------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("pe", ex.PE_NAMES)
def test_every_attention_goes_through_posattn(pe, monkeypatch):
    cfg = tiny(n_layers=2)
    model = ex.build_model(cfg, pe)
    calls = []
    real = posattn.attention

    def spy(q, k, v, spec, **kw):
        calls.append((type(spec), kw))
        return real(q, k, v, spec, **kw)

    def forbidden(*a, **k):
        raise AssertionError("the study must not use torch SDPA")

    monkeypatch.setattr(posattn, "attention", spy)
    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    x = ex.train_batch(ex.Corpus(torch.randint(0, 256, (500,), dtype=torch.int16),
                                 torch.zeros(1, dtype=torch.int16), {}), cfg, torch.Generator().manual_seed(0))
    loss = ex.lm_loss(model, x, cfg)
    loss.backward()
    expected = {"nope": posattn.NoPE, "rope": posattn.RoPE, "alibi": posattn.ALiBi,
                "kerple_log": posattn.KERPLE, "kerple_power": posattn.KERPLE,
                "t5": posattn.T5Bias, "sandwich": posattn.Sandwich}[pe]
    assert len(calls) == cfg.n_layers
    assert all(t is expected and kw["causal"] is True for t, kw in calls)
    for blk in model.blocks:  # learnable PE parameters get gradients through posattn.attention
        if pe.startswith("kerple"):
            assert blk.attn.pe_module.kind == pe.split("_")[1]
        for p in (blk.attn.pe_module.parameters() if blk.attn.pe_module is not None else ()):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_models_differ_only_in_pe():
    cfg = tiny(n_layers=2)
    ref = {k: v for k, v in ex.build_model(cfg, "nope").state_dict().items()}
    for pe in ex.PE_NAMES[1:]:
        sd = ex.build_model(cfg, pe).state_dict()
        extra = {k for k in sd if k not in ref}
        assert all(".pe_module." in k for k in extra) and (bool(extra) == (ex.study_pe(pe).module is not None))
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    with pytest.raises(ValueError):
        ex.ByteLM(cfg, "fire")  # not (yet) a study PE


@pytest.mark.parametrize("pe", ex.PE_NAMES)
def test_triton_backend_matches_reference(pe):
    """The --large path (backend="triton"): on CPU this runs the kernels in the interpreter,
    with CUDA compiled (backend="triton" takes CUDA tensors there)."""
    cfg = tiny(n_layers=1, d_model=32, n_heads=2, train_len=12, device=DEVICE)
    x = torch.randint(0, ex.VOCAB, (2, 13)).to(DEVICE)
    out = {}
    for backend in ("reference", "triton"):
        cfg.backend = backend
        model = ex.build_model(cfg, pe)
        for blk in model.blocks:
            blk.attn.backend = backend
        loss = ex.lm_loss(model, x.to(cfg.device), cfg)
        loss.backward()
        with torch.no_grad():
            last = model(x[:, :-1], last=2)
        out[backend] = (loss.detach(), last, {n: p.grad for n, p in model.named_parameters()})
    (l_ref, last_ref, g_ref), (l_tri, last_tri, g_tri) = out["reference"], out["triton"]
    torch.testing.assert_close(l_tri, l_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last_tri, last_ref, atol=1e-4, rtol=1e-4)
    for n in g_ref:
        torch.testing.assert_close(g_tri[n], g_ref[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("pe", ["rope", "kerple_power"])
def test_last_and_chunked_logits_match_full_forward(pe):
    cfg = tiny(train_len=8)
    model = ex.build_model(cfg, pe).eval()
    x = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x, last=3), full[:, -3:])
        # no length-dependent scaling: the chunked (dynamic) path must give the same logits
        torch.testing.assert_close(ex._logits(model, x, cfg, chunked=True), full)


def test_dynamic_ntk_chunks_leave_short_context_unscaled():
    cfg = tiny(train_len=8)
    model = ex.build_model(cfg, "rope").eval()
    x = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        plain = model(x)
        model.rope_scaling = ex.rope_scaling_for("dynamic_ntk", 32, cfg)
        dyn = ex._logits(model, x, cfg, chunked=True)
        one_shot = model(x)
    torch.testing.assert_close(dyn[:, :8], plain[:, :8])           # cur_len = L: unscaled
    assert not torch.allclose(dyn[:, 16:], plain[:, 16:])
    torch.testing.assert_close(dyn[:, 16:], one_shot[:, 16:])      # last chunk: cur_len = 32


def test_rope_scaling_rule():
    cfg = tiny(train_len=64)
    for kind in ("pi", "ntk", "yarn"):
        assert ex.rope_scaling_for(kind, 64, cfg) is None          # factor 1 at the training length
        assert ex.rope_scaling_for(kind, 256, cfg).factor == 4.0
    assert ex.rope_scaling_for("yarn", 256, cfg).original_max_position == 64
    dyn = ex.rope_scaling_for("dynamic_ntk", 256, cfg)
    assert isinstance(dyn, posattn.DynamicNTK) and dyn.original_max_position == 64 and dyn.factor == 1.0
    with pytest.raises(ValueError):
        ex.rope_scaling_for("longrope", 128, cfg)


# ------------------------------------------------------------------------------- evaluation


def test_training_reduces_loss(corpus):
    cfg = tiny(steps=30, lr=1e-2, warmup=3, log_every=10)
    lines = []
    model, tr = ex.train_model(cfg, "alibi", corpus, lines.append)
    assert len(lines) == 3 and "step" in lines[0]                  # progress is shown
    assert tr["loss_curve"][0] - tr["final_loss"] > 0.5


def test_run_study_writes_outputs(tmp_path, capsys):
    res = ex.main(["--tiny", "--backend", "reference", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "training RoPE" in out and "step" in out
    keys = list(ex.PE_NAMES) + [f"rope+{s}" for s in ex.ROPE_SCALINGS]
    assert sorted(res["runs"]) == sorted(keys)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["train_len"] == 16 and data["eval_lens"] == [16, 32]
    assert data["corpus"]["sha256"] and data["environment"]["torch"]
    for key in keys:
        for n in ("16", "32"):
            r = data["runs"][key]["eval"][n]
            assert math.isfinite(r["ppl"]) and 1 < r["ppl"] < ex.VOCAB * 2
            assert 0 <= r["passkey"]["acc"] <= 1 and len(r["passkey"]["items"]) == 4
        assert "ppl_past_L" in data["runs"][key]["eval"]["32"]
    assert set(data["runs"]["kerple_log"]["pe_params"]) == {"layer0"}
    assert all(v >= 1e-2 for v in data["runs"]["kerple_power"]["pe_params"]["layer0"]["r1"])
    md = (tmp_path / "results.md").read_text()
    assert all(ex.LABELS[k] in md for k in keys) and "| 16 (1L) | 32 (2L) |" in md
    png = (tmp_path / "ppl_vs_length.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # same seed, same numbers
    res2 = ex.run_study(tiny(pes=("rope",), rope_scalings=()), None, log=lambda s: None)
    assert res2["runs"]["rope"]["eval"]["32"]["ppl"] == res["runs"]["rope"]["eval"]["32"]["ppl"]


def test_registry_is_the_single_source(tmp_path, monkeypatch):
    """A PE model (with learnable parameters) and a RoPE method, each added as one registry
    entry, reach the model, the CLI, the runs, the tables, the plot and the JSON; and the
    default names, LABELS and the CLI choices are read from the registries."""
    # the default run is the committed results' set (results/extrapolate_cpu)
    assert ex.PE_NAMES == ex.Config().pes == ("nope", "rope", "alibi", "kerple_log", "kerple_power",
                                               "t5", "sandwich")
    assert ex.ROPE_SCALINGS == ex.Config().rope_scalings == ("pi", "ntk", "dynamic_ntk", "yarn",
                                                             "rerope", "leaky_rerope", "self_extend")
    assert list(ex.LABELS) == ex.run_keys() and all(ex.LABELS[k] == ex.label(k) for k in ex.LABELS)

    class Slopes(torch.nn.Module):                 # learnable ALiBi slopes, one per head
        def __init__(self, cfg):
            super().__init__()
            self.slopes = torch.nn.Parameter(posattn.alibi_slopes(cfg.n_heads))

    monkeypatch.setitem(ex.STUDY_PES, "alibi_learned", ex.StudyPE(
        "ALiBi (learned)", spec=lambda m, cfg, rope: posattn.ALiBi(m.slopes), module=Slopes))
    monkeypatch.setitem(ex.ROPE_METHODS, "pi_x2", ex.RoPEMethod(
        "PI x2", lambda n, cfg: {"scaling": posattn.PI(2 * n / cfg.train_len)}, rule="PI(2 eval_len / L)"))
    assert ex.Config().pes[-1] == "alibi_learned" and ex.Config().rope_scalings[-1] == "pi_x2"
    assert ex.LABELS["rope+pi_x2"] == "RoPE + PI x2" and "alibi_learned" in ex.LABELS

    res = ex.main(["--tiny", "--backend", "reference", "--pes", "alibi_learned,rope", "--out", str(tmp_path)])
    keys = ["alibi_learned", "rope"] + [f"rope+{s}" for s in ex.ROPE_SCALINGS + ("pi_x2",)]
    assert list(res["runs"]) == keys
    assert res["rope_scaling_rule"]["pi_x2"] == "PI(2 eval_len / L)"
    r32 = {k: res["runs"][k]["eval"]["32"]["ppl"] for k in keys}
    assert r32["rope+pi_x2"] != r32["rope+pi"] != r32["rope"]     # the method reached the RoPE spec
    slopes = res["runs"]["alibi_learned"]["pe_params"]["layer0"]["slopes"]
    assert len(slopes) == 2 and slopes != posattn.alibi_slopes(2).tolist()   # trained
    md = (tmp_path / "results.md").read_text()
    assert "| ALiBi (learned) |" in md and "| RoPE + PI x2 |" in md
    assert (tmp_path / "ppl_vs_length.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        ex.main(["--tiny", "--pes", "fire"])  # not (yet) a study PE
