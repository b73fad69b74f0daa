"""RigL in the HF Trainer: `Trainer(..., callbacks=[RigLCallback(dense_allocation=0.1, ...)])`.

The Trainer calls optimizer.step() once per optimizer step (once per gradient-accumulation window), so the
callback builds the scheduler with `in_step=True`: every optimizer step advances the schedule and a due
topology update runs right after that step. The callback only builds the scheduler, saves and restores its
state with the Trainer's checkpoints, and puts `pruner.stats()` into the Trainer's logs.

Importing this module imports transformers (the class subclasses TrainerCallback); `import rigl_fast` does not.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import warnings
from typing import Any, Dict, Optional

import torch

try:
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # missing, or installed but broken: say both
    raise ImportError("rigl_fast.integrations.hf needs the transformers package (pip install transformers); "
                      f"importing it failed: {e}") from e

from .. import config as _config
from ..scheduler import RigLScheduler
from .swap import broken, refusal, resume, swap

STATE_FILE = "rigl_fast_state.pt"  # written into every checkpoint-<step> folder the Trainer saves
TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer's own file in that folder (transformers.trainer's name)
T_END_FRACTION = 0.75              # T_end's default: this fraction of the run's optimizer steps (state.max_steps)
LOG_PREFIX = "rigl/"

_WHY = ("the Trainer's model and optimizer, in_step=True, and the state saved in the Trainer's checkpoints "
        "(resume with trainer.train(resume_from_checkpoint=...)) are the callback's to set")
_RESERVED = {k: _WHY for k in ("model", "optimizer", "state_dict", "in_step")}
_TEXT = dict(framework="the Trainer", train="trainer.train()", resume="trainer.train(resume_from_checkpoint=...)",
             afresh="a new RigLCallback (trainer.remove_callback(old), trainer.add_callback(new))")


class RigLCallback(TrainerCallback):
    """RigL for `transformers.Trainer`: pass RigLScheduler's keyword arguments (all but model, optimizer,
    state_dict and in_step, which the callback supplies).

    - When training begins, builds `RigLScheduler(model, optimizer, **scheduler_kwargs, in_step=True)` from the
      Trainer's model and optimizer, exposed as `callback.pruner`. `T_end` defaults to 75% of the run's
      optimizer steps (`state.max_steps`). A second `trainer.train()` keeps the masks and continues the
      schedule.
    - Writes `pruner.state_dict()` into every checkpoint folder (`rigl_fast_state.pt`); on
      `trainer.train(resume_from_checkpoint=...)` it rebuilds the scheduler from that folder's file after the
      Trainer has loaded the model and optimizer, so the resumed run equals the uninterrupted one. A folder
      without that file, or with a state that does not fit the model, raises. The Trainer has loaded the
      folder's weights and optimizer state by then (before any callback event), so the weights stay as loaded,
      the scheduler of an earlier train() is dropped (its masks describe other weights; `callback.pruner` is
      None, `callback.failed_checkpoint` the folder), and the next train() raises unless it resumes from a
      checkpoint with a valid RigL state. A second train() that resumes nothing keeps the live scheduler if the
      new one cannot be built.
    - With `load_best_model_at_end=True`, loads the best checkpoint's RigL state when the Trainer has loaded
      its weights (on_train_end), so the masks, `pruner.export()` and a further train() match them; a best
      folder without the file warns, one whose state does not fit raises as a failed resume does.
    - Adds `pruner.stats()` to every log as `rigl/density`, `rigl/regrown_fraction`, `rigl/updates` and
      `rigl/skipped_updates` (`log_per_layer=True` adds `rigl/density/<layer>` and `rigl/regrown/<layer>`).

    Bad arguments (every RigLScheduler argument that can be checked without the model: structure,
    sharded_init, dense_allocation, ...) raise here, before the Trainer is built.
    """

    _TEXT = _TEXT  # what swap.broken and swap.refusal call the framework and its calls

    def __init__(self, *, log_per_layer: bool = False, **scheduler_kwargs):
        _config.check_scheduler_kwargs(scheduler_kwargs, _RESERVED, "RigLCallback")
        if not isinstance(log_per_layer, bool):
            raise TypeError(f"log_per_layer must be a bool, got {log_per_layer!r}")
        self.scheduler_kwargs: Dict[str, Any] = dict(scheduler_kwargs)
        self.log_per_layer = log_per_layer
        self.pruner: Optional[RigLScheduler] = None
        self.resumed_from: Optional[str] = None  # the checkpoint folder the last train() resumed from
        # the checkpoint whose weights the Trainer loaded but whose RigL state could not be restored (swap.broken)
        self.failed_checkpoint: Optional[str] = None
        self._failure = ""

    # ------------------------------------------------------------------ building the scheduler
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The Trainer calls this after it has created the optimizer, prepared both with Accelerate and, when
        # resuming, loaded the checkpoint's weights and optimizer state (Trainer.train, _prepare_for_training)
        if model is None or optimizer is None:
            raise RuntimeError("RigLCallback.on_train_begin needs the Trainer's model and optimizer in its "
                               "keyword arguments (transformers' CallbackHandler passes them)")
        _run_first(self)
        resumed_from = _resume_folder(args, state)
        kw = dict(self.scheduler_kwargs)
        if kw.get("T_end") is None:  # a resumed state dict's T_end wins over this anyway
            kw["T_end"] = max(1, int(T_END_FRACTION * state.max_steps))

        def build(m, o, st):
            return RigLScheduler(m, o, **kw, state_dict=st, in_step=True)

        if resumed_from is not None:
            # the Trainer has loaded the folder's weights and optimizer state already: a RigL state that is
            # missing or does not fit stops the callback, the weights left as loaded (see swap.broken)
            resume(self, build, model, optimizer, lambda: _load_state(resumed_from, state.global_step),
                   resumed_from, "the model weights and the optimizer state",
                   has_state=os.path.isfile(os.path.join(resumed_from, STATE_FILE)))
        elif self.failed_checkpoint is not None:
            raise RuntimeError(refusal(self))
        else:
            # trainer.train() called again on the trained model: keep its masks and continue the schedule (new
            # random masks would cut the trained weights), as the Lightning callback does on a second fit(); if
            # the scheduler cannot be built on the new optimizer, the live one is kept (see swap)
            previous = None if self.pruner is None else self.pruner.state_dict()
            swap(self, build, model, optimizer, previous, previous)
        self.resumed_from = resumed_from

    def on_train_end(self, args, state, control, **kwargs):
        """With load_best_model_at_end=True the Trainer has just loaded the best checkpoint's weights
        (Trainer._finalize_training calls _load_best_model, then this event): load the RigL state saved in that
        folder, so that the masks describe the weights again."""
        folder = state.best_model_checkpoint
        if (self.pruner is None or not args.load_best_model_at_end or folder is None or not os.path.isdir(folder)
                or _called_from("_report_to_hp_search")):  # a pruned Optuna trial: no best model loaded
            return
        if not os.path.isfile(os.path.join(folder, STATE_FILE)):
            warnings.warn(
                f"rigl_fast: the Trainer has loaded the best checkpoint's weights (load_best_model_at_end=True) "
                f"from {folder}, which has no {STATE_FILE} (it was not saved with RigLCallback), so its masks "
                f"cannot be restored: callback.pruner keeps those of step {self.pruner.step}, which need not "
                f"describe the loaded weights (pruner.export() cannot match them, and another trainer.train() "
                f"zeroes the loaded weights off them). Resume from a checkpoint saved with RigLCallback "
                f"(trainer.train(resume_from_checkpoint=...)) to go on from matching weights and masks",
                stacklevel=2)
            return
        try:
            sd = _load_state(folder, _folder_step(folder))
            self.pruner.load_state_dict(sd)  # checks everything before it changes anything
        except Exception as e:
            raise broken(self, folder, "the best checkpoint's model weights (load_best_model_at_end=True)", e) from e

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, **kwargs):
        if self.pruner is None or not args.should_save:  # under DDP rank 0's state is the one to save
            return
        folder = _checkpoint_folder(args, state)
        if folder is None:
            raise FileNotFoundError(f"rigl_fast: the Trainer reported a checkpoint at step {state.global_step} "
                                    f"but no folder {PREFIX_CHECKPOINT_DIR}-{state.global_step} exists under "
                                    f"{args.output_dir}; the RigL state could not be saved with it")
        sd = self.pruner.state_dict()
        if args.save_only_model:
            # a model-only checkpoint cannot resume training (no optimizer state), so it keeps only what the
            # weights do not say: the masks (a grown weight is 0 and active) and the counters, not the dense
            # gradient accumulator, which is as large as the sparse layers
            sd["rigl_fast_dense_grads"] = [None] * len(sd["rigl_fast_dense_grads"])
        path = os.path.join(folder, STATE_FILE)
        tmp = path + ".tmp"
        torch.save({"global_step": state.global_step, "pruner": sd}, tmp)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ logs
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pruner is None or logs is None:
            return
        st = self.pruner.stats()
        entries = {LOG_PREFIX + k: st[k] for k in ("density", "regrown_fraction", "updates", "skipped_updates")}
        if self.log_per_layer:
            entries.update({LOG_PREFIX + k: v for k, v in st.items() if k.startswith(("density/", "regrown/"))})
        # Trainer.log appends a copy of `logs` (plus "step") to log_history before the callbacks see it
        last = state.log_history[-1] if state.log_history else None
        if (isinstance(last, dict) and last is not logs and last.get("step") == state.global_step
                and all(k in last for k in logs)):
            last.update(entries)
        logs.update(entries)


def _frames(limit=16):
    f = sys._getframe(2)
    for _ in range(limit):
        if f is None:
            return
        yield f
        f = f.f_back


def _run_first(callback):
    """Put the callback first in the Trainer's CallbackHandler, so that every reporter (TensorBoard, W&B,
    the progress bar; the Trainer puts them before user callbacks) sees the rigl/ entries on_log adds, and a
    callback that uploads a checkpoint folder in on_save finds the RigL state in it. Callbacks get no handle on
    the handler, so it is found as `self` of the call_event frame that called us; rebinding the list leaves
    that loop's iteration untouched. Without it the entries still reach log_history and later callbacks."""
    for f in _frames():
        handler = f.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            if callback in handler.callbacks and handler.callbacks[0] is not callback:
                handler.callbacks = [callback] + [c for c in handler.callbacks if c is not callback]
            return


