"""Tensors beyond 2**31 elements: every offset that can exceed int32 is formed in 64 bits.

No tensor of 2**31 elements is allocated. Three complementary proofs:

1. The Triton interpreter (what CPU CI runs) wraps int32 arithmetic exactly as the GPU does
   (``test_interpreter_wraps_int32_products``), so a kernel that formed ``index * stride`` in
   int32 would read the wrong element in the interpreter too.
2. The kernels run, forward and backward, on views whose batch, head and row offsets each
   exceed 2**31 elements; the views live in a *sparse* memory-mapped file (tens of GB of address
   space, a few pages of memory and disk), and the results are bitwise equal to the same call on
   compact copies (``test_views_with_offsets_beyond_int32``).
3. The kernels compiled for sm_90 (what a GPU runs): in the TTIR, every batch / head / row stride
   and the (batch x head) program id are sign-extended to i64 before any arithmetic, and no i32
   multiplication involves them (``test_compiled_offsets_are_64_bit``); the same checker flags a
   kernel that multiplies a program id by a stride in i32.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

import posattn
from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INT32_MAX = 2 ** 31 - 1


# --------------------------------------------------------------------------------------------
# 1. the interpreter wraps int32 products like the hardware (so proof 2 would catch int32 math)
# --------------------------------------------------------------------------------------------


@triton.jit
def _offset_kernel(OUT, stride):
    pid = tl.program_id(0)
    tl.store(OUT + 2 * pid, pid * stride)  # int32 * int32: wraps past 2**31
    tl.store(OUT + 2 * pid + 1, pid.to(tl.int64) * stride)  # what the attention kernels do


def test_interpreter_wraps_int32_products():
    stride = 2 ** 30 + 2 ** 20  # fits in int32; 2 * stride does not
    out = torch.zeros(6, dtype=torch.int64, device="cuda" if HAS_CUDA else "cpu")
    _offset_kernel[(3,)](out, stride)
    out = out.cpu()
    assert out[5].item() == 2 * stride  # int64 product: exact
    assert out[4].item() != 2 * stride  # int32 product: wrapped
    assert out[4].item() == 2 * stride - 2 ** 32


# --------------------------------------------------------------------------------------------
# 2. run on views whose offsets exceed 2**31 elements (sparse memory-mapped storage)
# --------------------------------------------------------------------------------------------

B, H, S, D = 3, 3, 17, 16
# Each stride fits in int32; the largest index times it does not: batch 2 * SB, head 2 * SH and
# row 16 * SM each exceed 2**31 - 1 on their own.
SB, SH, SM = 2 ** 30 + 2 ** 20, 2 ** 30 + 2 ** 19, 2 ** 27 + 2 ** 10
# Views start 3 * 2**31 elements into the file, so that a wrapped (negative) int32 offset still
# lands inside the mapping: a regression reads wrong values (and fails) instead of crashing.
BASE = 3 * 2 ** 31


def _sparse_storage(path, numel, dtype):
    itemsize = torch.empty((), dtype=dtype).element_size()
    with open(path, "wb") as f:
        f.truncate(numel * itemsize)
    if os.stat(path).st_blocks * 512 > 2 ** 26:
        pytest.skip("the filesystem does not support sparse files")
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


def _huge_views(storage, shapes_and_cols):
    """As-strided views (batch, head, row, col strides SB, SH, SM, 1) into ``storage``, each
    starting at BASE + its own column offset (so the views interleave without overlapping)."""
    views = []
    for shape, col in shapes_and_cols:
        strides = (SB, SH, SM, 1) if len(shape) == 4 else (SB, SM)
        views.append(storage.as_strided(shape, strides, BASE + col))
    return views


@pytest.fixture
def sparse_dir(tmp_path):
    """A directory for sparse files: tmpfs (/dev/shm) when available, where first-touch page
    faults are cheap; else pytest's tmp_path."""
    import shutil
    import tempfile
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = tempfile.mkdtemp(prefix="posattn-sparse-", dir="/dev/shm")
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield str(tmp_path)


