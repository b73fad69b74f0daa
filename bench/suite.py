"""What is measured on each device, and the measuring loops (every loop interleaves its contenders)."""
from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import contenders as C
from . import contention, timing, weightsets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Plan:
    # (weight set, sparsity, dtype, rigl-torch's update repeats): the step-overhead and update measurements.
    # rigl-torch's update is slow (a full sort per layer plus, for every layer, a pass over all layers), so it
    # gets fewer repeats, or none (0) where one would take minutes.
    configs: List[Tuple[str, float, str, int]]
    step_repeats: int
    update_repeats: int
    # end-to-end: model, input side, batch, delta, blocks of delta steps per contender
    e2e: List[Tuple[str, int, int, int, int]]
    e2e_base: int
    # scaling sweep: numbers of 1024x1024 layers, plus the LLM layer; at one sparsity and dtype
    scaling_layers: List[int]
    scaling_extra: List[str]
    scaling_repeats: int
    scaling_rigl_torch_max_weights: int
    copy_bytes: int
    scaling_width: int = 1024
    # per-step repeats again under one competing process (bench/contention.py); 0: not measured
    loaded_step_repeats: int = 0
    notes: List[str] = field(default_factory=list)


def plan_for(device: torch.device, quick: bool) -> Plan:
    if quick:
        return Plan(configs=[("tiny-cnn", 0.9, "fp32", 2), ("tiny-mlp", 0.9, "fp32", 2),
                             ("tiny-mlp", 0.8, "bf16", 2)],
                    step_repeats=2, update_repeats=2, e2e=[("resnet18", 32, 4, 3, 2)], e2e_base=8,
                    scaling_layers=[1, 2, 4], scaling_extra=["tiny-mlp"], scaling_repeats=1,
                    scaling_rigl_torch_max_weights=10 ** 9, copy_bytes=16 << 20, scaling_width=128,
                    loaded_step_repeats=1,
                    notes=["--quick: tiny weight sets, a reduced-width ResNet-18 and 1-2 repeats; a smoke test, "
                           "not a measurement"])
    if device.type == "cuda":
        sets = ["resnet50", "gpt2-small", "llm-4096x11008"]
        configs = [(s, sp, dt, 3) for s in sets for dt in ("fp32", "bf16") for sp in (0.9, 0.8, 0.95)]
        configs += [("gpt-1.3b", 0.9, "fp32", 0), ("gpt-1.3b", 0.9, "bf16", 0)]
        return Plan(configs=configs, step_repeats=5, update_repeats=7,
                    e2e=[("resnet50", 224, 64, 100, 3), ("resnet18", 224, 128, 100, 3)], e2e_base=64,
                    scaling_layers=[1, 4, 16, 64, 128, 256, 512], scaling_extra=["llm-4096x11008"],
                    scaling_repeats=5, scaling_rigl_torch_max_weights=200_000_000, copy_bytes=2 << 30,
                    notes=["rigl-torch's update is not timed on gpt-1.3b: for every sparse layer it masks all "
                           "layers again (quadratic in the layer count), minutes per update at 104 layers"])
    return Plan(configs=[("resnet50", 0.9, "fp32", 2), ("gpt2-small", 0.9, "fp32", 0),
                         ("llm-4096x11008", 0.9, "fp32", 1), ("resnet50", 0.8, "fp32", 0),
                         ("resnet50", 0.95, "fp32", 0), ("resnet50", 0.9, "bf16", 1)],
                # per-step ops take milliseconds: 7 interleaved repeats keep their medians (and the
                # always/trusted ratio) steady on a shared 2-vCPU machine at little cost
                step_repeats=7, update_repeats=3, e2e=[("resnet18", 64, 16, 10, 3)], e2e_base=64,
                loaded_step_repeats=5,
                scaling_layers=[1, 4, 16, 64, 128], scaling_extra=[], scaling_repeats=1,
                scaling_rigl_torch_max_weights=5_000_000, copy_bytes=256 << 20,
                notes=["CPU set: rigl-torch's update is not timed on gpt2-small (tens of seconds per update: "
                       "its per-layer loop re-masks every layer) nor in the 80%/95% rows (its sort-based update "
                       "does not depend on the sparsity); the sparsity sweep and bf16 run on resnet50 only; end-to-end is ResNet-18 at 64x64 with delta=10 so that a few "
                       "updates fit in the time budget (delta=100 on a GPU)",
                       "rigl-torch's first update is not preceded by a warm-up call on CPU (each costs seconds "
                       "and its first call is not special); rigl_fast backends and sparsimony get one warm-up call"])


