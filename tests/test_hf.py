"""rigl_fast.integrations.hf.RigLCallback with the real transformers Trainer on a tiny GPT-2 (built from a config,
never downloaded): updates run and move masks, the invariants hold after training, the tied embedding stays
dense, a resumed run equals the uninterrupted one bit for bit, one pruner step per optimizer step under the
Trainer's gradient accumulation, the logs carry the rigl/ entries, bad arguments fail early, and transformers
is imported only by the integration's own module."""
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from rigl_fast.integrations.hf import STATE_FILE, RigLCallback, _resume_folder  # noqa: E402
from rigl_fast.state import masks as sd_masks  # noqa: E402
from helpers import BAD_SCHEDULER_KEYWORDS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CB = dict(dense_allocation=0.3, delta=3, alpha=0.3, ignore_linear_layers=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # a model this small runs 10-20x slower on 2 threads when the machine is shared (threads spin and wait)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=48, seq=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


class _Recorder(TrainerCallback):
    """What a reporter sees in on_log, and the masks the first optimizer step starts from."""

    def __init__(self, rigl):
        self.rigl, self.logs, self.first_masks = rigl, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_masks is None:
            self.first_masks = [None if m is None else m.clone() for m in self.rigl.pruner.backward_masks]

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(out, max_steps=12, save_steps=5, gas=1, resume=None, targs=None, **cb_kw):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    rigl = RigLCallback(**{**CB, **cb_kw})
    rec = _Recorder(rigl)
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps,
                             save_steps=save_steps, per_device_train_batch_size=4, logging_steps=2, seed=0,
                             dataloader_num_workers=0, gradient_accumulation_steps=gas, learning_rate=1e-2,
                             disable_tqdm=True, **(targs or {}))
    # the recorder first, as the Trainer's own reporters are: RigLCallback must still reach it with its entries
    trainer = Trainer(model=model, args=args, train_dataset=_data(), callbacks=[rec, rigl])
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer, rigl, rec


def _sparse(pruner):
    return [(w, m) for w, m in zip(pruner.W, pruner.backward_masks) if m is not None]


def test_trainer_runs_updates_keeps_invariants_and_the_tied_embedding(tmp_path):
    trainer, rigl, rec = _train(tmp_path, grad_accumulation_n=2)
    p = rigl.pruner
    assert p.in_step and p.step == trainer.state.global_step == 12
    assert p.T_end == int(0.75 * 12) and p.rigl_steps == 2  # updates at steps 3 and 6 (none at or after T_end)
    assert any(not torch.equal(a, m) for a, (_, m) in zip([m for m in rec.first_masks if m is not None],
                                                         _sparse(p))), "no mask changed"
    opt = p._optimizer
    assert len(_sparse(p)) == 7 and p.backward_masks[0] is None  # uniform keeps the first layer dense
    for w, m in _sparse(p):
        assert bool((w[~m] == 0).all())
        states = [v for v in opt.state[w].values() if torch.is_tensor(v) and v.shape == w.shape]
        assert len(states) == 2 and all(bool((v[~m] == 0).all()) for v in states)  # AdamW's exp_avg(_sq)
        assert 0 < int((w[m] != 0).sum())
    wte = trainer.model.transformer.wte.weight
    assert trainer.model.lm_head.weight is wte and all(w is not wte for w in p.W)
    assert [s.reason for s in p.skipped_layers if s.name == "lm_head.weight"][0].startswith("tied")
    assert bool((wte != 0).all())
    assert os.path.isfile(tmp_path / "checkpoint-5" / STATE_FILE)


def test_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(tmp_path):
    # grad_accumulation_n=2, delta=3: the checkpoint at step 5 lies inside the window before the update at step
    # 6, so the saved state carries a dense-gradient accumulator too
    full, rigl_full, _ = _train(tmp_path / "full", grad_accumulation_n=2)
    saved = torch.load(tmp_path / "full" / "checkpoint-5" / STATE_FILE, weights_only=True)
    assert saved["global_step"] == 5 and saved["pruner"]["step"] == 5
    assert any(a is not None for a in saved["pruner"]["rigl_fast_dense_grads"])
    # resume from a copy elsewhere: the callback must read the folder the Trainer resumes, not guess it
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "full" / "checkpoint-5", moved)
    resumed, rigl_res, _ = _train(tmp_path / "resumed", resume=moved, grad_accumulation_n=2)
    assert rigl_res.resumed_from == str(moved) and rigl_full.resumed_from is None
    a, b = rigl_full.pruner, rigl_res.pruner
    assert b.step == a.step == 12 and b.rigl_steps == a.rigl_steps == 2
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a.backward_masks, b.backward_masks))
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    # the logged rigl/ curve continues as if never stopped (the last update's regrown fraction included)
    rigl_logs = [[{k: v for k, v in h.items() if k.startswith("rigl/") or k == "step"}
                  for h in t.state.log_history if "loss" in h] for t in (full, resumed)]
    assert rigl_logs[0] == rigl_logs[1] and len(rigl_logs[0]) == 6 and rigl_logs[0][-1]["rigl/regrown_fraction"] > 0


