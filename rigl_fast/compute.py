"""Sparse compute in training (`RigLScheduler(..., compute="sparse")`): the sparse nn.Linear and Conv1D layers'
forward and backward over their active weights only.

Each such module gets a forward on the instance (`_SparseForward`; `uninstall`, which `pruner.remove()` calls,
deletes it), so the module and its parameters stay the same objects and optimizers, state dicts, DDP and the
gradient hooks see nothing new. The forward runs `_SparseLinear`, an autograd function over the layer's tables
(`Tables`: the active entries as compressed rows, or (out, k) rows under structure="fan_in", plus the column
structure for the transposed product), rebuilt only when the mask changed (a topology update, a loaded state
dict, a device move), never per step; the active values are taken from the dense weight at every call.

    forward      y  = x W_active^T          export's product (csr_linear / fan_in_linear)
    input grad   dx = g W_active            the same product over the column tables
    weight grad  dW = g^T x at the active positions only (sampled_grad), 0 elsewhere; inside the dense-gradient
                 window before a topology update, the dense g^T x, which the hooks read for the growth scores.

Kernels (`compute_ops.py`): the C++ ones on CPU for fp32/fp16/bf16, the Triton ones on CUDA, else the plain-
PyTorch reference, which defines the result and accumulates in fp32 (fp64 for fp64 inputs). Outputs are
accumulated in fp32 and rounded once, as a dense matmul rounds, in another summation order. On the C++ kernels
(fp32, fp16, bf16) the same products run over inputs transposed once, converted to fp32, and shared: x's transpose
is saved in place of x for the weight gradient, the output gradient is transposed once for both backward products,
the values are packed in both orders by one op, and the weight gradient is written row by row (bitwise the same
results).

Dense-computed (their forward unchanged; `summary()` says which and why): convolutions, nn.MultiheadAttention's
projections, N:M layers, subclasses whose forward is not nn.Linear's / Conv1D's, and dense layers. Every layer
computes densely under torch.func's transforms (grad, vmap, jvp) and forward-mode AD (no batching rules or forward
derivatives for the kernels). A double backward (create_graph=True) through a sparse-computed layer raises.
"""
from __future__ import annotations

import torch
from torch import nn

from . import compute_ops as _kops
from . import layers as _layers
from .export_ops import autocast_cast, autocast_dtype

MODES = ("dense", "sparse")


def check_mode(compute) -> None:
    if compute not in MODES:
        raise ValueError(f"compute must be one of {MODES}, got {compute!r}")


def check_layout(names, sharded, compute) -> None:
    """FSDP2 layers are refused at construction: FSDP2 gathers each weight for the forward and reduce-scatters a
    dense gradient, which sparse compute has no shards of tables for."""
    if compute == "sparse" and sharded:
        raise ValueError(f"compute='sparse' does not support FSDP2-sharded layers (layer {names[0]!r} is "
                         "sharded): use compute='dense' with fully_shard, or DDP")


