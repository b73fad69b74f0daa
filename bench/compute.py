"""Sparse compute in training (issue 22): `RigLScheduler(..., compute="sparse")` against compute="dense".

    python -m rigl_fast.bench.compute              # bench/results/<device>-compute.{json,md,png}
    python -m rigl_fast.bench.compute --quick      # tiny shapes and a tiny GPT-2, seconds (tests/test_bench_compute.py)
    python -m rigl_fast.bench.compute --no-load --parts layer,window --periods 1 --tag TAG

Every comparison is two copies of one model, each with its own scheduler built from the same seed (the same masks,
checked), alike but for `compute` (dense_allocation = 1 - sparsity, 'uniform', ignore_linear_layers=False, T_end
far away). Parts: `layer` (forward + backward of one nn.Linear outside the dense-gradient window), `window` (the
same inside it, where the dense weight gradient is computed), `mlp` (training steps of Linear(64, 2048) + 4x
Linear(2048, 2048), every step timed over whole delta periods), `gpt` (a GPT-2-shaped model's training steps,
tokens per second, the period composed from its non-window and window steps), and the peak memory of both modes'
steps. The contenders alternate inside every repeat (or every step), in an order rotated each time; speed-ups are
dense / sparse medians from the same run (> 1: sparse compute is faster). Every configuration is measured quiet,
then under one competing PyTorch process (bench/contention.py) unless --no-load. bench/README.md ("Sparse compute
in training") says exactly what is timed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from rigl_fast import RigLScheduler, compute_ops

from . import contention, report, timing
from .suite import _rotate

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("dense", "sparse")
PARTS = ("layer", "window", "mlp", "gpt")
T_END = 10 ** 9  # far away: every update drops alpha = 0.3
LAYER_DELTA = 100


def settings(quick: bool) -> dict:
    if quick:
        return dict(shapes=[(64, 96)], batches=[3, 16], sparsities=[0.9], window=([(64, 96)], 16, 0.9),
                    target_s=0.002, repeats=2,
                    mlp=dict(inp=8, width=64, depth=2, batch=8, sparsities=[0.9], delta=4, periods=2),
                    gpt=dict(n_embd=32, n_layer=2, n_head=2, seq=16, vocab=64, batch=2, sparsities=[0.9],
                             delta=100, plain=2, repeats=2))
    shapes = [(1024, 1024), (2048, 2048), (4096, 4096), (4096, 1024)]  # (out, in)
    return dict(shapes=shapes, batches=[64, 256, 1024], sparsities=[0.8, 0.9, 0.95, 0.98],
                window=(shapes, 256, 0.9), target_s=0.05, repeats=5,
                mlp=dict(inp=64, width=2048, depth=4, batch=256, sparsities=[0.8, 0.9, 0.95], delta=100, periods=2),
                gpt=dict(n_embd=768, n_layer=6, n_head=12, seq=256, vocab=8192, batch=4, sparsities=[0.9, 0.8, 0.95],
                         delta=100, plain=3, repeats=3))


# ------------------------------------------------------------------------------------------------ set-up
DISTRIBUTION = ["uniform"]  # --distribution: the schedulers' sparsity_distribution
# --precision of every part: "fp32"; "bf16" (the model, its inputs and the layer's output gradient in bf16);
# "autocast-bf16" (an fp32 model whose forward runs under torch.autocast("cpu", bfloat16))
PRECISIONS = ("fp32", "bf16", "autocast-bf16")
PRECISION = ["fp32"]


def _dtype() -> torch.dtype:
    """The model's (and its inputs') dtype under PRECISION."""
    return torch.bfloat16 if PRECISION[0] == "bf16" else torch.float32


def _autocast():
    """The forward's context under PRECISION: bf16 autocast, or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION[0] == "autocast-bf16")


def _tol(fp32: float) -> float:
    """How close the two modes' results must be before timing: `fp32` relative in fp32, two bf16 roundings else."""
    return fp32 if PRECISION[0] == "fp32" else 2 ** -7


def _scheduler(model, opt, sparsity, mode, delta, seed):
    torch.manual_seed(seed)  # both modes draw the same masks
    return RigLScheduler(model, opt, dense_allocation=round(1 - sparsity, 9), T_end=T_END, delta=delta,
                         ignore_linear_layers=False, compute=mode, sparsity_distribution=DISTRIBUTION[0])


def _sparse_computed(sched) -> int:
    """How many layers summary() says are sparse-computed."""
    return sched.summary().count("sparse compute (")


