"""compute="sparse" (rigl_fast/compute.py): the sparse layers' forward and backward over the active weights.

The contract (issue 22): in float64 the same masks at every step and weights within 1e-9 (relative) of
compute="dense", for SGD and AdamW, grad_accumulation_n 1 and 2, unstructured and fan_in, an MLP and GPT-2
(transformers' Conv1D); in fp32 / bf16 each product within the rounding bound of the dense layer's own
(BOUND below); the autograd function passes gradcheck; parameters, hooks, invariants, remove(), copies,
torch.compile and autocast work as with dense compute.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_fast import RigLScheduler
from rigl_fast import compute as C
from rigl_fast import compute_ops as K
from rigl_fast.compute import MODES
from helpers import cpp_unavailable

CFG = dict(dense_allocation=0.3, T_end=10, delta=3, ignore_linear_layers=False, sparsity_distribution="erk")


def _mlp(dtype):
    return nn.Sequential(nn.Linear(13, 40), nn.ReLU(), nn.Linear(40, 33), nn.ReLU(), nn.Linear(33, 5)).to(dtype)


def _gpt2(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def _loss(model, kind, gen, dtype):
    if kind == "mlp":
        x = torch.randn(17, 13, generator=gen, dtype=dtype)
        y = torch.randint(0, 5, (17,), generator=gen)
        return F.cross_entropy(model(x), y)
    ids = torch.randint(0, 64, (3, 12), generator=gen)
    return model(input_ids=ids, labels=ids).loss


def _run(compute, kind="mlp", opt="sgd", acc=1, structure="unstructured", steps=11, dtype=torch.float64,
         autocast=None):
    """`steps` training steps; autocast: a dtype to run the forward passes under torch.autocast (CPU) in."""
    torch.manual_seed(1)
    model = (_mlp if kind == "mlp" else _gpt2)(dtype)
    o = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt == "sgd"
         else torch.optim.AdamW(model.parameters(), lr=1e-2))
    p = RigLScheduler(model, o, **CFG, grad_accumulation_n=acc, structure=structure, compute=compute)
    gen = torch.Generator().manual_seed(2)
    masks = []
    for _ in range(steps):
        for _ in range(acc):
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = _loss(model, kind, gen, dtype)
            (loss / acc).backward()
        if p():
            o.step()
        o.zero_grad()
        masks.append([None if m is None else m.clone() for m in p.backward_masks])
    return model, p, masks


def _sparse_computed(p):
    return [i for i, (m, why) in p._compute_layers.items() if not why]


# the MLP in every combination; GPT-2 (slower) in two optimizer/window pairs per structure
RUNS = ([("mlp", s, o, a) for s in ("unstructured", "fan_in") for o, a in (("sgd", 1), ("sgd", 2), ("adamw", 1),
                                                                           ("adamw", 2))]
        + [("gpt2", s, o, a) for s in ("unstructured", "fan_in") for o, a in (("sgd", 1), ("adamw", 2))])


@pytest.mark.parametrize("kind,structure,opt,acc", RUNS)
def test_float64_same_masks_every_step_and_weights_as_dense_compute(kind, structure, opt, acc):
    md, pd, masks_d = _run("dense", kind, opt, acc, structure)
    ms, ps, masks_s = _run("sparse", kind, opt, acc, structure)
    assert ps.rigl_steps == 3 and ps.skipped_updates == 0
    assert len(_sparse_computed(ps)) == sum(m is not None for m in ps.backward_masks) > 0
    moved = 0
    for step, (a, b) in enumerate(zip(masks_d, masks_s)):
        for x, y in zip(a, b):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y), f"masks differ after step {step + 1}"
    for x, y in zip(masks_d[0], masks_d[-1]):
        moved += x is not None and not torch.equal(x, y)
    assert moved, "the topology never changed: the comparison would be vacuous"
    for (name, a), b in zip(md.named_parameters(), ms.parameters()):
        scale = a.abs().max().clamp_min(1e-30)
        assert float((a - b).abs().max().detach() / scale) <= 1e-9, name


@pytest.mark.parametrize("T_end", [10, 9])
def test_sparse_compute_actually_runs_and_the_window_is_dense(monkeypatch, T_end):
    """The sparse path runs on every step; the dense weight gradient only inside the windows of the updates
    that run (T_end=9: the window before step 9 leads to no update, so it stays sparse)."""
    monkeypatch.setitem(CFG, "T_end", T_end)
    calls = {"sampled_dense": 0, "forward": 0}
    for name in calls:
        real = getattr(K, name)

        def counting(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)
        monkeypatch.setattr(K, name, counting)
    _, p, _ = _run("sparse", steps=9, acc=1)
    n = len(_sparse_computed(p))
    assert calls["forward"] == 9 * n
    dense_steps = 3 if T_end == 10 else 2  # the backward before the updates at steps 3, 6 (and 9 when 9 < T_end)
    assert p.rigl_steps == dense_steps
    assert calls["sampled_dense"] == (9 - dense_steps) * n


def test_gradcheck_both_layouts_and_conv1d_orientation():
    torch.manual_seed(3)
    for transposed in (False, True):
        for fan_in in (False, True):
            shape = (7, 5) if not transposed else (5, 7)  # logical (out=7, in=5)
            mask = torch.zeros(35, dtype=torch.bool)
            if fan_in:
                m = torch.zeros(7, 5, dtype=torch.bool)
                for o in range(7):
                    m[o, torch.randperm(5)[:2]] = True
                mask = m.t().contiguous() if transposed else m
            else:
                mask[torch.randperm(35)[:12]] = True
                mask = mask.view(shape)
            t = C.Tables(mask, transposed, fan_in)
            assert (t.k == 2) if fan_in else True
            st = _FixedState(transposed)
            w = (torch.randn(shape, dtype=torch.float64) * mask).requires_grad_()
            x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda a, b: C._SparseLinear.apply(a, b, st, t), (x, w))
            ref = x @ (w.t() if transposed else w).t()
            torch.testing.assert_close(C._SparseLinear.apply(x, w, st, t), ref, rtol=1e-12, atol=1e-12)


class _FixedState:
    def __init__(self, transposed, window=False):
        self.transposed, self.window = transposed, window

    def dense_window(self):
        return self.window


# fp32 / bf16: each product against F.linear's, within BOUND: |sparse - dense| <= BOUND * eps * sum |w||x| (both
# sum the same products in fp32 (bf16 inputs: F.linear accumulates in fp32 too) in different orders; n terms of
# size s give at most n * eps * s apart, BOUND covers the few terms the 10%-dense rows sum), plus the output
# dtype's rounding of each result (one ulp of the larger).
BOUND = 4.0


def _check_close(got, want, absprod, dtype):
    eps32 = torch.finfo(torch.float32).eps
    tol = BOUND * eps32 * absprod + 2 * torch.finfo(dtype).eps * want.abs().float()
    assert bool(((got.float() - want.float()).abs() <= tol + 1e-30).all()), float((got.float() - want.float()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fan_in", [False, True])
@pytest.mark.parametrize("B", [1, 3, 65, 130, 1024])  # 1024: the padded row stride (export_kernels.cpp)
def test_kernels_match_the_dense_layer_within_its_rounding(dtype, fan_in, B):
    torch.manual_seed(4)
    out, n_in = 67, 45
    m = torch.zeros(out, n_in, dtype=torch.bool)
    for o in range(out):
        m[o, torch.randperm(n_in)[: 6 if fan_in else int(torch.randint(0, 12, ()))]] = True
    w = (torch.randn(out, n_in) * m).to(dtype)
    x = torch.randn(B, n_in * 2).to(dtype)[:, ::2]  # not contiguous
    g = torch.randn(out, B).to(dtype).t()           # not contiguous
    t = C.Tables(m, False, fan_in)
    y = K.forward(x, t, w.reshape(-1)[t.flat])
    dx = K.transposed(g, t, w.reshape(-1)[t.flat][t.perm])
    dw = K.sampled(x, g, t)
    xf, wf, gf = x.float(), w.float(), g.float()
    _check_close(y, (xf @ wf.t()).to(dtype), xf.abs() @ wf.abs().t(), dtype)
    _check_close(dx, (gf @ wf).to(dtype), gf.abs() @ wf.abs(), dtype)
    _check_close(dw, (gf.t() @ xf).reshape(-1)[t.flat], (gf.abs().t() @ xf.abs()).reshape(-1)[t.flat], torch.float32)
    assert y.dtype == dx.dtype == dtype and dw.dtype == torch.float32


def _need_cpp_kernels():
    """The C++ products load: compute_ops falls back to the reference where they do not, and a comparison of the
    two would then compare the reference with itself."""
    from rigl_fast._cpp import load_library
    try:
        load_library("export")
    except Exception as e:
        cpp_unavailable(e)
    names = ("csr_linear", "fan_in_linear", "sampled_grad", "transpose_f32", "take_values", "csr_linear_t",
             "sampled_grad_rows_t")
    assert all(K._cpp(n, torch.zeros(1)) is not None for n in names)


def test_reference_equals_the_cpu_kernels():
    """The plain-PyTorch reference defines the results: the C++ kernels agree with it within fp32 rounding."""
    _need_cpp_kernels()
    torch.manual_seed(5)
    m = torch.rand(50, 70) < 0.2
    w, x, g = torch.randn(50, 70) * m, torch.randn(33, 70), torch.randn(33, 50)
    t = C.Tables(m, False, False)
    v = w.reshape(-1)[t.flat]
    vt = v[t.perm]
    torch.testing.assert_close(K.forward(x, t, v), K.reference_product(x, t.rows, t.cols, v, 50), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.transposed(g, t, vt), K.reference_product(g, t.t_cols, t.t_rows, vt, 70),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.sampled(x, g, t), K.reference_sampled(x, g, t.rows, t.cols), rtol=1e-5, atol=1e-5)


def test_fp32_training_stays_within_rounding_of_dense_compute():
    md, _, masks_d = _run("dense", dtype=torch.float32, steps=2)  # before the first update: same masks
    ms, _, masks_s = _run("sparse", dtype=torch.float32, steps=2)
    for a, b in zip(md.parameters(), ms.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _random_config_run(seed, compute, dtype):
    """A small MLP of random widths (odd ones included), bias or not, an unstructured or fan_in mask, fed random
    batches (1 to 130 rows, a leading dimension or not, a non-contiguous view or not) for two steps, the second
    in the dense-gradient window and followed by an update; the gradients of both steps, as fp32."""
    rnd = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=rnd))]  # noqa: E731
    widths = [pick([8, 17, 64, 100, 257]) for _ in range(3)]
    bias, structure, batch = pick([True, False]), pick(["unstructured", "fan_in"]), pick([1, 2, 7, 64, 65, 130])
    lead, strided = pick([(), (2,)]), pick([True, False])
    torch.manual_seed(seed)
    layers = [nn.Linear(5, widths[0]), nn.Tanh()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    model = nn.Sequential(*layers).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    p = RigLScheduler(model, opt, dense_allocation=pick([0.05, 0.2]), T_end=100, delta=2, ignore_linear_layers=False,
                      structure=structure, sparsity_distribution="uniform", compute=compute)
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(2):
        x = torch.randn(*lead, batch, 10, generator=gen).to(dtype)
        x = x[..., ::2] if strided else x[..., :5]
        model(x).float().square().mean().backward()
        grads.append([w.grad.float().clone() for w in model.parameters()])
        if p():
            opt.step()
        opt.zero_grad()
    assert p.rigl_steps == 1
    return grads, (widths, bias, structure, batch, lead, strided)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_random_configurations_match_dense_compute_gradients(dtype, rtol):
    """Twelve random configurations (fixed seeds) through the C++ kernels, the shared-transpose path (batch >= 2)
    and the general one (batch 1): every gradient, outside the window and in it, within rtol of its size of
    compute='dense''s."""
    for seed in range(12):
        want, config = _random_config_run(seed, "dense", dtype)
        got, _ = _random_config_run(seed, "sparse", dtype)
        for step_w, step_g in zip(want, got):
            for a, b in zip(step_w, step_g):
                assert float((a - b).abs().max()) <= rtol * float(a.abs().max()), (seed, config)


