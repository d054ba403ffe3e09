"""Property-based tests (hypothesis), bounded for CI: tiny shapes, a fixed number of examples.

* ``test_kernel_matches_reference``: random shapes (GQA, Sq != Sk, odd head dims, Dv != D), PEs
  (every RoPE scaling, partial / interleaved rotary, trainable ALiBi / KERPLE), causal, scale,
  positions (default, int offsets, explicit tensors: unsorted, per batch, int16 / int32 / int64),
  layouts and dtypes: kernel vs the float64 reference by flash-attention's rule, forward and
  backward, inputs unmodified. Every tensor input may arrive as a view (``VIEWS``): q, k, v,
  dout, position tensors and the PE parameters (slopes, r1, r2) strided, expanded (stride 0)
  or at a storage offset, q / k / v / dout also permuted. Per-head parameters sit in a buffer of
  junk (9.0), so a kernel that reads them as if contiguous fails the rule.
* ``test_arguments_never_crash``: a valid call with at most one argument corrupted (wrong dtype,
  shape, device, type, value): posattn.attention either raises TypeError / ValueError with a
  message, or returns what the float64 reference returns; it never raises anything else, never
  refuses a valid call and never modifies its inputs.

Examples are derandomized (the same every run) so CI is reproducible; set
POSATTN_HYPOTHESIS_EXAMPLES=<n> and POSATTN_HYPOTHESIS_RANDOM=1 to explore further.
"""
import math
import os

import torch
from hypothesis import HealthCheck, Phase, event, example, given, settings, strategies as st

import posattn
from posattn import ALiBi, DynamicNTK, KERPLE, Llama3, LongRoPE, NTK, PI, RoPE, YaRN
from conftest import DEVICE, HAS_CUDA
from attn_harness import check, snapshot, assert_unmodified
from pe_cases import REGISTERED, pe_factory

_EXPLORE = os.environ.get("POSATTN_HYPOTHESIS_RANDOM", "0") not in ("", "0")


def _settings(default_examples):
    return settings(
        max_examples=int(os.environ.get("POSATTN_HYPOTHESIS_EXAMPLES", default_examples)),
        deadline=None, derandomize=not _EXPLORE, database=None, print_blob=True,
        # an example takes ~0.2-3 s in the interpreter: shrinking a failure could take many
        # minutes, so CI reports the failing example as found (explore mode shrinks)
        phases=(Phase.explicit, Phase.generate) + ((Phase.shrink,) if _EXPLORE else ()),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large, HealthCheck.filter_too_much])


DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])
SCALINGS = ["none", "pi", "ntk", "dynamic_ntk", "yarn", "llama3", "longrope"]

# --------------------------------------------------------------------------------------------
# tensor inputs as views: a view is a tuple (kind, arg), printed as is in a failing example
# --------------------------------------------------------------------------------------------

VIEWS = ("contiguous", "strided", "permuted", "expanded", "offset")
CONTIGUOUS = ("contiguous", None)


@st.composite
def views(draw, shape):
    """How a tensor of ``shape`` is laid out: contiguous; strided (every other element along
    a dim, from index 1: storage offset too; along the last dim the launcher copies it);
    permuted (its storage in another dim order); expanded (stride 0 along a dim of size > 1);
    offset (contiguous at a storage offset of 1-7 elements, so not 16-byte aligned either)."""
    kind = draw(st.sampled_from(VIEWS))
    n = len(shape)
    if kind == "strided":
        return kind, draw(st.integers(0, n - 1))
    if kind == "permuted":
        return kind, tuple(draw(st.permutations(range(n))))
    if kind == "expanded":
        dims = [d for d in range(n) if shape[d] > 1]
        return (kind, draw(st.sampled_from(dims))) if dims else CONTIGUOUS
    if kind == "offset":
        return kind, draw(st.integers(1, 7))
    return CONTIGUOUS


def storage_shape(view, shape):
    """Shape of the tensor that ``as_view(view, storage, shape)`` is a view of."""
    kind, arg = view
    shape = list(shape)
    if kind == "strided":
        shape[arg] = 2 * shape[arg] + 1
    elif kind == "permuted":
        shape = [shape[p] for p in arg]
    elif kind == "expanded":
        shape[arg] = 1
    elif kind == "offset":
        shape = [arg + math.prod(shape)]
    return tuple(shape)


