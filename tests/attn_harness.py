"""Test harness shared by test_robustness.py and test_hypothesis.py.

One case = base tensors (float32, CPU) + ``build(leaves) -> (q, k, v)``, so that views, expanded
tensors and one tensor used twice are rebuilt identically for the kernel, the float64 reference
and the naive in-dtype math; ``check`` compares them by flash-attention's rule (helpers.assert_rule),
forward and backward, and verifies that the kernel run modified none of its inputs.

Where flash-attention's algorithm itself rounds differently from the naive math, the rule's
tolerance gets an explicit float32-eps-sized slack (never an fp16-sized one), computed from the
float64 reference: the LSE formed in the exp2 domain, P recomputed from an fp32 LSE, Delta =
rowsum(O * dO) cancelling against dP on one-hot rows, and PE-parameter gradients that are
reductions over B * Sq * Sk terms (FlashSlack). Hypothesis found each of these breaking the bare
rule in float32 (e.g. Sq = Sk = 1: the true dK is 0, the naive gets exactly 0, the kernel ~1 eps).
"""
import torch

import posattn
from posattn import reference
from posattn.pe import resolve_pe, t5_bucket
from posattn.positions import parse_positions
from conftest import DEVICE
from helpers import assert_rule, leaf, naive_attention, pe_leaves, with_params
from pe_cases import REGISTERED, pe_factory


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=gen(seed)) * scale


# registered PE name -> factory(num_query_heads, head_dim) of a spec (fresh trainable leaves
# every call): every PE in posattn.pe.REGISTRY, the "harness" suite of tests/pe_cases.py
PES = {name: pe_factory(name) for name in REGISTERED}


def plain(L):
    return L["q"], L["k"], L["v"]


def snapshot(*objs):
    out = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            out.append((o, o.detach().clone()))
        elif isinstance(o, dict):
            out += snapshot(*o.values())
        elif isinstance(o, (list, tuple)):
            out += snapshot(*o)
        elif isinstance(o, posattn.PE):
            out += snapshot(*[getattr(o, n) for n in ("slopes", "r1", "r2") if hasattr(o, n)])
    return out


def assert_unmodified(snap):
    for t, before in snap:
        assert t.shape == before.shape and t.dtype == before.dtype
        torch.testing.assert_close(t.detach(), before, rtol=0, atol=0, equal_nan=True,
                                   msg="an input was modified in place")


def fwd_bwd(leaves, build, pe, backend, make_dout, compute_dtype=None, **kw):
    """out, lse and the gradients of every leaf and trainable PE tensor (by name)."""
    q, k, v = build(leaves)
    if backend == "naive":
        out, lse = naive_attention(q, k, v, pe, compute_dtype, **kw)
    else:
        out, lse = posattn.attention(q, k, v, pe, return_lse=True, backend=backend, **kw)
    targets = {**leaves, **pe_leaves(pe)}
    dout = make_dout(out)
    grads = torch.autograd.grad(out, list(targets.values()), dout, allow_unused=True)
    return out.detach(), lse.detach(), dict(zip(targets, grads)), dout


def dout_maker(seed, dtype, arrange=None):
    """dout with the same values in every run (rounded to the kernel dtype), then ``arrange``d
    (a deterministic re-layout, e.g. a transposed or expanded view)."""
    def make(out):
        d = rand(*out.shape, seed=seed).to(dtype).to(device=out.device, dtype=out.dtype)
        return arrange(d) if arrange is not None else d
    return make


def run_kernel(base, build, pe, dtype, *, seed=123, arrange=None, **kw):
    """Kernel forward + backward; also checks that no input was modified in place."""
    leaves = {n: t.to(DEVICE).to(dtype).requires_grad_() for n, t in base.items()}
    pe_k = with_params(pe, leaf)
    snap = snapshot(leaves, pe_k, kw)
    make = dout_maker(seed, dtype, arrange)
    out, lse, grads, dout = fwd_bwd(leaves, build, pe_k, "triton", make, **kw)
    snap += snapshot(dout)
    assert_unmodified(snap)
    return out, lse, grads


