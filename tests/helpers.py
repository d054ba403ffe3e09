"""Shared test utilities: random inputs and flash-attention's error rule.

The rule: a kernel's max error against the float64 reference must be at most ``factor`` (2 for
outputs, 3 for gradients) times the max error of the same naive math done in the input dtype,
plus a small rounding floor proportional to the values' magnitude.
"""
import torch

import posattn
from posattn import reference
from posattn.pe import resolve_pe
from posattn.positions import parse_positions
from posattn.testing import error_tolerance

def assert_rule(name, got, ref64, naive, factor, dtype, slack=0.0):
    """max|got - ref64| <= factor * max|naive - ref64| + eps(dtype) * max(1, max|ref64|)
    (posattn.testing.error_tolerance), elementwise plus ``slack`` (a number or a tensor
    broadcastable to ``got``; see attn_harness.FlashSlack, 0 everywhere else).

    Non-finite entries (LSE -inf of a query that sees no key) must match exactly.
    """
    got, naive = got.double(), naive.double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite pattern differs from the reference"
    if not finite.any():
        return
    err_naive = (naive - ref64)[finite].abs().max().item()
    tol = error_tolerance(err_naive, ref64, dtype, factor)
    tol = tol + torch.as_tensor(slack, dtype=torch.float64, device=got.device).expand_as(got)[finite]
    err = (got - ref64)[finite].abs()
    worst = (err - tol).argmax()
    assert (err <= tol).all(), (f"{name}: kernel error {err[worst].item():.3e} > tol {tol[worst].item():.3e} "
                                f"({factor} x naive {err_naive:.3e} + floor + slack)")


def run_attention(q, k, v, pe, backend, dout, **kw):
    """Forward + backward through posattn.attention; returns (out, lse, grads dict)."""
    leaves = {"q": q, "k": k, "v": v}
    leaves.update(pe_leaves(pe))
    out, lse = posattn.attention(q, k, v, pe, return_lse=True, backend=backend, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True)
    return out, lse, dict(zip(leaves, grads))


# the PE specs' trainable tensors (ALiBi, KERPLE, T5, FIRE)
PE_PARAMS = ("slopes", "r1", "r2", "table", "w1", "b1", "w2", "b2", "c", "L")


def pe_leaves(pe):
    """The PE's trainable tensors by name (slopes, r1, r2) that require grad."""
    spec = resolve_pe(pe)
    out = {}
    for name in PE_PARAMS:
        t = getattr(spec, name, None)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out[name] = t
    # a new PE's parameter must not silently go unchecked
    other = [n for n, t in vars(spec).items()
             if n not in PE_PARAMS and isinstance(t, torch.Tensor) and t.requires_grad]
    if other:
        raise NotImplementedError(f"tests/helpers.py knows no trainable tensor {other} of "
                                  f"{type(spec).__name__}: add it to PE_PARAMS and with_params")
    return out


def with_params(pe, cast):
    """A copy of a PE spec whose tensors are cast (fresh leaves that require grad if the original did)."""
    spec = resolve_pe(pe)
    if isinstance(spec, posattn.ALiBi) and isinstance(spec.slopes, torch.Tensor):
        return posattn.ALiBi(cast(spec.slopes))
    if isinstance(spec, posattn.KERPLE):
        r1 = cast(spec.r1) if isinstance(spec.r1, torch.Tensor) else spec.r1
        r2 = cast(spec.r2) if isinstance(spec.r2, torch.Tensor) else spec.r2
        return posattn.KERPLE(spec.kind, r1, r2)
    if isinstance(spec, posattn.T5Bias):
        return posattn.T5Bias(cast(spec.table), spec.bidirectional, spec.max_distance)
    if isinstance(spec, posattn.FIRE):
        def c(x):
            return cast(x) if isinstance(x, torch.Tensor) else x
        return posattn.FIRE(c(spec.w1), c(spec.b1), c(spec.w2), c(spec.b2), c(spec.c), c(spec.L),
                            spec.eps, spec.activation, spec.num_cells)
    return spec


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)


def naive_attention(q, k, v, pe, dtype, *, causal=False, scale=None, q_positions=None,
                    k_positions=None, layout="bhsd"):
    """The reference math done in ``dtype`` (the yardstick of the error rule). Returns (out, lse)."""
    spec = resolve_pe(pe)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    qpos = parse_positions(q_positions, "q_positions", B, Sq, Sk - Sq, q.device)
    kpos = parse_positions(k_positions, "k_positions", B, Sk, 0, q.device)
    out, lse = reference.attention_bhsd(q, k, v, spec, causal=causal,
                                        scale=scale if scale is not None else D ** -0.5,
                                        q_pos=qpos, k_pos=kpos, compute_dtype=dtype)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out, lse


