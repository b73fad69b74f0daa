"""FSDP2: one topology update computed shard by shard by rigl_fast, against gathering each layer to one rank.

    python -m rigl_fast.bench.fsdp2            # 2 ranks on CPU (gloo): bench/results/<device>-fsdp2.{json,md}
    python -m rigl_fast.bench.fsdp2 --quick    # tiny layers, seconds: the smoke test (tests/test_bench.py runs it)

The bench process spawns the ranks (torch.multiprocessing, gloo, a file store: no port to pick); each rank
builds the same fully_shard-ed stack of Linear layers and a RigLScheduler on it, arms it as training would
leave it at the first update step (masked weights, momentum and .grad, a dense accumulated gradient), and
times the contenders, interleaved, from that same restored state, for the requested backend and for the
reference (one armed model each, identical):

- `rigl_fast[<backend>]`: `pruner._rigl_step()`, i.e. `update.rigl_step` with its sharded strategy;
- `gather[<backend>]`: what one writes without it: per layer, gather the weight, mask and score shards to
  rank 0, run `<backend>`'s whole-layer update there, scatter the new mask's shards back, and let every rank
  apply them to its own shards (weights, momentum, .grad).

Before timing, every contender's masks and weights are checked equal (the selection is exact).
See bench/README.md, "FSDP2", for what the numbers mean.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import report, timing, weightsets
from .suite import _rotate

HERE = os.path.dirname(os.path.abspath(__file__))
SPARSITY = 0.9
DELTA, T_END = 100, 1000  # the bench's first update: drop fraction alpha/2 * (1 + cos(pi delta / T_end)) = 0.29
BASELINE = "gather"


def weight_sets(quick: bool):
    if quick:
        return [("linear-64x64", [(64, 64)]), ("linear-512x512", [(512, 512)]),
                ("tiny-mlp", weightsets.WEIGHT_SETS["tiny-mlp"]())]
    return ([(f"linear-{d}x{d}", [(d, d)]) for d in (256, 1024, 2048, 4096)]
            + [("gpt2-small", weightsets.WEIGHT_SETS["gpt2-small"]())])


# ------------------------------------------------------------------------------------------ collective counts
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sent_bytes(op: str, args: dict) -> int:
    """The bytes this rank sends in one collective, as the textbook algorithm moves them: a ring all-reduce
    sends 2 (w-1)/w of its tensor, a ring all-gather (w-1) times its part; gather, reduce, scatter and
    broadcast send each non-root rank's part once. Summed over the ranks this is also what they receive."""
    group = args.get("group")
    w, me = dist.get_world_size(group), dist.get_rank(group)

    def is_root(key):  # torch names the root by global rank (dst/src) or by group rank (group_dst/group_src)
        if args.get("group_" + key) is not None:
            return me == args["group_" + key]
        root = args.get(key) or 0
        return me == (root if group is None else dist.get_group_rank(group, root))

    if op == "all_reduce":
        return _nbytes(args["tensor"]) * 2 * (w - 1) // w
    if op == "all_gather":
        return _nbytes(args["tensor"]) * (w - 1)
    if op == "all_gather_into_tensor":
        return _nbytes(args["input_tensor"]) * (w - 1)
    if op == "reduce_scatter_tensor":
        return _nbytes(args["input"]) * (w - 1) // w
    if op in ("gather", "reduce"):
        return 0 if is_root("dst") else _nbytes(args["tensor"])
    if op == "scatter":
        return sum(_nbytes(t) for r, t in enumerate(args["scatter_list"]) if r != me) if is_root("src") else 0
    if op == "broadcast":
        return _nbytes(args["tensor"]) * (w - 1) if is_root("src") else 0
    raise ValueError(op)


COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "gather", "reduce",
           "scatter", "broadcast")


