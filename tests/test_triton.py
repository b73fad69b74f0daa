"""Triton backend against the reference backend: bit-identical masks, identical weights/states/grads.

Without CUDA these run the real kernels under Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1),
so sizes are small; a backend with a tiny BLOCK/ITERS makes small tensors span many programs, which is
where the cross-program tie scan and the histogram atomics can go wrong.
"""
import contextlib
import os
import re
import subprocess
import sys

import pytest
import torch

from rigl_fast import RigLScheduler
from rigl_fast import distributed as D
from rigl_fast import reference as R
from rigl_fast.ops import Units, get_backend, units_of
from rigl_fast.reference import ReferenceBackend
from rigl_fast.structure import draw

from helpers import MLP, SmallResNet, batches, train

from rigl_fast.kernels import TritonBackend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, 4097]
REF = ReferenceBackend()
# tiny chunks (64 x 2 elements per program) put 4097 elements on 33 programs; default-sized ones on one
# SMALL also uses the widest radix digits (3 passes) and the others the default (4 passes): both layouts run
SMALL = TritonBackend(block=64, iters=2, radix_bits=11)
WIDE = TritonBackend(block=1024, iters=1)
MID = TritonBackend(block=512, iters=2)  # 4097 elements -> 5 programs, at a fraction of SMALL's cost


@pytest.fixture
def dev(device):
    return torch.device(device)


def bits(t):
    """Bit pattern view, so NaNs compare equal to themselves and -0.0 differs from +0.0."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(a, b, what=""):
    """Identical bit for bit, except that any NaN equals any NaN: payloads are not part of the contract
    (torch's own vectorised and scalar bf16 casts give different NaN bits)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    differ = bits(a) != bits(b)
    if a.dtype.is_floating_point:
        differ &= ~(torch.isnan(a.contiguous()) & torch.isnan(b.contiguous()))
    assert not differ.any(), f"{what}: {int(differ.sum())} entries differ"


def values(shape, dtype, kind, gen, device):
    if kind == "random":
        x = torch.randn(shape, generator=gen)
    elif kind == "levels":  # a handful of values: many exact ties, including -0.0 vs +0.0
        x = torch.tensor([-1.0, -0.0, 0.0, 0.5, 1.0, 2.0])[torch.randint(0, 6, shape, generator=gen)]
    elif kind == "zeros":
        x = torch.zeros(shape)
    else:
        raise ValueError(kind)
    return x.to(dtype).to(device)


# ------------------------------------------------------------------------------------------------ gradient op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("n", [1, 3])
def test_mask_grad_matches_reference(dev, dtype, numel, n):
    gen = torch.Generator().manual_seed(numel * 7 + n)
    grad = values((numel,), dtype, "random", gen, dev) * 100
    grad[0] = float("nan")
    if numel > 2:
        grad[-1] = float("inf")
    mask = (torch.rand(numel, generator=gen) < 0.4).to(dev)
    mask[0] = False  # NaN off the mask must become +0.0
    acc = values((numel,), dtype, "random", gen, dev)
    for b in (SMALL, WIDE):
        acc_t, acc_ref = acc.clone(), acc.clone()
        out = b.mask_grad(grad, mask, acc_t, n)
        ref = REF.mask_grad(grad, mask, acc_ref, n)
        assert_same(out, ref, "masked grad")
        assert_same(acc_t, acc_ref, "accumulator")
        assert_same(b.mask_grad(grad, mask, None, n), ref, "masked grad without accumulator")
    assert bits(out)[0].item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "channels_last", "permuted5d"])
def test_mask_grad_noncontiguous(dev, dtype, layout):
    gen = torch.Generator().manual_seed(1)
    if layout == "transposed":  # what torch.compile hands a Linear weight's hook
        grad = values((33, 47), dtype, "random", gen, dev).t()
    elif layout == "sliced":
        grad = values((47, 66), dtype, "random", gen, dev)[:, ::2]
    elif layout == "expanded":  # d(w.sum())/dw is an expanded scalar
        grad = values((1,), dtype, "random", gen, dev).expand(47, 33)
    elif layout == "channels_last":
        grad = values((6, 5, 3, 3), dtype, "random", gen, dev).to(memory_format=torch.channels_last)
    else:
        grad = values((3, 4, 5, 2, 7), dtype, "random", gen, dev).permute(4, 2, 0, 3, 1)
    assert not grad.is_contiguous()
    mask = (torch.rand(grad.shape, generator=gen) < 0.5).to(dev)
    acc = values(grad.shape, dtype, "random", gen, dev)
    acc_ref = acc.clone()
    grad_before = grad.clone()
    out = SMALL.mask_grad(grad, mask, acc, 3)
    ref = REF.mask_grad(grad, mask, acc_ref, 3)
    assert_same(out, ref, "masked grad")
    assert_same(acc, acc_ref, "accumulator")
    assert_same(grad, grad_before, "the incoming grad is not modified")


