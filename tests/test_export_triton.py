"""The Triton fan-in product (kernels/export.py), the CUDA kernel of `rigl_fast_export::fan_in_linear`.

Without CUDA the kernel runs under Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1); with CUDA the same
tests run it natively. Every result is compared with an fp64 computation from the same inputs and with
`_fan_in_linear_reference`, on fresh random inputs from fixed seeds. Bounds (u32 = 2**-24, S[b, o] =
sum_j |values[o, j] * x[b, indices[o, j]]| in fp64, gamma = 1.01 * k * u32):
- fp32: |y - y64| <= gamma * S: the error bound of any summation order of k rounded products (Higham's
  gamma_k; an FMA only tightens it), so it holds for the kernel and the reference alike, and
  |y - ref| <= 2 * gamma * S;
- fp16 / bf16 (one rounding of an fp32 sum): |y - y64| <= ulp(max(|y|, |y64|)) + gamma * S, and y and the
  reference at most one ulp apart: two fp32 sums closer than an ulp round to the same or neighbouring values.
Integer-valued inputs make every partial sum exact in fp32, whatever the order: there the kernel must match the
reference bit for bit.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rigl_fast.export import _fan_in_linear_reference as reference
from rigl_fast.kernels import export as KE
from rigl_fast.kernels.export import fan_in_linear, supports

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U32 = 2.0 ** -24
# (B, in, out, k): B in {1, 7, 64}, in in {1, 37, 300}, out in {1, 13, 129}, k in {1, 5, in} (k = 0: below)
CASES = [
    (1, 1, 1, 1),
    (1, 37, 13, 5),
    (1, 300, 129, 300),
    (7, 1, 13, 1),
    (7, 37, 129, 37),
    (7, 300, 1, 5),
    (64, 37, 1, 37),
    (64, 300, 13, 1),
    (64, 300, 129, 5),
    (64, 37, 129, 37),
]


@pytest.fixture
def dev(device):
    return torch.device(device)


def make(B, n_in, out, k, dtype, index_dtype, seed, device, kind="random"):
    """x (B, in), values (out, k) and indices (out, k): each row k distinct inputs in increasing order, as
    export builds them."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(B, n_in, generator=g)
        v = torch.randn(out, k, generator=g)
    else:  # integers, exact in every dtype (|v| <= 183 has 8 significant bits), every partial sum exact in fp32
        # (< 2**24), sums large enough (~ 10**3) that rounding them to fp16 / bf16 drops bits, ties included
        x = torch.randint(-3, 4, (B, n_in), generator=g).float()
        v = torch.randint(-3, 4, (out, k), generator=g).float() * 61
    idx = torch.rand(out, n_in, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values
    return x.to(dtype).to(device), v.to(dtype).to(device), idx.to(index_dtype).to(device)


def exact(x, v, idx):
    """(y64, S) in fp64: the exact sums of the (exactly representable) products, and sum |products|."""
    prod = x.double()[:, idx.long()] * v.double()[None]  # (B, out, k)
    return prod.sum(-1), prod.abs().sum(-1)


def ulp(m, dtype):
    """The spacing of `dtype` at magnitude m (fp64 tensor), subnormals included."""
    p, emin = {torch.float16: (11, -14), torch.bfloat16: (8, -126), torch.float32: (24, -126)}[dtype]
    _, e = torch.frexp(m)
    e = torch.where(m == 0, torch.full_like(e, emin), torch.clamp(e - 1, min=emin))
    return torch.pow(2.0, (e - (p - 1)).double())


def check(y, x, v, idx, what=""):
    """y against fp64 and against the reference, by the bounds of the module doc."""
    B, out, k = x.shape[0], v.shape[0], v.shape[1]
    assert y.shape == (B, out) and y.dtype == x.dtype and y.device == x.device, what
    y64, s = exact(x, v, idx)
    ref = reference(x, v, idx).double()
    yd = y.double()
    assert torch.isfinite(yd).all(), what
    gamma = 1.01 * k * U32
    if y.dtype == torch.float32:
        err, bound = (yd - y64).abs(), gamma * s
        ref_err, ref_bound = (yd - ref).abs(), 2 * gamma * s
    else:
        err = (yd - y64).abs()
        bound = ulp(torch.maximum(yd.abs(), y64.abs()), y.dtype) + gamma * s
        ref_err = (yd - ref).abs()
        ref_bound = ulp(torch.maximum(yd.abs(), ref.abs()), y.dtype)
    assert (err <= bound).all(), f"{what}: max excess over the fp64 bound {(err - bound).max().item():.3g}"
    excess = (ref_err - ref_bound).max().item()
    assert (ref_err <= ref_bound).all(), f"{what}: max excess over the reference bound {excess:.3g}"


# ------------------------------------------------------------------------------------------------ results
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_fp64_and_reference(dev, dtype, case):
    B, n_in, out, k = CASES[case]
    index_dtype = (torch.int16, torch.int32)[case % 2]
    x, v, idx = make(B, n_in, out, k, dtype, index_dtype, 100 + case, dev)
    check(fan_in_linear(x, v, idx), x, v, idx, f"{CASES[case]} {dtype} {index_dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 7, 64])
def test_integer_inputs_match_reference_bit_for_bit(dev, dtype, B):
    """Exact partial sums: any difference from the reference is a wrong gather, product or rounding (the
    output rounding is round-to-nearest-even, as torch's)."""
    for index_dtype in (torch.int16, torch.int32):
        x, v, idx = make(B, 300, 13, 300 if B == 7 else 150, dtype, index_dtype, 200 + B, dev, kind="integers")
        ref = reference(x, v, idx)
        assert torch.equal(fan_in_linear(x, v, idx), ref), (dtype, B, index_dtype)
        if dtype != torch.float32:  # the sums did need rounding: the test can see a wrong rounding
            assert (ref.double() != exact(x, v, idx)[0]).float().mean() > 0.2


@pytest.mark.parametrize("dtype", DTYPES)
def test_index_dtype_does_not_change_result(dev, dtype):
    for B in (1, 7):
        x, v, idx = make(B, 37, 13, 5, dtype, torch.int32, 300 + B, dev)
        assert torch.equal(fan_in_linear(x, v, idx), fan_in_linear(x, v, idx.to(torch.int16)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "offset", "column"])
def test_noncontiguous_x(dev, dtype, layout):
    g = torch.Generator().manual_seed(400)
    n_in, out, k = 37, 13, 9

    def base(*shape):
        return torch.randn(shape, generator=g).to(dtype).to(dev)

    if layout == "transposed":  # what a (in, B) activation's .t() gives
        x = base(n_in, 7).t()
    elif layout == "sliced":
        x = base(7, 2 * n_in)[:, ::2]
    elif layout == "offset":  # a window of a larger tensor: storage offset and row stride
        x = base(12, n_in + 5)[2:9, 3:3 + n_in]
    else:  # batch 1 with a column stride
        x = base(n_in, 4)[:, 1].unsqueeze(0)
    assert not x.is_contiguous()
    _, v, idx = make(x.shape[0], n_in, out, k, dtype, torch.int16, 401, dev)
    x_before = x.clone()
    y = fan_in_linear(x, v, idx)
    check(y, x, v, idx, layout)
    assert torch.equal(y, fan_in_linear(x.contiguous(), v, idx)), "strided x gives what its contiguous copy gives"
    assert torch.equal(x, x_before), "x is not modified"


@pytest.mark.parametrize("B", [1, 7])
def test_noncontiguous_tables(dev, B):
    """values / indices as views (sliced, transposed): read through their strides."""
    g = torch.Generator().manual_seed(500 + B)
    n_in, out, k = 37, 13, 6
    x = torch.randn(B, n_in, generator=g).to(dev)
    v = torch.randn(k, out, generator=g).to(dev).t()
    idx_wide = torch.zeros(out, 2 * k, dtype=torch.int32)
    idx_wide[:, ::2] = torch.rand(out, n_in, generator=g).argsort(dim=1)[:, :k]
    idx = idx_wide.to(dev)[:, ::2]
    assert not v.is_contiguous() and not idx.is_contiguous()
    check(fan_in_linear(x, v, idx), x, v, idx, "strided tables")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unsorted_and_repeated_indices(dev, dtype):
    """The contract does not need sorted or distinct indices: repeats are summed."""
    g = torch.Generator().manual_seed(600)
    x = torch.randn(7, 37, generator=g).to(dtype).to(dev)
    v = torch.randn(13, 11, generator=g).to(dtype).to(dev)
    idx = torch.randint(0, 37, (13, 11), generator=g)
    idx[:, 1] = idx[:, 0]
    idx = idx.to(torch.int16).to(dev)
    check(fan_in_linear(x, v, idx), x, v, idx, "repeats")


@pytest.mark.parametrize("B,block", [(1, (2, 4, 1)), (7, (4, 2, 2)), (7, (2, 4, 1)), (64, (8, 4, 16))])
def test_small_blocks(dev, B, block):
    """Tiny blocks: many programs, a k tail in each row, partial output and batch blocks; block_b == 1 with
    B > 1 runs the batch-1 path once per batch row."""
    bo, bk, bb = block
    for dtype in DTYPES:
        x, v, idx = make(B, 37, 13, 7, dtype, torch.int32, 700 + B, dev)
        check(fan_in_linear(x, v, idx, block_o=bo, block_k=bk, block_b=bb), x, v, idx, f"{B} {block} {dtype}")


@pytest.mark.parametrize("B", [1, 7])
def test_large_fan_in(dev, B):
    """k of a few thousand: many k chunks per program."""
    x, v, idx = make(B, 2600, 5, 2599, torch.float16, torch.int16, 800 + B, dev)
    check(fan_in_linear(x, v, idx), x, v, idx, "large k")


@pytest.mark.parametrize("B", [1, 7])
def test_out_of_range_index_gives_nan_rows(dev, B):
    """An index < 0 or >= in is never dereferenced; its output row is NaN, the others are unaffected."""
    for index_dtype in (torch.int16, torch.int32):
        x, v, idx = make(B, 37, 13, 5, torch.float32, index_dtype, 900 + B, dev)
        good = idx.clone()
        idx[3, 2] = 37
        idx[5, 0] = -1
        idx[8, 4] = 30000
        y = fan_in_linear(x, v, idx)
        bad = torch.zeros(13, dtype=torch.bool)
        bad[[3, 5, 8]] = True
        assert torch.isnan(y[:, bad.to(dev)]).all()
        rows = (~bad).nonzero()[:, 0].to(dev)
        check(y[:, rows], x, v[rows], good[rows], "the other rows")


# ------------------------------------------------------------------------------------------------ empty cases
@pytest.mark.parametrize("B,out,k", [(0, 13, 5), (7, 0, 5), (7, 13, 0), (0, 0, 0), (1, 13, 0)])
def test_empty_returns_zeros_without_launching(dev, monkeypatch, B, out, k):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched a kernel for an empty product")

    monkeypatch.setattr(KE, "_fan_in_kernel", NoLaunch())
    for dtype in DTYPES:
        x = torch.randn(B, 37).to(dtype).to(dev)
        v = torch.randn(out, k).to(dtype).to(dev)
        idx = torch.zeros(out, k, dtype=torch.int16, device=dev)
        y = fan_in_linear(x, v, idx)
        assert y.shape == (B, out) and y.dtype == dtype and y.device == x.device
        assert (y == 0).all() and not torch.signbit(y).any()
        assert torch.equal(y, reference(x, v, idx))


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_naming_the_argument(dev):
    x = torch.randn(7, 37, device=dev)
    v = torch.randn(13, 5, device=dev)
    idx = torch.zeros(13, 5, dtype=torch.int16, device=dev)
    bad = [
        ((x[0], v, idx), r"x must be \(B, in\)"),
        ((x, v[0], idx[0]), r"values must be \(out, k\)"),
        ((x, v, idx[:, :4]), r"indices of shape \(13, 4\) do not match values of shape \(13, 5\)"),
        ((x, v.half(), idx), r"values \(torch.float16\) must have x's dtype \(torch.float32\)"),
        ((x.double(), v.double(), idx), r"x must be float32, float16 or bfloat16, got torch.float64"),
        ((x, v, idx.long()), r"indices must be int16 or int32, got torch.int64"),
        ((x, v, idx.float()), r"indices must be int16 or int32"),
        ((x, v.to("meta"), idx), r"values is on meta"),
        ((x, v, idx.to("meta")), r"indices is on meta"),
        ((x[:, :0], v, idx), r"x has no input features"),
        ((x.tolist(), v, idx), r"x must be a torch.Tensor"),
    ]
    for args, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            fan_in_linear(*args)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        fan_in_linear(x, v, idx, block_k=3)
    for warps in (3, 64):  # the interpreter runs them; a GPU compile refuses 3, a launch of 2048 threads fails
        with pytest.raises(ValueError, match=f"num_warps must be a power of two >= 1 and <= 32, got {warps}"):
            fan_in_linear(x, v, idx, num_warps=warps)
    assert supports(x.double(), v.double(), idx) is not None  # a caller's cue to fall back to the reference
    assert supports(x, v, idx) is None


def test_cpu_needs_the_interpreter(monkeypatch):
    x, v, idx = torch.randn(2, 5), torch.randn(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = supports(x, v, idx)
    assert isinstance(why, str) and "TRITON_INTERPRET" in why and "\n" not in why
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fan_in_linear(x, v, idx)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert supports(x, v, idx) is None


# ------------------------------------------------------------------------------------------------ launch design
def test_config_blocks():
    """Powers of two, bounded tiles (registers), k blocks no wider than k needs, >= 2 programs per SM where the
    layer has the rows for it, and batch blocks that cover the batch."""
    for n_sm in (1, 132):
        for B in (1, 2, 7, 64, 65, 1000):
            for out in (1, 13, 4096):
                for k in (0, 1, 5, 37, 300, 4000):
                    bo, bk, bb, nw = KE._config(B, out, k, n_sm)
                    for n in (bo, bk, bb, nw):
                        assert n >= 1 and n & (n - 1) == 0, (B, out, k, n_sm)
                    assert bo * bk * bb <= 8192 and nw <= 8
                    assert bk <= KE._pow2(max(k, 1)) and bb <= KE._pow2(B)
                    assert (bb == 1) == (B == 1)
                    n_prog = -(-out // bo) * -(-B // bb)
                    assert n_prog >= min(2 * n_sm, out * -(-B // bb)), (B, out, k, n_sm, bo)


_COMPILE = textwrap.dedent("""
    import inspect, re, sys
    import torch, triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    compiled = {}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        options = {k: v for k, v in kwargs.items() if k not in params}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        sig, consts, attrs = {}, {}, {}
        for i, (p, (name, value)) in enumerate(zip(self.params, bound.arguments.items())):
            if p.is_constexpr:
                sig[name], consts[name] = "constexpr", value
                continue
            ty, desc = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize, True)
            if ty == "constexpr":
                sig[name], consts[name] = "constexpr", value
                continue
            sig[name] = ty
            if isinstance(desc, str) and CUDABackend.parse_attr(desc):  # divisibility by 16, as a launch has it
                attrs[(i,)] = CUDABackend.parse_attr(desc)
        key = (tuple(sorted(sig.items())), tuple(sorted(consts.items())), tuple(sorted(options.items())))
        if key not in compiled:
            k = triton.compile(ASTSource(fn=self, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options=options or None)
            compiled[key] = k
            loads = sorted(set(re.findall(r"ld\\.global[.\\w]*", k.asm["ptx"])))
            print("ok", consts, options, sorted(k.asm), loads, flush=True)

    JITFunction.run = compile_instead  # this process only compiles; nothing reads the outputs
    import rigl_fast.kernels.export as E
    E.supports = lambda *a: None  # CPU tensors stand in for CUDA ones
    g = torch.Generator().manual_seed(0)
    for B, dt, it in [(1, torch.float32, torch.int32), (1, torch.bfloat16, torch.int16),
                      (7, torch.float16, torch.int16), (64, torch.float16, torch.int16),
                      (64, torch.bfloat16, torch.int32)]:
        x = torch.randn(B, 300, generator=g).to(dt)
        v = torch.randn(129, 37, generator=g).to(dt)
        i = torch.randint(0, 300, (129, 37), generator=g).to(it)
        E.fan_in_linear(x, v, i, block_o=8, block_k=8 if B > 1 else 128, block_b=min(B, 64) if B != 7 else 8,
                        num_warps=4)
    # 64-bit offsets (a tensor of 2**31+ elements): small tensors stand in, nothing runs
    y = torch.zeros(4)
    for bb in (1, 64):
        E._fan_in_kernel[(1,)](y, y, torch.zeros(4, dtype=torch.int32), y, 2 ** 31 + 1, 300, 129, 37, 1, 2 ** 31 + 1,
                               37, 1, 37, 1, 129, 1, 1, DT=0, WIDE=True, BLOCK_O=8, BLOCK_K=8, BLOCK_B=bb,
                               num_warps=4)
    print("compiled", len(compiled))
""")


def test_kernel_compiles_for_h100():
    """The interpreter accepts code the GPU compiler rejects: compile each path (batch 1 / batched, every dtype,
    both index dtypes, 64-bit offsets) for sm_90 down to a cubin, with a launch's specialisations. The batched
    gather must come out as vector loads (the padded (in, B) copy of x exists for that)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compiled 7" in r.stdout, r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("ok")]
    assert all("cubin" in line for line in lines)
    batched = [line for line in lines if "'BLOCK_B': 64" in line and "'WIDE': False" in line]
    assert len(batched) == 2 and all("ld.global.v" in line for line in batched), r.stdout
