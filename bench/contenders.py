"""The contenders: rigl-torch 0.5.2, sparsimony 0.1.0 (when installed) and rigl_fast on every backend that loads,
behind one small interface.

Every contender holds its own modules, optimizer and scheduler, but its weights, `.grad`s and momentum buffers
alias one shared set of master tensors, and its masks start from one shared copy; before every timed update
all of it is restored, so every contender does exactly the same work on exactly the same data.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

import torch

from . import weightsets

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")

RIGL_TORCH = "rigl-torch"
SPARSIMONY = "sparsimony"
PEERS = (RIGL_TORCH, SPARSIMONY)  # the other libraries; every other name is a rigl_fast contender


def import_rigl_torch():
    """rigl-torch 0.5.2's RigLScheduler, through the tests' importer (it lends rigl-torch the torchvision stub
    when the real torchvision does not import, and hides the stub again afterwards)."""
    sys.path.insert(0, TESTS)
    try:
        from rigl_torch_import import import_rigl_torch as _imp
    finally:
        sys.path.remove(TESTS)
    return _imp()


def rigl_torch_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version("rigl-torch")
    except Exception:
        return None


def import_sparsimony():
    """sparsimony 0.1.0's public pieces (RigL, UniformDistribution, CosineDecayScheduler), or None when it is not
    installed (the bench then runs without it and says so in its notes)."""
    try:
        from sparsimony.distributions.base import UniformDistribution
        from sparsimony.dst.rigl import RigL
        from sparsimony.schedulers.base import CosineDecayScheduler
    except ImportError:
        return None
    return RigL, UniformDistribution, CosineDecayScheduler


def sparsimony_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version("sparsimony")
    except Exception:
        return None


def sparsimony_rigl(model, optimizer, tensor_fqns, sparsity, delta, T_end, alpha=0.3):
    """sparsimony's RigL, as its user builds it, on the weights `tensor_fqns`: the same delta / alpha / cosine
    schedule / uniform density as the rigl schedulers. `init_method=None` keeps the weights as they are
    (its default re-draws the sparse weights at `prepare()`, which would overwrite the shared masters; it is a
    one-time cost, not part of anything timed). Grown weights start at 0 (its default), as in rigl.

    Only the sparse layers are listed: its UniformDistribution gives every listed layer the same sparsity
    (a layer excluded through it would still be masked, at sparsity 0), so the rigl rule's dense first layer is
    left out of the config, as is every layer rigl keeps dense."""
    RigL, UniformDistribution, CosineDecayScheduler = import_sparsimony()
    sp = RigL(scheduler=CosineDecayScheduler(pruning_ratio=alpha, t_end=T_end, delta_t=delta),
              distribution=UniformDistribution(), optimizer=optimizer, sparsity=sparsity, init_method=None)
    sp.prepare(model, [{"tensor_fqn": fqn} for fqn in tensor_fqns])
    return sp


def available_backends(device: torch.device) -> List[str]:
    """Every rigl_fast backend that loads and runs natively on `device`.

    Triton on CPU only runs under its interpreter (a test aid, orders of magnitude slower), so it is left out.
    """
    from rigl_fast import ops
    names = []
    for name in ("reference", "cpp", "triton"):
        if name == "triton" and device.type != "cuda":
            continue
        try:
            ops.get_backend(name, device)
        except Exception:
            continue
        names.append(name)
    return names


# rigl_fast's after_step modes: the default 'always' masks weights and optimizer states after every step (the
# plain contender name); 'trusted' is the opt-in fast path that skips that pass for zero-preserving optimizers
# (the SGD used here is one), named with a '+trusted' suffix.
DEFAULT_AFTER_STEP = "always"
FAST_PATH = "trusted"


def fast_name(backend: str, after_step: str = DEFAULT_AFTER_STEP) -> str:
    return f"rigl_fast[{backend}]" + ("" if after_step == DEFAULT_AFTER_STEP else f"+{after_step}")


def parse_fast_name(name: str):
    """'rigl_fast[cpp]' -> ('cpp', 'always'); 'rigl_fast[cpp]+trusted' -> ('cpp', 'trusted')."""
    if not name.startswith("rigl_fast[") or "]" not in name:
        raise ValueError(f"not a rigl_fast contender name: {name!r}")
    backend, _, rest = name[len("rigl_fast["):].partition("]")
    if rest and not rest.startswith("+"):
        raise ValueError(f"not a rigl_fast contender name: {name!r}")
    return backend, (rest[1:] if rest else DEFAULT_AFTER_STEP)


class Masters:
    """The shared tensors of one weight set, and pristine copies to restore before every timed update."""

    def __init__(self, shapes, device, dtype, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)  # on the device: 1.3B host draws take minutes
        self.shapes = shapes
        self.device, self.dtype = device, dtype

        def rand():
            return [torch.randn(s, generator=g, device=device).to(dtype) for s in shapes]

        self.w = rand()
        self.mom = rand()
        self.acc = rand()     # the dense gradient: grow scores, and the hooks' incoming gradient
        self.grad = [a.clone() for a in self.acc]  # `.grad` after backward (updates mask it in place)
        self.masks: List[Optional[torch.Tensor]] = []
        self.w0 = self.mom0 = self.grad0 = None

    def freeze(self, masks):
        """Fix the common masks and snapshot the state every update starts from (masked as after a step)."""
        self.masks = [None if m is None else m.clone() for m in masks]
        for w, mom, m in zip(self.w, self.mom, self.masks):
            if m is not None:
                w.masked_fill_(~m, 0)
                mom.masked_fill_(~m, 0)
        self.w0 = [w.clone() for w in self.w]
        self.mom0 = [m.clone() for m in self.mom]
        self.grad0 = [g.clone() for g in self.grad]

    @torch.no_grad()
    def restore(self):
        for dst, src in ((self.w, self.w0), (self.mom, self.mom0), (self.grad, self.grad0)):
            for d, s in zip(dst, src):
                d.copy_(s)

    @property
    def n_weights(self):
        return sum(weightsets.numel(s) for s in self.shapes)


class Contender:
    """One scheduler over the master tensors. `grad_op`, `after_step` and `update` are what is timed."""

    def __init__(self, name, masters: Masters, sparsity, delta, T_end, sd=None, backend=None,
                 after_step=DEFAULT_AFTER_STEP):
        self.name = name
        self.masters = masters
        self.delta = delta
        self.module = weightsets.build_module(masters.shapes, masters.w)
        self.params = [layer.weight for layer in self.module.layers]
        self.optimizer = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        kw = dict(dense_allocation=1 - sparsity, T_end=T_end, sparsity_distribution="uniform",
                  ignore_linear_layers=False, delta=delta, alpha=0.3)
        if name == RIGL_TORCH:
            cls = import_rigl_torch()
            if sd is not None:
                sd = dict(sd, backward_masks=[None if m is None else m.clone() for m in sd["backward_masks"]])
            self.sched = cls(self.module, self.optimizer, state_dict=sd, **kw)
            self.hooks = self.sched.backward_hook_objects
        else:
            from rigl_fast import RigLScheduler
            self.sched = RigLScheduler(self.module, self.optimizer, state_dict=sd, backend=backend,
                                       after_step=after_step, **kw)
            self.hooks = self.sched.backward_hook_objects
        self.sparse = [i for i, m in enumerate(self.sched.backward_masks) if m is not None]
        for p, g, mom in zip(self.params, masters.grad, masters.mom):
            p.grad = g
            self.optimizer.state[p]["momentum_buffer"] = mom
        self.sched.step = 1  # outside the accumulation window: the hooks only mask

    def masks(self):
        return self.sched.backward_masks

    @property
    def skips_after_step(self) -> bool:
        """Whether the after-step pass does nothing here (rigl_fast, after_step='trusted', a zero-preserving
        optimizer such as this SGD): its floor then has no after-step bytes."""
        return bool(getattr(self.sched, "_skip_after_step", False))

    @torch.no_grad()
    def grad_op(self):
        """The backward hook of every sparse weight, called as autograd calls it, with a dense gradient."""
        acc = self.masters.acc
        for i in self.sparse:
            self.hooks[i](acc[i])

    @torch.no_grad()
    def after_step(self):
        """What runs after optimizer.step(): rigl-torch's step wrapper body, rigl_fast's step post-hook."""
        if self.name == RIGL_TORCH:
            self.sched.reset_momentum()
            self.sched.apply_mask_to_weights()
        else:
            self.sched._after_optimizer_step(self.optimizer, (), {})

    @torch.no_grad()
    def prepare_update(self):
        """Restore masks (the masters are restored by the caller) and arm the dense gradients."""
        m = self.masters
        for i in self.sparse:
            p = self.params[i]
            if p.data_ptr() != m.w[i].data_ptr():  # rigl-torch replaces `w.data` in its update
                p.data = m.w[i]
            self.sched.backward_masks[i].copy_(m.masks[i])
            self.hooks[i].dense_grad = m.acc[i]
        self.sched.step = self.delta  # the first update: drop fraction alpha/2 * (1 + cos(pi delta/T_end))

    @torch.no_grad()
    def update(self):
        self.sched._rigl_step()

    def finish_update(self):
        self.sched.step = 1
        for i in self.sparse:
            self.hooks[i].dense_grad = None

    def close(self):
        if hasattr(self.sched, "remove"):
            self.sched.remove()


def _no_step(*args, **kwargs):
    return None


class SparsimonyContender(Contender):
    """sparsimony 0.1.0's RigL over the master tensors, driven as its user drives it.

    It builds on torch.ao.pruning: `prepare()` registers a parametrization on every listed weight, so each
    access of `layer.weight` computes `mask * original` (the mask a float tensor of the weight's dtype), and
    autograd masks the gradient on the way back; a full backward hook on the parametrization copies the dense
    gradient into its `dense_grad` buffer on the step before an update (and replaces the buffer with
    `zeros_like(mask)` on every other backward). `prepare()` also wraps `optimizer.step` so that every step
    ends with `momentum_buffer *= mask` for each sparse weight; `sparsifier.step()`, called after every
    optimizer step, counts steps and, every delta steps, runs the update (magnitude drop, dense-gradient
    grow, both `topk` over where-built scores, then a `where` that zeroes changed weights).

    Masks: it draws its own at `prepare()`; the common masks are then loaded through `model.load_state_dict`
    (the masks are the parametrizations' buffers, so this is how a sparsimony checkpoint is restored), so it
    starts from the same masks as every other contender.
    """

    def __init__(self, name, masters: Masters, sparsity, delta, T_end, sparse: Sequence[int]):
        self.name = name
        self.masters = masters
        self.delta = delta
        self.sparse = list(sparse)
        self.module = weightsets.build_module(masters.shapes, masters.w)
        self.layers = list(self.module.layers)
        self.params = [layer.weight for layer in self.layers]
        self.optimizer = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        # The SGD step itself is not overhead: a no-op stands in for it before prepare() wraps optimizer.step,
        # so calling the wrapped step runs sparsimony's wrapper body alone (momentum *= mask per sparse weight).
        self.optimizer.step = _no_step
        self.sched = sparsimony_rigl(self.module, self.optimizer, [f"layers.{i}.weight" for i in self.sparse],
                                     sparsity, delta, T_end)
        self.par = {i: self.layers[i].parametrizations.weight[0] for i in self.sparse}
        self.originals = [self.layers[i].parametrizations.weight.original for i in self.sparse]
        if masters.masks:
            self.load_masks(masters.masks)
        for p, g, mom in zip(self.params, masters.grad, masters.mom):
            p.grad = g
            self.optimizer.state[p]["momentum_buffer"] = mom
        for i in self.sparse:
            # its state on every step but the one before an update: the hook does not accumulate
            self.par[i].accumulate = False

    def load_masks(self, masks):
        dtype = self.masters.dtype
        sd = {f"layers.{i}.parametrizations.weight.0.mask": masks[i].to(dtype) for i in self.sparse}
        res = self.module.load_state_dict(sd, strict=False)
        if res.unexpected_keys:
            raise RuntimeError(f"sparsimony's masks did not load: {res.unexpected_keys}")

    def masks(self):
        return [self.par[i].mask.bool() if i in self.par else None for i in range(len(self.layers))]

    @property
    def skips_after_step(self) -> bool:
        return False

    def grad_op(self):
        """Its parametrization's forward (`layer.weight` = mask * original, as a forward pass computes it) and
        the backward through it with the dense gradient, in one autograd call over all sparse weights, as a
        backward runs it: the masked gradient of each original (returned, not accumulated into `.grad`, as
        the rigl hooks return theirs) and the full backward hook (`dense_grad = zeros_like(mask)`)."""
        acc = self.masters.acc
        with torch.enable_grad():
            ws = [self.layers[i].weight for i in self.sparse]
            return torch.autograd.grad(ws, self.originals, [acc[i] for i in self.sparse])

    @torch.no_grad()
    def after_step(self):
        """The wrapped optimizer step around the no-op step (momentum *= mask for each sparse weight), then
        `sparsifier.step()` at a step that is not an update and not the step before one."""
        self.optimizer.step()
        self.sched._step_count = 1  # the counter it advances: stay away from the update (a plain store)
        self.sched.step()

    @torch.no_grad()
    def prepare_update(self):
        """Restore masks and weights, set the dense gradient where its backward hook accumulates it, and put its
        step counter one before the first update, so that `sparsifier.step()` runs the update."""
        m = self.masters
        for k, i in enumerate(self.sparse):
            orig = self.originals[k]
            if orig.data_ptr() != m.w[i].data_ptr():  # its grow step replaces `original.data`
                orig.data = m.w[i]
            self.par[i].mask.copy_(m.masks[i])  # (its update replaces `mask.data`; the buffer object stays)
            self.par[i].dense_grad = m.acc[i]
        self.sched._step_count = self.delta - 1

    @torch.no_grad()
    def update(self):
        if not self.sched.step():
            raise RuntimeError("sparsimony's step did not update the topology")

    def finish_update(self):
        self.sched._step_count = 1
        for i in self.sparse:
            self.par[i].accumulate = False
            self.par[i].dense_grad = torch.zeros_like(self.par[i].mask)

    def close(self):
        pass


def make_contenders(masters: Masters, names: Sequence[str], sparsity, delta=100, T_end=1000):
    """Contenders by name ('rigl-torch', 'sparsimony', 'rigl_fast[<backend>]' with the default
    after_step='always', 'rigl_fast[<backend>]+trusted' with the fast path).

    The first rigl_fast scheduler draws the masks; every other contender loads them (rigl-torch from a state
    dict, sparsimony through its model's state dict), so all start from the same masks without drawing again.
    """
    sd = None
    out = {}
    # a rigl_fast one first (its state dict has copies), sparsimony last (it takes the first one's layer list)
    order = sorted(names, key=lambda n: (n in PEERS, n == SPARSIMONY))
    first = None
    for name in order:
        if name == SPARSIMONY:
            if first is None:
                raise ValueError("sparsimony needs another contender beside it (it loads that one's masks)")
            c = SparsimonyContender(name, masters, sparsity, delta, T_end, first.sparse)
        elif name == RIGL_TORCH:
            c = Contender(name, masters, sparsity, delta, T_end, sd=sd)
        else:
            backend, after = parse_fast_name(name)
            c = Contender(name, masters, sparsity, delta, T_end, sd=sd, backend=backend, after_step=after)
        if sd is None:
            first = c
            sd = c.sched.state_dict()
            if name != RIGL_TORCH:  # rigl-torch's keys only, masks as its bool tensors (ours are bit-packed)
                from rigl_fast.state import masks
                sd = {k: v for k, v in dict(sd, backward_masks=masks(sd)).items() if not k.startswith("rigl_fast_")}
            masters.freeze(c.masks())
        out[name] = c
    return [out[n] for n in names]
