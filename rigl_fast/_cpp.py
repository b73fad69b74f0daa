"""The C++ backend: the ops in `csrc/` (torch.library ops `torch.ops.rigl_fast.*`), CPU tensors.

Loading, first match wins:
1. a prebuilt `rigl_fast._C` (``RIGL_FAST_BUILD_CPP=1 pip install .``, see docs/cpp.md);
2. a JIT build of csrc/*.cpp with torch.utils.cpp_extension.load + ninja, cached by torch (default
   ~/.cache/torch_extensions/py<ver>_<cpu|cuXXX>, or $TORCH_EXTENSIONS_DIR); rebuilt only when the sources or
   flags change. A build that runs (the first use, or after the sources changed) says so on stderr: one line
   when it starts, one with the time taken when it ends.
If neither works, `CppBackend()` raises `BackendUnavailable` with a one-line reason, so `auto` falls back
and an explicit `backend='cpp'` raises.
"""
from __future__ import annotations

import glob
import importlib
import os
import shutil
import sys
import threading
import time
from typing import Callable, Optional, Sequence, TextIO

import torch

from .ops import Backend, BackendUnavailable

_LOCK = threading.Lock()
_STATE: dict = {}
EXT_NAME = "rigl_fast_cpp"
# The C++ standard the sources need (<bit>: std::bit_width, std::countr_zero, std::endian), set explicitly:
# older torch releases pass -std=c++17 themselves. setup.py's prebuilt extension uses the same flags.
# -std last, so it overrides whatever standard torch puts before it.
CFLAGS = ("-O3", "-fopenmp", "-std=c++20")
LDFLAGS = ("-fopenmp",)  # at::parallel_for is inline in the headers and runs serially without OpenMP


def _sources():
    here = os.path.dirname(os.path.abspath(__file__))
    # an installed package holds csrc as rigl_fast/csrc; an editable checkout has it beside the package
    for d in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        srcs = sorted(glob.glob(os.path.join(d, "*.cpp")))
        if srcs:
            return d, srcs
    raise BackendUnavailable("the csrc/*.cpp sources are not installed with rigl_fast")


def _registered() -> bool:
    return hasattr(torch.ops, "rigl_fast") and hasattr(torch.ops.rigl_fast, "update")


