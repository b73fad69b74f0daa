"""The Triton sparse training products (kernels/compute.py): csr_product (forward and input gradient over compressed
rows) and sampled_dot (the weight gradient at the active positions).

Without CUDA the kernels run under Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1); with CUDA the same
tests run them natively. Each result is compared with a float64 PyTorch computation from the same inputs, on fresh
random inputs from fixed seeds. Bounds (u32 = 2**-24, S = the sum of |products| of an output in fp64, n = the
number of its products, gamma = 1.01 * n * u32):
- fp32 outputs (csr_product in fp32, sampled_dot always): |y - y64| <= gamma * S, the error bound of any
  summation order of n rounded products (Higham's gamma_n);
- fp16 / bf16 (csr_product: one rounding of an fp32 sum): |y - y64| <= ulp(max(|y|, |y64|)) + gamma * S.
Integer-valued inputs make every partial sum exact in fp32: there csr_product must equal the exact sum rounded
once to the dtype (round-to-nearest-even, as torch rounds), bit for bit.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from rigl_fast.kernels import compute as KC  # noqa: E402
from rigl_fast.kernels.compute import (csr_product, sampled_dot, supports_csr_product,  # noqa: E402
                                       supports_sampled_dot)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U32 = 2.0 ** -24


@pytest.fixture
def dev(device):
    return torch.device(device)


def random_mask(n_rows, n_cols, g, density=0.3):
    """A random (n_rows, n_cols) mask with an empty first row, an empty middle row and a full last row (rows of
    very different lengths in one block)."""
    m = torch.rand(n_rows, n_cols, generator=g) < density
    m[0] = False
    m[n_rows // 2] = False
    m[-1] = True
    return m


def compress(m, crow_dtype=torch.int64, col_dtype=torch.int32):
    """(crow, col) of a mask's compressed rows."""
    crow = torch.zeros(m.shape[0] + 1, dtype=torch.int64)
    crow[1:] = m.sum(1).cumsum(0)
    return crow.to(crow_dtype), m.nonzero()[:, 1].to(col_dtype)


def make_csr(B, n_in, n_rows, dtype, crow_dtype, col_dtype, seed, device, kind="random"):
    g = torch.Generator().manual_seed(seed)
    m = random_mask(n_rows, n_in, g)
    crow, col = compress(m, crow_dtype, col_dtype)
    if kind == "random":
        x = torch.randn(B, n_in, generator=g)
        v = torch.randn(col.numel(), generator=g)
    else:  # integers exact in every dtype (7 significant bits and an exponent 0..3), sums of up to ~2 * 10**4,
        # exact in fp32, most of which need rounding in fp16 (above 2048) and bf16 (above 256); no fp16 overflow
        x = torch.randint(-7, 8, (B, n_in), generator=g).float()
        v = torch.randint(-127, 128, (col.numel(),), generator=g).float()
        v = v * 2.0 ** torch.randint(0, 4, (col.numel(),), generator=g)
    return x.to(dtype).to(device), crow.to(device), col.to(device), v.to(dtype).to(device)


def csr_exact(x, crow, col, values, n_rows):
    """(y64, S, n): the fp64 sums of the products, sum |products| and the longest row, from a dense fp64 matrix
    (repeated columns summed)."""
    crow = crow.long().cpu()
    lengths = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(n_rows), lengths)
    used = slice(int(crow[0]), int(crow[-1]))  # the positions the rows cover (crow need not start at 0)
    col, values = col[used].long().cpu(), values[used].double().cpu()
    w = torch.zeros(n_rows, x.shape[1], dtype=torch.float64)
    w.index_put_((rows, col), values, accumulate=True)
    wa = torch.zeros_like(w).index_put_((rows, col), values.abs(), accumulate=True)
    xd = x.double().cpu()
    return xd @ w.t(), xd.abs() @ wa.t(), int(lengths.max()) if n_rows else 0


def ulp(m, dtype):
    """The spacing of `dtype` at magnitude m (fp64 tensor), subnormals included."""
    p, emin = {torch.float16: (11, -14), torch.bfloat16: (8, -126), torch.float32: (24, -126)}[dtype]
    _, e = torch.frexp(m)
    e = torch.where(m == 0, torch.full_like(e, emin), torch.clamp(e - 1, min=emin))
    return torch.pow(2.0, (e - (p - 1)).double())