def test_a_non_finite_input_reaches_only_the_outputs_of_its_active_weights():
    """The README's one difference by design: an inf input feature makes NaN or inf exactly the outputs whose
    active weights read it (a dense-computed layer's 0 * inf makes all of them NaN)."""
    torch.manual_seed(13)
    model = _mlp(torch.float32)
    p = RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **CFG, compute="sparse")
    i = _sparse_computed(p)[1]
    layer, mask = model[2 * i], p.backward_masks[i]
    x = torch.randn(3, layer.in_features)
    x[1, 4] = float("inf")
    for batch, row in ((x, 1), (x[1:2], 0)):  # the shared-transpose path and batch 1's general one
        y = layer(batch)
        bad = ~torch.isfinite(y)
        assert torch.equal(bad[row], mask[:, 4]) and 0 < int(bad.sum()) < layer.out_features
    p.remove()
    assert not torch.isfinite(layer(x)[1]).any()


def test_parameters_hooks_and_invariants_unchanged():
    torch.manual_seed(6)
    model = _mlp(torch.float32)
    params = {n: p for n, p in model.named_parameters()}
    modules = list(model.modules())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    p = RigLScheduler(model, opt, **CFG, compute="sparse")
    assert {n: q for n, q in model.named_parameters()} == params and list(model.modules()) == modules
    assert list(model.state_dict()) == list(model.state_dict().keys())
    for step in range(7):
        F.cross_entropy(model(torch.randn(9, 13)), torch.randint(0, 5, (9,))).backward()
        for w, m in zip(p.W, p.backward_masks):
            if m is not None:
                assert bool((w.grad[~m] == 0).all())
        if p():
            opt.step()
        opt.zero_grad()
        for w, m in zip(p.W, p.backward_masks):
            if m is not None:
                assert bool((w[~m] == 0).all())
                assert all(bool((s[~m] == 0).all()) for s in opt.state[w].values() if s.shape == w.shape)


