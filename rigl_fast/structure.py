"""Units of selection: `structure=` ('unstructured', 'fan_in', 'N:M') -> per-layer `ops.Units` and initial masks.

fan_in (constant fan-in; Lasby et al., ICLR 2024, "SRigL"): every output unit of a sparse layer keeps exactly
c = max(1, round(density * fan_in)) active weights. N:M: in every group of M consecutive weights along the
fan-in, exactly N are active; every sparse layer's density is N/M. A weight is viewed as (out, fan_in): Linear
rows, Conv output channels over (in, kh, kw), transformers' Conv1D columns (it stores (in, out)), attention
projections' rows. The update keeps the structure (ops.Backend.structured_update).
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .ops import Units, from_units

UNSTRUCTURED, FAN_IN = "unstructured", "fan_in"
_NM = re.compile(r"^(\d+):(\d+)$")


def parse(structure) -> Tuple[str, int, int]:
    """('unstructured' | 'fan_in' | 'N:M', N, M); raises ValueError naming `structure`."""
    if structure in (UNSTRUCTURED, FAN_IN):
        return structure, 0, 0
    m = _NM.match(structure) if isinstance(structure, str) else None
    if m is None:
        raise ValueError(f"structure must be 'unstructured', 'fan_in' or an 'N:M' string such as '2:4', "
                         f"got {structure!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"structure {structure!r}: N:M needs 0 < N < M (N active in every M), got N={n}, M={mm}")
    return "N:M", n, mm


def check(structure, hp) -> None:
    """N:M fixes every sparse layer's density at N/M: dense_allocation must say so, and only the uniform
    distribution (which decides just which layers are sparse) fits. Raises naming the argument."""
    kind, n, m = parse(structure)
    if kind != "N:M":
        return
    if hp["sparsity_distribution"] != "uniform":
        raise ValueError(f"sparsity_distribution={hp['sparsity_distribution']!r} cannot be used with "
                         f"structure={structure!r}: N:M makes every sparse layer exactly {n}/{m} dense; use "
                         "'uniform' (which layers are sparse then follows rigl-torch's rule)")
    if abs(hp["dense_allocation"] - n / m) > 1e-9:
        raise ValueError(f"dense_allocation={hp['dense_allocation']!r} does not match structure={structure!r}: "
                         f"N:M makes every sparse layer exactly {n}/{m} dense; pass dense_allocation={n / m!r}")


def units(structure, shape: Sequence[int], transposed: bool, sparsity: float) -> Union[None, Units, str]:
    """The units of one layer whose distribution sparsity is `sparsity` (> 0): `ops.Units`, None for
    unstructured, or a string saying why the layer must stay dense (a fan-in that M does not divide, a fan_in
    count that rounds to the whole fan-in)."""
    kind, n, m = parse(structure)
    if kind == UNSTRUCTURED:
        return None
    numel = 1
    for d in shape:
        numel *= d
    if transposed:  # Conv1D: (in, out)
        out, fan_in = shape[1], shape[0]
    else:
        out, fan_in = shape[0], numel // shape[0]
    if kind == FAN_IN:
        c = max(1, round((1 - sparsity) * fan_in))
        if c >= fan_in:
            return f"fan-in {fan_in} at density {1 - sparsity:.3g} rounds to all {fan_in} weights of each unit"
        return Units(out, fan_in, transposed, fan_in, c)
    if fan_in % m:
        return f"fan-in {fan_in} is not divisible by M={m}"
    return Units(out, fan_in, transposed, m, n)


def sparsity_of(u: Units) -> float:
    return 1 - u.target / u.group


def draw(u: Units, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random flat CPU mask with exactly `target` active positions in every unit: each unit keeps the
    positions of its `target` smallest draws of torch.rand (one (n_units, group) draw per layer from the
    global CPU RNG, or `generator`; a stable sort, so the result is the same on every machine)."""
    r = torch.rand(u.n_units, u.group, generator=generator)
    order = torch.sort(r, dim=1, stable=True).indices[:, :u.target]
    x = torch.zeros(u.n_units, u.group, dtype=torch.bool).scatter_(1, order, True)
    return from_units(x, u)


def local_units(u: Units, local_shape: Sequence[int]) -> Units:
    """The units of an FSDP2 shard of a row-unit layer (its rows are whole units). Transposed layers (Conv1D),
    whose units the shards cut: sharding.unit_plan."""
    return u._replace(out=local_shape[0])


def layer_plan(structure, shapes, transposed, S) -> Tuple[List[float], List[Optional[Units]], List[str]]:
    """Per layer: the sparsity (fan_in and N:M change it to what the units give), the units, and for layers that
    must stay dense the reason ('' otherwise)."""
    out_S, out_U, why = [], [], []
    for shape, tr, s in zip(shapes, transposed, S):
        u = units(structure, shape, tr, s) if s > 0 else None
        if isinstance(u, str):
            out_S.append(0)
            out_U.append(None)
            why.append(u)
        else:
            out_S.append(s if u is None else sparsity_of(u))
            out_U.append(u)
            why.append("")
    return out_S, out_U, why
