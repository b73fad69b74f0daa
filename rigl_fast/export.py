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

Saving: the modules export() builds are registered with torch.serialization.add_safe_globals when this file is
imported, so a model saved whole loads with torch.load's default weights_only=True once the caller allows the
model's own classes: `import rigl_fast.export` then `with torch.serialization.safe_globals([MyNet, nn.Linear, ...]):
torch.load(path)` (torch.serialization.get_unsafe_globals_in_checkpoint(path) lists the ones needed). Not tried
for semi_structured (its weight is a tensor subclass; no GPU to save one on).

nn.MultiheadAttention (whose projections are parameters read by F.multi_head_attention_forward, not modules it
calls) is replaced as a whole by `SparseMultiheadAttention` when any of its projection weights is sparse: the q, k
and v projections are the row blocks [0, E), [E, 2E), [2E, 3E) of in_proj_weight (or q/k/v_proj_weight when
kdim/vdim differ from embed_dim), each a FanInLinear / CSRLinear / SemiStructuredLinear built from its block of
the weight and mask, the format picked once per trained weight by the same rule as a Linear layer's (fan_in only
if every row of the whole in_proj_weight holds the same count); out_proj likewise; a projection without a mask
stays a dense nn.Linear. rigl_fast_formats lists the sparse projections as '<attention>.q_proj', '.k_proj',
'.v_proj', '.out_proj'. The attention is nn.MultiheadAttention's own (export_attention.py). Not supported, left
dense with a warning naming the layer: add_bias_kv, add_zero_attn, subclasses of nn.MultiheadAttention with
their own forward (the rule above). nn.TransformerEncoderLayer / nn.TransformerEncoder holding a replaced module
(the attention, or only linear1/linear2) get their fused fast paths turned off (they read .weight tensors the
sparse modules do not have): `activation_relu_or_gelu = 0` on the layer (it only selects that fused kernel) and
`use_nested_tensor = False` on the encoder, so they run their ordinary forward. One visible difference: torch's
nested-tensor path zeroes the outputs at padded positions (src_key_padding_mask in eval), the ordinary forward
computes them; the non-padded outputs agree.

The weights must match the masks: export keeps only the weights on pruner.backward_masks, so before anything is
built it checks every weight it replaces (Linear, Conv1D, the attention projections; not the modules kept dense,
which compute with their own weights) for nonzero entries (NaN included) off its mask, and raises a ValueError
naming the layers if there are any (after model.load_state_dict of weights from another step without the
scheduler's state, or pruner.remove() then dense training): pruner.load_state_dict of the matching scheduler state,
or pruner.apply_mask_to_weights() to export the weights as masked.

Under torch.autocast the exported layers follow nn.Linear's rule there (_SparseLinear): x, the weights and the
bias, each floating and not float64, are cast to the autocast dtype, the output is in it; a float64 layer stays
float64. The product then runs in that dtype (accumulated in fp32, rounded once) and the bias is added in it.

The products are custom ops (export_ops.py: the reference and the CPU and CUDA kernels).
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from . import layers as _layers
from .export_attention import SparseMultiheadAttention, dense_linear
from .export_ops import autocast_cast, autocast_dtype, csr_linear, fan_in_linear
from .export_ops import _fan_in_linear_reference  # noqa: F401  (tests and bench import it from here)

FORMATS = ("auto", "csr", "fan_in", "semi_structured")


# ---------------------------------------------------------------- the inference modules
def _index_dtype(bound: int) -> torch.dtype:
    """The narrowest index dtype holding values < bound (int16 halves the file where the fan-in allows)."""
    return torch.int16 if bound <= torch.iinfo(torch.int16).max + 1 else torch.int32


class _SparseLinear(nn.Module):
    """Shared parts: the shapes, the bias, the leading dimensions of x (any number, as nn.Linear takes) and
    autocast. Under torch.autocast (for x's device) the layer does what nn.Linear does there: x, the weights and
    the bias, each floating and not float64, are cast to the autocast dtype, and the product runs in it (output
    in it); the product itself runs with autocast off, so the ops inside it are not cast again."""

    def __init__(self, in_features: int, out_features: int, bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        lead = x.shape[:-1]
        x2, weight, bias = x.reshape(-1, self.in_features), self._weight(), self.bias
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:
            x2, weight, bias = (t if t is None else t.to(autocast_cast(t.dtype, dtype)) for t in (x2, weight, bias))
            with torch.autocast(x.device.type, enabled=False):
                y = self._product(x2, weight)
        else:
            y = self._product(x2, weight)
        if bias is not None:
            y = y + bias
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

    def _weight(self):
        return self.values

    def _product(self, x, values):
        return fan_in_linear(x, values, self.indices)


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

    def _weight(self):
        return self.values

    def _product(self, x, values):
        return csr_linear(x, self.crow, self.col, values, self.out_features)


class SemiStructuredLinear(_SparseLinear):
    """2:4 on sparse tensor cores (torch.sparse.to_sparse_semi_structured; CUDA only)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]):
        out, inp = weight.shape
        super().__init__(inp, out, bias)
        from torch.sparse import to_sparse_semi_structured
        self.weight = nn.Parameter(to_sparse_semi_structured(torch.where(mask, weight.detach(), 0)),
                                   requires_grad=False)

    def _weight(self):
        return self.weight

    def _product(self, x, weight):
        return torch.nn.functional.linear(x, weight)


# ---------------------------------------------------------------- attention
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
        projections[p] = dense_linear(w, b) if f == "dense" else MODULES[f](w, m.to(w.device), b)
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


def _replaced_weights(plan, attention, masks: dict):
    """[(name, weight, mask)] of every sparse weight the export replaces by its active entries: the planned
    Linear-like layers' and the masked projections of the planned attention modules."""
    out = [(f"{owner}.weight" if owner else "weight", w, m) for owner, _, w, m, _ in plan]
    for name, module, _ in attention:
        prefix = f"{name}." if name else ""
        out += [(prefix + a, module.get_parameter(a), masks[prefix + a])
                for a in _layers.MHA_WEIGHTS + ("out_proj.weight",) if prefix + a in masks]
    return out


def _check_weights_on_masks(weights) -> None:
    """Raise, before anything is built, if a weight to be replaced holds nonzero entries (NaN counts) off its
    mask: the export keeps only the entries on the mask, so it would compute something else than the model."""
    bad = []
    for name, w, m in weights:
        n = int((w[~m.to(w.device)] != 0).sum())
        if n:
            bad.append(f"{name!r}: {n}")
    if bad:
        more = f" and {len(bad) - 4} more layers" if len(bad) > 4 else ""
        raise ValueError(
            f"export: the model's weights no longer match the scheduler's masks (nonzero weights off the mask: "
            f"{', '.join(bad[:4])}{more}). The export keeps only the weights on the masks, so it would compute "
            "something else than the model (this happens after model.load_state_dict of weights saved at another "
            "step without the scheduler's state, or after pruner.remove() and dense training). Load the scheduler "
            "state that goes with these weights (pruner.load_state_dict), or call pruner.apply_mask_to_weights() "
            "to zero them and export the weights as masked.")


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
    compute; all but the convolutions are also named in a warning. Raises ValueError, with nothing built, where a
    weight it replaces is nonzero off its mask (module doc)."""
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
    _check_weights_on_masks(_replaced_weights(plan, attention, masks))
    _warn_kept(kept)  # only once every layer was checked: an error in _pick or above comes first
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