def test_tables_rebuilt_only_when_the_topology_changes():
    torch.manual_seed(7)
    model = _mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = RigLScheduler(model, opt, **CFG, compute="sparse")
    states = [model[0].forward.state, model[2].forward.state]
    seen = []
    for step in range(7):
        F.cross_entropy(model(torch.randn(9, 13)), torch.randint(0, 5, (9,))).backward()
        if p():
            opt.step()
        opt.zero_grad()
        seen.append([id(s._tables) for s in states])
    # steps 1, 2 share the construction's tables; the update at step 3 rebuilds them (used from step 4)
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5] and seen[3] != seen[2]
    for s in states:
        t = s.tables()
        m = p.backward_masks[s.i]
        assert torch.equal(t.flat.sort().values, m.reshape(-1).nonzero().squeeze(1))
    old = states[0]._tables
    states[0].p.backward_masks[0] = states[0].p.backward_masks[0].clone()  # a new mask tensor (as .to() makes)
    model(torch.randn(2, 13))
    assert states[0]._tables is not old
    p.load_state_dict(p.state_dict())  # the forwards are put on again, with fresh tables
    model(torch.randn(2, 13))
    assert model[0].forward.state is not states[0] and model[0].forward.state._tables is not None


def test_remove_restores_dense_compute_and_copies_compute_densely():
    torch.manual_seed(8)
    model = _mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = RigLScheduler(model, opt, **CFG, compute="sparse")
    x = torch.randn(5, 13)
    assert "forward" in vars(model[0])
    y_sparse = model(x)
    twin = copy.deepcopy(model)
    assert isinstance(vars(twin[0])["forward"], C._Detached)
    torch.testing.assert_close(twin(x), y_sparse, rtol=1e-5, atol=1e-6)
    loaded = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(loaded(x), y_sparse, rtol=1e-5, atol=1e-6)
    exported = p.export("csr")
    torch.testing.assert_close(exported(x), y_sparse, rtol=1e-5, atol=1e-5)
    p.remove()
    assert all("forward" not in vars(m) for m in model.modules())
    torch.testing.assert_close(model(x), y_sparse, rtol=1e-5, atol=1e-6)


