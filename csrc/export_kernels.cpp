// CPU kernel of the exported fan-in product (rigl_fast/export.py, `rigl_fast_export::fan_in_linear`):
//   y[b, o] = sum_j values[o, j] * x[b, indices[o, j]], accumulated in fp32 and rounded once to x's dtype.
// The gathered inputs are never materialised. Schema here; the fake implementation is in rigl_fast/_cpp.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace rigl_fast {
namespace {

// batch columns accumulated at once (B > 1): one block of fp32 accumulators stays in registers / L1
constexpr int64_t kBatchBlock = 64;

// B == 1: a gather-multiply-reduce per output row; four accumulators for instruction-level parallelism.
// Returns false when an index is out of range (the row is left at 0).
template <typename V, typename I>
bool rows_b1(const float* x, const V* values, const I* indices, float* y, int64_t in, int64_t k, int64_t o0,
             int64_t o1) {
  bool ok = true;
  for (int64_t o = o0; o < o1; ++o) {
    const V* v = values + o * k;
    const I* ix = indices + o * k;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    uint32_t bad = 0;
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
      const uint32_t i0 = static_cast<uint32_t>(static_cast<int32_t>(ix[j]));
      const uint32_t i1 = static_cast<uint32_t>(static_cast<int32_t>(ix[j + 1]));
      const uint32_t i2 = static_cast<uint32_t>(static_cast<int32_t>(ix[j + 2]));
      const uint32_t i3 = static_cast<uint32_t>(static_cast<int32_t>(ix[j + 3]));
      bad |= (i0 >= in) | (i1 >= in) | (i2 >= in) | (i3 >= in);
      if (bad) break;
      a0 += static_cast<float>(v[j]) * x[i0];
      a1 += static_cast<float>(v[j + 1]) * x[i1];
      a2 += static_cast<float>(v[j + 2]) * x[i2];
      a3 += static_cast<float>(v[j + 3]) * x[i3];
    }
    for (; !bad && j < k; ++j) {
      const uint32_t i0 = static_cast<uint32_t>(static_cast<int32_t>(ix[j]));
      if (i0 >= in) {
        bad = 1;
        break;
      }
      a0 += static_cast<float>(v[j]) * x[i0];
    }
    if (bad) {
      ok = false;
      y[o] = 0.f;
      continue;
    }
    y[o] = (a0 + a1) + (a2 + a3);
  }
  return ok;
}

// B > 1: xt is x transposed, (in, B) fp32, so each gathered input is a contiguous B-vector; yt is (out, B).
// Work item w = (row o, batch block): acc[b] += v * xt[idx, b0 + b] (a fused multiply-add where the CPU has one).
template <typename V, typename I>
bool rows_batched(const float* xt, const V* values, const I* indices, float* yt, int64_t in, int64_t k,
                  int64_t B, int64_t n_blocks, int64_t w0, int64_t w1) {
  bool ok = true;
  float acc[kBatchBlock];
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t o = w / n_blocks;
    const int64_t b0 = (w % n_blocks) * kBatchBlock;
    const int64_t nb = std::min(kBatchBlock, B - b0);
    const V* v = values + o * k;
    const I* ix = indices + o * k;
    float* out = yt + o * B + b0;
    std::fill(acc, acc + nb, 0.f);
    bool row_ok = true;
    for (int64_t j = 0; j < k; ++j) {
      const uint32_t i = static_cast<uint32_t>(static_cast<int32_t>(ix[j]));
      if (i >= in) {
        row_ok = false;
        break;
      }
      const float vj = static_cast<float>(v[j]);
      const float* __restrict__ xr = xt + static_cast<int64_t>(i) * B + b0;
      if (nb == kBatchBlock) {  // the common case: a fixed trip count the compiler vectorises fully
#pragma GCC ivdep
        for (int64_t b = 0; b < kBatchBlock; ++b) acc[b] += vj * xr[b];
      } else {
#pragma GCC ivdep
        for (int64_t b = 0; b < nb; ++b) acc[b] += vj * xr[b];
      }
    }
    if (!row_ok) {
      ok = false;
      std::fill(out, out + nb, 0.f);
      continue;
    }
    std::copy(acc, acc + nb, out);
  }
  return ok;
}

