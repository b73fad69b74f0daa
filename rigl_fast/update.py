"""The topology update (SPEC section 4) and the dense-gradient window it reads: one path for every layout,
with the selection as a strategy: `_Whole` (each rank holds whole layers: one process, DDP) calls the
backend's update; `_Sharded` (FSDP2) runs the exact global selection on the shards (distributed.py).

A layer without gradient: a sparse layer whose grow score is zero everywhere (after the DDP sum, or on every
shard under FSDP2: the same decision on every rank) got no gradient in the window: its hook never ran (an
unused branch, an MoE expert no token reached) or every gradient it saw was exactly zero. It has no signal to
grow by (all its scores would tie at 0 and it would regrow at its lowest free indices), so it keeps its mask
at that update, drop and grow both skipped, while the other layers update; `stats()` counts it. If no sparse
layer has a gradient, the whole update is skipped (and counted in `skipped_updates`)."""
from __future__ import annotations

import warnings

import torch

from . import distributed as _dist
from . import sharding as _sharding

NO_GRAD = "no gradient was accumulated: call loss.backward() before pruner()"
ALL_ZERO = "every sparse layer's accumulated gradient is zero"


class _Way:
    """What both strategies share: the layers of this update (`idx`, positions in the scheduler's lists) and
    their weights, masks and scores, all local tensors; `quiet`: per layer, no gradient in the window."""

    def keep_only(self, keep):
        """Drop the layers not in `keep` (positions in idx) from this update."""
        for name in ("idx", "weights", "masks", "scores"):
            setattr(self, name, [x for k, x in enumerate(getattr(self, name)) if k in keep])


class _Whole(_Way):
    """Whole layers on every rank. Under DDP the grow scores are summed over the ranks (one all-reduce); the
    non-finite check is folded into the backend's update (`checked_update`)."""
    nonfinite_why = "non-finite weights or gradients, e.g. an fp16 overflow"

    def __init__(self, p, idx):
        if p._devices_moved():
            p._follow_devices()
        self.p, self.idx = p, idx
        self.weights = [p.W[i] for i in idx]
        self.masks = [p.backward_masks[i] for i in idx]
        self.scores = None
        self.quiet = [False] * len(idx)

    def random_scores(self):
        g = self.p._generator
        self.scores = [torch.rand(w.shape, generator=g).to(w.device) for w in self.weights]

    def gradient_scores(self, accs) -> bool:
        have_grad = any(a is not None for a in accs)
        distributed = _dist.active(self.p.process_group)
        if have_grad or distributed:
            self.scores = [torch.zeros_like(w) if a is None else a for w, a in zip(self.weights, accs)]
        if distributed:  # every rank must reach the all-reduce, so the skip decision is taken after it
            have_grad = _dist.sum_scores(self.scores, have_grad, self.p.process_group)
        if have_grad:  # on the summed scores: every rank decides alike
            self.quiet = [not x for x in self.p._ops.any_nonzero(self.scores)]
        return have_grad

    def nonfinite(self) -> bool:
        return False  # checked by the backend's update

    def apply(self, n_keep, n_grow) -> bool:
        p, idx = self.p, self.idx
        states = [p._states_like(w) for w in self.weights]
        grads = [w.grad for w in self.weights]
        if p._units[idx[0]] is not None:  # a structure applies to every sparse layer
            return p._ops.checked_structured_update(self.weights, self.masks, self.scores, n_keep,
                                                    [p._units[i] for i in idx], states, grads)
        return p._ops.checked_update(self.weights, self.masks, self.scores, n_keep, n_grow, states, grads)


class _Sharded(_Way):
    """FSDP2: the same selection over the whole of each layer, computed on the shards
    (distributed.sharded_top_k). The accumulators hold the global gradient already: no all-reduce of scores.
    Every rank takes every decision from all-reduced flags, so all skip together."""
    nonfinite_why = "non-finite weights or gradients on some rank, e.g. an fp16 overflow"

    def __init__(self, p, idx):
        self.p, self.idx = p, idx
        self.weights = [p._local_weight(i) for i in idx]
        self.masks = [p._local_mask(i) for i in idx]
        self.scores = None
        self.bad = False
        self.quiet = [False] * len(idx)

    def random_scores(self):
        seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, generator=self.p._generator))
        self.scores = [_sharding.local_rand(self.p.W[i], seed, i) for i in self.idx]
        self.bad = self._agree(True)[1]

    def gradient_scores(self, accs) -> bool:
        self.scores = [torch.zeros_like(w) if a is None else _sharding.local(a) for w, a in zip(self.weights, accs)]
        nonzero = self.p._ops.any_nonzero(self.scores)
        have_grad, self.bad, *nonzero = self._agree(any(a is not None for a in accs), nonzero)
        self.quiet = [not x for x in nonzero]
        return have_grad

    def _agree(self, have_grad, more=()):
        """[have_grad, bad, *more], each true if it is on any rank: one all-reduce."""
        bad = self.p._ops.any_nonfinite(self.weights + self.scores)
        return _dist.any_rank([have_grad, bad, *more], self.weights[0].device, self.p.process_group)

    def nonfinite(self) -> bool:
        return self.bad

    def apply(self, n_keep, n_grow) -> bool:
        p, idx = self.p, self.idx
        offsets = [_sharding.flat_range(p.W[i])[0] for i in idx]
        keep = _dist.sharded_top_k(p._ops, self.weights, self.masks, True, n_keep, offsets, p.process_group)
        if p._units[idx[0]] is not None:  # structured: per unit, local where the unit lies in the shard
            grow = _dist.sharded_structured_grow(p._ops, self.scores, keep, [p._plans[i] for i in idx],
                                                 p.process_group)
        else:
            grow = _dist.sharded_top_k(p._ops, self.scores, keep, False, n_grow, offsets, p.process_group)
        p._ops.commit(self.weights, self.masks, keep, grow, [p._states_like(p.W[i]) for i in idx],
                      [None if p.W[i].grad is None else _sharding.local(p.W[i].grad) for i in idx])
        return True


