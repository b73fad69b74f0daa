"""Triton kernels launch on the device of the tensors they are given, not on the current CUDA device.

Triton launches on the current device (and its current stream) whatever the pointers it is handed, so a model on
cuda:1 while the current device is 0 needs every launch inside `with on_device(tensors' device)`. Without a
GPU (or with one only) this cannot be run for real; what is checked here (docs/triton.md says the same):
- statically: every kernel launch in kernels/*.py sits inside an `on_device` guard (or in a helper called
  only from inside one), and every tensor the kernels' Python side allocates names its device;
- at run time, through Triton's own pre-run hooks: every launch of every kernel runs under a guard for the
  device of every tensor argument, and all kernels are launched by the ops (so no launch site is missed);
- tensors on several devices are refused with a clear error before anything is launched;
- with two or more GPUs, the ops on cuda:1 while the current device is 0 give the reference's results.
"""
import ast
import contextlib
import pathlib

import pytest
import torch

import rigl_fast.kernels as kernels_pkg
from rigl_fast.kernels import TritonBackend
from rigl_fast.kernels import compute as co
from rigl_fast.kernels import elementwise as ew
from rigl_fast.kernels import export as ex
from rigl_fast.kernels import shard as sh
from rigl_fast.kernels import structured as su
from rigl_fast.kernels import update as up
from rigl_fast.kernels._common import launch_device, on_device
from rigl_fast.ops import Units
from rigl_fast.reference import ReferenceBackend
from rigl_fast.structure import draw

KERNEL_DIR = pathlib.Path(kernels_pkg.backend.__file__).parent  # the sources, not rigl_fast/kernels/__init__.py
SOURCES = sorted(KERNEL_DIR.glob("*.py"))
REF = ReferenceBackend()
SMALL = TritonBackend(block=64, iters=2)


@pytest.fixture
def dev(device):
    return torch.device(device)


def jit_kernels():
    """Every @triton.jit function of the kernel modules that is launched with a grid (name ends in _kernel)."""
    out = {}
    for mod in (ew, up, sh, su, ex, co):
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "add_pre_run_hook"):
                out[name] = obj
    return out


@contextlib.contextmanager
def launches():
    """Records (kernel, guard device, {arg name: value}) for every launch, through Triton's pre-run hooks."""
    seen = []
    hooks = []
    for name, k in jit_kernels().items():
        def hook(*args, _name=name, _k=k, **kwargs):
            seen.append((_name, launch_device(), {**dict(zip(_k.arg_names, args)), **kwargs}))
        k.add_pre_run_hook(hook)
        hooks.append((k, hook))
    try:
        yield seen
    finally:
        for k, hook in hooks:
            k.pre_run_hooks.remove(hook)


