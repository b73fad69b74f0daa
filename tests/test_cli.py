"""`rigl-fast train` end to end: a short run learns, --compare writes its files, bad input exits 2 naming the
argument, missing extras name `pip install 'rigl_fast[cli]'`. Also: the examples compile, the demo's runs
are reproducible from a seed, MNIST-1D is generated locally, and --structure's masks keep their units."""
import copy
import importlib.util
import json
import os
import py_compile
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from rigl_fast.app import cli  # noqa: E402
from rigl_fast.app import demo as cli_demo  # noqa: E402
from rigl_fast.layers import DISTRIBUTIONS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _accuracy(text):
    m = re.search(r"test accuracy: ([0-9.]+)%", text)
    assert m, f"no test accuracy in the output:\n{text}"
    return float(m.group(1))


def test_train_short_run_learns(capsys):
    # 5 epochs = 60 steps; T_end = 45 gives 4 topology updates; a broken mask, hook or update leaves it near 10% (chance).
    rc = cli.main(["train", "--epochs", "5", "--no-progress", "--backend", "reference"])
    out = capsys.readouterr().out
    assert rc == 0
    assert _accuracy(out) > 50.0
    # The per-layer table: the first conv dense (uniform rule), the rest at 10% (int(0.9 * n) zeros).
    assert re.search(r"features\.0\.weight\s+32x1x3x3\s+288\s+288\s+100\.00%", out), out
    assert re.search(r"features\.3\.weight\s+64x32x3x3\s+18432\s+1844\s+10\.00%", out), out
    assert "topology updates: 4" in out


