"""pruner.export() (issue 15): outputs equal the masked dense model for each format, batch sizes 1/7/64, fp32
and bf16, odd shapes, Linear and transformers' Conv1D; the training model and scheduler untouched; save/load
round trips (whole module, and a weights_only state dict); torch.compile; clear errors.

Bound: each output is accumulated in fp32 and rounded once to the input's dtype, so it differs from the
dense layer's (also fp32-accumulated) result by the fp32 summation-order error plus at most one rounding of
the output dtype: |diff| <= 2 ulp(|y|) in the output dtype + 1e-6 * sum|w x| (checked below).
"""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_fast import RigLScheduler
from rigl_fast.export import CSRLinear, FanInLinear
from helpers import cpp_unavailable, tiny_gpt2


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(37, 64)
        self.b = nn.Linear(64, 101)
        self.c = nn.Linear(101, 11, bias=False)
        self.conv = nn.Conv1d(1, 3, 3)

    def forward(self, x):
        h = F.relu(self.b(F.relu(self.a(x))))
        return self.c(h) + self.conv(x[:, None, :11]).sum((1, 2))[:, None]


def _trained(structure="unstructured", dtype=torch.float32, density=0.1):
    torch.manual_seed(0)
    model = Odd()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = RigLScheduler(model, opt, dense_allocation=density, T_end=20, delta=4, ignore_linear_layers=False,
                           structure=structure, sparsity_distribution="uniform")
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randn(16, 37, generator=g), torch.randint(0, 11, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if pruner():
            opt.step()
    return model.to(dtype), pruner


def _close(got, want, x_scale):
    eps = torch.finfo(want.dtype).eps
    tol = 2 * eps * want.float().abs() + 1e-6 * x_scale
    assert bool(((got.float() - want.float()).abs() <= tol).all()), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("fmt,structure", [("csr", "unstructured"), ("csr", "fan_in"), ("fan_in", "fan_in"),
                                           ("auto", "fan_in"), ("auto", "unstructured")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_equal_the_masked_model(fmt, structure, dtype):
    model, pruner = _trained(structure, dtype)
    before = copy.deepcopy(model.state_dict())
    masks = [None if m is None else m.clone() for m in pruner.backward_masks]
    exp = pruner.export(fmt)
    want_fmt = {"csr": "csr", "fan_in": "fan_in"}.get(fmt, "fan_in" if structure == "fan_in" else "csr")
    assert exp.rigl_fast_formats == {"b": want_fmt, "c": want_fmt}  # 'a' is dense (first layer), conv left as is
    assert isinstance(exp.b, {"csr": CSRLinear, "fan_in": FanInLinear}[want_fmt]) and isinstance(exp.conv, nn.Conv1d)
    g = torch.Generator().manual_seed(2)
    for batch in (1, 7, 64):
        x = torch.randn(batch, 37, generator=g).to(dtype)
        with torch.no_grad():
            _close(exp(x), model(x), float(x.float().abs().sum(1).max()))
    # the training model and its scheduler are untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(a is None or torch.equal(a, b) for a, b in zip(masks, pruner.backward_masks))
    assert isinstance(model.b, nn.Linear) and pruner.model is model


@pytest.mark.parametrize("fmt,structure", [("csr", "unstructured"), ("fan_in", "fan_in")])
def test_a_non_finite_input_reaches_only_the_outputs_of_its_active_weights(fmt, structure):
    """As the README says: an inf input feature makes non-finite exactly the outputs whose active weights read it
    (the masked dense layer's 0 * inf makes all of them NaN), at batch 1 and batched."""
    model, pruner = _trained(structure)
    exp = pruner.export(fmt)
    mask = pruner.backward_masks[[i for i, w in enumerate(pruner.W) if w is model.b.weight][0]]
    x = torch.randn(5, 64)
    x[2, 9] = float("inf")
    for batch, row in ((x, 2), (x[2:3], 0)):
        with torch.no_grad():
            bad = ~torch.isfinite(exp.b(batch))
        assert torch.equal(bad[row], mask[:, 9]) and 0 < int(bad.sum()) < 101
    with torch.no_grad():
        assert not torch.isfinite(model.b(x)[2]).any()


def test_conv1d_and_leading_dims():
    model = tiny_gpt2().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, dense_allocation=0.25, T_end=8, delta=2, ignore_linear_layers=False,
                           structure="fan_in")
    exp = pruner.export()
    assert set(exp.rigl_fast_formats.values()) == {"fan_in"} and len(exp.rigl_fast_formats) == 3
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(exp(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_load_and_compile(tmp_path):
    model, pruner = _trained("fan_in")
    exp = pruner.export("auto")
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = exp(x)
    torch.save(exp, tmp_path / "whole.pt")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "whole.pt", weights_only=False)(x), want)
    # torch.load's default, weights_only=True, on the whole module: rigl_fast's modules (here FanInLinear) are
    # allowed by importing rigl_fast.export, the model's own classes by the caller
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "whole.pt")) == {
        f"{Odd.__module__}.Odd", "torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv1d"}
    with torch.serialization.safe_globals([Odd, nn.Linear, nn.Conv1d]), torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "whole.pt")(x), want)
    # weights only: the state dict of buffers into a freshly exported skeleton
    torch.save(exp.state_dict(), tmp_path / "sd.pt")
    fresh = _trained("fan_in")[1].export("auto")
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
        torch.testing.assert_close(torch.compile(exp)(x), want, rtol=1e-6, atol=1e-6)


