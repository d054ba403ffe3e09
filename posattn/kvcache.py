"""Serving: attention over a (paged) KV cache, the PE applied at read time.

The cache holds **unrotated** keys (and no bias): the positional encoding is computed inside
the attention tile from positions, as everywhere in posattn. So a length-dependent RoPE
scaling (dynamic NTK, LongRoPE's short/long switch) is exact for every cached key at every
step, and a cache can be read under another RoPE than the one it was filled with.

Layouts (flash-attn's ``flash_attn_with_kvcache``):

* contiguous cache: k_cache (B, S_max, Hkv, D), v_cache (B, S_max, Hkv, Dv);
* paged cache: k_cache (num_blocks, block_size, Hkv, D), v_cache likewise, with block_table
  (B, max_blocks) int32: token n of sequence b lives in page block_table[b, n // block_size],
  slot n % block_size. block_size any power of two >= 16 (rows of a key tile may come from
  several pages: the kernel maps each row).

A call appends the new keys / values k, v (B, S_new, Hkv, D) in place at cache_seqlens
(their slots only; nothing else in the cache is written), then attends q (B, S_new, Hq, D),
whose token i of sequence b is at position cache_seqlens[b] + i, to the cache's first
cache_seqlens[b] + S_new keys (causal by default: each new token sees the cache and the new
tokens up to itself). Without k / v (a caller that wrote the cache itself) cache_seqlens
already counts the new tokens: the first cache_seqlens[b] keys are read and the queries are
its last S_new positions, as in flash-attn. Forward only, as in flash-attn's kvcache path:
serving has no backward.

The Triton path is the dense forward with each sequence's key count read on the device
(kernels/attn_fwd.py, ``KV_LENS``) and, for a paged cache, each key row read through the block
table (``PAGE``); split-K applies as to any decode step. No host synchronisation per step, except
for a length-dependent RoPE scaling (its frequencies follow the batch's longest sequence, as
transformers and attention_varlen take them: one read of cache_seqlens). The cpu / reference backends gather each sequence's keys and call
``posattn.attention``: the definition the fused path is tested against.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import api
from .pe import PE, resolve_pe


def _check_int_tensor(name, t, shape_desc, device):
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 (or int64) tensor {shape_desc}, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _slots(cache_seqlens: torch.Tensor, S_new: int, block_table, block_size: int, S_max: int):
    """Flat cache rows (B, S_new) int64 of the new tokens: b * S_max + pos (contiguous) or
    block_table[b, pos // block_size] * block_size + pos % block_size (paged)."""
    B = cache_seqlens.shape[0]
    pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(S_new, device=cache_seqlens.device)
    if block_table is None:
        return torch.arange(B, device=pos.device)[:, None] * S_max + pos
    page = block_table.to(torch.int64).gather(1, pos // block_size)
    return page * block_size + pos % block_size


def _append(cache: torch.Tensor, new: torch.Tensor, rows: torch.Tensor) -> None:
    """cache viewed as (rows, H, D) <- new (B, S_new, H, D) at ``rows`` (B, S_new), in place."""
    flat = cache.view(-1, *cache.shape[2:])
    flat.index_copy_(0, rows.reshape(-1), new.reshape(-1, *new.shape[2:]).to(cache.dtype))


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    *,
    cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor] = None,
    pe: Union[str, PE, None] = "none",
    causal: bool = True,
    scale: Optional[float] = None,
    window=None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of new tokens over a KV cache (see the module docstring).

    Args:
        q: (B, S_new, Hq, D) -- the new tokens' queries (flash-attn's layout).
        k_cache, v_cache: (B, S_max, Hkv, D | Dv) contiguous caches, or (num_blocks,
            block_size, Hkv, D | Dv) paged ones (with ``block_table``). Written in place
            when k / v are given.
        k, v: None, or (B, S_new, Hkv, D | Dv): appended at cache_seqlens before attending.
        cache_seqlens: (B,) int32, each sequence's tokens already in the cache (without k /
            v: including the S_new new ones, which the caller wrote). The caller
            guarantees room for S_new more (cache_seqlens[b] + S_new <= S_max, or within the
            sequence's block-table row): checking it would read the lengths on the host every
            step (flash-attn does not check either).
        block_table: None (contiguous) or (B, max_blocks) int32 page indices.
        pe, scale, window, softcap, backend: as :func:`posattn.attention`; positions are
            the sequence's (the cache's keys at 0..n-1, the new tokens after them).
        causal: default True (a new token sees the cache and the new tokens up to itself).
        return_lse: also return the LSE (B, Hq, S_new) float32.

    Returns:
        out (B, S_new, Hq, Dv) in q's dtype, or ``(out, lse)``. No autograd graph.
    """
    if backend not in api._BACKENDS:
        raise ValueError(f"backend must be one of {api._BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    api._check_tensors(q, k_cache, v_cache, "bshd")
    B, S_new, Hq, D = q.shape
    paged = block_table is not None
    if k_cache.shape[3] != D:
        raise ValueError(f"head dim of k_cache ({k_cache.shape[3]}) differs from q's ({D})")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"v_cache {tuple(v_cache.shape)} and k_cache {tuple(k_cache.shape)} must "
                         f"agree in all but the last dim")
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    scale = api._check_heads_causal_scale(Hq, Hkv, D, Dv, causal, scale)
    window = api._check_window(window)
    softcap = api._check_softcap(softcap)
    _check_int_tensor("cache_seqlens", cache_seqlens, f"({B},)", q.device)
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    if paged:
        _check_int_tensor("block_table", block_table, f"({B}, max_blocks)", q.device)
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must be ({B}, max_blocks), got {tuple(block_table.shape)}")
        block_size = k_cache.shape[1]
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"a paged cache's block size (k_cache.shape[1]) must be a power of two "
                             f">= 16, got {block_size}")
        capacity = block_table.shape[1] * block_size
    else:
        block_size = 0
        if k_cache.shape[0] != B:
            raise ValueError(f"a contiguous cache holds one row per sequence: k_cache.shape[0] = "
                             f"{k_cache.shape[0]}, but q has B = {B} (pass block_table for a paged one)")
        capacity = k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError("k and v are appended together: pass both or neither")
    if k is not None:
        for name, t, last in (("k", k, D), ("v", v, Dv)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, S_new, Hkv, last):
                raise ValueError(f"{name} must have shape {(B, S_new, Hkv, last)}, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        with torch.no_grad():
            rows = _slots(cache_seqlens, S_new, block_table, block_size, capacity)
            _append(k_cache, k, rows)
            _append(v_cache, v, rows)
    spec = resolve_pe(pe)
    spec.check(Hq, D, q.device)
    spec.check_mask(causal, window)
    backend = api._pick_backend(backend, q)
    # keys per sequence: after the append; without k / v (the caller wrote them) the cache
    # already counts the new tokens, as flash_attn_with_kvcache reads it
    total = cache_seqlens.to(torch.int32) + (S_new if k is not None else 0)
    with torch.no_grad():
        if backend == "triton":
            out, lse = _triton_kvcache(q, k_cache, v_cache, total, block_table, block_size, capacity,
                                       spec, causal, scale, window, softcap)
        else:
            out, lse = _gathered(q, k_cache, v_cache, total, block_table, block_size, spec, causal,
                                 scale, window, softcap, backend)
    return (out, lse) if return_lse else out


def _triton_kvcache(q, k_cache, v_cache, total, block_table, block_size, capacity, spec, causal,
                    scale, window, softcap):
    from . import _triton
    from .kernels import launch

    _triton._check_runnable(q)
    B, S_new, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    cur_len = None
    if getattr(spec, "needs_cur_len", False):  # the longest sequence: one host read
        cur_len = int(total.max().item()) if B else 1
    pe = _triton.kernel_pe(spec, D, Hq, q.device, cur_len)
    qv = _triton._stride1(q).transpose(1, 2)  # (B, Hq, S_new, D) views: dense queries
    if block_table is None:
        kv, vv = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (B, Hkv, S_max, D)
    else:  # the flat pages, every sequence's "batch row" the same (stride 0)
        rows = k_cache.shape[0] * k_cache.shape[1]
        kv = k_cache.view(1, rows, Hkv, D).transpose(1, 2).expand(B, Hkv, rows, D)
        vv = v_cache.view(1, rows, Hkv, Dv).transpose(1, 2).expand(B, Hkv, rows, Dv)
    if B * S_new == 0:
        return q.new_zeros((B, S_new, Hq, Dv)), torch.full((B, Hq, S_new), float("-inf"), device=q.device)
    # (the host-side key length sizes the RoPE and KERPLE tables: what a block-table row
    # can address, if that is more than the pool holds)
    Sk = max(kv.shape[2], capacity)
    pos = launch.KernelPositions(q_start=Sk - S_new, k_start=0, k_lens=total,
                                 block_table=block_table, page=block_size, k_bound=Sk)
    mask = _triton.kernel_mask(causal, window, softcap)
    o, _, row_lse = launch.attn_fwd(_triton._stride1(qv), _triton._stride1(kv), _triton._stride1(vv),
                                    _triton._detached(pe, pe.params), pos, mask, scale)
    return o.transpose(1, 2), launch.caller_lse(row_lse, pe, None)


def _gathered(q, k_cache, v_cache, total, block_table, block_size, spec, causal, scale, window, softcap,
              backend):
    """Each sequence's keys gathered from the cache, then posattn.attention (the definition)."""
    from . import attention

    B, S_new, Hq, _ = q.shape
    lens = total.tolist()
    if getattr(spec, "needs_cur_len", False) and lens:  # the batch's longest, as the kernel path
        spec = spec.at_length(max(lens))
    outs, lses = [], []
    for b in range(B):
        n = lens[b]
        if block_table is None:
            kb, vb = k_cache[b, :n], v_cache[b, :n]
        else:
            pages = block_table[b, :(n + block_size - 1) // block_size].to(torch.int64)
            kb = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n]
            vb = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n]
        o, l = attention(q[b:b + 1], kb[None], vb[None], spec, causal=causal, scale=scale,
                         q_positions=n - S_new, k_positions=0, layout="bshd", return_lse=True,
                         backend=backend, window=window, softcap=softcap)
        outs.append(o)
        lses.append(l.float())
    return torch.cat(outs), torch.cat(lses)
