"""What `print(pruner)` shows: rigl-torch's fields verbatim, then one line per layer of a candidate type."""
from __future__ import annotations

from .compute import note as compute_note


def dense_reason(pruner, i) -> str:
    if pruner.S[i] > 0:
        return ""
    if pruner._dense_why[i]:
        return f"structure={pruner.structure!r}: {pruner._dense_why[i]}"
    if pruner.sparsity_distribution == "uniform" and i == 0 and len(pruner.W) > 1:
        return "first layer"
    if pruner._linear_layers_mask[i] and pruner.ignore_linear_layers:
        return "ignore_linear_layers"
    if pruner.dense_allocation >= 1:
        return "dense_allocation=1"
    return f"{pruner.sparsity_distribution}: density capped at 1"


def layer_table(pruner) -> str:
    """One line per weight of a candidate type: name, shape, density, and why a dense one is dense."""
    rows = []
    for i, (name, w, m) in enumerate(zip(pruner.names, pruner.W, pruner.backward_masks)):
        density = "%.2f%%" % (100.0 * pruner._n_active[i] / pruner.N[i]) if m is not None else "100.00%"
        note = compute_note(pruner, i) if m is not None else "dense: " + dense_reason(pruner, i)
        rows.append((name, str(tuple(w.shape)), density, note))
    for k in pruner.skipped_layers:
        rows.append((k.name, str(k.shape), "100.00%", "dense: " + k.reason))
    widths = [max(len(r[c]) for r in rows + [("layer", "shape", "density", "")]) for c in range(3)]
    lines = ["  ".join(h.ljust(wd) for h, wd in zip(("layer", "shape", "density"), widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(v.ljust(wd) for v, wd in zip(r[:3], widths)) + ("  " + r[3] if r[3] else ""))
    return "\n".join(ln.rstrip() for ln in lines)


def render(pruner) -> str:
    """rigl-torch's fields (its `__str__`, verbatim), then `layer_table`."""
    N_str, S_str = [], []
    total, total_nz, conv, conv_nz = 0, 0, 0, 0
    for N, mask, W, is_linear, active in zip(pruner.N, pruner.backward_masks, pruner.W, pruner._linear_layers_mask,
                                             pruner._n_active):
        if mask is None:
            zeros_off_mask = 0
        elif pruner._sharded:  # counting the zeros would take a collective, and printing must not: off-mask is 0
            zeros_off_mask = N - active
        else:
            zeros_off_mask = int((W[~mask.to(W.device)] == 0).sum())
        nz = N - zeros_off_mask
        N_str.append("%i/%i" % (nz, N))
        S_str.append("%.2f%%" % (float(nz) / float(N) * 100))
        total += N
        total_nz += nz
        if not is_linear:
            conv += N
            conv_nz += nz

    def pct(a, b):
        return "%i/%i (%.2f%%)" % (a, b, float(a) / float(b) * 100 if b else 0.0)

    s = "RigLScheduler(\n"
    s += "layers=%i,\n" % len(pruner.N)
    s += "nonzero_params=[" + ", ".join(N_str) + "],\n"
    s += "nonzero_percentages=[" + ", ".join(S_str) + "],\n"
    s += "total_nonzero_params=" + pct(total_nz, total) + ",\n"
    s += "total_CONV_nonzero_params=" + pct(conv_nz, conv) + ",\n"
    s += "step=" + str(pruner.step) + ",\n"
    s += "num_rigl_steps=" + str(pruner.rigl_steps) + ",\n"
    s += "ignoring_linear_layers=" + str(pruner.ignore_linear_layers) + ",\n"
    s += "sparsity_distribution=" + str(pruner.sparsity_distribution) + ",\n"
    s += ")\n" + layer_table(pruner)
    return s

