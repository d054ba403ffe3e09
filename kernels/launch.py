"""Launchers: grids, strides, tile configs. No policy (validation lives in posattn.api).

All tensors are (B, H, S, D) *views* with arbitrary strides (bhsd and bshd storage both work);
the last dim should have stride 1 for speed (the caller makes sure).
"""
import contextlib
import functools
import os
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .._env import cuda_arch
from .attn_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from .attn_fwd import attn_combine_kernel, attn_fwd_kernel
from .configs import HOPPER_CLASS, TileConfig, remap_tile, tile_config, xpos_tile
from . import bias as bias_axis
from . import rotary as rotary_axis
from .bias import bias_ref_kernel, bias_table_kernel
from .rotary import TILE_STEP, rope_apply_kernel, rope_tile_table_kernel

# The kernels' ROT and BIAS constexpr values by name: numbered once, beside their hooks
# (rotary.KINDS, bias.KINDS); posattn.pe's spec classes name their axes with these keys.
ROT_CODES = {name: code.value for name, code in rotary_axis.KINDS.items()}
BIAS_CODES = {name: code.value for name, code in bias_axis.KINDS.items()}


@dataclass
class KernelPE:
    """What the kernels need of a PE: one record per call, built from a spec (posattn.pe).

    rot: rotary axis ("none" | "rope"); theta (rot_dim // 2,) float64 inv_freq on the device,
    factor (the attention factor, multiplies cos and sin), rot_dim, interleaved. xpos: xPos's
    decay (kernels' XPOS; rotary.py): theta then holds log2(zeta_j) / gamma after the
    frequencies, (rot_dim,).
    bias: bias axis ("none" | "alibi" | "kerple_log" | "kerple_power" | "t5"); params (Hq, P),
    any float dtype: the one parameter channel (ALiBi: the slope; KERPLE: r1, r2; a table
    bias: its table, columns padded with zeros to a power of two here, through autograd).
    buckets: a table bias's column per relative position k - q in [-R, R], int64 (2R + 1,)
    (posattn.pe.PE.bias_buckets), else None.
    family: the tile-config family (configs.FAMILIES).
    remap: a RoPE extension (a posattn.pe.RoPEExtension, used by its interface only: window,
    unit, n_far, key_map(), far_positions(), piece_mask()) and theta_far, the far passes'
    inv_freq (float64 on the device); None otherwise.
    """

    rot: str = "none"
    theta: Optional[torch.Tensor] = None
    factor: float = 1.0
    rot_dim: int = 0
    interleaved: bool = False
    bias: str = "none"
    params: Optional[torch.Tensor] = None
    family: str = "none"
    buckets: Optional[torch.Tensor] = None
    remap: Optional[object] = None
    xpos: bool = False
    xpos_rate: float = 0.0  # xPos: -log2(zeta_0) / gamma, its fastest decay per position
    theta_far: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.rot not in ROT_CODES:
            raise ValueError(f"unknown rotary kind {self.rot!r}; known: {sorted(ROT_CODES)}")
        if self.bias not in BIAS_CODES:
            raise ValueError(f"unknown bias kind {self.bias!r}; known: {sorted(BIAS_CODES)}")
        # The kernels read head h's parameters at ``PARAMS + h * P`` (no stride argument): a
        # strided, offset or expanded view (BLOOM's slopes are ``alibi[:, 0, 1]``, stride 2)
        # must never reach them as is. .contiguous() is a no-op on a dense tensor and goes
        # through autograd otherwise, so the gradient flows back into the caller's view.
        for name in ("theta", "params"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.contiguous())
        # (a record without params only names its axes: tile and TMA decisions)
        if self.params is not None and (self.buckets is None) != (self.bias not in TABLE_BIASES):
            raise ValueError(f"bias {self.bias!r}: buckets must be given exactly for a table bias "
                             f"({TABLE_BIASES})")
        if self.params is not None and self.buckets is not None:
            # the dQ kernel's gradient accumulator is a (rows, P) tile: P a power of two
            width = self.params.shape[1]
            self.params = torch.nn.functional.pad(self.params, (0, triton.next_power_of_2(width) - width))

    @property
    def rope(self) -> bool:
        return self.rot == "rope"

    @property
    def n_params(self) -> int:
        return 0 if self.params is None else self.params.shape[1]

    def codes(self) -> dict:
        """The PE constexprs of every attention kernel: ROT, BIAS, NP."""
        return dict(ROT=ROT_CODES[self.rot], BIAS=BIAS_CODES[self.bias], NP=max(self.n_params, 1),
                    XPOS=self.xpos)


@dataclass(frozen=True)
class Mask:
    """Visibility and logit options of a launch: causal, a window side (int >= 0) or None
    (unbounded), and the logit softcap c (0.0: off). See geometry.visible."""

    causal: bool = False
    left: Optional[int] = None
    right: Optional[int] = None
    softcap: float = 0.0

    def args(self, explicit: bool) -> dict:
        """Kernel arguments: window sides clamped to what the position arithmetic holds (a
        larger side is unbounded anyway: contiguous |position| < 2**30). An unbounded side
        is passed as None (a constexpr): an argument the kernel does not use still costs
        registers on triton 3.6 (8 B of spills in the sm_90 D=128 ALiBi dQ tile)."""
        limit = 2 ** 62 if explicit else 2 ** 31 - 1
        return dict(win_left=None if self.left is None else min(self.left, limit),
                    win_right=None if self.right is None else min(self.right, limit),
                    WIN_L=self.left is not None, WIN_R=self.right is not None,
                    SOFTCAP=self.softcap > 0, CAUSAL=self.causal)

    def cap_args(self, scale: float) -> dict:
        """cap_in = scale / c, cap_log2 = c log2(e) (fmath.softcap_logits); None without one."""
        c = self.softcap
        if c <= 0:
            return dict(cap_in=None, cap_log2=None)
        return dict(cap_in=scale / c, cap_log2=c * 1.4426950408889634)


@dataclass
class KernelPositions:
    """Which tokens form a sequence, and their positions.

    Dense: contiguous (q_start, k_start) or explicit integer tensors qpos (B|1, Sq), kpos
    (B|1, Sk). Varlen (packed sequences): cu_q, cu_k (B + 1,) int32 sequence offsets on the
    device, their lengths lens_q / lens_k on the host (the API validated them), max_q / max_k;
    positions restart per sequence (geometry.seq_geometry), or explicit (1, total) tensors.
    """

    q_start: int = 0
    k_start: int = 0
    qpos: Optional[torch.Tensor] = None
    kpos: Optional[torch.Tensor] = None
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    lens_q: tuple = ()
    lens_k: tuple = ()
    # A KV cache (forward only; posattn.kvcache), dense queries: sequence b's keys are the
    # first k_lens[b] (device int32) rows of its cache -- or, paged, rows block_table[b, n //
    # page] * page + n % page of the flat pages -- and its queries continue them (q_start
    # then only describes the host's view: end-aligned to the capacity, so nothing is centred).
    k_lens: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    page: int = 0
    k_bound: int = 0  # a KV cache: the largest key count any sequence may have (tables, tiles)

    @property
    def explicit(self) -> bool:
        return self.qpos is not None

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None

    @property
    def max_q(self) -> int:
        return max(self.lens_q, default=0)

    @property
    def max_k(self) -> int:
        return max(self.lens_k, default=0)

    @property
    def n_seqs(self) -> int:
        return len(self.lens_q)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def _arch(t: torch.Tensor) -> Optional[int]:
    """Compute capability of t's GPU (sm_90 -> 90), or None on CPU (the interpreter); under
    ``capture``, the arch it was given."""
    if _capture is not None:
        return _capture.arch
    return cuda_arch(t.device) if t.device.type == "cuda" else None


@dataclass
class Launch:
    """One kernel launch as ``capture`` records it: the @triton.jit function, its grid and
    arguments (the attention kernels are launched by keyword), and the compile options."""

    fn: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class _Capture:
    arch: Optional[int]
    launches: list
    rope: str = "tile"


