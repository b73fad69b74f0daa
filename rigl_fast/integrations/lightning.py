"""RigL inside Lightning: `Trainer(callbacks=[RigLCallback(dense_allocation=0.1)])` is all a script adds.

Lightning calls `optimizer.step()` itself, so the scheduler runs with `in_step=True`: every optimizer step
advances the schedule and, when an update is due, the topology update runs right after that step.

When fitting, Lightning restores a checkpoint in this order (lightning/pytorch/trainer/trainer.py, `_run`, and
connectors/checkpoint_connector.py, `_restore_modules_and_callbacks`): the callbacks' `setup`, then the model
weights (`restore_model`), then the callbacks' `on_load_checkpoint` and `load_state_dict`, then
`configure_optimizers`, `on_fit_start`, then the optimizer states and loop progress, then `on_train_start`. The
scheduler is built at `on_train_start`, when the model, the optimizer and its states are all in place, from the
state `load_state_dict` kept (or, if that arrives later, the built scheduler loads it), so a resumed fit
continues the uninterrupted one bit for bit. No callback hook sees the checkpoint before its weights are loaded,
so a fit resumed from a checkpoint without RigL state, or with one that does not fit the model, raises with the
weights left as loaded: the scheduler of an earlier fit is dropped (its masks describe other weights) and the
next fit raises unless it resumes from a valid checkpoint (`swap.broken`), as in the HF callback. A fit that
loads nothing and cannot build its scheduler keeps the live one (`swap`).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

try:
    import lightning.pytorch as pl
except ImportError:  # the older standalone package, if that is what is installed
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError("rigl_fast.integrations.lightning needs Lightning: pip install lightning") from e

from .. import config as _config
from ..scheduler import RigLScheduler
from .swap import broken, refusal, resume, swap

_RESERVED = {"model": "the callback takes the LightningModule from the Trainer",
             "optimizer": "the callback takes the optimizer from the Trainer",
             "state_dict": "the callback saves and restores its state through Lightning checkpoints "
                           "(trainer.fit(model, ckpt_path=...))",
             "in_step": "the callback always runs the scheduler with in_step=True"}
_T_END_FRACTION = 0.75
_TEXT = dict(framework="Lightning", train="trainer.fit()", resume="trainer.fit(model, ckpt_path=...)",
             afresh="a new RigLCallback in a new Trainer")
_LOADED_WEIGHTS = "the model weights"
_LOADED_ALL = "the model weights, the optimizer states and the loop progress"
_AGAIN = ("(Lightning has restored that checkpoint again although this fit was given no ckpt_path: a run that "
          "fails while restoring a checkpoint leaves it to the next run of the same Trainer; use a new Trainer)")


class RigLCallback(pl.Callback):
    """RigL dynamic sparse training for a Lightning `Trainer`.

    `RigLCallback(**scheduler_kwargs)` takes RigLScheduler's arguments (`dense_allocation`, `delta`, `alpha`,
    `T_end`, `sparsity_distribution`, `structure`, `include`, ...), all checked here that need no model. `T_end`
    defaults to 75% of the run's optimizer steps (`trainer.estimated_stepping_batches`). The scheduler, built
    from the LightningModule and its optimizer when training starts, is `callback.pruner`. Its state travels in
    Lightning checkpoints, so `trainer.fit(model, ckpt_path=...)` resumes it; a checkpoint without it raises
    (load its weights and fit without ckpt_path to start RigL from a dense checkpoint), as does one whose state
    does not fit. Lightning has loaded the checkpoint's weights by then: they stay as loaded, a scheduler live
    from an earlier fit is dropped (`callback.pruner` is None, `callback.failed_checkpoint` the path), and the
    next fit raises unless it resumes from a checkpoint with a valid RigL state. `rigl/density`,
    `rigl/regrown_fraction`, `rigl/updates` and `rigl/skipped_updates` are logged after every training batch
    (`log_per_layer=True` adds `rigl/density/<weight>` and `rigl/regrown/<weight>`).
    """

    _TEXT = _TEXT  # what swap.broken and swap.refusal call the framework and its calls

    def __init__(self, *, log_per_layer: bool = False, **scheduler_kwargs):
        super().__init__()
        _config.check_scheduler_kwargs(scheduler_kwargs, _RESERVED, "RigLCallback")
        if not isinstance(log_per_layer, bool):
            raise TypeError(f"log_per_layer must be a bool, got {log_per_layer!r}")
        self.scheduler_kwargs = dict(scheduler_kwargs)
        self.log_per_layer = log_per_layer
        self.pruner: Optional[RigLScheduler] = None
        self._loaded: Optional[dict] = None  # a checkpoint's scheduler state, kept until the scheduler is built
        self._resumed_from = None  # the ckpt_path whose RigL state on_load_checkpoint found, until on_train_start
        self._restoring = None  # that ckpt_path, from on_load_checkpoint to load_state_dict (any stage)
        self._last_restored = None  # the last checkpoint Lightning restored (it may restore it again: _AGAIN)
        # the checkpoint whose weights Lightning loaded but whose RigL state could not be restored (swap.broken)
        self.failed_checkpoint: Optional[str] = None
        self._failure = ""

    # ------------------------------------------------------------------ building the scheduler
    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"RigLCallback needs exactly one optimizer holding the model's weights; "
                             f"configure_optimizers returned {len(optimizers)}")
        resumed, self._resumed_from = self._resumed_from, None
        state, self._loaded = self._loaded, None
        previous = None if self.pruner is None else self.pruner.state_dict()
        if state is None:  # fit() called again, or the state went into the live scheduler (load_state_dict)
            state = previous

        def build(m, o, st):
            kwargs = dict(self.scheduler_kwargs)
            if kwargs.get("T_end") is None and not kwargs.get("static_topo", False) and st is None:
                kwargs["T_end"] = self._default_T_end(trainer)
            return RigLScheduler(m, o, **kwargs, state_dict=st, in_step=True)

        path = trainer.ckpt_path
        if path is not None:
            # Lightning has restored the checkpoint's weights, optimizer states and loop progress: a RigL state
            # that is missing (a checkpoint without "callbacks") or does not fit stops the callback (swap.broken)
            if resumed != path or state is None:
                raise broken(self, path, _LOADED_ALL, ValueError(_no_state(path)), has_state=resumed == path)
            resume(self, build, pl_module, optimizers[0], lambda: state, path, _LOADED_ALL)
        elif self.failed_checkpoint is not None:
            raise RuntimeError(refusal(self))
        else:
            # nothing loaded: a state that cannot be built raises, the live scheduler (if any) kept (see swap)
            swap(self, build, pl_module, optimizers[0], state, previous)

    def setup(self, trainer, pl_module, stage) -> None:
        # every fit/validate/test restores its checkpoint after setup: nothing noted by an earlier one counts
        self._resumed_from = self._restoring = None

    @staticmethod
    def _default_T_end(trainer) -> int:
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("RigLCallback: this run has no known length (max_epochs=-1 and max_steps=-1, or an "
                             "iterable dataset without max_steps), so T_end cannot default to 75% of it; pass T_end=")
        return max(1, int(_T_END_FRACTION * total))

    # ------------------------------------------------------------------ metrics
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.pruner is None:
            return
        stats = self.pruner.stats()
        keys = ["density", "regrown_fraction", "updates", "skipped_updates"]
        if self.log_per_layer:
            keys += [k for k in stats if k.startswith(("density/", "regrown/"))]
        for k in keys:
            pl_module.log(f"rigl/{k}", float(stats[k]), on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        if self.pruner is not None:
            return {"pruner": self.pruner.state_dict()}
        return {} if self._loaded is None else {"pruner": self._loaded}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        source, self._restoring = self._restoring, None  # set by on_load_checkpoint when Lightning restores
        state = state_dict.get("pruner")
        if state is None:
            return
        if self.pruner is None:
            self._loaded = state
            return
        # the scheduler exists already: load into it now (checked before any change)
        try:
            self.pruner.load_state_dict(state)
        except Exception as e:
            if source is None:  # called directly: nothing else was loaded, the live scheduler stands
                raise
            raise broken(self, source, _LOADED_WEIGHTS, e) from e

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        """Lightning calls this after it has loaded the checkpoint's model weights (restore_model, then
        restore_callbacks: on_load_checkpoint, load_state_dict), for fit, validate and test alike.

        Resuming a fit from a checkpoint without RigL state is refused, as the HF callback refuses a checkpoint
        folder without its file: the masks cannot be restored (a weight grown at 0 is active, so the weights do
        not tell), and a restarted schedule would draw new masks over the trained weights. The weights being
        loaded already, the callback stops (swap.broken). validate/test load only the weights: without RigL
        state nothing is needed, but a live scheduler's masks no longer describe the loaded weights, so it is
        dropped too, with a warning."""
        path, fit = trainer.ckpt_path, trainer.state.fn == "fit"
        if path is None:  # a leftover: see _AGAIN
            path = self._last_restored
            if fit and self.failed_checkpoint is not None:
                raise RuntimeError(f"{refusal(self)} {_AGAIN}")
        self._last_restored = path
        states = checkpoint.get("callbacks") or {}
        mine = states.get(self.state_key, states.get(self._legacy_state_key))
        has_state = isinstance(mine, dict) and mine.get("pruner") is not None
        self._restoring = path if has_state else None
        if not fit:
            if not has_state and self.pruner is not None:
                why = ValueError(f"rigl_fast: trainer.{trainer.state.fn}(ckpt_path={str(path)!r}) loaded a "
                                 "checkpoint without RigLCallback state while the callback's scheduler was live")
                warnings.warn(str(broken(self, path, _LOADED_WEIGHTS, why, has_state=False)), stacklevel=2)
            return
        if not has_state:
            again = "" if trainer.ckpt_path is not None else f" {_AGAIN}"
            raise broken(self, path, _LOADED_WEIGHTS, ValueError(_no_state(path) + again), has_state=False)
        self._resumed_from = trainer.ckpt_path


def _no_state(path) -> str:
    return (f"rigl_fast: trainer.fit(ckpt_path={str(path)!r}): the checkpoint holds no RigLCallback state (it was "
            "not saved with RigLCallback), so the masks cannot be restored (a weight grown at 0 is active, so the "
            "weights do not tell). To start RigL from a dense checkpoint, load its weights (YourModule."
            "load_from_checkpoint(path), or model.load_state_dict(torch.load(path)['state_dict'])) and call "
            "trainer.fit(model) without ckpt_path")
