"""Fused Triton kernels vs the float64 reference, by flash-attention's error rule.

On CPU the kernels run in the Triton interpreter (fp16 / fp32; the interpreter's bf16 tl.dot
is wrong); with CUDA the same cases run compiled, plus bf16 and larger shapes.
Shapes are small and odd so tiles are partial and both the masked and unmasked loops run.
"""

import pytest
import torch

import posattn
import pe_cases
from posattn.pe import axes
from conftest import DEVICE, HAS_CUDA
from helpers import (assert_rule, force_bias_tables, force_splits, leaf, naive_attention,
                     pe_leaves, run_attention, with_params)


def _pes():
    """PE name -> factory of a spec for head dim D and H query heads (fresh trainable leaves
    on every call): every registered PE, each followed by its variants (the "kernel" suite of
    tests/pe_cases.py; a fresh table, so its trainable parameters draw the same values)."""
    table = pe_cases.kernel_cases()
    return {name: _flip(table[name].make if name in table else pe_cases.pe_factory(name, "kernel"))
            for name in KERNEL_PES}


def _flip(make):
    return lambda D, H: make(H, D)


# every registered PE and the kernel suite's variants (rope_interleaved_partial, ...), each
# after its base
KERNEL_PES = pe_cases.names("kernel", variants=True)
# the KERPLE kinds (tile family "kerple"): their per-distance tables
# the biases with per-distance tables (KERPLE; T5's table is always on, test_t5.py)
KERPLE_PES = [n for n in pe_cases.names("kernel", family="kerple")
              if pe_cases.axes(pe_cases.base_of(n))[1].startswith("kerple")]
# every bias PE, ALiBi with trainable slopes
TRAINABLE_BIAS_PES = pe_cases.bias_pes(suite="kernel", substitute={"alibi": "alibi_trainable"})


# (B, Hq, Hkv, Sq, Sk, D, layout, positions)
SHAPES = {
    "square17_d16": (1, 4, 4, 17, 17, 16, "bhsd", None),
    "gqa_sq<sk_d40_bshd": (2, 4, 2, 65, 130, 40, "bshd", None),
    "mqa_sq>sk_d80": (1, 4, 1, 70, 33, 80, "bhsd", None),
    "explicit_pos_d64": (2, 4, 2, 33, 47, 64, "bhsd", "explicit"),
    "decode_d128_bshd": (1, 4, 4, 1, 70, 128, "bshd", None),
    "offset_pos_d32": (1, 4, 2, 40, 40, 32, "bhsd", "offset"),
}
SHAPES_D256 = {"d256": (1, 4, 2, 20, 37, 256, "bhsd", None)}
if HAS_CUDA:
    SHAPES["large_d128"] = (2, 8, 2, 1000, 1100, 128, "bhsd", None)
    SHAPES["large_d64_bshd"] = (1, 8, 8, 700, 700, 64, "bshd", None)

DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def _positions(kind, B, Sq, Sk):
    if kind == "explicit":
        g = torch.Generator().manual_seed(3)
        # increasing with random gaps, per batch row; q positions interleave with the keys
        kp = torch.cumsum(torch.randint(1, 4, (B, Sk), generator=g), 1)
        qp = torch.cumsum(torch.randint(1, 6, (B, Sq), generator=g), 1) + 5
        return dict(q_positions=qp.to(DEVICE), k_positions=kp.to(DEVICE))
    if kind == "offset":
        return dict(q_positions=1000, k_positions=990)
    return {}