class Collectives:
    """While open, torch.distributed's collectives are wrapped: calls, bytes this rank sends (`sent_bytes`) and
    the wall time spent inside them are counted. Both torch.distributed and distributed_c10d hold the
    functions, and code reaches them through either, so both are patched."""

    def __init__(self):
        self.calls, self.sent, self.seconds = 0, 0, 0.0
        self._saved = {}

    def _wrap(self, op, fn):
        sig = inspect.signature(fn)

        def counted(*a, **k):
            self.calls += 1
            self.sent += sent_bytes(op, sig.bind(*a, **k).arguments)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t
        return counted

    def __enter__(self):
        c10d = dist.distributed_c10d
        for op in COUNTED:
            self._saved[op] = getattr(dist, op)
            wrapped = self._wrap(op, self._saved[op])
            setattr(dist, op, wrapped)
            setattr(c10d, op, wrapped)
        return self

    def __exit__(self, *exc):
        for op, fn in self._saved.items():
            setattr(dist, op, fn)
            setattr(dist.distributed_c10d, op, fn)
        return False


# ------------------------------------------------------------------------------------------ the contenders
class Armed:
    """A fully_shard-ed stack of Linear layers with a RigLScheduler, in the state training leaves at an update
    step; `restore()` puts it back there before every timed update, so every contender does the same work."""

    @torch.no_grad()  # local shards taken under autograd are views it forbids writing to
    def __init__(self, shapes, mesh, backend: str):
        from torch.distributed.fsdp import fully_shard
        from rigl_fast import RigLScheduler
        from rigl_fast.sharding import like, local

        torch.manual_seed(0)  # the same full weights on every rank: fully_shard keeps each rank's rows of them
        self.model = weightsets.build_module(shapes, [torch.randn(s) for s in shapes])
        for layer in self.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.pruner = RigLScheduler(self.model, self.opt, dense_allocation=1 - SPARSITY, T_end=T_END, delta=DELTA,
                                    sparsity_distribution="uniform", ignore_linear_layers=False, alpha=0.3,
                                    backend=backend)
        p = self.pruner
        self.idx = p._sparse_layers()
        g = torch.Generator().manual_seed(1000 + dist.get_rank())
        self.saved = []
        for i in self.idx:
            w, m = p.W[i], local(p.backward_masks[i])

            def draw(masked):
                x = torch.randn(local(w).shape, generator=g)
                return x.masked_fill_(~m, 0) if masked else x
            w.grad = like(w, draw(True))  # masked by the hooks during backward
            self.opt.state[w]["momentum_buffer"] = like(w, draw(True))
            acc = like(w, draw(False))  # the dense gradient accumulated over the window: the grow scores
            live = (local(w), m, local(self.opt.state[w]["momentum_buffer"]), local(w.grad))
            self.saved.append((live, [t.clone() for t in live], acc))

    @torch.no_grad()
    def restore(self):
        for i, (live, pristine, acc) in zip(self.idx, self.saved):
            for dst, src in zip(live, pristine):
                dst.copy_(src)
            self.pruner.backward_hook_objects[i].dense_grad = acc  # read, never written, by an update
        self.pruner.step = DELTA

    def local_state(self):
        """Copies of this rank's weight and mask shards."""
        return [t.clone() for i, (live, _, _) in zip(self.idx, self.saved) for t in live[:2]]


