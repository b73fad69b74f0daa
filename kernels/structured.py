"""Structured growth: `Backend.structured_update` and `Backend.unit_grow` (rigl_fast/ops.py, structure.py).

keep is the unstructured update's keep half, unchanged (update.py: radix select over the whole layer, then the
mark pass that leaves old | kept << 1 in each mask byte). Growth is a segmented selection: every unit (a row's
`group` consecutive fan-in positions, strided by `out` in flat order when the layer is transposed) grows
need = target - kept of its not-kept positions, the largest |score| first, ties to the lower index within the
unit. Units come in two sizes, and each gets the selection that suits it, without a sort:

- small units (group <= `pairwise_group`, 32 by default: N:M's M = 2..32, tiny fan-ins): pairwise ranks. A
  position's rank is the number of not-kept positions of its unit that beat it (larger key, or equal key and
  lower index); it grows iff rank < need. Programs cover flat ranges of the layer like every other pass, and
  each position reads its unit's `group` keys and kept bits, which the program's other positions read too
  (cache hits; in flat order they are neighbours, or for a transposed layer the same offsets of the
  neighbouring columns), so memory traffic stays one pass while the work is group compares per position.
- large units (fan_in's rows of hundreds to thousands): one program per unit, a radix select over the unit's
  keys with the update's own pieces (`_digit_histogram`, `_pick_bin`, `_selected`). The histograms live in the
  program's registers (the program owns the whole unit: no atomics, no per-unit histogram in memory, no
  cross-program tie scan), each pass reads the unit in chunks, and the last pass takes ties in unit order.
  Pairwise ranks would cost group compares per position here; a per-unit histogram in memory would cost
  2**radix_bits counters per unit, more than N:M's units hold.
Both are exact; the split is only about cost (tests force each path alone as well).

Every launch covers every layer of its kind (the large-unit program finds its layer from a table of unit
offsets), tables are built from Units and sizes only, and nothing is read back to the host. Growth writes
one flag byte per position: unit_grow's output, or for structured_update new = kept | grown, which the
sharded update's commit (shard.py) then applies (handed as both its keep and grow flags: it takes their union).
Its old mask is the marked byte != 0 (kept positions are old), and it writes 0/1 masks and the zeros.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from rigl_fast.ops import Units

from . import shard as _sh
from ._common import float_code, on_device, one_device, program_table, to_device
from .update import _digit_histogram, _keys, _pick_bin, _selected, mark_kept, plan_layers, radix_passes

PAIRWISE_GROUP = 32  # units of up to this many positions are ranked pairwise (module doc)

# Grow table, one int64 row of GROW_ROW per layer:
#   0 score address, 1 score dtype code, 2 address of the bytes that say kept, 3 the kept bit in them (2: a mask
#   after the mark pass, 1: bool keep flags), 4 output address (bytes), 5 1 to write kept | grown (the new mask),
#   0 to write grown alone, 6 out, 7 fan_in, 8 transposed, 9 group, 10 target, 11 numel.
GROW_ROW = tl.constexpr(12)


@triton.jit
def _unit_shape(row):
    """(stride, group, target) of a layer: stride = the flat distance between neighbours in a unit."""
    stride = tl.where(tl.load(row + 8) != 0, tl.load(row + 6), 1)
    return stride, tl.load(row + 9), tl.load(row + 10)


@triton.jit
def _sources(row):
    """Where a layer's kept bits and scores are read from: (kept bytes, kept bit, scores, score dtype code),
    loaded once per program rather than once per unit neighbour."""
    return (tl.load(row + 2).to(tl.pointer_type(tl.uint8)), tl.load(row + 3).to(tl.int32), tl.load(row + 0),
            tl.load(row + 1))


@triton.jit
def _grow_candidates(kept_ptr, bit, s_base, s_dt, offs, inr):
    """(kept, candidate, key) at flat offsets: the candidates are the positions not kept, keyed by |score|."""
    kb = tl.load(kept_ptr + offs, mask=inr, other=0).to(tl.int32)
    kept = inr & ((kb & bit) != 0)
    valid = inr & ((kb & bit) == 0)
    return kept, valid, _keys(s_base, offs, valid, s_dt)


@triton.jit
def _store_grown(row, offs, inr, grow, kept):
    out = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
    tl.store(out + offs, (grow | (kept & (tl.load(row + 5) != 0))).to(tl.uint8), mask=inr)


@triton.jit
def _pairwise_kernel(prog_layer, prog_start, tab, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    row = tab + tl.load(prog_layer + pid) * GROW_ROW
    start = tl.load(prog_start + pid)
    numel = tl.load(row + 11)
    stride, group, target = _unit_shape(row)
    kept_ptr, bit, s_base, s_dt = _sources(row)
    n_it = tl.minimum(tl.cdiv(numel - start, BLOCK), ITERS)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        kept, valid, key = _grow_candidates(kept_ptr, bit, s_base, s_dt, offs, inr)
        j = (offs // stride) % group  # the position's index in its unit (fan_in is a multiple of group)
        first = offs - j * stride
        n_kept = tl.zeros([BLOCK], tl.int32)
        rank = tl.zeros([BLOCK], tl.int32)
        for t in range(0, group):
            kept_t, valid_t, key_t = _grow_candidates(kept_ptr, bit, s_base, s_dt, first + t * stride, inr)
            n_kept += kept_t.to(tl.int32)
            rank += (valid_t & ((key_t > key) | ((key_t == key) & (t < j)))).to(tl.int32)
        _store_grown(row, offs, inr, valid & (rank < target - n_kept), kept)


@triton.jit
def _unit_digit(kept_ptr, bit, s_base, s_dt, first, stride, group, target, prefix, k, SHIFT: tl.constexpr,
                NBITS: tl.constexpr, FIRST: tl.constexpr, HSTRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """One radix pass over a unit's candidates: its digit histogram (in registers: the program owns the unit),
    then the bin of the k-th largest. Returns the longer prefix and k remaining. The first pass also counts
    the unit's kept positions, which give k = need."""
    counts = tl.zeros([HSTRIDE], tl.int32)
    n_kept = tl.zeros([BLOCK], tl.int32)
    for c in range(0, tl.cdiv(group, BLOCK)):
        j = c * BLOCK + tl.arange(0, BLOCK)
        kept, valid, key = _grow_candidates(kept_ptr, bit, s_base, s_dt, first + j * stride, j < group)
        counts += _digit_histogram(valid, key, prefix, SHIFT, NBITS, HSTRIDE)
        if FIRST:
            n_kept += kept.to(tl.int32)
    if FIRST:  # a unit already at (or past) its target gets k <= 0, which takes nothing
        k = target - tl.sum(n_kept, axis=0)
    b, k = _pick_bin(counts, k, NBITS, HSTRIDE, False)
    return (prefix << NBITS) | b, k


