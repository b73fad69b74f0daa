"""Issue 21 items 1, 2 and 6: a state dict is checked whole before anything changes; it names its layers, and
loading onto other layers raises; resuming SET (grow_mode='random') draws nothing from the global RNG."""
import re

import pytest
import torch
from torch import nn

from rigl_fast import RigLScheduler
from rigl_fast.state import masks as sd_masks
from helpers import SmallResNet, batches, train


class Twin(nn.Module):
    """Two branches whose layers have the same shapes, so only the names tell them apart."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 12)
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(self.a(h) + self.b(h))


def _pruner(grow_mode="gradient", **kw):
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=14, delta=5, grad_accumulation_n=2,
                           grow_mode=grow_mode, **kw)
    return model, opt, pruner


def _observable(pruner):
    """Everything load_state_dict may change: masks, counters, hyperparameters, accumulators, SET's generator."""
    return {"masks": [None if m is None else m.clone() for m in pruner.backward_masks],
            "counters": (pruner.step, pruner.rigl_steps, pruner.skipped_updates, pruner._last_update),
            "hp": pruner._hyperparams(), "S": list(pruner.S),
            "accs": [None if h.dense_grad is None else h.dense_grad.clone() for h in pruner.backward_hook_objects],
            "rng": None if pruner._generator is None else pruner._generator.get_state()}


def _same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _bad_state_dicts(sd):
    """(label, state dict, the error's words): each differs from a loadable `sd` (other hyperparameters and
    masks, so that a half-done load would show) by one bad entry, which the error names."""
    other = dict(sd, hyperparams=dict(sd["hyperparams"], alpha=0.5, delta_T=7),
                 backward_masks=[None if m is None else ~m for m in sd_masks(sd)], rigl_fast_mask_shapes=None)
    other["S"] = [0.0 if m is None else 1 - float(m.float().mean()) for m in other["backward_masks"]]
    i = next(k for k, m in enumerate(sd["backward_masks"]) if m is not None)
    return [("step", dict(other, step="oops"), "state_dict['step'] must be an integer"),
            ("rigl_steps", dict(other, rigl_steps=-1), "state_dict['rigl_steps'] must be an integer"),
            ("skipped", dict(other, rigl_fast_skipped_updates=5, rigl_steps=1),
             "'rigl_fast_skipped_updates' (5) exceeds 'rigl_steps' (1)"),
            ("rng", dict(other, rigl_fast_rng="not a generator state"),
             "state_dict['rigl_fast_rng'] is not a CPU generator state"),
            ("last_update", dict(other, rigl_fast_last_update=[[999, 1, 1]]),
             "state_dict['rigl_fast_last_update'] must be a list"),
            ("S", dict(other, S=["x"] + other["S"][1:]), "'S' of layer 0 (conv1.weight) must be a sparsity"),
            ("dense_grads", dict(other, rigl_fast_dense_grads=[None] * (len(sd["S"]) - 1) + ["acc"]),
             "dense gradient of layer 6 (fc.weight) must be a floating-point tensor"),
            ("dense_grads_copies", dict(other, rigl_fast_dense_grads_copies=0),
             "state_dict['rigl_fast_dense_grads_copies'] must be an integer >= 1"),
            ("names", dict(other, rigl_fast_names=list(reversed(sd["rigl_fast_names"]))),
             "its layer 0 is 'fc.weight', the model's layer 0 is 'conv1.weight'"),
            ("format", dict(other, rigl_fast_format=99), "state_dict has format 99"),
            ("mask", dict(other, backward_masks=[m if k != i else m[:1] for k, m in
                                                 enumerate(other["backward_masks"])]),
             f"mask of layer {i} ({sd['rigl_fast_names'][i]}) has shape")]


