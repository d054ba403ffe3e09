"""Static GPU report: compile every shipped kernel config for sm_90 and sm_80 on this (CPU) machine.

    python -m bench.compile_report              # table, both archs
    python -m bench.compile_report --arch 90    # Hopper only
    python -m bench.compile_report --json       # rows as JSON (used by tests/test_compile_static.py)

For each (kernel, PE, head dim, causal) it compiles the kernel with the tile config that
``posattn.kernels.configs.tile_config`` ships for that arch and reports registers per thread,
spills (cuobjdump's STACK / LOCAL), shared memory, and which tensor-core instruction the PTX
uses: ``wgmma.mma_async`` (Hopper's asynchronous MMA) on sm_90, ``mma.sync`` on sm_80.
A config passes when it spills nothing, uses the arch's tensor-core instruction and fits the
arch's shared memory (``SMEM_LIMIT``; the Ampere configs must also fit sm_86/sm_89, which
have 99 KiB per block, because ``tile_config`` gives them the same tiles as sm_80).
Needs no GPU: triton.compile with GPUTarget("cuda", arch, 32) and the cuobjdump that ships
inside triton's nvidia backend.

Must run with TRITON_INTERPRET unset (it compiles real kernels); the test runs it in a
subprocess for that reason.
"""
import argparse
import json
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench.compile_report compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from posattn import pe as pe_registry  # noqa: E402
from posattn.kernels import launch  # noqa: E402
from posattn.kernels.attn_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel  # noqa: E402
from posattn.kernels.attn_fwd import attn_fwd_kernel  # noqa: E402
from posattn.kernels.configs import TileConfig  # noqa: E402

ARCHS = (90, 80)
MMA = {90: "wgmma.mma_async", 80: "mma.sync"}  # the tensor-core instruction each arch must use
SMEM_LIMIT = {90: 227 * 1024, 80: 99 * 1024}  # bytes per block; 80 stands for sm_80/86/89
KERNELS = {"fwd": attn_fwd_kernel, "bwd_dkdv": attn_bwd_dkdv_kernel, "bwd_dq": attn_bwd_dq_kernel}
PES = pe_registry.registered()  # every registered PE (posattn.pe.REGISTRY)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Triton's names of the argument types a launch passes (the signature is derived from the
# launch itself: launch.capture)
TL_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}
# The representative launch: B=2, Hq=8, Hkv=2 (GQA 4), 4096 tokens (a full-length training
# shape: KERPLE's tables and RoPE's tile tables in use), bhsd storage, int32 positions.
SHAPE = dict(B=2, Hq=8, Hkv=2, S=4096)


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def ck_pe_grad(kernel: str, pe: str, pe_grad) -> bool:
    """Whether a compile of ``kernel`` for ``pe`` carries the bias-parameter gradients: only
    dQ, only bias PEs; by default KERPLE (trainable r1, r2) and T5 (a trainable table), not
    ALiBi (fixed slopes)."""
    if pe_grad is None:
        pe_grad = (pe.startswith("kerple") or pe in launch.TABLE_BIASES
                   or pe in launch.PARAM_TABLES)
    return bool(pe_grad) and kernel == "bwd_dq" and pe not in ("none", "rope")


def centred(pe: str, explicit: bool, center=None) -> bool:
    """Whether the compile centres its bias rows (launch.bias_refs): always for a bias PE with
    explicit positions; with contiguous ones only when queries lie outside the key range
    (int offsets), which the shipped rows do not assume unless ``center`` says so. A table
    bias (T5) and Sandwich are bounded: never centred."""
    if center is None:
        center = explicit
    return bool(center) and pe_registry.axes(pe)[1] not in ("none",) + launch.UNCENTRED_BIASES


