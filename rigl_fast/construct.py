"""Construction of a RigLScheduler: every argument checked and the layout planned before anything changes
(`plan`), then the initial masks drawn (`random_masks`)."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
from torch import nn

from . import compute as _compute
from . import config as _config
from . import devices as _devices
from . import distributed as _dist
from . import hooks as _hooks
from . import layers as _layers
from . import ops as _ops
from . import sharding as _sharding
from . import state as _state
from . import structure as _structure


def plan(model, optimizer, hp, state_dict, opts) -> SimpleNamespace:
    """Validates every argument (raising before the model, the optimizer or the RNG is touched) and returns
    what `RigLScheduler._build` sets up. `hp`: the constructor's hyperparameters; `opts`: its other keywords."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = _config.unwrap_optimizer(optimizer)
    _structure.parse(hp["structure"])  # before the state dict's hyperparameters: the argument itself is named
    if state_dict is not None:
        hp.update(_state.hyperparams(state_dict))  # the state dict's values win
    _config.validate(hp)
    _config.check_keywords(**opts)  # the checks the framework callbacks run too
    found = _find(model, opts)
    p = SimpleNamespace(inner=inner, hp=hp, found=found, names=found.names, W=found.weights, **opts)
    _plan_layers(p, state_dict)
    check_held(inner, p.names, p.W, p.S)
    _plan_devices(p)
    return p


def check_held(inner, names, weights, S) -> None:
    """Every sparse weight (sparsity S > 0) is one the optimizer steps: the masks are kept in its steps only.
    At construction and at load_state_dict (a state dict can make a dense layer sparse)."""
    held = {id(w) for group in inner.param_groups for w in group["params"]}
    missing = [n for n, w, s in zip(names, weights, S) if s > 0 and id(w) not in held]
    if missing:
        raise ValueError(f"optimizer does not hold the sparse weights {missing}: the optimizer given to "
                         "RigLScheduler must step every sparse weight (pass it the model's parameters)")


def _find(model, opts):
    found = _layers.select(model, include=opts["include"], exclude=opts["exclude"],
                           sparsify_tied=opts["sparsify_tied"])
    if not found.weights:
        why = "; ".join(f"{k.name}: {k.reason}" for k in found.skipped[:6])
        raise ValueError("model has no candidate weights: rigl_fast sparsifies the trainable floating-point "
                         "weights of nn.Linear, nn.Conv1d/2d/3d, transformers' Conv1D and "
                         "nn.MultiheadAttention, and found none" + (f" ({why})" if why else ""))
    _hooks.check_unregistered(found.names, found.weights)
    return found


def _plan_layers(p, state_dict) -> None:
    """Per-layer sparsity, structure units and (from a state dict, read and checked whole) masks."""
    hp, shapes = p.hp, [tuple(w.shape) for w in p.W]
    p.loaded = None if state_dict is None else _state.read(state_dict, p.names, p.W, hp)
    if p.loaded is not None:
        S, p.masks = p.loaded.S, p.loaded.masks
    else:
        S = _distribution(hp, shapes, p.found.is_linear)
        p.masks = None
        empty = [n for n, s in zip(p.names, S) if s >= 1]
        if empty:  # a state dict of such a run would not load ('S' must be in [0, 1))
            raise ValueError(f"dense_allocation={hp['dense_allocation']!r} is too small: the sparsity of {empty[0]} "
                             "rounds to 1, which keeps no weight active")
    p.S, p.units, p.dense_why = structure_plan(hp, shapes, p.found.is_linear, p.found.transposed, S,
                                               p.loaded is not None)
    if p.masks is not None:  # sharded masks: in _plan_devices, on every rank alike
        _state.check_units(p.names, p.masks, [None if _sharding.is_sharded(w) else u for w, u in zip(p.W, p.units)])


def _distribution(hp, shapes, is_linear):
    """The per-layer sparsities the hyperparameters' distribution gives (before the structure's rounding)."""
    return _layers.sparsities(hp["sparsity_distribution"], shapes, is_linear, hp["dense_allocation"],
                              hp["ignore_linear_layers"], hp["erk_power_scale"])


def structure_plan(hp, shapes, is_linear, transposed, S, loaded: bool):
    """structure.layer_plan of the sparsities S. S from a state dict (`loaded`) holds 0 for a layer its structure
    kept dense, not why: the reason is found again from the distribution's sparsities, as at the run's start."""
    S, units, why = _structure.layer_plan(hp["structure"], shapes, transposed, S)
    if loaded and any(s <= 0 and not w for s, w in zip(S, why)):
        try:
            first = _structure.layer_plan(hp["structure"], shapes, transposed, _distribution(hp, shapes, is_linear))[2]
        except ValueError:  # only the reasons' text depends on it: the state dict's own sparsities stand
            return S, units, why
        why = [w or (f if s <= 0 else "") for s, w, f in zip(S, why, first)]
    return S, units, why