def test_summary_says_which_layers_compute_sparsely():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.attn = nn.MultiheadAttention(16, 2)
            self.fc = nn.Linear(8, 16)
            self.head = nn.Linear(16, 4)
    net = Net()
    p = RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), **{**CFG, "dense_allocation": 0.5},
                      compute="sparse")
    s = p.summary()
    lines = {ln.split()[0]: ln for ln in s.splitlines()[1:]}
    assert "dense compute: convolution" in lines["conv.weight"]
    assert "dense compute: nn.MultiheadAttention projection" in lines["attn.in_proj_weight"]
    assert "sparse compute (compressed rows)" in lines["fc.weight"]
    assert "dense compute: nn.MultiheadAttention's out_proj" in lines["attn.out_proj.weight"]
    assert "forward" not in vars(net.attn.out_proj)


def test_structure_nm_and_custom_forward_stay_dense_computed():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    net = nn.Sequential(nn.Linear(8, 16), Scaled(16, 16), nn.Linear(16, 4))
    p = RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), **{**CFG, "sparsity_distribution": "uniform"},
                      compute="sparse")
    assert "forward" not in vars(net[1]) and "dense compute: it is a Scaled" in p.summary()
    p.remove()
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    p = RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1),
                      **{**CFG, "dense_allocation": 0.5, "sparsity_distribution": "uniform"}, structure="2:4",
                      compute="sparse")
    assert all("forward" not in vars(m) for m in net.modules()) and "dense compute: structure='2:4'" in p.summary()