def within(y, y64, s, n, what):
    """y (any float dtype) against the fp64 sums by the module doc's bounds."""
    yd = y.double().cpu()
    assert torch.isfinite(yd).all(), what
    bound = 1.01 * max(n, 1) * U32 * s
    if y.dtype != torch.float32:
        bound = bound + ulp(torch.maximum(yd.abs(), y64.abs()), y.dtype)
    err = (yd - y64).abs()
    assert (err <= bound).all(), f"{what}: max excess over the bound {(err - bound).max().item():.3g}"


def check_csr(y, x, crow, col, values, n_rows, what=""):
    assert y.shape == (x.shape[0], n_rows) and y.dtype == x.dtype and y.device == x.device, what
    y64, s, n = csr_exact(x, crow, col, values, n_rows)
    within(y, y64, s, n, what)


def sampled_exact(x, g, rows, cols):
    """(out64, S): fp64 sum_b g[b, rows[p]] * x[b, cols[p]] and the sums of |products|."""
    gd, xd = g.double().cpu()[:, rows.long().cpu()], x.double().cpu()[:, cols.long().cpu()]
    return (gd * xd).sum(0), (gd * xd).abs().sum(0)


def check_sampled(out, x, g, rows, cols, what=""):
    assert out.shape == rows.shape and out.dtype == torch.float32 and out.device == x.device, what
    out64, s = sampled_exact(x, g, rows, cols)
    within(out, out64, s, x.shape[0], what)