def check_case(pe, shape, causal, dtype, seed=0, scale=None):
    B, Hq, Hkv, Sq, Sk, D, layout, pos_kind = shape
    pe = pe(D, Hq)
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(DEVICE)

    if layout == "bhsd":
        q, k, v = rnd(B, Hq, Sq, D), rnd(B, Hkv, Sk, D), rnd(B, Hkv, Sk, D)
    else:
        q, k, v = rnd(B, Sq, Hq, D), rnd(B, Sk, Hkv, D), rnd(B, Sk, Hkv, D)
    dout = rnd(*q.shape[:-1], D)
    kw = dict(causal=causal, layout=layout, **_positions(pos_kind, B, Sq, Sk))
    if scale is not None:
        kw["scale"] = scale

    q_, k_, v_ = (leaf(t, dtype).requires_grad_() for t in (q, k, v))
    out, lse, grads = run_attention(q_, k_, v_, with_params(pe, leaf), "triton", dout.to(dtype), **kw)

    q64, k64, v64 = (leaf(t, torch.float64).requires_grad_() for t in (q_, k_, v_))
    pe64 = with_params(pe, lambda t: leaf(t, torch.float64))
    out64, lse64, grads64 = run_attention(q64, k64, v64, pe64, "reference", dout.to(dtype).double(), **kw)

    qn, kn, vn = (leaf(t).requires_grad_() for t in (q_, k_, v_))
    pen = with_params(pe, leaf)
    outn, lsen = naive_attention(qn, kn, vn, pen, dtype, **kw)
    leaves_n = {"q": qn, "k": kn, "v": vn, **pe_leaves(pen)}
    gn = torch.autograd.grad(outn, list(leaves_n.values()), dout.to(dtype), allow_unused=True)
    grads_n = dict(zip(leaves_n, gn))

    assert out.shape == q.shape[:-1] + (D,) and out.dtype == dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert_rule("out", out, out64, outn, 2, dtype)
    assert_rule("lse", lse, lse64, lsen, 2, dtype)
    assert set(grads) == set(grads64)
    for name in grads64:
        assert grads[name] is not None and grads[name].shape == grads64[name].shape, name
        assert grads[name].dtype == (dtype if name in "qkv" else torch.float32), name
        assert_rule(f"d{name}", grads[name], grads64[name], grads_n[name], 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("pe,causal", pe_cases.with_causal(KERNEL_PES, "kernel"))
def test_kernel_matches_reference(pe, causal, shape, dtype):
    check_case(_pes()[pe], SHAPES[shape], causal, dtype)


@pytest.mark.parametrize("shape", ["gqa_sq<sk_d40_bshd", "offset_pos_d32"], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pe", KERPLE_PES, ids=str)
def test_kerple_distance_tables(pe, causal, shape, monkeypatch):
    """KERPLE with contiguous positions reads f and df/dr2 from per-distance tables once both
    sequences span a tile (launch.BIAS_TABLE_MIN_LEN). Forced on for these small shapes: the
    forward and the backward must take the table path, pass the error rule, and (in the
    interpreter, where no FMA contraction can differ) match the in-tile path bit for bit."""
    from posattn.kernels import launch

    used = force_bias_tables(monkeypatch)
    check_case(_pes()[pe], SHAPES[shape], causal, torch.float16)
    # forward, backward; offset_pos_d32 puts the queries past the keys: centred rows compute
    # f - f_ref in the tile (kernels/bias.py, "Centring") and take no table
    centred = shape == "offset_pos_d32"
    assert used == [not centred] * 2, used

    B, Hq, Hkv, Sq, Sk, D, layout, pos_kind = SHAPES[shape]
    g = torch.Generator().manual_seed(5)
    shp = (lambda H, S: (B, H, S, D)) if layout == "bhsd" else (lambda H, S: (B, S, H, D))
    q, k, v = (torch.randn(*shp(H, S), generator=g).to(DEVICE, torch.float16).requires_grad_()
               for H, S in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    spec = _pes()[pe](D, Hq)
    dout = torch.randn(*q.shape, generator=g).to(DEVICE, torch.float16)
    kw = dict(causal=causal, layout=layout, **_positions(pos_kind, B, Sq, Sk))
    results = []
    for min_len in (1, 10 ** 9):  # table, then in-tile
        monkeypatch.setattr(launch, "BIAS_TABLE_MIN_LEN", min_len)
        results.append(run_attention(q, k, v, spec, "triton", dout, **kw))
    assert used[-2:] == [False, False]
    (out_t, lse_t, gr_t), (out_c, lse_c, gr_c) = results
    if not HAS_CUDA:
        assert torch.equal(out_t, out_c) and torch.equal(lse_t, lse_c)
        for name in gr_c:
            assert torch.equal(gr_t[name], gr_c[name]), name


@pytest.mark.skipif(HAS_CUDA, reason="compiled runs already use the shipped GPU tiles")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pe,shape", [("none", "gqa_sq<sk_d40_bshd"), ("rope", "mqa_sq>sk_d80"),
                                      ("kerple_power", "gqa_sq<sk_d40_bshd"),
                                      ("alibi", "mqa_sq>sk_d80"),
                                      ("alibi_trainable", "explicit_pos_d64"),
                                      ("rope_yarn_partial", "offset_pos_d32")], ids=str)
def test_shipped_gpu_tiles_in_interpreter(pe, shape, causal, arch, monkeypatch):
    """The interpreter normally runs 32 x 32 tiles; here it runs the tiles shipped for sm_90 /
    sm_80 (e.g. 128 x 64 forward, 64 x 64 or 16 x 64 dK/dV, 64 x 16 dQ), so the masking and
    loop-range logic for those shapes is checked on CPU before any GPU sees it."""
    from posattn.kernels import configs, launch

    seen = set()
    real = configs.tile_config

    def shipped(kernel, head_dim, causal_, dtype, _arch, family="none", pe_grad=False, **kw):
        cfg = real(kernel, head_dim, causal_, dtype, arch, family, pe_grad, **kw)
        seen.add((kernel, cfg.BLOCK_M, cfg.BLOCK_N))
        return cfg

    monkeypatch.setattr(launch, "tile_config", shipped)
    monkeypatch.setattr(launch, "BIAS_TABLE_MIN_LEN", 1)
    check_case(_pes()[pe], SHAPES[shape], causal, torch.float16)
    assert {k for k, _, _ in seen} == {"fwd", "bwd_dkdv", "bwd_dq"}
    assert {m for k, m, _ in seen if k == "fwd"} == {128}  # not the interpreter's 32 x 32


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pe", TRAINABLE_BIAS_PES, ids=str)
def test_forward_128_key_tiles(pe, causal, monkeypatch):
    """Forward tiles of 128 keys form a bias PE's |q - k| per tile from the key columns
    (attn_fwd._fwd_tiles: no loop-invariant column vector), as ALiBi and KERPLE do on Hopper at
    D=128; smaller tiles, which every other test runs, take bias.tile_dist. KERPLE here
    evaluates f in the tile (both sequences are shorter than launch.BIAS_TABLE_MIN_LEN)."""
    from posattn.kernels import configs, launch

    seen = []
    real = configs.tile_config

    def spy(kernel, *a, **kw):
        cfg = real(kernel, *a, **kw)
        seen.append((kernel, cfg.BLOCK_N))
        return cfg

    monkeypatch.setattr(launch, "tile_config", spy)
    family = axes(pe_cases.base_of(pe, "kernel"))[2]  # "alibi" / "kerple"
    arch = launch._arch(torch.empty(0, device=DEVICE))  # None in the interpreter
    with configs.override({("fwd", family, 64, arch): configs.TileConfig(32, 128, 4, 1)}):
        check_case(_pes()[pe], SHAPES["gqa_sq<sk_d40_bshd"], causal, torch.float16)
    assert ("fwd", 128) in seen


@pytest.mark.parametrize("pe,shape", [("rope_interleaved_partial", "gqa_sq<sk_d40_bshd"),
                                      ("alibi_trainable", "explicit_pos_d64"),
                                      ("rope", "mqa_sq>sk_d80")], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_split_dkdv_tiles(pe, shape, causal, monkeypatch):
    """A split dK/dV tile (configs.TileConfig.split: dV and dK in two launches, each with one
    set of accumulators) gives the same gradients, GQA groups and masks included."""
    from posattn.kernels import configs, launch

    real = configs.tile_config
    seen = []

    def split(kernel, *a, **kw):
        cfg = real(kernel, *a, **kw)
        if kernel == "bwd_dkdv":
            cfg = configs.TileConfig(16, 32, 4, 1, split=True)
            seen.append(cfg)
        return cfg

    monkeypatch.setattr(launch, "tile_config", split)
    check_case(_pes()[pe], SHAPES[shape], causal, torch.float16)
    assert seen


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-40, 8.0], ids=["neg", "zero", "subnormal", "large"])
@pytest.mark.parametrize("pe", ["none", "rope", "alibi", "kerple_log"], ids=str)
def test_kernel_any_scale(pe, scale):
    """The forward holds its scores in units of 1/scale (the bias divided by it) and takes the
    row max over them when the scale is positive (launch.fold_scale); zero and negative
    scales run the general path. At scale 8 the scaled logits reach ~400 (log2 units): a row
    max left unscaled would overflow exp2. At a subnormal scale a bias divided by the scale
    would be inf (NaN on the diagonal, where the distance is 0): the general path again."""
    check_case(_pes()[pe], SHAPES["mqa_sq>sk_d80"], True, torch.float16, scale=scale)


