"""The scheduler's arguments: validation and the optimizer it hooks (both before anything is changed), and
the warnings for configurations that would do nothing and the note on a model far denser than asked (after a
successful construction), and for a loop that steps another optimizer than the one the scheduler hooks."""
from __future__ import annotations

import inspect
import logging
import numbers
import warnings
from typing import List

import numpy as np
import torch

from . import compute as _compute
from . import distributed as _dist
from . import layers as _layers
from . import ops as _ops
from . import sharding as _sharding
from . import structure as _structure

GROW_MODES = ("gradient", "random")
AFTER_STEP_MODES = ("always", "trusted")

# Optimizers whose update keeps a weight and its states exactly zero wherever the gradient, the weight and
# the states are zero (elementwise rules; tests/test_invariants.py proves it for each, with every option).
# With after_step='trusted' the after-step masking pass is skipped for these: correct only while nothing
# but rigl_fast's hooks touches weights, gradients and optimizer states (see RigLScheduler's docstring).
# Exact types only: a subclass may change `step`.
ZERO_PRESERVING_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                              torch.optim.Adagrad)


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate(hp) -> None:
    """Raises ValueError/TypeError naming the first bad hyperparameter (nothing has changed yet)."""
    da = hp["dense_allocation"]
    if not is_real(da) or not (0 < da <= 1):
        raise ValueError(f"dense_allocation must be a number in (0, 1], got {da!r}")
    if hp["sparsity_distribution"] not in _layers.DISTRIBUTIONS:
        raise ValueError(f"sparsity_distribution must be one of {_layers.DISTRIBUTIONS}, "
                         f"got {hp['sparsity_distribution']!r}")
    delta = hp["delta_T"]
    if not is_int(delta) or delta < 2:
        raise ValueError(f"delta must be an integer >= 2 (the steps between topology updates; with delta=1 every "
                         f"step would be an update and the optimizer would never step), got {delta!r}")
    T_end = hp["T_end"]
    if T_end is None:
        if not hp["static_topo"]:
            raise ValueError("T_end is required (an integer >= 1, the step after which the topology is "
                             "frozen; rigl-torch recommends 75% of the total iterations) unless static_topo=True")
    elif not is_int(T_end) or T_end < 1:
        raise ValueError(f"T_end must be an integer >= 1, got {T_end!r}")
    alpha = hp["alpha"]
    if not is_real(alpha) or not (0 <= alpha <= 1):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    n = hp["grad_accumulation_n"]
    if not is_int(n) or not (1 <= n < delta):
        raise ValueError(f"grad_accumulation_n must be an integer in [1, delta) = [1, {delta}), got {n!r}")
    eps = hp["erk_power_scale"]
    if not is_real(eps) or not np.isfinite(eps):
        raise ValueError(f"erk_power_scale must be a finite number, got {eps!r}")
    _structure.check(hp.get("structure", "unstructured"), hp)
    if hp["grow_mode"] not in GROW_MODES:
        raise ValueError(f"grow_mode must be one of {GROW_MODES}, got {hp['grow_mode']!r}")
    if not isinstance(hp["static_topo"], (bool, int)):
        raise TypeError(f"static_topo must be a bool, got {hp['static_topo']!r}")
    if not isinstance(hp["ignore_linear_layers"], (bool, int)):
        raise TypeError(f"ignore_linear_layers must be a bool, got {hp['ignore_linear_layers']!r}")


def check_after_step(after_step) -> None:
    if after_step == "auto":
        raise ValueError("after_step='auto' is now called 'trusted' and is no longer the default (it skips the "
                         "after-step pass, exact only when nothing else changes weights, gradients or optimizer "
                         "states); use after_step='trusted', or the default 'always'")
    if after_step not in AFTER_STEP_MODES:
        raise ValueError(f"after_step must be one of {AFTER_STEP_MODES}, got {after_step!r}")


def check_flags(**flags) -> None:
    """Keyword-only switches of the scheduler that must be real bools (sparsify_tied, in_step)."""
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"{k} must be a bool, got {v!r}")


def unwrap_optimizer(optimizer):
    """The torch.optim.Optimizer that really steps. Wrappers that forward step() to an optimizer held as
    `.optimizer` (Accelerate's AcceleratedOptimizer, which the HF Trainer uses; Lightning's
    LightningOptimizer) are followed down to it: its step hook fires whenever the wrapper steps."""
    opt = optimizer
    for _ in range(8):
        if isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "_optimizer_step_post_hooks"):
            return opt
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    raise TypeError(f"optimizer must be a torch.optim.Optimizer, or a wrapper that forwards step() to one held as "
                    f".optimizer (like Accelerate's AcceleratedOptimizer); got {type(optimizer).__name__}, which is "
                    "neither: pass the torch.optim.Optimizer that steps the model's parameters")