def test_resume_without_rigl_state_is_refused(tmp_path):
    _train(tmp_path / "run", max_steps=6)
    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "run" / "checkpoint-5", bare)
    os.remove(bare / STATE_FILE)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        _train(tmp_path / "again", max_steps=8, resume=bare)

    class _State:  # no Trainer frame to read: a resumed TrainerState (step > 0) names output_dir/checkpoint-N
        global_step = 7

    class _Args:
        output_dir = str(tmp_path)

    assert _resume_folder(_Args, _State) == os.path.join(str(tmp_path), "checkpoint-7")
    _State.global_step = 0
    assert _resume_folder(_Args, _State) is None


def test_a_failed_resume_leaves_the_loaded_weights_and_stops_the_callback(tmp_path):
    """A resume that fails (the folder has no RigL state, or one that does not fit the model) raises. The Trainer
    has loaded the folder's weights and optimizer state before on_train_begin, so they stay as loaded (the earlier
    scheduler's masks are not applied to them), that scheduler is unhooked and dropped, the error says so, and
    the next train() raises instead of training the checkpoint's weights under another step's masks (or drawing
    new ones over them), until a resume from a folder with a valid RigL state."""
    trainer, rigl, rec = _train(tmp_path / "run", max_steps=6)
    ck5 = tmp_path / "run" / "checkpoint-5"
    saved = load_file(ck5 / "model.safetensors")
    bare, bad = tmp_path / "bare", tmp_path / "bad"
    for folder in (bare, bad):
        shutil.copytree(ck5, folder)
    os.remove(bare / STATE_FILE)
    blob = torch.load(bad / STATE_FILE, weights_only=True)
    blob["pruner"]["N"] = [n + 1 for n in blob["pruner"]["N"]]
    torch.save(blob, bad / STATE_FILE)
    model = trainer.model
    for folder, err, match in ((bare, FileNotFoundError, STATE_FILE), (bad, ValueError, "does not fit the model")):
        if rigl.pruner is None:  # the first failure dropped it: a valid resume brings a live scheduler back
            trainer.train(resume_from_checkpoint=str(ck5))
        old = rigl.pruner
        assert old is not None and old._handles and old.step == 6
        with pytest.raises(err, match=match) as e:
            trainer.train(resume_from_checkpoint=str(folder))
        now = model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in saved.items())  # checkpoint-5's weights, none zeroed
        assert "had already loaded the model weights and the optimizer state" in str(e.value)
        assert rigl.pruner is None and not old._handles and rigl.failed_checkpoint == str(folder)
        with pytest.raises(RuntimeError, match="valid RigL state") as e:
            trainer.train()
        assert str(folder) in str(e.value) and rigl.pruner is None
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    # a valid resume makes the callback work again, from the checkpoint's own masks
    rec.first_masks = None
    trainer.train(resume_from_checkpoint=str(ck5))
    ck_masks = sd_masks(torch.load(ck5 / STATE_FILE, weights_only=True)["pruner"])
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(rec.first_masks, ck_masks))
    assert rigl.failed_checkpoint is None and rigl.pruner.step == 6 and rigl.resumed_from == str(ck5)


def test_save_only_model_keeps_the_masks_not_the_accumulator(tmp_path):
    # a model-only checkpoint cannot resume training; it keeps what the weights do not tell (grown weights are 0)
    _, rigl, _ = _train(tmp_path, max_steps=5, targs=dict(save_only_model=True), grad_accumulation_n=2,
                        T_end=9)
    assert not os.path.exists(tmp_path / "checkpoint-5" / "optimizer.pt")
    saved = torch.load(tmp_path / "checkpoint-5" / STATE_FILE, weights_only=True)["pruner"]
    assert saved["rigl_fast_dense_grads"] == [None] * len(rigl.pruner.W)
    assert any(h.dense_grad is not None for h in rigl.pruner.backward_hook_objects)  # inside the window
    assert all((a is None and b is None) or torch.equal(a, b)
               for a, b in zip(sd_masks(saved), rigl.pruner.backward_masks))


