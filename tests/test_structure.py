"""structure='fan_in' and 'N:M' (issue 14): arguments, the structural invariant through real training for
every layer type (Linear, Conv2d, transformers' Conv1D, attention projections, odd fan-ins), the update against
a brute-force oracle written here (ties included), every backend bit-identical, SET, and checkpoints.
"""
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_fast import RigLScheduler
from rigl_fast.ops import Units, units_of
from rigl_fast.reference import ReferenceBackend

from helpers import backend_or_fail, batches, threaded_ranks

STRUCTURES = [("fan_in", 0.2), ("2:4", 0.5), ("1:3", 1 / 3)]


class Mixed(nn.Module):
    """Conv2d (fan-in 3*3*3 = 27, and 6*3*3 = 54), an attention block (rows of 12), Linear with odd fan-ins."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3)
        self.c2 = nn.Conv2d(6, 12, 3)
        self.att = nn.MultiheadAttention(12, 2, batch_first=True)
        self.l1 = nn.Linear(12, 21)
        self.l2 = nn.Linear(21, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))  # (B, 12, 4, 4)
        x = x.flatten(2).transpose(1, 2)  # (B, 16, 12)
        x = self.att(x, x, x, need_weights=False)[0].mean(1)
        return self.l2(F.relu(self.l1(x)))


def _mixed_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _units_ok(pruner):
    """Every unit of every structured layer holds exactly its target; weights, grads and states are 0 off the
    mask."""
    for i, (w, m, u) in enumerate(zip(pruner.W, pruner.backward_masks, pruner._units)):
        if m is None:
            continue
        if u is not None:
            counts = units_of(m.reshape(-1), u).sum(1)
            assert bool((counts == u.target).all()), (pruner.names[i], counts.unique())
        assert bool((w[~m] == 0).all())
        if w.grad is not None:
            assert bool((w.grad[~m] == 0).all())
        for v in pruner._optimizer.state.get(w, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == w.shape:
                assert bool((v[~m] == 0).all())


@pytest.mark.parametrize("structure,density", STRUCTURES)
@pytest.mark.parametrize("grow_mode", ["gradient", "random"])
def test_invariant_after_every_step_of_real_training(structure, density, grow_mode):
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pruner = RigLScheduler(model, opt, dense_allocation=density, T_end=12, delta=2, structure=structure,
                               ignore_linear_layers=False, grow_mode=grow_mode, backend="reference")
    kept_dense = [str(r.message) for r in rec if "keeps" in str(r.message)]
    if structure == "2:4":  # fan-ins 27 (c1, the first layer, dense anyway) and 21 (l2) are not multiples of 4
        assert "structure='2:4': fan-in 21 is not divisible by M=4" in pruner.summary()
        assert kept_dense and "l2.weight" in kept_dense[0]
    elif structure == "1:3":  # 54, 12, 21 and 12 are multiples of 3: every non-first layer sparse
        assert not kept_dense and all(m is not None for m in pruner.backward_masks[1:])
    structured = [u for u in pruner._units if u is not None]
    assert structured and {u.transposed for u in structured} == {False}
    before = [None if m is None else m.clone() for m in pruner.backward_masks]
    _units_ok(pruner)
    for x, y in _mixed_data(12):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if pruner():
            opt.step()
        _units_ok(pruner)
    assert pruner.rigl_steps == 5 and pruner.skipped_updates == 0
    assert any(b is not None and not torch.equal(b, m) for b, m in zip(before, pruner.backward_masks))


@pytest.mark.parametrize("structure,density", [("fan_in", 0.25), ("2:4", 0.5)])
def test_gpt2_conv1d_units_are_columns(structure, density):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, dense_allocation=density, T_end=8, delta=2, structure=structure,
                           ignore_linear_layers=False, backend="reference")
    conv1d = [u for n, u in zip(pruner.names, pruner._units) if u is not None and u.transposed]
    assert len(conv1d) == 7  # c_attn, attn.c_proj, c_fc, mlp.c_proj of 2 blocks, but the first (uniform: dense)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        if pruner():
            opt.step()
        _units_ok(pruner)
        for w, m, u in zip(pruner.W, pruner.backward_masks, pruner._units):
            if u is not None and u.transposed:  # per column of the (in, out) weight
                per_col = m.reshape(u.fan_in, u.out)
                if structure == "fan_in":
                    assert bool((per_col.sum(0) == u.target).all())
                else:
                    assert bool((per_col.reshape(-1, 4, u.out).sum(1) == 2).all())
    assert pruner.rigl_steps == 3


# ---------------------------------------------------------------- the update against a brute-force oracle
def _oracle(w, m, s, n_keep, u):
    """The structured update written as plainly as possible: Python sorts, one position at a time."""
    flat_w, flat_m, flat_s = w.reshape(-1).tolist(), m.reshape(-1).tolist(), s.reshape(-1).tolist()
    key = lambda i: (-abs(float(torch.tensor(flat_w[i], dtype=torch.float32))), i)  # noqa: E731
    active = sorted((i for i in range(len(flat_m)) if flat_m[i]), key=key)
    keep = set(active[:n_keep])
    new = set(keep)
    for r in range(u.n_units):
        o, b = divmod(r, u.fan_in // u.group)
        cols = range(b * u.group, (b + 1) * u.group)
        pos = [(f * u.out + o) if u.transposed else (o * u.fan_in + f) for f in cols]
        need = u.target - sum(p in keep for p in pos)
        free = sorted((p for p in pos if p not in keep), key=lambda p: (-abs(flat_s[p]), pos.index(p)))
        new.update(free[:need])
    out = torch.zeros(len(flat_m), dtype=torch.bool)
    out[list(new)] = True
    return out.view(m.shape)


def _case(u, seed, ties):
    g = torch.Generator().manual_seed(seed)
    shape = (u.fan_in, u.out) if u.transposed else (u.out, u.fan_in)
    from rigl_fast.structure import draw
    m = draw(u, g).view(shape)
    if ties:  # few levels: equal |w| across the layer and equal scores inside units
        levels = torch.tensor([-1.0, 0.5, 1.0, -0.5, 2.0])
        w = levels[torch.randint(0, 5, shape, generator=g)]
        s = levels[torch.randint(0, 5, shape, generator=g)]
    else:
        w, s = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return w * m, m, s


UNITS = [Units(5, 7, False, 7, 3), Units(4, 12, False, 4, 2), Units(6, 9, True, 9, 2), Units(3, 8, True, 4, 1),
         Units(1, 1, False, 1, 1), Units(7, 6, False, 3, 2)]


@pytest.mark.parametrize("u", UNITS, ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_reference_update_equals_the_oracle(u, ties):
    ref = ReferenceBackend()
    for seed, frac in itertools.product(range(3), (0.0, 0.3, 1.0)):
        w, m, s = _case(u, seed, ties)
        n_active = int(m.sum())
        n_keep = n_active - int(n_active * frac)
        want = _oracle(w, m, s, n_keep, u)
        ref.structured_update([w], [m], [s], [n_keep], [u], [[]], [None])
        assert torch.equal(m, want), (seed, frac)
        assert bool((units_of(m.reshape(-1), u).sum(1) == u.target).all())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backends_bit_identical_to_reference(backend, dtype, device):
    ops = backend_or_fail(backend, device)
    ref = ReferenceBackend()
    for u, ties, seed in itertools.product(UNITS, (False, True), range(2)):
        w, m, s = _case(u, seed, ties)
        w, s = w.to(dtype).to(device), s.to(dtype).to(device)
        m = m.to(device)
        st = [torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device) * m]
        gr = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 9)).to(dtype).to(device)
        n_keep = int(m.sum()) - int(int(m.sum()) * 0.4)
        a = [w.clone(), m.clone(), s.clone(), [t.clone() for t in st], gr.clone()]
        b = [w.clone(), m.clone(), s.clone(), [t.clone() for t in st], gr.clone()]
        ref.structured_update([a[0]], [a[1]], [a[2]], [n_keep], [u], [a[3]], [a[4]])
        ops.structured_update([b[0]], [b[1]], [b[2]], [n_keep], [u], [b[3]], [b[4]])
        assert torch.equal(a[1], b[1]), (u, ties, seed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[3][0], b[3][0]) and torch.equal(a[4], b[4])


# ---------------------------------------------------------------- arguments and checkpoints
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10))


@pytest.mark.parametrize("bad", ["2:2", "4:2", "0:4", "x", "2-4", 3, None, "FAN_IN"])
def test_bad_structure_is_named_before_anything_changes(bad):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="structure"):
        RigLScheduler(model, opt, dense_allocation=0.5, T_end=10, structure=bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_nm_arguments_that_cannot_hold():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="dense_allocation"):
        RigLScheduler(model, opt, dense_allocation=0.1, T_end=10, structure="2:4")
    with pytest.raises(ValueError, match="sparsity_distribution"):
        RigLScheduler(model, opt, dense_allocation=0.5, T_end=10, structure="2:4", sparsity_distribution="erk")


@pytest.mark.parametrize("structure,density", [("fan_in", 0.3), ("2:4", 0.5)])
def test_checkpoint_round_trip_is_exact_and_keeps_the_structure(structure, density):
    kw = dict(dense_allocation=density, T_end=20, delta=3, grad_accumulation_n=2, structure=structure,
              ignore_linear_layers=False, sparsity_distribution="uniform")
    data = list(batches(14, seed=3, shape=(10,)))

    def run(stop=None, sd=None, model=None, opt=None):
        if model is None:
            model = _mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            torch.manual_seed(5)
        pruner = RigLScheduler(model, opt, **kw, state_dict=sd)
        for x, y in data[pruner.step:stop]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if pruner():
                opt.step()
        return model, opt, pruner

    full = run()
    model, opt, pruner = run(stop=8)  # inside the accumulation window before the update at step 9
    sd = copy.deepcopy(pruner.state_dict())
    assert sd["hyperparams"]["structure"] == structure
    pruner.remove()
    resumed = run(sd=sd, model=model, opt=opt)
    assert resumed[2].structure == structure
    for a, b in zip(full[2].backward_masks, resumed[2].backward_masks):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(full[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    # masks that break the structure are refused, naming the layer
    bad = copy.deepcopy(sd)
    bad["backward_masks"][1] = torch.ones(bad["rigl_fast_mask_shapes"][1], dtype=torch.bool)
    fresh = _mlp()
    with pytest.raises(ValueError, match="does not have the structure"):
        RigLScheduler(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), **kw, state_dict=bad)


# ---------------------------------------------------------------- FSDP2: units split across shards, simulated
# tests/test_fsdp2.py trains under real FSDP2 (2 gloo ranks); here distributed.structured_grow runs on `world`
# threads, one per simulated rank holding rows [start, start + rows) of the layer (FSDP2's dim-0 chunks), with
# its collectives through shared memory, on layers and splits a 2-rank run cannot reach.
SPLIT_UNITS = [
    Units(6, 9, True, 9, 3),  # Conv1D fan_in: 9 rows, every column split (5|4, 3|3|3, 3|3|3|0, ...)
    Units(5, 12, True, 4, 2),  # Conv1D 2:4: 6|6 cuts group 1; 4|4|4 cuts none; 3|3|3|3 cuts every group
    Units(4, 4, True, 4, 1),  # 1:4 with M == fan-in: one group per column, as fan_in
    Units(3, 20, True, 5, 2),  # 2:5: 7|7|6 cuts groups 1 and 2, a shard holding parts of two groups
    Units(7, 6, False, 3, 2),  # row units (Linear): always inside a shard, no collective
]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("u", SPLIT_UNITS, ids=str)
def test_grow_across_shards_equals_one_process(backend, u, device):
    """structured_grow on every split of the layer's rows (uneven, empty shards, N:M groups cut or not) gives
    reference.unit_grow's flags on the whole layer, bit for bit: ties (few levels, -0.0 next to +0.0) to the
    lower row within a column, across shard boundaries; drop fractions from none to all."""
    from rigl_fast import distributed as D
    from rigl_fast.reference import keep_flags, unit_grow
    from rigl_fast.sharding import plan_for
    ops = backend_or_fail(backend, device)
    shape = (u.fan_in, u.out) if u.transposed else (u.out, u.fan_in)
    width = shape[1]
    levels = torch.tensor([-1.0, -0.0, 0.0, 0.5, 1.0, -0.5])
    split_seen = False
    for world, seed, frac in itertools.product((1, 2, 3, 4, 5), range(3), (0.0, 0.4, 1.0)):
        g = torch.Generator().manual_seed(seed)
        from rigl_fast.structure import draw
        m = draw(u, g).view(shape)
        w = torch.randn(shape, generator=g) * m
        s = levels[torch.randint(0, len(levels), shape, generator=g)] if seed else torch.randn(shape, generator=g)
        n_active = int(m.sum())
        keep = keep_flags(w, m, n_active - int(n_active * frac))
        want = unit_grow(s, keep, u)
        chunk = -(-shape[0] // world)
        ranges = [(min(r * chunk, shape[0]), min((r + 1) * chunk, shape[0])) for r in range(world)]
        cuts = sorted({c for r in ranges for c in r})
        plans = [plan_for(shape, a, e - a, u, cuts) for a, e in ranges]
        split_seen |= plans[0].n_split > 0
        assert len({p.n_split for p in plans}) == 1  # every rank runs the same collectives

        def rank(r, all_sum, ties_before):
            a, e = ranges[r]
            ls = s[a:e].to(device)
            lk = keep[a * width:e * width].to(device)
            return D.structured_grow(ops, [ls], [lk], [plans[r]], all_sum, ties_before)[0].cpu()

        got = torch.cat(threaded_ranks(world, rank))
        assert torch.equal(got, want), (world, seed, frac)
        new = got | keep
        assert bool((units_of(new, u).sum(1) == u.target).all())
    assert split_seen == u.transposed