SPARSIMONY_NOTE = (
    "sparsimony 0.1.0 (torch.ao.pruning parametrizations): same weight sets, masks (loaded into its mask buffers "
    "through model.load_state_dict), sparsity, delta, alpha=0.3 cosine schedule and T_end as the rigl "
    "schedulers; init_method=None (no re-draw of the weights at prepare). Its per-step row is its "
    "parametrization's forward (mask * weight) and the backward through it with a dense gradient (the "
    "masked gradient and its backward hook's dense_grad = zeros_like(mask)), then its optimizer-step wrapper "
    "(momentum *= mask) around a no-op step, and sparsifier.step() off-update; its masks are float tensors of "
    "the weight dtype. Its update row is one sparsifier.step() that updates, with the dense gradient set in "
    "its dense_grad buffers. In the end-to-end rows the loop is optimizer.step(); sparsifier.step() every step")


def _rotate(xs, r):
    r %= max(1, len(xs))
    return xs[r:] + xs[:r]


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peers_available() -> List[str]:
    """The other libraries that import here: rigl-torch always (the bench needs it), sparsimony when installed."""
    return [C.RIGL_TORCH] + ([C.SPARSIMONY] if C.import_sparsimony() is not None else [])


def measure_config(set_name, sparsity, dtype_name, rt_reps, device, plan: Plan, backends, bw, log,
                   peers=(C.RIGL_TORCH,), notes=None) -> Tuple[list, list]:
    shapes = weightsets.WEIGHT_SETS[set_name]()
    dtype = DTYPES[dtype_name]
    b = torch.finfo(dtype).bits // 8
    masters = C.Masters(shapes, device, dtype)
    n_all = masters.n_weights
    # rigl_fast on every backend with its default after_step='always', then the same with the opt-in fast path
    # after_step='trusted' (per-step table only): the ratio of the two is the cost of the safe default
    names = (list(peers) + [C.fast_name(be) for be in backends]
             + [C.fast_name(be, C.FAST_PATH) for be in backends])
    log(f"  {set_name} {sparsity} {dtype_name}: {n_all / 1e6:.1f}M weights, contenders ready")
    cs = C.make_contenders(masters, names, sparsity)
    n_sparse = sum(weightsets.numel(shapes[i]) for i in cs[0].sparse)
    base = dict(set=set_name, sparsity=sparsity, dtype=dtype_name, n_weights=n_all, n_sparse=n_sparse)
    clock = timing.Clock(device)

    # ---- per-step overhead: gradient hooks + after-step pass, idempotent, so no restore between repeats
    masters.restore()
    for c in cs:
        c.grad_op(), c.after_step()  # warm-up (and first-touch of the hooks' output pages)
    bws = []
    samples, faults = _step_samples(cs, plan.step_repeats, clock, lambda: bws.append(bw.sample()))
    loaded = None
    if plan.loaded_step_repeats:  # the same under a competing process (the bandwidth is not sampled then)
        with contention.competing_process():
            loaded, _ = _step_samples(cs, plan.loaded_step_repeats, clock, lambda: None)
    floors = timing.step_floor_bytes(n_sparse, b)
    step_rows = []
    for c in cs:
        s = samples[c.name]
        # a contender that skips the after-step pass (after_step='trusted' with a zero-preserving optimizer) must
        # move only the gradient op's bytes: its floor leaves the after-step part out
        parts = dict(floors, after_step=0) if c.skips_after_step else floors
        step_rows.append(dict(base, contender=c.name, **{k: timing.stats(v) for k, v in s.items()},
                              **({} if loaded is None else
                                 {"loaded_" + k: timing.stats(v) for k, v in loaded[c.name].items()}),
                              skips_after_step=c.skips_after_step,
                              minor_faults_per_step=statistics.median(faults[c.name]),
                              floor_bytes=parts["grad_op"] + parts["after_step"], floor_parts_bytes=parts))
    log(f"  step  {set_name} {sparsity} {dtype_name}: " + ", ".join(
        f"{r['contender']} {r['total']['median'] * 1e3:.2f} ms" for r in step_rows))

    # ---- update: same work for all (after_step does not matter), restored before every call
    ucs = [c for c in cs if not c.name.endswith("+" + C.FAST_PATH)]
    reps = {c.name: rt_reps if c.name == C.RIGL_TORCH else plan.update_repeats for c in ucs}
    upd: Dict[str, list] = {c.name: [] for c in ucs}
    mem: Dict[str, Optional[int]] = {}

    def one_update(c, measure_mem):
        masters.restore()
        c.prepare_update()
        _free(device)
        pm = timing.PeakMemory(device)
        if measure_mem:
            with pm:
                t = clock.once(c.update)
            mem[c.name] = pm.bytes
        else:
            t = clock.once(c.update)
        c.finish_update()
        return t

    for c in list(ucs):
        if reps[c.name] and (c.name != C.RIGL_TORCH or device.type == "cuda"):
            try:
                one_update(c, False)  # warm-up: lazy initialisation, kernel compilation
            except Exception as e:
                if c.name not in C.PEERS:
                    raise
                # a peer that cannot run this update (sparsimony on bf16: its mask counts are summed in the
                # mask's dtype) leaves its cell empty, and the notes say why
                msg = f"{c.name}'s update fails on {set_name} {sparsity:.0%} {dtype_name}: {type(e).__name__}: {e}"
                log("  " + msg)
                if notes is not None:
                    notes.append(msg)
                ucs.remove(c)
                reps[c.name] = 0
                masters.restore()
                c.finish_update()
    for r in range(max(reps.values(), default=0)):
        bws.append(bw.sample())
        for c in _rotate(ucs, r):
            if r < reps[c.name]:
                upd[c.name].append(one_update(c, measure_mem=(r == reps[c.name] - 1)))
                log(f"    {c.name} update {upd[c.name][-1] * 1e3:.0f} ms")
    bws.append(bw.sample())
    bw_st = timing.stats(bws)
    for row in step_rows:
        row["copy_bandwidth_Bps"] = bw_st
    ufloor = timing.update_floor_bytes(n_sparse, b)
    update_rows = []
    for c in ucs:
        if not upd[c.name]:
            continue
        m = mem.get(c.name)
        update_rows.append(dict(base, contender=c.name, latency=timing.stats(upd[c.name]), floor_bytes=ufloor,
                                copy_bandwidth_Bps=bw_st,
                                peak_extra_bytes=m, peak_extra_bytes_per_weight=None if m is None else m / n_sparse))
    log(f"  update {set_name} {sparsity} {dtype_name}: " + ", ".join(
        f"{r['contender']} {r['latency']['median'] * 1e3:.1f} ms" for r in update_rows))
    for c in cs:
        c.close()
    del cs, ucs, masters
    _free(device)
    return step_rows, update_rows


