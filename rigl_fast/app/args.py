"""The `rigl-fast train` command's arguments: argparse types for its values, and the checks of their combinations
that argparse cannot make (`_resolve`), all before any data is loaded or any model trained."""
from __future__ import annotations

import argparse
import os

_METHODS = ("dense", "static", "set", "rigl")
_MODELS = ("cnn", "cnn1d", "mlp")
_DATASETS = ("digits", "mnist1d", "mnist", "cifar10")
_SMALL_DATA = ("digits", "mnist1d")  # held in memory, a few thousand samples: small-data defaults below


# ----------------------------------------------------------------------------- argument types
def _list_of(kind, name, check=None, choices=None):
    """An argparse type for 'a' or 'a,b,c'; argparse prefixes errors with the option's name."""
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected one {name} or a comma-separated list, got {text!r}")
        out = []
        for t in items:
            try:
                v = kind(t)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{t!r} is not a valid {name}") from None
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"invalid {name} {t!r} (choose from {', '.join(choices)})")
            if check is not None:
                msg = check(v)
                if msg:
                    raise argparse.ArgumentTypeError(f"{name} {t!r} {msg}")
            if v in out:  # it would run twice and count as two more seeds in --compare's table
                raise argparse.ArgumentTypeError(f"{name} {t!r} is listed twice")
            out.append(v)
        return out
    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _positive(name, cast):
    """An argparse type: a number of type `cast` (int or float) that must be > 0."""
    noun, bound = ("an integer", ">= 1") if cast is int else ("a number", "> 0")

    def parse(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {v}")
        return v
    parse.__name__ = name
    return parse


def _alpha(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], got {v}")
    return v


def _structure(text):
    from ..structure import parse
    try:
        parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _resolve(args, parser):
    """Fill the mode-dependent defaults and check the combinations argparse cannot."""
    if not args.compare:
        for name in ("method", "density", "distribution"):
            v = getattr(args, name)
            if v is not None and len(v) > 1:
                parser.error(f"argument --{name}: a list of values ({','.join(map(str, v))}) needs --compare")
        if args.seeds != 10:
            parser.error("argument --seeds: only used with --compare (use --seed for a single run)")
        if args.out is not None:
            parser.error("argument --out: the folder for --compare's results; a single run writes nothing there")
    args.out = args.out or "rigl_fast_compare"
    if args.data in _SMALL_DATA and (args.data_dir is not None or args.download):
        parser.error(f"argument --data-dir/--download: only for --data mnist or cifar10 ({args.data} needs no "
                     "files)")
    args.data_dir = args.data_dir or "data"
    if args.export is not None:
        if args.compare:
            parser.error("argument --export: exports the model of a single run, not with --compare")
        if args.method == ["dense"]:
            parser.error("argument --export: a dense model has nothing to export: use --method static, set or rigl")
        folder = os.path.dirname(os.path.abspath(args.export))
        if not os.path.isdir(folder):
            parser.error(f"argument --export: folder {folder} does not exist")
        if os.path.isdir(args.export) or not os.access(folder, os.W_OK):
            parser.error(f"argument --export: {args.export} is a folder, not a file path" if os.path.isdir(args.export)
                         else f"argument --export: folder {folder} is not writable")
    if args.compute != "dense" and args.method == ["dense"]:
        parser.error("argument --compute: --method dense has no scheduler and no sparse layers to compute "
                     "sparsely: use --method static, set or rigl")
    args.model = args.model or ("mlp" if args.compare else "cnn1d" if args.data == "mnist1d" else "cnn")
    if args.model == "cnn" and args.data == "mnist1d":
        parser.error("argument --model: cnn is a 2-D CNN for images; mnist1d is a sequence: use cnn1d or mlp")
    args.method = args.method or (list(_METHODS) if args.compare else ["rigl"])
    args.density = args.density or ([0.02] if args.compare else [0.1])
    args.distribution = args.distribution or ["uniform"]
    args.epochs = args.epochs or {"digits": 40, "mnist1d": 60}.get(args.data, 5)
    args.delta = args.delta or (10 if args.data in _SMALL_DATA else 100)
    if args.threads is None and args.data in _SMALL_DATA:
        args.threads = 1
    if any(m != "dense" for m in args.method):
        from ..structure import check
        for dist in args.distribution:
            for density in args.density:
                try:
                    check(args.structure, dict(sparsity_distribution=dist, dense_allocation=density))
                except ValueError as e:
                    parser.error(f"argument --structure: {e}")
