"""The op contract every backend meets, and backend selection.

The scheduler never does tensor math itself: it calls the four methods of a `Backend`. Each backend
(`reference.py`, the Triton kernels in `rigl_fast.kernels`, the C++ extension behind `_cpp.py`) implements
them with the exact semantics written here; `reference.py` is that semantics in plain PyTorch and the oracle
the tests compare every other backend against (masks bit-identical, weights/states/grads identical).

Shared conventions:
- A mask is a contiguous `torch.bool` tensor with its weight's shape; True = active.
- "Masking" is a select, never a multiply: off-mask entries become exactly +0.0, even where the input is
  NaN or inf.
- Scores are compared as real numbers (fp16/bf16 upcast to fp32, which preserves order exactly).
  Among equal scores the lower flat (row-major) index ranks first.
- Tensors other than masks may be non-contiguous (e.g. gradients produced by torch.compile).
"""
from __future__ import annotations

import importlib
import os
import re
import warnings
from typing import List, NamedTuple, Optional, Sequence

import torch

BACKENDS = ("auto", "reference", "triton", "cpp")
ENV_VAR = "RIGL_FAST_BACKEND"


class Units(NamedTuple):
    """The units of a structured layer (structure.py builds them). The weight is viewed as W2 of shape (out,
    fan_in): W2[o, f] is flat[o * fan_in + f], or flat[f * out + o] when `transposed` (transformers' Conv1D
    stores (in, out)). Each row is cut into fan_in // group units of `group` consecutive positions (fan_in:
    group = fan_in, one unit per row; N:M: group = M), and every unit holds exactly `target` active positions
    (fan_in: c; N:M: N). Unit r = o * (fan_in // group) + b covers W2[o, b * group:(b + 1) * group]."""
    out: int
    fan_in: int
    transposed: bool
    group: int
    target: int

    @property
    def n_units(self) -> int:
        return self.out * (self.fan_in // self.group)


def units_of(t: torch.Tensor, u: Units) -> torch.Tensor:
    """The (n_units, group) view of a layer-shaped tensor, unit by unit (a copy when transposed)."""
    if u.transposed:
        return t.reshape(u.fan_in, u.out).t().reshape(u.n_units, u.group)
    return t.reshape(u.n_units, u.group)


def from_units(x: torch.Tensor, u: Units) -> torch.Tensor:
    """The inverse of `units_of`: flat, in the layer's own order."""
    if u.transposed:
        return x.reshape(u.out, u.fan_in).t().reshape(-1)
    return x.reshape(-1)


class BackendUnavailable(RuntimeError):
    """Raised by a backend loader when the backend cannot run here (the message says why)."""


class Backend:
    """The op contract. Subclasses implement every method; this class documents them."""

    name = "abstract"

    def supports(self, device: torch.device) -> Optional[str]:
        """None if this backend can run on tensors of `device`, else a one-line reason why not."""
        raise NotImplementedError

    def max_numel(self) -> Optional[int]:
        """The largest layer (in elements) this backend handles, or None for no limit. The scheduler refuses
        larger sparse layers at construction, with a message naming the layer and the backend."""
        return None

    def mask_grad(self, grad: torch.Tensor, mask: torch.Tensor, acc: Optional[torch.Tensor],
                  n: int) -> torch.Tensor:
        """The gradient op, called from a weight's backward hook with the dense incoming gradient.

        Returns a new tensor equal to `where(mask, grad, 0)` (grad's dtype and shape; the hook returns it, so
        autograd accumulates the masked gradient). `grad` itself is not modified.
        If `acc` is not None (inside the accumulation window), also, in place and from the *dense* grad:
            acc += grad / n
        with torch's rounding: `grad / n` is computed in fp32 and rounded to grad's dtype, then added to `acc`
        (same dtype as grad, contiguous) in fp32 and rounded to acc's dtype. Bit-exact across backends.
        """
        raise NotImplementedError

    def apply_masks(self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        """The after-step op: in place, tensors[i] = where(masks[i], tensors[i], 0) for every i.

        One call covers every sparse weight and every optimizer state shaped like it (the same mask appears
        once per tensor it applies to). Backends should do it in as few launches as they can.
        """
        raise NotImplementedError

    def any_nonfinite(self, tensors: Sequence[torch.Tensor]) -> bool:
        """True if any element of any tensor is NaN or +-inf. The one host sync of an update."""
        raise NotImplementedError

    def any_nonzero(self, tensors: Sequence[torch.Tensor]) -> List[bool]:
        """Per tensor, whether any element is not zero (NaN and inf count as not zero): which layers' grow
        scores carry a gradient at all. One host sync for all tensors; a backend may override it."""
        if not len(tensors):
            return []
        return torch.stack([t.ne(0).any() for t in tensors]).tolist()

    def update(self, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
               scores: Sequence[torch.Tensor], n_keep: Sequence[int], n_grow: Sequence[int],
               states: Sequence[Sequence[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> None:
        """The topology update (SPEC section 4) of every sparse layer i, in place.

        Inputs are finite (the caller checked with `any_nonfinite`). With old = masks[i]:
          keep = the n_keep[i] positions of largest |weights[i]| among old-active positions
                 (requires n_keep[i] <= old.sum());
          grow = the n_grow[i] positions of largest |scores[i]| among positions not in keep
                 (requires n_keep[i] + n_grow[i] <= numel);
          ties -> lower flat index first, in both selections.
        Then:
          masks[i][...]     = keep | grow                      (count is exactly n_keep + n_grow)
          weights[i]        = where(new & old, weights[i], 0)  (dropped -> 0, newly grown -> 0,
                                                                dropped-and-regrown keeps its value)
          each states[i][j] = where(new & old, states[i][j], 0)
          grads[i]          = where(new, grads[i], 0)          (if grads[i] is not None)
        """
        raise NotImplementedError

    def checked_update(self, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                       scores: Sequence[torch.Tensor], n_keep: Sequence[int], n_grow: Sequence[int],
                       states: Sequence[Sequence[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> bool:
        """`update` unless any weight or score holds a NaN or +-inf: then nothing changes and it returns False.

        Returns True when the update was applied. This default checks with `any_nonfinite` first; a backend
        may fold the check into its update's own read of the weights and scores.
        """
        if self.any_nonfinite(list(weights) + list(scores)):
            return False
        self.update(weights, masks, scores, n_keep, n_grow, states, grads)
        return True


    # ------------------------------------------------------------------ structured layers (structure.py)
    def structured_update(self, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                          scores: Sequence[torch.Tensor], n_keep: Sequence[int], units: Sequence[Units],
                          states: Sequence[Sequence[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> None:
        """`update` for structured layers (SPEC section 8, fan_in and N:M). keep is `update`'s: the n_keep[i]
        largest |w| among old-active positions of the whole layer, ties to the lower flat index. Then every unit
        of units[i] grows units[i].target minus its kept count: the largest |score| among its positions not
        kept (a dropped position may be regrown), ties to the lower index within the unit. new = keep | grow
        (every unit holds exactly `target`); weights, states and grads as in `update`."""
        from .reference import structured_update
        structured_update(weights, masks, scores, n_keep, units, states, grads)

    def checked_structured_update(self, weights, masks, scores, n_keep, units, states, grads) -> bool:
        """`structured_update` unless any weight or score is non-finite (then nothing changes; returns False)."""
        if self.any_nonfinite(list(weights) + list(scores)):
            return False
        self.structured_update(weights, masks, scores, n_keep, units, states, grads)
        return True

    def unit_grow(self, scores: Sequence[torch.Tensor], keep: Sequence[torch.Tensor],
                  units: Sequence[Units]) -> List[torch.Tensor]:
        """The grow half of `structured_update` given keep (flat bool): per layer, flat bool grow flags. Under
        FSDP2 keep comes from the sharded select and this runs on the part of each rank's shard whose units
        lie wholly in it (`units` then describes that part; `distributed.structured_grow` selects the units
        split across shards with the column_* ops below)."""
        from .reference import unit_grow
        return [unit_grow(s, k, u) for s, k, u in zip(scores, keep, units)]

    # ------------------------------------------------------------------ the sharded (FSDP2) update
    # Under FSDP2 each rank holds a shard of every weight, mask, gradient and accumulator, and the update's
    # selection is global: `distributed.sharded_top_k` runs a radix select whose passes are these per-shard ops,
    # with an all-reduce of the histograms between passes and a scan of tie counts before `take_top`. All
    # tensors are local shards (flat ranges of their layer: FSDP2 shards dim 0). A key is the 31-bit pattern
    # of |x| as fp32 (`reference.selection_keys`); position p of a layer is eligible iff flags[p] == flag_value.
    # The defaults run the reference's implementation; a backend overrides them with kernels of its own.

    def key_histograms(self, values: Sequence[torch.Tensor], flags: Sequence[torch.Tensor], flag_value: bool,
                       prefixes: Sequence[int], shift: int, bits: int) -> torch.Tensor:
        """int64 counts of shape (len(values), 2**bits) on the values' device: row i counts the digit
        (key >> shift) & (2**bits - 1) of layer i's eligible positions whose key >> (shift + bits) equals
        prefixes[i]; a negative prefix gives a row of zeros."""
        from .reference import key_histogram
        device = values[0].device if len(values) else torch.device("cpu")
        if not len(values):
            return torch.zeros((0, 1 << bits), dtype=torch.int64, device=device)
        return torch.stack([key_histogram(v, f, flag_value, p, shift, bits)
                            for v, f, p in zip(values, flags, prefixes)])

    def take_top(self, values: Sequence[torch.Tensor], flags: Sequence[torch.Tensor], flag_value: bool,
                 thresholds: Sequence[int], n_ties: Sequence[int]) -> List[torch.Tensor]:
        """Per layer, flat bool flags of the eligible positions whose key is > thresholds[i], plus the first
        n_ties[i] eligible positions (in index order) whose key equals it (all of them if there are fewer). A
        threshold >= 2**31 takes nothing."""
        from .reference import take_top
        return [take_top(v, f, flag_value, t, k) for v, f, t, k in zip(values, flags, thresholds, n_ties)]

    # Structured layers whose units are split across shards (transposed layers, transformers' Conv1D: FSDP2
    # shards the fan-in) select per unit through `distributed.structured_grow`, a radix select with one row of
    # counts per unit. A layer's local shard is viewed as (rows, widths[i]) (row-major); pieces[i] lists
    # (row_lo, row_hi, base): position (r, c) with row_lo <= r < row_hi belongs to unit base + c (a column
    # segment), and positions in no piece belong to none. Unit indices count over all layers of the call.

    def column_counts(self, flags: Sequence[torch.Tensor], widths: Sequence[int], pieces, n_units: int) -> torch.Tensor:
        """int32 counts of shape (n_units,) on the flags' device: the True flags of each unit."""
        from .reference import column_counts
        return column_counts(flags, widths, pieces, n_units)

    def column_key_histograms(self, values: Sequence[torch.Tensor], flags: Sequence[torch.Tensor],
                              flag_value: bool, widths: Sequence[int], pieces, prefixes: torch.Tensor, shift: int,
                              bits: int) -> torch.Tensor:
        """`key_histograms` per unit: int32 counts of shape (len(prefixes), 2**bits); row u counts the digit
        (key >> shift) & (2**bits - 1) of unit u's eligible positions whose key >> (shift + bits) equals
        prefixes[u] (an int64 tensor on the values' device; negative: a row of zeros)."""
        from .reference import column_key_histograms
        return column_key_histograms(values, flags, flag_value, widths, pieces, prefixes, shift, bits)

    def column_take_top(self, values: Sequence[torch.Tensor], flags: Sequence[torch.Tensor], flag_value: bool,
                        widths: Sequence[int], pieces, thresholds: torch.Tensor,
                        n_ties: torch.Tensor) -> List[torch.Tensor]:
        """`take_top` per unit: per layer, flat bool flags of the eligible positions of unit u whose key is >
        thresholds[u], plus the first n_ties[u] (in row order) whose key equals it; thresholds >= 2**31 take
        nothing, positions in no piece are False. thresholds and n_ties: int64 tensors, one entry per unit."""
        from .reference import column_take_top
        return column_take_top(values, flags, flag_value, widths, pieces, thresholds, n_ties)

    def commit(self, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
               keep: Sequence[torch.Tensor], grow: Sequence[torch.Tensor],
               states: Sequence[Sequence[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> None:
        """The end of `update` given its selections (flat bool keep and grow flags, disjoint): new = keep |
        grow; weights and states = where(new & old, x, 0); grads = where(new, g, 0); masks[i] = new."""
        from .reference import commit
        for w, m, k, g, st, gr in zip(weights, masks, keep, grow, states, grads):
            commit(w, m, k, g, st, gr)

    def split_grad(self, grad: torch.Tensor, mask: torch.Tensor, off: torch.Tensor) -> None:
        """A gradient hook's op under FSDP2 inside the accumulation window, in place: off += where(mask, 0,
        grad), then grad = where(mask, grad, 0). (FSDP2 sums the gradients of several backward passes into the
        one sharded gradient, so the dense gradient is rebuilt from the masked sum and `off` at step end.)"""
        from .reference import split_grad
        split_grad(grad, mask, off)

    def fold_grad(self, acc: torch.Tensor, grad: torch.Tensor, off: torch.Tensor, n: int) -> None:
        """acc += (grad + off) / n in place: grad + off rounded to grad's dtype (exact: disjoint supports, except
        that -0.0 + 0.0 gives +0.0), then divided and added with `mask_grad`'s rounding."""
        from .reference import fold_grad
        fold_grad(acc, grad, off, n)


def _load_reference() -> Backend:
    from .reference import ReferenceBackend
    return ReferenceBackend()


TRITON_MIN = (3, 4)  # the update kernels' tl.histogram(..., mask=) came with Triton 3.4 (torch <= 2.7 ships older)


def _load_triton() -> Backend:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        raise BackendUnavailable(f"triton is not importable ({e.__class__.__name__}: {e})") from e
    version = tuple(int(p) for p in re.findall(r"\d+", getattr(triton, "__version__", "0"))[:2])
    if version < TRITON_MIN:
        raise BackendUnavailable(f"triton {getattr(triton, '__version__', '?')} is older than "
                                 f"{'.'.join(map(str, TRITON_MIN))}, which the update kernels need (tl.histogram "
                                 "with a mask): upgrade triton, or use backend='cpp' / 'reference'")
    try:
        mod = importlib.import_module("rigl_fast.kernels")
    except ImportError as e:
        raise BackendUnavailable(f"rigl_fast.kernels could not be imported: {e}") from e
    if not hasattr(mod, "TritonBackend"):
        raise BackendUnavailable("rigl_fast.kernels has no TritonBackend")
    return mod.TritonBackend()


def _load_cpp() -> Backend:
    try:
        mod = importlib.import_module("rigl_fast._cpp")
    except ImportError as e:
        raise BackendUnavailable(f"the C++ backend module is missing: {e}") from e
    if not hasattr(mod, "CppBackend"):
        raise BackendUnavailable("the C++ backend is not built into this version")
    return mod.CppBackend()  # raises BackendUnavailable if the extension cannot be built/loaded


_LOADERS = {"reference": _load_reference, "triton": _load_triton, "cpp": _load_cpp}
_CACHE: dict = {}
_warned_fallback = False


def _load(name: str) -> Backend:
    if name not in _CACHE:
        try:
            _CACHE[name] = _LOADERS[name]()
        except BackendUnavailable as e:
            _CACHE[name] = e
    got = _CACHE[name]
    if isinstance(got, BackendUnavailable):
        raise BackendUnavailable(str(got))
    return got


def auto_order(device: torch.device) -> List[str]:
    return ["triton", "cpp", "reference"] if device.type == "cuda" else ["cpp", "reference"]


def check_name(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def get_backend(backend: str, device: torch.device) -> Backend:
    """Resolve a backend name for tensors on `device`.

    `auto` tries `auto_order(device)` and falls back silently past unavailable ones, unless the environment
    variable RIGL_FAST_BACKEND names a backend: that counts as an explicit request. An explicit request
    that cannot run raises RuntimeError saying why.
    """
    check_name(backend)
    source = "backend"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            backend, source = env, ENV_VAR
    if backend != "auto":
        try:
            b = _load(backend)
        except BackendUnavailable as e:
            raise RuntimeError(f"{source}={backend!r} was requested but cannot run: {e}") from None
        why = b.supports(device)
        if why is not None:
            raise RuntimeError(f"{source}={backend!r} was requested but cannot run on {device}: {why}")
        return b
    reasons = []
    for name in auto_order(device):
        try:
            b = _load(name)
        except BackendUnavailable as e:
            reasons.append(f"{name}: {e}")
            continue
        why = b.supports(device)
        if why is None:
            global _warned_fallback
            if name == "reference" and reasons and device.type == "cpu" and not _warned_fallback:
                _warned_fallback = True  # once per process: a one-line notice, not a warning per scheduler
                warnings.warn("rigl_fast: falling back to the reference backend (" + "; ".join(reasons) + ")",
                              RuntimeWarning, stacklevel=3)
            return b
        reasons.append(f"{name}: {why}")
    raise RuntimeError("no rigl_fast backend can run on " + str(device) + ": " + "; ".join(reasons))