def test_bad_compute_raises_naming_it_before_any_change():
    net = _mlp(torch.float32)
    before = [w.clone() for w in net.parameters()]
    with pytest.raises(ValueError, match="compute"):
        RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), **CFG, compute="fast")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all("forward" not in vars(m) for m in net.modules())
    with pytest.raises(TypeError):
        RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.3, 10, "erk", False, 3, 0.3, False, 1,
                      None, "sparse")  # keyword-only


def test_autocast_bf16_and_no_grad():
    torch.manual_seed(9)
    model = _mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = RigLScheduler(model, opt, **CFG, compute="sparse")
    x = torch.randn(6, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        assert y.dtype == torch.bfloat16
        F.cross_entropy(y.float(), torch.randint(0, 5, (6,))).backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in p.W)
    with torch.no_grad():
        want = model(x)
    p.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x).float(), y.float(), rtol=2e-2, atol=2e-2)


def test_float64_under_autocast_stays_float64():
    """Autocast leaves float64 tensors as they are (F.linear of a float64 layer returns float64 under a bf16
    autocast); the sparse compute did the product in bf16 (an output rounded to bf16, 2e-3 off here)."""
    torch.manual_seed(9)
    model = _mlp(torch.float64)
    p = RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **CFG, compute="sparse")
    x = torch.randn(6, 13, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y.square().sum().backward()
    grads = [w.grad.clone() for w in p.W]
    assert y.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads)
    p.remove()
    for w in p.W:
        w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        want.square().sum().backward()
    assert want.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, p.W):  # the sparse compute's .grad is 0 off the mask, dense compute's is not
        m = w != 0
        torch.testing.assert_close(g[m], w.grad[m], rtol=1e-12, atol=1e-12)


