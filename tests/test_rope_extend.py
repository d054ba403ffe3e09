"""RoPE extended by remapped positions (posattn.ReRoPE, LeakyReRoPE, SelfExtend, DualChunk).

1. The reference (posattn.reference: the methods' passes, materialised and selected per
   (query, key)) against a third formulation written here from the methods' relative
   positions -- ReRoPE min(q - k, w); leaky w + (q - k - w) / k beyond w; Self-Extend
   q // G - k // G + W - W // G beyond W; DCA by chunk -- as complex rotations of q . k per
   frequency; and DCA against its authors' loop over chunks (three attention calls per
   chunk merged by their LSEs), prefill and decode.
2. The Triton forward (one pass: a tile computes the near product, the far one, or both only
   where it straddles the window's edge) against the float64 reference by the error rule,
   over positions, dtypes, heads, windows, soft caps, packed sequences and a paged KV cache.
3. What a user can get wrong, by name.
"""
import pytest
import torch

import posattn
from posattn import DualChunk, LeakyReRoPE, ReRoPE, RoPE, SelfExtend
from conftest import DEVICE
from helpers import (assert_rule, check_fwd_bwd, check_paged_decode, check_varlen_causal,
                     force_splits)

FP16, FP32 = torch.float16, torch.float32
METHODS = {"rerope": ReRoPE(7), "leaky": LeakyReRoPE(6, 4), "selfextend": SelfExtend(3, 8),
           "dca": DualChunk(12, 3)}  # DCA: chunks of 9 positions


def _relative(name, ext, d):
    """The method's relative position of q - k = d (int64 tensors of q, k positions: d = q - k
    is not enough for Self-Extend, whose groups depend on the positions themselves)."""
    qp, kp = d
    delta = qp - kp
    if name == "dca":  # by chunk: own chunk q - k; previous min(q % L + L, C) - k % L; older
        L, C = ext.chunk_size - ext.local_window, ext.chunk_size  # min(2L - 1, C) - k % L
        gap = torch.div(qp, L, rounding_mode="floor") - torch.div(kp, L, rounding_mode="floor")
        succ = torch.clamp(qp % L + L, max=C) - kp % L
        inter = min(2 * L - 1, C) - kp % L
        return torch.where(gap == 0, delta, torch.where(gap == 1, succ, inter)).double()
    if name == "rerope":
        far = torch.full_like(delta, ext.window).double()
    elif name == "leaky":
        far = ext.window + (delta - ext.window).double() / ext.factor
    else:
        G, W = ext.group, ext.window
        far = (torch.div(qp, G, rounding_mode="floor") - torch.div(kp, G, rounding_mode="floor")
               + W - W // G).double()
    return torch.where(delta < ext.window, delta.double(), far)


def _by_relative_angles(name, ext, q, k, v, qpos, kpos, scale):
    """Causal attention whose logits are sum_j Re(zq_j conj(zk_j) e^{i rel theta_j}) (half-split
    pairs: z = x_j + i x_{j + D/2}), rel the method's relative position. float64, (H, Sq, Dv)."""
    D = q.shape[-1]
    theta = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    zq = torch.complex(q[..., : D // 2], q[..., D // 2:])  # (H, Sq, D/2)
    zk = torch.complex(k[..., : D // 2], k[..., D // 2:])
    rel = _relative(name, ext, (qpos[:, None], kpos[None, :]))  # (Sq, Sk)
    phase = torch.exp(1j * rel[..., None] * theta)  # (Sq, Sk, D/2)
    s = torch.einsum("hqj,hkj,qkj->hqk", zq, zk.conj(), phase).real * scale
    s = s.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("name", list(METHODS))
def test_reference_is_the_methods_relative_positions(name):
    ext = METHODS[name]
    g = torch.Generator().manual_seed(3)
    H, Sq, Sk, D = 2, 23, 31, 8
    q, k, v = (torch.randn(1, H, s, D, generator=g, dtype=torch.float64) for s in (Sq, Sk, Sk))
    qpos = torch.arange(Sq) + 40  # an offset: the groups do not start at 0
    kpos = torch.arange(Sk) + (40 + Sq - Sk)
    got = posattn.attention(q, k, v, pe=RoPE(extend=ext), causal=True, backend="reference",
                            q_positions=qpos, k_positions=kpos)
    want = _by_relative_angles(name, ext, q[0], k[0], v[0], qpos, kpos, D ** -0.5)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-12)


def _chunk_loop(q, k, v, ext, scale):
    """DCA as its authors run it (HKUNLP/ChunkLlama, prefill from position 0): keys rotated at
    k mod L; per chunk of L queries, one causal call on its own chunk (queries at q mod L),
    one on the previous chunk (queries at min(q mod L + L, C)), one on every older key
    (queries at the previous-chunk table's last entry, min(2L - 1, C)), merged by their LSEs.
    float64 (H, S, D) -> (H, S, Dv)."""
    L, C = ext.chunk_size - ext.local_window, ext.chunk_size
    D, S = q.shape[-1], q.shape[1]
    theta = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))

    def rot(x, p):  # half-split pairs at positions p (n,)
        ang = p.double()[:, None] * theta
        c, s_ = torch.cos(ang), torch.sin(ang)
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), -1)

    def call(qs, ks, vs, causal):  # softmax attention and its LSE
        s = qs @ ks.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ vs, torch.logsumexp(s, -1)

    kr = rot(k, torch.arange(S) % L)
    outs = []
    for c0 in range(0, S, L):
        c1 = min(c0 + L, S)
        idx = torch.arange(c0, c1) % L
        parts = [call(rot(q[:, c0:c1], idx), kr[:, c0:c1], v[:, c0:c1], True)]
        if c0 >= L:
            parts.append(call(rot(q[:, c0:c1], torch.clamp(idx + L, max=C)),
                              kr[:, c0 - L:c0], v[:, c0 - L:c0], False))
        if c0 >= 2 * L:
            parts.append(call(rot(q[:, c0:c1], torch.full_like(idx, min(2 * L - 1, C))),
                              kr[:, :c0 - L], v[:, :c0 - L], False))
        lse = torch.stack([p[1] for p in parts])
        w = torch.softmax(lse, 0)
        outs.append(sum(wi[..., None] * p[0] for wi, p in zip(w, parts)))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("ext", [DualChunk(12, 3), DualChunk(8, 0), DualChunk(10, 6)],
                         ids=repr)
