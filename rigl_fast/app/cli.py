"""The `rigl-fast` command.

    rigl-fast train                      # a BatchNorm CNN, RigL at 10% density, on scikit-learn's digits
    rigl-fast train --model mlp --method static --density 0.02 --distribution erk
    rigl-fast train --compare            # dense/static/SET/RigL, 2% MLP, 10 seeds: table + plot in ./rigl_fast_compare
    rigl-fast train --compare --density 0.2,0.05,0.02 --distribution uniform,erk --seeds 3
    rigl-fast train --data mnist1d --structure fan_in   # the MNIST-1D paper's CNN, every unit at the same fan-in
    rigl-fast train --data mnist1d --model mlp --structure 2:4 --density 0.5
    rigl-fast train --data mnist --data-dir ~/data --download
    rigl-fast train --model mlp --structure fan_in --export model.pt   # save the sparse inference model
    rigl-fast train --model mlp --compute sparse   # the sparse Linear layers compute over their active weights

Needs the 'cli' extra (scikit-learn, tqdm, matplotlib, mnist1d); they are imported only when a command runs, so
`import rigl_fast` never pays for them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings

from ..compute import MODES as _COMPUTE_MODES
from ..layers import DISTRIBUTIONS as _DISTRIBUTIONS  # the library's lists, so the CLI accepts what it accepts
from ..ops import BACKENDS as _BACKENDS
from .args import (_DATASETS, _METHODS, _MODELS, _SMALL_DATA, _alpha, _list_of, _positive, _resolve,  # noqa: F401
                   _structure)

EXTRA_HINT = "pip install 'rigl_fast[cli]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rigl-fast", description="rigl_fast: fast RigL dynamic sparse training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser(
        "train", help="train a small model with dense/static/SET/RigL and report accuracy",
        description="Train a small CNN or MLP on scikit-learn's digits (bundled, no download), MNIST-1D "
                    "(generated locally by the mnist1d package) or, with torchvision, MNIST/CIFAR-10; print "
                    "progress, a per-layer density table and the test accuracy. With --compare, run several "
                    "methods/densities/seeds and write a table and a plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", choices=_MODELS, default=None,
                   help="cnn = 3 conv layers with BatchNorm + linear (images); cnn1d = the MNIST-1D paper's "
                        "CNN (3 stride-2 Conv1d, BatchNorm, linear; reads the input as one sequence); mlp = "
                        "in-300-100-10. Default: cnn (cnn1d on mnist1d), or mlp with --compare")
    t.add_argument("--method", type=_list_of(str, "method", choices=_METHODS), default=None,
                   help="dense (no scheduler), static (fixed random mask), set (random regrowth), rigl "
                        "(gradient regrowth); a comma list with --compare. Default: rigl, or all four with --compare")
    t.add_argument("--density", type=_list_of(float, "density", check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
                   default=None, help="dense_allocation, the fraction of weights kept in each sparse layer; a comma "
                                      "list with --compare. Default: 0.1, or 0.02 with --compare")
    t.add_argument("--distribution", type=_list_of(str, "distribution", choices=_DISTRIBUTIONS), default=None,
                   help="uniform (rigl-torch's rule: first layer dense), erk (Erdos-Renyi-Kernel) or er "
                        "(Erdos-Renyi); a comma list with --compare. Default: uniform")
    t.add_argument("--structure", type=_structure, default="unstructured",
                   help="unstructured; fan_in (every output unit keeps the same number of active weights, "
                        "SRigL); or N:M such as 2:4 (N active in every M consecutive weights along the "
                        "fan-in: needs --density N/M and --distribution uniform). Applies to every sparse method")
    t.add_argument("--epochs", type=_positive("epochs", int), default=None,
                   help="Default: 40 on digits, 60 on mnist1d, 5 on mnist/cifar10")
    t.add_argument("--seed", type=int, default=0, help="seed of the model, the masks and the batch order; with "
                                                       "--compare the first of --seeds consecutive seeds")
    t.add_argument("--seeds", type=_positive("seeds", int), default=10, help="number of seeds with --compare")
    t.add_argument("--batch-size", type=_positive("batch-size", int), default=128)
    t.add_argument("--lr", type=_positive("lr", float), default=0.1, help="SGD (momentum 0.9) learning rate, "
                                                                         "cosine-annealed to 0 over training")
    t.add_argument("--delta", type=_positive("delta", int), default=None,
                   help="steps between topology updates. Default: 10 on digits and mnist1d (12 and 32 steps an "
                        "epoch), 100 otherwise")
    t.add_argument("--alpha", type=_alpha, default=0.3, help="initial drop fraction (cosine-decayed)")
    t.add_argument("--backend", choices=_BACKENDS, default="auto", help="rigl_fast backend for the mask ops")
    t.add_argument("--compute", choices=_COMPUTE_MODES, default="dense",
                   help="RigLScheduler(compute=): sparse = the sparse Linear layers' forward and backward skip the "
                        "inactive weights (convolutions stay dense-computed), the same training; dense = full "
                        "dense products, zeros included")
    _add_run_arguments(t)
    t.set_defaults(func=_cmd_train)
    parser.commands = {"train": t}  # main() reports errors with the subcommand's usage
    return parser


def _add_run_arguments(t: argparse.ArgumentParser) -> None:
    """train's options for the data, the device and what is written: the rest of the training set-up."""
    t.add_argument("--data", choices=_DATASETS, default="digits",
                   help="digits needs no download; mnist1d is generated locally (4000 train / 1000 test) and "
                        "needs the mnist1d package; mnist/cifar10 need torchvision and the data under --data-dir")
    t.add_argument("--data-dir", default=None, help="where torchvision data sets are (or are downloaded to; "
                   "Default: data)")
    t.add_argument("--download", action="store_true", help="download mnist/cifar10 if missing (needs a network)")
    t.add_argument("--device", default=None, help="torch device. Default: cuda if available, else cpu")
    t.add_argument("--threads", type=_positive("threads", int), default=None,
                   help="torch CPU threads. Default: 1 on digits and mnist1d (the models are too small to gain "
                        "from more), torch's default otherwise")
    t.add_argument("--compare", action="store_true",
                   help="run every --method x --density x --distribution over --seeds seeds and write "
                        "results.md, results.json and compare.png to --out")
    t.add_argument("--out", default=None, help="output folder for --compare. Default: rigl_fast_compare")
    t.add_argument("--export", metavar="PATH", default=None,
                   help="after training, save the exported sparse model (pruner.export('auto'): sparse Linear "
                        "layers as fan_in/csr modules, Conv layers dense) to PATH with torch.save, and print its "
                        "size and batch-1 latency beside the dense model's")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def main(argv=None) -> int:
    parser = build_parser()
    # Not parse_args: argparse hands a subcommand's unknown options up to the top-level parser, whose error
    # prints the top-level usage. Every error about a subcommand's arguments goes through its own parser.
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    command = parser.commands[args.command]
    if unknown:  # the top level has no options but -h, so anything before the command name is its error
        before = argv[:argv.index(args.command)]
        (parser if before else command).error(f"unrecognized arguments: {' '.join(before or unknown)}")
    return args.func(args, command)


