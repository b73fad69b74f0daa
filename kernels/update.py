"""The topology update (SPEC section 4, `Backend.update`) by radix selection, for all layers at once.

Why it needs no sort: for finite floats, |x| upcast to fp32 orders exactly like its 31-bit pattern
`bits(x) & 0x7FFFFFFF`, so "the k largest" is decided by a threshold on integer keys. The threshold T (the
k-th largest key) is found digit by digit, most significant first, with histograms (7 + 8 + 8 + 8 bits by
default; `radix_bits` trades passes for histogram width):
after each pass a one-program-per-layer kernel picks the bin holding the k-th largest and narrows the
prefix. Everything with key > T is selected, and the first `k_rem` keys equal to T in flat-index order
(per-program tie counts, an exclusive scan over programs, then a rank inside the program).

Every launch covers every layer (a per-program layer table), so an update costs O(passes) launches and no
host synchronisation. Per-layer state (prefix, k remaining) lives on the device.

64-bit where a layer of 2**31+ elements needs it: element offsets (int64 program starts), the per-layer
histograms, k and the ties counted before a program. Per-program counts stay int32 (a program covers
BLOCK * ITERS < 2**31 elements), and so does every per-element vector.

Pass list (phase K = keep over |w| of active positions, phase G = grow over |score| of non-kept ones):
  K: hist xP (+ pick), tie count, mark   -- mark rewrites each mask byte as old | kept << 1
  G: hist xP (+ pick), tie count, final  -- final writes the 0/1 mask and zeros weights/states/grads
A layer's tie count reads nothing when all keys at its threshold are taken (the usual case).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import Contig, float_code, on_device, one_device, program_table, to_device
from .elementwise import _layout_offsets, _zero_store

KEY_BITS = 31
# "k remaining" meaning: every key equal to the threshold is selected (above any count a layer can have)
ALL_TIES = tl.constexpr(2 ** 62)


def radix_passes(radix_bits: int):
    """(shift, width) of each histogram pass over the 31-bit key, most significant digit first; every digit
    is `radix_bits` wide except the first, which takes the remainder."""
    passes, low = [], 0
    while low < KEY_BITS:
        width = min(radix_bits, KEY_BITS - low)
        passes.append((low, width))
        low += width
    return tuple(reversed(passes))


# Layer table, one int64 row of 8 per layer (kernels index it as tab + l * 8 + column):
#   0 weight address, 1 mask address, 2 score address, 3 numel, 4 weight dtype code, 5 score dtype code,
#   6..7 the layer's rows [start, end) in the tensor table (address, element size, 0 = zero where not
#   (new & old): weight and states, 1 = zero where not new: the gradient).


@triton.jit
def _keys(base, offs, valid, dt):
    """|x| of a float tensor upcast to fp32, as its (order-preserving) int32 bit pattern."""
    # names differ per branch: a name bound in both branches of a runtime `if` must have one type when compiled
    if dt == 0:
        b = tl.load(base.to(tl.pointer_type(tl.int32)) + offs, mask=valid, other=0)
    elif dt == 1:
        half = tl.load(base.to(tl.pointer_type(tl.float16)) + offs, mask=valid, other=0.0)
        b = half.to(tl.float32).to(tl.int32, bitcast=True)
    else:
        bf_bits = tl.load(base.to(tl.pointer_type(tl.int16)) + offs, mask=valid, other=0)
        b = bf_bits.to(tl.int32) << 16  # bf16 -> fp32 is exact: the bf16 bits are the fp32's top half
    return b & 0x7FFFFFFF


@triton.jit
def _candidates(tab, l, offs, inr, mb, PHASE: tl.constexpr):
    """(valid, key) of this phase: keep competes among old-active positions (mask bit 0) by |w|; grow among
    positions not kept (mask bit 1, written by the mark pass) by |score|."""
    if PHASE == 0:
        valid = inr & ((mb & 1) != 0)
        key = _keys(tl.load(tab + l * 8 + 0), offs, valid, tl.load(tab + l * 8 + 4))
    else:
        valid = inr & ((mb & 2) == 0)
        key = _keys(tl.load(tab + l * 8 + 2), offs, valid, tl.load(tab + l * 8 + 5))
    return valid, key


@triton.jit
def _digit_histogram(valid, key, prefix, SHIFT: tl.constexpr, NBITS: tl.constexpr, HSTRIDE: tl.constexpr):
    """int32 counts (HSTRIDE bins) of the digit (key >> SHIFT) & (2**NBITS - 1) of the valid keys whose higher
    bits (key >> (SHIFT + NBITS)) equal `prefix` (int32; ignored by the first digit, which has no higher bits)."""
    if SHIFT + NBITS < 31:
        valid = valid & ((key >> (SHIFT + NBITS)) == prefix)
    digit = (key >> SHIFT) & ((1 << NBITS) - 1)
    return tl.histogram(digit, HSTRIDE, mask=valid)


@triton.jit
def _add_histogram(dst, counts, HSTRIDE: tl.constexpr):
    """dst[b] += counts[b] (int64) for the non-empty bins: one atomic per bin per program, which is why
    programs cover ITERS blocks. int64: one bin of a 2**31+ element layer can hold more than int32 counts."""
    bins = tl.arange(0, HSTRIDE)
    tl.atomic_add(dst + bins, counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _hist_kernel(prog_layer, prog_start, tab, st, hist, PHASE: tl.constexpr, SHIFT: tl.constexpr,
                 NBITS: tl.constexpr, HSTRIDE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.load(prog_layer + pid)
    start = tl.load(prog_start + pid)
    numel = tl.load(tab + l * 8 + 3)
    m_ptr = tl.load(tab + l * 8 + 1).to(tl.pointer_type(tl.uint8))
    prefix = tl.load(st + l * 2 + 0).to(tl.int32)  # < 2**31: the key bits found so far
    # every pass uses HSTRIDE bins (>= 32: the GPU histogram lowering works per warp lane) even when its
    # digit is narrower; the extra bins stay empty
    counts = tl.zeros([HSTRIDE], tl.int32)
    n_it = tl.minimum(tl.cdiv(numel - start, BLOCK), ITERS)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        mb = tl.load(m_ptr + offs, mask=inr, other=0)
        valid, key = _candidates(tab, l, offs, inr, mb, PHASE)
        counts += _digit_histogram(valid, key, prefix, SHIFT, NBITS, HSTRIDE)
    _add_histogram(hist + l * HSTRIDE, counts, HSTRIDE)


@triton.jit
def _pick_bin(h, k, NBITS: tl.constexpr, HSTRIDE: tl.constexpr, LAST: tl.constexpr):
    """(b, k remaining) for histogram h (HSTRIDE bins of one digit) and k: the bin b holding the k-th largest
    key, i.e. the largest b whose suffix count (keys in bins >= b) reaches k, and k minus the keys above it.
    k <= 0 picks the top bin, so a threshold built from such picks ends above every key and takes nothing.

    After the last digit (LAST), bin b holds exactly the keys equal to the threshold. If all of them are taken
    (the usual case for real-valued data: one key at the threshold), k remaining becomes ALL_TIES, which
    makes the tie-count pass skip its reads and every tie count as selected."""
    bins = tl.arange(0, HSTRIDE)
    suffix = tl.cumsum(h, 0, reverse=True)
    # k = 0 would pick the last (possibly unused) bin: clamp to the digit's own top bin
    b = tl.minimum(tl.maximum(tl.sum((suffix >= k).to(tl.int32), axis=0) - 1, 0), (1 << NBITS) - 1)
    above = tl.sum(tl.where(bins > b, h, 0), axis=0)
    k_rem = k - above
    if LAST:
        at_thr = tl.sum(tl.where(bins == b, h, 0), axis=0)
        k_rem = tl.where((k_rem > 0) & (k_rem == at_thr), ALL_TIES, k_rem)
    return b, k_rem


@triton.jit
def _pick_kernel(st, hist, NBITS: tl.constexpr, HSTRIDE: tl.constexpr, LAST: tl.constexpr):
    """Per layer (one program each): `_pick_bin` on the layer's histogram, its prefix extended by the bin."""
    l = tl.program_id(0)
    bins = tl.arange(0, HSTRIDE)
    h = tl.load(hist + l * HSTRIDE + bins)
    b, k_rem = _pick_bin(h, tl.load(st + l * 2 + 1), NBITS, HSTRIDE, LAST)
    tl.store(st + l * 2 + 1, k_rem)
    prefix = tl.load(st + l * 2 + 0)
    tl.store(st + l * 2 + 0, (prefix << NBITS) | b)
    tl.store(hist + l * HSTRIDE + bins, tl.zeros_like(h))  # ready for the next pass, without a memset launch