@triton.jit
def _unit_radix_kernel(tab, unit_start, n_layers, LAYERS: tl.constexpr, RADIX: tl.constexpr,
                       NPASS: tl.constexpr, HSTRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """One unit per program: program p belongs to the last layer whose first unit is <= p."""
    pid = tl.program_id(0).to(tl.int64)
    ls = tl.arange(0, LAYERS)
    firsts = tl.load(unit_start + ls, mask=ls < n_layers, other=2 ** 62)
    l = tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1
    row = tab + l * GROW_ROW
    r = pid - tl.load(unit_start + l)
    stride, group, target = _unit_shape(row)
    kept_ptr, bit, s_base, s_dt = _sources(row)
    per_row = tl.load(row + 7) // group
    # unit r = o * per_row + b starts at W2[o, b * group] (a transposed layer with out = 1 has stride 1: both
    # formulas agree there)
    first = tl.where(stride == 1, r * group, (r % per_row) * group * stride + r // per_row)
    prefix = tl.zeros([], tl.int32)
    k = tl.zeros([], tl.int64)
    for p in tl.static_range(NPASS):  # digits as radix_passes: the first takes what the others leave of 31 bits
        prefix, k = _unit_digit(kept_ptr, bit, s_base, s_dt, first, stride, group, target, prefix, k,
                                (NPASS - 1 - p) * RADIX, 31 - (NPASS - 1) * RADIX if p == 0 else RADIX, p == 0,
                                HSTRIDE, BLOCK)
    run = tl.zeros([], tl.int64)
    for c in range(0, tl.cdiv(group, BLOCK)):
        j = c * BLOCK + tl.arange(0, BLOCK)
        inr = j < group
        offs = first + j * stride
        kept, valid, key = _grow_candidates(kept_ptr, bit, s_base, s_dt, offs, inr)
        grow, run = _selected(valid, key, prefix, k, run, BLOCK)
        _store_grown(row, offs, inr, grow, kept)


# ---------------------------------------------------------------------------------------------- host side
def _grow_rows(scores, kept, kept_bit, outs, with_kept, units) -> List[List[int]]:
    return [[s.data_ptr(), float_code(s), k.data_ptr(), kept_bit, o.data_ptr(), int(with_kept), u.out, u.fan_in,
             int(u.transposed), u.group, u.target, s.numel()] for s, k, o, u in zip(scores, kept, outs, units)]


def _grow(rows, units: Sequence[Units], pairwise_group, block, iters, radix_bits, device) -> None:
    """The growth launches (at most two: small units, large units); callers hold the device guard."""
    small = [r for r, u in zip(rows, units) if u.group <= pairwise_group]
    large = [(r, u) for r, u in zip(rows, units) if u.group > pairwise_group and u.n_units]
    if small:
        owner, start, _ = program_table([r[11] for r in small], block * iters)
        _pairwise_kernel[(len(owner),)](to_device(owner, torch.int32, device), to_device(start, torch.int64, device),
                                        to_device(small, torch.int64, device), BLOCK=block, ITERS=iters)
    if large:
        firsts, n = [], 0
        for _, u in large:
            firsts.append(n)
            n += u.n_units
        # chunks no wider than the largest unit: a fan-in of 100 reads 128-wide vectors, not `block`-wide ones
        chunk = min(block, max(16, triton.next_power_of_2(max(u.group for _, u in large))))
        _unit_radix_kernel[(n,)](to_device([r for r, _ in large], torch.int64, device),
                                 to_device(firsts, torch.int64, device), len(large),
                                 LAYERS=max(16, triton.next_power_of_2(len(large))), RADIX=radix_bits,
                                 NPASS=len(radix_passes(radix_bits)), HSTRIDE=1 << radix_bits, BLOCK=chunk)


def structured_update(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                      scores: Sequence[torch.Tensor], n_keep: Sequence[int], units: Sequence[Units],
                      states: Sequence[Sequence[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]], block: int,
                      iters: int, radix_bits: int, pairwise_group: int) -> None:
    if not weights:
        return
    device = one_device([t for group in (weights, masks, scores, grads) for t in group] +
                        [t for st in states for t in st], "the structured update's tensors")
    # read-only copies of non-contiguous weights and scores (commit writes the originals in place, so nothing
    # may be copied back over them)
    wc, sc = [w.contiguous() for w in weights], [s.contiguous() for s in scores]
    plan = plan_layers(wc, masks, sc, [(0, 0)] * len(weights), block, iters, radix_bits, device)
    st_keep = to_device([[0, int(k)] for k in n_keep], torch.int64, device)
    new = [torch.empty(w.numel(), dtype=torch.bool, device=device) for w in weights]
    rows = _grow_rows(sc, masks, 2, new, True, units)
    with on_device(device):
        mark_kept(plan, st_keep)
        _grow(rows, units, pairwise_group, block, iters, radix_bits, device)
    _sh.commit(weights, masks, new, new, states, grads, block, iters)


def unit_grow(scores: Sequence[torch.Tensor], keep: Sequence[torch.Tensor], units: Sequence[Units], block: int,
              iters: int, radix_bits: int, pairwise_group: int) -> List[torch.Tensor]:
    device = one_device(list(scores) + list(keep), "the scores and keep flags of unit_grow")
    sc = [s.contiguous() for s in scores]
    kf = [_sh._flags(k, s.numel()) for k, s in zip(keep, scores)]
    outs = [torch.empty(s.numel(), dtype=torch.bool, device=device) for s in scores]
    with on_device(device):
        _grow(_grow_rows(sc, kf, 1, outs, False, units), units, pairwise_group, block, iters, radix_bits, device)
    return outs
