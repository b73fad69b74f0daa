"""Clocks, copy bandwidth, peak memory and the byte floors."""
from __future__ import annotations

import ctypes
import re
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (repeats, periods, ranks; 0 would time nothing)."""
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def stats(xs: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


class Clock:
    """Seconds taken by fn(): perf_counter on CPU, CUDA events on a GPU (the host may run ahead)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn: Callable[[], object]) -> float:
        """One call, for work that changes state (an update: restored by the caller between calls)."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def repeatable(self, fn: Callable[[], object]) -> float:
        """Idempotent work (a gradient hook, an after-step pass): do_bench's median on a GPU, one call on CPU
        (each call there is long enough for perf_counter, and the repeats are interleaved by the caller)."""
        if self.cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") / 1e3
        return self.once(fn)


def minor_faults() -> int:
    """The process's minor page faults so far (all threads; 0 where getrusage is missing). A large gradient that
    the allocator hands out as fresh pages faults every page in on first touch, and that cost lands in whatever
    op touches it first."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError, AttributeError):
        return 0


class CopyBandwidth:
    """Bytes/s of a large copy_ (bytes read + bytes written); `sample()` is called among the contenders'
    repeats, so the floor sees the same machine state as the times it is compared with."""

    def __init__(self, device: torch.device, nbytes: int):
        self.clock = Clock(device)
        self.src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # first touch of dst's pages is not bandwidth

    def sample(self) -> float:
        return 2 * self.src.numel() * 4 / self.clock.once(lambda: self.dst.copy_(self.src))


class PeakMemory:
    """Extra bytes allocated at the peak inside the block.

    CUDA: max_memory_allocated above what was allocated on entry. CPU: the process's resident-set high-water
    mark (VmHWM), reset on entry by writing 5 to /proc/self/clear_refs, above the resident set on entry; the
    CPU allocator returns large blocks to the OS on free, so this tracks tensor allocations. `bytes` is None
    where neither works.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.bytes: Optional[int] = None

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024

    def __enter__(self):
        self.base = None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            # glibc keeps freed blocks resident for reuse; hand them back first, so that an allocation that
            # reuses them faults its pages in again and shows up in the high-water mark
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS")
        except (OSError, AttributeError):
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.base is None:
            return False
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = max(0, self._status("VmHWM") - self.base)
        return False


# ------------------------------------------------------------------------------------------------ floors
# The least traffic each operation must cause, in bytes, for the sparse layers' n weights of b bytes (masks are
# one byte per weight). Dividing by the copy bandwidth gives the floor time.
def step_floor_bytes(n: int, b: int) -> Dict[str, int]:
    """Gradient op: read the dense grad and the mask, write the masked grad. After-step (rigl-torch's work,
    and rigl_fast's with after_step='always'): read and write the weight and the momentum, read the mask."""
    return {"grad_op": n * (2 * b + 1), "after_step": n * (4 * b + 1)}


def update_floor_bytes(n: int, b: int) -> int:
    """One pass that reads |w|, the dense grad and the old mask and writes the new mask. A lower bound: a
    selection needs at least two passes over its scores, and zeroing dropped/grown entries, the momentum and
    the grad adds writes (few, scattered) on top."""
    return n * (2 * b + 2)
