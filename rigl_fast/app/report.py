"""Tables and plots of many runs (`rigl-fast train --compare` and the quality study).

Input everywhere: a list of `RunResult.to_dict()` dicts. Dense runs do not depend on density or distribution;
they are shown once, as a reference line.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Dict, List, Sequence

from .demo import METHODS

NAMES = {"dense": "dense", "static": "static", "set": "SET", "rigl": "RigL"}
COLORS = {"dense": "black", "static": "tab:gray", "set": "tab:orange", "rigl": "tab:blue"}


def _key(r):
    c = r["config"]
    return (c["distribution"], c["density"], c["method"])


def total_density(r) -> float:
    n = sum(layer["numel"] for layer in r["layers"])
    return sum(layer["active"] for layer in r["layers"]) / n if n else 1.0


def _ms(values: Sequence[float], scale=1.0, digits=1) -> str:
    v = [x * scale for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def grid(results: List[dict]):
    """(distributions, densities, sparse methods present, dense runs, {(dist, density, method): [runs]})"""
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    dense = []
    for r in results:
        if r["config"]["method"] == "dense":
            dense.append(r)
        else:
            groups[_key(r)].append(r)
    dists = sorted({k[0] for k in groups}, key=lambda d: (d != "uniform", d))
    densities = sorted({k[1] for k in groups}, reverse=True)
    methods = [m for m in METHODS if m != "dense" and any(k[2] == m for k in groups)]
    return dists, densities, methods, sorted(dense, key=lambda r: r["config"]["seed"]), groups


def wins(a_runs: List[dict], b_runs: List[dict]):
    """Per seed: (#seeds where a's test accuracy > b's, #ties, #seeds where a's train loss < b's, #paired)."""
    b_by_seed = {r["config"]["seed"]: r for r in b_runs}
    acc = tie = loss = n = 0
    for r in a_runs:
        o = b_by_seed.get(r["config"]["seed"])
        if o is None:
            continue
        n += 1
        acc += r["test_acc"] > o["test_acc"]
        tie += r["test_acc"] == o["test_acc"]
        loss += r["train_loss"] < o["train_loss"]
    return acc, tie, loss, n


def markdown(results: List[dict]) -> str:
    """One table per distribution: test accuracy (%) and final train loss as mean ± std over seeds, the mean
    number of classes the model never predicts on the test set, and per-seed wins of RigL over the others."""
    dists, densities, methods, dense, groups = grid(results)
    out = []
    if dense:
        out.append(f"dense (all densities): test accuracy {_ms([r['test_acc'] for r in dense], 100)} %, "
                   f"train loss {_ms([r['train_loss'] for r in dense], 1, 4)}, "
                   f"{len(dense)} seeds\n")
    for dist in dists:
        out.append(f"\n**{dist}** (density = the requested `dense_allocation`; *model* = the fraction of all "
                   f"Linear/Conv weights that are active)\n")
        out.append("| density | model | method | test acc % | train loss | classes never predicted | "
                   "RigL beats it: acc / loss (seeds) |")
        out.append("|---|---|---|---|---|---|---|")
        for density in densities:
            for m in methods:
                runs = groups.get((dist, density, m), [])
                if not runs:
                    continue
                vs = ""
                rigl = groups.get((dist, density, "rigl"))
                if m != "rigl" and rigl:
                    a, t, lo, n = wins(rigl, runs)
                    vs = f"{a}/{n} ({t} ties) / {lo}/{n}"
                out.append(f"| {density:g} | {total_density(runs[0]):.1%} | {NAMES[m]} | "
                           f"{_ms([r['test_acc'] for r in runs], 100)} | "
                           f"{_ms([r['train_loss'] for r in runs], 1, 4)} | "
                           f"{statistics.mean(r['classes_never_predicted'] for r in runs):.1f} | {vs} |")
    return "\n".join(out) + "\n"


def _mean_churn(runs: List[dict]):
    by_step = defaultdict(list)
    for r in runs:
        for step, frac in r["churn"]:
            by_step[step].append(frac)
    steps = sorted(by_step)
    return steps, [statistics.mean(by_step[s]) for s in steps]


def plot(results: List[dict], path: str, title: str = "") -> None:
    """One row per distribution: test accuracy vs density, train loss vs density, mask churn over training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists, densities, methods, dense, groups = grid(results)
    rows = max(1, len(dists))
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), squeeze=False)
    for row, dist in enumerate(dists or ["-"]):
        ax_acc, ax_loss, ax_churn = axes[row]
        for ax, metric, scale in ((ax_acc, "test_acc", 100), (ax_loss, "train_loss", 1)):
            if dense:
                v = [r[metric] * scale for r in dense]
                mu = statistics.mean(v)
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                ax.axhline(mu, color=COLORS["dense"], lw=1, ls="--", label="dense")
                ax.axhspan(mu - sd, mu + sd, color=COLORS["dense"], alpha=0.08)
            for i, m in enumerate(methods):
                xs, mus, sds = [], [], []
                # Offset the methods a little along x so their error bars do not hide each other.
                f = 1 + 0.06 * (i - (len(methods) - 1) / 2)
                for d in densities:
                    runs = groups.get((dist, d, m))
                    if runs:
                        v = [r[metric] * scale for r in runs]
                        xs.append(d * f)
                        mus.append(statistics.mean(v))
                        sds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
                        # Every seed as a faint dot: the spread is often bimodal (a class cut off or not).
                        ax.scatter([d * f * 1.015] * len(v), v, s=6, color=COLORS[m], alpha=0.35, lw=0)
                ax.errorbar(xs, mus, yerr=sds, marker="o", ms=4, capsize=3, color=COLORS[m], label=NAMES[m])
            ax.set_xscale("log")
            ax.set_xlim(min(densities) / 1.4, max(densities) * 1.4)
            ax.set_xticks(densities)
            ax.set_xticklabels([f"{d:g}" for d in densities])
            ax.minorticks_off()
            ax.set_xlabel("density (dense_allocation)")
            ax.grid(alpha=0.3)
        ax_loss.set_yscale("log")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_loss.set_ylabel("final train loss (log)")
        ax_acc.set_title(f"{dist}: test accuracy, mean ± std over seeds")
        ax_loss.set_title(f"{dist}: train loss, mean ± std over seeds")
        ax_acc.legend(fontsize=8)
        # Churn: the fraction of active weights each topology update moves, mean over seeds. Static and
        # dense never move any; SET and RigL follow the cosine drop schedule, minus what is regrown in place.
        styles = ["-", "--", ":", "-.", (0, (1, 3))]
        for m in methods:
            if m == "static":
                continue
            for j, d in enumerate(densities):
                runs = groups.get((dist, d, m))
                if runs:
                    steps, fr = _mean_churn(runs)
                    ax_churn.plot(steps, [100 * f for f in fr], color=COLORS[m], ls=styles[j % len(styles)],
                                  label=f"{NAMES[m]} d={d:g}")
        ax_churn.set_xlabel("training step")
        ax_churn.set_ylabel("weights newly grown (% of active)")
        ax_churn.set_title(f"{dist}: mask churn per topology update")
        ax_churn.grid(alpha=0.3)
        if ax_churn.lines:
            ax_churn.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