def as_view(view, storage, shape):
    """The view of ``storage`` (shaped by storage_shape) that has ``shape``: same memory, so
    the harness tells q, k and v apart by their storage, and gradients reach the storage."""
    kind, arg = view
    if kind == "strided":
        return storage[(slice(None),) * arg + (slice(1, None, 2),)]
    if kind == "permuted":
        return storage.permute([arg.index(i) for i in range(len(arg))])
    if kind == "expanded":
        return storage.expand(shape)
    if kind == "offset":
        return storage[arg:].view(shape)
    return storage


def arranged(view):
    """``arrange`` for the harness's dout: the same values laid out as ``view`` (expanded:
    its first slice along the dim, broadcast)."""
    kind, arg = view
    if kind == "contiguous":
        return None

    def arrange(d):
        if kind == "expanded":
            return d.narrow(arg, 0, 1).expand_as(d)
        out = as_view(view, d.new_zeros(storage_shape(view, d.shape)), d.shape)
        return out.copy_(d)
    return arrange


PARAM_VIEWS = ("contiguous", "strided", "expanded", "offset")
JUNK = 9.0  # what a kernel that ignores a per-head parameter's stride reads (as in the issue)


def head_view(kind, vals):
    """A per-head parameter (H,) with the values ``vals`` (expanded: vals[0] for every head)
    as a view of a larger buffer whose other elements are JUNK: every other element at offset
    1 (as BLOOM's ``alibi[:, 0, 1]``), stride 0, or contiguous at an offset."""
    if kind == "strided":
        return torch.stack((torch.full_like(vals, JUNK), vals), 1)[:, 1]
    if kind == "expanded":
        return torch.cat((vals[:1], torch.full_like(vals, JUNK)))[:1].expand(vals.shape)
    if kind == "offset":
        return torch.cat((torch.full_like(vals[:3], JUNK), vals))[vals[:3].numel():]
    return vals


def _scaling(name, rotary_dim):
    half = rotary_dim // 2
    return {
        "none": lambda: None,
        "pi": lambda: PI(2.5),
        "ntk": lambda: NTK(4.0),
        "dynamic_ntk": lambda: DynamicNTK(2.0, 24),  # positions here exceed 24 now and then
        "yarn": lambda: YaRN(4.0, 16),
        "llama3": lambda: Llama3(8.0, 32),
        "longrope": lambda: LongRoPE([1.0 + 0.2 * i for i in range(half)],
                                     [1.5 + 0.5 * i for i in range(half)], 24, factor=4.0),
    }[name]()


@st.composite
def pe_specs(draw, Hq, D):
    """A PE spec (name or instance) for Hq query heads of head dim D: every registered PE (a PE
    drawn nowhere below gets its tests/pe_cases.py factory)."""
    kind = draw(st.sampled_from(REGISTERED))
    if kind == "none":
        return draw(st.sampled_from(["none", None, posattn.NoPE()]))
    if kind == "rope":
        scaling = draw(st.sampled_from(SCALINGS))
        lo = 4 if scaling in ("ntk", "dynamic_ntk") else 2
        rotary_dim = draw(st.sampled_from([d for d in range(lo, D + 1, 2)]))
        return RoPE(base=draw(st.sampled_from([10000.0, 500000.0])),
                    scaling=_scaling(scaling, rotary_dim),
                    rotary_dim=None if rotary_dim == D else rotary_dim,
                    interleaved=draw(st.booleans()))

    def heads(lo, hi):
        vals = draw(st.lists(st.floats(lo, hi), min_size=Hq, max_size=Hq))
        kind = draw(st.sampled_from(PARAM_VIEWS))
        return head_view(kind, torch.tensor(vals, device=DEVICE)).requires_grad_()

    if kind == "alibi":
        return "alibi" if draw(st.booleans()) else ALiBi(heads(0.01, 1.0))
    if kind.startswith("kerple"):
        r1 = heads(0.1, 2.0) if draw(st.booleans()) else draw(st.floats(0.1, 2.0))
        r2 = heads(0.05, 1.5) if draw(st.booleans()) else draw(st.floats(0.05, 1.5))
        return KERPLE(kind.split("_")[1], r1, r2)
    return pe_factory(kind)(Hq, D)


