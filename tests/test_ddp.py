"""torch.distributed: 2 processes on gloo (CPU, loopback only).

Under DDP every rank's hook sees its local gradient before the reducer averages it; the grow score is the
local accumulators summed over ranks, one all-reduce per update; inside a window of several backward passes
the partial sums are also folded onto rank 0 after each pass but the last (one all-reduce each), so that
rank 0's checkpoint holds the whole window. The checks: masks equal on every rank after every call (via
all_gather, never by broadcasting masks after init), all-reduces exactly on update steps and folded window
steps, the same masks as one process training on the same global batch (the rank sum and the single-process
gradient differ by a uniform factor of world_size and rounding: the runs are in float64, and the test asserts
that the gaps deciding each mask are far above the rounding, tests/helpers.selection_gap), and a run resumed
inside an accumulation window from rank 0's checkpoint equal to the uninterrupted run bit for bit.
"""
import functools
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import MLP, assert_selection_margin, batches, exit_spawned_rank, init_gloo, update_scores
from rigl_fast import RigLScheduler

WORLD = 2
GLOBAL_BATCH = 16
STEPS = 26
CFG = dict(dense_allocation=0.25, T_end=24, delta=4, grad_accumulation_n=2, ignore_linear_layers=False,
           alpha=0.5, backend="reference")
MODEL_SEED, MASK_SEED, DATA_SEED = 0, 100, 7
REPO = Path(__file__).resolve().parents[1]
# In float32 the rank sum and the single process's gradient differ by enough rounding that equal masks would be
# luck; in float64 the gaps deciding each mask are over MARGIN times the difference of the scores.
DTYPE = torch.float64
MARGIN = 1000

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built into this torch")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# scenarios with a structure (structure.py): their keyword arguments over CFG
STRUCTURED = {"fan_in": dict(structure="fan_in"), "two_four": dict(structure="2:4", dense_allocation=0.5)}
# compute="sparse" (compute.py) under DDP: compared with the single process computing densely
COMPUTE = {"sparse_compute": dict(compute="sparse")}
RESUME_AT = 7  # after the fold of the window's first backward pass, before its second one


def _is_update(step):
    return step % CFG["delta"] == 0 and step < CFG["T_end"]


def _accumulated(old_step):
    """Whether the backward pass run at (not yet incremented) `old_step` fills the accumulators."""
    return old_step < CFG["T_end"] and CFG["delta"] - old_step % CFG["delta"] <= CFG["grad_accumulation_n"]


def _expected_reduces(step):
    return int(_is_update(step) or _accumulated(step - 1))


def _data(seed, batch=GLOBAL_BATCH):
    return ((x.to(DTYPE), y) for x, y in batches(STEPS, seed=seed, batch=batch))


def _masks_cpu(pruner):
    return [None if m is None else m.detach().clone() for m in pruner.backward_masks]


def _gather_equal(masks):
    """True if every rank holds bit-identical masks (all_gather, so the check itself moves no masks)."""
    flat = torch.cat([m.reshape(-1).to(torch.uint8) for m in masks if m is not None])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(out[0], o) for o in out[1:])


def _build(rank, scenario, ckpt=None):
    torch.manual_seed(MODEL_SEED + (rank if scenario == "wrap_after" else 0))
    model = MLP().to(DTYPE)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if scenario != "wrap_after":
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
    # a different global RNG on each rank: without rank 0's masks being adopted at init they would differ
    torch.manual_seed(MASK_SEED + rank)
    pruner = RigLScheduler(model, opt, **{**CFG, **STRUCTURED.get(scenario, {}), **COMPUTE.get(scenario, {})},
                           state_dict=None if ckpt is None else ckpt["pruner"], in_step=scenario == "in_step")
    if scenario == "wrap_after":
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, opt, pruner


def _resume_from_rank0(rank, model, opt, pruner, path):
    """Rank 0 alone writes the checkpoint (as scripts do); every rank rebuilds from that file."""
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()},
                   path)
    dist.barrier()
    pruner.remove()
    return _build(rank, "resume", torch.load(path))


