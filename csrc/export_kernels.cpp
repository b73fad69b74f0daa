// CPU kernels of the exported sparse products (rigl_fast/export.py):
//   fan_in_linear (`rigl_fast_export::fan_in_linear`): y[b, o] = sum_j values[o, j] * x[b, indices[o, j]];
//   csr_linear (`rigl_fast_export::csr_linear`): y[b, o] = sum_{p in [crow[o], crow[o+1])} values[p] * x[b, col[p]];
// accumulated in fp32 and rounded once to x's dtype. Both are one gather-multiply-reduce over a row's active
// weights: the row's range of (value, index) pairs is the only difference. And the sparse training's weight
// gradient (rigl_fast/compute.py):
//   sampled_grad: out[p] = sum_b grad[b, rows[p]] * x[b, cols[p]], fp32, at the active positions (rows[p], cols[p]);
//   sampled_grad_dense: the same sums written at flat[p] of a zeroed fp32 vector of numel (the dense gradient);
//   transpose_f32, csr_linear_t, sampled_grad_rows_t: the same over inputs transposed once and shared (training
//   keeps the forward's transposed x for the weight gradient and transposes the output gradient once for both),
//   the last writing the dense gradient row by row.
// The kernels are in product_kernels.h (compiled per instruction set); the checks and the ops' schemas here; the
// fake implementations in rigl_fast/_cpp.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "buffer_pool.h"
#include "common.h"
#include "op_util.h"

namespace rigl_fast {
namespace {

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

// dst (cols, rows), contiguous = src (rows, cols, any strides) transposed and converted, on threads by the size
// (common.h's parallel_work): ATen's copy_ opens an OpenMP region for any copy past its grain, which stalls when
// another process's threads hold the cores (issue 21's contention), where this stays on one thread for small copies.
// ld: dst's row stride (>= rows); the lanes [rows, ld) of each dst row are zeroed. fp32 to fp32 with contiguous
// rows (the training's inputs and output gradients) goes through the instruction set's 8x8 block transposes
// (product_kernels.h: transpose_rows; about a copy's speed, 2-3x ATen's transposing copy), bf16 / fp16 to fp32 with
// contiguous rows too (transpose_rows_16, widened block by block); the rest in 32x32 tiles.
template <typename S, typename D>
void transpose_cast(const S* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, D* dst, int64_t ld) {
  bool done = false;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, float>) {
    if (cs == 1) {
      const auto run = RIGL_FAST_KERNEL(transpose_rows);
      parallel_work((rows + 7) / 8, 2 * 8 * cols, [&](int64_t a, int64_t b) {  // strips of 8 rows
        run(src, rs, cols, dst, ld, a * 8, std::min(rows, b * 8));
      });
      done = true;
    }
  } else if constexpr ((std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>) &&
                       std::is_same_v<D, float>) {
    if (cs == 1) {  // bf16 / fp16 inputs under autocast or in a bf16 model: the same blocks, widened on the way
      const auto run = RIGL_FAST_KERNEL(transpose_rows_16);
      const auto* s16 = reinterpret_cast<const uint16_t*>(src);
      parallel_work((rows + 7) / 8, 2 * 8 * cols, [&](int64_t a, int64_t b) {
        run(s16, std::is_same_v<S, c10::BFloat16>, rs, cols, dst, ld, a * 8, std::min(rows, b * 8));
      });
      done = true;
    }
  }
  if (!done) {
    constexpr int64_t T = 32;
    const int64_t nr = (rows + T - 1) / T, nc = (cols + T - 1) / T;
    parallel_work(nr * nc, 2 * T * T, [&](int64_t a, int64_t b) {  // a read and a scattered write an element
      for (int64_t w = a; w < b; ++w) {
        const int64_t r0 = (w / nc) * T, c0 = (w % nc) * T;
        const int64_t r1 = std::min(rows, r0 + T), c1 = std::min(cols, c0 + T);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * ld + r] = static_cast<D>(static_cast<float>(src[r * rs + c * cs]));
      }
    });
  }
  if (ld > rows)  // the padded lanes
    for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, D(0.f));
}

