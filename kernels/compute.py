"""The sparse training products in Triton: the CUDA kernels of sparse compute (issue 22), beside export.py's.

    csr_product:  y[b, r] = sum_{p in [crow[r], crow[r+1])} values[p] * x[b, col[p]]
    sampled_dot:  out[p]  = sum_b g[b, rows[p]] * x[b, cols[p]]

csr_product is a layer's forward over its compressed rows (x (B, in), the rows of W: n_rows = out) and its input
gradient over the compressed columns (x = grad (B, out), the rows of W^T: n_rows = in). sampled_dot is the
weight gradient at the active positions only (rows, cols: the (out, in) coordinates of each value). x and g are
fp32/fp16/bf16 (any strides), values of x's dtype; crow int32/int64, col int16/int32, rows/cols int16/int32 (any
1-D strides). csr_product returns (B, n_rows) in x's dtype, accumulated in fp32 and rounded once (fp16 by
Triton's cast, bf16 by `elementwise._from_f32`'s round-to-nearest-even; bf16 is loaded and stored as int16 bits,
exact, and right under the interpreter, whose bf16 arithmetic is not); sampled_dot returns fp32 (nnz).

Layout: both kernels are vectorised over the batch. For B > 1 x (and g) are copied once to (n, ld) tables
(transposed, the batch zero-padded to ld, a multiple of the batch block and of 16 elements), so the gather of one
input for a batch block is BLOCK_B consecutive aligned elements, loaded unmasked along the batch (vector loads),
as export.py does. The copies cost B * n elements each, against nnz * B gathered elements. At B == 1 the tensors
are read in place.
- csr_product: a 1-D grid of (row block, batch block) programs, batch block fastest (neighbours read the same
  rows of (col, values)). A program owns BLOCK_R rows and walks their ranges together in chunks of BLOCK_K
  positions up to the longest range of the block (shorter rows are masked), with a (BLOCK_R, BLOCK_K[, BLOCK_B])
  fp32 accumulator reduced over the chunk axis once, at the end. Rows have any length, empty included; a block
  whose lengths vary widely wastes the masked lanes (unstructured masks give near-uniform lengths). Block sizes
  are export's `_config` for k = the mean row length.
- sampled_dot: a 1-D grid of pair blocks; a program owns BLOCK_P pairs and loops over the batch in chunks of
  BLOCK_B, with a (BLOCK_P, BLOCK_B) fp32 accumulator reduced over the batch at the end. No split over the batch:
  few pairs and a huge batch give few programs (a deterministic split would need a second pass).
The summation order is lane-strided partial sums then a tree: results agree with an fp64 sum within fp32
rounding of the sum, and outputs of csr_product (one rounding) usually exactly.

Nothing out of range is dereferenced (checking on the host would cost a device synchronisation): a col outside
[0, in) or a row range not within [0, nnz] (crow[r] < 0, crow[r] > crow[r+1] or crow[r+1] > nnz) makes that
output row NaN; a rows[p] outside [0, n_out) or cols[p] outside [0, in) makes out[p] NaN. Offsets are 64-bit
(WIDE) where some tensor spans 2**31 - margin elements or more.

Not run on a GPU yet: checked under the interpreter (tests/test_compute_triton.py) and compiled for sm_90 by
`aot_check` (run by the same test); the block sizes are reasoned, not measured.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import FLOAT_CODES, on_device
from .elementwise import _from_f32, _to_f32
from .export import _blocks, _config, _interpreted, _nan_like, _pow2, _sm_count, _span

CROW_DTYPES = (torch.int32, torch.int64)
INDEX_DTYPES = (torch.int16, torch.int32)
_I32_MAX = 2 ** 31 - 1
_MARGIN = 1 << 16  # positions run up to a block past the last one: 32-bit offsets only with this much headroom
_GRID_MAX = 2 ** 31 - 1  # a CUDA grid's x dimension


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _row_ranges(crow_ptr, r, r_ok, NNZ, scr, WIDE: tl.constexpr):
    """[start, end) of rows r in the (col, values) tables and good = the range lies within [0, NNZ]; a bad
    range (and a row past the last) becomes empty, so nothing outside the tables is read."""
    s = tl.load(crow_ptr + r * scr, mask=r_ok, other=0)
    e = tl.load(crow_ptr + (r + 1) * scr, mask=r_ok, other=0)
    good = (s >= 0) & (s <= e) & (e <= NNZ)
    s = tl.where(good, s, 0)
    e = tl.where(good, e, 0)
    if WIDE:
        return s.to(tl.int64), e.to(tl.int64), good
    else:
        return s.to(tl.int32), e.to(tl.int32), good


@triton.jit
def _csr_chunk(c_ptr, v_ptr, s, e, j0, IN, sc, sv, DT: tl.constexpr, WIDE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Positions [s + j0, s + j0 + BLOCK_K) of each row (up to its end e): values as fp32, the columns (int64
    when WIDE), the in-range mask m, and ok = the column lies in [0, IN)."""
    p = s[:, None] + j0 + tl.arange(0, BLOCK_K)[None, :]
    m = p < e[:, None]
    v = _to_f32(tl.load(v_ptr + p * sv, mask=m, other=0), DT)
    idx = tl.load(c_ptr + p * sc, mask=m, other=0).to(tl.int32)
    ok = (idx >= 0) & (idx < IN)
    if WIDE:
        idx = idx.to(tl.int64)
    return v, idx, m, ok