def captured_launch(kernel: str, pe: str, head_dim: int, causal: bool, explicit: bool = False,
                    cfg=None, arch: int = 90, dtype: str = "bf16", pe_grad=None, part="both",
                    tma=None, center=None, window=None, softcap=None, varlen=False, rope="tile",
                    kvcache=0, decode=0, extend=None, interleaved=False):
    """The launch of ``kernel`` that the launchers make for this case, recorded by
    launch.capture on meta tensors of SHAPE: (launch.Launch, TileConfig, tma). Arguments as in
    compile_kernel; ``rope``: the RoPE strategy (launch.rope_strategy; "once" makes RoPE run
    pe="none"'s attention kernels). Every pointer dtype, constexpr and descriptor comes from
    the launcher."""
    from posattn import _triton  # the spec -> record reduction the API uses

    B, Hq, Hkv, S = SHAPE["B"], SHAPE["Hq"], SHAPE["Hkv"], SHAPE["S"]
    dt, dev = DTYPES[dtype], "meta"
    spec = pe_registry.REGISTRY[pe]()
    if extend is not None:  # RoPE extended by remapped positions (EXTENSIONS)
        spec = pe_registry.RoPE(extend=EXTENSIONS[extend])
    if interleaved:  # GPT-J / torchscale pairs (2j, 2j + 1) instead of the half-split default
        spec = type(spec)(interleaved=True)
    rec = _triton.kernel_pe(spec, head_dim, Hq, dev, None)
    if rec.params is not None and rec.params.device.type != dev:  # a spec's own tensor (T5's table)
        rec = dataclasses.replace(rec, params=rec.params.to(dev))
    if varlen:  # (1, H, total, D) views of (total, H, D), as attention_varlen passes them
        q, k, v, do = (torch.empty(B * S, h, head_dim, device=dev, dtype=dt).unsqueeze(0)
                       .transpose(1, 2) for h in (Hq, Hkv, Hkv, Hq))
        cu = torch.empty(B + 1, device=dev, dtype=torch.int32)
        pos = launch.KernelPositions(cu_q=cu, cu_k=cu, lens_q=(S,) * B, lens_k=(S,) * B)
        if explicit:
            p = torch.empty(1, B * S, device=dev, dtype=torch.int32)
            pos = launch.KernelPositions(qpos=p, kpos=p, cu_q=cu, cu_k=cu, lens_q=(S,) * B,
                                         lens_k=(S,) * B)
    else:
        q, k, v, do = (torch.empty(B, h, S, head_dim, device=dev, dtype=dt)
                       for h in (Hq, Hkv, Hkv, Hq))
        if explicit:
            p = torch.empty(1, S, device=dev, dtype=torch.int32)
            pos = launch.KernelPositions(qpos=p, kpos=p)
        elif centred(pe, explicit, center):  # queries past the keys (an int offset)
            pos = launch.KernelPositions(q_start=S + 64, k_start=0)
        elif kvcache:  # attention_with_kvcache over paged K / V: flat pages, batch stride 0
            k, v = (torch.empty(1, Hkv, B * S, head_dim, device=dev, dtype=dt).expand(B, Hkv, B * S, head_dim)
                    for _ in range(2))
            if decode:  # a decode step of ``decode`` tokens (GQA-packed: launch.pack_gqa)
                q = torch.empty(B, decode, Hq, head_dim, device=dev, dtype=dt).transpose(1, 2)
            bt = torch.empty(B, S // kvcache, device=dev, dtype=torch.int32)
            pos = launch.KernelPositions(q_start=B * S - S, k_lens=torch.empty(B, device=dev, dtype=torch.int32),
                                         block_table=bt, page=kvcache)
        else:
            pos = launch.KernelPositions()
    left, right = window if window is not None else (None, None)
    mask = launch.Mask(causal=causal, left=left, right=right, softcap=float(softcap or 0.0))
    scale = head_dim ** -0.5
    saved = (os.environ.get("POSATTN_TMA"), launch.FORCE_SPLITS, launch.tile_config)
    try:
        if tma is False:
            os.environ["POSATTN_TMA"] = "0"
        if part == "split":
            launch.FORCE_SPLITS = 2
        if cfg is not None:  # a candidate tile (bench.tune): for this kernel only
            real = launch.tile_config
            launch.tile_config = lambda name, *a, **kw: cfg if name == kernel else real(name, *a, **kw)
        with launch.capture(arch, rope=rope) as launches:
            if kernel == "fwd":
                launch.attn_fwd(q, k, v, rec, pos, mask, scale)
            else:
                lse = torch.empty(q.shape[:3], device=dev, dtype=torch.float32)
                launch.attn_bwd(do, q, k, v, torch.empty_like(do), lse, rec, pos, mask, scale,
                                ck_pe_grad(kernel, pe, pe_grad))
    finally:
        if saved[0] is None:
            os.environ.pop("POSATTN_TMA", None)
        else:
            os.environ["POSATTN_TMA"] = saved[0]
        launch.FORCE_SPLITS, launch.tile_config = saved[1], saved[2]
    mine = [ln for ln in launches if ln.fn is KERNELS[kernel]]
    if not mine:
        raise ValueError(f"the launchers made no {kernel} launch for {pe} D={head_dim}")
    want = {}
    if kernel == "bwd_dkdv" and len(mine) == 2:  # a split tile: one launch per part
        want = {"dv": dict(DO_DK=False), "dk": dict(DO_DV=False)}.get(part, {})
    if kernel == "fwd":
        want = dict(SPLIT=part == "split")
    pick = [ln for ln in mine if all(ln.kwargs.get(n) == val for n, val in want.items())]
    if not pick:
        raise ValueError(f"no {kernel} launch with part {part!r} for {pe} D={head_dim}")
    kw = pick[0].kwargs
    tile = TileConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"],
                      split=kernel == "bwd_dkdv" and len(mine) == 2)
    return pick[0], tile, bool(kw.get("TMA", False))