def warn_if_idle(pruner, model, include, exclude, sparsify_tied, n_tied) -> None:
    """Configurations that would silently do nothing get a warning naming the argument to change."""
    for p in _layers.unmatched_patterns(model, include, exclude):
        warnings.warn(f"rigl_fast: {p} matches no module name of the model, so it changes nothing",
                      UserWarning, stacklevel=3)
    if sparsify_tied and not n_tied:
        warnings.warn("rigl_fast: sparsify_tied=True changes nothing: no candidate weight is tied to another "
                      "module", UserWarning, stacklevel=3)
    if pruner._after_step_mode == "trusted" and not pruner._skip_after_step:
        warnings.warn(f"rigl_fast: after_step='trusted' changes nothing with {type(pruner._optimizer).__name__}: "
                      "only SGD, Adam, AdamW, RMSprop and Adagrad are proven to keep zeros zero, so the after-step "
                      "pass runs", UserWarning, stacklevel=3)
    kept_dense = [f"{n} ({why})" for n, why in zip(pruner.names, pruner._dense_why) if why]
    if kept_dense:
        warnings.warn(f"rigl_fast: structure={pruner.structure!r} keeps {len(kept_dense)} layer(s) dense that would "
                      f"otherwise be sparse: {', '.join(kept_dense[:4])}", UserWarning, stacklevel=3)
    if all(s <= 0 for s in pruner.S):
        n_lin = sum(pruner._linear_layers_mask)
        if pruner.ignore_linear_layers and n_lin:
            why = (f"ignore_linear_layers=True keeps its {n_lin} linear layers (nn.Linear, Conv1D, attention "
                   "projections) dense; pass ignore_linear_layers=False")
        elif pruner.dense_allocation >= 1:
            why = "dense_allocation=1 keeps every layer dense; pass e.g. dense_allocation=0.1"
        elif kept_dense:
            why = f"structure={pruner.structure!r} keeps the layers that would be sparse dense (warned above)"
        else:
            why = "every candidate is dense under this sparsity_distribution"
        warnings.warn(f"rigl_fast: no layer of the model is sparse, so RigL does nothing: {why}", UserWarning,
                      stacklevel=3)
    elif not pruner.static_topo and pruner.T_end is not None and pruner.T_end <= pruner.delta_T:
        warnings.warn(f"rigl_fast: T_end={pruner.T_end} <= delta={pruner.delta_T}, so no topology update will ever "
                      "run (the first is at step delta, and none at or after T_end); set T_end to about 75% of "
                      "the training steps", UserWarning, stacklevel=3)
    else:
        for what in _idle_settings(pruner):
            warnings.warn(f"rigl_fast: {what}", UserWarning, stacklevel=3)


def _idle_settings(pruner) -> List[str]:
    """Hyperparameters that change nothing in a run with sparse layers (warn_if_idle), each said with the fix."""
    out = []
    if pruner.alpha == 0 and not pruner.static_topo:
        out.append("alpha=0 drops (and grows) nothing, so the masks never change, yet every update step still "
                   "skips the optimizer step; for fixed masks pass static_topo=True")
    if pruner.grad_accumulation_n > 1 and (pruner.static_topo or pruner.grow_mode != "gradient"):
        why = "static_topo=True" if pruner.static_topo else f"grow_mode={pruner.grow_mode!r}"
        out.append(f"grad_accumulation_n={pruner.grad_accumulation_n} changes nothing with {why}: dense gradients "
                   "are accumulated only for grow_mode='gradient' updates")
    if pruner.static_topo and pruner.grow_mode != "gradient":
        out.append(f"grow_mode={pruner.grow_mode!r} changes nothing with static_topo=True: no weight is ever grown")
    if pruner.erk_power_scale != 1.0 and pruner.sparsity_distribution != "erk":
        out.append(f"erk_power_scale={pruner.erk_power_scale} changes nothing with "
                   f"sparsity_distribution={pruner.sparsity_distribution!r}: only 'erk' uses it")
    whys = sorted({why for _, why in pruner._compute_layers.values()})
    if pruner.compute == "sparse" and whys and all(whys):
        out.append(f"compute='sparse' changes nothing: every sparse layer is dense-computed ({'; '.join(whys[:3])}; "
                   "pruner.summary() says why per layer)")
    return out


MISSED_STEPS = 20  # pruner() calls that said "step", the hooked optimizer not stepping since


def note_missed_step(pruner) -> None:
    """Two-line mode, at each pruner() call: did the optimizer given to the scheduler step since the last call
    that returned True? A few misses in a row are skipped steps (GradScaler on an overflow); MISSED_STEPS mean the
    loop steps another optimizer (a replaced one), whose steps the after-step masking and the updates' resets of
    the optimizer state never see: its momentum moves dropped weights off zero, silently. Warned as the count
    reaches MISSED_STEPS (again only if a step of the hooked optimizer restarted it)."""
    if not pruner._awaiting_step:  # the last call was an update (False: no step due) or the first call
        return
    pruner._missed_steps += 1  # back to 0 at the optimizer's next step (scheduler._after_optimizer_step)
    if pruner._missed_steps == MISSED_STEPS:
        warnings.warn(f"rigl_fast: pruner() said to step the optimizer {MISSED_STEPS} times since the optimizer given "
                      f"to RigLScheduler ({type(pruner._optimizer).__name__}) last stepped: if the loop steps another "
                      "optimizer, the masks are not kept in its steps and dropped weights drift off zero; hook the "
                      "one that steps (sd = pruner.state_dict(); pruner.remove(); pruner = RigLScheduler(model, "
                      "new_optimizer, ..., state_dict=sd) keeps the masks and the schedule)", UserWarning, stacklevel=3)