_capture: Optional[_Capture] = None


@contextlib.contextmanager
def capture(arch: Optional[int], rope: str = "tile"):
    """Within the block, the launchers record every kernel launch (``Launch``) in the yielded
    list instead of running it, and plan their tiles for ``arch``. Call them with tensors on
    the ``meta`` device: nothing is computed, nothing is allocated. bench.compile_report
    compiles exactly what a launch passes -- its pointer dtypes, constexprs, descriptors --
    so the static report cannot drift from the launchers. ``rope``: the RoPE strategy the
    launchers take meanwhile (rope_strategy; "tile" by default, so that the static tools see
    the in-tile RoPE kernels whatever the shape)."""
    global _capture
    saved = _capture
    _capture = _Capture(arch, [], rope)
    try:
        yield _capture.launches
    finally:
        _capture = saved


# FP contraction (FMA fusion) on, explicitly: the tiles and instruction counts were tuned with
# it, and triton 3.10 turns the default off (triton 3.9 warns: TRITON_DEFAULT_FP_FUSION).
# The kernels already write their hot FMAs as tl.fma; this keeps the rest as tuned.
FP_FUSION = True


def _run(fn, grid, *args, **kwargs):
    """Launch ``fn`` on ``grid`` (or record it under ``capture``), with FP_FUSION."""
    kwargs.setdefault("enable_fp_fusion", FP_FUSION)
    if _capture is not None:
        _capture.launches.append(Launch(fn, tuple(grid), args, kwargs))
        return
    fn[grid](*args, **kwargs)


def _layout_meta(pe: KernelPE, D: int, DV: int):
    """Head-dim constexprs: dot groups A (+B, +C pass-through for RoPE) and the V width.

    Returns (meta dict of constexprs, padded width that drives register use)."""
    if pe.rope:
        half = pe.rot_dim // 2
        rest = D - pe.rot_dim
        meta = dict(ROT_HALF=half, ROT_DIM=pe.rot_dim, BLOCK_A=_pow2(half),
                    BLOCK_C=_pow2(rest), HAS_PASS=rest > 0, INTERLEAVED=pe.interleaved)
        width = 2 * meta["BLOCK_A"] + (meta["BLOCK_C"] if rest else 0)
    else:
        meta = dict(ROT_HALF=0, ROT_DIM=D, BLOCK_A=_pow2(D), BLOCK_C=16, HAS_PASS=False,
                    INTERLEAVED=False)
        width = meta["BLOCK_A"]
    meta.update(D=D, DV=DV, BLOCK_DV=_pow2(DV))
    return meta, max(width, meta["BLOCK_DV"])


# TMA (the Hopper tensor memory accelerator) for the forward's K and V tiles: one bulk copy
# per tile into shared memory instead of per-thread addresses and cp.async. On sm_90 (triton
# 3.6, D=128, 128 x 128) that takes 79 of the 573 instructions per warp out of each tile
# iteration (286 -> 246 per 1k scores, bench.sass_loop) and frees the registers that held the
# addresses (255 -> 236 a thread without a PE; ALiBi at 128 x 64: 234 -> 173), which is what
# lets ALiBi and KERPLE run 128-key tiles (configs.tile_config).
# Not for RoPE, whose K tiles pass through registers to be rotated anyway: no fewer
# instructions, and the extra staging spills on triton 3.9. Not in the backward: its loop
# tiles (32-row Q / dO in dK/dV) cost few address instructions (306 -> 304), and the
# descriptors' staging made some dK/dV tiles spill. The Hopper-class archs, whose tile table
# is checked with it (configs.HOPPER_CLASS); the interpreter runs it too (so CPU tests cover
# the code Hopper runs); POSATTN_TMA=0 switches it off (the pointer path, which Ampere, RoPE
# and unaligned inputs run).


def tma_enabled(arch: Optional[int]) -> bool:
    """Whether the forward may load K / V through TMA on ``arch`` (None: interpreter)."""
    if os.environ.get("POSATTN_TMA", "1") in ("", "0"):
        return False
    return arch is None or arch in HOPPER_CLASS


def tma_applies(pe: KernelPE) -> bool:
    """Whether the PE lets the forward load K through TMA: K is one dot group (no RoPE)."""
    return not pe.rope


def _tma_strides(t: torch.Tensor) -> Optional[list]:
    """Strides a TMA descriptor of the (B, H, S, D) view ``t`` can take, or None where TMA
    cannot address it: the head dim not contiguous, the base or a stride not a multiple of
    16 bytes, or a broadcast (stride 0) dim."""
    unit = 16 // t.element_size()  # elements per 16 bytes
    if t.stride(3) != 1 or t.data_ptr() % 16 or t.numel() == 0:
        return None
    strides = list(t.stride())
    for i in (2, 1, 0):
        if t.shape[i] == 1:  # never stepped over: any valid stride will do
            strides[i] = triton.cdiv(max(strides[i + 1] * t.shape[i + 1], 1), unit) * unit
        elif strides[i] <= 0 or strides[i] % unit:
            return None
    return strides


def _tma_descriptor(t: torch.Tensor, rows: int, cols: int):
    """TMA descriptor of a (B, H, S, D) view, blocks (1, 1, rows, cols), or None (_tma_strides).
    Columns past D and rows past S read 0."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    strides = _tma_strides(t)
    if strides is None:
        return None
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, rows, cols])


def tma_planned(arch: Optional[int], pe: KernelPE, dtype: torch.dtype, explicit: bool,
                varlen: bool = False) -> bool:
    """Whether the forward takes TMA key tiles for 16-byte-aligned inputs (tma_ready adds the
    alignment check; bench.compile_report and bench.tune, which assume aligned inputs, ask
    this). 16-bit inputs only: fp32 runs its IEEE dots on the FMA units with both operands in
    registers, where staging the tiles through TMA took 90 -> 255 registers and spilled 248 B
    (sm_90, D=64). Contiguous positions only: with explicit ones triton 3.6's ptxas crashes
    (SIGSEGV) on the causal no-PE forward (sm_90, D=64 and 128), and the bias PEs' tiles are
    no larger with TMA there. Dense batches only: a packed sequence's key rows would need a
    per-sequence row offset in the descriptor coordinates, and its last tile would read the
    next sequence's keys (masked, but a NaN there would leak through P = 0 times V); not done."""
    return (tma_enabled(arch) and tma_applies(pe) and not explicit and not varlen
            and dtype != torch.float32)


def tma_ready(arch: Optional[int], pe: KernelPE, k: torch.Tensor, v: torch.Tensor,
              pos: "KernelPositions") -> bool:
    """Whether the forward will load K and V through TMA (decided before its tile: with TMA
    the ALiBi and KERPLE tiles can be larger, configs.tile_config): tma_planned, and both
    tensors addressable by a descriptor."""
    return (tma_planned(arch, pe, k.dtype, pos.explicit, pos.varlen) and pos.block_table is None
            and _tma_strides(k) is not None and _tma_strides(v) is not None)


def tma_descriptors(tma: bool, meta: dict, k: torch.Tensor, v: torch.Tensor, block_n: int):
    """(k_desc, v_desc) for the forward's key tiles when ``tma`` (tma_ready), else (None,
    None): the pointer path."""
    if not tma:
        return None, None
    return (_tma_descriptor(k, block_n, meta["BLOCK_A"]),
            _tma_descriptor(v, block_n, meta["BLOCK_DV"]))


def _pos_args(pos: KernelPositions, dummy: torch.Tensor):
    if pos.explicit:
        qp, kp = pos.qpos, pos.kpos
        qs = (qp.stride(0) if qp.shape[0] > 1 else 0, qp.stride(1))
        ks = (kp.stride(0) if kp.shape[0] > 1 else 0, kp.stride(1))
        return qp, kp, qs + ks
    return dummy, dummy, (0, 0, 0, 0)