def _max_offsets(t):
    """Largest element offset contributed by each dim (relative to the view's start)."""
    return [(n - 1) * s for n, s in zip(t.shape, t.stride())]


@pytest.mark.skipif(HAS_CUDA, reason="interpreter proof; compiled kernels are checked by the TTIR test")
@pytest.mark.parametrize("pe,explicit", [("rope", False), ("alibi_trainable", True)],
                         ids=["rope_contiguous_pos", "alibi_explicit_pos"])
def test_views_with_offsets_beyond_int32(sparse_dir, pe, explicit):
    dtype = torch.float16
    numel = BASE + 2 * SB + 2 * SH + (S - 1) * SM + 4 * D
    try:
        st = _sparse_storage(os.path.join(sparse_dir, "values.bin"), numel, dtype)
    except (OSError, RuntimeError) as e:  # pragma: no cover - exotic filesystems
        pytest.skip(f"cannot map a sparse file: {e}")
    q, k, v, dout = _huge_views(st, [((B, H, S, D), 0), ((B, H, S, D), D), ((B, H, S, D), 2 * D),
                                     ((B, H, S, D), 3 * D)])
    for t in (q, k, v, dout):  # batch, head and row offsets each exceed int32 on their own
        assert all(off > INT32_MAX for off in _max_offsets(t)[:3]), _max_offsets(t)
        assert max(t.stride()) <= INT32_MAX  # ... while every stride fits in int32
    g = torch.Generator().manual_seed(0)
    compact = [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(4)]
    for view, c in zip((q, k, v, dout), compact):
        view.copy_(c)  # touches a few pages only
        assert torch.equal(view, c)

    kw = {}
    if explicit:
        pos_st = _sparse_storage(os.path.join(sparse_dir, "positions.bin"), BASE + 2 * SB + (S - 1) * SM + 4,
                                 torch.int32)
        qpos, kpos = _huge_views(pos_st, [((B, S), 0), ((B, S), 1)])
        assert all(off > INT32_MAX for off in _max_offsets(qpos))
        qpos.copy_(torch.randint(0, 40, (B, S), generator=g, dtype=torch.int32))
        kpos.copy_(torch.randint(0, 40, (B, S), generator=g, dtype=torch.int32))
        kw = dict(q_positions=qpos, k_positions=kpos)
        compact_kw = dict(q_positions=qpos.clone(), k_positions=kpos.clone())
    else:
        compact_kw = {}

    def run(q_, k_, v_, dout_, **pos):
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q_, k_, v_))
        leaves = [q_, k_, v_]
        if pe == "alibi_trainable":
            slopes = torch.linspace(0.1, 0.4, H).requires_grad_()
            spec, leaves = posattn.ALiBi(slopes), leaves + [slopes]
        else:
            spec = pe
        out, lse = posattn.attention(q_, k_, v_, spec, causal=True, return_lse=True,
                                     backend="triton", **pos)
        return (out, lse) + torch.autograd.grad(out, leaves, dout_)

    got = run(q, k, v, dout, **kw)
    want = run(*compact, **compact_kw)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dslopes"], got, want):
        assert torch.equal(a, b), f"{name} differs on the view with offsets beyond 2**31"
    assert all(torch.isfinite(t).all() for t in want)
    # nothing was materialised: the files stay sparse
    assert os.stat(os.path.join(sparse_dir, "values.bin")).st_blocks * 512 < 2 ** 26


