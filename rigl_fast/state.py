"""The checkpoint format: build, validate and read a RigLScheduler state dict (rigl-torch 0.5.2's too).

rigl-torch's keys (`dense_allocation`, `S`, `N`, `hyperparams`, `step`, `rigl_steps`, `backward_masks`,
`_linear_layers_mask`) plus rigl_fast's, all prefixed `rigl_fast_` (rigl-torch's loader sets every key as an
attribute, so no extra key may shadow one of its names). Everything is validated before anything changes.

`backward_masks` are bit-packed, 1 bit per weight (`pack`: uint8, little-endian bit order, shapes in
`rigl_fast_mask_shapes`; `masks(sd)` unpacks them), except under FSDP2, where they stay bool DTensors so that
torch.distributed.checkpoint can reshard them. Bool masks (format 1, rigl-torch's) load as before.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import config as _config
from . import distributed as _dist
from . import sharding as _sharding

# Path components that wrappers add to module names (DDP's `module.`, torch.compile's `_orig_mod.`, FSDP1 and
# activation checkpointing, Lightning's strategy wrapper): a state dict saved through a wrapper fits the bare
# model and the other way round.
WRAPPER_NAMES = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module")

# 3: each sparse layer's name recorded (`rigl_fast_names`); 2: masks bit-packed (1 bit per weight). Formats 1
# and 2 and rigl-torch's state dicts still load, matched to the layers by position.
FORMAT_VERSION = 3
REQUIRED_KEYS = ("dense_allocation", "S", "N", "hyperparams", "step", "rigl_steps", "backward_masks")
HYPERPARAM_KEYS = ("delta_T", "alpha", "T_end", "ignore_linear_layers", "static_topo", "sparsity_distribution",
                   "grad_accumulation_n", "erk_power_scale", "grow_mode", "structure")


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 positions each (position j -> bit j % 8 of byte j // 8)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    n = torch.Size(shape).numel()
    bits = (packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[:n].bool().view(shape)


def masks(sd) -> List[Optional[torch.Tensor]]:
    """The masks of a state dict as bool tensors (bit-packed ones unpacked, their lengths checked)."""
    return _checked_unpack(sd["backward_masks"], sd.get("rigl_fast_mask_shapes"))


def build(pruner) -> dict:
    """A state dict of copies (never the live masks or accumulators).

    Under FSDP2 masks and accumulators are DTensors sharded like their weights, for
    torch.distributed.checkpoint, which loads in place into a state dict of the same structure: so every
    sparse layer has an accumulator (zeros when none is live) and `rigl_fast_dense_grads_live` says which are."""
    hp = pruner._hyperparams()
    accs = [None if h.dense_grad is None else h.dense_grad.clone() for h in pruner.backward_hook_objects]
    extra = {}
    if pruner._sharded:
        extra["rigl_fast_dense_grads_live"] = [a is not None for a in accs]
        accs = [a if a is not None or m is None else _sharding.like(w, torch.zeros_like(_sharding.local(w)))
                for a, m, w in zip(accs, pruner.backward_masks, pruner.W)]
    return {
        "dense_allocation": pruner.dense_allocation,
        "S": list(pruner.S),
        "N": list(pruner.N),
        "hyperparams": {k: hp[k] for k in HYPERPARAM_KEYS},
        "step": pruner.step,
        "rigl_steps": pruner.rigl_steps,
        "backward_masks": [None if m is None else m.clone() if pruner._sharded else pack(m)
                           for m in pruner.backward_masks],
        "rigl_fast_mask_shapes": [None if m is None or pruner._sharded else list(m.shape)
                                  for m in pruner.backward_masks],
        "_linear_layers_mask": list(pruner._linear_layers_mask),
        "rigl_fast_format": FORMAT_VERSION,
        "rigl_fast_names": list(pruner.names),
        "rigl_fast_skipped_updates": pruner.skipped_updates,
        "rigl_fast_dense_grads": accs,
        "rigl_fast_dense_grads_copies": _dist.gradient_copies(pruner.process_group, pruner._sharded),
        "rigl_fast_rng": None if pruner._generator is None else pruner._generator.get_state(),
        "rigl_fast_last_update": None if pruner._last_update is None else [list(t) for t in pruner._last_update],
        "rigl_fast_layers_without_grad": list(pruner._layers_without_grad),
        **extra,
    }


def hyperparams(sd) -> dict:
    """The hyperparameters a state dict carries (they win over the constructor's, as in rigl-torch)."""
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict (from RigLScheduler.state_dict()), got {type(sd).__name__}")
    for key in REQUIRED_KEYS:
        if key not in sd:
            raise ValueError(f"state_dict is missing the key {key!r}: it is not a RigLScheduler state dict")
    hp = sd["hyperparams"]
    if not isinstance(hp, dict):
        raise ValueError("state_dict['hyperparams'] must be a dict")
    out = {"dense_allocation": sd["dense_allocation"]}
    for key in HYPERPARAM_KEYS:
        if key in hp:
            out[key] = hp[key]
    out.setdefault("structure", "unstructured")  # rigl-torch's and older rigl_fast state dicts
    return out


def fit(sd, names: Sequence[str], W: Sequence[torch.Tensor]) -> Tuple[List[float], List[Optional[torch.Tensor]]]:
    """Validated (S, masks) from a state dict for this model's candidates; raises naming the mismatch."""
    S, N, masks_ = sd["S"], sd["N"], sd["backward_masks"]
    if not (isinstance(S, (list, tuple)) and isinstance(N, (list, tuple)) and isinstance(masks_, (list, tuple))):
        raise ValueError("state_dict: 'S', 'N' and 'backward_masks' must be lists")
    shapes = sd.get("rigl_fast_mask_shapes")
    if shapes is not None and len(shapes) != len(masks_):
        raise ValueError("state_dict: 'rigl_fast_mask_shapes' and 'backward_masks' differ in length")
    masks_ = _checked_unpack(masks_, shapes)
    if not (len(S) == len(N) == len(masks_) == len(W)):
        raise ValueError(f"state_dict does not fit the model: it has {len(S)} layers, the model has {len(W)} "
                         f"candidate weights ({list(names)})")
    check_names(sd, names)
    out = []
    for i, (name, w) in enumerate(zip(names, W)):
        if not _config.is_real(S[i]) or not 0 <= S[i] < 1:
            raise ValueError(f"state_dict: 'S' of layer {i} ({name}) must be a sparsity in [0, 1), got {S[i]!r}")
        if not _config.is_int(N[i]):
            raise ValueError(f"state_dict: 'N' of layer {i} ({name}) must be an integer, got {N[i]!r}")
        if int(N[i]) != w.numel():
            raise ValueError(f"state_dict does not fit the model: layer {i} ({name}) has {N[i]} weights in the "
                             f"state dict but {w.numel()} (shape {tuple(w.shape)}) in the model")
        m = masks_[i]
        if S[i] <= 0:
            if m is not None:
                raise ValueError(f"state_dict: layer {i} ({name}) is dense (S=0) but has a mask")
            out.append(None)
            continue
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(w.shape):
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"state_dict does not fit the model: mask of layer {i} ({name}) has shape {got}, "
                             f"the weight has shape {tuple(w.shape)}")
        if _sharding.is_sharded(w):
            out.append(_sharding.fit(w, m, torch.bool))
        else:
            out.append(m.detach().to(device=w.device, dtype=torch.bool).clone().contiguous())
    accs = sd.get("rigl_fast_dense_grads")
    if accs is not None:
        if not isinstance(accs, (list, tuple)) or len(accs) != len(W):
            raise ValueError("state_dict: 'rigl_fast_dense_grads' has the wrong number of layers")
        for i, (name, w, a) in enumerate(zip(names, W, accs)):
            if a is not None and not (isinstance(a, torch.Tensor) and a.is_floating_point()):
                raise ValueError(f"state_dict: dense gradient of layer {i} ({name}) must be a floating-point "
                                 f"tensor or None, got {type(a).__name__}")
            if a is not None and tuple(a.shape) != tuple(w.shape):
                raise ValueError(f"state_dict does not fit the model: dense gradient of layer {i} ({name}) has "
                                 f"shape {tuple(a.shape)}, the weight has shape {tuple(w.shape)}")
    return list(S), out


