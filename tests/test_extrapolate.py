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


def test_recall_keys_share_all_but_one_symbol():
    g = torch.Generator().manual_seed(0)
    for key_len, n_pairs in ((2, 3), (3, 4), (1, 3), (2, 5)):
        for _ in range(50):
            keys = ex.recall_keys(n_pairs, key_len, g)
            assert keys.shape == (n_pairs, key_len)
            assert ((keys >= ex.RKEY0) & (keys < ex.RKEY0 + ex.N_RKEYS)).all()
            assert len({tuple(k) for k in keys.tolist()}) == n_pairs           # distinct keys
            for j in range(min(key_len, n_pairs - 1)):                         # distractor j: differs at j only
                assert (keys[1 + j] != keys[0]).tolist() == [i == j for i in range(key_len)]
    with pytest.raises(ValueError):
        ex.recall_keys(ex.N_RKEYS + 1, 1, g)


def test_make_recall_plants_pairs_and_query():
    g = torch.Generator().manual_seed(0)
    filler = torch.randint(0, 256, (2, 30))
    blocks = [[(0, 1), (5, 0), (12, 2)], [(3, 2), (8, 1), (20, 0), (24, 1)]]
    x, keys, values = ex.make_recall(filler, blocks, g, 2, 3)
    assert keys.shape == (2, 3, 2) and values.shape == (2, 3)
    assert all(len(set(v)) == 3 for v in values.tolist())
    assert ((values >= ex.VALUE0) & (values < ex.VOCAB)).all()
    for i, row in enumerate(blocks):
        assert torch.equal(x[i, -3:-1], keys[i, 0]) and x[i, -1] == values[i, 0]      # query, answer
        for p, j in row:
            assert torch.equal(x[i, p:p + 2], keys[i, j]) and x[i, p + 2] == values[i, j]
        untouched = set(range(27)) - {p + d for p, _ in row for d in range(3)}
        assert all(x[i, t] == filler[i, t] for t in untouched)
    with pytest.raises(ValueError):
        ex.make_recall(filler, [[(0, 0), (2, 1)], []], g, 2, 3)                     # overlapping blocks
    with pytest.raises(ValueError):
        ex.make_recall(filler, [[(25, 0)], []], g, 2, 3)                            # overlaps the query
    assert ex.recall_distance(0, 30, 2) == 27


def test_train_batch_with_recall(corpus):
    off = ex.train_batch(corpus, tiny(), torch.Generator().manual_seed(0))
    assert not (off >= ex.RKEY0).any()                          # off by default: the passkey-only batches
    cfg = tiny(recall=True, recall_frac=0.5, recall_pairs=3, recall_repeats=2, train_len=32)
    x = ex.train_batch(corpus, cfg, torch.Generator().manual_seed(0))
    half = cfg.batch_size // 2
    assert (x[:half, -2] == ex.KEY).all() and not (x[:half] >= ex.RKEY0).any()   # passkey rows
    for row in x[half:].tolist():
        assert ex.KEY not in row
        blocks = [tuple(row[p:p + 3]) for p in range(len(row) - 2) if min(row[p:p + 2]) >= ex.RKEY0]
        assert len(blocks) == 3 + 2 and len(set(blocks)) == 3   # 3 pairs + 2 repeats, the last at the end
        assert blocks[-1] == tuple(row[-3:]) and blocks[-1] in blocks[:3]
        assert all(ex.RKEY0 <= b[1] < ex.RKEY0 + ex.N_RKEYS and ex.VALUE0 <= b[2] < ex.VOCAB for b in blocks)
        assert len({b[2] for b in blocks}) == 3                 # one value per pair