# ----------------------------------------------------------------------------- train
def _require(modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pkg = {"sklearn": "scikit-learn"}  # import name -> pip name
        names = ", ".join(pkg.get(m, m) for m in missing)
        print(f"rigl-fast: this command needs {names}, which is not installed: {EXTRA_HINT}", file=sys.stderr)
        return False
    return True


def _configs(args):
    from .demo import RunConfig
    base = dict(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, delta=args.delta,
                alpha=args.alpha, backend=args.backend, device=args.device)
    sparse = dict(base, structure=args.structure, compute=args.compute)
    seeds = range(args.seed, args.seed + args.seeds) if args.compare else [args.seed]
    out = []
    for seed in seeds:
        for method in args.method:
            if method == "dense":  # density and distribution do not apply: one run per seed
                out.append(RunConfig(method="dense", density=1.0, distribution="uniform", seed=seed, **base))
                continue
            for dist in args.distribution:
                for density in args.density:
                    out.append(RunConfig(method=method, density=density, distribution=dist, seed=seed, **sparse))
    return out


def _layer_table(result, structure="unstructured") -> str:
    """Per layer: weights, active, density, and active weights per output unit (one number when every unit
    has the same: the tell of structure='fan_in'); with N:M also per run of M weights; under --compute sparse,
    how each layer is computed (sparse over its active weights, or dense and why)."""
    from ..structure import parse
    m = parse(structure)[2]
    how = any("compute" in layer for layer in result.layers)

    def span(lo_hi):
        return str(lo_hi[0]) if lo_hi[0] == lo_hi[1] else f"{lo_hi[0]}-{lo_hi[1]}"

    rows = [("layer", "shape", "weights", "active", "density", "active per unit")
            + ((f"per {m} (N:M)",) if m else ()) + (("compute",) if how else ())]
    tot_n = tot_a = 0
    for layer in result.layers:
        rows.append((layer["name"], "x".join(map(str, layer["shape"])), str(layer["numel"]), str(layer["active"]),
                     f"{100 * layer['active'] / layer['numel']:.2f}%", span(layer["unit_active"]))
                    + ((span(layer["group_active"]) if "group_active" in layer else "-",) if m else ())
                    + ((layer.get("compute") or "dense layer",) if how else ()))
        tot_n += layer["numel"]
        tot_a += layer["active"]
    rows.append(("total (Linear/Conv weights)", "", str(tot_n), str(tot_a), f"{100 * tot_a / tot_n:.2f}%", "")
                + (("",) if m else ()) + (("",) if how else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 or (how and i == len(r) - 1) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0 or k == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def _cmd_train(args, parser) -> int:
    _resolve(args, parser)
    if not _require((["sklearn"] if args.data == "digits" else []) + (["mnist1d"] if args.data == "mnist1d" else [])
                    + ["tqdm"]
                    + (["matplotlib"] if args.compare else [])):
        return 1
    import torch
    from tqdm.auto import tqdm
    from . import data as data_mod
    from . import demo

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"argument --device: cannot use {args.device!r}: {e}")
    try:
        if "dense" not in args.method or len(args.method) > 1:
            from ..ops import get_backend
            get_backend(args.backend, torch.device(args.device))
    except RuntimeError as e:
        parser.error(f"argument --backend: {e}")
    try:
        data = data_mod.load(args.data, args.data_dir, args.download)
    except (RuntimeError, ImportError) as e:
        print(f"rigl-fast: {e}", file=sys.stderr)
        return 1
    configs = _configs(args)
    for c in configs:
        c.validate()
    print(f"data: {args.data} ({len(data.train_x)} train / {len(data.test_x)} test, {data.n_classes} classes, "
          f"input {'x'.join(map(str, data.in_shape))}); model: {args.model}; {args.epochs} epochs; "
          f"device {args.device}, {torch.get_num_threads()} thread(s)")
    if args.compare:
        return _compare(args, configs, data, demo, tqdm)
    return _single(args, configs[0], data, demo, tqdm)


def _single(args, cfg, data, demo, tqdm) -> int:
    print(f"method: {cfg.method}" + ("" if cfg.method == "dense" else
                                     f", density {cfg.density:g} ({cfg.distribution}), structure {cfg.structure}, "
                                     f"delta {cfg.delta}, "
                                     f"alpha {cfg.alpha}, backend {cfg.backend}, compute {cfg.compute}"))
    bar = tqdm(total=1, desc=f"{cfg.method} d={cfg.density:g}", unit="step", disable=args.no_progress,
               dynamic_ncols=True)

    def progress(step, total, loss):
        if step == 1:
            bar.reset(total=total)
        bar.update(1)
        if step % 10 == 0 or step == total:
            bar.set_postfix(loss=f"{loss:.4f}", epoch=f"{(step - 1) * args.epochs // total + 1}/{args.epochs}")

    exported = {}

    def trained(model, pruner):  # before the scheduler is detached: export needs its masks
        if args.export is not None:
            exported.update(_export(args.export, model, pruner, data.test_x[:1]))

    result = demo.run(cfg, data, progress=progress, trained=trained)
    bar.close()
    print()
    print(_layer_table(result, cfg.structure))
    print()
    if result.churn:
        print(f"topology updates: {len(result.churn)}; weights regrown per update: "
              f"{100 * result.churn[0][1]:.1f}% of active at the first, {100 * result.churn[-1][1]:.1f}% at the last")
    print(f"final train loss: {result.train_loss:.4f}   train accuracy: {100 * result.train_acc:.2f}%")
    print(f"test accuracy: {100 * result.test_acc:.2f}%  (chance {100 / data.n_classes:.0f}%, "
          f"{len(data.test_x)} test samples, {result.seconds:.1f} s)")
    if exported:
        e = exported
        formats = ", ".join(f"{n} {f}" for f, n in sorted(e["formats"].items()))
        print(f"exported to {e['path']}: {e['replaced']} sparse Linear layer(s) replaced ({formats})"
              + (f", {e['kept']} sparse Conv layer(s) left dense with their zeros" if e["kept"] else ""))
        print(f"  file size: {e['size'] / 1e3:.1f} kB, dense state dict {e['dense_size'] / 1e3:.1f} kB "
              f"({e['size'] / e['dense_size']:.2f}x)")
        print(f"  batch-1 latency: exported {e['sparse_s'] * 1e6:.0f} us, dense {e['dense_s'] * 1e6:.0f} us "
              f"(speed-up {e['dense_s'] / e['sparse_s']:.2f}x; median of {e['repeats']} interleaved blocks of "
              f"{e['calls']} calls, {e['threads']} thread(s))")
    return 0


def _export(path, model, pruner, x, repeats=7, calls=100):
    """pruner.export('auto') saved to path; its size and a batch-1 latency beside the dense model's."""
    import io

    import torch
    model.eval()
    x = x.to(next(model.parameters()).device)  # the test data stays on the CPU; the model is on --device
    sparse = pruner.export("auto").eval()
    torch.save(sparse, path)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def block(fn):
        sync()
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        sync()
        return (time.perf_counter() - t) / calls

    times = {"dense": [], "sparse": []}
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-4)  # also the warm-up
        for r in range(repeats):
            for name in (("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")):
                times[name].append(block(model if name == "dense" else sparse))
    formats = {}
    for f in sparse.rigl_fast_formats.values():
        formats[f] = formats.get(f, 0) + 1
    n_sparse = sum(m is not None for m in pruner.backward_masks)
    replaced = len(sparse.rigl_fast_formats)
    return {"path": path, "size": os.path.getsize(path), "dense_size": buf.tell(), "formats": formats,
            "replaced": replaced, "kept": n_sparse - replaced, "dense_s": sorted(times["dense"])[repeats // 2],
            "sparse_s": sorted(times["sparse"])[repeats // 2], "repeats": repeats, "calls": calls,
            "threads": torch.get_num_threads()}


def _compare(args, configs, data, demo, tqdm) -> int:
    from . import report

    os.makedirs(args.out, exist_ok=True)
    results = []
    t0 = time.perf_counter()
    with tqdm(configs, desc="runs", unit="run", disable=args.no_progress, dynamic_ncols=True) as bar:
        for cfg in bar:
            bar.set_postfix_str(f"{cfg.method} d={cfg.density:g} {cfg.distribution} seed {cfg.seed}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # lr_scheduler's notice when an update skips a step
                results.append(demo.run(cfg, data).to_dict())
    seconds = time.perf_counter() - t0
    title = (f"{args.model} on {args.data}, {args.epochs} epochs, {args.seeds} seeds "
             f"(delta={args.delta}, alpha={args.alpha}"
             + ("" if args.structure == "unstructured" else f", structure {args.structure}") + ")")
    table = report.markdown(results)
    md = os.path.join(args.out, "results.md")
    with open(md, "w") as f:
        f.write(f"# {title}\n\n{table}\n{len(results)} runs in {seconds:.0f} s.\n")
    js = os.path.join(args.out, "results.json")
    with open(js, "w") as f:
        json.dump({"command": "rigl-fast train --compare", "args": {k: v for k, v in vars(args).items()
                                                                   if k != "func"},
                   "runs": results}, f, indent=1)
    png = os.path.join(args.out, "compare.png")
    report.plot(results, png, title)
    print()
    print(title)
    print(table)
    print(f"{len(results)} runs in {seconds:.0f} s; wrote {md}, {js}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
