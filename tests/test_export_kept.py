"""One candidate rule for training and export (layers.kind / layers.own_forward): a Linear-like layer whose forward
is not its base type's is trained sparse like any candidate, but export() keeps it as it is (a replacement would
compute nn.Linear's function instead of its own), names it in a warning and in `exported.rigl_fast_kept` with the
reason; subclasses that keep the base forward are replaced as before (issue 21 item 4)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_fast import RigLScheduler
from rigl_fast import layers
from helpers import tiny_gpt2
from rigl_fast.export import CSRLinear


class Scaled(nn.Linear):
    """Its own forward: twice nn.Linear's."""

    def forward(self, x):
        return 2 * super().forward(x)


class Plain(nn.Linear):
    """A subclass with nn.Linear's forward (only a new name)."""


class Net(nn.Module):
    def __init__(self, head):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.ModuleList([nn.Linear(12, 24), nn.ReLU(), head, nn.ReLU(), nn.Linear(24, 5),
                                   nn.Conv1d(1, 2, 3)])

    def forward(self, x):
        b = self.body
        return b[4](b[3](b[2](b[1](b[0](x))))) + b[5](x[:, None, :7]).sum((1, 2))[:, None]


def _trained(head):
    model = Net(head)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=20, delta=3, ignore_linear_layers=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(8, 12, generator=g)), torch.zeros(8, 5)).backward()
        if pruner():
            opt.step()
    return model, pruner


def _export(pruner):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = pruner.export("csr")
    return exp, [str(w.message) for w in caught if str(w.message).startswith("export:")]


def test_linear_subclass_with_its_own_forward_is_trained_sparse_and_kept_at_export():
    model, pruner = _trained(Scaled(24, 24))
    assert "body.2.weight" in pruner.names and pruner.S[pruner.names.index("body.2.weight")] > 0  # trained sparse
    exp, msgs = _export(pruner)
    assert type(exp.body[2]) is Scaled and type(exp.body[4]) is CSRLinear  # the plain Linear is replaced
    assert exp.rigl_fast_formats == {"body.4": "csr"}
    assert set(exp.rigl_fast_kept) == {"body.2", "body.5"}
    assert "Scaled" in exp.rigl_fast_kept["body.2"] and "Scaled.forward" in exp.rigl_fast_kept["body.2"]
    assert exp.rigl_fast_kept["body.5"].startswith("a convolution")
    assert len(msgs) == 1 and "'body.2'" in msgs[0] and "Scaled" in msgs[0] and "body.5" not in msgs[0]
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(exp(x), model(x), rtol=1e-5, atol=1e-5)  # Scaled's doubling kept


def test_subclass_with_the_base_forward_is_replaced_without_a_word():
    model, pruner = _trained(Plain(24, 24))
    exp, msgs = _export(pruner)
    assert type(exp.body[2]) is CSRLinear and exp.rigl_fast_formats == {"body.2": "csr", "body.4": "csr"}
    assert msgs == [] and set(exp.rigl_fast_kept) == {"body.5"}
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(exp(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["instance_forward", "forward_hook", "pre_hook"])
def test_a_forward_changed_on_the_instance_or_by_hooks_is_kept(how):
    head = nn.Linear(24, 24)
    if how == "instance_forward":
        head.forward = lambda x: 3 * F.linear(x, head.weight, head.bias)
    elif how == "forward_hook":
        head.register_forward_hook(lambda mod, args, out: out * 3)
    else:
        head.register_forward_pre_hook(lambda mod, args: (args[0] * 3,))
    model, pruner = _trained(head)
    if how == "instance_forward":  # deepcopy would keep the lambda's reference to the training model's head
        pruner.model = model
    exp, msgs = _export(pruner)
    why = {"instance_forward": "replaced on the instance", "forward_hook": "forward hooks",
           "pre_hook": "forward hooks"}[how]
    assert why in exp.rigl_fast_kept["body.2"] and len(msgs) == 1 and why in msgs[0]
    assert type(exp.body[2]) is nn.Linear
    if how != "instance_forward":
        x = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(exp(x), model(x), rtol=1e-5, atol=1e-5)


class Conv1D(nn.Module):
    """transformers' Conv1D as GPT-2 has it (weight stored (in, out), `nf`), recognised by name like the real
    one; test_export.test_conv1d_and_leading_dims runs the real class."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class GatedConv1D(Conv1D):
    def forward(self, x):
        return torch.sigmoid(super().forward(x))


def test_one_rule_for_training_and_export():
    """layers.kind decides both the candidates and what export replaces: the Conv1D-like layer is transposed in
    training and replaced at export; its subclass with another forward is trained sparse and kept."""
    for head, replaced in ((Conv1D(24, 24), True), (GatedConv1D(24, 24), False)):
        assert layers.kind(head) == layers.CONV1D and layers.weight_slots(head) == [("weight", True)]
        assert (layers.own_forward(head) is None) == replaced
        model, pruner = _trained(head)
        i = pruner.names.index("body.2.weight")
        assert pruner._transposed[i] and pruner.S[i] > 0
        exp, msgs = _export(pruner)
        assert ("body.2" in exp.rigl_fast_formats) == replaced and ("body.2" in exp.rigl_fast_kept) != replaced
        assert len(msgs) == (0 if replaced else 1)
        x = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(exp(x), model(x), rtol=1e-5, atol=1e-5)
    assert layers.kind(nn.Conv2d(1, 1, 1)) == layers.CONV and layers.kind(nn.LayerNorm(3)) is None
    assert layers.kind(nn.MultiheadAttention(8, 2)) == layers.ATTENTION


def test_gpt2_with_a_conv1d_subclass_of_its_own_forward():
    """The real transformers Conv1D: GPT-2's Conv1D layers are replaced, one swapped for a subclass with its own
    forward is trained sparse and kept, and the exported logits equal the model's."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D as HFConv1D

    class Gated(HFConv1D):
        def forward(self, x):
            return torch.sigmoid(super().forward(x))

    model = tiny_gpt2().eval()
    model.transformer.h[0].mlp.c_fc = Gated(128, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, dense_allocation=0.25, T_end=8, delta=2, ignore_linear_layers=False)
    name = "transformer.h.0.mlp.c_fc"
    assert pruner.S[pruner.names.index(name + ".weight")] > 0
    exp, msgs = _export(pruner)
    assert set(exp.rigl_fast_kept) == {name} and "Gated" in exp.rigl_fast_kept[name] and len(msgs) == 1
    assert set(exp.rigl_fast_formats) == {"transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"}
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(exp(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
