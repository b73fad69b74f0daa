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
Conv layers stay as they are: dense, with their zeros. Which modules are Linear-like is layers.py's candidate
rule (`layers.kind`), the one training uses; a candidate whose forward is not its base type's (a subclass with its
own forward, a forward set on the instance, forward hooks: `layers.own_forward`) stays as it is too, since a
replacement would compute another function. Every module with a sparse weight that stays is listed, with the
reason, in `exported.rigl_fast_kept`, and all but the convolutions in one warning.

Saving: the modules here are registered with torch.serialization.add_safe_globals when this file is imported, so
a model saved whole loads with torch.load's default weights_only=True once the caller allows the model's own
classes: `import rigl_fast.export` then `with torch.serialization.safe_globals([MyNet, nn.Linear, ...]):
torch.load(path)` (torch.serialization.get_unsafe_globals_in_checkpoint(path) lists the ones needed). Not tried
for semi_structured (its weight is a tensor subclass; no GPU to save one on).

nn.MultiheadAttention (whose projections are parameters read by F.multi_head_attention_forward, not modules it
calls) is replaced as a whole by `SparseMultiheadAttention` when any of its projection weights is sparse: the q, k
and v projections are the row blocks [0, E), [E, 2E), [2E, 3E) of in_proj_weight (or q/k/v_proj_weight when
kdim/vdim differ from embed_dim), each a FanInLinear / CSRLinear / SemiStructuredLinear built from its block of
the weight and mask, the format picked once per trained weight by the same rule as a Linear layer's (fan_in only
if every row of the whole in_proj_weight holds the same count); out_proj likewise; a projection without a mask
stays a dense nn.Linear. rigl_fast_formats lists the sparse projections as '<attention>.q_proj', '.k_proj',
'.v_proj', '.out_proj'. The attention is nn.MultiheadAttention's own (torch 2.x `multi_head_attention_forward`,
same calls in the same order): batch_first, unbatched inputs, key_padding_mask and attn_mask (bool or float,
2-D or 3-D), is_causal, need_weights / average_attn_weights; dropout as torch applies it (in train mode only).
Not supported, left dense with a warning naming the layer: add_bias_kv, add_zero_attn, subclasses of
nn.MultiheadAttention with their own forward (the rule above). NestedTensor inputs raise. nn.TransformerEncoderLayer /
nn.TransformerEncoder holding a replaced module (the attention, or only linear1/linear2) get their fused fast
paths turned off (they read .weight tensors the sparse modules do not have): `activation_relu_or_gelu = 0` on
the layer (it only selects that fused kernel) and `use_nested_tensor = False` on the encoder, so they run their
ordinary forward. One visible
difference: torch's nested-tensor path zeroes the outputs at padded positions (src_key_padding_mask in eval),
the ordinary forward computes them; the non-padded outputs agree.

The products go through the custom ops `rigl_fast_export::fan_in_linear` / `csr_linear` (torch.compile sees
them as single ops); their default implementation here is plain PyTorch (the reference), and faster kernels
are registered per device: on CPU both run csrc/export_kernels.cpp's fused gather-multiply-reduce (when the
C++ extension loads; else the reference); on CUDA fan_in runs kernels/export.py's Triton kernel and csr
torch.sparse.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Optional

import torch
from torch import nn

from . import layers as _layers

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


