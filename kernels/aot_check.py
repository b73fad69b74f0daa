"""Compile every kernel for a GPU target without a GPU: `python -m rigl_fast.kernels.aot_check [arch]`.

The interpreter runs kernels as Python, so it accepts code the GPU compiler rejects (a name bound to two types
in the branches of a runtime `if`, an int argument that Triton specialises into a constexpr because it equals
1, ...). This runs each backend op on small CPU tensors with kernel launches replaced by ahead-of-time
compilation (down to a cubin with the ptxas bundled in the triton wheel), using the argument types and
specialisations a real launch would use. It must run without TRITON_INTERPRET=1. Prints one line per compiled
kernel variant and exits non-zero on the first failure.
"""
from __future__ import annotations

import inspect
import os
import sys


def main(arch: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    import torch
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)
    compiled = {}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        options = {k: v for k, v in kwargs.items() if k not in params}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        signature, consts = {}, {}
        for p, (name, value) in zip(self.params, bound.arguments.items()):
            if p.is_constexpr:
                signature[name], consts[name] = "constexpr", value
                continue
            ty, _ = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize, True)
            if ty == "constexpr":  # e.g. an int equal to 1
                signature[name], consts[name] = "constexpr", value
            else:
                signature[name] = ty
        key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(consts.items())),
               tuple(sorted(options.items())))
        if key not in compiled:
            kernel = triton.compile(ASTSource(fn=self, signature=signature, constexprs=consts), target=target,
                                    options=options or None)
            compiled[key] = kernel
            print(f"ok {self.fn.__name__} {signature} {consts} {options} -> "
                  f"{', '.join(sorted(kernel.asm))}", flush=True)

    JITFunction.run = compile_instead  # this process only compiles; nothing reads the kernels' outputs

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
    print(f"aot_check: {len(compiled)} kernel variants compiled for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
