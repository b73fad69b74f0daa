"""RigL inside Lightning: `Trainer(callbacks=[RigLCallback(dense_allocation=0.1)])` is all a script adds.

Lightning calls `optimizer.step()` itself, so the scheduler runs with `in_step=True`: every optimizer step
advances the schedule and, when an update is due, the topology update runs right after that step.

When fitting, Lightning restores a checkpoint in this order (lightning/pytorch/trainer/trainer.py, `_run`):
model weights and the callbacks' `load_state_dict`, then `configure_optimizers`, `on_fit_start`, then the
optimizer states and loop progress, then `on_train_start`. The scheduler is built at `on_train_start`, when
the model, the optimizer and its states are all in place, from the state `load_state_dict` kept (or, if
that arrives later, the built scheduler loads it), so a resumed fit continues the uninterrupted one bit for bit.
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

_RESERVED = {"model": "the callback takes the LightningModule from the Trainer",
             "optimizer": "the callback takes the optimizer from the Trainer",
             "state_dict": "the callback saves and restores its state through Lightning checkpoints "
                           "(trainer.fit(model, ckpt_path=...))",
             "in_step": "the callback always runs the scheduler with in_step=True"}
_T_END_FRACTION = 0.75


class RigLCallback(pl.Callback):
    """RigL dynamic sparse training for a Lightning `Trainer`.

    `RigLCallback(**scheduler_kwargs)` takes RigLScheduler's arguments (`dense_allocation`, `delta`, `alpha`,
    `T_end`, `sparsity_distribution`, `include`, ...), checked here. `T_end` defaults to 75% of the run's
    optimizer steps (`trainer.estimated_stepping_batches`). The scheduler, built from the LightningModule and
    its optimizer when training starts, is `callback.pruner`. Its state travels in Lightning checkpoints, so
    `trainer.fit(model, ckpt_path=...)` resumes it. `rigl/density`, `rigl/regrown_fraction`, `rigl/updates`
    and `rigl/skipped_updates` are logged after every training batch (`log_per_layer=True` adds
    `rigl/density/<weight>` and `rigl/regrown/<weight>`).
    """

    def __init__(self, *, log_per_layer: bool = False, **scheduler_kwargs):
        super().__init__()
        _config.check_scheduler_kwargs(scheduler_kwargs, _RESERVED, "RigLCallback")
        self.scheduler_kwargs = dict(scheduler_kwargs)
        self.log_per_layer = bool(log_per_layer)
        self.pruner: Optional[RigLScheduler] = None
        self._loaded: Optional[dict] = None  # a checkpoint's scheduler state, kept until the scheduler is built

    # ------------------------------------------------------------------ building the scheduler
    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"RigLCallback needs exactly one optimizer holding the model's weights; "
                             f"configure_optimizers returned {len(optimizers)}")
        state = self._loaded
        if self.pruner is not None:  # fit() called again: configure_optimizers made a new optimizer
            if state is None:
                state = self.pruner.state_dict()
            self.pruner.remove()
            self.pruner = None
        kwargs = dict(self.scheduler_kwargs)
        if kwargs.get("T_end") is None and not kwargs.get("static_topo", False) and state is None:
            kwargs["T_end"] = self._default_T_end(trainer)
        self.pruner = RigLScheduler(pl_module, optimizers[0], **kwargs, state_dict=state, in_step=True)
        self._loaded = None

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
        if self.pruner is not None:  # the scheduler exists already: load into it now
            self.pruner.load_state_dict(state)
        else:
            self._loaded = state