class Tables:
    """One layer's active entries at one topology. `rows`/`cols` (int32, row-major: compressed rows),
    `crow`, `flat` (positions in the weight's storage); the column structure `ccol`, `t_rows`/`t_cols` (the
    entries column-major) and `perm` (each one's position in row order); `k` when every row has the same count
    (fan_in), else None; `pack`, what take_values reads: the mask's bits over the weight's storage, its storage
    rows' starts and the permutation to the other order."""

    def __init__(self, mask, transposed: bool, fan_in: bool):
        m = mask.t() if transposed else mask  # the logical (out, in) mask
        out, n_in = m.shape
        nz = m.contiguous().nonzero()  # a transposed view's nonzero() is 1.5x slower than a copy's
        self.out, self.n_in = out, n_in
        self.rows, self.cols = nz[:, 0].to(torch.int32), nz[:, 1].to(torch.int32)
        self.flat = _storage_pos(nz[:, 0], nz[:, 1], out, n_in, transposed)
        counts = torch.bincount(nz[:, 0], minlength=out)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.k = None
        if fan_in and out > 0 and bool((counts == counts[0]).all()):
            self.k = int(counts[0])
        nzt = m.t().contiguous().nonzero()  # (in, out) order: the entries by column
        self.t_rows, self.t_cols = nzt[:, 1].to(torch.int32), nzt[:, 0].to(torch.int32)
        # column order -> row order: the row-ordered values (packed for the forward, nnz long, cache-resident)
        # permuted, rather than a second pass over the whole weight. The row-order keys o * n_in + i ascend, so
        # sorting the column-order entries by that key lists them in row order (`order`: row position -> column
        # position) and perm is its inverse (5x faster than searching each key among the row-order ones)
        order = torch.argsort(nzt[:, 1] * n_in + nzt[:, 0])
        self.perm = torch.empty_like(order)
        self.perm[order] = torch.arange(order.numel(), device=order.device)
        ccounts = torch.bincount(nzt[:, 0], minlength=n_in)
        self.ccol = torch.cat([ccounts.new_zeros(1), ccounts.cumsum(0)])
        # take_values packs the entries in the storage's row order (row order for nn.Linear, column order for a
        # transposed Conv1D weight) by a bit mask (a byte per 8 storage columns), then permutes them to the other
        # order: `pack` = (bits, the storage rows' starts, the permutation)
        self.transposed = transposed
        s = mask.contiguous()
        pad = (-s.shape[1]) % 8
        s = torch.nn.functional.pad(s.to(torch.uint8), (0, pad)).view(s.shape[0], -1, 8)
        bits = (s << torch.arange(8, dtype=torch.uint8, device=s.device)).sum(-1, dtype=torch.uint8)
        other = order if transposed else self.perm  # packed in column order, row order = packed[order]
        index = torch.int32 if other.numel() < 2 ** 31 else torch.int64
        self.pack = (bits, self.ccol if transposed else self.crow, other.to(index))


def _storage_pos(o, i, out, n_in, transposed):
    return i * out + o if transposed else o * n_in + i


class _LayerState:
    """What a sparse-computed layer reads at each call: its scheduler, its position there, the tables."""

    def __init__(self, pruner, layer: int, transposed: bool):
        self.p, self.i, self.transposed = pruner, layer, transposed
        self._tables = self._mask = self._key = None

    def tables(self) -> Tables:
        mask = self.p.backward_masks[self.i]
        # rebuilt when the mask changes: replaced (state dict, device move), written in place (the version
        # counter), or through an update (rigl_steps counts every update run, the C++ ones included)
        key = (mask._version, self.p.rigl_steps)
        if self._tables is None or self._mask is not mask or self._key != key:
            self._tables = Tables(mask, self.transposed, self.p.structure == "fan_in")
            self._mask, self._key = mask, key
        return self._tables

    def dense_window(self) -> bool:
        """The dense weight gradient is needed: this backward fills the window of an update that will run (the
        window before T_end, when delta divides it, leads to none)."""
        p = self.p
        if not p.check_if_backward_hook_should_accumulate_grad():
            return False
        return p.step + p.delta_T - p.step % p.delta_T < p.T_end


