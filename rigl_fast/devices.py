"""Device following: after model.to(device), or after torch.utils.swap_tensors gave a weight a new tensor,
the scheduler's masks, accumulators, hooks and backend follow the weights."""
from __future__ import annotations

import warnings

import torch

from . import ops as _ops
from . import sharding as _sharding


def check_sizes(ops, names, W, S) -> None:
    """A backend with a size limit refuses larger sparse layers, naming the layer and the backend."""
    limit = ops.max_numel() if hasattr(ops, "max_numel") else None
    if limit is None:
        return
    for name, w, s in zip(names, W, S):
        if s > 0 and _sharding.local(w).numel() > limit:
            raise ValueError(f"layer {name!r} has {w.numel()} weights, more than the {ops.name} backend handles "
                             f"({limit}); choose another backend or keep the layer dense with exclude=")


def moved(pruner) -> bool:
    return any(m is not None and m.device != w.device for m, w in zip(pruner.backward_masks, pruner.W))


@torch.no_grad()
def follow(pruner) -> None:
    """Masks and accumulators move to their weights' device and the backend is chosen again for it (an
    explicitly requested backend that cannot run there raises, naming it)."""
    devices = {pruner.W[i].device for i in pruner._sparse_layers()}
    if len(devices) > 1:
        raise RuntimeError(f"model: the sparse weights were moved to several devices {sorted(map(str, devices))}; "
                           "rigl_fast needs them on one")
    device = next(iter(devices))
    ops = _ops.get_backend(pruner._backend_request, device)
    check_sizes(ops, pruner.names, pruner.W, pruner.S)
    pruner._ops = ops
    pruner.backend = ops.name
    for i in pruner._sparse_layers():
        pruner.backward_masks[i] = pruner.backward_masks[i].to(device)
        h = pruner.backward_hook_objects[i]
        if h.dense_grad is not None:
            h.dense_grad = h.dense_grad.to(device)


def reattach_hooks(pruner) -> bool:
    """torch.utils.swap_tensors (module.to() under torch.__future__'s swap mode, the path tensor subclasses
    take) gives a parameter a new tensor underneath and autograd stops calling its hooks, silently.
    Re-assigning the hook dict attaches it to the new tensor. Returns whether any was swapped."""
    swapped = [i for i, w in enumerate(pruner.W) if w._cdata != pruner._impls[i]]
    if not swapped:
        return False
    for i in swapped:
        w = pruner.W[i]
        w._backward_hooks = w._backward_hooks
        pruner._impls[i] = w._cdata
    if moved(pruner):
        follow(pruner)
    if not pruner._warned_swap:
        pruner._warned_swap = True
        warnings.warn(f"rigl_fast: {len(swapped)} sparse weights were swapped for new tensors after the "
                      "scheduler was built (torch.utils.swap_tensors, e.g. module.to() with "
                      "swap_module_params_on_conversion), which drops their gradient hooks; rigl_fast "
                      f"re-attached them at step {pruner.step}. A backward pass run in between was masked late "
                      "and not accumulated for the next update", RuntimeWarning, stacklevel=4)
    return True
