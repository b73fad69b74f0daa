"""Which weights are sparse candidates, and how sparse each one is (uniform, ERK, ER)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

DISTRIBUTIONS = ("uniform", "erk", "er")
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CANDIDATE_TYPES = (nn.Linear,) + CONV_TYPES
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
ATTENTION, LINEAR, CONV1D, CONV = "attention", "linear", "conv1d", "conv"


def is_conv1d_like(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 and kin): a linear layer whose weight is stored (in, out), recognised by
    its class name (in its MRO: FSDP2 subclasses it as FSDPConv1D) and `nf` attribute so that transformers is
    never imported."""
    w = getattr(module, "weight", None)
    return (any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf")
            and isinstance(w, torch.Tensor) and w.dim() == 2)


def kind(module: nn.Module) -> Optional[str]:
    """The candidate rule, one for training (`weight_slots`, `select`) and export: ATTENTION for
    nn.MultiheadAttention, LINEAR for nn.Linear, CONV1D for transformers' Conv1D (weight stored (in, out)), CONV
    for nn.Conv1d/2d/3d, subclasses included; None for any other module."""
    if isinstance(module, nn.MultiheadAttention):
        return ATTENTION
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, CONV_TYPES):
        return CONV
    if is_conv1d_like(module):
        return CONV1D
    return None


def _base_type(module: nn.Module, k: str) -> type:
    """The class whose forward defines what a candidate of kind `k` computes."""
    if k == CONV1D:
        return next(c for c in type(module).__mro__ if c.__name__ == "Conv1D")
    if k == CONV:
        return next(c for c in type(module).__mro__ if c in CONV_TYPES)
    return nn.MultiheadAttention if k == ATTENTION else nn.Linear


def own_forward(module: nn.Module) -> Optional[str]:
    """None if the candidate `module` computes its base type's forward (nn.Linear's, Conv1D's, ...), else why
    not: a subclass with another forward, a forward set on the instance, or forward hooks. Training masks
    such a module's weight all the same; export keeps it as it is, since a replacement computing the base
    type's function would change what it computes."""
    k = kind(module)
    if k is None:
        return "it is not a candidate type"
    base = _base_type(module, k)
    if type(module).forward is not base.forward:
        owner = next(c for c in type(module).__mro__ if "forward" in vars(c))
        return (f"it is a {type(module).__name__}, whose forward ({owner.__qualname__}.forward) is not "
                f"{base.__qualname__}.forward")
    if "forward" in vars(module) and not getattr(vars(module)["forward"], "_rigl_fast_compute", False):
        return "its forward is replaced on the instance"
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks, which a replacement would not run"
    return None


def weight_slots(module: nn.Module) -> List[Tuple[str, bool]]:
    """(attribute, is_linear) of each weight of `module` that can be sparse, by the type rules alone."""
    k = kind(module)
    if k == ATTENTION:
        return [(a, True) for a in MHA_WEIGHTS if getattr(module, a, None) is not None]
    if k is None:
        return []
    return [("weight", k != CONV)]


@dataclass
class Skipped:
    """A weight of a candidate type that stays out of the candidates, and why."""
    name: str
    shape: Tuple[int, ...]
    reason: str


@dataclass
class Candidates:
    names: List[str] = field(default_factory=list)          # parameter names, e.g. "h.0.attn.c_attn.weight"
    weights: List[nn.Parameter] = field(default_factory=list)
    is_linear: List[bool] = field(default_factory=list)
    transposed: List[bool] = field(default_factory=list)    # stored (in, out): transformers' Conv1D
    skipped: List[Skipped] = field(default_factory=list)
    n_tied: int = 0                                         # weights also held by a non-candidate module


def check_patterns(arg: str, patterns) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{arg} must be a list of glob patterns over module names (e.g. {arg}=['*.mlp.*']), "
                        f"got {patterns!r}")
    return list(patterns)


