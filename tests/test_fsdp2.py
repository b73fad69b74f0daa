"""FSDP2 (`fully_shard`, DTensor parameters): 2 processes on gloo, CPU.

One spawn runs every scenario on both ranks and saves what it saw; the tests read it. Tensors are gathered
(`full_tensor()`) only here, in the test, never by rigl_fast. The model has layers whose row counts do not
divide by the world size (101 and 11 rows over 2 ranks), so shards are uneven. A second model of transformers'
Conv1D layers (`_Conv1DNet`) runs structure='fan_in' and '2:4' with units split across the shards, and ties.

Checked: masks after every call equal those of one process training on the same global batch (FSDP2 averages
the ranks' gradients, as one process's mean loss over the global batch does; the two differ only by rounding:
the runs are in float64 and the test asserts that the gaps deciding each mask are far above that rounding,
tests/helpers.selection_gap), for reference and cpp; triton (under the interpreter here, float32 only) gives the
reference backend's FSDP2 scores and masks bit for bit; invariants on the gathered weights, gradients and
optimizer states; no tensor of a whole sparse layer's size allocated during an update; a checkpoint saved with
torch.distributed.checkpoint inside an accumulation window resumes bit for bit, and loads on one rank; a
non-finite gradient on one rank skips the update on both; errors for layouts rigl_fast does not handle.
"""
import copy
import functools
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_selection_margin, exit_spawned_rank, init_gloo, update_scores
from rigl_fast import RigLScheduler
from rigl_fast.distributed import RADIX_PASSES, UNIT_RADIX_PASSES
from rigl_fast.ops import units_of
from rigl_fast.state import masks as sd_masks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built into this torch")

WORLD = 2
GLOBAL_BATCH = 16
STEPS = 17
CFG = dict(dense_allocation=0.2, T_end=15, delta=3, grad_accumulation_n=2, ignore_linear_layers=False, alpha=0.5)
MODEL_SEED, MASK_SEED, DATA_SEED = 0, 100, 7
RESUME_AT = 8  # inside an accumulation window: step 8 has folded its gradient, step 9 will, then the update


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(kind="mlp", dtype=torch.float32):
    torch.manual_seed(MODEL_SEED)
    if kind == "conv1d":
        return _Conv1DNet().to(dtype)
    return nn.Sequential(nn.Linear(37, 64), nn.ReLU(), nn.Linear(64, 101), nn.ReLU(), nn.Linear(101, 11)).to(dtype)


