"""torch.ops.rigl_fast.sampled_grad (csrc/export_kernels.cpp, kernel in csrc/product_kernels.h): the sparse
training's weight gradient at the active positions only, out[p] = sum_b grad[b, rows[p]] * x[b, cols[p]] in fp32.

Bound: inputs are converted to fp32 (exact for fp16/bf16, whose products are exact in fp32 too) and each pair's
B products are summed in fp32 (32 partial sums and a fixed tree), so |out - exact| <= 1e-5 |exact| + 32 eps32 *
sum_b |grad x| (the worst case is about (B / 32 + 7) eps32 * sum |grad x| for the B <= 130 here). The two builds
(AVX2, RIGL_FAST_CPU_ISA=base) sum in the same order but only AVX2 fuses multiply-adds: equal within that bound,
not bitwise. Thread count changes nothing (a pair is one thread's): bitwise equal.
"""
import pytest
import torch

from helpers import cpp_unavailable

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def op():
    from rigl_fast._cpp import BackendUnavailable, load_library
    try:
        load_library("export")  # sampled_grad is in the export extension
    except BackendUnavailable as e:
        cpp_unavailable(e)  # a broken build fails the suite
    return torch.ops.rigl_fast.sampled_grad.default


@pytest.fixture(params=["auto", "base"])
def isa(request, monkeypatch):
    """Both builds: 'auto' is the AVX2 one where the CPU has it, 'base' the baseline (read on every call)."""
    if request.param == "base":
        monkeypatch.setenv("RIGL_FAST_CPU_ISA", "base")
    else:
        monkeypatch.delenv("RIGL_FAST_CPU_ISA", raising=False)
    return request.param


def pairs(g, out, inp, density, shuffle=False):
    """Active positions of a random (out, inp) mask as int64 (rows, cols), in CSR order unless shuffled."""
    rows, cols = (torch.rand(out, inp, generator=g) < density).nonzero().t()
    if shuffle:
        perm = torch.randperm(rows.numel(), generator=g)
        rows, cols = rows[perm], cols[perm]
    return rows, cols


def reference(x, grad, rows, cols):
    """The exact result (float64) and each pair's sum |grad x|, for the bound."""
    gr, xc = grad.double()[:, rows.long()], x.double()[:, cols.long()]
    return (gr * xc).sum(0), (gr * xc).abs().sum(0)