def _matches(module_name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a module if it matches its name or the name of a module containing it, so
    exclude=["encoder"] and exclude=["encoder.*"] both reach every layer inside `encoder`."""
    parts = module_name.split(".") if module_name else []
    prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)] or [""]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in prefixes)


def _param_owners(model: nn.Module):
    """id(parameter) -> every 'module.attr' that holds it (tied weights have more than one)."""
    owners = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname, module, pname))
    return owners


def select(model: nn.Module, include=None, exclude=None, sparsify_tied: bool = False) -> Candidates:
    """The candidate weights of `model`, in `named_modules()` order (SPEC section 2).

    Trainable floating-point weights of nn.Linear, nn.Conv1d/2d/3d (subclasses too), transformers-style
    Conv1D and nn.MultiheadAttention's projection weights. `include`/`exclude` are glob patterns over
    module names (fnmatch, case-sensitive; a pattern matching a module also covers the modules inside it;
    attention projections go by their MultiheadAttention's name). A weight also held by a non-candidate
    module (an embedding tied to an output head, or a module `include` does not match) stays dense unless
    `sparsify_tied`; one shared with an excluded module stays dense whatever `sparsify_tied` says. A weight
    shared by candidate slots is listed once, at its first. Raises ValueError naming the layer for weights it cannot
    mask: parametrized (computed, not a Parameter), lazy (uninitialised) or on the meta device. Nothing is
    modified.
    """
    include = check_patterns("include", include)
    exclude = check_patterns("exclude", exclude)
    owners = _param_owners(model)
    out, seen = Candidates(), set()
    slot_ids, kept_out, slots = set(), {}, []
    for mname, module in model.named_modules():
        for attr, linear in weight_slots(module):
            p = module._parameters.get(attr)
            name = f"{mname}.{attr}" if mname else attr
            skip = _left_out(module, mname, attr, name, include, exclude)
            if p is not None and not (skip and skip.reason == "not matched by include"):  # those: non-candidates
                slot_ids.add((id(module), attr))
            if p is not None and skip and skip.reason == "excluded":
                kept_out.setdefault(id(p), skip)  # a weight it shares with another slot stays dense there too
            slots.append((module, attr, linear, name, skip))
    for module, attr, linear, name, skip in slots:
        if skip is not None:
            out.skipped.append(skip)
            continue
        w = module._parameters[attr]
        if id(w) in seen:
            continue
        seen.add(id(w))
        if id(w) in kept_out:
            out.skipped.append(Skipped(name, tuple(w.shape), f"tied to {kept_out[id(w)].name} "
                                                             f"({kept_out[id(w)].reason})"))
            continue
        tied = [o for o, mod, a in owners.get(id(w), []) if (id(mod), a) not in slot_ids]
        out.n_tied += bool(tied)
        if tied and not sparsify_tied:
            out.skipped.append(Skipped(name, tuple(w.shape), f"tied to {tied[0]}"))
            continue
        out.names.append(name)
        out.weights.append(w)
        out.is_linear.append(linear)
        out.transposed.append(kind(module) == CONV1D)
    return out


def _left_out(module, mname, attr, name, include, exclude) -> Optional[Skipped]:
    """Why the weight `attr` of the candidate `module` stays out of the candidates (its Skipped entry), or None
    if it is in; raises ValueError naming the layer for a weight rigl_fast cannot mask."""
    if include and not _matches(mname, include):
        return Skipped(name, _shape(module, attr), "not matched by include")
    if exclude and _matches(mname, exclude):
        return Skipped(name, _shape(module, attr), "excluded")
    if parametrize.is_parametrized(module, attr) or attr not in module._parameters:
        computed = getattr(module, attr)
        if isinstance(computed, torch.Tensor) and not computed.requires_grad:
            return Skipped(name, tuple(computed.shape), "frozen")
        raise ValueError(f"layer {name!r}: its weight is computed (a parametrization such as weight norm), "
                         "not a Parameter, so rigl_fast cannot mask it; remove the parametrization or "
                         f"keep the layer dense with exclude=[{mname!r}]")
    w = module._parameters[attr]
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ValueError(f"layer {name!r} is lazy (uninitialized): run one forward pass to materialise it "
                         "before creating the RigLScheduler")
    if not w.requires_grad:
        return Skipped(name, tuple(w.shape), "frozen")
    if not w.is_floating_point():
        return Skipped(name, tuple(w.shape), f"not floating point ({w.dtype})")
    if w.device.type == "meta":
        raise ValueError(f"layer {name!r} is on the meta device: materialise the model (to_empty() and "
                         "initialise or load its weights) before creating the RigLScheduler")
    return None


def unmatched_patterns(model: nn.Module, include=None, exclude=None) -> List[str]:
    """The include/exclude patterns that match no module name (a configuration that does nothing)."""
    names = [n for n, _ in model.named_modules()]
    return [f"{arg}={p!r}" for arg, pats in (("include", include), ("exclude", exclude)) for p in (pats or [])
            if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def _shape(module, attr) -> Tuple[int, ...]:
    w = getattr(module, attr, None)
    if isinstance(w, nn.parameter.UninitializedParameter) or not isinstance(w, torch.Tensor):
        return ()
    return tuple(w.shape)


def find_candidates(model: nn.Module) -> Tuple[List[str], List[nn.Parameter], List[bool]]:
    """(names, weights, is_linear) of the candidates under the default rules (see `select`)."""
    c = select(model)
    return c.names, c.weights, c.is_linear


def uniform_sparsities(n_layers: int, is_linear: Sequence[bool], dense_allocation: float,
                       ignore_linear_layers: bool) -> List[float]:
    """rigl-torch's rule: 1 - dense_allocation everywhere, except the first layer (dense when there is more
    than one) and, with ignore_linear_layers, every Linear (dense)."""
    S = []
    for i in range(n_layers):
        if i == 0 and n_layers > 1:
            S.append(0)
        elif is_linear[i] and ignore_linear_layers:
            S.append(0)
        else:
            S.append(1 - dense_allocation)
    return S


def erdos_renyi_sparsities(shapes: Sequence[Sequence[int]], dense: Sequence[bool], dense_allocation: float,
                           kernel: bool = True, power_scale: float = 1.0) -> List[float]:
    """Erdős–Rényi(-Kernel) sparsities, as google-research/rigl's `get_sparsities_erdos_renyi`.

    Layers with dense[i] True are kept dense and left out of the budget. The others get density
    eps * raw_l with raw_l = (sum(shape)/prod(shape)) ** power_scale (ERK) or (c_out + c_in)/(c_out * c_in)
    (ER), eps chosen so their nonzeros total dense_allocation times their size. While the largest density
    would exceed 1, the layers with the largest raw_l are made dense (their extra nonzeros taken out of the
    budget) and eps is solved again — the TF algorithm, iteration for iteration.
    """
    sparse_idx = [i for i in range(len(shapes)) if not dense[i]]
    numel = {i: float(torch.Size(shapes[i]).numel()) for i in sparse_idx}
    raw = {}
    for i in sparse_idx:
        shape = list(shapes[i])
        if kernel:
            raw[i] = (sum(shape) / numel[i]) ** power_scale
        else:
            c_out, c_in = shape[0], shape[1] if len(shape) > 1 else 1
            raw[i] = (c_out + c_in) / (c_out * c_in)
    made_dense = set()
    eps = 0.0
    while True:
        divisor, rhs = 0.0, 0.0
        for i in sparse_idx:
            if i in made_dense:
                rhs -= numel[i] * (1 - dense_allocation)
            else:
                rhs += numel[i] * dense_allocation
                divisor += raw[i] * numel[i]
        free = [i for i in sparse_idx if i not in made_dense]
        if not free:
            break
        eps = rhs / divisor
        max_raw = max(raw[i] for i in free)
        if max_raw * eps > 1:
            made_dense.update(i for i in free if raw[i] == max_raw)
        else:
            break
    S = []
    for i in range(len(shapes)):
        if dense[i] or i in made_dense:
            S.append(0)
        else:
            S.append(1 - eps * raw[i])
    return S


def sparsities(distribution: str, shapes: Sequence[Sequence[int]], is_linear: Sequence[bool],
               dense_allocation: float, ignore_linear_layers: bool, erk_power_scale: float = 1.0) -> List[float]:
    if distribution == "uniform":
        return uniform_sparsities(len(shapes), is_linear, dense_allocation, ignore_linear_layers)
    dense = [bool(lin and ignore_linear_layers) for lin in is_linear]
    return erdos_renyi_sparsities(shapes, dense, dense_allocation, kernel=(distribution == "erk"),
                                  power_scale=erk_power_scale)
