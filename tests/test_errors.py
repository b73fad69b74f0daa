"""SPEC §5: bad input raises a clear error naming the argument, before anything is modified."""
import pytest
import torch
from torch import nn

from rigl_fast import RigLScheduler, ops
from rigl_fast.state import masks as sd_masks
from helpers import MLP, SmallResNet, trained_model_and_adam


def hooks(model, opt):
    """The hooks on every parameter (gradient and post-accumulate ones, the two kinds the scheduler registers)
    and on the optimizer, as new lists of handle ids: a later registration shows up as a difference."""
    per_param = [(list(p._backward_hooks or {}), list(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
                 for p in model.parameters()]
    return per_param, list(opt._optimizer_step_post_hooks)


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    return params, grads, state, hooks(model, opt)


def assert_untouched(model, opt, snap):
    params, grads, state, hooks_before = snap
    for p, p0, g0 in zip(model.parameters(), params, grads):
        assert torch.equal(p, p0)
        assert (p.grad is None and g0 is None) or torch.equal(p.grad, g0)
        assert opt.state[p].keys() == state[id(p)].keys()
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k])
    assert hooks(model, opt) == hooks_before, "a failed construction left a hook registered"


BAD = [
    (dict(dense_allocation=0), ValueError, "dense_allocation"),
    (dict(dense_allocation=1.5), ValueError, "dense_allocation"),
    (dict(dense_allocation=-0.1), ValueError, "dense_allocation"),
    (dict(dense_allocation="0.1"), ValueError, "dense_allocation"),
    (dict(T_end=None), ValueError, "T_end"),
    (dict(T_end=0), ValueError, "T_end"),
    (dict(T_end=2.5), ValueError, "T_end"),
    (dict(delta=0), ValueError, "delta"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(alpha=-0.01), ValueError, "alpha"),
    (dict(grad_accumulation_n=0), ValueError, "grad_accumulation_n"),
    (dict(grad_accumulation_n=100), ValueError, "grad_accumulation_n"),
    (dict(sparsity_distribution="gaussian"), ValueError, "sparsity_distribution"),
    (dict(backend="cuda_magic"), ValueError, "backend"),
    (dict(grow_mode="momentum"), ValueError, "grow_mode"),
    (dict(after_step="never"), ValueError, "after_step"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD, ids=[f"{b[2]}={list(b[0].values())[0]!r}" for b in BAD])
def test_bad_argument_raises_before_anything_changes(kwargs, exc, name):
    model, opt = trained_model_and_adam()
    snap = snapshot(model, opt)
    args = dict(dense_allocation=0.1, T_end=100, delta=100)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        RigLScheduler(model, opt, **args)
    assert_untouched(model, opt, snap)


def test_static_topo_needs_no_T_end():
    model, opt = trained_model_and_adam()
    pruner = RigLScheduler(model, opt, dense_allocation=0.1, static_topo=True, delta=2)
    assert pruner.T_end is None
    sparse = [(w, m, n) for w, m, n in zip(pruner.W, pruner.backward_masks, pruner.N) if m is not None]
    assert len(sparse) == 5  # all but the first conv and the linear head (rigl-torch's uniform rule)
    for w, m, n in sparse:
        assert int(m.sum()) == n - int(0.9 * n) and bool((w[~m] == 0).all())
    assert all(pruner() for _ in range(4)) and pruner.rigl_steps == 0  # steps 2 and 4 would be updates
    # its checkpoint has no T_end either, and resumes as it was
    sd = pruner.state_dict()
    assert sd["hyperparams"]["T_end"] is None
    model2, opt2 = trained_model_and_adam()
    resumed = RigLScheduler(model2, opt2, state_dict=sd)
    assert resumed.T_end is None and resumed.static_topo and resumed.step == 4
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(pruner.backward_masks, resumed.backward_masks))


def test_model_without_candidates():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model has no candidate weights"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)