def assert_within_bound(y, x, grad, rows, cols):
    exact, scale = reference(x, grad, rows, cols)
    assert y.dtype == torch.float32 and y.shape == (rows.numel(),)
    err = (y.double() - exact).abs()
    bound = 1e-5 * exact.abs() + 32 * EPS32 * scale
    assert (err <= bound).all(), float((err - bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_the_reference(op, isa, dtype):
    """Odd shapes and batch sizes (below, at and over the 32-lane block and the 8-lane vector), int16 and int32
    indices (mixed too); small calls open no parallel region."""
    g = torch.Generator().manual_seed(2201)
    start = torch.ops.rigl_fast.product_parallel_regions()
    checked = 0
    for out, inp, density in ((37, 100, 0.3), (100, 37, 0.5), (1, 1, 1.0), (5, 300, 0.1)):
        rows, cols = pairs(g, out, inp, density)
        for B in (1, 3, 7, 8, 31, 63, 64, 65, 130):
            x = torch.randn(B, inp, generator=g).to(dtype)
            grad = torch.randn(B, out, generator=g).to(dtype)
            for rt, ct in ((torch.int32, torch.int32), (torch.int16, torch.int16), (torch.int16, torch.int32)):
                y = op(x, grad, rows.to(rt), cols.to(ct))
                assert_within_bound(y, x, grad, rows, cols)
                checked += 1
    assert checked == 4 * 9 * 3
    assert torch.ops.rigl_fast.product_parallel_regions() == start


def test_non_contiguous_inputs_and_any_order(op, isa):
    """Transposed views and slices give the contiguous inputs' result bitwise; so does any order of the pairs
    (each pair's sum depends on nothing else)."""
    g = torch.Generator().manual_seed(2202)
    for dtype in (torch.float32, torch.bfloat16):
        rows, cols = pairs(g, 37, 100, 0.3)
        r32, c32 = rows.int(), cols.int()
        for B in (1, 65, 130):
            x = torch.randn(B, 100, generator=g).to(dtype)
            grad = torch.randn(B, 37, generator=g).to(dtype)
            y = op(x, grad, r32, c32)
            assert_within_bound(y, x, grad, rows, cols)
            xt_view = x.t().contiguous().t()  # (B, in) with strides (1, B)
            g_slice = torch.stack([grad, -grad], 2)[:, :, 0]  # strides (2 * out, 2)
            x_slice = torch.cat([x, -x], 1)[:, :100]  # strides (200, 1)
            assert B == 1 or not (xt_view.is_contiguous() or x_slice.is_contiguous())
            assert not g_slice.is_contiguous()
            for xs, gs in ((xt_view, grad), (x, g_slice), (x_slice, g_slice), (xt_view, grad.t().contiguous().t())):
                torch.testing.assert_close(op(xs, gs, r32, c32), y, rtol=0, atol=0)
            # strided indices and a shuffled order
            perm = torch.randperm(rows.numel(), generator=g)
            torch.testing.assert_close(op(x, grad, r32[perm], c32[perm]), y[perm], rtol=0, atol=0)
            r2 = torch.stack([r32, r32], 1)[:, 0]
            assert not r2.is_contiguous()
            torch.testing.assert_close(op(x, grad, r2, c32), y, rtol=0, atol=0)
    rows, cols = pairs(g, 37, 100, 0.3, shuffle=True)
    x, grad = torch.randn(63, 100, generator=g), torch.randn(63, 37, generator=g)
    assert_within_bound(op(x, grad, rows.int(), cols.int()), x, grad, rows, cols)


def test_both_builds_agree_and_threads_change_nothing(op, monkeypatch):
    """AVX2 against the baseline build on the same inputs: within the bound (not bitwise: only AVX2 fuses
    multiply-adds). One thread against two on a call large enough to run in parallel: bitwise."""
    g = torch.Generator().manual_seed(2203)
    rows, cols = pairs(g, 100, 37, 0.4)
    r32, c32 = rows.int(), cols.int()
    for B in (1, 3, 64, 65, 130):
        x, grad = torch.randn(B, 37, generator=g), torch.randn(B, 100, generator=g)
        monkeypatch.delenv("RIGL_FAST_CPU_ISA", raising=False)
        auto = op(x, grad, r32, c32)
        monkeypatch.setenv("RIGL_FAST_CPU_ISA", "base")
        base = op(x, grad, r32, c32)
        _, scale = reference(x, grad, rows, cols)
        assert ((auto.double() - base.double()).abs() <= 64 * EPS32 * scale).all()
        assert_within_bound(base, x, grad, rows, cols)
    monkeypatch.delenv("RIGL_FAST_CPU_ISA", raising=False)
    # 60000 pairs of B = 256: a few milliseconds, worth two threads
    rows, cols = pairs(g, 300, 300, 2 / 3)
    x, grad = torch.randn(256, 300, generator=g), torch.randn(256, 300, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, grad, rows.int(), cols.int())
        torch.set_num_threads(2)
        start = torch.ops.rigl_fast.product_parallel_regions()
        two = op(x, grad, rows.int(), cols.int())
        assert torch.ops.rigl_fast.product_parallel_regions() > start
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(two, one, rtol=0, atol=0)
    keep = torch.arange(0, rows.numel(), 97)  # the reference on a subset of the pairs (its memory is B x nnz)
    assert_within_bound(one[keep], x, grad, rows[keep], cols[keep])


def test_calls_past_the_region_size_equal_one_thread(op):
    """Calls with more work than common.h's kRegionWork (and training's ops from two threads' work) share their
    chunks in an OpenMP region instead of with inter-op helpers: the one-thread results, bitwise."""
    g = torch.Generator().manual_seed(2207)
    rows, cols = pairs(g, 1024, 600, 0.5)  # ~307000 pairs of B = 256: ~10^7 element passes, ~30 ms
    r32, c32 = rows.int(), cols.int()
    x, grad = torch.randn(256, 600, generator=g), torch.randn(256, 1024, generator=g)
    crow = torch.zeros(1025, dtype=torch.int32)
    crow[1:] = torch.bincount(rows, minlength=1024).cumsum(0)
    values = torch.randn(rows.numel(), generator=g)
    ops = torch.ops.rigl_fast
    csr = ops.csr_linear
    # and training's shared-transpose ops, which take a region at any size worth two threads (common.h:
    # TrainingRegion): a mid-size call (~70000 pairs of B = 256) as well
    mid_rows, mid_cols = pairs(g, 300, 700, 1 / 3)
    mid_crow = torch.zeros(301, dtype=torch.int64)
    mid_crow[1:] = torch.bincount(mid_rows, minlength=300).cumsum(0)
    mx, mg = torch.randn(256, 700, generator=g), torch.randn(256, 300, generator=g)

    def calls():
        xt, gt = ops.transpose_f32(mx), ops.transpose_f32(mg)
        return (op(x, grad, r32, c32), csr(x, crow, c32, values, 1024),
                ops.sampled_grad_rows_t(gt, xt, 256, mid_crow, mid_cols.int()),
                ops.csr_linear_t(xt, 256, mid_crow, mid_cols.int(), torch.ones(mid_cols.numel()), 300), xt)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = calls()
        torch.set_num_threads(2)
        start = torch.ops.rigl_fast.product_parallel_regions()
        two = calls()
        assert torch.ops.rigl_fast.product_parallel_regions() >= start + 4
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[4][:, :256], mx.t())
    for a, b in zip(two, one):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    keep = torch.arange(0, rows.numel(), 389)
    assert_within_bound(one[0][keep], x, grad, rows[keep], cols[keep])
    exact = x.double() @ torch.sparse_coo_tensor(torch.stack([rows, cols]), values.double(), (1024, 600)).to_dense().t()
    assert (one[1].double() - exact).abs().max() <= 1e-4 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_transpose_is_exact_over_block_edges_strides_and_dtypes(op, isa, dtype):
    """transpose_f32 (fp32 rows: 8x8 blocks, AVX2 or SSE; other dtypes and strides: 32x32 tiles) is x^T in fp32
    exactly, zeros in the padded lanes: rows and columns around the 8-block (1, 7, 8, 9, 17, 64), 1024 rows (64
    padded lanes), 2048 rows over several threads' strips, rows read with a stride wider than the row (a column
    slice), a non-contiguous transposed view."""
    ops = torch.ops.rigl_fast
    g = torch.Generator().manual_seed(2212)
    for rows, cols in [(1, 9), (2, 1), (7, 7), (8, 8), (9, 17), (17, 9), (64, 1000), (1024, 23), (2048, 520)]:
        wide = torch.randn(rows, cols + 3, generator=g).to(dtype)
        for x in (wide[:, :cols].contiguous(), wide[:, 3:], torch.randn(cols, rows, generator=g).to(dtype).t()):
            xt = ops.transpose_f32(x)
            lanes = rows + 64 if rows % 1024 == 0 else rows
            assert xt.shape == (cols, lanes) and xt.dtype == torch.float32 and xt.is_contiguous()
            assert torch.equal(xt[:, :rows], x.t().float()), (rows, cols, x.stride())
            assert not xt[:, rows:].any()


def test_training_products_take_two_threads_from_half_the_work(op):
    """Training's products (the *_t ops, in a TrainingRegion, where torch's threads are awake) run on two threads
    from half the work that export's products need: csr_linear_t at 1024x1024, 95%, batch 64 (about 1.6
    kThreadWork of element passes) opens a parallel region, where csr_linear, the same product over the same pairs
    outside a training region, runs on one thread and opens none; the same result bitwise."""
    ops = torch.ops.rigl_fast
    g = torch.Generator().manual_seed(2213)
    rows, cols = pairs(g, 1024, 1024, 0.05)
    crow = torch.zeros(1025, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=1024).cumsum(0)
    values, x = torch.randn(rows.numel(), generator=g), torch.randn(64, 1024, generator=g)
    xt = ops.transpose_f32(x)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        start = ops.product_parallel_regions()
        plain = ops.csr_linear(x, crow, cols.int(), values, 1024)
        assert ops.product_parallel_regions() == start
        shared = ops.csr_linear_t(xt, 64, crow, cols.int(), values, 1024)
        assert ops.product_parallel_regions() > start
    finally:
        torch.set_num_threads(before)
    assert torch.equal(plain, shared)


@pytest.mark.parametrize("B", [2, 5, 63, 64, 65, 130, 1024])
def test_shared_transpose_ops_equal_the_plain_ones_bitwise(op, isa, B):
    """transpose_f32 + csr_linear_t / sampled_grad_rows_t (training shares the transposed x and output gradient
    between its products) give csr_linear's and sampled_grad_dense's results bitwise on fp32, the latter for both
    orientations of the weight: odd shapes, batches around the 64-lane block and 1024 (padded lanes), non-contiguous
    inputs, int16 and int32 indices, a row with no pairs; the transposed rows hold x^T and zeros past B."""
    ops = torch.ops.rigl_fast
    g = torch.Generator().manual_seed(2208 + B)
    out, inp = 37, 101
    rows, cols = pairs(g, out, inp, 0.3)
    rows, cols = rows[rows != 5], cols[rows != 5]  # row 5 empty
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    flat = rows * inp + cols
    values = torch.randn(rows.numel(), generator=g)
    x = torch.randn(inp, B, generator=g).t()  # (B, inp), not contiguous
    grad = torch.randn(B, 2 * out, generator=g)[:, ::2]  # (B, out), not contiguous
    xt, gt = ops.transpose_f32(x), ops.transpose_f32(grad)
    lanes = B + 64 if B % 1024 == 0 else B
    assert xt.shape == (inp, lanes) and gt.shape == (out, lanes) and xt.dtype == torch.float32
    assert torch.equal(xt[:, :B], x.t()) and not xt[:, B:].any()
    # the column structure: the (inp, out) storage of the transposed weight (Conv1D's), row by row
    rows_t, cols_t = cols[torch.argsort(cols * out + rows)], rows[torch.argsort(cols * out + rows)]
    ccol = torch.zeros(inp + 1, dtype=torch.int64)
    ccol[1:] = torch.bincount(rows_t, minlength=inp).cumsum(0)
    for idt in (torch.int16, torch.int32):
        assert torch.equal(ops.csr_linear_t(xt, B, crow, cols.to(idt), values, out),
                           ops.csr_linear(x, crow, cols.to(idt), values, out))
        dense = ops.sampled_grad_dense(x, grad, rows.to(idt), cols.to(idt), flat, out * inp).view(out, inp)
        assert torch.equal(ops.sampled_grad_rows_t(gt, xt, B, crow, cols.to(idt)), dense)
        assert torch.equal(ops.sampled_grad_rows_t(xt, gt, B, ccol, cols_t.to(idt)), dense.t())


def test_rows_gradient_of_a_large_layer_is_exact(op):
    """A weight gradient over 4 MiB (a pooled buffer, advised to huge pages: csrc/buffer_pool.h) holds the pairs'
    sums and zeros elsewhere, as sampled_grad_dense writes them."""
    ops = torch.ops.rigl_fast
    g = torch.Generator().manual_seed(2210)
    rows, cols = pairs(g, 1300, 1100, 0.01)
    crow = torch.zeros(1301, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=1300).cumsum(0)
    x, grad = torch.randn(9, 1100, generator=g), torch.randn(9, 1300, generator=g)
    got = ops.sampled_grad_rows_t(ops.transpose_f32(grad), ops.transpose_f32(x), 9, crow, cols.int())
    want = ops.sampled_grad_dense(x, grad, rows.int(), cols.int(), rows * 1100 + cols, 1300 * 1100)
    assert got.numel() * 4 > 4 << 20 and torch.equal(got.view(-1), want)
    assert int((got != 0).sum()) == int((want != 0).sum()) > 0


@pytest.mark.parametrize("B", [65, 130, 200])
def test_batched_products_match_the_reference_over_blocks_and_row_groups(op, isa, B):
    """The batched products (csr_linear, fan_in_linear, csr_linear_t) work on (64-lane block, 16-row group) tiles:
    row counts around the group (1, 15, 16, 17, 50) and batches over several blocks with a partial last one, int16
    and int32 indices, against float64 x @ W^T within fp32 summation's bound; an index out of range in a group's
    middle row raises."""
    ops = torch.ops.rigl_fast
    g = torch.Generator().manual_seed(2211 + B)
    inp = 77
    for out in (1, 15, 16, 17, 50):
        x = torch.randn(B, inp, generator=g)
        xt = ops.transpose_f32(x)
        mask = torch.rand(out, inp, generator=g) < 0.3
        mask[out // 2] = False  # an empty row
        w = torch.randn(out, inp, generator=g) * mask
        rows, cols = mask.nonzero().t()
        crow = torch.zeros(out + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
        values = w[rows, cols]
        exact, scale = x.double() @ w.double().t(), x.abs().double() @ w.abs().double().t()
        k = 9  # fan_in: the first 9 columns of each row
        w9 = torch.zeros(out, inp)
        w9[:, :k] = torch.randn(out, k, generator=g)
        ix9 = torch.arange(k).repeat(out, 1)
        for idt in (torch.int16, torch.int32):
            for y in (ops.csr_linear(x, crow, cols.to(idt), values, out),
                      ops.csr_linear_t(xt, B, crow, cols.to(idt), values, out)):
                assert y.shape == (B, out) and ((y.double() - exact).abs() <= 2e-5 * scale).all(), (out, idt)
            y9 = ops.fan_in_linear(x, w9[:, :k].contiguous(), ix9.to(idt))
            e9, s9 = x.double() @ w9.double().t(), x.abs().double() @ w9.abs().double().t()
            assert ((y9.double() - e9).abs() <= 2e-5 * s9).all(), (out, idt)
        if out >= 16 and rows.numel():
            bad = cols.clone()
            bad[int(crow[out // 2 + 1])] = inp  # the first pair of the row after the empty one
            with pytest.raises(RuntimeError, match="out of range"):
                ops.csr_linear_t(xt, B, crow, bad.int(), values, out)


def test_buffer_pool_reuses_a_freed_buffer_and_never_a_live_one(op):
    """csrc/buffer_pool.h: a result of 1 MiB or more comes from the pool, in a buffer of its size class (8 a power
    of two); while it lives no other result shares its memory; once freed, the next result of its class reuses it
    (values written afresh; a batch of 301 rows takes the buffer of 300's); smaller results never enter the pool;
    release_buffers frees what is held and says how much; pruner.remove() releases the pool."""
    ops = torch.ops.rigl_fast
    g = torch.Generator().manual_seed(2212)
    ops.release_buffers()
    assert ops.held_buffer_bytes() == 0
    xs = [torch.randn(300, 1000, generator=g) for _ in range(2)] + [torch.randn(301, 1000, generator=g)]
    nbytes = 300 * 1000 * 4  # transposes of 1.2 MB: class 10 * 2^17 bytes
    step = 1 << (nbytes.bit_length() - 1 - 3)
    cls = -(-nbytes // step) * step
    assert cls == 10 * 2 ** 17 and -(-301 * 1000 * 4 // step) * step == cls
    a = ops.transpose_f32(xs[0])
    pa, kept = a.data_ptr(), a.clone()
    b = ops.transpose_f32(xs[1])
    assert b.data_ptr() != pa and torch.equal(a, kept) and torch.equal(b, xs[1].t())
    del a
    assert ops.held_buffer_bytes() == cls
    c = ops.transpose_f32(xs[2])
    assert c.data_ptr() == pa and torch.equal(c, xs[2].t()) and ops.held_buffer_bytes() == 0
    small = ops.transpose_f32(torch.randn(30, 1000, generator=g))
    del small, b, c
    assert ops.held_buffer_bytes() == 2 * cls
    assert ops.release_buffers() == 2 * cls and ops.held_buffer_bytes() == 0
    # a pooled tensor behaves like any other: copies, pickling, shared memory, resizing in place
    import copy
    import pickle
    d = ops.transpose_f32(xs[0])
    assert torch.equal(copy.deepcopy(d), d) and torch.equal(pickle.loads(pickle.dumps(d)), d)
    e = ops.transpose_f32(xs[1])
    e.share_memory_()
    assert e.is_shared() and torch.equal(e, xs[1].t())
    d.resize_(3000, 1000)  # grows (a new, larger buffer), keeps the leading values
    assert torch.equal(d.reshape(-1)[:300000], xs[0].t().reshape(-1))
    del d, e
    ops.release_buffers()

    from rigl_fast import RigLScheduler
    torch.manual_seed(2212)
    model = torch.nn.Sequential(torch.nn.Linear(8, 600), torch.nn.ReLU(), torch.nn.Linear(600, 600), torch.nn.ReLU(),
                                torch.nn.Linear(600, 4))  # the first layer stays dense (rigl-torch's rule)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = RigLScheduler(model, opt, dense_allocation=0.1, T_end=100, delta=10, ignore_linear_layers=False,
                      compute="sparse")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(32, 8)).square().mean().backward()  # the 600x600 gradient: 1.44 MB, pooled
        if p():
            opt.step()
    opt.zero_grad()
    assert ops.held_buffer_bytes() >= 600 * 600 * 4
    p.remove()
    assert ops.held_buffer_bytes() == 0


@pytest.mark.parametrize("inp", [8992, 9000, 9001])
def test_rows_gradient_over_chunks_unaligned_and_unsorted_rows(op, isa, inp):
    """sampled_grad_rows_t builds each row 4096 columns at a time and streams it out (product_kernels.h): rows
    wider than two chunks, rows not 16-byte aligned (9001 columns), a row whose columns are not ascending and one
    with no pairs give sampled_grad_dense's result bitwise; in bf16 / fp16 (a bf16 / fp16 weight's gradient,
    rounded as it is streamed out: rows whose bf16 start is 32-byte aligned (8992 columns), every other one (9000),
    none (9001)) that result's .to(dtype), bitwise; an index out of range mid-row raises; both builds."""
    ops = torch.ops.rigl_fast
    g = torch.Generator().manual_seed(2213)
    out, B = 7, 33
    rows, cols = pairs(g, out, inp, 0.01)
    rows, cols = rows[rows != 4], cols[rows != 4]  # row 4 empty
    in_row2 = (rows == 2).nonzero().flatten()
    cols[in_row2] = cols[in_row2].flip(0)  # row 2 descending: across the chunks
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    x, grad = torch.randn(B, inp, generator=g), torch.randn(B, out, generator=g)
    xt, gt = ops.transpose_f32(x), ops.transpose_f32(grad)
    want = ops.sampled_grad_dense(x, grad, rows.int(), cols.int(), rows * inp + cols, out * inp).view(out, inp)
    assert torch.equal(ops.sampled_grad_rows_t(gt, xt, B, crow, cols.int()), want)
    assert int((want[2] != 0).sum()) > 50 and not want[4].any()
    for dtype in (torch.bfloat16, torch.float16):
        got = ops.sampled_grad_rows_t(gt, xt, B, crow, cols.int(), dtype)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    bad = cols.clone()
    bad[int(crow[3]) + 3] = inp
    for dtype in (None, torch.bfloat16):
        with pytest.raises(RuntimeError, match="out of range"):
            ops.sampled_grad_rows_t(gt, xt, B, crow, bad.int(), dtype)
    with pytest.raises(RuntimeError, match="dtype must be float32, bfloat16 or float16"):
        ops.sampled_grad_rows_t(gt, xt, B, crow, cols.int(), torch.float64)


def test_narrowed_rows_gradient_rounds_ties_nan_and_overflow_as_torch(op, isa):
    """The bf16 / fp16 gradient's rounding (sampled_grad_rows_t with dtype): sums at ties between two bf16 / fp16
    values (to even), past their largest finite value (to inf), tiny ones (fp16 subnormals, to 0), -0, inf and NaN
    (any NaN: torch's own conversion gives other NaN payloads in its vector and scalar paths), as .to(dtype) rounds
    them; 24 columns, so both the 16-wide vector steps and the scalar tail round."""
    ops = torch.ops.rigl_fast
    special = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -11, 1 + 3 * 2 ** -11, 3.4e38,
                            -3.4e38, 65520.0, 70000.0, 2 ** -26, -0.0, float("inf"), float("-inf"), float("nan"),
                            5e-8, 1 + 2 ** -9, 1.00390625, 0.1, -7.0, 1e-40, 2.5, 1234.5678, 3.0, -1e30])
    inp = special.numel()
    x = special.view(1, inp).repeat(2, 1)
    x[1] = 0.0  # a batch of 2 (the shared transposes' smallest); the second row adds +0 to each sum
    grad = torch.ones(2, 1)
    xt, gt = ops.transpose_f32(x), ops.transpose_f32(grad)
    crow, cols = torch.tensor([0, inp]), torch.arange(inp, dtype=torch.int32)
    want = ops.sampled_grad_rows_t(gt, xt, 2, crow, cols)
    assert torch.equal(want[0, :10], special[:10])  # the sums are the special values themselves
    for dtype in (torch.bfloat16, torch.float16):
        got = ops.sampled_grad_rows_t(gt, xt, 2, crow, cols, dtype)
        torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0, equal_nan=True)
        keep = ~want.isnan()  # the signs too (a NaN's sign is part of its payload)
        assert torch.equal(got.float().signbit()[keep], want.to(dtype).float().signbit()[keep])
        assert bool(got.isnan()[0, 13]) and bool(got.isinf()[0, 5]) and bool(got.isinf()[0, 6])


@pytest.mark.parametrize("transposed", [False, True])
def test_take_values_packs_both_orders(op, isa, transposed):
    """take_values: the active weights packed by the mask's bits in the weight's storage order, then permuted to
    the other order, equal to index_select at the entries' positions in row and in column order (a Conv1D's
    transposed storage gives the column order first), converted to fp32 from every float dtype (rounded to bf16 /
    fp16 where round_to asks: ties, overflow, NaN, inf, an fp16 underflow, as .to() rounds): columns around
    the 8-column byte (3, 8, 13, 101), an empty mask, a full one, a strided weight; bits that do not count a row's
    span, a permutation out of range and wrong argument types raise naming the argument; on threads (a region) as
    on one, bitwise; both builds."""
    ops = torch.ops.rigl_fast
    g = torch.Generator().manual_seed(2209)
    from rigl_fast.compute import Tables
    for shape, density in (((37, 101), 0.3), ((5, 3), 0.0), ((9, 8), 1.0), ((21, 13), 0.6), ((600, 700), 0.4)):
        mask = torch.rand(shape, generator=g) < density  # the weight's storage layout
        t = Tables(mask, transposed, False)
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            w = torch.randn(shape, generator=g).to(dtype)
            packed, permuted = ops.take_values(w, *t.pack)
            v, vt = (permuted, packed) if transposed else (packed, permuted)
            want = torch.index_select(w.reshape(-1), 0, t.flat).float()  # row order
            assert v.dtype == vt.dtype == torch.float32
            assert torch.equal(v, want) and torch.equal(vt, want[t.perm])
            assert torch.equal(ops.take_values(w.t().contiguous().t(), *t.pack)[0], packed)  # strides
            if dtype == torch.float32:  # autocast's values: rounded to its dtype, held in fp32
                w.view(-1)[t.flat[:8]] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 3.4e38, 65520.0,
                                                       float("nan"), -float("inf"), 2 ** -26])[:t.flat.numel()]
                for low in (torch.bfloat16, torch.float16):
                    v, vt = ops.take_values(w, *t.pack, low)
                    v, vt = (vt, v) if transposed else (v, vt)
                    want = torch.index_select(w.reshape(-1), 0, t.flat).to(low).float()
                    torch.testing.assert_close(v, want, rtol=0, atol=0, equal_nan=True)
                    torch.testing.assert_close(vt, want[t.perm], rtol=0, atol=0, equal_nan=True)
            elif dtype == torch.bfloat16:  # a weight in the product's dtype already: nothing to round
                assert torch.equal(ops.take_values(w, *t.pack, torch.bfloat16)[0], packed)
    t = Tables(torch.rand(2000, 1500, generator=g) < 0.4, transposed, False)  # 1.2M values: two threads' work
    w = torch.randn(2000, 1500, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.take_values(w, *t.pack)
        torch.set_num_threads(2)
        start = ops.product_parallel_regions()
        two = ops.take_values(w, *t.pack)
        assert ops.product_parallel_regions() > start
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    w = torch.randn(4, 5)
    bits, crow, perm = torch.tensor([[1], [0], [6], [16]], dtype=torch.uint8), torch.tensor([0, 1, 1, 3, 4]), \
        torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    assert torch.equal(ops.take_values(w, bits, crow, perm)[0], w.reshape(-1)[torch.tensor([0, 11, 12, 19])])
    more = bits.clone()
    more[1, 0] = 1  # row 1 selects an entry that crow gives no room
    fewer = bits.clone()
    fewer[2, 0] = 2
    for args, msg in (((w, more, crow, perm), "bits select other counts of entries per row than crow"),
                      ((w, fewer, crow, perm), "bits select other counts of entries per row than crow"),
                      ((w, bits, crow, perm + 1), "perm holds a position outside \\[0, 4\\)"),
                      ((w, bits, crow, perm.double()), "perm must be a 1-D int32 or int64"),
                      ((w, bits, crow, perm, torch.float64), "round_to must be float32, bfloat16 or float16"),
                      ((w, bits.int(), crow, perm), "bits must be uint8 of shape \\(4, 1\\)"),
                      ((w, bits, crow[:-1], perm), "crow must have out_features \\+ 1 = 5 entries"),
                      ((w.int(), bits, crow, perm), "weight must be a 2-D floating")):
        with pytest.raises(RuntimeError, match=msg):
            ops.take_values(*args)
    torch.library.opcheck(ops.take_values.default, (w, bits, crow, perm))
    torch.library.opcheck(ops.take_values.default, (w, bits, crow, perm, torch.bfloat16))


def test_shared_transpose_ops_refuse_bad_input(op):
    ops = torch.ops.rigl_fast
    x, grad = torch.randn(4, 6), torch.randn(4, 3)
    xt, gt = ops.transpose_f32(x), ops.transpose_f32(grad)
    crow = torch.tensor([0, 1, 2, 2])
    col, values = torch.tensor([0, 5], dtype=torch.int32), torch.ones(2)
    assert torch.equal(ops.csr_linear_t(xt, 1, crow, col, values, 3), ops.csr_linear(x[:1], crow, col, values, 3))
    for call, msg in ((lambda: ops.csr_linear_t(xt.t(), 4, crow, col, values, 3), "xt must be a contiguous"),
                      (lambda: ops.csr_linear_t(xt.double(), 4, crow, col, values, 3), "xt must be a contiguous"),
                      (lambda: ops.csr_linear_t(xt, 5, crow, col, values, 3), "batch must be in"),
                      (lambda: ops.csr_linear_t(xt, 4, crow, col, values.double(), 3), "values must be fp32"),
                      (lambda: ops.csr_linear_t(xt, 4, crow, col.long(), values, 3), "col must be int16 or int32"),
                      (lambda: ops.csr_linear_t(xt, 4, crow[:3], col, values, 3), "crow must have"),
                      (lambda: ops.csr_linear_t(xt, 4, crow, col + 1, values, 3), "out of range"),
                      (lambda: ops.sampled_grad_rows_t(gt, xt[:, :3].clone(), 3, crow, col), "same lanes"),
                      (lambda: ops.sampled_grad_rows_t(gt, xt, 4, crow, col.long()), "col must be 1-D int16"),
                      (lambda: ops.sampled_grad_rows_t(gt, xt, 4, crow[1:], col), "crow must have"),
                      (lambda: ops.sampled_grad_rows_t(gt, xt, 4, crow, col + 1), "out of range \\[0, 6\\)"),
                      (lambda: ops.transpose_f32(torch.ones(3, dtype=torch.int32)), "transpose_f32: t must be")):
        with pytest.raises(RuntimeError, match=msg):
            call()
    for f, args in ((ops.transpose_f32.default, (x,)), (ops.csr_linear_t.default, (xt, 4, crow, col, values, 3)),
                    (ops.sampled_grad_rows_t.default, (gt, xt, 4, crow, col)),
                    (ops.sampled_grad_rows_t.default, (gt, xt, 4, crow, col, torch.bfloat16)),
                    (ops.transpose_f32.default, (x.to(torch.bfloat16),))):
        torch.library.opcheck(f, args)


def test_empty_and_out_of_range(op, isa):
    """nnz == 0 gives an empty fp32 result, B == 0 zeros; an index out of range (either side, negative too)
    and bad arguments raise naming the op."""
    x, grad = torch.randn(4, 10), torch.randn(4, 6)
    r, c = torch.tensor([0, 5, 2], dtype=torch.int32), torch.tensor([9, 0, 3], dtype=torch.int32)
    empty = torch.zeros(0, dtype=torch.int32)
    y = op(x, grad, empty, empty)
    assert y.shape == (0,) and y.dtype == torch.float32
    for dtype in (torch.float32, torch.bfloat16):
        y = op(torch.zeros(0, 10, dtype=dtype), torch.zeros(0, 6, dtype=dtype), r, c.short())
        assert y.dtype == torch.float32 and torch.equal(y, torch.zeros(3))
    for bad_r, bad_c in (([0, 6, 2], [9, 0, 3]), ([0, 5, 2], [10, 0, 3]), ([-1, 5, 2], [9, 0, 3]),
                         ([0, 5, 2], [9, 0, -1])):
        for idt in (torch.int16, torch.int32):
            with pytest.raises(RuntimeError, match="sampled_grad: a pair is out of range"):
                op(x, grad, torch.tensor(bad_r, dtype=idt), torch.tensor(bad_c, dtype=idt))
        with pytest.raises(RuntimeError, match="sampled_grad: a pair is out of range"):  # checked with B == 0 too
            op(x[:0], grad[:0], torch.tensor(bad_r, dtype=torch.int32), torch.tensor(bad_c, dtype=torch.int32))
    bad_args = [((x, grad[:3], r, c), "same B"), ((x, grad.double(), r, c), "x's dtype"),
                ((x, grad, r.long(), c), "int16 or int32"), ((x.int(), grad.int(), r, c), "fp32/fp64/fp16/bf16"),
                ((x, grad, r, c[:2]), "same length"), ((x[0], grad, r, c), "2-D")]
    for args, msg in bad_args:
        with pytest.raises(RuntimeError, match=f"rigl_fast::sampled_grad: .*{msg}"):
            op(*args)


def test_opcheck_and_the_export_ops_helper(op):
    """torch.library.opcheck (the fake implementation in rigl_fast/_cpp_fakes.py included), and export_ops._cpp_op,
    through which rigl_fast/compute.py calls it."""
    from rigl_fast.export_ops import _cpp_op
    assert _cpp_op("sampled_grad") is op
    g = torch.Generator().manual_seed(2204)
    for B, dtype, idt in ((1, torch.float32, torch.int16), (7, torch.bfloat16, torch.int32),
                          (64, torch.float64, torch.int32), (0, torch.float16, torch.int32)):
        rows, cols = pairs(g, 9, 50, 0.2)
        x, grad = torch.randn(B, 50, generator=g).to(dtype), torch.randn(B, 9, generator=g).to(dtype)
        torch.library.opcheck(op, (x, grad, rows.to(idt), cols.to(idt)))


def test_dense_variant_writes_the_sums_at_flat_and_zeros_elsewhere(op, isa):
    """sampled_grad_dense: the dense weight gradient compute.py returns outside the window, bitwise the pairs'
    sums at `flat` (any order) and 0 elsewhere; a position outside [0, numel) raises naming the op; opcheck."""
    dense = torch.ops.rigl_fast.sampled_grad_dense.default
    g = torch.Generator().manual_seed(2205)
    for B, dtype in ((1, torch.float32), (37, torch.bfloat16), (130, torch.float32), (0, torch.float16)):
        rows, cols = pairs(g, 23, 41, 0.3, shuffle=True)
        flat = rows * 41 + cols
        x, grad = torch.randn(B, 41, generator=g).to(dtype), torch.randn(B, 23, generator=g).to(dtype)
        got = dense(x, grad, rows.int(), cols.int(), flat, 23 * 41)
        want = torch.zeros(23 * 41).index_copy_(0, flat, op(x, grad, rows.int(), cols.int()))
        assert got.dtype == torch.float32 and torch.equal(got, want)
        torch.library.opcheck(dense, (x, grad, rows.int(), cols.int(), flat, 23 * 41))
    x, grad = torch.randn(4, 41, generator=g), torch.randn(4, 23, generator=g)
    with pytest.raises(RuntimeError, match="sampled_grad_dense: a pair is out of range"):
        dense(x, grad, rows.int(), cols.int(), flat + 23 * 41, 23 * 41)
    with pytest.raises(RuntimeError, match="sampled_grad_dense: flat must be 1-D int64"):
        dense(x, grad, rows.int(), cols.int(), flat.int(), 23 * 41)
