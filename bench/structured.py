"""The topology update of structured layers (fan_in, 2:4) beside unstructured, per backend (issue 14).

    python -m rigl_fast.bench.structured            # bench/results/<device>-structured.{json,md}
    python -m rigl_fast.bench.structured --quick    # tiny sets, seconds (tests/test_bench.py runs it)

One op call per weight set, as the scheduler makes it at an update: `ops.update` (unstructured) or
`ops.structured_update` (fan_in: one unit per row; 2:4: groups of 4 along the fan-in) on every layer of the
set, with weights, masks (drawn with the structure), scores, one momentum state and .grad, at the first
update's drop fraction (0.29 of the active weights). fan_in and unstructured at 90% sparsity; 2:4 is 50%
by definition, so unstructured at 50% is timed beside it. Contenders alternate each repeat; every call
starts from the same restored state. Medians, min-max, and ratios to unstructured from the same run.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from rigl_fast import ops as _ops
from rigl_fast import structure as _structure

from . import report, timing, weightsets
from .suite import _rotate

HERE = os.path.dirname(os.path.abspath(__file__))
DROP = 0.29


def weight_sets(quick: bool):
    if quick:
        return [("linear-64x96", [(64, 96)])]
    return [("linear-1024x1024", [(1024, 1024)]), ("linear-4096x1024", [(4096, 1024)]),
            ("gpt2-2-blocks", weightsets.gpt_shapes(768, 2))]  # 2 of gpt2-small's 12 blocks: 14M weights


def _layers(shapes, structure, sparsity, gen):
    """Per layer: (weight, mask, score, state, grad, units, n_keep)."""
    out = []
    for shape in shapes:
        w2 = tuple(shape[:1]) + (weightsets.numel(shape) // shape[0],)
        kind, _, _ = _structure.parse(structure)
        u = _structure.units(structure, w2, False, sparsity) if kind != "unstructured" else None
        if u is None:
            n = weightsets.numel(w2)
            flat = torch.ones(n, dtype=torch.bool)
            flat[torch.randperm(n, generator=gen)[:int(sparsity * n)]] = False
        else:
            flat = _structure.draw(u, gen)
        m = flat.view(w2)
        w = torch.randn(w2, generator=gen) * m
        n_active = int(m.sum())
        out.append((w, m, torch.randn(w2, generator=gen), torch.randn(w2, generator=gen) * m,
                    torch.randn(w2, generator=gen) * m, u, n_active - int(n_active * DROP)))
    return out


def _call(backend, layers):
    """A fresh copy of the mutable tensors, and the update on them (the copy is made outside the clock)."""
    ws = [x[0].clone() for x in layers]
    ms = [x[1].clone() for x in layers]
    scores = [x[2] for x in layers]
    st = [[x[3].clone()] for x in layers]
    gr = [x[4].clone() for x in layers]
    units = [x[5] for x in layers]
    keep = [x[6] for x in layers]
    if units[0] is None:
        grow = [int(m.sum()) - k for m, k in zip(ms, keep)]
        return lambda: backend.update(ws, ms, scores, keep, grow, st, gr)
    return lambda: backend.structured_update(ws, ms, scores, keep, units, st, gr)


CONTENDERS = [("unstructured 90%", "unstructured", 0.9), ("fan_in 90%", "fan_in", 0.9),
              ("unstructured 50%", "unstructured", 0.5), ("2:4", "2:4", 0.5)]


def run(quick: bool, repeats: int, device: torch.device) -> dict:
    clock = timing.Clock(device)
    names = [n for n in _ops.auto_order(device) if n != "triton" or device.type == "cuda"]
    rows = []
    for set_name, shapes in weight_sets(quick):
        gen = torch.Generator().manual_seed(0)
        data = {c: _layers(shapes, st, sp, gen) for c, st, sp in CONTENDERS}
        for bname in names:
            backend = _ops.get_backend(bname, device)
            samples = {c: [] for c, _, _ in CONTENDERS}
            for r in range(repeats + 1):  # the first round warms up (builds, caches) and is dropped
                for c, _, _ in _rotate(CONTENDERS, r):
                    fn = _call(backend, [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in x)
                                         for x in data[c]])
                    t = clock.once(fn)
                    if r:
                        samples[c].append(t)
            base = {"90%": timing.stats(samples["unstructured 90%"]), "50%": timing.stats(samples["unstructured 50%"])}
            for c, st, sp in CONTENDERS:
                s = timing.stats(samples[c])
                ref = base["90%" if sp == 0.9 else "50%"]
                rows.append({"set": set_name, "backend": bname, "contender": c, **s,
                             "ratio_to_unstructured": s["median"] / ref["median"]})
    return {"meta": report.meta(device), "repeats": repeats, "rows": rows}


def markdown(res) -> str:
    m = res["meta"]
    lines = [f"# Structured topology update ({m['device_name']})", "",
             f"{m['date']}, torch {m['torch']}, python {m['python']}, commit {m['git_commit']}, "
             f"{res['repeats']} interleaved repeats; median ms (min-max), and the ratio to unstructured at the "
             "same density from the same run.", "",
             "| set | backend | contender | median ms | min-max | / unstructured |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['set']} | {r['backend']} | {r['contender']} | {r['median'] * 1e3:.2f} | "
                     f"{r['min'] * 1e3:.2f}-{r['max'] * 1e3:.2f} | {r['ratio_to_unstructured']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=timing.positive_int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    device = torch.device(a.device)
    res = run(a.quick, a.repeats if a.repeats is not None else (2 if a.quick else 5), device)
    out = a.out or os.path.join(HERE, "results", "quick" if a.quick else "")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, report.device_slug(device) + "-structured")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return stem


if __name__ == "__main__":
    main()