class _SparseLinear(torch.autograd.Function):
    """(x (B, in), weight) -> x W_active^T (B, out); the layer's tables fixed at the call."""

    @staticmethod
    def forward(ctx, x, weight, st, t):
        ctx.st, ctx.t, ctx.batch = st, t, x.shape[0]
        # on the C++ kernels (fp32, fp16, bf16): x transposed once to fp32, for the product and kept for the weight
        # gradient (saved in place of x), so the backward does not transpose it again; the values gathered in
        # both orders in one op, as fp32; the products in fp32, rounded once to x's dtype (as the general
        # products do: bitwise the same)
        xt = _kops.transposed_input(x)
        ctx.x_transposed = xt is not None
        if xt is not None:
            values, vt = _kops.take_values(weight, t, x.dtype)
            ctx.save_for_backward(xt, weight, vt)
            return _kops.forward_t(xt, ctx.batch, t, values).to(x.dtype)
        values = _kops.take(weight, t.flat).to(x.dtype)
        # the values in column order for the input gradient, permuted now while they are in cache
        vt = torch.index_select(values, 0, t.perm) if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(x, weight, vt)
        return _kops.forward(x, t, values)

    @staticmethod
    def backward(ctx, g):
        st, t, batch = ctx.st, ctx.t, ctx.batch
        if torch.is_grad_enabled():  # create_graph=True: the kernels below have no derivatives, so the gradients
            # would be constants of the graph built over them and the second-order terms silently 0
            raise RuntimeError(f"rigl_fast: compute='sparse' has no double backward (a backward with create_graph="
                               f"True reached {st.p.names[st.i]!r}, a sparse-computed weight: gradient penalties, "
                               "Hessian-vector products, MAML need it); use compute='dense' for such training")
        x, weight, vt = ctx.saved_tensors
        g = g.contiguous()
        xt = gt = None
        if ctx.x_transposed:  # x is its fp32 transpose (exact); g is transposed once, for both products
            xt, x = x, x[:, :batch].t()
            gt = _kops.transposed_input(g)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (_kops.transposed(g, t, vt.to(g.dtype)) if gt is None
                  else _kops.transposed_t(gt, batch, t, vt).to(g.dtype))
        if ctx.needs_input_grad[1]:
            if st.dense_window():  # the dense gradient, for the growth scores the hooks accumulate
                full = g.t() @ x.to(g.dtype)  # (out, in), as F.linear's backward computes it (in the product's dtype)
                dw = (full.t() if st.transposed else full).to(weight.dtype)
            else:
                dw = (_kops.sampled_dense(x, g, t, weight.numel()) if gt is None
                      else _kops.sampled_rows_t(xt, gt, batch, t, st.transposed, weight.dtype))
                dw = dw.view(weight.shape).to(weight.dtype)
                dw._rigl_fast_masked = True  # exactly 0 off the mask: the hook need not mask it (hooks.py)
        return dx, dw, None, None


_WHY_BREAK = ("rigl_fast: compute='sparse' layers break the graph (their tables are Python state, rebuilt at each "
              "topology update); under fullgraph=True use compute='dense'")


def _graph_break(fn):
    """torch.compiler.disable, with the reason that torch.compile(fullgraph=True) reports where torch takes one."""
    try:
        return torch.compiler.disable(fn, reason=_WHY_BREAK)
    except TypeError:  # torch before reason=
        return torch.compiler.disable(fn)


class _SparseForward:
    """The forward put on a sparse-computed module's instance."""
    _rigl_fast_compute = True  # layers.own_forward: not a user's replacement

    def __init__(self, module, state):
        self.module, self.state = module, state

    @_graph_break  # a graph break under torch.compile: the tables are Python state
    def __call__(self, input):
        m, st = self.module, self.state
        w = m.weight
        dt = _compute_dtype(input, w)
        mask = st.p.backward_masks[st.i]
        if dt is None or mask is None or _transforms_active():
            return type(m).forward(m, input)  # what the layer computes densely (and its error, if any)
        if mask.device != w.device:  # the model was moved after construction: the masks follow (devices.py)
            st.p._follow_devices()
        lead = input.shape[:-1]
        x = input.reshape(-1, input.shape[-1]).to(dt)
        y = _SparseLinear.apply(x, w, st, st.tables())
        if m.bias is not None:
            y = y + m.bias.to(dt)
        return y.reshape(*lead, y.shape[-1])

    def __reduce_ex__(self, protocol):  # a copied or pickled model computes densely: it has no scheduler
        return (_Detached, (self.module,))


