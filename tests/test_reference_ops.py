"""The reference backend against a brute-force oracle (stable full sort), which is the spec's tie rule
written the obvious way: among equal scores, the lower flat index ranks first."""
import math

import pytest
import torch

from rigl_fast.reference import ReferenceBackend, top_k_flags

REF = ReferenceBackend()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["generic", "levels", "zeros"]
UPDATE_SHAPES = [(1,), (7,), (1023,), (33, 31), (5, 3, 3, 3)]


def oracle_top_k(x, k):
    order = torch.sort(x.float(), descending=True, stable=True).indices
    out = torch.zeros(x.numel(), dtype=torch.bool)
    out[order[:k]] = True
    return out


def oracle_new_mask(w, m, s, n_keep, n_grow):
    key = torch.where(m.flatten(), w.flatten().abs().float(), torch.tensor(-1.0))
    keep = oracle_top_k(key, n_keep)
    grow = oracle_top_k(torch.where(keep, torch.tensor(-1.0), s.flatten().abs().float()), n_grow)
    return (keep | grow).view(m.shape)


def random_values(n, kind, dtype, g):
    if kind == "generic":
        return torch.randn(n, generator=g).to(dtype)
    if kind == "levels":  # a handful of distinct values: ties everywhere
        return (torch.randint(-3, 4, (n,), generator=g).float() * 0.5).to(dtype)
    if kind == "zeros":
        return torch.zeros(n, dtype=dtype)
    raise ValueError(kind)


@pytest.mark.parametrize("n", [1, 7, 1023, 4097])
@pytest.mark.parametrize("kind", KINDS)
def test_top_k_flags_matches_stable_sort(n, kind):
    g = torch.Generator().manual_seed(n)
    x = random_values(n, kind, torch.float32, g).abs()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        if 0 <= k <= n:
            assert torch.equal(top_k_flags(x, k), oracle_top_k(x, k)), (n, kind, k)


def make_layer(shape, density, kind, dtype, g):
    n = math.prod(shape)
    m = torch.rand(n, generator=g) < density
    w = torch.where(m, random_values(n, kind, torch.float32, g), 0.0).to(dtype)
    s = random_values(n, kind, torch.float32, g).to(dtype)
    return w.view(shape), m.view(shape), s.view(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UPDATE_SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_update_matches_oracle(dtype, shape, kind):
    # a fixed seed per case (hash() of a str changes with every process: a failure could not be replayed)
    seed = 100 * DTYPES.index(dtype) + 10 * UPDATE_SHAPES.index(shape) + KINDS.index(kind)
    g = torch.Generator().manual_seed(seed)
    w, m, s = make_layer(shape, 0.3, kind, dtype, g)
    n_active = int(m.sum())
    n = m.numel()
    for n_drop in sorted({0, n_active // 3, n_active}):
        n_keep = n_active - n_drop
        if n_keep + n_drop > n:
            continue
        w1, m1 = w.clone(), m.clone()
        st = [torch.randn(shape, generator=g).to(dtype), torch.rand(shape, generator=g).to(dtype)]
        st_before = [t.clone() for t in st]
        grad = torch.randn(shape, generator=g).to(dtype)
        grad_before = grad.clone()
        REF.update([w1], [m1], [s], [n_keep], [n_drop], [st], [grad])
        expect = oracle_new_mask(w, m, s, n_keep, n_drop)
        assert torch.equal(m1, expect)
        assert int(m1.sum()) == n_active
        both = expect & m
        zero = torch.zeros((), dtype=dtype)
        assert torch.equal(w1, torch.where(both, w, zero))
        for t, t0 in zip(st, st_before):
            assert torch.equal(t, torch.where(both, t0, zero))
        assert torch.equal(grad, torch.where(expect, grad_before, zero))


def test_update_drop_all_regrow_by_score():
    # n_drop = n_active: keep nothing, grow the n_active best scores anywhere (dropped ones may regrow)
    w = torch.tensor([5.0, 0.0, 3.0, 0.0, 1.0])
    m = torch.tensor([True, False, True, False, True])
    s = torch.tensor([9.0, 8.0, 0.0, 7.0, 0.0])
    REF.update([w], [m], [s], [0], [3], [[]], [None])
    assert m.tolist() == [True, True, False, True, False]
    # position 0 was dropped and regrown: it keeps its value; others are zero
    assert w.tolist() == [5.0, 0.0, 0.0, 0.0, 0.0]


def test_update_ties_take_lower_index():
    w = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 0.0])
    m = torch.tensor([True, True, True, True, False, False])
    s = torch.zeros(6)
    REF.update([w], [m], [s], [2], [2], [[]], [None])
    # keep the two lowest-index equal weights; grow the two lowest-index non-kept (all scores tie at 0)
    assert m.tolist() == [True, True, True, True, False, False]
    assert w.tolist() == [2.0, 2.0, 2.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_grad_is_a_select_and_accumulates_dense(dtype):
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(4, 5, generator=g).to(dtype)
    grad[0, 0], grad[0, 1], grad[1, 1] = float("nan"), float("inf"), -3.0
    mask = torch.rand(4, 5, generator=g) < 0.5
    mask[0, 0] = mask[0, 1] = mask[1, 1] = False
    acc = torch.randn(4, 5, generator=g).to(dtype)
    acc0 = acc.clone()
    out = REF.mask_grad(grad, mask, acc, 3)
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))
    assert not torch.signbit(out[~mask]).any()  # +0.0 exactly, even where grad was NaN/inf/negative
    assert torch.equal(out[mask], grad[mask])
    expect = acc0.clone()
    expect += grad / 3
    assert torch.equal(acc.isnan(), expect.isnan())
    assert torch.equal(torch.nan_to_num(acc), torch.nan_to_num(expect))


