"""The per-shard ops of the sharded (FSDP2) update: `Backend.key_histograms`, `take_top`, `commit`,
`split_grad` and `fold_grad` (rigl_fast/ops.py; `distributed.radix_top_k` runs the collectives between them).

The selection ops are the whole-layer update's passes (update.py) with the decisions taken out: the caller
sums the histograms over ranks and picks the bins, so `key_histograms` is one histogram pass that leaves its
counts in an int64 output, and `take_top` is the tie-count pass, the exclusive scan over programs and the
marking pass, given the threshold and the number of ties. Eligibility comes from a flag tensor compared
with a constant (masks for keep, the keep flags for grow) instead of the update's mask bits.

Every launch covers every layer (per-program layer tables) and nothing is read back to the host. Values are
read where they lie: a non-contiguous layout travels in the layer table (`strided_layout`), and the kernels
compute storage offsets when any tensor of the launch needs them (STRIDED).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import Contig, addressable, float_code, on_device, one_device, program_table, to_device
from .elementwise import (_accumulated, _as_kernel_view, _from_f32, _layout_offsets, _rounded, _storage_offsets,
                          _to_f32, division)
from .update import _add_histogram, _digit_histogram, _keys, _scan_offsets, _selected, _zero_rows, zeroing_rows

MAX_BITS = 11  # widest histogram digit the kernels take (2048 bins, as radix_bits); wider ones go to torch
NO_KEY = tl.constexpr(1 << 31)  # a threshold above every key: take_top selects nothing

# Layer table of the selection ops, one int64 row of SEL_ROW per layer:
#   0 values address, 1 values dtype code, 2 numel, 3 flags address, 4 prefix (key_histograms) or threshold
#   (take_top), 5 ties to take, 6 output address, 7..15 the values' strided_layout.
SEL_ROW = tl.constexpr(16)
# Layer table of commit: 0 mask address, 1 keep address, 2 numel, 3 grow address, 4..5 the layer's rows
# [r0, r1) in its zeroing_rows table, whose rows carry the tensor's strided_layout in columns 3..11.
COMMIT_ROW = tl.constexpr(6)
ZERO_ROW = tl.constexpr(12)


def kernel_digit(shift: int, bits: int) -> bool:
    """Whether `key_histograms` runs the kernel for this digit: inside the 31-bit key, at most MAX_BITS wide."""
    return 1 <= bits <= MAX_BITS and 0 <= shift and shift + bits <= 31


@triton.jit
def _program(prog_layer, prog_start, tab, ROW: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Program p's layer row, first position, the layer's size (column 2 of every layer table here) and its
    number of blocks."""
    pid = tl.program_id(0)
    row = tab + tl.load(prog_layer + pid) * ROW
    start = tl.load(prog_start + pid)
    numel = tl.load(row + 2)
    return pid, row, start, numel, tl.minimum(tl.cdiv(numel - start, BLOCK), ITERS)


@triton.jit
def _eligible_keys(row, offs, inr, FLAG: tl.constexpr, STRIDED: tl.constexpr):
    """(eligible, key) at flat indices `offs` of the layer of selection-table row `row`: eligible where the
    flag byte is FLAG. Flags are contiguous; the values may be strided."""
    f = tl.load(tl.load(row + 3).to(tl.pointer_type(tl.uint8)) + offs, mask=inr, other=0)
    if FLAG:
        valid = inr & (f != 0)
    else:
        valid = inr & (f == 0)
    return valid, _keys(tl.load(row + 0), _layout_offsets(row + 7, offs, STRIDED), valid, tl.load(row + 1))


@triton.jit
def _key_hist_kernel(prog_layer, prog_start, tab, hist, FLAG: tl.constexpr, SHIFT: tl.constexpr,
                     NBITS: tl.constexpr, HSTRIDE: tl.constexpr, STRIDED: tl.constexpr, BLOCK: tl.constexpr,
                     ITERS: tl.constexpr):
    pid, row, start, numel, n_it = _program(prog_layer, prog_start, tab, SEL_ROW, BLOCK, ITERS)
    prefix = tl.load(row + 4)  # the host sent -1 for every prefix no key can have
    n_it = tl.where(prefix < 0, 0, n_it)
    # HSTRIDE >= 32 bins (the GPU histogram works per warp lane) even for narrower digits: the bins past the
    # digit stay empty, so the masked atomics never touch the next layer's row of 2**NBITS
    counts = tl.zeros([HSTRIDE], tl.int32)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        valid, key = _eligible_keys(row, offs, offs < numel, FLAG, STRIDED)
        counts += _digit_histogram(valid, key, prefix.to(tl.int32), SHIFT, NBITS, HSTRIDE)
    _add_histogram(hist + tl.load(prog_layer + pid).to(tl.int64) * (1 << NBITS), counts, HSTRIDE)