def _rope_tiles(pe: KernelPE, pos: KernelPositions, start: int, S: int, meta: dict,
                dummy: torch.Tensor) -> torch.Tensor:
    """Tile-start cos/sin table (cdiv(S, TILE_STEP), 2, BLOCK_A) float32 for RoPE with
    contiguous positions starting at ``start`` (varlen: 0, and S the longest sequence; see
    rotary.rope_tile_table_kernel); ``dummy`` (never read) otherwise."""
    if not pe.rope or pos.explicit or S == 0:
        return dummy
    step = TILE_STEP.value
    n_rows = triton.cdiv(S, step)
    out = torch.empty((n_rows, 2, meta["BLOCK_A"]), device=dummy.device, dtype=torch.float32)
    block_r = 32 if meta["BLOCK_A"] <= 64 else 16
    _run(rope_tile_table_kernel, (triton.cdiv(n_rows, block_r),),
        out, pe.theta, start, float(pe.factor), n_rows,
        ROT_HALF=meta["ROT_HALF"], BLOCK_A=meta["BLOCK_A"], BLOCK_R=block_r)
    return out


# KERPLE per-distance tables (bias.bias_table_kernel): used with contiguous positions when
# both sequences span at least one full tile (below that, evaluating f in the tile costs no more
# than filling the table: decode reads each distance once) and the tables stay small.
BIAS_TABLE_MIN_LEN = 128
BIAS_TABLE_MAX_BYTES = 256 << 20
_TABLE_PAD = 256  # > any tile size: padded rows / columns of edge tiles stay inside the table
DISTANCE_TABLES = ("kerple_log", "kerple_power")  # biases with an optional per-distance table


TABLE_BIASES = ("t5",)  # biases that are a per-head table read by bucket (bias.py, "Table biases")
SHARED_DISTANCE_TABLES = ("sandwich",)  # biases always read from one head-shared distance row
PARAM_TABLES = ("fire",)  # biases whose parameter channel is the table the tiles read (bias.py, "FIRE")
# bounded: rows are never centred
UNCENTRED_BIASES = TABLE_BIASES + SHARED_DISTANCE_TABLES + PARAM_TABLES


@dataclass
class BiasTables:
    """KERPLE's f (and df/dr2) per distance, or a table bias's f and bucket per relative
    position, (Hq, length) float32 each; Sandwich's f per distance, one row (1, length) for
    every head (bias.table_row); or unused (length 0)."""

    f: torch.Tensor
    g: torch.Tensor
    length: int

    @property
    def used(self) -> bool:
        return self.length > 0


def _bias_tables(pe: KernelPE, pos: KernelPositions, Sq: int, Sk: int, need_g: bool,
                 dummy: torch.Tensor, centred: bool = False) -> BiasTables:
    """Sq, Sk: the (longest) sequences' lengths."""
    unused = BiasTables(dummy, dummy, 0)
    # centred rows compute f - f_ref in the tile (bias.py, "Centring"): no table
    if pe.buckets is not None:
        return _bucket_tables(pe, need_g)
    if pe.bias in PARAM_TABLES:  # the parameters are the table (FIRE): read as they are
        f = pe.params.detach().float().contiguous()
        return BiasTables(f, f, f.shape[1])
    if pe.bias in SHARED_DISTANCE_TABLES:
        return _shared_distance_table(pe, pos, Sq, Sk, dummy)
    if pe.bias not in DISTANCE_TABLES or pos.explicit or centred:
        return unused
    if min(Sq, Sk) < BIAS_TABLE_MIN_LEN:
        return unused
    length = _distance_span(pos, Sq, Sk)
    Hq = pe.params.shape[0]
    if length >= 2 ** 24 or (2 if need_g else 1) * Hq * length * 4 > BIAS_TABLE_MAX_BYTES:
        return unused
    f = torch.empty((Hq, length), device=dummy.device, dtype=torch.float32)
    g = torch.empty_like(f) if need_g else dummy
    block = 1024
    _run(bias_table_kernel, (triton.cdiv(length, block), Hq), f, g, pe.params, length,
                                                         BIAS=BIAS_CODES[pe.bias], NP=pe.n_params,
                                                         NEED_G=need_g, BLOCK=block)
    return BiasTables(f, g, length)


def _distance_span(pos: KernelPositions, Sq: int, Sk: int) -> int:
    """1 + the largest |q - k| a tile of contiguous positions may index (edge tiles' padded
    rows and columns included)."""
    if pos.varlen:  # per sequence q_start - k_start = len_k - len_q, in [-Sq, Sk]
        return Sq + Sk + _TABLE_PAD + 1
    # tile distances span [off - Sk - pad, off + Sq + pad]
    off = pos.q_start - pos.k_start
    return max(abs(off + Sq + _TABLE_PAD), abs(off - Sk - _TABLE_PAD)) + 1


# A shared distance table covers every distance a call indexes, up to 2**24 (64 MiB): the
# kernels clamp each distance to the table's last entry as a float32 (exact below 2**24).
SHARED_TABLE_MAX_LEN = 1 << 24


def _shared_distance_table(pe: KernelPE, pos: KernelPositions, Sq: int, Sk: int,
                           dummy: torch.Tensor) -> BiasTables:
    """Sandwich's f per distance (bias.py, "Sandwich"), (1, L) float32, for every distance
    this call indexes: contiguous positions from the geometry; explicit ones from their
    range, read on the host (one sync; refused while a CUDA graph is being captured). The
    kernels clamp distances to L - 1, so padded rows (position 0) stay inside the table."""
    if pos.explicit and pos.qpos.device.type == "meta":  # launch.capture: values unknown
        length = Sq + Sk + _TABLE_PAD + 1
    elif pos.explicit:
        if dummy.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"pe={pe.bias!r} with explicit positions reads their range on the "
                             f"host (its distance table): not possible while a CUDA graph is "
                             f"being captured; use contiguous positions (int starts)")
        spans = []
        for p in (pos.qpos, pos.kpos):
            lo, hi = torch.aminmax(p[:, :].reshape(-1)) if p.numel() else (p.new_zeros(()),) * 2
            spans.append((int(lo), int(hi)))
        (qlo, qhi), (klo, khi) = spans
        length = max(qhi - klo, khi - qlo, 0) + _TABLE_PAD + 1
    else:
        length = _distance_span(pos, Sq, Sk)
    if length > SHARED_TABLE_MAX_LEN:
        raise ValueError(f"pe={pe.bias!r}: positions {length - _TABLE_PAD - 1} apart need a "
                         f"distance table of {length} entries, more than "
                         f"{SHARED_TABLE_MAX_LEN} (2**24); keep |q_pos - k_pos| below that")
    f = torch.empty((1, length), device=dummy.device, dtype=torch.float32)
    # (BLOCK x d_bar/2 float64 angles per program: 64 rows on a GPU; the interpreter runs a
    # program as numpy arrays, whose cost is per program, so it takes wide ones)
    block = 64 if dummy.is_cuda else 4096
    _run(bias_table_kernel, (triton.cdiv(length, block), 1), f, f, pe.params, length,
         BIAS=BIAS_CODES[pe.bias], NP=pe.n_params, NEED_G=False, BLOCK=block,
         BLOCK_W=triton.next_power_of_2(max(pe.n_params - 1, 1)))
    return BiasTables(f, f, length)


def _bucket_tables(pe: KernelPE, need_g: bool) -> BiasTables:
    """A table bias's rows (bias.py, "Table biases"): f = -table[h, bucket] and the bucket
    (float32) for each k - q in [-R, R], (Hq, 2R + 1). Gathered by torch from the detached
    table: O(Hq * R), a few KiB."""
    buckets = pe.buckets.to(pe.params.device)
    f = (-pe.params.detach().float()[:, buckets]).contiguous()
    g = buckets.float()[None].expand_as(f).contiguous() if need_g else f
    return BiasTables(f, g, f.shape[1])


# Row centring of the bias PEs (bias.py, "Centring": why, and the error analysis).