def _check_pair(scheds, expect_computed):
    a, b = scheds["dense"], scheds["sparse"]
    assert all((m is None and n is None) or torch.equal(m, n) for m, n in zip(a.backward_masks, b.backward_masks)), \
        "the two modes drew different masks"
    got = _sparse_computed(b)
    assert got == expect_computed and _sparse_computed(a) == 0, \
        f"expected {expect_computed} sparse-computed layers, summary() says {got}:\n{b.summary()}"


def _dense_note(part, sched) -> str:
    """Which candidate layers summary() says stay dense, and why."""
    dense = [f"{ln.split()[0]} ({ln.split('dense:')[1].strip()})" for ln in sched.summary().splitlines()
             if "dense:" in ln]
    return f"{part}: {_sparse_computed(sched)} layers sparse-computed; kept dense: {', '.join(dense) or 'none'}"


def _layer_contenders(out, inp, sparsity, x, g, windows, seed):
    """{name: call} for one nn.Linear under a dense- and a sparse-compute scheduler, for each window flag, and
    the layer's actual density (pruner.stats())."""
    torch.manual_seed(seed)
    base = nn.Linear(inp, out).to(_dtype())
    fns, density = {}, None
    for window in windows:
        scheds = {}
        for mode in MODES:
            layer = copy.deepcopy(base)
            sched = _scheduler(nn.Sequential(layer), torch.optim.SGD(layer.parameters(), lr=0.0), sparsity, mode,
                               LAYER_DELTA, seed + 1)
            if window:
                sched.step = LAYER_DELTA - 1
            assert sched.check_if_backward_hook_should_accumulate_grad() == window
            scheds[mode] = sched

            def call(layer=layer):
                layer.weight.grad = layer.bias.grad = x.grad = None
                with _autocast():
                    y = layer(x)
                y.backward(g.to(y.dtype))
                return x.grad, layer.weight.grad

            fns[mode + (" in window" if window else "")] = call
        _check_pair(scheds, 1)
        density = scheds["sparse"].stats()["density/0.weight"]
    return fns, density


def _agree(fns):
    """Warm-up call of every contender, each checked against the first one's dx and masked dW (in fp32 within
    1e-3; in bf16 or under bf16 autocast within two bf16 roundings of the result, 2^-7 relative)."""
    tol = _tol(1e-3)
    want = None
    for fn in fns.values():
        got = [t.clone().float() for t in fn()]
        for a, b in zip(got, want or got):
            torch.testing.assert_close(a, b, rtol=tol, atol=1e-3)
        want = want or got