@triton.jit
def _take_threshold(row):
    """(whether the layer takes anything, its int32 threshold) from a selection-table row: a threshold of
    NO_KEY (the host clamps larger ones to it) takes nothing."""
    thr = tl.load(row + 4)
    live = thr < NO_KEY
    return live, tl.where(live, thr, 0).to(tl.int32)


@triton.jit
def _take_count_kernel(prog_layer, prog_start, tab, cnt, FLAG: tl.constexpr, STRIDED: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Per program, its eligible keys equal to the threshold, for the scan that tells each program how many
    ties lie before it. Reads nothing where that count is never used: a layer with no ties to take, and the
    last program of each layer (an exclusive scan does not add it to anything)."""
    pid, row, start, numel, n_it = _program(prog_layer, prog_start, tab, SEL_ROW, BLOCK, ITERS)
    live, thr = _take_threshold(row)
    n_it = tl.where(live & (tl.load(row + 5) > 0) & (start + BLOCK * ITERS < numel), n_it, 0)
    total = tl.zeros([BLOCK], tl.int32)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        valid, key = _eligible_keys(row, offs, offs < numel, FLAG, STRIDED)
        total += (valid & (key == thr)).to(tl.int32)
    tl.store(cnt + pid, tl.sum(total, axis=0))


@triton.jit
def _take_kernel(prog_layer, prog_start, tab, tie_off, FLAG: tl.constexpr, STRIDED: tl.constexpr,
                 BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Writes every flag of the program's range: eligible and key > threshold, or key == threshold among the
    first n_ties of the layer in index order (`tie_off` = ties in the layer's earlier programs)."""
    pid, row, start, numel, n_it = _program(prog_layer, prog_start, tab, SEL_ROW, BLOCK, ITERS)
    live, thr = _take_threshold(row)
    k_rem = tl.load(row + 5)
    run = tl.load(tie_off + pid)  # int64
    out = tl.load(row + 6).to(tl.pointer_type(tl.uint8))
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        valid, key = _eligible_keys(row, offs, inr, FLAG, STRIDED)
        take, run = _selected(valid & live, key, thr, k_rem, run, BLOCK)
        tl.store(out + offs, take.to(tl.uint8), mask=inr)


@triton.jit
def _commit_kernel(prog_layer, prog_start, layers, rows, STRIDED: tl.constexpr, BLOCK: tl.constexpr,
                   ITERS: tl.constexpr):
    pid, lay, start, numel, n_it = _program(prog_layer, prog_start, layers, COMMIT_ROW, BLOCK, ITERS)
    m_ptr = tl.load(lay + 0).to(tl.pointer_type(tl.uint8))
    k_ptr = tl.load(lay + 1).to(tl.pointer_type(tl.uint8))
    g_ptr = tl.load(lay + 3).to(tl.pointer_type(tl.uint8))
    r0 = tl.load(lay + 4)
    r1 = tl.load(lay + 5)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        old = tl.load(m_ptr + offs, mask=inr, other=0) != 0
        new = (tl.load(k_ptr + offs, mask=inr, other=0) != 0) | (tl.load(g_ptr + offs, mask=inr, other=0) != 0)
        tl.store(m_ptr + offs, new.to(tl.uint8), mask=inr)
        _zero_rows(rows, r0, r1, offs, inr, new, new & old, ZERO_ROW, STRIDED)


@triton.jit
def _split_grad_kernel(g_ptr, m_ptr, o_ptr, numel, gd1, gd2, gd3, gd4, gs0, gs1, gs2, gs3, gs4,
                       od1, od2, od3, od4, os0, os1, os2, os3, os4, STRIDED: tl.constexpr, DT: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inr = offs < numel
    g_offs = _storage_offsets(offs, gd1, gd2, gd3, gd4, gs0, gs1, gs2, gs3, gs4, STRIDED)
    o_offs = _storage_offsets(offs, od1, od2, od3, od4, os0, os1, os2, os3, os4, STRIDED)
    off_mask = inr & (tl.load(m_ptr + offs, mask=inr, other=1) == 0)
    g = tl.load(g_ptr + g_offs, mask=off_mask, other=0)  # on the mask only +0.0 is added: g is not needed
    o = tl.load(o_ptr + o_offs, mask=inr, other=0)
    # written everywhere, as torch's `off += where(mask, 0, grad)` does: -0.0 + 0.0 is +0.0
    tl.store(o_ptr + o_offs, _from_f32(_to_f32(o, DT) + _to_f32(g, DT), DT), mask=inr)
    tl.store(g_ptr + g_offs, tl.zeros_like(g), mask=off_mask)


@triton.jit
def _fold_grad_kernel(a_ptr, g_ptr, o_ptr, numel, n_div, ad1, ad2, ad3, ad4, as0, as1, as2, as3, as4,
                      gd1, gd2, gd3, gd4, gs0, gs1, gs2, gs3, gs4, od1, od2, od3, od4, os0, os1, os2, os3, os4,
                      STRIDED: tl.constexpr, DT: tl.constexpr, RECIP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inr = offs < numel
    a_offs = _storage_offsets(offs, ad1, ad2, ad3, ad4, as0, as1, as2, as3, as4, STRIDED)
    g_offs = _storage_offsets(offs, gd1, gd2, gd3, gd4, gs0, gs1, gs2, gs3, gs4, STRIDED)
    o_offs = _storage_offsets(offs, od1, od2, od3, od4, os0, os1, os2, os3, os4, STRIDED)
    g = _to_f32(tl.load(g_ptr + g_offs, mask=inr, other=0), DT)
    o = _to_f32(tl.load(o_ptr + o_offs, mask=inr, other=0), DT)
    a = tl.load(a_ptr + a_offs, mask=inr, other=0)
    # (grad + off) is a tensor of torch's before it is divided: rounded to DT (exact: disjoint supports)
    tl.store(a_ptr + a_offs, _accumulated(a, _rounded(g + o, DT), n_div, DT, RECIP), mask=inr)


# ---------------------------------------------------------------------------------------------- host side
def _flags(f: torch.Tensor, n: int) -> torch.Tensor:
    assert f.dtype == torch.bool and f.numel() == n, "flags: bool, one per value"
    return f if f.is_contiguous() else f.contiguous()


def _selection(values, flags, params, outs, block, iters, device):
    """Program tables, the layer table (see SEL_ROW) and STRIDED of a selection op. params[i] = (column 4,
    column 5) of layer i; outs[i] its output address (0: none). Returns the launch arguments and the
    tensors the table points to (kept alive until the launch)."""
    rows, alive, strided = [], [], False
    for v, f, (a, b), out in zip(values, flags, params, outs):
        v, layout = addressable(v)  # read only: a copy only past MAX_DIMS dims
        f = _flags(f, v.numel())
        alive += [v, f]
        strided |= not v.is_contiguous()
        rows.append([v.data_ptr(), float_code(v), v.numel(), f.data_ptr(), a, b, out] + layout)
    owner, start, first = program_table([v.numel() for v in values], block * iters)
    p_layer = to_device(owner, torch.int32, device)
    launch = (p_layer, to_device(start, torch.int64, device), to_device(rows, torch.int64, device))
    return launch, strided, first, alive


def key_histograms(values: Sequence[torch.Tensor], flags: Sequence[torch.Tensor], flag_value: bool,
                   prefixes: Sequence[int], shift: int, bits: int, block: int, iters: int) -> torch.Tensor:
    device = one_device(list(values) + list(flags), "the values and flags of key_histograms")
    top = 1 << (31 - shift - bits)  # prefixes a 31-bit key can have; others count nothing, like negative ones
    params = [(int(p) if 0 <= p < top else -1, 0) for p in prefixes]
    launch, strided, _, alive = _selection(values, flags, params, [0] * len(values), block, iters, device)
    hist = torch.zeros(len(values), 1 << bits, dtype=torch.int64, device=device)
    with on_device(device):
        _key_hist_kernel[(launch[0].numel(),)](*launch, hist, FLAG=bool(flag_value), SHIFT=shift, NBITS=bits,
                                               HSTRIDE=max(32, 1 << bits), STRIDED=strided, BLOCK=block,
                                               ITERS=iters)
    return hist


def take_top(values: Sequence[torch.Tensor], flags: Sequence[torch.Tensor], flag_value: bool,
             thresholds: Sequence[int], n_ties: Sequence[int], block: int, iters: int) -> List[torch.Tensor]:
    device = one_device(list(values) + list(flags), "the values and flags of take_top")
    numels = [v.numel() for v in values]
    # one tensor per layer, not views of one buffer: nothing an op allocates outgrows a layer's shard
    outs = [torch.empty(n, dtype=torch.bool, device=device) for n in numels]
    params = []
    for t, k, n in zip(thresholds, n_ties, numels):
        # keys are >= 0: a negative threshold takes every eligible key and has no ties; clamping the rest
        # keeps both in int64
        t = min(max(int(t), -1), NO_KEY.value)
        params.append((t, 0 if t < 0 or t == NO_KEY.value else min(max(int(k), 0), n)))
    launch, strided, first, alive = _selection(values, flags, params, [o.data_ptr() for o in outs], block, iters,
                                               device)
    p_layer = launch[0]
    grid = (p_layer.numel(),)
    with on_device(device):
        if any(k for _, k in params):
            cnt = torch.empty(p_layer.numel(), dtype=torch.int32, device=device)
            _take_count_kernel[grid](*launch, cnt, FLAG=bool(flag_value), STRIDED=strided, BLOCK=block, ITERS=iters)
            tie_off = _scan_offsets(cnt, p_layer.long(), to_device(first, torch.int64, device))
        else:  # no layer ranks its ties: skip the count pass
            tie_off = torch.zeros(p_layer.numel(), dtype=torch.int64, device=device)
        _take_kernel[grid](*launch, tie_off, FLAG=bool(flag_value), STRIDED=strided, BLOCK=block, ITERS=iters)
    return outs


def commit(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keep: Sequence[torch.Tensor],
           grow: Sequence[torch.Tensor], states: Sequence[Sequence[torch.Tensor]],
           grads: Sequence[Optional[torch.Tensor]], block: int, iters: int) -> None:
    device = one_device(list(weights) + list(masks) + list(keep) + list(grow) + list(grads) +
                        [t for st in states for t in st], "the tensors of commit")
    contig = Contig()  # stand-ins for layouts past MAX_DIMS dims, written back after the launch
    layers, rows, alive, placed = [], [], [], []

    def place(t):
        t, layout = addressable(t, contig)
        placed.append(t)
        return t, layout

    for w, m, k, g, st, gr in zip(weights, masks, keep, grow, states, grads):
        assert m.dtype == torch.bool and m.is_contiguous() and m.shape == w.shape, "masks: contiguous bool"
        k, g = _flags(k, m.numel()), _flags(g, m.numel())
        alive += [k, g]
        r0 = len(rows)
        rows += zeroing_rows(w, st, gr, place)
        layers.append([m.data_ptr(), k.data_ptr(), m.numel(), g.data_ptr(), r0, len(rows)])
    if not layers:
        return
    owner, start, _ = program_table([m.numel() for m in masks], block * iters)
    strided = any(not t.is_contiguous() for t in placed)
    with on_device(device):
        _commit_kernel[(len(owner),)](to_device(owner, torch.int32, device), to_device(start, torch.int64, device),
                                      to_device(layers, torch.int64, device), to_device(rows, torch.int64, device),
                                      STRIDED=strided, BLOCK=block, ITERS=iters)
    contig.write_back()


def split_grad(grad: torch.Tensor, mask: torch.Tensor, off: torch.Tensor, block: int) -> None:
    device = one_device((grad, mask, off), "the gradient, its mask and the off-mask part")
    numel = grad.numel()
    if numel == 0:
        return
    assert mask.dtype == torch.bool and mask.is_contiguous() and mask.numel() == numel, "mask: contiguous bool"
    contig = Contig()
    g, g_layout = addressable(grad, contig)
    o, o_layout = addressable(off, contig)
    with on_device(device):
        _split_grad_kernel[(triton.cdiv(numel, block),)](
            _as_kernel_view(g), mask.view(torch.uint8), _as_kernel_view(o), numel, *g_layout, *o_layout,
            STRIDED=not (g.is_contiguous() and o.is_contiguous()), DT=float_code(g), BLOCK=block)
    contig.write_back()


def fold_grad(acc: torch.Tensor, grad: torch.Tensor, off: torch.Tensor, n: int, block: int) -> None:
    device = one_device((acc, grad, off), "the accumulator, the gradient and the off-mask part")
    numel = acc.numel()
    if numel == 0:
        return
    contig = Contig()
    a, a_layout = addressable(acc, contig)
    g, g_layout = addressable(grad)
    o, o_layout = addressable(off)
    n_div, recip, extra = division(n, device)
    with on_device(device):
        _fold_grad_kernel[(triton.cdiv(numel, block),)](
            _as_kernel_view(a), _as_kernel_view(g), _as_kernel_view(o), numel, n_div, *a_layout, *g_layout,
            *o_layout, STRIDED=not (a.is_contiguous() and g.is_contiguous() and o.is_contiguous()),
            DT=float_code(a), RECIP=recip, BLOCK=block, **extra)
    contig.write_back()