def _varlen_positions(pos: KernelPositions, device):
    """Default varlen positions as explicit (1, total) int64 tensors: queries end-aligned to
    their sequence's keys, keys 0..len_k - 1."""
    def make(lens, shift):
        idx = [torch.arange(n, dtype=torch.int64) + s for n, s in zip(lens, shift)]
        return (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)).to(device)[None]
    return (make(pos.lens_q, [lk - lq for lq, lk in zip(pos.lens_q, pos.lens_k)]),
            make(pos.lens_k, [0] * len(pos.lens_k)))


def bias_refs(pe: KernelPE, pos: KernelPositions, mask: Mask, Sq: int, Sk: int,
              device) -> Optional[torch.Tensor]:
    """DREF float32, each query's distance to its nearest visible key -- dense (Bp, Sq),
    varlen (1, total_q) -- when some row of a bias PE must be centred; None when none must
    (no bias PE, or contiguous positions where every query lies inside its key range:
    d_ref = 0, f_ref = 0, the kernels unchanged). Explicit positions (and varlen rows before
    their keys): one small kernel (bias.bias_ref_kernel), Bp = the positions' batch.
    Contiguous: d_ref = distance from the query to [k_start, k_last], (1, Sq). A window
    needs no more: a query inside its key range sees the key at its own position, and one
    past the keys sees the nearest key or none at all (then its row is empty)."""
    if pe.bias in ("none",) + UNCENTRED_BIASES or Sq == 0 or Sk == 0:
        return None  # (a table bias or Sandwich is bounded: nothing to centre)
    if pos.varlen:
        qp, kp = pos.qpos, pos.kpos
        if qp is None:  # centre only where a non-causal query precedes its keys
            if mask.causal or all(lq <= lk for lq, lk in zip(pos.lens_q, pos.lens_k)):
                return None
            qp, kp = _varlen_positions(pos, device)
        dref = torch.empty((1, qp.shape[1]), device=device, dtype=torch.float32)
        grid_m, bp, dref_len = pos.max_q, pos.n_seqs, qp.shape[1]
    elif pos.explicit:
        qp, kp = pos.qpos, pos.kpos
        bp = max(qp.shape[0], kp.shape[0])
        dref = torch.empty((bp, Sq), device=device, dtype=torch.float32)
        grid_m, dref_len = Sq, Sq
    else:
        k_last = pos.k_start + Sk - 1
        right = pos.q_start + Sq - 1 > k_last  # queries past the last key
        left = not mask.causal and pos.q_start < pos.k_start  # (causal: such a query sees no key)
        if not (right or left):
            return None
        q = pos.q_start + torch.arange(Sq, device=device, dtype=torch.int64)
        d = (pos.k_start - q).clamp_min(0) + (q - k_last).clamp_min(0)
        if mask.causal:
            d = torch.where(q < pos.k_start, 0, d)
        return d.to(torch.float32)[None]
    if grid_m == 0:
        return None
    qs = (qp.stride(0) if qp.shape[0] > 1 else 0, qp.stride(1))
    ks = (kp.stride(0) if kp.shape[0] > 1 else 0, kp.stride(1))
    block_m, block_n = (64, 128) if device.type == "cuda" else (32, 64)
    margs = mask.args(True)
    _run(bias_ref_kernel, (triton.cdiv(grid_m, block_m), bp),
        qp, kp, dref, pos.cu_q, pos.cu_k, *qs, *ks, Sq, Sk, dref_len,
        margs["win_left"], margs["win_right"], CAUSAL=mask.causal, WIN_L=margs["WIN_L"],
        WIN_R=margs["WIN_R"], VARLEN=pos.varlen, BLOCK_M=block_m, BLOCK_N=block_n)
    return dref


def roomy_tile(pos: KernelPositions, center: bool) -> bool:
    """Whether a launch takes the explicit-position tiles (configs.tile_config's
    ``explicit``): explicit positions, or centred rows (bias.py, "Centring"), whose distance
    tile and closed forms made the 128 x 128 tiles spill on sm_90 (ALiBi D=128: 32 B on triton
    3.9; KERPLE power D=64: ~800 B)."""
    return pos.explicit or center


# xPos: the largest log2 of a factor a contiguous block may form ((BLOCK - 1) x its rate: a
# key at the block's last query, seen from its first), by input dtype. fp16 keeps 2**12 (k up
# to 16 in magnitude stays below 65504; the matching query factor 2**-12 stays normal);
# bf16 / fp32 have fp32's exponent range.
XPOS_MAX_LOG2 = {torch.float16: 12.0}


def check_xpos_block(pe: KernelPE, block: int, dtype) -> None:
    """A ValueError when xPos's factors inside one block of ``block`` rows would leave the
    input dtype (a small scale_base: the factor grows as zeta_0^(-(block - 1) / gamma))."""
    if not pe.xpos:
        return
    top = XPOS_MAX_LOG2.get(dtype, 100.0)
    if (block - 1) * pe.xpos_rate > top:
        raise ValueError(f"XPos: scale_base too small for {dtype} on these tiles: a block of "
                         f"{block} rows spans factors up to 2**{(block - 1) * pe.xpos_rate:.1f} "
                         f"> 2**{top:.0f}; raise scale_base, or use float32 / backend='cpu'")


def geometry_tile(pos: KernelPositions, mask: Mask, pe: Optional[KernelPE] = None) -> bool:
    """Whether a launch takes the geometry tiles (configs.tile_config's ``geometry``):
    packed sequences (bounds and row offsets), a KV cache (per-sequence key counts, page
    lookups: sm_90 D=64 RoPE at 128 x 128 spilled 8 B on triton 3.6), a window's left edge (a third, masked loop) or
    a softcap (tanh per score; the backward keeps 1 - tanh^2), or xPos (a decay per tile and
    the block's reference: sm_90 D=64 forward 128 x 128 spilled 48 B, D=128 dK 32 x 128 32 B)
    -- extra work the tight tiles (sm_90 D=128: 255 registers without it) have no registers
    for."""
    return (pos.varlen or pos.k_lens is not None or mask.left is not None or mask.softcap > 0
            or (pe is not None and pe.xpos))


def _dref_args(dref: Optional[torch.Tensor], B: int, varlen: bool = False):
    """(DREF, CENTER) kernel arguments: DREF (B, Sq) (varlen (1, total_q)) contiguous, or None
    without centring -- a constexpr None drops the argument, so the kernels without CENTER
    compile exactly as before it existed (two more arguments alone tipped the sm_90 D=128
    ALiBi dQ tile, at 255 registers, into an 8 B spill on triton 3.6)."""
    if dref is None:
        return None, False
    if varlen:
        return dref.contiguous(), True
    return dref.expand(B, dref.shape[1]).contiguous(), True


def caller_lse(row_lse: torch.Tensor, pe: KernelPE, dref: Optional[torch.Tensor]) -> torch.Tensor:
    """The log-sum-exp of the true logits from the kernels' centred one: LSE = LSE_centred -
    a f(d_ref) (the bias at the nearest visible key), formed in float64 and rounded once (the
    fp32 exp2(r2 log2 d) of the kernels is ~20 ulps off at d ~ 1e3, which the LSE, of that
    magnitude, would show). row_lse (B, Hq, Sq) with dref (Bp, Sq), or varlen (1, Hq, total)
    with (1, total). Only the caller sees it (the backward keeps row_lse). -inf (a query that
    sees no key) and NaN pass through."""
    if dref is None:
        return row_lse
    d = dref.double()[:, None, :]  # (Bp, 1, Sq)
    a = pe.params[:, 0].double()[:, None]  # (Hq, 1)
    if pe.bias == "alibi":
        f = d
    else:
        b = pe.params[:, 1].double()[:, None]
        # KERPLE power is centred at max(d_ref, 1) (bias.bias_row_ref)
        f = torch.log1p(b * d) if pe.bias == "kerple_log" else torch.pow(d.clamp_min(1.0), b)
    return (row_lse.double() - a * f).float()


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 dots (no TF32): fp32 users ask for accuracy, not speed.
    return "ieee" if dtype == torch.float32 else "tf32"


