"""posattn.attention_with_kvcache: attention over a contiguous or paged KV cache, PE at read time.

The fused path (Triton: pages read inside the kernel, key counts on the device) is judged per
sequence by the error rule against the float64 reference of the same sequence gathered into a
dense cache (posattn.reference at the sequence's own positions), with the naive in-dtype math
as the yardstick and tests/test_window_softcap.py's slack. The table covers every registered
PE (plus dynamic NTK), both cache layouts, page sizes below and at the interpreter's key tile,
pages in random order, ragged lengths with 0 and 1 and a sequence ending on a page boundary,
decode (S_new = 1) and chunks, GQA, fp16 / fp32, causal or not, window and softcap.
"""
import pytest
import torch

import posattn
from posattn import reference
from posattn.pe import resolve_pe
from posattn.positions import Positions
from attn_harness import PES, rand
from conftest import DEVICE
from pe_cases import cases as pe_cases
from test_window_softcap import CAP, HEADS, Slack
from attn_harness import assert_rule_with_slack

FP16, FP32 = torch.float16, torch.float32


def _pe(name, H, D):
    return PES[name](H, D) if name in PES else pe_cases("harness")[name].make(H, D)


def _cache(lens, S_new, Hkv, D, dtype, page, seed):
    """(k_cache, v_cache, block_table or None, capacity) holding random keys for ``lens`` tokens
    and room for S_new more; paged caches get their pages in a random order plus spares."""
    B = len(lens)
    need = max(lens) + S_new
    if page:
        per_seq = -(-need // page)
        n_blocks = B * per_seq + 3
        kc = rand(n_blocks, page, Hkv, D, seed=seed).to(DEVICE, dtype)
        vc = rand(n_blocks, page, Hkv, D, seed=seed + 1).to(DEVICE, dtype)
        g = torch.Generator().manual_seed(seed)
        bt = torch.randperm(n_blocks, generator=g)[:B * per_seq].view(B, per_seq).to(DEVICE, torch.int32)
        return kc, vc, bt
    kc = rand(B, need + 5, Hkv, D, seed=seed).to(DEVICE, dtype)
    vc = rand(B, need + 5, Hkv, D, seed=seed + 1).to(DEVICE, dtype)
    return kc, vc, None


def _dense(cache, bt, b, n):
    """Sequence b's first n rows of a cache, (n, H, D)."""
    if bt is None:
        return cache[b, :n]
    page = cache.shape[1]
    pages = bt[b, :(n + page - 1) // page].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:n]


# pe, paged (0 / page size), dtype, heads, causal, window, softcap, lens, S_new
CASES = [
    ("none", 16, FP16, "gqa", True, None, None, [5, 0, 40], 1),
    ("rope", 32, FP32, "mha", True, None, CAP, [31, 1, 9], 1),  # 31 + 1: ends on a page boundary
    ("alibi", 0, FP16, "gqa", False, None, None, [12, 3], 4),
    ("kerple_log", 16, FP32, "gqa", True, (6, 0), None, [0, 17, 33], 3),
    ("kerple_power", 0, FP32, "mha", True, None, None, [20, 7], 1),
    ("t5", 16, FP16, "mha", True, None, CAP, [30, 2, 16], 2),  # 30 + 2: a page boundary
    ("dynamic_ntk", 32, FP16, "gqa", True, None, None, [6, 25], 5),
    ("rope", 0, FP32, "gqa", False, (4, 4), None, [3, 11], 7),
    ("sandwich", 16, FP32, "gqa", False, (5, 2), CAP, [9, 27], 2),
]


def _run(case, seed):
    pe_name, page, dtype, heads, causal, window, cap, lens, S_new = case
    Hq, Hkv = HEADS[heads]
    D = 16
    B = len(lens)
    kc, vc, bt = _cache(lens, S_new, Hkv, D, dtype, page, seed)
    q = rand(B, S_new, Hq, D, seed=seed + 2, scale=3.0 if cap else 1.0).to(DEVICE, dtype)
    k = rand(B, S_new, Hkv, D, seed=seed + 3).to(DEVICE, dtype)
    v = rand(B, S_new, Hkv, D, seed=seed + 4).to(DEVICE, dtype)
    pe = _pe(pe_name, Hq, D)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kw = dict(causal=causal, window=window, softcap=cap)
    before = (kc.clone(), vc.clone())
    out, lse = posattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=bt, pe=pe,
                                              return_lse=True, backend="triton", **kw)
    return dict(q=q, k=k, v=v, kc=kc, vc=vc, bt=bt, before=before, out=out, lse=lse, pe=pe, kw=kw,
                lens=lens, S_new=S_new, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-page{c[1]}-{str(c[2])[6:]}-{c[3]}-"
                                                      f"{'causal' if c[4] else 'full'}-w{c[5]}-cap{c[6]}-new{c[8]}")
def test_kvcache_matches_reference(case):
    r = _run(case, 10 * CASES.index(case))
    pe, dtype, S_new, kw = r["pe"], r["dtype"], r["S_new"], r["kw"]
    spec = resolve_pe(pe)
    if getattr(spec, "needs_cur_len", False):  # the batch's longest sequence (module docstring)
        spec = spec.at_length(max(r["lens"]) + S_new)
    assert r["out"].shape == r["q"].shape[:3] + (r["vc"].shape[-1],) and r["out"].dtype == dtype
    for b, n0 in enumerate(r["lens"]):
        n = n0 + S_new
        qb = r["q"][b].transpose(0, 1)[None]  # (1, Hq, S_new, D)
        kb, vb = (_dense(c, r["bt"], b, n).transpose(0, 1)[None] for c in (r["kc"], r["vc"]))
        qpos, kpos = Positions(S_new, start=n0), Positions(n, start=0)
        D = qb.shape[-1]
        geo = dict(causal=kw["causal"], scale=D ** -0.5, q_pos=qpos, k_pos=kpos, window=kw["window"],
                   softcap=kw["softcap"])
        ref = reference.attention_bhsd(qb.double(), kb.double(), vb.double(),
                                       _spec64(spec), compute_dtype=torch.float64, **geo)
        naive = reference.attention_bhsd(qb, kb, vb, spec, compute_dtype=dtype, **geo)
        slack = Slack(qb.double(), kb.double(), vb.double(), ref[0], ref[1], torch.zeros_like(ref[0]), spec,
                      causal=kw["causal"], scale=D ** -0.5, qpos=qpos, kpos=kpos, window=kw["window"],
                      softcap=kw["softcap"])
        got_out = r["out"][b].transpose(0, 1)[None]
        got_lse = r["lse"][b][None]
        assert_rule_with_slack(f"out[{b}]", got_out, ref[0], naive[0], dtype, slack.out, factor=2)
        assert_rule_with_slack(f"lse[{b}]", got_lse, ref[1], naive[1], dtype, slack.lse, factor=2)


def _spec64(spec):
    from helpers import with_params
    return with_params(spec, lambda t: t.detach().double())


def test_append_writes_only_the_new_slots():
    case = ("alibi", 16, FP16, "gqa", True, None, None, [5, 0, 31], 3)
    r = _run(case, 99)
    kc, vc, bt, (k0, v0) = r["kc"], r["vc"], r["bt"], r["before"]
    page = kc.shape[1]
    written = torch.zeros(kc.shape[:2], dtype=torch.bool, device=kc.device)
    for b, n0 in enumerate(r["lens"]):
        for i in range(r["S_new"]):
            p = n0 + i
            blk, slot = int(bt[b, p // page]), p % page
            written[blk, slot] = True
            assert torch.equal(kc[blk, slot], r["k"][b, i]) and torch.equal(vc[blk, slot], r["v"][b, i])
    assert torch.equal(kc[~written], k0[~written]) and torch.equal(vc[~written], v0[~written])


@pytest.mark.parametrize("paged", [False, True])
def test_dynamic_ntk_cache_read_at_two_lengths(paged):
    """A cache of unrotated keys read under dynamic NTK at a short and a long length (the
    scaling changes between them: original length 8) equals posattn.attention over the whole
    prefix without a cache, both times -- a cache of rotated keys could not."""
    Hq, Hkv, D, N = 4, 2, 16, 40
    pe = posattn.RoPE(scaling=posattn.DynamicNTK(2.0, 8))
    q, k, v = (rand(1, N, h, D, seed=s).to(DEVICE, FP32) for s, h in ((1, Hq), (2, Hkv), (3, Hkv)))
    if paged:
        kc, vc = (torch.zeros(6, 16, Hkv, D, device=DEVICE) for _ in range(2))
        bt = torch.tensor([[4, 1, 5]], dtype=torch.int32, device=DEVICE)
    else:
        kc, vc = (torch.zeros(1, 48, Hkv, D, device=DEVICE) for _ in range(2))
        bt = None
    n = 0
    for step in (5, 1, 30, 1):  # chunked prefill, decode, a long chunk, decode
        sl = slice(n, n + step)
        out = posattn.attention_with_kvcache(q[:, sl], kc, vc, k[:, sl], v[:, sl], block_table=bt,
                                             cache_seqlens=torch.tensor([n], dtype=torch.int32, device=DEVICE),
                                             pe=pe, backend="triton")
        n += step
        full = posattn.attention(q[:, :n], k[:, :n], v[:, :n], pe, causal=True, layout="bshd",
                                 backend="reference")[:, -step:]
        torch.testing.assert_close(out, full, rtol=2e-5, atol=2e-5)


def test_cpu_and_reference_backends_agree_with_triton():
    """The same step again without k / v (already in the cache, which cache_seqlens then
    counts, as flash-attn reads it): the gathering backends, and the Triton path itself."""
    case = ("kerple_log", 16, FP32, "gqa", True, None, None, [7, 0, 20], 2)
    r = _run(case, 3)
    for backend in ("reference", "cpu", "triton"):
        dev = DEVICE if backend == "triton" else "cpu"
        out, lse = posattn.attention_with_kvcache(r["q"].to(dev), r["kc"].to(dev), r["vc"].to(dev),
                                                  cache_seqlens=torch.tensor(r["lens"], dtype=torch.int32,
                                                                             device=dev) + 2,
                                                  block_table=r["bt"].to(dev), pe=r["pe"], return_lse=True,
                                                  backend=backend)
        torch.testing.assert_close(out, r["out"].cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, r["lse"].cpu(), rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
    q = torch.zeros(2, 1, 4, 16)
    kc = torch.zeros(2, 8, 2, 16)
    lens = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_seqlens"):
        posattn.attention_with_kvcache(q, kc, kc, cache_seqlens=[0, 0])
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        posattn.attention_with_kvcache(q, kc, kc, cache_seqlens=lens[:1])
    with pytest.raises(ValueError, match="block size"):
        posattn.attention_with_kvcache(q, torch.zeros(4, 12, 2, 16), torch.zeros(4, 12, 2, 16), cache_seqlens=lens,
                                       block_table=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="both or neither"):
        posattn.attention_with_kvcache(q, kc, kc, torch.zeros(2, 1, 2, 16), cache_seqlens=lens)
    with pytest.raises(ValueError, match="k must have shape"):
        posattn.attention_with_kvcache(q, kc, kc, torch.zeros(2, 2, 2, 16), torch.zeros(2, 2, 2, 16),
                                       cache_seqlens=lens)
    with pytest.raises(ValueError, match="one row per sequence"):
        posattn.attention_with_kvcache(q, kc[:1], kc[:1], cache_seqlens=lens)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        posattn.attention_with_kvcache(torch.zeros(2, 1, 3, 16), kc, kc, cache_seqlens=lens)


@pytest.mark.parametrize("page", [0, 16])
def test_split_k_decode(monkeypatch, page):
    """A decode step split over the cache (flash-decoding; forced here, the GPU decides by its
    SM count): the per-sequence key counts bound every run, runs past a short sequence's keys
    are empty, and the merge gives the unsplit result."""
    from helpers import force_splits

    case = ("alibi", page, FP32, "gqa", True, None, None, [70, 0, 3, 100], 1)
    plain = _run(case, 5)
    merges = force_splits(monkeypatch, 3)
    split = _run(case, 5)
    assert merges, "the split path did not run"
    torch.testing.assert_close(split["out"], plain["out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split["lse"], plain["lse"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("S_new,cap,packed", [(1, None, True), (3, None, True), (1, CAP, False),
                                              (17, None, False)])
def test_decode_packs_the_gqa_group(S_new, cap, packed):
    """A decode step (S_new <= 16, no soft cap) runs one program per (sequence, KV head) with the
    group's query heads x tokens in its rows; a prefill chunk or a soft cap does not pack."""
    from posattn.kernels import launch

    B, Hq, Hkv, D = 2, 8, 2, 16
    kc, vc = (torch.zeros(B, 40, Hkv, D, device=DEVICE) for _ in range(2))
    q = torch.zeros(B, S_new, Hq, D, device=DEVICE)
    with launch.capture(None) as launches:
        posattn.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([3, 9], dtype=torch.int32,
                                                                             device=DEVICE),
                                       pe="alibi", softcap=cap, backend="triton")
    (fwd,) = [ln for ln in launches if ln.fn is launch.attn_fwd_kernel]
    assert fwd.kwargs["PACK_GQA"] == packed
    if packed:
        assert fwd.grid[1] == B * Hkv and fwd.kwargs["BLOCK_M"] == max(16, 4 * S_new)
    else:
        assert fwd.grid[1] == B * Hq
