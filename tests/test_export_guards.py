"""pruner.export()'s guards: (1) weights that are nonzero off the scheduler's masks (model.load_state_dict of an
earlier snapshot without the scheduler's state; pruner.remove() then dense training) make export raise, naming
the layers, before anything is built, the training model untouched; pruner.apply_mask_to_weights() then exports
what the model computes. (2) Under torch.autocast the exported layers do what nn.Linear does there: every
floating tensor but a float64 one cast to the autocast dtype, the output in it.

Bound under autocast (one layer): nn.Linear rounds its fp32-accumulated x W^T + b once to the autocast dtype;
the exported layer rounds x W^T once, then adds the bias in that dtype (a second rounding), so
|diff| <= eps * (|y| + |y - b|) (eps of the autocast dtype), plus the fp32 summation-order term of
test_export.py's bound (1e-6 sum|w x|). Measured worst: 0.96 of the first term in bf16, 0.90 in fp16 (a layer
without bias matches nn.Linear exactly here: both round the fp32 sum once).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_fast import RigLScheduler, export_ops
from rigl_fast.export import CSRLinear, FanInLinear, SparseMultiheadAttention

from helpers import tiny_gpt2
from test_export import Odd, _close
from test_export_mha import Attn, E, _close as _close_attention


def _train(model, structure, loss, steps, snapshot_at=None):
    """A few steps of a real RigLScheduler (mask updates at steps 4 and 8); the state dict after `snapshot_at`
    steps, if asked."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=20, delta=4, ignore_linear_layers=False,
                           structure=structure, sparsity_distribution="uniform")
    g = torch.Generator().manual_seed(1)
    snapshot = None
    for i in range(steps):
        if i == snapshot_at:
            snapshot = copy.deepcopy(model.state_dict())
        opt.zero_grad()
        loss(model, g).backward()
        if pruner():
            opt.step()
    return pruner, opt, g, snapshot


def _odd_loss(model, g):
    x, y = torch.randn(16, 37, generator=g), torch.randint(0, 11, (16,), generator=g)
    return F.cross_entropy(model(x), y)


def _attn_loss(model, g):
    x = torch.randn(4, 6, E, generator=g)
    return model(x, x, x).square().mean()


def _off_mask(pruner):
    """{weight name: nonzero weights off its mask}, for the weights that have some."""
    counts = {n: int((w[~m] != 0).sum()) for n, w, m in zip(pruner.names, pruner.W, pruner.backward_masks)
              if m is not None}
    return {n: c for n, c in counts.items() if c}


def _move_off_the_masks(model, structure, loss, how):
    """A trained model whose weights are nonzero off the scheduler's masks, in one of the two ways of the README."""
    if how == "load_state_dict":
        pruner, opt, g, snapshot = _train(model, structure, loss, steps=6, snapshot_at=3)
        model.load_state_dict(snapshot)  # the weights of step 3, the masks of step 4's update
    else:
        pruner, opt, g, _ = _train(model, structure, loss, steps=6)
        pruner.remove()
        for _ in range(2):  # dense fine-tuning
            opt.zero_grad()
            loss(model, g).backward()
            opt.step()
    return pruner


def _raises_and_leaves_the_model(pruner, fmt, off):
    model = pruner.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = [None if m is None else m.clone() for m in pruner.backward_masks]
    with pytest.raises(ValueError, match="weights no longer match the scheduler's masks") as err:
        pruner.export(fmt)
    msg = str(err.value)
    for name, count in off.items():
        assert f"{name!r}: {count}" in msg
    assert "pruner.load_state_dict" in msg and "pruner.apply_mask_to_weights()" in msg
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(a is None or torch.equal(a, b) for a, b in zip(masks, pruner.backward_masks))


