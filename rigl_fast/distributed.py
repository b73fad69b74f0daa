"""Every collective rigl_fast issues, in one place (backends never talk to other ranks).

All tensors sent are on the weights' device (NCCL needs CUDA tensors, gloo takes CPU ones), and every
function is called on every rank in the same order, so no rank waits on a collective another rank skips.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


def active(group=None) -> bool:
    """True under an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def check_group(group) -> None:
    """`process_group` must be None (the world) or a ProcessGroup this rank belongs to."""
    if group is None:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised: call "
                         "init_process_group first, or leave process_group=None")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. from dist.new_group), "
                        f"got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("process_group: this rank is not a member of the group it was given")


def _src(group) -> int:
    """The global rank of the group's first member (collectives name their source by global rank)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def broadcast_masks(masks: Sequence[Optional[torch.Tensor]], group=None) -> None:
    """Every rank ends with the group's first rank's masks (initial masks only: later masks agree without
    being sent)."""
    if not active(group):
        return
    for m in masks:
        if m is not None:
            buf = m.to(torch.uint8)
            dist.broadcast(buf, _src(group), group=group)
            m.copy_(buf.bool())


def broadcast_seed(seed: int, device: torch.device, group=None) -> int:
    """Rank 0's seed on every rank (SET's generator)."""
    if not active(group):
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, _src(group), group=group)
    return int(t.item())


def _all_reduce_flat(tensors: Sequence[torch.Tensor], extra: float, group=None) -> float:
    """Sums `tensors` (in place) and the number `extra` over the ranks, in one all-reduce."""
    flag = torch.full((1,), float(extra), dtype=tensors[0].dtype, device=tensors[0].device)
    flat = torch.cat([t.reshape(-1) for t in tensors] + [flag])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return float(flat[-1])


def sum_scores(tensors: Sequence[torch.Tensor], have_grad: bool, group=None) -> bool:
    """Grow scores are the gradient summed over ranks: one all-reduce of all layers' accumulators, with
    one more element counting the ranks that accumulated anything. Returns whether any rank did."""
    return _all_reduce_flat(tensors, float(have_grad), group) > 0


def fold_partial_sums(accs: List[Optional[torch.Tensor]], weights: Sequence[torch.Tensor],
                      group=None) -> List[Optional[torch.Tensor]]:
    """Inside an accumulation window of more than one backward pass, after each pass but the last: the
    ranks' partial accumulators are summed onto rank 0 and the other ranks restart from zero. The total
    over ranks is unchanged (the update's all-reduce still sums them), but rank 0 now holds all of it, so a
    checkpoint written by rank 0 alone restores the window exactly on every rank (`zero_unless_rank0`).
    A rank without an accumulator for a layer sends zeros (every rank takes part)."""
    if not active(group):
        return accs
    filled = [torch.zeros_like(w) if a is None else a for a, w in zip(accs, weights)]
    _all_reduce_flat(filled, 0.0, group)
    if rank(group) != 0:
        for t in filled:
            t.zero_()
    return filled


def zero_unless_rank0(accs: List[Optional[torch.Tensor]], group=None) -> List[Optional[torch.Tensor]]:
    """Accumulators loaded from a checkpoint hold the whole window's sum (see `fold_partial_sums`): rank 0
    keeps it, the other ranks start from zero, so the update's all-reduce counts it once."""
    if not active(group) or rank(group) == 0:
        return accs
    return [None if a is None else torch.zeros_like(a) for a in accs]


# ---------------------------------------------------------------- FSDP2: sharded weights (see sharding.py)
# The digit widths of the radix select over 31-bit keys: 3 passes, 2048 + 1024 + 1024 bins per layer. The
# bytes sent per update depend on the number of layers, never on their size.
RADIX_PASSES = ((20, 11), (10, 10), (0, 10))
NO_KEY = 1 << 31  # a threshold above every key: selects nothing


def broadcast_rng_state(device: torch.device, group=None) -> torch.Tensor:
    """The group's first rank's global CPU RNG state, on every rank (the initial draws of a sharded model)."""
    state = torch.get_rng_state()
    if not active(group):
        return state
    buf = state.to(device)
    dist.broadcast(buf, _src(group), group=group)
    return buf.cpu()


def sum_counts(counts: Sequence[int], device: torch.device, group=None) -> List[int]:
    """Integers summed over the ranks (e.g. the active positions of each layer, counted per shard)."""
    t = torch.tensor(list(counts), dtype=torch.int64, device=device)
    if active(group) and t.numel():
        dist.all_reduce(t, group=group)
    return [int(v) for v in t.tolist()]


def any_rank(flags: Sequence[bool], device: torch.device, group=None) -> List[bool]:
    """For each flag, whether it is set on any rank: one all-reduce for all of them."""
    return [v > 0 for v in sum_counts([int(bool(f)) for f in flags], device, group)]


def _pick_bins(hist: torch.Tensor, remaining: torch.Tensor, bits: int):
    """Per row, the highest bin b at which the count of bins >= b reaches `remaining` (> 0), and the count
    of the bins above b. Rows with remaining <= 0 are not used by the caller."""
    above_or_at = hist.flip(1).cumsum(1)  # column j: count in bins >= 2**bits - 1 - j
    j = (above_or_at < remaining[:, None]).sum(1).clamp(max=(1 << bits) - 1)
    above = torch.where(j > 0, above_or_at.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], 0)
    return (1 << bits) - 1 - j, above