class _Conv1DNet(nn.Module):
    """transformers' Conv1D layers (weights stored (in, out): FSDP2 shards them along the fan-in, so every
    column unit spans both ranks) and one Linear (row units). Fan-ins over 2 ranks: c1 64 = 32|32 (2:4 groups
    inside the shards), c2 36 = 18|18 (2:4's group of rows 16..19 is cut), c3 45 = 23|22 (uneven; 2:4 keeps it
    dense, 45 % 4). Ties: c1's input repeats features 0..31 as 32..63, so its gradient rows j and j + 32 (one
    on each rank) are equal in every column; c2's input repeats c1's outputs 16, 17 as 18, 19 (rows across the
    cut of the group 16..19), and c1's outputs 18, 19 are unused: all-zero score columns in c1."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.embed = Conv1D(20, 37)  # the first candidate: uniform keeps it dense
        self.c1 = Conv1D(36, 64)
        self.c2 = Conv1D(20, 36)
        self.lin = nn.Linear(20, 45)
        self.c3 = Conv1D(11, 45)
        self.register_buffer("pick", torch.tensor(list(range(18)) + [16, 17] + list(range(20, 36))), persistent=False)

    def forward(self, x):
        h = F.relu(self.c1(torch.cat([x[:, :32], x[:, :32]], 1)))
        h = F.relu(self.c2(h[:, self.pick]) + self.embed(x))
        return self.c3(F.relu(self.lin(h)))


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(DATA_SEED)
    return [(torch.randn(GLOBAL_BATCH, 37, generator=g).to(dtype),
             torch.randint(0, 11, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def _optimizer(model, kind):
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def _full(t):
    return None if t is None else (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _step(model, opt, pruner, x, y, in_step, micro, clip=False):
    opt.zero_grad()
    if micro:  # two backward passes in one step, FSDP2 reduce-scattering and summing both into .grad
        h = x.shape[0] // 2
        (F.cross_entropy(model(x[:h]), y[:h]) / 2).backward()
        (F.cross_entropy(model(x[h:]), y[h:]) / 2).backward()
    else:
        F.cross_entropy(model(x), y).backward()
    if clip:  # the README's clipping loop: .grad rescaled between backward and pruner() (or the step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
    if in_step:
        opt.step()
    elif pruner():
        opt.step()


SCENARIOS = {  # name: (backend, wrapping, optimizer, in_step, micro-batches)
    "reference": ("reference", "per_module", "sgd", False, False),
    "cpp": ("cpp", "per_module", "sgd", False, False),
    "triton": ("triton", "per_module", "sgd", False, False),
    "root_adam_in_step": ("reference", "root", "adam", True, False),
    "micro": ("reference", "per_module", "sgd", False, True),
    "fan_in": ("reference", "per_module", "sgd", False, False),
    "two_four": ("cpp", "per_module", "sgd", False, False),
    # transformers' Conv1D: units split across the shards (distributed.structured_grow)
    "conv1d_fan_in": ("reference", "conv1d", "sgd", False, False),
    "conv1d_fan_in_cpp": ("cpp", "conv1d", "sgd", False, False),
    "conv1d_fan_in_triton": ("triton", "conv1d", "sgd", False, False),
    "conv1d_two_four": ("reference", "conv1d", "adam", False, False),
    "conv1d_two_four_cpp": ("cpp", "conv1d", "adam", False, False),
    "conv1d_two_four_triton": ("triton", "conv1d", "adam", False, False),
    # gradients clipped between backward and pruner() / the step: the grow scores are the unclipped gradient
    "clipped": ("reference", "per_module", "sgd", False, True),
    "clipped_in_step": ("cpp", "root", "adam", True, False),
}
CLIPPED = {"clipped", "clipped_in_step"}
FAN_IN, TWO_FOUR = dict(structure="fan_in"), dict(structure="2:4", dense_allocation=0.5)
EXTRA = {"fan_in": FAN_IN, "two_four": TWO_FOUR, **{n: FAN_IN for n in SCENARIOS if n.startswith("conv1d_fan_in")},
         **{n: TWO_FOUR for n in SCENARIOS if n.startswith("conv1d_two_four")}}
# FSDP2's scores (the ranks' gradients reduce-scattered and averaged) and one process's (the mean loss over the
# global batch) differ by rounding. In float32 the smallest gap deciding a mask was only ~17 roundings of the
# largest score (2.1e-6 of it), 10x to 150x the two runs' difference: equal masks by luck. So the runs compared
# with one process are in float64 (there the least ratio is 4.7e6, conv1d_two_four), and the test asserts at
# every update that every layer's selection gap is over MARGIN times the scores' difference, and that ties at a
# boundary (the Conv1D model's, zero scores) are exact ties in both runs (tests/helpers.assert_selection_margin). The triton backend has no float64: see test_triton_equals_the_reference_backend.
DTYPE = torch.float64
MARGIN = 1000
# each triton scenario: its twin on the reference backend (same model, optimizer and structure)
TRITON_TWIN = {n: "reference" if n == "triton" else n[:-len("_triton")]
               for n, s in SCENARIOS.items() if s[0] == "triton"}
ONE_PROCESS = [n for n in SCENARIOS if n not in TRITON_TWIN]  # compared with one process, in float64


def _dtype(name):
    return torch.float32 if name in TRITON_TWIN else DTYPE


def _shard(model, mesh, wrapping):
    from torch.distributed.fsdp import fully_shard
    if wrapping in ("per_module", "conv1d"):
        for layer in model.children():
            if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _kind(wrapping):
    return "conv1d" if wrapping == "conv1d" else "mlp"


def _build(mesh, name, backend=None, dtype=torch.float32, **kw):
    backend_, wrapping, optim, in_step, _ = SCENARIOS[name]
    model = _shard(_model(_kind(wrapping), dtype), mesh, wrapping)
    opt = _optimizer(model, optim)
    torch.manual_seed(MASK_SEED)
    pruner = RigLScheduler(model, opt, backend=backend or backend_, in_step=in_step,
                           **{**CFG, **EXTRA.get(name, {}), **kw})
    return model, opt, pruner


def _local_batch(x, y, rank):
    per = GLOBAL_BATCH // WORLD
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def _invariants(model, opt, pruner):
    """On the gathered tensors: weights, gradients and every optimizer state shaped like a weight are 0 off the
    mask; each mask has exactly its layer's count of active positions."""
    ok = True
    for i, (w, m) in enumerate(zip(pruner.W, pruner.backward_masks)):
        if m is None:
            continue
        mask = _full(m)
        u = pruner._units[i]
        if u is None:
            ok &= int(mask.sum()) == pruner._n_active[i] == pruner.N[i] - int(pruner.S[i] * pruner.N[i])
        else:  # every unit (row, or group of M in a row) holds exactly its count
            ok &= int(mask.sum()) == pruner._n_active[i]
            ok &= bool((units_of(mask.reshape(-1), u).sum(1) == u.target).all())
        ok &= bool((_full(w)[~mask] == 0).all())
        if w.grad is not None:
            ok &= bool((_full(w.grad)[~mask] == 0).all())
        for v in opt.state.get(w, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == w.shape:
                ok &= bool((_full(v)[~mask] == 0).all())
    return ok


def _record_scores(pruner):
    """Each topology update's drop fraction and update_scores() (gathered), taken inside the update, where the
    accumulators are complete: under FSDP2 pruner() folds the last window step's gradient into them first
    (update.fold_sharded). `_rigl_step` is the scheduler's one call of the update, wrapped on this instance."""
    seen, real = [], pruner._rigl_step

    def recorded():
        seen.append((float(pruner.cosine_annealing()), [tuple(map(_full, s)) for s in update_scores(pruner)]))
        real()
    pruner._rigl_step = recorded
    return seen


def _train_log(rank, mesh, name, dtype):
    model, opt, pruner = _build(mesh, name, dtype=dtype)
    _, _, _, in_step, micro = SCENARIOS[name]
    log = {"masks": [], "invariants": [], "sharded": all(type(m).__name__ == "DTensor"
                                                          for m in pruner.backward_masks if m is not None),
           "scores": _record_scores(pruner)}
    for x, y in _data(dtype):
        _step(model, opt, pruner, *_local_batch(x, y, rank), in_step, micro, name in CLIPPED)
        log["masks"].append([_full(m) for m in pruner.backward_masks])
        log["invariants"].append(_invariants(model, opt, pruner))
    log["updates"] = pruner.rigl_steps - pruner.skipped_updates
    return log


class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns, except in-place ops' (they return their input:
    nothing is allocated; Triton's CPU interpreter also re-points tensors at storages with set_ and copies
    through them in place)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.endswith("_"):
            return out
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


