"""Fake (meta) implementations of the C++ ops (loaded by rigl_fast._cpp): shapes only, for torch.compile and opcheck."""
from __future__ import annotations

import torch


def register(part: str) -> None:
    """Registers the fakes of `part`'s ops (_cpp.PARTS), once the library has registered the ops themselves."""
    if part == "export":
        _register_export_fakes()
        return

    @torch.library.register_fake("rigl_fast::mask_grad")
    def _mask_grad(grad, mask, acc, n):
        return grad.new_empty(grad.shape)

    @torch.library.register_fake("rigl_fast::apply_masks")
    def _apply_masks(tensors, masks):
        return None

    @torch.library.register_fake("rigl_fast::any_nonfinite")
    def _any_nonfinite(tensors):
        return torch.empty((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")

    @torch.library.register_fake("rigl_fast::update")
    def _update(weights, masks, scores, n_keep, n_grow, states, state_layer, grads, grad_layer, check_finite=False):
        return torch.empty((), dtype=torch.bool, device=weights[0].device if weights else "cpu")

    @torch.library.register_fake("rigl_fast::key_histograms")
    def _key_histograms(values, flags, flag_value, prefixes, shift, bits):
        return torch.empty((len(values), 1 << bits), dtype=torch.int64, device=values[0].device if values else "cpu")

    @torch.library.register_fake("rigl_fast::take_top")
    def _take_top(values, flags, flag_value, thresholds, n_ties):
        return [v.new_empty((v.numel(),), dtype=torch.bool) for v in values]

    @torch.library.register_fake("rigl_fast::commit")
    def _commit(weights, masks, keep, grow, states, state_layer, grads, grad_layer):
        return None

    @torch.library.register_fake("rigl_fast::split_grad")
    def _split_grad(grad, mask, off):
        return None

    @torch.library.register_fake("rigl_fast::fold_grad")
    def _fold_grad(acc, grad, off, n):
        return None

    @torch.library.register_fake("rigl_fast::structured_update")
    def _structured_update(weights, masks, scores, n_keep, units, states, state_layer, grads, grad_layer,
                           check_finite=False):
        return torch.empty((), dtype=torch.bool, device=weights[0].device if weights else "cpu")

    @torch.library.register_fake("rigl_fast::unit_grow")
    def _unit_grow(scores, keep, units):
        return [s.new_empty((s.numel(),), dtype=torch.bool) for s in scores]


def _register_export_fakes() -> None:
    @torch.library.register_fake("rigl_fast::fan_in_linear")  # csrc/export_kernels.cpp
    def _fan_in_linear(x, values, indices):
        return x.new_empty((x.shape[0], values.shape[0]))

    torch.library.register_fake("rigl_fast::csr_linear")(lambda x, crow, col, values, n: x.new_empty((x.shape[0], n)))

    @torch.library.register_fake("rigl_fast::sampled_grad")  # fp32, one per (row, col) pair; _dense: numel
    def _sampled_grad(x, grad, rows, cols, flat=None, numel=None):
        return x.new_empty((rows.shape[0] if numel is None else numel,), dtype=torch.float32)

    torch.library.register_fake("rigl_fast::sampled_grad_dense")(_sampled_grad)

    @torch.library.register_fake("rigl_fast::transpose_f32")  # (n, lanes), lanes = B, + 64 where 1024 divides B
    def _transpose_f32(t):
        b = t.shape[0]
        return t.new_empty((t.shape[1], b + 64 if b > 1 and b % 1024 == 0 else b), dtype=torch.float32)

    @torch.library.register_fake("rigl_fast::take_values")
    def _take_values(weight, bits, crow, perm, round_to=None):
        return perm.new_empty(perm.shape, dtype=torch.float32), perm.new_empty(perm.shape, dtype=torch.float32)

    torch.library.register_fake("rigl_fast::csr_linear_t")(
        lambda xt, batch, crow, col, values, n: xt.new_empty((batch, n)))
    torch.library.register_fake("rigl_fast::sampled_grad_rows_t")(
        lambda at, bt, batch, crow, col, dtype=None: at.new_empty((at.shape[0], bt.shape[0]),
                                                                  dtype=dtype or torch.float32))
