"""Legitimate but unusual configurations and failure paths that an outside review (2026-12-08) found handled
wrongly: settings that change nothing without a word, warnings turned into errors (warnings filters, pytest -W
error) that left a half-built scheduler or inconsistent counts, load_state_dict skipping a check the constructor
makes, and dense layers whose reason summary() got wrong. Each test fails on the code before the fix."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_fast import RigLScheduler

KW = dict(dense_allocation=0.3, T_end=40, delta=3, ignore_linear_layers=False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.c2 = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def _built(model, **kw):
    """The scheduler and the warnings its construction gave."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        p = RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)
    return p, [str(w.message) for w in got if str(w.message).startswith("rigl_fast")]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("kw, said, acting", [
    (dict(alpha=0), "alpha=0 drops (and grows) nothing", dict(alpha=0.3)),
    (dict(grow_mode="random", grad_accumulation_n=2), "grad_accumulation_n=2 changes nothing with grow_mode='random'",
     dict(grad_accumulation_n=2)),
    (dict(static_topo=True, grad_accumulation_n=2), "grad_accumulation_n=2 changes nothing with static_topo=True",
     dict(grad_accumulation_n=2)),
    (dict(static_topo=True, grow_mode="random"), "grow_mode='random' changes nothing with static_topo=True",
     dict(grow_mode="random")),
    (dict(erk_power_scale=0.5), "erk_power_scale=0.5 changes nothing with sparsity_distribution='uniform'",
     dict(erk_power_scale=0.5, sparsity_distribution="erk")),
    (dict(erk_power_scale=0.5, sparsity_distribution="er"),
     "erk_power_scale=0.5 changes nothing with sparsity_distribution='er'",
     dict(erk_power_scale=0.5, sparsity_distribution="erk")),
])
def test_a_setting_that_changes_nothing_is_named(kw, said, acting):
    p, got = _built(_mlp(), **{**KW, **kw})
    assert len(got) == 1 and said in got[0], got
    p.remove()
    p, got = _built(_mlp(), **{**KW, **acting})  # the setting where it acts: nothing said
    assert got == [], got


