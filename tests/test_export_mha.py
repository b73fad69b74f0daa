"""pruner.export() of nn.MultiheadAttention (SparseMultiheadAttention): outputs and attention weights equal the
masked dense nn.MultiheadAttention's (fp32 and bf16; fan_in and csr; bias or not; kdim/vdim equal to embed_dim
or not; batch_first or not; batched and unbatched; key_padding_mask none/bool/float; attn_mask none/2-D/3-D,
bool/float; is_causal; need_weights with average_attn_weights on and off); sparse in_proj with dense out_proj
and the reverse; nn.TransformerEncoder (batch_first or not) with its fused paths; dropout in train mode;
save/load; the training model untouched; unsupported configurations warn and stay dense; clear errors.

Bound (attention): every output of the attention is a softmax-weighted mix of projected values, so the
projections' own error (test_export.py's bound: 2 ulp(|y|) + 1e-6 sum|w x|) moves through the softmax to every
output of the same tensor. Checked: |diff| <= 2 ulp(|y|) + 4 eps(dtype) max|y|, max over the whole output
(or weights) tensor; eps is 2^-23 for fp32 (about 5e-7 max|y|), 2^-7 for bf16. Measured worst: 2.2 eps max|y|
beyond 2 ulp in fp32, 0.8 in bf16; the reference is torch's own nn.MultiheadAttention, on its fused fast path
where it takes it (eval, batch_first self-attention with bias).
"""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from rigl_fast import RigLScheduler
from rigl_fast.export import CSRLinear, FanInLinear, SparseMultiheadAttention

E, H, KD, VD = 32, 4, 24, 40


class Attn(nn.Module):
    """A dense first layer (uniform sparsity keeps the first candidate dense), then the attention."""

    def __init__(self, bias=True, kv=False, batch_first=False, **kw):
        super().__init__()
        self.kv = kv
        self.pre = nn.Linear(E, E)
        self.attn = nn.MultiheadAttention(E, H, bias=bias, kdim=KD if kv else None, vdim=VD if kv else None,
                                          batch_first=batch_first, **kw)

    def forward(self, x, k, v):
        h = self.pre(x)
        return self.attn(h, k if self.kv else h, v if self.kv else h)[0]


