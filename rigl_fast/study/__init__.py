"""`python -m rigl_fast.study`: the checkout's top-level study/ folder, run as this package (rigl_fast/_checkout.py
says why that folder is no package of its own). It is a developer tool: an install without the checkout lacks it."""
from .._checkout import folder

__path__.extend(folder("study"))
if len(__path__) == 1:
    raise ImportError("rigl_fast.study runs from a source checkout of rigl_fast (its code is the checkout's study/ folder)")
