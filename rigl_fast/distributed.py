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


def gradient_copies(group, sharded: bool) -> int:
    """How many copies of the global batch's gradient a window accumulator holds: DDP's ranks each accumulate
    their local batch's and the sums are added (fold_partial_sums, the update's all-reduce), FSDP2's .grad is
    the ranks' average, one process has one."""
    return 1 if sharded or not active(group) else dist.get_world_size(group)


def loaded_window(accs: List[Optional[torch.Tensor]], saved_copies: Optional[int], group,
                  sharded: bool) -> List[Optional[torch.Tensor]]:
    """Accumulators loaded from a checkpoint, made this run's: rescaled from the saving run's gradient_copies to
    this one's (a window saved by 2 DDP ranks and resumed in one process, or the reverse, would otherwise count
    its first passes twice or half as much as the passes after the resume), then, under DDP, kept on rank 0
    only (zero_unless_rank0). A state dict without the count (older ones) is taken as this run's."""
    now = gradient_copies(group, sharded)
    if saved_copies is not None and saved_copies != now:
        accs = [None if a is None else a * (now / saved_copies) for a in accs]
    return accs if sharded else zero_unless_rank0(accs, group)


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
    all_sum = _group_fns(group)[0]

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
    return _radix(lambda prefix, shift, bits: ops.key_histograms(values, flags, flag_value, prefix.tolist(), shift,
                                                                 bits),
                  lambda thresholds, n_ties: ops.take_top(values, flags, flag_value, thresholds.tolist(),
                                                          n_ties.tolist()),
                  torch.tensor(list(ks), dtype=torch.int64), RADIX_PASSES, all_sum, ties_before)


def _radix(histograms, take, ks: torch.Tensor, passes, all_sum, ties_before):
    """The radix select of `radix_top_k` and `structured_grow`, one row per selection (a layer, or a unit):
    histograms(prefixes, shift, bits) -> this rank's (rows, 2**bits) counts; take(thresholds, n_ties) -> the
    flags. ks, prefixes, thresholds and n_ties are int64 tensors on ks's device."""
    remaining = ks
    prefix = torch.where(remaining > 0, 0, -1)
    local_hist = None
    for shift, bits in passes:
        local_hist = histograms(prefix, shift, bits)
        b, above = _pick_bins(all_sum(local_hist).to(remaining.device), remaining, bits)
        live = prefix >= 0
        remaining = torch.where(live, remaining - above, remaining)
        prefix = torch.where(live, (prefix << bits) | b, prefix)
    live = prefix >= 0
    low = (prefix & ((1 << passes[-1][1]) - 1)).clamp(min=0)[:, None]
    my_ties = torch.where(live, local_hist.to(remaining.device).gather(1, low)[:, 0], 0)
    n_ties = torch.minimum((remaining - ties_before(my_ties)).clamp(min=0), my_ties)
    return take(torch.where(live, prefix, NO_KEY), torch.where(live, n_ties, 0).to(torch.int64))


# ---------------------------------------------------------------- FSDP2: structured layers (structure.py)
# The radix select of units split across shards (transformers' Conv1D: FSDP2 shards its (in, out) weight along
# the fan-in, so every column unit spans the shards): one row of counts per unit, so narrower digits than
# RADIX_PASSES's. 8 passes of 16 bins (the first 8: the key's top 3 bits) of int32 counts.
UNIT_RADIX_PASSES = ((28, 3), (24, 4), (20, 4), (16, 4), (12, 4), (8, 4), (4, 4), (0, 4))


def all_gather_ints(values: Sequence[int], device: torch.device, group=None) -> List[List[int]]:
    """Every rank's `values` (as many on every rank), in rank order: [rank][j]."""
    if not active(group):
        return [list(values)]
    t = torch.tensor(list(values) or [0], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [o.cpu().tolist()[:len(values)] for o in out]


def _group_fns(group):
    """all_sum and ties_before (by rank: shards lie in rank order along dim 0) over `group`."""
    def all_sum(t):
        t = t.clone()
        if active(group):
            dist.all_reduce(t, group=group)
        return t

    def ties_before(mine):
        if not active(group):
            return torch.zeros_like(mine)
        out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, mine, group=group)
        me = dist.get_rank(group)
        return sum(out[:me], torch.zeros_like(mine))

    return all_sum, ties_before


def split_unit_counts(ops, flags: Sequence[torch.Tensor], plans, group=None) -> List[torch.Tensor]:
    """Per layer (plans[i].n_split > 0), the True flags of each of its units split across shards, summed over
    the ranks (one all-reduce for all layers); an empty tensor for the other layers."""
    return _split_counts(ops, flags, plans, _group_fns(group)[0])


