"""FSDP2 layouts: which weights are sharded, where each rank's shard sits in its layer, and the sharded
initial masks. No collectives here (they are in distributed.py), and no tensor math on whole layers (the
scheduler's whole-layer CPU draw at construction, one layer at a time, is cut down to a shard by `shard_of`).

FSDP2 (`fully_shard`) makes every parameter a DTensor sharded along dim 0 over a 1-D device mesh (HSDP: over
one dimension of a 2-D mesh, replicated over the other): rank r of the shard group holds rows
[r * ceil(d0 / world), ...) of it, so its shard is a contiguous range of the layer's flat
(row-major) indices, and shards lie in rank order. Masks and gradient accumulators are DTensors with their
weight's mesh and placements; the ops only ever see the local shards.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

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


def check_units(names: Sequence[str], units) -> None:
    """Structured layers under FSDP2 select per unit on each shard, so a unit must lie in one shard: rows do
    (dim-0 sharding), transformers' Conv1D columns do not."""
    for n, u in zip(names, units):
        if u is not None and u.transposed:
            raise ValueError(f"layer {n!r}: structure= with FSDP2 needs each unit (a row of the weight) inside one "
                             "shard, but transformers' Conv1D stores (in, out) and its units are columns, split "
                             "across shards; keep it dense with exclude=, or use structure='unstructured'")


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


def local_draw(w, sparsity: float, seed: int, layer: int, units=None) -> torch.Tensor:
    """A shard-local draw for layers too large for a whole-layer draw: the layer still has exactly int(S * n)
    inactive positions, spread over the shards in proportion to their size (structured: `units` of the shard,
    each unit exactly its count), each shard drawing its own from a generator seeded by (seed, layer, shard
    offset). Reproducible, but not the draw one process would make."""
    n = w.numel()
    zeros = int(sparsity * n)
    start, length = flat_range(w)
    g = _shard_generator(w, seed, layer)
    if units is not None:
        from .structure import draw
        return draw(units, g).reshape(local(w).shape).to(local(w).device)
    mine = zeros * (start + length) // n - zeros * start // n
    flat = torch.ones(length, dtype=torch.bool)
    flat[torch.randperm(length, generator=g)[:mine]] = False
    return flat.reshape(local(w).shape).to(local(w).device)


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