class _WatchedOps:
    """The scheduler's backend with every op call run under `_Allocations`: what rigl_fast computes per step
    (gradient hooks, the fold of the accumulation window, after-step masking) goes through these ops."""

    def __init__(self, ops, seen):
        self._ops, self._seen = ops, seen

    def __getattr__(self, name):
        fn = getattr(self._ops, name)
        if not callable(fn):
            return fn

        def watched(*a, **k):
            with _Allocations() as rec:
                out = fn(*a, **k)
            self._seen.extend(rec.shapes)
            return out
        return watched


def _allocations(rank, mesh, backend, name="reference"):
    """The shape of every tensor returned by an op during a short run's updates (the whole of `_rigl_step`,
    collectives and scheduler code included) and by every backend op of every step, against the layers'."""
    model, opt, pruner = _build(mesh, name, backend=backend)
    real = pruner._rigl_step
    seen = []

    def watched():
        with _Allocations() as a:
            real()
        seen.extend(a.shapes)

    pruner._rigl_step = watched
    pruner._ops = _WatchedOps(pruner._ops, seen)
    for x, y in _data()[:7]:
        _step(model, opt, pruner, *_local_batch(x, y, rank), False, False)
    sparse = [i for i, m in enumerate(pruner.backward_masks) if m is not None]
    return {"shapes": seen, "layer_shapes": [tuple(pruner.W[i].shape) for i in sparse],
            "shard_numel": max(pruner.W[i].to_local().numel() for i in sparse),
            "n_split": sum(p.n_split for p in pruner._plans or [] if p is not None),
            "updates": pruner.rigl_steps}


