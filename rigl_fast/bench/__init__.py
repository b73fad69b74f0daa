"""rigl_fast benchmarks: per-step overhead, update latency, end-to-end training, byte floors, peak memory and
scaling, for rigl-torch 0.5.2, sparsimony 0.1.0 and every rigl_fast backend, measured interleaved in one process.
`python -m rigl_fast.bench` runs the set for the current device (`--quick`: the seconds-long smoke test).

The code is the checkout's top-level bench/ folder, run as this package (rigl_fast/_checkout.py
says why that folder is no package of its own). It is a developer tool: an install without the checkout lacks it."""
from .._checkout import folder

__path__.extend(folder("bench"))
if len(__path__) == 1:
    raise ImportError("rigl_fast.bench runs from a source checkout of rigl_fast (its code is the checkout's bench/ folder)")
