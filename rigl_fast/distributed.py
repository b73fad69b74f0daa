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
