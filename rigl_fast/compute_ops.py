"""The three products of sparse compute in training (compute.py), per device: the C++ kernels on CPU (export's
products and `sampled_grad`, csrc/), the Triton ones on CUDA (kernels/compute.py), and the plain-PyTorch
reference, which defines the results and runs where no kernel takes the inputs (fp64, other devices).

    forward(x, t, values)      (B, in)  -> (B, out): y[b, o]  = sum over o's active entries of v * x[b, i]
    transposed(g, t, values)   (B, out) -> (B, in):  dx[b, i] = sum over i's active entries of v * g[b, o]
    sampled(x, g, t)           -> (nnz,) fp32 (fp64 for fp64): sum_b g[b, o] * x[b, i] per active (o, i)
    sampled_dense(x, g, t, n)  -> the same written at t.flat of a zeroed (n,) vector: the dense weight gradient
    transposed_input(x), take_values, forward_t, transposed_t, sampled_rows_t: the same products over inputs
                               transposed once and shared between them, the values gathered in both orders by
                               one op (C++; fp32, fp16 and bf16 inputs, in fp32 arithmetic as above)
    release_buffers()          frees the large buffers those C++ ops keep for reuse between steps

`t` is a compute.Tables; `values` are the active weights in its row order (forward) or column order
(transposed). Products accumulate in fp32 (fp64 for fp64 inputs) and round once to the input's dtype.
"""
from __future__ import annotations

import contextlib

import torch

_CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHUNK = 1 << 22  # reference: elements of one (B, pairs) intermediate


def layout_name(structure) -> str:
    return "fan_in rows" if structure == "fan_in" else "compressed rows"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- the reference