def new_output(q: torch.Tensor, DV: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The forward's output (B, Hq, Sq, DV), uninitialised, stored like q: bshd storage (the
    head stride below the sequence stride) gives a bshd-contiguous output as a transposed
    view, so flash-attn-layout callers can reshape it to (B, S, H * DV) without a copy;
    anything else is bhsd-contiguous. (With Hq = 1 or Sq = 1 the two are the same memory.)
    ``dtype``: q's by default (the kernels cast on store)."""
    B, Hq, Sq, _ = q.shape
    dtype = dtype or q.dtype
    if q.stride(1) < q.stride(2):
        return q.new_empty((B, Sq, Hq, DV), dtype=dtype).transpose(1, 2)
    return q.new_empty((B, Hq, Sq, DV), dtype=dtype)


def _geometry(q, k, pos: KernelPositions):
    """(programs' batch B, Sq, Sk: the (longest) sequence lengths, lse_len: the LSE's row
    length, total_q, for packed sequences; None for dense ones, whose row length is Sq) of
    (B, H, S, D) views; varlen views are (1, H, total, D)."""
    if pos.varlen:
        return pos.n_seqs, pos.max_q, pos.max_k, q.shape[2]
    return q.shape[0], q.shape[2], max(k.shape[2], pos.k_bound), None  # dense: the kernels use Sq


def _common_args(pe: KernelPE, pos: KernelPositions, mask: Mask, scale: float, dummy):
    """Keyword arguments every attention kernel takes the same way."""
    qp, kp, pstrides = _pos_args(pos, dummy)
    margs = mask.args(pos.explicit)
    return dict(QPOS=qp, KPOS=kp, CU_Q=pos.cu_q, CU_K=pos.cu_k,
                THETA=pe.theta if pe.theta is not None else dummy,
                PARAMS=pe.params if pe.params is not None else dummy,
                stride_qpb=pstrides[0], stride_qpm=pstrides[1], stride_kpb=pstrides[2],
                stride_kpn=pstrides[3], q_start=pos.q_start, k_start=pos.k_start,
                rope_factor=float(pe.factor), **margs, **mask.cap_args(scale), **pe.codes(),
                VARLEN=pos.varlen, EXPLICIT_POS=pos.explicit)


def _remap_args(pe: KernelPE, pos: KernelPositions, q, k) -> dict:
    """The forward's RoPE-extension arguments (attn_fwd, REMAP); their defaults without one
    (every argument passed: bench.compile_report derives signatures from them).

    The far passes' Q (one per far region), and K unless it is a KV cache, are rotated at
    their far positions here, by rope_apply into buffers laid out as q and k: the kernel then
    holds one rotation of Q at a time and runs the far passes as plain loads (rotating them
    in the kernel kept both Q rotations live and spilled; docs/internals.md). A KV cache's K
    is rotated in the tile (rotating the whole cache per step would cost more than reading
    it)."""
    ext = pe.remap
    if ext is None:
        return dict(Q_FAR=None, Q_FAR2=None, K_FAR=None, THETA_FAR=None, remap_w=None,
                    r_unit=None, rk_a=None, rk_b=None, r_group=None, REMAP=False, FAR_K=False,
                    N_FAR=1, CHUNKED=False)
    a_k, b_k, g_k, mod_k = ext.key_map()
    if mod_k not in (0, ext.unit):
        raise ValueError(f"{ext!r}: the kernels take a key map mod 0 or the unit, got {mod_k}")
    if ext.n_far > 2:
        raise ValueError(f"{ext!r}: the kernels take at most 2 far regions, got {ext.n_far}")
    q_far = [_far_rotated(q, pe, pos, "q", piece=i) for i in range(ext.n_far)]
    k_far = None if pos.k_lens is not None else _far_rotated(k, pe, pos, "k")
    return dict(Q_FAR=q_far[0], Q_FAR2=q_far[1] if ext.n_far > 1 else None, K_FAR=k_far,
                THETA_FAR=pe.theta_far, remap_w=ext.window, r_unit=ext.unit, rk_a=a_k,
                rk_b=b_k, r_group=g_k, REMAP=True, FAR_K=k_far is not None, N_FAR=ext.n_far,
                CHUNKED=ext.unit > 1 or mod_k != 0)


def _far_record(pe: KernelPE) -> KernelPE:
    """The far pass's RoPE record: the extension's frequencies, no remap."""
    return dataclasses.replace(pe, theta=pe.theta_far, remap=None, theta_far=None)


def _row_positions(pos: KernelPositions, which: str, x: torch.Tensor) -> torch.Tensor:
    """The positions of x's rows, the q or k side of a call, (B|1, S) int64."""
    if pos.k_lens is not None:  # a KV cache: queries continue each sequence's keys
        return (pos.k_lens.to(torch.int64)[:, None] - x.shape[2]
                + torch.arange(x.shape[2], device=x.device))
    start, p = _rope_source(pos, which, x.device)
    if p is None:
        return torch.arange(start, start + x.shape[2], device=x.device)[None]
    return p.to(torch.int64)