# ---------------------------------------------------------------- attention
def _float_mask(mask: Optional[torch.Tensor], name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """torch's _canonical_mask: a bool mask becomes 0 / -inf in `dtype`, a float mask is added as it is."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


class SparseMultiheadAttention(nn.Module):
    """nn.MultiheadAttention for inference with sparse projections (module doc): q_proj, k_proj, v_proj and
    out_proj are FanInLinear / CSRLinear / SemiStructuredLinear where their weight was sparse, dense nn.Linear
    elsewhere, each with its own bias. forward takes and returns what nn.MultiheadAttention's does, computed as
    torch's multi_head_attention_forward computes it (scaled_dot_product_attention when need_weights is False, an
    explicit softmax when the weights are returned); dropout only in train mode, as torch.

    `in_proj_weight` and `in_proj_bias` are None: there is no packed in-projection here (the biases are inside
    q_proj/k_proj/v_proj). `formats` maps each projection to 'fan_in', 'csr', 'semi_structured' or 'dense'."""

    def __init__(self, mha: nn.MultiheadAttention, projections: dict, formats: dict):
        super().__init__()
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.in_proj_weight = self.in_proj_bias = None
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.q_proj, self.k_proj, self.v_proj = projections["q_proj"], projections["k_proj"], projections["v_proj"]
        self.out_proj = projections["out_proj"]
        self.formats = dict(formats)
        self.train(mha.training)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("SparseMultiheadAttention does not take NestedTensor inputs (nn.MultiheadAttention "
                             "takes them only on its fused fast path); pass padded tensors and key_padding_mask")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and "
                             f"{value.dim()}-D")
        if key_padding_mask is not None and key_padding_mask.dim() != (2 if batched else 1):
            raise ValueError(f"key_padding_mask must be None or {2 if batched else 1}-D for a {query.dim()}-D query,"
                             f" got {key_padding_mask.dim()}-D")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask must be None, 2-D or 3-D, got {attn_mask.dim()}-D")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal needs attn_mask too (as nn.MultiheadAttention): pass the causal mask, e.g. "
                             "nn.Transformer.generate_square_subsequent_mask(L)")
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if batched and self.batch_first:  # to (L, N, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise ValueError(f"query's last dimension must be embed_dim={self.embed_dim}, got {embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key and value's last dimensions must be kdim={self.kdim} and vdim={self.vdim}, got "
                             f"{key.shape[-1]} and {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != bsz:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must match query "
                             f"{tuple(query.shape)} in batch and each other in length")
        # torch: with is_causal, no key padding and no weights wanted, SDPA's is_causal replaces the mask
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
            if key_padding_mask is not None:
                is_causal = False  # merged with the padding, the mask is no longer causal
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        H, D = self.num_heads, self.head_dim
        if attn_mask is not None:
            want = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * H, tgt_len, src_len)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"attn_mask of a {attn_mask.dim()}-D shape must be {want}, got "
                                 f"{tuple(attn_mask.shape)}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        q = q.view(tgt_len, bsz * H, D).transpose(0, 1)
        k = k.view(src_len, bsz * H, D).transpose(0, 1)
        v = v.view(src_len, bsz * H, D).transpose(0, 1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise ValueError(f"key_padding_mask must have shape {(bsz, src_len)[int(not batched):]}, got "
                                 f"{tuple(key_padding_mask.shape)[int(not batched):]}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, H, -1, -1).reshape(bsz * H, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        F = torch.nn.functional
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(D))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, H, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, H, -1, src_len)
            out = F.scaled_dot_product_attention(q.view(bsz, H, tgt_len, D), k.view(bsz, H, src_len, D),
                                                 v.view(bsz, H, src_len, D), attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = None
            if not batched:
                out = out.squeeze(1)
        if batched and self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _dense_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An nn.Linear holding a copy of `weight` / `bias` (no initialisation run: the global RNG is not touched)."""
    lin = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin


def _mha_unsupported(module: nn.Module) -> Optional[str]:
    """None if SparseMultiheadAttention computes what `module` computes, else why not."""
    why = _layers.own_forward(module)
    if why is not None:
        return why
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True is not supported"
    if module.add_zero_attn:
        return "add_zero_attn=True is not supported"
    if not isinstance(module.out_proj, nn.Linear):
        return f"its out_proj is a {type(module.out_proj).__name__}, not an nn.Linear"
    return None


def _mha_plan(fmt: str, name: str, module: nn.MultiheadAttention, masks: dict):
    """[(projection, format, weight, mask or None, bias)] for the four projections of `module` (named `name`),
    formats picked per trained weight (so q/k/v of one in_proj_weight share one); raises as _pick does."""
    prefix = f"{name}." if name else ""
    E = module.embed_dim
    bias = [None] * 3 if module.in_proj_bias is None else list(module.in_proj_bias.chunk(3))
    blocks = []
    if module._qkv_same_embed_dim:
        w, m = module.in_proj_weight, masks.get(prefix + "in_proj_weight")
        f = "dense" if m is None else _pick(fmt, prefix + "in_proj_weight", w, m)
        for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
            blocks.append((p, f, w[i * E:(i + 1) * E], None if m is None else m[i * E:(i + 1) * E], bias[i]))
    else:
        for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
            w, m = getattr(module, p + "_weight"), masks.get(prefix + p + "_weight")
            f = "dense" if m is None else _pick(fmt, prefix + p + "_weight", w, m)
            blocks.append((p, f, w, m, bias[i]))
    w, m = module.out_proj.weight, masks.get(prefix + "out_proj.weight")
    blocks.append(("out_proj", "dense" if m is None else _pick(fmt, prefix + "out_proj.weight", w, m), w, m,
                   module.out_proj.bias))
    return blocks


def _build_mha(module: nn.MultiheadAttention, blocks) -> SparseMultiheadAttention:
    projections, formats = {}, {}
    for p, f, w, m, b in blocks:
        projections[p] = _dense_linear(w, b) if f == "dense" else MODULES[f](w, m.to(w.device), b)
        formats[p] = f
    return SparseMultiheadAttention(module, projections, formats)


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
for _cls in (FanInLinear, CSRLinear, SemiStructuredLinear, SparseMultiheadAttention):
    # data only (buffers, shapes, formats), nothing run at load: a model saved whole loads under torch.load's
    # default weights_only=True once this module is imported, with the model's own classes allowed by the caller
    torch.serialization.add_safe_globals([_cls])