def reference_product(x, rows, cols, values, n_out):
    """y (B, n_out): y[b, rows[p]] += values[p] * x[b, cols[p]], accumulated in fp32 (fp64), rounded once."""
    acc = _acc(x.dtype)
    y = torch.zeros(x.shape[0], n_out, dtype=acc, device=x.device)
    step = max(1, _CHUNK // max(1, x.shape[0]))
    for s in range(0, values.numel(), step):
        r, c = rows[s:s + step].long(), cols[s:s + step].long()
        y.index_add_(1, r, x[:, c].to(acc) * values[s:s + step].to(acc))
    return y.to(x.dtype)


def reference_sampled(x, g, rows, cols):
    """(nnz,) in fp32 (fp64): out[p] = sum_b g[b, rows[p]] * x[b, cols[p]]."""
    acc = _acc(x.dtype)
    out = torch.empty(rows.numel(), dtype=acc, device=x.device)
    step = max(1, _CHUNK // max(1, x.shape[0]))
    for s in range(0, rows.numel(), step):
        r, c = rows[s:s + step].long(), cols[s:s + step].long()
        out[s:s + step] = (g[:, r].to(acc) * x[:, c].to(acc)).sum(0)
    return out


# ---------------------------------------------------------------- dispatch
_only = None  # tests: "reference" or "triton" (CPU tensors under TRITON_INTERPRET=1) instead of the device's


@contextlib.contextmanager
def only(kernels: str):
    """Tests: run the products with `kernels` ('reference', 'triton') whatever the device."""
    global _only
    old, _only = _only, kernels
    try:
        yield
    finally:
        _only = old


def _cpp(name, *tensors):
    if _only is not None or not all(t.device.type == "cpu" and t.dtype in _CPP_DTYPES for t in tensors):
        return None
    from . import export_ops  # defines the export ops: imported on the first sparse product
    return export_ops._cpp_op(name)


def _triton(*tensors):
    on = _only == "triton" or (_only is None and all(t.is_cuda for t in tensors))
    if not on or not all(t.dtype in _CPP_DTYPES for t in tensors):
        return None
    try:
        from .kernels import compute as triton_compute
    except ImportError:  # no triton
        return None
    return triton_compute


def _csr(x, crow, col, pairs, values, n_rows):
    """The compressed-row product (C++, Triton, else the reference over `pairs`, the same entries as (row,
    col) of the output and input)."""
    op = _cpp("csr_linear", x, values)
    if op is not None:
        return op(x, crow, col, values, n_rows)
    tri = _triton(x, values)
    if tri is not None and tri.supports_csr_product(x, crow, col, values) is None:
        return tri.csr_product(x, crow, col, values, n_rows)
    return reference_product(x, *pairs, values, n_rows)


def forward(x, t, values):
    op = _cpp("fan_in_linear", x, values) if t.k is not None else None
    if op is not None:  # fan_in: export's (out, k) rows
        return op(x, values.view(t.out, t.k), t.cols.view(t.out, t.k))
    return _csr(x, t.crow, t.cols, (t.rows, t.cols), values, t.out)


def transposed(g, t, values):
    return _csr(g, t.ccol, t.t_rows, (t.t_cols, t.t_rows), values, t.n_in)


def transposed_input(x):
    """x (B, n) transposed once to (n, lanes) fp32, as the shared-transpose products below take it (the forward's x
    kept for the weight gradient; the output gradient for both backward products): C++ on CPU, fp32/fp16/bf16 (fp16
    and bf16 converted exactly as they are transposed), B > 1; None elsewhere (then the products above, which
    transpose their inputs themselves)."""
    if x.dtype not in _CPP_DTYPES or x.dim() != 2 or x.shape[0] < 2:
        return None
    op = _cpp("transpose_f32", x)
    return None if op is None else op(x)


def take(weight, flat):
    """The weight's entries at storage positions `flat` (index_select: faster than indexing)."""
    return torch.index_select(weight.reshape(-1), 0, flat)


def take_values(weight, t, dtype=torch.float32):
    """(values, values_t): the active weights in row and in column order, as fp32, in one C++ op (the shared-
    transpose path's): packed in the weight's storage order by the mask's bits, then permuted to the other order
    (Tables.pack). Rounded to `dtype`, the product's (autocast's), where the weight has another: the values
    F.linear would multiply, held in fp32."""
    round_to = None if dtype in (torch.float32, weight.dtype) else dtype
    op = _cpp("take_values", weight)
    if op is None:  # a weight dtype the C++ ops do not take: the same gathers in PyTorch
        values = take(weight, t.flat)
        values = (values if round_to is None else values.to(round_to)).float()
        return values, torch.index_select(values, 0, t.perm)
    packed, permuted = op(weight, *t.pack, round_to)  # rounded in C++ before the permutation
    return (permuted, packed) if t.transposed else (packed, permuted)


def forward_t(xt, batch, t, values):
    """forward() over xt = transposed_input(x) (fp32 values), in fp32: bitwise the same once rounded to x's dtype."""
    return _cpp("csr_linear_t", xt, values)(xt, batch, t.crow, t.cols, values, t.out)


def transposed_t(gt, batch, t, values):
    """transposed() over gt = transposed_input(g) (fp32 values in column order), in fp32: bitwise the same once
    rounded to g's dtype."""
    return _cpp("csr_linear_t", gt, values)(gt, batch, t.ccol, t.t_rows, values, t.n_in)


def sampled_rows_t(xt, gt, batch, t, transposed, dtype=torch.float32):
    """sampled_dense() over the transposed x and g of one batch, as the weight's 2-D shape: (out, in), or the
    (in, out) storage of a transposed (Conv1D) weight, row by row over its column structure. Bitwise the same; in
    bf16 / fp16 where `dtype` (the weight's) is one, each sum rounded once as it is written, fp32 otherwise."""
    op = _cpp("sampled_grad_rows_t", xt, gt)
    out = dtype if dtype in (torch.bfloat16, torch.float16) else None
    return (op(xt, gt, batch, t.ccol, t.t_rows, out) if transposed
            else op(gt, xt, batch, t.crow, t.cols, out))


def release_buffers() -> int:
    """Frees the buffers the C++ ops keep for reuse (csrc/buffer_pool.h: the gradients, transposes and outputs of
    past steps, up to 1 GiB); returns the bytes freed. 0 where the export extension was never loaded (not built for
    this: the op is registered only once it is)."""
    ops = torch.ops.rigl_fast
    return int(ops.release_buffers()) if hasattr(ops, "release_buffers") else 0


def sampled(x, g, t):
    op = _cpp("sampled_grad", x, g)
    if op is not None:
        return op(x, g, t.rows, t.cols)
    tri = _triton(x, g)
    if tri is not None and tri.supports_sampled_dot(x, g, t.rows, t.cols) is None:
        return tri.sampled_dot(x, g, t.rows, t.cols)
    return reference_sampled(x, g, t.rows, t.cols)


def sampled_dense(x, g, t, numel):
    """The dense weight gradient (numel,): `sampled` at t.flat, 0 elsewhere (the C++ kernel writes it in one
    pass; elsewhere zeros and a scatter)."""
    op = _cpp("sampled_grad_dense", x, g)
    if op is not None:
        return op(x, g, t.rows, t.cols, t.flat, numel)
    out = torch.zeros(numel, dtype=_acc(x.dtype), device=x.device)
    return out.index_copy_(0, t.flat, sampled(x, g, t).to(out.dtype))