// fp32 t^T, contiguous: the (cols, ld) transpose of a 2-D (rows, cols) t of any float dtype and strides, lanes past
// rows zero, in one pass (none when t is an fp32 transposed view already and ld == rows).
at::Tensor transposed_f32(const at::Tensor& t, int64_t ld = -1) {
  const int64_t rows = t.size(0), cols = t.size(1), rs = t.stride(0), cs = t.stride(1);
  ld = ld < 0 ? rows : ld;
  const at::Tensor tt = t.t();
  if (tt.scalar_type() == at::kFloat && tt.is_contiguous() && ld == rows) return tt;
  at::Tensor out = BufferPool::get().empty_f32({cols, ld});
  float* o = out.mutable_data_ptr<float>();
  switch (t.scalar_type()) {
    case at::kFloat: transpose_cast(t.const_data_ptr<float>(), rows, cols, rs, cs, o, ld); break;
    case at::kDouble: transpose_cast(t.const_data_ptr<double>(), rows, cols, rs, cs, o, ld); break;
    case at::kHalf: transpose_cast(t.const_data_ptr<c10::Half>(), rows, cols, rs, cs, o, ld); break;
    default: transpose_cast(t.const_data_ptr<c10::BFloat16>(), rows, cols, rs, cs, o, ld); break;
  }
  return out;
}

// The lanes of a transposed row for a batch of B: B, or B + 64 (zero lanes, never computed) where B is a multiple of
// 1024: rows 4 KiB or more apart share cache sets, and the gathered rows of xt then evict each other (1.4x slower at
// B = 1024, not measurably at 256). 64: product_kernels.h kBatchBlock.
inline int64_t lanes_for(int64_t B) { return B > 1 && B % 1024 == 0 ? B + 64 : B; }

at::Tensor product_of(const char* op, const at::Tensor& xf, int64_t B, int64_t in, int64_t ld,
                      const at::Tensor& values, const at::Tensor& indices, const int64_t* crow, int64_t out,
                      const at::TensorOptions& opts);

// Runs the product (product_kernels.h, the instruction set kernel_isa() picks) into an fp32 buffer and returns
// it as (B, out) in x's dtype, rounded once. crow: nullptr for constant fan-in rows of values.size(1) pairs.
at::Tensor product(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                   const int64_t* crow, int64_t out) {
  const int64_t B = x.size(0), in = x.size(1);
  TORCH_CHECK(in < (int64_t{1} << 31), "rigl_fast::", op, ": x has ", in, " features, more than 32-bit indices reach");
  if (B == 0 || out == 0) return at::zeros({B, out}, x.options());
  // fp32 x: (in) for B == 1, else transposed (in, ld), so each gathered input is a contiguous B-vector
  const int64_t ld = lanes_for(B);
  const at::Tensor xf = B == 1 ? x.to(at::kFloat).contiguous() : transposed_f32(x, ld);
  return product_of(op, xf, B, in, ld, values, indices, crow, out, x.options());
}

// The product over xf, x as product() prepares it (in contiguous fp32 for B == 1, else (in, ld) transposed, ld >=
// B): the kernel writes the (B, out) fp32 result in place (product_kernels.h: rows_batched), rounded once to opts'
// dtype where that is not fp32.
at::Tensor product_of(const char* op, const at::Tensor& xf, int64_t B, int64_t in, int64_t ld,
                      const at::Tensor& values, const at::Tensor& indices, const int64_t* crow, int64_t out,
                      const at::TensorOptions& opts) {
  at::Tensor yf = BufferPool::get().empty_f32({B, out});
  const ProductView p{xf.const_data_ptr<float>(), values.const_data_ptr(), float_type(values),
                      indices.const_data_ptr(), indices.scalar_type() == at::kShort, crow,
                      values.dim() == 2 ? values.size(1) : 0, ld, in, out, yf.mutable_data_ptr<float>(), B};
  const bool ok = RIGL_FAST_KERNEL(sparse_product)(p);
  TORCH_CHECK(ok, "rigl_fast::", op, ": an index is out of range [0, ", in, ")");
  const auto dt = c10::typeMetaToScalarType(opts.dtype());
  return dt == at::kFloat ? yf : yf.to(dt);
}

// The compressed rows' pairs: col and values 1-D of one length.
void check_col_values(const char* op, const at::Tensor& col, const at::Tensor& values) {
  TORCH_CHECK(col.dim() == 1 && values.dim() == 1 && col.numel() == values.numel(), "rigl_fast::", op,
              ": col and values must be 1-D of the same length, got shapes ", col.sizes(), " and ", values.sizes());
}