def _turn_off_fused_paths(model: nn.Module, replaced) -> None:
    """nn.TransformerEncoderLayer's fused fast path (eval, batch_first, ...) reads self_attn.in_proj_weight,
    linear1.weight, ... as dense tensors, and nn.TransformerEncoder's nested-tensor path feeds NestedTensors to
    its layers: turn both off where a layer holds a replaced module, so the ordinary forward runs (module doc)."""
    for name, module in model.named_modules():
        holds = any(r.startswith(name + ".") or not name for r in replaced)
        if not holds:
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = 0  # read only by the fast-path check and the fused kernel's call
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def _plan_attention(fmt: str, modules: dict, masks: dict, kept: dict):
    """[(name, module, blocks)] of the nn.MultiheadAttention modules with a sparse projection that
    SparseMultiheadAttention computes exactly; the others go into `kept` with the reason."""
    attention = []
    for name, module in modules.items():
        if _layers.kind(module) != _layers.ATTENTION:
            continue
        prefix = f"{name}." if name else ""
        if not any(prefix + a in masks for a in _layers.MHA_WEIGHTS + ("out_proj.weight",)):
            continue  # nothing sparse: left as it is
        why = _mha_unsupported(module)
        if why is not None:
            kept[name] = f"{type(module).__name__}: {why}"
            continue
        attention.append((name, module, _mha_plan(fmt, name, module, masks)))
    return attention


def _plan_linear(fmt: str, modules: dict, masks: dict, kept: dict):
    """[(owner, format, weight (out, in), mask (out, in), bias)] of the sparse Linear-like layers to replace
    (the candidate rule of layers.py); convolutions and layers with their own forward go into `kept`."""
    plan = []
    for name, mask in masks.items():
        if name != "weight" and not name.endswith(".weight"):
            continue  # an attention's packed projection: _plan_attention's
        owner = name[:-len("weight")].rstrip(".")
        module = modules[owner]
        parent, _, child = owner.rpartition(".")
        if child == "out_proj" and _layers.kind(modules.get(parent)) == _layers.ATTENTION:
            continue  # part of its SparseMultiheadAttention, or kept with its attention
        k = _layers.kind(module)
        if k == _layers.CONV:
            kept[owner] = "a convolution: exported as it is, dense with its zeros"
            continue
        why = _layers.own_forward(module)
        if why is not None:
            kept[owner] = why
            continue
        weight, m = (module.weight.t(), mask.t()) if k == _layers.CONV1D else (module.weight, mask)  # Conv1D: (in, out)
        plan.append((owner, _pick(fmt, name, weight, m), weight, m, module.bias))
    return plan


def _warn_kept(kept: dict) -> None:
    """One warning for the sparse modules export leaves as they are, convolutions (documented) aside."""
    odd = [f"{n!r} ({why})" for n, why in kept.items() if not why.startswith("a convolution")]
    if odd:
        more = f" and {len(odd) - 4} more" if len(odd) > 4 else ""
        warnings.warn(f"export: {len(odd)} sparse module(s) stay as they are, dense with their zeros (listed in "
                      f"exported.rigl_fast_kept): {'; '.join(odd[:4])}{more}", UserWarning, stacklevel=3)


@torch.no_grad()
def export(pruner, format: str = "auto") -> nn.Module:
    """A new module computing what pruner.model computes, its sparse Linear-like layers and attention replaced
    (module doc). The training model and the scheduler are not modified. `exported.rigl_fast_formats` maps each
    sparse module's name in the export to the format it got; for a replaced nn.MultiheadAttention 'attn' these
    are its sparse projections 'attn.q_proj', 'attn.k_proj', 'attn.v_proj', 'attn.out_proj' (dense ones are
    not listed; `exported.attn.formats` lists all four). `exported.rigl_fast_kept` maps each module with a
    sparse weight that stays as it is (dense, with its zeros) to why: a convolution, a subclass whose forward
    is not its base type's (or with forward hooks), an attention configuration SparseMultiheadAttention does not
    compute; all but the convolutions are also named in a warning."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if getattr(pruner, "_sharded", False):
        raise ValueError("export() under FSDP2: gather the model to one process first (e.g. "
                         "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) into an "
                         "unsharded copy and a scheduler built from pruner.state_dict()), then export there")
    model = copy.deepcopy(pruner.model)
    modules = dict(model.named_modules())
    masks = {n: m for n, m in zip(pruner.names, pruner.backward_masks) if m is not None}
    kept = {}
    attention = _plan_attention(format, modules, masks, kept)
    plan = _plan_linear(format, modules, masks, kept)
    _warn_kept(kept)  # only once every layer was checked: an error in _pick comes first
    formats = {}

    def put(owner, new):
        nonlocal model
        parent_name, _, child = owner.rpartition(".")
        if not owner:
            model = new
        else:
            setattr(modules[parent_name] if parent_name else model, child, new)

    for owner, fmt, weight, m, bias in plan:  # built only after every layer was checked: nothing half-done
        put(owner, MODULES[fmt](weight, m.to(weight.device), bias))
        formats[owner] = fmt
    for name, module, blocks in attention:
        new = _build_mha(module, blocks)
        put(name, new)
        prefix = f"{name}." if name else ""
        formats.update({prefix + p: f for p, f in new.formats.items() if f != "dense"})
    _turn_off_fused_paths(model, formats)
    model.rigl_fast_formats = formats
    model.rigl_fast_kept = kept
    return model
