"""The exported fan-in product in Triton: the CUDA kernel of `rigl_fast_export::fan_in_linear` (rigl_fast/export.py).

    y[b, o] = sum_j values[o, j] * x[b, indices[o, j]]

x (B, in) fp32/fp16/bf16, values (out, k) of x's dtype, indices (out, k) int16/int32; y (B, out) in x's dtype,
accumulated in fp32 and rounded once (fp16 by Triton's cast, bf16 by the explicit round-to-nearest-even of
`elementwise._from_f32`; both load and round bf16 through int16 bits, which is exact and also right under the
interpreter, whose bf16 arithmetic is not). A fused gather-multiply-reduce: no (B, out, k) intermediate.

One launch, a 1-D grid of (output block, batch block) programs, batch block fastest, so the programs that run
together read the same (values, indices) tile (L2 hits). Each program owns BLOCK_O output rows and BLOCK_B
batch rows and walks k in chunks of BLOCK_K, keeping a (BLOCK_O, BLOCK_K[, BLOCK_B]) fp32 accumulator that is
reduced over k once, at the end:
- BLOCK_B == 1 (batch 1, memory-bound): each chunk is a coalesced (BLOCK_O, BLOCK_K) tile of values and
  indices (read once in all), and x[b, idx] is gathered from one row of x (L1/L2 resident). Rows of an
  arbitrary k are not 16-byte aligned, so these are coalesced scalar loads, not vector loads.
- BLOCK_B > 1: each (values, indices) tile is reused for BLOCK_B batch rows. x is read as an (in, B) table
  (copied once, B * in elements, its batch dimension zero-padded to whole blocks and to 16 elements), so the
  gather of input idx for the batch block is BLOCK_B consecutive, aligned elements, loaded unmasked along the
  batch (vector loads): one or more full sectors per (o, j).
The summation order is lane-strided partial sums then a tree (not the reference's j order): results agree with
`_fan_in_linear_reference` within fp32 rounding of the sum, and the outputs (one rounding) usually exactly.

An out-of-range index (< 0 or >= in) is never dereferenced; it makes its output rows NaN (checking it on the
host would mean a device synchronisation; the C++ CPU kernel raises instead).

Only the forward. d/dx is a scatter-add; rigl_fast/export.py keeps doing it in torch.

No split-k: a layer of few rows and a huge fan-in gets few programs at batch 1 (a deterministic split would
need a second pass over fp32 partials).

Not run on a GPU yet: checked under the interpreter (tests/test_export_triton.py) and compiled for sm_90 by the
same test; the block sizes of `_config` are reasoned, not measured.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import FLOAT_CODES, on_device
from .elementwise import _from_f32, _to_f32

INDEX_DTYPES = (torch.int16, torch.int32)
_I32_MAX = 2 ** 31 - 1


@triton.jit
def _nan_like(x):
    return tl.full(x.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _table_tile(v_rows, i_rows, o_ok, k0, K, IN, svk, sik, DT: tl.constexpr, WIDE: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of the (values, indices) tables for the program's rows: values as fp32, the
    indices (int64 when WIDE), the in-bounds mask m, and ok = the index lies in [0, IN)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    m = o_ok[:, None] & (kk < K)[None, :]
    v = _to_f32(tl.load(v_rows + kk[None, :] * svk, mask=m, other=0), DT)
    idx = tl.load(i_rows + kk[None, :] * sik, mask=m, other=0).to(tl.int32)
    ok = (idx >= 0) & (idx < IN)
    if WIDE:
        idx = idx.to(tl.int64)
    return v, idx, m, ok


@triton.jit
def _fan_in_kernel(x_ptr, v_ptr, i_ptr, y_ptr, B, IN, OUT, K, sxb, sxi, svo, svk, sio, sik, syb, syo, n_bblocks,
                   DT: tl.constexpr, WIDE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    pid_b = pid % n_bblocks  # batch blocks fastest: neighbouring programs share a (values, indices) tile
    pid_o = pid // n_bblocks
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < OUT
    if WIDE:  # some tensor spans 2**31+ elements: 64-bit offsets
        o = o.to(tl.int64)
    v_rows = v_ptr + o[:, None] * svo
    i_rows = i_ptr + o[:, None] * sio
    if BLOCK_B == 1:
        b = pid_b
        if WIDE:
            b = b.to(tl.int64)
        x_row = x_ptr + b * sxb
        acc = tl.zeros([BLOCK_O, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v, idx, m, ok = _table_tile(v_rows, i_rows, o_ok, k0, K, IN, svk, sik, DT, WIDE, BLOCK_K)
            xg = _to_f32(tl.load(x_row + idx * sxi, mask=m & ok, other=0), DT)
            xg = tl.where(m & (~ok), _nan_like(xg), xg)
            acc += v * xg
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + b * syb + o * syo, _from_f32(y, DT), mask=o_ok)
    else:
        b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = b < B
        if WIDE:
            b = b.to(tl.int64)
        x_cols = x_ptr + b[None, None, :] * sxb
        acc3 = tl.zeros([BLOCK_O, BLOCK_K, BLOCK_B], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v, idx, m, ok = _table_tile(v_rows, i_rows, o_ok, k0, K, IN, svk, sik, DT, WIDE, BLOCK_K)
            # no batch bound in the load mask: the (in, B) copy of x is padded to whole batch blocks, so the
            # mask is constant along the block and the gather of BLOCK_B consecutive elements vectorises
            xg = _to_f32(tl.load(x_cols + (idx * sxi)[:, :, None], mask=(m & ok)[:, :, None], other=0), DT)
            xg = tl.where((m & (~ok))[:, :, None], _nan_like(xg), xg)
            acc3 += v[:, :, None] * xg
        y = tl.sum(acc3, axis=1)
        tl.store(y_ptr + b[None, :] * syb + o[:, None] * syo, _from_f32(y, DT),
                 mask=o_ok[:, None] & b_ok[None, :])


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _config(B: int, out: int, k: int, n_sm: int) -> Tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_K, BLOCK_B, num_warps). Tiles of about 2048 (batch 1) / 4096 (batched) fp32 accumulators
    (16 / 32 per thread of 4 warps); output blocks are halved until there are >= 2 programs per SM (n_sm = 1
    under the interpreter, where fewer, larger programs are faster). Results depend on these only through the
    summation order."""
    kp = _pow2(max(k, 1))
    if B == 1:
        block_b = 1
        block_k = min(kp, 128)  # 128 fp16 values + 128 int16 indices: 256 contiguous bytes of each per row
        block_o = min(128, max(1, 2048 // block_k))
        tile = 2048
    else:
        block_b = min(64, _pow2(B))
        block_k = min(kp, max(8, 256 // block_b))
        block_o = min(64, max(1, 4096 // (block_k * block_b)))
        tile = 4096
    n_b = triton.cdiv(B, block_b)
    while block_o > 1 and triton.cdiv(out, block_o) * n_b < 2 * n_sm:
        block_o //= 2
    size = block_o * block_k * block_b
    num_warps = 4 if size >= tile // 2 else (2 if size >= 256 else 1)
    return block_o, block_k, block_b, num_warps


_SMS = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> Optional[str]:
    """None if `fan_in_linear` takes these tensors, else why not (one line). Shapes are not checked here:
    fan_in_linear raises on those. A caller falls back to the reference where this gives a reason (fp64, say)."""
    for name, t in (("x", x), ("values", values), ("indices", indices)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if x.dtype not in FLOAT_CODES:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    if values.dtype != x.dtype:
        return f"values ({values.dtype}) must have x's dtype ({x.dtype})"
    if indices.dtype not in INDEX_DTYPES:
        return f"indices must be int16 or int32, got {indices.dtype}"
    for name, t in (("values", values), ("indices", indices)):
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}: all three must be on one device"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu" and _interpreted():
        return None
    return (f"x is on {x.device}: the Triton kernel takes CUDA tensors (CPU tensors only under "
            "TRITON_INTERPRET=1, tests)")


def _check(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
    why = supports(x, values, indices)
    if why is not None:
        raise ValueError(f"rigl_fast fan_in_linear (triton): {why}")
    if x.dim() != 2:
        raise ValueError(f"rigl_fast fan_in_linear (triton): x must be (B, in), got shape {tuple(x.shape)}")
    if values.dim() != 2:
        raise ValueError(f"rigl_fast fan_in_linear (triton): values must be (out, k), got shape "
                         f"{tuple(values.shape)}")
    if indices.shape != values.shape:
        raise ValueError(f"rigl_fast fan_in_linear (triton): indices of shape {tuple(indices.shape)} do not match "
                         f"values of shape {tuple(values.shape)}")
    if x.shape[1] == 0 and values.numel() > 0:
        raise ValueError(f"rigl_fast fan_in_linear (triton): x has no input features (shape {tuple(x.shape)}) "
                         f"for indices of shape {tuple(indices.shape)} to index")


def _span(t: torch.Tensor) -> int:
    """The largest element offset a kernel computes into t (sizes times |strides|)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0)


def _blocks(op: str, **blocks) -> None:
    """Block-size and num_warps overrides of `op`, each a power of two (num_warps at most 32: 1024 threads, CUDA's
    limit; the interpreter runs any number, a GPU compile does not)."""
    for key, val in blocks.items():
        if val is not None and (val < 1 or val & (val - 1) or (key == "num_warps" and val > 32)):
            raise ValueError(f"rigl_fast {op} (triton): {key} must be a power of two >= 1"
                             f"{' and <= 32' if key == 'num_warps' else ''}, got {val}")


def fan_in_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, *, block_o: Optional[int] = None,
                  block_k: Optional[int] = None, block_b: Optional[int] = None,
                  num_warps: Optional[int] = None) -> torch.Tensor:
    """(B, in) x, (out, k) values and indices -> (B, out) in x's dtype (module doc). x, values and indices may
    be strided (read in place; for B > 1 x is copied once to a padded (in, B) layout, module doc). Raises
    ValueError naming the argument for unsupported dtypes or devices and for mismatched shapes.

    block_o / block_k / block_b / num_warps override `_config`'s choice (powers of two; tuning and tests)."""
    _check(x, values, indices)
    B, n_in = x.shape
    out, k = values.shape
    if B == 0 or out == 0 or k == 0:
        return torch.zeros((B, out), dtype=x.dtype, device=x.device)
    _blocks("fan_in_linear", block_o=block_o, block_k=block_k, block_b=block_b, num_warps=num_warps)
    n_sm = _sm_count(x.device)
    c_o, c_k, c_b, c_w = _config(B, out, k, n_sm)
    block_o, block_k, block_b = block_o or c_o, block_k or c_k, block_b or c_b
    num_warps = num_warps or c_w
    if block_b > 1:  # x as (in, ld) storage, ld >= B a multiple of the batch block and of 16 elements (module doc)
        ld = triton.cdiv(B, max(block_b, 16)) * max(block_b, 16)
        xt = torch.zeros((n_in, ld), dtype=x.dtype, device=x.device)
        xt[:, :B] = x.t()
        x = xt.t()  # (ld, in), strides (1, ld); rows >= B are zeros, read but never stored
    y = torch.empty((B, out), dtype=x.dtype, device=x.device)
    wide = max(_span(x), _span(values), _span(indices), y.numel()) > _I32_MAX
    dt = FLOAT_CODES[x.dtype]
    if dt == 2:  # bf16 travels as its int16 bits (module doc)
        xk, vk, yk = x.view(torch.int16), values.view(torch.int16), y.view(torch.int16)
    else:
        xk, vk, yk = x, values, y
    n_b = triton.cdiv(B, block_b)
    grid = (triton.cdiv(out, block_o) * n_b,)
    with on_device(x.device):
        _fan_in_kernel[grid](xk, vk, indices, yk, B, n_in, out, k, x.stride(0), x.stride(1), values.stride(0),
                             values.stride(1), indices.stride(0), indices.stride(1), y.stride(0), y.stride(1), n_b,
                             DT=dt, WIDE=wide, BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_B=block_b,
                             num_warps=num_warps)
    return y


__all__ = ["fan_in_linear", "supports"]
