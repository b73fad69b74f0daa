// CPU kernels of the exported sparse products (rigl_fast/export.py):
//   fan_in_linear (`rigl_fast_export::fan_in_linear`): y[b, o] = sum_j values[o, j] * x[b, indices[o, j]];
//   csr_linear (`rigl_fast_export::csr_linear`): y[b, o] = sum_{p in [crow[o], crow[o+1])} values[p] * x[b, col[p]];
// accumulated in fp32 and rounded once to x's dtype. Both are one gather-multiply-reduce over a row's active
// weights: the row's range of (value, index) pairs is the only difference (the Rows policies below). The
// gathered inputs are never materialised. Schemas here; the fake implementations are in rigl_fast/_cpp.py.
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

// Where row o's (value, index) pairs lie in the flat tables: [begin(o), begin(o) + size(o)).
struct FanInRows {  // (out, k) tables
  int64_t k;
  int64_t begin(int64_t o) const { return o * k; }
  int64_t size(int64_t) const { return k; }
  int64_t work(int64_t) const { return k; }  // the pairs per row, for the parallel grain
};
struct CSRRows {  // compressed rows: crow (out + 1), checked monotone by the caller
  const int64_t* crow;
  int64_t mean;  // nnz / out: the grain's estimate of a row's work
  int64_t begin(int64_t o) const { return crow[o]; }
  int64_t size(int64_t o) const { return crow[o + 1] - crow[o]; }
  int64_t work(int64_t) const { return mean; }
};

// B == 1: a gather-multiply-reduce per output row; four accumulators for instruction-level parallelism.
// Returns false when an index is out of range (the row is left at 0).
template <typename V, typename I, typename Rows>
bool rows_b1(const float* x, const V* values, const I* indices, float* y, int64_t in, const Rows& rows,
             int64_t o0, int64_t o1) {
  bool ok = true;
  for (int64_t o = o0; o < o1; ++o) {
    const V* v = values + rows.begin(o);
    const I* ix = indices + rows.begin(o);
    const int64_t k = rows.size(o);
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
template <typename V, typename I, typename Rows>
bool rows_batched(const float* xt, const V* values, const I* indices, float* yt, int64_t in, const Rows& rows,
                  int64_t B, int64_t n_blocks, int64_t w0, int64_t w1) {
  bool ok = true;
  float acc[kBatchBlock];
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t o = w / n_blocks;
    const int64_t b0 = (w % n_blocks) * kBatchBlock;
    const int64_t nb = std::min(kBatchBlock, B - b0);
    const V* v = values + rows.begin(o);
    const I* ix = indices + rows.begin(o);
    const int64_t k = rows.size(o);
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

template <typename V, typename I, typename Rows>
bool run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, const Rows& rows, int64_t out,
         at::Tensor& yf) {
  const int64_t B = x.size(0), in = x.size(1);
  const V* v = values.const_data_ptr<V>();
  const I* ix = indices.const_data_ptr<I>();
  const int64_t per_row = std::max<int64_t>(rows.work(0), 1);
  std::atomic<bool> ok{true};
  if (B == 1) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const float* xp = xf.const_data_ptr<float>();
    float* yp = yf.mutable_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / per_row);
    at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
      if (!rows_b1<V, I>(xp, v, ix, yp, in, rows, o0, o1)) ok = false;
    });
  } else {
    const at::Tensor xt = x.t().to(at::kFloat).contiguous();  // (in, B)
    const float* xp = xt.const_data_ptr<float>();
    float* yp = yf.mutable_data_ptr<float>();  // yf is (out, B) here
    const int64_t n_blocks = (B + kBatchBlock - 1) / kBatchBlock;
    const int64_t per_item = per_row * std::min(B, kBatchBlock);
    const int64_t grain = std::max<int64_t>(1, 32768 / per_item);
    at::parallel_for(0, out * n_blocks, grain, [&](int64_t w0, int64_t w1) {
      if (!rows_batched<V, I>(xp, v, ix, yp, in, rows, B, n_blocks, w0, w1)) ok = false;
    });
  }
  return ok.load();
}

template <typename Rows>
bool run_any(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, const Rows& rows,
             int64_t out, at::Tensor& yf) {
  const bool i16 = indices.scalar_type() == at::kShort;
  switch (x.scalar_type()) {
    case at::kFloat:
      return i16 ? run<float, int16_t>(x, values, indices, rows, out, yf)
                 : run<float, int32_t>(x, values, indices, rows, out, yf);
    case at::kDouble:
      return i16 ? run<double, int16_t>(x, values, indices, rows, out, yf)
                 : run<double, int32_t>(x, values, indices, rows, out, yf);
    case at::kHalf:
      return i16 ? run<c10::Half, int16_t>(x, values, indices, rows, out, yf)
                 : run<c10::Half, int32_t>(x, values, indices, rows, out, yf);
    default:
      return i16 ? run<c10::BFloat16, int16_t>(x, values, indices, rows, out, yf)
                 : run<c10::BFloat16, int32_t>(x, values, indices, rows, out, yf);
  }
}