@pytest.mark.parametrize("pe", ["none", "rope_yarn_partial", "kerple_power"], ids=str)
def test_kernel_head_dim_256(pe):
    check_case(_pes()[pe], SHAPES_D256["d256"], True, torch.float16)


@pytest.mark.parametrize("pe", ["none", "rope", "kerple_log"], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_fp32(pe, causal):
    """fp32 inputs: true fp32 dots (no TF32), judged against fp32 naive math."""
    check_case(_pes()[pe], SHAPES["gqa_sq<sk_d40_bshd"], causal, torch.float32)


@pytest.mark.parametrize("pe", ["none", "rope", "alibi_trainable"], ids=str)
def test_value_head_dim_differs(pe):
    """Dv != D (e.g. MLA-style 48-dim values against 32-dim keys): V tiles and the output are
    sized by Dv independently of the q.k dot groups."""
    torch.manual_seed(1)
    B, Hq, Hkv, Sq, Sk, D, Dv = 1, 4, 2, 37, 41, 32, 48
    spec = _pes()[pe](D, Hq)
    q = torch.randn(B, Hq, Sq, D, device=DEVICE, dtype=torch.float16, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, device=DEVICE, dtype=torch.float16, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, Dv, device=DEVICE, dtype=torch.float16, requires_grad=True)
    dout = torch.randn(B, Hq, Sq, Dv, device=DEVICE, dtype=torch.float16)
    out, lse, grads = run_attention(q, k, v, with_params(spec, leaf), "triton", dout, causal=True)
    q64, k64, v64 = (leaf(t, torch.float64).requires_grad_() for t in (q, k, v))
    out64, _, grads64 = run_attention(q64, k64, v64, with_params(spec, lambda t: leaf(t, torch.float64)),
                                      "reference", dout.double(), causal=True)
    qn, kn, vn = (leaf(t).requires_grad_() for t in (q, k, v))
    outn, _ = naive_attention(qn, kn, vn, spec, torch.float16, causal=True)
    gq, gk, gv = torch.autograd.grad(outn, (qn, kn, vn), dout)
    assert out.shape == (B, Hq, Sq, Dv)
    assert_rule("out", out, out64, outn, 2, torch.float16)
    for name, gn in zip("qkv", (gq, gk, gv)):
        assert_rule(f"d{name}", grads[name], grads64[name], gn, 3, torch.float16)


# Split-K forward (flash-decoding, launch.split_count). The interpreter has no SM count, so the
# split is forced; 8 runs over these shapes' few key tiles leave some runs empty.
# (KERPLE power with explicit positions never splits: launch.split_allowed)
SPLIT_CASES = [("rope_yarn_partial", "decode_d128_bshd", 3), ("kerple_power", "decode_d128_bshd", 8),
               ("alibi_trainable", "gqa_sq<sk_d40_bshd", 3), ("none", "mqa_sq>sk_d80", 8),
               ("kerple_log", "explicit_pos_d64", 3), ("rope_interleaved_partial", "offset_pos_d32", 8)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pe,shape,splits", SPLIT_CASES, ids=[f"{p}-{s}-{n}" for p, s, n in SPLIT_CASES])
def test_split_k_forward(pe, shape, splits, causal, monkeypatch):
    """The rule on out, LSE and every gradient (the backward reads the merged out and LSE), with
    the key tiles split into runs and merged by attn_combine_kernel; queries that see no key
    (mqa_sq>sk causal) still get 0 and -inf."""
    merges = force_splits(monkeypatch, splits)
    check_case(_pes()[pe], SHAPES[shape], causal, torch.float16)
    assert merges, "the split path did not run"


@pytest.mark.parametrize("where", ["v", "k"])
def test_split_k_propagates_nan(where, monkeypatch):
    """A NaN in one run's keys (k: its scores and LSE; v: its output) reaches the merged
    result wherever the reference has one."""
    from posattn.kernels import launch

    monkeypatch.setattr(launch, "FORCE_SPLITS", 4)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, S, 32, generator=g).to(DEVICE, torch.float16) for S in (3, 130, 130))
    (k if where == "k" else v)[0, 1, 70] = float("nan")
    out, lse = posattn.attention(q, k, v, "alibi", return_lse=True, backend="triton")
    ref, ref_lse = posattn.attention(q.double(), k.double(), v.double(), "alibi", return_lse=True,
                                     backend="reference")
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(lse.isnan(), ref_lse.isnan())