def _poison(rank, mesh):
    """Rank 1 alone finds inf in its shard of an accumulator at the first update."""
    model, opt, pruner = _build(mesh, "reference")
    before = None
    msgs = []
    for x, y in _data()[:CFG["delta"]]:
        opt.zero_grad()
        xb, yb = _local_batch(x, y, rank)
        F.cross_entropy(model(xb), yb).backward()
        if pruner.step + 1 == CFG["delta"]:
            before = [_full(m) for m in pruner.backward_masks]
            if rank == 1:
                # the step's gradient (the hook's copy of the masked shard, hooks.ShardedMaskHook) is folded into
                # the accumulator when pruner() runs: poison that copy
                pruner.backward_hook_objects[2].seen[0, 0] = float("inf")
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if pruner():
                opt.step()
        msgs += [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    return {"unchanged": all(a is None or torch.equal(a, _full(b)) for a, b in zip(before, pruner.backward_masks)),
            "skipped": pruner.skipped_updates, "warnings": msgs}


def _resume(rank, mesh, out_dir):
    """Train to RESUME_AT, save model, optimizer and pruner with DCP, train on; then fresh objects load the
    checkpoint and train on from there. Both runs must end bit for bit equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    path = os.path.join(out_dir, "dcp")
    data = _data()

    def state(model, opt, pruner):
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                "pruner": pruner.state_dict()}

    model, opt, pruner = _build(mesh, "reference")
    for step, (x, y) in enumerate(data):
        if step == RESUME_AT:
            live = [h.dense_grad is not None for h in pruner.backward_hook_objects]
            dcp.save(state(model, opt, pruner), checkpoint_id=path)
            saved_masks = [_full(m) for m in pruner.backward_masks]
        _step(model, opt, pruner, *_local_batch(x, y, rank), False, False)
    first = ([_full(m) for m in pruner.backward_masks], [_full(w) for w in pruner.W], pruner.step)

    model, opt, pruner = _build(mesh, "reference")
    sd = state(model, opt, pruner)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    pruner.load_state_dict(sd["pruner"])
    loaded = [_full(m) for m in pruner.backward_masks]
    for x, y in data[RESUME_AT:]:
        _step(model, opt, pruner, *_local_batch(x, y, rank), False, False)
    second = ([_full(m) for m in pruner.backward_masks], [_full(w) for w in pruner.W], pruner.step)
    return {"window_live": live, "saved_masks": saved_masks, "loaded_masks": loaded, "first": first,
            "second": second}


def _errors(mesh):
    from torch.distributed.fsdp import fully_shard
    out = {}
    model = _model()
    fully_shard(model[2], mesh=mesh)  # one layer sharded, the others plain
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for key, kw in (("mixed", {}),):
        try:
            RigLScheduler(model, opt, **CFG, **kw)
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    model = _shard(_model(), mesh, "per_module")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for key, kw in (("process_group", {"process_group": dist.group.WORLD}), ("sharded_init", {"sharded_init": "x"}),
                    ("compute", {"compute": "sparse"})):
        try:
            RigLScheduler(model, opt, **CFG, **kw)
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    return out


def _local_init(mesh):
    model = _shard(_model(), mesh, "per_module")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(MASK_SEED)
    pruner = RigLScheduler(model, opt, **CFG, sharded_init="local")
    return {"masks": [_full(m) for m in pruner.backward_masks], "n_active": list(pruner._n_active),
            "expected": [None if s <= 0 else n - int(s * n) for s, n in zip(pruner.S, pruner.N)]}


def _set_run(rank, mesh):
    """SET (grow_mode='random') under FSDP2: its scores are drawn shard by shard, so no single-process twin;
    the invariants must hold and the masks must move."""
    model, opt, pruner = _build(mesh, "reference", grow_mode="random")
    first = [_full(m) for m in pruner.backward_masks]
    ok = []
    for x, y in _data():
        _step(model, opt, pruner, *_local_batch(x, y, rank), False, False)
        ok.append(_invariants(model, opt, pruner))
    return {"invariants": ok, "moved": not torch.equal(first[2], _full(pruner.backward_masks[2])),
            "masks": [_full(m) for m in pruner.backward_masks]}


def _from_single(mesh):
    """A state dict saved by one process (whole-layer masks) loads into a sharded scheduler: each rank keeps its
    part, through the constructor's state_dict= and through load_state_dict."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(MASK_SEED + 1)  # not the draw the sharded scheduler below makes
    sd = RigLScheduler(model, opt, backend="reference", **CFG).state_dict()
    out = {"want": sd_masks(sd)}
    model, opt, pruner = _build(mesh, "reference")
    pruner.load_state_dict(sd)
    out["loaded"] = [_full(m) for m in pruner.backward_masks]
    model = _shard(_model(), mesh, "per_module")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out["constructed"] = [_full(m) for m in RigLScheduler(model, opt, state_dict=sd).backward_masks]
    return out


def _conv1d_extras(mesh):
    """Conv1D under FSDP2 beyond training: the shard-local initial draw keeps every unit's count (a column's
    count split over the shards; a 2:4 group a shard boundary cuts drawn whole by both ranks); a state dict from
    one process loads; one whose Conv1D mask breaks the structure only on rank 1's rows raises on both ranks,
    naming the layer, before anything changes."""
    out = {}
    for key, extra in (("fan_in", FAN_IN), ("two_four", TWO_FOUR)):
        model = _shard(_model("conv1d"), mesh, "conv1d")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(MASK_SEED)
        pruner = RigLScheduler(model, opt, backend="reference", **{**CFG, **extra}, sharded_init="local")
        out[f"local_{key}"] = {"masks": [_full(m) for m in pruner.backward_masks], "units": list(pruner._units),
                               "n_active": list(pruner._n_active)}
    model = _model("conv1d")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(MASK_SEED + 1)
    sd = RigLScheduler(model, opt, backend="reference", **CFG, **FAN_IN).state_dict()
    model, opt, pruner = _build(mesh, "conv1d_fan_in")
    before = [_full(m) for m in pruner.backward_masks]
    pruner.load_state_dict(sd)
    out["want"], out["loaded"] = sd_masks(sd), [_full(m) for m in pruner.backward_masks]
    bad = copy.deepcopy(sd)
    i = pruner.names.index("c1.weight")
    m = sd_masks(sd)[i].clone()
    m[40, int((~m[40]).nonzero()[0])] = True  # row 40: rank 1's shard; its column now holds one too many
    bad["backward_masks"] = list(sd_masks(sd))
    bad["backward_masks"][i] = m
    model, opt, pruner = _build(mesh, "conv1d_fan_in")
    before = [_full(m) for m in pruner.backward_masks]
    try:
        pruner.load_state_dict(bad)
        out["bad"] = None
    except ValueError as e:
        out["bad"] = str(e)
    out["bad_unchanged"] = all(a is None or torch.equal(a, _full(b)) for a, b in zip(before, pruner.backward_masks))
    return out


def _worker(rank, port, out_dir):
    init_gloo(rank, port, WORLD, 120)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    try:
        logs = {name: _train_log(rank, mesh, name, _dtype(name)) for name in SCENARIOS}
        # the triton scenarios' twins, in float32 (sorted: every rank runs them in one order)
        logs["float32"] = {n: _train_log(rank, mesh, n, torch.float32) for n in sorted(set(TRITON_TWIN.values()))}
        logs["alloc"] = {(name, b): _allocations(rank, mesh, b, name) for name in ALLOC_SCENARIOS
                         for b in ("reference", "cpp", "triton")}
        logs["poison"] = _poison(rank, mesh)
        logs["resume"] = _resume(rank, mesh, out_dir)
        logs["errors"] = _errors(mesh)
        logs["local_init"] = _local_init(mesh)
        logs["set"] = _set_run(rank, mesh)
        logs["from_single"] = _from_single(mesh)
        logs["conv1d"] = _conv1d_extras(mesh)
        torch.save(logs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()  # only on success (helpers.py says why)


@pytest.fixture(scope="module")
def fsdp_logs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


@functools.lru_cache(maxsize=None)
def _single_process(name):
    """One process on the global batch, in float64: its masks after every step, its scores at every update (as
    _record_scores) and each sparse layer's units (None without a structure)."""
    _, wrapping, optim, in_step, micro = SCENARIOS[name]
    model = _model(_kind(wrapping), DTYPE)
    opt = _optimizer(model, optim)
    torch.manual_seed(MASK_SEED)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*keeps 1 layer", category=UserWarning)  # 2:4: fan-in 101
        pruner = RigLScheduler(model, opt, backend="reference", in_step=in_step, **{**CFG, **EXTRA.get(name, {})})
    masks, scores = [], _record_scores(pruner)
    for x, y in _data(DTYPE):
        _step(model, opt, pruner, x, y, in_step, micro, name in CLIPPED)
        masks.append([None if m is None else m.clone() for m in pruner.backward_masks])
    return masks, scores, [u for u, m in zip(pruner._units, pruner.backward_masks) if m is not None]


def _assert_margin(scores, ref_scores, units):
    """At every update, each layer's selection gap in the one-process run is over MARGIN times the largest
    difference between its scores and the sharded run's: the equal masks are no luck. Returns the least ratio."""
    assert len(scores) == len(ref_scores) == 4
    least = float("inf")
    for (f, layers), (f0, ref) in zip(scores, ref_scores):
        assert f == f0
        least = min(least, assert_selection_margin(ref, [(w, g) for w, _, g in layers], f, MARGIN,
                                                   None if units[0] is None else units))
    return least


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_masks_equal_one_process_after_every_step(fsdp_logs, name):
    logs, _ = fsdp_logs
    want, ref_scores, units = _single_process(name)
    _assert_margin(logs[0][name]["scores"], ref_scores, units)
    for rank in range(WORLD):
        log = logs[rank][name]
        assert log["sharded"], "masks must be DTensors sharded like their weights"
        assert log["updates"] == 4  # steps 3, 6, 9, 12 (T_end 15)
        for step, (got, ref) in enumerate(zip(log["masks"], want)):
            for i, (g, r) in enumerate(zip(got, ref)):
                assert (g is None) == (r is None)
                assert g is None or torch.equal(g, r), f"{name}: rank {rank} step {step + 1} layer {i}"
    # and the updates changed the topology (a run that never changed the masks would pass the above too)
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(want[0], want[-1]))


@pytest.mark.parametrize("name", list(TRITON_TWIN))
def test_triton_equals_the_reference_backend(fsdp_logs, name):
    """The triton backend has no float64, and in float32 FSDP2 and one process differ by too much rounding for
    a margin (DTYPE above). So its runs are compared with the same FSDP2 run on the reference backend, in
    float32: the arithmetic is the same (triton's hooks split and fold the window's gradients with the base
    Backend's ops, the reference's acc += (grad + off) / n; its after-step pass and commit select, exactly), so
    the scores must be bit-equal at every update (checked: by design, not by margin), and the masks, selected
    from equal scores, equal after every step. That the reference backend's selection is right is the float64
    comparison with one process; this checks triton's selection (its radix passes) against it, with no luck."""
    logs, _ = fsdp_logs
    for rank in range(WORLD):
        log, ref = logs[rank][name], logs[rank]["float32"][TRITON_TWIN[name]]
        assert log["updates"] == ref["updates"] == 4
        assert len(log["scores"]) == len(ref["scores"]) == 4
        for k, ((f, layers), (f0, ref_layers)) in enumerate(zip(log["scores"], ref["scores"])):
            assert f == f0 and len(layers) == len(ref_layers)
            for i, (a, b) in enumerate(zip(layers, ref_layers)):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), f"{name}: update {k} layer {i}: scores differ"
        for step, (got, want) in enumerate(zip(log["masks"], ref["masks"])):
            for i, (g, r) in enumerate(zip(got, want)):
                assert (g is None and r is None) or torch.equal(g, r), f"{name}: rank {rank} step {step + 1}"
    masks = logs[0][name]["masks"]
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(masks[0], masks[-1]))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_invariants_on_gathered_tensors(fsdp_logs, name):
    logs, _ = fsdp_logs
    for rank in range(WORLD):
        assert all(logs[rank][name]["invariants"]), f"{name}: rank {rank}"