def force_bias_tables(monkeypatch):
    """Make KERPLE read its per-distance tables even for short sequences, and record whether
    each launch used them: returns the list of ``BiasTables.used``, one per launch."""
    from posattn.kernels import launch

    used = []
    real = launch._bias_tables

    def spy(*args, **kw):
        tables = real(*args, **kw)
        used.append(tables.used)
        return tables

    monkeypatch.setattr(launch, "_bias_tables", spy)
    monkeypatch.setattr(launch, "BIAS_TABLE_MIN_LEN", 1)
    return used


def force_splits(monkeypatch, splits):
    """Force the split-K forward into ``splits`` runs; returns the list of the combine
    kernel's launch grids (empty: the split path did not run)."""
    from posattn.kernels import launch

    merges = []
    real = launch.attn_combine_kernel

    class Spy:
        def __getitem__(self, grid):
            merges.append(grid)
            return real[grid]

    monkeypatch.setattr(launch, "FORCE_SPLITS", splits)
    monkeypatch.setattr(launch, "attn_combine_kernel", Spy())
    return merges


def check_fwd_bwd(pe, backend, dtype, shapes, seed, finite=False, **kw):
    """out, lse (2x) and dq, dk, dv (3x) of ``backend`` against the float64 reference by the
    error rule, on random inputs of ``shapes`` = (B, Hq, Hkv, Sq, Sk, D) from ``seed``;
    ``finite``: also every output but the LSE finite (a row without keys has LSE -inf)."""
    B, Hq, Hkv, Sq, Sk, D = shapes
    from conftest import DEVICE
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(DEVICE, dtype)
    dout = torch.randn(B, Hq, Sq, D, generator=g).to(DEVICE, dtype)

    def run(backend_, cast):
        leaves = [t.to(cast).detach().requires_grad_() for t in (q, k, v)]
        out, lse = posattn.attention(*leaves, pe=pe, backend=backend_, return_lse=True, **kw)
        return (out, lse) + torch.autograd.grad(out, leaves, dout.to(cast))

    got = run(backend, dtype)
    ref = run("reference", torch.float64)
    naive = run("reference", dtype)
    for name, a, r, n in zip(("out", "lse", "dq", "dk", "dv"), got, ref, naive):
        if finite and name != "lse":
            assert torch.isfinite(a).all(), name
        assert_rule(name, a.detach(), r.detach(), n.detach(), 2 if name in ("out", "lse") else 3,
                    dtype)


def check_varlen_causal(pe, g):
    """Two packed sequences (13 and 29 tokens, positions restarting per sequence), causal,
    fp32, Triton against the reference per sequence by the rule; inputs drawn from ``g``."""
    from conftest import DEVICE
    cu = torch.tensor([0, 13, 42], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(42, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    with torch.no_grad():
        got = posattn.attention_varlen(q, k, v, cu, cu, 29, 29, pe=pe, causal=True, backend="triton")
    for (a, b) in ((0, 13), (13, 42)):
        sl = (slice(None), slice(None), slice(a, b))
        qs, ks, vs = (t.transpose(0, 1)[None][sl] for t in (q, k, v))
        ref = posattn.attention(qs.double(), ks.double(), vs.double(), pe=pe, causal=True,
                                backend="reference")
        naive = posattn.attention(qs, ks, vs, pe=pe, causal=True, backend="reference")
        assert_rule("out", got[a:b].transpose(0, 1)[None], ref, naive, 2, torch.float32)


def check_paged_decode(pe, g):
    """A paged KV cache (8 pages of 16 tokens, 2 sequences of 20 and 37 keys, 2 new query
    heads on 1 KV head, one token each), Triton against the reference per sequence by the
    rule; inputs drawn from ``g``."""
    from conftest import DEVICE
    page, lens = 16, [20, 37]
    kc = torch.randn(8, page, 1, 16, generator=g).to(DEVICE)
    vc = torch.randn(8, page, 1, 16, generator=g).to(DEVICE)
    bt = torch.randperm(8, generator=g)[:6].view(2, 3).to(DEVICE, torch.int32)
    qn = torch.randn(2, 1, 2, 16, generator=g).to(DEVICE)
    with torch.no_grad():
        got = posattn.attention_with_kvcache(
            qn, kc, vc, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            block_table=bt, pe=pe, backend="triton")
    for b, n in enumerate(lens):
        keys = kc[bt[b].long()].reshape(-1, 1, 16)[:n]
        vals = vc[bt[b].long()].reshape(-1, 1, 16)[:n]
        qs = qn[b:b + 1].transpose(1, 2)  # (1, Hq, 1, D)
        ks, vs = keys.transpose(0, 1)[None], vals.transpose(0, 1)[None]  # (1, 1, n, D)
        ref = posattn.attention(qs.double(), ks.double(), vs.double(), pe=pe, causal=True,
                                backend="reference")
        naive = posattn.attention(qs, ks, vs, pe=pe, causal=True, backend="reference")
        assert_rule("out", got[b:b + 1].transpose(1, 2), ref, naive, 2, torch.float32)
