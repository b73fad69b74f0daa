"""Host-side helpers shared by the kernels: dtype codes, launch tables, contiguity handling.

Multi-tensor launches pass tables of raw addresses (int64 `data_ptr()`s) that kernels cast with
`tl.pointer_type`, so one launch covers any number of layers. Tables are built on the host from sizes and
addresses only (never from tensor values), then copied to the device without a host synchronisation.
"""
from __future__ import annotations

import threading
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

# Codes the kernels branch on to read a float tensor and upcast it to fp32.
DT_F32, DT_F16, DT_BF16 = 0, 1, 2
FLOAT_CODES = {torch.float32: DT_F32, torch.float16: DT_F16, torch.bfloat16: DT_BF16}


def float_code(t: torch.Tensor) -> int:
    return FLOAT_CODES[t.dtype]


MAX_DIMS = 5  # Conv3d weights are 5-D; more dims after collapsing fall back to a contiguous copy


def collapse(shape, strides):
    """Merge adjacent dims that are contiguous with each other and drop size-1 dims."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    out = []
    for n, s in dims:
        if out and out[-1][1] == s * n:
            out[-1] = (out[-1][0] * n, s)
        else:
            out.append((n, s))
    return out or [(1, 1)]


def strided_layout(t: torch.Tensor) -> Optional[List[int]]:
    """What a kernel needs to find the element of flat row-major index i in `t`'s storage
    (`elementwise._storage_offsets`): the sizes of dims 1..4 and the strides of dims 0..4, after merging dims
    that are contiguous with each other and padding to MAX_DIMS dims. None if more than MAX_DIMS dims remain."""
    dims = collapse(t.shape, t.stride())
    if len(dims) > MAX_DIMS:
        return None
    dims = [(1, 0)] * (MAX_DIMS - len(dims)) + dims
    return [n for n, _ in dims[1:]] + [s for _, s in dims]


def addressable(t: torch.Tensor, contig: Optional["Contig"] = None) -> Tuple[torch.Tensor, List[int]]:
    """`t` and its `strided_layout`, or, for a layout of more than MAX_DIMS dims, a contiguous stand-in: from
    `contig` (copied back by its write_back) for a tensor the kernel writes, a plain copy for one it only reads."""
    layout = strided_layout(t)
    if layout is None:
        t = t.contiguous() if contig is None else contig.get(t)
        layout = strided_layout(t)
    return t, layout


_LAUNCH = threading.local()
# Triton's interpreter swaps parts of triton.language and its own grid position in and out around every
# launch, process-wide, so two threads running kernels at once break each other (ranks simulated by threads
# in the tests do). CPU launches (interpreter only) take turns; CUDA launches need no lock.
_INTERPRETER = threading.RLock()


class on_device:
    """`with on_device(device):` around every kernel launch. Triton launches on the *current* CUDA device and
    its current stream, wherever the pointers it is given live; a model on cuda:1 while the current device is
    0 would get its kernels launched on device 0. This makes `device` current (for CPU tensors under the
    interpreter: holds the interpreter's lock instead) and records it, so tests can check that each launch
    ran under the right guard."""

    __slots__ = ("device", "_cuda", "_prev")

    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = torch.cuda.device(device) if device.type == "cuda" else None

    def _switch(self):
        return _INTERPRETER if self._cuda is None else self._cuda

    def __enter__(self):
        self._switch().__enter__()
        self._prev = getattr(_LAUNCH, "device", None)
        _LAUNCH.device = self.device
        return self

    def __exit__(self, *exc):
        _LAUNCH.device = self._prev
        self._switch().__exit__(*exc)
        return False


def launch_device() -> Optional[torch.device]:
    """The device of the innermost `on_device` guard active in this thread (None outside any)."""
    return getattr(_LAUNCH, "device", None)


def one_device(tensors: Iterable[Optional[torch.Tensor]], what: str) -> torch.device:
    """The device all `tensors` (Nones skipped) live on: a kernel launch covers one device. Raises a clear
    ValueError for tensors on several devices instead of handing a kernel foreign pointers."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"rigl_fast (triton): {what} must all be on one device, got {device} and {t.device}")
    if device is None:
        raise ValueError(f"rigl_fast (triton): no tensors in {what}")
    return device


def to_device(rows, dtype, device) -> torch.Tensor:
    """A small host-built table on `device`. On CUDA it goes through pinned memory with non_blocking=True:
    a pageable copy would make torch synchronise the stream, i.e. wait for all queued kernels."""
    t = torch.tensor(rows, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def program_table(numels: Sequence[int], chunk: int) -> Tuple[List[int], List[int], List[int]]:
    """Split each of `numels` into chunks of `chunk` elements; one program per chunk.

    Returns (owner, start, first) where owner[p] / start[p] are the item and element offset of program p
    and first[i] is the first program of item i (so per-program results can be scanned per item)."""
    owner, start, first = [], [], []
    for i, n in enumerate(numels):
        first.append(len(owner))
        n_prog = max(1, -(-n // chunk))
        owner.extend([i] * n_prog)
        start.extend(range(0, n_prog * chunk, chunk))
    return owner, start, first


class Contig:
    """Contiguous stand-ins for tensors the kernels address by flat row-major index.

    A non-contiguous tensor (channels_last weights, transposed gradients from torch.compile) is copied to a
    contiguous temporary; `write_back()` copies the results into the original after the kernels ran."""

    def __init__(self):
        self._pairs = []

    def get(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            return t
        c = t.contiguous()
        self._pairs.append((t, c))
        return c

    def write_back(self) -> None:
        for orig, c in self._pairs:
            orig.copy_(c)
        self._pairs = []