ALLOC_SCENARIOS = ("reference", "conv1d_fan_in", "conv1d_two_four")


@pytest.mark.parametrize("name", ALLOC_SCENARIOS)
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_no_rank_allocates_a_whole_layer_during_an_update(fsdp_logs, backend, name):
    logs, _ = fsdp_logs
    for rank in range(WORLD):
        a = logs[rank]["alloc"][(name, backend)]
        assert a["updates"] == 2 and a["shapes"], "the watched updates ran"
        assert (a["n_split"] > 0) == name.startswith("conv1d")  # Conv1D: units split across the shards
        # beyond shard-sized tensors only the radix histograms, (layers, bins) and a layer's (bins,), and the
        # per-unit radix's, (split units, bins) and flat: their sizes are set by the number of layers and of
        # columns, not by the layers' sizes
        hist = {s for _, bits in RADIX_PASSES for s in ((len(a["layer_shapes"]), 1 << bits), (1 << bits,))}
        hist |= {s for _, bits in UNIT_RADIX_PASSES for s in ((a["n_split"], 1 << bits), (a["n_split"] << bits,))}
        big = [s for s in a["shapes"] if torch.Size(s).numel() > a["shard_numel"] and s not in hist]
        assert not big, big
        assert not set(a["shapes"]) & set(a["layer_shapes"])