def test_mask_grad_accumulates_over_window(dev):
    """n backward passes summed in the accumulator, rounding step by step as torch does (n = 3 is not a power
    of two, so an approximate division would show)."""
    gen = torch.Generator().manual_seed(2)
    acc_t = torch.zeros(4097, device=dev)
    acc_r = acc_t.clone()
    mask = (torch.rand(4097, generator=gen) < 0.5).to(dev)
    for _ in range(3):
        g = values((4097,), torch.float32, "random", gen, dev) * 1e3
        SMALL.mask_grad(g, mask, acc_t, 3)
        REF.mask_grad(g, mask, acc_r, 3)
    assert_same(acc_t, acc_r, "accumulator")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_grad_reciprocal_rounding(dev, dtype):
    """On CUDA torch computes `grad / n` (n a Python int) as grad * fp32(1/n), which the reference then
    inherits; the kernel's RECIP mode must round exactly like that. Emulated here with explicit fp32 ops."""
    from rigl_fast.kernels.elementwise import mask_grad
    gen = torch.Generator().manual_seed(11)
    grad = values((4097,), dtype, "random", gen, dev) * 1e3
    mask = (torch.rand(4097, generator=gen) < 0.5).to(dev)
    acc = values((4097,), dtype, "random", gen, dev)
    expect = acc.clone()
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(3.0, dtype=torch.float32)
    q = (grad.float() * inv.to(dev)).to(dtype)
    expect.copy_((expect.float() + q.float()).to(dtype))
    out = mask_grad(grad, mask, acc, 3, block=1024, recip=True)
    assert_same(acc, expect, "accumulator")
    assert_same(out, torch.where(mask, grad, torch.zeros((), dtype=dtype, device=dev)), "masked grad")
    if dtype == torch.float32:  # the two roundings really differ somewhere, so both modes are exercised
        acc_div = values((4097,), dtype, "random", torch.Generator().manual_seed(0), dev)
        acc_rec = acc_div.clone()
        mask_grad(grad, mask, acc_div, 3, block=1024, recip=False)
        mask_grad(grad, mask, acc_rec, 3, block=1024, recip=True)
        assert not torch.equal(acc_div, acc_rec)


# ------------------------------------------------------------------------------------------------ after-step op
@pytest.mark.parametrize("backend", [SMALL, WIDE], ids=["small", "wide"])
def test_apply_masks_matches_reference(dev, backend):
    gen = torch.Generator().manual_seed(3)
    shapes = [(1,), (7,), (1023,), (4097,), (9, 5, 3, 3)]
    masks = [(torch.rand(s, generator=gen) < 0.3).to(dev) for s in shapes]
    tensors, tmasks = [], []
    for s, m, dtype in zip(shapes, masks, [torch.float32, torch.float16, torch.bfloat16, torch.float32,
                                           torch.float64]):
        for j in range(3):  # a weight and two optimizer states share the mask
            t = values(s, dtype if j == 0 else torch.float32, "random", gen, dev)
            t.view(-1)[0] = float("nan")
            tensors.append(t)
            tmasks.append(m)
    nc = values((4097 * 2,), torch.float32, "random", gen, dev)[::2]  # a non-contiguous one
    tensors.append(nc)
    tmasks.append(masks[3])
    expect = [t.clone() for t in tensors]
    REF.apply_masks(expect, tmasks)
    backend.apply_masks(tensors, tmasks)
    for i, (t, e) in enumerate(zip(tensors, expect)):
        assert_same(t, e, f"tensor {i}")
    backend.apply_masks(tensors, tmasks)  # second call: cached launch tables, same result
    for i, (t, e) in enumerate(zip(tensors, expect)):
        assert_same(t, e, f"tensor {i} (second call)")


def test_apply_masks_reuses_table_for_new_tensors_at_same_addresses(dev):
    """The table cache keys on addresses and sizes; new contents at the same addresses are still masked."""
    gen = torch.Generator().manual_seed(4)
    t = values((500,), torch.float32, "random", gen, dev)
    m = (torch.rand(500, generator=gen) < 0.5).to(dev)
    SMALL.apply_masks([t], [m])
    t.copy_(values((500,), torch.float32, "random", gen, dev))
    e = t.clone()
    REF.apply_masks([e], [m])
    SMALL.apply_masks([t], [m])
    assert_same(t, e)


# ------------------------------------------------------------------------------------------------ non-finite check
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
def test_any_nonfinite(dev, dtype, bad):
    gen = torch.Generator().manual_seed(5)
    ts = [values((n,), dtype, "random", gen, dev) for n in (1, 7, 4097)]
    ts.append(torch.full((300,), 65504.0 if dtype == torch.float16 else 3e38, dtype=dtype, device=dev))
    if bad is not None:
        ts[2][-1] = float(bad)  # the last element of the last program of a multi-program tensor
    expect = REF.any_nonfinite(ts)
    assert expect == (bad is not None)
    assert SMALL.any_nonfinite(ts) == expect
    assert WIDE.any_nonfinite(ts) == expect