def check_units(names, masks, units) -> None:
    """Masks from a state dict must hold their structure (each unit exactly its count): raises naming the layer.
    A sharded mask is checked on this rank's shard (whole rows: whole units)."""
    from .ops import units_of
    from .structure import local_units
    for name, m, u in zip(names, masks, units):
        if u is None or m is None:
            continue
        m = _sharding.local(m)
        lu = local_units(u, m.shape) if not u.transposed else u
        counts = units_of(m.reshape(-1), lu).sum(1)
        if counts.numel() and not bool((counts == u.target).all()):
            raise ValueError(f"state_dict: the mask of layer {name!r} does not have the structure: every unit "
                             f"(group of {u.group}) must hold exactly {u.target} active weights")


def _checked_unpack(packed, shapes):
    """Bit-packed masks unpacked, after checking each one's byte count against its recorded shape."""
    if shapes is None:
        return packed
    out = []
    for i, (m, shape) in enumerate(zip(packed, shapes)):
        if m is None or shape is None or not isinstance(m, torch.Tensor) or m.dtype == torch.bool:
            out.append(m)
            continue
        n = torch.Size(shape).numel()
        if m.dtype != torch.uint8 or m.numel() != (n + 7) // 8:
            raise ValueError(f"state_dict: packed mask of layer {i} has {m.numel()} {m.dtype} entries, its shape "
                             f"{tuple(shape)} needs {(n + 7) // 8} uint8 bytes")
        out.append(unpack(m, shape))
    return out