def _step_samples(cs, repeats, clock, each_repeat):
    """Interleaved repeats of every contender's gradient op and after-step pass: ({name: {grad_op, after_step,
    total: [s]}}, {name: [minor faults per step]}); each_repeat() runs before each repeat."""
    samples: Dict[str, Dict[str, list]] = {c.name: {"grad_op": [], "after_step": [], "total": []} for c in cs}
    faults: Dict[str, list] = {c.name: [] for c in cs}
    for r in range(repeats):
        each_repeat()
        for c in _rotate(cs, r):
            f0 = timing.minor_faults()
            g = clock.repeatable(c.grad_op)
            a = clock.repeatable(c.after_step)
            faults[c.name].append(timing.minor_faults() - f0)
            s = samples[c.name]
            s["grad_op"].append(g), s["after_step"].append(a), s["total"].append(g + a)
    return samples, faults


def measure_scaling(device, plan: Plan, backends, log, sparsity=0.9, dtype_name="fp32", peers=(C.RIGL_TORCH,)) -> list:
    rows = []
    clock = timing.Clock(device)
    d = plan.scaling_width
    points = [(f"stack-{k}x{d}x{d}", weightsets.stack_shapes(k, d)) for k in plan.scaling_layers]
    points += [(s, weightsets.WEIGHT_SETS[s]()) for s in plan.scaling_extra]
    for label, shapes in points:
        masters = C.Masters(shapes, device, DTYPES[dtype_name])
        n = masters.n_weights
        names = [C.fast_name(be) for be in backends]
        if C.SPARSIMONY in peers:
            names = [C.SPARSIMONY] + names
        if n <= plan.scaling_rigl_torch_max_weights:
            names = [C.RIGL_TORCH] + names
        cs = C.make_contenders(masters, names, sparsity)
        n_sparse = sum(weightsets.numel(shapes[i]) for i in cs[0].sparse)
        samples = {c.name: [] for c in cs}
        for c in cs:
            if c.name != C.RIGL_TORCH or device.type == "cuda":
                masters.restore(), c.prepare_update(), c.update(), c.finish_update()
        for r in range(plan.scaling_repeats):
            for c in _rotate(cs, r):
                masters.restore()
                c.prepare_update()
                samples[c.name].append(clock.once(c.update))
                c.finish_update()
        for c in cs:
            rows.append(dict(label=label, n_weights=n, n_sparse=n_sparse, sparsity=sparsity, dtype=dtype_name,
                             contender=c.name, latency=timing.stats(samples[c.name])))
            c.close()
        log(f"  scaling {label} ({n / 1e6:.1f}M): " + ", ".join(
            f"{c.name} {timing.stats(samples[c.name])['median'] * 1e3:.1f} ms" for c in cs))
        del cs, masters
        _free(device)
    return rows