def test_dca_reference_is_the_authors_chunk_loop(ext):
    g = torch.Generator().manual_seed(12)
    H, S, D = 2, 41, 8
    q, k, v = (torch.randn(1, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    got = posattn.attention(q, k, v, pe=RoPE(extend=ext), causal=True, backend="reference")
    want = _chunk_loop(q[0], k[0], v[0], ext, D ** -0.5)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-12)
    # decode (the authors' cache branch): the last query alone over every key
    last = posattn.attention(q[:, :, -1:], k, v, pe=RoPE(extend=ext), causal=True,
                             backend="reference")
    torch.testing.assert_close(last[0], want[:, -1:], rtol=0, atol=1e-12)


def test_window_past_every_distance_is_plain_rope():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 19, 8, generator=g, dtype=torch.float64) for _ in range(3))
    plain = posattn.attention(q, k, v, pe="rope", causal=True, backend="reference")
    for ext in (ReRoPE(19), LeakyReRoPE(19, 2), SelfExtend(2, 19), DualChunk(20, 1)):
        got = posattn.attention(q, k, v, pe=RoPE(extend=ext), causal=True, backend="reference")
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-14)


# method, dtype, heads (Hq, Hkv), positions, window, softcap | Sq, Sk, D
CASES = [
    ("rerope", FP16, (2, 2), "default", None, None, 45, 45, 16),
    ("rerope", FP32, (4, 2), "explicit", (9, 0), 20.0, 21, 40, 32),
    ("leaky", FP32, (2, 2), "offset", None, 20.0, 17, 50, 16),
    ("leaky", FP16, (4, 1), "default", (12, 0), None, 33, 33, 32),
    ("selfextend", FP32, (4, 2), "default", None, None, 64, 64, 16),
    ("selfextend", FP16, (2, 2), "explicit", None, 20.0, 30, 30, 16),
    ("selfextend", FP16, (2, 1), "offset", (20, 0), None, 9, 41, 32),
    ("dca", FP16, (2, 2), "default", None, None, 45, 45, 16),
    ("dca", FP32, (4, 2), "explicit", None, 20.0, 21, 40, 32),
    ("dca", FP32, (2, 1), "offset", None, None, 17, 50, 16),
]


def _positions(kind, Sq, Sk, seed):
    if kind == "default":
        return {}
    if kind == "offset":
        return dict(q_positions=1000 + Sk - Sq, k_positions=1000)
    g = torch.Generator().manual_seed(seed)  # sorted, with gaps, queries among the keys
    kp = torch.sort(torch.randperm(3 * Sk, generator=g)[:Sk]).values
    qp = torch.sort(torch.randperm(3 * Sk, generator=g)[:Sq]).values + 5
    return dict(q_positions=qp.to(DEVICE), k_positions=kp.to(DEVICE))


