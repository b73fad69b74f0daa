"""SPEC §3 invariants after every call of a real training loop, and the schedule of SPEC §1/§4."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from rigl_fast import RigLScheduler
from rigl_fast.scheduler import ZERO_PRESERVING_OPTIMIZERS
from helpers import MLP, SmallResNet, batches, train

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True, weight_decay=1e-4),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-4),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),  # not zero-preserving-listed: keeps the after-step pass
}


def state_like(opt, w):
    return {k: v for k, v in opt.state.get(w, {}).items() if torch.is_tensor(v) and v.shape == w.shape}


def check_invariants(pruner, opt, where, counts):
    for i, (w, m) in enumerate(zip(pruner.W, pruner.backward_masks)):
        if m is None:
            continue
        assert int(m.sum()) == counts[i], "active count changed"
        if where == "after_backward":
            assert w.grad is not None and torch.all(w.grad[~m] == 0), "grad not masked after backward"
        else:
            assert torch.all(w[~m] == 0), f"weight not zero off mask ({where})"
            for k, v in state_like(opt, w).items():
                assert torch.all(v[~m] == 0), f"optimizer state {k!r} not zero off mask ({where})"


@pytest.mark.parametrize("model_name", ["resnet", "mlp"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_invariants_every_step(model_name, opt_name):
    torch.manual_seed(0)
    model = SmallResNet() if model_name == "resnet" else MLP()
    opt = OPTIMIZERS[opt_name](model.parameters())
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=30, delta=4, grad_accumulation_n=2,
                           ignore_linear_layers=False, sparsity_distribution="erk" if model_name == "mlp" else "uniform")
    counts = [None if m is None else int(m.sum()) for m in pruner.backward_masks]
    for i, (m, w, s) in enumerate(zip(pruner.backward_masks, pruner.W, pruner.S)):
        if m is not None:
            assert counts[i] == w.numel() - int(s * w.numel())  # exact initial count
    masks_before = {}

    def on_step(where):
        if where == "after_backward":
            masks_before.update({i: (m.clone(), pruner.W[i].detach().clone())
                                 for i, m in enumerate(pruner.backward_masks) if m is not None})
        check_invariants(pruner, opt, where, counts)
        if where == "after_update":  # newly grown positions start at zero, and so do their states
            for i, (old, w_old) in masks_before.items():
                new = pruner.backward_masks[i]
                grown = new & ~old
                w = pruner.W[i]
                assert torch.all(w[grown] == 0)
                for v in state_like(opt, w).values():
                    assert torch.all(v[grown] == 0)
                kept = new & old
                assert torch.equal(w[kept], w_old[kept])  # an update does not move kept weights

    shape = (1, 8, 8)
    train(model, opt, pruner, batches(24, seed=1, shape=shape), on_step=on_step)
    assert pruner.rigl_steps == 6


def test_masks_actually_move():
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=100, delta=5)
    init = [None if m is None else m.clone() for m in pruner.backward_masks]
    train(model, opt, pruner, batches(10, seed=2))
    changed = [not torch.equal(m, i) for m, i in zip(pruner.backward_masks, init) if m is not None]
    assert all(changed)


@pytest.mark.parametrize("opt_name", [n for n in OPTIMIZERS if n != "nadam"])
def test_zero_preserving_lever_changes_nothing(opt_name):
    """after_step='trusted' skips the after-step pass for these optimizers: results equal the pass bit for bit."""
    results = []
    for mode in ("trusted", "always"):
        torch.manual_seed(0)
        model = SmallResNet()
        opt = OPTIMIZERS[opt_name](model.parameters())
        pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=20, delta=3, after_step=mode)
        assert pruner._skip_after_step == (mode == "trusted")
        train(model, opt, pruner, batches(12, seed=3))
        results.append([p.detach().clone() for p in model.parameters()]
                       + [m.clone() for m in pruner.backward_masks if m is not None])
    assert type(OPTIMIZERS[opt_name]([nn.Parameter(torch.zeros(1))])) in ZERO_PRESERVING_OPTIMIZERS
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_return_pattern_and_schedule():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    delta, T_end = 7, 40
    pruner = RigLScheduler(model, opt, dense_allocation=0.5, T_end=T_end, delta=delta, ignore_linear_layers=False)
    returns = train(model, opt, pruner, batches(60, seed=0, shape=(64,)))
    expected = [not (t % delta == 0 and t < T_end) for t in range(1, 61)]
    assert returns == expected
    assert pruner.step == 60 and pruner.rigl_steps == sum(not r for r in expected) == 5


def test_static_topo_never_updates():
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=None, delta=2, static_topo=True)
    init = [m.clone() for m in pruner.backward_masks if m is not None]
    returns = train(model, opt, pruner, batches(8))
    assert all(returns) and pruner.rigl_steps == 0
    assert all(h.dense_grad is None for h in pruner.backward_hook_objects)
    for a, b in zip(init, [m for m in pruner.backward_masks if m is not None]):
        assert torch.equal(a, b)


# alpha / 2 * (1 + cos(pi t / T_end)) for alpha = 0.4, T_end = 60, at the t where the cosine is known exactly
DROP_FRACTION_BY_HAND = {10: 0.2 * (1 + 3 ** 0.5 / 2), 20: 0.3, 30: 0.2, 40: 0.1, 50: 0.2 * (1 - 3 ** 0.5 / 2)}


def test_drop_fraction_schedule_and_counts():
    from rigl_torch_import import import_rigl_torch
    torch.manual_seed(0)
    model = MLP((64, 200, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    delta, T_end, alpha = 5, 60, 0.4
    pruner = RigLScheduler(model, opt, dense_allocation=0.25, T_end=T_end, delta=delta, alpha=alpha,
                           ignore_linear_layers=False)
    other = MLP((64, 200, 10))  # rigl-torch's scheduler, on a model of its own, gives the expected fractions
    theirs = import_rigl_torch()(other, torch.optim.SGD(other.parameters(), lr=0.01), dense_allocation=0.25,
                                 T_end=T_end, delta=delta, alpha=alpha, ignore_linear_layers=False)
    seen, weights, checked, ratios = [], [], [], []

    def on_step(where):
        if where == "after_backward":
            seen.append([None if m is None else m.clone() for m in pruner.backward_masks])
            weights.append([w.detach().clone() for w in pruner.W])  # an update step skips the optimizer step
        elif where == "after_update":
            t = theirs.step = pruner.step
            f = theirs.cosine_annealing()
            assert pruner.cosine_annealing() == f
            if t in DROP_FRACTION_BY_HAND:
                assert f == pytest.approx(DROP_FRACTION_BY_HAND[t], rel=1e-12)
                checked.append(t)
            for old, new, w in zip(seen[-1], pruner.backward_masks, weights[-1]):
                if new is None:
                    continue
                n_drop = int(int(old.sum()) * f)
                moved = int((old & ~new).sum())
                assert moved <= n_drop  # at most n_drop leave (a dropped one may be regrown)
                assert int((new & ~old).sum()) == moved and int(new.sum()) == int(old.sum())
                # the kept ones are the n_active - n_drop largest |w| of the active: every active weight above the
                # (n_active - n_drop)-th largest stays; those below it all left unless regrown
                a = w.abs()[old]
                v = a.sort(descending=True).values[int(old.sum()) - n_drop - 1]
                assert bool(new[old & (w.abs() > v)].all())
                below = old & (w.abs() < v)
                ratios.append((moved, int(below.sum()), n_drop))
                assert int(below.sum()) >= n_drop - int((a == v).sum())
                assert bool((w.abs()[old & ~new] <= v).all())  # what left was at or below it

    train(model, opt, pruner, batches(T_end, seed=4, shape=(64,)), on_step=on_step)
    assert pruner.rigl_steps == 11 and checked == sorted(DROP_FRACTION_BY_HAND)
    # the updates did move weights: most of the dropped ones went (a few may be regrown at once)
    assert sum(m for m, _, _ in ratios) >= 0.5 * sum(n for _, _, n in ratios) > 0


def test_grow_score_is_mean_of_last_n_dense_grads():
    torch.manual_seed(0)
    model = MLP((64, 40, 10))
    recorded = {}
    # registered before the scheduler's hook, so it sees the dense gradient
    for i, layer in enumerate(model.layers):
        layer.weight.register_hook(lambda g, i=i: recorded.setdefault(i, []).append(g.clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    n, delta = 3, 6
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=100, delta=delta, grad_accumulation_n=n,
                           ignore_linear_layers=False)
    data = list(batches(delta, seed=5, shape=(64,)))
    for step, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        in_window = delta - (step - 1) % delta <= n
        for i, hook in enumerate(pruner.backward_hook_objects):
            if pruner.backward_masks[i] is None:  # the first layer stays dense under 'uniform'
                assert hook.dense_grad is None
                continue
            if not in_window:
                assert hook.dense_grad is None  # no persistent dense copy outside the window
                continue
            expect = torch.zeros_like(recorded[i][0])
            for g in recorded[i][delta - n:step]:  # the backward passes of steps delta-n+1 .. step
                expect += g / n
            assert torch.equal(hook.dense_grad, expect)
        if step == delta:
            # the update consumes the window: what it ranked by is exactly this accumulator
            accs = [None if h.dense_grad is None else h.dense_grad.clone() for h in pruner.backward_hook_objects]
            old = [None if m is None else m.clone() for m in pruner.backward_masks]
            weights = [w.detach().clone() for w in pruner.W]
        if pruner():
            opt.step()
    from test_reference_ops import oracle_new_mask
    f = pruner.cosine_annealing()
    for i, (m0, w0, a) in enumerate(zip(old, weights, accs)):
        if m0 is None:
            continue
        n_drop = int(int(m0.sum()) * f)
        expect = oracle_new_mask(w0, m0, a, int(m0.sum()) - n_drop, n_drop)
        assert torch.equal(pruner.backward_masks[i], expect)
    assert all(h.dense_grad is None for h in pruner.backward_hook_objects)  # freed after the update


def test_ignore_linear_layers_and_first_layer_dense():
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)
    assert pruner.S[0] == 0 and pruner.backward_masks[0] is None  # first layer dense under uniform
    assert pruner._linear_layers_mask[-1] == 1 and pruner.S[-1] == 0 and pruner.backward_masks[-1] is None
    assert all(s == pytest.approx(0.9) for s in pruner.S[1:-1])
    pruner.remove()
    pruner = RigLScheduler(model, opt, dense_allocation=0.1, T_end=10, ignore_linear_layers=False)
    assert pruner.S[-1] == pytest.approx(0.9) and pruner.backward_masks[-1] is not None


def test_norms_embeddings_biases_are_never_sparse():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.ln = nn.LayerNorm(8)
            self.bn = nn.BatchNorm1d(8)
            self.fc1 = nn.Linear(8, 16)
            self.conv = nn.Conv1d(1, 4, 3)
            self.fc2 = nn.Linear(16, 4)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.5, T_end=10, ignore_linear_layers=False)
    assert pruner.names == ["fc1.weight", "conv.weight", "fc2.weight"]
    assert [w is p for w, p in zip(pruner.W, [model.fc1.weight, model.conv.weight, model.fc2.weight])] == [True] * 3
    assert "total_CONV_nonzero_params" in str(pruner)


def test_str_without_conv_layers_does_not_crash():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.5, T_end=10, ignore_linear_layers=False)
    s = str(pruner)
    assert "total_CONV_nonzero_params=0/0 (0.00%)" in s and "layers=3" in s


def test_nonfinite_scores_skip_the_update():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=100, delta=3, ignore_linear_layers=False)
    data = list(batches(3, seed=6, shape=(64,)))
    train(model, opt, pruner, data[:2])
    masks = [None if m is None else m.clone() for m in pruner.backward_masks]
    opt.zero_grad()
    F.cross_entropy(model(data[2][0]), data[2][1]).backward()
    pruner.backward_hook_objects[1].dense_grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert pruner() is False
    assert pruner.skipped_updates == 1 and pruner.rigl_steps == 1
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(masks, pruner.backward_masks))
    assert pruner.state_dict()["rigl_fast_skipped_updates"] == 1


def test_no_accumulated_gradient_skips_the_update():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=100, delta=2, ignore_linear_layers=False)
    masks = [None if m is None else m.clone() for m in pruner.backward_masks]
    assert pruner() is True
    with pytest.warns(RuntimeWarning, match="no gradient"):
        assert pruner() is False
    assert pruner.skipped_updates == 1
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(masks, pruner.backward_masks))


def test_set_random_growth_keeps_invariants():
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=100, delta=3, grow_mode="random")
    counts = [None if m is None else int(m.sum()) for m in pruner.backward_masks]
    init = [None if m is None else m.clone() for m in pruner.backward_masks]
    train(model, opt, pruner, batches(9, seed=7), on_step=lambda w: check_invariants(pruner, opt, w, counts))
    assert pruner.rigl_steps == 3
    assert all(not torch.equal(a, b) for a, b in zip(init, pruner.backward_masks) if a is not None)
    assert all(h.dense_grad is None for h in pruner.backward_hook_objects)  # SET needs no dense gradient


def test_optimizer_step_with_closure_and_lr_scheduler():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched_before = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    step_attr = vars(opt).get("step")  # the LR scheduler's own wrapper, if this torch version adds one
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=100, delta=50, ignore_linear_layers=False,
                           after_step="always")
    for x, y in batches(4, seed=8, shape=(64,)):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        closure()
        if pruner():
            opt.step(closure)
        sched_before.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert vars(opt).get("step") is step_attr  # rigl_fast does not monkey-patch optimizer.step
    for w, m in zip(pruner.W, pruner.backward_masks):
        assert m is None or torch.all(w[~m] == 0)
    # the other order: an LR scheduler created after the RigLScheduler (rigl-torch's replaced optimizer.step
    # breaks it: docs/quality.md) steps and keeps the masks
    pruner.remove()
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=100, delta=3, ignore_linear_layers=False)
    sched_after = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    stepped = 0
    for x, y in batches(4, seed=9, shape=(64,)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if pruner():
            opt.step()
            stepped += 1
        sched_after.step()
    assert stepped == 3 and pruner.rigl_steps == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.025 / 4)
    for w, m in zip(pruner.W, pruner.backward_masks):
        assert m is None or torch.all(w[~m] == 0)