def test_recall_eval_set(corpus):
    cfg = tiny(recall=True, recall_eval=6)
    for n in cfg.eval_lens:
        x, pos, values = ex.recall_eval_set(corpus, cfg, n)
        assert x.shape == (6, n + 1) and values.shape == (6, cfg.recall_pairs)
        assert (x[:, -1] == values[:, 0]).all()                 # the answer is the last token
        for i, p in enumerate(pos):
            assert torch.equal(x[i, p:p + 3], x[i, -3:])         # the queried pair, planted at p
            assert (x[i] >= ex.RKEY0).sum() == 2 * (cfg.recall_pairs + 1)
            assert set(values[i].tolist()) == {int(t) for t in x[i] if ex.VALUE0 <= t < ex.VOCAB}
        d = [ex.recall_distance(p, n + 1, 2) for p in pos]
        assert min(d) == 3 and max(d) == n - 2                  # distances span the window
        x2, pos2, _ = ex.recall_eval_set(corpus, cfg, n)
        assert torch.equal(x, x2) and pos == pos2               # deterministic


class _Oracle(torch.nn.Module):
    """Answers the final key with the value after its earlier occurrence (``exact``) or after the
    first pair in the window (a model that copies some value without matching the key)."""

    def __init__(self, vocab, exact):
        super().__init__()
        self.vocab, self.exact = vocab, exact

    def forward(self, idx, last=None):
        out = torch.zeros(idx.shape[0], last, self.vocab)
        for b, row in enumerate(idx.tolist()):
            key = row[-2:]
            ans = next(row[p + 2] for p in range(len(row) - 3) if row[p] >= ex.RKEY0
                       and (not self.exact or row[p:p + 2] == key))
            out[b, -1, ans] = 1
        return out


def test_eval_recall_scores_the_queried_value(corpus):
    cfg = tiny(recall=True, recall_eval=8)
    good = ex.eval_recall(_Oracle(cfg.vocab, True), corpus, 32, cfg)
    assert good["acc"] == 1 and good["distractor"] == 0 and good["n"] == 8
    assert good["acc_far_half"] == 1 and set(good["acc_by_distance"]) == {"0-16", "16-32"}
    first = ex.eval_recall(_Oracle(cfg.vocab, False), corpus, 32, cfg)
    assert 0 < first["acc"] < 1 and first["acc"] + first["distractor"] == 1


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
                "t5": posattn.T5Bias, "sandwich": posattn.Sandwich, "xpos": posattn.XPos,
                "fire": posattn.FIRE}[pe]
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
        ex.ByteLM(cfg, "cope")  # not (yet) a study PE


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


def test_run_study_with_recall(tmp_path):
    res = ex.main(["--tiny", "--backend", "reference", "--recall", "--pes", "alibi,rope", "--out", str(tmp_path)])
    keys = ["alibi", "rope"] + [f"rope+{s}" for s in ex.ROPE_SCALINGS]
    assert list(res["runs"]) == keys and res["config"]["recall"] is True
    data = json.loads((tmp_path / "results.json").read_text())
    for key in keys:
        for n in ("16", "32"):
            r = data["runs"][key]["eval"][n]["recall"]
            assert 0 <= r["acc"] <= 1 and 0 <= r["distractor"] <= 1 - r["acc"] and len(r["items"]) == 4
    md = (tmp_path / "results.md").read_text()
    assert "Multi-token-key recall accuracy" in md and "Recall accuracy, queried pair in the far half" in md
    assert (tmp_path / "ppl_vs_length.png").stat().st_size > 0
    plain = ex.run_study(tiny(pes=("alibi",), rope_scalings=()), None, log=lambda s: None)
    assert "recall" not in plain["runs"]["alibi"]["eval"]["32"]            # off by default
    assert "recall" not in ex.markdown_tables(plain).lower()


def test_registry_is_the_single_source(tmp_path, monkeypatch):
    """A PE model (with learnable parameters) and a RoPE method, each added as one registry
    entry, reach the model, the CLI, the runs, the tables, the plot and the JSON; and the
    default names, LABELS and the CLI choices are read from the registries."""
    # the default run is the committed results' set (results/extrapolate_cpu)
    assert ex.PE_NAMES == ex.Config().pes == ("nope", "rope", "alibi", "kerple_log", "kerple_power",
                                               "t5", "sandwich", "xpos", "fire")
    assert ex.ROPE_SCALINGS == ex.Config().rope_scalings == ("pi", "ntk", "dynamic_ntk", "yarn",
                                                             "rerope", "leaky_rerope", "self_extend", "dca")
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
        ex.main(["--tiny", "--pes", "cope"])  # not (yet) a study PE