def _judge(got, q, k, v, pe, dtype, **kw):
    ref = posattn.attention(q.double(), k.double(), v.double(), pe=pe, backend="reference", **kw)
    naive = posattn.attention(q, k, v, pe=pe, backend="reference", **kw)
    assert_rule("out", got, ref, naive, 2, dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}-{c[3]}-"
                         f"w{c[4]}-cap{c[5]}")
def test_triton_forward_matches_reference(case):
    name, dtype, (Hq, Hkv), kind, window, cap, Sq, Sk, D = case
    g = torch.Generator().manual_seed(len(name) + Sq)
    q = torch.randn(2, Hq, Sq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(2, Hkv, Sk, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(2, Hkv, Sk, D, generator=g).to(DEVICE, dtype)
    pe = RoPE(extend=METHODS[name])
    kw = dict(causal=True, window=window, softcap=cap, **_positions(kind, Sq, Sk, Sq))
    with torch.no_grad():
        got = posattn.attention(q, k, v, pe=pe, backend="triton", **kw)
    _judge(got, q, k, v, pe, dtype, **kw)


def test_triton_varlen_and_kvcache():
    """Packed sequences (each restarts its positions) and a paged KV cache (decode rows whose
    every key but the nearest is far)."""
    g = torch.Generator().manual_seed(9)
    check_varlen_causal(RoPE(extend=SelfExtend(2, 6)), g)
    # paged cache: 2 sequences, 16-token pages, one new token each
    check_paged_decode(RoPE(extend=ReRoPE(5)), g)


def test_dca_over_a_kv_cache():
    """DCA decoding from a KV cache: the keys rotated in the tile at k mod chunk_len, two
    sequences whose new tokens sit at different places in their chunks (one opens a chunk,
    so its previous key is in the successive region)."""
    g = torch.Generator().manual_seed(13)
    pe = RoPE(extend=DualChunk(7, 2))  # chunks of 5
    lens = [31, 45]
    kc, vc = (torch.randn(2, 48, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    qn = torch.randn(2, 2, 4, 16, generator=g).to(DEVICE)
    with torch.no_grad():
        got = posattn.attention_with_kvcache(
            qn, kc, vc, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            pe=pe, backend="triton")
    for b, n in enumerate(lens):
        qs = qn[b:b + 1].transpose(1, 2)
        ks, vs = (c[b:b + 1, :n].transpose(1, 2) for c in (kc, vc))
        ref = posattn.attention(qs.double(), ks.double(), vs.double(), pe=pe, causal=True,
                                backend="reference")
        naive = posattn.attention(qs, ks, vs, pe=pe, causal=True, backend="reference")
        assert_rule("out", got[b:b + 1].transpose(1, 2), ref, naive, 2, FP32)


def test_dca_chunks_of_one_over_a_kv_cache():
    """chunk_size - local_window = 1: every key at position 0 (k mod 1) in the far passes,
    the cached keys rotated in the tile too (the key map's modulus, not only chunks > 1)."""
    g = torch.Generator().manual_seed(14)
    pe = RoPE(extend=DualChunk(2, 1))
    kc, vc = (torch.randn(1, 20, 1, 16, generator=g).to(DEVICE) for _ in range(2))
    qn = torch.randn(1, 2, 2, 16, generator=g).to(DEVICE)
    with torch.no_grad():
        got = posattn.attention_with_kvcache(
            qn, kc, vc, cache_seqlens=torch.tensor([20], dtype=torch.int32, device=DEVICE),
            pe=pe, backend="triton")
    qs, ks, vs = qn.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    ref = posattn.attention(qs.double(), ks.double(), vs.double(), pe=pe, causal=True,
                            backend="reference")
    naive = posattn.attention(qs, ks, vs, pe=pe, causal=True, backend="reference")
    assert_rule("out", got.transpose(1, 2), ref, naive, 2, FP32)


@pytest.mark.parametrize("cache", [False, True])
def test_split_k(monkeypatch, cache):
    """The forward split over runs of key tiles (flash-decoding) merged by their LSEs: each run
    does its near and its far pass. Dense (K rotated beforehand) and a KV cache (in the tile)."""
    merges = force_splits(monkeypatch, 3)
    g = torch.Generator().manual_seed(8)
    pe = RoPE(extend=LeakyReRoPE(9, 3))
    q = torch.randn(1, 2, 3, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 2, 100, 16, generator=g).to(DEVICE) for _ in range(2))
    with torch.no_grad():
        if cache:
            got = posattn.attention_with_kvcache(
                q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
                cache_seqlens=torch.tensor([100], dtype=torch.int32, device=DEVICE), pe=pe,
                backend="triton").transpose(1, 2)
        else:
            got = posattn.attention(q, k, v, pe=pe, causal=True, backend="triton")
    assert merges, "the split path did not run"
    _judge(got, q, k, v, pe, FP32, causal=True)


# method, dtype, heads, positions, window, softcap | Sq, Sk, D
GRAD_CASES = [
    ("rerope", FP32, (4, 2), "default", None, None, 40, 40, 16),
    ("leaky", FP16, (2, 2), "explicit", (20, 0), 20.0, 23, 37, 16),
    ("selfextend", FP32, (2, 1), "offset", None, None, 19, 45, 32),
    ("selfextend", FP16, (2, 2), "default", (15, 0), None, 33, 33, 16),
    ("dca", FP32, (4, 2), "default", None, None, 40, 40, 16),
    ("dca", FP16, (2, 1), "explicit", None, 20.0, 23, 37, 16),
]


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[3]}")
def test_backward_matches_reference(case, backend):
    """out, lse (2x) and dq, dk, dv (3x) by the error rule. Triton: one forward launch, the
    backward as two pieces of the attention (near pairs with RoPE, far pairs on Q and K
    rotated at their far positions); cpu: both directions as those two pieces, merged by
    their LSEs."""
    name, dtype, (Hq, Hkv), kind, window, cap, Sq, Sk, D = case
    kw = dict(causal=True, window=window, softcap=cap, **_positions(kind, Sq, Sk, Sq))
    check_fwd_bwd(RoPE(extend=METHODS[name]), backend, dtype, (2, Hq, Hkv, Sq, Sk, D), Sq + Sk,
                  **kw)


def test_broadcast_inputs_with_per_batch_positions():
    """q and k expanded over the batch (stride 0) with different positions per batch row: each
    row's far rotation is its own (a stride-0 buffer would keep the last row's), forward and
    backward, Triton and cpu."""
    g = torch.Generator().manual_seed(11)
    pe = RoPE(extend=SelfExtend(2, 6))
    base = [torch.randn(1, 2, 21, 16, generator=g).to(DEVICE) for _ in range(3)]
    qp = torch.stack([torch.arange(21) + 30, torch.arange(21) * 2 + 3]).to(DEVICE)
    for backend in ("triton", "cpu"):
        leaves = [t.clone().requires_grad_() for t in base]
        q, k, v = (t.expand(2, -1, -1, -1) for t in leaves)
        out = posattn.attention(q, k, v, pe=pe, causal=True, backend=backend, q_positions=qp,
                                k_positions=qp)
        grads = torch.autograd.grad(out.sum(), leaves)
        refs = [t.double().clone().requires_grad_() for t in base]
        rq, rk, rv = (t.expand(2, -1, -1, -1) for t in refs)
        ref = posattn.attention(rq, rk, rv, pe=pe, causal=True, backend="reference",
                                q_positions=qp, k_positions=qp)
        ref_grads = torch.autograd.grad(ref.sum(), refs)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-4)


def test_errors_name_the_argument():
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    pe = RoPE(extend=ReRoPE(4))
    with pytest.raises(ValueError, match="causal=True"):
        posattn.attention(q, q, q, pe=pe, causal=False, backend="reference")
    with pytest.raises(ValueError, match="causal=True"):
        posattn.attention(q, q, q, pe=pe, causal=False, backend="cpu")
    with pytest.raises(TypeError, match="extend"):
        RoPE(extend="rerope")
    with pytest.raises(ValueError, match="group"):
        SelfExtend(1, 8)
    with pytest.raises(ValueError, match="factor"):
        LeakyReRoPE(8, 1)
    with pytest.raises(ValueError, match="window"):
        ReRoPE(0)
    with pytest.raises(ValueError, match="local_window"):
        DualChunk(8, 8)
    with pytest.raises(TypeError, match="local_window"):
        DualChunk(8, 2.5)
    with pytest.raises(ValueError, match="takes no window"):
        posattn.attention(q, q, q, pe=RoPE(extend=DualChunk(4, 1)), causal=True, window=(3, 0),
                          backend="reference")
    assert repr(DualChunk.for_trained_length(4096)) == "DualChunk(chunk_size=3072, local_window=256)"


def test_reference_backward_runs():
    """The reference's gradients (autograd through both passes) pass gradcheck: the oracle
    the Triton backward is judged against."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = posattn.attention(q, k, v, pe=RoPE(extend=SelfExtend(2, 4)), causal=True,
                            backend="reference")
    assert torch.autograd.gradcheck(
        lambda a, b, c: posattn.attention(a, b, c, pe=RoPE(extend=SelfExtend(2, 4)), causal=True,
                                          backend="reference"), (q, k, v))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