def _plan_devices(p) -> None:
    """FSDP2 layout, the backend for the sparse weights' device, and (FSDP2) the shard cuts and unit plans."""
    p.sharded = _sharding.check_layout(p.names, p.W, [s > 0 for s in p.S])
    _compute.check_layout([n for n, w in zip(p.names, p.W) if _sharding.is_sharded(w)], p.sharded, p.compute)
    if p.sharded and p.process_group is not None:
        raise ValueError("process_group is for DDP; under FSDP2 the weights' device mesh is the group")
    if p.sharded_init != "global" and not p.sharded:
        warnings.warn("rigl_fast: sharded_init applies to FSDP2-sharded weights only; this model has none, so "
                      "it does nothing", UserWarning, stacklevel=4)
    sparse_devices = {w.device for w, s in zip(p.W, p.S) if s > 0} or {p.W[0].device}
    if len(sparse_devices) > 1:
        raise ValueError(f"model: sparse weights must be on one device, found {sorted(map(str, sparse_devices))}")
    p.ops = _ops.get_backend(p.backend, next(iter(sparse_devices)))
    _devices.check_sizes(p.ops, p.names, p.W, p.S)
    p.cuts = p.plans = None
    if p.sharded:  # collectives, on every rank alike: where each rank's shard of a Conv1D weight starts
        sparse_w = [w for w, s in zip(p.W, p.S) if s > 0]
        p.cuts = gather_cuts(p.W, p.found.transposed, sparse_w[0])
        p.plans = [_sharding.unit_plan(w, u, c) for w, u, c in zip(p.W, p.units, p.cuts)]
        if p.masks is not None:
            check_sharded_units(p.ops, p.names, p.masks, p.plans, _sharding.group(sparse_w))


def gather_cuts(W, transposed, probe):
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


def check_sharded_units(ops, names, masks, plans, group) -> None:
    """`state.check_units` for sharded masks, agreed on every rank (so all raise together): the units inside
    each shard checked there, the units split across shards (Conv1D) on their counts summed over the ranks."""
    if all(p is None or m is None for p, m in zip(plans, masks)):
        return
    plans = [None if m is None else p for p, m in zip(plans, masks)]
    split = _dist.split_unit_counts(ops, [None if m is None else _sharding.local(m) for m in masks], plans, group)
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


# ---------------------------------------------------------------- the initial masks
@torch.no_grad()
def random_masks(pruner):
    """rigl-torch's draws: for each sparse layer in order, zeros at randperm(n)[:int(S*n)] (global CPU RNG).
    Under torch.distributed every rank then takes rank 0's masks."""
    if pruner._sharded:
        return _random_sharded_masks(pruner)
    masks = []
    for w, s, n, u in zip(pruner.W, pruner.S, pruner.N, pruner._units):
        masks.append(None if s <= 0 else draw(n, s, u).view(w.shape).to(w.device))
    _dist.broadcast_masks(masks, pruner.process_group)
    return masks


def draw(n, s, units, generator=None):
    """One layer's whole flat mask on the CPU: rigl-torch's randperm draw, or the structure's."""
    if units is not None:
        return _structure.draw(units, generator)
    flat = torch.ones(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:int(s * n)]] = False
    return flat


def _random_sharded_masks(pruner):
    """FSDP2: every rank draws from rank 0's RNG state and keeps its shards, so the global masks are rank 0's
    draws, as under DDP, with no mask sent. A rank whose RNG state was rank 0's advances it as one process
    would; the others' RNG is left as it was. sharded_init='local': see sharding.local_draw."""
    first = next(i for i, s in enumerate(pruner.S) if s > 0)
    state = _dist.broadcast_rng_state(_sharding.local(pruner.W[first]).device)  # the world's rank 0: HSDP too
    g = torch.Generator()
    g.set_state(state)
    by_shard = pruner.sharded_init == "local"
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, generator=g)) if by_shard else 0
    local = []
    for i, (w, s) in enumerate(zip(pruner.W, pruner.S)):
        if s <= 0:
            local.append(None)
        elif by_shard:
            local.append(_sharding.local_draw(w, s, seed, i, pruner._units[i], pruner._plans[i]))
        else:
            whole = draw(w.numel(), s, pruner._units[i], g)
            local.append(_sharding.shard_of(w, whole).to(_sharding.local(w).device))
    if torch.equal(state, torch.get_rng_state()):
        torch.set_rng_state(g.get_state())
    return _sharding.masks_like(pruner.W, local)
