"""Strided, expanded and offset views of every tensor argument that reaches a kernel give
bitwise the same forward output, LSE and gradients as contiguous copies (backend="triton").

Regression for "Strided PE parameters are read as if contiguous: silently wrong output and
gradients on the Triton backend". The kernels read a per-head parameter (ALiBi slope, KERPLE
r1 / r2) at ``PA + h``, without a stride; BLOOM's slopes, ``build_alibi_tensor(...)[:, 0, 1]``,
are a strided view, so the Triton backend used the wrong slopes (and returned wrong slope
gradients). kernels.launch.KernelPE makes them contiguous (through autograd). q / k / v, dout and position tensors reach the kernels with their strides.

Every view here sits in a larger buffer whose other elements are junk (NaN for q / k / v / dout,
9.0 for PE parameters as in the issue, 99 for positions), so a kernel that ignores a stride, a
stride-0 dim or a storage offset reads junk and the result differs from the contiguous copy's.
Both runs take the same tiles (README, "Strides": only on Hopper at D=128 may a view that
is not 16-byte aligned run a smaller forward tile; D=16 here), so the comparison is bitwise
(torch.equal).
"""
import pytest
import torch

import posattn
from posattn import FIRE, ALiBi, KERPLE, RoPE, Sandwich, T5Bias
from conftest import DEVICE
from attn_harness import check, plain, qkv
from helpers import force_bias_tables
from pe_cases import bias_pes, pe_factory

# small and odd: two key tiles of the interpreter's 32 x 32, GQA (2 query heads share 1 kv head).
# Batch 2 where a view spans the batch (positions (B, S), k expanded along it), else 1 (the
# interpreter's time grows with the programs: batch x heads x query blocks).
HQ, HKV, SQ, SK, D = 2, 1, 17, 33, 16
KINDS = ("strided", "expanded", "offset")
# every registered PE with a learnable bias (Sandwich has none): its per-head parameters as views
BIAS_PES = [n for n in bias_pes() if pe_factory(n)(2, 16).tensors()]