@triton.jit
def _tie_count_kernel(prog_layer, prog_start, tab, st, cnt, PHASE: tl.constexpr, BLOCK: tl.constexpr,
                      ITERS: tl.constexpr):
    pid = tl.program_id(0)
    l = tl.load(prog_layer + pid)
    start = tl.load(prog_start + pid)
    numel = tl.load(tab + l * 8 + 3)
    m_ptr = tl.load(tab + l * 8 + 1).to(tl.pointer_type(tl.uint8))
    thr = tl.load(st + l * 2 + 0).to(tl.int32)
    total = tl.zeros([BLOCK], tl.int32)
    n_it = tl.minimum(tl.cdiv(numel - start, BLOCK), ITERS)
    n_it = tl.where(tl.load(st + l * 2 + 1) == ALL_TIES, 0, n_it)  # ranks not needed: read nothing
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        mb = tl.load(m_ptr + offs, mask=inr, other=0)
        valid, key = _candidates(tab, l, offs, inr, mb, PHASE)
        total += (valid & (key == thr)).to(tl.int32)
    tl.store(cnt + pid, tl.sum(total, axis=0))


@triton.jit
def _selected(valid, key, thr, k_rem, run, BLOCK: tl.constexpr):
    """Selected = key above the threshold, or equal to it and among the first k_rem such in index order
    (`run` = ties in earlier blocks of this layer). Returns (selected, updated run).

    k_rem and run are int64 scalars (a layer may hold 2**31+ ties); the ties this block may still take,
    clamped to [0, BLOCK], keep the per-element rank compare in int32."""
    eq = (valid & (key == thr)).to(tl.int32)
    lim = tl.minimum(tl.maximum(k_rem - run, 0), BLOCK).to(tl.int32)
    sel = (valid & (key > thr)) | ((eq != 0) & (tl.cumsum(eq, 0) - eq < lim))
    return sel, run + tl.sum(eq, axis=0)


