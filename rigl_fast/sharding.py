"""FSDP2 layouts: which weights are sharded, where each rank's shard sits in its layer, and the sharded
initial masks. No collectives here (they are in distributed.py), and no tensor math on whole layers (the
scheduler's whole-layer CPU draw at construction, one layer at a time, is cut down to a shard by `shard_of`).

FSDP2 (`fully_shard`) makes every parameter a DTensor sharded along dim 0 over a 1-D device mesh (HSDP: over
one dimension of a 2-D mesh, replicated over the other): rank r of the shard group holds rows
[r * ceil(d0 / world), ...) of it, so its shard is a contiguous range of the layer's flat
(row-major) indices, and shards lie in rank order. Masks and gradient accumulators are DTensors with their
weight's mesh and placements; the ops only ever see the local shards.

Structured layers (structure.py): a Linear's or Conv's units are rows, so each lies in one shard. A transformers
Conv1D stores (in, out), so dim 0 is its fan-in: its column units (fan_in) span the shards, and so do its N:M
groups where a shard boundary is not a multiple of M. `unit_plan` says, per rank, which units it grows alone
and which it selects with the other ranks (`distributed.structured_grow`).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .ops import Units

try:  # torch.distributed may be built out (some macOS / Windows wheels)
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None

INIT_DRAWS = ("global", "local")


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (a view: writes reach the DTensor), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


def check_layout(names: Sequence[str], weights: Sequence[torch.Tensor], sparse: Sequence[bool]) -> bool:
    """True if the sparse weights are sharded (FSDP2), False if none is; raises, naming the layer, for the
    layouts rigl_fast does not handle: a mix of sharded and plain sparse weights, a mesh of more than one
    dimension, a placement other than Shard(0) (FSDP2's default), or sparse weights on different meshes."""
    flags = [is_sharded(w) for w, s in zip(weights, sparse) if s]
    if not any(flags):
        return False
    if not all(flags):
        plain = [n for n, w, s in zip(names, weights, sparse) if s and not is_sharded(w)]
        raise ValueError(f"model: some sparse weights are FSDP2 DTensors and some are not ({plain[0]!r} is a plain "
                         "tensor); apply fully_shard to the whole model (the root module) before creating the "
                         "RigLScheduler, or exclude= the unsharded layers")
    mesh = placements = None
    for n, w, s in zip(names, weights, sparse):
        if not s:
            continue
        shards = [p for p in w.placements if not p.is_replicate()]
        if shards != [Shard(0)]:
            raise ValueError(f"layer {n!r}: rigl_fast handles FSDP2 weights sharded along dim 0 over one mesh "
                             "dimension (fully_shard's default; HSDP's replicated dimension too); this one has "
                             f"placements {tuple(w.placements)}")
        if mesh is None:
            mesh, placements = w.device_mesh, tuple(w.placements)
        elif w.device_mesh != mesh or tuple(w.placements) != placements:
            raise ValueError(f"layer {n!r}: every sparse weight must be sharded alike, over the same device mesh")
    return True


class UnitPlan(NamedTuple):
    """How one rank selects a structured layer's growth (`distributed.structured_grow`). `local`: (lo, hi,
    units): the flat range [lo, hi) of the shard whose units lie wholly in it, and those units (of the range,
    viewed on its own), or None. The units split across shards: `pieces`, (row_lo, row_hi, unit) per part
    of them on this shard (rows of the shard viewed (rows, width): position (r, c) is in unit `unit + c`),
    `n_split` of them in the layer (the same on every rank), each holding `target` active positions."""
    local: Optional[Tuple[int, int, Units]]
    width: int
    pieces: Tuple[Tuple[int, int, int], ...]
    n_split: int
    target: int


def row_range(w) -> Tuple[int, int]:
    """(first row, rows) of this rank's shard of DTensor `w` along dim 0."""
    start, length = flat_range(w)
    width = math.prod(w.shape[1:])
    return (start // width if length else 0), local(w).shape[0]


def unit_plan(w, u: Optional[Units], cuts: Optional[Sequence[int]]) -> Optional[UnitPlan]:
    """Layer `w`'s UnitPlan on this rank (None for an unstructured layer); see `plan_for`."""
    if u is None:
        return None
    start, rows = row_range(w)
    return plan_for(tuple(w.shape), start, rows, u, cuts or ())


def plan_for(shape: Sequence[int], start: int, rows: int, u: Units, cuts: Sequence[int]) -> UnitPlan:
    """The UnitPlan of the shard holding rows [start, start + rows) of a layer of `shape`. `cuts`: every
    rank's shard boundaries along dim 0 (row indices). Row units (Linear, Conv) lie in their shard. A
    transposed layer (transformers' Conv1D, (in, out)) is cut along its fan-in: its column units (fan_in) are
    split as soon as there is more than one shard; its N:M groups (M consecutive rows) only where a boundary
    is not a multiple of M, so the groups between this shard's cuts stay local."""
    length = rows * math.prod(shape[1:])
    if not u.transposed:
        return UnitPlan((0, length, u._replace(out=rows)), math.prod(shape[1:]), (), 0, u.target)
    d0, out = u.fan_in, u.out
    inner = sorted({c for c in cuts if 0 < c < d0})
    if u.group == u.fan_in:  # one unit per column (fan_in, or N:M with M == fan-in)
        if not inner:  # one shard holds the whole layer
            return UnitPlan((0, length, u) if rows else None, out, (), 0, u.target)
        return UnitPlan(None, out, ((0, rows, 0),) if rows else (), out, u.target)
    m = u.group
    straddled = sorted({c // m for c in inner if c % m})
    n_split = len(straddled) * out
    if not rows:
        return UnitPlan(None, out, (), n_split, u.target)
    a, e = start, start + rows
    first, last = -(-a // m), e // m  # the groups wholly inside [a, e)
    inside = None
    if last > first:
        inside = ((first * m - a) * out, (last * m - a) * out, Units(out, (last - first) * m, True, m, u.target))
    pieces = tuple((max(a, b * m) - a, min(e, (b + 1) * m) - a, straddled.index(b) * out)
                   for b in sorted({a // m, (e - 1) // m}) if b in straddled)
    return UnitPlan(inside, out, pieces, n_split, u.target)


def group(weights: Sequence[torch.Tensor]):
    """The process group the sparse weights are sharded over: the mesh dimension holding Shard(0). Under HSDP
    the replicas (the other dimension) hold equal shards and equal gradients, so each replica group selects
    the same masks on its own."""
    w = weights[0]
    dim = next(i for i, p in enumerate(w.placements) if not p.is_replicate())
    return w.device_mesh.get_group(dim)


def flat_range(w) -> Tuple[int, int]:
    """(offset, length): this rank's shard of DTensor `w` as a range of the layer's flat indices."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    length = math.prod(shape)
    return (offset[0] * math.prod(w.shape[1:]) if length else 0), length


def like(w, local_tensor: torch.Tensor):
    """A DTensor with `w`'s mesh, placements and global shape around this rank's `local_tensor`."""
    return DTensor.from_local(local_tensor, w.device_mesh, w.placements, run_check=False, shape=w.shape,
                              stride=w.stride())


def shard_of(w, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full`, a tensor of the whole layer (a checkpoint written by one process), as a
    contiguous tensor shaped like the local shard of `w`."""
    start, length = flat_range(w)
    return full.reshape(-1)[start:start + length].reshape(local(w).shape).clone()


def _shard_generator(w, seed: int, layer: int) -> torch.Generator:
    """A generator of this rank's own, seeded by (seed, layer, shard offset): shard-local draws."""
    start, _ = flat_range(w)
    return torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + start) % (2 ** 63))


def local_draw(w, sparsity: float, seed: int, layer: int, units: Optional[Units] = None,
               plan: Optional[UnitPlan] = None) -> torch.Tensor:
    """A shard-local draw for layers too large for a whole-layer draw: the layer still has exactly int(S * n)
    inactive positions, spread over the shards in proportion to their size, each shard drawing its own from a
    generator seeded by (seed, layer, shard offset). Reproducible, but not the draw one process would make.
    Structured (`units`, and the layer's `plan`): every unit exactly its count. Row units lie in the shard. A
    transposed layer's columns (fan_in) are split over the shards, each shard's part of every column holding
    c * end // fan_in - c * start // fan_in of the column's c; its N:M groups cut by a shard boundary are
    each drawn whole, by every rank holding part of it, from a generator seeded by (seed, layer, group)."""
    n = w.numel()
    zeros = int(sparsity * n)
    start, length = flat_range(w)
    shape, device = local(w).shape, local(w).device
    g = _shard_generator(w, seed, layer)
    if units is not None:
        from .structure import draw
        a, rows = row_range(w)
        if not units.transposed:
            flat = draw(units._replace(out=rows), g)
        elif not rows:
            flat = torch.zeros(0, dtype=torch.bool)
        elif units.group == units.fan_in:
            c = units.target * (a + rows) // units.fan_in - units.target * a // units.fan_in
            flat = draw(Units(units.out, rows, True, rows, c), g)
        else:
            flat = torch.zeros(length, dtype=torch.bool)
            if plan.local is not None:
                lo, hi, u = plan.local
                flat[lo:hi] = draw(u, g)
            m, out = units.group, units.out
            for lo, hi, _ in plan.pieces:
                b = (a + lo) // m
                gb = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + 7_919 * (b + 1)
                                                    + (1 << 40)) % (2 ** 63))
                whole = draw(Units(out, m, True, m, units.target), gb).view(m, out)
                flat[lo * out:hi * out] = whole[a + lo - b * m:a + hi - b * m].reshape(-1)
        return flat.reshape(shape).to(device)
    mine = zeros * (start + length) // n - zeros * start // n
    flat = torch.ones(length, dtype=torch.bool)
    flat[torch.randperm(length, generator=g)[:mine]] = False
    return flat.reshape(shape).to(device)


def masks_like(weights: Sequence[torch.Tensor], locals_: Sequence[Optional[torch.Tensor]]) -> List:
    return [None if m is None else like(w, m) for w, m in zip(weights, locals_)]


def local_rand(w, seed: int, layer: int) -> torch.Tensor:
    """SET's random grow scores for this rank's shard, from a generator seeded by (seed, layer, shard
    offset): reproducible, shard-local, not the draw one process would make."""
    return torch.rand(local(w).shape, generator=_shard_generator(w, seed, layer)).to(local(w).device)


def fit(w, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor from a state dict (a DTensor laid out like `w`, e.g. loaded by torch.distributed.checkpoint,
    or a whole-layer tensor written by one process) as a fresh DTensor laid out like `w`."""
    if is_sharded(t):
        if t.device_mesh != w.device_mesh or tuple(t.placements) != tuple(w.placements):
            raise ValueError(f"state_dict: a sharded tensor has placements {tuple(t.placements)} on another mesh "
                             f"than its weight ({tuple(w.placements)}); load it with torch.distributed.checkpoint "
                             "into pruner.state_dict() of this model, which reshards it")
        mine = t.to_local()
    else:
        mine = shard_of(w, t)
    return like(w, mine.detach().to(device=local(w).device, dtype=dtype).clone().contiguous())
