"""in_step=True: the optimizer's step drives the schedule (for frameworks that call optimizer.step() every
iteration). Its semantics are exactly those of the two-line loop with the optimizer step moved before
pruner(): backward, optimizer.step(), then the update when one is due."""
import pytest
import torch
import torch.nn.functional as F

from helpers import SmallResNet, batches
from rigl_fast import RigLScheduler

CFG = dict(dense_allocation=0.3, T_end=14, delta=4, alpha=0.4)


def _run(in_step, data, grad_accumulation_n=1, state=None, opt_name="adam"):
    torch.manual_seed(0)
    model = SmallResNet()
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    pruner = RigLScheduler(model, opt, **CFG, grad_accumulation_n=grad_accumulation_n, in_step=in_step,
                           state_dict=None if state is None else state["pruner"])
    log = []
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if not in_step:
            pruner()
        log.append(([m.clone() for m in pruner.backward_masks if m is not None],
                    [p.detach().clone() for p in model.parameters()]))
    return model, opt, pruner, log


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_in_step_equals_two_line_loop_with_the_step_first(n, opt_name):
    data = list(batches(16))
    *_, pruner, log = _run(True, data, n, opt_name=opt_name)
    *_, ref_pruner, ref_log = _run(False, data, n, opt_name=opt_name)
    assert pruner.step == 16 and pruner.rigl_steps == ref_pruner.rigl_steps == 3
    for (masks, params), (ref_masks, ref_params) in zip(log, ref_log):
        assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks))
        assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert not torch.equal(log[2][0][0], log[4][0][0]), "the update at step 4 moved nothing"
    opt = pruner.optimizer
    for w, m in zip(pruner.W, pruner.backward_masks):
        if m is not None:
            assert bool((w[~m] == 0).all()) and bool((w.grad[~m] == 0).all())
            assert all(bool((v[~m] == 0).all()) for v in opt.state[w].values() if v.shape == w.shape)


def test_in_step_resumes_inside_a_window_bit_for_bit():
    data = list(batches(16))
    *_, full_log = _run(True, data, 2)
    model, opt, pruner, _ = _run(True, data[:7], 2)  # step 7: the window's first backward pass is in
    assert any(h.dense_grad is not None for h in pruner.backward_hook_objects)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}
    pruner.remove()
    *_, resumed, log = _run(True, data[7:], 2, state=state)
    assert resumed.step == 16
    *_, loaded, _ = _run(True, [], 2, state=state)  # stats() carry on across a checkpoint
    assert loaded.stats() == pruner.stats() and loaded.stats()["regrown_fraction"] > 0
    for (masks, params), (ref_masks, ref_params) in zip(log, full_log[7:]):
        assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks))
        assert all(torch.equal(a, b) for a, b in zip(params, ref_params))


def test_pruner_call_is_refused_in_step_mode_and_stats_are_plain_numbers():
    *_, pruner, _ = _run(True, list(batches(6)))
    with pytest.raises(RuntimeError, match="in_step=True"):
        pruner()
    st = pruner.stats()
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in st.values())
    assert st["updates"] == 1 and st["skipped_updates"] == 0 and st["step"] == 6
    # drop fraction at step 4: alpha / 2 * (1 + cos(pi * 4 / 14))
    import math
    frac = 0.4 / 2 * (1 + math.cos(math.pi * 4 / 14))
    sparse = [i for i, m in enumerate(pruner.backward_masks) if m is not None]
    for i in sparse:
        n_active = int(pruner.backward_masks[i].sum())
        assert st[f"regrown/{pruner.names[i]}"] == int(n_active * frac) / n_active
        assert st[f"density/{pruner.names[i]}"] == n_active / pruner.N[i]
    assert st["density/conv1.weight"] == 1.0 and 0 < st["density"] < 1
    with pytest.raises(TypeError, match="in_step must be a bool"):
        RigLScheduler(SmallResNet(), torch.optim.SGD(SmallResNet().parameters(), lr=0.1), **CFG, in_step="yes")
