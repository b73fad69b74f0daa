"""Inference latency of exported sparse Linear layers vs the dense layer and torch.sparse CSR (issue 15).

    python -m rigl_fast.bench.export            # bench/results/<device>-export.{json,md,png}
    python -m rigl_fast.bench.export --quick    # a tiny set, seconds (tests/test_export.py runs it)

For each Linear shape (out x in), batch size and sparsity, one random constant-fan-in mask (every row keeps
round(density * in) weights, as structure='fan_in' trains them) and four contenders computing the same y:
- `dense`: nn.Linear holding the masked weight (zeros included) — what a rigl_fast-trained model is today;
- `fan_in`: export's FanInLinear (values and indices (out, k); rigl_fast_export::fan_in_linear);
- `csr`: export's CSRLinear (compressed rows; rigl_fast_export::csr_linear) on the same mask;
- `torch.sparse`: the weight as `w.to_sparse_csr()` and `(w_csr @ x.T).T`, the faster of the two ways a user
  would call it on CPU (F.linear(x, w_csr) is slower at batch > 1).
All in fp32 under torch.inference_mode(), bias included. One sample = the time of a block of calls divided by
its length (the block is sized once per shape and batch so the dense contender takes about 10 ms: batch-1
calls are too short for one perf_counter reading each). Contenders alternate inside every repeat, in an order
rotated per repeat, so the machine's drift lands in the min-max spread and not in the ratios; the ratios
(dense / contender: > 1 means faster than dense) are of medians from the same run.
Every configuration is measured twice: quiet, then loaded, while one other PyTorch process runs small matmuls on
its default threads (bench/contention.py), the load under which kernels that open an OpenMP region for
sub-millisecond work lose their speed (issue 21); the tables show both side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
import warnings

import torch
from torch import nn

from rigl_fast import structure as _structure
from rigl_fast.export import CSRLinear, FanInLinear

from . import contention, report, timing
from .suite import _rotate

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = ("dense", "fan_in", "csr", "torch.sparse")
TARGET_S = 0.01  # a block's length: about this long for the dense contender


def settings(quick: bool):
    """(shapes as (out, in), batch sizes, sparsities)."""
    if quick:
        return [(64, 96)], [1, 3], [0.9]
    # 2048x2048: the layer of issue 21's contention report
    return [(1024, 1024), (2048, 2048), (4096, 1024), (1024, 4096), (4096, 4096)], [1, 64, 512], [0.8, 0.9, 0.95, 0.98]


def _modules(out, inp, sparsity, gen):
    """The four contenders' callables, built from one masked weight."""
    units = _structure.units("fan_in", (out, inp), False, sparsity)
    mask = _structure.draw(units, gen).view(out, inp)
    weight = torch.randn(out, inp, generator=gen) * mask / inp ** 0.5
    bias = torch.randn(out, generator=gen)
    dense = nn.Linear(inp, out)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    fan_in, csr = FanInLinear(weight, mask, bias), CSRLinear(weight, mask, bias)
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        w_csr = weight.to_sparse_csr()

    def user_csr(x):
        return (w_csr @ x.t()).t() + bias

    return {"dense": dense, "fan_in": fan_in, "csr": csr, "torch.sparse": user_csr}, int(mask[0].sum())


def _block(fn, x, n):
    t = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - t) / n


def run(quick: bool, repeats: int) -> dict:
    """The quiet pass, then the same under a competing process (rows tagged load='quiet' / 'loaded')."""
    rows = measure(quick, repeats, "quiet")
    with contention.competing_process():
        rows += measure(quick, repeats, "loaded")
    return {"meta": report.meta(torch.device("cpu")), "repeats": repeats, "rows": rows, "notes": [contention.NOTE]}


def measure(quick: bool, repeats: int, load: str) -> list:
    shapes, batches, sparsities = settings(quick)
    rows = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for out, inp in shapes:
            for batch in batches:
                gen = torch.Generator().manual_seed(out * 7919 + inp * 31 + batch)
                x = torch.randn(batch, inp, generator=gen)
                n = None
                for sparsity in sparsities:
                    fns, k = _modules(out, inp, sparsity, gen)
                    want = fns["dense"](x)
                    for c in CONTENDERS:  # warm up (first C++ load, sparse caches) and check they agree
                        torch.testing.assert_close(fns[c](x), want, rtol=1e-4, atol=1e-4)
                    if n is None:  # block length, once per shape and batch: the same for every sparsity
                        n = max(1, int(TARGET_S / max(_block(fns["dense"], x, 3), 1e-7)))
                    samples = {c: [] for c in CONTENDERS}
                    for r in range(repeats):
                        for c in _rotate(list(CONTENDERS), r):
                            samples[c].append(_block(fns[c], x, n))
                    dense = timing.stats(samples["dense"])["median"]
                    for c in CONTENDERS:
                        s = timing.stats(samples[c])
                        rows.append({"out": out, "in": inp, "batch": batch, "sparsity": sparsity, "k": k,
                                     "contender": c, "block": n, **s, "speedup_vs_dense": dense / s["median"],
                                     "load": load})
    return rows


