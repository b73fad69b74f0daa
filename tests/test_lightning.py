"""rigl_fast.integrations.lightning.RigLCallback with the real Lightning Trainer (CPU, small CNN): the run
equals the plain in_step loop, accumulate_grad_batches gives one pruner step per optimizer step, a fit
resumed from a ModelCheckpoint checkpoint equals the uninterrupted one, metrics reach the logger, bad
arguments fail in __init__, and `import rigl_fast` never imports Lightning."""
import copy
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from helpers import BAD_SCHEDULER_KEYWORDS, SmallResNet, batches  # noqa: E402
from rigl_fast import RigLScheduler  # noqa: E402
from rigl_fast.integrations.lightning import RigLCallback  # noqa: E402
from rigl_fast.state import masks as sd_masks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(dense_allocation=0.3, delta=3, alpha=0.4, grad_accumulation_n=2)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Trainer(deterministic=True) and seed_everything change process-wide settings; other tests must not
    inherit them."""
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")}
    rng = torch.random.get_rng_state()
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch.random.set_rng_state(rng)


class LitNet(pl.LightningModule):
    def __init__(self, n_optimizers=1):
        super().__init__()
        self.net = SmallResNet()
        self.n_optimizers = n_optimizers
        self.automatic_optimization = n_optimizers == 1

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.n_optimizers == 1:
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return [torch.optim.Adam(self.net.parameters(), lr=1e-2) for _ in range(self.n_optimizers)]


def _data(n_batches):
    xs, ys = zip(*batches(n_batches))
    return torch.cat(xs), torch.cat(ys)


def _loader(n_batches):
    ds = torch.utils.data.TensorDataset(*_data(n_batches))
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)


class Recorder(pl.Callback):
    """Placed after RigLCallback: what the run started from."""

    def __init__(self, rigl):
        self.rigl = rigl

    def on_train_start(self, trainer, pl_module):
        self.model0 = copy.deepcopy(pl_module.net.state_dict())
        self.pruner0 = copy.deepcopy(self.rigl.pruner.state_dict())


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                      deterministic=True, default_root_dir=tmp_path, callbacks=callbacks, **kw)


def _fit(tmp_path, n_batches, rigl_kwargs=CFG, ckpt_path=None, extra_callbacks=(), **trainer_kw):
    pl.seed_everything(0, verbose=False)
    model = LitNet()
    cb = RigLCallback(**rigl_kwargs)
    rec = Recorder(cb)
    trainer = _trainer(tmp_path, [cb, rec, *extra_callbacks], **trainer_kw)
    trainer.fit(model, _loader(n_batches), ckpt_path=ckpt_path)
    return model, cb, rec, trainer


def _assert_invariants(pruner):
    opt = pruner._optimizer
    assert any(m is not None for m in pruner.backward_masks)
    for w, m in zip(pruner.W, pruner.backward_masks):
        if m is None:
            continue
        assert int(m.sum()) < m.numel()
        assert bool((w[~m] == 0).all())
        if w.grad is not None:
            assert bool((w.grad[~m] == 0).all())
        states = [v for v in opt.state[w].values() if isinstance(v, torch.Tensor) and v.shape == w.shape]
        assert len(states) == 2  # Adam's exp_avg and exp_avg_sq
        assert all(bool((v[~m] == 0).all()) for v in states)


def _plain_in_step_loop(rec, n_batches, accumulate):
    """The same run without Lightning: in_step=True, `optimizer.step()` every `accumulate` batches."""
    model = SmallResNet()
    model.load_state_dict(rec.model0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, state_dict=rec.pruner0, in_step=True)
    for i, (x, y) in enumerate(batches(n_batches)):
        if i % accumulate == 0:
            opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss / accumulate if accumulate > 1 else loss).backward()
        if i % accumulate == accumulate - 1:
            opt.step()
    return model, pruner


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_runs_updates_and_equals_the_plain_in_step_loop(tmp_path, accumulate):
    n_steps = 12
    model, cb, rec, trainer = _fit(tmp_path, n_steps * accumulate, max_steps=n_steps,
                                   accumulate_grad_batches=accumulate)
    pruner = cb.pruner
    assert pruner.in_step and pruner.T_end == int(0.75 * n_steps) == 9  # the default: 75% of the run
    assert pruner.step == trainer.global_step == n_steps  # one pruner step per optimizer step
    assert pruner.rigl_steps == 2 and pruner.skipped_updates == 0  # updates at steps 3 and 6
    masks0 = sd_masks(rec.pruner0)
    changed = [not torch.equal(a, b) for a, b in zip(masks0, pruner.backward_masks) if b is not None]
    assert changed and all(changed), "an update moved no weight"
    _assert_invariants(pruner)

    ref_model, ref_pruner = _plain_in_step_loop(rec, n_steps * accumulate, accumulate)
    assert ref_pruner.step == n_steps and ref_pruner.rigl_steps == 2
    assert all(m is None and r is None or torch.equal(m, r)
               for m, r in zip(pruner.backward_masks, ref_pruner.backward_masks))
    for (k, v), (k2, v2) in zip(model.net.state_dict().items(), ref_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_resume_from_a_model_checkpoint_equals_the_uninterrupted_fit(tmp_path):
    # 5 optimizer steps per epoch; the epoch-1 checkpoint (step 5) falls inside the dense-gradient window of
    # the update at step 6 (delta=3, grad_accumulation_n=2), so the window's half-accumulated gradient rides along.
    n_batches, epochs = 5, 4
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1,
                                        filename="{epoch}")
    full_model, full_cb, _, full_trainer = _fit(tmp_path / "full", n_batches, max_epochs=epochs,
                                                enable_checkpointing=True, extra_callbacks=[ckpt])
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=False)["callbacks"]["RigLCallback"]["pruner"]
    assert saved["step"] == 5 and saved["rigl_steps"] == 1
    assert any(g is not None for g in saved["rigl_fast_dense_grads"]), "not saved inside a window"
    assert full_cb.pruner.step == full_trainer.global_step == 20 and full_cb.pruner.rigl_steps == 4

    # another seed: the checkpoint, not the seed, must decide the weights and the masks
    pl.seed_everything(1, verbose=False)
    model, cb = LitNet(), RigLCallback(**CFG)
    ckpt2 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1,
                                         filename="{epoch}")
    trainer = _trainer(tmp_path / "resumed", [cb, ckpt2], max_epochs=epochs, enable_checkpointing=True)
    trainer.fit(model, _loader(n_batches), ckpt_path=path)
    assert cb.pruner.step == trainer.global_step == 20 and cb.pruner.rigl_steps == 4
    assert cb.pruner.T_end == full_cb.pruner.T_end == 15
    for m, r in zip(cb.pruner.backward_masks, full_cb.pruner.backward_masks):
        assert m is None and r is None or torch.equal(m, r)
    for (k, v), (_, v2) in zip(model.state_dict().items(), full_model.state_dict().items()):
        assert torch.equal(v, v2), k
    opt, full_opt = trainer.optimizers[0], full_trainer.optimizers[0]
    for p, q in zip(model.parameters(), full_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], full_opt.state[q][key])
    _assert_invariants(cb.pruner)

    # the other order: state loaded into a callback whose scheduler already exists goes straight in
    full_cb.load_state_dict({"pruner": saved})
    assert full_cb.pruner.step == 5 and full_cb.state_dict()["pruner"]["step"] == 5
    assert all(a is None and b is None or torch.equal(a, b)
               for a, b in zip(full_cb.pruner.backward_masks, sd_masks(saved)))


def test_a_checkpoint_without_rigl_state_is_refused_and_the_loaded_weights_left_as_loaded(tmp_path):
    """fit(ckpt_path=...) from a checkpoint saved without RigLCallback raises (as the HF callback refuses a folder
    without its state file) instead of restarting the schedule with new masks over the trained weights; so does
    one whose RigL state does not fit. Lightning has loaded the checkpoint's weights before any callback sees it:
    they stay as loaded (a live scheduler's masks are not applied to them), the live scheduler is unhooked and
    dropped, and the next fit raises until one resumes from a checkpoint with a valid RigL state."""
    pl.seed_everything(0, verbose=False)
    dense = _trainer(tmp_path / "dense", [], max_steps=2)
    dense.fit(LitNet(), _loader(2))
    dense.save_checkpoint(tmp_path / "dense.ckpt")
    msg = "holds no RigLCallback state"
    fresh = RigLCallback(**CFG)
    with pytest.raises(ValueError, match=msg):
        _trainer(tmp_path / "a", [fresh], max_steps=4).fit(LitNet(), _loader(4), ckpt_path=tmp_path / "dense.ckpt")
    # no scheduler and no RigL state: nothing to mix, a fit without ckpt_path may start RigL on these weights
    assert fresh.pruner is None and getattr(fresh, "failed_checkpoint", None) is None
    # validate (and test) load only the weights: no RigL state needed there

    class Val(LitNet):
        def validation_step(self, batch, batch_idx):
            return self.training_step(batch, batch_idx)

    _trainer(tmp_path / "v", [RigLCallback(**CFG)]).validate(Val(), _loader(1), ckpt_path=tmp_path / "dense.ckpt",
                                                            verbose=False)

    model, cb, _, trainer = _fit(tmp_path / "live", 4, rigl_kwargs=dict(CFG, T_end=7), max_steps=4)
    trainer.save_checkpoint(tmp_path / "rigl.ckpt")
    ck = torch.load(tmp_path / "rigl.ckpt", weights_only=False)
    ck["callbacks"]["RigLCallback"]["pruner"]["N"] = [n + 1 for n in ck["callbacks"]["RigLCallback"]["pruner"]["N"]]
    torch.save(ck, tmp_path / "bad.ckpt")
    del ck["callbacks"]  # Lightning then calls no callback's on_load_checkpoint: caught when training starts
    torch.save(ck, tmp_path / "nocallbacks.ckpt")
    for path, match in (("dense.ckpt", msg), ("bad.ckpt", "does not fit the model"), ("nocallbacks.ckpt", msg)):
        if cb.pruner is None:  # dropped by the last failure: a valid resume brings a live scheduler back
            trainer.fit_loop.epoch_loop.max_steps = 6
            trainer.fit(model, _loader(8), ckpt_path=tmp_path / "rigl.ckpt")
        live = cb.pruner
        assert live._handles and live.step >= 4
        weights = torch.load(tmp_path / path, weights_only=False)["state_dict"]
        trainer.fit_loop.epoch_loop.max_steps = 8
        with pytest.raises(ValueError, match=match) as e:
            trainer.fit(model, _loader(8), ckpt_path=tmp_path / path)
        now = model.state_dict()
        assert now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items()), path
        assert "Lightning had already loaded the model weights" in str(e.value)
        assert cb.pruner is None and not live._handles and cb.failed_checkpoint == str(tmp_path / path)
        with pytest.raises(RuntimeError, match="valid RigL state") as e:
            trainer.fit(model, _loader(8))
        assert str(tmp_path / path) in str(e.value) and cb.pruner is None
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_metrics_are_logged(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="logs")
    _, cb, _, trainer = _fit(tmp_path, 6, rigl_kwargs=dict(CFG, T_end=5), max_steps=6, logger=logger,
                             log_every_n_steps=1)
    stats = cb.pruner.stats()
    logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
    for k in ("density", "regrown_fraction", "updates", "skipped_updates"):
        assert logged[f"rigl/{k}"] == pytest.approx(stats[k])
    assert not any(k.startswith(("rigl/density/", "rigl/regrown/")) for k in logged), "per-layer by default"
    assert 0 < logged["rigl/density"] < 1 and logged["rigl/updates"] == 1 and logged["rigl/regrown_fraction"] > 0
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r.get("rigl/density")]) == 6


def test_fit_called_again_continues_the_schedule_on_the_new_optimizer(tmp_path):
    model, cb, _, trainer = _fit(tmp_path, 8, rigl_kwargs=dict(CFG, T_end=7), max_steps=4)
    first = cb.pruner
    assert first.step == 4 and first.rigl_steps == 1
    masks = [None if m is None else m.clone() for m in first.backward_masks]
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(model, _loader(8))  # configure_optimizers runs again: a new optimizer to hook
    assert cb.pruner is not first and not first._handles and cb.pruner._optimizer is trainer.optimizers[0]
    assert cb.pruner.step == trainer.global_step == 8 and cb.pruner.rigl_steps == 2 and cb.pruner.T_end == 7
    assert any(m is not None and not torch.equal(m, r) for m, r in zip(masks, cb.pruner.backward_masks))
    _assert_invariants(cb.pruner)
    # a fit that loads no checkpoint and cannot build its scheduler (the new optimizer lacks the sparse weights)
    # raises with the live scheduler kept, hooked, and the weights it describes untouched
    live, weights = cb.pruner, copy.deepcopy(model.state_dict())
    model.configure_optimizers = lambda: torch.optim.Adam([p for n, p in model.named_parameters() if "bias" in n])
    trainer.fit_loop.epoch_loop.max_steps = 12
    with pytest.raises(ValueError, match="optimizer"):
        trainer.fit(model, _loader(8))
    assert cb.pruner is not live and cb.pruner._handles and not live._handles and cb.pruner.step == 8
    assert all(torch.equal(m, r) for m, r in zip(cb.pruner.backward_masks, live.backward_masks) if m is not None)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert getattr(cb, "failed_checkpoint", None) is None


def test_bad_arguments_fail_in_init_and_two_optimizers_at_fit(tmp_path):
    with pytest.raises(TypeError, match="dense_alocation"):
        RigLCallback(dense_alocation=0.1)
    with pytest.raises(ValueError, match="delta"):
        RigLCallback(dense_allocation=0.1, delta=1)
    with pytest.raises(ValueError, match="grad_accumulation_n"):
        RigLCallback(dense_allocation=0.1, delta=4, grad_accumulation_n=4)
    with pytest.raises(ValueError, match="dense_allocation"):
        RigLCallback(dense_allocation=0)
    with pytest.raises(ValueError, match="backend"):
        RigLCallback(dense_allocation=0.1, backend="gpu")
    for own in ("in_step", "state_dict", "optimizer"):
        with pytest.raises(TypeError, match=own):
            RigLCallback(dense_allocation=0.1, **{own: None})
    # every argument RigLScheduler checks without a model is checked here, by the same code (config.py)
    for kw, err, name in BAD_SCHEDULER_KEYWORDS:
        with pytest.raises(err, match=name):
            RigLCallback(**{"dense_allocation": 0.1, **kw})
    with pytest.raises(TypeError, match="log_per_layer"):
        RigLCallback(dense_allocation=0.1, log_per_layer="yes")
    cb = RigLCallback(dense_allocation=0.1)  # T_end may be left out: it comes from the Trainer
    assert cb.pruner is None and cb.state_dict() == {}

    pl.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, [RigLCallback(**CFG)], max_steps=2)
    with pytest.raises(ValueError, match="exactly one optimizer"):
        trainer.fit(LitNet(n_optimizers=2), _loader(2))


def test_import_rigl_fast_does_not_import_lightning_and_missing_lightning_says_what_to_install():
    code = (
        "import sys\n"
        "import rigl_fast\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules), sys.modules\n"
        "sys.modules['lightning'] = sys.modules['lightning.pytorch'] = sys.modules['pytorch_lightning'] = None\n"
        "try:\n"
        "    import rigl_fast.integrations.lightning\n"
        "except ImportError as e:\n"
        "    assert 'pip install lightning' in str(e), e\n"
        "    print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_example_script_runs(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "lightning_cnn.py"), "--epochs", "2",
                        "--limit-batches", "4", "--delta", "2", "--root", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "density" in r.stdout and "updates 2" in r.stdout, r.stdout


def test_compute_sparse_through_the_callback(tmp_path):
    """RigLCallback(compute="sparse") under Lightning: the Linear head computes sparsely, the convolutions densely
    (summary() says so), the updates run and the invariants hold."""
    model, cb, rec, trainer = _fit(tmp_path, 8, rigl_kwargs={**CFG, "compute": "sparse", "ignore_linear_layers": False},
                                   max_steps=8)
    pruner = cb.pruner
    assert pruner.rigl_steps == 1 and pruner.skipped_updates == 0  # T_end = 6: the update at step 3
    assert "forward" in vars(model.net.fc) and not any("forward" in vars(m) for m in model.net.modules()
                                                       if isinstance(m, torch.nn.Conv2d))
    s = pruner.summary()
    assert "sparse compute (compressed rows)" in s and "dense compute: convolution" in s
    _assert_invariants(pruner)