def shipped_tile(kernel: str, pe: str, head_dim: int, causal: bool, arch: int,
                 dtype: str = "bf16", pe_grad=None, explicit: bool = False, tma=None,
                 center=None, **opts):
    """The TileConfig the launchers ship for this compile (as in compile_kernel)."""
    return captured_launch(kernel, pe, head_dim, causal, explicit, None, arch, dtype, pe_grad,
                           "both", tma, center, **opts)[1]


def launches(kernel: str, cfg) -> tuple:
    """The ``part`` of each launch a config makes: a split dK/dV tile is two ("dv", "dk")."""
    return ("dv", "dk") if kernel == "bwd_dkdv" and cfg.split else ("both",)


def variants(kernel: str, pe: str, cfg, explicit: bool, varlen: bool = False) -> tuple:
    """The parts report() compiles for a config: its launches, and for the forward also its
    split-K variant where the launcher may split it (launch.split_allowed)."""
    rec = launch.KernelPE(*_axes_kwargs(pe))
    pos = launch.KernelPositions(qpos=torch.empty(0) if explicit else None,
                                 cu_q=torch.empty(0) if varlen else None)
    split = kernel == "fwd" and launch.split_allowed(rec, pos)
    return launches(kernel, cfg) + (("split",) if split else ())


def _axes_kwargs(pe: str) -> tuple:
    rot, bias, family = pe_registry.axes(pe)
    return rot, None, 1.0, 0, False, bias, None, family


def uses_tma(kernel: str, pe: str, arch: int, dtype: str = "bf16", explicit: bool = False,
             varlen: bool = False) -> bool:
    """Whether the launcher loads the loop tiles through TMA here (launch.tma_planned),
    for 16-byte-aligned inputs as every benchmark makes them."""
    rec = launch.KernelPE(*_axes_kwargs(pe))
    return kernel == "fwd" and launch.tma_planned(arch, rec, DTYPES[dtype], explicit, varlen)