def test_split_count_heuristic():
    from posattn.kernels.launch import (KernelPE, KernelPositions, split_allowed, split_count,
                                        splits_for)

    rope, alibi = KernelPE(rot="rope"), KernelPE(bias="alibi")
    power = KernelPE(bias="kerple_power")
    explicit = KernelPositions(qpos=torch.zeros(1, 1), kpos=torch.zeros(1, 1))
    assert split_allowed(rope, KernelPositions()) and split_allowed(alibi, explicit)
    assert not split_allowed(rope, explicit)  # its split variant spills (triton 3.6)
    assert not split_allowed(power, explicit)  # so does its centred one
    assert split_allowed(power, KernelPositions(q_start=9))
    packed = KernelPositions(cu_q=torch.zeros(2), cu_k=torch.zeros(2), lens_q=(5,), lens_k=(5,))
    assert not split_allowed(alibi, packed)  # varlen runs unsplit

    assert splits_for(132, 32, 1000) == 4  # decode, B=1, 32 heads: one wave of 128 programs
    assert splits_for(132, 1, 1000) == 132
    assert splits_for(132, 1, 10) == 2  # runs of at least SPLIT_MIN_TILES = 4 tiles
    assert splits_for(132, 1, 3) == 1
    assert splits_for(132, 67, 1000) == 1  # programs fill half the SMs already
    assert split_count(torch.empty(1), 1, 1000) == 1  # never on CPU unless forced