@pytest.mark.parametrize("grow_mode", ["gradient", "random"])
def test_a_bad_state_dict_changes_nothing(grow_mode):
    model, opt, pruner = _pruner(grow_mode)
    data = list(batches(9, seed=3))
    train(model, opt, pruner, data)  # past an update, inside the next window: counters, accumulators, RNG live
    assert pruner.rigl_steps == 1
    assert any(h.dense_grad is not None for h in pruner.backward_hook_objects) == (grow_mode == "gradient")
    sd = pruner.state_dict()
    before = _observable(pruner)
    weights = [w.detach().clone() for w in model.parameters()]
    for label, bad, words in _bad_state_dicts(sd):
        with pytest.raises(ValueError, match=re.escape(words)):
            pruner.load_state_dict(bad)
        assert _same(_observable(pruner), before), f"a state dict with a bad {label} changed the scheduler"
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())), label
        pruner.remove()
        rng = torch.get_rng_state()
        with pytest.raises(ValueError, match=re.escape(words)):
            RigLScheduler(model, opt, state_dict=bad, grow_mode=grow_mode)
        assert torch.equal(rng, torch.get_rng_state()) and not model.conv1.weight._backward_hooks
        pruner = RigLScheduler(model, opt, state_dict=sd, grow_mode=grow_mode)  # the good one still loads
    assert _same(_observable(pruner), before)


def test_state_dicts_name_their_layers_and_refuse_other_layers():
    torch.manual_seed(0)
    model = Twin()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(dense_allocation=0.3, T_end=100, delta=10, ignore_linear_layers=False)
    pruner = RigLScheduler(model, opt, exclude=["b"], **kw)  # stem (first: dense), a, head
    sd = pruner.state_dict()
    assert sd["rigl_fast_names"] == ["stem.weight", "a.weight", "head.weight"] and sd["rigl_fast_format"] == 3
    pruner.remove()
    with pytest.raises(ValueError, match=r"its layer 1 is 'a.weight', the model's layer 1 is 'b.weight'"):
        RigLScheduler(model, opt, exclude=["a"], state_dict=sd)  # the same shapes: by position it would fit
    other = RigLScheduler(model, opt, exclude=["a"], **kw)
    masks = [None if m is None else m.clone() for m in other.backward_masks]
    with pytest.raises(ValueError, match=r"'a.weight'.*'b.weight'"):
        other.load_state_dict(sd)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(masks, other.backward_masks))
    # format 2 (no names) loads by position, as before
    old = {k: v for k, v in sd.items() if k != "rigl_fast_names"}
    other.load_state_dict(dict(old, rigl_fast_format=2))
    assert torch.equal(other.backward_masks[1], sd_masks(sd)[1])
    # a wrapper's prefix (DDP's module., torch.compile's _orig_mod.) is not a different layer, nor is a
    # containing module's path on every name (a LightningModule's net.a.weight is the bare network's a.weight)
    other.remove()
    for prefix in ("module._orig_mod.", "net.", "module.net."):
        again = RigLScheduler(model, opt, exclude=["b"], state_dict=dict(
            sd, rigl_fast_names=[prefix + n for n in sd["rigl_fast_names"]]))
        assert torch.equal(again.backward_masks[1], sd_masks(sd)[1])
        again.remove()
    # but the extra path must be the same on every layer
    mixed = dict(sd, rigl_fast_names=["net." + sd["rigl_fast_names"][0]] + sd["rigl_fast_names"][1:])
    with pytest.raises(ValueError, match=r"its layer 1 'a.weight' and the model's 'a.weight' differ by another leading path"):
        RigLScheduler(model, opt, exclude=["b"], state_dict=mixed)


def test_resuming_random_growth_draws_nothing_from_the_global_rng():
    model, opt, pruner = _pruner("random")
    train(model, opt, pruner, list(batches(6, seed=4)))
    sd = pruner.state_dict()
    pruner.remove()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    resumed = RigLScheduler(model, opt, state_dict=sd, grow_mode="random")
    assert torch.equal(rng, torch.get_rng_state()), "resuming drew from the global RNG"
    assert torch.equal(resumed._generator.get_state(), sd["rigl_fast_rng"])
    resumed.load_state_dict(sd)
    assert torch.equal(rng, torch.get_rng_state()), "load_state_dict drew from the global RNG"
