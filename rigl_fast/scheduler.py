"""RigLScheduler: rigl-torch 0.5.2's API on rigl_fast's op layer.

The scheduler decides when and how much (schedule, drop fraction, per-layer sparsity, checkpoints, errors);
every pass over weights goes through `self._ops`, a backend from `ops.py`.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import config as _config
from . import distributed as _dist
from . import layers as _layers
from . import ops as _ops
from . import sharding as _sharding
from . import state as _state
from . import structure as _structure
from . import summary as _summary
from .config import AFTER_STEP_MODES, GROW_MODES, ZERO_PRESERVING_OPTIMIZERS  # noqa: F401  (their old home)
from .state import FORMAT_VERSION  # noqa: F401  (re-exported: older code imports it from here)

# id(parameter) -> the scheduler it is registered to. Kept here, not as an attribute of the parameter, so that
# a pickled model (torch.save(model)) does not carry its registration into the copy, which has no hooks; and
# by id, with a weak reference to the scheduler rather than to the parameter, because torch.utils.swap_tensors
# (module.to() under torch.__future__.set_swap_module_params_on_conversion) refuses tensors with weakrefs.
_REGISTERED: Dict[int, "weakref.ref"] = {}


def _registered_to(w) -> Optional["RigLScheduler"]:
    ref = _REGISTERED.get(id(w))
    s = None if ref is None else ref()
    if s is None or not s._handles or not any(x is w for x in s.W):
        return None  # a stale entry: its scheduler is gone or removed, or the id now names another tensor
    return s


class IndexMaskHook:
    """Backward hook of one candidate weight: masks its gradient and, inside the accumulation window,
    accumulates the dense gradient into `dense_grad` (rigl-torch's name, kept for its users)."""

    def __init__(self, layer: int, scheduler: "RigLScheduler"):
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
        return s._ops.mask_grad(grad, mask, acc, s.grad_accumulation_n)


class ShardedMaskHook(IndexMaskHook):
    """The hook of one FSDP2-sharded weight. FSDP2 computes gradients on an unsharded copy and writes the
    reduce-scattered (global) gradient into the sharded parameter's .grad, so a gradient hook on the sharded
    parameter never runs: this one is a post-accumulate-grad hook, which FSDP2 calls after that write. It
    masks the local shard of .grad in place; inside the accumulation window it also keeps the off-mask part
    (`off`), from which the scheduler rebuilds the dense gradient at step end (`RigLScheduler._fold_sharded`):
    FSDP2 sums the gradients of several backward passes in one step into .grad, so only the step's total is
    known exactly. `dense_grad` is a DTensor sharded like the weight."""

    def __init__(self, layer: int, scheduler: "RigLScheduler"):
        super().__init__(layer, scheduler)
        self.off: Optional[torch.Tensor] = None

    @torch.no_grad()
    def __call__(self, param):
        s = self.scheduler
        mask = s.backward_masks[self.layer]
        if mask is None or param.grad is None:
            return
        grad, mask = _sharding.local(param.grad), _sharding.local(mask)
        if s.check_if_backward_hook_should_accumulate_grad():
            if self.off is None:
                self.off = torch.zeros_like(grad)
            s._ops.split_grad(grad, mask, self.off)
        else:
            self.off = None
            s._ops.apply_masks([grad], [mask])


class RigLScheduler:
    """Drop-in replacement for `rigl_torch.RigL.RigLScheduler`.

    Call once per iteration, after `loss.backward()`: `if pruner(): optimizer.step()`.

    Keyword-only extras: `backend` ('auto', 'reference', 'triton', 'cpp'; env RIGL_FAST_BACKEND overrides
    'auto'), `erk_power_scale` (ERK exponent, default 1.0), `grow_mode` ('gradient' = RigL; 'random' = SET,
    Mocanu et al. 2018), `include` / `exclude` (glob patterns over module names narrowing the candidates),
    `sparsify_tied` (make weights tied to a non-candidate module, e.g. an output head tied to an embedding,
    sparse too; default False keeps them dense), `after_step` ('always', the default: weights and optimizer
    states are masked after every optimizer step, whatever touched them; 'trusted' skips that pass for the
    optimizers proven zero-preserving, which is exact only while nothing but rigl_fast's hooks changes the
    sparse weights, their gradients and their optimizer states: no model.load_state_dict() after
    construction, no gradient noise or clipping hooks, no optimizer.load_state_dict()), `in_step` (for loops
    that call optimizer.step() every iteration, as HF Trainer, Lightning and Accelerate do: every optimizer
    step advances the schedule, and on an update step the topology update runs right after the optimizer has
    applied that step, as Cerebras' sparsity does; rigl-torch's two-line mode instead replaces that step
    with the update. pruner() is not called in this mode), `process_group` (DDP: the group over which grow
    scores are summed and initial masks agreed, e.g. the data-parallel group of a larger mesh; default the
    whole world), `sharded_init` (FSDP2: 'global', the default, draws each layer's initial mask as one process
    would, one layer at a time on the CPU, and keeps this rank's shard; 'local' draws each shard on its own, for
    layers too large for that: same counts, a different draw), `structure` ('unstructured', the default;
    'fan_in': every output unit keeps the same number of active weights, as SRigL; or an 'N:M' string such as
    '2:4': N active in every M consecutive weights along the fan-in, every sparse layer N/M dense, which
    dense_allocation must equal; see structure.py).

    FSDP2: create the scheduler after `fully_shard` (a 1-D mesh, or HSDP's 2-D one; FSDP2's dim-0 sharding), on
    every rank. Masks
    and accumulators are then DTensors sharded like their weights, and the update is the exact global one,
    computed shard by shard (distributed.sharded_top_k) without gathering any layer. With `structure`, units
    inside a shard regrow there, and units the shards cut (transformers' Conv1D: FSDP2 shards its fan-in) by a
    per-unit select over the ranks (distributed.structured_grow): the same masks as one process.
    """

    def __init__(self, model, optimizer, dense_allocation=1, T_end=None, sparsity_distribution="uniform",
                 ignore_linear_layers=True, delta=100, alpha=0.3, static_topo=False, grad_accumulation_n=1,
                 state_dict=None, *, backend="auto", erk_power_scale=1.0, grow_mode="gradient",
                 after_step="always", include=None, exclude=None, sparsify_tied=False, in_step=False, process_group=None,
                 sharded_init="global", structure="unstructured"):
        # ---- validate everything before touching the model, the optimizer or the RNG ----
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        inner = _config.unwrap_optimizer(optimizer)
        hp = dict(dense_allocation=dense_allocation, T_end=T_end, sparsity_distribution=sparsity_distribution,
                  ignore_linear_layers=ignore_linear_layers, delta_T=delta, alpha=alpha, static_topo=static_topo,
                  grad_accumulation_n=grad_accumulation_n, erk_power_scale=erk_power_scale, grow_mode=grow_mode,
                  structure=structure)
        _structure.parse(structure)  # before the state dict's hyperparameters: the argument itself is named
        if state_dict is not None:
            hp.update(_state.hyperparams(state_dict))  # the state dict's values win
        _config.validate(hp)
        _config.check_after_step(after_step)
        _config.check_flags(sparsify_tied=sparsify_tied, in_step=in_step)
        _dist.check_group(process_group)
        if sharded_init not in _sharding.INIT_DRAWS:
            raise ValueError(f"sharded_init must be one of {_sharding.INIT_DRAWS}, got {sharded_init!r}")
        _ops.check_name(backend)

        found = _layers.select(model, include=include, exclude=exclude, sparsify_tied=sparsify_tied)
        names, W, is_linear = found.names, found.weights, found.is_linear
        if not W:
            why = "; ".join(f"{k.name}: {k.reason}" for k in found.skipped[:6])
            raise ValueError("model has no candidate weights: rigl_fast sparsifies the trainable floating-point "
                             "weights of nn.Linear, nn.Conv1d/2d/3d, transformers' Conv1D and "
                             "nn.MultiheadAttention, and found none" + (f" ({why})" if why else ""))
        for name, w in zip(names, W):
            rigl_torch_hooked = getattr(w, "_has_rigl_backward_hook", False) and w._backward_hooks
            if _registered_to(w) is not None or rigl_torch_hooked:
                raise ValueError(f"model is already registered to a RigLScheduler (weight {name!r} has its "
                                 "hooks); call .remove() on the old scheduler first")

        if state_dict is not None:
            S, masks = _state.fit(state_dict, names, W)
        else:
            S = _layers.sparsities(hp["sparsity_distribution"], [tuple(w.shape) for w in W], is_linear,
                                   hp["dense_allocation"], hp["ignore_linear_layers"], hp["erk_power_scale"])
            masks = None
        S, units, dense_why = _structure.layer_plan(hp["structure"], [tuple(w.shape) for w in W], found.transposed, S)
        if masks is not None:  # sharded masks: below, on every rank alike
            _state.check_units(names, masks, [None if _sharding.is_sharded(w) else u for w, u in zip(W, units)])
        held = {id(p) for group in inner.param_groups for p in group["params"]}
        missing = [n for n, w, s in zip(names, W, S) if s > 0 and id(w) not in held]
        if missing:
            raise ValueError(f"optimizer does not hold the sparse weights {missing}: pass the model's parameters "
                             "to the optimizer before creating the RigLScheduler")
        sharded = _sharding.check_layout(names, W, [s > 0 for s in S])
        if sharded and process_group is not None:
            raise ValueError("process_group is for DDP; under FSDP2 the weights' device mesh is the group")
        if sharded_init != "global" and not sharded:
            warnings.warn("rigl_fast: sharded_init applies to FSDP2-sharded weights only; this model has none, so "
                          "it does nothing", UserWarning, stacklevel=2)
        sparse_devices = {w.device for w, s in zip(W, S) if s > 0} or {W[0].device}
        if len(sparse_devices) > 1:
            raise ValueError(f"model: sparse weights must be on one device, found {sorted(map(str, sparse_devices))}")
        ops = _ops.get_backend(backend, next(iter(sparse_devices)))
        self._check_sizes(ops, names, W, S)
        cuts = plans = None
        if sharded:  # collectives, on every rank alike: where each rank's shard of a Conv1D weight starts
            sparse_w = [w for w, s in zip(W, S) if s > 0]
            cuts = self._gather_cuts(W, found.transposed, sparse_w[0])
            plans = [_sharding.unit_plan(w, u, c) for w, u, c in zip(W, units, cuts)]
            if masks is not None:
                self._check_sharded_units(ops, names, masks, plans, _sharding.group(sparse_w))

        # ---- from here on, state changes; any failure undoes what was done (and the RNG's draws) ----
        rng = torch.random.get_rng_state()
        self._handles = []
        self.W: List[nn.Parameter] = W
        try:
            self._build(model, optimizer, inner, ops, backend, after_step, hp, found, S, masks, state_dict, in_step,
                        process_group, sharded, sharded_init, units, dense_why, cuts, plans)
        except BaseException:
            for h in self._handles:
                h.remove()
            self._handles = []
            self._unregister()
            torch.random.set_rng_state(rng)
            raise
        _config.warn_if_idle(self, model, include, exclude, sparsify_tied, found.n_tied)

    def _build(self, model, optimizer, inner, ops, backend, after_step, hp, found, S, masks, state_dict, in_step,
               process_group, sharded, sharded_init, units, dense_why, cuts, plans):
        self.model = model
        self.optimizer = optimizer
        self._optimizer = inner
        self._ops = ops
        self._backend_request = backend
        self.names = found.names
        self._transposed = found.transposed
        self.skipped_layers = found.skipped
        self._linear_layers_mask = [int(x) for x in found.is_linear]
        self.N = [w.numel() for w in self.W]
        self.backend = ops.name
        self._after_step_mode = after_step
        self.in_step = in_step
        self._sharded = sharded
        self.sharded_init = sharded_init
        sparse_w = [w for w, s_ in zip(self.W, S) if s_ > 0]
        self.process_group = _sharding.group(sparse_w) if sharded else process_group
        self._last_update = None  # [(layer, n_grow, n_active)] of the last applied update, for stats()
        self._set_hyperparams(hp)
        self.S = list(S)
        self._units = units
        self._cuts = cuts  # FSDP2: per layer, every rank's shard boundaries along dim 0 (Conv1D only), or None
        self._plans = plans  # FSDP2: per structured layer, how this rank selects its growth (sharding.UnitPlan)
        self._dense_why = dense_why
        self.step = 0
        self.rigl_steps = 0
        self.skipped_updates = 0
        self._generator = None
        self._warned_swap = False
        self.backward_masks = self._random_masks() if masks is None else masks
        self._seed_generator()
        if state_dict is not None:
            self._load_counters(state_dict)
        self._count_active()
        # the optimizer's hook first: it is the registration most likely to be refused
        self._handles.append(inner.register_step_post_hook(self._after_optimizer_step))
        self.backward_hook_objects: List[IndexMaskHook] = []
        for i, w in enumerate(self.W):
            if sharded:
                hook = ShardedMaskHook(i, self)
                self._handles.append(w.register_post_accumulate_grad_hook(hook))
            else:
                hook = IndexMaskHook(i, self)
                self._handles.append(w.register_hook(hook))
            self.backward_hook_objects.append(hook)
        for key in [k for k, r in _REGISTERED.items() if r() is None]:  # schedulers garbage-collected
            del _REGISTERED[key]
        me = weakref.ref(self)
        for w in self.W:
            _REGISTERED[id(w)] = me
        self._impls = [w._cdata for w in self.W]
        if state_dict is not None:
            self._load_dense_grads(state_dict)
        self.apply_mask_to_weights()
        self.reset_momentum()
        self.apply_mask_to_gradients()

    def _count_active(self):
        """The active positions of each sparse layer (under FSDP2 counted per shard and summed)."""
        local = [0 if m is None else int(_sharding.local(m).sum()) for m in self.backward_masks]
        if self._sharded:
            local = _dist.sum_counts(local, _sharding.local(self.W[0]).device, self.process_group)
        self._n_active = [None if m is None else c for m, c in zip(self.backward_masks, local)]

    @staticmethod
    def _gather_cuts(W, transposed, probe):
        """FSDP2: per layer, the row boundaries of every rank's shard of a transposed (Conv1D) weight, whose
        structured units cross them (sharding.unit_plan); None for the others. One all_gather."""
        which = [i for i, (w, t) in enumerate(zip(W, transposed)) if t and _sharding.is_sharded(w)]
        if not which:  # the same model on every rank: all skip the gather alike
            return [None] * len(W)
        mine = [v for i in which for v in _sharding.row_range(W[i])]
        every = _dist.all_gather_ints(mine, _sharding.local(probe).device, _sharding.group([probe]))
        cuts = [None] * len(W)
        for j, i in enumerate(which):
            cuts[i] = sorted({v for r in every for v in (r[2 * j], r[2 * j] + r[2 * j + 1])})
        return cuts

    @staticmethod
    def _check_sharded_units(ops, names, masks, plans, group):
        """`state.check_units` for sharded masks, agreed on every rank (so all raise together): the units inside
        each shard checked there, the units split across shards (Conv1D) on their counts summed over the ranks."""
        if all(p is None or m is None for p, m in zip(plans, masks)):
            return
        plans = [None if m is None else p for p, m in zip(plans, masks)]
        split = _dist.split_unit_counts(ops, [None if m is None else _sharding.local(m) for m in masks], plans,
                                        group)
        bad = []
        for m, p, c in zip(masks, plans, split):
            wrong = False
            if p is not None and p.local is not None:
                lo, hi, u = p.local
                wrong = bool((_ops.units_of(_sharding.local(m).reshape(-1)[lo:hi], u).sum(1) != u.target).any())
            bad.append(wrong or bool((c != (0 if p is None else p.target)).any()))
        device = _sharding.local(next(m for m in masks if m is not None)).device
        for name, b, p in zip(names, _dist.any_rank(bad, device, group), plans):
            if b:
                raise ValueError(f"state_dict: the mask of layer {name!r} does not have the structure: every unit "
                                 f"must hold exactly {p.target} active weights")

    @staticmethod
    def _check_sizes(ops, names, W, S):
        limit = ops.max_numel() if hasattr(ops, "max_numel") else None
        if limit is None:
            return
        for name, w, s in zip(names, W, S):
            if s > 0 and _sharding.local(w).numel() > limit:
                raise ValueError(f"layer {name!r} has {w.numel()} weights, more than the {ops.name} backend handles "
                                 f"({limit}); choose another backend or keep the layer dense with exclude=")

    def __reduce_ex__(self, protocol):
        raise TypeError("a RigLScheduler cannot be pickled or copied (torch.save(pruner), pickle, copy.deepcopy): "
                        "its hooks live on the model's parameters and would not come back. Save "
                        "pruner.state_dict() instead and resume with RigLScheduler(model, optimizer, state_dict=sd)")

    # ------------------------------------------------------------------ validation / hyperparameters
    def _set_hyperparams(self, hp):
        self.dense_allocation = hp["dense_allocation"]
        self.T_end = hp["T_end"]
        self.sparsity_distribution = hp["sparsity_distribution"]
        self.ignore_linear_layers = hp["ignore_linear_layers"]
        self.delta_T = hp["delta_T"]
        self.alpha = hp["alpha"]
        self.static_topo = hp["static_topo"]
        self.grad_accumulation_n = hp["grad_accumulation_n"]
        self.erk_power_scale = hp["erk_power_scale"]
        self.grow_mode = hp["grow_mode"]
        self.structure = hp["structure"]
        self._skip_after_step = (self._after_step_mode == "trusted"
                                 and type(self._optimizer) in _config.ZERO_PRESERVING_OPTIMIZERS)

    def _hyperparams(self):
        return dict(dense_allocation=self.dense_allocation, T_end=self.T_end,
                    sparsity_distribution=self.sparsity_distribution, ignore_linear_layers=self.ignore_linear_layers,
                    delta_T=self.delta_T, alpha=self.alpha, static_topo=self.static_topo,
                    grad_accumulation_n=self.grad_accumulation_n, erk_power_scale=self.erk_power_scale,
                    grow_mode=self.grow_mode, structure=self.structure)

    # ------------------------------------------------------------------ masks, RNG and devices
    @torch.no_grad()
    def _random_masks(self):
        """rigl-torch's draws: for each sparse layer in order, zeros at randperm(n)[:int(S*n)] (global CPU RNG).
        Under torch.distributed every rank then takes rank 0's masks."""
        if self._sharded:
            return self._random_sharded_masks()
        masks = []
        for w, s, n, u in zip(self.W, self.S, self.N, self._units):
            if s <= 0:
                masks.append(None)
                continue
            masks.append(self._draw(n, s, u).view(w.shape).to(w.device))
        _dist.broadcast_masks(masks, self.process_group)
        return masks

    @staticmethod
    def _draw(n, s, units, generator=None):
        """One layer's whole flat mask on the CPU: rigl-torch's randperm draw, or the structure's."""
        if units is not None:
            return _structure.draw(units, generator)
        flat = torch.ones(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:int(s * n)]] = False
        return flat

    def _random_sharded_masks(self):
        """FSDP2: every rank draws from rank 0's RNG state and keeps its shards, so the global masks are rank 0's
        draws, as under DDP, with no mask sent. A rank whose RNG state was rank 0's advances it as one process
        would; the others' RNG is left as it was. sharded_init='local': see sharding.local_draw."""
        device = _sharding.local(self.W[self._sparse_w_index()]).device
        state = _dist.broadcast_rng_state(device)  # the world's rank 0: HSDP's replica groups draw alike
        g = torch.Generator()
        g.set_state(state)
        seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, generator=g)) if self.sharded_init == "local" else 0
        local = []
        for i, (w, s) in enumerate(zip(self.W, self.S)):
            if s <= 0:
                local.append(None)
            elif self.sharded_init == "local":
                local.append(_sharding.local_draw(w, s, seed, i, self._units[i], self._plans[i]))
            else:
                local.append(_sharding.shard_of(w, self._draw(w.numel(), s, self._units[i], g)).to(
                    _sharding.local(w).device))
        if torch.equal(state, torch.get_rng_state()):
            torch.set_rng_state(g.get_state())
        return _sharding.masks_like(self.W, local)

    def _sparse_w_index(self):
        return next(i for i, s in enumerate(self.S) if s > 0)

    def _seed_generator(self):
        """SET's random growth draws from a generator of its own, seeded once from the global RNG (rank 0's
        seed under torch.distributed) and saved in the state dict, so resuming reproduces the draws."""
        if self.grow_mode != "random":
            return
        seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64))
        group = None if self._sharded else self.process_group  # sharded: the world, so HSDP replicas agree
        seed = _dist.broadcast_seed(seed, _sharding.local(self.W[0]).device, group)
        self._generator = torch.Generator().manual_seed(seed)

    def _load_counters(self, sd):
        self.step, self.rigl_steps, self.skipped_updates, rng = _state.counters(sd)
        self._last_update = _state.last_update(sd)
        if rng is not None and self._generator is not None:
            self._generator.set_state(rng)

    def _load_dense_grads(self, sd):
        accs = _state.dense_grads(sd, self.W)
        if not self._sharded:  # a sharded accumulator is the global gradient already: nothing to fold
            accs = _dist.zero_unless_rank0(accs, self.process_group)
        for hook, a in zip(self.backward_hook_objects, accs):
            hook.dense_grad = a

    def _reattach_hooks(self) -> bool:
        """torch.utils.swap_tensors (module.to() under torch.__future__'s swap mode, the path tensor
        subclasses take) gives a parameter a new tensor underneath and autograd stops calling its hooks,
        silently. Re-assigning the hook dict attaches it to the new tensor. Returns whether any was swapped."""
        swapped = [i for i, w in enumerate(self.W) if w._cdata != self._impls[i]]
        if not swapped:
            return False
        for i in swapped:
            w = self.W[i]
            w._backward_hooks = w._backward_hooks
            self._impls[i] = w._cdata
        if self._devices_moved():
            self._follow_devices()
        if not self._warned_swap:
            self._warned_swap = True
            warnings.warn(f"rigl_fast: {len(swapped)} sparse weights were swapped for new tensors after the "
                          "scheduler was built (torch.utils.swap_tensors, e.g. module.to() with "
                          "swap_module_params_on_conversion), which drops their gradient hooks; rigl_fast "
                          f"re-attached them at step {self.step}. A backward pass run in between was masked late "
                          "and not accumulated for the next update", RuntimeWarning, stacklevel=3)
        return True

    def _devices_moved(self) -> bool:
        return any(m is not None and m.device != w.device for m, w in zip(self.backward_masks, self.W))

    @torch.no_grad()
    def _follow_devices(self):
        """After model.to(device): masks and accumulators move to their weights' device and the backend is
        chosen again for it (an explicitly requested backend that cannot run there raises, naming it)."""
        devices = {self.W[i].device for i in self._sparse_layers()}
        if len(devices) > 1:
            raise RuntimeError(f"model: the sparse weights were moved to several devices {sorted(map(str, devices))}; "
                               "rigl_fast needs them on one")
        device = next(iter(devices))
        ops = _ops.get_backend(self._backend_request, device)
        self._check_sizes(ops, self.names, self.W, self.S)
        self._ops = ops
        self.backend = ops.name
        for i in self._sparse_layers():
            self.backward_masks[i] = self.backward_masks[i].to(device)
            h = self.backward_hook_objects[i]
            if h.dense_grad is not None:
                h.dense_grad = h.dense_grad.to(device)

    # ------------------------------------------------------------------ the masked tensors
    def _sparse_layers(self):
        return [i for i, m in enumerate(self.backward_masks) if m is not None]

    def _states_like(self, w):
        """The optimizer states shaped like `w` (local shards under FSDP2)."""
        state = self._optimizer.state.get(w)
        if not state:
            return []
        return [_sharding.local(v) for v in state.values()
                if isinstance(v, torch.Tensor) and v.shape == w.shape and v is not w]

    def _local_mask(self, i):
        return _sharding.local(self.backward_masks[i])

    def _local_weight(self, i):
        return _sharding.local(self.W[i])

    @torch.no_grad()
    def apply_mask_to_weights(self):
        idx = self._sparse_layers()
        self._ops.apply_masks([self._local_weight(i) for i in idx], [self._local_mask(i) for i in idx])

    @torch.no_grad()
    def reset_momentum(self):
        """Zero every optimizer state shaped like a sparse weight off its mask (all states, not only SGD's)."""
        tensors, masks = [], []
        for i in self._sparse_layers():
            for t in self._states_like(self.W[i]):
                tensors.append(t)
                masks.append(self._local_mask(i))
        self._ops.apply_masks(tensors, masks)

    @torch.no_grad()
    def apply_mask_to_gradients(self):
        tensors, masks = [], []
        for i in self._sparse_layers():
            if self.W[i].grad is not None:
                tensors.append(_sharding.local(self.W[i].grad))
                masks.append(self._local_mask(i))
        self._ops.apply_masks(tensors, masks)

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer, args, kwargs):
        self._reattach_hooks()
        if not self._skip_after_step:
            self._mask_after_step()
        if self.in_step:
            self._advance()  # this step counts; on an update step the update follows the optimizer's step

    @torch.no_grad()
    def _mask_after_step(self):
        if self._devices_moved():
            self._follow_devices()
        tensors, masks = [], []
        for i in self._sparse_layers():
            m = self._local_mask(i)
            tensors.append(self._local_weight(i))
            masks.append(m)
            for t in self._states_like(self.W[i]):
                tensors.append(t)
                masks.append(m)
        self._ops.apply_masks(tensors, masks)

    # ------------------------------------------------------------------ schedule
    def check_if_backward_hook_should_accumulate_grad(self):
        """True while the next backward pass falls in the dense-gradient window before an update."""
        if self.static_topo or self.grow_mode != "gradient" or self.T_end is None or self.step >= self.T_end:
            return False
        return self.delta_T - (self.step % self.delta_T) <= self.grad_accumulation_n

    def cosine_annealing(self):
        return self.alpha / 2 * (1 + np.cos((self.step * np.pi) / self.T_end))

    def __call__(self):
        if self.in_step:
            raise RuntimeError("pruner() is not called with in_step=True: every optimizer.step() advances the "
                               "schedule and runs the topology update when one is due; just call optimizer.step()")
        if self._reattach_hooks():
            self.apply_mask_to_gradients()  # the backward just run had no hook: mask its gradient now
        return self._advance()

    def _advance(self) -> bool:
        """One training iteration: the step count, the topology update when one is due (returns False then),
        the DDP window fold otherwise. Hooks are re-attached by the caller (pruner() or the step hook)."""
        accumulated = self.check_if_backward_hook_should_accumulate_grad()  # what the last backward did
        self.step += 1
        if self.static_topo:
            return True
        if accumulated and self._sharded:
            self._fold_sharded()  # before an update, which reads the accumulators
        if self.step % self.delta_T == 0 and self.step < self.T_end:
            self._rigl_step()
            self.rigl_steps += 1
            return False
        if accumulated and not self._sharded and _dist.active(self.process_group):
            self._fold_dense_grads()
        return True

    def _fold_sharded(self):
        """FSDP2, at the end of a step inside the accumulation window: the step's dense gradient (the masked
        .grad plus the off-mask part its hook kept) is accumulated, acc += dense / n."""
        for i in self._sparse_layers():
            h = self.backward_hook_objects[i]
            grad = self.W[i].grad
            if h.off is None or grad is None:  # no backward pass reached this layer in this step
                h.off = None
                continue
            if h.dense_grad is None:
                h.dense_grad = _sharding.like(self.W[i], torch.zeros_like(h.off))
            self._ops.fold_grad(_sharding.local(h.dense_grad), _sharding.local(grad), h.off, self.grad_accumulation_n)
            h.off = None

    def _fold_dense_grads(self):
        """DDP, inside an accumulation window: rank 0 takes the sum of the ranks' partial accumulators, so a
        checkpoint rank 0 writes now restores the window exactly (distributed.fold_partial_sums)."""
        idx = self._sparse_layers()
        if not idx:
            return
        hooks = [self.backward_hook_objects[i] for i in idx]
        folded = _dist.fold_partial_sums([h.dense_grad for h in hooks], [self.W[i] for i in idx],
                                          self.process_group)
        for h, a in zip(hooks, folded):
            h.dense_grad = a

    def _free_dense_grads(self):
        for hook in self.backward_hook_objects:
            hook.dense_grad = None

    def _skip(self, why):
        self.skipped_updates += 1
        warnings.warn(f"rigl_fast: topology update at step {self.step} skipped ({why}); masks unchanged "
                      f"({self.skipped_updates} skipped so far)", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def _rigl_step(self):
        drop_fraction = self.cosine_annealing()
        idx = self._sparse_layers()
        if not idx:
            return
        if self._sharded:
            return self._sharded_rigl_step(idx, drop_fraction)
        if self._devices_moved():
            self._follow_devices()
        weights = [self.W[i] for i in idx]
        if self.grow_mode == "random":
            scores = [torch.rand(w.shape, generator=self._generator).to(w.device) for w in weights]
        else:
            accs = [self.backward_hook_objects[i].dense_grad for i in idx]
            self._free_dense_grads()
            have_grad = any(a is not None for a in accs)
            distributed = _dist.active(self.process_group)
            if have_grad or distributed:
                scores = [torch.zeros_like(w) if a is None else a for w, a in zip(weights, accs)]
            if distributed:  # every rank must reach the all-reduce, so the skip decision is taken after it
                have_grad = _dist.sum_scores(scores, have_grad, self.process_group)
            if not have_grad:
                self._skip("no gradient was accumulated: call loss.backward() before pruner()")
                return
        n_keep, n_grow = self._drop_counts(idx, drop_fraction)
        masks = [self.backward_masks[i] for i in idx]
        states = [self._states_like(w) for w in weights]
        grads = [w.grad for w in weights]
        if self._units[idx[0]] is not None:  # a structure applies to every sparse layer
            done = self._ops.checked_structured_update(weights, masks, scores, n_keep,
                                                       [self._units[i] for i in idx], states, grads)
        else:
            done = self._ops.checked_update(weights, masks, scores, n_keep, n_grow, states, grads)
        if not done:
            self._skip("non-finite weights or gradients, e.g. an fp16 overflow")
        else:
            self._last_update = [(i, g, self._n_active[i]) for i, g in zip(idx, n_grow)]

    def _drop_counts(self, idx, drop_fraction):
        n_keep, n_grow = [], []
        for i in idx:
            n_drop = int(self._n_active[i] * drop_fraction)
            n_keep.append(self._n_active[i] - n_drop)
            n_grow.append(n_drop)
        return n_keep, n_grow

    def _sharded_rigl_step(self, idx, drop_fraction):
        """The update under FSDP2: the same selection as `_rigl_step`, over the whole of each layer, computed on
        the shards (distributed.sharded_top_k). The accumulators hold the global gradient already: no
        all-reduce of scores. Every rank takes every decision from all-reduced flags, so all skip together."""
        weights = [self._local_weight(i) for i in idx]
        masks = [self._local_mask(i) for i in idx]
        if self.grow_mode == "random":
            seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, generator=self._generator))
            scores = [_sharding.local_rand(self.W[i], seed, i) for i in idx]
            have_grad = True
        else:
            accs = [self.backward_hook_objects[i].dense_grad for i in idx]
            self._free_dense_grads()
            have_grad = any(a is not None for a in accs)
            scores = [torch.zeros_like(w) if a is None else _sharding.local(a) for w, a in zip(weights, accs)]
        bad = self._ops.any_nonfinite(weights + scores)
        have_grad, bad = _dist.any_rank([have_grad, bad], weights[0].device, self.process_group)
        if not have_grad:
            self._skip("no gradient was accumulated: call loss.backward() before pruner()")
            return
        if bad:
            self._skip("non-finite weights or gradients on some rank, e.g. an fp16 overflow")
            return
        n_keep, n_grow = self._drop_counts(idx, drop_fraction)
        offsets = [_sharding.flat_range(self.W[i])[0] for i in idx]
        keep = _dist.sharded_top_k(self._ops, weights, masks, True, n_keep, offsets, self.process_group)
        if self._units[idx[0]] is not None:  # structured: per unit, local where the unit lies in the shard
            grow = _dist.sharded_structured_grow(self._ops, scores, keep, [self._plans[i] for i in idx],
                                                 self.process_group)
        else:
            grow = _dist.sharded_top_k(self._ops, scores, keep, False, n_grow, offsets, self.process_group)
        self._ops.commit(weights, masks, keep, grow, [self._states_like(self.W[i]) for i in idx],
                         [None if self.W[i].grad is None else _sharding.local(self.W[i].grad) for i in idx])
        self._last_update = [(i, g, self._n_active[i]) for i, g in zip(idx, n_grow)]

    def stats(self) -> Dict[str, float]:
        """Plain numbers for any logger: `density` (active / all candidate weights) and `density/<layer>`,
        `updates` (applied) and `skipped_updates`, `step`, and `regrown_fraction` (and `regrown/<layer>`):
        the fraction of active weights the last applied update dropped and regrew (0.0 before the first)."""
        out: Dict[str, float] = {}
        active = 0
        for name, n, m, a in zip(self.names, self.N, self.backward_masks, self._n_active):
            a = n if m is None else a
            active += a
            out[f"density/{name}"] = a / n
        out["density"] = active / max(sum(self.N), 1)
        out["updates"] = self.rigl_steps - self.skipped_updates
        out["skipped_updates"] = self.skipped_updates
        out["step"] = self.step
        last = self._last_update or []
        out["regrown_fraction"] = sum(g for _, g, _ in last) / max(sum(a for _, _, a in last), 1)
        for i, g, a in last:
            out[f"regrown/{self.names[i]}"] = g / max(a, 1)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """rigl-torch's keys plus rigl_fast's (see state.py). Under DDP, rank 0's state dict is the one to save:
        it holds the whole accumulation window (the other ranks' partial sums are folded into it)."""
        return _state.build(self)

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Restore a state dict from `state_dict()` (or from rigl-torch 0.5.2). Validated before any change."""
        hp = self._hyperparams()
        hp.update(_state.hyperparams(state_dict))
        _config.validate(hp)
        S, masks = _state.fit(state_dict, self.names, self.W)
        S, units, dense_why = _structure.layer_plan(hp["structure"], [tuple(w.shape) for w in self.W],
                                                    self._transposed, S)
        plans = None
        if self._sharded:
            plans = [None if u is None else _sharding.unit_plan(w, u, c)
                     for w, u, c in zip(self.W, units, self._cuts)]
            self._check_sharded_units(self._ops, self.names, masks, plans, self.process_group)
        else:
            _state.check_units(self.names, masks, units)
        self._set_hyperparams(hp)
        self.S = S
        self._units = units
        self._plans = plans
        self._dense_why = dense_why
        self.backward_masks = masks
        self._count_active()
        if self.grow_mode == "random" and self._generator is None:
            self._seed_generator()
        self._load_counters(state_dict)
        self._load_dense_grads(state_dict)
        self.apply_mask_to_weights()
        self.reset_momentum()
        self.apply_mask_to_gradients()

    def remove(self):
        """Unregister every hook, so the model can be given to another scheduler. Masks stay applied."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._free_dense_grads()
        self._unregister()

    def _unregister(self):
        for w in self.W:
            ref = _REGISTERED.get(id(w))
            if ref is not None and ref() in (self, None):
                del _REGISTERED[id(w)]

    def export(self, format: str = "auto") -> nn.Module:
        """A new inference module computing what the model computes, its sparse Linear and Conv1D layers
        replaced by sparse ones ('csr', 'fan_in', 'semi_structured' or 'auto'; see export.py). The model and
        the scheduler are not modified."""
        from . import export as _export  # defines custom ops: imported only when a model is exported
        return _export.export(self, format)

    @torch.no_grad()
    def summary(self) -> str:
        """One line per weight of a candidate type: name, shape, density, and why a dense one is dense."""
        return _summary.layer_table(self)

    @torch.no_grad()
    def __str__(self):
        return _summary.render(self)

    __repr__ = __str__
