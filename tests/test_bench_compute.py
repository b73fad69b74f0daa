"""Smoke test of bench/compute.py (sparse vs dense compute in training): `--quick` runs quiet and loaded, writes
its files, every configuration has both contenders in both passes, and every number is finite and positive. No
timing is asserted (the machine is shared and noisy)."""
import json
import math
import os

import pytest

from rigl_fast.bench import compute as bench_compute


def _numbers(x, path=""):
    """(path, value) for every int/float inside x (bools excluded)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def test_full_settings_are_the_issue_grid():
    """The full run's grid is what issue 22 asks for (the quick one only shrinks it)."""
    c = bench_compute.settings(False)
    assert {(1024, 1024), (2048, 2048), (4096, 4096)} <= set(c["shapes"])
    assert c["batches"] == [64, 256, 1024] and c["sparsities"] == [0.8, 0.9, 0.95, 0.98]
    assert c["window"] == (c["shapes"], 256, 0.9)
    m = c["mlp"]
    assert (m["inp"], m["width"], m["depth"], m["batch"]) == (64, 2048, 4, 256) and 0.9 in m["sparsities"]
    g = c["gpt"]
    assert (g["n_embd"], g["n_layer"], g["n_head"], g["seq"], g["vocab"]) == (768, 6, 12, 256, 8192)
    assert g["sparsities"][0] == 0.9


def _check_rows(rows, cfg, parts, loads):
    """Every configuration of `parts`, both contenders (and both window flags in the window part), in every
    load; every number finite and positive; each speed-up the two medians' ratio from the same pass."""
    layer = {(r["out"], r["inp"], r["batch"], r["sparsity"], r["contender"], r["load"]) for r in rows
             if r["part"] == "layer"}
    assert layer == {(o, i, b, s, c, ld) for o, i in cfg["shapes"] for b in cfg["batches"]
                     for s in cfg["sparsities"] for c in ("dense", "sparse") for ld in loads}
    window = {(r["out"], r["contender"], r["load"]) for r in rows if r["part"] == "window"}
    assert window == {(o, c, ld) for o, _ in cfg["window"][0] for ld in loads
                      for c in ("dense", "sparse", "dense in window", "sparse in window")}
    for part in ("mlp", "gpt"):
        got = {(r["sparsity"], r["kind"], r["contender"], r["load"]) for r in rows if r["part"] == part}
        assert got == ({(s, k, c, ld) for s in cfg[part]["sparsities"] for k in ("period", "plain", "update")
                        for c in ("dense", "sparse") for ld in loads} if part in parts else set()), part
    nums = list(_numbers(rows))
    assert nums and all(math.isfinite(v) and v > 0 for _, v in nums), [p for p, v in nums if not v > 0][:5]
    for r in rows:
        assert r["min"] <= r["median"] <= r["max"] and r["n"] >= 1
        ref = [d for d in rows if d["contender"] == "dense" and d["load"] == r["load"] and d["part"] == r["part"]
               and all(d.get(k) == r.get(k) for k in ("out", "inp", "batch", "sparsity", "kind"))]
        assert len(ref) == 1 and r["speedup"] == pytest.approx(ref[0]["median"] / r["median"])
        assert 0 < r["density"] < 1  # the sparse layers are sparse
    for r in rows:  # gpt: the composed period step lies between its non-window and window steps
        if r["part"] == "gpt" and r["kind"] == "period":
            k = [d for d in rows if d["part"] == "gpt" and d["contender"] == r["contender"] and d["load"] == r["load"]
                 and d["sparsity"] == r["sparsity"] and d["kind"] in ("plain", "update")]
            assert min(d["min"] for d in k) <= r["median"] <= max(d["max"] for d in k)


def test_compute_bench_quick(tmp_path):
    """Every part, quiet only (the loaded pass is the same code under a competing process: next test)."""
    stem = bench_compute.main(["--quick", "--no-load", "--out", str(tmp_path)])
    for ext in (".json", ".md", ".png"):
        assert os.path.getsize(stem + ext) > 0, ext
    assert os.path.basename(stem).endswith("-compute")
    res = json.load(open(stem + ".json"))
    _check_rows(res["rows"], bench_compute.settings(True), bench_compute.PARTS, {"quiet"})
    # peak memory: both modes, both step kinds; bytes are counts that may be 0 for a tiny model (the allocator
    # can serve a small step from pages already resident), never negative
    mem = res["memory"]
    assert {(m["part"], m["kind"], m["contender"]) for m in mem} == {
        (p, k, c) for p in ("mlp", "gpt") for k in ("plain", "update") for c in ("dense", "sparse")}
    assert all(m["peak_bytes"] is None or (isinstance(m["peak_bytes"], int) and m["peak_bytes"] >= 0) for m in mem)
    meta = res["meta"]
    assert meta["date"] and meta["torch"] and meta["device_name"] and "git_commit" in meta
    md = open(stem + ".md").read()
    for head in ("## Per layer", "## The window step", "## Training step: MLP", "## GPT-2-shaped", "## Peak memory",
                 "## Where sparse compute does not pay", meta["date"], meta["torch"]):
        assert head in md, head
    assert "lm_head.weight (tied to transformer.wte.weight)" in md  # the tied head is said to stay dense


def test_compute_bench_quick_loaded(tmp_path):
    """The per-layer parts quiet, then under the competing process, side by side; --tag names the files."""
    stem = bench_compute.main(["--quick", "--parts", "layer,window", "--tag", "t1", "--out", str(tmp_path)])
    assert os.path.basename(stem).endswith("-compute-t1") and os.path.getsize(stem + ".png") > 0
    res = json.load(open(stem + ".json"))
    _check_rows(res["rows"], bench_compute.settings(True), ("layer", "window"), {"quiet", "loaded"})
    assert res["memory"] == [] and any(n.startswith("loaded: ") for n in res["notes"])
    assert " · " in open(stem + ".md").read()  # quiet · loaded cells


@pytest.mark.parametrize("precision", ["bf16", "autocast-bf16"])
def test_compute_bench_quick_in_bf16(tmp_path, precision):
    """--precision: every part with a bf16 model, or an fp32 one whose forward runs under bf16 autocast (the two
    modes' results checked to agree within bf16 rounding before timing); the report says which."""
    stem = bench_compute.main(["--quick", "--no-load", "--precision", precision, "--out", str(tmp_path)])
    res = json.load(open(stem + ".json"))
    assert res["precision"] == precision
    _check_rows(res["rows"], bench_compute.settings(True), bench_compute.PARTS, {"quiet"})
    assert f"threads, {precision};" in open(stem + ".md").read()
    assert bench_compute.PRECISION == [precision]
    bench_compute.main(["--quick", "--no-load", "--parts", "layer", "--out", str(tmp_path)])
    assert bench_compute.PRECISION == ["fp32"]  # the default again


def test_compute_bench_rejects_bad_arguments(tmp_path):
    for argv in (["--parts", "layer,nope"], ["--tag", "Bad Tag"], ["--parts", ""], ["--precision", "fp8"]):
        with pytest.raises(SystemExit):
            bench_compute.main(["--quick", "--no-load", "--out", str(tmp_path)] + argv)