def check(base, build, pe, dtype, *, seed=123, arrange=None, **kw):
    """Kernel vs the float64 reference by the error rule, forward and backward.

    Returns dict(kernel=(out, lse, grads), ref=(...), naive=(...)) for further checks."""
    out, lse, grads = run_kernel(base, build, pe, dtype, seed=seed, arrange=arrange, **kw)
    make = dout_maker(seed, dtype, arrange)
    L64 = {n: t.to(DEVICE).to(dtype).double().requires_grad_() for n, t in base.items()}
    pe64 = with_params(pe, lambda t: leaf(t, torch.float64))
    out64, lse64, g64, dout64 = fwd_bwd(L64, build, pe64, "reference", make, **kw)
    Ln = {n: t.to(DEVICE).to(dtype).requires_grad_() for n, t in base.items()}
    outn, lsen, gn, _ = fwd_bwd(Ln, build, with_params(pe, leaf), "naive", make, dtype, **kw)

    assert out.dtype == dtype and out.shape == out64.shape
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    assert set(grads) == set(g64)
    qkv64 = build({n: t.detach() for n, t in L64.items()})
    slack = FlashSlack(qkv64, out64, lse64, dout64, pe64, **kw)
    assert_rule_with_slack("out", out, out64, outn, dtype, slack.out, factor=2)
    assert_rule_with_slack("lse", lse, lse64, lsen, dtype, slack.lse, factor=2)
    for name in g64:
        if g64[name] is None:  # e.g. a leaf that no output depends on
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name] is not None and grads[name].shape == g64[name].shape, name
        assert torch.isfinite(grads[name]).all() == torch.isfinite(g64[name]).all(), name
        if name in base:
            # the roles (q, k, v) this leaf plays, and how many times each element is used there
            uses = [(r, t.numel() / L64[name].numel()) for r, t in zip("qkv", qkv64)
                    if _same_storage(t, L64[name])]
            assert uses, f"cannot tell which of q, k, v {name} is"
            extra = sum(getattr(slack, r) * max(1.0, n) for r, n in uses)
        else:
            extra = slack.pe(name)
        assert_rule_with_slack(f"d{name}", grads[name], g64[name], gn[name], dtype, extra)
    return dict(kernel=(out, lse, grads), ref=(out64, lse64, g64), naive=(outn, lsen, gn))


def qkv(B, Hq, Hkv, Sq, Sk, D, Dv=None, seed=0, scale=1.0):
    return {"q": rand(B, Hq, Sq, D, seed=seed, scale=scale),
            "k": rand(B, Hkv, Sk, D, seed=seed + 1, scale=scale),
            "v": rand(B, Hkv, Sk, Dv or D, seed=seed + 2, scale=scale)}