def _inputs(pe_name, B=1):
    """Contiguous values of every argument, batch B (fresh tensors on DEVICE)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def heads(lo, hi):
        return lo + (hi - lo) * torch.rand(HQ, generator=g)

    def positions(*shape):
        return torch.randint(0, 48, shape, generator=g)

    qpos, kpos = positions(B, SQ), positions(B, SK)
    qpos[:, 0], kpos[:, 0] = 40, 10  # what an expanded view broadcasts: not every row blind
    a = {"q": randn(B, HQ, SQ, D), "k": randn(B, HKV, SK, D), "v": randn(B, HKV, SK, D),
         "dout": randn(B, HQ, SQ, D), "slopes": heads(0.05, 0.5), "r1": heads(0.2, 2.0),
         "r2": heads(0.3, 1.5) if pe_name == "kerple_power" else heads(0.05, 1.0),
         "q_positions": qpos, "k_positions": kpos,
         # T5's table (a generator of its own: the values above stay what they were)
         "table": 2.0 * torch.randn(HQ, 32, generator=torch.Generator().manual_seed(1)),
         # FIRE's output layer (its own generator too), per head
         **_fire_out()}
    return {n: t.to(DEVICE) for n, t in a.items()}


def _fire_out():
    f = FIRE.random(HQ, width=8, seed=2)
    return {"w2": f.w2, "b2": f.b2}


def _pe(pe_name, a):
    if pe_name == "rope":
        return RoPE()
    if pe_name == "alibi":
        return ALiBi(a["slopes"])
    if pe_name.startswith("kerple"):
        return KERPLE(pe_name.split("_")[1], a["r1"], a["r2"])
    if pe_name == "t5":
        return T5Bias(a["table"], max_distance=20)
    if pe_name == "sandwich":
        return Sandwich(d_bar=32)
    if pe_name == "fire":  # its first layer fixed, the per-head output layer as given
        f = FIRE.random(HQ, width=8, seed=2)
        return FIRE(f.w1.to(DEVICE), f.b1.to(DEVICE), a["w2"], a["b2"], L=20.0, num_cells=16)
    raise _unknown(pe_name)


def _param_names(pe_name):
    if pe_name.startswith("kerple"):
        return ("r1", "r2")
    if pe_name in ("rope", "alibi", "t5", "sandwich", "fire"):
        return {"rope": (), "alibi": ("slopes",), "t5": ("table",), "sandwich": (),
                "fire": ("b2",)}[pe_name]  # (its per-head vector; w2 is (H, width))
    raise _unknown(pe_name)


def _unknown(pe_name):
    return NotImplementedError(f"test_strided has no spec for PE {pe_name!r}: add its parameters "
                               "to _inputs, _pe and _param_names")


def _junk(t):
    if not t.is_floating_point():
        return 99
    return float("nan") if t.dim() == 4 else 9.0


def make_view(kind, t, dim=0):
    """A view holding t's values (for "expanded": t's first slice along ``dim``, broadcast
    with stride 0) inside a larger buffer of junk:

    strided   4-D: bshd storage, every other row, padded head dim (head dim stays unit-stride,
              so the kernels see the strides: no copy); 1-D / 2-D: every other element, as
              BLOOM's ``alibi[:, 0, 1]``
    expanded  stride 0 along ``dim``; the buffer's next elements along ``dim`` are junk
    offset    contiguous, storage_offset 7 (28 bytes: not 16-byte aligned either)
    """
    junk = _junk(t)
    if kind == "strided":
        if t.dim() == 4:
            b, h, s, d = t.shape
            big = t.new_full((b, 2 * s + 1, h, d + 5), junk)
            view = big[:, 1::2, :, 2:2 + d].transpose(1, 2)
        else:
            view = t.new_full((*t.shape, 2), junk)[..., 0]
        view.copy_(t)
        assert not view.is_contiguous()
    elif kind == "expanded":
        n = t.shape[dim]
        big = torch.cat((t.narrow(dim, 0, 1), torch.full_like(t.narrow(dim, 1, n - 1), junk)), dim)
        view = big.narrow(dim, 0, 1).expand_as(t)
        assert view.stride(dim) == 0
    else:
        flat = torch.cat((t.new_full((7,), junk), t.flatten(), t.new_full((3,), junk)))
        view = flat[7:7 + t.numel()].view(t.shape)
        assert view.is_contiguous() and view.storage_offset() == 7
    return view


def contiguous_copy(t):
    c = t.clone(memory_format=torch.contiguous_format)
    assert c.is_contiguous() and c.storage_offset() == 0
    return c


def run(pe_name, a, positions=()):
    """Forward (out, lse) and the gradients of q, k, v and the PE's tensors (by name), with
    the arguments in ``a`` (``positions``: which position tensors to pass)."""
    targets = {n: a[n] for n in ("q", "k", "v") + _param_names(pe_name)}
    for t in targets.values():
        t.requires_grad_()
    out, lse = posattn.attention(a["q"], a["k"], a["v"], _pe(pe_name, a), causal=True, return_lse=True,
                                 backend="triton", **{n: a[n] for n in positions})
    grads = torch.autograd.grad(out, list(targets.values()), a["dout"])
    return out.detach(), lse.detach(), dict(zip(targets, grads))


def assert_bitwise(got, want):
    (out, lse, grads), (out_c, lse_c, grads_c) = got, want
    assert not out_c.isnan().any() and not lse_c.isnan().any()
    assert torch.equal(out, out_c), "output differs from the contiguous copy's"
    assert torch.equal(lse, lse_c), "LSE differs from the contiguous copy's"
    assert grads.keys() == grads_c.keys()
    for n in grads_c:
        assert not grads_c[n].isnan().any(), n
        assert torch.equal(grads[n], grads_c[n]), f"d{n} differs from the contiguous copy's"


def view_vs_copy(arg, kind, pe_name, dim=0, B=1):
    """``arg`` as a ``kind`` view vs as a contiguous copy of that view: bitwise equal."""
    a = _inputs(pe_name, B)
    view = make_view(kind, a[arg], dim)
    got = run(pe_name, dict(a, **{arg: view}))
    want = run(pe_name, dict(a, **{arg: contiguous_copy(view)}))
    assert_bitwise(got, want)
    return got


# argument -> (PE it runs with, the dim an "expanded" view broadcasts)
QKV_DOUT = {"q": ("rope", 1), "k": ("alibi", 0), "v": ("kerple_log", 2), "dout": ("kerple_power", 2)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", list(QKV_DOUT))
def test_qkv_dout_views(arg, kind):
    """q, k, v (autograd leaves that are views) and the output gradient dout."""
    pe_name, dim = QKV_DOUT[arg]
    view_vs_copy(arg, kind, pe_name, dim, B=2)


# (argument, shape) -> PE; every dtype kind is an integer dtype the API accepts
POSITIONS = {("q_positions", "S"): "rope", ("q_positions", "BS"): "alibi",
             ("k_positions", "S"): "kerple_power", ("k_positions", "BS"): "rope"}
POS_DTYPES = {"S": {"strided": torch.int32, "expanded": torch.int64, "offset": torch.int16},
              "BS": {"strided": torch.uint8, "expanded": torch.int16, "offset": torch.int32}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg,shape", list(POSITIONS), ids=lambda x: str(x))
def test_position_views(arg, shape, kind):
    """Explicit position tensors (S,) and (B, S), of several integer dtypes. An expanded (S,)
    view has stride 0 along the sequence, an expanded (B, S) one along the batch."""
    pe_name = POSITIONS[(arg, shape)]
    a = _inputs(pe_name, B=2)
    if shape == "S":
        a[arg] = a[arg][0]
    a[arg] = a[arg].to(POS_DTYPES[shape][kind])
    view = make_view(kind, a[arg], 0)
    got = run(pe_name, dict(a, **{arg: view}), (arg,))
    want = run(pe_name, dict(a, **{arg: contiguous_copy(view)}), (arg,))
    assert_bitwise(got, want)


# case -> (PE, parameter, KERPLE distance tables forced on)
PARAMS = {"slopes": ("alibi", "slopes", False),
          "r1-log": ("kerple_log", "r1", False), "r2-log": ("kerple_log", "r2", False),
          "r1-power": ("kerple_power", "r1", False), "r2-power": ("kerple_power", "r2", False),
          "r2-log-table": ("kerple_log", "r2", True), "r2-power-table": ("kerple_power", "r2", True)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(PARAMS))
def test_pe_parameter_views(case, kind, monkeypatch):
    """ALiBi slopes and KERPLE r1 / r2 (log and power) as views: the kernels must read head h's
    value, not element h of the storage. "-table": with contiguous positions KERPLE reads
    f(|i - j|) from a per-distance table that launch.bias_table_kernel fills from r2 (forced on
    here for short sequences), forward and backward."""
    pe_name, param, table = PARAMS[case]
    used = force_bias_tables(monkeypatch) if table else []
    _, _, grads = view_vs_copy(param, kind, pe_name)
    assert grads[param].abs().sum() > 0
    if table:
        assert used == [True, True] * 2, used  # forward and backward, view and copy


def _run_backward(pe_name, a, params):
    """out.backward(dout) with fresh q, k, v leaves; returns their .grad and the output."""
    q, k, v = (a[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = posattn.attention(q, k, v, _pe(pe_name, dict(a, **params)), causal=True, backend="triton")
    out.backward(a["dout"])
    return out.detach(), {"q": q.grad, "k": k.grad, "v": v.grad}


@pytest.mark.parametrize("pe_name", BIAS_PES)
def test_strided_leaf_parameter_gets_its_grad(pe_name):
    """A PE parameter that is itself a strided leaf (torch.empty_strided, stride 2; the gaps
    hold junk): its .grad equals the .grad of a contiguous leaf with the same values."""
    a = _inputs(pe_name)
    names = _param_names(pe_name)

    def strided_leaf(t):  # every stride doubled: (2,) for a head vector, (2 T, 2) for a table
        leaf = torch.empty_strided(t.shape, tuple(2 * x for x in t.contiguous().stride()),
                                   device=DEVICE)
        leaf.as_strided((2 * t.numel() - 1,), (1,)).fill_(9.0)
        return leaf.copy_(t).requires_grad_()

    strided = {n: strided_leaf(a[n]) for n in names}
    dense = {n: a[n].clone().requires_grad_() for n in names}
    assert all(t.is_leaf and t.stride()[-1] == 2 for t in strided.values())
    out_s, g_s = _run_backward(pe_name, a, strided)
    out_d, g_d = _run_backward(pe_name, a, dense)
    assert torch.equal(out_s, out_d)
    for n in g_d:
        assert torch.equal(g_s[n], g_d[n]), n
    for n in names:
        assert strided[n].grad is not None and dense[n].grad.abs().sum() > 0
        assert torch.equal(strided[n].grad, dense[n].grad), f"{n}.grad"


@pytest.mark.parametrize("pe_name", BIAS_PES)
def test_view_of_leaf_parameter_grad_reaches_base(pe_name):
    """PE parameters that are views of a leaf that requires grad: ``base[:, 0]`` (ALiBi; the
    column beside it is junk) or ``base[:, 0]`` and ``base[:, 1]`` as KERPLE's r1 and r2 (one
    storage, stride 2, the second at offset 1). base.grad holds the contiguous copies' .grad
    in those columns (0 in the junk column)."""
    a = _inputs(pe_name)
    names = _param_names(pe_name)
    cols = [a[n] for n in names] + [torch.full_like(a[names[0]], 9.0)] * (2 - len(names))
    base = torch.stack(cols, 1).requires_grad_()
    views = {n: base[:, i] for i, n in enumerate(names)}
    dense = {n: a[n].clone().requires_grad_() for n in names}
    out_v, g_v = _run_backward(pe_name, a, views)
    out_d, g_d = _run_backward(pe_name, a, dense)
    assert torch.equal(out_v, out_d)
    for n in g_d:
        assert torch.equal(g_v[n], g_d[n]), n
    want = torch.stack([dense[n].grad for n in names] + [torch.zeros_like(a[names[0]])] * (2 - len(names)), 1)
    assert torch.equal(base.grad, want)


def test_issue_repro_bloom_slopes_view():
    """The issue's reduced repro: BLOOM-like slopes, every other element of a (4, 2) tensor
    whose second column is 9.0. Read as if contiguous, heads 0-3 got the slopes [0.25, 9.0,
    0.0625, 9.0] (output off by ~2.9). Triton must agree with the reference to fp32 rounding,
    output and slope gradient."""
    sl = torch.tensor([[0.25, 9.], [0.0625, 9.], [0.0156, 9.], [0.0039, 9.]], device=DEVICE)[:, 0]
    assert sl.stride() == (2,)
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 4, 17, 16, generator=g).to(DEVICE) for _ in range(4))

    out_t = posattn.attention(q, k, v, ALiBi(sl), causal=True, backend="triton")
    out_r = posattn.attention(q, k, v, ALiBi(sl), causal=True, backend="reference")
    # torch's float32 defaults (rtol 1.3e-6, atol 1e-5): the same math in another order
    # (observed 3.6e-7 at |out| <= 2.9)
    torch.testing.assert_close(out_t, out_r)

    grads = {}
    for backend in ("triton", "reference"):
        base = torch.stack((sl, torch.full_like(sl, 9.0)), 1).requires_grad_()
        out = posattn.attention(q, k, v, ALiBi(base[:, 0]), causal=True, backend=backend)
        out.backward(dout)
        grads[backend] = base.grad
    assert not grads["triton"][:, 1].any()
    # a slope's gradient (here 0.15 ... 27) sums 153 terms dS * |i - j| of either sign, and
    # their fp32 rounding does not cancel: the fp32 reference itself is up to 4.5e-6 off the
    # float64 one, the kernel 8e-6 (observed). rtol 1e-5 / atol 1e-5: 4x-5x that.
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-5, atol=1e-5)

    # and by the suite's rule: error vs the float64 reference <= 2x / 3x the naive fp32 math's
    slopes = torch.tensor([[0.25, 9.], [0.0625, 9.], [0.0156, 9.], [0.0039, 9.]], device=DEVICE,
                          requires_grad=True)[:, 0]
    check(qkv(1, 4, 4, 17, 17, 16, seed=3), plain, ALiBi(slopes), torch.float32, causal=True)
