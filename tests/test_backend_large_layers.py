"""Layers of 2**31 or more elements, on stand-ins that fit this suite.

A real one needs 2 GiB of mask plus 8 GiB per fp32 tensor (weight, score, states, gradient), and hours under
Triton's CPU interpreter. Instead:
- Triton: the kernels address memory through raw addresses taken from int64 tables, so a *window* of a
  virtual layer can stand in: addresses are shifted back by OFF elements and the programs cover only
  [OFF, OFF + N), which real memory backs. Offsets past 2**31 and 2**32 are then computed exactly as in a
  layer that large (an int32 offset would read or write elsewhere), and the window's results must equal the
  reference on the window's N elements. Counts past 2**31 (histogram bins, k, ties before a program) are fed
  to the kernels directly.
- The reference's large-layer path is forced on small layers in tests/test_reference_ops.py.
What was verified how is written up in docs/triton.md and docs/cpp.md ("Layers of 2**31+ elements").
"""
import pytest
import torch

from rigl_fast.kernels import TritonBackend
from rigl_fast.kernels import elementwise as ew
from rigl_fast.kernels import update as up
from rigl_fast.kernels._common import float_code, on_device, to_device
from rigl_fast.reference import ReferenceBackend

REF = ReferenceBackend()
OFF = 2 ** 32 + 2 ** 31 + 64  # the window starts past 2**31 and past 2**32 elements
BIG = 2 ** 31 + 12345  # a count int32 cannot hold


@pytest.fixture
def dev(device):
    return torch.device(device)


def shifted(t: torch.Tensor) -> int:
    """The address element 0 of a virtual tensor would have if `t` held its elements [OFF, OFF + t.numel())."""
    addr = t.data_ptr() - OFF * t.element_size()
    assert addr > 0
    return addr


def window_programs(n, chunk, dev):
    """Program tables (layer, start) covering only [OFF, OFF + n) of layer 0, `chunk` elements each."""
    starts = list(range(OFF, OFF + n, chunk))
    return to_device([0] * len(starts), torch.int32, dev), to_device(starts, torch.int64, dev)


def levels(n, gen, dev, dtype=torch.float32):
    return torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (n,), generator=gen)].to(dtype).to(dev)