def _signature(fn, kw: dict, dtype: str):
    """(signature, constexprs, attrs) of a recorded launch, for ASTSource: constexpr
    parameters and None arguments are constexprs; tensors are pointers of their dtype
    (16-byte aligned); TMA descriptors tensordesc; ints i32 (i64 past 2**31), strides of 1
    specialised to the constant 1 (as the JIT does) and the others marked divisible by 16
    when they are; floats fp32."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name, val = p.name, kw[p.name]
        if p.is_constexpr or val is None:
            signature[name] = "constexpr"
            constexprs[name] = val
        elif isinstance(val, torch.Tensor):
            signature[name] = "*" + TL_TYPES[val.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, TensorDescriptor):
            block = ", ".join(str(b) for b in val.block_shape)
            signature[name] = f"tensordesc<{TL_TYPES[val.base.dtype]}[{block}]>"
        elif isinstance(val, bool):
            signature[name] = "i1"
        elif isinstance(val, int):
            if name.startswith("stride_") and val == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -2 ** 31 <= val < 2 ** 31 else "i64"
                if name.startswith("stride_") and val % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no signature type for {name}={val!r}")
    return signature, constexprs, attrs


def compile_kernel(kernel: str, pe: str, head_dim: int, causal: bool, explicit: bool = False,
                   cfg=None, arch: int = 90, dtype: str = "bf16", pe_grad=None, part="both",
                   tma=None, center=None, window=None, softcap=None, varlen=False, rope="tile",
                   kvcache=0, decode=0, extend=None, interleaved=False):
    """triton.compile one shipped config (or ``cfg``, a TileConfig to try) for ``arch``,
    exactly as the launcher would launch it (captured_launch).

    pe: a registered PE name (posattn.pe.REGISTRY). explicit: explicit position tensors (RoPE
    then evaluates cos/sin per element, not per tile). dtype: the input dtype, a key of
    DTYPES. pe_grad: compile the dQ kernel with the bias parameters' gradients (default:
    KERPLE yes, ALiBi no, as most use them). part: for dK/dV, "both" or one launch of a split
    tile, "dv" or "dk" (configs.TileConfig.split); for the forward, "split" is its split-K
    variant (launch.split_count: decode steps). tma: False compiles the pointer path that
    unaligned inputs take (default: where the launcher would use TMA). center: centre the
    bias rows (see centred; default: with explicit positions). window, softcap: as
    posattn.attention; varlen: packed sequences; kvcache: a page size, the forward of
    attention_with_kvcache over a paged cache (its split-K variant too: variants).
    Returns (compiled kernel, TileConfig, seconds).
    """
    ln, tile, _ = captured_launch(kernel, pe, head_dim, causal, explicit, cfg, arch, dtype,
                                  pe_grad, part, tma, center, window, softcap, varlen, rope,
                                  kvcache, decode, extend, interleaved)
    kw = dict(ln.kwargs)
    options = {"num_warps": kw.pop("num_warps"), "num_stages": kw.pop("num_stages"),
               "enable_fp_fusion": kw.pop("enable_fp_fusion")}  # launch options, not arguments
    signature, constexprs, attrs = _signature(ln.fn, kw, dtype)
    src = ASTSource(fn=ln.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return ck, tile, time.time() - t0


def resource_usage(ck):
    """cuobjdump's resource usage of a compiled kernel, as a lookup: field("REG"), "STACK",
    "LOCAL" -> int (None where absent)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout

    def field(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else None
    return field


def compile_one(kernel: str, pe: str, head_dim: int, causal: bool, explicit: bool = False,
                cfg=None, arch: int = 90, dtype: str = "bf16", pe_grad=None, part="both",
                tma=None, center=None, window=None, softcap=None, varlen=False, kvcache=0,
                decode=0, extend=None, interleaved=False):
    """Compile one config (see compile_kernel) and return its report row."""
    if tma is None:  # (a paged cache is read through pointers: launch.tma_ready)
        tma = uses_tma(kernel, pe, arch, dtype, explicit, varlen) and not kvcache
    ck, cfg, seconds = compile_kernel(kernel, pe, head_dim, causal, explicit, cfg, arch, dtype,
                                      pe_grad, part, tma, center, window, softcap, varlen,
                                      kvcache=kvcache, decode=decode, extend=extend,
                                      interleaved=interleaved)
    pe_grad = ck_pe_grad(kernel, pe, pe_grad)
    ptx = ck.asm["ptx"]
    field = resource_usage(ck)
    row = dict(arch=arch, dtype=dtype, kernel=kernel, pe=pe, head_dim=head_dim, causal=causal,
               explicit=explicit, pe_grad=pe_grad, part=part, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages, registers=field("REG"),
               stack=field("STACK"), local=field("LOCAL"), shared=ck.metadata.shared,
               mma=MMA[arch] in ptx, compile_s=round(seconds, 1), triton=triton.__version__,
               mma_util=None, tma=tma, center=centred(pe, explicit, center),
               window=list(window) if window is not None else None, softcap=softcap,
               varlen=varlen, kvcache=kvcache, decode=decode, extend=extend,
               interleaved=interleaved)
    if dtype != "fp32":  # useful / issued tensor-core FLOPs in the hot loop (bench.sass_loop)
        from bench.sass_loop import mma_utilisation
        row["mma_util"] = mma_utilisation(ck, kernel, cfg, head_dim, part)
    # fp32 inputs take IEEE fp32 dots (launch._prec): CUDA-core FMAs, no tensor-core instruction
    row["ok"] = ((row["mma"] or dtype == "fp32") and row["stack"] == 0 and row["local"] == 0
                 and row["shared"] <= SMEM_LIMIT[arch])
    return row


# Rows for the geometry options (window, softcap, packed sequences): every PE with each
# option at least once, and each option with causal and non-causal masks (pairwise, not the
# product): (pe, causal, explicit, options).
GEOMETRY_ROWS = (
    ("none", True, False, dict(window=(1023, 0))),  # Mistral: causal sliding window
    ("rope", True, False, dict(window=(1023, 0), softcap=50.0)),  # Gemma 2's local layers
    ("alibi", False, False, dict(window=(256, 256), softcap=30.0)),  # both sides bounded
    ("kerple_log", True, False, dict(varlen=True)),
    ("kerple_power", False, False, dict(varlen=True, window=(512, None))),
    ("rope", True, False, dict(varlen=True)),
    ("none", False, True, dict(varlen=True, softcap=30.0)),  # packed, explicit positions
    ("t5", False, True, {}),  # T5 encoder: explicit positions (int64-wide clamp)
    ("t5", False, False, dict(window=(256, 256), varlen=True)),
    ("sandwich", False, True, dict(window=(256, 256))),  # explicit: int64 clamped table index
    ("xpos", True, True, {}),  # explicit: per-element decays, the block's reference and span
    ("xpos", True, False, dict(varlen=True)),  # dK/dV: the sequence's own tile starts
    ("fire", True, True, dict(window=(1023, 0))),  # explicit: int64 distances, a window
    ("fire", True, False, dict(varlen=True, softcap=30.0)),
    # interleaved pairs (GPT-J, torchscale): loaded contiguously and split in registers
    ("rope", True, False, dict(interleaved=True)),
    ("xpos", True, True, dict(interleaved=True)),
)
# RoPE extended by remapped positions (posattn.RoPEExtension): the forward only, causal, one
# row per method shape (ReRoPE: an unrotated far key; leaky: a second frequency set;
# Self-Extend: grouped positions; DCA: three passes by chunk index), contiguous and explicit
# positions, a KV cache decode step (its K rotated in the tile), a window.
EXTENSIONS = {"rerope": pe_registry.ReRoPE(512), "leaky": pe_registry.LeakyReRoPE(512, 16),
              "selfextend": pe_registry.SelfExtend(8, 1024),
              "dca": pe_registry.DualChunk.for_trained_length(4096)}
REMAP_ROWS = (
    ("rope", True, False, dict(extend="rerope")),
    ("rope", True, True, dict(extend="leaky")),
    ("rope", True, False, dict(extend="selfextend", kvcache=16, decode=1)),
    ("rope", True, False, dict(extend="selfextend", window=(4095, 0))),
    ("rope", True, False, dict(extend="dca")),
    ("rope", True, True, dict(extend="dca")),
    ("rope", True, False, dict(extend="dca", kvcache=16, decode=1)),
)
# The forward of attention_with_kvcache over a paged cache (16-token pages: a 64- or 128-key
# tile reads rows of 4-8 pages), every PE, causal (what a decode or prefill step runs)
# plus its decode step (one token; the GQA group packed into the rows: launch.pack_gqa)
KVCACHE_ROWS = tuple((pe, True, False, dict(kvcache=16, decode=d)) for pe in PES for d in (0, 1))


def shipped_configs(quick: bool = False, head_dims=(64, 128)):
    """(kernel, pe, head_dim, causal, explicit, pe_grad, center, options) to check: every PE
    causal with contiguous positions, plus non-causal without PE, and no PE, RoPE and
    KERPLE-power with explicit positions (the causal mask from position tensors; per-element
    cos/sin; int64 position differences; centred bias rows); ALiBi and KERPLE-power with
    contiguous positions and centred rows (int offsets that put queries past the keys:
    launch.bias_refs); the dQ kernel also with the other gradient setting of each bias PE
    (trainable ALiBi, fixed KERPLE), which tile_config gives its own tile; and GEOMETRY_ROWS
    (window, softcap, varlen). quick: none / rope / kerple_power (the heaviest bias) only,
    no geometry rows."""
    pes = ("none", "rope", "kerple_power") if quick else PES
    for kernel in KERNELS:
        for head_dim in head_dims:
            for pe in pes:
                yield kernel, pe, head_dim, True, False, None, None, {}
            yield kernel, "none", head_dim, False, False, None, None, {}
            yield kernel, "none", head_dim, True, True, None, None, {}
            yield kernel, "rope", head_dim, True, True, None, None, {}
            yield kernel, "kerple_power", head_dim, True, True, None, None, {}
            if not quick:
                yield kernel, "alibi", head_dim, True, False, None, True, {}
                yield kernel, "kerple_power", head_dim, True, False, None, True, {}
            if kernel == "bwd_dq" and not quick:
                yield kernel, "alibi", head_dim, True, False, True, None, {}
                yield kernel, "alibi", head_dim, True, True, True, None, {}
                yield kernel, "kerple_log", head_dim, True, False, False, None, {}
            if not quick:
                for pe, causal, explicit, opts in GEOMETRY_ROWS:
                    yield kernel, pe, head_dim, causal, explicit, None, None, opts
                if kernel == "fwd":
                    for pe, causal, explicit, opts in KVCACHE_ROWS + REMAP_ROWS:
                        yield kernel, pe, head_dim, causal, explicit, None, None, opts


def report(arch: int, quick: bool = False, head_dims=(64, 128), dtype: str = "bf16", echo=None,
           half=None, pes=None):
    """Compile every shipped config for ``arch``; returns the rows. echo: called with each row.
    half (0 or 1): every other config of each head dim, the D=64 and D=128 halves offset by one
    -- CI compiles sm_90 with half 0 and sm_80 with half 1, so every config is compiled at
    each head dim for one arch, and each arch sees every config at one head dim (a pairwise
    cover of config x head dim x arch; tests/test_compile_static.py)."""
    rows = []
    seen = {}
    for kernel, pe, hd, causal, explicit, pe_grad, center, opts in shipped_configs(quick, head_dims):
        if pes is not None and pe not in pes:  # (--pe: one PE's rows; half counts those only)
            continue
        i = seen[hd] = seen.get(hd, -1) + 1
        if half is not None and (i + head_dims.index(hd) + half) % 2:
            continue
        # where the forward's key tiles go through TMA, unaligned inputs take the pointer path
        # (launch.tma_ready), with the tile shipped for it: both are checked
        tmas = (True, False) if uses_tma(kernel, pe, arch, dtype, explicit,
                                         opts.get("varlen", False)) and not opts.get("kvcache") else (False,)
        for tma in tmas:
            cfg = shipped_tile(kernel, pe, hd, causal, arch, dtype, pe_grad, explicit, tma,
                               center, **opts)
            for part in variants(kernel, pe, cfg, explicit, opts.get("varlen", False)):
                rows.append(compile_one(kernel, pe, hd, causal, explicit, cfg, arch, dtype,
                                        pe_grad, part, tma, center, **opts))
                if echo:
                    echo(rows[-1])
    return rows


# The RoPE rotate-once pass (launch.rope_apply; kernels/launch.py, "RoPE strategies"): rotary
# dims (full / partial with pass-through columns / interleaved partial), positions, direction.
ROPE_PASS_ROWS = tuple((hd, rot, explicit, inverse) for hd in (64, 128)
                       for rot, explicit, inverse in (("full", False, False), ("partial", True, False),
                                                      ("interleaved", False, True), ("full", True, True)))


def compile_rope_pass(head_dim: int, rot: str, explicit: bool, inverse: bool, arch: int = 90,
                      dtype: str = "bf16") -> dict:
    """Compile the rotation pass as launch.rope_apply launches it (captured on meta tensors,
    B=2, Hq=8, S=4096) for ``arch``; returns a row: registers, stack, local, ok (no spills)."""
    dt, dev = DTYPES[dtype], "meta"
    rd = head_dim if rot == "full" else head_dim // 2
    theta = torch.empty(rd // 2, device=dev, dtype=torch.float64)
    rec = launch.KernelPE(rot="rope", theta=theta, rot_dim=rd, interleaved=rot == "interleaved")
    x = torch.empty(SHAPE["B"], SHAPE["Hq"], SHAPE["S"], head_dim, device=dev,
                    dtype=torch.float32 if inverse else dt)  # the backward rotates fp32 dQ back
    out = torch.empty_like(x, dtype=dt)
    pos = torch.empty(1, SHAPE["S"], device=dev, dtype=torch.int64) if explicit else None
    with launch.capture(arch) as launches:
        launch.rope_apply(x, rec, 0, pos, inverse=inverse, out=out)
    (ln,) = launches
    kw = dict(zip([p.name for p in ln.fn.params], ln.args), **ln.kwargs)
    options = {"num_warps": kw.pop("num_warps"), "num_stages": 2, "enable_fp_fusion": kw.pop("enable_fp_fusion")}
    signature, constexprs, attrs = _signature(ln.fn, kw, dtype)
    ck = triton.compile(ASTSource(fn=ln.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                        target=GPUTarget("cuda", arch, 32), options=options)
    field = resource_usage(ck)
    row = dict(arch=arch, kernel="rope_pass", head_dim=head_dim, rot=rot, explicit=explicit,
               inverse=inverse, registers=field("REG"), stack=field("STACK"), local=field("LOCAL"),
               triton=triton.__version__)
    row["ok"] = row["stack"] == 0 and row["local"] == 0
    return row


def _print_row(r):
    util = "" if r.get("mma_util") is None else f"useful mma {100 * r['mma_util']:.0f}%  "
    pe = r["pe"] + ("+grad" if r.get("pe_grad") and r["pe"] == "alibi" else
                    "-grad" if r["pe"].startswith("kerple") and not r.get("pe_grad")
                    and r["kernel"] == "bwd_dq" else "")
    if r.get("extend"):
        pe += f"+{r['extend']}"
    if r.get("interleaved"):
        pe += " interleaved"
    if r.get("center") and not r["explicit"]:
        pe += " centred"
    if r.get("window") is not None:
        pe += " win" + ",".join("-" if x is None else str(x) for x in r["window"])
    if r.get("softcap"):
        pe += f" cap{r['softcap']:g}"
    if r.get("kvcache"):
        pe += f" kvcache/page{r['kvcache']}" + (f" decode{r['decode']}" if r.get("decode") else "")
    elif r.get("varlen"):
        pe += " varlen"
    if r.get("part", "both") != "both":
        pe += f" [{r['part']}-K]" if r["part"] == "split" else f" [{r['part']}]"
    print(f"sm_{r['arch']} {r['kernel']:9s} {pe:28s} D={r['head_dim']:<4d} "
          f"causal={int(r['causal'])} pos={'explicit' if r['explicit'] else 'contig  '} "
          f"tile {r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']}"
          f"{' tma' if r.get('tma') else ''}  "
          f"regs {r['registers']:>3} stack {r['stack']} local {r['local']} smem {r['shared']:>6} "
          f"{'fp32 FMA dots' if r['dtype'] == 'fp32' else MMA[r['arch']].split('.')[0]} "
          f"{'' if r['dtype'] == 'fp32' else 'yes' if r['mma'] else 'NO'}  "
          f"{util}{'ok' if r['ok'] else 'FAIL'}  ({r['compile_s']}s)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--quick", action="store_true", help="none/rope/kerple_power only")
    ap.add_argument("--arch", type=int, choices=ARCHS, action="append",
                    help="compile for this arch only (repeatable; default: all of %(choices)s)")
    ap.add_argument("--head-dim", type=int, action="append", dest="head_dims",
                    help="head dims to check (repeatable; default 64 and 128)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--half", type=int, choices=(0, 1), default=None,
                    help="every other config (see report): CI's pairwise cover")
    ap.add_argument("--pe", action="append", dest="pes",
                    help="only this registered PE's rows (repeatable; default: every PE)")
    ap.add_argument("--rope-pass", action="store_true",
                    help="compile the RoPE rotate-once pass instead (ROPE_PASS_ROWS)")
    args = ap.parse_args(argv)
    if args.rope_pass:
        rows = [compile_rope_pass(*r, arch=arch, dtype=args.dtype) for arch in args.arch or ARCHS
                for r in ROPE_PASS_ROWS]
        print(json.dumps(rows) if args.json else "\n".join(map(str, rows)))
        return 0 if all(r["ok"] for r in rows) else 1
    rows = []
    for arch in args.arch or ARCHS:
        if not args.json:
            print(f"sm_{arch} compile report, triton {triton.__version__}, {args.dtype}, "
                  f"shared memory limit {SMEM_LIMIT[arch] // 1024} KiB", flush=True)
        rows += report(arch, args.quick, tuple(args.head_dims or (64, 128)), args.dtype,
                       None if args.json else _print_row, args.half, args.pes)
    if args.json:
        print(json.dumps(rows))
    bad = [r for r in rows if not r["ok"]]
    if bad and not args.json:
        print(f"{len(bad)} of {len(rows)} configs FAIL (spill, no tensor-core MMA, or too much "
              "shared memory)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