# ------------------------------------------------------------------------------------------------ topology update
def make_layer(numel, dtype, score_dtype, kind, density, drop, gen, dev, n_states=2, grad="dense"):
    w = values((numel,), dtype, kind, gen, dev)
    s = values((numel,), score_dtype, kind, gen, dev)
    m = (torch.rand(numel, generator=gen) < density).to(dev)
    if not m.any():
        m[numel // 2] = True
    n_active = int(m.sum())
    if drop == "none":
        n_drop = 0
    elif drop == "all":
        n_drop = n_active
    else:
        n_drop = int(n_active * 0.3)
    states = [values((numel,), dtype, "random", gen, dev) for _ in range(n_states)]
    if grad is None:
        g = None
    elif grad == "strided":
        g = values((2 * numel,), dtype, "random", gen, dev)[::2]
    else:
        g = values((numel,), dtype, "random", gen, dev)
    return dict(w=w, m=m, s=s, keep=n_active - n_drop, grow=n_drop, states=states, grad=g)


def run_update(backend, layers):
    """`update` on copies of the layers, or `structured_update` for layers with units."""
    c = [dict(w=L["w"].clone(), m=L["m"].clone(), s=L["s"].clone(), states=[t.clone() for t in L["states"]],
              grad=None if L["grad"] is None else L["grad"].clone()) for L in layers]
    args = [x["w"] for x in c], [x["m"] for x in c], [x["s"] for x in c], [L["keep"] for L in layers]
    rest = [x["states"] for x in c], [x["grad"] for x in c]
    if "units" in layers[0]:
        backend.structured_update(*args, [L["units"] for L in layers], *rest)
    else:
        backend.update(*args, [L["grow"] for L in layers], *rest)
    return c


def check_update(layers, backends=(SMALL, WIDE)):
    ref = run_update(REF, layers)
    for b in backends:
        got = run_update(b, layers)
        for i, (g, r, L) in enumerate(zip(got, ref, layers)):
            assert torch.equal(g["m"], r["m"]), f"layer {i}: masks differ"
            assert int(g["m"].sum()) == L["keep"] + L["grow"]
            if "units" in L:
                assert bool((units_of(g["m"].reshape(-1), L["units"]).sum(1) == L["units"].target).all())
            assert_same(g["w"], r["w"], f"layer {i} weight")
            assert_same(g["s"], r["s"], f"layer {i} score (must be untouched)")
            for j, (a, e) in enumerate(zip(g["states"], r["states"])):
                assert_same(a, e, f"layer {i} state {j}")
            if L["grad"] is not None:
                assert_same(g["grad"], r["grad"], f"layer {i} grad")
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "levels", "zeros"])
def test_update_matches_reference(dev, dtype, kind):
    """Every size and n_drop in {0, some, n_active} in one batched call (layers of different sizes and
    drop counts share each launch)."""
    gen = torch.Generator().manual_seed(DTYPES.index(dtype) * 10 + len(kind))
    layers = [make_layer(n, dtype, dtype, kind, d, drop, gen, dev)
              for drop in ("some", "none", "all")
              for n, d in zip(SIZES + [2000], [1.0, 0.5, 0.3, 0.1, 0.9])]
    ref = check_update(layers, backends=(MID,))
    if kind == "random":  # the update really changed something
        assert any(not torch.equal(r["m"], L["m"]) for r, L in zip(ref, layers))


@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_update_tie_straddles_programs(dev, density):
    """Two levels only: the threshold tie spans most programs, so the per-program tie scan decides."""
    gen = torch.Generator().manual_seed(int(density * 100))
    L = make_layer(4097, torch.float32, torch.float32, "random", density, "some", gen, dev)
    L["w"] = (torch.rand(4097, generator=gen) < 0.5).float().to(dev)
    L["s"] = (torch.rand(4097, generator=gen) < 0.5).float().to(dev) - 2.0
    check_update([L])


def test_update_mixed_dtypes_and_layouts(dev):
    """bf16 weights with fp32 scores (random growth draws fp32), fp32 states beside fp16 weights, no grad,
    a strided grad, a channels_last weight with channels_last states."""
    gen = torch.Generator().manual_seed(7)
    a = make_layer(1023, torch.bfloat16, torch.float32, "random", 0.3, "some", gen, dev, grad=None)
    b = make_layer(777, torch.float16, torch.float16, "levels", 0.5, "some", gen, dev, grad="strided")
    b["states"].append(values((777,), torch.float32, "random", gen, dev))
    c = make_layer(8 * 6 * 3 * 3, torch.float32, torch.float32, "random", 0.2, "some", gen, dev, n_states=0)
    shape = (8, 6, 3, 3)
    c["w"] = c["w"].view(shape).contiguous(memory_format=torch.channels_last)
    c["s"] = c["s"].view(shape)
    c["m"] = c["m"].view(shape)
    c["grad"] = c["grad"].view(shape).contiguous(memory_format=torch.channels_last)
    c["states"] = [values(shape, torch.float32, "random", gen, dev).contiguous(memory_format=torch.channels_last)]
    assert not c["w"].is_contiguous()
    check_update([a, b, c])


@pytest.mark.parametrize("radix_bits", [5, 6, 11])
def test_update_other_radix_widths(dev, radix_bits):
    """Digit widths that leave a narrow first digit (31 = 1 + 6 * 5 for 6 bits), with k = 0 in one layer."""
    gen = torch.Generator().manual_seed(radix_bits)
    a = make_layer(1023, torch.float32, torch.float32, "levels", 0.4, "all", gen, dev)
    b = make_layer(777, torch.float16, torch.float16, "random", 0.3, "some", gen, dev)
    check_update([a, b], backends=(TritonBackend(block=256, iters=1, radix_bits=radix_bits),))