@pytest.mark.parametrize("kind", ["random", "levels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_on_a_window_past_2_32(dev, kind, dtype):
    """The whole update kernel sequence (histogram passes, picks, tie counts and scans, mark, final) on a window
    of a virtual layer of OFF + N elements: the same mask, weight, states and gradient as the reference on
    the window alone."""
    gen = torch.Generator().manual_seed(31 + len(kind))
    n, block, iters = 300, 64, 2  # 3 programs: ties counted across programs
    mk = (lambda: torch.randn(n, generator=gen).to(dtype).to(dev)) if kind == "random" else \
        (lambda: levels(n, gen, dev, dtype))
    w, s = mk(), mk()
    m = (torch.rand(n, generator=gen) < 0.4).to(dev)
    st, g = mk(), mk()
    n_active = int(m.sum())
    n_keep, n_grow = n_active - n_active // 3, n_active // 3
    exp = dict(w=w.clone(), m=m.clone(), st=st.clone(), g=g.clone())
    REF.update([exp["w"]], [exp["m"]], [s], [n_keep], [n_grow], [[exp["st"]]], [exp["g"]])

    p_layer, p_start = window_programs(n, block * iters, dev)
    tab = to_device([[shifted(w), shifted(m), shifted(s), OFF + n, float_code(w), float_code(s), 0, 3]],
                    torch.int64, dev)
    rows = to_device([[shifted(w), w.element_size(), 0], [shifted(st), st.element_size(), 0],
                      [shifted(g), g.element_size(), 1]], torch.int64, dev)
    launch = (p_layer, p_start, tab)
    st_keep = to_device([[0, n_keep]], torch.int64, dev)
    st_grow = to_device([[0, n_grow]], torch.int64, dev)
    hist = torch.zeros(1, 256, dtype=torch.int64, device=dev)
    cnt = torch.empty(p_layer.numel(), dtype=torch.int32, device=dev)
    first = to_device([0], torch.int64, dev)
    grid = (p_layer.numel(),)
    passes = up.radix_passes(8)
    with on_device(dev):  # the same sequence as update.update
        keep_off = up._select(0, grid, launch, st_keep, hist, cnt, p_layer.long(), first, block, iters, passes)
        up._mark_kernel[grid](*launch, st_keep, keep_off, BLOCK=block, ITERS=iters)
        grow_off = up._select(1, grid, launch, st_grow, hist, cnt, p_layer.long(), first, block, iters, passes)
        up._final_kernel[grid](*launch, rows, st_grow, grow_off, BLOCK=block, ITERS=iters)
    assert torch.equal(m, exp["m"])
    for name, got in (("w", w), ("st", st), ("g", g)):
        assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           exp[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name


def test_histogram_bins_count_past_int32(dev):
    """A layer's histogram bin already holding 2**31 - 3 keys (as in a 2**31+ element layer of equal
    values) goes on counting: the per-layer histograms are int64 and the kernel adds in int64."""
    gen = torch.Generator().manual_seed(32)
    n = 300
    w = levels(n, gen, dev)
    m = torch.ones(n, dtype=torch.bool, device=dev)
    p_layer, p_start = window_programs(n, 128, dev)
    tab = to_device([[shifted(w), shifted(m), shifted(w), OFF + n, 0, 0, 0, 0]], torch.int64, dev)
    st = to_device([[0, 5]], torch.int64, dev)
    (shift, bits), = [p for p in up.radix_passes(8) if p[0] + p[1] == 31]  # the first pass: no prefix
    keys = w.abs().view(torch.int32) & 0x7FFFFFFF
    want = torch.bincount((keys >> shift).long().cpu(), minlength=256).to(dev)
    hist = torch.zeros(1, 256, dtype=torch.int64, device=dev)
    top = int((keys >> shift).max())
    hist[0, top] = 2 ** 31 - 3
    with on_device(dev):
        up._hist_kernel[(p_layer.numel(),)](p_layer, p_start, tab, st, hist, PHASE=0, SHIFT=shift, NBITS=bits,
                                            HSTRIDE=256, BLOCK=64, ITERS=2)
    want[top] += 2 ** 31 - 3
    assert int(hist[0, top]) > 2 ** 31 - 1
    assert torch.equal(hist[0], want)


@pytest.mark.parametrize("last", [False, True])
def test_pick_with_counts_and_k_past_int32(dev, last):
    """The per-layer pick: bins holding 2**31+ keys and k past 2**32, in int64 (Python's ints as oracle)."""
    nbits, hstride = 8, 256
    h = [0] * hstride
    h[200], h[150], h[7], h[3] = BIG, 3 * 2 ** 31, 2 ** 32 + 1, 99
    cases = [2 ** 32 + 7,            # falls in bin 150
             BIG,                    # exactly bin 200: the whole bin, k_rem == count at the threshold
             BIG + 3 * 2 ** 31 + 5]  # falls in bin 7
    for k in cases:
        hist = torch.tensor([h], dtype=torch.int64, device=dev)
        st = torch.tensor([[1, k]], dtype=torch.int64, device=dev)
        with on_device(dev):
            up._pick_kernel[(1,)](st, hist, NBITS=nbits, HSTRIDE=hstride, LAST=last)
        b = max(i for i in range(hstride) if sum(h[i:]) >= k)
        k_rem = k - sum(h[b + 1:])
        if last and k_rem == h[b]:
            k_rem = 2 ** 62  # every key at the threshold is taken
        assert st.tolist() == [[(1 << nbits) | b, k_rem]], k
        assert not hist.any(), "the pick clears the histogram for the next pass"


@pytest.mark.parametrize("take", [0, 5, 37, 1000])
def test_ties_before_a_program_past_int32(dev, take):
    """The mark pass of a program whose layer already had BIG ties at the threshold in earlier programs, with
    BIG + `take` ties to take: the first `take` ties of this program are kept (in index order), and keys
    above the threshold always. The tie scan gives offsets past int32 too."""
    gen = torch.Generator().manual_seed(33)
    n = 300
    w = levels(n, gen, dev)
    m = (torch.rand(n, generator=gen) < 0.7).to(dev)
    mb = m.clone()
    p_layer, p_start = window_programs(n, 512, dev)
    tab = to_device([[shifted(w), shifted(mb), shifted(w), OFF + n, 0, 0, 0, 0]], torch.int64, dev)
    thr = int(torch.tensor(1.0).view(torch.int32))
    st = to_device([[thr, BIG + take]], torch.int64, dev)
    # per-program tie counts of four programs of one layer (int32 each) -> the ties before each (int64)
    counts = torch.tensor([BIG - 2 ** 31 + 1, 2 ** 31 - 1, 0, 7], dtype=torch.int32, device=dev)
    zeros = torch.zeros(4, dtype=torch.long, device=dev)
    tie_off = up._scan_offsets(counts, zeros, zeros[:1])
    assert tie_off.dtype == torch.int64 and tie_off.tolist() == [0, BIG - 2 ** 31 + 1, BIG, BIG]
    with on_device(dev):
        up._mark_kernel[(1,)](p_layer, p_start, tab, st, tie_off[3:], BLOCK=64, ITERS=8)
    eq = m & (w == 1.0)
    kept = (m & (w > 1.0)) | (eq & (torch.cumsum(eq.long(), 0) <= take))
    assert torch.equal(mb.view(torch.uint8), m.to(torch.uint8) | (kept.to(torch.uint8) << 1))


def test_after_step_and_nonfinite_on_a_window(dev):
    """The after-step op and the NaN/inf check at offsets past 2**32."""
    gen = torch.Generator().manual_seed(34)
    n = 300
    m = (torch.rand(n, generator=gen) < 0.5).to(dev)
    w32 = torch.randn(n, generator=gen).to(dev)
    w16 = torch.randn(n, generator=gen).to(torch.float16).to(dev)
    e32, e16 = torch.where(m, w32, 0.0), torch.where(m, w16, torch.zeros((), dtype=torch.float16, device=dev))
    p_group, p_start = window_programs(n, 128, dev)
    groups = to_device([[shifted(m), OFF + n, 0, 2]], torch.int64, dev)
    rows = to_device([[shifted(w32), 4], [shifted(w16), 2]], torch.int64, dev)
    with on_device(dev):
        ew._apply_masks_kernel[(p_group.numel(),)](p_group, p_start, groups, rows, BLOCK=64, ITERS=2)
    assert torch.equal(w32, e32) and torch.equal(w16, e16)
    for bad in (None, n - 1):
        x = torch.randn(n, generator=gen).to(dev)
        if bad is not None:
            x[bad] = float("inf")
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
        items = to_device([[shifted(x), OFF + n, 0]], torch.int64, dev)
        with on_device(dev):
            ew._nonfinite_kernel[(p_group.numel(),)](p_group, p_start, items, flag, BLOCK=64, ITERS=2)
        assert int(flag) == (bad is not None)


def test_backend_has_no_size_limit():
    """All of the above holds for any layer size: the Triton backend refuses no layer."""
    assert TritonBackend().max_numel() is None
    assert REF.max_numel() is None
    with pytest.raises(ValueError, match="block \\* iters"):
        TritonBackend(block=2 ** 16, iters=2 ** 15)
