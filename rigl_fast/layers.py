"""Which weights are sparse candidates, and how sparse each one is (uniform, ERK, ER)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

DISTRIBUTIONS = ("uniform", "erk", "er")
CANDIDATE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def find_candidates(model: nn.Module) -> Tuple[List[str], List[nn.Parameter], List[bool]]:
    """(names, weights, is_linear) of every Linear/Conv1d/2d/3d weight, in `named_modules()` order.

    A weight shared by several modules (tied weights) is listed once, at its first module. Norms,
    embeddings and biases are never candidates.
    """
    names, weights, is_linear, seen = [], [], [], set()
    for name, module in model.named_modules():
        if not isinstance(module, CANDIDATE_TYPES):
            continue
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or isinstance(w, nn.parameter.UninitializedParameter):
            continue
        if id(w) in seen:
            continue
        seen.add(id(w))
        names.append(f"{name}.weight" if name else "weight")
        weights.append(w)
        is_linear.append(isinstance(module, nn.Linear))
    return names, weights, is_linear


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
