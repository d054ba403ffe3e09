"""The fused kernels as torch custom ops, for code that runs under ``torch.compile``.

Dynamo cannot trace a Triton launch that builds TMA descriptors, tables and tile configs in
Python (and in the interpreter it tries to trace the interpreter itself and fails). As
custom ops (``torch.library.custom_op``) the forward and the backward are opaque nodes of
the graph: Dynamo traces ``posattn.attention`` up to them, the fake implementations give the
output shapes and strides, and the registered autograd formula puts the backward op in the
backward graph. ``fullgraph=True`` works; no graph break, no recompiles per call.

Eager calls do not come through here: ``_triton.attention_bhsd`` uses its own
autograd.Function, which costs ~15 us less per call than custom-op dispatch with autograd.
Both call the same launchers, so the two paths compute the same bits (tests/test_compile.py).

The ops take the kernel records (launch.KernelPE / KernelPositions) flattened into tensors
and scalars, the only argument types a custom op accepts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels import launch
from .kernels.launch import KernelPE, KernelPositions


def _records(theta, params, buckets, qpos, kpos, rot, bias, family, factor, rot_dim,
             interleaved, q_start, k_start, causal, left, right, softcap):
    pe = KernelPE(rot=rot, theta=theta, factor=factor, rot_dim=rot_dim, interleaved=interleaved,
                  bias=bias, params=params, family=family, buckets=buckets)
    return (pe, KernelPositions(q_start=q_start, k_start=k_start, qpos=qpos, kpos=kpos),
            launch.Mask(causal=causal, left=left, right=right, softcap=softcap))


def flat_args(pe: KernelPE, pos: KernelPositions, mask: launch.Mask) -> tuple:
    """The records as the ops' arguments after (q, k, v): theta, params, buckets, qpos, kpos,
    rot, bias, family, factor, rot_dim, interleaved, q_start, k_start, causal, left, right,
    softcap. (Dense batches only: packed sequences run eagerly.)"""
    return (pe.theta, pe.params, pe.buckets, pos.qpos, pos.kpos, pe.rot, pe.bias, pe.family,
            float(pe.factor), int(pe.rot_dim), bool(pe.interleaved), int(pos.q_start),
            int(pos.k_start), bool(mask.causal), mask.left, mask.right, float(mask.softcap))


@torch.library.custom_op("posattn::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, theta: Optional[Tensor], params: Optional[Tensor],
        buckets: Optional[Tensor], qpos: Optional[Tensor], kpos: Optional[Tensor], rot: str, bias: str, family: str,
        factor: float, rot_dim: int, interleaved: bool, q_start: int, k_start: int,
        causal: bool, left: Optional[int], right: Optional[int], softcap: float,
        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """launch.attn_fwd: out (B, Hq, Sq, DV) in q's dtype, lse and row_lse (B, Hq, Sq) float32
    (the caller's LSE, and the one the backward takes; a copy when they are the same tensor:
    an op's outputs may not alias)."""
    pe, pos, mask = _records(theta, params, buckets, qpos, kpos, rot, bias, family, factor,
                             rot_dim, interleaved, q_start, k_start, causal, left, right, softcap)
    out, lse, row_lse = launch.attn_fwd(q, k, v, pe, pos, mask, scale)
    return out, lse, (row_lse.clone() if row_lse is lse else row_lse)


@fwd.register_fake
def _fwd_fake(q, k, v, *args):
    B, Hq, Sq, _ = q.shape
    out = launch.new_output(q, v.shape[3])
    return (out, q.new_empty((B, Hq, Sq), dtype=torch.float32),
            q.new_empty((B, Hq, Sq), dtype=torch.float32))


@torch.library.custom_op("posattn::bwd", mutates_args=())
def bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        theta: Optional[Tensor], params: Optional[Tensor], buckets: Optional[Tensor],
        qpos: Optional[Tensor], kpos: Optional[Tensor], rot: str, bias: str, family: str, factor: float, rot_dim: int,
        interleaved: bool, q_start: int, k_start: int, causal: bool, left: Optional[int],
        right: Optional[int], softcap: float, scale: float,
        need_pe_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """launch.attn_bwd: dq, dk, dv like q, k, v; the gradient of params, (Hq, P) float32,
    when need_pe_grad, else an empty tensor (an op cannot return None)."""
    pe, pos, mask = _records(theta, params, buckets, qpos, kpos, rot, bias, family, factor,
                             rot_dim, interleaved, q_start, k_start, causal, left, right, softcap)
    dq, dk, dv, g = launch.attn_bwd(do, q, k, v, out, lse, pe, pos, mask, scale, need_pe_grad)
    if g is None:
        g = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, g


@bwd.register_fake
def _bwd_fake(do, q, k, v, out, lse, theta, params, *args):
    need_pe_grad = args[-1]
    shape = tuple(params.shape) if need_pe_grad and params is not None else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(shape, dtype=torch.float32))


_N_TENSORS = 8  # q, k, v, theta, params, buckets, qpos, kpos


def _setup_context(ctx, inputs, output):
    q, k, v, theta, params, buckets, qpos, kpos = inputs[:_N_TENSORS]
    out, lse, row_lse = output
    ctx.save_for_backward(q, k, v, out, row_lse, theta, params, buckets, qpos, kpos)
    ctx.scalars = inputs[_N_TENSORS:]  # rot ... softcap, scale
    ctx.mark_non_differentiable(lse, row_lse)  # as in eager (_triton._FusedAttention)


def _backward(ctx, dout, _dlse, _drow_lse):
    q, k, v, out, lse, theta, params, buckets, qpos, kpos = ctx.saved_tensors
    need = ctx.needs_input_grad[4]
    if dout.stride(-1) != 1 and dout.shape[-1] != 1:  # the kernels want a unit last stride
        dout = dout.contiguous()
    dq, dk, dv, g = bwd(dout, q, k, v, out, lse, theta, params, buckets, qpos, kpos,
                        *ctx.scalars, need)
    n_rest = len(ctx.scalars)
    return ((dq, dk, dv, None, g.to(params.dtype) if need else None, None, None, None)
            + (None,) * n_rest)


fwd.register_autograd(_backward, setup_context=_setup_context)
