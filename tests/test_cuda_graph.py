"""posattn.attention inside a captured CUDA graph (what serving stacks do for decode steps and
training loops with static shapes): the launches are capturable (no host sync, no allocation
outside the graph's pool) and a replay on new input values equals an eager call.

The capture itself needs CUDA (there is none in the interpreter); what makes it possible --
RoPE's inv_freq and the default ALiBi slopes are copied to the device once, not per call
(a pageable host-to-device copy is illegal while capturing) -- is tested everywhere.
"""
import pytest
import torch

import posattn
from posattn import _triton

from conftest import DEVICE, HAS_CUDA


def test_device_constants_are_made_once():
    """Equal specs share one device tensor; any difference in what a spec holds (base,
    scaling, LongRoPE factor lists, a mutated attribute, the current length of a
    length-dependent scaling, the head count) gets its own, with the values of a fresh
    computation."""
    def theta(spec, cur_len=None, head_dim=64):
        return _triton.kernel_pe(spec, head_dim, 4, DEVICE, cur_len)

    yarn = lambda base=10000.0: posattn.RoPE(base, scaling=posattn.YaRN(4.0, 64))  # noqa: E731
    a = theta(yarn())
    assert theta(yarn()).theta is a.theta  # a new spec object per call, as pe="rope" makes
    assert theta(posattn.RoPE()).theta is theta(posattn.RoPE()).theta
    inv, factor = yarn().frequencies(64)
    assert torch.equal(a.theta.cpu(), inv) and a.factor == factor
    assert not torch.equal(theta(yarn(20000.0)).theta.cpu(), a.theta.cpu())
    spec = yarn()
    spec.base = 20000.0  # mutated after the first call: its new state is looked up
    assert theta(spec).theta is theta(yarn(20000.0)).theta

    def longrope(short):
        return posattn.RoPE(scaling=posattn.LongRoPE(short, [2.0] * 32, 64))
    assert theta(longrope([1.0] * 32), 32).theta is theta(longrope([1.0] * 32), 32).theta
    assert not torch.equal(theta(longrope([1.0] * 32), 32).theta.cpu(),
                           theta(longrope([1.5] * 32), 32).theta.cpu())
    ntk = posattn.RoPE(scaling=posattn.DynamicNTK(2.0, 64))
    assert not torch.equal(theta(ntk, 100).theta.cpu(), theta(ntk, 200).theta.cpu())
    assert torch.equal(theta(ntk, 200).theta.cpu(), ntk.frequencies(64, 200)[0])

    def slopes(H):
        return _triton.kernel_pe(posattn.ALiBi(), 64, H, DEVICE, None).params
    assert slopes(8) is slopes(8) and slopes(8).shape == (8, 1) and slopes(6).shape == (6, 1)
    assert torch.equal(slopes(6).cpu()[:, 0], posattn.alibi_slopes(6).float())


def _specs(H):
    return {
        "rope": posattn.RoPE(scaling=posattn.YaRN(4.0, 64)),
        "alibi": "alibi",  # the paper's slopes, made by posattn
        "alibi_trainable": posattn.ALiBi(posattn.alibi_slopes(H).cuda().requires_grad_()),
        "kerple": posattn.KERPLE("log", torch.full((H,), 0.8, device="cuda").requires_grad_(),
                                 torch.full((H,), 0.4, device="cuda").requires_grad_()),
        # FIRE: its table is rebuilt by torch on every call, on the device (no host copy)
        "fire": posattn.nn.FIREBias(H, init_L=64.0).cuda().spec(),
    }


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("name", ["rope", "alibi", "alibi_trainable", "kerple", "fire"])
def test_graph_replay_equals_eager(name):
    B, H, Hkv, S, D = 2, 4, 2, 300, 64
    pe = _specs(H)[name]
    params = [t for t in (getattr(pe, "slopes", None), getattr(pe, "r1", None),
                          getattr(pe, "r2", None)) if isinstance(t, torch.Tensor)]
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    leaves = [q, k, v] + params

    def step():
        out = posattn.attention(q, k, v, pe, causal=True, backend="triton")
        return (out,) + torch.autograd.grad(out, leaves, dout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: Triton compiles outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()

    with torch.no_grad():  # new values in the captured input buffers
        for t in (q, k, v, dout):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    for i, (a, b) in enumerate(zip(static, want)):
        assert torch.equal(a, b), f"{name}: replayed result {i} differs from eager"