def _lengths(w, world):
    """Every rank's shard length of FSDP2-sharded `w` (dim 0 in chunks of ceil(d0 / world) rows)."""
    d0, row = w.shape[0], weightsets.numel(w.shape[1:])
    c = -(-d0 // world)
    return [max(0, min(c, d0 - r * c)) * row for r in range(world)]


def _pad(flat: torch.Tensor, n: int) -> torch.Tensor:
    """gloo's gather and scatter take equally sized parts from every rank."""
    if flat.numel() == n:
        return flat
    out = flat.new_zeros(n)
    out[:flat.numel()] = flat
    return out


@torch.no_grad()
def gather_update(pruner) -> None:
    """The baseline update, layer by layer so that one rank holds one whole layer at a time: rank 0 gathers the
    weight, mask and score shards, runs the pruner's backend's whole-layer update on them and scatters the new
    mask; every rank then commits its shards as the sharded update does (the same backend's commit)."""
    from rigl_fast.sharding import local
    group = pruner.process_group
    world, me, root = dist.get_world_size(group), dist.get_rank(group), dist.get_global_rank(group, 0)
    idx = pruner._sparse_layers()
    n_keep, n_grow = pruner._drop_counts(idx, pruner.cosine_annealing())
    for i, k, g in zip(idx, n_keep, n_grow):
        w, hook = pruner.W[i], pruner.backward_hook_objects[i]
        mask = local(pruner.backward_masks[i])
        lengths = _lengths(w, world)
        n = max(lengths)
        whole_layer = []
        for t in (local(w), mask.view(torch.uint8), local(hook.dense_grad)):
            parts = [torch.empty(n, dtype=t.dtype) for _ in range(world)] if me == 0 else None
            dist.gather(_pad(t.reshape(-1), n), parts, dst=root, group=group)
            if me == 0:
                whole_layer.append(torch.cat([p[:m] for p, m in zip(parts, lengths)]).view(w.shape))
        hook.dense_grad = None  # consumed, as the scheduler frees it
        pieces = None
        if me == 0:
            fw, fm, fs = whole_layer
            fm = fm.view(torch.bool)
            pruner._ops.update([fw], [fm], [fs], [k], [g], [[]], [None])
            pieces = [_pad(p, n) for p in fm.view(torch.uint8).reshape(-1).split(lengths)]
        new = torch.empty(n, dtype=torch.uint8)
        dist.scatter(new, pieces, src=root, group=group)
        new = new[:lengths[me]].view(torch.bool)
        pruner._ops.commit([local(w)], [mask], [new], [torch.zeros_like(new)], [pruner._states_like(w)],
                           [None if w.grad is None else local(w.grad)])


# ------------------------------------------------------------------------------------------ one rank
def _measure(name, shapes, mesh, repeats, backend, log) -> List[dict]:
    # one armed model per backend (the requested one, and the reference), identical down to the masks, each
    # updated by rigl_fast and by the baseline with that backend's ops
    armed = [Armed(shapes, mesh, backend)]
    if armed[0].pruner.backend != "reference":
        armed.append(Armed(shapes, mesh, "reference"))
    contenders = {}
    for a in armed:
        p = a.pruner
        contenders[f"rigl_fast[{p.backend}]"] = (a, p._rigl_step)
        contenders[f"{BASELINE}[{p.backend}]"] = (a, functools.partial(gather_update, p))
    names = list(contenders)

    # warm-up and the premise: every contender ends at the same masks and weights
    ends = []
    for n in names:
        a, update = contenders[n]
        a.restore()
        update()
        ends.append(a.local_state())
    same = all(torch.equal(x, y) for e in ends[1:] for x, y in zip(ends[0], e))
    flag = torch.tensor([int(same)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)

    mine: Dict[str, dict] = {n: {"s": [], "sent": [], "calls": [], "in_collectives": [], "peak": None}
                             for n in names}
    for r in range(repeats):
        for n in _rotate(names, r):
            a, update = contenders[n]
            a.restore()
            last = r == repeats - 1
            pm = timing.PeakMemory(torch.device("cpu"))
            with pm if last else contextlib.nullcontext():  # its set-up (malloc_trim) only in the last repeat
                dist.barrier()  # every rank starts the update together
                with Collectives() as c:
                    t = time.perf_counter()
                    update()
                    t = time.perf_counter() - t
            s = mine[n]
            if last:
                s["peak"] = pm.bytes
            s["s"].append(t), s["sent"].append(c.sent), s["calls"].append(c.calls)
            s["in_collectives"].append(c.seconds)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)

    n_sparse = sum(weightsets.numel(shapes[i]) for i in a.idx)
    rows = []
    for n in names:
        ranks = [e[n] for e in every]
        sent = [x["sent"] for x in ranks]
        if any(len(set(s)) != 1 for s in sent):
            raise RuntimeError(f"{name} {n}: the bytes sent changed between repeats: {sent}")
        rows.append(dict(set=name, n_layers=len(a.idx), n_sparse=n_sparse, sparsity=SPARSITY,
                         dtype="fp32", contender=n, backend=contenders[n][0].pruner.backend,
                         # an update ends when its slowest rank does
                         latency=timing.stats([max(x["s"][r] for x in ranks) for r in range(repeats)]),
                         sent_bytes=sum(s[0] for s in sent), sent_bytes_per_rank=[s[0] for s in sent],
                         calls_per_rank=[x["calls"][0] for x in ranks],
                         in_collectives_per_rank=[timing.stats(x["in_collectives"]) for x in ranks],
                         peak_extra_bytes_per_rank=[x["peak"] for x in ranks],
                         same_result=bool(flag.item())))
    if dist.get_rank() == 0:
        log(f"  {name} ({len(a.idx)} sparse layers, {n_sparse / 1e6:.3g}M): " + ", ".join(
            f"{r['contender']} {r['latency']['median'] * 1e3:.1f} ms, {r['sent_bytes'] / 1e6:.3g} MB"
            for r in rows))
    for a in armed:
        a.pruner.remove()
    return rows


def _worker(rank, world, store, sets, repeats, backend, threads, out_path):
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.set_num_threads(threads)  # the ranks share the machine's cores
    try:
        mesh = init_device_mesh("cpu", (world,))
        rows = []
        for name, shapes in sets:
            rows += _measure(name, shapes, mesh, repeats, backend, log=lambda m: print(m, flush=True))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
        dist.barrier()  # a rank tearing gloo down while another still talks to it aborts that one
    finally:
        dist.destroy_process_group()
    # done and saved: end without interpreter finalization, where gloo's transport threads can still crash a rank
    # after a correct run (SIGABRT "terminate called without an active exception", or SIGSEGV in pt_gloo_runloop),
    # which mp.spawn reports as a failed run (tests/helpers.py: exit_spawned_rank). Only reached on success.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------ report
def _mb(b: int) -> str:
    return f"{b / 1e6:.3g} MB" if b >= 1e5 else f"{b / 1e3:.3g} kB"


def _cfg(r):
    return r["set"], str(r["n_layers"]), f"{r['n_sparse'] / 1e6:.3g}M"


def ratios(rows) -> List[dict]:
    """rigl_fast / the baseline on the same backend and weight set: latency medians and bytes, one run."""
    out = []
    for r in rows:
        if r["contender"].startswith("rigl_fast"):
            for b in rows:
                if _cfg(b) == _cfg(r) and b["contender"] == f"{BASELINE}[{r['backend']}]":
                    out.append(dict(r, contender=f"{r['contender']} / {b['contender']}",
                                    time=r["latency"]["median"] / b["latency"]["median"],
                                    bytes=r["sent_bytes"] / b["sent_bytes"]))
    return out


def markdown(res) -> str:
    m, rows = res["meta"], res["rows"]
    head = ["weights", "sparse layers", "sparse"]
    L = [f"# rigl_fast FSDP2 benchmark: {m['device_name']} ({res['world']} ranks, gloo)", "",
         f"{m['date']} · commit `{(m['git_commit'] or '?')[:12]}`{' (dirty)' if m['git_dirty'] else ''} · "
         f"python {m['python']} · torch {m['torch']} · {res['world']} ranks x {res['threads_per_rank']} threads "
         f"on {m['cpu_count']} CPUs · {res['sparsity']:.0%} sparse fp32, uniform · {res['repeats']} interleaved "
         "repeats" + (" · **--quick (smoke test, not a measurement)**" if res["quick"] else ""), "",
         "One topology update of every sparse layer (the first, drop fraction 0.29), from the same state for "
         "every contender. `rigl_fast[b]`: `pruner._rigl_step()` under FSDP2 (radix select on the shards, "
         "backend b). `gather[b]`: per layer, gather weight, mask and score shards to rank 0, backend b's "
         "whole-layer update there, scatter the mask shards back, each rank masks its own shards. Every "
         "contender ends at the same masks and weights (checked each run: "
         f"{'yes' if all(r['same_result'] for r in rows) else '**NO**'}).", "",
         "## Update latency, ms: median (min-max), the slowest rank of each repeat", ""]
    L += report._grid(rows, _cfg, head, lambda r: report._ms(r["latency"]))
    L += ["", "## Bytes sent per update (all ranks together) and collective calls per rank", ""]
    L += report._grid(rows, _cfg, head, lambda r: f"{_mb(r['sent_bytes'])}, {r['calls_per_rank'][0]} calls")
    L += ["", "## Ratios: rigl_fast / baseline (time medians, bytes; < 1 = rigl_fast better)", ""]
    L += report._grid(ratios(rows), _cfg, head, lambda r: f"{r['time']:.2g}x time, {r['bytes']:.2g}x bytes")
    L += ["", "## Wall time inside collective calls, ms (median per rank: rank 0 / rank 1 ...)", "",
          "Waiting for the other rank counts here: in `gather`, rank 1 waits while rank 0 selects.", ""]
    L += report._grid(rows, _cfg, head, lambda r: " / ".join(
        f"{st['median'] * 1e3:.3g}" for st in r["in_collectives_per_rank"]))
    L += ["", "## Peak extra memory during the update, MB (last repeat, rank 0 / rank 1 ...)", "",
          "The resident-set high-water mark above the resident set on entry (bench/timing.py's PeakMemory): "
          "the baseline's rank 0 holds one whole layer (weight, score, mask) and its selection's buffers.", ""]
    L += report._grid(rows, _cfg, head, lambda r: " / ".join(
        "n/a" if b is None else f"{b / 1e6:.3g}" for b in r["peak_extra_bytes_per_rank"]))
    L += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(L) + "\n"


NOTES = [
    "Bytes are what each rank sends, summed over the ranks (so also what they receive), counted by wrapping "
    "torch.distributed's collectives during the timed call: a ring all-reduce sends 2 (w-1)/w of its tensor, "
    "an all-gather (w-1) times its part, gather and scatter each non-root rank's part once. gloo may move more "
    "on the wire; the model is the same for every contender.",
    "rigl_fast's bytes depend on the number of sparse layers, not their size: per selection (two per update) "
    "3 all-reduces of 2048 + 1024 + 1024 int64 histogram bins per layer and one all-gather of 16 bytes per "
    "layer and rank, plus one all-reduce of two flags. The baseline moves each weight rank 0 does not hold once: its "
    "value, score and mask byte to rank 0 and its new mask byte back, 10 bytes per such fp32 weight, so 5 per "
    "weight with 2 ranks.",
    "The baseline's whole-layer selection runs on rank 0 alone while the other ranks wait; rigl_fast[b] runs "
    "backend b's per-shard ops (key histograms, take_top, commit) on every rank at once.",
    "Each rank runs torch with cpu_count / world threads, so the ranks do not compete for cores; rank 0 of "
    "the baseline therefore selects with those threads only, as a GPU rank would with its one device.",
]


def write(res, out_dir) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, report.device_slug(torch.device("cpu")) + "-fsdp2")
    paths = {"json": prefix + ".json", "md": prefix + ".md"}
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(res))
    return paths