// The compressed-row checks: crow (out + 1 entries, from 0 to nnz, not decreasing) as int64.
at::Tensor checked_crow(const char* op, const at::Tensor& crow_in, int64_t out_features, int64_t nnz) {
  TORCH_CHECK(crow_in.dim() == 1 && crow_in.numel() == out_features + 1, "rigl_fast::", op, ": crow must have ",
              "out_features + 1 = ", out_features + 1, " entries, got shape ", crow_in.sizes());
  const auto ct = crow_in.scalar_type();
  TORCH_CHECK(ct == at::kShort || ct == at::kInt || ct == at::kLong,
              "rigl_fast::", op, ": crow must be int16, int32 or int64, got ", ct);
  TORCH_CHECK(crow_in.device().is_cpu(), "rigl_fast::", op, ": the C++ kernel takes CPU tensors");
  at::Tensor crow = crow_in.to(at::kLong).contiguous();  // out + 1 entries: cheap next to the product
  const int64_t* cp = crow.const_data_ptr<int64_t>();
  TORCH_CHECK(cp[0] == 0 && cp[out_features] == nnz, "rigl_fast::", op, ": crow must start at 0 and end at ",
              "the number of values (", nnz, "), got ", cp[0], " and ", cp[out_features]);
  for (int64_t o = 0; o < out_features; ++o)
    TORCH_CHECK(cp[o] <= cp[o + 1], "rigl_fast::", op, ": crow must not decrease (row ", o, ")");
  return crow;
}

at::Tensor fan_in_linear(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& indices_in) {
  TORCH_CHECK(values_in.dim() == 2, "rigl_fast::fan_in_linear: values must be (out, k), got shape ",
              values_in.sizes());
  TORCH_CHECK(indices_in.sizes() == values_in.sizes(), "rigl_fast::fan_in_linear: indices of shape ",
              indices_in.sizes(), " do not match values of shape ", values_in.sizes());
  check_common("fan_in_linear", x_in, values_in, indices_in, "indices");
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), indices = indices_in.contiguous();
  return product("fan_in_linear", x, values, indices, nullptr, values.size(0));
}

at::Tensor csr_linear(const at::Tensor& x_in, const at::Tensor& crow_in, const at::Tensor& col_in,
                      const at::Tensor& values_in, int64_t out_features) {
  check_col_values("csr_linear", col_in, values_in);
  const at::Tensor crow = checked_crow("csr_linear", crow_in, out_features, values_in.numel());
  check_common("csr_linear", x_in, values_in, col_in, "col");
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), col = col_in.contiguous();
  return product("csr_linear", x, values, col, crow.const_data_ptr<int64_t>(), out_features);
}

// xt as the *_t ops take it: fp32, 2-D (n, ld), contiguous, on the CPU, ld >= batch.
void check_transposed(const char* op, const char* name, const at::Tensor& xt, int64_t batch) {
  TORCH_CHECK(xt.dim() == 2 && xt.scalar_type() == at::kFloat && xt.is_contiguous() && xt.device().is_cpu(),
              "rigl_fast::", op, ": ", name, " must be a contiguous 2-D fp32 CPU tensor (transpose_f32's result), ",
              "got shape ", xt.sizes(), " of ", xt.scalar_type(), xt.is_contiguous() ? "" : ", not contiguous");
  TORCH_CHECK(batch >= 0 && xt.size(1) >= batch, "rigl_fast::", op, ": batch must be in [0, ", xt.size(1),
              "] (", name, "'s lanes), got ", batch);
  TORCH_CHECK(xt.size(0) < (int64_t{1} << 31), "rigl_fast::", op, ": ", name, " has ", xt.size(0),
              " rows, more than 32-bit indices reach");
}

// t (B, n), any float dtype and strides -> (n, ld) fp32: the transposed input the *_t ops share (the forward's x
// kept for the weight gradient, the output gradient for both backward products), ld = lanes_for(B).
at::Tensor transpose_f32(const at::Tensor& t) {
  const TrainingRegion region;
  TORCH_CHECK(t.dim() == 2 && t.device().is_cpu() && at::isFloatingType(t.scalar_type()),
              "rigl_fast::transpose_f32: t must be a 2-D floating CPU tensor, got shape ", t.sizes(), " of ",
              t.scalar_type());
  const at::Tensor r = transposed_f32(t, lanes_for(t.size(0)));
  return r.is_contiguous() ? r : r.contiguous();
}