def _train(rank, scenario, out_dir):
    """One DDP run. 'wrapped': the scheduler is given the DDP module. 'wrap_after': it is given the bare
    model, which DDP wraps afterwards (each rank starting from different weights, so DDP's broadcast of rank
    0's weights matters). 'poison': rank 1 alone finds inf in its accumulator at the first update.
    'no_sync': each rank's shard in 2 micro-batches, the first under DDP's no_sync()."""
    model, opt, pruner = _build(rank, scenario)

    calls = {"all_reduce": 0, "broadcast": 0}
    real = {k: getattr(dist, k) for k in calls}

    def counting(name):
        def f(*a, **k):
            calls[name] += 1
            return real[name](*a, **k)
        return f

    for k in calls:  # DDP's reducer talks to the process group from C++, so only rigl_fast is counted here
        setattr(dist, k, counting(k))
    try:
        log = {"init": _masks_cpu(pruner), "init_equal": _gather_equal(pruner.backward_masks),
               "equal_after_call": [], "reduces": [], "grad_masked": [], "updates": [], "warnings": [],
               "scores": []}
        per = GLOBAL_BATCH // WORLD
        for x, y in _data(DATA_SEED):
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
            opt.zero_grad()
            if scenario == "no_sync":
                with model.no_sync():
                    (F.cross_entropy(model(x[:per // 2]), y[:per // 2]) / 2).backward()
                (F.cross_entropy(model(x[per // 2:]), y[per // 2:]) / 2).backward()
            else:
                F.cross_entropy(model(x), y).backward()
            log["grad_masked"].append(all(bool((w.grad[~m] == 0).all())
                                          for w, m in zip(pruner.W, pruner.backward_masks) if m is not None))
            if scenario == "poison" and rank == 1 and pruner.step + 1 == CFG["delta"]:
                acc = next(h.dense_grad for h in pruner.backward_hook_objects if h.dense_grad is not None)
                acc[0, 0] = float("inf")
            if scenario == "nograd_one_rank" and rank == 1 and pruner.step + 1 == CFG["delta"]:
                for h in pruner.backward_hook_objects:  # rank 1 reaches the first update with nothing accumulated
                    h.dense_grad = None
            if _is_update(pruner.step + 1):
                log["scores"].append(update_scores(pruner))
            before = calls["all_reduce"]
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                if scenario == "in_step":  # the optimizer's step advances the schedule and updates
                    done = pruner.rigl_steps
                    opt.step()
                    go = pruner.rigl_steps == done
                else:
                    go = pruner()
            log["warnings"] += [pruner.step for r in rec if issubclass(r.category, RuntimeWarning)]
            log["reduces"].append(calls["all_reduce"] - before)
            if go and scenario != "in_step":
                opt.step()
            if not go:
                log["updates"].append(_masks_cpu(pruner))
            log["equal_after_call"].append(_gather_equal(pruner.backward_masks))
            if scenario in ("resume", "from_one") and pruner.step == RESUME_AT:
                assert any(h.dense_grad is not None for h in pruner.backward_hook_objects), "not inside a window"
                if scenario == "resume":
                    log["checkpoint"] = os.path.join(out_dir, "ck.pt")
                    model, opt, pruner = _resume_from_rank0(rank, model, opt, pruner, log["checkpoint"])
                else:  # one process's checkpoint of the same run (the fixture wrote it), resumed on every rank
                    pruner.remove()
                    model, opt, pruner = _build(rank, "resume", torch.load(os.path.join(out_dir, ONE_CKPT)))
    finally:
        for k in calls:
            setattr(dist, k, real[k])
    log["broadcasts_after_init"] = calls["broadcast"]
    log["skipped"] = pruner.skipped_updates
    log["weights"] = [w.detach().clone() for w in pruner.W]
    log["step"] = pruner.step
    return log


SCENARIOS = ("wrapped", "wrap_after", "poison", "no_sync", "nograd_one_rank", "resume", "from_one", "in_step",
             *STRUCTURED, *COMPUTE)
ONE_CKPT = "one_process.pt"  # one process's checkpoint at RESUME_AT, resumed by the 'from_one' scenario


def _worker(rank, port, out_dir):
    init_gloo(rank, port, WORLD, 60)
    try:
        torch.save({sc: _train(rank, sc, out_dir) for sc in SCENARIOS}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()  # only on success (helpers.py says why)


@functools.lru_cache(maxsize=None)
def _single_process(in_step=False, scenario=None):
    torch.manual_seed(MODEL_SEED)
    model = MLP().to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    torch.manual_seed(MASK_SEED)
    pruner = RigLScheduler(model, opt, **{**CFG, **STRUCTURED.get(scenario, {})}, in_step=in_step)
    updates, scores = [], []
    for x, y in _data(DATA_SEED):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if _is_update(pruner.step + 1):
            scores.append((update_scores(pruner), None))
        done = pruner.rigl_steps
        if in_step:
            opt.step()
        elif pruner():
            opt.step()
        if pruner.rigl_steps != done:
            updates.append(_masks_cpu(pruner))
            scores[-1] = (scores[-1][0], pruner.cosine_annealing())
    units = [u for u, m in zip(pruner._units, pruner.backward_masks) if m is not None]
    return updates, [w.detach().clone() for w in pruner.W], scores, units


def _one_process(steps):
    """One process on the global batch (as _single_process), the first `steps` steps: model, optimizer, pruner."""
    torch.manual_seed(MODEL_SEED)
    model = MLP().to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    torch.manual_seed(MASK_SEED)
    pruner = RigLScheduler(model, opt, **CFG)
    for _, (x, y) in zip(range(steps), _data(DATA_SEED)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if pruner():
            opt.step()
    return model, opt, pruner


@pytest.fixture(scope="module")
def ddp_logs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    model, opt, pruner = _one_process(RESUME_AT)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, out / ONE_CKPT)
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_masks_identical_on_every_rank_after_every_call(ddp_logs, scenario):
    logs = [log[scenario] for log in ddp_logs]
    for log in logs:
        assert log["init_equal"], "ranks started with different masks"
        assert log["equal_after_call"] == [True] * STEPS
        assert log["step"] == STEPS
        assert all(log["grad_masked"]), "a DDP-averaged gradient was nonzero off the mask"
    for a, b in zip(logs[0]["weights"], logs[1]["weights"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_all_reduces_only_on_updates_and_folds_and_no_mask_broadcast(ddp_logs, scenario):
    expected = [_expected_reduces(s) for s in range(1, STEPS + 1)]
    assert sum(_is_update(s) for s in range(1, STEPS + 1)) >= 4 and sum(expected) > sum(map(_is_update, range(1, STEPS + 1)))
    for log in ddp_logs:
        assert log[scenario]["reduces"] == expected
        assert log[scenario]["broadcasts_after_init"] == 0


def test_non_finite_on_one_rank_skips_the_update_on_all(ddp_logs):
    logs = [log["poison"] for log in ddp_logs]
    for log in logs:
        assert log["skipped"] == 1 and log["warnings"] == [CFG["delta"]]
        assert all(a is None or torch.equal(a, b) for a, b in zip(log["updates"][0], log["init"])), \
            "the skipped update moved the masks"
    clean = ddp_logs[0]["wrapped"]
    assert clean["skipped"] == 0 and clean["warnings"] == []
    # the skipped update left rank 0's masks where the clean run's update moved them
    assert any(not torch.equal(a, b) for a, b in zip(logs[0]["updates"][0], clean["updates"][0]) if a is not None)


@pytest.mark.parametrize("scenario", ["wrapped", "wrap_after", "no_sync", "in_step", "from_one", *STRUCTURED,
                                      *COMPUTE])
def test_same_masks_as_one_process_on_the_global_batch(ddp_logs, scenario):
    """'from_one': resumed on both ranks from one process's checkpoint inside a window (its accumulator holds one
    copy of the global gradient, the ranks' sum two: the loaded part is rescaled, else the margin check fails)."""
    ref_updates, ref_weights, ref_scores, units = _single_process(in_step=scenario == "in_step", scenario=scenario)
    assert all(log[scenario]["skipped"] == 0 and log[scenario]["warnings"] == [] for log in ddp_logs)
    got = ddp_logs[0][scenario]["updates"]
    assert len(got) == len(ref_updates) == sum(_is_update(s) for s in range(1, STEPS + 1))
    changed = 0
    prev = None
    for k, (a, b) in enumerate(zip(got, ref_updates)):
        for la, lb in zip(a, b):
            assert (la is None) == (lb is None)
            if la is not None:
                assert torch.equal(la, lb), f"update {k}: DDP masks differ from the single-process run"
        if prev is not None:
            changed += any(not torch.equal(x, y) for x, y in zip(a, prev) if x is not None)
        prev = a
    assert changed == len(got) - 1, "some update did not move the topology: the comparison would be vacuous"
    _assert_margin([log[scenario]["scores"] for log in ddp_logs], ref_scores,
                   units if scenario in STRUCTURED else None)
    for a, b in zip(ddp_logs[0][scenario]["weights"], ref_weights):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _assert_margin(rank_scores, ref_scores, units=None):
    """At every update, the single process's scores and the ranks' (weights; accumulators summed over the
    ranks, over world_size) differ by far less than the gaps that decide the masks: equal masks are no luck."""
    assert len(ref_scores) == len(rank_scores[0]) >= 4
    for k, (ref, f) in enumerate(ref_scores):
        summed = [(rank_scores[0][k][i][0], sum(r[k][i][2] for r in rank_scores if r[k][i][2] is not None) / WORLD)
                  for i in range(len(ref))]
        assert_selection_margin(ref, summed, f, MARGIN, units)


def test_example_script_under_torchrun(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(REPO / "examples" / "ddp_train.py"), "--steps", "40",
           "--delta", "10", "--t-end", "30"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the two ranks share one stdout pipe, so a line of one can run into a line of the other: find the
    # digests (16 hex digits) anywhere rather than line by line
    found = dict(re.findall(r"masks-digest rank (\d) ([0-9a-f]{16})", res.stdout))
    assert sorted(found) == ["0", "1"], res.stdout
    assert found["0"] == found["1"], f"ranks ended with different masks: {found}"


def test_a_rank_without_gradient_neither_hangs_nor_skips(ddp_logs):
    """The skip decision is collective: rank 1 had no accumulator at the first update, rank 0 had one; both
    take part in the one all-reduce and both update from rank 0's gradient (the other scenarios' checks of
    equal masks and one all-reduce per update run on this scenario too)."""
    logs = [log["nograd_one_rank"] for log in ddp_logs]
    for log in logs:
        assert log["skipped"] == 0 and log["warnings"] == []
    first = logs[0]["updates"][0]
    assert any(not torch.equal(a, b) for a, b in zip(first, logs[0]["init"]) if a is not None)


def test_a_window_saved_by_two_ranks_resumes_in_one_process(ddp_logs):
    """Rank 0's checkpoint inside a window (the ranks' summed accumulator: two copies of the global gradient),
    loaded in one process: its accumulator is the one process's at that step, and every later update's masks are
    the one process's. Before the state dict recorded the copies, the loaded part counted twice."""
    ck = torch.load(ddp_logs[0]["resume"]["checkpoint"])
    assert ck["pruner"]["rigl_fast_dense_grads_copies"] == WORLD
    torch.manual_seed(MODEL_SEED)
    model = MLP().to(DTYPE)
    model.load_state_dict(ck["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    opt.load_state_dict(ck["opt"])
    pruner = RigLScheduler(model, opt, **CFG, state_dict=ck["pruner"])
    _, _, ref = _one_process(RESUME_AT)
    accs = [(h.dense_grad, r.dense_grad) for h, r in zip(pruner.backward_hook_objects, ref.backward_hook_objects)]
    assert any(a is not None for a, _ in accs)
    for a, r in accs:
        assert (a is None) == (r is None)
        if a is not None:
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    updates = []
    for x, y in list(_data(DATA_SEED))[RESUME_AT:]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if pruner():
            opt.step()
        else:
            updates.append(_masks_cpu(pruner))
    want = _single_process()[0][-len(updates):]
    assert len(updates) >= 4
    for a, b in zip(updates, want):
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def test_resume_inside_an_accumulation_window_is_exact(ddp_logs):
    """Rank 0's checkpoint, written between the two backward passes of a window and loaded on every rank,
    continues exactly as the run never stopped: same masks at every later update, same final weights."""
    for log in ddp_logs:
        resumed, plain = log["resume"], log["wrapped"]
        assert resumed["skipped"] == plain["skipped"] == 0
        assert len(resumed["updates"]) == len(plain["updates"]) >= 4
        for a, b in zip(resumed["updates"], plain["updates"]):
            assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))
        for a, b in zip(resumed["weights"], plain["weights"]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- process_group: the data-parallel group of a larger world

def _group_worker(rank, port, out_dir):
    """4 ranks, two data-parallel groups {0, 1} and {2, 3}, each training on its own data stream."""
    init_gloo(rank, port, 4, 60)
    try:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        group = groups[rank // 2]
        torch.manual_seed(MODEL_SEED)
        model = torch.nn.parallel.DistributedDataParallel(MLP().to(DTYPE), process_group=group)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        torch.manual_seed(MASK_SEED + rank)  # each group's first rank's masks must win within the group
        pruner = RigLScheduler(model, opt, **CFG, process_group=group)
        init = _masks_cpu(pruner)
        per, local = GLOBAL_BATCH // 2, rank % 2
        updates = []
        for x, y in _data(DATA_SEED + rank // 2):
            opt.zero_grad()
            F.cross_entropy(model(x[local * per:(local + 1) * per]), y[local * per:(local + 1) * per]).backward()
            if pruner():
                opt.step()
            else:
                updates.append(_masks_cpu(pruner))
        torch.save({"init": init, "updates": updates, "weights": [w.detach().clone() for w in pruner.W]},
                   os.path.join(out_dir, f"group-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()  # only on success (helpers.py says why)


@pytest.fixture(scope="module")
def group_logs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_groups")
    mp.spawn(_group_worker, args=(_free_port(), str(out)), nprocs=4, join=True)
    return [torch.load(out / f"group-rank{r}.pt") for r in range(4)]


def _same(a, b):
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def test_process_group_agrees_within_each_group_only(group_logs):
    for a, b in ((0, 1), (2, 3)):
        assert _same(group_logs[a]["init"], group_logs[b]["init"])
        assert len(group_logs[a]["updates"]) == len(group_logs[b]["updates"]) >= 4
        assert all(_same(x, y) for x, y in zip(group_logs[a]["updates"], group_logs[b]["updates"]))
        assert all(torch.equal(x, y) for x, y in zip(group_logs[a]["weights"], group_logs[b]["weights"]))
    # the groups started from different masks and saw different data: nothing was summed across them
    assert not _same(group_logs[0]["init"], group_logs[2]["init"])
    assert not _same(group_logs[0]["updates"][-1], group_logs[2]["updates"][-1])
    # group {0, 1} is the single process on its global batch (same model, mask and data seeds)
    ref_updates, *_ = _single_process()
    assert all(_same(x, y) for x, y in zip(group_logs[0]["updates"], ref_updates))


def test_process_group_is_checked():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="process_group was given but torch.distributed is not initialised"):
        RigLScheduler(model, opt, **CFG, process_group=object())
