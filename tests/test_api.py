"""posattn.attention's argument validation: every error a user can cause is a TypeError or
ValueError that names the argument (and its shape where one is involved)."""
import pytest
import torch

import posattn

from conftest import DEVICE


def _qkv(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, Sq, D, dtype=dtype), torch.randn(B, Hkv, Sk, D, dtype=dtype),
            torch.randn(B, Hkv, Sk, D, dtype=dtype))


def _call(*args, **kw):
    kw.setdefault("backend", "reference")
    return posattn.attention(*args, **kw)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D .*got shape \(4, 5, 16\)"),
    (lambda q, k, v: (q, k[None], v), ValueError, r"k must be 4-D"),
    (lambda q, k, v: (q, k, v.int()), TypeError, r"v must be float16.*got torch.int32"),
    (lambda q, k, v: (q.to(torch.complex64), k, v), TypeError, r"q must be float16"),
    (lambda q, k, v: (q, k.double(), v), TypeError, r"k.dtype=torch.float64 differs from q.dtype"),
    (lambda q, k, v: (q[:1], k, v), ValueError, r"batch sizes differ: q 1, k 2"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, r"head dim of k \(8\) differs from q \(16\)"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, r"v \(heads, length\) \(2, 3\) must match k's \(2, 7\)"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, r"Hq=3 must be a positive multiple of Hkv=2"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, r"q must be a torch.Tensor"),
], ids=["q_ndim", "k_ndim", "v_int", "q_complex", "dtype_mismatch", "batch", "head_dim",
        "v_length", "gqa_ratio", "not_tensor"])
def test_tensor_errors(mutate, exc, match):
    with pytest.raises(exc, match=match):
        _call(*mutate(*_qkv()))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(pe="sinusoidal"), ValueError, r"pe must be one of"),
    (dict(pe=3), TypeError, r"pe must be a str"),
    (dict(layout="sbhd"), ValueError, r"layout must be one of"),
    (dict(backend="cuda"), ValueError, r"backend must be one of"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite float"),
    (dict(q_positions=torch.arange(4)), ValueError, r"q_positions must have shape \(5,\) or \(2, 5\), got \(4,\)"),
    (dict(k_positions=torch.zeros(3, 7, dtype=torch.long)), ValueError, r"k_positions must have shape \(7,\) or \(2, 7\)"),
    (dict(q_positions=torch.arange(5.0)), TypeError, r"q_positions must be an integer tensor.*float32"),
    (dict(k_positions=1.5), TypeError, r"k_positions must be None, an int or an integer tensor"),
    (dict(q_positions=True), TypeError, r"q_positions .* got a bool"),
    (dict(k_positions=2 ** 40), ValueError, r"k_positions=.* does not fit in int32"),
    (dict(pe=posattn.RoPE(rotary_dim=7)), ValueError, r"rotary_dim"),
    (dict(pe=posattn.RoPE(rotary_dim=32)), ValueError, r"rotary_dim"),
    (dict(pe=posattn.ALiBi(torch.ones(3))), ValueError, r"slopes.*\(4,\).*\(3,\)"),
    (dict(pe=posattn.KERPLE("log", torch.ones(4), torch.ones(2))), ValueError, r"r2.*\(4,\)"),
    (dict(pe=posattn.RoPE(scaling=posattn.LongRoPE([1.0] * 3, [2.0] * 3, 16))), ValueError,
     r"short_factor.*8"),
], ids=["pe_name", "pe_type", "layout", "backend", "causal", "scale", "qpos_shape", "kpos_batch",
        "qpos_dtype", "kpos_type", "qpos_bool", "kpos_range", "rotary_odd", "rotary_big",
        "slopes_shape", "r2_shape", "longrope_len"])
def test_argument_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(*_qkv(), **kw)


@pytest.mark.parametrize("bad", [lambda: posattn.PI(0.0), lambda: posattn.NTK(-2.0),
                                 lambda: posattn.YaRN(float("inf"), 4096),
                                 lambda: posattn.DynamicNTK(2.0, 0),
                                 lambda: posattn.KERPLE("cubic"),
                                 lambda: posattn.KERPLE("log", -1.0, 1.0)])