def _same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class FlashSlack:
    """Float64 quantities of the reference that set the scale of flash-attention's own rounding
    (beyond the naive math's), all in float32 eps. With L_i the largest |logit| of query row i
    (scaled, biased, natural units; at least |LSE_i| and 1):

    * out, lse: the kernels work in the exp2 domain, s2 = s * log2(e), and form the LSE as
      (m2 + log2 l) * ln 2, so P carries a relative error ~ eps * L_i (the naive subtracts the max
      in natural units): out_i is off by ~ eps * L_i * sum_j P_ij |v_j - out_i|, lse_i by ~ eps * L_i.
    * q, k, v: the backward recomputes P = exp(s - LSE) from the fp32 LSE (relative error
      ~ eps * L_i) and forms Delta = rowsum(O * dO) from the rounded output, so dS = P (dP - Delta)
      carries an error ~ eps * (|dO| |V| + |O| |dO|) that the naive math (which keeps P, and gets
      dS = 0 exactly on one-hot rows, e.g. Sk = 1) does not have.
    * xPos, the gradients: each kernel takes its decays relative to its own block (dK/dV: the
      key block; forward and dQ: their query blocks, whose sizes differ on a GPU), so the
      backward's recomputed logit differs from the forward's by the roundings of the factors:
      ~eps * |scale| |q_i| |k_j| per score, which can exceed eps * L_i where the pairs' terms
      cancel. L_i there is raised by 4 |scale| |q_i| max_j |k_j| (the interpreter's dQ tiles
      happen to match the forward's; a GPU's need not).
    * pe(name): per head, the sum over (b, i, j) of (eps |dS| + that dS error) * |d bias / d param|:
      a PE-parameter gradient is a reduction over B * Sq * Sk terms that often cancel, so its
      rounding error scales with this sum, not with the (small) result.
    """

    def __init__(self, qkv64, out64, lse64, dout64, pe, *, causal=False, scale=None, q_positions=None,
                 k_positions=None, layout="bhsd"):
        self.spec = with_params(resolve_pe(pe), lambda t: t.detach().double())
        q, k, v = (t.detach() for t in qkv64)
        out, dout = out64.detach(), dout64.detach().double()
        if layout == "bshd":
            q, k, v, out, dout = (t.transpose(1, 2) for t in (q, k, v, out, dout))
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        g = Hq // Hkv
        scale = D ** -0.5 if scale is None else scale
        self.qp = parse_positions(q_positions, "q_positions", B, Sq, Sk - Sq, q.device).as_tensor(B, Sq, q.device)
        self.kp = parse_positions(k_positions, "k_positions", B, Sk, 0, q.device).as_tensor(B, Sk, q.device)
        eye = torch.eye(Sk, dtype=torch.float64, device=q.device).expand(B, Hkv, Sk, Sk)
        with torch.no_grad():  # P (the softmax rows) is the output for V = identity
            P = posattn.attention(q, k, eye, self.spec, causal=causal, scale=scale,
                                  q_positions=q_positions, k_positions=k_positions, backend="reference")
        self._from_rows(P, lse64, q, k, v, out, dout, scale, g, causal)
        if layout == "bshd":
            self.out = self.out.transpose(1, 2)

    def _from_rows(self, P, lse, q, k, v, out, dout, scale, g, causal):
        """The slacks from the float64 softmax rows P (B, Hq, Sq, Sk) of the reference and
        bhsd float64 q, k, v, out, dout (subclasses build P with other masks: see
        tests/test_window_softcap.py)."""
        eps = torch.finfo(torch.float32).eps
        Hq, Sk = P.shape[1], P.shape[-1]
        lse = lse.detach().double()[..., None]  # (B, Hq, Sq, 1)
        # The kernels centre a bias PE's row on the bias of its nearest visible key (a row
        # constant c_i; kernels/bias.py, "Centring"), so their rounding scales with the
        # centred logits s - c_i, not with the raw ones: a row whose keys are all far away
        # must not earn a slack the size of its bias (that slack hid the far-positions bug).
        c = self._row_centre(Hq, Sk, causal, lse)
        logits = torch.where(P > 0, torch.log(P) + lse - c, torch.zeros_like(P))  # s - c
        L = torch.maximum(logits.abs().amax(-1, keepdim=True) if Sk else torch.zeros_like(lse),
                          torch.where(torch.isfinite(lse), (lse - c).abs(),
                                      torch.zeros_like(lse))).clamp(min=1.0)
        V = v.repeat_interleave(g, 1)
        spread = (P[..., None] * (V[:, :, None] - out[:, :, :, None]).abs()).sum(-2)  # (B, Hq, Sq, Dv)
        self.out = 2 * eps * L * spread.amax(-1, keepdim=True)
        self.lse = 3 * eps * L[..., 0]

        dP = dout @ V.transpose(-1, -2)
        delta = (out * dout).sum(-1, keepdim=True)
        self.dS = (P * (dP - delta)).abs()

        def dS_error(L):
            return P * (4 * eps * L * (dP - delta).abs()
                        + eps * (dout.abs() @ V.abs().transpose(-1, -2)
                                 + (out.abs() * dout.abs()).sum(-1, keepdim=True)))

        self.PW = PW_kv = dS_error(L)
        L_kv = L
        if getattr(self.spec, "xpos", False) and Sk:  # the dK/dV kernel's own factors (above)
            qn = q.norm(dim=-1, keepdim=True)  # (B, Hq, Sq, 1)
            kn = k.norm(dim=-1).amax(-1)[:, :, None, None].repeat_interleave(g, 1)
            L_kv = L + 4 * abs(scale) * qn * kn
            PW_kv = dS_error(L_kv)

        def mx(t):
            return t.abs().max().item() if t.numel() else 0.0

        rot = 2.0  # a rotated (RoPE) element: at most sqrt(2) x attention factor x the largest input
        self.q = abs(scale) * rot * mx(k) * mx(PW_kv.sum(-1))
        self.k = abs(scale) * rot * mx(q) * mx(PW_kv.sum(-2)) * g
        self.v = mx((4 * eps * L_kv * P).transpose(-1, -2) @ dout.abs()) * g

    def _row_centre(self, Hq, Sk, causal, lse):
        """(B, Hq, Sq, 1) float64: each row's bias at its nearest visible key for a bias PE
        (the largest bias it sees: every such bias is -a f(|q - k|), f increasing), else 0
        (T5's table is bounded: the kernels do not centre it)."""
        bias = reference.bias(self.spec, Hq, self.qp, self.kp, torch.float64)
        if bias is None or Sk == 0 or isinstance(self.spec, (posattn.T5Bias, posattn.FIRE)):
            return torch.zeros_like(lse)  # a table, an MLP: bounded, never centred
        if causal:
            visible = (self.kp[:, None, :] <= self.qp[:, :, None])[:, None]
            bias = torch.where(visible, bias, torch.full_like(bias, float("-inf")))
        c = bias.amax(-1, keepdim=True)
        return torch.where(torch.isfinite(c), c, torch.zeros_like(c))

    fire_ref = "row"  # where FIRE's gradient is centred: "row" (the Triton kernels, whole
    # rows), "zero" (u = 0: ring attention's pieces) or "none" (the cpu backend)

    def _fire(self, dS, name):
        return _fire_slack(self.spec, dS.shape[1], self.qp, self.kp, dS, name, self.fire_ref)

    def pe(self, name):
        spec = self.spec
        dS = torch.finfo(torch.float32).eps * self.dS + self.PW
        dist = (self.qp[:, :, None] - self.kp[:, None, :]).abs().double()[:, None]  # (B, 1, Sq, Sk)
        # the kernels' parameter gradients are sums of dS times the *centred* d(bias)/d(param)
        # (its value at the row's nearest visible key subtracted; see _row_centre)
        seen = dS > 0
        dref = torch.where(seen, dist, torch.full_like(dist, float("inf"))).amin(-1, keepdim=True)
        dref = torch.where(torch.isfinite(dref), dref, torch.zeros_like(dref))

        def per_head(f):
            f = f(dist) - f(dref) if callable(f) else f
            return (dS * f.abs()).sum(dim=(0, 2, 3))

        if isinstance(spec, posattn.T5Bias):  # d bias / d table[h, j] = 1 on bucket j's scores
            rel = (self.kp[:, None, :] - self.qp[:, :, None])[:, None]  # (B, 1, Sq, Sk)
            bk = t5_bucket(rel, spec.num_buckets, spec.bidirectional, spec.max_distance)
            out = torch.zeros(dS.shape[1], spec.num_buckets, dtype=dS.dtype, device=dS.device)
            return out.scatter_add_(1, bk.expand_as(dS).transpose(0, 1).flatten(1),
                                    dS.transpose(0, 1).flatten(1))
        if isinstance(spec, posattn.ALiBi):
            return per_head(lambda d: d)
        if isinstance(spec, posattn.FIRE):
            return self._fire(dS, name)
        r1, r2 = (t[:, None, None] if isinstance(t, torch.Tensor) else t for t in (spec.r1, spec.r2))
        if spec.kind == "log":
            return per_head((lambda d: torch.log1p(r2 * d)) if name == "r1" else
                            (lambda d: abs(r1) * d / (1 + r2 * d)))

        def powd(d):
            return torch.where(d > 0, d ** r2, torch.zeros_like(d))
        if name == "r1":
            return per_head(powd)
        return per_head(lambda d: abs(r1) * powd(d) * torch.log(torch.where(d > 0, d, torch.ones_like(d))))