def test_update_zero_keep_and_full_layer(dev):
    """n_keep = 0 (everything dropped, the grow selection alone decides) and a layer whose mask ends full."""
    gen = torch.Generator().manual_seed(8)
    a = make_layer(1023, torch.float32, torch.float32, "levels", 0.4, "all", gen, dev)
    assert a["keep"] == 0
    b = make_layer(500, torch.float32, torch.float32, "random", 0.5, "some", gen, dev)
    b["grow"] = 500 - b["keep"]
    check_update([a, b])


@contextlib.contextmanager
def no_host_reads(dev):
    """Every tensor-to-Python conversion raises inside the block (on CUDA, torch's sync debug mode also turns
    any synchronising call into an error): an op run inside has no host synchronisation, per layer or other."""
    mp = pytest.MonkeyPatch()
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        def refuse(self, *a, _name=name, **k):
            raise AssertionError(f"an op read a tensor back to the host (Tensor.{_name})")
        mp.setattr(torch.Tensor, name, refuse)
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        mp.undo()


def test_update_never_reads_back_to_the_host(dev):
    gen = torch.Generator().manual_seed(9)
    layers = [make_layer(n, torch.float32, torch.float32, "random", 0.4, "some", gen, dev) for n in (500, 231)]
    expect = run_update(REF, layers)
    c = [dict(w=L["w"].clone(), m=L["m"].clone(), s=L["s"].clone()) for L in layers]
    with no_host_reads(dev):
        SMALL.update([x["w"] for x in c], [x["m"] for x in c], [x["s"] for x in c], [L["keep"] for L in layers],
                     [L["grow"] for L in layers], [[], []], [None, None])
    for x, e in zip(c, expect):
        assert torch.equal(x["m"], e["m"])


# ------------------------------------------------------------------------------------------------ sharded update ops
# The per-shard ops of the FSDP2 update (kernels/shard.py) against the reference functions, with SMALL's
# 128-element programs: the histogram atomics of many programs add into one row, and ties at a threshold
# are ranked across programs by the tie scan. tests/test_shard_ops.py runs them at the default sizes.
SHARDS = [  # (shape, dtype, layout): odd sizes, an empty shard, every dtype, non-contiguous values
    ((1,), torch.float32, "contiguous"),
    ((7,), torch.bfloat16, "strided"),
    ((0,), torch.float16, "contiguous"),
    ((23, 29), torch.float16, "reversed"),
    ((1023,), torch.bfloat16, "contiguous"),
    ((2, 3, 2, 5, 3, 7), torch.float32, "reversed"),  # 6 dims: past the kernels' strided layouts, read from a copy
    ((701,), torch.float32, "strided"),
]


def laid_out(shape, dtype, kind, gen, dev, layout):
    """`values` of `shape` stored contiguously, every other element of a wider tensor ("strided"), or with
    the dims in reverse order ("reversed": a transpose in 2-D)."""
    if layout == "strided":
        return values(shape[:-1] + (2 * shape[-1],), dtype, kind, gen, dev)[..., ::2]
    if layout == "reversed":
        return values(shape[::-1], dtype, kind, gen, dev).permute(*reversed(range(len(shape))))
    return values(shape, dtype, kind, gen, dev)


def shard_inputs(kind, seed, dev):
    """Values per SHARDS and flags (bool, contiguous; shaped like the values or flat, as keep flags are)."""
    gen = torch.Generator().manual_seed(seed)
    vals = [laid_out(shape, dtype, kind, gen, dev, layout) for shape, dtype, layout in SHARDS]
    flags = [(torch.rand(v.shape, generator=gen) < 0.6).to(dev) for v in vals]
    flags = [f.reshape(-1) if i % 2 else f for i, f in enumerate(flags)]
    assert sum(not v.is_contiguous() for v in vals) == 4
    return vals, flags


def eligible_keys(v, f, flag_value):
    return R.selection_keys(v)[f.reshape(-1) == flag_value]