def _block(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


# ------------------------------------------------------------------------------------------------ per layer
def measure_layers(cfg, load, window: bool, log=print) -> list:
    """The `layer` part (window=False) or the `window` part."""
    rows = []
    if window:
        shapes, b, s = cfg["window"]
        batches, sparsities, windows = [b], [s], (False, True)
    else:
        shapes, batches, sparsities, windows = cfg["shapes"], cfg["batches"], cfg["sparsities"], (False,)
    for out, inp in shapes:
        for batch in batches:
            seed = out * 7919 + inp * 31 + batch
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(batch, inp, generator=gen).to(_dtype()).requires_grad_()
            g = torch.randn(batch, out, generator=gen).to(_dtype())
            n = None
            for sparsity in sparsities:
                fns, density = _layer_contenders(out, inp, sparsity, x, g, windows, seed)
                _agree(fns)
                if n is None:  # once per shape and batch: the same block for every sparsity
                    n = max(1, int(cfg["target_s"] / max(_block(fns["dense"], 2), 1e-7)))
                names = list(fns)
                samples = {c: [] for c in names}
                for r in range(cfg["repeats"]):
                    for c in _rotate(names, r):
                        samples[c].append(_block(fns[c], n))
                med = {c: timing.stats(samples[c])["median"] for c in names}
                for c in names:
                    extra = {"vs_window": med["dense in window"] / med[c]} if c == "sparse in window" else {}
                    rows.append(dict(part="window" if window else "layer", out=out, inp=inp, batch=batch,
                                     sparsity=sparsity, density=density, contender=c, block=n, load=load,
                                     speedup=med["dense"] / med[c], **extra, **timing.stats(samples[c])))
                log(f"  {'window' if window else 'layer'} {out}x{inp} b{batch} {sparsity:.0%} {load}: " + ", ".join(
                    f"{c} {timing.stats(samples[c])['median'] * 1e3:.3g} ms" for c in names))
    return rows


# ------------------------------------------------------------------------------------------------ training
class _Run:
    """One contender of a training comparison: a model copy, its optimizer, its scheduler, its loss."""

    def __init__(self, model, opt, sched, loss_fn):
        self.model, self.opt, self.sched, self.loss_fn = model, opt, sched, loss_fn

    def step(self):
        with _autocast():
            loss = self.loss_fn(self.model)
        loss.backward()
        if self.sched():
            self.opt.step()
        self.opt.zero_grad()
        return loss.detach()


def _mlp(c):
    """(model, optimizer factory, loss, sparse-computed layers expected)."""
    layers = [nn.Linear(c["inp"], c["width"])]
    for _ in range(c["depth"]):
        layers += [nn.ReLU(), nn.Linear(c["width"], c["width"])]
    x, target = torch.randn(c["batch"], c["inp"]).to(_dtype()), torch.randn(c["batch"], c["width"]).to(_dtype())
    return (nn.Sequential(*layers).to(_dtype()), lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
            lambda m: F.mse_loss(m(x).float(), target.float()), c["depth"])


def _gpt(c):
    from transformers import GPT2Config, GPT2LMHeadModel
    v = c["vocab"]
    model = GPT2LMHeadModel(GPT2Config(n_embd=c["n_embd"], n_layer=c["n_layer"], n_head=c["n_head"],
                                       n_positions=c["seq"], vocab_size=v, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=v - 1, eos_token_id=v - 1)).train().to(_dtype())
    ids = torch.randint(0, v, (c["batch"], c["seq"]))
    # every Conv1D sparse-computed, but block 0's c_attn under 'uniform' (its first-layer rule)
    return (model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4),
            lambda m: m(input_ids=ids, labels=ids).loss, 4 * c["n_layer"] - (DISTRIBUTION[0] == "uniform"))


def _pair(part, c, sparsity) -> dict:
    """{mode: _Run} on copies of one model, the same masks; one warm-up step each, checked to agree."""
    torch.manual_seed(1)
    base, make_opt, loss_fn, expect = (_mlp if part == "mlp" else _gpt)(c)
    runs = {}
    for mode in MODES:
        model = copy.deepcopy(base)
        opt = make_opt(model)
        runs[mode] = _Run(model, opt, _scheduler(model, opt, sparsity, mode, c["delta"], 2), loss_fn)
    _check_pair({m: r.sched for m, r in runs.items()}, expect)
    losses = [r.step() for r in runs.values()]  # the same loss from the same weights and masks
    torch.testing.assert_close(losses[0], losses[1], rtol=_tol(1e-4), atol=1e-5)
    return runs


def _steps(runs, n, counter, start=None) -> dict:
    """n training steps of every run, alternating at every step (order rotated by the running counter);
    `start` sets the schedule's step first. {mode: [(seconds, window step?)]}."""
    if start is not None:
        for r in runs.values():
            r.sched.step = start
    out = {m: [] for m in runs}
    for _ in range(n):
        for m in _rotate(list(runs), counter[0]):
            w = runs[m].sched.check_if_backward_hook_should_accumulate_grad()
            t = time.perf_counter()
            runs[m].step()
            out[m].append((time.perf_counter() - t, w))
        counter[0] += 1
    return out


def _periods(runs, c) -> dict:
    """mlp: whole delta periods of real training after the warm-up step, each holding one window step (which is
    also the update step: grad_accumulation_n=1). {kind: {mode: [seconds]}}."""
    delta, kinds = c["delta"], {"period": {}, "plain": {}, "update": {}}
    for m, steps in _steps(runs, delta * c["periods"], [0]).items():
        kinds["period"][m] = [sum(t for t, _ in steps[i:i + delta]) / delta for i in range(0, len(steps), delta)]
        kinds["plain"][m] = [t for t, w in steps if not w]
        kinds["update"][m] = [t for t, w in steps if w]
        assert len(kinds["update"][m]) == c["periods"], "one window step per period"
    return kinds


