"""The models people train today (issue 11): transformers' GPT-2 (Conv1D, tied head), nn.MultiheadAttention,
frozen / parametrized / lazy / meta weights, include= / exclude=, atomic construction, pickling, optimizer
wrappers (Accelerate), and the invariant when something outside the hooks changes weights or gradients.
Tiny models built from configs; nothing is downloaded."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import MLP, SmallResNet, batches, train, trained_model_and_adam
from rigl_fast import RigLScheduler

transformers = pytest.importorskip("transformers")  # in the test extra: missing only outside `.[test]`


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def lm_batches(n, seed=0, batch=4, length=16, vocab=64):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randint(0, vocab, (batch, length), generator=g)


def off_mask_zero(pruner, optimizer):
    """Every sparse weight and every optimizer state shaped like it is exactly 0 off the mask."""
    for w, m in zip(pruner.W, pruner.backward_masks):
        if m is None:
            continue
        tensors = [w] + [v for v in optimizer.state.get(w, {}).values()
                         if isinstance(v, torch.Tensor) and v.shape == w.shape]
        if not all(bool((t[~m] == 0).all()) for t in tensors):
            return False
    return True


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# ---------------------------------------------------------------- GPT-2 and attention

def test_gpt2_tied_head_made_sparse_on_request():
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=16, delta=4, ignore_linear_layers=False,
                           sparsify_tied=True)
    assert pruner.names[-1] == "lm_head.weight" and pruner.backward_masks[-1] is not None
    assert pruner.skipped_layers == []


def test_gpt2_conv1d_weights_are_sparse_and_the_tied_embedding_is_untouched():
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=16, delta=4, ignore_linear_layers=False)
    blocks = [f"transformer.h.{i}.{p}.weight" for i in range(2)
              for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert pruner.names == blocks
    assert "lm_head.weight" not in pruner.names
    assert [k.name for k in pruner.skipped_layers] == ["lm_head.weight"]
    assert pruner.skipped_layers[0].reason == "tied to transformer.wte.weight"
    assert "tied to transformer.wte.weight" in str(pruner)
    init = [None if m is None else m.clone() for m in pruner.backward_masks]
    assert sum(m is not None for m in init) == 7  # the first candidate stays dense (rigl-torch's rule)
    for ids in lm_batches(12):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if pruner():
            opt.step()
        assert off_mask_zero(pruner, opt)
    assert pruner.rigl_steps == 3
    assert all(not torch.equal(a, b) for a, b in zip(init, pruner.backward_masks) if a is not None)
    for s, m in zip(pruner.S, pruner.backward_masks):
        if m is not None:
            assert int(m.sum()) == m.numel() - int(s * m.numel())
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte and int((wte == 0).sum()) == 0


def test_gpt2_include_and_exclude_patterns():
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4, ignore_linear_layers=False,
                           exclude=["*.mlp.*"])
    assert pruner.names == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                            "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"]
    excluded = [k.name for k in pruner.skipped_layers if k.reason == "excluded"]
    assert excluded == [f"transformer.h.{i}.mlp.{p}.weight" for i in range(2) for p in ("c_fc", "c_proj")]
    assert all(int((model.get_submodule(n[:-len(".weight")]).weight == 0).sum()) == 0 for n in excluded)
    pruner.remove()

    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4, ignore_linear_layers=False,
                           include=["transformer.h.1.*"])
    assert pruner.names == [f"transformer.h.1.{p}.weight" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")]
    pruner.remove()

    with pytest.warns(UserWarning, match=r"exclude='\*\.nothing\.\*' matches no module"):
        RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4, ignore_linear_layers=False,
                      exclude=["*.nothing.*"]).remove()


@pytest.mark.parametrize("bad", ["lm_head", [3], ("ok", None)])
def test_pattern_type_errors_name_the_argument_and_change_nothing(bad):
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="exclude must be a list of glob patterns"):
        RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4, exclude=bad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)


def test_transformer_encoder_packed_attention_projection_is_sparse():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, dense_allocation=0.25, T_end=16, delta=4, ignore_linear_layers=False)
    assert pruner.names == ["0.weight", "1.self_attn.in_proj_weight", "1.self_attn.out_proj.weight",
                            "1.linear1.weight", "1.linear2.weight", "2.weight"]
    in_proj = pruner.names.index("1.self_attn.in_proj_weight")
    start = pruner.backward_masks[in_proj].clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y = torch.randn(8, 5, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x).mean(1), y).backward()
        if pruner():
            opt.step()
        assert off_mask_zero(pruner, opt)
    assert not torch.equal(start, pruner.backward_masks[in_proj])
    assert int((layer.self_attn.in_proj_weight == 0).sum()) >= int(0.75 * 48 * 16)


def test_attention_with_separate_q_k_v_projections():
    mha = nn.MultiheadAttention(embed_dim=8, num_heads=2, kdim=6, vdim=4)
    model = nn.ModuleDict({"attn": mha})
    pruner = RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), dense_allocation=0.5, T_end=16,
                           delta=4, ignore_linear_layers=False)
    assert pruner.names == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                            "attn.out_proj.weight"]


# ---------------------------------------------------------------- frozen, parametrized, lazy, meta

def test_frozen_layer_is_skipped_and_untouched():
    torch.manual_seed(0)
    model = SmallResNet()
    model.conv1.weight.requires_grad_(False)  # a frozen stem
    stem = model.conv1.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4)
    assert "conv1.weight" not in pruner.names
    assert any(k.name == "conv1.weight" and k.reason == "frozen" for k in pruner.skipped_layers)
    assert "dense: frozen" in pruner.summary()
    train(model, opt, pruner, batches(10))
    assert pruner.rigl_steps == 2 and torch.equal(model.conv1.weight, stem)
    assert off_mask_zero(pruner, opt)


def test_parametrized_weight_is_refused_naming_the_layer_unless_excluded():
    model = MLP()
    torch.nn.utils.parametrizations.weight_norm(model.layers[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"layer 'layers\.1\.weight'.*parametrization"):
        RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4, ignore_linear_layers=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    p = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4, ignore_linear_layers=False,
                      exclude=["layers.1"])
    assert p.names == ["layers.0.weight", "layers.2.weight"]
    p.remove()
    for q in model.layers[1].parametrizations.weight.parameters():  # frozen: skipped like any frozen weight
        q.requires_grad_(False)
    p = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4, ignore_linear_layers=False)
    assert p.names == ["layers.0.weight", "layers.2.weight"]
    assert [(k.name, k.reason) for k in p.skipped_layers] == [("layers.1.weight", "frozen")]


def test_lazy_and_meta_weights_are_refused_naming_the_layer():
    lazy = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"layer '1\.weight' is lazy"):
        RigLScheduler(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), dense_allocation=0.5, T_end=16, delta=4)
    with torch.device("meta"):
        meta = MLP()
    with pytest.raises(ValueError, match=r"layer 'layers\.0\.weight' is on the meta device"):
        RigLScheduler(meta, torch.optim.SGD(meta.parameters(), lr=0.1), dense_allocation=0.5, T_end=16, delta=4)


# ---------------------------------------------------------------- atomic construction, pickling

class RefusingSGD(torch.optim.SGD):
    """An optimizer that refuses step hooks (as some wrappers do)."""

    def register_step_post_hook(self, hook):
        raise RuntimeError("this optimizer takes no step hooks")


class NoHookParameter(nn.Parameter):
    """A parameter whose register_hook fails (as some quantized parameter types do)."""

    def register_hook(self, hook):
        raise RuntimeError("no hooks on this parameter")


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], torch.random.get_rng_state(),
            len(opt._optimizer_step_post_hooks))


def _unchanged(model, opt, snap):
    weights, rng, n_hooks = snap
    return (all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
            and torch.equal(rng, torch.random.get_rng_state()) and len(opt._optimizer_step_post_hooks) == n_hooks
            and all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None))


def test_failed_construction_changes_nothing_and_a_retry_works():
    torch.manual_seed(0)
    model = SmallResNet()
    kw = dict(dense_allocation=0.3, T_end=16, delta=4)
    bad = RefusingSGD(model.parameters(), lr=0.1)
    snap = _snapshot(model, bad)
    with pytest.raises(RuntimeError, match="takes no step hooks"):
        RigLScheduler(model, bad, **kw)
    assert _unchanged(model, bad, snap)

    # a failure after some hooks were registered (the 3rd weight refuses): every one is removed again
    w = model.layer1.conv2.weight
    model.layer1.conv2.weight = NoHookParameter(w.detach().clone())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="no hooks on this parameter"):
        RigLScheduler(model, opt, **kw)
    assert _unchanged(model, opt, snap)

    model.layer1.conv2.weight = nn.Parameter(w.detach().clone())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, **kw)  # the retry works: nothing says "already registered"
    train(model, opt, pruner, batches(8))
    assert pruner.rigl_steps == 2 and off_mask_zero(pruner, opt)


def test_pickled_model_carries_no_registration_and_the_scheduler_refuses_pickling():
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy_ = torch.load(buf, weights_only=False)
    p2 = RigLScheduler(copy_, torch.optim.SGD(copy_.parameters(), lr=0.1), dense_allocation=0.3, T_end=16, delta=4)
    assert len(p2.W) == len(pruner.W)
    with pytest.raises(ValueError, match="already registered"):
        RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4)
    for save in (lambda: torch.save(pruner, io.BytesIO()), lambda: pickle.dumps(pruner),
                 lambda: copy.deepcopy(pruner)):
        with pytest.raises(TypeError, match=r"state_dict\(\)"):
            save()


# ---------------------------------------------------------------- optimizer wrappers

def test_accelerate_prepared_optimizer():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    assert not hasattr(opt, "_optimizer_step_post_hooks")  # the wrapper that used to raise AttributeError
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4)
    for x, y in batches(10):
        opt.zero_grad()
        acc.backward(F.cross_entropy(model(x), y))
        for w in pruner.W:  # noise after the hooks ran: only the after-step pass keeps the invariant
            w.grad.add_(0.01)
        if pruner():
            opt.step()
        assert off_mask_zero(pruner, opt.optimizer)
    assert pruner.rigl_steps == 2


def test_not_an_optimizer_says_what_to_pass():
    model = MLP()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        RigLScheduler(model, object(), dense_allocation=0.3, T_end=16, delta=4)


# ---------------------------------------------------------------- the invariant under outside changes

def _dense_checkpoint():
    donor, opt = trained_model_and_adam(seed=1, data_seed=5)
    return donor.state_dict(), opt.state_dict()


@pytest.mark.parametrize("outside", ["load_weights", "grad_noise", "grad_replaced", "load_optimizer_state"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_invariant_holds_after_every_step_whatever_changed_outside(outside, opt_name):
    torch.manual_seed(0)
    model = SmallResNet()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[opt_name]
    opt = make(model.parameters())
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=8, delta=4)  # steps past T_end too
    weights, opt_state = _dense_checkpoint()
    g = torch.Generator().manual_seed(9)
    for step, (x, y) in enumerate(batches(12)):
        if outside == "load_weights" and step == 1:
            model.load_state_dict(weights)
        if outside == "load_optimizer_state" and step == 1 and opt_name == "adam":
            opt.load_state_dict(opt_state)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for w in pruner.W:
            if outside == "grad_noise":
                w.grad.add_(torch.randn(w.shape, generator=g) * 1e-2)
            elif outside == "grad_replaced":
                w.grad = torch.randn(w.shape, generator=g)
        if pruner():
            opt.step()
            assert off_mask_zero(pruner, opt), f"step {pruner.step}: nonzero off the mask"


def test_trusted_fast_path_is_what_breaks_there():
    """The opt-in after_step='trusted' skips the after-step pass: exactly the setups above break it, which is
    why it is not the default (and this test shows the check above can fail)."""
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=8, delta=4, after_step="trusted")
    model.load_state_dict(_dense_checkpoint()[0])
    train(model, opt, pruner, batches(3))
    assert not off_mask_zero(pruner, opt)


# ---------------------------------------------------------------- configurations that do nothing

def test_warnings_for_configurations_that_do_nothing():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="no layer of the model is sparse.*ignore_linear_layers=True"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=100, delta=10).remove()
    with pytest.warns(UserWarning, match="no layer of the model is sparse.*dense_allocation=1"):
        RigLScheduler(model, opt, T_end=100, delta=10, ignore_linear_layers=False).remove()
    with pytest.warns(UserWarning, match=r"T_end=10 <= delta=10"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=10, delta=10, ignore_linear_layers=False).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a working configuration warns about nothing
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=100, delta=10, ignore_linear_layers=False).remove()
    with pytest.warns(UserWarning, match=r"sparsify_tied=True changes nothing"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=100, delta=10, ignore_linear_layers=False,
                      sparsify_tied=True).remove()
    nadam = torch.optim.NAdam(model.parameters())
    with pytest.warns(UserWarning, match=r"after_step='trusted' changes nothing with NAdam"):
        RigLScheduler(model, nadam, dense_allocation=0.1, T_end=100, delta=10, ignore_linear_layers=False,
                      after_step="trusted").remove()
    with pytest.raises(ValueError, match=r"^delta must be an integer >= 2"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=100, delta=1, ignore_linear_layers=False)


def test_summary_says_why_each_dense_layer_is_dense():
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = quiet(RigLScheduler, model, opt, dense_allocation=0.3, T_end=16, delta=4, exclude=["*.h.1.mlp"])
    text = str(pruner)
    assert text.startswith("RigLScheduler(\nlayers=6,")
    lines = {ln.split()[0]: ln for ln in pruner.summary().splitlines()[1:]}
    assert lines["transformer.h.0.attn.c_attn.weight"].endswith("dense: first layer")
    assert lines["transformer.h.0.attn.c_proj.weight"].endswith("dense: ignore_linear_layers")
    assert lines["transformer.h.1.mlp.c_fc.weight"].endswith("dense: excluded")
    assert lines["lm_head.weight"].endswith("dense: tied to transformer.wte.weight")
    assert "(32, 96)" in lines["transformer.h.0.attn.c_attn.weight"]


# ---------------------------------------------------------------- devices and dtypes

def test_model_converted_inside_the_window_keeps_working():
    """`.to(dtype)` after construction, between two backward passes of an accumulation window."""
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4, grad_accumulation_n=2,
                           backend="reference")
    data = list(batches(8))
    train(model, opt, pruner, data[:3])  # the third backward (step 2) is the window's first
    assert any(h.dense_grad is not None for h in pruner.backward_hook_objects)
    model.double()
    train(model, opt, pruner, [(x.double(), y) for x, y in data[3:]])
    assert pruner.rigl_steps == 2 and pruner.skipped_updates == 0
    assert all(w.dtype == torch.float64 for w in pruner.W) and off_mask_zero(pruner, opt)


def test_model_converted_with_swapped_parameters():
    """`module.to()` under torch.__future__'s swap mode swaps each parameter's contents in place
    (torch.utils.swap_tensors), which refuses tensors that have weak references."""
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        torch.manual_seed(0)
        model = SmallResNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4)
        data = [(x.double(), y) for x, y in batches(10)]
        train(model, opt, pruner, [(x.float(), y) for x, y in data[:2]])
        start = [m.clone() for m in pruner.backward_masks if m is not None]
        model.double()  # every weight gets a new tensor underneath; torch drops their hooks
        grads_masked = []

        def check(when):
            if when == "after_backward" and pruner.step >= 3:
                grads_masked.append(all(bool((w.grad[~m] == 0).all())
                                        for w, m in zip(pruner.W, pruner.backward_masks) if m is not None))
        with pytest.warns(RuntimeWarning, match="re-attached them at step 2"):
            train(model, opt, pruner, data[2:], on_step=check)
        assert grads_masked and all(grads_masked), "a backward pass after the re-attachment went unmasked"
        assert pruner.rigl_steps == 2 and pruner.skipped_updates == 0 and off_mask_zero(pruner, opt)
        assert all(not torch.equal(a, b) for a, b in zip(start, (m for m in pruner.backward_masks if m is not None)))
        with pytest.raises(ValueError, match="already registered"):
            RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving a model between devices needs a CUDA device")
def test_model_moved_to_another_device_after_construction():
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=16, delta=4)
    model.cuda()
    train(model, opt, pruner, batches(8, device="cuda"))
    assert all(m.device.type == "cuda" for m in pruner.backward_masks if m is not None)
    assert pruner.rigl_steps == 2 and off_mask_zero(pruner, opt)
