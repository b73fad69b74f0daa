"""The C++ backend: the path of layers above 2**32 positions, forced on small layers; the build: its folder named
after the sources' contents, its messages on stderr (with a stand-in builder, and once for real in a fresh build
folder)."""
import glob
import io
import os
import re
import shutil
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch

from rigl_fast import _cpp

from test_cpp import DTYPES, assert_same, run_both
from test_reference_ops import make_layer


@pytest.fixture(scope="module")
def cpp():
    return _cpp.CppBackend()  # a build failure fails the tests that use it


def paths():
    """[selections the band method resolved, selections the exact radix path made] so far in this process."""
    return list(torch.ops.rigl_fast.select_paths())


# ------------------------------------------------------------------------------------------------ 2**32+ positions
# Layers above 2**32 positions skip the band method (its entries pack a position into 32 bits) and take the
# exact radix path, 64-bit throughout. RIGL_FAST_CPU_BAND_MAX_NUMEL lowers that size for tests, so the same
# code runs on layers that fit here; select_paths() tells which path each selection took.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["generic", "levels", "zeros"])
def test_path_of_huge_layers_forced_on_small_ones(cpp, dtype, kind, monkeypatch):
    g = torch.Generator().manual_seed(len(kind) * 10 + DTYPES.index(dtype))
    shapes = [(7,), (1023,), (4097,), (70001,), (33, 31), (5, 3, 3, 3)]
    layers = [make_layer(sh, 0.3, kind, dtype, g) for sh in shapes]
    ws, ms, ss = zip(*layers)
    monkeypatch.setenv("RIGL_FAST_CPU_BAND_MAX_NUMEL", "0")
    for frac in (0.0, 1 / 3, 0.7, 1.0):
        n_active = [int(m.sum()) for m in ms]
        n_drop = [int(a * frac) for a in n_active]
        n_keep = [a - d for a, d in zip(n_active, n_drop)]
        states = [[torch.randn(w.shape, generator=g).to(dtype)] for w in ws]
        grads = [torch.randn(w.shape, generator=g).to(dtype) for w in ws]
        before = paths()
        args_c, args_r = run_both(cpp, ws, ms, ss, n_keep, n_drop, states, grads)
        after = paths()
        assert_same(args_c, args_r, n_active)
        # one exact selection for each keep and grow that is not all-or-nothing; none by the band method
        wanted = sum((0 < k < a) + (0 < d < w.numel() - k) for k, d, a, w in zip(n_keep, n_drop, n_active, ws))
        assert after[0] == before[0], "the band method ran on a layer sent down the exact path"
        assert after[1] - before[1] == wanted