def test_train_called_again_keeps_the_masks_and_continues_the_schedule(tmp_path):
    trainer, rigl, rec = _train(tmp_path, max_steps=6, save_steps=100)
    first, end = rigl.pruner, [None if m is None else m.clone() for m in rigl.pruner.backward_masks]
    rec.first_masks = None
    trainer.train()
    assert rigl.pruner is not first and not first._handles  # rebuilt on the new optimizer, the old hooks gone
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(rec.first_masks, end))
    assert rigl.pruner.step == 12 and rigl.pruner.T_end == 4 and rigl.pruner.optimizer is trainer.optimizer


def test_gradient_accumulation_one_pruner_step_per_optimizer_step(tmp_path):
    trainer, rigl, _ = _train(tmp_path, max_steps=6, save_steps=100, gas=2, delta=2)
    assert trainer.state.global_step == rigl.pruner.step == 6
    assert rigl.pruner.T_end == 4 and rigl.pruner.rigl_steps == 1  # one update, at step 2


def test_logs_carry_the_rigl_entries(tmp_path):
    trainer, rigl, rec = _train(tmp_path, max_steps=6, save_steps=100, log_per_layer=True)
    keys = {"rigl/density", "rigl/regrown_fraction", "rigl/updates", "rigl/skipped_updates"}
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3 and all(keys <= h.keys() for h in train_logs)
    assert [h["rigl/updates"] for h in train_logs] == [0, 1, 1]  # logged at steps 2, 4, 6; the update at 3
    assert train_logs[0]["rigl/regrown_fraction"] == 0.0 < train_logs[1]["rigl/regrown_fraction"] < 0.3
    st = rigl.pruner.stats()
    assert train_logs[-1]["rigl/density"] == st["density"] and 0.2 < st["density"] < 0.5
    assert train_logs[-1]["rigl/density/transformer.h.0.mlp.c_fc.weight"] == st["density/transformer.h.0.mlp.c_fc.weight"]
    # a callback listed before RigLCallback (as the Trainer's reporters are) sees the entries too
    seen = [h for h in rec.logs if "loss" in h]
    assert len(seen) == 3 and all(keys <= h.keys() for h in seen)
    assert all(isinstance(v, (int, float)) for h in seen for k, v in h.items() if k.startswith("rigl/"))


def test_bad_arguments_fail_at_construction():
    with pytest.raises(TypeError, match="dense_alloc"):
        RigLCallback(dense_alloc=0.1)
    for owned in ("in_step", "state_dict", "optimizer"):
        with pytest.raises(TypeError, match=owned):
            RigLCallback(**{owned: None})
    with pytest.raises(ValueError, match="delta"):
        RigLCallback(dense_allocation=0.1, delta=1)
    with pytest.raises(ValueError, match="dense_allocation"):
        RigLCallback(dense_allocation=1.5)
    with pytest.raises(ValueError, match="backend"):
        RigLCallback(backend="cuda")
    with pytest.raises(ValueError, match="after_step"):
        RigLCallback(after_step="never")
    # every argument RigLScheduler checks without a model is checked here, by the same code (config.py)
    for kw, err, name in BAD_SCHEDULER_KEYWORDS + [(dict(in_step=True), TypeError, "in_step")]:
        with pytest.raises(err, match=name):
            RigLCallback(**{"dense_allocation": 0.1, **kw})
    RigLCallback(dense_allocation=0.1, T_end=100, sparsity_distribution="erk")  # a good one builds
    RigLCallback(dense_allocation=0.5, structure="2:4", sharded_init="local", exclude=["lm_head"])


ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=120)


