"""The C++ backend: the ops in `csrc/` (torch.library ops `torch.ops.rigl_fast.*`), CPU tensors.

Two extensions, each built on its first use: "core" (the training ops) and "export" (the sparse products of exported
models and of compute="sparse"; apart, so that the core build does not wait for them). Loading one, first match wins:
1. a prebuilt `rigl_fast._C` holding both (``RIGL_FAST_BUILD_CPP=1 pip install .``, docs/cpp.md), if its key matches;
2. a JIT build with torch.utils.cpp_extension.load + ninja, cached in a folder named after a hash of the sources'
   contents, the flags, and the torch and Python builds (`build_dir`, under `build_root`): checkouts of the same
   sources share one build, other sources never load it; the sources are copied there and built (progress on stderr).
If neither works, `CppBackend()` raises `BackendUnavailable` (one line), so `auto` falls back and `'cpp'` raises.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, Optional, Sequence, TextIO

import torch

from . import _cpp_fakes
from .ops import Backend, BackendUnavailable

_LOCK = threading.Lock()
_STATE: Dict[str, dict] = {}
# The translation units of each extension (every csrc/*.cpp is in one; setup.py's prebuilt module takes them all);
# the headers (csrc/*.h) go with both. Split so that ninja compiles them in parallel; *_base/*_avx2 are one set of
# kernels compiled for two instruction sets.
PARTS = {"core": ("rigl_ops.cpp", "update_base.cpp", "update_avx2.cpp", "shard_base.cpp", "shard_avx2.cpp"),
         "export": ("export_kernels.cpp", "product_base.cpp", "product_avx2.cpp")}
_WHAT = {"core": "the C++ ops", "export": "the C++ export kernels"}
_PROBE = {"core": "update", "export": "fan_in_linear"}  # an op that each extension registers
# The C++ standard the sources need (<bit>: std::bit_width, std::countr_zero, std::endian), set explicitly:
# older torch releases pass -std=c++17 themselves. setup.py's prebuilt extension uses the same flags.
# -std last, so it overrides whatever standard torch puts before it.
CFLAGS = ("-O3", "-fopenmp", "-std=c++20")
LDFLAGS = ("-fopenmp",)  # at::parallel_for is inline in the headers and runs serially without OpenMP
_LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"


def source_dir() -> str:
    """The folder holding csrc's sources: rigl_fast/csrc in an installed package, csrc beside it in a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if glob.glob(os.path.join(d, "*.cpp")):
            return d
    raise BackendUnavailable("the csrc/*.cpp sources are not installed with rigl_fast")


def _inputs(part: str, src_dir: str):
    """The files an extension is built from: its units, then every header, by name."""
    missing = [f for f in PARTS[part] if not os.path.isfile(os.path.join(src_dir, f))]
    if missing:
        raise BackendUnavailable(f"the C++ sources {missing} are missing from {src_dir}")
    return [os.path.join(src_dir, f) for f in PARTS[part]] + sorted(glob.glob(os.path.join(src_dir, "*.h")))


def build_key(part: str = "core", src_dir: Optional[str] = None) -> str:
    """A hash of what the build depends on: the files' names and contents (not their paths), our flags, the
    compiler's name, and the torch and Python builds it links against."""
    h = hashlib.sha256()
    for path in _inputs(part, src_dir or source_dir()):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    for word in (part, *CFLAGS, "|", *LDFLAGS, os.environ.get("CXX", "c++"), torch.__version__, str(abi),
                 str(torch.version.cuda), str(torch.version.hip), sys.version, sys.platform, platform.machine()):
        h.update(word.encode() + b"\0")
    return h.hexdigest()[:16]


PREBUILT_KEY_FILE = "_C.key"  # beside a prebuilt rigl_fast._C (setup.py): the build keys of the sources it holds


