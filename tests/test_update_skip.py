"""Issue 21 item 3: a sparse layer that got no gradient in the window before an update (an unused branch, an
MoE expert no token reached; or only exactly-zero gradients) keeps its mask at that update, while the other
layers update; stats() counts it. Every backend, and under DDP and FSDP2 (decided on the globally reduced
score, so every rank decides alike)."""
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from rigl_fast import RigLScheduler
from helpers import exit_spawned_rank, init_gloo

CFG = dict(dense_allocation=0.3, T_end=20, delta=3, grad_accumulation_n=2, ignore_linear_layers=False, alpha=0.5)


class Branches(nn.Module):
    """stem -> a or b (the router) -> head. `route`: 'both', 'a' (b unused: its hook never runs), or
    'zero' (b runs but its output is multiplied by 0: its gradient is exactly zero)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.route = "both"

    def forward(self, x):
        h = torch.relu(self.stem(x))
        out = self.a(h)
        if self.route == "both":
            out = out + self.b(h)
        elif self.route == "zero":
            out = out + 0.0 * self.b(h)
        return self.head(torch.relu(out))


def _data(step, rank=0):
    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def _masks(pruner):
    full = [m.full_tensor() if hasattr(m, "full_tensor") else m for m in pruner.backward_masks]
    return [None if m is None else m.detach().clone() for m in full]


def _train_to_first_update(model, opt, pruner, route_in_window, rank=0):
    """Trains to the first update (step delta); the window's backward passes use `route_in_window`."""
    for step in range(CFG["delta"]):
        model.route = route_in_window if pruner.check_if_backward_hook_should_accumulate_grad() else "both"
        x, y = _data(step, rank)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            go = pruner()
        if go:
            opt.step()
    return [str(r.message) for r in rec]


@pytest.mark.parametrize("structure", ["unstructured", "fan_in"])
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("route", ["a", "zero"])
def test_a_layer_without_gradient_keeps_its_mask_and_the_others_update(route, backend, structure):
    torch.manual_seed(0)
    model = Branches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = RigLScheduler(model, opt, backend=backend, structure=structure, **CFG)
    before = _masks(pruner)
    msgs = _train_to_first_update(model, opt, pruner, route)
    after = _masks(pruner)
    names = pruner.names
    assert pruner.rigl_steps == 1 and pruner.skipped_updates == 0
    assert torch.equal(after[names.index("b.weight")], before[names.index("b.weight")]), "b regrew without gradient"
    for n in ("a.weight", "head.weight"):
        assert not torch.equal(after[names.index(n)], before[names.index(n)]), f"{n} did not update"
    stats = pruner.stats()
    assert stats["layers_without_grad"] == 1 and stats["no_grad/b.weight"] == 1.0
    assert "regrown/b.weight" not in stats and stats["regrown/a.weight"] > 0
    assert any("1 sparse layer(s) got no gradient in the window (b.weight)" in m for m in msgs)
    # the count survives a checkpoint
    pruner.remove()
    again = RigLScheduler(model, opt, state_dict=pruner.state_dict(), backend=backend)
    assert again.stats()["layers_without_grad"] == 1


def test_when_no_layer_has_a_gradient_the_update_is_skipped_and_counted():
    torch.manual_seed(0)
    model = Branches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, backend="reference", **CFG)
    before = _masks(pruner)
    for step in range(CFG["delta"]):
        opt.zero_grad()
        (0.0 * model(_data(step)[0]).sum()).backward()  # every gradient exactly zero
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if pruner():
                opt.step()
    assert pruner.skipped_updates == 1 and any("gradient is zero" in str(r.message) for r in rec)
    assert all(a is None or torch.equal(a, b) for a, b in zip(before, _masks(pruner)))


# ---------------------------------------------------------------- DDP and FSDP2: 2 processes on gloo
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_run(rank, routes):
    """DDP: rank r uses `routes[r]` in the window. Returns the masks before and after the first update."""
    torch.manual_seed(0)
    model = Branches()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    pruner = RigLScheduler(ddp, opt, backend="reference", **CFG)
    before = _masks(pruner)
    _train_to_first_update(model, opt, pruner, routes[rank], rank)
    return {"before": before, "after": _masks(pruner), "stats": pruner.stats(), "names": pruner.names}


def _fsdp_run(rank, mesh):
    """FSDP2: b unused in the window on every rank (FSDP2 reduce-scatters the same parameters everywhere)."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = fully_shard(Branches(), mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, backend="reference", **CFG)
    before = _masks(pruner)
    _train_to_first_update(model, opt, pruner, "a", rank)
    return {"before": before, "after": _masks(pruner), "stats": pruner.stats(), "names": pruner.names}


def _worker(rank, port, out_dir):
    init_gloo(rank, port, 2, 120)
    from torch.distributed.device_mesh import init_device_mesh
    try:
        out = {"ddp_one_rank": _ddp_run(rank, ("both", "a")), "ddp_none": _ddp_run(rank, ("a", "a")),
               "fsdp2": _fsdp_run(rank, init_device_mesh("cpu", (2,)))}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()  # only on success (helpers.py says why)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo in this torch")
def test_ranks_decide_alike_on_the_reduced_score(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    logs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for run in ("ddp_one_rank", "ddp_none", "fsdp2"):
        r0, r1 = logs[0][run], logs[1][run]
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(r0["after"], r1["after"])), run
        b = [n.split(".")[-2] for n in r0["names"]].index("b")  # DDP's names start with module.
        kept = torch.equal(r0["after"][b], r0["before"][b])
        # one rank's gradient is enough: the summed score is not zero, so b updates on both
        assert kept == (run != "ddp_one_rank"), run
        assert r0["stats"]["layers_without_grad"] == r1["stats"]["layers_without_grad"] == int(kept), run
        a = [n.split(".")[-2] for n in r0["names"]].index("a")
        assert not torch.equal(r0["after"][a], r0["before"][a]), run