def measure_e2e(device, plan: Plan, backends, log, peers=(C.RIGL_TORCH,)) -> list:
    rows = []
    clock = timing.Clock(device)
    for model_name, side, batch, delta, blocks in plan.e2e:
        torch.manual_seed(0)
        base_model, source = weightsets.resnet(model_name, base=plan.e2e_base)
        base_model = base_model.to(device)
        x = torch.randn(batch, 3, side, side, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        runs = []
        # rigl_fast with its default after_step='always' and with the fast path 'trusted' (SGD: no after-step pass)
        names = (["dense"] + list(peers) + [C.fast_name(be) for be in backends]
                 + [C.fast_name(be, C.FAST_PATH) for be in backends])
        for name in names:
            model = copy.deepcopy(base_model)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            kw = dict(dense_allocation=0.1, T_end=10 ** 9, delta=delta, ignore_linear_layers=False)
            if name == "dense":
                sched = None
            elif name == C.RIGL_TORCH:
                sched = C.import_rigl_torch()(model, opt, **kw)
            elif name == C.SPARSIMONY:
                # the layers rigl's uniform rule makes sparse: every Conv2d / Linear weight but the first
                fqns = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                       torch.nn.Linear))][1:]
                sched = _SparsimonyLoop(C.sparsimony_rigl(model, opt, fqns, sparsity=0.9, delta=delta,
                                                          T_end=10 ** 9))
            else:
                backend, after = C.parse_fast_name(name)
                sched = __import__("rigl_fast").RigLScheduler(model, opt, backend=backend, after_step=after, **kw)
            runs.append((name, model, opt, sched))

        def block(model, opt, sched):
            for _ in range(delta):  # exactly one topology update per block (steps k*delta+1 .. (k+1)*delta)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                if isinstance(sched, _SparsimonyLoop):
                    opt.step()           # its wrapper masks the momentum
                    sched.sparsifier.step()  # counts; every delta-th call is the topology update
                elif sched is None or sched():
                    opt.step()

        for name, model, opt, sched in runs:
            block(model, opt, sched)  # warm-up
        samples = {r[0]: [] for r in runs}
        for r in range(blocks):
            for name, model, opt, sched in _rotate(runs, r):
                samples[name].append(delta / clock.once(lambda: block(model, opt, sched)))
        dense = timing.stats(samples["dense"])["median"]
        for name, model, opt, sched in runs:
            st = timing.stats(samples[name])
            rows.append(dict(model=model_name, model_source=source, width=plan.e2e_base, input=side, batch=batch,
                             delta=delta, contender=name, steps_per_s=st, vs_dense=st["median"] / dense))
            if sched is not None and hasattr(sched, "remove"):
                sched.remove()
        log(f"  e2e {model_name} {side}px b{batch} delta={delta}: " + ", ".join(
            f"{n} {timing.stats(s)['median']:.2f} steps/s" for n, s in samples.items()))
        del runs, base_model
        _free(device)
    return rows


