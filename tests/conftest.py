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


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"