def sharded_top_k(ops, values: Sequence[torch.Tensor], flags: Sequence[torch.Tensor], flag_value: bool,
                  ks: Sequence[int], offsets: Sequence[int], group=None) -> List[torch.Tensor]:
    """The exact global selection of an update under FSDP2, for every layer at once: flat bool flags over
    this rank's shards marking, per layer, the ks[i] largest keys (|values|) among eligible positions (flags
    == flag_value) of the whole layer, ties to the lower global flat index. offsets[i] is where this rank's
    shard of layer i starts in the layer's flat indices. `radix_top_k` is the algorithm; this supplies its
    two collectives. Volume: 2**bits * 8 bytes per layer and pass, plus 16 bytes per layer and rank."""
    device = values[0].device

    def all_sum(hist):
        hist = hist.clone()
        if active(group):
            dist.all_reduce(hist, group=group)
        return hist

    def ties_before(my_ties):
        if not active(group):
            return torch.zeros_like(my_ties)
        mine = torch.stack([torch.tensor(list(offsets), dtype=torch.int64), my_ties]).to(device)  # (2, L)
        world = dist.get_world_size(group)
        out = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(out, mine, group=group)
        every = torch.stack([o.cpu() for o in out])  # (world, 2, L)
        me = dist.get_rank(group)
        start = every[me, 0]
        before = (every[:, 0, :] < start) | ((every[:, 0, :] == start) & (torch.arange(world)[:, None] < me))
        return (every[:, 1, :] * before).sum(0)

    return radix_top_k(ops, values, flags, flag_value, ks, all_sum, ties_before)


def radix_top_k(ops, values, flags, flag_value: bool, ks: Sequence[int], all_sum, ties_before) -> List[torch.Tensor]:
    """`sharded_top_k`'s algorithm, on one rank, with its two collectives as functions: all_sum(t) is the
    elementwise sum of t over the ranks; ties_before(counts) is, per layer, the sum of `counts` over the
    ranks whose shards come before this rank's.

    A radix select over the 31-bit keys: each pass the ranks' digit histograms (ops.key_histograms) are
    summed and every rank picks the same bin; after the last pass the threshold key is known exactly, and so
    is how many of the keys equal to it are taken. Those ties go in global index order: ties_before says how
    many lie in earlier shards, and ops.take_top takes the rest of the quota from this shard's first ties."""
    remaining = torch.tensor(list(ks), dtype=torch.int64)
    prefix = torch.where(remaining > 0, 0, -1)
    local_hist = None
    for shift, bits in RADIX_PASSES:
        local_hist = ops.key_histograms(values, flags, flag_value, prefix.tolist(), shift, bits)
        b, above = _pick_bins(all_sum(local_hist).cpu(), remaining, bits)
        live = prefix >= 0
        remaining = torch.where(live, remaining - above, remaining)
        prefix = torch.where(live, (prefix << bits) | b, prefix)
    live = prefix >= 0
    low = (prefix & ((1 << RADIX_PASSES[-1][1]) - 1)).clamp(min=0)[:, None]
    my_ties = torch.where(live, local_hist.cpu().gather(1, low)[:, 0], 0)
    n_ties = torch.minimum((remaining - ties_before(my_ties)).clamp(min=0), my_ties)
    return ops.take_top(values, flags, flag_value, torch.where(live, prefix, NO_KEY).tolist(),
                        torch.where(live, n_ties, 0).tolist())
