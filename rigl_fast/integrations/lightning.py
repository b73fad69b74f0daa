"""RigL inside Lightning: `Trainer(callbacks=[RigLCallback(dense_allocation=0.1)])` is all a script adds.

Lightning calls `optimizer.step()` itself, so the scheduler runs with `in_step=True`: every optimizer step
advances the schedule and, when an update is due, the topology update runs right after that step.

When fitting, Lightning restores a checkpoint in this order (lightning/pytorch/trainer/trainer.py, `_run`):
model weights and the callbacks' `load_state_dict`, then `configure_optimizers`, `on_fit_start`, then the
optimizer states and loop progress, then `on_train_start`. The scheduler is built at `on_train_start`, when
the model, the optimizer and its states are all in place, from the state `load_state_dict` kept (or, if
that arrives later, the built scheduler loads it), so a resumed fit continues the uninterrupted one bit for bit.
A fit resumed from a checkpoint without RigL state is refused (`on_load_checkpoint`), and a state that does not
fit the model raises with the live scheduler of an earlier fit kept in place (`swap`), as in the HF callback.
"""
from __future__ import annotations

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
from .swap import swap

_RESERVED = {"model": "the callback takes the LightningModule from the Trainer",
             "optimizer": "the callback takes the optimizer from the Trainer",
             "state_dict": "the callback saves and restores its state through Lightning checkpoints "
                           "(trainer.fit(model, ckpt_path=...))",
             "in_step": "the callback always runs the scheduler with in_step=True"}
_T_END_FRACTION = 0.75


class RigLCallback(pl.Callback):
    """RigL dynamic sparse training for a Lightning `Trainer`.

    `RigLCallback(**scheduler_kwargs)` takes RigLScheduler's arguments (`dense_allocation`, `delta`, `alpha`,
    `T_end`, `sparsity_distribution`, `structure`, `include`, ...), all checked here that need no model. `T_end`
    defaults to 75% of the run's optimizer steps (`trainer.estimated_stepping_batches`). The scheduler, built
    from the LightningModule and its optimizer when training starts, is `callback.pruner`. Its state travels in
    Lightning checkpoints, so `trainer.fit(model, ckpt_path=...)` resumes it; a checkpoint without it raises
    (load its weights and fit without ckpt_path to start RigL from a dense checkpoint). `rigl/density`,
    `rigl/regrown_fraction`, `rigl/updates` and `rigl/skipped_updates` are logged after every training batch
    (`log_per_layer=True` adds `rigl/density/<weight>` and `rigl/regrown/<weight>`).
    """

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

    # ------------------------------------------------------------------ building the scheduler
    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"RigLCallback needs exactly one optimizer holding the model's weights; "
                             f"configure_optimizers returned {len(optimizers)}")
        resumed, self._resumed_from = self._resumed_from, None
        if trainer.ckpt_path is not None and resumed != trainer.ckpt_path:  # a checkpoint without "callbacks"
            raise ValueError(_no_state(trainer.ckpt_path))
        state, self._loaded = self._loaded, None
        previous = None if self.pruner is None else self.pruner.state_dict()
        if state is None:  # fit() called again: configure_optimizers made a new optimizer; continue the schedule
            state = previous
        kwargs = dict(self.scheduler_kwargs)
        if kwargs.get("T_end") is None and not kwargs.get("static_topo", False) and state is None:
            kwargs["T_end"] = self._default_T_end(trainer)
        # a checkpoint's state that does not fit the model raises here, the live scheduler (if any) kept: see swap
        swap(self, lambda m, o, st: RigLScheduler(m, o, **kwargs, state_dict=st, in_step=True), pl_module,
             optimizers[0], state, previous)

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
        state = state_dict.get("pruner")
        if state is None:
            return
        if self.pruner is not None:  # the scheduler exists already: load into it now (validated before any change)
            self.pruner.load_state_dict(state)
        else:
            self._loaded = state

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        """Resuming a fit from a checkpoint without RigL state is refused, as the HF callback refuses a checkpoint
        folder without its file: the masks cannot be restored (a weight grown at 0 is active, so the weights do
        not tell), and a restarted schedule would draw new masks over the trained weights. Lightning calls this
        before load_state_dict, for fit, validate and test alike; only fit resumes training."""
        if trainer.state.fn != "fit":
            return
        states = checkpoint.get("callbacks") or {}
        mine = states.get(self.state_key, states.get(self._legacy_state_key))
        if not isinstance(mine, dict) or mine.get("pruner") is None:
            raise ValueError(_no_state(trainer.ckpt_path))
        self._resumed_from = trainer.ckpt_path


def _no_state(path) -> str:
    return (f"rigl_fast: trainer.fit(ckpt_path={str(path)!r}): the checkpoint holds no RigLCallback state (it was "
            "not saved with RigLCallback), so the masks cannot be restored (a weight grown at 0 is active, so the "
            "weights do not tell). To start RigL from a dense checkpoint, load its weights (YourModule."
            "load_from_checkpoint(path), or model.load_state_dict(torch.load(path)['state_dict'])) and call "
            "trainer.fit(model) without ckpt_path")