def build_dir() -> str:
    """The folder the JIT build is cached in: torch's rule, written out so it is the same on every torch
    version and can be named in the build message ($TORCH_EXTENSIONS_DIR/<name>, else
    <torch's default root>/py<major><minor>_<cpu|cuXXX|rocmXXX>/<name>)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accel = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accel = "cu" + torch.version.cuda.replace(".", "")
        else:
            accel = "cpu"
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(cpp_extension.get_default_build_root(), f"{py}_{accel}")
    return os.path.join(root, EXT_NAME)


def cached_build_is_current(out_dir: str, inputs: Sequence[str], words: Sequence[str]) -> bool:
    """Whether loading from `out_dir` will find a finished build it can use without compiling: the library
    exists, is newer than every input (sources and headers), and the build file the last build wrote mentions
    every one of `words` (our flags, the source paths, torch's include folder), so flags, sources and torch
    are the same. A cheap guess that errs towards "not current"; a rebuild it misses is still reported, by
    time (`build_with_messages`)."""
    lib = os.path.join(out_dir, EXT_NAME + (".pyd" if sys.platform == "win32" else ".so"))
    ninja = os.path.join(out_dir, "build.ninja")
    try:
        built = os.path.getmtime(lib)
        if any(os.path.getmtime(p) > built for p in inputs):
            return False
        with open(ninja) as f:
            text = f.read()
    except OSError:
        return False
    return all(w in text for w in words)


def build_with_messages(build: Callable[[], object], out_dir: str, inputs: Sequence[str], words: Sequence[str],
                        err: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic,
                        slow_s: float = 10.0) -> None:
    """Runs `build` (which loads from the cache when it can), saying on stderr when it compiles: a line
    before, when the cache is not current, and one with the time taken after. Silent on a cache hit; a load
    that was expected to hit but took `slow_s` or more (a rebuild the guess missed) is reported after."""
    err = sys.stderr if err is None else err
    expect_build = not cached_build_is_current(out_dir, inputs, words)
    if expect_build:
        print(f"rigl_fast: building the C++ ops (first use only, about a minute; cached in {out_dir})...",
              file=err, flush=True)
    t0 = clock()
    try:
        build()
    except Exception:
        if expect_build:
            print(f"rigl_fast: building the C++ ops failed after {clock() - t0:.0f} s", file=err, flush=True)
        raise
    took = clock() - t0
    if expect_build:
        print(f"rigl_fast: C++ ops built in {took:.0f} s", file=err, flush=True)
    elif took >= slow_s:
        print(f"rigl_fast: C++ ops rebuilt in {took:.0f} s (the cached build in {out_dir} was out of date)",
              file=err, flush=True)


def _jit_build():
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BackendUnavailable(f"no C++ compiler ({cxx!r} not found on PATH); install one (e.g. g++) or "
                                 "prebuild with RIGL_FAST_BUILD_CPP=1 pip install .")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("ninja is not installed (pip install ninja); it is needed to build the C++ ops")
    src_dir, srcs = _sources()
    out_dir = build_dir()
    os.makedirs(out_dir, exist_ok=True)
    inputs = srcs + sorted(glob.glob(os.path.join(src_dir, "*.h")))
    # torch ends build.ninja's cflags line with our flags: the whole tail must match, since torch's own
    # flags may contain some of ours
    words = [" ".join(CFLAGS) + "\n", " ".join(LDFLAGS) + " ", *srcs, *cpp_extension.include_paths()[:1]]

    def build():
        # copies: torch appends its own flags to the lists it is given
        cpp_extension.load(name=EXT_NAME, sources=srcs, extra_include_paths=[src_dir], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), build_directory=out_dir, is_python_module=False,
                           verbose=os.environ.get("RIGL_FAST_VERBOSE_BUILD") == "1")
    try:
        build_with_messages(build, out_dir, inputs, words)
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError with long logs
        lines = str(e).strip().splitlines() or [e.__class__.__name__]
        first = next((ln.strip() for ln in lines if "error" in ln.lower() and ":" in ln), lines[0])
        raise BackendUnavailable(f"building the C++ ops failed ({first}); set RIGL_FAST_VERBOSE_BUILD=1 "
                                 "for the compiler output") from e


def load_library() -> str:
    """Make sure the ops are registered; returns how ('prebuilt', 'jit' or 'already loaded')."""
    with _LOCK:
        if "how" in _STATE:
            return _STATE["how"]
        if "error" in _STATE:
            raise BackendUnavailable(_STATE["error"])
        try:
            if _registered():
                how = "already loaded"
            else:
                try:
                    importlib.import_module("rigl_fast._C")
                    how = "prebuilt"
                except ImportError:
                    _jit_build()
                    how = "jit"
            if not _registered():
                raise BackendUnavailable("the C++ extension loaded but did not register torch.ops.rigl_fast")
            _register_fakes()
        except BackendUnavailable as e:
            _STATE["error"] = str(e)
            raise
        _STATE["how"] = how
        return how


def _register_fakes():
    """Fake (meta) implementations: shapes only, so torch.compile and opcheck can trace the ops."""

    @torch.library.register_fake("rigl_fast::mask_grad")
    def _mask_grad(grad, mask, acc, n):
        return grad.new_empty(grad.shape)

    @torch.library.register_fake("rigl_fast::apply_masks")
    def _apply_masks(tensors, masks):
        return None

    @torch.library.register_fake("rigl_fast::any_nonfinite")
    def _any_nonfinite(tensors):
        return torch.empty((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")

    @torch.library.register_fake("rigl_fast::update")
    def _update(weights, masks, scores, n_keep, n_grow, states, state_layer, grads, grad_layer, check_finite=False):
        return torch.empty((), dtype=torch.bool, device=weights[0].device if weights else "cpu")

    @torch.library.register_fake("rigl_fast::key_histograms")
    def _key_histograms(values, flags, flag_value, prefixes, shift, bits):
        return torch.empty((len(values), 1 << bits), dtype=torch.int64, device=values[0].device if values else "cpu")

    @torch.library.register_fake("rigl_fast::take_top")
    def _take_top(values, flags, flag_value, thresholds, n_ties):
        return [v.new_empty((v.numel(),), dtype=torch.bool) for v in values]

    @torch.library.register_fake("rigl_fast::commit")
    def _commit(weights, masks, keep, grow, states, state_layer, grads, grad_layer):
        return None

    @torch.library.register_fake("rigl_fast::split_grad")
    def _split_grad(grad, mask, off):
        return None

    @torch.library.register_fake("rigl_fast::fold_grad")
    def _fold_grad(acc, grad, off, n):
        return None

    @torch.library.register_fake("rigl_fast::structured_update")
    def _structured_update(weights, masks, scores, n_keep, units, states, state_layer, grads, grad_layer,
                           check_finite=False):
        return torch.empty((), dtype=torch.bool, device=weights[0].device if weights else "cpu")

    @torch.library.register_fake("rigl_fast::unit_grow")
    def _unit_grow(scores, keep, units):
        return [s.new_empty((s.numel(),), dtype=torch.bool) for s in scores]

    if hasattr(torch.ops.rigl_fast, "fan_in_linear"):  # csrc/export_kernels.cpp
        @torch.library.register_fake("rigl_fast::fan_in_linear")
        def _fan_in_linear(x, values, indices):
            return x.new_empty((x.shape[0], values.shape[0]))

    if hasattr(torch.ops.rigl_fast, "csr_linear"):
        @torch.library.register_fake("rigl_fast::csr_linear")
        def _csr_linear(x, crow, col, values, out_features):
            return x.new_empty((x.shape[0], out_features))


class CppBackend(Backend):
    name = "cpp"

    def __init__(self):
        self.how = load_library()
        ops = torch.ops.rigl_fast
        # OpOverloads, not the packets: skips overload resolution on the per-layer hook path
        self._mask_grad = ops.mask_grad.default
        self._apply_masks = ops.apply_masks.default
        self._any_nonfinite = ops.any_nonfinite.default
        self._update = ops.update.default
        self._key_histograms = ops.key_histograms.default
        self._take_top = ops.take_top.default
        self._commit = ops.commit.default
        self._split_grad = ops.split_grad.default
        self._fold_grad = ops.fold_grad.default
        self._structured_update = ops.structured_update.default
        self._unit_grow = ops.unit_grow.default

    def supports(self, device):
        device = torch.device(device)
        if device.type != "cpu":
            return f"the C++ ops are built for CPU tensors only, got {device}"
        return None

    def mask_grad(self, grad, mask, acc, n):
        return self._mask_grad(grad, mask, acc, int(n))

    def apply_masks(self, tensors, masks):
        if len(tensors):
            self._apply_masks(list(tensors), list(masks))

    def any_nonfinite(self, tensors):
        if not len(tensors):
            return False
        return bool(self._any_nonfinite(list(tensors)))

    def update(self, weights, masks, scores, n_keep, n_grow, states, grads):
        _run_update(self._update, weights, masks, scores, n_keep, [int(k) for k in n_grow], states, grads, False)

    def checked_update(self, weights, masks, scores, n_keep, n_grow, states, grads):
        # the finiteness check rides on the selection's read of weights and scores: one pass fewer
        return _run_update(self._update, weights, masks, scores, n_keep, [int(k) for k in n_grow], states, grads,
                           True)

    # structured layers: keep is the update's own kernel; each unit's grow is selected in C++ (csrc/unit_kernels.h)
    def structured_update(self, weights, masks, scores, n_keep, units, states, grads):
        _run_update(self._structured_update, weights, masks, scores, n_keep, _flat_units(units), states, grads,
                    False)

    def checked_structured_update(self, weights, masks, scores, n_keep, units, states, grads):
        return _run_update(self._structured_update, weights, masks, scores, n_keep, _flat_units(units), states,
                           grads, True)

    def unit_grow(self, scores, keep, units):
        if not len(scores):
            return []
        return list(self._unit_grow(list(scores), list(keep), _flat_units(units)))

    # the sharded (FSDP2) update: every dtype the kernels take (fp32/fp64/fp16/bf16) runs in C++
    # (an op with no tensor argument cannot be dispatched: empty lists are answered here)
    def key_histograms(self, values, flags, flag_value, prefixes, shift, bits):
        if not len(values):
            return torch.zeros((0, 1 << bits), dtype=torch.int64)
        return self._key_histograms(list(values), list(flags), bool(flag_value), [int(p) for p in prefixes],
                                    int(shift), int(bits))

    def take_top(self, values, flags, flag_value, thresholds, n_ties):
        if not len(values):
            return []
        return list(self._take_top(list(values), list(flags), bool(flag_value), [int(t) for t in thresholds],
                                   [int(k) for k in n_ties]))

    def commit(self, weights, masks, keep, grow, states, grads):
        if len(weights):
            self._commit(list(weights), list(masks), list(keep), list(grow), *_flat_layers(states, grads))

    def split_grad(self, grad, mask, off):
        self._split_grad(grad, mask, off)

    def fold_grad(self, acc, grad, off, n):
        self._fold_grad(acc, grad, off, int(n))


def _run_update(op, weights, masks, scores, n_keep, counts, states, grads, check_finite):
    """`op` (the update or the structured update) on every layer; `counts` is its int list after n_keep (n_grow,
    or the units). True unless the finiteness check stopped it."""
    if not len(weights):
        return True
    return bool(op(list(weights), list(masks), list(scores), [int(k) for k in n_keep], counts,
                   *_flat_layers(states, grads), check_finite))


def _flat_units(units):
    """ops.Units of every layer as the ops take them: 5 ints a layer (out, fan_in, transposed, group, target)."""
    return [int(x) for u in units for x in u]


def _flat_layers(states, grads):
    """Per-layer states and optional grads as the ops take them: (states, the layer of each, grads, the layer of
    each), flat lists, layers without a grad left out."""
    flat_states, state_layer, flat_grads, grad_layer = [], [], [], []
    for i, st in enumerate(states):
        flat_states.extend(st)
        state_layer.extend([i] * len(st))
    for i, g in enumerate(grads):
        if g is not None:
            flat_grads.append(g)
            grad_layer.append(i)
    return flat_states, state_layer, flat_grads, grad_layer