def test_non_finite_on_one_rank_skips_the_update_on_both(fsdp_logs):
    logs, _ = fsdp_logs
    for rank in range(WORLD):
        p = logs[rank]["poison"]
        assert p["unchanged"] and p["skipped"] == 1
        assert any("non-finite" in m for m in p["warnings"]), p["warnings"]


def test_dcp_resume_inside_an_accumulation_window_is_exact(fsdp_logs):
    logs, _ = fsdp_logs
    for rank in range(WORLD):
        r = logs[rank]["resume"]
        assert any(r["window_live"]), "the checkpoint must hold a live accumulator"
        for a, b in zip(r["saved_masks"], r["loaded_masks"]):
            assert (a is None and b is None) or torch.equal(a, b)
        (m1, w1, s1), (m2, w2, s2) = r["first"], r["second"]
        assert s1 == s2 == STEPS
        for a, b in zip(m1, m2):
            assert (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(w1, w2):
            assert torch.equal(a, b)


def _one_rank_load(rank, port, ckpt, out):
    """A checkpoint written by 2 ranks, loaded by 1 (DCP reshards the DTensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        _, _, pruner = _build(mesh, "reference")
        sd = {"pruner": pruner.state_dict()}
        dcp.load(sd, checkpoint_id=ckpt)
        pruner.load_state_dict(sd["pruner"])
        torch.save([_full(m) for m in pruner.backward_masks], out)
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()  # only on success (helpers.py says why)


def test_dcp_checkpoint_loads_on_another_world_size(fsdp_logs):
    logs, out = fsdp_logs
    mp.spawn(_one_rank_load, args=(_free_port(), str(out / "dcp"), str(out / "one.pt")), nprocs=1, join=True)
    got = torch.load(out / "one.pt")
    for a, b in zip(logs[0]["resume"]["saved_masks"], got):
        assert (a is None and b is None) or torch.equal(a, b)


def test_layouts_it_cannot_handle_raise_naming_the_cause(fsdp_logs):
    logs, _ = fsdp_logs
    e = logs[0]["errors"]
    assert e["mixed"] and "fully_shard" in e["mixed"] and "4.weight" in e["mixed"]
    assert e["process_group"] and "process_group" in e["process_group"]
    assert e["sharded_init"] and "sharded_init" in e["sharded_init"]
    assert e["compute"] and "compute='sparse'" in e["compute"] and "FSDP2" in e["compute"] and ".weight" in e["compute"]


def test_sharded_init_local_keeps_exact_counts(fsdp_logs):
    logs, _ = fsdp_logs
    li = logs[0]["local_init"]
    assert li["n_active"] == li["expected"]
    for m, n in zip(li["masks"], li["expected"]):
        assert (m is None) == (n is None) and (m is None or int(m.sum()) == n)
    global_draw = logs[0]["reference"]["masks"][0]  # after one step, no update yet: the initial masks
    assert any(m is not None and not torch.equal(m, g) for m, g in zip(li["masks"], global_draw))
    assert all(a is None or torch.equal(a, b) for a, b in zip(li["masks"], logs[1]["local_init"]["masks"]))


def test_set_keeps_the_invariants_and_moves(fsdp_logs):
    logs, _ = fsdp_logs
    for rank in range(WORLD):
        assert all(logs[rank]["set"]["invariants"]) and logs[rank]["set"]["moved"]
    assert all(a is None or torch.equal(a, b) for a, b in zip(logs[0]["set"]["masks"], logs[1]["set"]["masks"]))


HSDP = (2, 2)  # (replicas, shards): 4 processes


def _hsdp_worker(rank, port, out_dir, name):
    """HSDP: a 2-D mesh, weights replicated over dim 0 and sharded over dim 1; the global batch split 4 ways.
    `name`: the scenario whose model, optimizer and structure run (the plain MLP, or Conv1D's split units)."""
    from torch.distributed.device_mesh import init_device_mesh
    world = HSDP[0] * HSDP[1]
    init_gloo(rank, port, world, 120)
    try:
        mesh = init_device_mesh("cpu", HSDP, mesh_dim_names=("replicate", "shard"))
        _, wrapping, optim, _, _ = SCENARIOS[name]
        model = _shard(_model(_kind(wrapping), DTYPE), mesh, wrapping)
        opt = _optimizer(model, optim)
        torch.manual_seed(MASK_SEED + rank)  # a different RNG on each rank: the draws must still agree
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*keeps 1 layer", category=UserWarning)  # 2:4: fan-in 45
            pruner = RigLScheduler(model, opt, backend="reference", **{**CFG, **EXTRA.get(name, {})})
        per = GLOBAL_BATCH // world
        masks, scores = [], _record_scores(pruner)
        for x, y in _data(DTYPE):
            _step(model, opt, pruner, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per], False, False)
            masks.append([_full(m) for m in pruner.backward_masks])
        torch.save({"masks": masks, "scores": scores, "placements": [str(w.placements) for w in pruner.W]},
                   os.path.join(out_dir, f"hsdp{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()  # only on success (helpers.py says why)


@pytest.mark.parametrize("name", ["reference", "conv1d_fan_in", "conv1d_two_four"])
def test_hsdp_masks_equal_one_process(tmp_path, name):
    """HSDP's (Replicate, Shard(0)) layout: the selection runs over the shard dimension's group; for Conv1D's
    split units (fan_in columns, a cut 2:4 group) too. In float64, with the selection margin asserted."""
    world = HSDP[0] * HSDP[1]
    mp.spawn(_hsdp_worker, args=(_free_port(), str(tmp_path), name), nprocs=world, join=True)
    # the initial draws come from rank 0's RNG: the single process draws with rank 0's seed
    want, ref_scores, units = _single_process(name)
    for rank in range(world):
        got = torch.load(tmp_path / f"hsdp{rank}.pt")
        _assert_margin(got["scores"], ref_scores, units)
        assert "Replicate" in got["placements"][2] and "Shard(dim=0)" in got["placements"][2]
        for step, (g, r) in enumerate(zip(got["masks"], want)):
            for a, b in zip(g, r):
                assert (a is None and b is None) or torch.equal(a, b), f"{name}: rank {rank} step {step + 1}"
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(want[0], want[-1]))


def test_a_single_process_state_dict_loads_sharded(fsdp_logs):
    logs, _ = fsdp_logs
    for rank in range(WORLD):
        f = logs[rank]["from_single"]
        assert any(a is not None and not torch.equal(a, b)
                   for a, b in zip(f["want"], logs[rank]["reference"]["masks"][0])), "a distinct draw"
        for key in ("loaded", "constructed"):
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(f["want"], f[key])), key


def test_conv1d_local_draw_keeps_every_unit(fsdp_logs):
    logs, _ = fsdp_logs
    for key in ("fan_in", "two_four"):
        li = logs[0]["conv1d"][f"local_{key}"]
        global_draw = logs[0][f"conv1d_{key}"]["masks"][0]  # no update at step 1: the initial masks
        transposed = 0
        for m, u, n, g in zip(li["masks"], li["units"], li["n_active"], global_draw):
            assert (m is None) == (u is None)
            if m is None:
                continue
            transposed += u.transposed
            assert bool((units_of(m.reshape(-1), u).sum(1) == u.target).all()) and int(m.sum()) == n
        assert transposed >= 2
        assert any(m is not None and not torch.equal(m, g) for m, g in zip(li["masks"], global_draw))
        assert all(a is None or torch.equal(a, b) for a, b in zip(li["masks"], logs[1]["conv1d"][f"local_{key}"]["masks"]))


def test_conv1d_state_dicts_load_and_a_broken_structure_raises_on_every_rank(fsdp_logs):
    logs, _ = fsdp_logs
    for rank in range(WORLD):
        c = logs[rank]["conv1d"]
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(c["want"], c["loaded"]))
        assert c["bad"] and "c1.weight" in c["bad"] and "structure" in c["bad"], c["bad"]
        assert c["bad_unchanged"]
