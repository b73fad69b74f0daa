// What the op files (rigl_ops.cpp, export_kernels.cpp) need from a tensor beyond common.h, which the kernels include
// without ATen's tensor headers.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace rigl_fast {

// A float tensor's FloatType; other dtypes raise.
inline FloatType float_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::f32;
    case at::kDouble: return FloatType::f64;
    case at::kHalf: return FloatType::f16;
    case at::kBFloat16: return FloatType::bf16;
    default:
      TORCH_CHECK(false, "rigl_fast (cpp): weights, scores and values must be float32/float64/float16/bfloat16, got ",
                  t.scalar_type());
  }
}

}  // namespace rigl_fast
