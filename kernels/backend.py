"""The Triton backend (`rigl_fast.kernels.TritonBackend`): the op contract over the kernels of this folder. See
rigl_fast/ops.py for the contract and docs/triton.md for how the kernels work.

Importing this module requires triton; `rigl_fast.ops` turns the ImportError into "backend unavailable".
"""
from __future__ import annotations

import os
from typing import Optional

import torch

import triton  # noqa: F401  (fail here, at import, when triton is missing)

from rigl_fast.ops import Backend

from . import elementwise as _ew
from . import shard as _sh
from . import structured as _st
from . import update as _up
from ._common import FLOAT_CODES

DEFAULT_BLOCK = 1024
DEFAULT_ITERS = 16  # elements per program = BLOCK * ITERS: fewer programs, fewer histogram atomics
# Digit width of the radix select. tl.histogram's GPU lowering costs about num_bins/32 operations per element
# per thread, so 256 bins (4 passes) should stay bandwidth-bound where 2048 bins (3 passes) would not.
# Not measured: no GPU was available when this was written; bench it before changing.
DEFAULT_RADIX_BITS = 8
DEFAULT_PAIRWISE_GROUP = _st.PAIRWISE_GROUP


class TritonBackend(Backend):
    """The op contract in Triton: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).

    fp32/fp16/bf16 weights, gradients and scores (upcast to fp32 inside the kernels). Other float dtypes
    (fp64) are passed to the reference backend, op by op, so results stay identical. `block`, `iters`,
    `radix_bits` and `pairwise_group` are tuning knobs (docs/triton.md): results never depend on them."""

    name = "triton"

    def __init__(self, block: int = DEFAULT_BLOCK, iters: int = DEFAULT_ITERS,
                 radix_bits: int = DEFAULT_RADIX_BITS, pairwise_group: int = DEFAULT_PAIRWISE_GROUP):
        if block & (block - 1) or block < 16:
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        if block * iters >= 2 ** 31:  # a program's own counts are int32 (layers of any size are fine)
            raise ValueError(f"block * iters must be < 2**31, got {block} * {iters}")
        if not 5 <= radix_bits <= 11:  # >= 32 histogram bins (one per warp lane), <= 2048 (cost grows with bins)
            raise ValueError(f"radix_bits must be in [5, 11], got {radix_bits}")
        if pairwise_group < 0:
            raise ValueError(f"pairwise_group must be >= 0, got {pairwise_group}")
        self.block = block
        self.iters = iters
        self.radix_bits = radix_bits
        self.pairwise_group = pairwise_group  # structured growth: units up to this size are ranked pairwise
        self._ref = None

    def _reference(self):
        if self._ref is None:
            from rigl_fast.reference import ReferenceBackend
            self._ref = ReferenceBackend()
        return self._ref

    def supports(self, device) -> Optional[str]:
        device = torch.device(device)
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return "Triton runs on CPU tensors only under its interpreter (set TRITON_INTERPRET=1, tests only)"
        return f"Triton kernels need CUDA tensors, got device type {device.type!r}"

    def mask_grad(self, grad, mask, acc, n):
        if not _floats([grad]):
            return self._reference().mask_grad(grad, mask, acc, n)
        return _ew.mask_grad(grad, mask, acc, n, self.block)

    def apply_masks(self, tensors, masks):
        _ew.apply_masks(list(tensors), list(masks), self.block, self.iters)

    def any_nonfinite(self, tensors):
        return _ew.any_nonfinite(list(tensors), self.block, self.iters)

    def update(self, weights, masks, scores, n_keep, n_grow, states, grads):
        if not _floats(list(weights) + list(scores)):
            return self._reference().update(weights, masks, scores, n_keep, n_grow, states, grads)
        _up.update(list(weights), list(masks), list(scores), list(n_keep), list(n_grow),
                   [list(s) for s in states], list(grads), self.block, self.iters, self.radix_bits)

    # structured layers: kernels in structured.py (keep is the update's; growth selects within each unit)
    def structured_update(self, weights, masks, scores, n_keep, units, states, grads):
        if not _floats(list(weights) + list(scores)) or not _zeroable(weights, states, grads):
            return self._reference().structured_update(weights, masks, scores, n_keep, units, states, grads)
        _st.structured_update(list(weights), list(masks), list(scores), list(n_keep), list(units),
                              [list(s) for s in states], list(grads), self.block, self.iters, self.radix_bits,
                              self.pairwise_group)

    def unit_grow(self, scores, keep, units):
        if not scores or not _floats(scores):
            return self._reference().unit_grow(scores, keep, units)
        return _st.unit_grow(list(scores), list(keep), list(units), self.block, self.iters, self.radix_bits,
                             self.pairwise_group)

    # the sharded (FSDP2) update: kernels in shard.py; empty calls and other dtypes go to the reference
    def key_histograms(self, values, flags, flag_value, prefixes, shift, bits):
        if not values or not _floats(values) or not _sh.kernel_digit(shift, bits):
            return self._reference().key_histograms(values, flags, flag_value, prefixes, shift, bits)
        return _sh.key_histograms(list(values), list(flags), flag_value, list(prefixes), shift, bits,
                                  self.block, self.iters)

    def take_top(self, values, flags, flag_value, thresholds, n_ties):
        if not values or not _floats(values):
            return self._reference().take_top(values, flags, flag_value, thresholds, n_ties)
        return _sh.take_top(list(values), list(flags), flag_value, list(thresholds), list(n_ties), self.block,
                            self.iters)

    def commit(self, weights, masks, keep, grow, states, grads):
        if not _zeroable(weights, states, grads):
            return self._reference().commit(weights, masks, keep, grow, states, grads)
        _sh.commit(list(weights), list(masks), list(keep), list(grow), [list(s) for s in states], list(grads),
                   self.block, self.iters)

    def split_grad(self, grad, mask, off):
        if not _floats([grad]) or off.dtype != grad.dtype:
            return self._reference().split_grad(grad, mask, off)
        _sh.split_grad(grad, mask, off, self.block)

    def fold_grad(self, acc, grad, off, n):
        if not _floats([grad]) or acc.dtype != grad.dtype or off.dtype != grad.dtype:
            return self._reference().fold_grad(acc, grad, off, n)
        _sh.fold_grad(acc, grad, off, n, self.block)


def _floats(tensors) -> bool:
    return all(t.dtype in FLOAT_CODES for t in tensors)


def _zeroable(weights, states, grads) -> bool:
    """Whether commit's kernel can zero these tensors: it stores zeros by element size, so any dtype of 1, 2, 4 or
    8 bytes."""
    tensors = list(weights) + [t for st in states for t in st] + [g for g in grads if g is not None]
    return all(t.element_size() in (1, 2, 4, 8) for t in tensors)


__all__ = ["TritonBackend"]
