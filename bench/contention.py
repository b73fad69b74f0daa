"""A competing process for the loaded columns: one other PyTorch process doing small matmuls in a loop on its
default threads, as a user's other job would (issue 21). Each 64x64 matmul opens an OpenMP region whose threads
spin between regions, so they hold the cores that a kernel's own OpenMP threads then wait for: a plain busy
Python loop does not do this."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

NOTE = ("loaded: measured again while one other PyTorch process ran 64x64 matmuls in a loop on its default threads "
        "(bench/contention.py), started before the loaded repeats and stopped after them")

# it stops by itself when the bench that started it is gone (killed before it could stop it): its parent changes
_CODE = ("import os, sys, torch\n"
         "a, b = torch.randn(64, 64), torch.randn(64, 64)\n"
         "a @ b\n"
         "print('ready', flush=True)\n"
         "while os.getppid() == int(sys.argv[1]):\n"
         "    for _ in range(100):\n"
         "        a @ b\n")


@contextlib.contextmanager
def competing_process():
    """Runs the competitor for the duration of the block (from its first matmul on); stops it after."""
    p = subprocess.Popen([sys.executable, "-c", _CODE, str(os.getpid())], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("the competing process did not start")
        yield p
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
