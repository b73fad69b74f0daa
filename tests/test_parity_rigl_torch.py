"""rigl_fast against the real rigl-torch 0.5.2, step for step, on a CNN where both layer rules agree."""
import pytest
import torch
import torch.nn.functional as F

from rigl_fast import RigLScheduler
from helpers import SmallResNet, batches
from rigl_torch_import import import_rigl_torch


def run(cls, kwargs, steps, seed=0, **extra):
    torch.manual_seed(seed)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = cls(model, opt, **kwargs, **extra)
    log = [[None if m is None else m.clone() for m in pruner.backward_masks]]
    for x, y in batches(steps, seed=seed + 100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        r = pruner()
        if r:
            opt.step()
        log.append((r, [None if m is None else m.clone() for m in pruner.backward_masks],
                    [p.detach().clone() for p in model.parameters()]))
    return pruner, log


@pytest.mark.parametrize("kwargs", [
    dict(dense_allocation=0.2, T_end=30, delta=3, alpha=0.3),
    dict(dense_allocation=0.1, T_end=40, delta=4, alpha=0.5, grad_accumulation_n=3, ignore_linear_layers=False),
])
def test_same_masks_and_returns_as_rigl_torch(kwargs):
    RigL = import_rigl_torch()
    steps = kwargs["T_end"] + 2 * kwargs["delta"]  # past T_end: the schedule must stop updating there too
    theirs, log_t = run(RigL, kwargs, steps)
    ours, log_o = run(RigLScheduler, kwargs, steps, backend="reference")
    assert ours.S == theirs.S and ours.N == theirs.N
    assert ours._linear_layers_mask == theirs._linear_layers_mask
    for a, b in zip(log_o[0], log_t[0]):  # same seed -> same initial masks (same RNG draws)
        assert (a is None and b is None) or torch.equal(a, b)
    for step, ((r_o, m_o, p_o), (r_t, m_t, p_t)) in enumerate(zip(log_o[1:], log_t[1:]), start=1):
        assert r_o == r_t, f"pruner() returned differently at step {step}"
        for a, b in zip(m_o, m_t):
            assert (a is None and b is None) or torch.equal(a, b), f"masks differ at step {step}"
        for a, b in zip(p_o, p_t):  # the same float operations in the same order: bit-identical weights
            assert torch.equal(a, b), f"weights differ at step {step}"
    assert ours.rigl_steps == theirs.rigl_steps == (kwargs["T_end"] - 1) // kwargs["delta"]
    # rigl-torch's fields, verbatim, then rigl_fast's per-layer summary
    assert str(ours) == str(theirs) + "\n" + ours.summary()
    assert all(name in ours.summary() for name in ours.names)