def _penalty_grads(compute, checkpointed=None):
    """The gradients of a float64 MLP's loss plus a gradient penalty (the input gradient's squared norm, through
    autograd.grad with create_graph=True); checkpointed (use_reentrant True / False): the loss alone, its middle
    layers under torch.utils.checkpoint."""
    torch.manual_seed(4)
    model = _mlp(torch.float64)
    p = RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **CFG, compute=compute)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    if checkpointed is None:
        out = model(x)
        gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
        (out.square().mean() + gx.square().sum()).backward()
    else:
        h = torch.utils.checkpoint.checkpoint(model[:4], x, use_reentrant=checkpointed)
        model[4](h).square().mean().backward()
    return p, [w.grad.clone() for w in model.parameters()]


def test_double_backward_raises_naming_the_weight_and_checkpointing_trains():
    """A backward with create_graph=True (a gradient penalty) that reaches a sparse-computed layer raises, naming
    its weight: its kernels have no derivatives, and the penalty's second-order terms through it were silently
    left out (its weight gradient differed from compute='dense''s). torch.utils.checkpoint, which runs the
    backward without create_graph, trains as compute='dense' (both kinds)."""
    p, want = _penalty_grads("dense")
    with pytest.raises(RuntimeError, match="compute='sparse' has no double backward") as err:
        _penalty_grads("sparse")
    sparse_names = [name for name, mask in zip(p.names, p.backward_masks) if mask is not None]
    assert sparse_names and f"{sparse_names[-1]!r}" in str(err.value)  # the last layer's backward runs first
    assert any(g.abs().max() > 0 for g in want)
    for reentrant in (True, False):
        _, want = _penalty_grads("dense", reentrant)
        _, got = _penalty_grads("sparse", reentrant)
        for a, b in zip(want, got):
            assert float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) <= 1e-9


def test_torch_compile_trains_with_a_graph_break():
    """In float64, so that equal masks after the update are no luck of the rounding."""
    torch.manual_seed(10)
    model = _mlp(torch.float64)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(11)
    p = RigLScheduler(model, opt, **CFG, compute="sparse")
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    torch.manual_seed(11)  # the same masks
    p_r = RigLScheduler(ref, opt_r, **CFG, compute="sparse")
    compiled = torch.compile(model)
    for step in range(4):
        x, y = torch.randn(8, 13, dtype=torch.float64), torch.randint(0, 5, (8,))
        for m, pr, o in ((compiled, p, opt), (ref, p_r, opt_r)):
            F.cross_entropy(m(x), y).backward()
            if pr():
                o.step()
            o.zero_grad()
    assert p.rigl_steps == 1 and all(torch.equal(a, b) for a, b in zip(p.backward_masks, p_r.backward_masks))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # fullgraph=True cannot break the graph: its error says why and what to use instead
    torch._dynamo.reset()  # the frames compiled above would be reused
    with pytest.raises(Exception, match="compute='sparse' layers break the graph.*use compute='dense'"):
        torch.compile(model, fullgraph=True)(torch.randn(8, 13, dtype=torch.float64))