def test_invalid_pe_parameters(bad):
    with pytest.raises((TypeError, ValueError)):
        bad()


def test_triton_backend_never_falls_back(monkeypatch):
    """backend='triton' raises on inputs it cannot run instead of running the reference."""
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports float16, bfloat16 and float32"):
        posattn.attention(q, k, v, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        posattn.attention(*_qkv(), backend="triton")


def test_pre_ampere_gpu_is_refused():
    """The compiled kernels need sm_80+ (bf16 mma.sync, >= 99 KiB shared memory): an older GPU
    gets a ValueError naming it, not a Triton out-of-resources error at launch."""
    from posattn import _env
    from posattn.kernels import configs

    assert _env.MIN_CUDA_ARCH == configs.MIN_ARCH
    with pytest.raises(ValueError, match=r"needs an Ampere \(sm_80\) or newer GPU; q is on Tesla T4 \(sm_75\)"):
        _env.check_cuda_arch(75, "Tesla T4")
    for arch in (80, 86, 89, 90, 100, 120):
        _env.check_cuda_arch(arch, "ok")


def test_auto_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    out = posattn.attention(q, k, v, "alibi", backend="auto")
    torch.testing.assert_close(out, posattn.attention(q, k, v, "alibi", backend="reference"))


def test_return_shapes_and_layouts():
    q, k, v = _qkv()
    out, lse = _call(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    v2 = torch.randn(2, 2, 7, 24)
    assert _call(q, k, v2).shape == (2, 4, 5, 24)  # Dv != D
    out_bshd = _call(*(t.transpose(1, 2) for t in (q, k, v)), layout="bshd")
    assert out_bshd.shape == (2, 5, 4, 16)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_output_is_contiguous_in_the_callers_layout(backend):
    """bhsd in, bhsd-contiguous out; bshd (flash-attn) storage in, bshd-contiguous out, so
    ``out.view(B, S, H * D)`` needs no copy."""
    q, k, v = (t.to(DEVICE) for t in _qkv())
    assert posattn.attention(q, k, v, "alibi", backend=backend).is_contiguous()
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = posattn.attention(qs, ks, vs, "alibi", layout="bshd", backend=backend)
    assert out.shape == (2, 5, 4, 16) and out.is_contiguous()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_autocast_runs_in_the_autocast_dtype(layout):
    """Inside torch.autocast, fp32 q/k/v run in the autocast dtype like torch SDPA: the same
    bits as casting by hand, the output in that dtype and in the caller's layout, gradients
    back in fp32. Outside the region nothing is cast."""
    dev = torch.device(DEVICE).type
    low = torch.float16 if dev == "cpu" else torch.bfloat16  # the interpreter's bf16 dot is wrong
    q, k, v = (t.to(DEVICE) for t in _qkv())
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with torch.autocast(dev, dtype=low):
        out = posattn.attention(q, k, v, "alibi", causal=True, layout=layout, backend="triton")
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, q, q)  # its policy
    assert out.dtype == sdpa.dtype == low and out.is_contiguous()
    want = posattn.attention(*(t.detach().to(low) for t in (q, k, v)), "alibi", causal=True,
                             layout=layout, backend="triton")
    assert torch.equal(out, want)
    grads = torch.autograd.grad(out.float().sum(), leaves)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert posattn.attention(q, k, v, "alibi", layout=layout, backend="triton").dtype == torch.float32


@pytest.mark.parametrize("Sk", [7, 0], ids=["launch", "no_launch"])
def test_double_backward_raises_instead_of_dropping_terms(Sk):
    """create_graph=True: the first-order gradients are the usual values, but differentiating
    them again (a gradient penalty) raises -- their second derivative is not implemented, and
    silently treating dq as a constant would drop that term from the loss."""
    q, k, v = (t.to(DEVICE).requires_grad_() for t in _qkv(Sk=Sk))
    out = posattn.attention(q, k, v, "alibi", backend="triton")
    plain = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    graph = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    for a, b in zip(plain, graph):
        assert torch.equal(a, b) and b.requires_grad and not a.requires_grad
    with pytest.raises(RuntimeError, match="not differentiable.*backend='reference'"):
        (graph[0].pow(2).sum() + out.sum()).backward()