def counters(sd) -> Tuple[int, int, int, Optional[torch.Tensor]]:
    """(step, rigl_steps, skipped updates, SET generator state or None), each checked."""
    step, rigl_steps = sd["step"], sd["rigl_steps"]
    skipped = sd.get("rigl_fast_skipped_updates", 0)
    for key, v in (("step", step), ("rigl_steps", rigl_steps), ("rigl_fast_skipped_updates", skipped)):
        if not _config.is_int(v) or v < 0:
            raise ValueError(f"state_dict[{key!r}] must be an integer >= 0, got {v!r}")
    if skipped > rigl_steps:
        raise ValueError(f"state_dict: 'rigl_fast_skipped_updates' ({skipped}) exceeds 'rigl_steps' ({rigl_steps})")
    rng = sd.get("rigl_fast_rng")
    if rng is not None:
        try:
            torch.Generator().set_state(rng)
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"state_dict['rigl_fast_rng'] is not a CPU generator state ({e})") from None
    return int(step), int(rigl_steps), int(skipped), rng


def last_update(sd, n_layers: int):
    """[(layer, n_grow, n_active)] of the last applied update (for `stats()`), or None; checked."""
    got = sd.get("rigl_fast_last_update")
    if got is None:
        return None
    ok = isinstance(got, (list, tuple)) and all(
        isinstance(t, (list, tuple)) and len(t) == 3 and all(_config.is_int(v) and v >= 0 for v in t) and t[0] < n_layers
        for t in got)
    if not ok:
        raise ValueError(f"state_dict['rigl_fast_last_update'] must be a list of [layer, n_grow, n_active] integers "
                         f"with layer < {n_layers}, got {got!r}")
    return [tuple(int(v) for v in t) for t in got]


