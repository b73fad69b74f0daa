"""rigl_fast benchmarks: per-step overhead, update latency, end-to-end training, byte floors, peak memory and
scaling, for rigl-torch 0.5.2 and every rigl_fast backend, measured interleaved in one process.

`python -m bench` runs the set for the current device; `python -m bench --quick` is the seconds-long smoke test.
"""
from .main import main, run_bench

__all__ = ["main", "run_bench"]