def test_torch_func_transforms_and_forward_ad_compute_densely(monkeypatch):
    """torch.func's transforms run through a sparse-computed model (per-sample gradients: vmap over grad over
    functional_call), and forward-mode AD: its layers compute densely there (the kernels have no batching rules or
    forward derivatives, and torch refuses an autograd function without them), so the per-sample gradients are
    plain autograd's, sample by sample, on a copy of the model, and the tangent is the copy's; outside them the
    layers compute sparsely again."""
    torch.manual_seed(12)
    model = _mlp(torch.float64)
    ref = _mlp(torch.float64)
    p = RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **CFG, compute="sparse")
    ref.load_state_dict(model.state_dict())  # masked weights, no scheduler
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 13, dtype=torch.float64), torch.randint(0, 5, (6,))

    def loss(prm, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, prm, (xi[None],)), yi[None])
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(6):
        ref.zero_grad()
        F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]).backward()
        for k, w in ref.named_parameters():
            torch.testing.assert_close(per_sample[k][i], w.grad, rtol=1e-12, atol=1e-14)
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        out = model(torch.autograd.forward_ad.make_dual(x, tangent))
        got = torch.autograd.forward_ad.unpack_dual(out).tangent
    _, want = torch.func.jvp(ref, (x,), (tangent,))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    calls = []
    real = K.forward  # float64: the general products
    monkeypatch.setattr(K, "forward", lambda *a: calls.append(1) or real(*a))
    model(x)
    assert len(calls) == len(_sparse_computed(p)) > 0


def test_callbacks_take_compute():
    hf = pytest.importorskip("rigl_fast.integrations.hf")
    cb = hf.RigLCallback(dense_allocation=0.3, compute="sparse")
    assert cb is not None
    with pytest.raises(ValueError, match="compute"):
        hf.RigLCallback(dense_allocation=0.3, compute="bogus")


PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None),
              "autocast-bf16": (torch.float32, torch.bfloat16)}


# fp16 on the MLPs only (GPT-2's own fp16 CPU matmuls, attention's, are slow)
@pytest.mark.parametrize("kind,structure,precision",
                         [(k, s, p) for k, s in (("mlp", "unstructured"), ("mlp", "fan_in"), ("gpt2", "unstructured"))
                          for p in PRECISIONS if not (k == "gpt2" and p == "fp16")])
def test_shared_transposes_change_nothing_bitwise(monkeypatch, kind, structure, precision):
    """On the C++ kernels: the forward's x transposed to fp32 is kept for the weight gradient and the output
    gradient transposed once for both backward products (compute_ops.transposed_input), the values packed by one op
    (rounded there to autocast's dtype), the weight gradient written row by row (GPT-2: Conv1D's transposed storage;
    a bf16 / fp16 weight's rounded as it is written); the same training as with every product transposing its own
    inputs, bitwise, through a dense window and the update after it (the same masks; the window's matmul takes x as
    the saved transpose's view there, an equal matmul at these sizes): fp32, bf16 and fp16 models and an fp32 one
    under bf16 autocast."""
    dtype, autocast = PRECISIONS[precision]
    used = []
    real = K.transposed_input

    def spy(x):
        r = real(x)
        used.append(r is not None)
        return r

    monkeypatch.setattr(K, "transposed_input", spy)
    shared, p, masks = _run("sparse", kind, dtype=dtype, steps=4, structure=structure, autocast=autocast)
    assert used and all(used)  # every sparse layer's forward and backward took the shared path
    assert p.rigl_steps == 1 and not all(torch.equal(a, b) for a, b in zip(masks[0], masks[-1]) if a is not None)
    monkeypatch.setattr(K, "transposed_input", lambda x: None)
    plain, _, plain_masks = _run("sparse", kind, dtype=dtype, steps=4, structure=structure, autocast=autocast)
    for a, b in zip(shared.parameters(), plain.parameters()):
        assert a.dtype == dtype and torch.equal(a, b)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(masks[-1], plain_masks[-1]))


