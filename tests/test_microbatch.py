"""Micro-batch gradient accumulation in the user's loop: k backward passes per pruner() call.

The dense-gradient window counts optimizer steps (pruner() calls), not backward passes: every backward pass of
a window step accumulates. With the loss divided by k, k micro-batches of b give the gradient of one batch of
k*b, so the accumulator, the masks and the weights must match a run on the whole batch (up to rounding; masks
exactly: the runs are in float64, and the test asserts that the gaps deciding each mask are far above the
rounding, tests/helpers.selection_gap).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import MLP, assert_same_updates, assert_selection_margin, batches, update_scores
from rigl_fast import RigLScheduler

BATCH, STEPS = 16, 14
CFG = dict(dense_allocation=0.3, T_end=12, delta=4, grad_accumulation_n=2, ignore_linear_layers=False,
           alpha=0.5, backend="reference")
DTYPE = torch.float64  # in float32 the smallest gap deciding a mask was only 1200x the micro-batch rounding


def _run(k):
    torch.manual_seed(0)
    model = MLP().to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, **CFG)
    accs, updates, scores = [], [], []
    for x, y in batches(STEPS, seed=11, batch=BATCH):
        x = x.to(DTYPE)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (F.cross_entropy(model(xs), ys) / k).backward()
            for w, m in zip(pruner.W, pruner.backward_masks):
                if m is not None:
                    assert bool((w.grad[~m] == 0).all()), "accumulated .grad nonzero off the mask"
        if (pruner.step + 1) % CFG["delta"] == 0:
            accs.append([h.dense_grad.clone() for h in pruner.backward_hook_objects if h.dense_grad is not None])
            scores.append(update_scores(pruner))
        if pruner():
            opt.step()
        else:
            updates.append([m.clone() for m in pruner.backward_masks if m is not None])
            scores[-1] = (pruner.cosine_annealing(), scores[-1])
    assert pruner.skipped_updates == 0
    return accs, updates, [w.detach().clone() for w in pruner.W], scores[:len(updates)]


@pytest.mark.parametrize("k", [4])
def test_microbatches_match_the_whole_batch(k):
    ref_accs, ref_updates, ref_w, ref_scores = _run(1)
    accs, updates, w, scores = _run(k)
    assert len(accs) == len(ref_accs) == 3 and all(len(a) == 2 for a in accs)  # two sparse layers
    for a, b in zip(accs, ref_accs):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    for (f, layers), (_, ref_layers) in zip(scores, ref_scores):
        assert_selection_margin(ref_layers, [(w, g) for w, _, g in layers], f)
    assert_same_updates(updates, ref_updates)
    for x, y in zip(w, ref_w):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_window_spans_all_backward_passes_of_its_steps(monkeypatch):
    """Outside the window no accumulator exists; in it, each of the n steps adds all k micro-batches."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, **CFG)
    hook = next(h for h, m in zip(pruner.backward_hook_objects, pruner.backward_masks) if m is not None)
    calls = []
    real = pruner._ops.mask_grad

    def spy(grad, mask, acc, n):
        if mask is pruner.backward_masks[hook.layer]:
            calls.append(acc is not None)
        return real(grad, mask, acc, n)

    monkeypatch.setattr(pruner._ops, "mask_grad", spy)  # the backend object is shared: monkeypatch restores it
    for x, y in batches(CFG["delta"], seed=2, batch=BATCH):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(3), y.chunk(3)):
            F.cross_entropy(model(xs), ys).backward()
        if pruner.step < CFG["delta"] - CFG["grad_accumulation_n"]:
            assert hook.dense_grad is None
        else:
            assert hook.dense_grad is not None
        if pruner():
            opt.step()
    # steps 0, 1 outside the window; steps 2, 3 (the n=2 before the update at step 4) accumulate all 3 passes
    assert calls == [False] * 6 + [True] * 6
    assert pruner.rigl_steps == 1 and hook.dense_grad is None