def _resume_folder(args, state) -> Optional[str]:
    """The checkpoint folder this train() resumes from, or None for a fresh run.

    The Trainer does not tell callbacks, so this reads `resume_from_checkpoint` from the Trainer's training
    loop frame (the very folder it has just loaded the weights and optimizer from; `True` is already resolved
    to the last checkpoint there). If that frame cannot be seen (a Trainer subclass with another loop), a
    resumed TrainerState is recognised by global_step > 0 (a fresh one starts at 0) and the folder is taken
    as `{output_dir}/checkpoint-{global_step}`. Either way _load_state checks the file's step."""
    for f in _frames():
        loc = f.f_locals
        if "resume_from_checkpoint" in loc and isinstance(loc.get("self"), transformers.Trainer):
            path = loc["resume_from_checkpoint"]
            if path is None or isinstance(path, (str, os.PathLike)):
                return None if path is None else os.fspath(path)
    if state.global_step > 0:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    return None


def _called_from(name: str) -> bool:
    return any(f.f_code.co_name == name for f in _frames())


def _folder_step(folder) -> Optional[int]:
    """The global step a checkpoint folder was saved at: its trainer_state.json's, else its name's."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", os.path.basename(os.path.normpath(folder)))
        return None if m is None else int(m.group(1))


def _load_state(folder, step: Optional[int]):
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"rigl_fast: resuming from {folder}, which has no {STATE_FILE}: it was not saved with RigLCallback, "
            "so the masks cannot be restored (a weight grown at 0 is active, so the weights do not tell). To "
            "start RigL from a dense checkpoint, load its weights (from_pretrained) and call trainer.train() "
            "without resume_from_checkpoint")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not isinstance(blob.get("pruner"), dict):
        raise ValueError(f"rigl_fast: {path} is not a RigLCallback state (a dict with 'global_step' and 'pruner')")
    if step is not None and blob.get("global_step") != step:
        raise ValueError(f"rigl_fast: {path} was saved at step {blob.get('global_step')} but the Trainer's weights "
                         f"are those of step {step}: the folder holds another run's RigL state")
    return blob["pruner"]


def _checkpoint_folder(args, state) -> Optional[str]:
    """The folder Trainer._save_checkpoint has just written: `{output_dir}/checkpoint-{global_step}`, or
    under a hyperparameter search `{output_dir}/<run name>/checkpoint-{global_step}` (the newest such)."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    found = [p for p in [os.path.join(args.output_dir, name)] + glob.glob(os.path.join(glob.escape(
        args.output_dir), "*", name)) if os.path.isdir(p)]
    return max(found, key=os.path.getmtime) if found else None