def test_structured_update_on_the_exact_path(cpp, monkeypatch):
    """The structured update's keep is the update's selection, on the 2**32+ path too; its per-unit grow never goes
    through the layer-wide select: one exact selection per layer whose keep is not all or nothing."""
    from test_cpp import REF, UNIT_LAYERS, assert_structured_same, run_structured, structured_layer
    g = torch.Generator().manual_seed(9)
    layers = [structured_layer(u, "levels", torch.float32, g) for u in UNIT_LAYERS]
    n_active = [int(m.sum()) for _, m, _ in layers]
    n_keep = [a * 2 // 3 for a in n_active]
    states = [[torch.randn(w.shape, generator=g)] for w, _, _ in layers]
    grads = [torch.randn(w.shape, generator=g) for w, _, _ in layers]
    monkeypatch.setenv("RIGL_FAST_CPU_BAND_MAX_NUMEL", "0")
    before = paths()
    got = run_structured(cpp, layers, UNIT_LAYERS, n_keep, states, grads)
    after = paths()
    assert_structured_same(got, run_structured(REF, layers, UNIT_LAYERS, n_keep, states, grads), UNIT_LAYERS)
    assert after[0] == before[0]
    assert after[1] - before[1] == sum(0 < k < a for k, a in zip(n_keep, n_active))


def test_band_method_is_the_default(cpp, monkeypatch):
    """Without the knob the same kind of layer goes through the band method: the knob is what the test above
    relies on to reach the exact path."""
    monkeypatch.delenv("RIGL_FAST_CPU_BAND_MAX_NUMEL", raising=False)
    g = torch.Generator().manual_seed(5)
    w, m, s = make_layer((70001,), 0.3, "generic", torch.float32, g)
    a = int(m.sum())
    before = paths()
    args_c, args_r = run_both(cpp, [w], [m], [s], [a - a // 3], [a // 3], [[]], [None])
    after = paths()
    assert_same(args_c, args_r, [a])
    assert after[0] - before[0] == 2 and after[1] == before[1]


def test_band_knob_is_checked(cpp, monkeypatch):
    monkeypatch.setenv("RIGL_FAST_CPU_BAND_MAX_NUMEL", "lots")
    w, m = torch.ones(4), torch.ones(4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="RIGL_FAST_CPU_BAND_MAX_NUMEL"):
        cpp.update([w], [m], [torch.ones(4)], [2], [1], [[]], [None])


def test_no_size_limit(cpp):
    assert cpp.max_numel() is None


# ------------------------------------------------------------------------------------------------ the build
def test_parts_cover_every_source():
    """Every csrc/*.cpp is in exactly one extension (setup.py's prebuilt module compiles them all)."""
    units = [u for part in _cpp.PARTS.values() for u in part]
    assert len(units) == len(set(units))
    assert set(units) == {os.path.basename(p) for p in glob.glob(os.path.join(_cpp.source_dir(), "*.cpp"))}


def copy_sources(dest):
    shutil.copytree(_cpp.source_dir(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return str(dest)


def test_build_folder_follows_the_sources_contents_not_their_paths(tmp_path):
    """Two copies of the sources (two checkouts) share one build folder; a changed source gets another one, for
    the extensions it is part of."""
    here, a, b = _cpp.source_dir(), copy_sources(tmp_path / "a" / "csrc"), copy_sources(tmp_path / "b" / "csrc")
    for part in _cpp.PARTS:
        assert _cpp.build_dir(part, a) == _cpp.build_dir(part, b) == _cpp.build_dir(part, here)
        assert os.path.dirname(_cpp.build_dir(part, a)) == _cpp.build_root()
    assert _cpp.build_dir("core", a) != _cpp.build_dir("export", a)
    core, export = _cpp.build_dir("core", a), _cpp.build_dir("export", a)
    with open(os.path.join(b, "update_base.cpp"), "a") as f:  # a unit of the core extension
        f.write("// edited\n")
    assert _cpp.build_dir("core", b) != core and _cpp.build_dir("export", b) == export
    with open(os.path.join(a, "common.h"), "a") as f:  # a header: both
        f.write("// edited\n")
    assert _cpp.build_dir("core", a) not in (core, _cpp.build_dir("core", b))
    assert _cpp.build_dir("export", a) != export


def test_build_folder_follows_flags_and_compiler(monkeypatch):
    before = _cpp.build_dir()
    monkeypatch.setattr(_cpp, "CFLAGS", _cpp.CFLAGS + ("-DX",))
    assert _cpp.build_dir() != before
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "clang++")
    assert _cpp.build_dir() != before


def test_prebuilt_module_loads_only_with_the_key_of_these_sources(tmp_path, monkeypatch):
    """setup.py writes prebuilt_key() beside a prebuilt rigl_fast._C; it is current only while the installed sources
    are the ones it was built from (a checkout edited after RIGL_FAST_BUILD_CPP=1 pip install -e . is not)."""
    key = tmp_path / _cpp.PREBUILT_KEY_FILE
    assert not _cpp.prebuilt_is_current(str(key))  # no key file: a module without one is not trusted
    key.write_text(_cpp.prebuilt_key() + "\n")
    assert _cpp.prebuilt_is_current(str(key))
    src = copy_sources(tmp_path / "csrc")
    assert _cpp.prebuilt_key(src) == _cpp.prebuilt_key()  # the key follows contents, not paths
    with open(os.path.join(src, "product_base.cpp"), "a") as f:  # a unit of either extension changes it
        f.write("// edited\n")
    monkeypatch.setattr(_cpp, "source_dir", lambda: src)
    assert not _cpp.prebuilt_is_current(str(key))


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def fake_build(out_dir, clock, units, fail=False):
    """Stands in for cpp_extension.load: compiles `units` one after another, each taking 20 s of the fake clock
    (a unit's .o appears when it is done), then fails if asked."""
    def build():
        for u in units:
            clock.t += 20
            time.sleep(0.3)  # the watcher polls every 0.01 s: it sees the clock move before the .o appears
            with open(os.path.join(out_dir, os.path.splitext(u)[0] + ".o"), "w") as f:
                f.write("o")
            time.sleep(0.3)
        if fail:
            raise RuntimeError("error: it did not compile")
    return build


def test_build_says_when_it_starts_each_unit_it_compiles_and_when_it_ends(tmp_path):
    out, clock, err = str(tmp_path), Clock(), io.StringIO()
    units = ["a.cpp", "b.cpp"]
    _cpp.build_with_messages(fake_build(out, clock, units), out, units, "the C++ ops", err=err, clock=clock,
                             poll_s=0.01, quiet_s=15)
    assert err.getvalue().splitlines() == [
        f"rigl_fast: building the C++ ops (once for these sources, 2 units; cached in {out})...",
        "rigl_fast:   still compiling (20 s, 0/2 units done)",
        "rigl_fast:   [1/2] compiled a.cpp (20 s)",
        "rigl_fast:   still compiling (40 s, 1/2 units done)",
        "rigl_fast:   [2/2] compiled b.cpp (40 s)",
        "rigl_fast: the C++ ops built in 40 s"]


def test_failed_build_says_so_and_raises(tmp_path):
    out, clock, err = str(tmp_path), Clock(), io.StringIO()
    with pytest.raises(RuntimeError, match="did not compile"):
        _cpp.build_with_messages(fake_build(out, clock, ["a.cpp"], fail=True), out, ["a.cpp"], err=err, clock=clock,
                                 poll_s=0.01, quiet_s=100)
    assert err.getvalue().splitlines()[1:] == ["rigl_fast:   [1/1] compiled a.cpp (20 s)",
                                               "rigl_fast: building the C++ ops failed after 20 s"]


def load_in_subprocess(env, part="core", src_dir=None):
    code = ("import sys\n"
            "sys.modules['rigl_fast._C'] = None\n"  # as if no prebuilt module were installed
            "from rigl_fast import _cpp\n"
            + (f"_cpp.source_dir = lambda: {src_dir!r}\n" if src_dir else "")
            + f"print(_cpp.load_library({part!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["jit"]
    return [ln for ln in r.stderr.splitlines() if ln.startswith("rigl_fast:")]


def test_real_first_build_in_a_fresh_folder(tmp_path):
    """The real JIT build into an empty TORCH_EXTENSIONS_DIR: the start line, one line per unit, the end line, the
    C++ standard on the compiler's command line; the export kernels are not built with it. Then a second process,
    and one whose sources are a copy elsewhere (another checkout), load it silently; the export kernels build
    on their own."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("RIGL_FAST_VERBOSE_BUILD", None)
    env.pop("CXX", None)
    with mock.patch.dict(os.environ, {"TORCH_EXTENSIONS_DIR": env["TORCH_EXTENSIONS_DIR"]}):
        out = _cpp.build_dir("core")
    said = load_in_subprocess(env)
    units = _cpp.PARTS["core"]
    assert said[0] == (f"rigl_fast: building the C++ ops (once for these sources, {len(units)} units; cached in "
                       f"{out})...")
    compiled = [re.fullmatch(r"rigl_fast:   \[(\d+)/(\d+)\] compiled (\S+) \(\d+ s\)", ln) for ln in said[1:-1]
                if "still compiling" not in ln]
    assert all(compiled) and sorted(m.group(3) for m in compiled) == sorted(units), said
    assert [int(m.group(1)) for m in compiled] == list(range(1, len(units) + 1))
    assert re.fullmatch(r"rigl_fast: the C\+\+ ops built in \d+ s", said[-1]), said
    with open(os.path.join(out, "build.ninja")) as f:
        cflags = next(ln for ln in f if ln.startswith("cflags"))
    assert cflags.rstrip().endswith("-std=c++20")
    assert [d for d in os.listdir(tmp_path / "ext") if d.startswith("rigl_fast_export")] == []
    assert load_in_subprocess(env) == []
    assert load_in_subprocess(env, src_dir=copy_sources(tmp_path / "checkout2" / "csrc")) == []
    said = load_in_subprocess(env, "export")
    assert said[0].startswith("rigl_fast: building the C++ export kernels") and "built in" in said[-1]


def test_unusable_cache_folder_makes_the_backend_unavailable(tmp_path):
    """A cache root that cannot hold the build (here a file) is a one-line BackendUnavailable, so backend='auto'
    falls back, not an OSError out of the backend's constructor."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    code = ("import sys\n"
            "sys.modules['rigl_fast._C'] = None\n"
            "from rigl_fast import _cpp\n"
            "try:\n"
            "    _cpp.load_library()\n"
            "except _cpp.BackendUnavailable as e:\n"
            "    print('UNAVAILABLE', str(e).count(chr(10)))\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(blocker))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["UNAVAILABLE", "0"]