# --------------------------------------------------------------------------------------------
# 3. the compiled kernels (sm_90 TTIR): strides and the (batch x head) program id become i64
# --------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent('''
    import inspect, json, os, sys
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    import torch, triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton._C.libtriton import ir
    from posattn.kernels.attn_bwd import attn_bwd_preprocess_kernel
    from posattn.kernels.attn_fwd import attn_combine_kernel
    from bench.compile_report import _signature, captured_launch

    POINTERS = {"Q": "*fp16", "OUT": "*fp16", "O_PART": "*fp32", "LSE_PART": "*fp32",
                "O": "*fp16", "LSE": "*fp32", "DO": "*fp16", "DELTA": "*fp32", "NLSE2": "*fp32"}

    def ttir_of(src, num_warps=4, num_stages=2):
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
        ctx = ir.context()
        ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        mod = src.make_ir(target, options, backend.get_codegen_implementation(options),
                          backend.get_module_map(), ctx)
        stages = {}
        backend.add_stages(stages, options, src.language)
        return str(stages["ttir"](mod, {}))

    def ttir(fn, constexprs, num_warps=4, num_stages=2):
        """A helper kernel without a launcher capture: pointers by name, the rest i32."""
        signature = {}
        for p in fn.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            else:
                signature[p.name] = POINTERS.get(p.name, "i32")
        return ttir_of(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs={}),
                       num_warps, num_stages)

    def attention(kernel, pe, explicit, causal=True, head_dim=64, split=False, varlen=False):
        """TTIR of one attention kernel exactly as the launcher launches it for sm_90
        (bench.compile_report.captured_launch: its arguments, tile and constexprs), on the
        pointer path (TMA coordinates are int32 by design; the hardware forms the address)."""
        ln, _, _ = captured_launch(kernel, pe, head_dim, causal, explicit, dtype="fp16",
                                   part="split" if split else "both", varlen=varlen, tma=False)
        kw = dict(ln.kwargs)
        nw, ns = kw.pop("num_warps"), kw.pop("num_stages")
        kw.pop("enable_fp_fusion")
        sig, consts, attrs = _signature(ln.fn, kw, "fp16")
        return ttir_of(ASTSource(fn=ln.fn, signature=sig, constexprs=consts, attrs=attrs), nw, ns)

    @triton.jit
    def bad_kernel(Q, OUT, stride_qb, stride_qd, Hq):
        bh = tl.program_id(1)  # int32 batch*head id times an int32 stride: wraps
        x = tl.load(Q + bh * stride_qb + tl.arange(0, 16) * stride_qd)
        tl.store(OUT + bh * 16 + tl.arange(0, 16), x)

    @triton.jit
    def good_kernel(Q, OUT, stride_qb, stride_qd, Hq):
        bh = tl.program_id(1).to(tl.int64)
        x = tl.load(Q + bh * stride_qb + tl.arange(0, 16) * stride_qd)
        tl.store(OUT + bh * 16 + tl.arange(0, 16), x)

    out = {}
    for name in ("fwd", "bwd_dkdv", "bwd_dq"):
        out[name + "/rope_explicit"] = attention(name, "rope", True)
        out[name + "/kerple_power"] = attention(name, "kerple_power", False)
        out[name + "/varlen_alibi"] = attention(name, "alibi", False, varlen=True)
    out["fwd/split_kerple_power"] = attention("fwd", "kerple_power", False, split=True)
    out["fwd_combine"] = ttir(attn_combine_kernel, dict(DV=64, BLOCK_M=16, BLOCK_DV=64))
    out["bwd_preprocess"] = ttir(attn_bwd_preprocess_kernel, dict(DV=64, BLOCK_M=64, BLOCK_DV=64))
    out["control/bad"] = ttir(bad_kernel, {})
    out["control/good"] = ttir(good_kernel, {})
    json.dump(out, open(sys.argv[1], "w"))