@triton.jit
def _csr_kernel(x_ptr, crow_ptr, c_ptr, v_ptr, y_ptr, B, IN, ROWS, NNZ, sxb, sxi, scr, sc, sv, syb, syr, n_bblocks,
                DT: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    pid_b = pid % n_bblocks  # batch blocks fastest: neighbouring programs read the same rows of the tables
    pid_r = pid // n_bblocks
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < ROWS
    if WIDE:
        r = r.to(tl.int64)
    s, e, good = _row_ranges(crow_ptr, r, r_ok, NNZ, scr, WIDE)
    n = tl.max(e - s, axis=0)  # the longest range of the block: shorter rows are masked
    if BLOCK_B == 1:
        b = pid_b
        if WIDE:
            b = b.to(tl.int64)
        x_row = x_ptr + b * sxb
        acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
        for j0 in range(0, n, BLOCK_K):
            v, idx, m, ok = _csr_chunk(c_ptr, v_ptr, s, e, j0, IN, sc, sv, DT, WIDE, BLOCK_K)
            xg = _to_f32(tl.load(x_row + idx * sxi, mask=m & ok, other=0), DT)
            xg = tl.where(m & (~ok), _nan_like(xg), xg)
            acc += v * xg
        y = tl.sum(acc, axis=1)
        y = tl.where(good, y, _nan_like(y))
        tl.store(y_ptr + b * syb + r * syr, _from_f32(y, DT), mask=r_ok)
    else:
        b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = b < B
        if WIDE:
            b = b.to(tl.int64)
        x_cols = x_ptr + b[None, None, :] * sxb
        acc3 = tl.zeros([BLOCK_R, BLOCK_K, BLOCK_B], tl.float32)
        for j0 in range(0, n, BLOCK_K):
            v, idx, m, ok = _csr_chunk(c_ptr, v_ptr, s, e, j0, IN, sc, sv, DT, WIDE, BLOCK_K)
            # no batch bound in the mask: the (in, ld) table is padded to whole batch blocks (vector loads)
            xg = _to_f32(tl.load(x_cols + (idx * sxi)[:, :, None], mask=(m & ok)[:, :, None], other=0), DT)
            xg = tl.where((m & (~ok))[:, :, None], _nan_like(xg), xg)
            acc3 += v[:, :, None] * xg
        y = tl.sum(acc3, axis=1)
        y = tl.where(good[:, None], y, _nan_like(y))
        tl.store(y_ptr + b[None, :] * syb + r[:, None] * syr, _from_f32(y, DT), mask=r_ok[:, None] & b_ok[None, :])


@triton.jit
def _sampled_dot_kernel(x_ptr, g_ptr, r_ptr, c_ptr, o_ptr, NNZ, NB, IN, OUT, sxb, sxi, sgb, sgo, sr, sc,
                        DT: tl.constexpr, WIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < NNZ
    row = tl.load(r_ptr + p * sr, mask=p_ok, other=0).to(tl.int32)
    col = tl.load(c_ptr + p * sc, mask=p_ok, other=0).to(tl.int32)
    ok = p_ok & (row >= 0) & (row < OUT) & (col >= 0) & (col < IN)
    if WIDE:
        row = row.to(tl.int64)
        col = col.to(tl.int64)
    g_rows = g_ptr + (row * sgo)[:, None]
    x_rows = x_ptr + (col * sxi)[:, None]
    acc = tl.zeros([BLOCK_P, BLOCK_B], tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        # no batch bound: NB is whole batch blocks and the tables are zero-padded to it (vector loads)
        b = (b0 + tl.arange(0, BLOCK_B))[None, :]
        if WIDE:
            b = b.to(tl.int64)
        gv = _to_f32(tl.load(g_rows + b * sgb, mask=ok[:, None], other=0), DT)
        xv = _to_f32(tl.load(x_rows + b * sxb, mask=ok[:, None], other=0), DT)
        acc += gv * xv
    out = tl.sum(acc, axis=1)
    out = tl.where(ok, out, _nan_like(out))
    tl.store(o_ptr + p, out, mask=p_ok)


# ---------------------------------------------------------------------------------------------- host side
def _device_reason(device: torch.device) -> Optional[str]:
    """None where the kernels run on `device` (CUDA; CPU under the interpreter), else why not."""
    if device.type == "cuda" or (device.type == "cpu" and _interpreted()):
        return None
    return (f"x is on {device}: the Triton kernels take CUDA tensors (CPU tensors only under "
            "TRITON_INTERPRET=1, tests)")


def _tensor_reason(x: torch.Tensor, named, floats, index_dtypes) -> Optional[str]:
    """The checks both ops share: tensors, x's dtype, the float tensors' dtypes, index dtypes, one device."""
    for name, t in (("x", x),) + tuple(named):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if x.dtype not in FLOAT_CODES:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    for name, t in named:
        if name in floats and t.dtype != x.dtype:
            return f"{name} ({t.dtype}) must have x's dtype ({x.dtype})"
        if name in index_dtypes and t.dtype not in index_dtypes[name]:
            kinds = " or ".join(str(d).replace("torch.", "") for d in index_dtypes[name])
            return f"{name} must be {kinds}, got {t.dtype}"
    for name, t in named:
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}: all must be on one device"
    return _device_reason(x.device)


def supports_csr_product(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                         values: Optional[torch.Tensor] = None) -> Optional[str]:
    """None if `csr_product` takes these tensors (dtypes, device; values None: x, crow and col only), else why
    not (one line). Shapes are not checked here: csr_product raises on those. A caller falls back to the
    reference where this gives a reason."""
    named = (("crow", crow), ("col", col)) + ((("values", values),) if values is not None else ())
    return _tensor_reason(x, named, ("values",), {"crow": CROW_DTYPES, "col": INDEX_DTYPES})


supports = supports_csr_product  # the short name: x, crow, col[, values]


def supports_sampled_dot(x: torch.Tensor, g: torch.Tensor, rows: torch.Tensor,
                         cols: torch.Tensor) -> Optional[str]:
    """None if `sampled_dot` takes these tensors (dtypes, device), else why not (one line). Shapes are not
    checked here: sampled_dot raises on those."""
    return _tensor_reason(x, (("g", g), ("rows", rows), ("cols", cols)), ("g",),
                          {"rows": INDEX_DTYPES, "cols": INDEX_DTYPES})


def _fail(op: str, why: str):
    raise ValueError(f"rigl_fast {op} (triton): {why}")


def _check_csr(x, crow, col, values, n_rows) -> None:
    why = supports_csr_product(x, crow, col, values)
    if why is not None:
        _fail("csr_product", why)
    if x.dim() != 2:
        _fail("csr_product", f"x must be (B, n_in), got shape {tuple(x.shape)}")
    if not isinstance(n_rows, int) or n_rows < 0:
        _fail("csr_product", f"n_rows must be an int >= 0, got {n_rows!r}")
    if crow.shape != (n_rows + 1,):
        _fail("csr_product", f"crow must be (n_rows + 1,) = ({n_rows + 1},), got shape {tuple(crow.shape)}")
    if col.dim() != 1 or values.shape != col.shape:
        _fail("csr_product", f"col and values must be (nnz,) of one length, got shapes {tuple(col.shape)} and "
                             f"{tuple(values.shape)}")
    if x.shape[1] == 0 and col.numel() > 0:
        _fail("csr_product", f"x has no input features (shape {tuple(x.shape)}) for {col.numel()} columns to index")


def _check_sampled(x, g, rows, cols) -> None:
    why = supports_sampled_dot(x, g, rows, cols)
    if why is not None:
        _fail("sampled_dot", why)
    if x.dim() != 2 or g.dim() != 2 or x.shape[0] != g.shape[0]:
        _fail("sampled_dot", f"x and g must be (B, n_in) and (B, n_out), got shapes {tuple(x.shape)} and "
                             f"{tuple(g.shape)}")
    if rows.dim() != 1 or cols.shape != rows.shape:
        _fail("sampled_dot", f"rows and cols must be (nnz,) of one length, got shapes {tuple(rows.shape)} and "
                             f"{tuple(cols.shape)}")
    if rows.numel() > 0 and (x.shape[1] == 0 or g.shape[1] == 0):
        _fail("sampled_dot", f"x {tuple(x.shape)} and g {tuple(g.shape)} need features for {rows.numel()} pairs")


def _batch_table(x: torch.Tensor, block_b: int) -> torch.Tensor:
    """x (B, n) as an (n, ld) table, ld >= B a multiple of the batch block and of 16 elements, the batch padded
    with zeros; returned as its (ld, n) transpose (strides (1, ld)), so the kernels index it as they index x."""
    B, n = x.shape
    ld = triton.cdiv(B, max(block_b, 16)) * max(block_b, 16)
    xt = x.new_empty((n, ld))
    xt[:, B:] = 0
    xt[:, :B] = x.t()
    return xt.t()


def _bits(t: torch.Tensor, dt: int) -> torch.Tensor:
    """bf16 travels as its int16 bits (module doc)."""
    return t.view(torch.int16) if dt == 2 else t


def csr_product(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_rows: int, *,
                block_r: Optional[int] = None, block_k: Optional[int] = None, block_b: Optional[int] = None,
                num_warps: Optional[int] = None) -> torch.Tensor:
    """(B, n_in) x and compressed rows (crow (n_rows + 1), col and values (nnz)) -> (B, n_rows) in x's dtype
    (module doc). All inputs may be strided; x is copied once to a padded (n_in, B) table for B > 1. Raises
    ValueError naming the argument for unsupported dtypes or devices and mismatched shapes.

    block_r / block_k / block_b / num_warps override the configured choice (powers of two; tuning and tests)."""
    _check_csr(x, crow, col, values, n_rows)
    _blocks("csr_product", block_r=block_r, block_k=block_k, block_b=block_b, num_warps=num_warps)
    B, n_in = x.shape
    nnz = col.numel()
    if B == 0 or n_rows == 0:
        return torch.zeros((B, n_rows), dtype=x.dtype, device=x.device)
    c_r, c_k, c_b, c_w = _config(B, n_rows, -(-nnz // n_rows), _sm_count(x.device))
    block_r, block_k, block_b = block_r or c_r, block_k or c_k, block_b or c_b
    num_warps = num_warps or c_w
    if block_b > 1:
        x = _batch_table(x, block_b)
    y = torch.empty((B, n_rows), dtype=x.dtype, device=x.device)
    wide = max(_span(x), _span(crow), _span(col), _span(values), nnz, y.numel()) > _I32_MAX - _MARGIN
    n_b = triton.cdiv(B, block_b)
    grid = triton.cdiv(n_rows, block_r) * n_b
    if grid > _GRID_MAX:
        _fail("csr_product", f"{grid} programs exceed a CUDA grid ({_GRID_MAX}); pass larger blocks")
    dt = FLOAT_CODES[x.dtype]
    with on_device(x.device):
        _csr_kernel[(grid,)](_bits(x, dt), crow, col, _bits(values, dt), _bits(y, dt), B, n_in, n_rows, nnz,
                             x.stride(0), x.stride(1), crow.stride(0), col.stride(0), values.stride(0), y.stride(0),
                             y.stride(1), n_b, DT=dt, WIDE=wide, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_B=block_b,
                             num_warps=num_warps)
    return y


def _sampled_config(B: int, nnz: int, n_sm: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_B, num_warps): tiles of about 4096 fp32 accumulators (32 per thread of 4 warps), 1024 at
    batch 1; pair blocks halved (down to 16) until there are >= 2 programs per SM (n_sm = 1 under the
    interpreter). Results depend on these only through the summation order."""
    block_b = min(64, _pow2(B))
    block_p = 1024 if block_b == 1 else min(256, max(16, 4096 // block_b))
    while block_p > 16 and triton.cdiv(nnz, block_p) < 2 * n_sm:
        block_p //= 2
    size = block_p * block_b
    return block_p, block_b, 4 if size >= 1024 else (2 if size >= 256 else 1)


def sampled_dot(x: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *,
                block_p: Optional[int] = None, block_b: Optional[int] = None,
                num_warps: Optional[int] = None) -> torch.Tensor:
    """(B, n_in) x, (B, n_out) g and (nnz) rows, cols -> (nnz) fp32: out[p] = sum_b g[b, rows[p]] * x[b, cols[p]]
    (module doc). All inputs may be strided; for B > 1 x and g are copied once to padded (n, B) tables. Raises
    ValueError naming the argument for unsupported dtypes or devices and mismatched shapes.

    block_p / block_b / num_warps override `_sampled_config`'s choice (powers of two; tuning and tests)."""
    _check_sampled(x, g, rows, cols)
    _blocks("sampled_dot", block_p=block_p, block_b=block_b, num_warps=num_warps)
    B, n_in = x.shape
    n_out = g.shape[1]
    nnz = rows.numel()
    if B == 0 or nnz == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=x.device)
    c_p, c_b, c_w = _sampled_config(B, nnz, _sm_count(x.device))
    block_p, block_b, num_warps = block_p or c_p, block_b or c_b, num_warps or c_w
    if block_b > 1:  # at block 1 (batch 1) x and g are read in place
        x, g = _batch_table(x, block_b), _batch_table(g, block_b)
    out = torch.empty(nnz, dtype=torch.float32, device=x.device)
    wide = max(_span(x), _span(g), _span(rows), _span(cols), nnz) > _I32_MAX - _MARGIN
    grid = triton.cdiv(nnz, block_p)
    if grid > _GRID_MAX:
        _fail("sampled_dot", f"{grid} programs exceed a CUDA grid ({_GRID_MAX}); pass a larger block_p")
    dt = FLOAT_CODES[x.dtype]
    nb = triton.cdiv(B, block_b) * block_b  # whole batch blocks: the padded tables (or B itself, at block 1)
    with on_device(x.device):
        _sampled_dot_kernel[(grid,)](_bits(x, dt), _bits(g, dt), rows, cols, out, nnz, nb, n_in, n_out, x.stride(0),
                                     x.stride(1), g.stride(0), g.stride(1), rows.stride(0), cols.stride(0), DT=dt,
                                     WIDE=wide, BLOCK_P=block_p, BLOCK_B=block_b, num_warps=num_warps)
    return out


__all__ = ["csr_product", "sampled_dot", "supports", "supports_csr_product", "supports_sampled_dot"]