def _far_rotated(x: torch.Tensor, pe: KernelPE, pos: KernelPositions, which: str,
                 inverse: bool = False, piece: int = 0) -> torch.Tensor:
    """x rotated at its far positions (the query's in far region piece + 1), or back
    (``inverse``): a dense (B, H, S, D) tensor (the forward passes dense q and k, so the far
    copies share their strides)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    p = pe.remap.far_positions(_row_positions(pos, which, x), which == "q", piece)
    return rope_apply(x, _far_record(pe), 0, p, inverse=inverse, out=out)


def _remap_bwd(do, q, k, v, out, lse, pe: KernelPE, pos: KernelPositions, mask: Mask,
               scale: float, dq_dtype):
    """The backward of a RoPE extension's forward as pieces of one attention, one per region
    (the ring's way, attn_bwd given the whole forward's out and LSE): the near pairs with RoPE
    as trained, and each far region on Q and K rotated at their far positions, whose dQ and
    dK are rotated back. A region is a mask attn_bwd has (RoPEExtension.piece_mask): a window
    on the distance, or -- DCA's chunks -- a window on chunk-spread explicit positions (every
    tile visited, masked per element). Their sums are the gradients: every pair is in exactly
    one piece."""
    ext = pe.remap

    def side(mine, theirs):
        return theirs if mine is None else (mine if theirs is None else min(mine, theirs))

    dq = dk = dv = 0.0
    kf = None
    for r in range(ext.n_far + 1):
        vis, left, right = ext.piece_mask(r)
        ppos = pos
        if vis is not None:  # chunk regions: every position spread (no window was allowed)
            ppos = dataclasses.replace(pos, qpos=vis(_row_positions(pos, "q", q)),
                                       kpos=vis(_row_positions(pos, "k", k)))
        pmask = dataclasses.replace(mask, left=side(left, mask.left), right=side(right, mask.right))
        if r == 0:
            near = dataclasses.replace(pe, remap=None, theta_far=None)
            dqr, dkr, dvr, _ = attn_bwd(do, q, k, v, out, lse, near, ppos, pmask, scale, False,
                                        dref=None, dq_dtype=torch.float32)
        else:
            qf = _far_rotated(q, pe, pos, "q", piece=r - 1)
            kf = _far_rotated(k, pe, pos, "k") if kf is None else kf
            dqf, dkf, dvr, _ = attn_bwd(do, qf, kf, v, out, lse, _unrotated(_far_record(pe)),
                                        ppos, pmask, scale, False, dref=None,
                                        dq_dtype=torch.float32)
            dqr = _far_rotated(dqf, pe, pos, "q", inverse=True, piece=r - 1)
            dkr = _far_rotated(dkf.float(), pe, pos, "k", inverse=True)
        dq, dk, dv = dq + dqr, dk + dkr.float(), dv + dvr.float()
    return dq.to(dq_dtype or q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _strides(prefix: str, t: torch.Tensor, dims: str) -> dict:
    return {f"stride_{prefix}{d}": st for d, st in zip(dims, t.stride())}


# RoPE strategies. "tile": every K tile (forward, dQ) and Q tile (dK/dV) is rotated in the
# attention kernel as it is loaded -- by every query (key) block that visits it, Sq / BLOCK_M
# (Sk / BLOCK_N) times, so the rotation work grows as S^2. "once": Q and K are rotated once by
# a bandwidth-bound pass (rotary.rope_apply_kernel) into transient buffers of their size, the
# attention kernels run exactly pe="none"'s code (TMA, tiles, split-K included), and the
# backward rotates dQ and dK back (the transpose) after it. Nothing S x S, nothing saved: the
# backward rotates again. The pass costs a fixed number of bytes per token, the in-tile
# rotation a fixed share of the attention time (docs/internals.md, "RoPE: rotate once"), so
# the rule is a number of visits: "once" when a K tile is visited by at least
# ROPE_ONCE_MIN_VISITS query blocks of ROPE_VISIT_ROWS rows on average (half as many under
# a causal mask over as many queries as keys), "tile" for decode and short chunks.
# POSATTN_ROPE=tile|once (or ROPE_STRATEGY) overrides it; bench/gpu_check.sh times both.
ROPE_ONCE_MIN_VISITS = 32  # the rule's constant: Sq >= 4096 (causal self-attention: 8192)
ROPE_VISIT_ROWS = 128
ROPE_STRATEGY: Optional[str] = None  # "tile" | "once" | None (POSATTN_ROPE, then the rule)
ROPE_STRATEGIES = ("tile", "once")


def rope_strategy(pe: KernelPE, pos: KernelPositions, Sq: int, Sk: int, causal: bool) -> str:
    """"tile" or "once" for a RoPE launch of Sq queries against Sk keys (varlen: the longest
    sequences); "tile" for any other PE. Under ``capture``: its ``rope`` argument."""
    if not pe.rope or pos.k_lens is not None or pe.remap is not None or pe.xpos:
        return "tile"  # (a KV cache: its lengths live on the device; a remap: two rotations;
        # xPos: its decay is relative to the visiting block, rotary.py)
    choice = _capture.rope if _capture is not None else (ROPE_STRATEGY or os.environ.get("POSATTN_ROPE") or None)
    if choice is not None:
        if choice not in ROPE_STRATEGIES:
            raise ValueError(f"POSATTN_ROPE / ROPE_STRATEGY must be one of {ROPE_STRATEGIES}, got {choice!r}")
        return choice
    rows, keys = (pos.max_q, pos.max_k) if pos.varlen else (Sq, Sk)
    visits = rows / ROPE_VISIT_ROWS * (0.5 if causal and rows >= keys else 1.0)
    return "once" if visits >= ROPE_ONCE_MIN_VISITS else "tile"


def _rope_source(pos: KernelPositions, which: str, device):
    """(start, positions tensor or None) of the q or k rows, as rope_apply takes them."""
    if pos.varlen:
        if pos.explicit:
            return 0, pos.qpos if which == "q" else pos.kpos
        qp, kp = _varlen_positions(pos, device)
        return 0, qp if which == "q" else kp
    if pos.explicit:
        return 0, pos.qpos if which == "q" else pos.kpos
    return (pos.q_start if which == "q" else pos.k_start), None


def rope_apply(x: torch.Tensor, pe: KernelPE, start: int, positions: Optional[torch.Tensor],
               inverse: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """factor R(pos theta) x (or its transpose, ``inverse``) for x (B, H, S, D) (varlen: (1, H,
    total, D)) at positions ``start + row`` or ``positions`` (B|1, S): one pass
    (rotary.rope_apply_kernel) into ``out`` (default: a new tensor laid out like x; may be x)."""
    B, H, S, D = x.shape
    if pe.xpos:
        raise ValueError("rope_apply: xPos has no rotate-once form (its decay is relative to "
                         "the visiting block)")
    out = torch.empty_like(x) if out is None else out
    meta, _ = _layout_meta(pe, D, D)
    if B * H * S == 0:
        return out
    if positions is not None:
        pstrides = (positions.stride(0) if positions.shape[0] > 1 else 0, positions.stride(1))
        pos_arg = positions
    else:
        pstrides, pos_arg = (0, 0), x
    block_s = 32 if meta["BLOCK_A"] <= 64 else 16
    _run(rope_apply_kernel, (triton.cdiv(S, block_s), B * H),
        x, out, pos_arg, pe.theta, *x.stride(), *out.stride(), *pstrides, H, S, start,
        float(pe.factor), INVERSE=inverse, EXPLICIT_POS=positions is not None,
        INTERLEAVED=meta["INTERLEAVED"], ROT_HALF=meta["ROT_HALF"], ROT_DIM=meta["ROT_DIM"], D=D,
        BLOCK_A=meta["BLOCK_A"], BLOCK_C=meta["BLOCK_C"], HAS_PASS=meta["HAS_PASS"],
        BLOCK_S=block_s, num_warps=4)
    return out


def _unrotated(pe: KernelPE) -> KernelPE:
    """The record the attention kernels run once q and k are rotated: no rotary axis, and
    pe="none"'s tiles when there is no bias either."""
    return dataclasses.replace(pe, rot="none", theta=None, factor=1.0, rot_dim=0,
                               interleaved=False, xpos=False,
                               family="none" if pe.bias == "none" else pe.family)


def _rotate_qk(q, k, pe: KernelPE, pos: KernelPositions):
    """Rotated copies of q and k (the "once" strategy)."""
    return (rope_apply(q, pe, *_rope_source(pos, "q", q.device)),
            rope_apply(k, pe, *_rope_source(pos, "k", k.device)))


# Decode-shaped forwards over a KV cache pack a GQA group's query heads into the tile's rows
# (attn_fwd_kernel's PACK_GQA): a decode step has Sq = 1 to a few tokens, so a program per
# (query head, token block) would run a 128-row tile of padding and read each K / V tile once
# per query head; packed, one program per (batch, KV head) reads it once for the GROUP heads.
PACK_MAX_SQ = 16  # tokens per step packed (more: a prefill chunk, which fills its own rows)


def pack_gqa(pe: KernelPE, pos: KernelPositions, mask: Mask, scale: float, group: int, Sq: int,
             center: bool) -> int:
    """Rows of a packed launch (GROUP * Sq), or 0: a KV-cache forward (dense queries, implied
    positions) with a GQA group, at most PACK_MAX_SQ tokens, scores in units of 1/scale (no
    soft cap) and no centred rows. Not a table bias nor Sandwich: T5 models are multi-head
    (no group to pack), and the per-row table index made the packed D=128 tile spill (T5:
    sm_90 40-48 B on triton 3.9, sm_80 8 B on 3.6; Sandwich: sm_90 24 B on 3.9, sm_80 8 B on
    3.6)."""
    if (pos.k_lens is None or group < 2 or not 0 < Sq <= PACK_MAX_SQ or mask.softcap > 0
            or not fold_scale(scale) or center or pos.explicit or pos.varlen
            or pe.bias in UNCENTRED_BIASES or pe.remap is not None):
        return 0
    return group * Sq


def decode_tile(rows: int, width: int, dtype: torch.dtype, arch: Optional[int]) -> TileConfig:
    """The packed decode tile: the rows rounded up to a power of two (16..64; more rows take
    more programs) -- 64 on Hopper, whose wgmma computes 64-row slabs (a decode step is
    bound by reading K / V, not by the padding) -- 64 keys at D <= 64, else 32 (64 spilled
    16-72 B at D=128: sm_90 on triton 3.6 and 3.9, sm_80 T5 on 3.6; 32 in the interpreter and
    with fp32's FMA dots), 4 warps."""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if arch in HOPPER_CLASS and dtype != torch.float32:
        block_m = 64
    block_n = 32 if arch is None or dtype == torch.float32 or width > 64 else 64
    return TileConfig(block_m, block_n, 4, 2)