@st.composite
def positions(draw, B, S):
    kind = draw(st.sampled_from(["default", "int", "tensor"]))
    if kind == "default":
        return None
    if kind == "int":
        return draw(st.integers(-40, 3000))
    per_batch = draw(st.booleans())
    n = B * S if per_batch else S
    vals = draw(st.lists(st.integers(-30, 90), min_size=n, max_size=n))
    if draw(st.booleans()):
        vals = sorted(vals)
    dtype = draw(st.sampled_from([torch.int16, torch.int32, torch.int64]))
    t = torch.tensor(vals, dtype=dtype, device=DEVICE)
    t = t.view(B, S) if per_batch else t
    kind = draw(st.sampled_from(["contiguous", "strided", "expanded", "offset"]))
    if kind == "strided":  # the same values, every other element (+ junk between)
        t = torch.stack((t, torch.full_like(t, 77)), -1)[..., 0]
    elif kind == "expanded" and t.shape[0] > 1:  # stride 0: the batch's (or sequence's) first
        t = t[:1].expand(t.shape)
    elif kind == "offset":
        t = torch.cat((torch.full_like(t.flatten()[:1], 77), t.flatten()))[1:].view(t.shape)
    return t


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    Sq = draw(st.integers(1, 40))
    Sk = draw(st.integers(1, 40))
    D = draw(st.sampled_from([4, 8, 12, 16, 24]))
    pe = draw(pe_specs(Hq, D))
    if not isinstance(pe, RoPE) and draw(st.booleans()):
        D = draw(st.sampled_from([3, 5, 13]))  # odd head dims (RoPE needs even ones)
    Dv = draw(st.sampled_from([D, 7, 16]))
    layout = draw(st.sampled_from(["bhsd", "bshd"]))
    shapes = _shapes((B, Hq, Hkv, Sq, Sk, D, Dv), layout)
    return dict(
        shape=(B, Hq, Hkv, Sq, Sk, D, Dv), pe=pe, causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, None, 0.3, 1.7])),
        q_positions=draw(positions(B, Sq)), k_positions=draw(positions(B, Sk)),
        layout=layout, dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2 ** 16)),
        views={n: draw(views(s)) for n, s in shapes.items()},
        dout_view=draw(views(shapes["q"][:3] + (Dv,))),  # out has q's layout, head dim Dv
        pe_tensors=_tensor_layouts(pe))


def _tensor_layouts(pe):
    """Strides and storage offsets of the PE's tensors (for the report of a failing example)."""
    tensors = {n: getattr(pe, n, None) for n in ("slopes", "r1", "r2")}
    return {n: f"stride {t.stride()} offset {t.storage_offset()}" for n, t in tensors.items()
            if isinstance(t, torch.Tensor)}


def _shapes(shape, layout):
    B, Hq, Hkv, Sq, Sk, D, Dv = shape
    if layout == "bhsd":
        return dict(q=(B, Hq, Sq, D), k=(B, Hkv, Sk, D), v=(B, Hkv, Sk, Dv))
    return dict(q=(B, Sq, Hq, D), k=(B, Sk, Hkv, D), v=(B, Sk, Hkv, Dv))


def _example(shape, pe, dtype=torch.float32, seed=0, causal=False, q_positions=None, k_positions=None,
             **views):
    return example(case=dict(shape=shape, pe=pe, causal=causal, scale=None, q_positions=q_positions,
                             k_positions=k_positions, layout="bhsd", dtype=dtype, seed=seed, **views))


def _heads(kind, *vals):
    return head_view(kind, torch.tensor(vals, device=DEVICE)).requires_grad_()