def make_pairs(B, n_in, n_out, dtype, index_dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    m = random_mask(n_out, n_in, g)
    rows, cols = m.nonzero().t()
    x = torch.randn(B, n_in, generator=g).to(dtype).to(device)
    gr = torch.randn(B, n_out, generator=g).to(dtype).to(device)
    return x, gr, rows.to(index_dtype).to(device), cols.to(index_dtype).to(device)


# ------------------------------------------------------------------------------------------------ csr_product
# (B, n_in, n_rows): the forward (n_rows = out) and the input gradient's transposed shape (n_rows = in)
CSR_CASES = [(1, 40, 19), (5, 40, 19), (33, 40, 19), (1, 19, 40), (5, 19, 40), (33, 19, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CSR_CASES)))
def test_csr_product_matches_fp64(dev, dtype, case):
    B, n_in, n_rows = CSR_CASES[case]
    crow_dtype = (torch.int32, torch.int64)[case % 2]
    col_dtype = (torch.int16, torch.int32)[(case // 2) % 2]
    x, crow, col, v = make_csr(B, n_in, n_rows, dtype, crow_dtype, col_dtype, 100 + case, dev)
    check_csr(csr_product(x, crow, col, v, n_rows), x, crow, col, v, n_rows,
              f"{CSR_CASES[case]} {dtype} {crow_dtype} {col_dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5, 33])
def test_csr_product_integer_inputs_round_once(dev, dtype, B):
    """Exact partial sums: any difference from the exact sum rounded once is a wrong gather, product or rounding."""
    x, crow, col, v = make_csr(B, 40, 19, dtype, torch.int32, torch.int16, 200 + B, dev, kind="integers")
    y64, _, _ = csr_exact(x, crow, col, v, 19)
    assert y64.abs().max() < 60000
    assert torch.equal(csr_product(x, crow, col, v, 19).cpu(), y64.to(dtype))
    if dtype != torch.float32:  # the sums did need rounding: the test can see a wrong rounding
        assert (y64.to(dtype).double() != y64).float().mean() > 0.25


def test_csr_product_forward_and_input_gradient_of_a_layer(dev):
    """The use: W's compressed rows give x W^T, the compressed columns (W^T's rows) give grad W."""
    g = torch.Generator().manual_seed(250)
    m = random_mask(19, 40, g)
    w = torch.randn(19, 40, generator=g) * m
    x, grad = torch.randn(5, 40, generator=g), torch.randn(5, 19, generator=g)
    crow, col = compress(m)
    crow_t, col_t = compress(m.t())
    y = csr_product(x.to(dev), crow.to(dev), col.to(dev), w[m].to(dev), 19)
    dx = csr_product(grad.to(dev), crow_t.to(dev), col_t.to(dev), w.t()[m.t()].to(dev), 40)
    torch.testing.assert_close(y.cpu().double(), x.double() @ w.double().t(), rtol=0, atol=1e-5)
    torch.testing.assert_close(dx.cpu().double(), grad.double() @ w.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "column"])
def test_csr_product_noncontiguous_inputs(dev, dtype, layout):
    """Strided x (a (in, B) activation's .t(), a slice, batch 1 with a column stride) and strided crow, col and
    values (views of wider tables): read through their strides, the same result as contiguous copies."""
    g = torch.Generator().manual_seed(300)
    n_in, n_rows = 40, 19

    def base(*shape):
        return torch.randn(shape, generator=g).to(dtype).to(dev)

    if layout == "transposed":
        x = base(n_in, 5).t()
    elif layout == "sliced":
        x = base(33, 2 * n_in)[:, ::2]
    else:
        x = base(n_in, 3)[:, 1].unsqueeze(0)
    assert not x.is_contiguous()
    _, crow, col, v = make_csr(1, n_in, n_rows, dtype, torch.int32, torch.int16, 301, dev)
    crow_s, col_s = crow.repeat_interleave(2)[::2], col.repeat_interleave(3)[1::3]
    v_s = v.repeat_interleave(2)[1::2]
    assert not (crow_s.is_contiguous() or col_s.is_contiguous() or v_s.is_contiguous())
    x_before = x.clone()
    y = csr_product(x, crow_s, col_s, v_s, n_rows)
    check_csr(y, x, crow, col, v, n_rows, layout)
    assert torch.equal(y, csr_product(x.contiguous(), crow, col, v, n_rows)), "strided gives what contiguous gives"
    assert torch.equal(x, x_before), "x is not modified"


@pytest.mark.parametrize("B,block", [(1, (2, 4, 1)), (5, (4, 4, 2)), (5, (4, 4, 1)), (33, (8, 4, 16))])
def test_csr_product_small_blocks(dev, B, block):
    """Tiny blocks: many programs, rows walked in several chunks (a full row of 40 in 4-wide chunks beside
    empty rows), partial row and batch blocks; block_b == 1 with B > 1 reads x in place once per batch row."""
    br, bk, bb = block
    for dtype in DTYPES:
        x, crow, col, v = make_csr(B, 40, 19, dtype, torch.int64, torch.int32, 400 + B, dev)
        y = csr_product(x, crow, col, v, 19, block_r=br, block_k=bk, block_b=bb)
        check_csr(y, x, crow, col, v, 19, f"{B} {block} {dtype}")


@pytest.mark.parametrize("B", [1, 5])
def test_csr_product_unsorted_repeated_columns_and_offset_crow(dev, B):
    """Columns need not be sorted or distinct (repeats are summed); crow need not start at 0: rows are the
    ranges [crow[r], crow[r+1]) of the tables."""
    g = torch.Generator().manual_seed(450)
    x = torch.randn(B, 19, generator=g).to(dev)
    col = torch.randint(0, 19, (30,), generator=g).to(torch.int32)
    col[5] = col[4]
    v = torch.randn(30, generator=g)
    crow = torch.tensor([3, 3, 10, 10, 25, 30], dtype=torch.int32)
    y = csr_product(x, crow.to(dev), col.to(dev), v.to(dev), 5)
    check_csr(y, x, crow, col, v, 5, "unsorted")


@pytest.mark.parametrize("B", [1, 5])
def test_csr_product_out_of_range_gives_nan_rows(dev, B):
    """A column outside [0, in) or a row range outside [0, nnz] is never dereferenced; its output row is NaN,
    the others are unaffected."""
    for crow_dtype, col_dtype in ((torch.int32, torch.int16), (torch.int64, torch.int32)):
        x, crow, col, v = make_csr(B, 40, 19, torch.float32, crow_dtype, col_dtype, 500 + B, dev)
        good_crow, good_col = crow.clone(), col.clone()
        assert crow[4] > crow[3] and crow[7] > crow[6] + 1 and crow[14] > crow[13]
        col[int(crow[3])] = 40  # row 3
        col[int(crow[6]) + 1] = -1  # row 6
        crow_bad = crow.clone()
        crow_bad[12] = crow[13] + 1  # row 12 starts after it ends: NaN (row 11 now spans into row 13)
        crow_bad[19] = col.numel() + 5  # the last row ends past nnz: NaN
        y = csr_product(x, crow_bad, col, v, 19)
        bad = torch.zeros(19, dtype=torch.bool)
        bad[[3, 6, 12, 18]] = True
        assert torch.isnan(y[:, bad.to(dev)]).all()
        keep = [r for r in range(19) if not bad[r] and r != 11]  # row 11's range changed: checked alone below
        yk = y[:, keep].cpu()
        y64, s, n = csr_exact(x, good_crow, good_col, v, 19)
        within(yk, y64[:, keep], s[:, keep], n, "the other rows")
        row11 = slice(int(crow_bad[11]), int(crow_bad[12]))
        y11 = (x.double().cpu()[:, good_col[row11].long().cpu()] * v[row11].double().cpu()).sum(1)
        torch.testing.assert_close(y[:, 11].cpu().double(), y11, rtol=0, atol=1e-5)


@pytest.mark.parametrize("B,n_rows,nnz", [(0, 19, 5), (5, 0, 0), (5, 19, 0), (0, 0, 0), (1, 19, 0)])
def test_csr_product_empty(dev, monkeypatch, B, n_rows, nnz):
    """No batch or no rows: zeros without a launch. nnz == 0 (every row empty): zeros, launched or not."""
    calls = []
    real = KC._csr_kernel

    class Count:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(KC, "_csr_kernel", Count())
    for dtype in DTYPES:
        x = torch.randn(B, 40).to(dtype).to(dev)
        crow = torch.zeros(n_rows + 1, dtype=torch.int32, device=dev)
        if nnz:
            crow[-1] = nnz
        col = torch.zeros(nnz, dtype=torch.int16, device=dev)
        v = torch.ones(nnz).to(dtype).to(dev)
        y = csr_product(x, crow, col, v, n_rows)
        assert y.shape == (B, n_rows) and y.dtype == dtype and y.device == x.device
        assert (y == 0).all() and not torch.signbit(y).any()
    if B == 0 or n_rows == 0:
        assert calls == []


# ------------------------------------------------------------------------------------------------ sampled_dot
SAMPLED_CASES = [(1, 40, 19), (5, 19, 40), (33, 40, 19), (33, 19, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SAMPLED_CASES)))
def test_sampled_dot_matches_fp64(dev, dtype, case):
    B, n_in, n_out = SAMPLED_CASES[case]
    index_dtype = (torch.int16, torch.int32)[case % 2]
    x, g, rows, cols = make_pairs(B, n_in, n_out, dtype, index_dtype, 600 + case, dev)
    out = sampled_dot(x, g, rows, cols)
    check_sampled(out, x, g, rows, cols, f"{SAMPLED_CASES[case]} {dtype} {index_dtype}")
    assert torch.equal(out, sampled_dot(x, g, rows.to(torch.int32), cols.to(torch.int32)))


def test_sampled_dot_is_the_masked_weight_gradient(dev):
    """The use: out = (g^T x)[mask] for the mask's (row, col) pairs."""
    x, g, rows, cols = make_pairs(33, 40, 19, torch.float32, torch.int32, 650, dev)
    dense = g.double().cpu().t() @ x.double().cpu()
    torch.testing.assert_close(sampled_dot(x, g, rows, cols).cpu().double(), dense[rows.long().cpu(),
                               cols.long().cpu()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_dot_noncontiguous_inputs(dev, dtype):
    """Strided x, g (transposed and sliced) and rows, cols (views): the same result as contiguous copies."""
    for B in (1, 5):
        x, g, rows, cols = make_pairs(B, 40, 19, dtype, torch.int32, 700 + B, dev)
        xs = x.t().contiguous().t() if B > 1 else torch.stack([x, x], 2)[:, :, 1]  # batch 1: a column stride
        gs = torch.stack([g, g], 2)[:, :, 0]
        rs, cs = rows.repeat_interleave(2)[::2], cols.repeat_interleave(2)[1::2]
        assert not (gs.is_contiguous() or rs.is_contiguous() or cs.is_contiguous())
        assert not xs.is_contiguous()
        out = sampled_dot(xs, gs, rs, cs)
        check_sampled(out, x, g, rows, cols, f"strided {B} {dtype}")
        assert torch.equal(out, sampled_dot(x, g, rows, cols))


@pytest.mark.parametrize("B,block", [(1, (16, 1)), (5, (16, 1)), (33, (16, 8)), (33, (32, 64))])
def test_sampled_dot_small_blocks(dev, B, block):
    """Small blocks: partial pair blocks, the batch walked in several chunks (33 in chunks of 8: a padded tail),
    block_b == 1 with B > 1 (read in place), a batch block wider than the batch."""
    bp, bb = block
    for dtype in DTYPES:
        x, g, rows, cols = make_pairs(B, 40, 19, dtype, torch.int16, 750 + B, dev)
        check_sampled(sampled_dot(x, g, rows, cols, block_p=bp, block_b=bb), x, g, rows, cols, f"{block} {dtype}")


def test_sampled_dot_unsorted_repeated_pairs(dev):
    gen = torch.Generator().manual_seed(800)
    x, g = torch.randn(5, 19, generator=gen).to(dev), torch.randn(5, 40, generator=gen).to(dev)
    rows = torch.randint(0, 40, (50,), generator=gen).to(torch.int32)
    cols = torch.randint(0, 19, (50,), generator=gen).to(torch.int32)
    rows[7], cols[7] = rows[3], cols[3]
    out = sampled_dot(x, g, rows.to(dev), cols.to(dev))
    check_sampled(out, x, g, rows, cols, "unsorted")
    assert out[7] == out[3]


@pytest.mark.parametrize("B", [1, 5])
def test_sampled_dot_out_of_range_gives_nan(dev, B):
    for index_dtype in (torch.int16, torch.int32):
        x, g, rows, cols = make_pairs(B, 40, 19, torch.float32, index_dtype, 850 + B, dev)
        good_r, good_c = rows.clone(), cols.clone()
        rows[2], rows[5], cols[9], cols[11] = 19, -1, 40, -3
        out = sampled_dot(x, g, rows, cols)
        bad = torch.zeros(rows.numel(), dtype=torch.bool)
        bad[[2, 5, 9, 11]] = True
        assert torch.isnan(out[bad.to(dev)]).all()
        keep = (~bad).to(dev)
        check_sampled(out[keep], x, g, good_r[keep], good_c[keep], "the other pairs")


@pytest.mark.parametrize("B,nnz", [(0, 7), (5, 0), (0, 0)])
def test_sampled_dot_empty_returns_zeros_without_launching(dev, monkeypatch, B, nnz):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched a kernel for an empty product")

    monkeypatch.setattr(KC, "_sampled_dot_kernel", NoLaunch())
    for dtype in DTYPES:
        x, g = torch.randn(B, 40).to(dtype).to(dev), torch.randn(B, 19).to(dtype).to(dev)
        idx = torch.zeros(nnz, dtype=torch.int32, device=dev)
        out = sampled_dot(x, g, idx, idx)
        assert out.shape == (nnz,) and out.dtype == torch.float32 and out.device == x.device
        assert (out == 0).all() and not torch.signbit(out).any()


# ------------------------------------------------------------------------------------------------ bad inputs
def test_csr_product_bad_inputs_raise_naming_the_argument(dev):
    x = torch.randn(5, 40, device=dev)
    crow = torch.zeros(20, dtype=torch.int32, device=dev)
    col = torch.zeros(0, dtype=torch.int16, device=dev)
    v = torch.zeros(0, device=dev)
    bad = [
        ((x[0], crow, col, v, 19), r"x must be \(B, n_in\)"),
        ((x, crow, col, v, 18), r"crow must be \(n_rows \+ 1,\) = \(19,\), got shape \(20,\)"),
        ((x, crow, col, v, -1), r"n_rows must be an int >= 0"),
        ((x, crow, col, v[None], 19), r"col and values must be \(nnz,\) of one length"),
        ((x, crow, col, v.half(), 19), r"values \(torch.float16\) must have x's dtype \(torch.float32\)"),
        ((x.double(), crow, col, v.double(), 19), r"x must be float32, float16 or bfloat16, got torch.float64"),
        ((x, crow.to(torch.int16), col, v, 19), r"crow must be int32 or int64, got torch.int16"),
        ((x, crow, col.long(), v, 19), r"col must be int16 or int32, got torch.int64"),
        ((x, crow, col, v.to("meta"), 19), r"values is on meta"),
        ((x[:, :0], crow, torch.zeros(3, dtype=torch.int16, device=dev), torch.zeros(3, device=dev), 19),
         r"x has no input features"),
        ((x.tolist(), crow, col, v, 19), r"x must be a torch.Tensor"),
    ]
    for args, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            csr_product(*args)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        csr_product(x, crow, col, v, 19, block_k=3)
    for warps in (3, 64):  # the interpreter runs them; a GPU compile refuses 3, a launch of 2048 threads fails
        with pytest.raises(ValueError, match=f"num_warps must be a power of two >= 1 and <= 32, got {warps}"):
            csr_product(x, crow, col, v, 19, num_warps=warps)
    assert supports_csr_product(x.double(), crow, col, v.double()) is not None
    assert supports_csr_product(x, crow.long(), col.int(), v) is None
    assert KC.supports(x, crow, col) is None and KC.supports(x, crow, col.long()) is not None  # values optional


def test_sampled_dot_bad_inputs_raise_naming_the_argument(dev):
    x, g = torch.randn(5, 40, device=dev), torch.randn(5, 19, device=dev)
    idx = torch.zeros(7, dtype=torch.int32, device=dev)
    bad = [
        ((x, g[:4], idx, idx), r"x and g must be \(B, n_in\) and \(B, n_out\)"),
        ((x[0], g, idx, idx), r"x and g must be"),
        ((x, g, idx, idx[:6]), r"rows and cols must be \(nnz,\) of one length"),
        ((x, g.half(), idx, idx), r"g \(torch.float16\) must have x's dtype \(torch.float32\)"),
        ((x, g, idx.long(), idx), r"rows must be int16 or int32, got torch.int64"),
        ((x, g, idx, idx.float()), r"cols must be int16 or int32"),
        ((x, g.to("meta"), idx, idx), r"g is on meta"),
        ((x[:, :0], g, idx, idx), r"need features"),
    ]
    for args, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            sampled_dot(*args)
    with pytest.raises(ValueError, match="block_p must be a power of two"):
        sampled_dot(x, g, idx, idx, block_p=12)
    with pytest.raises(ValueError, match="num_warps must be a power of two >= 1 and <= 32, got 64"):
        sampled_dot(x, g, idx, idx, num_warps=64)
    assert supports_sampled_dot(x.double(), g.double(), idx, idx) is not None
    assert supports_sampled_dot(x, g, idx, idx.to(torch.int16)) is None


def test_cpu_needs_the_interpreter(monkeypatch):
    x, crow = torch.randn(2, 5), torch.zeros(4, dtype=torch.int32)
    col, v = torch.zeros(0, dtype=torch.int32), torch.zeros(0)
    g, idx = torch.randn(2, 3), torch.zeros(1, dtype=torch.int32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for why in (supports_csr_product(x, crow, col, v), supports_sampled_dot(x, g, idx, idx)):
        assert isinstance(why, str) and "TRITON_INTERPRET" in why and "\n" not in why
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        csr_product(x, crow, col, v, 3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sampled_dot(x, g, idx, idx)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert supports_csr_product(x, crow, col, v) is None and supports_sampled_dot(x, g, idx, idx) is None


def test_sampled_config_blocks():
    """Powers of two, bounded tiles, batch blocks no wider than the batch, >= 2 programs per SM where there are
    pairs for it."""
    for n_sm in (1, 132):
        for B in (1, 2, 7, 64, 1000):
            for nnz in (1, 13, 4096, 10 ** 6):
                bp, bb, nw = KC._sampled_config(B, nnz, n_sm)
                for n in (bp, bb, nw):
                    assert n >= 1 and n & (n - 1) == 0, (B, nnz, n_sm)
                assert bp * bb <= 4096 and nw <= 8 and bb <= KC._pow2(B) and (bb == 1) == (B == 1)
                assert -(-nnz // bp) >= min(2 * n_sm, -(-nnz // 16)), (B, nnz, n_sm, bp)


# ------------------------------------------------------------------------------------------------ sm_90
def test_kernels_compile_for_h100():
    """The interpreter accepts code the GPU compiler rejects: aot_check's compute group compiles every variant
    (batch 1 and batched, every dtype, both crow and index dtypes, strided tables, 64-bit offsets) for sm_90 down
    to a cubin, with a launch's specialisations. The batched gathers must come out as vector loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "rigl_fast.kernels.aot_check", "90", "compute"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ok")]
    assert "aot_check: 29 kernel variants compiled" in r.stdout, r.stdout[-3000:]
    assert all("cubin" in line for line in lines)
    for name in ("_csr_kernel", "_sampled_dot_kernel"):
        mine = [line for line in lines if line.startswith(f"ok {name} ")]
        assert any("'WIDE': True" in line for line in mine), name
        batched = [line for line in mine if "'BLOCK_B': 64" in line and "'WIDE': False" in line]
        assert len(batched) >= 3 and all("ld.global.v" in line for line in batched), (name, batched)
