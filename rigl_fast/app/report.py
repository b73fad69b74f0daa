"""Tables and plots of many runs (`rigl-fast train --compare` and the quality study).

Input everywhere: a list of `RunResult.to_dict()` dicts. Dense runs do not depend on density or distribution;
they are shown once, as a reference line. A sparse method with a structure is its own row and line
('RigL fan_in', 'RigL 2:4'): a *variant*, the method's name and the structure.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

from .demo import METHODS

NAMES = {"dense": "dense", "static": "static", "set": "SET", "rigl": "RigL"}
COLORS = {"dense": "black", "static": "tab:gray", "set": "tab:orange", "rigl": "tab:blue"}
# The method keeps its colour; a structure changes the line and the marker, so RigL fan_in reads as RigL's kin.
_STRUCTURE_STYLE = {"": ("-", "o"), "fan_in": ("--", "s")}
_NM_STYLE = (":", "D")


def variant(r) -> str:
    """'rigl', 'rigl fan_in', 'rigl 2:4', ...: the method, and its structure when it has one."""
    c = r["config"]
    s = c.get("structure", "unstructured")  # results written before structure= existed have none
    return c["method"] if s == "unstructured" else f"{c['method']} {s}"


def name(v: str) -> str:
    method, _, structure = v.partition(" ")
    return NAMES[method] + (f" {structure}" if structure else "")


def _style(v: str):
    method, _, structure = v.partition(" ")
    return (COLORS[method],) + _STRUCTURE_STYLE.get(structure, _NM_STYLE)


def _key(r):
    return (r["config"]["distribution"], r["config"]["density"], variant(r))


def total_density(r) -> float:
    n = sum(layer["numel"] for layer in r["layers"])
    return sum(layer["active"] for layer in r["layers"]) / n if n else 1.0


def _ms(values: Sequence[float], scale=1.0, digits=1) -> str:
    v = [x * scale for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def grid(results: List[dict]):
    """(distributions, densities, sparse variants present, dense runs, {(dist, density, variant): [runs]})"""
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    dense = []
    for r in results:
        if r["config"]["method"] == "dense":
            dense.append(r)
        else:
            groups[_key(r)].append(r)
    dists = sorted({k[0] for k in groups}, key=lambda d: (d != "uniform", d))
    densities = sorted({k[1] for k in groups}, reverse=True)
    present = {k[2] for k in groups}
    # Each method's unstructured run first, then its structures (fan_in before N:M).
    methods = sorted(present, key=lambda v: (METHODS.index(v.partition(" ")[0]), v.partition(" ")[2] != "",
                                             v.partition(" ")[2] != "fan_in", v))
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
                method, _, structure = m.partition(" ")  # against RigL of the same structure
                rigl = groups.get((dist, density, " ".join(filter(None, ("rigl", structure)))))
                if method != "rigl" and rigl:
                    a, t, lo, n = wins(rigl, runs)
                    vs = f"{a}/{n} ({t} ties) / {lo}/{n}"
                out.append(f"| {density:g} | {total_density(runs[0]):.1%} | {name(m)} | "
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


def _metric_axes(ax, dense, groups, dist, densities, methods, metric: str, scale: float) -> None:
    """`metric` vs density on `ax`: the dense mean ± std as a band, every variant as mean ± std with its seeds
    as faint dots."""
    if dense:
        v = [r[metric] * scale for r in dense]
        mu = statistics.mean(v)
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        ax.axhline(mu, color=COLORS["dense"], lw=1, ls="--", label="dense")
        ax.axhspan(mu - sd, mu + sd, color=COLORS["dense"], alpha=0.08)
    for i, m in enumerate(methods):
        xs, mus, sds = [], [], []
        # Offset the variants a little along x so their error bars do not hide each other.
        f = 1 + 0.06 * (i - (len(methods) - 1) / 2)
        color, ls, marker = _style(m)
        for d in densities:
            runs = groups.get((dist, d, m))
            if runs:
                v = [r[metric] * scale for r in runs]
                xs.append(d * f)
                mus.append(statistics.mean(v))
                sds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
                # Every seed as a faint dot: the spread is often bimodal (a class cut off or not).
                ax.scatter([d * f * 1.015] * len(v), v, s=6, color=color, alpha=0.35, lw=0)
        ax.errorbar(xs, mus, yerr=sds, marker=marker, ls=ls, ms=4, capsize=3, color=color, label=name(m))
    if densities:  # none with --method dense alone: the dense band only
        ax.set_xscale("log")
        ax.set_xlim(min(densities) / 1.4, max(densities) * 1.4)
        ax.set_xticks(densities)
        ax.set_xticklabels([f"{d:g}" for d in densities])
        ax.minorticks_off()
    ax.set_xlabel("density (dense_allocation)")
    ax.grid(alpha=0.3)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(results: List[dict], path: str, title: str = "") -> None:
    """One row per distribution: test accuracy vs density, train loss vs density, mask churn over training."""
    plt = _pyplot()
    dists, densities, methods, dense, groups = grid(results)
    rows = max(1, len(dists))
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), squeeze=False)
    for row, dist in enumerate(dists or ["-"]):
        ax_acc, ax_loss, ax_churn = axes[row]
        _metric_axes(ax_acc, dense, groups, dist, densities, methods, "test_acc", 100)
        _metric_axes(ax_loss, dense, groups, dist, densities, methods, "train_loss", 1)
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
            if m.partition(" ")[0] == "static":
                continue
            for j, d in enumerate(densities):
                runs = groups.get((dist, d, m))
                if runs:
                    steps, fr = _mean_churn(runs)
                    ax_churn.plot(steps, [100 * f for f in fr], color=_style(m)[0], ls=styles[j % len(styles)],
                                  label=f"{name(m)} d={d:g}")
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


def plot_panels(panels: Sequence[Tuple[str, List[dict]]], path: str, title: str = "", ncols: int = 2) -> None:
    """Test accuracy vs density, one panel per (panel title, results) pair; one distribution per panel (the
    first, uniform before the others, when there are several)."""
    plt = _pyplot()
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.4 * nrows), squeeze=False)
    for ax, (panel, results) in zip(axes.flat, panels):
        dists, densities, methods, dense, groups = grid(results)
        _metric_axes(ax, dense, groups, dists[0], densities, methods, "test_acc", 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(panel)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pivot(panels: Sequence[Tuple[str, List[dict]]], first: str = "") -> str:
    """One markdown table of test accuracy (%), mean ± std over seeds: a row per (panel, variant), a column per
    density, dense under '1'. Each panel's first distribution (uniform before the others)."""
    grids = [(label, grid(results)) for label, results in panels]
    densities = sorted({d for _, g in grids for d in g[1]}, reverse=True)
    lines = [f"| {first} | method | 1 | " + " | ".join(f"{d:g}" for d in densities) + " |",
             "|---|---|---|" + "---|" * len(densities)]
    for label, (dists, _, methods, dense, groups) in grids:
        if dense:
            lines.append(f"| {label} | dense | {_ms([r['test_acc'] for r in dense], 100)} |" + " |" * len(densities))
        for m in methods:
            cells = [_ms([r["test_acc"] for r in groups[(dists[0], d, m)]], 100) if (dists[0], d, m) in groups
                     else "" for d in densities]
            lines.append(f"| {label} | {name(m)} | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
