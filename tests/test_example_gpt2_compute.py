"""examples/gpt2_sparse_compute.py --tiny in a subprocess, as a user runs it: both modes train (the loss falls, the
topology moves), print their tokens/s and the ratio, the summary says the Conv1D projections compute sparsely and
the tied lm_head stays dense, and the two runs end with the same masks."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_both_modes_and_the_ratio_and_ends_with_the_same_masks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(REPO / "examples" / "gpt2_sparse_compute.py"), "--tiny"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    runs = dict((m[0], m[1:]) for m in re.findall(
        r"^ *(dense|sparse) compute: ([0-9.]+) tokens/s over 11 timed steps .*; loss ([0-9.]+) -> ([0-9.]+); "
        r"topology updates (\d+)$", out, re.M))
    assert sorted(runs) == ["dense", "sparse"], out
    for mode, (tok_s, first, last, updates) in runs.items():
        assert float(tok_s) > 0 and int(updates) == 2, (mode, out)  # T_end 9, delta 3: updates at steps 3 and 6
        assert float(last) < float(first) - 0.5, (mode, out)  # the synthetic phrases are learnable
    # the same training: the same losses, to fp32 summation order
    for i in (1, 2):
        assert abs(float(runs["dense"][i]) - float(runs["sparse"][i])) <= 0.002, out
    ratio = re.search(r"^sparse/dense tokens per second: ([0-9.]+)x$", out, re.M)
    assert ratio and float(ratio.group(1)) == pytest.approx(float(runs["sparse"][0]) / float(runs["dense"][0]),
                                                            rel=0.01, abs=0.006), out
    agree = re.search(r"^final masks: ([0-9.]+) of the active weights agree between the two runs \((\d+) positions "
                      r"differ\)$", out, re.M)
    assert agree and float(agree.group(1)) > 0.9, out
    # the summary, printed once: every Conv1D projection but the first (the uniform rule) computes sparsely
    assert out.count("pruner.summary()") == 1
    assert len(re.findall(r"^transformer\.h\.\d\.(attn|mlp)\.c_\w+\.weight .*sparse compute \(compressed rows\)$",
                          out, re.M)) == 7, out
    assert re.search(r"^transformer\.h\.0\.attn\.c_attn\.weight .*dense: first layer$", out, re.M), out
    assert re.search(r"^lm_head\.weight .*dense: tied to transformer\.wte\.weight$", out, re.M), out
    assert list(tmp_path.iterdir()) == []  # writes nothing