def run(quick=False, out_dir=None, world=2, backend="auto", log=print) -> dict:
    t0 = time.perf_counter()
    repeats = 2 if quick else 5
    threads = max(1, (os.cpu_count() or 1) // world)
    sets = weight_sets(quick)
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), sets, repeats, backend, threads, rows_path),
                 nprocs=world, join=True)
        with open(rows_path) as f:
            rows = json.load(f)
    res = dict(meta=report.meta(torch.device("cpu")), quick=quick, world=world, threads_per_rank=threads,
               sparsity=SPARSITY, repeats=repeats, rows=rows, notes=NOTES, wall_s=time.perf_counter() - t0)
    res["paths"] = write(res, out_dir or os.path.join(HERE, "results", "quick" if quick else ""))
    log("wrote " + ", ".join(res["paths"].values()))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rigl_fast.bench.fsdp2", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny layers, 2 repeats: a smoke test (seconds)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results[/quick])")
    ap.add_argument("--world", type=timing.positive_int, default=2, help="ranks to spawn (default 2)")
    ap.add_argument("--backend", default="auto", help="rigl_fast backend (default auto: cpp when it builds)")
    a = ap.parse_args(argv)
    if not (dist.is_available() and dist.is_gloo_available()):
        ap.error("torch.distributed with gloo is not available in this torch")
    run(a.quick, a.out, a.world, a.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