def test_console_script_prints_progress_and_accuracy():
    # The installed entry point, as a user runs it; tqdm writes its bar to stderr.
    exe = os.path.join(os.path.dirname(sys.executable), "rigl-fast")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "rigl_fast.app"]
    p = subprocess.run(cmd + ["train", "--model", "mlp", "--method", "dense", "--epochs", "5"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "60/60" in p.stderr  # the progress bar reached the last step
    assert _accuracy(p.stdout) > 50.0


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(["train", "--compare", "--seeds", "2", "--epochs", "2", "--density", "0.2,0.1",
                   "--method", "dense,static,rigl", "--distribution", "uniform,erk", "--out", str(out),
                   "--no-progress", "--backend", "reference"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    # 2 seeds x (1 dense + 2 methods x 2 distributions x 2 densities)
    assert len(runs) == 2 * (1 + 2 * 2 * 2)
    assert {(r["config"]["method"], r["config"]["distribution"], r["config"]["density"]) for r in runs
            if r["config"]["method"] != "dense"} == {(m, d, x) for m in ("static", "rigl") for d in ("uniform", "erk")
                                                      for x in (0.2, 0.1)}
    for r in runs:
        active = sum(layer["active"] for layer in r["layers"])
        total = sum(layer["numel"] for layer in r["layers"])
        if r["config"]["method"] == "dense":
            assert active == total
        elif r["config"]["distribution"] == "erk":
            assert active == pytest.approx(r["config"]["density"] * total, rel=0.01)
        if r["config"]["method"] == "rigl":
            assert len(r["churn"]) > 0 and all(0 <= c <= 1 for _, c in r["churn"])
        else:
            assert r["churn"] == []
    md = (out / "results.md").read_text()
    assert "**uniform**" in md and "**erk**" in md and "| RigL |" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out / "compare.png") in capsys.readouterr().out


def test_compare_of_dense_alone_and_of_a_structure(tmp_path, capsys):
    """--method dense alone has no density axis (the plot used to crash after training); with --structure, the
    other methods are compared with RigL of the same structure (the column was blank)."""
    out = tmp_path / "dense"
    assert cli.main(["train", "--compare", "--method", "dense", "--seeds", "2", "--epochs", "1", "--out", str(out),
                     "--no-progress"]) == 0
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "fan_in"
    assert cli.main(["train", "--compare", "--method", "static,rigl", "--structure", "fan_in", "--seeds", "2",
                     "--density", "0.2", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    row = next(r for r in (out / "results.md").read_text().splitlines() if "| static fan_in |" in r)
    assert re.search(r"\| \d/2 \(\d ties\) / \d/2 \|$", row), row


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_every_library_distribution_is_accepted(dist):
    args = cli.build_parser().parse_args(["train", "--distribution", dist])
    assert args.distribution == [dist]


def test_train_with_er_distribution(capsys):
    # 'er' (Erdos-Renyi) is the library's; the CLI used to refuse it. On the CNN it differs from ERK (the
    # kernel size does not count), so the table shows ER's own per-layer densities, 10% in total.
    rc = cli.main(["train", "--distribution", "er", "--epochs", "1", "--delta", "4", "--no-progress",
                   "--backend", "reference"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "density 0.1 (er)" in out
    assert re.search(r"features\.3\.weight\s+64x32x3x3\s+18432\s+2206\s+11\.97%", out), out
    assert re.search(r"fc\.weight\s+10x64\s+640\s+189\s+29\.53%", out), out
    assert re.search(r"total \(Linear/Conv weights\)\s+56224\s+5624\s+10\.00%", out), out


@pytest.mark.parametrize("argv, needle", [
    (["--density", "1.5"], "--density"),
    (["--density", "0"], "--density"),
    (["--density", "abc"], "--density"),
    (["--method", "magic"], "--method"),
    (["--distribution", "normal"], "--distribution"),
    (["--epochs", "0"], "--epochs"),
    (["--model", "resnet"], "--model"),
    (["--backend", "gpu"], "--backend"),
    (["--data", "imagenet"], "--data"),
    (["--alpha", "2"], "--alpha"),
    (["--density", "0.1,0.2"], "needs --compare"),
    (["--method", "static,rigl"], "needs --compare"),
    (["--seeds", "3"], "--seeds"),
    (["--density", "7"], "--density"),
    (["--device", "nope"], "--device"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epochs", "1", "extra"], "unrecognized arguments: extra"),
    (["--structure", "2:4"], "--structure"),  # density 0.1, not 2/4
    (["--structure", "2:4", "--density", "0.5", "--distribution", "erk"], "--structure"),
    (["--structure", "4:4"], "--structure"),
    (["--structure", "rows"], "--structure"),
    (["--data", "mnist1d", "--model", "cnn"], "--model"),
    (["--compare", "--export", "m.pt"], "--export"),
    (["--method", "dense", "--export", "m.pt"], "--export"),
    (["--export", "/no/such/folder/m.pt"], "--export"),
    (["--compute", "fast"], "argument --compute: invalid choice: 'fast'"),
    (["--compute", "Sparse"], "argument --compute: invalid choice"),
    (["--method", "dense", "--compute", "sparse"], "--compute"),  # no scheduler: nothing to compute sparsely
    (["--compare", "--method", "static,rigl,rigl"], "method 'rigl' is listed twice"),  # ran twice, counted as seeds
    (["--compare", "--density", "0.1,0.1"], "density '0.1' is listed twice"),
    (["--out", "somewhere"], "argument --out"),  # only --compare writes there
    (["--download"], "argument --data-dir/--download"),  # digits needs no files
    (["--data", "mnist1d", "--data-dir", "d"], "argument --data-dir/--download"),
    (["--export", "."], "is a folder, not a file path"),  # would have failed in torch.save after training
])
def test_bad_arguments_exit_2_naming_the_argument(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    # train's own usage and prefix, not the top-level "usage: rigl-fast [-h] COMMAND ..."
    assert err.startswith("usage: rigl-fast train [-h] "), err
    assert "\nrigl-fast train: error: " in err, err


def test_compute_sparse_builds_the_scheduler_with_it_and_trains_as_dense(capsys, monkeypatch):
    """--compute sparse: the scheduler is built with compute='sparse' (its sparse Linear layers run the sparse
    forward during training), the table says how each layer is computed, and the run ends where --compute dense
    ends (the same training, fp32 summation order aside)."""
    from rigl_fast.compute import _SparseForward
    seen = []
    real_run = cli_demo.run

    def run(cfg, data, progress=None, trained=None):
        def look(model, pruner):
            seen.append((cfg.compute, [type(vars(m).get("forward")).__name__ for m in model.layers]))
            trained(model, pruner)
        return real_run(cfg, data, progress, trained=look)

    monkeypatch.setattr(cli_demo, "run", run)
    argv = ["train", "--model", "mlp", "--epochs", "3", "--no-progress", "--backend", "reference"]
    assert cli.main(argv + ["--compute", "sparse"]) == 0
    out = capsys.readouterr().out
    assert cli.main(argv) == 0  # --compute dense is the default
    dense_out = capsys.readouterr().out
    # The first layer stays dense under the uniform rule; the other two compute over their active weights.
    assert seen == [("sparse", ["NoneType", _SparseForward.__name__, _SparseForward.__name__]),
                    ("dense", ["NoneType"] * 3)]
    assert "backend reference, compute sparse" in out and "backend reference, compute dense" in dense_out
    assert re.search(r"layers\.0\.weight\s+300x64 .*100\.00%\s+64\s+dense layer\s*\n", out), out
    for name, shape in (("layers\\.1", "100x300"), ("layers\\.2", "10x100")):
        assert re.search(rf"{name}\.weight\s+{shape} .*10\.00%\s+\d+-\d+\s+sparse compute \(compressed rows\)\s*\n",
                         out), (name, out)
    assert "compute" not in dense_out.split("\n\n")[1]  # no compute column under dense compute
    loss = [float(re.search(r"final train loss: ([0-9.]+)", o).group(1)) for o in (out, dense_out)]
    assert abs(loss[0] - loss[1]) < 1e-3, loss
    assert _accuracy(out) == pytest.approx(_accuracy(dense_out), abs=1.0)


def test_compute_sparse_layer_table_names_dense_computed_convolutions(capsys):
    rc = cli.main(["train", "--compute", "sparse", "--epochs", "1", "--no-progress", "--backend", "reference"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"features\.3\.weight\s+64x32x3x3 .*10\.00%\s+\d+-\d+\s+dense compute: convolution\s*\n", out), out
    assert re.search(r"fc\.weight\s+10x64 .*sparse compute \(compressed rows\)\s*\n", out), out


def test_unknown_option_before_the_command_gets_the_top_level_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--bogus", "train"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rigl-fast [-h] COMMAND") and "rigl-fast: error: unrecognized arguments: --bogus" in err


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_missing_extra_names_the_pip_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))
    assert cli.main(["train", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "tqdm" in err and "pip install 'rigl_fast[cli]'" in err


def test_torchvision_data_error_is_clear(tmp_path, capsys):
    try:
        import torchvision  # noqa: F401
        has_tv = True
    except Exception:
        has_tv = False
    rc = cli.main(["train", "--data", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    # Without torchvision: say so. With it, but no files and no --download: point at --download.
    assert ("--download" in err) if has_tv else ("needs torchvision" in err)


def test_runs_are_reproducible_from_the_seed():
    from rigl_fast.app import data, demo
    d = data.load("digits")
    cfg = dict(model="mlp", density=0.05, epochs=2, backend="reference")
    a = demo.run(demo.RunConfig(method="rigl", seed=3, **cfg), d)
    b = demo.run(demo.RunConfig(method="rigl", seed=3, **cfg), d)
    c = demo.run(demo.RunConfig(method="set", seed=3, **cfg), d)
    assert a.masks_sha1 == b.masks_sha1 and a.test_acc == b.test_acc and a.train_loss == b.train_loss
    assert c.masks_sha1 != a.masks_sha1  # random regrowth moves the mask elsewhere than gradient regrowth


@pytest.mark.parametrize("name", ["mnist_rigl.py", "imagenet_rigl.py"])
def test_examples_compile(name):
    # They need torchvision to run; compiling them at least catches syntax errors and stale names in the
    # rigl_fast lines (checked below) without it.
    path = os.path.join(ROOT, "examples", name)
    py_compile.compile(path, doraise=True)
    src = open(path).read()
    assert "from rigl_fast import RigLScheduler" in src and "pruner.state_dict()" in src


def test_study_smoke_run_matches_rigl_torch(tmp_path):
    # The quality study's driver, tiny: its rigl-torch part must find the same masks and accuracy on the
    # same seeds (rigl_fast computes rigl-torch's masks), and it writes its three result files.
    pytest.importorskip("rigl_torch")
    from rigl_fast.study import sweep
    assert sweep.main(["--seeds", "1", "--epochs", "3", "--densities", "0.05", "--jobs", "1", "--no-cnn",
                       "--backend", "reference", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    compat = [r for r in data["runs"] if r["part"] == "compat"]
    fast = {r["config"]["method"]: r for r in data["runs"] if r["part"] == "sweep"
            and r["config"]["distribution"] == "uniform" and r["config"]["method"] != "dense"}
    assert len(compat) == 2 and len(data["runs"]) == 1 + 2 * 3 + 2
    for r in compat:
        assert r["masks_sha1"] == fast[r["config"]["method"]]["masks_sha1"]
        assert r["test_acc"] == fast[r["config"]["method"]]["test_acc"]
    assert "2/2 runs end with bit-identical masks" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- MNIST-1D and --structure
def _mnist1d():
    pytest.importorskip("mnist1d")
    from rigl_fast.app import data
    return data


def test_mnist1d_is_generated_locally_and_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    data = _mnist1d()
    import random
    import numpy as np
    import requests

    def no_network(*a, **k):
        raise AssertionError("mnist1d tried to download")
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.chdir(tmp_path)  # mnist1d's get_dataset would write its pickle here
    np.random.seed(123)
    random.seed(123)
    expected = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    d = data.load("mnist1d")
    assert (np.random.rand(), random.random()) == expected  # make_dataset reseeds both globals to 42
    assert list(tmp_path.iterdir()) == []
    assert d.train_x.shape == (4000, 1, 40) and d.test_x.shape == (1000, 1, 40) and d.n_classes == 10
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert torch.bincount(d.train_y).min() > 350  # 10 balanced classes (500 per class before the split)
    # The same data set every time: make_dataset's fixed seed, not the caller's.
    small = data.load("mnist1d", mnist1d_samples=500)
    assert small.train_x.shape == (400, 1, 40) and small.test_x.shape == (100, 1, 40)
    assert torch.equal(data.load("mnist1d", mnist1d_samples=500).test_x, small.test_x)


def test_mnist1d_missing_names_the_package(monkeypatch, capsys):
    data = _mnist1d()
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # import mnist1d.data raises ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        data.load("mnist1d")
    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "mnist1d" else real(name, *a))
    assert cli.main(["train", "--data", "mnist1d", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "mnist1d" in err and "pip install 'rigl_fast[cli]'" in err


def test_cnn1d_reads_any_input_as_a_sequence_and_its_fan_ins_divide_by_4():
    from rigl_fast.app import demo
    for in_shape, head_in in (((1, 40), 160), ((1, 8, 8), 256)):  # MNIST-1D; digits' 64 pixels in row order
        model = demo.make_model("cnn1d", in_shape, 10)
        assert model.fc.in_features == head_in
        assert model(torch.zeros(3, *in_shape)).shape == (3, 10)
        # Every layer but the first (dense under the uniform rule) must take 2:4, or it would stay dense.
        fan_ins = [m.weight[0].numel() for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
        assert fan_ins[0] == 5 and all(f % 4 == 0 for f in fan_ins[1:]), fan_ins
    with pytest.raises(ValueError, match="cnn1d"):
        demo.make_model("cnn", (1, 40), 10)


def test_unit_counts_of_a_known_mask():
    from rigl_fast.app.demo import _unit_counts
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 0],
                         [1, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert _unit_counts(mask) == dict(unit_active=[4, 4])
    assert _unit_counts(mask, 4) == dict(unit_active=[4, 4], group_active=[1, 3])
    assert _unit_counts(mask.view(2, 2, 4), 4) == dict(unit_active=[4, 4], group_active=[1, 3])  # a conv weight
    assert _unit_counts(mask, 3) == dict(unit_active=[4, 4])  # 8 weights do not split into runs of 3


def test_mnist1d_trains_and_reports(capsys):
    _mnist1d()
    rc = cli.main(["train", "--data", "mnist1d", "--epochs", "3", "--no-progress", "--backend", "reference"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "data: mnist1d (4000 train / 1000 test, 10 classes, input 1x40); model: cnn1d; 3 epochs" in out
    # Seed 0 reaches 51%; chance is 10%, where a broken mask or a data set read wrongly would leave it.
    assert _accuracy(out) > 35.0
    # Unstructured: 10% of each sparse layer, spread unevenly over the output units.
    assert re.search(r"features\.3\.weight\s+32x32x3\s+3072\s+308\s+10\.03%\s+\d+-\d+\n", out), out
    assert re.search(r"fc\.weight\s+10x160\s+1600\s+160\s+10\.00%\s+\d+-\d+\n", out), out


def test_structure_fan_in_keeps_every_units_count(capsys):
    # fan_in: every output unit of a sparse layer keeps round(0.1 * fan_in) weights, after topology updates.
    _mnist1d()
    rc = cli.main(["train", "--data", "mnist1d", "--structure", "fan_in", "--epochs", "2", "--no-progress",
                   "--backend", "reference"])
    out = capsys.readouterr().out
    assert rc == 0 and "structure fan_in" in out and "topology updates: 4" in out
    assert re.search(r"features\.0\.weight\s+32x1x5\s+160\s+160\s+100\.00%\s+5\n", out), out  # first: dense
    for name, shape, c in (("features\\.3", "32x32x3", 10), ("features\\.6", "32x32x3", 10), ("fc", "10x160", 16)):
        n_units = int(shape.split("x")[0])
        assert re.search(rf"{name}\.weight\s+{shape}\s+\d+\s+{n_units * c}\s+[0-9.]+%\s+{c}\n", out), (name, out)
    assert _accuracy(out) > 25.0


def _compare_runs(tmp_path, argv):
    out = tmp_path / "cmp"
    assert cli.main(["train", "--compare", "--seeds", "1", "--epochs", "2", "--no-progress", "--backend",
                     "reference", "--out", str(out)] + argv) == 0
    return json.loads((out / "results.json").read_text())["runs"], (out / "results.md").read_text()


def test_structure_fan_in_for_static_set_and_rigl_in_saved_results(tmp_path):
    _mnist1d()
    runs, md = _compare_runs(tmp_path, ["--data", "mnist1d", "--model", "cnn1d", "--method", "static,set,rigl",
                                        "--structure", "fan_in", "--density", "0.2"])
    assert sorted(r["config"]["method"] for r in runs) == ["rigl", "set", "static"]
    for r in runs:
        assert r["config"]["structure"] == "fan_in"
        units = {layer["name"]: layer["unit_active"] for layer in r["layers"]}
        # round(0.2 * 96) = 19 (96 = 32 channels x kernel 3), round(0.2 * 160) = 32
        assert units == {"features.0.weight": [5, 5], "features.3.weight": [19, 19],
                         "features.6.weight": [19, 19], "fc.weight": [32, 32]}, (r["config"]["method"], units)
        # SET and RigL moved weights (the counts held through updates); static never does.
        assert (sum(c for _, c in r["churn"]) > 0) == (r["config"]["method"] != "static")
    assert "| SET fan_in |" in md and "| RigL fan_in |" in md


def test_structure_2_4_keeps_two_in_every_four(tmp_path, capsys):
    _mnist1d()
    runs, md = _compare_runs(tmp_path, ["--data", "mnist1d", "--model", "mlp", "--method", "set,rigl",
                                        "--structure", "2:4", "--density", "0.5"])
    for r in runs:
        layers = {layer["name"]: layer for layer in r["layers"]}
        assert layers["layers.0.weight"]["group_active"] == [4, 4]  # the first layer stays dense (uniform)
        for name, fan_in in (("layers.1.weight", 300), ("layers.2.weight", 100)):
            assert layers[name]["group_active"] == [2, 2], (r["config"]["method"], layers[name])
            assert layers[name]["unit_active"] == [fan_in // 2, fan_in // 2]
        assert sum(c for _, c in r["churn"]) > 0
    assert "| RigL 2:4 |" in md and "| SET 2:4 |" in md
    # The single-run table shows the runs of M too.
    assert cli.main(["train", "--data", "mnist1d", "--model", "mlp", "--structure", "2:4", "--density", "0.5",
                     "--epochs", "1", "--no-progress", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"layers\.1\.weight\s+100x300\s+30000\s+15000\s+50\.00%\s+150\s+2\n", out), out


def test_study_mnist1d_part_smoke_run(tmp_path):
    # The new sweep, tiny: every (data, model) panel, every variant, 2:4 only at density 1/2, and its files.
    _mnist1d()
    from rigl_fast.study import sweep
    assert sweep.main(["--part", "mnist1d", "--seeds", "1", "--epochs", "1", "--densities", "0.5,0.1",
                       "--backend", "reference", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "mnist1d.json").read_text())["runs"]
    from rigl_fast.app.report import variant
    seen = {(r["data"], r["config"]["model"], variant(r), r["config"]["density"]) for r in runs}
    per_panel = {("dense", 1.0), ("rigl 2:4", 0.5)} | {(v, d) for v in ("static", "set", "rigl", "rigl fan_in")
                                                      for d in (0.5, 0.1)}
    assert seen == {(data, model, v, d) for data in ("digits", "mnist1d") for model in ("cnn1d", "mlp")
                    for v, d in per_panel}
    assert len(runs) == len(seen)
    for r in runs:
        if r["config"]["structure"] == "2:4":
            assert all(layer["group_active"] == [2, 2] for layer in r["layers"][1:])
    md = (tmp_path / "mnist1d.md").read_text()
    assert "| data, model (epochs) | method | 1 | 0.5 | 0.1 |" in md and "## MNIST-1D, 1-D CNN (1 epochs)" in md
    assert (tmp_path / "mnist1d.png").stat().st_size > 10_000
    # --report-only rebuilds the same tables from the JSON, with the saved run's options (not the defaults).
    (tmp_path / "mnist1d.md").unlink()
    assert sweep.main(["--part", "mnist1d", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "mnist1d.md").read_text() == md


def test_export_saves_a_smaller_model_that_computes_the_same(tmp_path, capsys, monkeypatch):
    """--export PATH: the saved model loads, computes what the trained model computes, its sparse Linear layers
    are fan_in modules (structure fan_in), and the printed sizes are the file's and the dense state dict's."""
    from rigl_fast.export import FanInLinear
    path = tmp_path / "model.pt"
    captured = {}
    real_run = cli_demo.run

    def run(cfg, data, progress=None, trained=None):  # keeps a copy of the trained model to compare with
        def both(model, pruner):
            captured["model"] = copy.deepcopy(model).eval()
            trained(model, pruner)
        return real_run(cfg, data, progress, trained=both)

    monkeypatch.setattr(cli_demo, "run", run)
    rc = cli.main(["train", "--model", "mlp", "--structure", "fan_in", "--density", "0.1", "--epochs", "2",
                   "--no-progress", "--backend", "reference", "--export", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"exported to .*model\.pt: 2 sparse Linear layer\(s\) replaced \(2 fan_in\)", out), out
    m = re.search(r"file size: ([0-9.]+) kB, dense state dict ([0-9.]+) kB \(([0-9.]+)x\)", out)
    assert m, out
    assert abs(float(m.group(1)) * 1e3 - path.stat().st_size) < 100
    assert float(m.group(1)) < 0.7 * float(m.group(2))  # 2 of 3 layers at 10%; the first (64x300) stays dense
    assert re.search(r"batch-1 latency: exported \d+ us, dense \d+ us \(speed-up [0-9.]+x", out), out
    exported = torch.load(path, weights_only=False)
    assert sorted(exported.rigl_fast_formats.values()) == ["fan_in", "fan_in"]
    assert sum(isinstance(mod, FanInLinear) for mod in exported.modules()) == 2
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), captured["model"](x), rtol=1e-5, atol=1e-5)
