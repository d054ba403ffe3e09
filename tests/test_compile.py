"""posattn.attention under torch.compile: the fused kernels as custom ops (posattn/_ops.py).

fullgraph=True proves Dynamo traces the call without a graph break; the compiled results must
equal the eager ones bit for bit (the same launchers run), gradients of PE parameters included.
On CPU the graphs run with backend="aot_eager" (forward and backward graphs, no Inductor
codegen: no C++ compiler needed); with CUDA, one case also goes through Inductor.
"""
import pytest
import torch

import posattn
from posattn.kernels import launch
from posattn import _ops

from conftest import DEVICE, HAS_CUDA
from helpers import pe_leaves


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


def _param(values):
    return torch.tensor(values, device=DEVICE).requires_grad_()


CASES = {
    "none": dict(pe="none", causal=True),
    "rope_yarn": dict(pe=posattn.RoPE(scaling=posattn.YaRN(4.0, 8)), causal=False),
    "rope_dynamic_ntk": dict(pe=posattn.RoPE(scaling=posattn.DynamicNTK(2.0, 8), interleaved=True),
                             causal=True),
    "alibi_trainable": dict(pe=lambda: posattn.ALiBi(_param([0.5, 0.25])), causal=True),
    "kerple_log": dict(pe=lambda: posattn.KERPLE("log", _param([1.0, 0.7]), _param([0.3, 2.0])),
                       causal=False),
    "kerple_power_explicit": dict(
        pe=lambda: posattn.KERPLE("power", _param([0.9, 1.1]), _param([0.5, 1.2])), causal=True,
        q_positions=torch.tensor([3, 9, 4, 20, 7], device=DEVICE),
        k_positions=torch.arange(13, device=DEVICE) * 2),
    # FIRE: its table is the parameter channel, so the ops carry it like any params
    "fire": dict(pe=lambda: _fire(), causal=True),
}


def _fire():
    f = posattn.FIRE.random(2, width=8, seed=3, L=8.0, num_cells=16)
    return posattn.FIRE(*(t.to(DEVICE).requires_grad_() for t in (f.w1, f.b1, f.w2, f.b2)),
                        c=torch.tensor(0.3, device=DEVICE, requires_grad=True), L=8.0,
                        num_cells=16)


def _inputs(case, dtype, layout="bhsd"):
    Sq = 5 if "explicit" in case else 17
    Sk = 13 if "explicit" in case else 11
    q, k, v = _rand(1, 2, Sq, 16, seed=1), _rand(1, 1, Sk, 16, seed=2), _rand(1, 1, Sk, 16, seed=3)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _run(fn, q, k, v, pe, kw):
    out, lse = fn(q, k, v, pe, kw)
    leaves = [q, k, v] + list(pe_leaves(pe).values())
    dout = _rand(*out.shape, seed=4).to(out.dtype)
    return (out, lse) + torch.autograd.grad(out, leaves, dout)


def _attn(q, k, v, pe, kw):
    return posattn.attention(q, k, v, pe, return_lse=True, backend="triton", **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_eager(name):
    spec = dict(CASES[name])
    make_pe = spec.pop("pe")
    pe = make_pe() if callable(make_pe) else make_pe
    layout = "bshd" if name == "rope_yarn" else "bhsd"  # GQA (2 query heads, 1 kv head) in both
    kw = dict(spec, layout=layout)
    dtype = torch.float16
    q, k, v = _inputs(name, dtype, layout)
    torch._dynamo.reset()
    compiled = torch.compile(_attn, backend="aot_eager", fullgraph=True)
    got = _run(compiled, q, k, v, pe, kw)
    want = _run(_attn, q, k, v, pe, kw)
    assert len(got) == len(want) == 2 + 3 + len(pe_leaves(pe))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert [st for st, n in zip(a.stride(), a.shape) if n > 1] == \
            [st for st, n in zip(b.stride(), b.shape) if n > 1], i  # same storage order
        assert torch.equal(a, b), f"{name}: compiled result {i} differs from eager"
    assert not got[1].requires_grad  # LSE is an output, not differentiable, as in eager


def test_compiled_graph_holds_the_ops():
    """Dynamo's graph calls posattn::fwd once, and a second call with the same shapes reuses
    it (no recompile)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(_attn, backend=backend, fullgraph=True)
    q, k, v = _inputs("none", torch.float16)
    for _ in range(2):
        compiled(q.detach(), k.detach(), v.detach(), "alibi", {"causal": True})
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.posattn.fwd.default) == 1, targets


def test_compiled_dynamic_lengths():
    """dynamic=True: one graph for several sequence lengths, each equal to eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_attn, backend="aot_eager", fullgraph=True, dynamic=True)
    for S in (9, 21):
        q, k, v = (_rand(1, 2, S, 16, seed=s).half() for s in (5, 6, 7))
        got = compiled(q, k, v, "rope", {"causal": True})
        want = _attn(q, k, v, "rope", {"causal": True})
        for a, b in zip(got, want):
            assert torch.equal(a, b), S


def _op_args(layout, need_pe_grad):
    q, k, v = (t.detach() for t in _inputs("kerple_log", torch.float16, layout))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    r1 = torch.tensor([1.0, 0.7], device=DEVICE)
    r2 = torch.tensor([0.3, 2.0], device=DEVICE)
    pe = posattn._triton.kernel_pe(posattn.KERPLE("log", r1, r2), 16, 2, DEVICE, None)
    pos = posattn._triton.KernelPositions(q_start=6, k_start=0)
    flat = _ops.flat_args(pe, pos, launch.Mask(causal=True))
    out, _, row_lse = _ops.fwd(q, k, v, *flat, 0.25)  # the backward takes row_lse
    do = _rand(*out.shape, seed=8).half()
    return (q, k, v, *flat, 0.25), (do, q, k, v, out, row_lse, *flat, 0.25, need_pe_grad)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_opcheck(layout):
    """torch.library.opcheck: schema, fake tensors (shapes and strides of the real outputs,
    bshd storage included), the autograd registration and AOT dispatch, for both ops."""
    fwd_args, bwd_args = _op_args(layout, need_pe_grad=True)
    fwd_args = tuple(a.detach().requires_grad_() if i < 3 else a for i, a in enumerate(fwd_args))
    torch.library.opcheck(torch.ops.posattn.fwd.default, fwd_args)
    torch.library.opcheck(torch.ops.posattn.bwd.default, bwd_args)
    torch.library.opcheck(torch.ops.posattn.bwd.default, bwd_args[:-1] + (False,))


@pytest.mark.skipif(not HAS_CUDA, reason="Inductor's GPU codegen needs CUDA")
def test_inductor_cuda():
    """The default backend (Inductor) around the ops, forward and backward, on the GPU."""
    pe = posattn.ALiBi(_param([0.5, 0.25]))
    q, k, v = _inputs("none", torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(_attn, fullgraph=True)
    got = _run(compiled, q, k, v, pe, {"causal": True})
    want = _run(_attn, q, k, v, pe, {"causal": True})
    for a, b in zip(got, want):
        assert torch.equal(a, b)
