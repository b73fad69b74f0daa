"""Results -> JSON, a markdown report and plots, named for the device."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
from typing import Dict, List

import torch

from . import contenders as C


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    return device.type + "-" + re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def meta(device: torch.device) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:
        commit, dirty = None, None
    return {
        "device": str(device), "device_name": device_name(device), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "numpy": _version("numpy"), "rigl_torch": C.rigl_torch_version(),
        "sparsimony": C.sparsimony_version() if C.import_sparsimony() is not None else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_commit": commit, "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------------ markdown
def _ms(st) -> str:
    med, lo, hi = (st[k] * 1e3 for k in ("median", "min", "max"))
    f = (lambda v: f"{v:.3g}") if med < 100 else (lambda v: f"{v:.0f}")
    return f"{f(med)} ({f(lo)}-{f(hi)})" if st["n"] > 1 else f"{f(med)}"


def _contenders(rows) -> List[str]:
    seen = []
    for r in rows:
        if r["contender"] not in seen:
            seen.append(r["contender"])
    return seen


def _grid(rows, key_fn, keys_header, cell) -> List[str]:
    names = _contenders(rows)
    keys = []
    for r in rows:
        k = key_fn(r)
        if k not in keys:
            keys.append(k)
    out = ["| " + " | ".join(keys_header + names) + " |", "|" + "---|" * (len(keys_header) + len(names))]
    for k in keys:
        by = {r["contender"]: r for r in rows if key_fn(r) == k}
        out.append("| " + " | ".join(list(k) + [cell(by[n]) if n in by else "—" for n in names]) + " |")
    return out


def _cfg(r):
    return (r["set"], f"{r['n_sparse'] / 1e6:.3g}M", f"{r['sparsity']:.0%}", r["dtype"])


def _peer_ratios(rows, key, peer) -> List[dict]:
    """Each rigl_fast contender's row with `ratio` = the peer's median / its median (same configuration, same
    run): how many times faster rigl_fast is."""
    out = []
    for r in rows:
        if r["contender"] in C.PEERS:
            continue
        ref = [x for x in rows if _cfg(x) == _cfg(r) and x["contender"] == peer]
        if ref:
            out.append(dict(r, ratio=ref[0][key]["median"] / r[key]["median"]))
    return out


def _speedup(rows, r, key):
    ref = [x for x in rows if _cfg(x) == _cfg(r) and x["contender"] == C.RIGL_TORCH]
    if not ref or r["contender"] == C.RIGL_TORCH:
        return ""
    return f", {ref[0][key]['median'] / r[key]['median']:.1f}x"


def markdown(res: dict) -> str:
    m = res["meta"]
    bw = res["copy_bandwidth_Bps"]
    L = [f"# rigl_fast benchmark: {m['device_name']} ({m['device']})", "",
         f"{m['date']} · commit `{(m['git_commit'] or '?')[:12]}`{' (dirty)' if m['git_dirty'] else ''} · "
         f"python {m['python']} · torch {m['torch']} · triton {m['triton']} · rigl-torch {m['rigl_torch']} · "
         f"sparsimony {m.get('sparsimony') or 'not installed'} · "
         f"{m['torch_threads']} threads · rigl_fast backends: {', '.join(res['backends'])}"
         + (" · **--quick (smoke test, not a measurement)**" if res["quick"] else ""), "",
         f"Copy bandwidth (read + write, measured in this run): {bw['median'] / 1e9:.1f} GB/s "
         f"({bw['min'] / 1e9:.1f}-{bw['max'] / 1e9:.1f}).", "",
         "Times in ms: median (min-max) over interleaved repeats. `x floor` = time / (bytes that must move / copy "
         "bandwidth). The copy bandwidth credits torch's `copy_` with reading and writing each byte once, but its "
         "stores also read every destination line first (write-allocate): a kernel with streaming stores, such "
         "as the C++ gradient op, or an in-place pass that writes only lines it has just read, such as the "
         "after-step masking, moves less than it is credited with and can come in under 1x. `Nx` = speed-up "
         "over rigl-torch. `rigl_fast[<backend>]` runs rigl_fast's default after_step='always' (weights and every "
         "same-shaped optimizer state masked after every optimizer step: exact whatever else touches them); "
         "`+trusted` is the opt-in fast path after_step='trusted', which skips that pass for optimizers proven "
         "zero-preserving (SGD, Adam, AdamW, RMSprop, Adagrad; SGD here) and is exact only while nothing but "
         "rigl_fast's hooks changes the sparse weights, their gradients and their optimizer states (no "
         "load_state_dict after construction, no gradient clipping or noise hooks). A contender that skips the "
         "pass is held to the gradient op's bytes alone.", ""]
    L += ["## Per-step overhead (gradient hooks + after-step pass), ms", ""]
    L += _grid(res["step"], _cfg, ["weights", "sparse", "sparsity", "dtype"],
               lambda r: f"{_ms(r['total'])} [{r['x_floor']:.2g}x floor{_speedup(res['step'], r, 'total')}]")
    faulty = [r for r in res["step"] if r.get("minor_faults_per_step", 0) >= 1000]
    if faulty:
        by_cfg = {}
        for r in faulty:
            by_cfg.setdefault(_cfg(r), []).append(f"{r['contender']} {r['minor_faults_per_step'] / 1e3:.0f}k")
        L += ["", "Minor page faults per step (median), where over 1000: fresh pages of a large gradient faulting "
              "in on first touch, a cost of the allocator that lands in whichever op touches them first. "
              + "; ".join(f"{k[0]} {k[2]} {k[3]}: " + ", ".join(v) for k, v in by_cfg.items()) + "."]
    loaded = [r for r in res["step"] if "loaded_total" in r]
    if loaded:
        L += ["", "## Per-step overhead with one competing process, ms: loaded median (min-max) and loaded / quiet "
              "median", "", "The same contenders while one other PyTorch process runs 64x64 matmuls on its default "
              "threads (bench/contention.py).", ""]
        L += _grid(loaded, _cfg, ["weights", "sparse", "sparsity", "dtype"],
                   lambda r: f"{_ms(r['loaded_total'])} [{r['loaded_total']['median'] / r['total']['median']:.2f}x]")
    cost = _grid(_safe_default_cost(res["step"]), _cfg, ["weights", "sparse", "sparsity", "dtype"],
                 lambda r: f"{r['ratio']:.2f}x ({r['extra_ms']:+.3g} ms)")
    if len(cost) > 2:
        L += ["", "## Cost of the safe default: per-step time with after_step='always' / with 'trusted' "
              "(medians of the same run)", ""] + cost
    L += ["", "## Update latency (one topology update of all layers), ms", ""]
    L += _grid(res["update"], _cfg, ["weights", "sparse", "sparsity", "dtype"],
               lambda r: f"{_ms(r['latency'])} [{r['x_floor']:.2g}x floor{_speedup(res['update'], r, 'latency')}]")
    L += ["", "## Peak extra memory during an update, bytes per sparse weight", ""]
    L += _grid(res["update"], _cfg, ["weights", "sparse", "sparsity", "dtype"],
               lambda r: "n/a" if r["peak_extra_bytes_per_weight"] is None
               else f"{r['peak_extra_bytes_per_weight']:.2f}")
    for peer in [p for p in C.PEERS if p != C.RIGL_TORCH]:  # rigl-torch's ratio is in every cell already
        grids = [(what, _grid(_peer_ratios(rows, key, peer), _cfg, ["weights", "sparse", "sparsity", "dtype"],
                              lambda r: f"{r['ratio']:.2f}x"))
                 for what, rows, key in (("per-step overhead", res["step"], "total"),
                                         ("update latency", res["update"], "latency"))]
        if any(len(g) > 2 for _, g in grids):
            L += ["", f"## Against {peer}: its median / rigl_fast's median (same run; > 1 = rigl_fast faster)"]
            for what, g in grids:
                if len(g) > 2:
                    L += ["", f"{what}:", ""] + g
    L += ["", "## End-to-end training, steps/s (one update every delta steps included)", ""]
    L += _grid(res["e2e"], lambda r: (f"{r['model']} (width {r['width']}, {r['model_source']})",
                                      f"{r['input']}x{r['input']}", str(r["batch"]), str(r["delta"])),
               ["model", "input", "batch", "delta"],
               lambda r: f"{r['steps_per_s']['median']:.3g} ({r['steps_per_s']['min']:.3g}-"
                         f"{r['steps_per_s']['max']:.3g}) [{r['vs_dense']:.2f}x dense]")
    L += ["", "## Scaling: update latency against weight count, ms", ""]
    L += _grid(res["scaling"], lambda r: (r["label"], f"{r['n_sparse'] / 1e6:.3g}M"), ["weights", "sparse"],
               lambda r: _ms(r["latency"]))
    exps = scaling_exponents(res)
    if exps:
        L += ["", "Fitted exponent k in latency ~ n^k over the sweep points of >= 4M weights (1 = linear): "
              + ", ".join(f"{n} {k:.2f}" for n, k in exps.items()) + "."]
    if res["notes"]:
        L += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(L) + "\n"


def _safe_default_cost(step_rows) -> List[dict]:
    """For each rigl_fast contender with a `+trusted` twin in the same configuration: the ratio of their per-step
    medians (default 'always' / fast path 'trusted') and the extra milliseconds, one row per pair."""
    out = []
    suffix = "+" + C.FAST_PATH
    for r in step_rows:
        if not r["contender"].endswith(suffix):
            continue
        default = r["contender"][:-len(suffix)]
        twin = [x for x in step_rows if _cfg(x) == _cfg(r) and x["contender"] == default]
        if twin:
            a, t = twin[0]["total"]["median"], r["total"]["median"]
            out.append(dict(r, contender=default, ratio=a / t, extra_ms=(a - t) * 1e3))
    return out


def scaling_exponents(res) -> Dict[str, float]:
    out = {}
    for name in _contenders(res["scaling"]):
        pts = [(r["n_sparse"], r["latency"]["median"]) for r in res["scaling"]
               if r["contender"] == name and r["label"].startswith("stack-") and r["n_sparse"] >= 4_000_000]
        if len(pts) >= 2:
            xs = [math.log(p[0]) for p in pts]
            ys = [math.log(p[1]) for p in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            den = sum((x - mx) ** 2 for x in xs)
            if den > 0:
                out[name] = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den
    return out


# ------------------------------------------------------------------------------------------------ plots
def plots(res: dict, prefix: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    title = f"{res['meta']['device_name']}"
    fig, ax = plt.subplots(figsize=(7, 5))
    annotated = set()
    for name in _contenders(res["scaling"]):
        pts = sorted((r["n_sparse"], r["latency"]) for r in res["scaling"]
                     if r["contender"] == name and r["label"].startswith("stack-"))
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1]["median"] * 1e3 for p in pts], "o-", label=name)
            ax.fill_between([p[0] for p in pts], [p[1]["min"] * 1e3 for p in pts],
                            [p[1]["max"] * 1e3 for p in pts], color=line.get_color(), alpha=0.2)
        others = {}  # one marker per named set; the sweep's own measurement wins over the main table's
        for r in [r for r in res["update"] if r["contender"] == name and r["sparsity"] == 0.9
                  and r["dtype"] == "fp32"]:
            others[r["set"]] = r
        for r in [r for r in res["scaling"] if r["contender"] == name and not r["label"].startswith("stack-")]:
            others[r["label"]] = r
        for label, r in others.items():
            ax.plot(r["n_sparse"], r["latency"]["median"] * 1e3, "s", mfc="none",
                    color=line.get_color() if pts else None)
            if label not in annotated:
                annotated.add(label)
                ax.annotate(label, (r["n_sparse"], r["latency"]["median"] * 1e3),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("sparse weights"), ax.set_ylabel("update latency (ms)")
    ax.set_title(f"Update latency vs weight count (90%, fp32) — {title}\n"
                 "lines: stacks of square Linear layers; squares: named weight sets", fontsize=9)
    ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    path = prefix + "_scaling.png"
    fig.savefig(path, dpi=110), plt.close(fig)
    written.append(path)

    main = [(r["set"]) for r in res["update"] if r["sparsity"] == 0.9 and r["dtype"] == "fp32"]
    sets = list(dict.fromkeys(main))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, rows, what in ((axes[0], "total", res["step"], "per-step overhead"),
                                (axes[1], "latency", res["update"], "update latency")):
        names = _contenders(rows)
        width = 0.8 / max(1, len(names))
        fx, fy = [], []  # each bar's own floor: a contender that skips work is held to fewer bytes
        for j, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for i, s in enumerate(sets):
                r = [x for x in rows if x["set"] == s and x["contender"] == name and x["sparsity"] == 0.9
                     and x["dtype"] == "fp32"]
                if r:
                    st = r[0][key]
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    ys.append(st["median"] * 1e3)
                    lo.append((st["median"] - st["min"]) * 1e3)
                    hi.append((st["max"] - st["median"]) * 1e3)
                    fx.append(xs[-1]), fy.append(r[0]["floor_s"] * 1e3)
            ax.bar(xs, ys, width, yerr=[lo, hi], label=name, capsize=2)
        ax.scatter(fx, fy, marker="_", s=(60 * width) ** 2, color="k", zorder=5, label="floor (bytes / copy bandwidth)")
        ax.set_xticks(range(len(sets)), sets)
        ax.set_yscale("log"), ax.set_ylabel("ms"), ax.set_title(f"{what} (90%, fp32) — {title}", fontsize=9)
        ax.legend(fontsize=7), ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = prefix + "_bars.png"
    fig.savefig(path, dpi=110), plt.close(fig)
    written.append(path)
    return written


def write(res: dict, out_dir: str, device: torch.device, with_plots: bool = True, tag: str = None) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, device_slug(device) + (f"-{tag}" if tag else ""))
    paths = {"json": prefix + ".json", "md": prefix + ".md"}
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(res))
    if with_plots:
        for p in plots(res, prefix):
            paths[os.path.basename(p).rsplit("_", 1)[1][:-4]] = p
    return paths