@triton.jit
def _program(prog_layer, prog_start, tab, st, tie_off, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """What a program of the mark and final passes works on: its layer, first position, the layer's size and
    mask, the selection's threshold and ties still to take, the ties in earlier programs, and its iterations."""
    pid = tl.program_id(0)
    l = tl.load(prog_layer + pid)
    start = tl.load(prog_start + pid)
    numel = tl.load(tab + l * 8 + 3)
    m_ptr = tl.load(tab + l * 8 + 1).to(tl.pointer_type(tl.uint8))
    thr = tl.load(st + l * 2 + 0).to(tl.int32)
    k_rem = tl.load(st + l * 2 + 1)
    run = tl.load(tie_off + pid)  # int64
    n_it = tl.minimum(tl.cdiv(numel - start, BLOCK), ITERS)
    return l, start, numel, m_ptr, thr, k_rem, run, n_it


@triton.jit
def _mark_kernel(prog_layer, prog_start, tab, st, tie_off, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    l, start, numel, m_ptr, thr, k_rem, run, n_it = _program(prog_layer, prog_start, tab, st, tie_off, BLOCK, ITERS)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        mb = tl.load(m_ptr + offs, mask=inr, other=0)
        valid, key = _candidates(tab, l, offs, inr, mb, 0)
        kept, run = _selected(valid, key, thr, k_rem, run, BLOCK)
        tl.store(m_ptr + offs, (mb & 1) | (kept.to(tl.uint8) << 1), mask=inr)


@triton.jit
def _final_kernel(prog_layer, prog_start, tab, rows, st, tie_off, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Grow decision, the 0/1 mask, and zeros written (never read) into every tensor of the layer: weight and
    optimizer states where not (new and old), the gradient where not new."""
    l, start, numel, m_ptr, thr, k_rem, run, n_it = _program(prog_layer, prog_start, tab, st, tie_off, BLOCK, ITERS)
    r0 = tl.load(tab + l * 8 + 6)
    r1 = tl.load(tab + l * 8 + 7)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        mb = tl.load(m_ptr + offs, mask=inr, other=0)
        valid, key = _candidates(tab, l, offs, inr, mb, 1)
        grow, run = _selected(valid, key, thr, k_rem, run, BLOCK)
        new = grow | ((mb & 2) != 0)
        both = new & ((mb & 1) != 0)
        tl.store(m_ptr + offs, new.to(tl.uint8), mask=inr)
        _zero_rows(rows, r0, r1, offs, inr, new, both, 3, False)


@triton.jit
def _zero_rows(rows, r0, r1, offs, inr, new, both, ROW: tl.constexpr, STRIDED: tl.constexpr):
    """Zeros written (never read) into the tensors of rows [r0, r1) of a `zeroing_rows` table of ROW columns
    at flat indices `offs`: kind 0 (weight, states) where not `both` (new & old), kind 1 (gradient) where
    not `new`. With STRIDED, each row's layout follows in columns 3..11."""
    for r in range(r0, r1):
        row = rows + r * ROW
        cond = tl.where(tl.load(row + 2) == 0, both, new)
        _zero_store(tl.load(row + 0), _layout_offsets(row + 3, offs, STRIDED), inr & (cond == 0), tl.load(row + 1))


def zeroing_rows(weight, states, grad, place):
    """Rows [address, element size, kind, *extra] of the tensors the end of an update zeroes in one layer (see
    `_zero_rows`): the weight and its states (kind 0), then the gradient if any (kind 1). `place(t)` gives
    the tensor the kernel addresses (t or a stand-in) and the row's extra columns."""
    rows = []
    for t, kind in [(weight, 0)] + [(x, 0) for x in states] + ([] if grad is None else [(grad, 1)]):
        t, extra = place(t)
        rows.append([t.data_ptr(), t.element_size(), kind] + extra)
    return rows


def _scan_offsets(cnt: torch.Tensor, prog_layer_long: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix of per-program tie counts (int32), restarted at each layer's first program (on device).
    int64: the ties before a program can number 2**31 or more."""
    excl = torch.cumsum(cnt, 0, dtype=torch.int64) - cnt
    return excl - excl[first][prog_layer_long]


def _select(phase, grid, launch, st, hist, cnt, prog_layer_long, first, block, iters, passes):
    p_layer, p_start, tab = launch
    hstride = hist.shape[1]
    for shift, bits in passes:
        _hist_kernel[grid](p_layer, p_start, tab, st, hist, PHASE=phase, SHIFT=shift, NBITS=bits,
                           HSTRIDE=hstride, BLOCK=block, ITERS=iters)
        _pick_kernel[(st.shape[0],)](st, hist, NBITS=bits, HSTRIDE=hstride, LAST=shift == 0)
    _tie_count_kernel[grid](p_layer, p_start, tab, st, cnt, PHASE=phase, BLOCK=block, ITERS=iters)
    return _scan_offsets(cnt, prog_layer_long, first)


class Plan(NamedTuple):
    """The device tables and scratch of one update's passes over its layers (see `plan_layers`)."""
    grid: tuple
    launch: tuple  # (per-program layer, per-program start, layer table)
    p_layer_long: torch.Tensor
    first: torch.Tensor
    hist: torch.Tensor
    cnt: torch.Tensor
    passes: tuple
    block: int
    iters: int


def plan_layers(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
                rows: Sequence[Sequence[int]], block: int, iters: int, radix_bits: int, device: torch.device) -> Plan:
    """The layer table (weights and scores contiguous: the kernels address them by flat index; rows[i] = layer
    i's rows [r0, r1) in its zeroing table), the program tables and the selection's scratch."""
    tab_rows = []
    for w, m, s, (r0, r1) in zip(weights, masks, scores, rows):
        assert m.dtype == torch.bool and m.is_contiguous() and m.shape == w.shape, "masks: contiguous bool"
        tab_rows.append([w.data_ptr(), m.data_ptr(), s.data_ptr(), w.numel(), float_code(w), float_code(s), r0, r1])
    owner, start, first = program_table([w.numel() for w in weights], block * iters)
    p_layer = to_device(owner, torch.int32, device)
    launch = (p_layer, to_device(start, torch.int64, device), to_device(tab_rows, torch.int64, device))
    hist = torch.zeros(len(weights), 1 << radix_bits, dtype=torch.int64, device=device)
    cnt = torch.empty(len(owner), dtype=torch.int32, device=device)
    return Plan((len(owner),), launch, p_layer.long(), to_device(first, torch.int64, device), hist, cnt,
                radix_passes(radix_bits), block, iters)


def mark_kept(p: Plan, st_keep: torch.Tensor) -> None:
    """The keep half (phase K): selection, then the mark pass (mask bytes become old | kept << 1). `st_keep`
    holds each layer's (0, n_keep), int64."""
    off = _select(0, p.grid, p.launch, st_keep, p.hist, p.cnt, p.p_layer_long, p.first, p.block, p.iters, p.passes)
    _mark_kernel[p.grid](*p.launch, st_keep, off, BLOCK=p.block, ITERS=p.iters)


def update(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
           n_keep: Sequence[int], n_grow: Sequence[int], states: Sequence[Sequence[torch.Tensor]],
           grads: Sequence[Optional[torch.Tensor]], block: int, iters: int, radix_bits: int) -> None:
    L = len(weights)
    if L == 0:
        return
    device = one_device([t for group in (weights, masks, scores, grads) for t in group] +
                        [t for st_list in states for t in st_list], "the update's tensors")
    contig = Contig()  # also keeps the contiguous stand-ins alive until the kernels have run
    wc, sc = [contig.get(w) for w in weights], [contig.get(s) for s in scores]
    t_rows, spans = [], []
    for w, st_list, g in zip(wc, states, grads):
        r0 = len(t_rows)
        t_rows += zeroing_rows(w, st_list, g, lambda t: (contig.get(t), []))
        spans.append((r0, len(t_rows)))
    p = plan_layers(wc, masks, sc, spans, block, iters, radix_bits, device)
    rows = to_device(t_rows, torch.int64, device)
    # per layer (prefix, k remaining), int64: k and n_keep of a 2**31+ element layer pass int32
    ks = to_device([[0, int(k)] for k in n_keep] + [[0, int(k)] for k in n_grow], torch.int64, device)
    st_keep, st_grow = ks[:L], ks[L:]

    with on_device(device):
        mark_kept(p, st_keep)
        grow_off = _select(1, p.grid, p.launch, st_grow, p.hist, p.cnt, p.p_layer_long, p.first, block, iters,
                           p.passes)
        _final_kernel[p.grid](*p.launch, rows, st_grow, grow_off, BLOCK=block, ITERS=iters)
    contig.write_back()
