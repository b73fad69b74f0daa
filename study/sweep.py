"""The quality sweep behind docs/quality.md.

    python -m study                 # the full sweep (about 10 minutes on 2 cores), results in study/results/
    python -m study --seeds 2 --epochs 5 --densities 0.1 --out /tmp/q   # a smoke run

Parts (each run = demo.run, the same code as `rigl-fast train`):
1. MLP 64-300-100-10, densities x {uniform, erk} x {static, SET, RigL} x seeds, plus dense per seed.
2. rigl-torch 0.5.2 on the same seeds (uniform; it has no ERK and no SET): masks and accuracies compared with
   part 1's rigl_fast runs. rigl-torch is imported with tests/_stubs on sys.path where torchvision does not import.
3. The demo CNN with and without BatchNorm, RigL and static at low density (why the demo CNN has BatchNorm).
Runs are spread over `--jobs` processes with one torch thread each: these models are too small for
intra-op threads to pay, and two processes use two cores fully.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA = None


def _rigl_torch_class():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        from rigl_torch_import import import_rigl_torch
    finally:
        sys.path.pop(0)
    return import_rigl_torch()


def _run(job):
    """One run in a worker process: (part, impl, config dict) -> result dict."""
    global _DATA
    from rigl_fast.app import data, demo
    if _DATA is None:
        _DATA = data.load("digits")
    part, impl, cfg = job
    cls = _rigl_torch_class() if impl == "rigl_torch" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference-backend notice and lr_scheduler's step-order notice
        r = demo.run(demo.RunConfig(**cfg), _DATA, scheduler_cls=cls).to_dict()
    r["part"], r["impl"] = part, impl
    return r


def jobs(args):
    base = dict(epochs=args.epochs, batch_size=128, lr=0.1, delta=10, alpha=0.3, backend=args.backend)
    out = []
    for seed in range(args.seeds):
        out.append(("sweep", "rigl_fast", dict(model="mlp", method="dense", density=1.0, seed=seed, **base)))
        for dist in ("uniform", "erk"):
            for d in args.densities:
                for m in ("static", "set", "rigl"):
                    out.append(("sweep", "rigl_fast", dict(model="mlp", method=m, density=d, distribution=dist,
                                                           seed=seed, **base)))
        if not args.no_rigl_torch:
            for d in args.densities:
                for m in ("static", "rigl"):
                    out.append(("compat", "rigl_torch", dict(model="mlp", method=m, density=d, seed=seed, **base)))
        if not args.no_cnn:
            for model in ("cnn", "cnn-nobn"):
                for m in ("dense", "static", "rigl"):
                    for d in ([1.0] if m == "dense" else args.cnn_densities):
                        if seed < args.cnn_seeds:
                            out.append(("cnn", "rigl_fast", dict(model=model, method=m, density=d, seed=seed,
                                                                 **dict(base, epochs=args.cnn_epochs))))
    return out


def compat_table(results):
    """rigl-torch vs rigl_fast on the same seed and config: final masks and test accuracy."""
    fast = {}
    for r in results:
        if r["part"] == "sweep" and r["config"]["distribution"] == "uniform" and r["config"]["method"] != "dense":
            c = r["config"]
            fast[(c["method"], c["density"], c["seed"])] = r
    rows = ["| density | method | runs | identical final masks | identical test accuracy | "
            "max abs. accuracy difference (points) | max rel. train-loss difference |", "|---|---|---|---|---|---|---|"]
    summary = dict(runs=0, same_masks=0, same_acc=0)
    keys = sorted({(r["config"]["density"], r["config"]["method"]) for r in results if r["part"] == "compat"},
                  key=lambda k: (-k[0], k[1]))
    for d, m in keys:
        pairs = [(r, fast[(m, d, r["config"]["seed"])]) for r in results
                 if r["part"] == "compat" and r["config"]["density"] == d and r["config"]["method"] == m
                 and (m, d, r["config"]["seed"]) in fast]
        same_m = sum(a["masks_sha1"] == b["masks_sha1"] for a, b in pairs)
        same_a = sum(a["test_acc"] == b["test_acc"] for a, b in pairs)
        dacc = max(abs(a["test_acc"] - b["test_acc"]) * 100 for a, b in pairs)
        dloss = max(abs(a["train_loss"] - b["train_loss"]) / max(b["train_loss"], 1e-12) for a, b in pairs)
        rows.append(f"| {d:g} | {m} | {len(pairs)} | {same_m}/{len(pairs)} | {same_a}/{len(pairs)} | {dacc:.2f} | "
                    f"{dloss:.1e} |")
        summary["runs"] += len(pairs)
        summary["same_masks"] += same_m
        summary["same_acc"] += same_a
    return "\n".join(rows) + "\n", summary


def cnn_table(results):
    from rigl_fast.app.report import total_density
    groups = {}
    for r in results:
        if r["part"] == "cnn":
            c = r["config"]
            groups.setdefault((c["model"], c["method"], c["density"]), []).append(r)
    rows = ["| model | method | density | model density | test acc % (mean ± std) | per seed |",
            "|---|---|---|---|---|---|"]
    for (model, m, d), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
        acc = [100 * r["test_acc"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        rows.append(f"| {'CNN + BatchNorm' if model == 'cnn' else 'CNN, no BatchNorm'} | {m} | {d:g} | "
                    f"{total_density(runs[0]):.1%} | {statistics.mean(acc):.1f} ± {sd:.1f} | "
                    f"{', '.join(f'{a:.0f}' for a in acc)} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.1, 0.05, 0.02, 0.01])
    p.add_argument("--cnn-densities", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.05])
    p.add_argument("--cnn-seeds", type=int, default=3)
    p.add_argument("--cnn-epochs", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=os.path.join(ROOT, "study", "results"))
    p.add_argument("--no-rigl-torch", action="store_true", help="skip part 2 (rigl-torch not installed)")
    p.add_argument("--no-cnn", action="store_true", help="skip part 3")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1 or args.jobs < 1:
        p.error("--seeds, --epochs and --jobs must be >= 1")
    if not all(0 < d <= 1 for d in args.densities + args.cnn_densities):
        p.error("--densities / --cnn-densities: every density must be in (0, 1]")

    import torch
    from rigl_fast.app import report
    todo = jobs(args)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited torch thread pools or RNG state
    with ctx.Pool(args.jobs, initializer=_worker_init) if args.jobs > 1 else _Serial() as pool:
        for i, r in enumerate(pool.imap_unordered(_run, todo, chunksize=1), 1):
            results.append(r)
            if i % 25 == 0 or i == len(todo):
                print(f"{i}/{len(todo)} runs, {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    results.sort(key=lambda r: (r["part"], r["impl"], r["config"]["model"], r["config"]["distribution"],
                                -r["config"]["density"], r["config"]["method"], r["config"]["seed"]))

    import sklearn
    meta = dict(torch=torch.__version__, sklearn=sklearn.__version__, python=platform.python_version(),
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs", seconds=round(seconds, 1),
                args={k: v for k, v in vars(args).items() if k != "out"})
    try:
        from importlib.metadata import version
        meta["rigl_torch"] = version("rigl-torch")
    except Exception:
        meta["rigl_torch"] = None
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=0)

    sweep = [r for r in results if r["part"] == "sweep"]
    title = (f"MLP 64-300-100-10 on digits (1437 train / 360 test), {args.epochs} epochs, {args.seeds} seeds, "
             f"delta=10, alpha=0.3, T_end=75%")
    report.plot(sweep, os.path.join(args.out, "sweep.png"), title)
    md = [f"# Quality sweep: {title}\n",
          f"Generated by `python -m study` in {seconds / 60:.1f} min ({meta['machine']}, torch {meta['torch']}, "
          f"{args.jobs} processes). Plot: `sweep.png`; every run: `sweep.json`.\n",
          "## 1. Density sweep\n", report.markdown(sweep)]
    if not args.no_rigl_torch:
        table, s = compat_table(results)
        md += ["\n## 2. rigl_fast vs rigl-torch " + str(meta["rigl_torch"]) + ", same seeds (uniform)\n",
               f"{s['same_masks']}/{s['runs']} runs end with bit-identical masks and {s['same_acc']}/{s['runs']} "
               "with the identical test accuracy.\n\n", table]
    if not args.no_cnn:
        md += [f"\n## 3. The demo CNN with and without BatchNorm ({args.cnn_epochs} epochs, {args.cnn_seeds} seeds, "
               "uniform: the first conv stays dense)\n", cnn_table(results)]
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"wrote {args.out}/sweep.md, sweep.json, sweep.png")
    return 0


def _worker_init():
    import torch
    torch.set_num_threads(1)


class _Serial:
    """Pool stand-in for --jobs 1 (tests, debugging): runs in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, items, chunksize=1):
        return map(fn, items)
