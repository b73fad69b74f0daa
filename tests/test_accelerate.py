"""Accelerate (real package, CPU): a model and optimizer from `accelerator.prepare` in a plain loop, in both
modes: the two-line `if pruner(): optimizer.step()` and `in_step=True` with `optimizer.step()` every
iteration, with and without `Accelerator(gradient_accumulation_steps=2)` + `accelerator.accumulate(model)`.
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
