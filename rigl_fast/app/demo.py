"""Models and the training run behind `rigl-fast train` and the quality study (study/).

One run = one (model, method, density, distribution, structure, seed). Methods:
  dense   no scheduler;
  static  RigLScheduler(static_topo=True): a fixed random mask;
  set     RigLScheduler(grow_mode='random'): drop by magnitude, regrow at random (SET, Mocanu et al. 2018);
  rigl    RigLScheduler(): drop by magnitude, regrow by dense gradient (Evci et al. 2020).
`structure` ('unstructured', 'fan_in', 'N:M') and `compute` ('dense', 'sparse') are passed to the scheduler of
every sparse method.
The loop is rigl-torch's: backward, then `if pruner(): optimizer.step()`.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import Data
from .. import compute as _compute
from .. import structure as _structure
from ..scheduler import RigLScheduler

METHODS = ("dense", "static", "set", "rigl")
MODELS = ("cnn", "cnn1d", "mlp")
# "cnn-nobn" is the same CNN without BatchNorm: the study shows why the demo's CNN has it.
ALL_MODELS = MODELS + ("cnn-nobn",)


class MLP(nn.Module):
    """in-300-100-classes (LeNet-300-100 shaped): the study's model."""

    def __init__(self, in_features: int, n_classes: int, hidden=(300, 100)):
        super().__init__()
        sizes = (in_features,) + tuple(hidden) + (n_classes,)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class CNN(nn.Module):
    """Three 3x3 conv layers with BatchNorm, global average pooling, one linear layer.

    BatchNorm is not decoration: without it, a CNN this small sits at chance at <= 10% density under
    rigl-torch's default initialisation (the masked layers' activations shrink layer after layer).
    """

    def __init__(self, in_channels: int, n_classes: int, width: int = 32, batchnorm: bool = True):
        super().__init__()
        w = width

        def block(c_in, c_out):
            if batchnorm:
                return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(*block(in_channels, w), *block(w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(2 * w, n_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class CNN1d(nn.Module):
    """The MNIST-1D paper's CNN (Greydanus 2020): three stride-2 Conv1d layers (kernels 5, 3, 3) and a linear
    head on the flattened features, here with BatchNorm and 32 channels. It reads any input as one sequence
    (digits' 8x8 images as 64 pixels in row order).

    32 channels rather than the paper's 25: fan-ins of 32 * 3 = 96 and a head of 32 * 5 = 160 inputs divide by
    4, so structure='2:4' can sparsify every layer but the first (25 * 3 = 75 would leave them dense).
    BatchNorm for the reason the 2-D CNN has it: nothing else restores the activations that the masks shrink.
    Without it, a static mask at 5% density reached 27% test accuracy on MNIST-1D (seed 0, 60 epochs; 53% with
    it), so the comparison would be of how each method copes with the scale rather than of what it learns.
    """

    def __init__(self, seq_len: int, n_classes: int, width: int = 32):
        super().__init__()
        layers, c_in, length = [], 1, seq_len
        for k in (5, 3, 3):
            layers += [nn.Conv1d(c_in, width, k, stride=2, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
            c_in, length = width, (length + 2 - k) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width * length, n_classes)

    def forward(self, x):
        return self.fc(self.features(x.flatten(1).unsqueeze(1)).flatten(1))


def make_model(name: str, in_shape, n_classes: int) -> nn.Module:
    if name == "mlp":
        return MLP(math.prod(in_shape), n_classes)
    if name == "cnn1d":
        return CNN1d(math.prod(in_shape), n_classes)
    if name in ("cnn", "cnn-nobn") and len(in_shape) != 3:
        raise ValueError(f"model: {name!r} is a 2-D CNN for (C, H, W) images, got input shape {tuple(in_shape)}; "
                         "use 'cnn1d' or 'mlp'")
    if name == "cnn":
        return CNN(in_shape[0], n_classes)
    if name == "cnn-nobn":
        return CNN(in_shape[0], n_classes, batchnorm=False)
    raise ValueError(f"model: unknown model {name!r}; choose one of {ALL_MODELS}")


@dataclass
class RunConfig:
    model: str = "mlp"
    method: str = "rigl"
    density: float = 0.1
    distribution: str = "uniform"
    structure: str = "unstructured"
    epochs: int = 40
    seed: int = 0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    delta: int = 10
    alpha: float = 0.3
    t_end_frac: float = 0.75
    backend: str = "auto"
    device: str = "cpu"
    sparse_linear: bool = True   # ignore_linear_layers=False, as rigl-torch's README example passes
    compute: str = "dense"       # RigLScheduler(compute=): 'sparse' computes the sparse Linear layers sparsely

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of {METHODS}")
        if self.model not in ALL_MODELS:
            raise ValueError(f"model: unknown model {self.model!r}; choose one of {ALL_MODELS}")
        if not (0 < self.density <= 1):
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        _structure.parse(self.structure)
        _compute.check_mode(self.compute)
        if self.method != "dense":  # before training starts, not at the scheduler's construction
            _structure.check(self.structure, dict(sparsity_distribution=self.distribution,
                                                  dense_allocation=self.density))


@dataclass
class RunResult:
    config: dict
    test_acc: float
    train_loss: float            # cross-entropy on the whole training set at the end (eval mode)
    train_acc: float
    classes_never_predicted: int  # on the test set: the tell of a mask that cut an output class off
    churn: List[List[float]] = field(default_factory=list)  # [step, fraction of active weights regrown]
    layers: List[dict] = field(default_factory=list)        # per-layer name, shape, numel, active
    masks_sha1: str = ""         # digest of the final masks: equal digests = the same topology
    seconds: float = 0.0

    def to_dict(self):
        return asdict(self)


def make_scheduler(cfg: RunConfig, model, optimizer, total_steps: int, scheduler_cls=None):
    """The RigLScheduler for cfg.method (None for dense). `scheduler_cls` lets the study pass rigl-torch's
    class, which takes only the positional API (no keyword extras, uniform only)."""
    if cfg.method == "dense":
        return None
    args = dict(dense_allocation=cfg.density, T_end=max(1, int(cfg.t_end_frac * total_steps)),
                sparsity_distribution=cfg.distribution, ignore_linear_layers=not cfg.sparse_linear,
                delta=cfg.delta, alpha=cfg.alpha, static_topo=cfg.method == "static")
    if scheduler_cls is not None:
        if cfg.method == "set" or cfg.structure != "unstructured" or cfg.compute != "dense":
            raise ValueError("rigl-torch has no SET (random growth) mode, no structure= and no compute=")
        return scheduler_cls(model, optimizer, **args)
    return RigLScheduler(model, optimizer, **args, backend=cfg.backend, structure=cfg.structure,
                         grow_mode="random" if cfg.method == "set" else "gradient", compute=cfg.compute)


def _unit_counts(mask: torch.Tensor, group: int = 0) -> dict:
    """[min, max] active weights per output unit (a row of the (out, fan_in) view: Linear rows, conv output
    channels) and, with `group` (N:M's M), per run of `group` consecutive weights along the fan-in. Counted
    here from the mask alone, so they check the scheduler's structure rather than repeat its bookkeeping."""
    rows = mask.reshape(mask.shape[0], -1)
    per_row = rows.sum(1)
    out = dict(unit_active=[int(per_row.min()), int(per_row.max())])
    if group and rows.shape[1] % group == 0:
        per_group = rows.reshape(rows.shape[0], -1, group).sum(2)
        out["group_active"] = [int(per_group.min()), int(per_group.max())]
    return out


def layer_table(model: nn.Module, pruner, structure: str = "unstructured") -> List[dict]:
    """Per candidate layer: name, shape, numel, active, and the per-unit counts of `_unit_counts` (with
    structure 'N:M', per run of M too); under compute='sparse', `compute`: how each sparse layer is computed
    (summary()'s word, e.g. 'sparse compute (compressed rows)' or 'dense compute: convolution')."""
    kind, _, m = _structure.parse(structure)
    group = m if kind == "N:M" else 0
    if pruner is None:
        from ..layers import find_candidates
        names, W, _ = find_candidates(model)
        masks = [None] * len(W)
    else:
        names = getattr(pruner, "names", [f"W[{i}]" for i in range(len(pruner.W))])
        W, masks = pruner.W, pruner.backward_masks
    computed = getattr(pruner, "_compute_layers", None)  # {} under compute='dense'; rigl-torch has none
    table = []
    for i, (n, w, mask) in enumerate(zip(names, W, masks)):
        how = _compute.note(pruner, i) if computed else ""
        mask = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.reshape(w.shape).bool()
        table.append(dict(name=n, shape=list(w.shape), numel=w.numel(), active=int(mask.sum()),
                          **_unit_counts(mask, group), **({"compute": how} if computed else {})))
    return table


@torch.no_grad()
def evaluate(model: nn.Module, x, y, batch_size: int = 1024):
    model.eval()
    loss, correct, preds = 0.0, 0, []
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum").item()
        p = out.argmax(1)
        correct += int((p == y[i:i + batch_size]).sum())
        preds.append(p)
    model.train()
    preds = torch.cat(preds)
    return loss / len(x), correct / len(x), preds


def run(cfg: RunConfig, data: Data, progress: Optional[Callable[[int, int, float], None]] = None,
        scheduler_cls=None, trained: Optional[Callable] = None) -> RunResult:
    """Train one model. `progress(step, total_steps, running_loss)` is called after every iteration;
    `trained(model, pruner)` once at the end, while the scheduler is still attached (pruner is None for dense)."""
    cfg.validate()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    # Built on the CPU and then moved, so a seed gives the same weights and masks on every device.
    model = make_model(cfg.model, data.in_shape, data.n_classes).to(cfg.device)
    data = data.to(cfg.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    n = len(data.train_x)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    # LR scheduler first: rigl-torch replaces optimizer.step with a plain function, which an LR scheduler
    # created afterwards cannot wrap (AttributeError '__func__'); rigl_fast works in either order.
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    # The masks come from the global RNG right after the model's initialisation, as in a rigl-torch user's
    # script, so one seed gives the same masks in rigl_fast and rigl-torch.
    pruner = make_scheduler(cfg, model, optimizer, total, scheduler_cls)
    order = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # batch order apart from the model's RNG

    churn, step, running = [], 0, None
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size].to(cfg.device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            before = None
            if pruner is not None and not pruner.static_topo and (pruner.step + 1) % pruner.delta_T == 0:
                before = [None if m is None else m.clone() for m in pruner.backward_masks]
            if pruner is None or pruner():
                optimizer.step()
            elif before is not None:
                grown = sum(int((m & ~b).sum()) for m, b in zip(pruner.backward_masks, before) if m is not None)
                active = sum(int(b.sum()) for b in before if b is not None)
                churn.append([pruner.step, grown / max(active, 1)])
            lr_sched.step()
            step += 1
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if progress is not None:
                progress(step, total, running)

    train_loss, train_acc, _ = evaluate(model, data.train_x, data.train_y)
    _, test_acc, preds = evaluate(model, data.test_x, data.test_y)
    never = data.n_classes - len(torch.unique(preds))
    layers = layer_table(model, pruner, cfg.structure)
    digest = hashlib.sha1()
    for m in ([] if pruner is None else pruner.backward_masks):
        digest.update(b"-" if m is None else m.cpu().numpy().tobytes())
    result = RunResult(asdict(cfg), test_acc, train_loss, train_acc, never, churn, layers,
                       digest.hexdigest() if pruner is not None else "", time.perf_counter() - t0)
    if trained is not None:
        trained(model, pruner)
    if pruner is not None and hasattr(pruner, "remove"):
        pruner.remove()
    return result
