"""Issue 21 item 10: what a new user is told. A model much less sparse than dense_allocation asks gets one
line at construction naming the dense layers' share; a two-line loop that never calls pruner() gets one
warning instead of training with the schedule stuck at step 0; one that steps another optimizer than the
scheduler's gets one instead of weights drifting off the masks."""
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

from rigl_fast import RigLScheduler
from helpers import MLP, SmallResNet, batches


def _density_notes(caplog, model, **kw):
    """The density notes logged while building a scheduler (a log line, not a warning: nothing is raised even
    where warnings are errors)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rigl_fast"), warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = RigLScheduler(model, opt, T_end=100, delta=10, **kw)
    pruner.remove()
    return pruner, [r.getMessage() for r in caplog.records if "dense overall" in r.getMessage()]


def test_a_model_far_denser_than_asked_is_told_once_with_the_dense_share(caplog):
    torch.manual_seed(0)
    # rigl-torch's first-layer rule keeps the MLP's largest layer (64x48 of 4928 weights) dense
    pruner, notes = _density_notes(caplog, MLP(), dense_allocation=0.1, ignore_linear_layers=False)
    assert len(notes) == 1
    overall = pruner.stats()["density"]
    assert overall > 1.5 * 0.1
    assert f"{100 * overall:.1f}% dense overall, not dense_allocation=0.1" in notes[0]
    assert "hold 62.3% of the weights (first layer: layers.0.weight, 62.3%)" in notes[0]
    assert "\n" not in notes[0]
    # the same budget spread by ERK lands near dense_allocation: nothing to say
    pruner, notes = _density_notes(caplog, MLP(), dense_allocation=0.1, ignore_linear_layers=False,
                                   sparsity_distribution="erk")
    assert notes == [] and pruner.stats()["density"] < 1.5 * 0.1


def test_density_note_names_every_reason_by_share(caplog):
    torch.manual_seed(0)
    pruner, notes = _density_notes(caplog, SmallResNet(), dense_allocation=0.05)  # first conv and the Linear head dense
    overall = pruner.stats()["density"]
    assert overall > 1.5 * 0.05 and len(notes) == 1
    assert "ignore_linear_layers: fc.weight" in notes[0] and "first layer: conv1.weight" in notes[0]


def test_two_optimizer_steps_without_pruner_warn_once():
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=100, delta=10)
    data = list(batches(6, seed=2))

    def iteration(x, y, call_pruner):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if not call_pruner or pruner():
            opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rigl-torch loop says nothing
        for x, y in data[:3]:
            iteration(x, y, True)
    # the optimizer stepped after the last pruner() call; stepping again without one is the pattern
    with pytest.warns(UserWarning, match=r"stepped twice without a pruner\(\) call between.*stuck at step 3") as rec:
        iteration(*data[3], False)
    assert rec[0].filename == __file__  # it points at the user's loop, not into torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        iteration(*data[4], False)
        iteration(*data[5], False)
    assert pruner.step == 3


def test_in_step_mode_has_no_pruner_call_to_miss():
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=100, delta=10, in_step=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(3, seed=2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert pruner.step == 3


def test_a_loop_stepping_another_optimizer_is_told_once():
    """A two-line loop that steps a new optimizer instead of the one the scheduler hooks: the after-step pass and
    the updates' resets of optimizer state never see its steps, so its momentum moves dropped weights off zero.
    One warning after MISSED_STEPS pruner() calls that said "step" with no step of the hooked optimizer; skipped
    steps (a GradScaler overflow) and update steps (pruner() False) below that say nothing; the remedy the warning
    names keeps the masks and the schedule and zeroes the drift at the next step."""
    from rigl_fast.config import MISSED_STEPS
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=1000, delta=5, ignore_linear_layers=False)
    data = batches(200, seed=3)

    def run(n, optimizer, step_every=1):
        for i in range(n):
            x, y = next(data)
            F.cross_entropy(model(x), y).backward()
            if pruner() and i % step_every == 0:
                optimizer.step()
            optimizer.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(12, opt)
        run(MISSED_STEPS - 1, opt, step_every=MISSED_STEPS)  # skipped steps, updates among them: under the limit
        run(5, opt)
    new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match=r"last stepped.*drift off zero") as rec:
        run(2 * MISSED_STEPS, new)  # the update steps among them do not count
    assert len([r for r in rec if "last stepped" in str(r.message)]) == 1 and rec[0].filename == __file__
    off = [int((w.detach()[~m] != 0).sum()) for w, m in zip(pruner.W, pruner.backward_masks) if m is not None]
    assert sum(off) > 0  # what the warning is about
    sd, step = pruner.state_dict(), pruner.step
    masks = [None if m is None else m.clone() for m in pruner.backward_masks]
    pruner.remove()
    pruner = RigLScheduler(model, new, dense_allocation=0.2, T_end=1000, delta=5, ignore_linear_layers=False,
                           state_dict=sd)
    assert pruner.step == step and all(a is None or torch.equal(a, b) for a, b in zip(masks, pruner.backward_masks))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(MISSED_STEPS + 2, new)
    assert all(int((w.detach()[~m] != 0).sum()) == 0 for w, m in zip(pruner.W, pruner.backward_masks) if m is not None)