def markdown(res) -> str:
    m = res["meta"]
    lines = [f"# Exported sparse Linear: inference latency ({m['device_name']})", "",
             f"{m['date']}, torch {m['torch']}, python {m['python']}, {m['torch_threads']} threads, commit "
             f"{m['git_commit']}, {res['repeats']} interleaved repeats. Median microseconds per call (min-max), "
             "and in brackets the speed-up over the dense layer from the same run (> 1: faster than dense). "
             "fp32, constant fan-in masks (bench/export.py says what each contender is). Each cell: quiet · "
             "loaded (one competing PyTorch process, bench/contention.py) and loaded / quiet.", ""]
    keys = sorted({(r["out"], r["in"], r["batch"]) for r in res["rows"]}, key=lambda t: (t[2], t[0] * t[1], t))
    for out, inp, batch in keys:
        lines += [f"## {out}x{inp} (out x in), batch {batch}", "",
                  "| sparsity | " + " | ".join(CONTENDERS) + " |", "| --- " * (len(CONTENDERS) + 1) + "|"]
        group = [r for r in res["rows"] if (r["out"], r["in"], r["batch"]) == (out, inp, batch)]
        for sp in sorted({r["sparsity"] for r in group}):
            cells = []
            for c in CONTENDERS:
                rs = {r.get("load", "quiet"): r for r in group if r["sparsity"] == sp and r["contender"] == c}
                cell = " · ".join(_cell(rs[load], c) for load in ("quiet", "loaded") if load in rs)
                if len(rs) == 2:
                    cell += f" ({rs['loaded']['median'] / rs['quiet']['median']:.1f}x)"
                cells.append(cell)
            lines.append(f"| {sp:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {n}" for n in res.get("notes", [])]
    return "\n".join(lines)


def _cell(r, contender) -> str:
    return (f"{r['median'] * 1e6:.0f} ({r['min'] * 1e6:.0f}-{r['max'] * 1e6:.0f})"
            + ("" if contender == "dense" else f" [{r['speedup_vs_dense']:.2f}x]"))


def plot(res, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["out"], r["in"]) for r in res["rows"]}, key=lambda t: (t[0] * t[1], t))
    batches = sorted({r["batch"] for r in res["rows"]})
    fig, axes = plt.subplots(len(batches), len(keys), figsize=(3.2 * len(keys), 3 * len(batches)), squeeze=False)
    for bi, batch in enumerate(batches):
        for ki, (out, inp) in enumerate(keys):
            ax = axes[bi][ki]
            for c in CONTENDERS:
                rs = sorted((r for r in res["rows"] if (r["out"], r["in"], r["batch"], r["contender"])
                             == (out, inp, batch, c) and r.get("load", "quiet") == "quiet"),
                            key=lambda r: r["sparsity"])
                ax.plot([100 * r["sparsity"] for r in rs], [r["median"] * 1e6 for r in rs], marker="o", label=c)
            ax.set_yscale("log")
            ax.set_title(f"{out}x{inp}, batch {batch}", fontsize=9)
            ax.set_xlabel("sparsity %")
            if ki == 0:
                ax.set_ylabel("us per call")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Exported sparse Linear vs dense, {res['meta']['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=timing.positive_int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--tag", default=None, help="suffix of the result files' names (<device>-export-<tag>.*), to "
                    "keep an earlier run beside a new one")
    a = ap.parse_args(argv)
    if a.tag is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", a.tag):
        ap.error("--tag: lower-case letters, digits and '-' only")
    res = run(a.quick, a.repeats if a.repeats is not None else (2 if a.quick else 7))
    out = a.out or os.path.join(HERE, "results", "quick" if a.quick else "")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, report.device_slug(torch.device("cpu")) + "-export" + (f"-{a.tag}" if a.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    if not a.no_plots:
        plot(res, stem + ".png")
    print(markdown(res))
    return stem


if __name__ == "__main__":
    main()