def test_take_values_falls_back_for_dtypes_the_cpp_ops_do_not_take():
    """compute_ops.take_values: fp64 weights (no C++ op for them) are gathered in PyTorch, the same values."""
    torch.manual_seed(6)
    m = torch.rand(7, 9) < 0.4
    t = C.Tables(m, False, False)
    for dtype in (torch.float64, torch.float32):
        w = torch.randn(7, 9, dtype=dtype)
        v, vt = K.take_values(w, t)
        assert v.dtype == vt.dtype == torch.float32
        assert torch.equal(v, w.reshape(-1)[t.flat].float()) and torch.equal(vt, v[t.perm])


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_every_kernel_set_trains_as_the_cpu_kernels(kernels):
    """The same fp32 training through the plain-PyTorch reference and through the Triton kernels (CUDA's; here
    under the interpreter) as through the C++ ones, within fp32 rounding (before the first update)."""
    if kernels == "triton":
        pytest.importorskip("triton")
    _need_cpp_kernels()  # the baseline
    base, _, _ = _run("sparse", dtype=torch.float32, steps=2, structure="fan_in")
    with K.only(kernels):
        assert (K._triton(torch.zeros(1)) is not None) == (kernels == "triton") and K._cpp("csr_linear", torch.zeros(1)) is None
        other, _, _ = _run("sparse", dtype=torch.float32, steps=2, structure="fan_in")
    for a, b in zip(base.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_state_dict_reinstalls_for_the_layers_it_makes_sparse():
    """A state dict whose hyperparameters make another set of layers sparse (here ERK makes the first layer
    sparse, which 'uniform' keeps dense): after loading, exactly the sparse layers compute sparsely."""
    torch.manual_seed(12)
    src = _mlp(torch.float32)
    sd = RigLScheduler(src, torch.optim.SGD(src.parameters(), lr=0.1), **CFG).state_dict()  # erk: all sparse
    net = _mlp(torch.float32)
    p = RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), **{**CFG, "sparsity_distribution": "uniform"},
                      compute="sparse")
    assert p.backward_masks[0] is None and "forward" not in vars(net[0]) and "forward" in vars(net[2])
    p.load_state_dict(sd)
    assert p.backward_masks[0] is not None and all("forward" in vars(net[i]) for i in (0, 2, 4))
    assert p.summary().count("sparse compute") == 3
    x = torch.randn(4, 13)
    want = F.linear(x, net[0].weight, net[0].bias)
    torch.testing.assert_close(net[0](x), want, rtol=1e-5, atol=1e-6)


def test_a_bf16_model_trains_and_inference_mode_works():
    """Weights in bf16 (no autocast): the products run in bf16 with fp32 accumulation, the weight gradient is
    rounded to bf16 once; within bf16 rounding of the dense-computed twin before the first update."""
    runs, grads = {}, {}
    for mode in MODES:
        torch.manual_seed(13)
        net = _mlp(torch.bfloat16)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        p = RigLScheduler(net, opt, **CFG, compute=mode)
        gen = torch.Generator().manual_seed(14)
        grads[mode] = []
        for _ in range(2):
            _loss(net, "mlp", gen, torch.bfloat16).backward()
            grads[mode] += [q.grad.float().clone() for q in net.parameters()]
            if p():
                opt.step()
            opt.zero_grad()
        for w, m in zip(p.W, p.backward_masks):
            assert w.dtype == torch.bfloat16 and bool((w[~m] == 0).all())
        runs[mode] = net
    # each step's gradients within bf16 rounding of the dense twin's (the weights move too little in two steps
    # for a comparison of the weights to see a wrong gradient)
    for d, s_ in zip(grads["dense"], grads["sparse"]):
        assert float(d.abs().max()) > 0 and float((s_ - d).abs().max()) <= 3e-2 * float(d.abs().max())
    for a, b in zip(runs["dense"].parameters(), runs["sparse"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    x = torch.randn(3, 13, dtype=torch.bfloat16)
    with torch.inference_mode():
        ys, yd = runs["sparse"](x).float(), runs["dense"](x).float()
    assert float((ys - yd).abs().max()) <= 3e-2 * float(yd.abs().max())
