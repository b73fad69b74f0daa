"""RigLScheduler: rigl-torch 0.5.2's API on rigl_fast's op layer, a thin face: the public API, the schedule
and the hooks. Construction (construct.py), the topology update (update.py), device following (devices.py),
the gradient hooks (hooks.py) and the checkpoint format (state.py) live in modules named for them; every pass
over weights goes through `self._ops`, a backend from `ops.py`.
"""
from __future__ import annotations

import warnings
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from . import compute as _compute
from . import config as _config
from . import construct as _construct
from . import devices as _devices
from . import distributed as _dist
from . import hooks as _hooks
from . import sharding as _sharding
from . import state as _state
from . import summary as _summary
from . import update as _update
from .config import AFTER_STEP_MODES, GROW_MODES, ZERO_PRESERVING_OPTIMIZERS  # noqa: F401  (their old home)
from .hooks import _REGISTERED, IndexMaskHook, ShardedMaskHook, registered_to as _registered_to  # noqa: F401
from .state import FORMAT_VERSION  # noqa: F401  (re-exported: older code imports it from here)


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
    dense_allocation must equal; see structure.py), `compute` ('dense', the default; 'sparse': the sparse
    nn.Linear / Conv1D layers compute forward and backward over their active weights only, the dense weight
    gradient only in the window before an update; see compute.py).

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
                 sharded_init="global", structure="unstructured", compute="dense"):
        hp = dict(dense_allocation=dense_allocation, T_end=T_end, sparsity_distribution=sparsity_distribution,
                  ignore_linear_layers=ignore_linear_layers, delta_T=delta, alpha=alpha, static_topo=static_topo,
                  grad_accumulation_n=grad_accumulation_n, erk_power_scale=erk_power_scale, grow_mode=grow_mode,
                  structure=structure)
        opts = dict(backend=backend, after_step=after_step, include=include, exclude=exclude,
                    sparsify_tied=sparsify_tied, in_step=in_step, process_group=process_group,
                    sharded_init=sharded_init, compute=compute)
        plan = _construct.plan(model, optimizer, hp, state_dict, opts)  # every check, before any change

        # ---- from here on, state changes; any failure undoes what was done (and the RNG's draws) ----
        rng = torch.random.get_rng_state()
        self._handles = []
        self.W: List[nn.Parameter] = plan.W
        try:
            self._build(model, optimizer, plan)
            # before the weights are masked: a warning turned into an error (warnings filters) undoes the build too
            _config.warn_if_idle(self, model, include, exclude, sparsify_tied, plan.found.n_tied)
            self.apply_mask_to_weights()
            self.reset_momentum()
            self.apply_mask_to_gradients()
        except BaseException:
            _compute.uninstall(self)
            for h in self._handles:
                h.remove()
            self._handles = []
            self._unregister()
            torch.random.set_rng_state(rng)
            raise
        _config.note_density(self)

    def _build(self, model, optimizer, plan):
        self.model = model
        self.optimizer = optimizer
        self._optimizer = plan.inner
        self._set_layout(plan)
        self._set_hyperparams(plan.hp)
        self.step = 0
        self.rigl_steps = 0
        self.skipped_updates = 0
        self._generator = None
        self._warned_swap = False
        self._warned_no_grad = False
        self._warned_no_pruner = False
        self._steps_without_pruner = 0
        self._awaiting_step, self._missed_steps = False, 0  # config.note_missed_step
        self.backward_masks = _construct.random_masks(self) if plan.masks is None else plan.masks
        self._seed_generator(None if plan.loaded is None else plan.loaded.counters[3])
        if plan.loaded is not None:
            self._load_counters(plan.loaded)
        self._count_active()
        # the optimizer's hook first: it is the registration most likely to be refused
        self._handles.append(plan.inner.register_step_post_hook(self._after_optimizer_step))
        self.backward_hook_objects: List[IndexMaskHook] = _hooks.attach(self)
        _hooks.register(self)
        self.compute = plan.compute
        self._compute_layers = _compute.install(self)
        self._impls = [w._cdata for w in self.W]
        if plan.loaded is not None:
            self._load_dense_grads(plan.loaded)

    def _set_layout(self, plan):
        """What construction planned: the candidates, the backend, the layout and the per-layer plans."""
        found = plan.found
        self._ops = plan.ops
        self._backend_request = plan.backend
        self.names = found.names
        self._transposed = found.transposed
        self.skipped_layers = found.skipped
        self._linear_layers_mask = [int(x) for x in found.is_linear]
        self.N = [w.numel() for w in self.W]
        self.backend = plan.ops.name
        self._after_step_mode = plan.after_step
        self.in_step = plan.in_step
        self._sharded = plan.sharded
        self.sharded_init = plan.sharded_init
        sparse_w = [w for w, s_ in zip(self.W, plan.S) if s_ > 0]
        self.process_group = _sharding.group(sparse_w) if plan.sharded else plan.process_group
        self._last_update = None  # [(layer, n_grow, n_active)] of the last applied update, for stats()
        self._layers_without_grad = []  # the layers the last applied update left as they were (update.py)
        self.S = list(plan.S)
        self._units = plan.units
        self._cuts = plan.cuts  # FSDP2: per layer, every rank's shard boundaries along dim 0 (Conv1D only), or None
        self._plans = plan.plans  # FSDP2: per structured layer, how this rank selects its growth (sharding.UnitPlan)
        self._dense_why = plan.dense_why

    def _count_active(self):
        """The active positions of each sparse layer (under FSDP2 counted per shard and summed)."""
        local = [0 if m is None else int(_sharding.local(m).sum()) for m in self.backward_masks]
        if self._sharded:
            local = _dist.sum_counts(local, _sharding.local(self.W[0]).device, self.process_group)
        self._n_active = [None if m is None else c for m, c in zip(self.backward_masks, local)]

    def __reduce_ex__(self, protocol):
        raise TypeError("a RigLScheduler cannot be pickled or copied (torch.save(pruner), pickle, copy.deepcopy): "
                        "its hooks live on the model's parameters and would not come back. Save "
                        "pruner.state_dict() instead and resume with RigLScheduler(model, optimizer, state_dict=sd)")

    # ------------------------------------------------------------------ hyperparameters
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

    # ------------------------------------------------------------------ RNG, saved counters, devices
    def _seed_generator(self, saved=None):
        """SET's random growth draws from a generator of its own, seeded once from the global RNG (rank 0's
        seed under torch.distributed) and saved in the state dict, so resuming reproduces the draws. Resuming
        (`saved`: the state dict's generator state) draws nothing from the global RNG."""
        if self.grow_mode != "random":
            return
        if saved is not None:
            self._generator = torch.Generator()
            self._generator.set_state(saved)
            return
        seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64))
        group = None if self._sharded else self.process_group  # sharded: the world, so HSDP replicas agree
        seed = _dist.broadcast_seed(seed, _sharding.local(self.W[0]).device, group)
        self._generator = torch.Generator().manual_seed(seed)

    def _load_counters(self, loaded):
        self.step, self.rigl_steps, self.skipped_updates, rng = loaded.counters
        self._last_update = loaded.last_update
        self._layers_without_grad = loaded.layers_without_grad
        if rng is not None and self._generator is not None:
            self._generator.set_state(rng)

    def _load_dense_grads(self, loaded):
        accs = _dist.loaded_window(loaded.dense_grads, loaded.dense_grad_copies, self.process_group, self._sharded)
        for hook, a in zip(self.backward_hook_objects, accs):
            hook.dense_grad = a

    def _reattach_hooks(self) -> bool:
        return _devices.reattach_hooks(self)

    def _devices_moved(self) -> bool:
        return _devices.moved(self)

    def _follow_devices(self):
        _devices.follow(self)

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
        self._awaiting_step, self._missed_steps = False, 0
        self._reattach_hooks()
        if not self._skip_after_step:
            self._mask_after_step()
        if self.in_step:
            self._advance()  # this step counts; on an update step the update follows the optimizer's step
        else:
            self._count_step_without_pruner()

    def _count_step_without_pruner(self):
        """Two-line mode: pruner() advances the schedule. An optimizer that steps twice with no pruner() call
        between means a loop that never calls it: the schedule would stay put, silently."""
        self._steps_without_pruner += 1
        if self._steps_without_pruner == 2 and not self._warned_no_pruner:
            self._warned_no_pruner = True
            warnings.warn(f"rigl_fast: the optimizer stepped twice without a pruner() call between, so the RigL "
                          f"schedule is stuck at step {self.step}: call `if pruner(): optimizer.step()` after every "
                          "loss.backward(), or pass in_step=True where a framework calls optimizer.step() (this "
                          "warning is shown once)", UserWarning, stacklevel=5)

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
        _config.note_missed_step(self)
        self._steps_without_pruner = 0
        if self._reattach_hooks():
            self.apply_mask_to_gradients()  # the backward just run had no hook: mask its gradient now
        self._awaiting_step = self._advance()
        return self._awaiting_step

    def _advance(self) -> bool:
        """One training iteration: the step count, the topology update when one is due (returns False then),
        the DDP window fold otherwise. Hooks are re-attached by the caller (pruner() or the step hook)."""
        accumulated = self.check_if_backward_hook_should_accumulate_grad()  # what the last backward did
        self.step += 1
        if self.static_topo:
            return True
        if accumulated and self._sharded:
            _update.fold_sharded(self)  # before an update, which reads the accumulators
        if self.step % self.delta_T == 0 and self.step < self.T_end:
            self.rigl_steps += 1  # first: a warning the update raises (warnings filters) leaves the counts consistent
            self._rigl_step()
            return False
        if accumulated and not self._sharded and _dist.active(self.process_group):
            _update.fold_partial(self)
        return True

    def _rigl_step(self):
        """The topology update at this step (update.py), or a counted skip."""
        _update.rigl_step(self)

    def _drop_counts(self, idx, drop_fraction):
        return _update.drop_counts(self, idx, drop_fraction)

    def _free_dense_grads(self):
        _update.free_dense_grads(self)

    def stats(self) -> Dict[str, float]:
        """Plain numbers for any logger: `density` (active / all candidate weights) and `density/<layer>`,
        `updates` (applied) and `skipped_updates`, `step`, and `regrown_fraction` (and `regrown/<layer>`):
        the fraction of active weights the last applied update dropped and regrew (0.0 before the first);
        `layers_without_grad` (and `no_grad/<layer>` = 1.0 for each): the sparse layers that update kept as
        they were because they got no gradient in its window (update.py)."""
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
        out["layers_without_grad"] = len(self._layers_without_grad)
        for i in self._layers_without_grad:
            out[f"no_grad/{self.names[i]}"] = 1.0
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """rigl-torch's keys plus rigl_fast's (see state.py). Under DDP, rank 0's state dict is the one to save:
        it holds the whole accumulation window (the other ranks' partial sums are folded into it)."""
        return _state.build(self)

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Restore a state dict from `state_dict()` (or from rigl-torch 0.5.2). The whole of it is checked
        (types, counts, shapes, names, hyperparameters, structure) before anything changes."""
        loaded = _state.read(state_dict, self.names, self.W, self._hyperparams())
        hp = loaded.hp
        S, units, dense_why = _construct.structure_plan(hp, [tuple(w.shape) for w in self.W],
                                                        [bool(x) for x in self._linear_layers_mask],
                                                        self._transposed, loaded.S, True)
        _construct.check_held(self._optimizer, self.names, self.W, S)
        plans = None
        if self._sharded:
            plans = [None if u is None else _sharding.unit_plan(w, u, c)
                     for w, u, c in zip(self.W, units, self._cuts)]
            _construct.check_sharded_units(self._ops, self.names, loaded.masks, plans, self.process_group)
        else:
            _state.check_units(self.names, loaded.masks, units)
        # ---- checked: from here on, state changes ----
        self._set_hyperparams(hp)
        self.S = S
        self._units = units
        self._plans = plans
        self._dense_why = dense_why
        self.backward_masks = loaded.masks
        self._compute_layers = _compute.install(self)  # which layers are sparse may have changed
        self._count_active()
        if self.grow_mode == "random" and (self._generator is None or loaded.counters[3] is not None):
            self._seed_generator(loaded.counters[3])
        self._load_counters(loaded)
        self._load_dense_grads(loaded)
        self.apply_mask_to_weights()
        self.reset_momentum()
        self.apply_mask_to_gradients()

    def remove(self):
        """Unregister every hook (and compute='sparse''s forwards), so the model can be given to another
        scheduler. Masks stay applied."""
        for h in self._handles:
            h.remove()
        self._handles = []
        _compute.uninstall(self)  # the layers compute densely again
        self._free_dense_grads()
        self._unregister()

    def _unregister(self):
        _hooks.unregister(self)

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
