"""A callback's live scheduler replaced by a new one (HF and Lightning): kept when nothing was loaded, dropped and the
callback stopped when the framework had already loaded a checkpoint's weights that its RigL state does not fit."""
from __future__ import annotations

from typing import Callable, Optional


def swap(owner, build: Callable, model, optimizer, state: Optional[dict], previous: Optional[dict]) -> None:
    """Set `owner.pruner` to `build(model, optimizer, state)` in place of the live scheduler `owner.pruner`, whose
    hooks must go first (a model is registered to one scheduler at a time); `previous` is that scheduler's
    state_dict(). For a train()/fit() that loads no checkpoint: the model holds the weights the live masks
    describe. If the build fails, the old scheduler is built again from `previous` on the model and optimizer it
    had (re-applying its own masks changes nothing), so the callback keeps the live masks, their hooks and the
    schedule, and the error is raised. The build checks everything before it changes anything."""
    old = owner.pruner
    if old is not None:
        old.remove()
    try:
        owner.pruner = build(model, optimizer, state)
    except BaseException:
        if old is not None:
            owner.pruner = build(old.model, old.optimizer, previous)
        raise


def resume(owner, build: Callable, model, optimizer, read: Callable, source, loaded: str,
           has_state: bool = True) -> None:
    """Set `owner.pruner` to `build(model, optimizer, read())`: the RigL state of checkpoint `source` (which has
    none if not `has_state`), whose `loaded` (its model weights, ...) the framework has already put in place. If
    reading or building fails, the old scheduler is not built again (its masks would zero weights of the
    checkpoint that they do not describe): see `broken`. On success the callback works again after a failure."""
    try:
        state = read()
        if owner.pruner is not None:
            owner.pruner.remove()
        owner.pruner = build(model, optimizer, state)
    except BaseException as e:
        err = broken(owner, source, loaded, e, has_state)
        if isinstance(e, Exception):
            raise err from e
        raise
    owner.failed_checkpoint = None


def broken(owner, source, loaded: str, error: BaseException, has_state: bool = True) -> BaseException:
    """The framework has loaded `loaded` (the model weights, ...) from checkpoint `source`, whose RigL state is
    missing (not `has_state`) or cannot be used (`error`). Nothing can be undone: the weights stay as loaded (no
    mask is applied to them). A live scheduler, whose masks describe the earlier weights, is unhooked and dropped
    (`owner.pruner = None`); and unless the callback had no scheduler and the checkpoint no RigL state (a dense
    checkpoint: new masks on its weights are what the next train()/fit() then draws, as documented), the callback
    records `owner.failed_checkpoint`, so that its next train()/fit() raises (`refusal`) unless it resumes from a
    checkpoint with a valid RigL state. Returns the error to raise: `error`'s type (RuntimeError if that type
    takes no message) with `error`'s message and what happened."""
    text = owner._TEXT
    old = owner.pruner
    head = (f"{error}\nrigl_fast: {text['framework']} had already loaded {loaded} from {source} (it does so before "
            f"a callback can check the checkpoint's RigL state), so the model now holds that checkpoint's weights")
    if old is None and not has_state:
        msg = (f"{head}; the callback holds no scheduler, so a {text['train']} that resumes nothing starts RigL on "
               f"them with new masks.")
    else:
        if old is not None:
            old.remove()
            owner.pruner = None
        owner.failed_checkpoint = str(source)
        owner._failure = str(error).split("\n")[0]
        step = "" if old is None else f" (step {old.step})"
        msg = (f"{head} and no masks that describe them. The weights are left as loaded; the callback's "
               f"scheduler{step}, whose masks describe the earlier weights, is dropped (callback.pruner is None). "
               f"The next {text['train']} with this callback raises unless it resumes from a checkpoint with a "
               f"valid RigL state ({text['resume']}); to start RigL afresh on the loaded weights, use "
               f"{text['afresh']}.")
    try:
        return type(error)(msg)
    except Exception:  # an exception type that does not take one message
        return RuntimeError(msg)


def refusal(owner) -> str:
    """The error of a train()/fit() that does not resume, on a callback `broken` stopped."""
    text = owner._TEXT
    return (f"rigl_fast: RigLCallback: {text['train']} without resuming, but the RigL state of "
            f"{owner.failed_checkpoint} could not be restored ({owner._failure}) after {text['framework']} had loaded "
            f"that checkpoint's weights: the model holds them and no masks that describe them, so training would "
            f"mix two states. Resume from a checkpoint with a valid RigL state ({text['resume']}), or, to start RigL "
            f"afresh on these weights, use {text['afresh']}.")