def _composed(runs, c) -> dict:
    """gpt: per repeat, a few steps set just after an update, then the window+update step; the period's mean
    step composed as ((delta-1) median plain + update) / delta."""
    delta, counter = c["delta"], [0]
    kinds = {k: {m: [] for m in MODES} for k in ("plain", "update", "period")}
    for r in range(c["repeats"]):
        plain = _steps(runs, c["plain"], counter, start=r * delta + 1)
        upd = _steps(runs, 1, counter, start=(r + 1) * delta - 1)
        for m in MODES:
            assert not any(w for _, w in plain[m]) and upd[m][0][1]
            ts = [t for t, _ in plain[m]]
            kinds["plain"][m] += ts
            kinds["update"][m].append(upd[m][0][0])
            kinds["period"][m].append(((delta - 1) * statistics.median(ts) + upd[m][0][0]) / delta)
    return kinds


def measure_training(part, cfg, load, memory, log=print):
    """The `mlp` or `gpt` part: rows, peak-memory rows, notes."""
    c = cfg[part]
    rows, mem, notes = [], [], []
    for sparsity in c["sparsities"]:
        runs = _pair(part, c, sparsity)
        kinds = (_periods if part == "mlp" else _composed)(runs, c)
        extra = dict(batch=c["batch"], delta=c["delta"])
        if part == "gpt":
            extra.update(seq=c["seq"], tokens=c["batch"] * c["seq"])
        for kind, per_mode in kinds.items():
            med = {m: timing.stats(per_mode[m])["median"] for m in MODES}
            for m in MODES:
                rows.append(dict(part=part, sparsity=sparsity, kind=kind, contender=m, load=load,
                                 density=runs[m].sched.stats()["density"], speedup=med["dense"] / med[m], **extra,
                                 **timing.stats(per_mode[m])))
        note = _dense_note(part, runs["sparse"].sched)
        notes += [note] if note not in notes else []
        if memory:
            mem += _memory(part, sparsity, runs, c["delta"])
        log(f"  {part} {sparsity:.0%} {load}: " + ", ".join(
            f"{k} {m} {timing.stats(v[m])['median'] * 1e3:.4g} ms" for k, v in kinds.items() for m in MODES))
        del runs
    return rows, mem, notes


def _memory(part, sparsity, runs, delta) -> list:
    """Peak extra bytes of one non-window step and one window+update step of each mode."""
    out = []
    for kind, start in (("plain", 10 * delta + 1), ("update", 11 * delta - 1)):
        for m in MODES:
            r = runs[m]
            r.sched.step = start
            r.opt.zero_grad()
            # the buffers the C++ ops keep for reuse (csrc/buffer_pool.h) handed back first, as PeakMemory trims
            # glibc's: the step's own gradients, transposes and outputs then count in its peak, as in dense's
            compute_ops.release_buffers()
            with timing.PeakMemory(torch.device("cpu")) as pm:
                r.step()
            out.append(dict(part=part, sparsity=sparsity, kind=kind, contender=m, peak_bytes=pm.bytes))
    return out


# ------------------------------------------------------------------------------------------------ driver
def measure(cfg, parts, load, memory, log=print):
    rows, mem, notes = [], [], []
    if "layer" in parts:
        rows += measure_layers(cfg, load, False, log)
    if "window" in parts:
        rows += measure_layers(cfg, load, True, log)
    for part in ("mlp", "gpt"):
        if part in parts:
            r, m, n = measure_training(part, cfg, load, memory, log)
            rows, mem, notes = rows + r, mem + m, notes + [x for x in n if x not in notes]
    return rows, mem, notes