def run_every_op(backend, dev):
    """Each op of the Triton backend on small inputs, with ties straddling the threshold (tie-count pass)."""
    gen = torch.Generator().manual_seed(41)
    n = 300
    w = torch.tensor([0.0, 1.0, 2.0])[torch.randint(0, 3, (n,), generator=gen)].to(dev)
    s = torch.tensor([0.0, 1.0, 2.0])[torch.randint(0, 3, (n,), generator=gen)].to(dev)
    m = (torch.rand(n, generator=gen) < 0.5).to(dev)
    st, g = torch.randn(n, generator=gen).to(dev), torch.randn(2 * n, generator=gen).to(dev)[::2]
    acc = torch.zeros(n, device=dev)
    out = {}
    out["mask_grad"] = backend.mask_grad(g, m, acc, 3), acc
    out["mask_grad_contig"] = backend.mask_grad(st, m, None, 1)
    a = [w.clone(), st.clone()]
    backend.apply_masks(a, [m, m])
    out["apply_masks"] = a
    out["nonfinite"] = backend.any_nonfinite([w, s])
    n_active = int(m.sum())
    u = dict(w=w.clone(), m=m.clone(), st=st.clone(), g=g.clone())
    backend.update([u["w"]], [u["m"]], [s], [n_active - 7], [7], [[u["st"]]], [u["g"]])
    out["update"] = u
    # the per-shard ops of the FSDP2 update (ties at the threshold 1.0, so the tie-count pass runs)
    out["hist"] = backend.key_histograms([w, s], [m, m], True, [0, 0], 20, 11)
    keep = backend.take_top([w, s], [m, m], False, [0x3F800000] * 2, [5, 5])
    c = dict(w=w.clone(), m=m.clone(), st=st.clone(), g=g.clone())
    backend.commit([c["w"]], [c["m"]], [keep[0]], [keep[1] & ~keep[0]], [[c["st"]]], [c["g"]])
    out["commit"] = c
    grad, off, acc2 = g.clone(), torch.zeros_like(g), torch.zeros_like(g)
    backend.split_grad(grad, m, off)
    backend.fold_grad(acc2, grad, off, 3)
    out["fold"] = acc2
    # structured layers on w's 300 values: fan_in rows of 50 (one program per unit; its gradient the strided g)
    # and 2:4 over a transposed (20, 15) weight (pairwise ranks), in one call
    units = [Units(6, 50, False, 50, 9), Units(15, 20, True, 4, 2)]
    sm = [draw(u, torch.Generator().manual_seed(42 + i)).to(dev) for i, u in enumerate(units)]
    z = dict(w=[w * sm[0], (w * sm[1]).view(20, 15)], m=[sm[0], sm[1].view(20, 15)],
             st=[st.clone(), st.clone().view(20, 15)], g=[g, g.clone().view(20, 15)])
    backend.structured_update(z["w"], z["m"], [s, s.view(20, 15)], [30, 60], units, [[t] for t in z["st"]], z["g"])
    out["structured"] = z
    out["unit_grow"] = backend.unit_grow([s, s], [m, m], [units[0], units[1]])
    # the exported fan-in product (kernels/export.py, not a backend op: the reference is export.py's), batch 1
    # and batched, on integer-valued inputs so every summation order gives the same result
    x = torch.randint(-3, 4, (5, 40), generator=gen).float().to(dev)
    v = torch.randint(-3, 4, (7, 6), generator=gen).float().to(dev)
    ix = torch.randint(0, 40, (7, 6), generator=gen, dtype=torch.int32).to(dev)
    from rigl_fast.export import _fan_in_linear_reference
    product = ex.fan_in_linear if isinstance(backend, TritonBackend) else _fan_in_linear_reference
    out["fan_in_linear"] = [product(x[:1], v, ix), product(x, v, ix)]
    # compute="sparse"'s products (kernels/compute.py; the reference is compute_ops'), integer-valued as above
    from rigl_fast import compute_ops
    rows = torch.tensor([0, 0, 2, 3, 3, 3], dtype=torch.int32).to(dev)
    cols = torch.tensor([1, 39, 5, 0, 7, 38], dtype=torch.int32).to(dev)
    crow = torch.tensor([0, 2, 2, 3, 6], dtype=torch.int64).to(dev)
    cv = torch.randint(-3, 4, (6,), generator=gen).float().to(dev)
    g4 = torch.randint(-3, 4, (5, 4), generator=gen).float().to(dev)
    if isinstance(backend, TritonBackend):
        out["csr_product"] = [co.csr_product(x[:1], crow, cols, cv, 4), co.csr_product(x, crow, cols, cv, 4)]
        out["sampled_dot"] = co.sampled_dot(x, g4, rows, cols)
    else:
        out["csr_product"] = [compute_ops.reference_product(x[:1], rows, cols, cv, 4),
                              compute_ops.reference_product(x, rows, cols, cv, 4)]
        out["sampled_dot"] = compute_ops.reference_sampled(x, g4, rows, cols)
    return out


def test_every_launch_runs_under_its_tensors_device(dev):
    with launches() as seen:
        got = run_every_op(SMALL, dev)
    want = run_every_op(REF, dev)
    assert {name for name, _, _ in seen} == set(jit_kernels()), "an op no longer launches some kernel"
    for name, guard, args in seen:
        assert guard is not None, f"{name} launched outside an on_device guard"
        for arg, v in args.items():
            if isinstance(v, torch.Tensor):
                assert v.device == guard, f"{name}({arg}) on {v.device}, launched under {guard}"
        assert guard == dev
    assert launch_device() is None, "a guard leaked past its with-block"
    assert torch.equal(got["update"]["m"], want["update"]["m"])
    assert torch.equal(got["hist"].cpu(), want["hist"].cpu())
    assert torch.equal(got["commit"]["m"], want["commit"]["m"]) and torch.equal(got["fold"], want["fold"])
    for k in ("w", "m", "st", "g"):
        for a, b in zip(got["structured"][k], want["structured"][k]):
            assert torch.equal(a, b), k
    for a, b in zip(got["unit_grow"], want["unit_grow"]):
        assert torch.equal(a, b)
    assert got["nonfinite"] is False and want["nonfinite"] is False
    assert all(torch.equal(a, b) for a, b in zip(got["fan_in_linear"], want["fan_in_linear"]))


def test_the_update_passes_64_bit_counts(dev):
    """The tensors that hold per-layer counts (histograms, k and prefix, the ties before each program) are int64
    when the kernels get them; tests/test_backend_large_layers.py checks the kernels on values past int32."""
    with launches() as seen:
        run_every_op(SMALL, dev)
    checked = 0
    for name, _, args in seen:
        for arg in ("hist", "st", "tie_off"):
            if arg in args:
                assert args[arg].dtype == torch.int64, f"{name}({arg}) is {args[arg].dtype}"
                checked += 1
    assert checked >= 10