def test_file_is_small_at_90_percent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.1, T_end=10, delta=5, ignore_linear_layers=False,
                           sparsity_distribution="erk", structure="fan_in")

    def size(m):
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        return buf.tell()

    for fmt in ("fan_in", "csr"):
        assert size(pruner.export(fmt)) <= 0.3 * size(model), fmt


def test_errors_name_the_argument_and_layer():
    model, pruner = _trained("unstructured")
    with pytest.raises(ValueError, match="format must be one of"):
        pruner.export("dense")
    with pytest.raises(ValueError, match="format='fan_in': layer 'b.weight'"):
        pruner.export("fan_in")
    with pytest.raises(ValueError, match="semi_structured.*CUDA"):
        pruner.export("semi_structured")


def _fan_in_case(g, out, inp, k, idt, dt):
    """The C++ op's arguments, the reference's result maker and each output's sum |v x| (for the bound)."""
    from rigl_fast.export_ops import _fan_in_linear_reference
    idx = torch.rand(out, inp, generator=g).argsort(1)[:, :k].sort(1).values
    values = torch.randn(out, k, generator=g).to(dt)

    def scale(x):
        return (x.float()[:, idx].abs() * values.float().abs()).sum(-1)
    return (values, idx.to(idt)), lambda x: _fan_in_linear_reference(x, values, idx.to(idt)), scale


def _csr_case(g, out, inp, k, idt, dt):
    """A mask with uneven rows (some empty, some full), as CSRLinear stores it."""
    from rigl_fast.export_ops import _csr_linear_reference
    density = torch.rand(out, 1, generator=g) * (k / inp) * 2
    mask = torch.rand(out, inp, generator=g) < density
    mask[0] = True
    if out > 2:
        mask[1] = False
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = mask.sum(1).cumsum(0)
    col = mask.nonzero()[:, 1]
    values = torch.randn(col.numel(), generator=g).to(dt)
    w = torch.zeros(out, inp)
    w[mask] = values.float()
    crow_t = crow.to(idt)

    def scale(x):
        return x.float().abs() @ w.abs().t()
    return ((crow_t, col.to(idt), values, out), lambda x: _csr_linear_reference(x, crow_t, col.to(idt), values, out),
            scale)


@pytest.mark.parametrize("isa", ["auto", "base"])
@pytest.mark.parametrize("kind", ["fan_in", "csr"])
def test_cpp_kernels_match_the_reference(kind, isa, monkeypatch):
    """csrc/export_kernels.cpp's fused kernels (torch.ops.rigl_fast.fan_in_linear / csr_linear, registered as the
    CPU kernels of rigl_fast_export's ops) against the plain PyTorch references: B 1/7/64, odd shapes, uneven and
    empty rows (csr), int16 and int32 indices, fp32 and bf16, non-contiguous x; the bound in the module doc.
    Plus bad tables and opcheck. Both instruction sets: 'auto' is the AVX2 build (gathers) where the CPU has
    it, 'base' the baseline one (RIGL_FAST_CPU_ISA=base, read on every call)."""
    from rigl_fast._cpp import BackendUnavailable, load_library
    from rigl_fast import export_ops as export

    try:
        load_library("export")  # the export kernels are their own extension
    except BackendUnavailable as e:
        cpp_unavailable(e)  # a broken build fails the suite
    if isa == "base":
        monkeypatch.setenv("RIGL_FAST_CPU_ISA", "base")
    else:
        monkeypatch.delenv("RIGL_FAST_CPU_ISA", raising=False)
    op = getattr(torch.ops.rigl_fast, kind + "_linear")
    case = _fan_in_case if kind == "fan_in" else _csr_case
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 1), (101, 257, 257), (1, 257, 3), (37, 64, 7), (101, 129, 1), (64, 33, 33), (5, 200, 17)]
    for _ in range(6):
        inp = int(torch.randint(1, 258, (1,), generator=g))
        shapes.append((int(torch.randint(1, 102, (1,), generator=g)), inp,
                       int(torch.randint(1, inp + 1, (1,), generator=g))))
    checked = 0
    for out, inp, k in shapes:
        for idt in (torch.int16, torch.int32):
            for dt in (torch.float32, torch.bfloat16):
                args, reference, scale = case(g, out, inp, k, idt, dt)
                for B in (1, 7, 64):
                    x = torch.randn(B, inp, generator=g).to(dt)
                    y = op(x, *args)
                    ref = reference(x)
                    assert y.dtype == dt and y.shape == (B, out)
                    yf, rf = y.float(), ref.float()
                    ulp = torch.finfo(dt).eps
                    assert ((yf - rf).abs() <= 2 * ulp * rf.abs() + 1e-6 * scale(x)).all(), (out, inp, k, idt, dt, B)
                    checked += 1
                    if B == 7:  # a non-contiguous x gives the same result
                        xt = torch.stack([x, x], 2)[:, :, 0]
                        assert inp == 1 or not xt.is_contiguous()
                        torch.testing.assert_close(op(xt, *args), y, rtol=0, atol=0)
    assert checked == len(shapes) * 12
    # the registered CPU kernel of the custom op runs the C++ one; bad tables raise, nothing read out of range
    x = torch.randn(3, 50)
    args, _, _ = case(g, 9, 50, 5, torch.int16, torch.float32)
    torch.testing.assert_close(getattr(export, kind + "_linear")(x, *args), op(x, *args), rtol=0, atol=0)
    if kind == "fan_in":
        with pytest.raises(RuntimeError, match="out of range"):
            op(x, args[0], torch.full((9, 5), 50, dtype=torch.int32))
    else:
        crow, col, values, out = args
        with pytest.raises(RuntimeError, match="out of range"):
            op(x, crow, torch.full_like(col, 50), values, out)
        with pytest.raises(RuntimeError, match="must not decrease"):
            n = int(crow[-1])  # starts at 0, ends at nnz, drops in between
            op(x, torch.tensor([0] + [n] * 4 + [0] * 4 + [n], dtype=crow.dtype), col, values, out)
        with pytest.raises(RuntimeError, match="crow must have"):
            op(x, crow[:-1], col, values, out)
    for B, idt, dt in ((1, torch.int16, torch.float32), (7, torch.int32, torch.bfloat16),
                       (64, torch.int16, torch.float64)):
        args, _, _ = case(g, 9, 50, 5, idt, dt)
        torch.library.opcheck(op.default, (torch.randn(B, 50, dtype=dt), *args))