class _SparsimonyLoop:
    """sparsimony in the training loop: `optimizer.step()` (which it wrapped) then `sparsifier.step()`."""

    def __init__(self, sparsifier):
        self.sparsifier = sparsifier


def run(device: torch.device, quick: bool, log=print) -> dict:
    plan = plan_for(device, quick)
    backends = C.available_backends(device)
    peers = peers_available()
    notes = list(plan.notes) + ([contention.NOTE] if plan.loaded_step_repeats else [])
    if C.SPARSIMONY in peers:
        notes.append(SPARSIMONY_NOTE)
    else:
        notes.append("sparsimony is not installed: no sparsimony column (pip install sparsimony==0.1.0 --no-deps)")
    t0 = time.perf_counter()
    log(f"rigl_fast backends on {device}: {backends}; peers: {peers}")
    bw = timing.CopyBandwidth(device, plan.copy_bytes)
    bw_all = [bw.sample() for _ in range(3)]
    step_rows, update_rows = [], []
    for set_name, sparsity, dt, rt_reps in plan.configs:
        s, u = measure_config(set_name, sparsity, dt, rt_reps, device, plan, backends, bw, log, peers, notes)
        step_rows += s
        update_rows += u
    scaling = measure_scaling(device, plan, backends, log, peers=peers)
    e2e = measure_e2e(device, plan, backends, log, peers=peers)
    bw_all += [bw.sample() for _ in range(3)]
    for row in step_rows + update_rows:
        bw_all += [row["copy_bandwidth_Bps"]["median"]]
        # the floor of each weight set uses the bandwidth sampled among its own repeats
        row["floor_s"] = row["floor_bytes"] / row["copy_bandwidth_Bps"]["median"]
        t = row["total"]["median"] if "total" in row else row["latency"]["median"]
        row["x_floor"] = t / row["floor_s"]
    del bw
    bw_st = timing.stats(bw_all)
    log(f"copy bandwidth {bw_st['median'] / 1e9:.1f} GB/s; total {time.perf_counter() - t0:.0f} s")
    return dict(quick=quick, backends=backends, copy_bandwidth_Bps=bw_st, step=step_rows, update=update_rows,
                scaling=scaling, e2e=e2e, notes=notes, peers=peers, wall_s=time.perf_counter() - t0)
