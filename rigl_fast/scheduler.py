"""RigLScheduler: rigl-torch 0.5.2's API on rigl_fast's op layer.

The scheduler decides when and how much (schedule, drop fraction, per-layer sparsity, checkpoints, errors);
every pass over weights goes through `self._ops`, a backend from `ops.py`.
"""
from __future__ import annotations

import numbers
import warnings
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import layers as _layers
from . import ops as _ops

FORMAT_VERSION = 1
GROW_MODES = ("gradient", "random")
AFTER_STEP_MODES = ("auto", "always")

# Optimizers whose update keeps a weight and its states exactly zero wherever the gradient, the weight and
# the states are zero (elementwise rules; tests/test_invariants.py proves it for each, with every option).
# For these the after-step masking pass is redundant: gradients are masked in backward and states are
# zeroed at every topology update. Exact types only: a subclass may change `step`.
ZERO_PRESERVING_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                              torch.optim.Adagrad)

_REGISTERED_ATTR = "_rigl_fast_registered"


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
        acc = None
        if s.check_if_backward_hook_should_accumulate_grad():
            if self.dense_grad is None:
                self.dense_grad = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
            acc = self.dense_grad
        else:
            self.dense_grad = None
        return s._ops.mask_grad(grad, mask, acc, s.grad_accumulation_n)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class RigLScheduler:
    """Drop-in replacement for `rigl_torch.RigL.RigLScheduler`.

    Call once per iteration, after `loss.backward()`: `if pruner(): optimizer.step()`.

    Keyword-only extras: `backend` ('auto', 'reference', 'triton', 'cpp'; env RIGL_FAST_BACKEND overrides
    'auto'), `erk_power_scale` (ERK exponent, default 1.0), `grow_mode` ('gradient' = RigL; 'random' = SET,
    Mocanu et al. 2018), `after_step` ('auto' skips the after-step masking pass for optimizers proven
    zero-preserving; 'always' keeps it).
    """

    def __init__(self, model, optimizer, dense_allocation=1, T_end=None, sparsity_distribution="uniform",
                 ignore_linear_layers=True, delta=100, alpha=0.3, static_topo=False, grad_accumulation_n=1,
                 state_dict=None, *, backend="auto", erk_power_scale=1.0, grow_mode="gradient",
                 after_step="auto"):
        # ---- validate everything before touching the model or the optimizer ----
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        hp = dict(dense_allocation=dense_allocation, T_end=T_end, sparsity_distribution=sparsity_distribution,
                  ignore_linear_layers=ignore_linear_layers, delta_T=delta, alpha=alpha, static_topo=static_topo,
                  grad_accumulation_n=grad_accumulation_n, erk_power_scale=erk_power_scale, grow_mode=grow_mode)
        if state_dict is not None:
            hp.update(self._hyperparams_from_state_dict(state_dict))  # the state dict's values win
        self._validate_hyperparams(hp)
        if after_step not in AFTER_STEP_MODES:
            raise ValueError(f"after_step must be one of {AFTER_STEP_MODES}, got {after_step!r}")
        _ops.check_name(backend)

        names, W, is_linear = _layers.find_candidates(model)
        if not W:
            raise ValueError("model has no candidate weights: rigl_fast sparsifies the weights of nn.Linear and "
                             "nn.Conv1d/2d/3d modules, and found none in the model")
        for name, w in zip(names, W):
            if getattr(w, _REGISTERED_ATTR, False) or getattr(w, "_has_rigl_backward_hook", False):
                raise ValueError(f"model is already registered to a RigLScheduler (weight {name!r} has its "
                                 "hooks); call .remove() on the old scheduler first")

        if state_dict is not None:
            S, masks = self._fit_state_dict(state_dict, names, W)
        else:
            S = _layers.sparsities(hp["sparsity_distribution"], [tuple(w.shape) for w in W], is_linear,
                                   hp["dense_allocation"], hp["ignore_linear_layers"], hp["erk_power_scale"])
            masks = None
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, w, s in zip(names, W, S) if s > 0 and id(w) not in held]
        if missing:
            raise ValueError(f"optimizer does not hold the sparse weights {missing}: pass the model's parameters "
                             "to the optimizer before creating the RigLScheduler")
        sparse_devices = {w.device for w, s in zip(W, S) if s > 0} or {W[0].device}
        if len(sparse_devices) > 1:
            raise ValueError(f"model: sparse weights must be on one device, found {sorted(map(str, sparse_devices))}")
        self._ops = _ops.get_backend(backend, next(iter(sparse_devices)))

        # ---- from here on, state changes ----
        self.model = model
        self.optimizer = optimizer
        self.W: List[nn.Parameter] = W
        self.names = names
        self._linear_layers_mask = [int(x) for x in is_linear]
        self.N = [w.numel() for w in W]
        self.backend = self._ops.name
        self._after_step_mode = after_step
        self._set_hyperparams(hp)
        self.S = list(S)
        self.step = 0
        self.rigl_steps = 0
        self.skipped_updates = 0
        self._generator = None
        if masks is None:
            self.backward_masks = self._random_masks()
        else:
            self.backward_masks = masks
        self._seed_generator()
        if state_dict is not None:
            self._load_counters(state_dict)
        self._n_active = [None if m is None else int(m.sum()) for m in self.backward_masks]

        self.backward_hook_objects: List[IndexMaskHook] = []
        self._handles = []
        for i, w in enumerate(W):
            hook = IndexMaskHook(i, self)
            self.backward_hook_objects.append(hook)
            self._handles.append(w.register_hook(hook))
            setattr(w, _REGISTERED_ATTR, True)
        self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if state_dict is not None:
            self._load_dense_grads(state_dict)
        self.apply_mask_to_weights()
        self.reset_momentum()
        self.apply_mask_to_gradients()

    # ------------------------------------------------------------------ validation / hyperparameters
    @staticmethod
    def _validate_hyperparams(hp):
        da = hp["dense_allocation"]
        if not _is_real(da) or not (0 < da <= 1):
            raise ValueError(f"dense_allocation must be a number in (0, 1], got {da!r}")
        if hp["sparsity_distribution"] not in _layers.DISTRIBUTIONS:
            raise ValueError(f"sparsity_distribution must be one of {_layers.DISTRIBUTIONS}, "
                             f"got {hp['sparsity_distribution']!r}")
        delta = hp["delta_T"]
        if not _is_int(delta) or delta < 1:
            raise ValueError(f"delta must be an integer >= 1, got {delta!r}")
        T_end = hp["T_end"]
        if T_end is None:
            if not hp["static_topo"]:
                raise ValueError("T_end is required (an integer >= 1, the step after which the topology is "
                                 "frozen; rigl-torch recommends 75% of the total iterations) unless static_topo=True")
        elif not _is_int(T_end) or T_end < 1:
            raise ValueError(f"T_end must be an integer >= 1, got {T_end!r}")
        alpha = hp["alpha"]
        if not _is_real(alpha) or not (0 <= alpha <= 1):
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        n = hp["grad_accumulation_n"]
        if not _is_int(n) or not (1 <= n < delta):
            raise ValueError(f"grad_accumulation_n must be an integer in [1, delta) = [1, {delta}), got {n!r}")
        eps = hp["erk_power_scale"]
        if not _is_real(eps) or not np.isfinite(eps):
            raise ValueError(f"erk_power_scale must be a finite number, got {eps!r}")
        if hp["grow_mode"] not in GROW_MODES:
            raise ValueError(f"grow_mode must be one of {GROW_MODES}, got {hp['grow_mode']!r}")
        if not isinstance(hp["static_topo"], (bool, int)):
            raise TypeError(f"static_topo must be a bool, got {hp['static_topo']!r}")
        if not isinstance(hp["ignore_linear_layers"], (bool, int)):
            raise TypeError(f"ignore_linear_layers must be a bool, got {hp['ignore_linear_layers']!r}")

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
        self._skip_after_step = (self._after_step_mode == "auto"
                                 and type(self.optimizer) in ZERO_PRESERVING_OPTIMIZERS)

    def _hyperparams(self):
        return dict(dense_allocation=self.dense_allocation, T_end=self.T_end,
                    sparsity_distribution=self.sparsity_distribution, ignore_linear_layers=self.ignore_linear_layers,
                    delta_T=self.delta_T, alpha=self.alpha, static_topo=self.static_topo,
                    grad_accumulation_n=self.grad_accumulation_n, erk_power_scale=self.erk_power_scale,
                    grow_mode=self.grow_mode)

    @staticmethod
    def _hyperparams_from_state_dict(sd):
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict (from RigLScheduler.state_dict()), got {type(sd).__name__}")
        for key in ("dense_allocation", "S", "N", "hyperparams", "step", "rigl_steps", "backward_masks"):
            if key not in sd:
                raise ValueError(f"state_dict is missing the key {key!r}: it is not a RigLScheduler state dict")
        hp = sd["hyperparams"]
        if not isinstance(hp, dict):
            raise ValueError("state_dict['hyperparams'] must be a dict")
        out = {"dense_allocation": sd["dense_allocation"]}
        for key in ("delta_T", "alpha", "T_end", "ignore_linear_layers", "static_topo", "sparsity_distribution",
                    "grad_accumulation_n", "erk_power_scale", "grow_mode"):
            if key in hp:
                out[key] = hp[key]
        return out

    def _fit_state_dict(self, sd, names, W):
        """Validated (S, masks) from a state dict for this model's candidates; raises naming the mismatch."""
        S, N, masks = sd["S"], sd["N"], sd["backward_masks"]
        if not (isinstance(S, (list, tuple)) and isinstance(N, (list, tuple)) and isinstance(masks, (list, tuple))):
            raise ValueError("state_dict: 'S', 'N' and 'backward_masks' must be lists")
        if not (len(S) == len(N) == len(masks) == len(W)):
            raise ValueError(f"state_dict does not fit the model: it has {len(S)} layers, the model has {len(W)} "
                             f"candidate weights ({names})")
        out = []
        for i, (name, w) in enumerate(zip(names, W)):
            if int(N[i]) != w.numel():
                raise ValueError(f"state_dict does not fit the model: layer {i} ({name}) has {N[i]} weights in the "
                                 f"state dict but {w.numel()} (shape {tuple(w.shape)}) in the model")
            m = masks[i]
            if S[i] <= 0:
                if m is not None:
                    raise ValueError(f"state_dict: layer {i} ({name}) is dense (S=0) but has a mask")
                out.append(None)
                continue
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(w.shape):
                got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"state_dict does not fit the model: mask of layer {i} ({name}) has shape {got}, "
                                 f"the weight has shape {tuple(w.shape)}")
            out.append(m.detach().to(device=w.device, dtype=torch.bool).clone().contiguous())
        accs = sd.get("rigl_fast_dense_grads")
        if accs is not None:
            if len(accs) != len(W):
                raise ValueError("state_dict: 'rigl_fast_dense_grads' has the wrong number of layers")
            for i, (name, w, a) in enumerate(zip(names, W, accs)):
                if a is not None and tuple(a.shape) != tuple(w.shape):
                    raise ValueError(f"state_dict does not fit the model: dense gradient of layer {i} ({name}) has "
                                     f"shape {tuple(a.shape)}, the weight has shape {tuple(w.shape)}")
        return list(S), out

    # ------------------------------------------------------------------ masks and RNG
    @torch.no_grad()
    def _random_masks(self):
        """rigl-torch's draws: for each sparse layer in order, zeros at randperm(n)[:int(S*n)] (global CPU RNG).
        Under torch.distributed every rank then takes rank 0's masks."""
        masks = []
        for w, s, n in zip(self.W, self.S, self.N):
            if s <= 0:
                masks.append(None)
                continue
            flat = torch.ones(n, dtype=torch.bool)
            flat[torch.randperm(n)[:int(s * n)]] = False
            masks.append(flat.view(w.shape).to(w.device))
        if dist.is_available() and dist.is_initialized():
            for m in masks:
                if m is not None:
                    buf = m.to(torch.uint8)
                    dist.broadcast(buf, 0)
                    m.copy_(buf.bool())
        return masks

    def _seed_generator(self):
        """SET's random growth draws from a generator of its own, seeded once from the global RNG (rank 0's
        seed under torch.distributed) and saved in the state dict, so resuming reproduces the draws."""
        if self.grow_mode != "random":
            return
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(seed, 0)
        self._generator = torch.Generator().manual_seed(int(seed))

    def _load_counters(self, sd):
        self.step = int(sd["step"])
        self.rigl_steps = int(sd["rigl_steps"])
        self.skipped_updates = int(sd.get("rigl_fast_skipped_updates", 0))
        rng = sd.get("rigl_fast_rng")
        if rng is not None and self._generator is not None:
            self._generator.set_state(rng)

    def _load_dense_grads(self, sd):
        accs = sd.get("rigl_fast_dense_grads")
        for hook, w, i in zip(self.backward_hook_objects, self.W, range(len(self.W))):
            a = None if accs is None else accs[i]
            hook.dense_grad = None if a is None else a.detach().to(w.device).clone().contiguous()

    # ------------------------------------------------------------------ the masked tensors
    def _sparse_layers(self):
        return [i for i, m in enumerate(self.backward_masks) if m is not None]

    def _states_like(self, w):
        state = self.optimizer.state.get(w)
        if not state:
            return []
        return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == w.shape and v is not w]

    @torch.no_grad()
    def apply_mask_to_weights(self):
        idx = self._sparse_layers()
        self._ops.apply_masks([self.W[i] for i in idx], [self.backward_masks[i] for i in idx])

    @torch.no_grad()
    def reset_momentum(self):
        """Zero every optimizer state shaped like a sparse weight off its mask (all states, not only SGD's)."""
        tensors, masks = [], []
        for i in self._sparse_layers():
            for t in self._states_like(self.W[i]):
                tensors.append(t)
                masks.append(self.backward_masks[i])
        self._ops.apply_masks(tensors, masks)

    @torch.no_grad()
    def apply_mask_to_gradients(self):
        tensors, masks = [], []
        for i in self._sparse_layers():
            if self.W[i].grad is not None:
                tensors.append(self.W[i].grad)
                masks.append(self.backward_masks[i])
        self._ops.apply_masks(tensors, masks)

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer, args, kwargs):
        if self._skip_after_step:
            return
        tensors, masks = [], []
        for i in self._sparse_layers():
            m = self.backward_masks[i]
            tensors.append(self.W[i])
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
        self.step += 1
        if self.static_topo:
            return True
        if self.step % self.delta_T == 0 and self.step < self.T_end:
            self._rigl_step()
            self.rigl_steps += 1
            return False
        return True

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
        weights = [self.W[i] for i in idx]
        if self.grow_mode == "random":
            scores = [torch.rand(w.shape, generator=self._generator).to(w.device) for w in weights]
        else:
            accs = [self.backward_hook_objects[i].dense_grad for i in idx]
            self._free_dense_grads()
            have_grad = any(a is not None for a in accs)
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            if have_grad or distributed:
                scores = [torch.zeros_like(w) if a is None else a for w, a in zip(weights, accs)]
            if distributed:  # every rank must reach the all-reduce, so the skip decision is taken after it
                have_grad = self._all_reduce_sum(scores, have_grad)
            if not have_grad:
                self._skip("no gradient was accumulated: call loss.backward() before pruner()")
                return
        n_keep, n_grow = [], []
        for i in idx:
            n_drop = int(self._n_active[i] * drop_fraction)
            n_keep.append(self._n_active[i] - n_drop)
            n_grow.append(n_drop)
        if not self._ops.checked_update(weights, [self.backward_masks[i] for i in idx], scores, n_keep, n_grow,
                                        [self._states_like(w) for w in weights], [w.grad for w in weights]):
            self._skip("non-finite weights or gradients, e.g. an fp16 overflow")

    @staticmethod
    def _all_reduce_sum(tensors, have_grad: bool) -> bool:
        """Grow scores are the gradient summed over ranks: one all-reduce of all layers' accumulators, with
        one more element counting the ranks that accumulated anything. Returns whether any rank did."""
        flag = torch.ones(1, dtype=tensors[0].dtype, device=tensors[0].device) * float(have_grad)
        flat = torch.cat([t.reshape(-1) for t in tensors] + [flag])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return bool(flat[-1] > 0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        hp = self._hyperparams()
        return {
            "dense_allocation": self.dense_allocation,
            "S": list(self.S),
            "N": list(self.N),
            "hyperparams": {k: hp[k] for k in ("delta_T", "alpha", "T_end", "ignore_linear_layers", "static_topo",
                                               "sparsity_distribution", "grad_accumulation_n", "erk_power_scale",
                                               "grow_mode")},
            "step": self.step,
            "rigl_steps": self.rigl_steps,
            "backward_masks": [None if m is None else m.clone() for m in self.backward_masks],
            "_linear_layers_mask": list(self._linear_layers_mask),
            "rigl_fast_format": FORMAT_VERSION,
            "rigl_fast_skipped_updates": self.skipped_updates,
            "rigl_fast_dense_grads": [None if h.dense_grad is None else h.dense_grad.clone()
                                      for h in self.backward_hook_objects],
            "rigl_fast_rng": None if self._generator is None else self._generator.get_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Restore a state dict from `state_dict()` (or from rigl-torch 0.5.2). Validated before any change."""
        hp = self._hyperparams()
        hp.update(self._hyperparams_from_state_dict(state_dict))
        self._validate_hyperparams(hp)
        S, masks = self._fit_state_dict(state_dict, self.names, self.W)
        self._set_hyperparams(hp)
        self.S = S
        self.backward_masks = masks
        self._n_active = [None if m is None else int(m.sum()) for m in masks]
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
        for w in self.W:
            if hasattr(w, _REGISTERED_ATTR):
                delattr(w, _REGISTERED_ATTR)

    # ------------------------------------------------------------------ printing
    @torch.no_grad()
    def __str__(self):
        N_str, S_str = [], []
        total, total_nz, conv, conv_nz = 0, 0, 0, 0
        for N, mask, W, is_linear in zip(self.N, self.backward_masks, self.W, self._linear_layers_mask):
            zeros_off_mask = 0 if mask is None else int((W[~mask] == 0).sum())
            nz = N - zeros_off_mask
            N_str.append("%i/%i" % (nz, N))
            S_str.append("%.2f%%" % (float(nz) / float(N) * 100))
            total += N
            total_nz += nz
            if not is_linear:
                conv += N
                conv_nz += nz

        def pct(a, b):
            return "%i/%i (%.2f%%)" % (a, b, float(a) / float(b) * 100 if b else 0.0)

        s = "RigLScheduler(\n"
        s += "layers=%i,\n" % len(self.N)
        s += "nonzero_params=[" + ", ".join(N_str) + "],\n"
        s += "nonzero_percentages=[" + ", ".join(S_str) + "],\n"
        s += "total_nonzero_params=" + pct(total_nz, total) + ",\n"
        s += "total_CONV_nonzero_params=" + pct(conv_nz, conv) + ",\n"
        s += "step=" + str(self.step) + ",\n"
        s += "num_rigl_steps=" + str(self.rigl_steps) + ",\n"
        s += "ignoring_linear_layers=" + str(self.ignore_linear_layers) + ",\n"
        s += "sparsity_distribution=" + str(self.sparsity_distribution) + ",\n"
        return s + ")"

    __repr__ = __str__
