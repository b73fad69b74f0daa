"""Per-layer sparsity: ERK/ER against hand-computed cases and the global budget."""
import pytest
import torch
from torch import nn

from rigl_fast import RigLScheduler
from rigl_fast.layers import erdos_renyi_sparsities, sparsities


def test_erk_hand_computed_two_layers():
    # A: Linear 10->20, weight (20, 10): raw = 30/200 = 0.15. B: Conv2d 3->4 k3, weight (4, 3, 3, 3): raw = 13/108.
    # eps = 0.5 * (200 + 108) / (0.15 * 200 + 13/108 * 108) = 154 / 43
    S = erdos_renyi_sparsities([(20, 10), (4, 3, 3, 3)], [False, False], 0.5)
    eps = 154 / 43
    assert S[0] == pytest.approx(1 - eps * 0.15, abs=1e-12)
    assert S[1] == pytest.approx(1 - eps * 13 / 108, abs=1e-12)


def test_erk_makes_overfull_layer_dense_and_resolves():
    # C: (2, 2), raw = 4/4 = 1, the largest: with the first eps its density would exceed 1, so it becomes
    # dense and its 4 * (1 - 0.5) extra nonzeros come out of the others' budget.
    shapes = [(2, 2), (20, 10), (4, 3, 3, 3)]
    S = erdos_renyi_sparsities(shapes, [False] * 3, 0.5)
    assert S[0] == 0
    eps = (0.5 * (200 + 108) - 0.5 * 4) / 43
    assert S[1] == pytest.approx(1 - eps * 0.15, abs=1e-12)
    assert S[2] == pytest.approx(1 - eps * 13 / 108, abs=1e-12)


@pytest.mark.parametrize("dist", ["erk", "er"])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.8])
def test_erdos_renyi_global_budget(dist, density):
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (64, 64, 1, 1), (10, 64), (512, 256)]
    is_linear = [False] * 5 + [True]
    n = [torch.Size(s).numel() for s in shapes]
    # an ignored linear layer stays dense and out of the budget: the other five meet it alone
    S = sparsities(dist, shapes, is_linear, density, ignore_linear_layers=True)
    assert S[5] == 0
    nonzero = sum(k * (1 - s) for k, s in zip(n[:5], S[:5]))
    assert nonzero == pytest.approx(density * sum(n[:5]), rel=1e-9)
    assert all(0 <= s < 1 for s in S[:5])
    # not ignored, the same layer joins the budget: all six meet it together, the large one sparse too
    S = sparsities(dist, shapes, is_linear, density, ignore_linear_layers=False)
    assert S[5] > 0
    nonzero = sum(k * (1 - s) for k, s in zip(n, S))
    assert nonzero == pytest.approx(density * sum(n), rel=1e-9)


def test_er_uses_channel_dims_only():
    S = erdos_renyi_sparsities([(8, 4, 3, 3), (8, 4, 5, 5)], [False, False], 0.3, kernel=False)
    # same (c_out + c_in)/(c_out c_in) for both: the same density
    assert S[0] == pytest.approx(S[1])
    # hand-computed: A (20, 10): raw = 30/200 = 0.15; B (4, 3, 3, 3): raw = (4 + 3)/(4 * 3) = 7/12 (kernel dims
    # not counted). eps = 0.5 * (200 + 108) / (0.15 * 200 + 7/12 * 108) = 154 / 93
    S = erdos_renyi_sparsities([(20, 10), (4, 3, 3, 3)], [False, False], 0.5, kernel=False)
    eps = 154 / 93
    assert S[0] == pytest.approx(1 - eps * 0.15, abs=1e-12)
    assert S[1] == pytest.approx(1 - eps * 7 / 12, abs=1e-12)


def test_erk_power_scale_zero_is_uniform():
    S = erdos_renyi_sparsities([(8, 4, 3, 3), (30, 40)], [False, False], 0.2, power_scale=0.0)
    assert S[0] == pytest.approx(0.8) and S[1] == pytest.approx(0.8)


def test_scheduler_erk_first_layer_not_forced_dense_and_counts_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=10, sparsity_distribution="erk",
                           ignore_linear_layers=False)
    assert all(s > 0 for s in pruner.S[:2])
    for m, s, n in zip(pruner.backward_masks, pruner.S, pruner.N):
        if m is not None:
            assert int(m.sum()) == n - int(s * n)
    sd = pruner.state_dict()
    assert sd["hyperparams"]["sparsity_distribution"] == "erk"