// A training op's optional dtype argument `name`: float32 (when not given), bfloat16 or float16.
at::ScalarType float_or_16(const char* op, const char* name, std::optional<at::ScalarType> t) {
  const at::ScalarType v = t.value_or(at::kFloat);
  TORCH_CHECK(v == at::kFloat || v == at::kBFloat16 || v == at::kHalf, "rigl_fast::", op, ": ", name,
              " must be float32, bfloat16 or float16, got ", v);
  return v;
}

// The active values of a weight in both of training's orders. packed: the entries that `bits` selects, row by row
// of the weight's 2-D storage (rows, cols) in column order, row r's at [crow[r], crow[r + 1]) (the storage
// order: the row order of an nn.Linear weight, the column order of a Conv1D's); permuted[q] = packed[perm[q]] (the
// other order, gathered from the packed values while they are in cache). bits: uint8 (rows, ceil(cols / 8)), bit j
// of byte b for column 8 b + j. fp32 from any float weight (bf16 and fp16 widened as they are packed, fp64
// converted first); round_to bf16 / fp16 (autocast's dtype, where the weight has another): each value rounded to
// it, still held as fp32 (the values F.linear would multiply). The packing streams the weight (product_kernels.h:
// compress_rows), where gathering the entries at their positions missed the cache at every row: 2-3x faster.
std::tuple<at::Tensor, at::Tensor> take_values(const at::Tensor& weight_in, const at::Tensor& bits_in,
                                               const at::Tensor& crow_in, const at::Tensor& perm_in,
                                               std::optional<at::ScalarType> round_to) {
  const char* op = "take_values";
  const at::ScalarType rt = float_or_16(op, "round_to", round_to);
  TORCH_CHECK(weight_in.device().is_cpu() && weight_in.dim() == 2 && at::isFloatingType(weight_in.scalar_type()),
              "rigl_fast::", op, ": weight must be a 2-D floating CPU tensor, got shape ", weight_in.sizes(), " of ",
              weight_in.scalar_type());
  const int64_t rows = weight_in.size(0), cols = weight_in.size(1), nb = (cols + 7) / 8;
  TORCH_CHECK(bits_in.device().is_cpu() && bits_in.scalar_type() == at::kByte && bits_in.dim() == 2 &&
              bits_in.size(0) == rows && bits_in.size(1) == nb, "rigl_fast::", op, ": bits must be uint8 of shape (",
              rows, ", ", nb, ") on the CPU (a byte per 8 columns of weight), got shape ", bits_in.sizes(), " of ",
              bits_in.scalar_type());
  const auto pt = perm_in.scalar_type();
  TORCH_CHECK(perm_in.dim() == 1 && perm_in.device().is_cpu() && (pt == at::kInt || pt == at::kLong),
              "rigl_fast::", op, ": perm must be a 1-D int32 or int64 CPU tensor, got shape ", perm_in.sizes(), " of ",
              pt);
  const int64_t n = perm_in.numel();
  const at::Tensor crow = checked_crow(op, crow_in, rows, n);
  const TrainingRegion region;
  // fp32, bf16 and fp16 weights packed as they are (the 16-bit ones widened on the way); fp64 converted first
  const auto wt = weight_in.scalar_type();
  const bool sixteen = wt == at::kBFloat16 || wt == at::kHalf;
  const at::Tensor weight = (sixteen ? weight_in : weight_in.to(at::kFloat)).contiguous(), bits = bits_in.contiguous(),
                   perm = perm_in.contiguous();
  at::Tensor packed = BufferPool::get().empty_f32({n});
  at::Tensor permuted = BufferPool::get().empty_f32({n});
  const int64_t* sp = crow.const_data_ptr<int64_t>();
  const uint8_t* bp = bits.const_data_ptr<uint8_t>();
  float* v = packed.mutable_data_ptr<float>();
  float* vt = permuted.mutable_data_ptr<float>();
  std::atomic<bool> bad_bits{false}, bad_perm{false};
  const auto compress = RIGL_FAST_KERNEL(compress_rows);
  const auto compress_16 = RIGL_FAST_KERNEL(compress_rows_16);
  const auto round = RIGL_FAST_KERNEL(round_values);
  const bool rounding = rt != at::kFloat && rt != wt;  // autocast: the product's dtype, not the weight's
  parallel_work(rows, cols + (rows ? n / rows : 0), [&](int64_t r0, int64_t r1) {  // the row read, its entries written
    const bool ok = sixteen ? compress_16(static_cast<const uint16_t*>(weight.const_data_ptr()), wt == at::kBFloat16,
                                          cols, bp, sp, r0, r1, v)
                            : compress(weight.const_data_ptr<float>(), cols, bp, sp, r0, r1, v);
    if (!ok) bad_bits = true;
    else if (rounding) round(v + sp[r0], sp[r1] - sp[r0], rt == at::kBFloat16);  // while they are in cache
  });
  TORCH_CHECK(!bad_bits.load(), "rigl_fast::", op, ": bits select other counts of entries per row than crow (",
              "crow[r + 1] - crow[r] for row r) says");
  auto permute = [&](const auto* pp) {
    parallel_work(n, 4, [&](int64_t a, int64_t b) {
      bool bad = false;
      for (int64_t q = a; q < b; ++q) {
        const uint64_t i = static_cast<uint64_t>(static_cast<int64_t>(pp[q]));
        bad |= i >= static_cast<uint64_t>(n);
        vt[q] = i < static_cast<uint64_t>(n) ? v[i] : 0.f;
      }
      if (bad) bad_perm = true;
    });
  };
  if (pt == at::kInt) permute(perm.const_data_ptr<int32_t>());
  else permute(perm.const_data_ptr<int64_t>());
  TORCH_CHECK(!bad_perm.load(), "rigl_fast::", op, ": perm holds a position outside [0, ", n, ")");
  return {packed, permuted};
}