def check_keywords(*, after_step, sparsify_tied, in_step, process_group, sharded_init, backend, include,
                   exclude, compute="dense") -> None:
    """RigLScheduler's keyword-only arguments that need no model, checked alike by the scheduler and by the
    wrappers that build it later; raises naming the first bad one."""
    check_after_step(after_step)
    check_flags(sparsify_tied=sparsify_tied, in_step=in_step)
    _dist.check_group(process_group)
    if sharded_init not in _sharding.INIT_DRAWS:
        raise ValueError(f"sharded_init must be one of {_sharding.INIT_DRAWS}, got {sharded_init!r}")
    _ops.check_name(backend)
    _layers.check_patterns("include", include)
    _layers.check_patterns("exclude", exclude)
    _compute.check_mode(compute)


# The density note is a log line (logger "rigl_fast", level WARNING: printed on stderr unless logging is
# configured otherwise), not a Python warning: the configuration is legitimate (rigl-torch's rule), the user
# only needs to know, and a warning would turn into an error under warnings filters set to "error".
log = logging.getLogger("rigl_fast")
DENSITY_NOTE_RATIO = 1.5  # overall density above this many times dense_allocation gets the one-line note


def note_density(pruner) -> None:
    """At construction: one line when the candidates' overall density is far above dense_allocation, naming
    the share of the weights that the layers kept dense hold, by reason (summary.dense_reason)."""
    from .summary import dense_reason
    total = sum(pruner.N)
    active = sum(n if m is None else a for n, m, a in zip(pruner.N, pruner.backward_masks, pruner._n_active))
    if all(m is None for m in pruner.backward_masks) or active <= DENSITY_NOTE_RATIO * pruner.dense_allocation * total:
        return
    share = {}
    for i, (n, m) in enumerate(zip(pruner.N, pruner.backward_masks)):
        if m is None:
            why = dense_reason(pruner, i)
            share.setdefault(why, []).append((pruner.names[i], n))
    parts = []
    for why, layers in sorted(share.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        names = ", ".join(name for name, _ in layers[:2]) + (f" and {len(layers) - 2} more" if len(layers) > 2 else "")
        parts.append(f"{why}: {names}, {100.0 * sum(n for _, n in layers) / total:.1f}%")
    kept = sum(n for ls in share.values() for _, n in ls)
    log.warning(f"rigl_fast: the sparse candidates are {100.0 * active / total:.1f}% dense overall, not "
                f"dense_allocation={pruner.dense_allocation}: the layers kept dense hold {100.0 * kept / total:.1f}% "
                f"of the weights ({'; '.join(parts)}); see pruner.summary(), and sparsity_distribution='erk'"
                + (" or ignore_linear_layers=False" if pruner.ignore_linear_layers else "") + " to spread the budget")


def check_scheduler_kwargs(kwargs, reserved, who: str) -> None:
    """For wrappers that build the scheduler later (the framework callbacks): RigLScheduler's keyword names
    and every value that can be checked before a model exists, so bad input fails where it is written.
    `reserved` maps the arguments the wrapper supplies itself to why they cannot be passed."""
    from .scheduler import RigLScheduler  # here, not at the top: scheduler imports this module

    params = {k: p for k, p in inspect.signature(RigLScheduler.__init__).parameters.items() if k != "self"}
    for k in kwargs:
        if k in reserved:
            raise TypeError(f"{who}: do not pass {k!r}: {reserved[k]}")
        if k not in params:
            accepted = [n for n in params if n not in reserved]
            raise TypeError(f"{who} got an unexpected keyword argument {k!r}; it takes RigLScheduler's arguments: "
                            f"{', '.join(accepted)}")
    v = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    v.update(kwargs)
    _structure.parse(v["structure"])  # as the scheduler: the argument itself named before how it fits the rest
    validate(dict(dense_allocation=v["dense_allocation"], T_end=1 if v["T_end"] is None else v["T_end"],
                  sparsity_distribution=v["sparsity_distribution"], ignore_linear_layers=v["ignore_linear_layers"],
                  delta_T=v["delta"], alpha=v["alpha"], static_topo=v["static_topo"],
                  grad_accumulation_n=v["grad_accumulation_n"], erk_power_scale=v["erk_power_scale"],
                  grow_mode=v["grow_mode"], structure=v["structure"]))  # T_end: a stand-in the wrapper fills in
    check_keywords(**{k: v[k] for k in ("after_step", "sparsify_tied", "in_step", "process_group", "sharded_init",
                                        "backend", "include", "exclude", "compute")})
