"""Accelerate (real package, CPU): a model and optimizer from `accelerator.prepare` in a plain loop, in both
modes: the two-line `if pruner(): optimizer.step()` and `in_step=True` with `optimizer.step()` every
iteration, with and without `Accelerator(gradient_accumulation_steps=2)` + `accelerator.accumulate(model)`;
and a pruner registered for checkpointing resumes through save_state/load_state.
Each run equals the same loop written without Accelerate, bit for bit, and takes one pruner step per real
optimizer step."""
import pytest
import torch
import torch.nn.functional as F

accelerate = pytest.importorskip("accelerate")

from helpers import SmallResNet, batches  # noqa: E402
from rigl_fast import RigLScheduler  # noqa: E402

CFG = dict(dense_allocation=0.3, T_end=9, delta=3, alpha=0.4, grad_accumulation_n=2)
N_STEPS = 12  # optimizer steps; updates at steps 3 and 6


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerator's state is shared by every instance in a process: each test starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _model_and_opt():
    torch.manual_seed(0)
    model = SmallResNet()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _accelerate_run(in_step, accum):
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model, opt = _model_and_opt()
    model, opt = accelerator.prepare(model, opt)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    pruner = RigLScheduler(model, opt, **CFG, in_step=in_step)
    real_steps = []  # pruner.step after each real optimizer step (this hook runs after the pruner's)
    opt.optimizer.register_step_post_hook(lambda *a: real_steps.append(pruner.step))
    masks0 = [None if m is None else m.clone() for m in pruner.backward_masks]
    for x, y in batches(N_STEPS * accum):
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            if in_step:
                opt.step()  # a no-op inside the accumulation window; the update follows a real step
            elif accelerator.sync_gradients and pruner():  # pruner() once per real step
                opt.step()
            opt.zero_grad()
    return model, pruner, masks0, real_steps


def _plain_run(in_step, accum):
    """The same loop without Accelerate: micro-batch accumulation by hand, loss divided as Accelerate does."""
    model, opt = _model_and_opt()
    pruner = RigLScheduler(model, opt, **CFG, in_step=in_step)
    data = list(batches(N_STEPS * accum))
    for i in range(0, len(data), accum):
        for x, y in data[i:i + accum]:
            (F.cross_entropy(model(x), y) / accum).backward()
        if in_step or pruner():
            opt.step()
        opt.zero_grad()
    return model, pruner


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("in_step", [False, True], ids=["two_line", "in_step"])
def test_prepared_model_and_optimizer_train_sparse_like_the_plain_loop(in_step, accum):
    model, pruner, masks0, real_steps = _accelerate_run(in_step, accum)
    assert pruner.step == N_STEPS and pruner.rigl_steps == 2 and pruner.skipped_updates == 0
    if in_step:  # every real optimizer step is a pruner step, the update runs after steps 3 and 6
        assert real_steps == list(range(1, N_STEPS + 1))
    else:  # the update replaces the optimizer step at steps 3 and 6
        assert real_steps == [s for s in range(1, N_STEPS + 1) if s not in (3, 6)]
    changed = [not torch.equal(a, b) for a, b in zip(masks0, pruner.backward_masks) if b is not None]
    assert changed and all(changed), "an update moved no weight"

    opt = pruner._optimizer
    for w, m in zip(pruner.W, pruner.backward_masks):
        if m is None:
            continue
        assert bool((w[~m] == 0).all()) and int(m.sum()) < m.numel()
        assert bool((opt.state[w]["momentum_buffer"][~m] == 0).all())
        if w.grad is not None:
            assert bool((w.grad[~m] == 0).all())

    ref_model, ref_pruner = _plain_run(in_step, accum)
    assert ref_pruner.step == pruner.step and ref_pruner.rigl_steps == pruner.rigl_steps
    for m, r in zip(pruner.backward_masks, ref_pruner.backward_masks):
        assert m is None and r is None or torch.equal(m, r)
    unwrapped = getattr(model, "module", model)
    for (k, v), (_, v2) in zip(unwrapped.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(v, v2), k


def test_save_state_and_load_state_resume_bit_for_bit_inside_a_window(tmp_path):
    """`accelerator.register_for_checkpointing(pruner)`: the pruner's state goes with save_state/load_state.
    Saved after real step 5, inside the dense-gradient window of the update at step 6."""
    def run(data, ckpt_save=None, ckpt_load=None):
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        model, opt = _model_and_opt()
        model, opt = accelerator.prepare(model, opt)
        pruner = RigLScheduler(model, opt, **CFG, in_step=True)
        accelerator.register_for_checkpointing(pruner)
        if ckpt_load is not None:
            accelerator.load_state(ckpt_load)
        for i, (x, y) in enumerate(data):
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
            if ckpt_save is not None and i == 9:
                assert pruner.step == 5 and any(h.dense_grad is not None for h in pruner.backward_hook_objects)
                accelerator.save_state(ckpt_save)
        return model, pruner

    data = list(batches(2 * N_STEPS))
    full_model, full = run(data, ckpt_save=tmp_path / "ckpt")
    model, resumed = run(data[10:], ckpt_load=tmp_path / "ckpt")
    assert resumed.step == full.step == N_STEPS and resumed.rigl_steps == full.rigl_steps == 2
    for m, r in zip(resumed.backward_masks, full.backward_masks):
        assert m is None and r is None or torch.equal(m, r)
    for (k, v), (_, v2) in zip(model.state_dict().items(), full_model.state_dict().items()):
        assert torch.equal(v, v2), k
