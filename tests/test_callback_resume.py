"""A resume whose RigL state cannot be used, with the real transformers and Lightning Trainers (tiny models from
configs, CPU): both frameworks load the checkpoint's model weights (HF: and the optimizer state) before any
callback can see the checkpoint, so the weights stay as loaded, a live scheduler (whose masks describe other
weights) is dropped instead of being applied to them, the error says so, and the next train()/fit() raises until
a resume from a checkpoint with a valid RigL state, which brings the callback back."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from helpers import tiny_gpt2  # noqa: E402
from rigl_fast.hooks import registered_to  # noqa: E402
from rigl_fast.integrations import hf as rigl_hf  # noqa: E402
from rigl_fast.integrations import lightning as rigl_pl  # noqa: E402
from rigl_fast.state import masks as sd_masks  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n, rng = torch.get_num_threads(), torch.random.get_rng_state()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    torch.random.set_rng_state(rng)


# ---------------------------------------------------------------- Lightning
class Lit(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _pl_trainer(root, cb, max_steps):
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      callbacks=[] if cb is None else [cb],
                      num_sanity_val_steps=0)


def _pl_live(tmp_path):
    """A fit to step 4, its checkpoint, then on to step 10 (updates at 6 and 9 move the masks)."""
    pl.seed_everything(0, verbose=False)
    model = Lit()
    cb = rigl_pl.RigLCallback(dense_allocation=0.3, delta=3, T_end=12, ignore_linear_layers=False)
    trainer = _pl_trainer(tmp_path, cb, 4)
    trainer.fit(model, _loader())
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    trainer.fit_loop.epoch_loop.max_steps = 10
    trainer.fit(model, _loader())
    assert cb.pruner.step == 10 and cb.pruner.rigl_steps == 3
    return model, cb, trainer


def test_lightning_a_state_that_does_not_fit_leaves_the_checkpoint_weights_and_a_valid_resume_recovers(tmp_path):
    model, cb, trainer = _pl_live(tmp_path)
    live = cb.pruner
    ck = torch.load(tmp_path / "step4.ckpt", weights_only=False)
    saved = ck["callbacks"]["RigLCallback"]["pruner"]
    ck["callbacks"]["RigLCallback"]["pruner"] = dict(saved, N=[n + 1 for n in saved["N"]])
    torch.save(ck, tmp_path / "bad.ckpt")
    trainer.fit_loop.epoch_loop.max_steps = 20
    with pytest.raises(ValueError, match="does not fit the model") as e:
        trainer.fit(model, _loader(), ckpt_path=tmp_path / "bad.ckpt")
    now = model.state_dict()
    # the step-4 weights as Lightning loaded them, not cut by the step-10 masks
    assert all(torch.equal(now[k], v) for k, v in ck["state_dict"].items())
    assert "the model weights from" in str(e.value) and "callback.pruner is None" in str(e.value)
    assert cb.pruner is None and not live._handles and cb.failed_checkpoint == str(tmp_path / "bad.ckpt")
    assert all(registered_to(w) is None for w in model.parameters())
    # Lightning restores the failed checkpoint again in the next run of this Trainer: refused all the same
    with pytest.raises(RuntimeError, match="valid RigL state") as e:
        trainer.fit(model, _loader())
    assert "bad.ckpt" in str(e.value) and "restored that checkpoint again" in str(e.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ck["state_dict"].items())
    # a valid resume brings the callback back, from the checkpoint's own masks and weights
    seen = {}

    class Seen(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["masks"] = [None if m is None else m.clone() for m in cb.pruner.backward_masks]
            seen["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    trainer.callbacks.append(Seen())
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(model, _loader(), ckpt_path=tmp_path / "step4.ckpt")
    assert cb.failed_checkpoint is None and cb.pruner._handles and cb.pruner.step == 6
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(seen["masks"], sd_masks(saved)))
    assert all(torch.equal(seen["weights"][k], v) for k, v in ck["state_dict"].items())


def test_lightning_validate_on_a_checkpoint_without_rigl_state_drops_the_live_scheduler(tmp_path):
    model, cb, trainer = _pl_live(tmp_path)
    live = cb.pruner
    pl.seed_everything(1, verbose=False)
    dense = Lit()
    dense_trainer = _pl_trainer(tmp_path / "dense", None, 1)
    dense_trainer.fit(dense, _loader())
    dense_trainer.save_checkpoint(tmp_path / "dense.ckpt")
    with pytest.warns(UserWarning, match="without RigLCallback state while the callback's scheduler was live"):
        trainer.validate(model, _loader(), ckpt_path=tmp_path / "dense.ckpt", verbose=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.state_dict().items())
    assert cb.pruner is None and not live._handles and cb.failed_checkpoint == str(tmp_path / "dense.ckpt")
    trainer.fit_loop.epoch_loop.max_steps = 20
    with pytest.raises(RuntimeError, match="valid RigL state"):
        trainer.fit(model, _loader())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.state_dict().items())


# ---------------------------------------------------------------- HF
def _hf(out, rigl, max_steps=6):
    model = tiny_gpt2(bos_token_id=0, eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": r, "labels": r.clone()} for r in torch.randint(0, 64, (48, 16), generator=g)]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps, save_steps=5,
                             per_device_train_batch_size=4, learning_rate=1e-2, seed=0, disable_tqdm=True,
                             logging_steps=100)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[rigl])


def test_hf_a_fresh_callback_stops_on_a_bad_rigl_state_not_on_a_dense_folder(tmp_path):
    """No live scheduler: a folder whose RigL state does not fit is a RigL run's (its weights sparse-trained),
    so the callback stops and the next train() raises instead of drawing new masks over them; a folder with no
    RigL state (a dense checkpoint) leaves the callback usable: train() then starts RigL on those weights."""
    kw = dict(dense_allocation=0.3, delta=3, alpha=0.3, ignore_linear_layers=False)
    _hf(tmp_path / "run", rigl_hf.RigLCallback(**kw)).train()
    bad, bare = tmp_path / "bad", tmp_path / "bare"
    for folder in (bad, bare):
        shutil.copytree(tmp_path / "run" / "checkpoint-5", folder)
    os.remove(bare / rigl_hf.STATE_FILE)
    blob = torch.load(bad / rigl_hf.STATE_FILE, weights_only=True)
    blob["pruner"]["N"] = [n + 1 for n in blob["pruner"]["N"]]
    torch.save(blob, bad / rigl_hf.STATE_FILE)

    rigl = rigl_hf.RigLCallback(**kw)
    trainer = _hf(tmp_path / "a", rigl)
    with pytest.raises(ValueError, match="does not fit the model"):
        trainer.train(resume_from_checkpoint=str(bad))
    with pytest.raises(RuntimeError, match="valid RigL state") as e:
        trainer.train()
    assert str(bad) in str(e.value) and rigl.pruner is None

    rigl = rigl_hf.RigLCallback(**kw)
    trainer = _hf(tmp_path / "b", rigl)
    with pytest.raises(FileNotFoundError, match=rigl_hf.STATE_FILE) as e:
        trainer.train(resume_from_checkpoint=str(bare))
    assert "starts RigL on them with new masks" in str(e.value) and rigl.failed_checkpoint is None
    trainer.train()
    assert rigl.pruner is not None and rigl.pruner.step == 6