@pytest.mark.parametrize("how", ["load_state_dict", "remove"])
@pytest.mark.parametrize("fmt,structure", [("csr", "unstructured"), ("fan_in", "fan_in")])
def test_weights_off_the_masks_raise_then_apply_mask_exports(fmt, structure, how):
    torch.manual_seed(0)
    model = Odd()
    pruner = _move_off_the_masks(model, structure, _odd_loss, how)
    off = _off_mask(pruner)
    sparse_linear = {"b.weight", "c.weight"}
    assert set(off) & sparse_linear, off  # the scenario does move weights off the masks
    _raises_and_leaves_the_model(pruner, fmt, {n: c for n, c in off.items() if n in sparse_linear})
    pruner.apply_mask_to_weights()  # export the weights as masked
    assert not _off_mask(pruner)
    exp = pruner.export(fmt)
    assert exp.rigl_fast_formats == {"b": fmt, "c": fmt}
    x = torch.randn(7, 37, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(exp(x), model(x), float(x.abs().sum(1).max()))


@pytest.mark.parametrize("how", ["load_state_dict", "remove"])
@pytest.mark.parametrize("fmt,structure", [("csr", "unstructured"), ("fan_in", "fan_in")])
def test_attention_weights_off_the_masks_raise_then_apply_mask_exports(fmt, structure, how):
    torch.manual_seed(0)
    model = Attn(batch_first=True)
    pruner = _move_off_the_masks(model, structure, _attn_loss, how)
    off = _off_mask(pruner)
    assert set(off) & {"attn.in_proj_weight", "attn.out_proj.weight"}, off
    _raises_and_leaves_the_model(pruner, fmt, off)
    pruner.apply_mask_to_weights()
    exp = pruner.export(fmt).eval()
    model.eval()
    assert isinstance(exp.attn, SparseMultiheadAttention)
    x = torch.randn(3, 5, E, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close_attention(exp(x, x, x), model(x, x, x))


def test_a_nan_off_the_mask_counts_many_layers_are_cut_short_and_kept_modules_are_not_checked():
    torch.manual_seed(0)
    model = Odd()
    pruner, *_ = _train(model, "unstructured", _odd_loss, steps=2)
    masks = dict(zip(pruner.names, pruner.backward_masks))
    with torch.no_grad():
        model.b.weight[~masks["b.weight"]] = 0.0
        r, c = (~masks["b.weight"]).nonzero()[0].tolist()
        model.b.weight[r, c] = float("nan")
        model.conv.weight[~masks["conv.weight"]] = 1.0  # a convolution computes with its own weights: not checked
    assert int((~masks["conv.weight"]).sum()) > 0
    with pytest.raises(ValueError, match=r"mask: 'b\.weight': 1\)"):
        pruner.export("csr")
    with torch.no_grad():
        model.b.weight.nan_to_num_(0.0)
    exp = pruner.export("csr")
    assert "conv" in exp.rigl_fast_kept and torch.equal(exp.conv.weight, model.conv.weight)
    # past four layers the message names four and counts the rest
    torch.manual_seed(0)
    seq = nn.Sequential(*[nn.Linear(8, 8) for _ in range(7)])
    opt = torch.optim.SGD(seq.parameters(), lr=0.1)
    pruner = RigLScheduler(seq, opt, dense_allocation=0.3, T_end=20, delta=4, ignore_linear_layers=False,
                           sparsity_distribution="uniform")
    with torch.no_grad():
        for lin in seq:
            lin.weight.fill_(0.5)
    with pytest.raises(ValueError, match=r"mask: '1\.weight': 44, '2\.weight': 44, '3\.weight': 44, "
                                         r"'4\.weight': 44 and 2 more layers\)") as err:
        pruner.export("csr")  # layer 0 is dense (the first layer), 1-6 hold 64 - 20 weights off their masks
    assert "'5.weight'" not in str(err.value)


def test_conv1d_weights_off_the_masks_raise():
    """transformers' Conv1D stores its weight (in, out), the mask likewise: the entry checked is the one off it."""
    model = tiny_gpt2().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, dense_allocation=0.25, T_end=8, delta=2, ignore_linear_layers=False,
                           structure="fan_in")
    name = "transformer.h.0.mlp.c_fc.weight"  # (32, 128): (in, out)
    i = pruner.names.index(name)
    w, m = pruner.W[i], pruner.backward_masks[i]
    assert tuple(w.shape) == tuple(m.shape) == (32, 128) and not _off_mask(pruner)
    pruner.export("fan_in")  # as trained: fine
    r, c = (~m).nonzero()[0].tolist()
    with torch.no_grad():
        w[r, c] = 0.25
    with pytest.raises(ValueError, match=rf"'{name}': 1\)"):
        pruner.export("fan_in")


# ---------------------------------------------------------------- autocast
def _trained_odd(structure, dtype):
    torch.manual_seed(0)
    model = Odd()
    pruner, *_ = _train(model, structure, _odd_loss, steps=10)
    return model.to(dtype), pruner


def _layer_close(got, want, bias, scale):
    """The bound in the module doc."""
    assert got.dtype == want.dtype
    eps = torch.finfo(want.dtype).eps
    g, w = got.float(), want.float()
    p = w - (0 if bias is None else bias.to(want.dtype).float())
    tol = eps * (w.abs() + p.abs()) + 1e-6 * scale
    assert bool(((g - w).abs() <= tol).all()), (g - w).abs().max()


def _kernels(kernel, monkeypatch):
    """'cpp': the CPU kernels as they load; 'reference': the plain PyTorch products (no C++ extension)."""
    if kernel == "reference":
        for name in ("fan_in_linear", "csr_linear"):
            monkeypatch.setitem(export_ops._cpp_ops, name, None)


@pytest.mark.parametrize("kernel", ["cpp", "reference"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,structure", [("csr", "unstructured"), ("fan_in", "fan_in")])
def test_autocast_as_nn_linear(fmt, structure, autocast_dtype, kernel, monkeypatch):
    _kernels(kernel, monkeypatch)
    model, pruner = _trained_odd(structure, torch.float32)
    exp = pruner.export(fmt)
    assert isinstance(exp.b, {"csr": CSRLinear, "fan_in": FanInLinear}[fmt])
    g = torch.Generator().manual_seed(2)
    for batch in (1, 7, 64):
        x = torch.randn(batch, 37, generator=g)
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype):
            want, got = model(x), exp(x)
            h = F.relu(model.a(x))  # each sparse layer on the same input as its nn.Linear
            layers = [(exp.b(h), model.b(h), model.b.bias, h)]
            h = F.relu(model.b(h))
            layers.append((exp.c(h), model.c(h), None, h))
        assert want.dtype == got.dtype == autocast_dtype
        for y, ref, bias, inp in layers:
            _layer_close(y, ref, bias, float(inp.float().abs().sum(1).max()))
        _close(got, want, float(x.abs().sum(1).max()))
        # outside autocast: fp32, as before
        with torch.no_grad():
            got = exp(x)
        assert got.dtype == torch.float32
        _close(got, model(x), float(x.abs().sum(1).max()))
    # d/dx under autocast: x's dtype, the masked model's gradient
    x = torch.randn(5, 37, generator=g, requires_grad=True)
    grads = []
    for m in (exp, model):
        with torch.autocast("cpu", dtype=autocast_dtype):
            y = m(x)
        grads.append(torch.autograd.grad(y.float().sum(), x)[0])
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=4 * torch.finfo(autocast_dtype).eps * float(
        grads[1].abs().max()))


@pytest.mark.parametrize("kernel", ["cpp", "reference"])
@pytest.mark.parametrize("fmt,structure", [("csr", "unstructured"), ("fan_in", "fan_in")])
def test_a_float64_model_under_autocast_stays_float64(fmt, structure, kernel, monkeypatch):
    """autocast does not cast float64 tensors (a float64 nn.Linear under CPU bf16 autocast returns float64); the
    products run with autocast off (the reference's torch.sparse product is not cast to bf16)."""
    _kernels(kernel, monkeypatch)
    model, pruner = _trained_odd(structure, torch.float64)
    exp = pruner.export(fmt)
    x = torch.randn(7, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        plain = exp(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = exp(x), model(x)
    assert got.dtype == want.dtype == torch.float64
    assert torch.equal(got, plain)
    _close(got, want, float(x.abs().sum(1).max()))


@pytest.mark.parametrize("fmt,structure", [("csr", "unstructured"), ("fan_in", "fan_in")])
def test_attention_under_autocast_as_nn_multihead_attention(fmt, structure):
    torch.manual_seed(0)
    model = Attn(batch_first=True)
    pruner, *_ = _train(model, structure, _attn_loss, steps=6)
    exp = pruner.export(fmt).eval()
    model.eval()
    assert all(exp.attn.formats[p] == fmt for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    x = torch.randn(3, 5, E, generator=torch.Generator().manual_seed(2))
    for need in (True, False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = exp.attn(x, x, x, need_weights=need), model.attn(x, x, x, need_weights=need)
        assert got[0].dtype == want[0].dtype == torch.bfloat16
        _close_attention(got[0], want[0])
        if need:
            _close_attention(got[1], want[1])
