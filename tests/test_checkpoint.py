"""SPEC §6: stop and resume at any step reproduces an uninterrupted run bit for bit; rigl-torch state dicts load."""
import io

import pytest
import torch
import torch.nn.functional as F

from rigl_fast import RigLScheduler
from helpers import SmallResNet, batches, train
from rigl_torch_import import import_rigl_torch

STEPS, DELTA, N_ACC, T_END = 16, 5, 3, 14


def make(state=None, grow_mode="gradient"):
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    kw = dict(dense_allocation=0.2, T_end=T_END, delta=DELTA, grad_accumulation_n=N_ACC, grow_mode=grow_mode)
    if state is None:
        return model, opt, RigLScheduler(model, opt, **kw)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    # the scheduler's hyperparameters come from its state dict alone (SPEC §6)
    return model, opt, RigLScheduler(model, opt, state_dict=state["pruner"], grow_mode=grow_mode)


def snapshot(model, pruner):
    return [p.detach().clone() for p in model.parameters()] + [m.clone() for m in pruner.backward_masks
                                                                if m is not None]


@pytest.mark.parametrize("grow_mode", ["gradient", "random"])
def test_resume_at_every_step_is_bit_identical(grow_mode):
    data = list(batches(STEPS, seed=11))
    model, opt, pruner = make(grow_mode=grow_mode)
    returns = train(model, opt, pruner, data)
    expected = snapshot(model, pruner)
    assert pruner.rigl_steps == 2
    # stop after k steps (mid window: k = 2, 3; just before an update: 4; right after: 5; ...), save, restore
    for k in range(1, STEPS):
        model, opt, pruner = make(grow_mode=grow_mode)
        r1 = train(model, opt, pruner, data[:k])
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "pruner": pruner.state_dict()}, buf)
        buf.seek(0)
        del model, opt, pruner
        model, opt, pruner = make(torch.load(buf, weights_only=False), grow_mode=grow_mode)
        r2 = train(model, opt, pruner, data[k:])
        assert r1 + r2 == returns
        got = snapshot(model, pruner)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"resume after step {k} diverged"


def test_state_dict_holds_copies_and_rigl_torch_keys():
    model, opt, pruner = make()
    sd = pruner.state_dict()
    for key in ("dense_allocation", "S", "N", "hyperparams", "step", "rigl_steps", "backward_masks",
                "_linear_layers_mask"):
        assert key in sd
    for key in ("delta_T", "alpha", "T_end", "ignore_linear_layers", "static_topo", "sparsity_distribution",
                "grad_accumulation_n"):
        assert key in sd["hyperparams"]
    m = next(m for m in sd["backward_masks"] if m is not None)
    live = next(m for m in pruner.backward_masks if m is not None)
    assert m is not live and m.data_ptr() != live.data_ptr()
    # rigl-torch's loader sets every key as an attribute: ours must not shadow its names
    RigL = import_rigl_torch()
    reserved = set(dir(RigL)) | {"model", "optimizer", "W", "N", "S", "backward_masks", "backward_hook_objects",
                                 "step", "rigl_steps", "delta_T", "alpha", "T_end", "static_topo",
                                 "grad_accumulation_n", "ignore_linear_layers", "sparsity_distribution",
                                 "dense_allocation", "_linear_layers_mask", "hyperparams"}
    extra = set(sd) - {"dense_allocation", "S", "N", "hyperparams", "step", "rigl_steps", "backward_masks",
                       "_linear_layers_mask"}
    assert extra and not (extra & reserved)


def test_rigl_torch_state_dict_loads_and_training_continues():
    RigL = import_rigl_torch()
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    theirs = RigL(model, opt, dense_allocation=0.2, T_end=40, delta=4)
    data = list(batches(10, seed=12))
    for x, y in data[:6]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if theirs():
            opt.step()
    sd = theirs.state_dict()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "pruner": sd}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)

    torch.manual_seed(1)
    model2 = SmallResNet()
    model2.load_state_dict(state["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(state["optimizer"])
    ours = RigLScheduler(model2, opt2, state_dict=state["pruner"])
    assert ours.step == 6 and ours.rigl_steps == 1 and ours.T_end == 40 and ours.delta_T == 4
    for a, b in zip(ours.backward_masks, sd["backward_masks"]):
        assert (a is None and b is None) or torch.equal(a, b)
    counts = [None if m is None else int(m.sum()) for m in ours.backward_masks]
    train(model2, opt2, ours, data[6:])
    assert ours.rigl_steps == 2
    for w, m, c in zip(ours.W, ours.backward_masks, counts):
        if m is not None:
            assert int(m.sum()) == c and torch.all(w[~m] == 0)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 3), (64, 33)])
def test_masks_are_bit_packed_and_unpack_exactly(shape):
    from rigl_fast.state import pack, unpack
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    m = torch.rand(shape, generator=g) < 0.4
    p = pack(m)
    assert p.dtype == torch.uint8 and p.numel() == (m.numel() + 7) // 8
    assert torch.equal(unpack(p, shape), m)


def test_state_dict_masks_take_one_bit_per_weight_and_older_formats_load():
    from rigl_fast.state import masks as sd_masks
    model, opt, pruner = make()
    sd = pruner.state_dict()
    live = [m for m in pruner.backward_masks if m is not None]
    packed = [m for m in sd["backward_masks"] if m is not None]
    assert sum(p.numel() * p.element_size() for p in packed) * 8 < sum(m.numel() for m in live) + 8 * len(live)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(sd_masks(sd), pruner.backward_masks))
    # format 1 (bool masks, no shapes) loads into a fresh scheduler with the same masks
    old = dict(sd, backward_masks=sd_masks(sd), rigl_fast_format=1)
    del old["rigl_fast_mask_shapes"]
    pruner.remove()
    again = RigLScheduler(model, opt, state_dict=old)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(again.backward_masks, sd_masks(sd)))
    # a packed mask of the wrong length is refused, naming the layer
    bad = dict(sd, backward_masks=list(sd["backward_masks"]))
    i = next(k for k, m in enumerate(bad["backward_masks"]) if m is not None)
    bad["backward_masks"][i] = bad["backward_masks"][i][:-1]
    again.remove()
    with pytest.raises(ValueError, match=f"packed mask of layer {i}"):
        RigLScheduler(model, opt, state_dict=bad)