template <typename V, typename I>
bool run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, at::Tensor& yf) {
  const int64_t B = x.size(0), in = x.size(1), out = values.size(0), k = values.size(1);
  const V* v = values.const_data_ptr<V>();
  const I* ix = indices.const_data_ptr<I>();
  std::atomic<bool> ok{true};
  if (B == 1) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const float* xp = xf.const_data_ptr<float>();
    float* yp = yf.mutable_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1));
    at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
      if (!rows_b1<V, I>(xp, v, ix, yp, in, k, o0, o1)) ok = false;
    });
  } else {
    const at::Tensor xt = x.t().to(at::kFloat).contiguous();  // (in, B)
    const float* xp = xt.const_data_ptr<float>();
    float* yp = yf.mutable_data_ptr<float>();  // yf is (out, B) here
    const int64_t n_blocks = (B + kBatchBlock - 1) / kBatchBlock;
    const int64_t per_item = k * std::min(B, kBatchBlock);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(per_item, 1));
    at::parallel_for(0, out * n_blocks, grain, [&](int64_t w0, int64_t w1) {
      if (!rows_batched<V, I>(xp, v, ix, yp, in, k, B, n_blocks, w0, w1)) ok = false;
    });
  }
  return ok.load();
}

template <typename V>
bool run_index(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, at::Tensor& yf) {
  if (indices.scalar_type() == at::kShort) return run<V, int16_t>(x, values, indices, yf);
  return run<V, int32_t>(x, values, indices, yf);
}

at::Tensor fan_in_linear(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& indices_in) {
  TORCH_CHECK(x_in.dim() == 2, "rigl_fast::fan_in_linear: x must be (B, in), got shape ", x_in.sizes());
  TORCH_CHECK(values_in.dim() == 2, "rigl_fast::fan_in_linear: values must be (out, k), got shape ",
              values_in.sizes());
  TORCH_CHECK(indices_in.sizes() == values_in.sizes(), "rigl_fast::fan_in_linear: indices of shape ",
              indices_in.sizes(), " do not match values of shape ", values_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && values_in.device().is_cpu() && indices_in.device().is_cpu(),
              "rigl_fast::fan_in_linear: the C++ kernel takes CPU tensors");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "rigl_fast::fan_in_linear: x must be fp32/fp64/fp16/bf16, got ", dt);
  TORCH_CHECK(values_in.scalar_type() == dt, "rigl_fast::fan_in_linear: values (", values_in.scalar_type(),
              ") must have x's dtype (", dt, ")");
  const auto it = indices_in.scalar_type();
  TORCH_CHECK(it == at::kShort || it == at::kInt, "rigl_fast::fan_in_linear: indices must be int16 or int32, got ",
              it);
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), indices = indices_in.contiguous();
  const int64_t B = x.size(0), out = values.size(0);
  if (B == 0 || out == 0) return at::zeros({B, out}, x.options());
  // fp32 result: (B, out) for B == 1 (the same memory as (out, 1)), else (out, B), transposed at the end
  at::Tensor yf = at::empty(B == 1 ? std::vector<int64_t>{1, out} : std::vector<int64_t>{out, B},
                            x.options().dtype(at::kFloat));
  bool ok = true;
  switch (dt) {
    case at::kFloat: ok = run_index<float>(x, values, indices, yf); break;
    case at::kDouble: ok = run_index<double>(x, values, indices, yf); break;
    case at::kHalf: ok = run_index<c10::Half>(x, values, indices, yf); break;
    default: ok = run_index<c10::BFloat16>(x, values, indices, yf); break;
  }
  TORCH_CHECK(ok, "rigl_fast::fan_in_linear: an index is out of range [0, ", x.size(1), ")");
  if (B == 1) return dt == at::kFloat ? yf : yf.to(dt);
  at::Tensor y = at::empty({B, out}, x.options());
  y.copy_(yf.t());  // transposes and rounds once to x's dtype
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rigl_fast, m) {
  m.def("fan_in_linear(Tensor x, Tensor values, Tensor indices) -> Tensor");
}

TORCH_LIBRARY_IMPL(rigl_fast, CPU, m) {
  m.impl("fan_in_linear", &fan_in_linear);
}

}  // namespace rigl_fast
