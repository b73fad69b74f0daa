"""The quality sweeps behind docs/quality.md.

    python -m rigl_fast.study                 # the digits sweep (about 13 minutes on 2 cores), results in study/results/
    python -m rigl_fast.study --seeds 2 --epochs 5 --densities 0.1 --out /tmp/q   # a smoke run
    python -m rigl_fast.study --part mnist1d  # methods x structures on digits and MNIST-1D (about 40 minutes, 1 process)

Each run = demo.run, the same code as `rigl-fast train`.

--part digits (the default; study/results/sweep.*):
1. MLP 64-300-100-10, densities x {uniform, erk} x {static, SET, RigL} x seeds, plus dense per seed.
2. rigl-torch 0.5.2 on the same seeds (uniform; it has no ERK and no SET): masks and accuracies compared with
   part 1's rigl_fast runs. rigl-torch is imported with tests/_stubs on sys.path where torchvision does not import.
3. The demo CNN with and without BatchNorm, RigL and static at low density (why the demo CNN has BatchNorm).

--part mnist1d (study/results/mnist1d.*): {digits, MNIST-1D} x {the MNIST-1D paper's 1-D CNN, the MLP} x
densities x {static, SET, RigL, RigL fan_in} plus RigL N:M where the density is N/M, and dense; uniform
distribution throughout (N:M allows no other), 3 seeds.

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
_DATA = {}  # per worker process: data set name -> Data, generated once

# Per part, the defaults of the options left unset (None). The mnist1d part's epochs are per data set, chosen
# in trials (seed 0) so that the sparse models plateau: on MNIST-1D the 1-D CNN's RigL at 5% density reached
# 80.2% after 60 epochs, 87.7% after 120 and 88.5% after 200; on digits static and RigL at 5% gained about a
# point from 40 to 80 epochs (3-4 of 360 test images). --epochs sets both.
DEFAULTS = {"digits": dict(seeds=10, epochs=40, densities=[0.2, 0.1, 0.05, 0.02, 0.01], jobs=2),
            "mnist1d": dict(seeds=3, epochs=None, densities=[0.5, 0.2, 0.1, 0.05], jobs=1)}
PART_EPOCHS = {"digits": 60, "mnist1d": 120}
PART_DATA = ("digits", "mnist1d")
PART_MODELS = {"cnn1d": "1-D CNN", "mlp": "MLP"}


def _rigl_torch_class():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        from rigl_torch_import import import_rigl_torch
    finally:
        sys.path.pop(0)
    return import_rigl_torch()


def _run(job):
    """One run in a worker process: (part, impl, config dict, data set name) -> result dict."""
    from rigl_fast.app import data, demo
    part, impl, cfg, name = job
    if name not in _DATA:
        _DATA[name] = data.load(name)
    cls = _rigl_torch_class() if impl == "rigl_torch" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference-backend notice and lr_scheduler's step-order notice
        r = demo.run(demo.RunConfig(**cfg), _DATA[name], scheduler_cls=cls).to_dict()
    r["part"], r["impl"], r["data"] = part, impl, name
    return r


def _base(args, epochs):
    return dict(epochs=epochs, batch_size=128, lr=0.1, delta=10, alpha=0.3, backend=args.backend)


def jobs(args):
    if args.part == "mnist1d":
        return mnist1d_jobs(args)
    base = _base(args, args.epochs)
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
    return [job + ("digits",) for job in out]


def mnist1d_jobs(args):
    """Per data set, model and seed: dense; static, SET, RigL and RigL fan_in at every density; RigL N:M at
    the densities equal to N/M."""
    from rigl_fast.structure import parse
    out = []
    for name in PART_DATA:
        base = _base(args, args.epochs or PART_EPOCHS[name])
        for model in PART_MODELS:
            for seed in range(args.seeds):
                runs = [dict(method="dense", density=1.0)]
                for d in args.densities:
                    runs += [dict(method=m, density=d) for m in ("static", "set", "rigl")]
                    runs.append(dict(method="rigl", density=d, structure="fan_in"))
                    runs += [dict(method="rigl", density=d, structure=nm) for nm in args.nm
                             if abs(d - parse(nm)[1] / parse(nm)[2]) < 1e-9]
                out += [("mnist1d", "rigl_fast", dict(model=model, seed=seed, **base, **r), name) for r in runs]
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
    p = argparse.ArgumentParser(prog="python -m rigl_fast.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--part", choices=tuple(DEFAULTS), default="digits",
                   help="digits: the MLP density sweep, rigl-torch and CNN parts (sweep.*); mnist1d: methods x "
                        "structures on digits and MNIST-1D (mnist1d.*)")
    p.add_argument("--seeds", type=int, default=None, help="default: 10 (digits), 3 (mnist1d)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default: 40 (digits); per data set {PART_EPOCHS} (mnist1d)")
    p.add_argument("--densities", type=floats, default=None, help="default: " + "; ".join(
        f"{k}: {','.join(map(str, v['densities']))}" for k, v in DEFAULTS.items()))
    p.add_argument("--nm", type=lambda s: s.split(","), default=["2:4"],
                   help="mnist1d part: the N:M structures, each run at density N/M when that is in --densities")
    p.add_argument("--cnn-densities", type=floats, default=[0.1, 0.05])
    p.add_argument("--cnn-seeds", type=int, default=3)
    p.add_argument("--cnn-epochs", type=int, default=20)
    p.add_argument("--jobs", type=int, default=None, help="default: 2 (digits), 1 (mnist1d)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=os.path.join(ROOT, "study", "results"))
    p.add_argument("--no-rigl-torch", action="store_true", help="skip part 2 (rigl-torch not installed)")
    p.add_argument("--no-cnn", action="store_true", help="skip part 3")
    p.add_argument("--report-only", action="store_true",
                   help="no runs: rebuild the part's tables and plot from its JSON in --out (with that run's options)")
    args = p.parse_args(argv)
    name = "sweep" if args.part == "digits" else "mnist1d"
    if args.report_only:
        with open(os.path.join(args.out, name + ".json")) as f:
            saved = json.load(f)
        for k, v in saved["meta"]["args"].items():
            setattr(args, k, v)
        return _write_report(args, saved["runs"], saved["meta"], name)
    for k, v in DEFAULTS[args.part].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seeds < 1 or (args.epochs is not None and args.epochs < 1) or args.jobs < 1:
        p.error("--seeds, --epochs and --jobs must be >= 1")
    if not all(0 < d <= 1 for d in args.densities + args.cnn_densities):
        p.error("--densities / --cnn-densities: every density must be in (0, 1]")
    from rigl_fast.structure import parse
    for nm in args.nm:
        try:
            if parse(nm)[0] != "N:M":
                raise ValueError(f"{nm!r} is not an N:M structure")
        except ValueError as e:
            p.error(f"--nm: {e}")

    import torch
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
    results.sort(key=lambda r: (r["part"], r["impl"], r["data"], r["config"]["model"], r["config"]["distribution"],
                                -r["config"]["density"], r["config"]["method"], r["config"]["structure"],
                                r["config"]["seed"]))

    import sklearn
    meta = dict(torch=torch.__version__, sklearn=sklearn.__version__, python=platform.python_version(),
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs", seconds=round(seconds, 1),
                args={k: v for k, v in vars(args).items() if k != "out"})
    for key, dist in (("rigl_torch", "rigl-torch"), ("mnist1d", "mnist1d")):
        try:
            from importlib.metadata import version
            meta[key] = version(dist)
        except Exception:
            meta[key] = None
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=0)
    return _write_report(args, results, meta, name)


def _write_report(args, results, meta, name) -> int:
    md = (_digits_report if args.part == "digits" else _mnist1d_report)(args, results, meta)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"wrote {args.out}/{name}.md, {name}.json, {name}.png")
    return 0


def _generated(args, meta) -> str:
    cmd = ("python -m rigl_fast.study" + ("" if args.part == "digits" else f" --part {args.part}")
           + ("" if args.backend == "auto" else f" --backend {args.backend}"))
    return (f"Generated by `{cmd}` in {meta['seconds'] / 60:.1f} min ({meta['machine']}, torch {meta['torch']}, "
            f"{args.jobs} process{'es' if args.jobs > 1 else ''}).")


def _digits_report(args, results, meta):
    from rigl_fast.app import report
    sweep = [r for r in results if r["part"] == "sweep"]
    title = (f"MLP 64-300-100-10 on digits (1437 train / 360 test), {args.epochs} epochs, {args.seeds} seeds, "
             f"delta=10, alpha=0.3, T_end=75%")
    report.plot(sweep, os.path.join(args.out, "sweep.png"), title)
    md = [f"# Quality sweep: {title}\n",
          _generated(args, meta) + " Plot: `sweep.png`; every run: `sweep.json`.\n",
          "## 1. Density sweep\n", report.markdown(sweep)]
    if not args.no_rigl_torch:
        table, s = compat_table(results)
        md += ["\n## 2. rigl_fast vs rigl-torch " + str(meta["rigl_torch"]) + ", same seeds (uniform)\n",
               f"{s['same_masks']}/{s['runs']} runs end with bit-identical masks and {s['same_acc']}/{s['runs']} "
               "with the identical test accuracy.\n\n", table]
    if not args.no_cnn:
        md += [f"\n## 3. The demo CNN with and without BatchNorm ({args.cnn_epochs} epochs, {args.cnn_seeds} seeds, "
               "uniform: the first conv stays dense)\n", cnn_table(results)]
    return md


def _mnist1d_report(args, results, meta):
    from rigl_fast.app import report
    panels = []
    for name in PART_DATA:
        epochs = args.epochs or PART_EPOCHS[name]
        for model, label in PART_MODELS.items():
            runs = [r for r in results if r["data"] == name and r["config"]["model"] == model]
            if runs:
                data = "MNIST-1D" if name == "mnist1d" else name
                panels.append((f"{data}, {label} ({epochs} epochs)", runs))
    title = f"digits and MNIST-1D, 1-D CNN and MLP, {args.seeds} seeds, uniform, delta=10, alpha=0.3, T_end=75%"
    report.plot_panels(panels, os.path.join(args.out, "mnist1d.png"), title)
    md = [f"# Quality sweep: methods and structures, {title}\n",
          _generated(args, meta) + f" mnist1d {meta['mnist1d']}. Plot: `mnist1d.png`; every run: `mnist1d.json`.\n",
          "## Test accuracy (%), mean ± std over seeds, by density (1 = dense)\n",
          report.pivot(panels, "data, model (epochs)")]
    for panel, runs in panels:
        md += [f"\n## {panel}\n", report.markdown(runs)]
    return md


def _worker_init():
    import torch
    torch.set_num_threads(1)


class _Serial:
    """Pool stand-in for --jobs 1: runs in this process, with one torch thread as the workers have (the same
    arithmetic as a --jobs 2 run), and gives the caller's thread count back after."""

    def __enter__(self):
        import torch
        self._threads = torch.get_num_threads()
        _worker_init()
        return self

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self._threads)
        return False

    def imap_unordered(self, fn, items, chunksize=1):
        return map(fn, items)