def run(quick: bool, parts=PARTS, loaded=True, repeats=None, periods=None, log=print) -> dict:
    cfg = settings(quick)
    cfg["repeats"] = cfg["repeats"] if repeats is None else repeats
    cfg["mlp"]["periods"] = cfg["mlp"]["periods"] if periods is None else periods
    t0 = time.perf_counter()
    rows, mem, notes = measure(cfg, parts, "quiet", True, log)
    if loaded:
        with contention.competing_process():
            rows += measure(cfg, parts, "loaded", False, log)[0]
        notes.append(contention.NOTE)
    notes.append(f"sparsity_distribution={DISTRIBUTION[0]!r} (density: the candidates' overall, from stats())")
    return {"meta": report.meta(torch.device("cpu")), "quick": quick, "parts": list(parts), "precision": PRECISION[0],
            "repeats": cfg["repeats"], "settings": cfg, "rows": rows, "memory": mem, "notes": notes,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ report
def _find(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _keys(rows, *names):
    out = []
    for r in rows:
        if tuple(r[n] for n in names) not in out:
            out.append(tuple(r[n] for n in names))
    return out


def _ms(r) -> str:
    return f"{r['median'] * 1e3:.3g} ({r['min'] * 1e3:.3g}-{r['max'] * 1e3:.3g})"


def _tok(r) -> str:
    return f"{r['tokens'] / r['median']:.0f} ({r['tokens'] / r['max']:.0f}-{r['tokens'] / r['min']:.0f})"


def _x(key):
    return lambda r: f"{r[key]:.2f}x" + ("" if r[key] >= 1 else " (slower)")


_KINDS = {"period": "mean step over a delta period", "plain": "non-window step", "update": "window + update step"}
_LABEL = {"out": lambda r: f"{r['out']}x{r['inp']}", "batch": lambda r: str(r["batch"]),
          "sparsity": lambda r: f"{r['sparsity']:.0%}", "kind": lambda r: _KINDS[r["kind"]],
          "density": lambda r: f"{r['density']:.2%}"}


def _table(rs, title, text, keys, cols) -> list:
    """One line per distinct value of `keys` (the density read from the sparse row); cols: (header, contender,
    fmt), each cell 'quiet · loaded'."""
    if not rs:
        return []
    heads = [{"out": "out x in"}.get(k, k) for k in keys] + ["density"] + [h for h, _, _ in cols]
    lines = [f"## {title}", "", text, "", "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    group = keys + (("inp",) if "out" in keys else ())  # shapes of one `out` (4096x4096, 4096x1024) apart
    for key in _keys(rs, *group):
        k = dict(zip(group, key))
        first = _find(rs, contender="sparse", **k)[0]
        cells = [_LABEL[n](first) for n in keys + ("density",)]
        for _, c, fmt in cols:
            found = [_find(rs, contender=c, load=ld, **k) for ld in ("quiet", "loaded")]
            cells.append(" · ".join(fmt(x[0]) for x in found if x))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _memory_table(mem) -> list:
    lines = ["## Peak memory of one step (quiet pass)", "", "Extra resident MB at the step's peak above the "
             "resident set on entry (timing.PeakMemory), gradients None on entry.", "",
             "| model | sparsity | step | dense | sparse | sparse / dense |", "|---" * 6 + "|"]
    for part, sp, kind in _keys(mem, "part", "sparsity", "kind"):
        d, s = (_find(mem, part=part, sparsity=sp, kind=kind, contender=m)[0]["peak_bytes"] for m in MODES)
        mb = (lambda b: "—" if b is None else f"{b / 2 ** 20:.1f}")
        lines.append(f"| {part} | {sp:.0%} | {_KINDS[kind]} | {mb(d)} | {mb(s)} | "
                     f"{f'{s / d:.2f}' if d and s is not None else '—'} |")
    return lines + [""] if mem else []


def _not_paying(rows) -> list:
    bad = sorted((r for r in rows if r["contender"].startswith("sparse") and r["speedup"] < 1),
                 key=lambda r: (PARTS.index(r["part"]), r["load"] != "quiet"))
    lines = ["## Where sparse compute does not pay (speed-up < 1)", ""]
    for r in bad:
        where = f"{r['out']}x{r['inp']} batch {r['batch']}" if "out" in r else _KINDS[r["kind"]]
        lines.append(f"- {r['part']}: {where}, {r['sparsity']:.0%}, {r['contender']}, {r['load']}: {r['speedup']:.2f}x")
    return lines + (["- nowhere in this run"] if not bad else []) + [""]


def markdown(res) -> str:
    m, c, rows = res["meta"], res["settings"], res["rows"]
    mlp, g = c["mlp"], c["gpt"]
    part = {p: _find(rows, part=p) for p in PARTS}
    ms = ("median (min-max), " + ("quiet · loaded (one competing process)" if _find(rows, load="loaded") else
                                  "quiet only (--no-load)") + "; speed-up = dense / sparse median.")
    lines = [f"# Sparse compute in training: compute='sparse' vs compute='dense' ({m['device_name']})", "",
             f"{m['date']}, commit {m['git_commit']}{' (dirty tree)' if m.get('git_dirty') else ''}, torch "
             f"{m['torch']}, python {m['python']}, rigl-torch {m['rigl_torch']}, {m['cpu_count']} CPUs, "
             f"{m['torch_threads']} threads, {res.get('precision', 'fp32')}; {res['seconds']:.0f} s in all"
             f"{' (--quick: tiny shapes, not a result)' if res['quick'] else ''}. Speed-ups are dense / sparse "
             "medians from the same run (> 1: sparse compute is faster), the contenders alternating in every "
             "repeat; bench/compute.py says exactly what is timed.", ""]
    lines += _table(part["layer"], "Per layer: nn.Linear forward + backward, outside the dense-gradient window",
                    "ms per call, " + ms,
                    ("out", "batch", "sparsity"), [("dense", "dense", _ms), ("sparse", "sparse", _ms),
                                                   ("speed-up", "sparse", _x("speedup"))])
    lines += _table(part["window"], "The window step (per layer): the dense weight gradient before an update",
                    "ms per call, " + ms + " `in window`: the step before an update, whose backward computes the "
                    "dense weight gradient that the hook accumulates for the growth scores (1 step in delta).",
                    ("out", "batch", "sparsity"),
                    [(c, c, _ms) for c in ("dense", "sparse", "dense in window", "sparse in window")]
                    + [("sparse vs dense, in window", "sparse in window", _x("vs_window")),
                       ("sparse in window vs dense outside", "sparse in window", _x("speedup"))])
    train = [("dense", "dense", _ms), ("sparse", "sparse", _ms), ("speed-up", "sparse", _x("speedup"))]
    lines += _table(part["mlp"], f"Training step: MLP Linear({mlp['inp']}, {mlp['width']}) + {mlp['depth']}x "
                    f"Linear({mlp['width']}, {mlp['width']}), batch {mlp['batch']}, SGD momentum, delta "
                    f"{mlp['delta']} ({mlp['periods']} whole periods)", "ms per step, " + ms,
                    ("sparsity", "kind"), train)
    lines += _table(part["gpt"], f"GPT-2-shaped ({g['n_layer']} layers, n_embd {g['n_embd']}, vocab {g['vocab']}, "
                    f"seq {g['seq']}, batch {g['batch']}), AdamW, delta {g['delta']}",
                    "training tokens per second, " + ms + " The period row is composed from the two steps at their "
                    "real frequency.",
                    ("sparsity", "kind"), [(h, c, _tok if f is _ms else f) for h, c, f in train])
    return "\n".join(lines + _memory_table(res["memory"]) + _not_paying(rows) + [f"- {n}" for n in res["notes"]]) + "\n"


def plot(res, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _find(res["rows"], part="layer", contender="sparse")
    loads = [ld for ld in ("quiet", "loaded") if _find(rows, load=ld)]
    fig, axes = plt.subplots(1, len(loads), figsize=(6.5 * len(loads), 4.5), squeeze=False)
    for ax, load in zip(axes[0], loads):
        for out, inp, batch in _keys(_find(rows, load=load), "out", "inp", "batch"):
            rs = sorted(_find(rows, load=load, out=out, inp=inp, batch=batch), key=lambda r: r["sparsity"])
            ax.plot([100 * r["sparsity"] for r in rs], [r["speedup"] for r in rs], marker="o",
                    label=f"{out}x{inp} b{batch}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set(xlabel="sparsity %", ylabel="speed-up over dense compute (dense / sparse time)")
        ax.set_title(f"nn.Linear forward+backward, {load}", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"compute='sparse' vs 'dense', {res['meta']['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-load", action="store_true", help="quiet pass only (no competing process)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--repeats", type=timing.positive_int, default=None, help="repeats of the layer and window parts")
    ap.add_argument("--periods", type=timing.positive_int, default=None, help="whole delta periods of the mlp part (2)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--tag", default=None, help="suffix of the result files' names (<device>-compute-<tag>.*)")
    ap.add_argument("--distribution", choices=("uniform", "erk"), default="uniform",
                    help="the schedulers' sparsity_distribution ('uniform' keeps the first layer dense)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="every part's precision: fp32, bf16 (a bf16 model), or autocast-bf16 (an fp32 model whose "
                         "forward runs under torch.autocast)")
    a = ap.parse_args(argv)
    if a.tag is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", a.tag):
        ap.error("--tag: lower-case letters, digits and '-' only")
    parts = [p for p in a.parts.split(",") if p]
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--parts: a comma-separated subset of {','.join(PARTS)}")
    DISTRIBUTION[0], PRECISION[0] = a.distribution, a.precision
    res = run(a.quick, parts, not a.no_load, a.repeats, a.periods)
    out = a.out or os.path.join(HERE, "results", "quick" if a.quick else "")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, report.device_slug(torch.device("cpu")) + "-compute" + (f"-{a.tag}" if a.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    if not a.no_plots and _find(res["rows"], part="layer"):
        plot(res, stem + ".png")
    print(markdown(res))
    return stem


if __name__ == "__main__":
    main()
