"""torch.compile: a compiled model trains under the scheduler (CPU, inductor).

The scheduler's hooks sit on the parameters, outside the compiled region, so dynamo traces the model alone:
no graph breaks and no recompilation when the masks change. Inductor hands the hooks non-contiguous
(channels-last) conv weight gradients, which rigl-torch's hook cannot take. The compiled run must also give
the eager run's masks: their arithmetic differs only by rounding, and the test asserts that the rounding is
far below the gaps between the scores that decide each mask (tests/helpers.selection_gap).
One compile for the whole file: it takes 10-20 s on CPU.
"""
import pytest
import torch
import torch.nn.functional as F

import rigl_fast.scheduler as sched
from helpers import SmallResNet, assert_same_updates, assert_selection_margin, batches, update_scores
from rigl_fast import RigLScheduler

STEPS = 14
CFG = dict(dense_allocation=0.3, T_end=12, delta=4, grad_accumulation_n=2, alpha=0.5, backend="reference")
# Compiled and eager scores differ by rounding that compounds over the steps: in float32 the smallest gap at a
# selection boundary was only 5x that difference here (equal masks by luck); in float64 it is about 3e9x.
DTYPE = torch.float64
MARGIN = 1000  # the least ratio, gap / score difference, at which equal masks are asserted


def _due(pruner):
    """Whether the coming pruner() call runs a topology update (SPEC §1)."""
    t = pruner.step + 1
    return t % pruner.delta_T == 0 and t < pruner.T_end


def _train(compiled):
    torch.manual_seed(0)
    model = SmallResNet().to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = RigLScheduler(model, opt, **CFG)
    run = torch.compile(model) if compiled else model
    updates, scores = [], []  # scores: per update, per sparse layer (weight, mask, grow score) before it
    for x, y in batches(STEPS, seed=4):
        opt.zero_grad()
        F.cross_entropy(run(x.to(DTYPE)), y).backward()
        for w, m in zip(pruner.W, pruner.backward_masks):
            if m is not None:
                assert bool((w.grad[~m] == 0).all()), "gradient nonzero off the mask"
        if _due(pruner):
            scores.append(update_scores(pruner))
        if pruner():
            opt.step()
        else:
            updates.append([m.clone() for m in pruner.backward_masks if m is not None])
            scores[-1] = (pruner.cosine_annealing(), scores[-1])
        for w, m in zip(pruner.W, pruner.backward_masks):
            if m is not None:
                assert bool((w[~m] == 0).all()), "weight nonzero off the mask"
    assert pruner.skipped_updates == 0 and len(scores) == len(updates)
    return updates, [w.detach().clone() for w in pruner.W], scores


@pytest.fixture(scope="module")
def compiled_run():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    layouts = []
    real = sched.IndexMaskHook.__call__

    def spy(self, grad):
        layouts.append(grad.is_contiguous())
        return real(self, grad)

    mp = pytest.MonkeyPatch()
    mp.setattr(sched.IndexMaskHook, "__call__", spy)
    try:
        updates, weights, scores = _train(compiled=True)
    finally:
        mp.undo()
    stats = dict(graph_breaks=sum(counters["graph_break"].values()), unique_graphs=counters["stats"]["unique_graphs"],
                 layouts=layouts)
    torch._dynamo.reset()
    return updates, weights, scores, stats


def test_no_graph_break_no_recompile(compiled_run):
    *_, stats = compiled_run
    assert stats["graph_breaks"] == 0
    assert stats["unique_graphs"] == 1, "the model was recompiled (e.g. after a topology update)"


def test_hooks_take_non_contiguous_gradients(compiled_run):
    *_, stats = compiled_run
    n_weights = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in SmallResNet().modules())
    assert len(stats["layouts"]) == STEPS * n_weights  # every candidate weight's hook ran on every step
    assert not all(stats["layouts"]), "inductor produced only contiguous gradients: the case is not exercised"


def test_compiled_matches_eager(compiled_run):
    updates, weights, scores, _ = compiled_run
    ref_updates, ref_weights, ref_scores = _train(compiled=False)
    for (f, layers), (_, ref_layers) in zip(scores, ref_scores):
        assert_selection_margin(ref_layers, [(w, g) for w, _, g in layers], f, MARGIN)
    assert_same_updates(updates, ref_updates)
    # weights only close: inductor fuses and reorders float reductions
    for x, y in zip(weights, ref_weights):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
