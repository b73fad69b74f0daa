"""rigl_fast.integrations.hf.RigLCallback with TrainingArguments(load_best_model_at_end=True), on the real
transformers Trainer and a tiny GPT-2 built from a config (no download): the Trainer reloads the best checkpoint's
weights at the end of train() (Trainer._finalize_training: _load_best_model, then on_train_end), and the callback
loads the RigL state saved in that folder, so the masks, pruner.export() and a further train() match those
weights; a best folder without the state warns, one whose state does not fit raises as a failed resume does."""
import os

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from helpers import tiny_gpt2  # noqa: E402
from test_hf import _one_thread  # noqa: E402,F401  (autouse: one thread, as test_hf.py says why)
from rigl_fast.hooks import registered_to  # noqa: E402
from rigl_fast.integrations.hf import STATE_FILE, RigLCallback  # noqa: E402
from rigl_fast.state import masks as sd_masks  # noqa: E402

MAX_STEPS = 15


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, 16), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


class _Tamper(TrainerCallback):
    """After RigLCallback (which the callback puts first) has written a checkpoint's state: remove it, or make it
    one that does not fit the model, in every checkpoint folder but the last."""

    def __init__(self, how):
        self.how = how

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if state.global_step == MAX_STEPS:
            return
        if self.how == "remove":
            os.remove(path)
        else:
            blob = torch.load(path, weights_only=True)
            blob["pruner"]["N"] = [n + 1 for n in blob["pruner"]["N"]]
            torch.save(blob, path)


class _AtBegin(TrainerCallback):
    """The sparse weights a train() starts from (after RigLCallback's on_train_begin); stops after one step."""

    def __init__(self, rigl):
        self.rigl, self.weights = rigl, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.weights = {n: w.detach().clone() for n, w in zip(self.rigl.pruner.names, self.rigl.pruner.W)}

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def _train(out, extra=()):
    model = tiny_gpt2(bos_token_id=0, eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    rigl = RigLCallback(dense_allocation=0.3, delta=3, alpha=0.3, ignore_linear_layers=False, T_end=MAX_STEPS)
    # greater_is_better on eval_loss: the worst loss is "best", an early checkpoint whose masks the last
    # updates have moved since
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=MAX_STEPS, save_steps=3,
                             eval_steps=3, eval_strategy="steps", load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", greater_is_better=True,
                             per_device_train_batch_size=4, learning_rate=1e-2, seed=0, disable_tqdm=True,
                             logging_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=_data(48, 1), eval_dataset=_data(8, 2),
                      callbacks=[rigl, *extra])
    return trainer, rigl


def _best(trainer):
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"checkpoint-{MAX_STEPS}")
    weights = load_file(os.path.join(best, "model.safetensors"))
    return best, weights


def _same_masks(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


def test_the_best_checkpoints_masks_come_back_with_its_weights(tmp_path):
    trainer, rigl = _train(tmp_path)
    trainer.train()
    p = rigl.pruner
    best, weights = _best(trainer)
    saved = torch.load(os.path.join(best, STATE_FILE), weights_only=True)
    last = torch.load(tmp_path / f"checkpoint-{MAX_STEPS}" / STATE_FILE, weights_only=True)
    assert not _same_masks(sd_masks(saved["pruner"]), sd_masks(last["pruner"])), "the updates moved no mask"
    assert _same_masks(p.backward_masks, sd_masks(saved["pruner"]))
    assert p.step == saved["global_step"] == saved["pruner"]["step"] < MAX_STEPS and p._handles
    for name, w, m in zip(p.names, p.W, p.backward_masks):
        assert torch.equal(w.detach(), weights[name]), name  # the best weights, none zeroed by the masks
        if m is not None:
            assert bool((w[~m] == 0).all()), name
    # the export computes what the reloaded model computes
    exported = p.export("csr")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    trainer.model.eval()
    exported.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trainer.model(ids).logits, rtol=1e-5, atol=1e-6)
    # and a further train() starts from those weights, none zeroed
    at_begin = _AtBegin(rigl)
    trainer.add_callback(at_begin)
    trainer.train()
    assert all(torch.equal(at_begin.weights[n], weights[n]) for n in p.names)


def test_a_best_checkpoint_without_rigl_state_warns(tmp_path):
    trainer, rigl = _train(tmp_path, extra=[_Tamper("remove")])
    with pytest.warns(UserWarning, match=f"no {STATE_FILE}"):
        trainer.train()
    assert rigl.pruner is not None and rigl.pruner.step == MAX_STEPS  # the last step's masks, as the warning says


def test_a_best_checkpoint_whose_rigl_state_does_not_fit_raises_and_stops_the_callback(tmp_path):
    trainer, rigl = _train(tmp_path, extra=[_Tamper("corrupt")])
    with pytest.raises(ValueError, match="does not fit the model") as e:
        trainer.train()
    assert "the best checkpoint's model weights (load_best_model_at_end=True)" in str(e.value)
    best, weights = _best(trainer)
    assert rigl.pruner is None and rigl.failed_checkpoint == best
    model = trainer.model.state_dict()
    assert all(torch.equal(model[k], v) for k, v in weights.items())  # left as the Trainer loaded them
    with pytest.raises(RuntimeError, match="valid RigL state"):
        trainer.train()
    assert all(registered_to(w) is None for w in trainer.model.parameters())  # the dropped scheduler's hooks gone
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in weights.items())