def _positions(*vals, dtype=torch.int64):
    """Positions (B, S) as every other element of a buffer (77 between)."""
    t = torch.tensor(vals, dtype=dtype, device=DEVICE)
    return torch.stack((t, torch.full_like(t, 77)), -1)[..., 0]


# Regression examples: hypothesis found each breaking the bare rule in float32 through
# flash-attention's own rounding (see attn_harness.FlashSlack), not through a kernel bug.
@_example((1, 1, 1, 1, 1, 12, 12), "none")  # Sk = 1: true dK = 0, the naive's exactly 0
@_example((1, 1, 1, 1, 5, 4, 4), KERPLE("log", 1.640625, 0.25), q_positions=-24)  # LSE in exp2 domain
@_example((1, 2, 1, 1, 2, 4, 4), "alibi", seed=1, q_positions=90)  # |bias| ~ 22: P error ~ eps |s|
@_example((2, 1, 1, 20, 16, 4, 4), KERPLE("log", 0.2888, torch.tensor([0.3], device=DEVICE).requires_grad_()),
          k_positions=torch.tensor([[-26, -19, -18, -14] + [0] * 12, [0, 0, 7, 8, 21, 26, 35, 43, 44, 47, 51,
                                                                       53, 58, 62, 65, 78]], device=DEVICE))
# Regression examples for "strided PE parameters are read as if contiguous" (the kernels read
# head h's parameter at PA + h, without a stride): BLOOM's slopes (every other element of its
# alibi tensor), and KERPLE's r1 strided and r2 expanded, beside q / k / v / dout / position
# views. Drawn cases hold such views too, but only some of them hold a PE tensor.
@_example((1, 4, 4, 17, 17, 16, 16), ALiBi(_heads("strided", 0.25, 0.0625, 0.0156, 0.0039)), causal=True)
@_example((2, 2, 1, 9, 20, 8, 8), KERPLE("power", _heads("strided", 0.5, 0.9), _heads("expanded", 0.7, 0.7)),
          causal=True, views={"q": ("permuted", (0, 2, 1, 3)), "k": ("expanded", 0), "v": ("strided", 3)},
          dout_view=("offset", 3), q_positions=torch.tensor([17], device=DEVICE).expand(9),
          k_positions=_positions([3, 9, 1, 30, 2, 5, 8, 13, 21, 34] * 2, list(range(40, 0, -2)),
                                 dtype=torch.int16))
# 26 drawn examples (30 before the views): the explicit ones above take the difference.
@_settings(26)
@given(case=cases())
def test_kernel_matches_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    shapes = _shapes(case["shape"], case["layout"])
    views_ = case.get("views", {})
    # the autograd leaves are the views' storages (their other elements: random junk)
    base = {n: torch.randn(*storage_shape(views_.get(n, CONTIGUOUS), s), generator=g) for n, s in shapes.items()}

    def build(L):
        return tuple(as_view(views_.get(n, CONTIGUOUS), L[n], shapes[n]) for n in ("q", "k", "v"))

    kw = {n: case[n] for n in ("causal", "scale", "q_positions", "k_positions", "layout")}
    check(base, build, case["pe"], case["dtype"], seed=case["seed"],
          arrange=arranged(case.get("dout_view", CONTIGUOUS)), **kw)


# --------------------------------------------------------------------------------------------
# arbitrary arguments: a valid call with at most one argument corrupted
# --------------------------------------------------------------------------------------------

OTHER_DEVICE = "cpu" if HAS_CUDA else "meta"
_VALID_DTYPES = [torch.float16, torch.float32, torch.float32, torch.float64] + ([torch.bfloat16] if HAS_CUDA else [])