def _split_counts(ops, flags, plans, all_sum):
    split = [i for i, p in enumerate(plans) if p is not None and p.n_split]
    out = [torch.zeros(0, dtype=torch.int32) for _ in plans]
    if not split:
        return out
    widths, pieces, n = _split_layout(plans, split)
    counts = all_sum(ops.column_counts([flags[i] for i in split], widths, pieces, n))
    offset = 0
    for i in split:
        out[i] = counts[offset:offset + plans[i].n_split]
        offset += plans[i].n_split
    return out


def _split_layout(plans, split):
    """widths, pieces (unit bases counted over all `split` layers) and the number of split units."""
    widths, pieces, base = [], [], 0
    for i in split:
        p = plans[i]
        widths.append(p.width)
        pieces.append(tuple((lo, hi, base + b) for lo, hi, b in p.pieces))
        base += p.n_split
    return widths, pieces, base


def sharded_structured_grow(ops, scores: Sequence[torch.Tensor], keep: Sequence[torch.Tensor], plans,
                            group=None) -> List[torch.Tensor]:
    """The grow half of a structured update under FSDP2 (see `structured_grow`), with its collectives over
    `group`: per update, one all-reduce of the split units' kept counts (4 bytes a unit), one per
    UNIT_RADIX_PASSES pass (64 bytes a unit) and one all_gather of tie counts (4 bytes a unit and rank); no
    collective at all when no unit is split (row units: Linear, Conv; N:M groups inside the shards)."""
    all_sum, ties_before = _group_fns(group)
    return structured_grow(ops, scores, keep, plans, all_sum, ties_before)


def structured_grow(ops, scores, keep, plans, all_sum, ties_before) -> List[torch.Tensor]:
    """Flat bool grow flags over this rank's shards, per layer: every unit regrows target minus its kept count
    (over the whole unit), the largest |score| among its positions not kept, ties to the lower index within
    the unit: `ops.Backend.unit_grow`'s selection of the whole layer, computed on the shards, bit for bit.

    plans[i] (sharding.UnitPlan) splits layer i's shard in two. Its units that lie inside the shard (all of
    them for row units; the N:M groups between the shard's cuts) grow locally through ops.unit_grow. The units
    split across shards (transposed layers' columns, or their N:M groups that a shard boundary cuts) are
    selected by a radix select with one row per unit (`_radix`, UNIT_RADIX_PASSES): the kept counts are
    summed over the ranks to give each unit's quota r_u; each pass the per-unit digit histograms
    (ops.column_key_histograms) are summed and every rank picks the same bin, so after the last pass each
    unit's threshold key is exact; the ties at it are taken in row order (= flat index order within the unit),
    ranks in order (ties_before), by ops.column_take_top. The keys are the 31-bit |score| patterns of the
    layer-wide selection (-0.0 and +0.0 alike). The bytes sent depend on the number of split units (columns),
    never on the fan-in or on how many weights are dropped."""
    grow: List[Optional[torch.Tensor]] = [None] * len(plans)
    mine = [i for i, p in enumerate(plans) if p.local is not None]
    if mine:
        got = ops.unit_grow([_flat_part(scores[i], *plans[i].local[:2]) for i in mine],
                            [_flat_part(keep[i], *plans[i].local[:2]) for i in mine],
                            [plans[i].local[2] for i in mine])
        for i, g in zip(mine, got):
            lo, hi, _ = plans[i].local
            if lo == 0 and hi == keep[i].numel():
                grow[i] = g.reshape(-1)
            else:
                grow[i] = torch.zeros(keep[i].numel(), dtype=torch.bool, device=keep[i].device)
                grow[i][lo:hi] = g.reshape(-1)
    split = [i for i, p in enumerate(plans) if p.n_split]
    if split:
        widths, pieces, n = _split_layout(plans, split)
        device = keep[split[0]].device
        targets = torch.cat([torch.full((plans[i].n_split,), plans[i].target, dtype=torch.int64) for i in split])
        kept = all_sum(ops.column_counts([keep[i] for i in split], widths, pieces, n))
        vals, flags = [scores[i] for i in split], [keep[i] for i in split]
        taken = _radix(lambda prefix, shift, bits: ops.column_key_histograms(vals, flags, False, widths, pieces,
                                                                             prefix, shift, bits),
                       lambda thresholds, n_ties: ops.column_take_top(vals, flags, False, widths, pieces,
                                                                      thresholds, n_ties),
                       targets.to(device) - kept.to(device, torch.int64), UNIT_RADIX_PASSES, all_sum, ties_before)
        for i, t in zip(split, taken):
            if grow[i] is None:
                grow[i] = t
            else:
                grow[i] |= t
    return [torch.zeros(k.numel(), dtype=torch.bool, device=k.device) if g is None else g
            for g, k in zip(grow, keep)]


def _flat_part(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat if lo == 0 and hi == flat.numel() else flat[lo:hi]