def _fire_slack(spec, H, qp, kp, dS, name, ref):
    """FIRE's pe slack for its tensor ``name``, of that tensor's shape: per element p, the sum
    over scores of dS * |d(bias) / dp - its value at the row's reference score| -- the
    kernels centre each row's gradient terms there (kernels/bias.py fire_store): ``ref`` "row",
    the row's seen score of largest u; "zero", u = 0; "none", not centred (the cpu backend).
    Forward-mode derivatives, one element at a time."""
    names = ("w1", "b1", "w2", "b2", "c", "L")
    prim = tuple(torch.as_tensor(getattr(spec, n), dtype=torch.float64, device=dS.device)
                 for n in names)

    def bias(*ts):
        f = posattn.FIRE(*ts, eps=spec.eps, activation=spec.activation, num_cells=spec.num_cells)
        b = f.reference_bias_at(H, qp, kp, torch.float64)
        if ref == "zero":
            b = b - f.mlp(torch.zeros(1, dtype=torch.float64, device=dS.device))[0][None, :, None, None]
        return b

    seen = dS > 0
    u = spec.normalised(qp, kp, torch.float64)[:, None].expand_as(dS)
    at = torch.where(seen, u, torch.full_like(u, -1.0)).argmax(-1, keepdim=True)
    i = names.index(name)
    out = torch.zeros_like(prim[i])
    for e in range(prim[i].numel()):
        tan = [torch.zeros_like(p) for p in prim]
        tan[i].view(-1)[e] = 1.0
        _, d = torch.func.jvp(bias, prim, tuple(tan))
        if ref == "row":
            d = d - d.gather(-1, at)
        out.view(-1)[e] = (dS * d.abs()).sum()
    return out


def assert_rule_with_slack(name, got, ref64, naive, dtype, slack, factor=3):
    """helpers.assert_rule (factor 3 for gradients) with ``slack`` added (see FlashSlack)."""
    assert_rule(name, got, ref64, naive, factor, dtype, slack)