''')

_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?(?:\s*,\s*%[\w.$-]+)*\s*=\s*([\w.]+)\s*(.*)$")
_VALUE = re.compile(r"%[\w.$-]+")


def _result_is_i32(rest: str) -> bool:
    """Whether an op's result type (after ' : ', after '->' if any) is i32 or a tensor of i32."""
    rest = rest.split(" loc(")[0]
    if " : " not in rest:
        return False
    ty = rest.rsplit(" : ", 1)[1].split("->")[-1].strip()
    return bool(re.search(r"(^|x|<)i32>?$", ty))


def wide_offset_violations(ttir: str):
    """i32 arithmetic on values that can exceed int32 once multiplied: the batch / head / row
    strides (every ``stride_*`` argument except the head-dim ``stride_*d``) and the batch x head
    program id (axis y). Returns (violations, sources): every use of a source must be an
    ``arith.extsi ... to i64``, and no i32 ``arith.muli`` may take a value derived in i32 from a
    source."""
    sig = re.search(r"tt\.func public @\w+\((.*?)\)\s*attributes", ttir, re.S).group(1)
    sources = {m.group(1) for m in re.finditer(r"(%stride_\w+): i32", sig)
               if not m.group(1).endswith("d")}
    tainted = set(sources)
    violations = []
    for line in ttir.splitlines():
        if line.lstrip().startswith(("#loc", "tt.func", "module", "}")):
            continue
        m = _DEF.match(line)
        if m is None:
            continue
        result, op, rest = m.groups()
        if op == "tt.get_program_id" and rest.startswith("y"):
            tainted.add(result)
            sources.add(result)
            continue
        operands = _VALUE.findall(rest.split(" loc(")[0])
        hit = [o for o in operands if o in tainted]
        if not hit:
            continue
        if op == "arith.extsi" and "to i64" in rest:
            continue
        if op == "arith.muli" and _result_is_i32(rest):
            violations.append(line.strip()[:200])
        if _result_is_i32(rest):
            tainted.add(result)
    return violations, sources


@pytest.fixture(scope="module")
def sm90_ttir(tmp_path_factory):
    try:
        from triton.compiler.compiler import make_backend  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"this triton cannot compile for sm_90 here: {e}")
    d = tmp_path_factory.mktemp("ttir")
    script, result = d / "compile_ttir.py", d / "ttir.json"
    script.write_text(_COMPILE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), str(result)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"TTIR compilation failed:\n{proc.stderr[-4000:]}"
    return json.loads(result.read_text())


def test_offset_checker_flags_int32_stride_products(sm90_ttir):
    """The checker is not vacuous: a program id times a stride in int32 is flagged."""
    bad, sources = wide_offset_violations(sm90_ttir["control/bad"])
    assert "%stride_qb" in sources and bad, "the checker missed an int32 stride product"
    good, _ = wide_offset_violations(sm90_ttir["control/good"])
    assert good == []


def test_split_combine_offsets_are_64_bit(sm90_ttir):
    """The split-K merge (launch.split_count): its three output strides and the batch*head id
    in 64 bits (the partials' rows are formed from the int64 id too)."""
    violations, sources = wide_offset_violations(sm90_ttir["fwd_combine"])
    assert {s for s in sources if s.startswith("%stride_")} == {"%stride_ob", "%stride_oh", "%stride_om"}
    assert violations == []


@pytest.mark.parametrize("name", ["fwd/rope_explicit", "fwd/kerple_power", "fwd/split_kerple_power",
                                  "fwd/varlen_alibi", "bwd_dkdv/rope_explicit",
                                  "bwd_dkdv/kerple_power", "bwd_dkdv/varlen_alibi",
                                  "bwd_dq/rope_explicit", "bwd_dq/kerple_power",
                                  "bwd_dq/varlen_alibi", "bwd_preprocess"])
def test_compiled_offsets_are_64_bit(sm90_ttir, name):
    text = sm90_ttir[name]
    violations, sources = wide_offset_violations(text)
    strides = {s for s in sources if s.startswith("%stride_")}
    assert len(strides) >= 4, f"{name}: expected batch/head/row stride arguments, found {strides}"
    assert any(not s.startswith("%stride_") for s in sources), f"{name}: no program_id(1) found"
    assert violations == [], f"{name}: int32 arithmetic on strides / the batch*head id:\n" + \
        "\n".join(violations)
    # every such stride that the kernel uses is used only through a sign extension to i64
    used = 0
    for s in strides:
        uses = [ln for ln in text.splitlines()
                if re.search(re.escape(s) + r"\b", ln) and not ln.lstrip().startswith(("#loc", "tt.func"))]
        used += bool(uses)  # position strides are dead code with contiguous positions
        bad = [u.strip()[:160] for u in uses if not re.search(r"arith\.extsi " + re.escape(s) + r"\b.* to i64", u)]
        assert not bad, f"{name}: {s} used other than through extsi to i64:\n" + "\n".join(bad)
    assert used >= 4, f"{name}: only {used} of {sorted(strides)} are used"