@pytest.mark.parametrize("kind", ["random", "levels"])
@pytest.mark.parametrize("flag_value", [True, False])
def test_key_histograms_match_reference(dev, kind, flag_value):
    """Every radix pass, a 5-bit and a 3-bit digit (fewer bins than the kernel's 32); per layer a prefix some
    eligible key has, except one layer off (-1) and one with a prefix no 31-bit key can have."""
    vals, flags = shard_inputs(kind, 70 + flag_value, dev)
    for shift, nbits in D.RADIX_PASSES + ((3, 5), (0, 3)):
        prefixes = []
        for i, (v, f) in enumerate(zip(vals, flags)):
            k = eligible_keys(v, f, flag_value)
            prefixes.append(-1 if i == 3 or not len(k) else int(k[len(k) // 2]) >> (shift + nbits))
        prefixes[5] = 1 << (31 - shift - nbits)
        got = SMALL.key_histograms(vals, flags, flag_value, prefixes, shift, nbits)
        want = REF.key_histograms(vals, flags, flag_value, prefixes, shift, nbits)
        assert got.dtype == torch.int64 and got.shape == (len(vals), 1 << nbits)
        assert torch.equal(got, want), (shift, nbits)
        assert want[4].sum() > 0 and want[6].sum() > 0 and not want[3].any() and not want[5].any()


@pytest.mark.parametrize("kind", ["random", "levels"])
def test_take_top_matches_reference(dev, kind):
    """Per layer a threshold some eligible key equals, with none, one, half, or more than all of its ties to
    take (the layers of one call take different counts); the first layers also get thresholds that take
    nothing (NO_KEY), everything eligible (negative), or only nothing above every key."""
    vals, flags = shard_inputs(kind, 80 + len(kind), dev)
    partial = 0  # layers where the quota cut the ties and they spanned programs: the scan decided
    for flag_value in (True, False):
        eq_counts, thresholds = [], []
        for v, f in zip(vals, flags):
            k = eligible_keys(v, f, flag_value)
            t = int(k[len(k) // 3]) if len(k) else 0
            thresholds.append(t)
            eq_counts.append(int((k == t).sum()))
        for variant in range(4):
            if variant == 3:
                ties = [0] * len(vals)  # no layer ranks ties: the count pass is skipped
            else:
                ties = [[1, n // 2, n + 3][(i + variant) % 3] for i, n in enumerate(eq_counts)]
            thr = list(thresholds)
            thr[0] = [D.NO_KEY, -7, 0x7F800001, 2 ** 40][variant]
            got = SMALL.take_top(vals, flags, flag_value, thr, ties)
            for i, (v, f, t, n, g) in enumerate(zip(vals, flags, thr, ties, got)):
                assert g.dtype == torch.bool and g.shape == (v.numel(),)
                assert torch.equal(g, R.take_top(v, f, flag_value, t, n)), (flag_value, variant, i)
                partial += 0 < n < eq_counts[i] and eq_counts[i] > 128
    if kind == "levels":
        assert partial >= 4


@pytest.mark.parametrize("kind", ["random", "levels"])
def test_radix_select_over_shards_with_small_programs(dev, kind):
    """distributed.radix_top_k on three simulated ranks whose shards each span several programs: the joined
    flags are the whole layer's top k (ties to the lower index across programs and shards)."""
    from test_shard_ops import _threaded_top_k
    gen = torch.Generator().manual_seed(90)
    rows, cols = 9, 61
    vals = [values((rows * cols,), dtype, kind, gen, dev) for dtype in DTYPES]
    flags = [(torch.rand(rows * cols, generator=gen) < 0.7).to(dev) for _ in DTYPES]
    bounds = [(0, 4 * cols), (4 * cols, 8 * cols), (8 * cols, rows * cols)]
    ks = [150, 0, 300]
    got = _threaded_top_k(SMALL, vals, flags, True, ks, bounds)
    for v, f, k, g in zip(vals, flags, ks, got):
        x = torch.where(f, v.float().abs(), torch.tensor(-1.0, device=dev))
        assert torch.equal(g, R.top_k_flags(x, k))


def test_commit_matches_reference(dev):
    """Weights contiguous, transposed, channels_last, 6-D permuted (written through a copy) and empty; states of
    other dtypes (fp64 included) and layouts; gradients absent, contiguous or transposed."""
    gen = torch.Generator().manual_seed(91)
    specs = [((33, 31), torch.float32, "contiguous", "reversed"), ((7,), torch.bfloat16, "strided", None),
             ((17, 241), torch.float16, "reversed", "contiguous"), ((0,), torch.float32, "contiguous", None),
             ((2, 3, 2, 5, 3, 7), torch.float32, "reversed", "reversed")]
    weights = [laid_out(shape, dt, "random", gen, dev, lay) for shape, dt, lay, _ in specs]
    cl = values((8, 6, 3, 3), torch.bfloat16, "random", gen, dev).contiguous(memory_format=torch.channels_last)
    weights.append(cl)
    grads = [None if g is None else laid_out(shape, dt, "random", gen, dev, g) for shape, dt, _, g in specs]
    grads.append(values(cl.shape, torch.bfloat16, "random", gen, dev))
    states = [[values(w.shape, torch.float64, "random", gen, dev),
               laid_out(w.shape, torch.float32, "random", gen, dev, "reversed")][:i % 3] for i, w in enumerate(weights)]
    masks = [(torch.rand(w.shape, generator=gen) < 0.5).to(dev) for w in weights]
    keep = [m.reshape(-1) & (torch.rand(m.numel(), generator=gen) < 0.7).to(dev) for m in masks]
    grow = [~k & (torch.rand(k.numel(), generator=gen) < 0.3).to(dev) for k in keep]

    def run(ops):
        c = dict(w=[w.clone() for w in weights], m=[m.clone() for m in masks],
                 st=[[t.clone() for t in st] for st in states], g=[None if g is None else g.clone() for g in grads])
        ops.commit(c["w"], c["m"], keep, grow, c["st"], c["g"])
        return c

    got, want = run(SMALL), run(REF)
    for i in range(len(weights)):
        assert torch.equal(got["m"][i], want["m"][i]), i
        assert_same(got["w"][i], want["w"][i], f"weight {i}")
        for a, b in zip(got["st"][i], want["st"][i]):
            assert_same(a, b, f"state of {i}")
        if grads[i] is not None:
            assert_same(got["g"][i], want["g"][i], f"grad {i}")
    assert not torch.equal(want["m"][0], masks[0]) and not torch.equal(want["w"][4], weights[4])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "reversed", "mixed", "6d"])
def test_split_and_fold_grad_match_reference(dev, dtype, layout):
    """Two backward passes split into (masked grad, off) and folded into the accumulator with n = 3 and 1, bit
    for bit, with NaN, inf and -0.0 in the gradient and -0.0 in `off` on the mask (which `off += 0` turns
    into +0.0). "mixed": a transposed gradient with a contiguous `off` and a strided accumulator. Elementwise
    ops: WIDE's 1024-element programs (the last one holding a single element) cost less to interpret."""
    gen = torch.Generator().manual_seed(92 + DTYPES.index(dtype))
    shape = (2, 3, 2, 5, 3, 7) if layout == "6d" else (17, 241)
    lay = {"contiguous": ("contiguous",) * 3, "reversed": ("reversed",) * 3,
           "mixed": ("reversed", "contiguous", "strided"), "6d": ("reversed",) * 3}[layout]
    mask = (torch.rand(shape, generator=gen) < 0.4).to(dev)
    g1, g2 = (laid_out(shape, dtype, "random", gen, dev, lay[0]) for _ in range(2))
    d = len(shape)
    for idx, val in (((0,) * d, float("nan")), ((1,) * d, float("inf")), ((0, 1) + (0,) * (d - 2), -0.0)):
        g1[idx] = val
    off = laid_out(shape, dtype, "zeros", gen, dev, lay[1])
    off[mask] = -0.0
    acc = laid_out(shape, dtype, "random", gen, dev, lay[2])
    assert layout == "contiguous" or not g1.is_contiguous()
    got, want = [g1.clone(), off.clone(), acc.clone()], [g1.clone(), off.clone(), acc.clone()]
    for ops, (g, o, a) in ((WIDE, got), (REF, want)):
        ops.split_grad(g, mask, o)
        g += g2
        ops.split_grad(g, mask, o)
        ops.fold_grad(a, g, o, 3)
        ops.fold_grad(a, g, o, 1)
    for what, x, y in zip(("grad", "off", "acc"), got, want):
        assert_same(x, y, what)
    assert bits(want[1])[mask].eq(0).all() and not torch.isfinite(want[2]).all()


def test_sharded_ops_never_read_back_to_the_host(dev):
    vals, flags = shard_inputs("levels", 93, dev)
    hist_want = REF.key_histograms(vals, flags, True, [0] * len(vals), 20, 11)
    take_want = REF.take_top(vals, flags, True, [0x3F800000] * len(vals), [40] * len(vals))
    w, m = vals[4].float(), flags[4].view(vals[4].shape).clone()
    with no_host_reads(dev):
        with pytest.raises(AssertionError, match="back to the host"):
            torch.ones(1, device=dev).item()
        hist = SMALL.key_histograms(vals, flags, True, [0] * len(vals), 20, 11)
        take = SMALL.take_top(vals, flags, True, [0x3F800000] * len(vals), [40] * len(vals))
        SMALL.commit([w], [m], [take[4]], [~take[4]], [[]], [None])
    assert torch.equal(hist, hist_want)
    for a, b in zip(take, take_want):
        assert torch.equal(a, b)
    assert m.all()


def test_sharded_ops_hand_other_cases_to_the_reference(dev):
    """fp64 values and digits wider than MAX_BITS go to the reference: same results, no kernel needed."""
    gen = torch.Generator().manual_seed(94)
    vals = [values((300,), torch.float64, "levels", gen, dev), values((301,), torch.float32, "random", gen, dev)]
    flags = [(torch.rand(v.numel(), generator=gen) < 0.5).to(dev) for v in vals]
    assert torch.equal(SMALL.key_histograms(vals, flags, False, [0, 0], 20, 11),
                       REF.key_histograms(vals, flags, False, [0, 0], 20, 11))
    assert torch.equal(SMALL.key_histograms(vals[1:], flags[1:], False, [0], 19, 12),
                       REF.key_histograms(vals[1:], flags[1:], False, [0], 19, 12))
    for a, b in zip(SMALL.take_top(vals, flags, False, [0x3F000000] * 2, [3, 3]),
                    REF.take_top(vals, flags, False, [0x3F000000] * 2, [3, 3])):
        assert torch.equal(a, b)
    g, o, a = (values((300,), torch.float64, "random", gen, dev) for _ in range(3))
    mask = flags[0]
    got, want = [g.clone(), o.clone(), a.clone()], [g.clone(), o.clone(), a.clone()]
    for ops, (x, y, z) in ((SMALL, got), (REF, want)):
        ops.split_grad(x, mask, y)
        ops.fold_grad(z, x, y, 3)
    for x, y in zip(got, want):
        assert_same(x, y)


# ------------------------------------------------------------------------------------------------ structured layers
# structure='fan_in' and 'N:M' (Backend.structured_update and unit_grow, kernels/structured.py). With SMALL's
# 64-wide chunks a fan-in row of 130 or 300 spans several chunks of its unit's program and an N:M layer several
# programs; SMALL splits growth at groups of 32 (pairwise ranks below, one program per unit above), PER_UNIT and
# PAIRWISE send every unit down one path.
PER_UNIT = TritonBackend(block=64, iters=2, radix_bits=11, pairwise_group=0)
PAIRWISE = TritonBackend(block=64, iters=2, radix_bits=11, pairwise_group=1 << 20)
STRUCTURED = [  # rows of 300 and 27 (a 3x3x3 conv), (in, out) columns of 130, 2:4, transposed 3:8, 1:3, a 1x1
    Units(3, 300, False, 300, 40), Units(5, 130, True, 130, 13), Units(5, 27, False, 27, 5), Units(6, 24, False, 4, 2),
    Units(7, 24, True, 8, 3), Units(9, 12, False, 3, 1), Units(1, 1, False, 1, 1)]
KINDS = ("random", "levels", "zeros")


def structured_layer(u, dtype, kind, drop, gen, dev, score_dtype=None, grad="dense"):
    """A layer of `units` with a mask drawn as structure.draw does; weights and scores of `kind` (off-mask weights
    too: grown positions must be zeroed), one state, and n_keep for drop 'none', 'some' (40%) or 'all'."""
    shape = (u.fan_in, u.out) if u.transposed else (u.out, u.fan_in)
    n_active = u.n_units * u.target
    keep = {"none": n_active, "some": n_active - int(n_active * 0.4), "all": 0}[drop]
    g = values(shape, dtype, "random", gen, dev)
    if grad == "strided":
        g = values(shape[:-1] + (2 * shape[-1],), dtype, "random", gen, dev)[..., ::2]
    return dict(w=values(shape, dtype, kind, gen, dev), m=draw(u, gen).view(shape).to(dev),
                s=values(shape, score_dtype or dtype, kind, gen, dev), units=u, keep=keep, grow=n_active - keep,
                states=[values(shape, torch.float32, "random", gen, dev)], grad=None if grad is None else g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_update_matches_reference(dev, dtype):
    """Every STRUCTURED layer in one call; over the three dtypes each layer sees every value kind (tie-heavy levels
    and all zeros included) and every drop count (nothing, some, everything)."""
    d = DTYPES.index(dtype)
    gen = torch.Generator().manual_seed(120 + d)
    layers = [structured_layer(u, dtype, KINDS[(i + d) % 3], ("some", "none", "all")[(i + 2 * d) % 3], gen, dev)
              for i, u in enumerate(STRUCTURED)]
    ref = check_update(layers, backends=(SMALL,))
    assert sum(not torch.equal(r["m"], L["m"]) for r, L in zip(ref, layers)) >= 3


@pytest.mark.parametrize("backend", [PER_UNIT, PAIRWISE], ids=["per_unit", "pairwise"])
def test_structured_growth_paths_each_match_reference(dev, backend):
    """Either growth path alone on every shape up to 64 wide (pairwise work grows with the group, so the rows of
    130 and 300 stay with the split tests), tie-heavy, with some and all dropped."""
    gen = torch.Generator().manual_seed(130)
    units = [Units(4, 37, False, 37, 6), Units(3, 64, True, 64, 9)] + STRUCTURED[2:]
    layers = [structured_layer(u, torch.float32, ("levels", "random")[i % 2], ("some", "all")[i // 2 % 2], gen, dev)
              for i, u in enumerate(units)]
    check_update(layers, backends=(backend,))


def test_structured_update_layouts_and_mixed_dtypes(dev):
    """A channels_last conv weight with channels_last state and gradient, bf16 weights with fp32 scores and a
    strided gradient, an fp16 (in, out) weight whose scores are a transposed view; fp64 goes to the reference."""
    gen = torch.Generator().manual_seed(140)
    conv = structured_layer(Units(8, 54, False, 54, 11), torch.float32, "levels", "some", gen, dev)
    shape = (8, 6, 3, 3)
    for k in ("w", "grad"):
        conv[k] = conv[k].view(shape).contiguous(memory_format=torch.channels_last)
    conv["m"], conv["s"] = conv["m"].view(shape), conv["s"].view(shape)
    conv["states"] = [t.view(shape).contiguous(memory_format=torch.channels_last) for t in conv["states"]]
    mixed = structured_layer(Units(5, 24, False, 4, 2), torch.bfloat16, "random", "some", gen, dev,
                             score_dtype=torch.float32, grad="strided")
    col = structured_layer(Units(7, 24, True, 24, 6), torch.float16, "levels", "some", gen, dev, grad=None)
    col["s"] = values((7, 24), torch.float16, "levels", gen, dev).t()
    assert not (conv["w"].is_contiguous() or mixed["grad"].is_contiguous() or col["s"].is_contiguous())
    check_update([conv, mixed, col], backends=(SMALL,))
    check_update([structured_layer(Units(3, 8, True, 4, 1), torch.float64, "levels", "some", gen, dev)],
                 backends=(SMALL,))


@pytest.mark.parametrize("backend", [SMALL, PER_UNIT], ids=["split", "per_unit"])
def test_unit_grow_matches_reference(dev, backend):
    """The grow half alone, from keep flags that need not fit the units (a unit may keep more than its target:
    it grows nothing), everything kept, nothing kept, an empty shard (no rows); fp32/fp16/bf16 scores, one of
    them a transposed view."""
    gen = torch.Generator().manual_seed(150)
    units = [STRUCTURED[0], STRUCTURED[1], Units(0, 40, False, 40, 5), STRUCTURED[3], STRUCTURED[4], STRUCTURED[5]]
    scores, keep = [], []
    for i, u in enumerate(units):
        shape = (u.fan_in, u.out) if u.transposed else (u.out, u.fan_in)
        scores.append(values(shape, DTYPES[i % 3], ("levels", "random")[i % 2], gen, dev))
        keep.append((torch.rand(u.out * u.fan_in, generator=gen) < 0.3).to(dev))
    scores[3] = values((24, 6), torch.float32, "levels", gen, dev).t()
    keep[4][:] = True
    keep[5][:] = False
    got = backend.unit_grow(scores, keep, units)
    for i, (g, s, k, u) in enumerate(zip(got, scores, keep, units)):
        want = R.unit_grow(s, k, u)
        assert g.dtype == torch.bool and g.shape == want.shape and torch.equal(g, want), i
    assert not got[4].any() and bool((units_of(got[5], units[5]).sum(1) == 1).all()) and got[2].numel() == 0


def test_structured_ops_never_read_back_to_the_host(dev):
    gen = torch.Generator().manual_seed(160)
    layers = [structured_layer(u, torch.float32, "levels", "some", gen, dev) for u in (STRUCTURED[1], STRUCTURED[3])]
    expect = run_update(REF, layers)
    keep = [L["m"].reshape(-1) for L in layers]
    grow_want = [R.unit_grow(L["s"], k, L["units"]) for L, k in zip(layers, keep)]
    with no_host_reads(dev):
        got = run_update(SMALL, layers)
        grow = SMALL.unit_grow([L["s"] for L in layers], keep, [L["units"] for L in layers])
    for x, e in zip(got, expect):
        assert torch.equal(x["m"], e["m"]) and torch.equal(x["w"], e["w"])
    for a, b in zip(grow, grow_want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ backend selection
def test_supports(monkeypatch):
    b = TritonBackend()
    assert b.name == "triton"
    assert b.supports(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert b.supports(torch.device("cpu")) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    why = b.supports(torch.device("cpu"))
    assert isinstance(why, str) and "TRITON_INTERPRET" in why and "\n" not in why


def test_get_backend_gives_triton(dev):
    assert get_backend("triton", dev).name == "triton"


def test_kernels_compile_for_h100():
    """The interpreter accepts code the GPU compiler rejects; compile every kernel variant the ops launch
    (with the argument specialisations of a real launch) for sm_90, down to a cubin, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "rigl_fast.kernels.aot_check", "90"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    n = int(re.search(r"aot_check: (\d+) kernel variants compiled", r.stdout).group(1))
    assert n >= 20 and "cubin" in r.stdout


# ------------------------------------------------------------------------------------------------ end to end
def masks_every_step(model_fn, opt_fn, backend, data_kw, **kw):
    torch.manual_seed(0)
    model = model_fn()
    opt = opt_fn(model)
    pruner = RigLScheduler(model, opt, backend=backend, **kw)
    assert pruner.backend == backend
    seen = []

    def on_step(phase):
        seen.append([None if m is None else m.clone() for m in pruner.backward_masks])
        seen.append([w.detach().clone() for w in pruner.W])

    returns = train(model, opt, pruner, batches(**data_kw), on_step=on_step)
    return seen, returns, pruner


@pytest.mark.parametrize("case", ["resnet_sgd", "mlp_adam_accumulate"])
def test_end_to_end_same_masks_as_reference(case):
    if case == "resnet_sgd":
        model_fn = SmallResNet
        opt_fn = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
        kw = dict(dense_allocation=0.3, T_end=10, delta=2, grad_accumulation_n=1)
        data_kw = dict(n_steps=10, batch=8)
    else:
        model_fn = MLP
        opt_fn = lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)  # noqa: E731
        kw = dict(dense_allocation=0.2, T_end=14, delta=4, grad_accumulation_n=3, ignore_linear_layers=False,
                  sparsity_distribution="erk", after_step="always")
        data_kw = dict(n_steps=14, batch=8)
    ref, r_ret, r_pruner = masks_every_step(model_fn, opt_fn, "reference", data_kw, **kw)
    tri, t_ret, t_pruner = masks_every_step(model_fn, opt_fn, "triton", data_kw, **kw)
    assert r_ret == t_ret and r_ret.count(False) >= 3  # several topology updates happened
    assert len(ref) == len(tri)
    changed = False
    for i, (a, b) in enumerate(zip(ref, tri)):
        for x, y in zip(a, b):
            if x is None:
                assert y is None
            else:
                assert_same(x, y, f"record {i}")
    for x, y in zip(ref[0], ref[-2]):
        changed |= x is not None and not torch.equal(x, y)
    assert changed, "the masks never changed: the test would not catch a wrong update"
    assert r_pruner.skipped_updates == t_pruner.skipped_updates == 0