// csr_linear over xt = transpose_f32(x) (fp32 values): the same result as csr_linear(x, ...) for fp32 x, bitwise.
at::Tensor csr_linear_t(const at::Tensor& xt_in, int64_t batch, const at::Tensor& crow_in, const at::Tensor& col_in,
                        const at::Tensor& values_in, int64_t out_features) {
  check_transposed("csr_linear_t", "xt", xt_in, batch);
  const TrainingRegion region;
  check_col_values("csr_linear_t", col_in, values_in);
  TORCH_CHECK(values_in.scalar_type() == at::kFloat && values_in.device().is_cpu(),
              "rigl_fast::csr_linear_t: values must be fp32 on the CPU, got ", values_in.scalar_type());
  const auto it = col_in.scalar_type();
  TORCH_CHECK((it == at::kShort || it == at::kInt) && col_in.device().is_cpu(),
              "rigl_fast::csr_linear_t: col must be int16 or int32 on the CPU, got ", it);
  const at::Tensor crow = checked_crow("csr_linear_t", crow_in, out_features, values_in.numel());
  if (batch == 0 || out_features == 0) return at::zeros({batch, out_features}, xt_in.options());
  const at::Tensor xf = batch == 1 ? xt_in.select(1, 0).contiguous() : xt_in;
  return product_of("csr_linear_t", xf, batch, xt_in.size(0), batch == 1 ? 1 : xt_in.size(1),
                    values_in.contiguous(), col_in.contiguous(), crow.const_data_ptr<int64_t>(), out_features,
                    xt_in.options());
}

// The sampled product's kernel of the instruction set kernel_isa() picks (product_kernels.h).
bool run_sampled_kernel(const SampledView& s) {
  return RIGL_FAST_KERNEL(sampled_product)(s);
}