def _train(model, structure="unstructured", steps=6, **kw):
    """A few steps of a real RigLScheduler (masks updated at steps 2 and 4)."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=20, delta=2, ignore_linear_layers=False,
                           structure=structure, sparsity_distribution="uniform", **kw)
    g = torch.Generator().manual_seed(1)
    bf = model.attn.batch_first
    for _ in range(steps):
        shape = (4, 6) if bf else (6, 4)
        x, k, v = (torch.randn(*shape, d, generator=g) for d in (E, KD, VD))
        opt.zero_grad()
        model(x, k, v).square().mean().backward()
        if pruner():
            opt.step()
    return model, pruner


def _trained(structure, bias, kv, batch_first):
    torch.manual_seed(0)
    return _train(Attn(bias, kv, batch_first), structure)


def _close(got, want):
    """The bound in the module doc."""
    assert got.shape == want.shape and got.dtype == want.dtype
    eps = torch.finfo(want.dtype).eps
    g, w = got.float(), want.float()
    tol = 2 * eps * w.abs() + 4 * eps * w.abs().amax()
    assert bool(((g - w).abs() <= tol).all()), ((g - w).abs().max(), w.abs().amax())


# (batched, key_padding_mask, attn_mask, is_causal, need_weights, average_attn_weights); attn_mask "2b" is a
# 2-D bool mask, "3f" a 3-D float one, "causal" the 2-D causal bool mask
CALLS = [(True, None, None, False, False, True), (True, None, None, False, True, True),
         (True, None, None, False, True, False), (True, "bool", None, False, False, True),
         (True, "float", None, False, True, False), (True, None, "2b", False, False, True),
         (True, None, "3f", False, True, True), (True, "bool", "2b", False, True, True),
         (True, "float", "3f", False, False, True), (True, None, "causal", True, False, True),
         (True, "bool", "causal", True, False, True), (True, None, "causal", True, True, False),
         (False, None, None, False, True, True), (False, "bool", "3f", False, False, True),
         (False, "float", "causal", True, True, False), (False, None, "causal", True, False, True)]


def _inputs(g, dtype, kv, batch_first, batched, kpm, am):
    N, L = 3, 5
    S = 7 if kv else L

    def make(n, d):
        t = torch.randn(N, n, d, generator=g) if batch_first else torch.randn(n, N, d, generator=g)
        return (t if batched else t[0] if batch_first else t[:, 0]).to(dtype)

    q = make(L, E)
    k, v = (make(S, KD), make(S, VD)) if kv else (q, q)  # self-attention: one tensor, as torch's fast path wants
    pad = None
    if kpm is not None:
        b = torch.rand(N, S, generator=g) < 0.3
        b[:, 0] = False  # every query keeps a key
        pad = b if kpm == "bool" else torch.where(b, -1e4, 0.0).to(dtype)
        pad = pad if batched else pad[0]
    mask, heads = None, N * H if batched else H
    if am == "causal":
        mask = torch.ones(L, S, dtype=torch.bool).triu(1)
    elif am == "2b":
        mask = torch.rand(L, S, generator=g) < 0.3
        mask[:, 0] = False
    elif am == "3f":
        mask = (torch.randn(heads, L, S, generator=g) * 0.5).to(dtype)
    if mask is not None and pad is not None and mask.dtype != pad.dtype:  # torch deprecates mixing the kinds
        mask = torch.where(mask, float("-inf"), 0.0).to(dtype) if mask.dtype == torch.bool else mask
        pad = torch.where(pad, float("-inf"), 0.0).to(dtype) if pad.dtype == torch.bool else pad
    return q, k, v, pad, mask


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kv", [False, True], ids=["same_dim", "kdim_vdim"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,structure", [("fan_in", "fan_in"), ("csr", "unstructured")])
def test_outputs_equal_the_masked_attention(fmt, structure, dtype, bias, kv, batch_first):
    model, pruner = _trained(structure, bias, kv, batch_first)
    model.to(dtype).eval()  # the masked dense reference (RigL keeps the zeros in place)
    exp = pruner.export(fmt).eval()
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    assert exp.rigl_fast_formats == {f"attn.{p}": fmt for p in projections}
    assert isinstance(exp.attn, SparseMultiheadAttention) and exp.attn.formats == {p: fmt for p in projections}
    cls = FanInLinear if fmt == "fan_in" else CSRLinear
    assert all(isinstance(getattr(exp.attn, p), cls) for p in projections)
    assert isinstance(exp.pre, nn.Linear)  # the dense first layer stays
    g = torch.Generator().manual_seed(2)
    for batched, kpm, am, causal, need, avg in CALLS:
        q, k, v, pad, mask = _inputs(g, dtype, kv, batch_first, batched, kpm, am)
        kw = dict(key_padding_mask=pad, need_weights=need, attn_mask=mask, average_attn_weights=avg,
                  is_causal=causal)
        with torch.no_grad():
            want, got = model.attn(q, k, v, **kw), exp.attn(q, k, v, **kw)
        _close(got[0], want[0])
        assert (got[1] is None) == (want[1] is None) == (not need)
        if need:
            _close(got[1], want[1])
    # the whole model too
    with torch.no_grad():
        q, k, v, _, _ = _inputs(g, dtype, kv, batch_first, True, None, None)
        _close(exp(q, k, v), model(q, k, v))


def test_trained_model_untouched_formats_save_load(tmp_path):
    model, pruner = _train(Attn(batch_first=True), "fan_in")
    before = copy.deepcopy(model.state_dict())
    masks = [None if m is None else m.clone() for m in pruner.backward_masks]
    assert pruner.names == ["pre.weight", "attn.in_proj_weight", "attn.out_proj.weight"] and masks[0] is None
    rng = torch.random.get_rng_state()
    exp = pruner.export("auto")
    assert torch.equal(torch.random.get_rng_state(), rng)  # nothing initialised at random
    assert exp.rigl_fast_formats == {"attn.q_proj": "fan_in", "attn.k_proj": "fan_in", "attn.v_proj": "fan_in",
                                     "attn.out_proj": "fan_in"}
    # each block holds its rows of the trained weight: q_proj is rows [0, E) of in_proj_weight, and so on
    w, m = model.attn.in_proj_weight.detach(), pruner.backward_masks[1]
    for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
        blk, mb = w[i * E:(i + 1) * E], m[i * E:(i + 1) * E]
        proj = getattr(exp.attn, p)
        dense = torch.zeros_like(blk).scatter_(1, proj.indices.long(), proj.values)
        assert torch.equal(dense, torch.where(mb, blk, 0)) and torch.equal(proj.bias,
                                                                           model.attn.in_proj_bias[i * E:(i + 1) * E])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(a is None or torch.equal(a, b) for a, b in zip(masks, pruner.backward_masks))
    assert type(model.attn) is nn.MultiheadAttention and isinstance(model.attn.out_proj, nn.Linear)
    x = torch.randn(2, 6, E, generator=torch.Generator().manual_seed(3))
    exp.eval()
    with torch.no_grad():
        want, weights = exp.attn(x, x, x, need_weights=True)
    torch.save(exp, tmp_path / "whole.pt")
    with torch.no_grad():
        got = torch.load(tmp_path / "whole.pt", weights_only=False).attn(x, x, x, need_weights=True)
    assert torch.equal(got[0], want) and torch.equal(got[1], weights)
    # torch.load's default, weights_only=True: rigl_fast's classes are allowed by importing rigl_fast.export;
    # the caller allows the model's own (Attn) and torch's (nn.Linear, which the dense first layer still is)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "whole.pt")) == {
        f"{Attn.__module__}.Attn", "torch.nn.modules.linear.Linear"}
    with torch.serialization.safe_globals([Attn, nn.Linear]), torch.no_grad():
        got = torch.load(tmp_path / "whole.pt").attn(x, x, x, need_weights=True)
    assert torch.equal(got[0], want) and torch.equal(got[1], weights)
    torch.save(exp.state_dict(), tmp_path / "sd.pt")
    fresh = _train(Attn(batch_first=True), "fan_in", steps=2)[1].export("auto").eval()  # other weights and masks
    with torch.no_grad():
        assert not torch.equal(fresh.attn(x, x, x)[0], want)
        fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
        assert torch.equal(fresh.attn(x, x, x)[0], want)
    buf = io.BytesIO()
    torch.save(exp.attn.state_dict(), buf)
    assert set(exp.attn.state_dict()) == {f"{p}.{b}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
                                          for b in ("values", "indices", "bias")}


@pytest.mark.parametrize("sparse", ["out_proj", "in_proj"])
def test_one_side_sparse_the_other_dense(sparse):
    """in_proj_weight dense and out_proj sparse (include=...), or the reverse (exclude=...): the dense side is an
    nn.Linear with the trained weight, the sparse side a sparse module."""
    kw = dict(include=["pre", "attn.out_proj"]) if sparse == "out_proj" else dict(exclude=["attn.out_proj"])
    torch.manual_seed(0)
    model, pruner = _train(Attn(), "unstructured", **kw)
    exp = pruner.export("auto").eval()
    model.eval()
    want_formats = {"attn.out_proj": "csr"} if sparse == "out_proj" else {f"attn.{p}": "csr"
                                                                           for p in ("q_proj", "k_proj", "v_proj")}
    assert exp.rigl_fast_formats == want_formats
    dense = ["q_proj", "k_proj", "v_proj"] if sparse == "out_proj" else ["out_proj"]
    assert all(type(getattr(exp.attn, p)) is nn.Linear and exp.attn.formats[p] == "dense" for p in dense)
    if sparse == "out_proj":
        assert torch.equal(exp.attn.k_proj.weight, model.attn.in_proj_weight[E:2 * E])
    g = torch.Generator().manual_seed(4)
    for need in (True, False):
        x = torch.randn(5, 3, E, generator=g)
        with torch.no_grad():
            got, want = exp.attn(x, x, x, need_weights=need), model.attn(x, x, x, need_weights=need)
        _close(got[0], want[0])
        if need:
            _close(got[1], want[1])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's, from the reference's fast path
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder(batch_first):
    """nn.TransformerEncoder / nn.TransformerEncoderLayer run with the replaced attention (their fused fast paths,
    which read dense .weight tensors, turned off), against the masked dense model on its own fast path where it
    takes it; with src_key_padding_mask (torch's nested-tensor path zeroes padded positions: compared elsewhere)
    and a causal mask. Also with the attention dense and only linear1/linear2 sparse."""
    for exclude in (None, ["*.self_attn"]):
        torch.manual_seed(0)
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=batch_first), 2,
                                    enable_nested_tensor=batch_first)
        opt = torch.optim.SGD(enc.parameters(), lr=0.1)
        pruner = RigLScheduler(enc, opt, dense_allocation=0.3, T_end=20, delta=2, ignore_linear_layers=False,
                               sparsity_distribution="uniform", exclude=exclude)
        g = torch.Generator().manual_seed(5)
        for _ in range(5):
            opt.zero_grad()
            enc(torch.randn(4, 6, E, generator=g)).square().mean().backward()
            if pruner():
                opt.step()
        exp = pruner.export("csr").eval()
        enc.eval()
        attn_formats = {k for k in exp.rigl_fast_formats if ".self_attn." in k}
        linear = {k for k in exp.rigl_fast_formats if ".linear" in k}
        if exclude is None:  # the first candidate, layer 0's in_proj_weight, is dense: its out_proj is sparse
            assert attn_formats == {"layers.0.self_attn.out_proj"} | {f"layers.1.self_attn.{p}" for p in
                                                                       ("q_proj", "k_proj", "v_proj", "out_proj")}
            assert linear == {f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)}
            assert all(isinstance(layer.self_attn, SparseMultiheadAttention) for layer in exp.layers)
        else:
            assert not attn_formats and all(type(layer.self_attn) is nn.MultiheadAttention for layer in exp.layers)
            assert linear == {"layers.0.linear2", "layers.1.linear1", "layers.1.linear2"}  # linear1: the first
        assert all(layer.activation_relu_or_gelu == 0 for layer in exp.layers) and not exp.use_nested_tensor
        assert all(layer.activation_relu_or_gelu == 1 for layer in enc.layers)  # the training model's keep it
        x = torch.randn(3, 7, E, generator=g)
        if not batch_first:
            x = x.transpose(0, 1).contiguous()
        pad = torch.zeros(3, 7, dtype=torch.bool)
        pad[0, 5:], pad[2, 3:] = True, True
        causal = nn.Transformer.generate_square_subsequent_mask(7)
        with torch.no_grad():
            _close(exp(x), enc(x))
            _close(exp(x, mask=causal, is_causal=True), enc(x, mask=causal, is_causal=True))
            got, want = exp(x, src_key_padding_mask=pad), enc(x, src_key_padding_mask=pad)
            keep = ~pad if batch_first else ~pad.t()
            _close(got[keep], want[keep])
            if not batch_first:  # no nested path: the padded positions are computed by both
                _close(got, want)


def test_transformer_with_decoder_cross_attention():
    """nn.Transformer: the decoder's self- and cross-attention (query from the decoder, key/value from the memory)
    replaced too, with a causal target mask."""
    torch.manual_seed(0)
    model = nn.Transformer(E, H, 1, 1, 64, dropout=0.0, batch_first=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=20, delta=2, ignore_linear_layers=False,
                           sparsity_distribution="uniform")
    g = torch.Generator().manual_seed(9)
    src, tgt = torch.randn(2, 7, E, generator=g), torch.randn(2, 5, E, generator=g)
    for _ in range(4):
        opt.zero_grad()
        model(src, tgt).square().mean().backward()
        if pruner():
            opt.step()
    exp = pruner.export("csr").eval()
    model.eval()
    assert {f"decoder.layers.0.multihead_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= set(
        exp.rigl_fast_formats)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        _close(exp(src, tgt, tgt_mask=causal, tgt_is_causal=True), model(src, tgt, tgt_mask=causal, tgt_is_causal=True))


def test_dropout_in_train_mode_as_torch():
    """dropout > 0: off in eval; in train mode applied as torch applies it (same calls, so the same draws from
    the same seed)."""
    torch.manual_seed(0)
    model, pruner = _train(Attn(dropout=0.5), "unstructured")
    exp = pruner.export("csr")
    x = torch.randn(5, 3, E, generator=torch.Generator().manual_seed(6))
    for train in (True, False):
        model.train(train)
        exp.train(train)
        for need in (True, False):
            with torch.no_grad():
                torch.manual_seed(7)
                want = model.attn(x, x, x, need_weights=need)
                torch.manual_seed(7)
                got = exp.attn(x, x, x, need_weights=need)
            _close(got[0], want[0])
            if need:
                _close(got[1], want[1])
                if train:  # dropout did act: zeroed weights, and rows no longer summing to 1
                    w = exp.attn(x, x, x, need_weights=True, average_attn_weights=False)[1]
                    assert bool((w == 0).any()) and not torch.allclose(w.sum(-1), torch.ones(()))


class MyAttention(nn.MultiheadAttention):
    """Its own forward (the same result here, but export cannot know that)."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class PlainAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention's forward under another name: replaced like the base class."""


@pytest.mark.parametrize("kind", ["add_bias_kv", "add_zero_attn", "subclass"])
def test_unsupported_configurations_warn_and_stay_dense(kind):
    torch.manual_seed(0)
    model = Attn(**{"add_bias_kv": dict(add_bias_kv=True), "add_zero_attn": dict(add_zero_attn=True)}.get(kind, {}))
    if kind == "subclass":
        model.attn = MyAttention(E, H)
    model, pruner = _train(model, "unstructured")
    assert "attn.in_proj_weight" in pruner.names and "attn.out_proj.weight" in pruner.names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = pruner.export("csr")
    msgs = [str(w.message) for w in caught if str(w.message).startswith("export:")]
    why = {"add_bias_kv": "add_bias_kv", "add_zero_attn": "add_zero_attn", "subclass": "MyAttention.forward"}[kind]
    assert len(msgs) == 1 and "'attn'" in msgs[0] and "stay as they are" in msgs[0] and why in msgs[0]
    assert list(exp.rigl_fast_kept) == ["attn"] and why in exp.rigl_fast_kept["attn"]
    assert type(exp.attn) is type(model.attn) and type(exp.attn.out_proj) is type(model.attn.out_proj)
    assert exp.rigl_fast_formats == {}  # 'pre' is the dense first layer
    x = torch.randn(5, 3, E, generator=torch.Generator().manual_seed(8))
    model.eval()
    exp.eval()
    with torch.no_grad():
        assert torch.equal(exp(x, x, x), model(x, x, x))


def test_subclass_with_the_base_forward_is_replaced():
    torch.manual_seed(0)
    model = Attn()
    model.attn = PlainAttention(E, H)
    model, pruner = _train(model, "unstructured")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = pruner.export("csr").eval()
    assert not [w for w in caught if str(w.message).startswith("export:")] and exp.rigl_fast_kept == {}
    assert isinstance(exp.attn, SparseMultiheadAttention) and len(exp.rigl_fast_formats) == 4
    x = torch.randn(5, 3, E, generator=torch.Generator().manual_seed(8))
    model.eval()
    with torch.no_grad():
        _close(exp(x, x, x), model(x, x, x))


def test_errors():
    model, pruner = _trained("unstructured", True, False, False)
    with pytest.raises(ValueError, match="format='fan_in': layer 'attn.in_proj_weight'"):
        pruner.export("fan_in")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="semi_structured.*'attn.in_proj_weight'.*CUDA"):
            pruner.export("semi_structured")
    exp = pruner.export("csr").eval()
    x = torch.randn(5, 3, E)
    cases = [(dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.int64)), "key_padding_mask must be a bool"),
             (dict(key_padding_mask=torch.zeros(3, dtype=torch.bool)), "key_padding_mask must be None or 2-D"),
             (dict(key_padding_mask=torch.zeros(3, 4, dtype=torch.bool)), r"key_padding_mask must have shape \(3, 5\)"),
             (dict(attn_mask=torch.zeros(5, 4, dtype=torch.bool)), r"attn_mask of a 2-D shape must be \(5, 5\)"),
             (dict(attn_mask=torch.zeros(5, 5, 5, 5)), "attn_mask must be None, 2-D or 3-D"),
             (dict(is_causal=True), "is_causal needs attn_mask")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            exp.attn(x, x, x, **kw)
    with pytest.raises(ValueError, match="query's last dimension must be embed_dim=32"):
        exp.attn(x[..., :16], x, x)
    with pytest.raises(ValueError, match="query must be 2-D"):
        exp.attn(x[None], x[None], x[None])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="needs a CUDA device with sparse tensor cores")
def test_semi_structured_attention_on_cuda():
    """2:4-trained projections on sparse tensor cores, each row block of in_proj_weight its own 2:4 weight."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.pre = nn.Linear(128, 128)
    model.attn = nn.MultiheadAttention(128, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = RigLScheduler(model, opt, dense_allocation=0.5, T_end=20, delta=4, ignore_linear_layers=False,
                           structure="2:4", sparsity_distribution="uniform")
    model.cuda().half().eval()
    exp = pruner.export("semi_structured").eval()
    assert set(exp.rigl_fast_formats.values()) == {"semi_structured"} and len(exp.rigl_fast_formats) == 4
    x = torch.randn(64, 2, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        got, want = exp.attn(x, x, x, need_weights=False)[0].float(), model.attn(x, x, x, need_weights=False)[0].float()
    assert ((got - want).abs() <= 1e-2 * (1 + want.abs())).all(), (got - want).abs().max()
