"""The per-weight gradient hooks (masking, and the dense-gradient window) and the registry of which scheduler
owns which weight."""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional

import torch

from . import sharding as _sharding

# id(parameter) -> the scheduler it is registered to. Kept here, not as an attribute of the parameter, so that
# a pickled model (torch.save(model)) does not carry its registration into the copy, which has no hooks; and
# by id, with a weak reference to the scheduler rather than to the parameter, because torch.utils.swap_tensors
# (module.to() under torch.__future__.set_swap_module_params_on_conversion) refuses tensors with weakrefs.
_REGISTERED: Dict[int, "weakref.ref"] = {}


def registered_to(w):
    """The live scheduler `w` is registered to, or None."""
    ref = _REGISTERED.get(id(w))
    s = None if ref is None else ref()
    if s is None or not s._handles or not any(x is w for x in s.W):
        return None  # a stale entry: its scheduler is gone or removed, or the id now names another tensor
    return s


def check_unregistered(names, W) -> None:
    """Raises if a weight already has a scheduler's hooks (rigl_fast's or rigl-torch's)."""
    for name, w in zip(names, W):
        rigl_torch_hooked = getattr(w, "_has_rigl_backward_hook", False) and w._backward_hooks
        if registered_to(w) is not None or rigl_torch_hooked:
            raise ValueError(f"model is already registered to a RigLScheduler (weight {name!r} has its "
                             "hooks); call .remove() on the old scheduler first")


def register(pruner) -> None:
    for key in [k for k, r in _REGISTERED.items() if r() is None]:  # schedulers garbage-collected
        del _REGISTERED[key]
    me = weakref.ref(pruner)
    for w in pruner.W:
        _REGISTERED[id(w)] = me


def unregister(pruner) -> None:
    for w in pruner.W:
        ref = _REGISTERED.get(id(w))
        if ref is not None and ref() in (pruner, None):
            del _REGISTERED[id(w)]


class IndexMaskHook:
    """Backward hook of one candidate weight: masks its gradient and, inside the accumulation window,
    accumulates the dense gradient into `dense_grad` (rigl-torch's name, kept for its users)."""

    def __init__(self, layer: int, scheduler):
        self.layer = layer
        self.scheduler = scheduler
        self.dense_grad: Optional[torch.Tensor] = None

    def __name__(self):
        return "IndexMaskHook"

    @torch.no_grad()
    def __call__(self, grad):
        s = self.scheduler
        mask = s.backward_masks[self.layer]
        if mask is None:
            return None
        if mask.device != grad.device:  # the model was moved with .to() after construction: masks follow
            s._follow_devices()
            mask = s.backward_masks[self.layer]
        acc = None
        if s.check_if_backward_hook_should_accumulate_grad():
            acc = self.dense_grad
            if acc is None:
                acc = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
            elif acc.dtype != grad.dtype or acc.device != grad.device:  # .to() inside the window
                acc = acc.to(device=grad.device, dtype=grad.dtype)
            self.dense_grad = acc
        else:
            self.dense_grad = None
            if getattr(grad, "_rigl_fast_masked", False):  # compute="sparse"'s own gradient, the only one this
                return None                                # backward gave the weight: 0 off the mask already
        return s._ops.mask_grad(grad, mask, acc, s.grad_accumulation_n)


class ShardedMaskHook(IndexMaskHook):
    """The hook of one FSDP2-sharded weight. FSDP2 computes gradients on an unsharded copy and writes the
    reduce-scattered (global) gradient into the sharded parameter's .grad, so a gradient hook on the sharded
    parameter never runs: this one is a post-accumulate-grad hook, which FSDP2 calls after that write. It
    masks the local shard of .grad in place; inside the accumulation window it also keeps the off-mask part
    (`off`) and a copy of the masked .grad as the hook left it (`seen`), from which the dense gradient is rebuilt
    at step end (`update.fold_sharded`): FSDP2 sums the gradients of several backward passes in one step into
    .grad, so only the step's total is known exactly. The copy, not .grad itself: what runs between backward and
    the step end (clip_grad_norm_, GradScaler.unscale_) rescales .grad but not `off`, and the grow scores would
    mix the two scales. `dense_grad` is a DTensor sharded like the weight."""

    def __init__(self, layer: int, scheduler):
        super().__init__(layer, scheduler)
        self.off: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None

    @torch.no_grad()
    def __call__(self, param):
        s = self.scheduler
        mask = s.backward_masks[self.layer]
        if mask is None or param.grad is None:
            return
        grad, mask = _sharding.local(param.grad), _sharding.local(mask)
        if s.check_if_backward_hook_should_accumulate_grad():
            if self.off is None:
                self.off, self.seen = torch.zeros_like(grad), torch.empty_like(grad)
            s._ops.split_grad(grad, mask, self.off)
            self.seen.copy_(grad)
        else:
            self.off = self.seen = None
            s._ops.apply_masks([grad], [mask])


def attach(pruner) -> List[IndexMaskHook]:
    """One hook per candidate weight, their handles appended to `pruner._handles`."""
    hooks = []
    for i, w in enumerate(pruner.W):
        if pruner._sharded:
            hook = ShardedMaskHook(i, pruner)
            pruner._handles.append(w.register_post_accumulate_grad_hook(hook))
        else:
            hook = IndexMaskHook(i, pruner)
            pruner._handles.append(w.register_hook(hook))
        hooks.append(hook)
    return hooks