def test_wrong_types():
    model, opt = trained_model_and_adam()
    with pytest.raises(TypeError, match="model"):
        RigLScheduler("resnet", opt, dense_allocation=0.1, T_end=10)
    with pytest.raises(TypeError, match="optimizer"):
        RigLScheduler(model, None, dense_allocation=0.1, T_end=10)


def test_optimizer_missing_sparse_weights():
    model, _ = trained_model_and_adam()
    opt = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="optimizer does not hold the sparse weights.*layer1.conv1.weight"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)
    assert_untouched(model, opt, snap)


def test_model_already_registered():
    model, opt = trained_model_and_adam()
    first = RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="already registered"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)
    assert_untouched(model, opt, snap)
    first.remove()  # after remove(), another scheduler may take the model
    RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)


def test_state_dict_that_does_not_fit():
    model, opt = trained_model_and_adam()
    other = MLP()
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    sd = RigLScheduler(other, other_opt, dense_allocation=0.1, T_end=10).state_dict()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="state_dict does not fit the model"):
        RigLScheduler(model, opt, state_dict=sd)
    assert_untouched(model, opt, snap)

    torch.manual_seed(0)
    donor = SmallResNet()
    sd = RigLScheduler(donor, torch.optim.SGD(donor.parameters(), lr=0.1), dense_allocation=0.1, T_end=10).state_dict()
    sd["backward_masks"][2] = sd_masks(sd)[2][:, :1]  # a bool mask (the older format) of the wrong shape
    with pytest.raises(ValueError, match=r"layer 2 \(layer1.conv2.weight\).*shape"):
        RigLScheduler(model, opt, state_dict=sd)
    del sd["step"]
    with pytest.raises(ValueError, match="state_dict is missing the key 'step'"):
        RigLScheduler(model, opt, state_dict=sd)
    assert_untouched(model, opt, snap)


def test_load_state_dict_validates_before_changing():
    model, opt = trained_model_and_adam()
    pruner = RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)
    masks = [None if m is None else m.clone() for m in pruner.backward_masks]
    sd = pruner.state_dict()
    sd["hyperparams"]["alpha"] = 7
    with pytest.raises(ValueError, match="alpha"):
        pruner.load_state_dict(sd)
    assert pruner.alpha == 0.3
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(masks, pruner.backward_masks))


def test_backend_env_var_and_unavailable(monkeypatch):
    model, opt = trained_model_and_adam()
    monkeypatch.setenv("RIGL_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RIGL_FAST_BACKEND"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)
    monkeypatch.setenv("RIGL_FAST_BACKEND", "reference")
    p = RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)
    assert p.backend == "reference"
    p.remove()

    def broken():
        raise ops.BackendUnavailable("no compiler found")

    monkeypatch.setitem(ops._LOADERS, "cpp", broken)
    monkeypatch.setattr(ops, "_CACHE", {})
    monkeypatch.setenv("RIGL_FAST_BACKEND", "cpp")  # the env var is an explicit request: it raises
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="RIGL_FAST_BACKEND='cpp'.*no compiler found"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)
    assert_untouched(model, opt, snap)
    monkeypatch.delenv("RIGL_FAST_BACKEND")
    with pytest.raises(RuntimeError, match="backend='cpp'.*no compiler found"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=10, backend="cpp")
    monkeypatch.setattr(ops, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="falling back to the reference"):
        p = RigLScheduler(model, opt, dense_allocation=0.1, T_end=10)  # auto falls back
    assert p.backend == "reference"


def test_a_triton_older_than_the_update_kernels_need_is_unavailable(monkeypatch):
    """The update kernels use tl.histogram(..., mask=), new in Triton 3.4 (torch <= 2.7 ships older): such a
    triton is an unavailable backend (auto moves on to cpp on CUDA), not a compile error at the first update."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(ops, "_CACHE", {})
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    with pytest.raises(ops.BackendUnavailable, match=r"triton 3\.3\.1 is older than 3\.4.*backend='cpp'"):
        ops._load("triton")
    monkeypatch.setattr(ops, "_CACHE", {})
    monkeypatch.setattr(triton, "__version__", "3.4.0")
    assert ops._load("triton").name == "triton"
