"""The C++ backend: the path of layers above 2**32 positions, forced on small layers; the first-use build's
messages on stderr (with a stand-in builder, and once for real in a fresh build folder)."""
import io
import os
import re
import subprocess
import sys

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


# ------------------------------------------------------------------------------------------------ build messages
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def fake_inputs(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    inputs = []
    for name in ("ops.cpp", "ops.h"):
        (src / name).write_text("// source\n")
        os.utime(src / name, (1000, 1000))
        inputs.append(str(src / name))
    return inputs


def ninja_text(flags):
    return f"cflags = -DTORCH_EXTENSION_NAME=x -fPIC -std=c++20 {' '.join(flags)}\nldflags = -shared -fopenmp -L/t\n"


def fake_builder(out_dir, clock, seconds, flags=_cpp.CFLAGS, fail=False):
    """Stands in for cpp_extension.load: takes `seconds` of the fake clock and leaves what a build leaves."""
    calls = []

    def build():
        calls.append(1)
        clock.t += seconds
        if fail:
            raise RuntimeError("error: it did not compile")
        lib = os.path.join(out_dir, _cpp.EXT_NAME + ".so")
        if seconds >= 1:  # a real compile writes the library and the build file
            with open(lib, "w") as f:
                f.write("lib")
            os.utime(lib, (2000, 2000))
            with open(os.path.join(out_dir, "build.ninja"), "w") as f:
                f.write(ninja_text(flags))
    return build, calls


# what _cpp._jit_build checks in the build file: our flags at the end of the cflags line, and in ldflags
WORDS = [" ".join(_cpp.CFLAGS) + "\n", " ".join(_cpp.LDFLAGS) + " "]


def lines(err):
    return err.getvalue().splitlines()


def test_first_build_says_so_and_a_cache_hit_is_silent(tmp_path):
    inputs = fake_inputs(tmp_path)
    out = str(tmp_path / "build")
    os.makedirs(out)
    clock = Clock()
    build, calls = fake_builder(out, clock, 63)
    err = io.StringIO()
    _cpp.build_with_messages(build, out, inputs, WORDS, err=err, clock=clock)
    assert calls == [1]
    assert lines(err) == [f"rigl_fast: building the C++ ops (first use only, about a minute; cached in {out})...",
                          "rigl_fast: C++ ops built in 63 s"]
    # the next process loads the cached build: no message (the loader still runs: it registers the ops)
    build, calls = fake_builder(out, clock, 0.4)
    err = io.StringIO()
    _cpp.build_with_messages(build, out, inputs, WORDS, err=err, clock=clock)
    assert calls == [1] and lines(err) == []


def _built_once(tmp_path, seconds):
    """Fake sources and one fake build of them that took `seconds`: (inputs, build folder, clock)."""
    inputs = fake_inputs(tmp_path)
    out = str(tmp_path / "build")
    os.makedirs(out)
    clock = Clock()
    _cpp.build_with_messages(fake_builder(out, clock, seconds)[0], out, inputs, WORDS, err=io.StringIO(),
                             clock=clock)
    return inputs, out, clock


def test_changed_sources_or_flags_announce_a_rebuild(tmp_path):
    inputs, out, clock = _built_once(tmp_path, 70)
    assert _cpp.cached_build_is_current(out, inputs, WORDS)
    os.utime(inputs[1], (3000, 3000))  # a header edited after the build
    assert not _cpp.cached_build_is_current(out, inputs, WORDS)
    err = io.StringIO()
    _cpp.build_with_messages(fake_builder(out, clock, 41)[0], out, inputs, WORDS, err=err, clock=clock)
    assert len(lines(err)) == 2 and lines(err)[1] == "rigl_fast: C++ ops built in 41 s"
    # the last build used other flags (the old ones, without -std): torch's own -std=c++20 must not pass for ours
    _cpp.build_with_messages(fake_builder(out, clock, 5, flags=["-O3", "-fopenmp"])[0], out, inputs,
                             WORDS, err=io.StringIO(), clock=clock)
    os.utime(inputs[1], (1000, 1000))
    assert not _cpp.cached_build_is_current(out, inputs, WORDS)


def test_unforeseen_rebuild_is_reported_after(tmp_path):
    """The cache looked current, but the load took long (torch's headers changed, say): one line after."""
    inputs, out, clock = _built_once(tmp_path, 60)
    err = io.StringIO()
    _cpp.build_with_messages(fake_builder(out, clock, 30)[0], out, inputs, WORDS, err=err, clock=clock)
    assert lines(err) == [f"rigl_fast: C++ ops rebuilt in 30 s (the cached build in {out} was out of date)"]


def test_failed_build_says_so_and_raises(tmp_path):
    inputs = fake_inputs(tmp_path)
    out = str(tmp_path / "build")
    os.makedirs(out)
    clock = Clock()
    err = io.StringIO()
    with pytest.raises(RuntimeError, match="did not compile"):
        _cpp.build_with_messages(fake_builder(out, clock, 12, fail=True)[0], out, inputs, WORDS, err=err,
                                 clock=clock)
    assert lines(err)[1:] == ["rigl_fast: building the C++ ops failed after 12 s"]


def test_real_first_build_in_a_fresh_folder(tmp_path):
    """The real JIT build (about a minute on 2 cores) into an empty TORCH_EXTENSIONS_DIR: the two lines, the
    C++ standard on the compiler's command line; then a second process loads it silently."""
    code = ("import sys\n"
            "sys.modules['rigl_fast._C'] = None\n"  # as if no prebuilt module were installed
            "from rigl_fast import _cpp\n"
            "print(_cpp.load_library())\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("RIGL_FAST_VERBOSE_BUILD", None)
    out = str(tmp_path / "ext" / _cpp.EXT_NAME)
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.split() == ["jit"]
    said = [ln for ln in first.stderr.splitlines() if ln.startswith("rigl_fast:")]
    assert said[0] == f"rigl_fast: building the C++ ops (first use only, about a minute; cached in {out})..."
    assert re.fullmatch(r"rigl_fast: C\+\+ ops built in \d+ s", said[1]), said
    assert len(said) == 2
    with open(os.path.join(out, "build.ninja")) as f:
        cflags = next(ln for ln in f if ln.startswith("cflags"))
    assert cflags.rstrip().endswith("-std=c++20")
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [ln for ln in second.stderr.splitlines() if ln.startswith("rigl_fast:")] == []