// The checks and the kernel run of sampled_grad and sampled_grad_dense; `y` receives pair p's sum at p, or at
// flat[p] when `flat` is given (y then zeroed first, on threads by its size).
void sampled_into(const char* op, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& rows_in,
                  const at::Tensor& cols_in, const at::Tensor* flat, at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && grad.dim() == 2 && x.size(0) == grad.size(0), "rigl_fast::", op, ": x (B, in) ",
              "and grad (B, out) must be 2-D with the same B, got shapes ", x.sizes(), " and ", grad.sizes());
  TORCH_CHECK(x.device().is_cpu() && grad.device().is_cpu(), "rigl_fast::", op, ": the C++ kernel takes CPU tensors");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "rigl_fast::", op, ": x must be fp32/fp64/fp16/bf16, got ", dt);
  TORCH_CHECK(grad.scalar_type() == dt, "rigl_fast::", op, ": grad (", grad.scalar_type(),
              ") must have x's dtype (", dt, ")");
  TORCH_CHECK(rows_in.dim() == 1 && cols_in.dim() == 1 && rows_in.numel() == cols_in.numel(),
              "rigl_fast::", op, ": rows and cols must be 1-D of the same length, got shapes ", rows_in.sizes(),
              " and ", cols_in.sizes());
  TORCH_CHECK(rows_in.device().is_cpu() && cols_in.device().is_cpu(), "rigl_fast::", op,
              ": the C++ kernel takes CPU tensors");
  const auto rt = rows_in.scalar_type(), ct = cols_in.scalar_type();
  TORCH_CHECK((rt == at::kShort || rt == at::kInt) && (ct == at::kShort || ct == at::kInt),
              "rigl_fast::", op, ": rows and cols must be int16 or int32, got ", rt, " and ", ct);
  const int64_t B = x.size(0), in = x.size(1), out = grad.size(1), nnz = rows_in.numel();
  TORCH_CHECK(in < (int64_t{1} << 31) && out < (int64_t{1} << 31), "rigl_fast::", op, ": ", in, " inputs or ",
              out, " outputs, more than 32-bit indices reach");
  at::Tensor fl;
  if (flat != nullptr) {
    TORCH_CHECK(flat->dim() == 1 && flat->numel() == nnz && flat->scalar_type() == at::kLong && flat->device().is_cpu(),
                "rigl_fast::", op, ": flat must be 1-D int64 with one position per pair, got shape ", flat->sizes(),
                " of ", flat->scalar_type());
    fl = flat->contiguous();
    float* yp = y.mutable_data_ptr<float>();
    parallel_work(y.numel(), 1, [&](int64_t a, int64_t b) { std::fill(yp + a, yp + b, 0.f); });
  }
  if (nnz == 0) return;
  // (in, B) and (out, B): each pair's two factors are contiguous B-vectors. B == 0: empty, the pairs' sums are 0
  const at::Tensor xt = transposed_f32(x), gt = transposed_f32(grad);
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  const SampledView s{xt.const_data_ptr<float>(), gt.const_data_ptr<float>(), rows.const_data_ptr(),
                      cols.const_data_ptr(), rt == at::kShort, ct == at::kShort, nnz, B, in, out,
                      y.mutable_data_ptr<float>(), flat ? fl.const_data_ptr<int64_t>() : nullptr, y.numel(), B};
  const bool ok = run_sampled_kernel(s);
  TORCH_CHECK(ok, "rigl_fast::", op, ": a pair is out of range (rows must be in [0, ", out, "), cols in [0, ",
              in, ")", flat ? ", flat in [0, numel)" : "", ")");
}

at::Tensor sampled_grad(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& cols) {
  at::Tensor y = BufferPool::get().empty_f32({rows.numel()});
  sampled_into("sampled_grad", x, grad, rows, cols, nullptr, y);
  return y;
}

// The dense (n_rows, n_cols) fp32 weight gradient from transpose_f32's results of one batch: row r is 0 but at
// col[p] for p in [crow[r], crow[r + 1]), which gets sum_b at[r, b] * bt[col[p], b]. nn.Linear's: at = g^T, bt =
// x^T, the compressed rows; Conv1D's (in, out) storage: at = x^T, bt = g^T, the column structure. Each row built
// in cache and streamed out (product_kernels.h: sampled_rows); the sums bitwise sampled_grad_dense's (the same
// arithmetic per pair; a product of two factors is the same either way round). dtype bf16 / fp16: the gradient in
// that dtype, each sum rounded once as it is written (bitwise the fp32 result's .to(dtype) but for NaN payloads).
at::Tensor sampled_grad_rows_t(const at::Tensor& at_, const at::Tensor& bt, int64_t batch, const at::Tensor& crow_in,
                               const at::Tensor& col_in, std::optional<at::ScalarType> dtype) {
  const char* op = "sampled_grad_rows_t";
  const at::ScalarType yt = float_or_16(op, "dtype", dtype);
  const TrainingRegion region;
  check_transposed(op, "at", at_, batch);
  check_transposed(op, "bt", bt, batch);
  TORCH_CHECK(at_.size(1) == bt.size(1), "rigl_fast::", op, ": at and bt must have the same lanes (one batch), ",
              "got shapes ", at_.sizes(), " and ", bt.sizes());
  const auto ct = col_in.scalar_type();
  TORCH_CHECK(col_in.dim() == 1 && (ct == at::kShort || ct == at::kInt) && col_in.device().is_cpu(),
              "rigl_fast::", op, ": col must be 1-D int16 or int32 on the CPU, got shape ", col_in.sizes(), " of ", ct);
  const int64_t n_rows = at_.size(0), n_cols = bt.size(0);
  const at::Tensor crow = checked_crow(op, crow_in, n_rows, col_in.numel());
  const at::Tensor col = col_in.contiguous();
  at::Tensor y = BufferPool::get().empty({n_rows, n_cols}, yt);
  const bool f32 = yt == at::kFloat;
  SampledView s{bt.const_data_ptr<float>(), at_.const_data_ptr<float>(), nullptr, col.const_data_ptr(), false,
                ct == at::kShort, col.numel(), batch, n_cols, n_rows, f32 ? y.mutable_data_ptr<float>() : nullptr,
                nullptr, y.numel(), at_.size(1)};
  s.crow = crow.const_data_ptr<int64_t>();
  s.y_kind = f32 ? 0 : yt == at::kBFloat16 ? 1 : 2;
  s.y16 = f32 ? nullptr : y.mutable_data_ptr();
  const bool ok = run_sampled_kernel(s);
  TORCH_CHECK(ok, "rigl_fast::", op, ": a column index is out of range [0, ", n_cols, ")");
  return y;
}

