"""The reference backend's masking passes (reference._mask_, _masked: the after-step pass, the gradient op, the
update's write) through integer views of the float dtypes: a select on the bits, in place, for every dtype and
layout; equal to the C++ backend's bit for bit."""
import pytest
import torch

from rigl_fast import reference
from rigl_fast.reference import ReferenceBackend

REF = ReferenceBackend()
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    return t.contiguous().view(INTS[t.element_size()])


def special_values(n, dtype, g):
    """Random values with NaN, +-inf, -0.0 and +0.0 spread through them."""
    x = torch.randn(n, generator=g).to(dtype)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5]).to(dtype)
    idx = torch.randint(0, n, (n // 3,), generator=g)
    x[idx] = specials[torch.randint(0, len(specials), (n // 3,), generator=g)]
    return x


def expected(x, m):
    """Bit for bit: x's bits on the mask, +0.0 (all bits 0) off it."""
    return torch.where(m, bits(x), torch.zeros((), dtype=bits(x).dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_after_step_pass_is_a_bit_select_in_place(dtype, layout):
    g = torch.Generator().manual_seed(FLOATS.index(dtype) * 2 + (layout == "transposed"))
    x = special_values(37 * 41, dtype, g).view(37, 41)
    m = torch.rand(37, 41, generator=g) < 0.4
    if layout == "transposed":
        x, m = x.t(), m.t().contiguous()
    t = x.clone() if layout == "contiguous" else x.clone().t().contiguous().t()
    ptr = t.data_ptr()
    REF.apply_masks([t], [m])
    assert t.data_ptr() == ptr and t.stride() == x.stride()  # in place, in its own layout
    assert torch.equal(bits(t), expected(x, m))
    assert not t[~m].isnan().any() and not torch.signbit(t[~m]).any()  # off the mask exactly +0.0


@pytest.mark.parametrize("dtype", FLOATS)
def test_gradient_op_returns_a_bit_select(dtype):
    g = torch.Generator().manual_seed(10 + FLOATS.index(dtype))
    grad = special_values(1000, dtype, g)
    m = torch.rand(1000, generator=g) < 0.3
    before = grad.clone()
    out = REF.mask_grad(grad, m, None, 1)
    assert out.dtype == dtype and out.shape == grad.shape and out.data_ptr() != grad.data_ptr()
    assert torch.equal(bits(out), expected(grad, m))
    assert torch.equal(bits(grad), bits(before))  # the incoming gradient is not changed


def test_other_dtypes_take_where():
    """A tensor with no integer view in the table (an integer state) is masked too."""
    t = torch.arange(1, 11, dtype=torch.int64)
    m = torch.arange(10) % 3 == 0
    REF.apply_masks([t], [m])
    assert t.tolist() == [1, 0, 0, 4, 0, 0, 7, 0, 0, 10]
    assert reference._masked(torch.arange(4, dtype=torch.int32), torch.tensor([True, False, True, False])).tolist() \
        == [0, 0, 2, 0]


@pytest.mark.parametrize("dtype", FLOATS)
def test_equal_to_cpp_bit_for_bit(dtype):
    """The same inputs through both backends' after-step pass and gradient op: the same bits (NaN payloads too)."""
    from rigl_fast._cpp import CppBackend
    cpp = CppBackend()
    g = torch.Generator().manual_seed(20 + FLOATS.index(dtype))
    x = special_values(70001, dtype, g)
    m = torch.rand(70001, generator=g) < 0.1
    a, b = x.clone(), x.clone()
    REF.apply_masks([a], [m])
    cpp.apply_masks([b], [m])
    assert torch.equal(bits(a), bits(b))
    assert torch.equal(bits(REF.mask_grad(x, m, None, 1)), bits(cpp.mask_grad(x, m, None, 1)))