def prebuilt_key(src_dir: Optional[str] = None) -> str:
    """The key setup.py writes beside a prebuilt rigl_fast._C: build_key() of every part of these sources."""
    return " ".join(build_key(part, src_dir) for part in sorted(PARTS))


def prebuilt_is_current(key_path: Optional[str] = None) -> bool:
    """Whether the prebuilt rigl_fast._C was built from the sources installed now (a checkout edited after
    `RIGL_FAST_BUILD_CPP=1 pip install -e .` must not load the old build)."""
    path = key_path or os.path.join(os.path.dirname(os.path.abspath(__file__)), PREBUILT_KEY_FILE)
    try:
        with open(path) as f:
            return f.read().strip() == prebuilt_key()
    except (OSError, BackendUnavailable):
        return False


def build_root() -> str:
    """Where the JIT builds are cached: torch's rule, written out so it is the same on every torch version
    ($TORCH_EXTENSIONS_DIR, else <torch's default root>/py<major><minor>_<cpu|cuXXX|rocmXXX>)."""
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
    return root


def build_dir(part: str = "core", src_dir: Optional[str] = None) -> str:
    """The folder one build of `part` from these sources is cached in: rigl_fast_<part>_<build_key>."""
    return os.path.join(build_root(), f"rigl_fast_{part}_{build_key(part, src_dir)}")


def _stage(inputs: Sequence[str], dest: str):
    """Copies the inputs into dest (each written to a temporary name and renamed, so a concurrent build never reads
    half a file); returns the copies' paths. Files already there are left alone: the folder's name is their hash."""
    os.makedirs(dest, exist_ok=True)
    out = []
    for path in inputs:
        target = os.path.join(dest, os.path.basename(path))
        if not os.path.exists(target):
            fd, tmp = tempfile.mkstemp(dir=dest, suffix=".part")
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        out.append(target)
    return out


def _stamp(out_dir: str, unit: str) -> Optional[float]:
    """When the object file of `unit` was last written, None if there is none."""
    try:
        return os.path.getmtime(os.path.join(out_dir, os.path.splitext(unit)[0] + ".o"))
    except OSError:
        return None


def _progress(out_dir: str, units: Sequence[str], before: dict, err: TextIO, clock: Callable[[], float], t0: float,
              stop: threading.Event, poll_s: float, quiet_s: float) -> None:
    """Says which units have compiled (their .o appeared, or changed since `before`) while `stop` is not set, and
    that the build is still running after quiet_s without one; a last look after `stop`, so that none is missed."""
    stamp = functools.partial(_stamp, out_dir)
    done, last = [], clock()
    while True:
        stopping = stop.wait(poll_s)
        for u in units:
            if u not in done and stamp(u) not in (None, before[u]):
                done.append(u)
                last = clock()
                print(f"rigl_fast:   [{len(done)}/{len(units)}] compiled {u} ({last - t0:.0f} s)", file=err, flush=True)
        if stopping:
            return
        if clock() - last >= quiet_s:
            last = clock()
            print(f"rigl_fast:   still compiling ({last - t0:.0f} s, {len(done)}/{len(units)} units done)", file=err,
                  flush=True)


def build_with_messages(build: Callable[[], object], out_dir: str, units: Sequence[str], what: str = "the C++ ops",
                        err: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic,
                        poll_s: float = 0.5, quiet_s: float = 15.0) -> None:
    """Runs `build`, a compile of `units` into out_dir, saying so on stderr: a line before, one per compiled unit
    as it finishes (or, after quiet_s without one, that it is still running), and one with the time taken after."""
    err = sys.stderr if err is None else err
    print(f"rigl_fast: building {what} (once for these sources, {len(units)} units; cached in {out_dir})...",
          file=err, flush=True)
    t0, stop = clock(), threading.Event()
    before = {u: _stamp(out_dir, u) for u in units}
    watcher = threading.Thread(target=_progress, args=(out_dir, units, before, err, clock, t0, stop, poll_s, quiet_s),
                               daemon=True)
    watcher.start()
    try:
        build()
    except Exception:
        stop.set()
        watcher.join()
        print(f"rigl_fast: building {what} failed after {clock() - t0:.0f} s", file=err, flush=True)
        raise
    stop.set()
    watcher.join()
    print(f"rigl_fast: {what} built in {clock() - t0:.0f} s", file=err, flush=True)


