"""The exported layers' products as custom ops: `rigl_fast_export::fan_in_linear` and `csr_linear` (export.py).

torch.compile sees each as a single op. Their default implementation is plain PyTorch (the reference), and faster
kernels are registered per device: on CPU both run csrc/export_kernels.cpp's fused gather-multiply-reduce (when
the C++ extension loads; else the reference); on CUDA fan_in runs kernels/export.py's Triton kernel and csr
torch.sparse. Each output is accumulated in fp32 and rounded once to x's dtype. d/dx is registered (the tables
are buffers, so it is the only gradient).
"""
from __future__ import annotations

import warnings

import torch

def autocast_dtype(device_type: str):
    """The dtype torch.autocast casts F.linear's tensors to on this device type, or None outside autocast."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return None
    return torch.get_autocast_dtype(device_type) if on else None


def autocast_cast(dtype: torch.dtype, cast: torch.dtype) -> torch.dtype:
    """The dtype autocast gives an F.linear input of `dtype`: a floating one but float64 goes to `cast`."""
    return cast if dtype.is_floating_point and dtype != torch.float64 else dtype


@torch.library.custom_op("rigl_fast_export::fan_in_linear", mutates_args=())
def fan_in_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, in) x, (out, k) values and indices -> (B, out): y[b, o] = sum_k values[o, k] * x[b, indices[o, k]],
    accumulated in fp32 and rounded once to x's dtype (as a dense matmul rounds)."""
    return _fan_in_linear_reference(x, values, indices)


def _fan_in_linear_reference(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The default (plain PyTorch) implementation of fan_in_linear, any device."""
    if values.numel() == 0:
        return x.new_zeros(x.shape[0], values.shape[0])
    xf = x.float()
    out = torch.zeros(x.shape[0], values.shape[0], dtype=torch.float32, device=x.device)
    for j in range(values.shape[1]):  # one column of the (out, k) table at a time: (B, out) memory, not (B, out, k)
        out += xf[:, indices[:, j].long()] * values[:, j].float()
    return out.to(x.dtype)


@fan_in_linear.register_fake
def _(x, values, indices):
    return x.new_empty(x.shape[0], values.shape[0])


def _fan_in_backward(ctx, grad):
    """d/dx only (the tables are buffers): dx[b, i] = sum of values[o, k] * grad[b, o] over indices[o, k] == i."""
    values, indices = ctx.saved_tensors
    contrib = (grad.float()[:, :, None] * values.float()[None]).reshape(grad.shape[0], -1)
    dx = torch.zeros(grad.shape[0], ctx.in_features, dtype=torch.float32, device=grad.device)
    dx.index_add_(1, indices.reshape(-1).long(), contrib)
    return dx.to(grad.dtype), None, None


def _fan_in_setup(ctx, inputs, output):
    x, values, indices = inputs
    ctx.save_for_backward(values, indices)
    ctx.in_features = x.shape[1]


fan_in_linear.register_autograd(_fan_in_backward, setup_context=_fan_in_setup)

_CPP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CPP_INDEX = (torch.int16, torch.int32)
_cpp_ops = {}  # name -> the C++ op (csrc/export_kernels.cpp), or None when the extension does not load


def _cpp_op(name: str):
    """torch.ops.rigl_fast.<name>, or None when the C++ extension does not load. Loaded on first use, not at
    import: the first load may compile the extension."""
    if name not in _cpp_ops:
        op = None
        try:
            from ._cpp import load_library
            load_library("export")  # the export kernels: their own extension, built on first use
            op = getattr(torch.ops.rigl_fast, name).default
        except Exception:  # BackendUnavailable, or an extension built before the op existed
            op = None
        _cpp_ops[name] = op
    return _cpp_ops[name]


def _cpp_takes(x, values, *indices) -> bool:
    return x.dim() == 2 and x.dtype in _CPP_DTYPES and values.dtype == x.dtype and all(
        i.dtype in _CPP_INDEX for i in indices)


def _fan_in_linear_cpu(x, values, indices):
    """The CPU kernel: the fused C++ gather-multiply-reduce where it loads and takes these dtypes, else the
    reference."""
    op = _cpp_op("fan_in_linear")
    if op is None or not _cpp_takes(x, values, indices):
        return _fan_in_linear_reference(x, values, indices)
    return op(x, values, indices)


fan_in_linear.register_kernel("cpu")(_fan_in_linear_cpu)


def _fan_in_linear_cuda(x, values, indices):
    """The CUDA kernel: kernels/export.py's Triton gather-multiply-reduce where Triton imports and takes these
    dtypes (fp32/fp16/bf16, int16/int32 indices), else the reference. An out-of-range index gives a NaN row
    there (checking it would cost a device sync), where the CPU kernel raises."""
    try:
        from .kernels import export as triton_export
    except ImportError:  # no triton
        return _fan_in_linear_reference(x, values, indices)
    if triton_export.supports(x, values, indices) is not None:
        return _fan_in_linear_reference(x, values, indices)
    return triton_export.fan_in_linear(x, values, indices)


fan_in_linear.register_kernel("cuda")(_fan_in_linear_cuda)


@torch.library.custom_op("rigl_fast_export::csr_linear", mutates_args=())
def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               out_features: int) -> torch.Tensor:
    """(B, in) x and a CSR (out, in) weight -> (B, out), accumulated in fp32, rounded once to x's dtype."""
    return _csr_linear_reference(x, crow, col, values, out_features)


def _csr_linear_reference(x, crow, col, values, out_features):
    """The default implementation (torch.sparse), any device."""
    w = _csr(crow, col, values, (out_features, x.shape[1]))
    return (w @ x.float().t()).t().contiguous().to(x.dtype)


def _csr_linear_cpu(x, crow, col, values, out_features):
    """The CPU kernel: the C++ gather-multiply-reduce over each row's range where it loads, else the reference."""
    op = _cpp_op("csr_linear")
    if op is None or not _cpp_takes(x, values, col) or crow.dtype not in _CPP_INDEX + (torch.int64,):
        return _csr_linear_reference(x, crow, col, values, out_features)
    return op(x, crow, col, values, out_features)


csr_linear.register_kernel("cpu")(_csr_linear_cpu)


def _csr(crow, col, values, shape):
    with warnings.catch_warnings():  # torch's "CSR is in beta" notice: our tables are valid by construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.long(), col.long(), values.float(), shape, check_invariants=False)


@csr_linear.register_fake
def _(x, crow, col, values, out_features):
    return x.new_empty(x.shape[0], out_features)


def _csr_backward(ctx, grad):
    crow, col, values = ctx.saved_tensors
    w = _csr(crow, col, values, (grad.shape[1], ctx.in_features))
    return (w.t() @ grad.float().t()).t().to(grad.dtype), None, None, None, None


def _csr_setup(ctx, inputs, output):
    x, crow, col, values, _ = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.in_features = x.shape[1]


csr_linear.register_autograd(_csr_backward, setup_context=_csr_setup)
