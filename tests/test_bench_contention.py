"""The bench's loaded columns (issue 21 item 7): the competing process runs while its block runs and is gone after;
the export and per-step tables carry a loaded measurement beside the quiet one. No timing is asserted."""
import json
import time

import torch

from rigl_fast.bench import contention, suite
from rigl_fast.bench import export as bench_export


def test_competing_process_runs_during_the_block_and_stops_after():
    with contention.competing_process() as p:
        time.sleep(0.2)
        assert p.poll() is None  # still running its matmuls
    assert p.poll() is not None


def test_export_bench_measures_quiet_and_loaded(tmp_path):
    stem = bench_export.main(["--quick", "--out", str(tmp_path), "--no-plots"])
    res = json.load(open(stem + ".json"))
    keys = {load: {(r["out"], r["in"], r["batch"], r["sparsity"], r["contender"]) for r in res["rows"]
                   if r["load"] == load} for load in ("quiet", "loaded")}
    assert keys["quiet"] == keys["loaded"] and len(keys["quiet"]) > 0
    assert len(res["rows"]) == 2 * len(keys["quiet"])
    md = open(stem + ".md").read()
    assert " · " in md and contention.NOTE in md


def test_per_step_table_has_a_loaded_column():
    plan = suite.plan_for(torch.device("cpu"), quick=True)
    assert plan.loaded_step_repeats >= 1 and suite.plan_for(torch.device("cpu"), quick=False).loaded_step_repeats
    bw = suite.timing.CopyBandwidth(torch.device("cpu"), plan.copy_bytes)
    steps, _ = suite.measure_config("tiny-mlp", 0.9, "fp32", 1, torch.device("cpu"), plan, ["reference"], bw,
                                    lambda msg: None)
    for r in steps:
        for part in ("grad_op", "after_step", "total"):
            st = r["loaded_" + part]
            assert st["n"] == plan.loaded_step_repeats and 0 < st["min"] <= st["median"] <= st["max"]
    md = suite_markdown(steps)
    assert "## Per-step overhead with one competing process" in md


def suite_markdown(steps):
    from rigl_fast.bench import report
    for r in steps:
        r["x_floor"] = 1.0
    res = {"meta": report.meta(torch.device("cpu")), "copy_bandwidth_Bps": {"median": 1e9, "min": 1e9, "max": 1e9},
           "backends": ["reference"], "quick": True, "step": steps, "update": [], "scaling": [], "e2e": [],
           "notes": [], "peers": []}
    return report.markdown(res)


def test_competing_process_stops_when_its_bench_is_killed(tmp_path):
    """A bench killed before it could stop its competitor (SIGKILL/SIGTERM skip the `finally`) leaves no process
    loading the machine: the competitor notices that its parent is gone."""
    import os
    import signal
    import subprocess
    import sys
    code = ("from rigl_fast.bench import contention\n"
            "import time\n"
            "with contention.competing_process() as p:\n"
            "    print(p.pid, flush=True)\n"
            "    time.sleep(60)\n")
    bench = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(bench.stdout.readline())
    os.kill(bench.pid, signal.SIGKILL)
    bench.wait()
    bench.stdout.close()
    for _ in range(600):  # it checks after every 100 matmuls: well under a second, even on a loaded machine
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the competing process outlived its bench")