def check_names(sd, names: Sequence[str]) -> None:
    """Format 3 records each layer's name: a state dict of other layers (same shapes, e.g. another exclude=)
    is refused, naming both. The same layers seen through a wrapper or a containing module match: wrapper
    components (WRAPPER_NAMES) are ignored, and one side's names may all carry the same extra leading path
    (a LightningModule's `net.conv1.weight` is the bare network's `conv1.weight`). Older state dicts load by
    position."""
    saved = sd.get("rigl_fast_names")
    if saved is None:
        return
    if not isinstance(saved, (list, tuple)) or len(saved) != len(names) or not all(isinstance(n, str) for n in saved):
        raise ValueError(f"state_dict['rigl_fast_names'] must list one name per layer ({len(names)}), got {saved!r}")
    prefix = None  # (which side, the leading path it has beyond the other's), fixed by the first layer
    for i, (a, b) in enumerate(zip(saved, names)):
        got = _extra_path(_bare(a), _bare(b))
        if prefix is None:
            prefix = got
        if got is not None and got != prefix:
            raise ValueError(f"state_dict does not fit the model: its layer {i} {a!r} and the model's {b!r} differ by "
                             f"another leading path than layer 0 ({saved[0]!r} / {names[0]!r})")
        if got is None:
            raise ValueError(f"state_dict does not fit the model: its layer {i} is {a!r}, the model's layer {i} is "
                             f"{b!r} (the candidates differ, e.g. another include=/exclude=); load it into a model "
                             "whose sparse candidates are the same layers")


def _bare(name: str) -> str:
    return ".".join(c for c in name.split(".") if c not in WRAPPER_NAMES)


def _extra_path(a: str, b: str):
    """("", "") if a == b; (p, "") if a is p + b; ("", p) if b is p + a (p ends with "."); else None."""
    if a == b:
        return ("", "")
    if a.endswith("." + b):
        return (a[:-len(b)], "")
    if b.endswith("." + a):
        return ("", b[:-len(a)])
    return None


class Loaded(NamedTuple):
    """A state dict read and checked whole (`read`): nothing here is live yet."""
    hp: dict
    S: List[float]
    masks: List[Optional[torch.Tensor]]
    counters: Tuple[int, int, int, Optional[torch.Tensor]]
    last_update: Optional[list]
    layers_without_grad: List[int]
    dense_grads: List[Optional[torch.Tensor]]
    dense_grad_copies: Optional[int]  # distributed.gradient_copies of the run that saved them (None: not saved)


def read(sd, names: Sequence[str], W: Sequence[torch.Tensor], hp: dict) -> Loaded:
    """Everything a state dict holds, validated (types, counts, shapes, hyperparameters) before any of it is
    used; raises naming the first bad entry. `hp`: the hyperparameters it overrides."""
    hp = dict(hp)
    hp.update(hyperparams(sd))
    _config.validate(hp)
    version = sd.get("rigl_fast_format", 1)
    if not _config.is_int(version) or version > FORMAT_VERSION:
        raise ValueError(f"state_dict has format {version!r}, this rigl_fast reads formats up to {FORMAT_VERSION}: "
                         "it was written by a newer rigl_fast")
    S, masks_ = fit(sd, names, W)
    live = sd.get("rigl_fast_dense_grads_live")
    if live is not None and (not isinstance(live, (list, tuple)) or len(live) != len(W)):
        raise ValueError("state_dict['rigl_fast_dense_grads_live'] must hold one flag per layer")
    quiet = sd.get("rigl_fast_layers_without_grad", [])
    if not isinstance(quiet, (list, tuple)) or not all(_config.is_int(i) and 0 <= i < len(W) for i in quiet):
        raise ValueError(f"state_dict['rigl_fast_layers_without_grad'] must list layer indices < {len(W)}, got "
                         f"{quiet!r}")
    copies = sd.get("rigl_fast_dense_grads_copies")
    if copies is not None and not (_config.is_int(copies) and copies >= 1):
        raise ValueError(f"state_dict['rigl_fast_dense_grads_copies'] must be an integer >= 1, got {copies!r}")
    return Loaded(hp, S, masks_, counters(sd), last_update(sd, len(W)), [int(i) for i in quiet],
                  dense_grads(sd, W), None if copies is None else int(copies))


def dense_grads(sd, W: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The accumulators saved inside an accumulation window, on their weights' devices (copies)."""
    accs = sd.get("rigl_fast_dense_grads")
    if accs is None:
        return [None] * len(W)
    live = sd.get("rigl_fast_dense_grads_live") or [True] * len(W)
    out = []
    for a, w, on in zip(accs, W, live):
        if a is None or not on:
            out.append(None)
        elif _sharding.is_sharded(w):
            out.append(_sharding.fit(w, a, a.dtype))
        else:
            out.append(a.detach().to(w.device).clone().contiguous())
    return out