def attn_fwd(q, k, v, pe: KernelPE, pos: KernelPositions, mask: Mask, scale: float, *,
             dref="auto", out_dtype: Optional[torch.dtype] = None):
    """Forward on (B, H, S, D) views (varlen: (1, H, total, D)). Returns out (B, Hq, Sq, DV) in
    q's dtype (or ``out_dtype``), lse (B, Hq, Sq) float32 (the caller's) and row_lse, what
    attn_bwd takes: the LSE of the centred rows of a bias PE (bias_refs), the same tensor as
    lse when no row is centred.

    ``dref``: ``"auto"`` (bias_refs: centre where this call's keys are all far), or the
    centring frame to use instead -- None (no centring) or a (Bp, Sq) float32 distance per
    query that is at most its distance to any key it sees. A caller that attends in pieces
    and merges them by their LSEs (posattn.distributed) passes one frame for every piece, so
    that their row_lse are comparable and every gradient sums over the pieces exactly."""
    Bt, Hq, S_rows, D = q.shape
    Hkv, DV = k.shape[1], v.shape[3]
    B, Sq, Sk, lse_len = _geometry(q, k, pos)
    out = new_output(q, DV, out_dtype)
    if rope_strategy(pe, pos, Sq, Sk, mask.causal) == "once":
        q, k = _rotate_qk(q, k, pe, pos)
        pe = _unrotated(pe)
    if pe.remap is not None:  # its far rotations are laid out as q and k: dense copies (a
        # broadcast dim would have every batch row write one buffer; a slice of a packed qkv
        # would reserve its whole span). A KV cache's K is rotated in the tile: never copied.
        q = q.contiguous()
        if pos.k_lens is None:
            k = k.contiguous()
    lse = torch.empty((Bt, Hq, S_rows), device=q.device, dtype=torch.float32)
    meta, width = _layout_meta(pe, D, DV)
    tma = tma_ready(_arch(q), pe, k, v, pos)
    if isinstance(dref, str):
        dref = bias_refs(pe, pos, mask, Sq, Sk, q.device)
    DREF, center = _dref_args(dref, B, pos.varlen)
    cfg = tile_config("fwd", width, mask.causal, q.dtype, _arch(q), pe.family,
                      explicit=roomy_tile(pos, center), tma=tma,
                      geometry=geometry_tile(pos, mask, pe) or pe.remap is not None)
    if pe.remap is not None:
        cfg = remap_tile(cfg, width, q.dtype, _arch(q), pos.explicit, pe.remap.unit > 1,
                         pos.k_lens is not None)
    if pe.xpos:
        cfg = xpos_tile(cfg, "fwd", width, q.dtype, _arch(q), pos.explicit)
    pack = pack_gqa(pe, pos, mask, scale, Hq // Hkv, Sq, center)
    if pack:  # decode-shaped (a KV cache): a GQA group's heads x tokens in the rows
        cfg = decode_tile(pack, width, q.dtype, _arch(q))
    check_xpos_block(pe, cfg.BLOCK_M, q.dtype)
    k_tiles = _rope_tiles(pe, pos, 0 if pos.varlen else pos.k_start, Sk, meta, lse)
    bt = _bias_tables(pe, pos, Sq, Sk, False, lse, center)
    rows, heads = (pack, Hkv) if pack else (Sq, Hq)  # programs: (row blocks, B * heads)
    n_qblocks, n_ktiles = triton.cdiv(rows, cfg.BLOCK_M), triton.cdiv(Sk, cfg.BLOCK_N)
    splits, per_split = split_runs(q, pe, pos, n_qblocks * B * heads, n_ktiles)
    if splits > 1:  # partials (B * Hq, splits, Sq, DV) and (B * Hq, splits, Sq), merged below
        o_part = torch.empty((B * Hq, splits, Sq, DV), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((B * Hq, splits, Sq), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = lse  # never touched
    kd, vd = tma_descriptors(tma, meta, k, v, cfg.BLOCK_N)
    if n_qblocks > 0 and B * Hq > 0:
        _run(attn_fwd_kernel, (n_qblocks, B * heads, splits),
            Q=q, K=k, V=v, O=out, LSE=lse, ROPE_TILES=k_tiles, BIAS_F=bt.f, DREF=DREF, KD=kd,
            VD=vd, O_PART=o_part, LSE_PART=lse_part,
            **_strides("q", q, "bhmd"), **_strides("k", k, "bhnd"), **_strides("v", v, "bhnd"),
            **_strides("o", out, "bhmd"),
            Hq=Hq, GROUP=Hq // Hkv, Sq=Sq, Sk=Sk, lse_len=lse_len,
            scale_log2=scale * 1.4426950408889634, bias_len=bt.length, tiles_per_split=per_split,
            **_common_args(pe, pos, mask, scale, q),
            BIAS_TABLE=bt.used, CENTER=center, **meta, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            PREC=_prec(q.dtype), FOLD_SCALE=fold_scale(scale) and mask.softcap == 0, TMA=tma,
            SPLIT=splits > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            KLEN=pos.k_lens, BT=pos.block_table,
            stride_btb=pos.block_table.stride(0) if pos.block_table is not None else None,
            KV_LENS=pos.k_lens is not None, PAGE=pos.page, PACK_GQA=bool(pack),
            **_remap_args(pe, pos, q, k),
        )
    if splits > 1:
        _run(attn_combine_kernel, (triton.cdiv(Sq, COMBINE_BLOCK_M), B * Hq),
            o_part, lse_part, out, lse, *out.stride(), Hq, Sq, splits, DV=DV,
            BLOCK_M=COMBINE_BLOCK_M, BLOCK_DV=meta["BLOCK_DV"], num_warps=4)
    return out, caller_lse(lse, pe, dref), lse


# Split-K forward (flash-decoding). A launch with fewer (query block, head) programs than
# half the GPU's SMs -- a decode step (Sq = 1) or a short chunk against a long cache -- leaves
# most SMs idle while each program streams the whole K/V of its head. It then splits the key
# tiles into runs, one program each (attn_fwd_kernel's SPLIT), and attn_combine_kernel merges
# the partial outputs by their LSEs: up to one program per SM, each run at least
# SPLIT_MIN_TILES key tiles (the merge reads the partials once more). Deterministic: fixed
# runs, merged in order. The backward reads only the merged out and LSE.
SPLIT_MIN_TILES = 4
COMBINE_BLOCK_M = 16
FORCE_SPLITS: Optional[int] = None  # tests: this many splits wherever split_allowed


@functools.lru_cache(maxsize=None)
def _sm_count(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_allowed(pe: KernelPE, pos: KernelPositions) -> bool:
    """Every dense forward may split except RoPE and KERPLE power with explicit positions:
    their split variants (per-element cos/sin, or the centred rows' expm1/log1p, all tiles
    masked, fp32 partial stores) spill at D=128 on triton 3.6 (RoPE 8 B on sm_90 and sm_80,
    KERPLE power 16 B on sm_90); they run unsplit, as before split-K existed. Packed
    sequences (varlen) run unsplit: their partials would need per-sequence layouts, and
    packed batches are training / prefill shapes, which fill the GPU without a split."""
    if pos.varlen:
        return False
    return not (pos.explicit and (pe.rope or pe.bias == "kerple_power"))


def splits_for(sms: int, n_programs: int, n_ktiles: int) -> int:
    """Runs of key tiles per (query block, head) for a GPU with ``sms`` SMs: 1 when the
    programs already fill half of them, else as many as fit one wave, each run at least
    SPLIT_MIN_TILES tiles long."""
    if 2 * n_programs > sms:
        return 1
    return max(1, min(sms // n_programs, n_ktiles // SPLIT_MIN_TILES))


def split_count(q: torch.Tensor, n_programs: int, n_ktiles: int) -> int:
    """How many runs the forward splits the key tiles into (1: no split; never on CPU)."""
    if FORCE_SPLITS is not None:
        return max(1, FORCE_SPLITS)
    if q.device.type != "cuda":
        return 1
    return splits_for(_sm_count(q.device.index), n_programs, n_ktiles)


def split_runs(q: torch.Tensor, pe: KernelPE, pos: KernelPositions, n_programs: int,
               n_ktiles: int):
    """(runs, key tiles per run) of a forward launch: split_count where split_allowed, and
    no run that rounding would leave without tiles (forced splits keep theirs: tests)."""
    splits = split_count(q, n_programs, n_ktiles) if split_allowed(pe, pos) else 1
    per_split = triton.cdiv(n_ktiles, splits)
    if FORCE_SPLITS is None:
        splits = triton.cdiv(n_ktiles, per_split)
    return splits, per_split


def fold_scale(scale: float) -> bool:
    """The forward may hold its scores in units of 1/scale and take the row max over them
    (attn_fwd._fwd_tiles; the bias is divided by the scale too): a positive scale, and not a
    vanishing one -- the bias parameter over the scale must stay finite (at a subnormal scale
    a slope / scale is inf, and inf x a distance of 0 is NaN). Any other scale (zero,
    negative, below 2**-60) is allowed and runs the general path."""
    return scale >= 2.0 ** -60


def attn_bwd(do, q, k, v, out, lse, pe: KernelPE, pos: KernelPositions, mask: Mask,
             scale: float, need_pe_grad: bool, *, dref="auto",
             dq_dtype: Optional[torch.dtype] = None, table_ref: Optional[int] = None):
    """Backward from the forward's row_lse (``lse``; see attn_fwd). Returns dq, dk, dv (like
    q, k, v; dq in ``dq_dtype`` if given -- not dk / dv: fp32 stores there spill the sm_90
    KERPLE / T5 and the sm_80 dK/dV tiles) and, when need_pe_grad, the gradient of pe.params,
    (Hq, P) float32 (summed deterministically over per-program partials), else None.

    ``out`` and ``lse`` may be those of a larger attention this call is a piece of (the same
    queries against more keys, merged): the gradients are then this piece's share, exactly,
    provided ``dref`` is the frame ``lse`` was formed in (see attn_fwd) and, for a table
    bias, ``table_ref`` is one bucket that every piece centres its table gradient on
    (bias.table_grad_centred; None: each call picks its own, exact only for whole rows)."""
    if pe.remap is not None:  # a RoPE extension: a piece per region
        return _remap_bwd(do, q, k, v, out, lse, pe, pos, mask, scale, dq_dtype)
    Bt, Hq, S_rows, D = q.shape
    Hkv, DV = k.shape[1], v.shape[3]
    B, Sq, Sk, lse_len = _geometry(q, k, pos)
    once = rope_strategy(pe, pos, Sq, Sk, mask.causal) == "once"
    if once:  # rotate again (nothing rotated was saved), run pe="none"'s kernels, rotate back
        dq_final = torch.empty_like(q, dtype=dq_dtype)
        pe_rot, dq_dtype = pe, torch.float32  # dq' in fp32: rounded once, after the rotation back
        q, k = _rotate_qk(q, k, pe, pos)
        pe = _unrotated(pe)
    dq = torch.empty_like(q, dtype=dq_dtype)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    meta, width = _layout_meta(pe, D, DV)
    arch = _arch(q)

    delta = torch.empty((Bt, Hq, S_rows), device=q.device, dtype=torch.float32)
    nlse2 = torch.empty_like(delta)  # -LSE * log2(e), -inf for a query that saw no key
    pre_m = 64 if arch is not None else 32
    if Bt * Hq * S_rows > 0:  # token-wise: a packed batch is one long sequence here
        _run(attn_bwd_preprocess_kernel, (triton.cdiv(S_rows, pre_m), Bt * Hq),
            out, do, lse, delta, nlse2, *out.stride(), *do.stride(), Hq, S_rows,
            DV=DV, BLOCK_M=pre_m, BLOCK_DV=meta["BLOCK_DV"])

    if isinstance(dref, str):
        dref = bias_refs(pe, pos, mask, Sq, Sk, q.device)
    DREF, center = _dref_args(dref, B, pos.varlen)
    roomy = roomy_tile(pos, center)
    geo = geometry_tile(pos, mask, pe)
    common = _common_args(pe, pos, mask, scale, q)
    cfg = tile_config("bwd_dkdv", width, mask.causal, q.dtype, arch, pe.family, explicit=roomy,
                      geometry=geo)
    # (a query tile straddling the key block's first key forms its start's factor too)
    check_xpos_block(pe, max(cfg.BLOCK_M, cfg.BLOCK_N), q.dtype)
    q_tiles = _rope_tiles(pe, pos, 0 if pos.varlen else pos.q_start, Sq, meta, delta)
    bt = _bias_tables(pe, pos, Sq, Sk, need_pe_grad, delta, center)
    # split tiles: dV, then dK, in two launches (configs.TileConfig.split)
    for do_dk, do_dv in ((False, True), (True, False)) if cfg.split else ((True, True),):
        if Sk == 0 or B * Hkv == 0:
            break
        _run(attn_bwd_dkdv_kernel, (triton.cdiv(Sk, cfg.BLOCK_N), B * Hkv),
            Q=q, K=k, V=v, DO=do, NLSE2=nlse2, DELTA=delta, DK_OUT=dk, DV_OUT=dv,
            ROPE_TILES=q_tiles, BIAS_F=bt.f, DREF=DREF,
            **_strides("q", q, "bhmd"), **_strides("k", k, "bhnd"), **_strides("v", v, "bhnd"),
            **_strides("do", do, "bhmd"), **_strides("dk", dk, "bhnd"),
            **_strides("dv", dv, "bhnd"),
            Hq=Hq, Hkv=Hkv, GROUP=Hq // Hkv, Sq=Sq, Sk=Sk, lse_len=lse_len, scale=scale,
            bias_len=bt.length, **common, BIAS_TABLE=bt.used, CENTER=center, **meta,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, PREC=_prec(q.dtype),
            DO_DK=do_dk, DO_DV=do_dv, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    cfg = tile_config("bwd_dq", width, mask.causal, q.dtype, arch, pe.family, need_pe_grad,
                      explicit=roomy, geometry=geo)
    check_xpos_block(pe, cfg.BLOCK_M, q.dtype)
    k_tiles = _rope_tiles(pe, pos, 0 if pos.varlen else pos.k_start, Sk, meta, delta)
    n_qblocks = triton.cdiv(Sq, cfg.BLOCK_M)
    if need_pe_grad:  # one partial per dQ program (query block, batch, head, parameter)
        # dense: every program writes its slot; varlen: surplus programs return early
        alloc = torch.zeros if pos.varlen else torch.empty
        gparam = alloc((n_qblocks, B, Hq, pe.n_params), device=q.device, dtype=torch.float32)
    else:
        gparam = delta  # never written
    if n_qblocks > 0 and B * Hq > 0:
        _run(attn_bwd_dq_kernel, (n_qblocks, B * Hq),
            Q=q, K=k, V=v, DO=do, NLSE2=nlse2, DELTA=delta, DQ=dq, ROPE_TILES=k_tiles,
            BIAS_F=bt.f, BIAS_G=bt.g, DREF=DREF, GPARAM=gparam,
            **_strides("q", q, "bhmd"), **_strides("k", k, "bhnd"), **_strides("v", v, "bhnd"),
            **_strides("do", do, "bhmd"), **_strides("dq", dq, "bhmd"),
            Hq=Hq, GROUP=Hq // Hkv, Sq=Sq, Sk=Sk, lse_len=lse_len, scale=scale,
            bias_len=bt.length, **common, BIAS_TABLE=bt.used, CENTER=center, **meta,
            NEED_PE_GRAD=need_pe_grad, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            PREC=_prec(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            TABLE_REF=-1 if table_ref is None else int(table_ref),
        )
    g = gparam.sum(dim=(0, 1)) if need_pe_grad else None
    if once:  # d/dx of R x is R^T: the transpose rotation, in place for dK
        dq = rope_apply(dq, pe_rot, *_rope_source(pos, "q", q.device), inverse=True, out=dq_final)
        dk = rope_apply(dk, pe_rot, *_rope_source(pos, "k", k.device), inverse=True, out=dk)
    return dq, dk, dv, g