@st.composite
def valid_call(draw):
    """A call that must run: shapes, PE, positions, layout and backend all consistent."""
    dtype = draw(st.sampled_from(_VALID_DTYPES))
    B, Hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq, Sq, Sk = Hkv * g, draw(st.integers(1, 4)), draw(st.integers(0, 4))
    D, Dv = draw(st.sampled_from([2, 4, 6])), draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["bhsd", "bshd"]))
    shapes = [(B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv)]
    if layout == "bshd":
        shapes = [(b, s, h, d) for b, h, s, d in shapes]
    layouts = [draw(views(s)) for s in shapes]  # the tensors as views (see views())
    qkv = [as_view(w, torch.randn(storage_shape(w, s)).to(DEVICE, dtype), s) for w, s in zip(layouts, shapes)]
    head_kind = draw(st.sampled_from(PARAM_VIEWS))

    def heads(lo):
        return head_view(head_kind, (torch.rand(Hq) + lo).to(DEVICE))

    pe = draw(st.sampled_from([
        lambda: "none", lambda: None, lambda: "rope", lambda: "alibi", lambda: "KERPLE",
        lambda: posattn.NoPE(), lambda: RoPE(rotary_dim=2, interleaved=True),
        lambda: RoPE(rotary_dim=D, scaling=YaRN(2.0, 4)), lambda: ALiBi(heads(0.0)),
        lambda: KERPLE("power", heads(0.1), 0.5), lambda: KERPLE("log", 0.5, heads(0.1))]))

    def pos(S):
        kind = draw(st.sampled_from(["none", "int", "S", "BS", "strided", "expanded", "offset"]))
        if kind == "none":
            return None
        if kind == "int":
            return draw(st.integers(-5, 5))
        dt = draw(st.sampled_from([torch.int64, torch.int32, torch.int16]))
        # made on DEVICE: .to() a GPU would make a strided CPU tensor contiguous
        t = torch.randint(-4, 8, (S,) if kind == "S" else (B, S), dtype=dt, device=DEVICE)
        if kind == "strided":
            t = torch.randint(-4, 8, (2 * S,), dtype=dt, device=DEVICE)[::2]
        elif kind == "expanded":  # stride 0 along the batch
            t = torch.randint(-4, 8, (1, S), dtype=dt, device=DEVICE).expand(B, S)
        elif kind == "offset":
            t = torch.randint(-4, 8, (S + 3,), dtype=dt, device=DEVICE)[3:]
        return t

    kw = dict(causal=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.5, -0.25, 2.0])),
              q_positions=pos(Sq), k_positions=pos(Sk), layout=layout,
              backend=draw(st.sampled_from(["triton", "reference", "auto"])), return_lse=True)
    return dict(q=qkv[0], k=qkv[1], v=qkv[2], pe=pe, kw=kw, B=B, Hq=Hq, Sq=Sq, Sk=Sk, D=D)