// The checks both ops share; `op` names the op in the messages.
void check_common(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                  const char* indices_name) {
  TORCH_CHECK(x.dim() == 2, "rigl_fast::", op, ": x must be (B, in), got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu(),
              "rigl_fast::", op, ": the C++ kernel takes CPU tensors");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "rigl_fast::", op, ": x must be fp32/fp64/fp16/bf16, got ", dt);
  TORCH_CHECK(values.scalar_type() == dt, "rigl_fast::", op, ": values (", values.scalar_type(),
              ") must have x's dtype (", dt, ")");
  const auto it = indices.scalar_type();
  TORCH_CHECK(it == at::kShort || it == at::kInt, "rigl_fast::", op, ": ", indices_name,
              " must be int16 or int32, got ", it);
}

// Runs the product into an fp32 buffer and returns it as (B, out) in x's dtype, rounded once.
template <typename Rows>
at::Tensor product(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                   const Rows& rows, int64_t out) {
  const int64_t B = x.size(0);
  if (B == 0 || out == 0) return at::zeros({B, out}, x.options());
  // fp32 result: (B, out) for B == 1 (the same memory as (out, 1)), else (out, B), transposed at the end
  at::Tensor yf = at::empty(B == 1 ? std::vector<int64_t>{1, out} : std::vector<int64_t>{out, B},
                            x.options().dtype(at::kFloat));
  TORCH_CHECK(run_any(x, values, indices, rows, out, yf), "rigl_fast::", op, ": an index is out of range [0, ",
              x.size(1), ")");
  const auto dt = x.scalar_type();
  if (B == 1) return dt == at::kFloat ? yf : yf.to(dt);
  at::Tensor y = at::empty({B, out}, x.options());
  y.copy_(yf.t());  // transposes and rounds once to x's dtype
  return y;
}

at::Tensor fan_in_linear(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& indices_in) {
  TORCH_CHECK(values_in.dim() == 2, "rigl_fast::fan_in_linear: values must be (out, k), got shape ",
              values_in.sizes());
  TORCH_CHECK(indices_in.sizes() == values_in.sizes(), "rigl_fast::fan_in_linear: indices of shape ",
              indices_in.sizes(), " do not match values of shape ", values_in.sizes());
  check_common("fan_in_linear", x_in, values_in, indices_in, "indices");
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), indices = indices_in.contiguous();
  return product("fan_in_linear", x, values, indices, FanInRows{values.size(1)}, values.size(0));
}

at::Tensor csr_linear(const at::Tensor& x_in, const at::Tensor& crow_in, const at::Tensor& col_in,
                      const at::Tensor& values_in, int64_t out_features) {
  TORCH_CHECK(crow_in.dim() == 1 && crow_in.numel() == out_features + 1, "rigl_fast::csr_linear: crow must have ",
              "out_features + 1 = ", out_features + 1, " entries, got shape ", crow_in.sizes());
  TORCH_CHECK(col_in.dim() == 1 && values_in.dim() == 1 && col_in.numel() == values_in.numel(),
              "rigl_fast::csr_linear: col and values must be 1-D of the same length, got shapes ", col_in.sizes(),
              " and ", values_in.sizes());
  const auto ct = crow_in.scalar_type();
  TORCH_CHECK(ct == at::kShort || ct == at::kInt || ct == at::kLong,
              "rigl_fast::csr_linear: crow must be int16, int32 or int64, got ", ct);
  TORCH_CHECK(crow_in.device().is_cpu(), "rigl_fast::csr_linear: the C++ kernel takes CPU tensors");
  check_common("csr_linear", x_in, values_in, col_in, "col");
  const at::Tensor crow = crow_in.to(at::kLong).contiguous();  // out + 1 entries: cheap next to the product
  const int64_t* cp = crow.const_data_ptr<int64_t>();
  const int64_t nnz = values_in.numel();
  TORCH_CHECK(cp[0] == 0 && cp[out_features] == nnz, "rigl_fast::csr_linear: crow must start at 0 and end at ",
              "the number of values (", nnz, "), got ", cp[0], " and ", cp[out_features]);
  for (int64_t o = 0; o < out_features; ++o)
    TORCH_CHECK(cp[o] <= cp[o + 1], "rigl_fast::csr_linear: crow must not decrease (row ", o, ")");
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), col = col_in.contiguous();
  return product("csr_linear", x, values, col, CSRRows{cp, out_features ? nnz / out_features : 0}, out_features);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rigl_fast, m) {
  m.def("fan_in_linear(Tensor x, Tensor values, Tensor indices) -> Tensor");
  m.def("csr_linear(Tensor x, Tensor crow, Tensor col, Tensor values, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(rigl_fast, CPU, m) {
  m.impl("fan_in_linear", &fan_in_linear);
  m.impl("csr_linear", &csr_linear);
}

}  // namespace rigl_fast