def test_cuda_kernel_of_fan_in_runs_triton_and_falls_back(monkeypatch):
    """The op's CUDA kernel (export_ops._fan_in_linear_cuda) runs kernels/export.py's Triton kernel for the dtypes it
    takes and the reference otherwise. Without a GPU the Triton kernel runs under the interpreter (conftest),
    on CPU tensors; tests/test_export_triton.py checks the kernel itself."""
    from rigl_fast import export_ops as export
    from rigl_fast.kernels import export as triton_export

    calls = []
    real = triton_export.fan_in_linear
    monkeypatch.setattr(triton_export, "fan_in_linear", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, v = torch.randn(3, 40, generator=g).to(dev), torch.randn(7, 5, generator=g).to(dev)
    i = torch.randint(0, 40, (7, 5), generator=g, dtype=torch.int32).to(dev)
    torch.testing.assert_close(export._fan_in_linear_cuda(x, v, i), export._fan_in_linear_reference(x, v, i),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    y64 = export._fan_in_linear_cuda(x.double(), v.double(), i)  # fp64: not Triton's, the reference's
    assert len(calls) == 1 and torch.equal(y64, export._fan_in_linear_reference(x.double(), v.double(), i))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_export_on_cuda_fan_in_and_semi_structured():
    """On a GPU: fan_in through the Triton kernel, and 2:4 layers on sparse tensor cores where the device has
    them (compute capability >= 8), outputs within the module doc's bound of the masked dense model."""
    model, pruner = _trained("fan_in")
    model.cuda()
    exp = pruner.export("fan_in")
    x = torch.randn(64, 37, device="cuda")
    with torch.no_grad():
        _close(exp(x), model(x), float(x.abs().sum(1).max()))
    if torch.cuda.get_device_capability()[0] >= 8:  # shapes the semi-structured kernels take (multiples of 64)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        pruner = RigLScheduler(model, opt, dense_allocation=0.5, T_end=20, delta=4, ignore_linear_layers=False,
                               structure="2:4", sparsity_distribution="uniform")
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 128)).square().mean().backward()
            if pruner():
                opt.step()
        model.cuda().half()
        exp = pruner.export("semi_structured")
        assert set(exp.rigl_fast_formats.values()) == {"semi_structured"} and len(exp.rigl_fast_formats) == 2
        x = torch.randn(64, 128, device="cuda", dtype=torch.half)
        with torch.no_grad():
            got, want = exp(x).float(), model(x).float()
        assert ((got - want).abs() <= 1e-2 * (1 + want.abs())).all(), (got - want).abs().max()


def test_export_bench_quick(tmp_path):
    """bench/export.py's smoke run: every contender timed for every setting from one run, the report and the
    plot written (the speed itself lives in bench/results, never in a test)."""
    import json
    import os

    from rigl_fast.bench import export as bench_export
    stem = bench_export.main(["--quick", "--out", str(tmp_path)])
    res = json.load(open(stem + ".json"))
    shapes, batches, sparsities = bench_export.settings(True)
    got = {(r["out"], r["in"], r["batch"], r["sparsity"], r["contender"]) for r in res["rows"]}
    assert got == {(o, i, b, s, c) for o, i in shapes for b in batches for s in sparsities
                   for c in bench_export.CONTENDERS}
    assert all(r["n"] == res["repeats"] and r["median"] > 0 for r in res["rows"])
    assert "torch.sparse" in open(stem + ".md").read() and os.path.getsize(stem + ".png") > 0
