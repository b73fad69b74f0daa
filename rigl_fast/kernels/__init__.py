"""The Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1). Their sources are the checkout's top-level
kernels/ folder, added to this package's path (rigl_fast/_checkout.py says why that folder is no package of its
own); an install holds them here. Importing this package requires triton: `rigl_fast.ops` turns the
ImportError into "backend unavailable"."""
from .._checkout import folder

__path__.extend(folder("kernels"))

from .backend import DEFAULT_BLOCK, DEFAULT_ITERS, DEFAULT_PAIRWISE_GROUP, DEFAULT_RADIX_BITS, TritonBackend  # noqa: E402

__all__ = ["TritonBackend", "DEFAULT_BLOCK", "DEFAULT_ITERS", "DEFAULT_RADIX_BITS", "DEFAULT_PAIRWISE_GROUP"]
