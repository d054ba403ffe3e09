"""Context parallelism: ring attention over ``torch.distributed``, every PE, forward and backward.

The sequence is sharded over the ranks of a process group: rank r holds the queries, keys and
values of some rows of it. Each rank keeps its queries; the K/V shards travel around the ring
(rank r sends to r + 1 and receives from r - 1, ``torch.distributed.batch_isend_irecv``, posted
before the compute of a step so the transfer overlaps it). At step s rank r attends its queries
to the keys of rank r - s, and merges the partial result into its running output by the LSEs
(fp32). After W steps every query has seen every key; nothing larger than a shard is ever held.

Positions are what make this exact for a positional encoding: every piece is computed at the
*global* positions of its rows (implied by the rank and the load balancing, or given), so RoPE
rotates, and a bias is evaluated, as on the whole sequence. A length-dependent RoPE scaling
(dynamic NTK, LongRoPE) is frozen at the global length (``RoPE.at_length``).

Layouts (``load_balance``), with 2W chunks of the global sequence, each n / 2 rows:

* ``"zigzag"``: rank r holds chunks r and 2W - 1 - r (torch's head-tail balancer, ring-flash-
  attn's zigzag): under a causal mask every rank then does the same work.
* ``"none"``: rank r holds rows [r n, (r + 1) n) (causal work grows with the rank).

A rank's shard is a few contiguous *segments* of the sequence (two for zigzag), and a step
runs one kernel call per (query segment, key segment) pair that the masks leave anything
visible in, with int start positions: fully masked pairs (a causal future block) are skipped
and the kernels keep their contiguous-position fast paths (tile skipping, no position loads).
With explicit positions each step is one call with position tensors.

Backward: the same ring. K/V travel again, each with the fp32 dK/dV accumulator of its owner,
which every rank adds its share to and passes on; after W steps the accumulators are home.
Each piece's gradients come from the kernels' backward given the *merged* output and LSE
(``launch.attn_bwd``: P = exp(s - LSE) of the whole row, Delta = rowsum(dO * O)), so they are
exactly that piece's share -- no piece is recomputed. The PE parameters' gradients are summed
over the pieces and, by default, all-reduced over the group: every rank then holds the
gradient of the full sequence (``reduce_pe_grads=False`` leaves each rank its own share, for a
data-parallel reduction that sums over this group anyway). Deterministic for a fixed world
size: fixed order of pieces, of ring steps and of the reduction.

Centring (kernels/bias.py, "Centring"): a distance bias is evaluated relative to each query's
nearest visible key. The kernels choose that per call; here one frame serves every piece of a
row -- the nearest visible key over the *whole* sequence -- so that the pieces' LSEs are
comparable and the parameter gradients sum exactly. Default positions put each query's own
position among the keys: the frame is 0, no centring. Explicit positions: the frame is
computed once from all ranks' key positions (gathered, O(S) integers).

Backends: ``"triton"`` (the fused kernels, as above) and the CPU / reference backends (each
piece through ``posattn.attention``; their backward recomputes the piece's forward and takes
its gradients by autograd, weighted by the piece's share of the row). Their LSE is
differentiable; Triton's is not (as in ``posattn.attention``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import api
from .pe import PE, resolve_pe
from .positions import parse_positions

LOAD_BALANCES = ("zigzag", "none")


# --------------------------------------------------------------------------------------------
# the layout: which global rows a rank holds
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """``length`` consecutive rows of a shard, from row ``offset``, at global positions
    ``start`` .. ``start + length - 1``."""
    offset: int
    length: int
    start: int

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.length)


def _check_load_balance(load_balance: str) -> None:
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"load_balance must be one of {LOAD_BALANCES}, got {load_balance!r}")


def segments(n_local: int, rank: int, world_size: int, load_balance: str = "zigzag") -> Tuple[Segment, ...]:
    """The contiguous runs of the global sequence that rank ``rank`` of ``world_size`` holds in a
    shard of ``n_local`` rows. zigzag needs an even ``n_local`` (two chunks of n_local / 2)."""
    _check_load_balance(load_balance)
    if load_balance == "none":
        return (Segment(0, n_local, rank * n_local),)
    if n_local % 2:
        raise ValueError(f"load_balance='zigzag' needs an even shard length (two chunks per rank), "
                         f"got {n_local}")
    c = n_local // 2
    return (Segment(0, c, rank * c), Segment(c, c, (2 * world_size - 1 - rank) * c))


def _group(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("posattn.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group; torchrun sets up its environment)")
    return dist.get_rank(group), dist.get_world_size(group)


def positions(n_local: int, *, group=None, load_balance: str = "zigzag", device=None) -> torch.Tensor:
    """The global positions (n_local,) int64 of this rank's shard rows under ``load_balance``
    (what ring_attention uses when no positions are given)."""
    rank, world = _group(group)
    return torch.cat([torch.arange(s.start, s.start + s.length, dtype=torch.int64, device=device)
                      for s in segments(n_local, rank, world, load_balance)])


def _check_seq_dim(x: torch.Tensor, seq_dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim={seq_dim} is out of range for a {x.dim()}-D tensor {tuple(x.shape)}")
    return seq_dim % x.dim()


def shard(x: torch.Tensor, seq_dim: int, *, group=None, load_balance: str = "zigzag") -> torch.Tensor:
    """This rank's shard of a full tensor ``x`` (the same on every rank), along ``seq_dim``: a view
    for ``"none"``, two chunks concatenated for ``"zigzag"``. Differentiable. The length must
    divide into W ("none") or 2W ("zigzag") equal chunks."""
    _check_load_balance(load_balance)
    seq_dim = _check_seq_dim(x, seq_dim)
    rank, world = _group(group)
    S = x.shape[seq_dim]
    parts = world if load_balance == "none" else 2 * world
    if S % parts:
        raise ValueError(f"a sequence of {S} rows (x.shape[{seq_dim}], x {tuple(x.shape)}) does not split "
                         f"into {parts} equal chunks (load_balance={load_balance!r}, world size {world})")
    n = S // world
    return torch.cat([x.narrow(seq_dim, s.start, s.length)
                      for s in segments(n, rank, world, load_balance)], dim=seq_dim)


class _Unshard(torch.autograd.Function):
    """all_gather of the shards in global order; backward: the gradients of every rank's copy
    summed (all_reduce), then this rank's shard of the sum (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, seq_dim, group, load_balance):
        rank, world = _group(group)
        ctx.seq_dim, ctx.group, ctx.load_balance = seq_dim, group, load_balance
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        n = x.shape[seq_dim]
        if n == 0:
            return torch.cat(parts, dim=seq_dim)
        chunks = {}  # global start -> rows
        for r, part in enumerate(parts):
            for seg in segments(n, r, world, load_balance):
                chunks[seg.start] = part.narrow(seq_dim, seg.offset, seg.length)
        return torch.cat([chunks[s] for s in sorted(chunks)], dim=seq_dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return shard(grad, ctx.seq_dim, group=ctx.group, load_balance=ctx.load_balance), None, None, None


def unshard(x: torch.Tensor, seq_dim: int, *, group=None, load_balance: str = "zigzag") -> torch.Tensor:
    """The full tensor from every rank's shard (an all_gather, reordered to global order); the
    inverse of :func:`shard`. Differentiable: the gradient of a rank's shard is the sum over
    ranks of the gradients of their full copies (so a loss on the full tensor computed on every
    rank counts W times -- compute it on one rank, or divide)."""
    _check_load_balance(load_balance)
    seq_dim = _check_seq_dim(x, seq_dim)
    if load_balance == "zigzag" and x.shape[seq_dim] % 2:
        raise ValueError(f"load_balance='zigzag' shards have an even length, got x.shape[{seq_dim}] = "
                         f"{x.shape[seq_dim]} (x {tuple(x.shape)})")
    return _Unshard.apply(x, seq_dim, group, load_balance)


# --------------------------------------------------------------------------------------------
# the ring: peer-to-peer exchange
# --------------------------------------------------------------------------------------------

class _Ring:
    """Sends to rank + 1 and receives from rank - 1 (group ranks), one batch per exchange."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world

        def glob(r):
            return r if group is None else dist.get_global_rank(group, r)
        self.next, self.prev = glob((rank + 1) % world), glob((rank - 1) % world)

    def start(self, tensors: Sequence[torch.Tensor]):
        """Post sends of ``tensors`` (contiguous) and receives of same-shaped buffers; returns a
        handle for :meth:`finish`."""
        bufs = [torch.empty_like(t) for t in tensors]
        ops = ([dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
               + [dist.P2POp(dist.irecv, b, self.prev, self.group) for b in bufs])
        return dist.batch_isend_irecv(ops), bufs

    @staticmethod
    def finish(handle) -> List[torch.Tensor]:
        reqs, bufs = handle
        for r in reqs:
            r.wait()
        return bufs


# --------------------------------------------------------------------------------------------
# pieces: one (query rows, key rows) pair and the engines that compute them
# --------------------------------------------------------------------------------------------

@dataclass
class _Piece:
    """Query rows ``q_rows`` of this rank's shard against key rows ``k_rows`` of the owner's.
    Positions: ints (the first row's; contiguous) or (B | 1, rows) integer tensors."""
    q_rows: slice
    k_rows: slice
    q_pos: Union[int, torch.Tensor]
    k_pos: Union[int, torch.Tensor]


def _visible(q0: int, q1: int, k0: int, k1: int, causal: bool, window) -> bool:
    """Whether any key position in [k0, k1] is visible to any query position in [q0, q1]."""
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if right is not None and k0 > q1 + right:
        return False
    if left is not None and k1 < q0 - left:
        return False
    return True


class _TritonEngine:
    """The fused kernels, piece by piece (kernels/launch.py), in one centring frame."""
    lse_grad = False

    def __init__(self, spec: PE, q, causal, window, softcap, scale):
        from . import _triton

        self._triton = _triton
        _triton._check_runnable(q)
        self.pe = _triton.kernel_pe(spec, q.shape[3], q.shape[1], q.device, None)
        self.mask = _triton.kernel_mask(causal, window, softcap)
        self.scale = scale
        self.dref = None  # the frame: no centring unless set_frame finds far queries
        # a table bias's gradient is centred per row on one bucket, the same in every piece:
        # the bucket of k - q = 0 (a row's own position; bias.table_grad_centred)
        self.table_ref = None
        if self.pe.buckets is not None:
            self.table_ref = int(self.pe.buckets[self.pe.buckets.shape[0] // 2])
        elif self.pe.bias in _triton.launch.PARAM_TABLES:  # FIRE: at u = 0 (bias.fire_store)
            self.table_ref = 0

    def inputs(self) -> tuple:
        return (self.pe.params,) if self.pe.params is not None else ()

    def set_frame(self, q_pos: torch.Tensor, k_pos_all: torch.Tensor) -> None:
        """Explicit positions: the distance from each query (q_pos (B|1, n)) to its nearest
        visible key among every rank's (k_pos_all (B|1, N)); None when it is 0 everywhere."""
        from .kernels import launch

        pos = launch.KernelPositions(qpos=q_pos, kpos=k_pos_all)
        dref = launch.bias_refs(self.pe, pos, self.mask, q_pos.shape[1], k_pos_all.shape[1], q_pos.device)
        self.dref = None if dref is None or not bool(dref.any()) else dref

    def _pos(self, piece: _Piece):
        from .kernels.launch import KernelPositions

        if isinstance(piece.q_pos, int):
            return KernelPositions(q_start=piece.q_pos, k_start=piece.k_pos)
        return KernelPositions(qpos=piece.q_pos, kpos=piece.k_pos)

    def forward(self, piece: _Piece, q, k, v, acc_dtype):
        from .kernels import launch

        pe = self._triton._detached(self.pe, self.pe.params)
        out, _, row_lse = launch.attn_fwd(q, k, v, pe, self._pos(piece), self.mask, self.scale,
                                          dref=self.dref, out_dtype=acc_dtype)
        return out, row_lse

    def backward(self, piece: _Piece, do, q, k, v, out, lse, dlse, need):
        from .kernels import launch

        pe = self._triton._detached(self.pe, self.pe.params)
        dq, dk, dv, g = launch.attn_bwd(do, q, k, v, out, lse.contiguous(), pe, self._pos(piece),
                                        self.mask, self.scale, bool(need and need[0]),
                                        dref=self.dref, dq_dtype=torch.float32,
                                        table_ref=self.table_ref)
        return dq, dk, dv, [g] if g is not None else []

    def caller_lse(self, lse):
        from .kernels import launch

        return launch.caller_lse(lse, self.pe, self.dref)


class _TorchEngine:
    """The cpu / reference backends, each piece through ``posattn.attention``. Backward
    recomputes the piece and takes its share of the row's gradient by autograd: with
    w = exp(lse_piece - LSE) (the piece's share of the row's softmax mass), the merged output
    O = sum_pieces w o_piece gives dL/do_piece = w dO and dL/dlse_piece = w (dO . o_piece -
    dO . O + dLSE)."""
    lse_grad = True

    def __init__(self, spec: PE, backend, causal, window, softcap, scale):
        self.spec, self.backend = spec, backend
        self.kw = dict(causal=causal, window=window, softcap=softcap, scale=scale)

    def inputs(self) -> tuple:
        return self.spec.tensors()

    def set_frame(self, q_pos, k_pos_all) -> None:
        pass  # (these backends do not centre)

    def _attend(self, piece, q, k, v):
        from . import attention

        return attention(q, k, v, self.spec, q_positions=piece.q_pos,
                         k_positions=piece.k_pos, return_lse=True, backend=self.backend,
                         **self.kw)

    def forward(self, piece, q, k, v, acc_dtype):
        with torch.no_grad():
            out, lse = self._attend(piece, q, k, v)
        return out.to(acc_dtype), lse.to(acc_dtype)

    def backward(self, piece, do, q, k, v, out, lse, dlse, need):
        params = [t for t, n in zip(self.spec.tensors(), need) if n]
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
            o, l = self._attend(piece, q_, k_, v_)
            mdt = lse.dtype
            live = torch.isfinite(l.detach()) & torch.isfinite(lse)
            w = torch.where(live, torch.exp(l.detach().to(mdt) - lse), torch.zeros_like(lse))
            g_l = (do.to(mdt) * o.detach().to(mdt)).sum(-1) - (do.to(mdt) * out.to(mdt)).sum(-1)
            if dlse is not None:
                g_l = g_l + dlse.to(mdt)
            grads = torch.autograd.grad([o, l], [q_, k_, v_, *params],
                                        [(do.to(mdt) * w[..., None]).to(o.dtype), (w * g_l).to(l.dtype)],
                                        allow_unused=True)
        dq, dk, dv = (torch.zeros_like(t) if g is None else g for g, t in zip(grads[:3], (q, k, v)))
        it = iter(grads[3:])
        pg = []
        for t, n in zip(self.spec.tensors(), need):
            if n:
                g = next(it)
                pg.append(torch.zeros_like(t) if g is None else g)
        return dq.to(mdt), dk.to(mdt), dv.to(mdt), pg

    def caller_lse(self, lse):
        return lse


# --------------------------------------------------------------------------------------------
# the plan of one call, and the ring forward / backward
# --------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    ring: _Ring
    engine: object
    q_segs: Tuple[Segment, ...]  # this rank's query segments (explicit: one, start unused)
    n: int  # shard length
    load_balance: str
    causal: bool
    window: object
    reduce_pe_grads: bool
    q_pos: Optional[torch.Tensor] = None  # explicit: (B|1, n)
    k_pos_all: Optional[List[torch.Tensor]] = None  # explicit: every rank's (B|1, n)
    k_ranges: Optional[List[Tuple[int, int]]] = None  # explicit: every rank's (min, max) key position
    q_range: Optional[Tuple[int, int]] = None

    def pieces(self, owner: int) -> List[_Piece]:
        """The (query rows, key rows) pairs of a step whose keys come from rank ``owner``;
        pairs with nothing visible are left out."""
        if self.n == 0:
            return []
        if self.q_pos is not None:  # explicit positions: the whole shard, one call
            (q0, q1), (k0, k1) = self.q_range, self.k_ranges[owner]
            if not _visible(q0, q1, k0, k1, self.causal, self.window):
                return []
            return [_Piece(slice(0, self.n), slice(0, self.n), self.q_pos, self.k_pos_all[owner])]
        out = []
        for qs in self.q_segs:
            for ks in segments(self.n, owner, self.ring.world, self.load_balance):
                if qs.length and ks.length and _visible(qs.start, qs.start + qs.length - 1, ks.start,
                                                        ks.start + ks.length - 1, self.causal, self.window):
                    out.append(_Piece(qs.rows, ks.rows, qs.start, ks.start))
        return out


def _merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:
    """out, lse (views of the running result) <- the softmax-weighted union with piece (o, l)."""
    new = torch.logaddexp(lse, l)
    live = torch.isfinite(new)
    a = torch.where(live, torch.exp(lse - new), torch.zeros_like(new))
    b = torch.where(live, torch.exp(l - new), torch.zeros_like(new))
    out.mul_(a[..., None]).add_(o * b[..., None])
    lse.copy_(new)


def _rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    return t[:, :, rows]


def _ring_forward(plan: _Plan, q, k, v):
    """q (B, Hq, n, D), k, v (B, Hkv, n, D|Dv) -> out (B, Hq, n, Dv) in the accumulation dtype
    (fp32; fp64 for fp64 inputs) and the LSE in the engine's frame."""
    B, Hq, n, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros((B, Hq, n, v.shape[3]), dtype=acc)
    lse = q.new_full((B, Hq, n), float("-inf"), dtype=acc)
    ring, world = plan.ring, plan.ring.world
    kc, vc = k.contiguous(), v.contiguous()
    for step in range(world):
        owner = (ring.rank - step) % world
        handle = ring.start([kc, vc]) if step < world - 1 else None
        for p in plan.pieces(owner):
            o, l = plan.engine.forward(p, _rows(q, p.q_rows), _rows(kc, p.k_rows), _rows(vc, p.k_rows), acc)
            _merge(_rows(out, p.q_rows), lse[:, :, p.q_rows], o, l.to(acc))
        if handle is not None:
            kc, vc = ring.finish(handle)
    return out, lse


def _ring_backward(plan: _Plan, dout, q, k, v, out, lse, dlse, need):
    """Gradients of q, k, v (fp32 accumulators) and of the engine's inputs that ``need`` them."""
    ring, world = plan.ring, plan.ring.world
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros_like(q, dtype=acc)
    pgrads = None
    kc, vc = k.contiguous(), v.contiguous()
    dkv = None  # the handle of the dK/dV accumulators in flight
    for step in range(world):
        owner = (ring.rank - step) % world
        handle = ring.start([kc, vc]) if step < world - 1 else None
        # plain contiguous buffers (they are sent): zeros_like would keep a bshd view's strides
        dk = torch.zeros(kc.shape, dtype=acc, device=kc.device)
        dv = torch.zeros(vc.shape, dtype=acc, device=vc.device)
        for p in plan.pieces(owner):
            r = p.q_rows
            dqp, dkp, dvp, gp = plan.engine.backward(
                p, _rows(dout, r), _rows(q, r), _rows(kc, p.k_rows), _rows(vc, p.k_rows),
                _rows(out, r), lse[:, :, r], None if dlse is None else dlse[:, :, r], need)
            _rows(dq, r).add_(dqp)
            _rows(dk, p.k_rows).add_(dkp)
            _rows(dv, p.k_rows).add_(dvp)
            if pgrads is None:
                pgrads = [g.to(acc) for g in gp]
            else:
                for a, g in zip(pgrads, gp):
                    a.add_(g)
        if dkv is not None:  # the owner's accumulators, from the ranks before this one
            dk_in, dv_in = ring.finish(dkv)
            dk.add_(dk_in)
            dv.add_(dv_in)
        if world > 1:
            dkv = ring.start([dk, dv])
        if handle is not None:
            kc, vc = ring.finish(handle)
    if world > 1:
        dk, dv = ring.finish(dkv)  # this rank's own, after one full turn
    if pgrads is None:  # no piece ran on this rank: its share is zero
        pgrads = [torch.zeros_like(t, dtype=acc) for t, n in zip(plan.engine.inputs(), need) if n]
    if pgrads and plan.reduce_pe_grads and world > 1:  # one all_reduce for every parameter
        shapes = [g.shape for g in pgrads]
        flat = torch.cat([g.flatten() for g in pgrads])
        dist.all_reduce(flat, group=ring.group)
        pgrads = [g.view(s) for g, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes)]
    return dq, dk, dv, pgrads


class _RingAttention(torch.autograd.Function):
    """(q, k, v, plan, *engine inputs) -> (out, lse). Saves q, k, v, out, lse only."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, *pe_inputs):
        out, lse = _ring_forward(plan, q, k, v)
        out = out.to(q.dtype)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        caller = plan.engine.caller_lse(lse)
        if caller is lse:
            caller = lse.clone()  # (an output must not be a saved tensor that is also returned in place)
        if not plan.engine.lse_grad:
            ctx.mark_non_differentiable(caller)
        return out, caller

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need = list(ctx.needs_input_grad[4:])
        if dout is None:
            dout = torch.zeros_like(out)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        if dlse is not None and not bool(dlse.any()):
            dlse = None
        dq, dk, dv, pgrads = _ring_backward(plan, dout, q, k, v, out, lse, dlse, need)
        it = iter(pgrads)
        grads = [next(it).to(t.dtype) if n else None for t, n in zip(plan.engine.inputs(), need)]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, *grads)


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------

def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pe: Union[str, PE, None] = "none",
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    group=None,
    layout: str = "bhsd",
    load_balance: str = "zigzag",
    q_positions: Optional[torch.Tensor] = None,
    k_positions: Optional[torch.Tensor] = None,
    window=None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    reduce_pe_grads: bool = True,
    backend: str = "auto",
):
    """Attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    Args:
        q: this rank's shard, (B, Hq, n, D) for ``layout="bhsd"``, (B, n, Hq, D) for ``"bshd"``.
        k, v: this rank's shards, (B, Hkv, n, D) / (B, Hkv, n, Dv) (or bshd). Every rank's
            shards have the same shapes; Hq a multiple of Hkv.
        pe, causal, scale, window, softcap, layout, backend: as :func:`posattn.attention`,
            for the whole sequence (positions are global).
        group: the process group (default: the world). Any torch.distributed backend with
            point-to-point ops: NCCL on GPUs, gloo on CPUs.
        load_balance: how the sequence was sharded -- ``"zigzag"`` (rank r holds chunks r and
            2W-1-r of 2W; n even) or ``"none"`` (rank r holds rows [r n, (r+1) n)).
            :func:`shard` makes either from a full tensor.
        q_positions, k_positions: optional integer tensors (n,) or (B, n) (or an int: the
            first row's, then contiguous), this shard's *global* positions (both or
            neither); they replace the layout's implied positions (packed documents with
            position resets, gaps, offsets), and load_balance then only names the layout for
            the default positions. Every rank's key positions are gathered
            once per call (O(S) integers).
        return_lse: also return the LSE of the whole row, (B, Hq, n) float32.
        reduce_pe_grads: all-reduce the PE parameters' gradients over ``group`` (default): every
            rank gets the full sequence's gradient. False: each rank keeps its own rows' share
            (the shares sum to it), for a data-parallel gradient reduction that already sums
            over this group -- with True such a reduction would count it W times.

    Returns:
        out, this rank's shard of the output (q's shape and dtype, Dv last), or ``(out, lse)``.

    Every rank must call this with the same arguments (shapes, PE, masks); it exchanges K/V
    with its ring neighbours W - 1 times forward and 2W - 1 times backward.
    """
    if layout not in api._LAYOUTS:
        raise ValueError(f"layout must be one of {api._LAYOUTS}, got {layout!r}")
    if backend not in api._BACKENDS:
        raise ValueError(f"backend must be one of {api._BACKENDS}, got {backend!r}")
    _check_load_balance(load_balance)
    if not isinstance(reduce_pe_grads, bool):
        raise TypeError(f"reduce_pe_grads must be a bool, got {type(reduce_pe_grads).__name__}")
    rank, world = _group(group)
    q, k, v = api._autocast(q, k, v)
    api._check_tensors(q, k, v, layout)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, Hq, n, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"head dim of k ({k.shape[3]}) differs from q ({D}); q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} (bhsd)")
    if k.shape[2] != n or tuple(v.shape[1:3]) != tuple(k.shape[1:3]):
        raise ValueError(f"q, k and v shards must have the same length and k, v the same heads: q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (bhsd)")
    scale = api._check_heads_causal_scale(Hq, k.shape[1], D, v.shape[3], causal, scale)
    window = api._check_window(window)
    softcap = api._check_softcap(softcap)
    if (q_positions is None) != (k_positions is None):
        raise ValueError("ring_attention takes explicit positions for both q and k, or neither "
                         "(q_positions and k_positions)")
    spec = resolve_pe(pe)
    spec.check(Hq, D, q.device)
    spec.check_mask(causal, window)
    backend = api._pick_backend(backend, q)
    ring = _Ring(group, rank, world)

    q_segs = segments(n, rank, world, load_balance)  # (validates zigzag's even length)
    plan = _Plan(ring=ring, engine=None, q_segs=q_segs, n=n, load_balance=load_balance,
                 causal=causal, window=window, reduce_pe_grads=reduce_pe_grads)
    if q_positions is not None:
        # (B, n) int64 each: every rank gathers the others' (same shapes), pieces slice them
        qp, kp = (parse_positions(a, name, B, n, 0, q.device).as_tensor(B, n, q.device).contiguous()
                  for a, name in ((q_positions, "q_positions"), (k_positions, "k_positions")))
        parts = [torch.empty_like(kp) for _ in range(world)]
        dist.all_gather(parts, kp, group=group)
        plan.q_pos, plan.k_pos_all = qp, parts
        max_pos = -1
        if n:
            bounds = torch.stack([torch.stack([p.min(), p.max()]) for p in [qp] + parts])
            q_max = bounds[:1, 1].clone()
            if getattr(spec, "needs_cur_len", False):  # the largest query position of any rank
                dist.all_reduce(q_max, op=dist.ReduceOp.MAX, group=group)
            bounds = bounds.tolist()
            plan.q_range, plan.k_ranges = tuple(bounds[0]), [tuple(b) for b in bounds[1:]]
            max_pos = max(int(q_max.item()), max(b[1] for b in bounds[1:]))
    else:
        max_pos = world * n - 1
    if getattr(spec, "needs_cur_len", False):  # a length-dependent RoPE: the global length
        spec = spec.at_length(max(max_pos + 1, 1))

    if backend == "triton":
        if plan.q_pos is not None and n:  # xPos: the kernels' per-block span (a ValueError)
            from . import _triton
            _triton.check_xpos_span(spec, q.dtype, ("q_positions", plan.q_pos, None),
                                    *(("k_positions", p, None) for p in plan.k_pos_all))
        engine = _TritonEngine(spec, q, causal, window, softcap, scale)
    else:
        if backend == "cpu":
            from . import _cpu
            _cpu.check_runnable(q)
        engine = _TorchEngine(spec, backend, causal, window, softcap, scale)
    plan.engine = engine
    if plan.q_pos is not None and n:
        engine.set_frame(plan.q_pos, torch.cat(plan.k_pos_all, dim=1))

    out, lse = _RingAttention.apply(q, k, v, plan, *engine.inputs())
    lse = lse.float() if q.dtype != torch.float64 else lse
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


__all__ = ["ring_attention", "shard", "unshard", "positions", "segments", "Segment", "LOAD_BALANCES"]
