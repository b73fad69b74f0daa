"""A callback's live scheduler replaced by a new one, or kept when the new one cannot be built (HF and Lightning)."""
from __future__ import annotations

from typing import Callable, Optional


def swap(owner, build: Callable, model, optimizer, state: Optional[dict], previous: Optional[dict]) -> None:
    """Set `owner.pruner` to `build(model, optimizer, state)` in place of the live scheduler `owner.pruner`, whose
    hooks must go first (a model is registered to one scheduler at a time); `previous` is that scheduler's
    state_dict(). If the build fails (a resumed state that does not fit the model, a state of another run), the
    old scheduler is built again from `previous` on the model and optimizer it had, so the callback keeps the
    live masks, their hooks and the schedule (the next train()/fit() continues from them instead of drawing new
    masks over the trained weights), and the error is raised. The build checks everything before it changes
    anything, so the model is as the old scheduler left it."""
    old = owner.pruner
    if old is not None:
        old.remove()
    try:
        owner.pruner = build(model, optimizer, state)
    except BaseException:
        if old is not None:
            owner.pruner = build(old.model, old.optimizer, previous)
        raise
