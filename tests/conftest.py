import os

import pytest

# Triton runs on CPU only through its interpreter, which must be switched on before the first @triton.jit.
# Where a CUDA device exists the same tests run the kernels natively.
try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite's default backend is chosen per test; a user's RIGL_FAST_BACKEND must not leak into it.
os.environ.pop("RIGL_FAST_BACKEND", None)


def pytest_configure(config):
    # A C++ build that fails makes backend='auto' fall back to the reference with a RuntimeWarning, and every
    # test of the C++ paths would pass on the reference instead: here that warning fails the test, unless the
    # machine is declared to have no C++ toolchain (tests/helpers.backend_or_fail skips the cpp cases then).
    if os.environ.get("RIGL_FAST_TESTS_NO_CPP") != "1":
        config.addinivalue_line("filterwarnings",
                                "error:rigl_fast. falling back to the reference backend:RuntimeWarning")


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"
