"""Compile every kernel for a GPU target without a GPU: `python -m rigl_fast.kernels.aot_check [arch]`.

The interpreter runs kernels as Python, so it accepts code the GPU compiler rejects (a name bound to two types
in the branches of a runtime `if`, an int argument that Triton specialises into a constexpr because it equals
1, ...). This runs each backend op on small CPU tensors with kernel launches replaced by ahead-of-time
compilation (down to a cubin with the ptxas bundled in the triton wheel), using the argument types and
specialisations a real launch would use (divisibility by 16 included). It must run without TRITON_INTERPRET=1.
Prints one line per compiled kernel variant (with the forms of its global loads, `ld.global.v*` for vector
loads) and exits non-zero on the first failure. `aot_check 90 compute` compiles one group only (groups:
backend, the TritonBackend ops; compute, kernels/compute.py's sparse training products).
"""
from __future__ import annotations

import inspect
import os
import re
import sys


GROUPS = ("backend", "compute")


def main(arch: int = 90, groups=GROUPS) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    unknown = [grp for grp in groups if grp not in GROUPS]
    if unknown:
        print(f"aot_check: unknown group(s) {unknown}; groups: {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    compiled = _compile_launches(arch)
    if "backend" in groups:
        _backend_ops()
    if "compute" in groups:
        _compute_ops()
    print(f"aot_check: {len(compiled)} kernel variants compiled for sm_{arch}")
    return 0


def _compile_launches(arch: int) -> dict:
    """Replace Triton's launcher with compilation for sm_`arch`; returns the dict the compiled variants go in."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)
    compiled = {}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        options = {k: v for k, v in kwargs.items() if k not in params}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        signature, consts, attrs = {}, {}, {}
        for i, (p, (name, value)) in enumerate(zip(self.params, bound.arguments.items())):
            if p.is_constexpr:
                signature[name], consts[name] = "constexpr", value
                continue
            ty, desc = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize, True)
            if ty == "constexpr":  # e.g. an int equal to 1
                signature[name], consts[name] = "constexpr", value
                continue
            signature[name] = ty
            if isinstance(desc, str) and CUDABackend.parse_attr(desc):  # divisible by 16, as a launch sees it
                attrs[(i,)] = CUDABackend.parse_attr(desc)
        key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(consts.items())),
               tuple(sorted(options.items())), tuple(sorted(attrs)))
        if key not in compiled:
            kernel = triton.compile(ASTSource(fn=self, signature=signature, constexprs=consts, attrs=attrs),
                                    target=target, options=options or None)
            compiled[key] = kernel
            loads = sorted(set(re.findall(r"ld\.global[.\w]*", kernel.asm.get("ptx", ""))))
            print(f"ok {self.fn.__name__} {signature} {consts} {options} -> "
                  f"{', '.join(sorted(kernel.asm))} loads {loads}", flush=True)

    JITFunction.run = compile_instead  # this process only compiles; nothing reads the kernels' outputs
    return compiled


def _backend_ops() -> None:
    """Every TritonBackend op on small CPU tensors: the variants a training run launches."""
    import torch
    from rigl_fast.kernels import TritonBackend

    b = TritonBackend()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(33, 31, generator=g).to(dtype)
        m = torch.rand(33, 31, generator=g) < 0.5
        acc = torch.zeros_like(w)
        for n in (1, 3):
            b.mask_grad(w, m, acc, n)
            b.mask_grad(w.t().contiguous().t(), m, acc, n)  # strided
            b.mask_grad(w[:1, :1].expand(33, 31), m, None, n)  # sizes/strides equal to 1 and 0
        b.mask_grad(w.view(-1)[:1], m.view(-1)[:1], acc.view(-1)[:1], 1)  # numel == 1
        b.apply_masks([w, w.clone().float()], [m, m])
        b.any_nonfinite([w, w.double()])
        b.update([w.clone()], [m.clone()], [torch.randn(33, 31, generator=g).to(dtype)], [100], [50],
                 [[w.clone()]], [w.clone()])
        for x, xm in ((w, m), (w.t(), m.t().contiguous())):  # contiguous and strided gradients
            b.split_grad(x.clone(), xm, x.clone())
            b.fold_grad(x.clone(), x.clone(), x.clone(), 3)
    # the sharded update's selection ops (value dtypes are runtime codes there): contiguous and strided
    # values; a first digit (no prefix), a later one, one narrower than 32 bins; the other flag value once
    m_flat = m.reshape(-1)
    for v in (w, w.t()):
        for shift, bits in ((20, 11), (10, 10), (0, 3)):
            b.key_histograms([v, v], [m, m], True, [0, 1], shift, bits)
        b.take_top([v, v], [m_flat, m_flat], True, [5, 7], [0, 3])
    b.key_histograms([w], [m], False, [1], 0, 10)
    b.take_top([w], [m_flat], False, [5], [3])
    for x, xm in ((w, m), (w.t(), m.t().contiguous())):
        b.commit([x.clone()], [xm.clone()], [m_flat], [~m_flat], [[x.clone()]], [x.clone()])
    # structured growth: pairwise (N:M) and per-unit (fan_in) units, transposed or not, in one call; unit_grow
    from rigl_fast.ops import Units
    from rigl_fast.structure import draw
    units = [Units(33, 31, False, 31, 5), Units(31, 33, True, 33, 7), Units(33, 32, False, 4, 2)]
    ws = [torch.randn(33, 31, generator=g), torch.randn(33, 31, generator=g), torch.randn(33, 32, generator=g)]
    ms = [draw(u, g).view(w.shape) for u, w in zip(units, ws)]
    for dtype in (torch.float32, torch.bfloat16):
        for pairwise in (0, 32):
            sb = TritonBackend(pairwise_group=pairwise)
            sb.structured_update([w.to(dtype) for w in ws], [m.clone() for m in ms], [w.to(dtype) for w in ws],
                                 [int(m.sum()) // 2 for m in ms], units, [[w.clone()] for w in ws], [None] * 3)
            sb.unit_grow([w.to(dtype) for w in ws], [m.reshape(-1) for m in ms], units)
    # the update's histogram passes for both radix widths used by the tests
    TritonBackend(radix_bits=11).update([w.clone()], [m.clone()], [w.clone()], [100], [50], [[]], [None])
    # a gradient of 2**31+ elements: its size and strides arrive as i64 (the other kernels read sizes from
    # int64 tables); nothing runs, so small tensors stand in for the pointers
    from rigl_fast.kernels.elementwise import _mask_grad_kernel
    big = 2 ** 31 + 1
    g32, m8 = torch.zeros(4), torch.zeros(4, dtype=torch.uint8)
    for strided in (False, True):
        _mask_grad_kernel[(4,)](g32, m8, g32, g32, 1.0, big, 1, 1, 2, big, 0, 0, 0, big, 1, STRIDED=strided,
                                HAS_ACC=True, DT=0, RECIP=False, BLOCK=1024)


def _compute_ops() -> None:
    """kernels/compute.py's csr_product and sampled_dot: batch 1 (read in place) and batched (padded tables),
    every float dtype, both crow and index dtypes, strided tables; then 64-bit offsets on stand-ins."""
    import torch
    from rigl_fast.kernels import compute as C

    C._device_reason = lambda device: None  # CPU tensors stand in for CUDA ones
    g = torch.Generator().manual_seed(0)
    m = torch.rand(129, 300, generator=g) < 0.1
    rows, cols = m.nonzero().t()
    crow = torch.zeros(130, dtype=torch.int64)
    crow[1:] = m.sum(1).cumsum(0)
    i16, i32, i64 = torch.int16, torch.int32, torch.int64
    for n_sm in (132, 1):  # the blocks an H100 launch picks for this small layer (1-row blocks), and wider ones
        C._sm_count = lambda device: n_sm
        for B, dt, ct, it in [(1, torch.float32, i32, i32), (1, torch.bfloat16, i64, i16), (7, torch.float16, i32, i16),
                              (64, torch.float16, i64, i32), (64, torch.bfloat16, i32, i16),
                              (64, torch.float32, i64, i32)]:
            x = torch.randn(B, 300, generator=g).to(dt)
            gr = torch.randn(B, 129, generator=g).to(dt)
            v = torch.randn(rows.numel(), generator=g).to(dt)
            C.csr_product(x, crow.to(ct), cols.to(it), v, 129)
            C.sampled_dot(x, gr, rows.to(it), cols.to(it))
    # strided crow, col and values (views of wider tables)
    C.csr_product(x, crow.to(i32).repeat_interleave(2)[::2], cols.to(i16).repeat_interleave(2)[::2],
                  v.repeat_interleave(2)[1::2], 129)
    # 64-bit offsets (a tensor of 2**31+ elements): small tensors stand in for the pointers, nothing runs
    big, f, i32 = 2 ** 31 + 1, torch.zeros(4), torch.zeros(4, dtype=i32)
    for bb in (1, 64):
        C._csr_kernel[(1,)](f, torch.zeros(4, dtype=torch.int64), i32, f, f, big, 300, 129, big, 1, big, 1, 1, 1, 129,
                            1, 1, DT=0, WIDE=True, BLOCK_R=8, BLOCK_K=8, BLOCK_B=bb, num_warps=4)
        C._sampled_dot_kernel[(1,)](f, f, i32, i32, f, big, 64 if bb > 1 else 1, 300, 129, 1, big, 1, big, 1, 1, DT=0,
                                    WIDE=True, BLOCK_P=64, BLOCK_B=bb, num_warps=4)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90, tuple(sys.argv[2:]) or GROUPS))