class _Detached:
    """A copy's forward: the module's class forward."""
    _rigl_fast_compute = True

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)


def _transforms_active() -> bool:
    """Under torch.func's transforms (grad, vmap, jvp, jacrev) and forward-mode AD (torch.autograd.forward_ad's
    dual levels) the layers compute densely: the kernels have no batching rules or forward derivatives, and torch
    refuses an autograd function without them there. The weights are 0 off the mask, so the values are the sparse
    ones."""
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)
    if functorch is not None and functorch():
        return True
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _compute_dtype(x, w):
    """The product's dtype as F.linear picks it (autocast's, else x's), or None where the dense forward must
    run (mismatched dtypes outside autocast: F.linear raises; non-floating input)."""
    if not x.is_floating_point():
        return None
    cast = autocast_dtype(x.device.type)
    if cast is not None:  # autocast casts every floating tensor but a float64 one
        x_dt, w_dt = autocast_cast(x.dtype, cast), autocast_cast(w.dtype, cast)
        return x_dt if x_dt == w_dt else None
    return x.dtype if x.dtype == w.dtype else None


def dense_reason(pruner, module_kind: str, module) -> str:
    """Why a sparse layer of this kind is dense-computed, or "" where it is sparse-computed."""
    if module_kind not in (_layers.LINEAR, _layers.CONV1D):
        return {"conv": "convolution", "attention": "nn.MultiheadAttention projection"}.get(module_kind, module_kind)
    if pruner.structure not in ("unstructured", "fan_in"):
        return f"structure={pruner.structure!r}"
    base = _layers.own_forward(module)
    if base is not None and not base.startswith("it has forward hooks"):
        return base
    return ""


def install(pruner):
    """Puts the sparse forward on every sparse nn.Linear / Conv1D of the pruner's model (after taking off any it
    put there before); returns {layer: (module, reason)} with reason "" for the sparse-computed layers.
    pruner.compute == "dense": {}."""
    uninstall(pruner)
    if pruner.compute != "sparse":
        return {}
    owner, functional = {}, set()
    for _, module in pruner.model.named_modules():
        w = module._parameters.get("weight") if _layers.kind(module) is not None else None
        if w is not None:
            owner.setdefault(id(w), module)
        if _layers.kind(module) == _layers.ATTENTION and isinstance(getattr(module, "out_proj", None), nn.Linear):
            functional.add(id(module.out_proj))  # F.multi_head_attention_forward reads its weight, never calls it
    out = {}
    for i, (w, m) in enumerate(zip(pruner.W, pruner.backward_masks)):
        module = owner.get(id(w))
        if m is None or module is None:  # dense layers; attention's projections have no "weight"
            if m is not None:
                out[i] = (None, "nn.MultiheadAttention projection")
            continue
        why = dense_reason(pruner, _layers.kind(module), module)
        if not why and id(module) in functional:
            why = "nn.MultiheadAttention's out_proj (its attention uses the weight directly)"
        if not why:
            module.forward = _SparseForward(module, _LayerState(pruner, i, pruner._transposed[i]))
        out[i] = (module, why)
    return out


def uninstall(pruner) -> None:
    layers = getattr(pruner, "_compute_layers", {})
    for module, why in layers.values():
        if module is not None and not why and isinstance(vars(module).get("forward"), _SparseForward):
            del module.forward
    pruner._compute_layers = {}
    if layers:  # the buffers kept for the next steps' gradients and transposes (compute_ops.release_buffers)
        _kops.release_buffers()


def note(pruner, i) -> str:
    """summary()'s word on layer i under compute='sparse': how it is computed."""
    layers = getattr(pruner, "_compute_layers", {})
    if i not in layers:
        return ""
    module, why = layers[i]
    if why:
        return f"dense compute: {why}"
    t = _kops.layout_name(pruner.structure)
    return f"sparse compute ({t})"
