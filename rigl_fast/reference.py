"""The plain-PyTorch implementation of the op contract in `ops.py`: runs on every device, and is the oracle
every other backend is tested against.

Selection uses a threshold, never a full sort: the k-th largest score is found with `topk(sorted=False)`
(small k) or `kthvalue` (large k), everything above it is taken, and ties at it are taken in flat-index order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .ops import Backend


def top_k_flags(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool flags over 1-D `x` (fp32) marking its k largest values; equal values -> lower index first."""
    n = x.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=x.device)
    if 2 * k <= n:
        v = torch.topk(x, k, sorted=False).values.min()
    else:
        v = torch.kthvalue(x, n - k + 1).values
    gt = x > v
    eq = x == v
    need = k - int(gt.sum())
    if int(eq.sum()) == need:  # no tie straddles the threshold: skip the prefix count
        return gt | eq
    return gt | (eq & (torch.cumsum(eq, 0, dtype=torch.int32) <= need))


def top_k_flags_prefiltered(x: torch.Tensor, k: int) -> torch.Tensor:
    """`top_k_flags` for k much smaller than x: a strided sample gives a lower bound t for the k-th largest
    value; only the values >= t (few) go through the exact selection. Exact whatever the sample says: if
    fewer than k values reach t, it falls back to the whole tensor."""
    n = x.numel()
    if k <= 0 or 8 * k > n or n < 65536:
        return top_k_flags(x, k)
    stride = n // 16384
    sample = x[::stride]
    s = sample.numel()
    rank = min(s, int(k * s / n * 1.5) + 32)  # generous margin: a miss costs only the fallback
    t = torch.topk(sample, rank, sorted=False).values.min()
    cand = x >= t
    if int(cand.sum()) < k:
        return top_k_flags(x, k)
    out = torch.zeros(n, dtype=torch.bool, device=x.device)
    out.masked_scatter_(cand, top_k_flags(x[cand], k))  # masked_select/scatter keep index order: ties hold
    return out


def select_layer(weight: torch.Tensor, mask: torch.Tensor, score: torch.Tensor, n_keep: int,
                 n_grow: int) -> torch.Tensor:
    """The new flat bool mask of one layer (see `Backend.update`)."""
    active = mask.reshape(-1)
    # keep: only active positions compete, so select among their compressed values (index order preserved)
    kept_vals = weight.reshape(-1)[active].abs().float()
    keep = torch.zeros_like(active)
    keep.masked_scatter_(active, top_k_flags(kept_vals, n_keep))
    # grow: every position not kept competes; kept ones get -1, below any |score|
    grow_score = score.reshape(-1).abs().float()
    grow_score.masked_fill_(keep, -1.0)
    return keep | top_k_flags_prefiltered(grow_score, n_grow)


def _mask_(t: torch.Tensor, mask: torch.Tensor) -> None:
    # in place through out=: no temporary, and a select (NaN-safe), not a multiply
    torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device), out=t)


class ReferenceBackend(Backend):
    name = "reference"

    def supports(self, device):
        return None

    def mask_grad(self, grad, mask, acc, n):
        if acc is not None:
            acc += grad / n
        return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    def apply_masks(self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        for t, m in zip(tensors, masks):
            _mask_(t, m)

    def any_nonfinite(self, tensors: Sequence[torch.Tensor]) -> bool:
        if not tensors:
            return False
        flags = [~torch.isfinite(t).all() for t in tensors]
        return bool(torch.stack([f.to(flags[0].device) for f in flags]).any())

    def update(self, weights, masks, scores, n_keep, n_grow, states, grads) -> None:
        for w, m, s, k, g, st, gr in zip(weights, masks, scores, n_keep, n_grow, states, grads):
            new = select_layer(w, m, s, k, g).view(m.shape)
            both = new & m
            _mask_(w, both)
            for t in st:
                _mask_(t, both)
            if gr is not None:
                _mask_(gr, new)
            m.copy_(new)