def test_import_rigl_fast_never_imports_transformers():
    r = _python("import sys, rigl_fast, rigl_fast.integrations; "
                "assert 'transformers' not in sys.modules, 'transformers imported'; print('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    # without transformers the integration's import says what to install
    r = _python("import sys; sys.modules['transformers'] = None\n"
                "try:\n    from rigl_fast.integrations.hf import RigLCallback\n"
                "except ImportError as e:\n    print('ImportError:', e)\n")
    assert "ImportError:" in r.stdout and "pip install transformers" in r.stdout, r.stdout + r.stderr


DDP_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from rigl_fast.integrations.hf import RigLCallback
    torch.set_num_threads(1)
    out = sys.argv[1]
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": r, "labels": r.clone()} for r in torch.randint(0, 64, (64, 16), generator=g)]

    def run(folder, resume=None):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                           bos_token_id=0, eos_token_id=0))
        cb = RigLCallback(dense_allocation=0.3, delta=3, alpha=0.3, ignore_linear_layers=False, grad_accumulation_n=2)
        args = TrainingArguments(output_dir=folder, use_cpu=True, report_to=[], max_steps=12, save_steps=5,
                                 per_device_train_batch_size=4, logging_steps=4, seed=0, dataloader_num_workers=0,
                                 learning_rate=1e-2, disable_tqdm=True, gradient_accumulation_steps=2)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        p = cb.pruner
        return {"masks": p.backward_masks, "model": trainer.model.state_dict(), "step": p.step,
                "rigl_steps": p.rigl_steps, "resumed_from": cb.resumed_from}

    full = run(out + "/full")
    resumed = run(out + "/resumed", resume=out + "/full/checkpoint-5")
    torch.save({"full": full, "resumed": resumed, "world": dist.get_world_size()},
               out + "/rank%d.pt" % dist.get_rank())
    # gloo's worker threads still hold work at interpreter exit unless the group is destroyed first: without this
    # a rank can abort at exit ("terminate called without an active exception", SIGABRT) after a correct run; and
    # even after it, now and then (helpers.py: exit_spawned_rank), so the rank ends without finalization
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    import os
    os._exit(0)
""")


def test_ddp_two_processes_agree_and_resume_exactly(tmp_path):
    # the Trainer under torchrun on CPU (gloo): masks broadcast at the start, rank 0 writes the state, every
    # rank resumes it (inside an accumulation window at step 5) and the ranks end equal to the uninterrupted run
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(tmp_path / "worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, "GLOO_SOCKET_IFNAME": "lo"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert all(x["world"] == 2 for x in ranks)
    runs = [x[k] for x in ranks for k in ("full", "resumed")]
    assert runs[1]["resumed_from"] == str(tmp_path / "full" / "checkpoint-5")
    for other in runs[1:]:
        assert other["step"] == 12 and other["rigl_steps"] == runs[0]["rigl_steps"] == 2
        assert all((a is None and b is None) or torch.equal(a, b)
                   for a, b in zip(runs[0]["masks"], other["masks"]))
        assert all(torch.equal(runs[0]["model"][k], other["model"][k]) for k in runs[0]["model"])


def test_example_script_runs(tmp_path):
    # 8 steps: T_end = 6, so with delta=3 one update (at step 3)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "hf_causal_lm.py"), "--max-steps", "8",
                        "--delta", "3", "--save-steps", "4", "--logging-steps", "4", "--cpu",
                        "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       env=ENV, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done: 8 optimizer steps, 1 topology updates (0 skipped), density 0.1000" in r.stdout, r.stdout[-3000:]
    assert os.path.isfile(tmp_path / "checkpoint-4" / STATE_FILE)


def test_compute_sparse_through_the_callback(tmp_path):
    """RigLCallback(compute="sparse"): the Conv1D projections compute sparsely in the Trainer, the updates run and
    the invariants hold; the same run computing densely ends within fp32 rounding when no mask differs."""
    trainer, rigl, _ = _train(tmp_path / "s", max_steps=6, compute="sparse")
    p = rigl.pruner
    sparse_modules = [m for m in trainer.model.modules() if "forward" in vars(m)]
    assert len(sparse_modules) == len(_sparse(p)) == 7 and p.rigl_steps == 1
    assert p.summary().count("sparse compute (compressed rows)") == 7
    for w, m in _sparse(p):
        assert bool((w[~m] == 0).all())
    dense_trainer, dense_rigl, _ = _train(tmp_path / "d", max_steps=6)
    if all(torch.equal(a, b) for (_, a), (_, b) in zip(_sparse(p), _sparse(dense_rigl.pruner))):
        for a, b in zip(trainer.model.parameters(), dense_trainer.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
