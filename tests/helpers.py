"""Small models and a training loop shared by the tests (no torchvision)."""
import importlib.util
import os

import pytest
import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Identity()  # not None: rigl-torch 0.5.2's model walk crashes on None submodules
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class SmallResNet(nn.Module):
    """conv + BN + residual blocks + linear, ResNet-shaped, for 1x8x8 inputs."""

    def __init__(self, width=8, n_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MLP(nn.Module):
    def __init__(self, sizes=(64, 48, 32, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def tiny_gpt2(**config):
    """A one-layer GPT-2 (n_embd 32, 2 heads, vocabulary 64, 16 positions; transformers imported here, skipped
    where it is missing), dropout off unless `config` says otherwise; built after torch.manual_seed(0)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **config}))


def batches(n_steps, seed=0, batch=16, shape=(1, 8, 8), n_classes=10, device="cpu"):
    """A fixed, generic (tie-free) stream of random batches."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        x = torch.randn((batch,) + tuple(shape), generator=g)
        y = torch.randint(0, n_classes, (batch,), generator=g)
        yield x.to(device), y.to(device)


def train(model, optimizer, pruner, data, on_step=None):
    """The rigl-torch loop: backward, then `if pruner(): optimizer.step()`. Returns pruner()'s results."""
    returns = []
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if on_step is not None:
            on_step("after_backward")
        r = pruner()
        returns.append(r)
        if r:
            optimizer.step()
        if on_step is not None:
            on_step("after_step" if r else "after_update")
    return returns


def assert_same_updates(updates, ref_updates, count=2):
    """Masks recorded after each topology update equal the reference run's bit for bit, and the first two
    differ from each other (the updates really moved weights)."""
    assert len(updates) == len(ref_updates) == count
    for a, b in zip(updates, ref_updates):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(updates[0], updates[1]))


def trained_model_and_adam(seed=0, data_seed=0):
    """A model whose weights, grads and Adam states are all dense and non-trivial."""
    torch.manual_seed(seed)
    model = SmallResNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in batches(2, seed=data_seed):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def init_gloo(rank, port, world, timeout_s=60):
    """A spawned rank's gloo process group on the loopback, one thread per rank (ranks share a small CPU:
    oversubscribed threads only slow them down), with a bounded timeout: a rank left waiting in a collective
    fails the test instead of hanging the suite."""
    import datetime
    import torch.distributed as dist
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def exit_spawned_rank():
    """Ends a spawned rank's process once its work is done, its results are saved and its process group is
    destroyed: os._exit(0), without interpreter finalization. gloo's transport threads can still run while the
    interpreter tears down and crash a rank after a correct run (a NULL read in pt_gloo_runloop, SIGSEGV; or
    "terminate called without an active exception", SIGABRT), which mp.spawn reports as that rank's failure: seen in
    2 of 4 full-suite runs on 2026-12-07 (dmesg put the SIGSEGV in pt_gloo_runloop). Called only after success: a
    rank that raises still fails through mp.spawn's error path."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def threaded_ranks(world, fn):
    """fn(rank, all_sum, ties_before) on `world` threads standing in for ranks, the results in rank order:
    all_sum(t) sums t over the ranks, ties_before(c) sums c over the ranks before this one (the two collectives
    of distributed.py's radix selects), on copies of the posted tensors."""
    import threading
    barrier = threading.Barrier(world)
    posted, results, errors = [None] * world, [None] * world, []

    def exchange(r, t):
        posted[r] = t.clone()
        barrier.wait()
        got = list(posted)
        barrier.wait()  # nobody posts the next round before everyone has read this one
        return got

    def run(r):
        try:
            results[r] = fn(r, lambda t: sum(exchange(r, t)), lambda c: sum(exchange(r, c)[:r], torch.zeros_like(c)))
        except BaseException as e:  # pragma: no cover
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _boundaries(keys, need):
    """keys (rows, n), each row selecting its `need` largest (ties to the lower index, as every backend). Returns
    the least gap deciding a row's selection, less the float32 rounding that could close it (the backends
    compare |values| rounded to float32: an ulp on each side), and per position the id of the boundary
    tie it is in (-1 if none). An exact tie across a boundary is decided by index: its gap is the tied value's
    distance to the nearest other values above and below, and the run compared must tie those positions too."""
    v = torch.sort(keys, dim=1, descending=True).values
    rows = ((need > 0) & (need < keys.shape[1])).nonzero().flatten()
    k = need[rows].unsqueeze(1)
    v, r_keys = v[rows], keys[rows]
    a, b = v.gather(1, k - 1), v.gather(1, k)
    tied = a == b
    inf = torch.tensor(float("inf"))
    above = torch.where(v > a, v, inf).min(1, keepdim=True).values - a
    below = a - torch.where(v < a, v, -inf).max(1, keepdim=True).values
    eps = torch.finfo(torch.float32).eps  # a float32 ulp of x is at most eps * x: less eps * (upper + lower)
    gaps = torch.where(tied, torch.minimum(above * (1 - eps) - 2 * eps * a, below * (1 + eps) - 2 * eps * a),
                       a * (1 - eps) - b * (1 + eps))  # written so that an infinite gap stays inf, not nan
    ids = torch.full_like(keys, -1, dtype=torch.long)
    ids[rows] = torch.where(tied & (r_keys == a), rows.unsqueeze(1), -1)
    return (gaps.min().item() if gaps.numel() else float("inf")), ids


def _selection(w, mask, score, n_drop, units=None):
    """(gap, keep tie ids, grow tie ids) of one topology update (SPEC §4, §8): the keep boundary among the
    active |w| of the whole layer, the grow boundary among the scores of the positions not kept (with a
    structure, ops.Units `units`: each unit's own). Tie ids are flat, in the layer's order."""
    from rigl_fast.ops import from_units, units_of
    n_keep = int(mask.sum()) - n_drop
    keep_key = torch.where(mask, w.abs().float(), -1.0).flatten()  # below every |w|: an inactive one is never kept
    kept = torch.zeros_like(keep_key, dtype=torch.bool)
    kept[torch.sort(keep_key, descending=True, stable=True).indices[:n_keep]] = True
    keep_gap, keep_ties = _boundaries(keep_key[None], torch.tensor([n_keep]))
    grow_key = torch.where(kept, -1.0, score.abs().float().flatten())
    if units is None:
        grow_gap, grow_ties = _boundaries(grow_key[None], torch.tensor([n_drop]))
        return min(keep_gap, grow_gap), keep_ties[0], grow_ties[0]
    need = units.target - units_of(kept, units).sum(1)  # each unit grows to its target
    grow_gap, grow_ties = _boundaries(units_of(grow_key, units), need)
    return min(keep_gap, grow_gap), keep_ties[0], from_units(grow_ties, units)


def selection_gap(w, mask, score, n_drop, units=None):
    """At one topology update, the least gap deciding the masks (`_boundaries`): between a selected and the
    first unselected |value|, as the backends compare them, less their rounding to float32. Two runs whose
    scores differ by less than half of it, and that tie exactly where this run ties at a boundary, select the
    same masks; a test comparing masks across different arithmetic asserts that, so it cannot pass by luck."""
    return _selection(w, mask, score, n_drop, units)[0]


def update_scores(pruner):
    """Just before a topology update: each sparse layer's weight, mask and grow-score accumulator (None where
    this process has none), cloned."""
    return [(w.detach().clone(), m.clone(), None if h.dense_grad is None else h.dense_grad.clone())
            for w, m, h in zip(pruner.W, pruner.backward_masks, pruner.backward_hook_objects) if m is not None]


def _same_within(values, ids):
    """Whether the values at the positions of each tie id (>= 0) are all equal."""
    at = ids >= 0
    if not at.any():
        return True
    v, i = values.flatten()[at], ids[at]
    top = torch.full((int(i.max()) + 1,), -float("inf"), dtype=v.dtype).scatter_reduce(0, i, v, "amax")
    low = torch.full_like(top, float("inf")).scatter_reduce(0, i, v, "amin")
    return bool((top[i] == low[i]).all())


def assert_selection_margin(ref, other, drop_fraction, margin=1000, units=None):
    """ref: update_scores() of a reference run before an update; other: (weight, grow score) per layer of a run
    with other arithmetic (compiled, DDP, micro-batches, FSDP2) at the same update; units: per layer, its
    ops.Units under a structure. Equal masks are asserted only where every gap deciding them is over `margin`
    times the largest difference of the scores, and `other` ties exactly where `ref` ties at a boundary.
    Returns the least ratio gap / difference (for reports)."""
    assert len(ref) == len(other)
    least = float("inf")
    for i, ((w0, m0, g0), (w, g)) in enumerate(zip(ref, other)):
        diff = max((w - w0).abs().max().item(), (g - g0).abs().max().item())
        gap, keep_ties, grow_ties = _selection(w0, m0, g0, int(int(m0.sum()) * drop_fraction),
                                               None if units is None else units[i])
        assert gap > margin * diff, f"layer {i}: equal masks would be luck: gap {gap:.3g}, scores differ {diff:.3g}"
        assert _same_within(w.abs().float(), keep_ties) and _same_within(g.abs().float(), grow_ties), \
            f"layer {i}: a tie at a selection boundary is not a tie in the other run"
        least = min(least, gap / diff if diff else float("inf"))
    return least


# Every argument RigLScheduler checks without a model, badly set: (keywords, error type, the name the error says).
# The framework callbacks must raise these at construction, through the same code (config.check_keywords).
BAD_SCHEDULER_KEYWORDS = [
    (dict(structure="bogus"), ValueError, "structure"),
    (dict(structure="2:4", dense_allocation=0.3), ValueError, "dense_allocation"),
    (dict(sharded_init="bogus"), ValueError, "sharded_init"),
    (dict(grow_mode="bogus"), ValueError, "grow_mode"),
    (dict(include="net.*"), TypeError, "include"),
    (dict(exclude="lm_head"), TypeError, "exclude"),
    (dict(process_group=object()), ValueError, "process_group"),
    (dict(erk_power_scale=float("nan")), ValueError, "erk_power_scale"),
    (dict(sparsify_tied=1), TypeError, "sparsify_tied"),
    (dict(compute="bogus"), ValueError, "compute"),
]


NO_CPP_ENV = "RIGL_FAST_TESTS_NO_CPP"


def backend_or_fail(name, device):
    """The named backend for tests that compare it with the reference. A backend that cannot run fails the test,
    with its reason: a broken C++ build or a broken kernels module must fail the suite, not turn into skips. Two
    exceptions skip, saying why: triton not installed at all, and the C++ backend on a machine declared to have
    no C++ toolchain (RIGL_FAST_TESTS_NO_CPP=1)."""
    from rigl_fast.ops import get_backend
    try:
        return get_backend(name, torch.device(device))
    except RuntimeError as e:
        if name == "triton" and importlib.util.find_spec("triton") is None:
            pytest.skip(f"triton is not installed: {e}")
        if name == "cpp":
            cpp_unavailable(e)
        pytest.fail(f"the {name} backend cannot run: {e}", pytrace=False)


def cpp_unavailable(e):
    """A C++ build or load that failed: the test fails with the reason, or skips where RIGL_FAST_TESTS_NO_CPP=1
    declares a machine without a C++ toolchain."""
    if os.environ.get(NO_CPP_ENV) == "1":
        pytest.skip(f"{NO_CPP_ENV}=1 (no C++ toolchain here): {e}")
    pytest.fail(f"the C++ ops cannot be built or loaded: {e}; on a machine without a C++ toolchain set "
                f"{NO_CPP_ENV}=1", pytrace=False)
