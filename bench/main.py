"""Command line: `python -m rigl_fast.bench [--quick] [--device cpu|cuda] [--out DIR] [--tag TAG] [--no-plots]`."""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

import torch

from . import report, suite

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(msg, flush=True)


def run_bench(quick: bool = False, device: str = None, out_dir: str = None, plots: bool = True,
              log=_log, tag: str = None) -> dict:
    """Run the set for `device` (default: cuda when available), write JSON + markdown (+ plots) under
    out_dir (default bench/results, or bench/results/quick with quick), named `<device>[-<tag>]`, and return
    the results and paths."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if out_dir is None:
        out_dir = os.path.join(HERE, "results", "quick" if quick else "")
    with warnings.catch_warnings():
        # rigl_fast warns when it falls back to the reference backend; the bench lists the backends itself
        warnings.simplefilter("ignore", RuntimeWarning)
        res = suite.run(dev, quick, log=log)
    res = {"meta": report.meta(dev), **res}
    res["paths"] = report.write(res, out_dir, dev, with_plots=plots, tag=tag)
    log("wrote " + ", ".join(res["paths"].values()))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rigl_fast.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sets, 1-2 repeats: a smoke test (seconds)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="output folder (default bench/results[/quick])")
    p.add_argument("--tag", default=None, help="suffix of the result files' names (<device>-<tag>.json ...), "
                   "to keep an earlier run of the same device beside a new one")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    # Triton's CPU interpreter is a test aid; in a benchmark it would only make the triton backend crawl.
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 is set; triton is not benchmarked on CPU anyway", file=sys.stderr)
    if a.tag is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", a.tag):
        p.error("--tag: lower-case letters, digits and '-' only")
    run_bench(a.quick, a.device, a.out, plots=not a.no_plots, tag=a.tag)
    return 0
