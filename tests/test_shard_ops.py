"""The per-shard ops of the FSDP2 update (ops.Backend.key_histograms / take_top / commit / split_grad /
fold_grad), every backend against plain-PyTorch arithmetic written out here, and the radix select
(distributed.sharded_top_k) over shards simulated in one process against the reference's whole-layer selection.

Inputs are fresh random tensors from fixed seeds: odd sizes, fp32/fp16/bf16, tie-heavy values (including
-0.0 and +0.0, which share a key), non-contiguous values. Flags and masks compare exactly; floats bit for bit.
"""

import pytest
import torch

from rigl_fast import distributed as D
from rigl_fast.reference import ReferenceBackend, top_k_flags

from helpers import backend_or_fail, threaded_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, 4097]
REF = ReferenceBackend()


@pytest.fixture(params=["reference", "cpp", "triton"])
def ops(request, device):
    return backend_or_fail(request.param, device)


def _values(n, dtype, kind, seed, device, strided=False):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(n * (2 if strided else 1), generator=g)
    else:  # few levels: many exact ties, and -0.0 next to +0.0
        levels = torch.tensor([-1.0, -0.0, 0.0, 0.5, 1.0, 2.0, -2.0])
        x = levels[torch.randint(0, len(levels), (n * (2 if strided else 1),), generator=g)]
    x = x.to(dtype).to(device)
    return x[::2] if strided else x


def _flags(n, p, seed, device):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < p).to(device)


def _keys(v):
    return v.float().abs().view(torch.int32).reshape(-1).long()


def bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "levels"])
@pytest.mark.parametrize("flag_value", [True, False])
def test_key_histograms(ops, device, dtype, kind, flag_value):
    vals = [_values(n, dtype, kind, 10 + i, device, strided=(i % 2 == 1)) for i, n in enumerate(SIZES)]
    flags = [_flags(n, 0.6, 20 + i, device) for i, n in enumerate(SIZES)]
    for shift, bits_ in D.RADIX_PASSES + ((3, 5),):
        # a prefix taken from an eligible element, so some rows are non-empty; one row off (-1)
        prefixes = []
        for i, (v, f) in enumerate(zip(vals, flags)):
            ok = (f == flag_value).nonzero()
            prefixes.append(-1 if i == 2 or not len(ok) else int(_keys(v)[ok[len(ok) // 2, 0]] >> (shift + bits_)))
        got = ops.key_histograms(vals, flags, flag_value, prefixes, shift, bits_)
        assert got.dtype == torch.int64 and tuple(got.shape) == (len(vals), 1 << bits_)
        for i, (v, f, p) in enumerate(zip(vals, flags, prefixes)):
            want = torch.zeros(1 << bits_, dtype=torch.int64)
            if p >= 0:
                k = _keys(v).cpu()
                hit = (f.cpu() == flag_value) & ((k >> (shift + bits_)) == p)
                want += torch.bincount((k[hit] >> shift) & ((1 << bits_) - 1), minlength=1 << bits_)
            assert torch.equal(got[i].cpu(), want), (i, shift, bits_)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "levels"])
def test_take_top(ops, device, dtype, kind):
    vals = [_values(n, dtype, kind, 30 + i, device, strided=(i % 2 == 0)) for i, n in enumerate(SIZES)]
    flags = [_flags(n, 0.5, 40 + i, device) for i, n in enumerate(SIZES)]
    for flag_value in (True, False):
        thresholds, ties = [], []
        for i, (v, f) in enumerate(zip(vals, flags)):
            k = _keys(v)[(f == flag_value)]
            if i == 3:
                thresholds.append(D.NO_KEY)  # takes nothing
                ties.append(0)
            elif len(k):
                t = int(k[len(k) // 3])
                thresholds.append(t)
                ties.append(min(int((k == t).sum()), 1 + i))
            else:
                thresholds.append(0)
                ties.append(0)
        got = ops.take_top(vals, flags, flag_value, thresholds, ties)
        for v, f, t, n_ties, g in zip(vals, flags, thresholds, ties, got):
            assert g.dtype == torch.bool and g.numel() == v.numel()
            k = _keys(v).cpu()
            ok = f.cpu() == flag_value
            eq = ok & (k == t)
            want = ok & (k > t)
            want |= eq & (torch.cumsum(eq.long(), 0) <= n_ties)
            assert torch.equal(g.reshape(-1).cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_commit(ops, device, dtype):
    shapes = [(1,), (7, 3), (33, 31)]
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
    states = [[torch.randn(s, generator=g).to(dtype).to(device) for _ in range(i % 3)] for i, s in enumerate(shapes)]
    grads = [None if i == 1 else torch.randn(s, generator=g).to(dtype).to(device) for i, s in enumerate(shapes)]
    masks = [(torch.rand(s, generator=g) < 0.5).to(device) for s in shapes]
    keep = [(m.reshape(-1) & (torch.rand(m.numel(), generator=g) < 0.7).to(device)) for m in masks]
    grow = [(~k & (torch.rand(k.numel(), generator=g) < 0.3).to(device)) for k in keep]
    want_w = [w.clone() for w in ws]
    want_st = [[t.clone() for t in st] for st in states]
    want_g = [None if x is None else x.clone() for x in grads]
    old = [m.clone() for m in masks]
    ops.commit(ws, masks, keep, grow, states, grads)
    for i in range(len(shapes)):
        new = (keep[i] | grow[i]).view(shapes[i])
        both = new & old[i]
        z = torch.zeros((), dtype=dtype, device=device)
        assert torch.equal(masks[i], new)
        assert torch.equal(bits(ws[i]), bits(torch.where(both, want_w[i], z)))
        for t, u in zip(states[i], want_st[i]):
            assert torch.equal(bits(t), bits(torch.where(both, u, z)))
        if grads[i] is not None:
            assert torch.equal(bits(grads[i]), bits(torch.where(new, want_g[i], z)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 255, 4097])
def test_split_and_fold_grad(ops, device, dtype, n):
    g = torch.Generator().manual_seed(n)
    mask = (torch.rand(n, generator=g) < 0.4).to(device)
    g1 = torch.randn(n, generator=g).to(dtype).to(device)
    g2 = torch.randn(n, generator=g).to(dtype).to(device)
    acc0 = torch.randn(n, generator=g).to(dtype).to(device)
    z = torch.zeros((), dtype=dtype, device=device)
    # two backward passes of one step, summed into .grad as FSDP2 sums them; split after each
    grad = g1.clone()
    off = torch.zeros_like(grad)
    ops.split_grad(grad, mask, off)
    assert torch.equal(bits(grad), bits(torch.where(mask, g1, z)))
    assert torch.equal(bits(off), bits(torch.where(mask, z, g1)))
    grad += g2
    ops.split_grad(grad, mask, off)
    dense = g1 + g2
    assert torch.equal(bits(grad + off), bits(dense))
    acc = acc0.clone()
    ops.fold_grad(acc, grad, off, 3)
    want = acc0.clone()
    want += dense / 3
    assert torch.equal(bits(acc), bits(want))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["random", "levels"])
def test_radix_select_over_simulated_shards(ops, device, world, kind):
    """distributed.radix_top_k run by `world` threads, one per simulated rank, each on its shard, with the two
    collectives done through shared memory and a barrier; the joined flags equal top_k_flags on the whole
    layer: ties to the lower index across shard boundaries, uneven shards (7 rows over 5 ranks leaves one
    empty), k = 0 and k = every eligible position."""
    rows, cols = 7, 13
    n = rows * cols
    vals = [_values(n, torch.float32, kind, 50 + s, device) for s in range(3)]
    flags = [_flags(n, 0.6, 60 + s, device) for s in range(3)]
    chunk = -(-rows // world)
    bounds = [(min(r * chunk, rows) * cols, min((r + 1) * chunk, rows) * cols) for r in range(world)]
    for flag_value in (True, False):
        eligible = [int((f == flag_value).sum()) for f in flags]
        for k in (0, 1, 17, 10 ** 6):
            ks = [min(k, e) for e in eligible]
            got = _threaded_top_k(ops, vals, flags, flag_value, ks, bounds)
            for v, f, kk, g in zip(vals, flags, ks, got):
                x = torch.where(f == flag_value, v.float().abs(), torch.tensor(-1.0, device=device))
                assert torch.equal(g.cpu(), top_k_flags(x, kk).cpu()), (world, flag_value, kk)


def _threaded_top_k(ops, vals, flags, flag_value, ks, bounds):
    def rank(r, all_sum, ties_before):
        lo, hi = bounds[r]
        return D.radix_top_k(ops, [v[lo:hi] for v in vals], [f[lo:hi] for f in flags], flag_value, ks,
                             all_sum=all_sum, ties_before=ties_before)

    results = threaded_ranks(len(bounds), rank)
    return [torch.cat([results[r][i].reshape(-1) for r in range(len(bounds))]) for i in range(len(vals))]
