"""Python started in the checkout's root shadows no installed distribution (issue 20): transformers 5.25 imports
HF's `kernels` package, and a regular package `kernels/` in the root (first on sys.path under `python -m` and
`python -c`) used to stand in its place. Every top-level folder but rigl_fast is at most a namespace portion,
which any installed package of the same name outranks; what runs as `python -m` lives under rigl_fast."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = sorted(d for d in os.listdir(ROOT)
                 if os.path.isdir(os.path.join(ROOT, d)) and d.isidentifier() and d != "rigl_fast")


def _run(code, cwd=ROOT, env=None):
    """`python -c code` started in `cwd`: the way a user's `python -m pytest` or `python -m bench` sees the root."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env={**os.environ, **(env or {})},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_no_top_level_folder_is_a_regular_package():
    assert {"kernels", "bench", "study", "csrc", "tests", "examples"} <= set(FOLDERS)
    regular = [d for d in FOLDERS if os.path.exists(os.path.join(ROOT, d, "__init__.py"))]
    assert regular == [], f"{regular} would shadow installed packages of those names from the checkout's root"
    modules = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    assert modules == ["setup.py"], modules


def test_installed_packages_win_over_every_top_level_folder(tmp_path):
    """A regular package of each folder's name, installed later on sys.path than the root, is what imports."""
    for name in FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    out = _run(f"""
        import importlib
        for name in {FOLDERS!r}:
            print(name, importlib.import_module(name).WHO)
        """, env={"PYTHONPATH": str(tmp_path)})
    assert out.split("\n")[:-1] == [f"{n} installed {n}" for n in FOLDERS]


def test_hf_kernels_is_found_and_transformers_trainer_imports():
    """The reproduction of the issue: HF's `kernels` (installed with transformers 5.25) from the root."""
    if importlib.util.find_spec("kernels") is None:
        pytest.fail("HF's kernels package is not installed: the test extra must bring it (transformers >= 5.25)")
    out = _run("""
        import importlib.util, os
        spec = importlib.util.find_spec("kernels")
        print(os.path.realpath(spec.origin))
        from transformers import Trainer
        print(Trainer.__name__)
        """)
    origin, trainer = out.split("\n")[:2]
    assert not origin.startswith(os.path.realpath(ROOT) + os.sep + "kernels"), origin
    assert trainer == "Trainer"


def test_package_paths_reach_the_checkout_folders(tmp_path):
    """rigl_fast.kernels is the Triton sources in kernels/; rigl_fast.bench / .study run the bench/ and study/ code,
    from the root and from elsewhere (the editable install)."""
    code = """
        import os, rigl_fast.kernels, rigl_fast.kernels.update, rigl_fast.bench.main, rigl_fast.study.sweep
        for m in (rigl_fast.kernels.update, rigl_fast.bench.main, rigl_fast.study.sweep):
            print(os.path.relpath(m.__file__, {root!r}))
        print(rigl_fast.kernels.TritonBackend.__module__)
        """.format(root=ROOT)
    want = [os.path.join("kernels", "update.py"), os.path.join("bench", "main.py"), os.path.join("study", "sweep.py"),
            "rigl_fast.kernels.backend"]
    for cwd in (ROOT, str(tmp_path)):
        assert _run(code, cwd=cwd).split("\n")[:4] == want


def test_bench_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "rigl_fast.bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "--quick" in out.stdout, out.stderr[-2000:]