def _jit_build(part: str) -> None:
    """Loads `part` from its cached build, building it first if there is none."""
    from torch.utils import cpp_extension

    src_dir = source_dir()
    out_dir = build_dir(part, src_dir)
    name = os.path.basename(out_dir)
    lib, done = os.path.join(out_dir, name + _LIB_EXT), os.path.join(out_dir, "built")
    if os.path.exists(done) and os.path.exists(lib):  # a finished build: load it, no compiler or ninja involved
        torch.ops.load_library(lib)
        return
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BackendUnavailable(f"no C++ compiler ({cxx!r} not found on PATH); install one (e.g. g++) or "
                                 "prebuild with RIGL_FAST_BUILD_CPP=1 pip install .")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("ninja is not installed (pip install ninja); it is needed to build the C++ ops")
    staged = _stage(_inputs(part, src_dir), os.path.join(out_dir, "src"))
    units = staged[:len(PARTS[part])]

    def build():
        # copies: torch appends its own flags to the lists it is given
        cpp_extension.load(name=name, sources=units, extra_include_paths=[os.path.dirname(units[0])],
                           extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=out_dir,
                           is_python_module=False, verbose=os.environ.get("RIGL_FAST_VERBOSE_BUILD") == "1")
    try:
        build_with_messages(build, out_dir, PARTS[part], _WHAT[part])
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError with long logs
        lines = str(e).strip().splitlines() or [e.__class__.__name__]
        first = next((ln.strip() for ln in lines if "error" in ln.lower() and ":" in ln), lines[0])
        raise BackendUnavailable(f"building {_WHAT[part]} failed ({first}); set RIGL_FAST_VERBOSE_BUILD=1 "
                                 "for the compiler output") from e
    with open(done, "w") as f:
        f.write("built\n")


def _registered(part: str) -> bool:
    return hasattr(torch.ops, "rigl_fast") and hasattr(torch.ops.rigl_fast, _PROBE[part])


def load_library(part: str = "core") -> str:
    """Make sure the ops of `part` ("core": the training ops; "export": the exported models' products) are
    registered; returns how ('prebuilt', 'jit' or 'already loaded')."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    with _LOCK:
        state = _STATE.setdefault(part, {})
        if "how" in state:
            return state["how"]
        if "error" in state:
            raise BackendUnavailable(state["error"])
        try:
            if _registered(part):
                how = "already loaded"
            else:
                how = None
                if prebuilt_is_current():
                    try:
                        importlib.import_module("rigl_fast._C")
                        how = "prebuilt"
                    except ImportError:
                        pass
                elif part == "core" and importlib.util.find_spec("rigl_fast._C") is not None:
                    print(f"rigl_fast: rigl_fast._C was built from other sources ({PREBUILT_KEY_FILE}); building these",
                          file=sys.stderr)
                if not _registered(part):  # no prebuilt module, or one built before these ops existed
                    try:
                        _jit_build(part)
                    except OSError as e:  # an unwritable cache folder, a cached library that does not load
                        raise BackendUnavailable(f"{_WHAT[part]}: {e} (under {build_root()}; set "
                                                 "TORCH_EXTENSIONS_DIR to another folder)") from e
                    how = "jit"
            if not _registered(part):
                raise BackendUnavailable(f"{_WHAT[part]} loaded but did not register torch.ops.rigl_fast."
                                         f"{_PROBE[part]}")
            _cpp_fakes.register(part)
        except BackendUnavailable as e:
            state["error"] = str(e)
            raise
        state["how"] = how
        return how


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