// The dense (numel) fp32 gradient: 0 but at flat[p], which gets pair p's sum (compute.py's weight gradient
// outside the dense window, written in one pass with no (nnz) intermediate).
at::Tensor sampled_grad_dense(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& rows,
                              const at::Tensor& cols, const at::Tensor& flat, int64_t numel) {
  TORCH_CHECK(numel >= 0, "rigl_fast::sampled_grad_dense: numel must be >= 0, got ", numel);
  at::Tensor y = BufferPool::get().empty_f32({numel});
  sampled_into("sampled_grad_dense", x, grad, rows, cols, &flat, y);
  return y;
}

}  // namespace

int64_t product_parallel_regions() { return parallel_regions().load(); }
int64_t release_buffers() { return BufferPool::get().release(); }
int64_t held_buffer_bytes() { return BufferPool::get().held(); }

TORCH_LIBRARY_FRAGMENT(rigl_fast, m) {
  // the products' loops that opened an OpenMP region since load (rigl_ops.cpp's parallel_regions, this library's)
  m.def("product_parallel_regions() -> int", &product_parallel_regions);
  // the pooled buffers (buffer_pool.h): frees the held ones (returns the bytes); the bytes held now
  m.def("release_buffers() -> int", &release_buffers);
  m.def("held_buffer_bytes() -> int", &held_buffer_bytes);
  m.def("fan_in_linear(Tensor x, Tensor values, Tensor indices) -> Tensor");
  m.def("csr_linear(Tensor x, Tensor crow, Tensor col, Tensor values, int out_features) -> Tensor");
  m.def("transpose_f32(Tensor t) -> Tensor");
  m.def("take_values(Tensor weight, Tensor bits, Tensor crow, Tensor perm, ScalarType? round_to=None) -> "
        "(Tensor, Tensor)");
  m.def("csr_linear_t(Tensor xt, int batch, Tensor crow, Tensor col, Tensor values, int out_features) -> Tensor");
  m.def("sampled_grad_rows_t(Tensor at, Tensor bt, int batch, Tensor crow, Tensor col, ScalarType? dtype=None) -> "
        "Tensor");
  m.def("sampled_grad(Tensor x, Tensor grad, Tensor rows, Tensor cols) -> Tensor");
  m.def("sampled_grad_dense(Tensor x, Tensor grad, Tensor rows, Tensor cols, Tensor flat, int numel) -> Tensor");
}

TORCH_LIBRARY_IMPL(rigl_fast, CPU, m) {
  m.impl("fan_in_linear", &fan_in_linear);
  m.impl("csr_linear", &csr_linear);
  m.impl("transpose_f32", &transpose_f32);
  m.impl("take_values", &take_values);
  m.impl("csr_linear_t", &csr_linear_t);
  m.impl("sampled_grad_rows_t", &sampled_grad_rows_t);
  m.impl("sampled_grad", &sampled_grad);
  m.impl("sampled_grad_dense", &sampled_grad_dense);
}

}  // namespace rigl_fast
