"""PE specs: closed-form RoPE scalings, ALiBi slopes, HF config parsing, validation, KERPLEBias.

CPU only, no Triton, fast. The closed-form tests stand alone; ``test_hf_parity_*`` additionally
compare with transformers' own RoPE init functions when transformers is importable.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from posattn.pe import (
    ALiBi, DynamicNTK, KERPLE, Llama3, LongRoPE, NoPE, NTK, PI, RoPE, YaRN, alibi_slopes, axes,
    registered, resolve_pe,
)
from posattn.nn import KERPLEBias
import pe_cases
from conftest import DEVICE

CPU = torch.device("cpu")


def default_inv(base, d):
    """base ** (-2j/d) in float64, written independently of posattn."""
    return torch.tensor([base ** (-2.0 * j / d) for j in range(d // 2)], dtype=torch.float64)


def assert_close(a, b, rtol=1e-12, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# ALiBi slopes
# --------------------------------------------------------------------------------------------


def test_alibi_slopes_power_of_two():
    assert_close(alibi_slopes(8), torch.tensor([2.0 ** -h for h in range(1, 9)], dtype=torch.float64))
    assert alibi_slopes(8).dtype == torch.float64


def test_alibi_slopes_non_power_of_two():
    # 12 heads: the 8-head slopes, then every other 16-head slope (2^-0.5, 2^-1.5, ...), first 4.
    expected = [2.0 ** -h for h in range(1, 9)] + [2.0 ** -(h + 0.5) for h in range(4)]
    assert_close(alibi_slopes(12), torch.tensor(expected, dtype=torch.float64))


def test_alibi_get_slopes_default_and_user():
    assert ALiBi().get_slopes(8, CPU).dtype == torch.float32
    assert_close(ALiBi().get_slopes(8, CPU), alibi_slopes(8).float())
    user = torch.rand(6, requires_grad=True)
    assert ALiBi(user).get_slopes(6, CPU) is user  # as is: autograd must reach the user's tensor


def test_kerple_get_params():
    r1, r2 = KERPLE("power", 0.5, 1.5).get_params(3, CPU)
    assert r1.dtype == r2.dtype == torch.float32 and r1.shape == r2.shape == (3,)
    assert_close(r1, torch.full((3,), 0.5))
    assert_close(r2, torch.full((3,), 1.5))
    t = torch.rand(3) + 0.1
    assert KERPLE("log", t, 2.0).get_params(3, CPU)[0] is t


# --------------------------------------------------------------------------------------------
# RoPE scalings, closed form
# --------------------------------------------------------------------------------------------


def test_default_rope():
    inv, af = RoPE(base=10000.0).frequencies(64)
    assert inv.dtype == torch.float64 and inv.device.type == "cpu" and inv.shape == (32,)
    assert_close(inv, default_inv(10000.0, 64))
    assert af == 1.0 and isinstance(af, float)
    inv, _ = RoPE(base=10000.0, rotary_dim=16).frequencies(64)  # partial rotary: its own d
    assert_close(inv, default_inv(10000.0, 16))


def test_pi():
    inv, af = RoPE(scaling=PI(4.0)).frequencies(64)
    assert_close(inv, default_inv(10000.0, 64) / 4.0)
    assert af == 1.0


def test_ntk_base_change():
    d, f = 64, 4.0
    inv, af = RoPE(base=10000.0, scaling=NTK(f)).frequencies(d)
    assert_close(inv, default_inv(10000.0 * f ** (d / (d - 2)), d))
    assert af == 1.0
    assert inv[0] == 1.0  # the highest frequency is unchanged by any base change


def test_dynamic_ntk():
    d, f, L0 = 64, 2.0, 100
    rope = RoPE(scaling=DynamicNTK(f, L0))
    assert rope.needs_cur_len and not RoPE(scaling=PI(2.0)).needs_cur_len
    default = default_inv(10000.0, d)
    for cur_len in (None, 0, 1, 50, L0):  # up to the original length: exactly the unscaled frequencies
        # (0 = max position -1: empty inputs)
        inv, af = rope.frequencies(d, cur_len)
        assert_close(inv, default)
        assert af == 1.0
    inv, _ = rope.frequencies(d, L0 + 1)
    assert not torch.allclose(inv, default)
    # At twice L0: base' = base * (f*2 - (f-1)) ** (d/(d-2)) = NTK with factor 3.
    inv, _ = rope.frequencies(d, 2 * L0)
    assert_close(inv, RoPE(scaling=NTK(3.0)).frequencies(d)[0])
    # A 0-d integer tensor (e.g. positions.max() + 1) is accepted as cur_len.
    assert_close(rope.frequencies(d, torch.tensor(2 * L0))[0], inv)


def test_yarn_ramp():
    d, f, L0, base = 64, 4.0, 4096, 10000.0
    inv, _ = RoPE(base=base, scaling=YaRN(f, L0)).frequencies(d)
    default = default_inv(base, d)

    # corr(r) = d ln(L0 / (2 pi r)) / (2 ln base): here low = floor(10.47) = 10, high = ceil(22.5) = 23.
    def corr(r):
        return d * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))
    low, high = math.floor(corr(32)), math.ceil(corr(1))
    assert (low, high) == (10, 23)
    assert_close(inv[: low + 1], default[: low + 1])             # ramp 0: high frequencies kept
    assert_close(inv[high:], default[high:] / f)                 # ramp 1: low frequencies interpolated
    j = torch.arange(low + 1, high, dtype=torch.float64)
    ramp = (j - low) / (high - low)
    mid = default[low + 1: high]
    assert_close(inv[low + 1: high], mid / f * ramp + mid * (1 - ramp))


def test_yarn_no_truncate_and_clamp():
    d, f, L0, base = 64, 4.0, 4096, 10000.0
    inv, _ = RoPE(base=base, scaling=YaRN(f, L0, truncate=False)).frequencies(d)
    low = d * math.log(L0 / (2 * math.pi * 32)) / (2 * math.log(base))
    high = d * math.log(L0 / (2 * math.pi * 1)) / (2 * math.log(base))
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    default = default_inv(base, d)
    assert_close(inv, default / f * ramp + default * (1 - ramp))
    # A tiny L0 puts every dim below the ramp (low clamps to 0): everything interpolated but dim 0.
    inv, _ = RoPE(base=base, scaling=YaRN(f, 8)).frequencies(d)
    assert_close(inv[1:], default[1:] / f)


def test_yarn_attention_factor():
    def af(**kw):
        return RoPE(scaling=YaRN(original_max_position=4096, **kw)).frequencies(64)[1]
    assert af(factor=4.0) == pytest.approx(0.1 * math.log(4.0) + 1)
    assert af(factor=1.0) == 1.0 and af(factor=0.5) == 1.0   # get_mscale(s <= 1) = 1
    assert af(factor=4.0, attention_factor=0.7) == 0.7
    # DeepSeek style: ratio of the two mscales when both are given ...
    expected = (0.1 * 0.9 * math.log(40) + 1) / (0.1 * 0.8 * math.log(40) + 1)
    assert af(factor=40.0, mscale=0.9, mscale_all_dim=0.8) == pytest.approx(expected)
    # ... else only factor counts (as transformers; 0 counts as "not given").
    assert af(factor=40.0, mscale=0.9) == pytest.approx(0.1 * math.log(40) + 1)
    assert af(factor=40.0, mscale=0.9, mscale_all_dim=0) == pytest.approx(0.1 * math.log(40) + 1)


def test_llama3_three_bands():
    d, base, f, L0, lo, hi = 128, 500000.0, 8.0, 8192, 1.0, 4.0
    inv, af = RoPE(base=base, scaling=Llama3(f, L0, lo, hi)).frequencies(d)
    default = default_inv(base, d)
    wavelen = 2 * math.pi / default
    short = wavelen < L0 / hi
    long = wavelen > L0 / lo
    mid = ~short & ~long
    assert short.any() and long.any() and mid.any()  # the parameters exercise all three bands
    assert_close(inv[short], default[short])
    assert_close(inv[long], default[long] / f)
    s = (L0 / wavelen[mid] - lo) / (hi - lo)
    assert ((s > 0) & (s < 1)).all()
    assert_close(inv[mid], (1 - s) * default[mid] / f + s * default[mid])
    assert af == 1.0


def test_longrope_switch_and_attention_factor():
    d, L0, base = 8, 100, 10000.0
    short, long = [1.0, 1.5, 2.0, 3.0], [2.0, 4.0, 8.0, 16.0]
    rope = RoPE(base=base, scaling=LongRoPE(short, long, L0, factor=4.0))
    assert rope.needs_cur_len
    default = default_inv(base, d)
    for cur_len in (None, 1, L0):  # up to L0 (and unknown length): short factors
        assert_close(rope.frequencies(d, cur_len)[0], default / torch.tensor(short, dtype=torch.float64))
    assert_close(rope.frequencies(d, L0 + 1)[0], default / torch.tensor(long, dtype=torch.float64))
    assert rope.frequencies(d)[1] == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(L0)))

    def af(**kw):
        return RoPE(scaling=LongRoPE(short, long, L0, **kw)).frequencies(d)[1]
    assert af() == 1.0 and af(factor=1.0) == 1.0 and af(factor=0.5) == 1.0
    assert af(factor=4.0, attention_factor=0.9) == 0.9
    # Factor lists may be tensors too.
    t = RoPE(scaling=LongRoPE(torch.tensor(short), torch.tensor(long), L0)).frequencies(d, L0 + 1)[0]
    assert_close(t, default / torch.tensor(long, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# from_hf_config: dicts and attribute objects, both config styles
# --------------------------------------------------------------------------------------------

WRAPS = [pytest.param(lambda d: d, id="dict"), pytest.param(lambda d: SimpleNamespace(**d), id="object")]


@pytest.mark.parametrize("wrap", WRAPS)
def test_hf_default(wrap):
    rope = RoPE.from_hf_config(wrap({"hidden_size": 512, "num_attention_heads": 8, "rope_theta": 500000.0}))
    assert rope.base == 500000.0 and rope.scaling is None and not rope.interleaved
    assert rope.resolve_rotary_dim(64) == 64
    assert_close(rope.frequencies(64)[0], default_inv(500000.0, 64))
    rope = RoPE.from_hf_config(wrap({"head_dim": 64, "rope_scaling": None}))  # all defaults
    assert rope.base == 10000.0 and rope.scaling is None


@pytest.mark.parametrize("wrap", WRAPS)
def test_hf_partial_rotary(wrap):
    rope = RoPE.from_hf_config(wrap({"head_dim": 128, "partial_rotary_factor": 0.25}))
    assert rope.rotary_dim == 32
    # transformers >= 5 moves it into rope_parameters; GPT-NeoX config.json calls it rotary_pct.
    rope = RoPE.from_hf_config(wrap({"head_dim": 128, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}))
    assert rope.rotary_dim == 64
    assert RoPE.from_hf_config(wrap({"head_dim": 128, "rotary_pct": 0.25})).rotary_dim == 32
    # GPT-J's config.json: n_embd / n_head, an absolute rotary_dim, interleaved pairs.
    gptj = RoPE.from_hf_config(wrap({"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64}))
    assert gptj.rotary_dim == 64 and gptj.interleaved
    assert RoPE.from_hf_config(wrap({"head_dim": 64, "rope_interleave": True})).interleaved


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_hf_linear(wrap, key, type_key):
    rope = RoPE.from_hf_config(wrap({"head_dim": 64, "rope_theta": 1e6, key: {type_key: "linear", "factor": 4}}))
    assert isinstance(rope.scaling, PI) and rope.scaling.factor == 4.0 and rope.base == 1e6


@pytest.mark.parametrize("wrap", WRAPS)
def test_hf_dynamic_uses_max_position_embeddings(wrap):
    # transformers' dynamic NTK grows from max_position_embeddings (an original_max_... is ignored).
    rope = RoPE.from_hf_config(wrap({"head_dim": 64, "max_position_embeddings": 2048, "rope_scaling": {
        "rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 1024}}))
    assert isinstance(rope.scaling, DynamicNTK)
    assert rope.scaling.original_max_position == 2048 and rope.scaling.factor == 2.0


@pytest.mark.parametrize("wrap", WRAPS)
def test_hf_yarn(wrap):
    cfg = {"head_dim": 128, "max_position_embeddings": 32768, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 8192,
        "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.8, "truncate": False,
        "partial_rotary_factor": 0.5}}
    rope = RoPE.from_hf_config(wrap(cfg))
    y = rope.scaling
    assert isinstance(y, YaRN) and rope.base == 1e6 and rope.rotary_dim == 64
    assert (y.factor, y.original_max_position, y.beta_fast, y.beta_slow) == (4.0, 8192, 16.0, 2.0)
    assert (y.mscale, y.mscale_all_dim, y.truncate, y.attention_factor) == (0.9, 0.8, False, None)
    # No factor: the ratio max / original (DeepSeek-V3 style); no original: max_position_embeddings.
    y = RoPE.from_hf_config(wrap({"head_dim": 64, "max_position_embeddings": 32768, "rope_scaling": {
        "type": "yarn", "original_max_position_embeddings": 4096}})).scaling
    assert (y.factor, y.original_max_position, y.beta_fast, y.beta_slow, y.truncate) == (8.0, 4096, 32, 1, True)
    y = RoPE.from_hf_config(wrap({"head_dim": 64, "max_position_embeddings": 4096, "rope_scaling": {
        "type": "yarn", "factor": 2.0, "attention_factor": 1.25}})).scaling
    assert (y.original_max_position, y.attention_factor) == (4096, 1.25)


@pytest.mark.parametrize("wrap", WRAPS)
def test_hf_llama3(wrap):
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
           "max_position_embeddings": 131072, "rope_scaling": {
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}}
    rope = RoPE.from_hf_config(wrap(cfg))
    s = rope.scaling
    assert isinstance(s, Llama3) and rope.base == 500000.0 and rope.rotary_dim is None
    assert (s.factor, s.original_max_position, s.low_freq_factor, s.high_freq_factor) == (8.0, 8192, 1.0, 4.0)


@pytest.mark.parametrize("wrap", WRAPS)
def test_hf_longrope(wrap):
    short, long = [1.0] * 48, [float(i + 1) for i in range(48)]
    # Phi-3 style: original_max_position_embeddings at top level, no factor -> factor = 131072 / 4096.
    cfg = {"hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
           "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long}}
    rope = RoPE.from_hf_config(wrap(cfg))
    s = rope.scaling
    assert isinstance(s, LongRoPE) and s.original_max_position == 4096 and s.factor == 32.0
    assert rope.frequencies(96)[1] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert_close(rope.frequencies(96, 4097)[0], default_inv(1e4, 96) / torch.tensor(long, dtype=torch.float64))
    # "su" is Phi-3's early name for longrope; explicit factor wins over the ratio.
    cfg["rope_scaling"] = {"type": "su", "short_factor": short, "long_factor": long, "factor": 2.0}
    assert RoPE.from_hf_config(wrap(cfg)).scaling.factor == 2.0


@pytest.mark.parametrize("wrap", WRAPS)
def test_hf_per_layer_rope_parameters(wrap):
    cfg = {"head_dim": 64, "layer_types": ["full_attention", "sliding_attention"], "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    with pytest.raises(ValueError, match="layer_type"):
        RoPE.from_hf_config(wrap(cfg))
    full = RoPE.from_hf_config(wrap(cfg), layer_type="full_attention")
    assert isinstance(full.scaling, PI) and full.base == 1e6
    sliding = RoPE.from_hf_config(wrap(cfg), layer_type="sliding_attention")
    assert sliding.scaling is None and sliding.base == 1e4


# --------------------------------------------------------------------------------------------
# Validation: every error a user can cause, naming the argument
# --------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
SHORT4 = [1.0, 1.0, 1.0, 1.0]

CONSTRUCTOR_ERRORS = [
    # (callable, exception, match)
    (lambda: RoPE(base=0.0), ValueError, "base"),
    (lambda: RoPE(base=1.0), ValueError, "base"),
    (lambda: RoPE(base=NAN), ValueError, "base"),
    (lambda: RoPE(base="1e4"), TypeError, "base"),
    (lambda: RoPE(scaling="yarn"), TypeError, "scaling"),
    (lambda: RoPE(rotary_dim=31.5), TypeError, "rotary_dim"),
    (lambda: PI(0.0), ValueError, "factor"),
    (lambda: PI(-2.0), ValueError, "factor"),
    (lambda: PI(INF), ValueError, "factor"),
    (lambda: PI(True), TypeError, "factor"),
    (lambda: PI("2"), TypeError, "factor"),
    (lambda: NTK(NAN), ValueError, "factor"),
    (lambda: DynamicNTK(0.0, 2048), ValueError, "factor"),
    (lambda: DynamicNTK(2.0, 0), ValueError, "original_max_position"),
    (lambda: DynamicNTK(2.0, 2048.5), TypeError, "original_max_position"),
    (lambda: YaRN(-1.0, 4096), ValueError, "factor"),
    (lambda: YaRN(4.0, -4096), ValueError, "original_max_position"),
    (lambda: YaRN(4.0, 4096, beta_fast=0), ValueError, "beta_fast"),
    (lambda: YaRN(4.0, 4096, beta_slow=NAN), ValueError, "beta_slow"),
    (lambda: YaRN(4.0, 4096, beta_fast=1, beta_slow=32), ValueError, "beta_fast"),
    (lambda: YaRN(4.0, 4096, attention_factor=0.0), ValueError, "attention_factor"),
    (lambda: YaRN(4.0, 4096, mscale=-1.0), ValueError, "mscale"),
    (lambda: YaRN(4.0, 4096, mscale_all_dim=INF), ValueError, "mscale_all_dim"),
    (lambda: YaRN(4.0, 4096, truncate="no"), TypeError, "truncate"),
    (lambda: Llama3(0.0, 8192), ValueError, "factor"),
    (lambda: Llama3(8.0, 0), ValueError, "original_max_position"),
    (lambda: Llama3(8.0, 8192, low_freq_factor=0.0), ValueError, "low_freq_factor"),
    (lambda: Llama3(8.0, 8192, high_freq_factor=NAN), ValueError, "high_freq_factor"),
    (lambda: Llama3(8.0, 8192, low_freq_factor=4.0, high_freq_factor=1.0), ValueError, "high_freq_factor"),
    (lambda: LongRoPE([1.0, 0.0], [1.0, 1.0], 4096), ValueError, "short_factor"),
    (lambda: LongRoPE([1.0, 1.0], [1.0, NAN], 4096), ValueError, "long_factor"),
    (lambda: LongRoPE(["a"], [1.0], 4096), TypeError, "short_factor"),
    (lambda: LongRoPE([1.0], 2.0, 4096), TypeError, "long_factor"),
    (lambda: LongRoPE([], [], 4096), ValueError, "short_factor"),
    (lambda: LongRoPE([1.0], [1.0], 0), ValueError, "original_max_position"),
    (lambda: LongRoPE([1.0], [1.0], 4096, factor=0.0), ValueError, "factor"),
    (lambda: LongRoPE([1.0], [1.0], 4096, attention_factor=-1.0), ValueError, "attention_factor"),
    (lambda: ALiBi([0.5, 0.25]), TypeError, "slopes"),
    (lambda: ALiBi(torch.ones(4, dtype=torch.int64)), TypeError, "slopes"),
    (lambda: KERPLE("cubic"), ValueError, "kind"),
    (lambda: KERPLE("log", r1=0.0), ValueError, "r1"),
    (lambda: KERPLE("log", r2=-1.0), ValueError, "r2"),
    (lambda: KERPLE("power", r1=INF), ValueError, "r1"),
    (lambda: KERPLE("power", r2="1"), TypeError, "r2"),
    (lambda: KERPLE("log", r1=torch.ones(4, dtype=torch.int32)), TypeError, "r1"),
    (lambda: alibi_slopes(0), ValueError, "num_heads"),
    (lambda: resolve_pe("t5"), ValueError, "pe"),
    (lambda: resolve_pe(3), TypeError, "pe"),
    (lambda: KERPLEBias(0), ValueError, "num_heads"),
    (lambda: KERPLEBias(4, kind="exp"), ValueError, "kind"),
]


@pytest.mark.parametrize("fn,exc,match", CONSTRUCTOR_ERRORS)
def test_constructor_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def _mutated_kerple():
    k = KERPLE("log")
    k.kind = "cubic"
    return k


# check(num_heads=4, head_dim=64, device=cpu) errors: (spec factory, exception, match)
CHECK_ERRORS = [
    (lambda: RoPE(rotary_dim=7), ValueError, "rotary_dim"),
    (lambda: RoPE(rotary_dim=128), ValueError, "rotary_dim"),
    (lambda: RoPE(rotary_dim=0), ValueError, "rotary_dim"),
    (lambda: RoPE(rotary_dim=2, scaling=NTK(2.0)), ValueError, "rotary_dim"),
    (lambda: RoPE(rotary_dim=2, scaling=DynamicNTK(2.0, 100)), ValueError, "rotary_dim"),
    (lambda: RoPE(scaling=LongRoPE([1.0] * 31, [1.0] * 32, 4096)), ValueError, "short_factor"),
    (lambda: RoPE(scaling=LongRoPE([1.0] * 32, [1.0] * 16, 4096)), ValueError, "long_factor"),
    (lambda: ALiBi(torch.ones(1)), ValueError, "slopes"),            # no silent broadcast
    (lambda: ALiBi(torch.ones(2, 4)), ValueError, "slopes"),
    (lambda: ALiBi(torch.ones(8)), ValueError, "slopes"),
    (lambda: ALiBi(torch.tensor([0.5, NAN, 0.1, 0.2])), ValueError, "slopes"),
    (lambda: ALiBi(torch.ones(4, device="meta")), ValueError, "slopes"),  # wrong device
    (_mutated_kerple, ValueError, "kind"),
    (lambda: KERPLE("log", r1=torch.ones(3)), ValueError, "r1"),
    (lambda: KERPLE("log", r2=torch.ones(1)), ValueError, "r2"),
    (lambda: KERPLE("power", r1=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, "r1"),
    (lambda: KERPLE("power", r2=torch.tensor([1.0, -0.5, 1.0, 1.0])), ValueError, "r2"),
    (lambda: KERPLE("log", r2=torch.tensor([1.0, INF, 1.0, 1.0])), ValueError, "r2"),
    (lambda: KERPLE("log", r1=torch.ones(4, device="meta")), ValueError, "r1"),
]


@pytest.mark.parametrize("factory,exc,match", CHECK_ERRORS)
def test_check_errors(factory, exc, match):
    spec = factory()
    with pytest.raises(exc, match=match):
        spec.check(4, 64, CPU)


def test_check_errors_name_expected_and_actual():
    with pytest.raises(ValueError, match=r"\(num_heads,\) = \(4,\), got \(2, 4\)"):
        ALiBi(torch.ones(2, 4)).check(4, 64, CPU)
    with pytest.raises(ValueError, match="32 entries, got 31"):
        RoPE(scaling=LongRoPE([1.0] * 31, [1.0] * 32, 4096)).check(4, 64, CPU)


@pytest.mark.parametrize("spec", [
    NoPE(), RoPE(), RoPE(rotary_dim=32, interleaved=True, scaling=YaRN(4.0, 4096)),
    RoPE(scaling=LongRoPE([1.0] * 32, [2.0] * 32, 4096)), ALiBi(), ALiBi(torch.rand(4, requires_grad=True)),
    KERPLE("log"), KERPLE("power", torch.rand(4) + 0.1, torch.rand(4, dtype=torch.float64) + 0.1),
    KERPLEBias(4, "power").spec(),
], ids=lambda spec: type(spec).__name__)
def test_check_accepts_valid(spec):
    spec.check(4, 64, CPU)
    spec.check(4, 64, "cpu")


def test_frequency_errors():
    with pytest.raises(ValueError, match="short_factor"):
        RoPE(scaling=LongRoPE(SHORT4, SHORT4, 100)).frequencies(64)
    with pytest.raises(TypeError, match="cur_len"):
        RoPE(scaling=DynamicNTK(2.0, 100)).frequencies(64, torch.tensor([3, 4]))
    with pytest.raises(TypeError, match="cur_len"):
        RoPE(scaling=LongRoPE(SHORT4, SHORT4, 100)).frequencies(8, 1.5)
    with pytest.raises(ValueError, match="rotary_dim"):
        RoPE(rotary_dim=6).frequencies(4)


@pytest.mark.parametrize("cfg,exc,match", [
    ({"head_dim": 64, "rope_scaling": {"rope_type": "mrope"}}, ValueError, "mrope"),
    ({"head_dim": 64, "rope_scaling": {"rope_type": "linear"}}, TypeError, "factor"),
    ({"head_dim": 64, "rope_scaling": {"rope_type": "linear", "factor": 0}}, ValueError, "factor"),
    ({"head_dim": 64, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ValueError, "max_position_embeddings"),
    ({"head_dim": 64, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, ValueError,
     "original_max_position_embeddings"),
    ({"head_dim": 64, "max_position_embeddings": 4096, "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 32}}, ValueError, "short_factor"),
    ({"head_dim": 64, "partial_rotary_factor": 0.3}, ValueError, "partial_rotary_factor"),
    ({"head_dim": 64, "partial_rotary_factor": 1.5}, ValueError, "partial_rotary_factor"),
    ({"rope_theta": 1e4}, ValueError, "head_dim"),
    ({"head_dim": 64, "rope_theta": -1.0}, ValueError, "base"),
    ({"head_dim": 64, "rope_scaling": "linear"}, TypeError, "rope_scaling"),
])
def test_hf_config_errors(cfg, exc, match):
    with pytest.raises(exc, match=match):
        RoPE.from_hf_config(cfg)


def test_hf_config_layer_type_errors():
    with pytest.raises(ValueError, match="layer_type"):  # flat config: no layers to pick from
        RoPE.from_hf_config({"head_dim": 64}, layer_type="full_attention")
    with pytest.raises(ValueError, match="layer_type"):
        RoPE.from_hf_config({"head_dim": 64, "rope_parameters": {"full_attention": {"rope_type": "default"}}},
                            layer_type="sliding_attention")


# --------------------------------------------------------------------------------------------
# posattn.nn.KERPLEBias
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,r1_max,r2_max", [("log", 2.0, 1.0), ("power", 1.0, 2.0)])
def test_kerple_bias_init_ranges(kind, r1_max, r2_max):
    torch.manual_seed(0)
    m = KERPLEBias(4096, kind)
    for p, hi in ((m.r1, r1_max), (m.r2, r2_max)):
        assert isinstance(p, torch.nn.Parameter) and p.shape == (4096,) and p.dtype == torch.float32
        assert p.min() >= 1e-2 and p.max() <= hi
        assert p.max() > 0.95 * hi and p.mean().item() == pytest.approx(hi / 2, abs=0.05)  # ~ hi * U(0,1)
    assert "num_heads=4096" in repr(m) and f"kind='{kind}'" in repr(m)


@pytest.mark.parametrize("kind,r2_after", [("log", [0.01, 3.0, 0.5, 2.5]), ("power", [0.01, 2.0, 0.5, 2.0])])
def test_kerple_bias_clamps_in_spec(kind, r2_after):
    m = KERPLEBias(4, kind)
    with torch.no_grad():
        m.r1.copy_(torch.tensor([-1.0, 0.001, 0.5, 5.0]))
        m.r2.copy_(torch.tensor([-1.0, 3.0, 0.5, 2.5]))
    spec = m.spec()
    assert isinstance(spec, KERPLE) and spec.kind == kind
    assert spec.r1 is m.r1 and spec.r2 is m.r2  # live parameters, not copies
    assert_close(m.r1.detach(), torch.tensor([0.01, 0.01, 0.5, 5.0]))
    assert_close(m.r2.detach(), torch.tensor(r2_after))
    assert m.r1.requires_grad and m.r1.grad is None  # the clamp is not recorded by autograd


@pytest.mark.parametrize("kind", ["log", "power"])
def test_kerple_bias_spec_gradients(kind):
    torch.manual_seed(0)
    m = KERPLEBias(3, kind, dtype=torch.float64)
    delta = torch.arange(1, 6, dtype=torch.float64)[None, :]  # |i - j| in 1..5

    def bias_sum(spec):
        r1, r2 = (t[:, None] for t in spec.get_params(3, CPU))
        if spec.kind == "log":
            return (-r1 * torch.log1p(r2 * delta)).sum()
        return (-r1 * delta ** r2).sum()

    # spec() twice in one forward (a module shared by two layers) must not break backward.
    (bias_sum(m.spec()) + bias_sum(m())).backward()
    r1, r2 = m.r1.detach()[:, None], m.r2.detach()[:, None]
    if kind == "log":
        g1, g2 = -torch.log1p(r2 * delta), -r1 * delta / (1 + r2 * delta)
    else:
        g1, g2 = -delta ** r2, -r1 * delta ** r2 * torch.log(delta)
    assert_close(m.r1.grad, 2 * g1.sum(1))
    assert_close(m.r2.grad, 2 * g2.sum(1))


def test_kerple_bias_exported():
    import posattn
    assert posattn.nn.KERPLEBias is KERPLEBias


# --------------------------------------------------------------------------------------------
# The registry and the tests' factories (tests/pe_cases.py)
# --------------------------------------------------------------------------------------------


def _spec_axes(case, H=4, D=32):
    spec = resolve_pe(case.make(H, D))
    spec.check(H, D, torch.device(DEVICE))  # a valid spec for the heads it was made for
    return spec.rotary, spec.bias, spec.tile_family


@pytest.mark.parametrize("suite", sorted(pe_cases.SUITES))
@pytest.mark.parametrize("name", registered())
def test_every_registered_pe_has_a_test_factory(name, suite):
    """Tests enumerate the registry (tests/pe_cases.py): a newly registered PE fails here until
    every suite has a factory for it whose spec has the axes the registry gives the name."""
    table = pe_cases.cases(suite)
    assert name in table, (f"registered PE {name!r} has no test factory: add one to tests/pe_cases.py, "
                           f"suite {suite!r}")
    assert table[name].base == name and not table[name].variant
    assert _spec_axes(table[name]) == axes(name)


VARIANTS = [(s, n) for s in sorted(pe_cases.SUITES) for n, c in pe_cases.cases(s).items() if c.variant]


@pytest.mark.parametrize("suite,name", VARIANTS, ids=[f"{s}-{n}" for s, n in VARIANTS])
def test_variants_name_their_registered_base(suite, name):
    case = pe_cases.cases(suite)[name]
    assert name not in registered() and case.base in registered()
    assert pe_cases.base_of(name, suite) == case.base
    assert _spec_axes(case) == axes(case.base)


def test_pe_cases_enumerate_the_registry():
    names = list(registered())
    assert list(pe_cases.REGISTERED) == names == pe_cases.every_pe()
    assert pe_cases.bias_pes() == [n for n in names if axes(n)[1] != "none"]
    assert pe_cases.names(rotary=True) == [n for n in names if axes(n)[0] != "none"]
    assert pe_cases.names(family="kerple") == [n for n in names if axes(n)[2] == "kerple"]
    for suite in pe_cases.SUITES:
        every = pe_cases.every_pe(variants=True, suite=suite)
        assert set(every) == set(names) | set(pe_cases.cases(suite))
        # each variant right after its base's group
        bases = [pe_cases.base_of(n, suite) for n in every]
        assert bases == sorted(bases, key=names.index)
    assert pe_cases.bias_pes(suite="kernel", substitute={"alibi": "alibi_trainable"}) == \
        [n if n != "alibi" else "alibi_trainable" for n in pe_cases.bias_pes()]
    with pytest.raises(KeyError):
        pe_cases.pe_factory("no_such_pe")


def test_resolve_pe():
    assert isinstance(resolve_pe(None), NoPE)
    assert isinstance(resolve_pe("RoPE"), RoPE)
    assert isinstance(resolve_pe("alibi"), ALiBi) and isinstance(resolve_pe("kerple"), KERPLE)
    spec = ALiBi()
    assert resolve_pe(spec) is spec


# --------------------------------------------------------------------------------------------
# Parity with transformers' own RoPE init functions (optional dependency)
# --------------------------------------------------------------------------------------------

HF_CASES = {
    # name: (LlamaConfig kwargs, rope dict, [cur_len ...])
    "linear": (dict(hidden_size=256, num_attention_heads=4, rope_theta=10000.0, max_position_embeddings=2048),
               {"rope_type": "linear", "factor": 4.0}, [None]),
    "dynamic": (dict(hidden_size=256, num_attention_heads=4, rope_theta=10000.0, max_position_embeddings=2048),
                {"rope_type": "dynamic", "factor": 2.0}, [None, 1000, 2048, 2049, 5000]),
    "yarn": (dict(hidden_size=512, num_attention_heads=4, rope_theta=1e6, max_position_embeddings=32768),
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}, [None]),
    "yarn_mscale": (dict(hidden_size=512, num_attention_heads=4, head_dim=64, rope_theta=1e4,
                         max_position_embeddings=16384, partial_rotary_factor=0.5),
                    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.9, "mscale_all_dim": 0.8,
                     "truncate": False}, [None]),
    "llama3": (dict(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072),
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}, [None]),
    # Phi-3 style (top-level original_max_position_embeddings, no factor): the form transformers 4.x
    # and 5.x read alike.
    "longrope": (dict(hidden_size=3072, num_attention_heads=32, rope_theta=10000.0, max_position_embeddings=131072,
                      original_max_position_embeddings=4096),
                 {"rope_type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(48)],
                  "long_factor": [1.0 + 0.5 * i for i in range(48)]}, [None, 4096, 4097]),
}


# Older transformers computed YaRN differently: <= 4.46 measured the ramp against
# max_position_embeddings and had no mscale; 4.51-4.54 replaced an explicit factor by
# max_position_embeddings / original_max_position_embeddings and had no `truncate`. posattn
# follows the current behaviour (checked against 4.57.6 and 5.24.0).
HF_MIN_VERSION = "4.57"


def _hf_modules():
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version  # a transformers dependency
    if Version(transformers.__version__) < Version(HF_MIN_VERSION):
        pytest.skip(f"transformers {transformers.__version__} < {HF_MIN_VERSION} computes some RoPE "
                    f"scalings differently (see HF_MIN_VERSION)")
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:  # pragma: no cover - very old transformers
        pytest.skip("transformers has no modeling_rope_utils.ROPE_INIT_FUNCTIONS")
    return transformers, ROPE_INIT_FUNCTIONS


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_parity(case):
    transformers, init_fns = _hf_modules()
    kwargs, rope_dict, cur_lens = HF_CASES[case]
    # rope_scaling= is accepted by LlamaConfig in 4.x (stored) and 5.x (converted to rope_parameters).
    config = transformers.LlamaConfig(**kwargs, rope_scaling=dict(rope_dict))
    head_dim = kwargs.get("head_dim") or kwargs["hidden_size"] // kwargs["num_attention_heads"]
    ours = RoPE.from_hf_config(config)
    for cur_len in cur_lens:
        hf_inv, hf_af = init_fns[rope_dict["rope_type"]](config, torch.device("cpu"), seq_len=cur_len)
        inv, af = ours.frequencies(head_dim, cur_len)
        # transformers works in float32: ~1e-7 relative error per power, ~ln(base) amplified.
        torch.testing.assert_close(inv, hf_inv.double(), rtol=1e-5, atol=0, msg=f"{case} cur_len={cur_len}")
        assert af == pytest.approx(float(hf_af), rel=1e-9), f"{case} cur_len={cur_len}"
    # The same config as a plain dict (config.json) gives the same spec.
    from_dict = RoPE.from_hf_config(config.to_dict())
    for cur_len in cur_lens:
        a, b = from_dict.frequencies(head_dim, cur_len), ours.frequencies(head_dim, cur_len)
        assert_close(a[0], b[0])
        assert a[1] == b[1]


def test_hf_parity_default():
    transformers, _ = _hf_modules()
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=50000.0)
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    inv, af = RoPE.from_hf_config(config).frequencies(64)
    torch.testing.assert_close(inv, hf.inv_freq.double(), rtol=1e-5, atol=0)
    assert af == float(hf.attention_scaling)