def _corruptions(c):
    """argument -> list of functions returning a bad value for it (given the valid call c)."""
    B, Hq, Sq, Sk, D = c["B"], c["Hq"], c["Sq"], c["Sk"], c["D"]

    def tensor_bad(t):
        return [lambda: t.int(), lambda: t > 0, lambda: t.to(torch.complex64), lambda: t[0],
                lambda: t[None], lambda: t[:, :, :, :-1], lambda: torch.cat((t, t), 0),
                lambda: torch.cat((t, t), 1), lambda: torch.cat((t, t), 2), lambda: t.to(OTHER_DEVICE),
                lambda: t.cpu().numpy(), lambda: None, lambda: t.half() if t.dtype != torch.float16 else t.float()]

    dev = DEVICE
    return {
        "q": tensor_bad(c["q"]), "k": tensor_bad(c["k"]), "v": tensor_bad(c["v"]),
        "pe": [lambda: "t5", lambda: "", lambda: 3, lambda: RoPE, lambda: RoPE(rotary_dim=D + 2),
               lambda: RoPE(rotary_dim=1), lambda: RoPE(rotary_dim=0), lambda: RoPE(base=0.5),
               lambda: RoPE(scaling=NTK(2.0), rotary_dim=2), lambda: RoPE(scaling=PI(-1.0)),
               lambda: RoPE(scaling=LongRoPE([1.0], [1.0], 4)) if D > 2 else RoPE(rotary_dim=3),
               lambda: ALiBi(torch.ones(Hq + 1, device=dev)), lambda: ALiBi(torch.ones(1, Hq, device=dev)),
               lambda: ALiBi(torch.full((Hq,), math.nan, device=dev)), lambda: ALiBi(torch.ones(Hq, dtype=torch.int32)),
               lambda: ALiBi(torch.ones(Hq, device=OTHER_DEVICE)), lambda: KERPLE("exp"),
               lambda: KERPLE("log", 0.0), lambda: KERPLE("power", 1.0, math.inf),
               lambda: KERPLE("log", torch.zeros(Hq, device=dev)), lambda: KERPLE("log", 1.0, -torch.ones(Hq, device=dev)),
               lambda: KERPLE("power", torch.ones(Hq + 1, device=dev)), lambda: KERPLE("log", "1")],
        "causal": [lambda: 1, lambda: None, lambda: "yes", lambda: torch.tensor(True)],
        "scale": [lambda: math.nan, lambda: math.inf, lambda: -math.inf, lambda: "a", lambda: True,
                  lambda: torch.tensor(0.5), lambda: [0.5]],
        "q_positions": [lambda: torch.arange(Sq + 1, device=dev), lambda: torch.zeros(B + 1, Sq, dtype=torch.long, device=dev),
                        lambda: torch.zeros(1, B, Sq, dtype=torch.long, device=dev), lambda: torch.arange(Sq, device=dev).float(),
                        lambda: torch.ones(Sq, dtype=torch.bool, device=dev), lambda: torch.arange(Sq, device=OTHER_DEVICE),
                        lambda: 2 ** 31, lambda: -(2 ** 31), lambda: 1.5, lambda: True, lambda: list(range(Sq))],
        "k_positions": [lambda: torch.arange(Sk + 1, device=dev), lambda: torch.zeros(Sk, 2, dtype=torch.long, device=dev),
                        lambda: torch.zeros(Sk, dtype=torch.complex64, device=dev), lambda: 2 ** 40, lambda: "0"],
        "layout": [lambda: "sbhd", lambda: None, lambda: "BHSD", lambda: 0],
        "backend": [lambda: "cuda", lambda: None, lambda: "Triton"],
    }


@st.composite
def any_call(draw):
    c = draw(valid_call())
    corrupt = draw(st.sampled_from([None, None, "q", "k", "v", "pe", "causal", "scale", "q_positions",
                                    "k_positions", "layout", "backend"]))
    q, k, v, pe, kw = c["q"], c["k"], c["v"], c["pe"], dict(c["kw"])
    if corrupt is not None:
        bad = draw(st.sampled_from(_corruptions(c)[corrupt]))
        if corrupt in ("q", "k", "v"):
            q, k, v = (bad() if n == corrupt else t for n, t in (("q", q), ("k", k), ("v", v)))
        elif corrupt == "pe":
            pe = bad
        else:
            kw[corrupt] = bad()
    return q, k, v, pe, kw, corrupt


@_settings(80)
@given(call=any_call())
def test_arguments_never_crash(call):
    q, k, v, make_pe, kw, corrupt = call
    snap = snapshot(q, k, v, kw)
    try:
        pe = make_pe()
        snap += snapshot(pe)
        out, lse = posattn.attention(q, k, v, pe, **kw)
    except (TypeError, ValueError) as e:
        assert str(e), "an error without a message"
        assert_unmodified(snap)
        float64_on_triton = kw["backend"] == "triton" and getattr(q, "dtype", None) == torch.float64
        assert corrupt is not None or float64_on_triton, f"a valid call was refused: {e}"
        event(f"refused ({corrupt}): {type(e).__name__}")
        return
    event(f"ran ({corrupt})")
    assert_unmodified(snap)
    if q.device.type == "meta":
        return
    # it ran: it must agree with the float64 reference on the same arguments
    ref, ref_lse = posattn.attention(q.double(), k.double(), v.double(), pe, **dict(kw, backend="reference"))
    assert out.shape == ref.shape and out.dtype == q.dtype and lse.shape == ref_lse.shape
    eps = torch.finfo(q.dtype).eps
    for got, want in ((out, ref), (lse, ref_lse)):
        got = got.double()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs from the reference"
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), "inf pattern differs from the reference"
        if finite.any():
            err = (got - want)[finite].abs().max().item()
            assert err <= 16 * eps * max(1.0, want[finite].abs().max().item()), f"error {err:.3g}"