def _parents(tree):
    parent = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parent[child] = node
    return parent


def _guarded(node, parent):
    """Whether `node` sits inside `with on_device(...)` within its function."""
    while node in parent and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node = parent[node]
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", None) == "on_device"
                for i in node.items):
            return True
    return False


def _function_of(node, parent):
    while node in parent:
        node = parent[node]
        if isinstance(node, ast.FunctionDef):
            return node.name
    return None


def test_every_launch_site_is_inside_a_device_guard():
    """Static: a launch `kernel[grid](...)` of a @triton.jit function is inside `with on_device(...)`, or in a
    helper whose every call in kernels/ is (the update's _select, say)."""
    # aot_check.py only compiles (it replaces Triton's launcher): nothing it "launches" runs
    trees = {p.name: ast.parse(p.read_text()) for p in SOURCES if p.name != "aot_check.py"}
    jit_names = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                jit_names.add(node.name)
    calls, launch_sites = {}, []  # function name -> [(call node, parents)]; unguarded launches
    for fname, tree in trees.items():
        parent = _parents(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Subscript) and isinstance(f.value, ast.Name) and f.value.id in jit_names:
                launch_sites.append((fname, node, parent))
            elif isinstance(f, ast.Name):
                calls.setdefault(f.id, []).append((node, parent))
    assert {n.func.value.id for _, n, _ in launch_sites} == set(jit_kernels()), "a kernel's launch was not found"

    def covered(fn_name, depth=0):
        sites = calls.get(fn_name, [])
        return depth < 3 and bool(sites) and all(
            _guarded(c, p) or covered(_function_of(c, p), depth + 1) for c, p in sites)

    bad = [f"{fname}:{node.lineno}" for fname, node, parent in launch_sites
           if not (_guarded(node, parent) or covered(_function_of(node, parent)))]
    assert not bad, f"kernel launches outside an on_device guard: {bad}"


FACTORIES = {"empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "rand", "randn",
             "randint", "empty_strided"}


def test_every_allocation_names_its_device():
    """Static: every torch factory call in kernels/ passes device=, except the host-side table that
    `to_device` builds on the CPU on purpose (and then copies to the device)."""
    bad, seen = [], 0
    for p in SOURCES:
        tree = ast.parse(p.read_text())
        parent = _parents(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES):
                seen += 1
                if p.name == "aot_check.py" or _function_of(node, parent) == "to_device":
                    continue
                if not any(k.arg == "device" for k in node.keywords):
                    bad.append(f"{p.name}:{node.lineno} torch.{node.func.attr}")
    assert seen >= 4
    assert not bad, f"allocations without device=: {bad}"


def test_tensors_on_several_devices_are_refused_before_any_launch(dev):
    other = torch.empty(0, device="meta").new_empty(5)  # a second device that needs no hardware
    x = torch.randn(5, device=dev)
    m = torch.ones(5, dtype=torch.bool, device=dev)
    with launches() as seen:
        with pytest.raises(ValueError, match="one device"):
            SMALL.mask_grad(x, m, other, 1)
        with pytest.raises(ValueError, match="one device"):
            SMALL.apply_masks([x, other], [m, m])
        with pytest.raises(ValueError, match="one device"):
            SMALL.any_nonfinite([x, other])
        with pytest.raises(ValueError, match="one device"):
            SMALL.update([x], [m], [x.clone()], [2], [1], [[other]], [None])
    assert not seen


def test_guard_targets_the_given_cuda_device_not_the_current_one():
    """The guard for cuda:1 makes device 1 current (checked on the guard object: no GPU needed to build it)."""
    g = on_device(torch.device("cuda", 1))
    assert g._cuda is not None and g._cuda.idx == 1
    assert on_device(torch.device("cpu"))._cuda is None


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices (a model on cuda:1 while the current device is 0)")
def test_ops_on_a_second_gpu_match_the_reference():
    dev1 = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    got = run_every_op(TritonBackend(), dev1)
    want = run_every_op(REF, dev1)
    assert torch.cuda.current_device() == 0
    assert torch.equal(got["mask_grad"][0], want["mask_grad"][0])
    assert torch.equal(got["mask_grad"][1], want["mask_grad"][1])
    for a, b in zip(got["apply_masks"], want["apply_masks"]):
        assert torch.equal(a, b)
    for k in ("w", "m", "st", "g"):
        assert torch.equal(got["update"][k], want["update"][k]), k
        for a, b in zip(got["structured"][k], want["structured"][k]):
            assert torch.equal(a, b), k