@torch.no_grad()
def rigl_step(p) -> None:
    """One topology update of every sparse layer of scheduler `p` (at step p.step), or a counted skip."""
    idx = p._sparse_layers()
    if not idx:
        return
    way = (_Sharded if p._sharded else _Whole)(p, idx)
    if p.grow_mode == "random":
        way.random_scores()
    else:
        accs = [p.backward_hook_objects[i].dense_grad for i in idx]
        free_dense_grads(p)
        if not way.gradient_scores(accs):
            return skip(p, NO_GRAD)
    if way.nonfinite():
        return skip(p, way.nonfinite_why)
    quiet = [i for i, q in zip(idx, way.quiet) if q]
    if len(quiet) == len(idx):
        return skip(p, ALL_ZERO)
    if quiet:
        way.keep_only({k for k, q in enumerate(way.quiet) if not q})
    n_keep, n_grow = drop_counts(p, way.idx, p.cosine_annealing())
    if not way.apply(n_keep, n_grow):
        return skip(p, way.nonfinite_why)
    p._last_update = [(i, g, p._n_active[i]) for i, g in zip(way.idx, n_grow)]
    p._layers_without_grad = quiet
    if quiet and not p._warned_no_grad:
        p._warned_no_grad = True
        names = ", ".join(p.names[i] for i in quiet[:4]) + (", ..." if len(quiet) > 4 else "")
        warnings.warn(f"rigl_fast: at the topology update of step {p.step}, {len(quiet)} sparse layer(s) got no "
                      f"gradient in the window ({names}): they keep their masks, the others update; "
                      "stats()['layers_without_grad'] counts them at every update (this warning is shown once)",
                      RuntimeWarning, stacklevel=4)


def drop_counts(p, idx, drop_fraction):
    """(n_keep, n_grow) per layer of `idx`: n_drop = int(n_active * drop_fraction) is dropped and regrown."""
    n_keep, n_grow = [], []
    for i in idx:
        n_drop = int(p._n_active[i] * drop_fraction)
        n_keep.append(p._n_active[i] - n_drop)
        n_grow.append(n_drop)
    return n_keep, n_grow


def skip(p, why) -> None:
    p.skipped_updates += 1
    warnings.warn(f"rigl_fast: topology update at step {p.step} skipped ({why}); masks unchanged "
                  f"({p.skipped_updates} skipped so far)", RuntimeWarning, stacklevel=4)


def free_dense_grads(p) -> None:
    for hook in p.backward_hook_objects:
        hook.dense_grad = None


# ---------------------------------------------------------------- the window's gradients before an update
def fold_sharded(p) -> None:
    """FSDP2, at the end of a step inside the accumulation window (before an update, which reads the
    accumulators): the step's dense gradient (the masked .grad as the hook left it plus the off-mask part it
    kept: hooks.ShardedMaskHook) is accumulated, acc += dense / n."""
    for i in p._sparse_layers():
        h = p.backward_hook_objects[i]
        if h.off is None or p.W[i].grad is None:  # no backward pass reached this layer in this step
            h.off = h.seen = None
            continue
        if h.dense_grad is None:
            h.dense_grad = _sharding.like(p.W[i], torch.zeros_like(h.off))
        p._ops.fold_grad(_sharding.local(h.dense_grad), h.seen, h.off, p.grad_accumulation_n)
        h.off = h.seen = None


def fold_partial(p) -> None:
    """DDP, at the end of a step inside an accumulation window that is not an update: rank 0 takes the sum of
    the ranks' partial accumulators, so a checkpoint rank 0 writes now restores the window exactly
    (distributed.fold_partial_sums)."""
    idx = p._sparse_layers()
    if not idx:
        return
    hooks = [p.backward_hook_objects[i] for i in idx]
    folded = _dist.fold_partial_sums([h.dense_grad for h in hooks], [p.W[i] for i in idx], p.process_group)
    for h, a in zip(hooks, folded):
        h.dense_grad = a
