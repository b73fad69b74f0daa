"""The gradient op, the after-step op and the non-finite check.

Masking is done on raw bits (an fp32 tensor is stored through an int32 pointer, and so on): a masked
entry is written as all-zero bits (+0.0) and an active one is left alone, so NaN/inf never leak through a
multiply and any float dtype of the same width shares one code path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import (DT_BF16, DT_F16, DT_F32, addressable, float_code, on_device, one_device, program_table,
                      to_device)

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------------------------------------- helpers
@triton.jit
def _bf16_bits_to_f32(b):
    # bf16 is the top half of an fp32: exact, and avoids bf16 arithmetic (wrong under the interpreter)
    return (b.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_bits(x):
    # round to nearest even, NaN -> canonical quiet NaN: what torch does when it casts fp32 to bf16
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit
def _to_f32(x, DT: tl.constexpr):
    """A loaded fp32 / fp16 / bf16-as-int16-bits vector as fp32 (exact)."""
    if DT == 2:
        return _bf16_bits_to_f32(x)
    elif DT == 1:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _from_f32(x, DT: tl.constexpr):
    """fp32 rounded to the stored type as torch rounds it (`_to_f32`'s inverse on representable values)."""
    if DT == 2:
        return _f32_to_bf16_bits(x)
    elif DT == 1:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _rounded(x, DT: tl.constexpr):
    """fp32 rounded to the precision of DT, kept in fp32: an intermediate result torch stores in the tensor's
    dtype before the next operation reads it."""
    return _to_f32(_from_f32(x, DT), DT)


@triton.jit
def _storage_offsets(offs, d1, d2, d3, d4, s0, s1, s2, s3, s4, STRIDED: tl.constexpr):
    """Flat row-major indices -> storage offsets of a tensor of `strided_layout` (d1..d4, s0..s4): gradients
    may be transposed, expanded or sliced, and reading them in place saves a copy. Without STRIDED (every
    tensor of the launch contiguous) the indices themselves."""
    if STRIDED:
        r = offs
        i4 = r % d4
        r = r // d4
        i3 = r % d3
        r = r // d3
        i2 = r % d2
        r = r // d2
        i1 = r % d1
        i0 = r // d1
        return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4
    else:
        return offs


@triton.jit
def _layout_offsets(lay, offs, STRIDED: tl.constexpr):
    """`_storage_offsets` with the layout read from an int64 table (9 columns from `lay`); the flat indices
    themselves when no tensor of the launch is STRIDED."""
    if STRIDED:
        return _storage_offsets(offs, tl.load(lay + 0), tl.load(lay + 1), tl.load(lay + 2), tl.load(lay + 3),
                                tl.load(lay + 4), tl.load(lay + 5), tl.load(lay + 6), tl.load(lay + 7),
                                tl.load(lay + 8), True)
    else:
        return offs


@triton.jit
def _zero_store(base, offs, off_mask, esize):
    """Write +0.0 (all-zero bits) at base[offs] where off_mask, whatever the element size."""
    if esize == 4:
        tl.store(base.to(tl.pointer_type(tl.int32)) + offs, tl.zeros(offs.shape, tl.int32), mask=off_mask)
    elif esize == 2:
        tl.store(base.to(tl.pointer_type(tl.int16)) + offs, tl.zeros(offs.shape, tl.int16), mask=off_mask)
    elif esize == 8:
        tl.store(base.to(tl.pointer_type(tl.int64)) + offs, tl.zeros(offs.shape, tl.int64), mask=off_mask)
    else:
        tl.store(base.to(tl.pointer_type(tl.int8)) + offs, tl.zeros(offs.shape, tl.int8), mask=off_mask)


# ---------------------------------------------------------------------------------------------- gradient op
@triton.jit
def _quotient(x, d, RECIP: tl.constexpr):
    # d is n (divide) or the fp32 reciprocal 1/n (multiply); both fp32 scalars
    if RECIP:
        return x * d
    else:
        return tl.math.div_rn(x, d)


@triton.jit
def _accumulated(a, x, n_div, DT: tl.constexpr, RECIP: tl.constexpr):
    """`a += x / n` as torch computes it in dtype DT (a as stored, x in fp32 holding a DT value): the quotient
    in fp32 rounded to DT, then the sum in fp32 rounded to DT. Returns the new `a`, as stored.

    The quotient is formed as torch forms it on this device: torch on CPU divides (IEEE; div_rn, since
    Triton's plain `/` may be approximate on GPU); torch on CUDA multiplies by the fp32 reciprocal of a
    CPU-scalar divisor (RECIP; kernels are launched with fp fusion off so a + x * inv is not turned into an
    FMA)."""
    return _from_f32(_to_f32(a, DT) + _rounded(_quotient(x, n_div, RECIP), DT), DT)


@triton.jit
def _mask_grad_kernel(g_ptr, m_ptr, out_ptr, acc_ptr, n_div, numel,
                      d1, d2, d3, d4, s0, s1, s2, s3, s4, STRIDED: tl.constexpr, HAS_ACC: tl.constexpr,
                      DT: tl.constexpr, RECIP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inr = offs < numel
    g_offs = _storage_offsets(offs, d1, d2, d3, d4, s0, s1, s2, s3, s4, STRIDED)
    g = tl.load(g_ptr + g_offs, mask=inr, other=0)
    m = tl.load(m_ptr + offs, mask=inr, other=0)
    tl.store(out_ptr + offs, tl.where(m != 0, g, tl.zeros_like(g)), mask=inr)
    if HAS_ACC:
        a = tl.load(acc_ptr + offs, mask=inr, other=0)
        tl.store(acc_ptr + offs, _accumulated(a, _to_f32(g, DT), n_div, DT, RECIP), mask=inr)


def _as_kernel_view(t: torch.Tensor) -> torch.Tensor:
    # bf16 goes to the kernel as its int16 bits; fp32/fp16 as themselves
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def torch_divides_by_reciprocal(device: torch.device) -> bool:
    """Whether `tensor / python_int` on `device` is computed by torch as tensor * fp32(1 / n)."""
    return torch.device(device).type == "cuda"


def mask_grad(grad: torch.Tensor, mask: torch.Tensor, acc: Optional[torch.Tensor], n: int,
              block: int, recip: Optional[bool] = None) -> torch.Tensor:
    device = one_device((grad, mask, acc), "the gradient, its mask and the accumulator")
    out = torch.empty(grad.shape, dtype=grad.dtype, device=device)
    numel = grad.numel()
    if numel == 0:
        return out
    src, layout = addressable(grad)
    if acc is not None:
        assert acc.is_contiguous() and acc.dtype == grad.dtype, "accumulator must be contiguous, grad's dtype"
    n_div, recip, extra = division(n, device, recip)
    grid = (triton.cdiv(numel, block),)
    with on_device(device):
        _mask_grad_kernel[grid](
            _as_kernel_view(src), mask.view(torch.uint8), _as_kernel_view(out),
            _as_kernel_view(acc if acc is not None else out),
            n_div, numel, *layout,
            STRIDED=not src.is_contiguous(), HAS_ACC=acc is not None, DT=float_code(grad), RECIP=recip, BLOCK=block,
            **extra)
    return out


def division(n: int, device: torch.device, recip: Optional[bool] = None):
    """How a kernel divides by n as torch does on `device` (see `torch_divides_by_reciprocal`): the fp32
    divisor or reciprocal to pass, the RECIP flag, and the launch options (no FMA contraction on GPU: torch
    does not contract `a + x * inv`)."""
    if recip is None:
        recip = torch_divides_by_reciprocal(device)
    # n goes in as a float: an int argument equal to 1 would be specialised into a constexpr on GPU
    n_div = float(np.float32(1.0) / np.float32(n)) if recip else float(n)
    extra = {"enable_fp_fusion": False} if torch.device(device).type == "cuda" else {}
    return n_div, bool(recip), extra


# ---------------------------------------------------------------------------------------------- after-step op
@triton.jit
def _apply_masks_kernel(prog_group, prog_start, groups, rows, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """One program = one chunk of one mask; the mask is read once and every tensor sharing it (the weight
    and its optimizer states) gets zeros written off the mask. Active entries are neither read nor written."""
    pid = tl.program_id(0)
    gi = tl.load(prog_group + pid)
    start = tl.load(prog_start + pid)
    m_ptr = tl.load(groups + gi * 4 + 0).to(tl.pointer_type(tl.uint8))
    numel = tl.load(groups + gi * 4 + 1)
    r0 = tl.load(groups + gi * 4 + 2)
    r1 = tl.load(groups + gi * 4 + 3)
    n_it = tl.minimum(tl.cdiv(numel - start, BLOCK), ITERS)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        off_mask = inr & (tl.load(m_ptr + offs, mask=inr, other=1) == 0)
        for r in range(r0, r1):
            _zero_store(tl.load(rows + r * 2 + 0), offs, off_mask, tl.load(rows + r * 2 + 1))


class _TableCache:
    """The after-step op runs every step on the same tensors: reuse its device tables (keyed by addresses
    and sizes only, so a table is right for whatever tensors now live there)."""

    def __init__(self, size=8):
        self.size = size
        self.d = {}

    def get(self, key, build):
        hit = self.d.get(key)
        if hit is None:
            if len(self.d) >= self.size:
                self.d.pop(next(iter(self.d)))
            hit = self.d[key] = build()
        return hit


_APPLY_CACHE = _TableCache()


def apply_masks(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], block: int, iters: int) -> None:
    if not tensors:
        return
    device = one_device(list(tensors) + list(masks), "the after-step pass's tensors and masks")
    copies = []
    group_of = {}
    groups = []  # [mask, [(ptr, esize)]]
    for t, m in zip(tensors, masks):
        if t.numel() == 0:
            continue
        if not t.is_contiguous():
            c = t.contiguous()
            copies.append((t, c))
            t = c
        key = (m.data_ptr(), m.numel())
        if key not in group_of:
            group_of[key] = len(groups)
            groups.append((m, []))
        groups[group_of[key]][1].append((t.data_ptr(), t.element_size()))
    if not groups:
        return
    chunk = block * iters
    cache_key = (str(device), chunk, tuple((m.data_ptr(), m.numel(), tuple(r)) for m, r in groups))

    def build():
        g_rows, t_rows = [], []
        for m, rs in groups:
            g_rows.append([m.data_ptr(), m.numel(), len(t_rows), len(t_rows) + len(rs)])
            t_rows.extend([list(r) for r in rs])
        owner, start, _ = program_table([m.numel() for m, _ in groups], chunk)
        return (to_device(owner, torch.int32, device), to_device(start, torch.int64, device),
                to_device(g_rows, torch.int64, device), to_device(t_rows, torch.int64, device))

    p_group, p_start, g_tab, t_tab = _APPLY_CACHE.get(cache_key, build)
    with on_device(device):
        _apply_masks_kernel[(p_group.numel(),)](p_group, p_start, g_tab, t_tab, BLOCK=block, ITERS=iters)
    for orig, c in copies:
        orig.copy_(c)


# ---------------------------------------------------------------------------------------------- non-finite check
@triton.jit
def _nonfinite_kernel(prog_item, prog_start, items, flag, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Sets *flag to 1 if any element is NaN/inf: an all-ones exponent field, tested on the raw bits."""
    pid = tl.program_id(0)
    i = tl.load(prog_item + pid)
    start = tl.load(prog_start + pid)
    base = tl.load(items + i * 3 + 0)
    numel = tl.load(items + i * 3 + 1)
    dt = tl.load(items + i * 3 + 2)
    n_it = tl.minimum(tl.cdiv(numel - start, BLOCK), ITERS)
    bad = tl.zeros([BLOCK], tl.int32)
    for it in range(0, n_it):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        inr = offs < numel
        if dt == 0:
            b = tl.load(base.to(tl.pointer_type(tl.int32)) + offs, mask=inr, other=0)
            e = (b & 0x7F800000) == 0x7F800000
        elif dt == 1:
            b = tl.load(base.to(tl.pointer_type(tl.int16)) + offs, mask=inr, other=0).to(tl.int32)
            e = (b & 0x7C00) == 0x7C00
        elif dt == 2:
            b = tl.load(base.to(tl.pointer_type(tl.int16)) + offs, mask=inr, other=0).to(tl.int32)
            e = (b & 0x7F80) == 0x7F80
        else:
            b64 = tl.load(base.to(tl.pointer_type(tl.int64)) + offs, mask=inr, other=0)
            e = (b64 & 0x7FF0000000000000) == 0x7FF0000000000000
        bad = tl.maximum(bad, e.to(tl.int32))
    any_bad = tl.max(bad, axis=0)
    if any_bad > 0:
        tl.atomic_max(flag, any_bad)


_NONFINITE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def any_nonfinite(tensors: Sequence[torch.Tensor], block: int, iters: int) -> bool:
    floats = [t for t in tensors if t.numel() > 0 and t.dtype.is_floating_point]
    if not floats:
        return False
    device = one_device(floats, "the tensors checked for NaN/inf")
    flat = [t.contiguous() for t in floats]
    unsupported = [t for t in flat if t.dtype not in _NONFINITE_CODES]
    items = [[t.data_ptr(), t.numel(), _NONFINITE_CODES[t.dtype]] for t in flat if t.dtype in _NONFINITE_CODES]
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    if items:
        owner, start, _ = program_table([r[1] for r in items], block * iters)
        tables = (to_device(owner, torch.int32, device), to_device(start, torch.int64, device),
                  to_device(items, torch.int64, device))
        with on_device(device):
            _nonfinite_kernel[(len(owner),)](*tables, flag, BLOCK=block, ITERS=iters)
    for t in unsupported:  # float8 and friends: rare enough for torch to check
        flag |= (~torch.isfinite(t.float())).any().to(torch.int32).view(1)
    return bool(flag.item())  # the one host sync of an update


__all__ = ["mask_grad", "apply_masks", "any_nonfinite", "DT_F32", "DT_F16", "DT_BF16"]
