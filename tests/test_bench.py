"""Smoke test of the benchmark: `--quick` runs, writes its files, and every number in them is finite and
positive. No timing is asserted (the machine is shared and noisy)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from rigl_fast.bench import contenders, weightsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_stats(st):
    assert st["n"] >= 1
    assert _pos(st["median"]) and _pos(st["min"]) and _pos(st["max"])
    assert st["min"] <= st["median"] <= st["max"]


def test_resnet50_shapes_match_torchvision():
    shapes = weightsets.resnet50_shapes()
    assert len(shapes) == 54  # 53 convs + fc
    assert sum(weightsets.numel(s) for s in shapes) == weightsets.RESNET50_WEIGHTS
    model, _ = weightsets.resnet("resnet50")
    from rigl_fast.layers import find_candidates
    _, W, _ = find_candidates(model)
    assert [tuple(w.shape) for w in W] == shapes


def test_gpt_sets_have_the_advertised_sizes():
    def n(name):
        return sum(weightsets.numel(s) for s in weightsets.WEIGHT_SETS[name]()[1:])  # without the stem
    assert n("gpt2-small") == 84_934_656
    assert weightsets.numel(weightsets.WEIGHT_SETS["llm-4096x11008"]()[0]) == 4096 * 11008
    assert 1.3e9 <= n("gpt-1.3b") < 1.35e9


def test_contender_names_follow_the_after_step_default():
    """The plain name is rigl_fast's default after_step='always' (the after-step pass runs, so its floor counts
    those bytes); '+trusted' is the fast path, which skips the pass for this SGD."""
    import torch
    import inspect
    from rigl_fast import RigLScheduler
    assert inspect.signature(RigLScheduler).parameters["after_step"].default == contenders.DEFAULT_AFTER_STEP
    assert contenders.fast_name("cpp") == "rigl_fast[cpp]"
    assert contenders.fast_name("cpp", "trusted") == "rigl_fast[cpp]+trusted"
    for be in ("reference", "cpp"):
        for mode in ("always", "trusted"):
            assert contenders.parse_fast_name(contenders.fast_name(be, mode)) == (be, mode)
    with pytest.raises(ValueError):
        contenders.parse_fast_name("rigl_fast[cpp]always")
    masters = contenders.Masters(weightsets.WEIGHT_SETS["tiny-mlp"](), torch.device("cpu"), torch.float32)
    names = [contenders.fast_name("reference"), contenders.fast_name("reference", "trusted")]
    default, fast = contenders.make_contenders(masters, names, 0.9)
    assert default.sched._after_step_mode == "always" and not default.skips_after_step
    assert fast.sched._after_step_mode == "trusted" and fast.skips_after_step
    for c in (default, fast):
        c.close()


def _require_sparsimony():
    # the bench runs without it, but this suite exercises it: CI installs it (pip install sparsimony==0.1.0
    # --no-deps), so a missing one is a failure here, not a skip
    assert contenders.import_sparsimony() is not None, "sparsimony is not installed: pip install sparsimony==0.1.0 --no-deps"
    assert contenders.sparsimony_version() == "0.1.0"


def test_contenders_do_the_same_update():
    """The bench's premise: every contender starts each update from the same state and ends at the same
    masks, so the timed work is identical (a peer's mask could differ only where its selection breaks ties)."""
    import torch
    _require_sparsimony()
    masters = contenders.Masters(weightsets.WEIGHT_SETS["tiny-mlp"](), torch.device("cpu"), torch.float32)
    names = [contenders.RIGL_TORCH, contenders.SPARSIMONY, contenders.fast_name("reference")]
    cs = contenders.make_contenders(masters, names, 0.9)
    out = []
    for c in cs:
        masters.restore()
        c.prepare_update()
        before = [m.clone() for m in masters.masks if m is not None]
        c.update()
        c.finish_update()
        after = [c.masks()[i].clone() for i in c.sparse]
        assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the update changed something
        out.append(after)
    rigl_torch, sparsimony, fast = out
    for a, b, c in zip(rigl_torch, sparsimony, fast):
        assert torch.equal(a, c)
        # sparsimony keeps int(n * (1 - s)) active weights where rigl keeps n - int(n * s) (at most one more):
        # its mask is rigl's less that many weights, the same selection otherwise
        short = int(a.sum()) - int(a.numel() * (1 - 0.9))
        assert 0 <= short <= 1
        assert not (b & ~a).any() and int((a & ~b).sum()) == short
    for c in cs:
        c.close()


def test_sparsimony_per_step_ops_do_what_the_bench_says():
    """What the per-step row times for sparsimony: its parametrization masks the gradient (the dense gradient
    in, the masked one out) without accumulating a dense gradient off-update; the wrapped optimizer step masks
    the momentum and, around the no-op stand-in for SGD, leaves the weights alone; its step() off-update
    changes no mask. It starts from the masks the first contender drew."""
    import torch
    _require_sparsimony()
    masters = contenders.Masters(weightsets.WEIGHT_SETS["tiny-cnn"](), torch.device("cpu"), torch.float32)
    first, sp = contenders.make_contenders(masters, [contenders.fast_name("reference"), contenders.SPARSIMONY], 0.9)
    assert sp.sparse == first.sparse and sp.sparse
    masks = [sp.masks()[i].clone() for i in sp.sparse]
    for i in sp.sparse:
        assert torch.equal(sp.masks()[i], masters.masks[i])
        assert 0 < masters.masks[i].sum() < masters.masks[i].numel()
    grads = sp.grad_op()
    for g, i in zip(grads, sp.sparse):
        assert torch.equal(g, masters.acc[i] * masters.masks[i])
        dg = sp.par[i].dense_grad
        assert dg is not masters.acc[i] and not dg.any()  # off-update: a fresh zero buffer, nothing accumulated
    w = [t.clone() for t in masters.w]
    for i in sp.sparse:
        masters.mom[i].fill_(1.0)
    sp.after_step()
    for i in sp.sparse:
        assert torch.equal(masters.mom[i], masters.masks[i].float())
        assert torch.equal(masters.w[i], w[i])
    assert all(torch.equal(sp.masks()[i], m) for i, m in zip(sp.sparse, masks))
    for c in (first, sp):
        c.close()


def _run_quick(module, tmp_path, *args):
    """`python -m <module> --quick --out tmp_path ...` from the repository root; the one JSON it wrote."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", module, "--quick", *args, "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jsons = list(tmp_path.glob("*.json"))
    assert len(jsons) == 1
    return jsons[0]


def test_quick_writes_json_and_markdown(tmp_path):
    path = _run_quick("rigl_fast.bench", tmp_path, "--device", "cpu")
    res = json.loads(path.read_text())
    md = path.with_suffix(".md").read_text()
    assert (tmp_path / (path.stem + "_scaling.png")).stat().st_size > 0
    assert (tmp_path / (path.stem + "_bars.png")).stat().st_size > 0

    meta = res["meta"]
    for key in ("device_name", "torch", "python", "date", "rigl_torch", "git_commit"):
        assert meta[key], key
    assert "reference" in res["backends"]
    _require_sparsimony()
    assert meta["sparsimony"] == "0.1.0" and "sparsimony 0.1.0" in md
    assert res["peers"] == [contenders.RIGL_TORCH, contenders.SPARSIMONY]
    expected = set(res["peers"]) | {contenders.fast_name(b) for b in res["backends"]}
    trusted = {contenders.fast_name(b, "trusted") for b in res["backends"]}
    _check_stats(res["copy_bandwidth_Bps"])

    assert {r["contender"] for r in res["update"]} == expected
    # a configuration whose update a peer cannot run (sparsimony on bf16 sums its mask counts in bf16 and fails
    # its own sparsity check) has no cell for it, and the notes say why; every other one has all contenders
    for key in {(r["set"], r["sparsity"], r["dtype"]) for r in res["update"]}:
        have = {r["contender"] for r in res["update"] if (r["set"], r["sparsity"], r["dtype"]) == key}
        for name in expected - have:
            assert name in contenders.PEERS
            assert any(n.startswith(f"{name}'s update fails on {key[0]} {key[1]:.0%} {key[2]}") for n in res["notes"])
    assert {r["contender"] for r in res["step"]} == expected | trusted
    for r in res["step"]:
        _check_stats(r["total"])
        assert _pos(r["floor_s"]) and _pos(r["x_floor"])
        # only the fast path skips the after-step pass (SGD is zero-preserving), and only its floor drops it
        assert r["skips_after_step"] == (r["contender"] in trusted)
        assert (r["floor_parts_bytes"]["after_step"] == 0) == (r["contender"] in trusted)
    for r in res["update"]:
        _check_stats(r["latency"])
        assert _pos(r["floor_s"]) and _pos(r["x_floor"])
        m = r["peak_extra_bytes_per_weight"]
        assert m is None or (math.isfinite(m) and m >= 0)
    assert {r["contender"] for r in res["e2e"]} == expected | trusted | {"dense"}
    for r in res["e2e"]:
        _check_stats(r["steps_per_s"])
    assert len({r["n_weights"] for r in res["scaling"]}) >= 3
    assert contenders.SPARSIMONY in {r["contender"] for r in res["scaling"]}
    for r in res["scaling"]:
        _check_stats(r["latency"])
    for name in expected | trusted:
        assert name in md
    for section in ("Per-step overhead", "Cost of the safe default", "Update latency", "Peak extra memory",
                    "Against sparsimony", "End-to-end", "Scaling"):
        assert section in md


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not built into this torch")
def test_fsdp2_quick_counts_what_each_update_sends(tmp_path):
    """bench.fsdp2 --quick (2 gloo ranks): files written, every contender ends at rigl_fast's masks, and the
    byte counts have the shape the design promises, which a regression in either update would break."""
    path = _run_quick("rigl_fast.bench.fsdp2", tmp_path)
    res = json.loads(path.read_text())
    md = path.with_suffix(".md").read_text()
    assert path.name.endswith("-fsdp2.json")
    for key in ("device_name", "torch", "python", "date", "git_commit"):
        assert res["meta"][key], key
    assert res["world"] == 2
    rows = res["rows"]
    fast = [r for r in rows if r["contender"].startswith("rigl_fast[")]
    base = [r for r in rows if r["contender"].startswith("gather[")]
    assert fast and base and len(fast) + len(base) == len(rows)
    for r in rows:
        _check_stats(r["latency"])
        assert r["same_result"], r["contender"]
        assert r["contender"] in md
    for r in base:
        # per layer: rank 1's weight, score (fp32) and mask byte go to rank 0, the new mask byte comes back
        assert r["sent_bytes"] == 5 * r["n_sparse"]
        assert r["calls_per_rank"] == [4 * r["n_layers"]] * 2
    # rigl_fast sends histograms, whose size does not depend on the layer's: a 512x512 layer costs what a
    # 64x64 one does, and far less than gathering it; all layers share each collective, so as many calls
    # for 8 layers as for 1
    gathered = next(r for r in base if r["set"] == "linear-512x512")["sent_bytes"]
    for name in {r["contender"] for r in fast}:
        mine = {r["set"]: r for r in fast if r["contender"] == name}
        assert mine["linear-64x64"]["sent_bytes"] == mine["linear-512x512"]["sent_bytes"] > 0
        assert 5 * mine["linear-512x512"]["sent_bytes"] < gathered
        assert len({tuple(r["calls_per_rank"]) for r in mine.values()}) == 1
    for section in ("Update latency", "Bytes sent", "Ratios", "Peak extra memory"):
        assert section in md


def test_structured_bench_quick(tmp_path):
    """Every backend times every contender (unstructured, fan_in, 2:4) from one run, and writes its report."""
    import json

    from rigl_fast.bench import structured
    stem = structured.main(["--quick", "--out", str(tmp_path)])
    res = json.load(open(stem + ".json"))
    got = {(r["backend"], r["contender"]) for r in res["rows"]}
    backends = {b for b, _ in got}
    assert "reference" in backends
    assert got == {(b, c) for b in backends for c, _, _ in structured.CONTENDERS}
    assert all(r["median"] > 0 and r["n"] == 2 for r in res["rows"])
    assert "| 2:4 |" in open(stem + ".md").read()