def test_mask_grad_noncontiguous():
    grad = torch.randn(6, 4).t()
    mask = torch.rand(4, 6) < 0.5
    out = REF.mask_grad(grad, mask, None, 1)
    assert torch.equal(out, torch.where(mask, grad, 0.0))


def test_apply_masks_and_nonfinite():
    ts = [torch.randn(3, 3), torch.full((5,), float("nan"))]
    ms = [torch.rand(3, 3) < 0.5, torch.tensor([True, False, True, False, False])]
    before = ts[0].clone()
    REF.apply_masks(ts, ms)
    assert torch.equal(ts[0], torch.where(ms[0], before, 0.0))
    assert ts[1].isnan().tolist() == [True, False, True, False, False]
    assert REF.any_nonfinite(ts)
    assert not REF.any_nonfinite([ts[0]])
    assert not REF.any_nonfinite([])


@pytest.mark.parametrize("kind", KINDS + ["spiky"])
def test_prefiltered_top_k_matches_stable_sort(kind):
    from rigl_fast.reference import top_k_flags_prefiltered
    g = torch.Generator().manual_seed(3)
    n = 200_003
    if kind == "spiky":  # the sample misses a cluster of large values: the fallback must still be exact
        x = torch.zeros(n)
        x[5:5000] = torch.rand(4995, generator=g) + 1
    else:
        x = random_values(n, kind, torch.float32, g).abs()
    for k in (1, 17, 999, 4000, 20000):
        assert torch.equal(top_k_flags_prefiltered(x, k), oracle_top_k(x, k)), (kind, k)


# ------------------------------------------------------------------------------------------------ 2**31+ elements
# A layer that large (2 GiB of mask, 8+ GiB of fp32 weight and score) does not fit this suite; the tests below
# check the arithmetic of the large-layer path on small stand-ins instead (docs/cpp.md, docs/triton.md).
def test_tie_rank_dtype_is_int64_past_int32():
    from rigl_fast.reference import tie_rank_dtype
    assert tie_rank_dtype(0) == torch.int32
    assert tie_rank_dtype(2 ** 31 - 1) == torch.int32  # the largest count int32 holds
    assert tie_rank_dtype(2 ** 31) == torch.int64
    assert tie_rank_dtype(3 * 2 ** 32) == torch.int64


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_flags_int64_tie_ranks_match(kind, monkeypatch):
    """The tie ranks counted in int64 (a layer with 2**31+ ties) select exactly what the int32 count does."""
    from rigl_fast import reference
    g = torch.Generator().manual_seed(11)
    x = random_values(4097, kind, torch.float32, g).abs()
    ks = (1, 100, 2048, 4000)
    want = [top_k_flags(x, k) for k in ks]
    used = []
    monkeypatch.setattr(reference, "tie_rank_dtype", lambda n: used.append(n) or torch.int64)
    for k, w in zip(ks, want):
        assert torch.equal(top_k_flags(x, k), w), (kind, k)
        assert torch.equal(w, oracle_top_k(x, k)), (kind, k)
    if kind != "generic":
        assert used, "no tie straddled the threshold: the int64 count never ran"


@pytest.mark.parametrize("kind", KINDS)
def test_kth_largest_by_bits_matches_sort(kind):
    """The large-layer threshold: the k-th largest by a binary search on the bits, for signed values, -0.0
    and +0.0 (equal as floats), ties, and every k of a small tensor."""
    from rigl_fast.reference import kth_largest_by_bits
    g = torch.Generator().manual_seed(12)
    x = random_values(301, kind, torch.float32, g)
    x[::7] = -0.0
    x[1] = torch.finfo(torch.float32).max
    x[2] = -torch.finfo(torch.float32).max
    x[3] = torch.finfo(torch.float32).tiny / 4  # a subnormal
    desc = torch.sort(x, descending=True).values
    for k in range(1, x.numel() + 1):
        v = kth_largest_by_bits(x, k)
        assert v.dtype == torch.float32 and v.dim() == 0
        assert v == desc[k - 1], (kind, k, float(v), float(desc[k - 1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_large_layer_path_matches_oracle(dtype, kind, monkeypatch):
    """The reference's path for layers of 2**31+ elements, forced on small layers: the same masks as the
    oracle, and none of the ops it avoids (topk, kthvalue, boolean indexing) runs."""
    from rigl_fast import reference
    monkeypatch.setattr(reference, "LARGE_LAYER", 1)
    g = torch.Generator().manual_seed(13)
    w, m, s = make_layer((4097,), 0.3, kind, dtype, g)
    n_active, n = int(m.sum()), m.numel()
    cases = [(n_active, 0), (n_active - n_active // 3, n_active // 3), (0, n_active), (n_active, n - n_active)]

    def refuse(*a, **k):
        raise AssertionError("the large-layer path called an op it must avoid")
    getitem = torch.Tensor.__getitem__

    def getitem_no_tensor_index(self, i):
        if isinstance(i, torch.Tensor):
            refuse()
        return getitem(self, i)
    with monkeypatch.context() as mp:
        for name in ("topk", "kthvalue", "masked_select"):
            mp.setattr(torch, name, refuse)
        mp.setattr(torch.Tensor, "masked_scatter_", refuse)
        mp.setattr(torch.Tensor, "__getitem__", getitem_no_tensor_index)
        got = []
        for n_keep, n_grow in cases:
            m1 = m.clone()
            REF.update([w.clone()], [m1], [s], [n_keep], [n_grow], [[]], [None])
            got.append(m1)
    for (n_keep, n_grow), m1 in zip(cases, got):
        assert torch.equal(m1, oracle_new_mask(w, m, s, n_keep, n_grow)), (n_keep, n_grow)
        assert int(m1.sum()) == n_keep + n_grow
