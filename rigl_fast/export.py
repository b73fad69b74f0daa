"""Inference modules for a trained sparse model: `RigLScheduler.export()` (issue 15).

A copy of the model in which every sparse Linear-like layer (nn.Linear, transformers' Conv1D, which are also
the attention projections of HF transformers) computes y = x W^T + b from its active weights only:
- "fan_in": layers whose rows all hold the same number k of active weights (structure='fan_in' guarantees
  it; any mask may happen to have it): values (out, k) and indices (out, k), int16 where the fan-in allows,
  computed by a gather-multiply-reduce that never materialises the gathered inputs;
- "csr": any mask: compressed rows, 32-bit indices where they fit;
- "semi_structured": 2:4 layers on a CUDA device with sparse tensor cores, through
  torch.sparse.to_sparse_semi_structured; elsewhere a clear error;
- "auto": per layer, the fastest that applies on the model's device.
Conv layers and nn.MultiheadAttention's packed projections stay as they are: dense, with their zeros.

The products go through the custom ops `rigl_fast_export::fan_in_linear` / `csr_linear` (torch.compile sees
them as single ops); their default implementation here is plain PyTorch (the reference), and faster kernels
are registered per device: on CPU both run csrc/export_kernels.cpp's fused gather-multiply-reduce (when the
C++ extension loads; else the reference); on CUDA fan_in runs kernels/export.py's Triton kernel and csr
torch.sparse.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

FORMATS = ("auto", "csr", "fan_in", "semi_structured")


# ---------------------------------------------------------------- the products, as custom ops
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
            load_library()
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


def _index_dtype(bound: int) -> torch.dtype:
    """The narrowest index dtype holding values < bound (int16 halves the file where the fan-in allows)."""
    return torch.int16 if bound <= torch.iinfo(torch.int16).max + 1 else torch.int32


# ---------------------------------------------------------------- the inference modules
class _SparseLinear(nn.Module):
    """Shared parts: the shapes, the bias and the leading dimensions of x (any number, as nn.Linear takes)."""

    def __init__(self, in_features: int, out_features: int, bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        lead = x.shape[:-1]
        y = self._product(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FanInLinear(_SparseLinear):
    """Constant fan-in: values (out, k), indices (out, k)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]):
        out, inp = weight.shape
        super().__init__(inp, out, bias)
        k = int(mask[0].sum()) if out else 0
        # the active columns of each row in increasing order: nonzero() lists row by row, column by column
        cols = mask.nonzero()[:, 1].reshape(out, k)
        self.register_buffer("indices", cols.to(_index_dtype(inp)))
        self.register_buffer("values", weight.detach().gather(1, cols).contiguous())

    def _product(self, x):
        return fan_in_linear(x, self.values, self.indices)


class CSRLinear(_SparseLinear):
    """Compressed rows: crow (out + 1), col (nnz), values (nnz)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]):
        out, inp = weight.shape
        super().__init__(inp, out, bias)
        nnz = int(mask.sum())
        rows_cols = mask.nonzero()
        crow = torch.zeros(out + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.cumsum(mask.sum(1), 0)
        self.register_buffer("crow", crow.to(_index_dtype(nnz + 1) if nnz < 2 ** 31 else torch.int64))
        self.register_buffer("col", rows_cols[:, 1].to(_index_dtype(inp)))
        self.register_buffer("values", weight.detach()[mask].contiguous())

    def _product(self, x):
        return csr_linear(x, self.crow, self.col, self.values, self.out_features)


class SemiStructuredLinear(_SparseLinear):
    """2:4 on sparse tensor cores (torch.sparse.to_sparse_semi_structured; CUDA only)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]):
        out, inp = weight.shape
        super().__init__(inp, out, bias)
        from torch.sparse import to_sparse_semi_structured
        self.weight = nn.Parameter(to_sparse_semi_structured(torch.where(mask, weight.detach(), 0)),
                                   requires_grad=False)

    def _product(self, x):
        return torch.nn.functional.linear(x, self.weight)


# ---------------------------------------------------------------- choosing and building
def _is_constant_fan_in(mask: torch.Tensor) -> bool:
    counts = mask.sum(1)
    return bool((counts == counts[0]).all()) if counts.numel() else True


def _is_two_four(mask: torch.Tensor) -> bool:
    return mask.shape[1] % 4 == 0 and bool((mask.reshape(mask.shape[0], -1, 4).sum(2) == 2).all())


def _semi_structured_reason(weight: torch.Tensor, mask: torch.Tensor) -> Optional[str]:
    """None if the layer can go to sparse tensor cores, else why not."""
    if weight.device.type != "cuda":
        return f"it needs a CUDA device with sparse tensor cores (the weight is on {weight.device})"
    major, _ = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return "sparse tensor cores need compute capability 8.0 or newer"
    if not _is_two_four(mask):
        return "its mask is not 2:4 (structure='2:4' trains such masks)"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"semi-structured kernels take fp16/bf16 weights, this one is {weight.dtype} (model.half() first)"
    return None


def _pick(fmt: str, name: str, weight: torch.Tensor, mask: torch.Tensor) -> str:
    if fmt == "csr":
        return "csr"
    if fmt == "fan_in":
        if not _is_constant_fan_in(mask):
            raise ValueError(f"format='fan_in': layer {name!r} has rows with different numbers of active weights; "
                             "train with structure='fan_in', or export with format='csr' or 'auto'")
        return "fan_in"
    if fmt == "semi_structured":
        why = _semi_structured_reason(weight, mask)
        if why is not None:
            raise ValueError(f"format='semi_structured': layer {name!r} cannot be exported so: {why}")
        return "semi_structured"
    if _semi_structured_reason(weight, mask) is None:  # auto
        return "semi_structured"
    return "fan_in" if _is_constant_fan_in(mask) else "csr"


MODULES = {"fan_in": FanInLinear, "csr": CSRLinear, "semi_structured": SemiStructuredLinear}


def _is_conv1d(module) -> bool:
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf")


@torch.no_grad()
def export(pruner, format: str = "auto") -> nn.Module:
    """A new module computing what pruner.model computes, its sparse Linear-like layers replaced (module doc).
    The training model and the scheduler are not modified. `exported.rigl_fast_formats` maps each replaced
    layer's name to the format it got."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if getattr(pruner, "_sharded", False):
        raise ValueError("export() under FSDP2: gather the model to one process first (e.g. "
                         "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) into an "
                         "unsharded copy and a scheduler built from pruner.state_dict()), then export there")
    model = copy.deepcopy(pruner.model)
    modules = dict(model.named_modules())
    plan = []
    for name, mask in zip(pruner.names, pruner.backward_masks):
        if mask is None or not name.endswith(".weight"):
            continue
        owner = name[:-len(".weight")]
        module = modules.get(owner)
        if isinstance(module, nn.Linear) and type(module).__name__ != "NonDynamicallyQuantizableLinear":
            weight, m = module.weight, mask
        elif _is_conv1d(module):  # stores (in, out)
            weight, m = module.weight.t(), mask.t()
        else:  # convolutions, attention's packed projections: left dense, with their zeros
            continue
        fmt = _pick(format, name, weight, m)
        plan.append((owner, fmt, weight, m, module.bias))
    formats = {}
    for owner, fmt, weight, m, bias in plan:  # built only after every layer was checked: nothing half-done
        parent_name, _, child = owner.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, MODULES[fmt](weight, m.to(weight.device), bias))
        formats[owner] = fmt
    model.rigl_fast_formats = formats
    return model