def test_alpha_zero_really_changes_no_mask():
    """What the alpha=0 warning says: updates run (and skip the optimizer step) but no mask changes."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = RigLScheduler(model, opt, **{**KW, "alpha": 0})
    before = [m.clone() for m in p.backward_masks if m is not None]
    skipped = 0
    for x, y in _batches(9):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if p():
            opt.step()
        else:
            skipped += 1
    assert skipped == 3 and p.rigl_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(before, (m for m in p.backward_masks if m is not None)))


def test_compute_sparse_on_convolutions_only_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    p, got = _built(model, **{**KW, "compute": "sparse"})
    assert [m for m in got if "compute='sparse' changes nothing" in m and "convolution" in m], got
    p.remove()
    p, got = _built(_mlp(), **{**KW, "compute": "sparse"})  # Linear layers: sparse-computed, nothing said
    assert got == [], got


def test_a_warning_turned_error_at_construction_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [w.detach().clone() for w in model.parameters()]
    rng = torch.random.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="T_end=50 <= delta=100"):
            RigLScheduler(model, opt, dense_allocation=0.3, T_end=50, delta=100)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(not w._backward_hooks for w in model.parameters() if w._backward_hooks is not None)
    assert not opt._optimizer_step_post_hooks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = RigLScheduler(model, opt, dense_allocation=0.3, T_end=500, delta=100)  # the corrected retry
    assert p.step == 0


def test_a_skip_warning_turned_error_keeps_the_counts_consistent():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = RigLScheduler(model, opt, dense_allocation=0.3, T_end=12, delta=3, ignore_linear_layers=False)
    x, y = _batches(1)[0]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert p()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="skipped"):
            p()  # step 3, an update with no backward in its window
    assert (p.step, p.rigl_steps, p.skipped_updates, p.stats()["updates"]) == (3, 1, 1, 0)
    p.load_state_dict(p.state_dict())  # its own state dict loads


def test_load_state_dict_refuses_a_sparse_layer_the_optimizer_does_not_hold():
    torch.manual_seed(0)
    m0 = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = RigLScheduler(m0, torch.optim.SGD(m0.parameters(), lr=0.1), sparsity_distribution="erk",
                           **KW).state_dict()
    assert sd["S"][0] > 0  # ERK makes c1 sparse; uniform keeps it (the first layer) dense
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(list(model.c2.parameters()) + list(model.fc.parameters()), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer does not hold the sparse weights \['c1.weight'\]"):
        RigLScheduler(model, opt, state_dict=sd)
    p = RigLScheduler(model, opt, **KW)
    assert p.backward_masks[0] is None
    before = ([w.detach().clone() for w in model.parameters()], [None if m is None else m.clone()
                                                                  for m in p.backward_masks], p.S[:])
    with pytest.raises(ValueError, match=r"optimizer does not hold the sparse weights \['c1.weight'\]"):
        p.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    assert p.backward_masks[0] is None and torch.equal(before[1][1], p.backward_masks[1]) and p.S == before[2]


def test_a_layer_its_structure_keeps_dense_says_so_after_a_resume():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = RigLScheduler(model, opt, dense_allocation=2 / 3, T_end=12, delta=3, ignore_linear_layers=False,
                          structure="2:3")
    line = "dense: structure='2:3': fan-in 128 is not divisible by M=3"
    assert line in p.summary()
    sd = p.state_dict()
    p.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), state_dict=sd)
    assert line in q.summary()
    q.load_state_dict(sd)
    assert line in q.summary()


def test_a_fan_in_count_rounded_to_the_whole_fan_in_is_said():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    p, got = _built(model, dense_allocation=0.97, T_end=12, delta=3, ignore_linear_layers=False, structure="fan_in")
    why = "fan-in 16 at density 0.97 rounds to all 16 weights of each unit"
    assert p.S == [0, 0] and why in p.summary()
    assert [m for m in got if "structure='fan_in' keeps 1 layer(s) dense" in m and why in m], got
    assert [m for m in got if "RigL does nothing: structure='fan_in'" in m], got


def test_a_dense_allocation_that_rounds_every_weight_away_is_refused():
    model = Net()
    before = [w.detach().clone() for w in model.parameters()]
    with pytest.raises(ValueError, match=r"dense_allocation=1e-17 is too small: the sparsity of c2.weight rounds"):
        RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), dense_allocation=1e-17, T_end=10,
                      delta=3, ignore_linear_layers=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the smallest useful allocations still build, and their state dicts load
    p = RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), dense_allocation=1e-6, T_end=10,
                      delta=3, ignore_linear_layers=False)
    p.load_state_dict(p.state_dict())


class _Tied(nn.Module):
    """enc and dec share one weight."""

    def __init__(self):
        super().__init__()
        self.first, self.enc, self.dec, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), \
            nn.Linear(16, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.head(self.dec(torch.relu(self.enc(self.first(x)))))


@pytest.mark.parametrize("kw, dense_line", [
    (dict(exclude=["dec"]), "enc.weight    (16, 16)  100.00%  dense: tied to dec.weight (excluded)"),
    (dict(exclude=["enc"]), "dec.weight    (16, 16)  100.00%  dense: tied to enc.weight (excluded)"),
    (dict(exclude=["dec"], sparsify_tied=True),
     "enc.weight    (16, 16)  100.00%  dense: tied to dec.weight (excluded)"),
    (dict(include=["first", "enc", "head"]), "enc.weight    (16, 16)  100.00%  dense: tied to dec.weight"),
])
def test_a_weight_shared_with_an_excluded_or_unmatched_module_stays_dense(kw, dense_line):
    """It used to go sparse through the other module's slot, with summary() calling it 100% dense."""
    torch.manual_seed(0)
    net = _Tied()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), dense_allocation=0.25, T_end=100,
                          ignore_linear_layers=False, sparsity_distribution="erk", **kw)
    assert "enc.weight" not in p.names and "dec.weight" not in p.names
    assert bool((net.enc.weight != 0).all()) and dense_line in p.summary()
    p.remove()
    # include with sparsify_tied: the unmatched module is a non-candidate, and the flag makes the weight sparse
    if "include" in kw:
        p = RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), dense_allocation=0.25, T_end=100,
                          ignore_linear_layers=False, sparsity_distribution="erk", sparsify_tied=True, **kw)
        assert "enc.weight" in p.names and float((net.dec.weight != 0).float().mean()) < 0.9
