// CPU implementations of the rigl_fast op contract (rigl_fast/ops.py), registered as torch.library ops
// under the namespace `rigl_fast`. Schemas are defined here; fake (meta) implementations live in
// rigl_fast/_cpp.py so torch.compile can trace the ops.
//
// Masking is done on bit patterns (value & -(uint)mask): a select, never a multiply, so NaN/inf off the mask
// become +0.0 and the code is the same for every dtype of a given width.
// Finer headers than <ATen/ATen.h> (every op's declaration): the build's time is mostly parsing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "op_util.h"

namespace rigl_fast {
namespace {

// Inner block: the fused passes finish one block (a few KiB of every operand) before the next, so operands
// read twice stay in L1.
constexpr int64_t kBlock = 2048;

void check_mask(const at::Tensor& t, const at::Tensor& m, const char* what) {
  TORCH_CHECK(m.scalar_type() == at::kBool, "rigl_fast: masks must be torch.bool, got ", m.scalar_type());
  TORCH_CHECK(m.is_contiguous(), "rigl_fast: masks must be contiguous");
  TORCH_CHECK(t.device().is_cpu() && m.device().is_cpu(), "rigl_fast (cpp): ", what, " and masks must be on CPU");
  TORCH_CHECK(t.sizes() == m.sizes(), "rigl_fast: ", what, " of shape ", t.sizes(),
              " does not match its mask of shape ", m.sizes());
}

// A contiguous working view of a tensor that is modified in place; non-contiguous ones (gradients from
// torch.compile, strided states) are processed on a copy that is written back at the end.
struct Work {
  at::Tensor orig, work;
  explicit Work(const at::Tensor& t) : orig(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void finish() {
    if (!work.is_same(orig)) orig.copy_(work);
  }
};

// ------------------------------------------------------------------------------------------ mask_grad
// a + b as torch adds two tensors of T: in T's op math type (fp32 for fp16/bf16), rounded to T.
template <typename T>
inline T add_rounded(T a, T b) {
  using op_t = at::opmath_type<T>;
  return static_cast<T>(static_cast<op_t>(a) + static_cast<op_t>(b));
}

// acc += grad / n with torch's rounding: the quotient is rounded to grad's dtype before the add.
template <typename T>
void accumulate(T* __restrict acc, const T* __restrict g, int64_t n, int64_t div) {
  using op_t = at::opmath_type<T>;
  const op_t d = static_cast<op_t>(div);
  for (int64_t i = 0; i < n; ++i) acc[i] = add_rounded(acc[i], static_cast<T>(static_cast<op_t>(g[i]) / d));
}

// out[i] = keep[i] ? in[i] : +0 written with streaming (non-temporal) stores, for outputs too large to
// stay in cache: a fresh output is not read into the cache before it is overwritten, so the op moves 9 bytes
// per fp32 element instead of 13. Elements of 2 or 4 bytes on x86-64; others use select_any.
constexpr int64_t kStreamBytes = 1 << 20;  // outputs at least this large (past L2) are streamed

void select_stream(char* out, const char* in, const uint8_t* keep, int64_t n, int64_t bytes) {
#if defined(__SSE2__)
  if (bytes == 2 || bytes == 4) {
    // scalar head up to a 16-byte aligned output, then 16 elements per step, then the tail
    int64_t i = 0;
    const int64_t head = std::min<int64_t>(n, ((16 - reinterpret_cast<uintptr_t>(out) % 16) % 16) / bytes);
    select_any(out, in, keep, head, bytes);
    i = head;
    const __m128i zero = _mm_setzero_si128();
    for (; i + 16 <= n; i += 16) {
      const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + i));
      const __m128i k16lo = _mm_unpacklo_epi8(k, zero), k16hi = _mm_unpackhi_epi8(k, zero);
      const __m128i* x = reinterpret_cast<const __m128i*>(in + i * bytes);
      __m128i* o = reinterpret_cast<__m128i*>(out + i * bytes);
      if (bytes == 4) {
        const __m128i m0 = _mm_cmpgt_epi32(_mm_unpacklo_epi16(k16lo, zero), zero);
        const __m128i m1 = _mm_cmpgt_epi32(_mm_unpackhi_epi16(k16lo, zero), zero);
        const __m128i m2 = _mm_cmpgt_epi32(_mm_unpacklo_epi16(k16hi, zero), zero);
        const __m128i m3 = _mm_cmpgt_epi32(_mm_unpackhi_epi16(k16hi, zero), zero);
        _mm_stream_si128(o + 0, _mm_and_si128(_mm_loadu_si128(x + 0), m0));
        _mm_stream_si128(o + 1, _mm_and_si128(_mm_loadu_si128(x + 1), m1));
        _mm_stream_si128(o + 2, _mm_and_si128(_mm_loadu_si128(x + 2), m2));
        _mm_stream_si128(o + 3, _mm_and_si128(_mm_loadu_si128(x + 3), m3));
      } else {
        _mm_stream_si128(o + 0, _mm_and_si128(_mm_loadu_si128(x + 0), _mm_cmpgt_epi16(k16lo, zero)));
        _mm_stream_si128(o + 1, _mm_and_si128(_mm_loadu_si128(x + 1), _mm_cmpgt_epi16(k16hi, zero)));
      }
    }
    _mm_sfence();  // streaming stores are weakly ordered: make them visible before the caller goes on
    select_any(out + i * bytes, in + i * bytes, keep + i, n - i, bytes);
    return;
  }
#endif
  select_any(out, in, keep, n, bytes);
}

at::Tensor mask_grad(const at::Tensor& grad, const at::Tensor& mask, const std::optional<at::Tensor>& acc,
                     int64_t n) {
  check_mask(grad, mask, "grad");
  TORCH_CHECK(n >= 1, "rigl_fast: mask_grad needs n >= 1, got ", n);
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  const int64_t numel = g.numel();
  const int64_t bytes = g.element_size();
  const auto* gp = static_cast<const char*>(g.const_data_ptr());
  auto* op = static_cast<char*>(out.mutable_data_ptr());
  const auto* mp = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const bool stream = numel * bytes >= kStreamBytes;
  if (!acc.has_value()) {
    parallel_work(numel, 1, [&](int64_t b, int64_t e) {
      if (stream) select_stream(op + b * bytes, gp + b * bytes, mp + b, e - b, bytes);
      else select_any(op + b * bytes, gp + b * bytes, mp + b, e - b, bytes);
    });
    return out;
  }
  const at::Tensor& a = *acc;
  TORCH_CHECK(a.scalar_type() == g.scalar_type() && a.sizes() == g.sizes() && a.is_contiguous(),
              "rigl_fast: the accumulator must be contiguous, with grad's dtype and shape");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "rigl_fast_mask_grad", [&] {
    auto* ap = a.mutable_data_ptr<scalar_t>();
    const auto* gs = reinterpret_cast<const scalar_t*>(gp);
    parallel_work(numel, 2, [&](int64_t b, int64_t e) {  // the accumulation and the masked copy
      for (int64_t s = b; s < e; s += kBlock) {
        const int64_t len = std::min(kBlock, e - s);
        accumulate<scalar_t>(ap + s, gs + s, len, n);
        if (stream) select_stream(op + s * bytes, gp + s * bytes, mp + s, len, bytes);
        else select_bits<sizeof(scalar_t)>(op + s * bytes, gp + s * bytes, mp + s, len);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------ apply_masks
void apply_masks(at::TensorList tensors, at::TensorList masks) {
  TORCH_CHECK(tensors.size() == masks.size(), "rigl_fast: apply_masks got ", tensors.size(), " tensors and ",
              masks.size(), " masks");
  std::vector<Work> ws;
  std::vector<int64_t> numel;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_mask(tensors[i], masks[i], "tensors");
    ws.emplace_back(tensors[i]);
    numel.push_back(tensors[i].numel());
  }
  const auto sp = spans(numel);
  parallel_spans(sp, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Span& p = sp[i];
      const at::Tensor& t = ws[p.layer].work;
      const int64_t bytes = t.element_size();
      select_inplace_any(static_cast<char*>(t.data_ptr()) + p.b * bytes,
                         reinterpret_cast<const uint8_t*>(masks[p.layer].const_data_ptr<bool>()) + p.b, p.e - p.b,
                         bytes);
    }
  });
  for (auto& w : ws) w.finish();
}

// ------------------------------------------------------------------------------------------ any_nonfinite
// An IEEE value is NaN or inf iff its exponent bits are all ones.
template <typename U>
inline bool nonfinite_bits(const void* p, int64_t n, U exp_mask) {
  const U* __restrict x = static_cast<const U*>(p);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += (x[i] & exp_mask) == exp_mask;
  return bad != 0;
}

bool piece_nonfinite(const char* base, at::ScalarType st, int64_t b, int64_t e) {
  switch (st) {
    case at::kFloat: return nonfinite_bits<uint32_t>(base + 4 * b, e - b, 0x7f800000u);
    case at::kDouble: return nonfinite_bits<uint64_t>(base + 8 * b, e - b, 0x7ff0000000000000ull);
    case at::kHalf: return nonfinite_bits<uint16_t>(base + 2 * b, e - b, uint16_t(0x7c00));
    case at::kBFloat16: return nonfinite_bits<uint16_t>(base + 2 * b, e - b, uint16_t(0x7f80));
    default: return false;  // integer and bool tensors are always finite
  }
}

at::Tensor any_nonfinite(at::TensorList tensors) {
  std::vector<at::Tensor> cs;
  std::vector<int64_t> numel;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "rigl_fast (cpp): any_nonfinite needs CPU tensors");
    TORCH_CHECK(!t.is_complex(), "rigl_fast: any_nonfinite does not support complex tensors");
    cs.push_back(t.contiguous());
    numel.push_back(t.numel());
  }
  const auto sp = spans(numel);
  std::atomic<bool> found{false};
  parallel_spans(sp, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e && !found.load(std::memory_order_relaxed); ++i) {
      const at::Tensor& t = cs[sp[i].layer];
      if (piece_nonfinite(static_cast<const char*>(t.const_data_ptr()), t.scalar_type(), sp[i].b, sp[i].e))
        found.store(true);
    }
  });
  return at::scalar_tensor(found.load(), at::TensorOptions().dtype(at::kBool));
}

// ------------------------------------------------------------------------------------------ update

std::string cpu_isa() { return kernel_isa(); }

// Layers above this many positions skip the band method (kBandMaxNumel). RIGL_FAST_CPU_BAND_MAX_NUMEL can
// only lower it: the tests run the path of 2^32+ position layers on small ones (read on every call).
int64_t band_max_numel() {
  const char* env = std::getenv("RIGL_FAST_CPU_BAND_MAX_NUMEL");
  if (env == nullptr || *env == '\0') return kBandMaxNumel;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK(*end == '\0' && v >= 0, "rigl_fast: RIGL_FAST_CPU_BAND_MAX_NUMEL must be an integer >= 0, got ", env);
  return std::min<int64_t>(v, kBandMaxNumel);
}

int64_t parallel_regions_op() { return parallel_regions().load(); }

std::vector<int64_t> select_paths_op() {
  return {select_paths().band.load(), select_paths().exact.load()};
}

// The layers of an update or commit: weights, masks, and each layer's states and grad (flat lists with the layer
// index of each), with contiguous working copies of non-contiguous ones in `ws` (written back by finish).
std::vector<LayerView> layer_views(at::TensorList weights, at::TensorList masks, at::TensorList states,
                                   at::IntArrayRef state_layer, at::TensorList grads, at::IntArrayRef grad_layer,
                                   std::vector<Work>& ws) {
  const size_t L = weights.size();
  TORCH_CHECK(masks.size() == L, "rigl_fast: one mask per weight is needed, got ", L, " weights and ", masks.size(),
              " masks");
  TORCH_CHECK(states.size() == state_layer.size() && grads.size() == grad_layer.size(),
              "rigl_fast: one layer index per state and per grad is needed");
  ws.reserve(L + states.size() + grads.size());  // no reallocation: the views point into ws
  std::vector<LayerView> layers(L);
  for (size_t i = 0; i < L; ++i) {
    check_mask(weights[i], masks[i], "weights");
    LayerView& v = layers[i];
    v.w_type = float_type(weights[i]);
    ws.emplace_back(weights[i]);
    v.w = ws.back().work.data_ptr();
    v.mask = reinterpret_cast<uint8_t*>(masks[i].mutable_data_ptr<bool>());
    v.n = weights[i].numel();
  }
  for (size_t j = 0; j < states.size(); ++j) {
    const int64_t l = state_layer[j];
    TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(L), "rigl_fast: state layer index out of range");
    check_mask(states[j], masks[l], "states");
    ws.emplace_back(states[j]);
    layers[l].states.emplace_back(static_cast<char*>(ws.back().work.data_ptr()), states[j].element_size());
  }
  for (size_t j = 0; j < grads.size(); ++j) {
    const int64_t l = grad_layer[j];
    TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(L), "rigl_fast: grad layer index out of range");
    TORCH_CHECK(layers[l].grad == nullptr, "rigl_fast: layer ", l, " got two grads");
    check_mask(grads[j], masks[l], "grads");
    ws.emplace_back(grads[j]);
    layers[l].grad = static_cast<char*>(ws.back().work.data_ptr());
    layers[l].grad_bytes = grads[j].element_size();
  }
  return layers;
}

// A layer's score, contiguous, in a type the kernels are compiled for (update_kernels.h: dispatch_layer): its
// weight's, or fp32 for an fp16/bf16 weight. Others are converted: exactly (fp16/bf16 to fp32, anything to an fp64
// weight's fp64), or, an fp64 score of a narrower weight, to fp32, which keeps every key (|x| as fp32 either way) but
// makes finite values beyond fp32's range inf: that score's finiteness is checked here, on its fp64 values
// (`nonfinite`), and not by the kernel.
at::Tensor kernel_score(const at::Tensor& score, const at::Tensor& weight, LayerView& v, bool& nonfinite) {
  const at::ScalarType st = score.scalar_type(), wt = weight.scalar_type();
  float_type(score);  // raises for a dtype that is not a float type
  if (st == wt || (st == at::kFloat && weight.element_size() == 2)) return score.contiguous();
  if (wt == at::kDouble) return score.contiguous().to(at::kDouble);
  if (st != at::kDouble) return score.contiguous().to(at::kFloat);
  const at::Tensor c = score.contiguous();
  nonfinite |= piece_nonfinite(static_cast<const char*>(c.const_data_ptr()), at::kDouble, 0, c.numel());
  v.check_score = false;
  return c.to(at::kFloat);
}

// The layers of an update (`update`, `structured_update`): layer_views, plus each layer's score (kernel_score: a
// contiguous copy in `sc` where needed; `nonfinite` set if a score checked there is not finite) and counts, checked.
std::vector<LayerView> update_views(at::TensorList weights, at::TensorList masks, at::TensorList scores,
                                    at::IntArrayRef n_keep, at::IntArrayRef n_grow, at::TensorList states,
                                    at::IntArrayRef state_layer, at::TensorList grads, at::IntArrayRef grad_layer,
                                    std::vector<Work>& ws, std::vector<at::Tensor>& sc, bool& nonfinite) {
  const size_t L = weights.size();
  TORCH_CHECK(scores.size() == L && n_keep.size() == L && n_grow.size() == L,
              "rigl_fast: an update needs one score and one count of each kind per weight");
  std::vector<LayerView> layers = layer_views(weights, masks, states, state_layer, grads, grad_layer, ws);
  sc.reserve(L);
  const int64_t band_max = band_max_numel();
  for (size_t i = 0; i < L; ++i) {
    TORCH_CHECK(scores[i].sizes() == weights[i].sizes(), "rigl_fast: score ", i, " has shape ", scores[i].sizes(),
                ", its weight ", weights[i].sizes());
    const int64_t n = weights[i].numel();
    TORCH_CHECK(n_keep[i] >= 0 && n_grow[i] >= 0 && n_keep[i] + n_grow[i] <= n,
                "rigl_fast: layer ", i, " needs 0 <= n_keep, n_grow and n_keep + n_grow <= numel (", n,
                "), got n_keep=", n_keep[i], " n_grow=", n_grow[i]);
    LayerView& v = layers[i];
    sc.push_back(kernel_score(scores[i], weights[i], v, nonfinite));
    v.s_type = float_type(sc.back());
    v.score = sc.back().const_data_ptr();
    v.n_keep = n_keep[i];
    v.n_grow = n_grow[i];
    v.exact = n > band_max;
  }
  return layers;
}

// Every selection, and the finiteness check riding on it, comes before any write: a non-finite input leaves
// everything as it was (`nonfinite`: update_views found one). Then write() and the write-back of working copies.
template <typename Write>
at::Tensor select_then_write(std::vector<LayerView>& layers, std::vector<Work>& ws, bool check_finite, bool nonfinite,
                             const Write& write) {
  const bool ok = !(check_finite && nonfinite) && RIGL_FAST_KERNEL(select_layers)(layers, check_finite);
  if (ok) {
    write();
    for (auto& w : ws) w.finish();
  }
  return at::scalar_tensor(ok, at::TensorOptions().dtype(at::kBool));
}

at::Tensor update(at::TensorList weights, at::TensorList masks, at::TensorList scores, at::IntArrayRef n_keep,
                  at::IntArrayRef n_grow, at::TensorList states, at::IntArrayRef state_layer, at::TensorList grads,
                  at::IntArrayRef grad_layer, bool check_finite) {
  std::vector<Work> ws;  // weights, states, grads: contiguous working copies where needed
  std::vector<at::Tensor> sc;
  bool nonfinite = false;
  std::vector<LayerView> layers = update_views(weights, masks, scores, n_keep, n_grow, states, state_layer, grads,
                                               grad_layer, ws, sc, nonfinite);
  return select_then_write(layers, ws, check_finite, nonfinite, [&] {
    const auto write = RIGL_FAST_KERNEL(write_layer);
    for (auto& v : layers) write(v);  // one after another, each parallel inside
  });
}

// ------------------------------------------------------------------------------------------ structured layers
// The units of every layer from `units`, 5 ints a layer (ops.Units: out, fan_in, transposed, group, target),
// checked against the layers' sizes.
std::vector<UnitLayout> unit_layouts(at::IntArrayRef units, const std::vector<int64_t>& numel) {
  TORCH_CHECK(units.size() == 5 * numel.size(), "rigl_fast: units needs 5 ints a layer (out, fan_in, transposed, "
              "group, target), got ", units.size(), " for ", numel.size(), " layers");
  std::vector<UnitLayout> out;
  for (size_t i = 0; i < numel.size(); ++i) {
    const int64_t* x = units.data() + 5 * i;
    const UnitLayout u{x[0], x[1], x[2] != 0, x[3], x[4]};
    // unit_select packs an index within a unit into 32 bits
    TORCH_CHECK(u.out >= 0 && u.fan_in >= 1 && u.group >= 1 && u.group <= (int64_t{1} << 32) &&
                u.fan_in % u.group == 0 && u.out * u.fan_in == numel[i] && u.target >= 0 && u.target <= u.group,
                "rigl_fast: layer ", i, " of ", numel[i], " positions cannot have the units out=", u.out, " fan_in=",
                u.fan_in, " group=", u.group, " target=", u.target,
                " (out * fan_in must be its size, group must divide fan_in, 0 <= target <= group <= 2^32)");
    out.push_back(u);
  }
  return out;
}

std::vector<int64_t> numels(at::TensorList ts) {
  std::vector<int64_t> n;
  for (const auto& t : ts) n.push_back(t.numel());
  return n;
}

// keep is `update`'s keep (select_layers with no grow); then every unit grows and the layers are written.
at::Tensor structured_update(at::TensorList weights, at::TensorList masks, at::TensorList scores,
                             at::IntArrayRef n_keep, at::IntArrayRef units, at::TensorList states,
                             at::IntArrayRef state_layer, at::TensorList grads, at::IntArrayRef grad_layer,
                             bool check_finite) {
  const std::vector<int64_t> no_grow(weights.size(), 0);
  const std::vector<UnitLayout> lay = unit_layouts(units, numels(weights));
  std::vector<Work> ws;
  std::vector<at::Tensor> sc;
  bool nonfinite = false;
  std::vector<LayerView> layers = update_views(weights, masks, scores, n_keep, no_grow, states, state_layer, grads,
                                               grad_layer, ws, sc, nonfinite);
  return select_then_write(layers, ws, check_finite, nonfinite,
                           [&] { RIGL_FAST_KERNEL(structured_commit)(layers, lay); });
}

// ------------------------------------------------------------------------------------------ the sharded update
// Flags (or keep/grow selections) of a shard: contiguous bool on the CPU, one per position of `t`.
const uint8_t* flag_bytes(const at::Tensor& flags, const at::Tensor& t, const char* what) {
  TORCH_CHECK(flags.scalar_type() == at::kBool && flags.is_contiguous() && flags.device().is_cpu(),
              "rigl_fast (cpp): ", what, " must be contiguous torch.bool CPU tensors");
  TORCH_CHECK(flags.numel() == t.numel(), "rigl_fast: ", what, " with ", flags.numel(), " elements for a shard of ",
              t.numel());
  return reinterpret_cast<const uint8_t*>(flags.const_data_ptr<bool>());
}

std::vector<ShardValues> shard_values(at::TensorList values, at::TensorList flags) {
  TORCH_CHECK(flags.size() == values.size(), "rigl_fast: one flags tensor per values tensor is needed, got ",
              values.size(), " and ", flags.size());
  std::vector<ShardValues> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    const at::Tensor& v = values[i];
    TORCH_CHECK(v.device().is_cpu(), "rigl_fast (cpp): values must be on CPU");
    out[i] = {v.const_data_ptr(), float_type(v), v.numel(), {}, {}, flag_bytes(flags[i], v, "flags")};
    if (!v.is_contiguous()) {
      out[i].sizes = v.sizes().vec();
      out[i].strides = v.strides().vec();
    }
  }
  return out;
}

at::Tensor key_histograms(at::TensorList values, at::TensorList flags, bool flag_value, at::IntArrayRef prefixes,
                          int64_t shift, int64_t bits) {
  TORCH_CHECK(shift >= 0 && bits >= 1 && shift + bits <= 31, "rigl_fast: key_histograms needs shift >= 0, "
              "bits >= 1 and shift + bits <= 31 (keys have 31 bits), got shift=", shift, " bits=", bits);
  TORCH_CHECK(prefixes.size() == values.size(), "rigl_fast: key_histograms needs one prefix per values tensor");
  const auto vs = shard_values(values, flags);
  at::Tensor out = at::zeros({static_cast<int64_t>(vs.size()), int64_t{1} << bits}, at::kLong);
  RIGL_FAST_KERNEL(key_histograms)(vs, flag_value, prefixes.data(), static_cast<int>(shift), static_cast<int>(bits),
                                   out.mutable_data_ptr<int64_t>());
  return out;
}

// A flat bool tensor per shard, for a kernel to write through `bytes`.
std::vector<at::Tensor> flag_outputs(const std::vector<ShardValues>& vs, std::vector<uint8_t*>& bytes) {
  std::vector<at::Tensor> out;
  for (const auto& v : vs) {
    out.push_back(at::empty({v.n}, at::kBool));
    bytes.push_back(reinterpret_cast<uint8_t*>(out.back().mutable_data_ptr<bool>()));
  }
  return out;
}

std::vector<at::Tensor> take_top(at::TensorList values, at::TensorList flags, bool flag_value,
                                 at::IntArrayRef thresholds, at::IntArrayRef n_ties) {
  TORCH_CHECK(thresholds.size() == values.size() && n_ties.size() == values.size(),
              "rigl_fast: take_top needs one threshold and one n_ties per values tensor");
  const auto vs = shard_values(values, flags);
  std::vector<uint8_t*> outs;
  std::vector<at::Tensor> out = flag_outputs(vs, outs);
  RIGL_FAST_KERNEL(take_top)(vs, flag_value, thresholds.data(), n_ties.data(), outs);
  return out;
}

// structured_update's grow alone, given keep (ops.Backend.unit_grow): a shard's scores read in place, strided or not.
std::vector<at::Tensor> unit_grow(at::TensorList scores, at::TensorList keep, at::IntArrayRef units) {
  const auto vs = shard_values(scores, keep);
  const std::vector<UnitLayout> lay = unit_layouts(units, numels(scores));
  std::vector<uint8_t*> outs;
  std::vector<at::Tensor> out = flag_outputs(vs, outs);
  RIGL_FAST_KERNEL(unit_grow)(vs, lay, outs);
  return out;
}

void commit(at::TensorList weights, at::TensorList masks, at::TensorList keep, at::TensorList grow,
            at::TensorList states, at::IntArrayRef state_layer, at::TensorList grads, at::IntArrayRef grad_layer) {
  TORCH_CHECK(keep.size() == weights.size() && grow.size() == weights.size(),
              "rigl_fast: commit needs one keep and one grow per weight");
  std::vector<Work> ws;
  const std::vector<LayerView> layers = layer_views(weights, masks, states, state_layer, grads, grad_layer, ws);
  std::vector<const uint8_t*> k, g;
  for (size_t i = 0; i < weights.size(); ++i) {
    k.push_back(flag_bytes(keep[i], weights[i], "keep"));
    g.push_back(flag_bytes(grow[i], weights[i], "grow"));
  }
  RIGL_FAST_KERNEL(commit_layers)(layers, k, g);
  for (auto& w : ws) w.finish();
}

// off += where(mask, 0, grad), then grad = where(mask, grad, 0). The add runs at every position, as torch's does
// (off + 0 turns an off of -0.0 into +0.0).
void split_grad(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& off) {
  check_mask(grad, mask, "grad");
  TORCH_CHECK(off.scalar_type() == grad.scalar_type() && off.sizes() == grad.sizes(),
              "rigl_fast: split_grad needs `off` with grad's dtype and shape");
  Work g(grad), o(off);
  const auto* mp = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "rigl_fast_split_grad", [&] {
    auto* gp = g.work.mutable_data_ptr<scalar_t>();
    auto* op = o.work.mutable_data_ptr<scalar_t>();
    parallel_work(grad.numel(), 2, [&](int64_t b, int64_t e) {  // two tensors read and written
      alignas(64) uint8_t unmasked[kBlock];
      alignas(64) scalar_t part[kBlock];
      for (int64_t s = b; s < e; s += kBlock) {
        const int64_t len = std::min(kBlock, e - s);
        for (int64_t j = 0; j < len; ++j) unmasked[j] = mp[s + j] ^ 1;
        select_bits<sizeof(scalar_t)>(part, gp + s, unmasked, len);
        for (int64_t j = 0; j < len; ++j) op[s + j] = add_rounded(op[s + j], part[j]);
        select_bits_inplace<sizeof(scalar_t)>(gp + s, mp + s, len);
      }
    });
  });
  g.finish();
  o.finish();
}

// acc += (grad + off) / n: the sum rounded to the dtype, then mask_grad's accumulation.
void fold_grad(const at::Tensor& acc, const at::Tensor& grad, const at::Tensor& off, int64_t n) {
  TORCH_CHECK(n >= 1, "rigl_fast: fold_grad needs n >= 1, got ", n);
  TORCH_CHECK(acc.device().is_cpu() && grad.device().is_cpu() && off.device().is_cpu(),
              "rigl_fast (cpp): fold_grad needs CPU tensors");
  TORCH_CHECK(grad.scalar_type() == acc.scalar_type() && off.scalar_type() == acc.scalar_type() &&
              grad.sizes() == acc.sizes() && off.sizes() == acc.sizes(),
              "rigl_fast: fold_grad needs acc, grad and off of one dtype and shape");
  Work a(acc);
  const at::Tensor g = grad.contiguous(), o = off.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "rigl_fast_fold_grad", [&] {
    auto* ap = a.work.mutable_data_ptr<scalar_t>();
    const auto* gp = g.const_data_ptr<scalar_t>();
    const auto* op = o.const_data_ptr<scalar_t>();
    parallel_work(acc.numel(), 2, [&](int64_t b, int64_t e) {  // three tensors read, one written
      alignas(64) scalar_t dense[kBlock];
      for (int64_t s = b; s < e; s += kBlock) {
        const int64_t len = std::min(kBlock, e - s);
        for (int64_t j = 0; j < len; ++j) dense[j] = add_rounded(gp[s + j], op[s + j]);
        accumulate<scalar_t>(ap + s, dense, len, n);
      }
    });
  });
  a.finish();
}

}  // namespace

TORCH_LIBRARY(rigl_fast, m) {
  m.def("cpu_isa() -> str", &cpu_isa);  // the build of the update kernels that runs here: 'avx2' or 'base'
  // [band, exact]: selections resolved by the band method and by the exact radix path since load
  m.def("select_paths() -> int[]", &select_paths_op);
  // parallel loops that opened an OpenMP region since load (common.h: parallel_tasks; small calls open none)
  m.def("parallel_regions() -> int", &parallel_regions_op);
  m.def("mask_grad(Tensor grad, Tensor mask, Tensor(a!)? acc, int n) -> Tensor");
  m.def("apply_masks(Tensor(a!)[] tensors, Tensor[] masks) -> ()");
  m.def("any_nonfinite(Tensor[] tensors) -> Tensor");
  m.def("update(Tensor(a!)[] weights, Tensor(b!)[] masks, Tensor[] scores, int[] n_keep, int[] n_grow, "
        "Tensor(c!)[] states, int[] state_layer, Tensor(d!)[] grads, int[] grad_layer, "
        "bool check_finite=False) -> Tensor");
  // the sharded (FSDP2) update's per-shard ops (ops.Backend)
  m.def("key_histograms(Tensor[] values, Tensor[] flags, bool flag_value, int[] prefixes, int shift, int bits) "
        "-> Tensor");
  m.def("take_top(Tensor[] values, Tensor[] flags, bool flag_value, int[] thresholds, int[] n_ties) -> Tensor[]");
  m.def("commit(Tensor(a!)[] weights, Tensor(b!)[] masks, Tensor[] keep, Tensor[] grow, Tensor(c!)[] states, "
        "int[] state_layer, Tensor(d!)[] grads, int[] grad_layer) -> ()");
  m.def("split_grad(Tensor(a!) grad, Tensor mask, Tensor(b!) off) -> ()");
  m.def("fold_grad(Tensor(a!) acc, Tensor grad, Tensor off, int n) -> ()");
  // structured layers (ops.Backend.structured_update, unit_grow); units: 5 ints a layer, as ops.Units
  m.def("structured_update(Tensor(a!)[] weights, Tensor(b!)[] masks, Tensor[] scores, int[] n_keep, int[] units, "
        "Tensor(c!)[] states, int[] state_layer, Tensor(d!)[] grads, int[] grad_layer, "
        "bool check_finite=False) -> Tensor");
  m.def("unit_grow(Tensor[] scores, Tensor[] keep, int[] units) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(rigl_fast, CPU, m) {
  m.impl("mask_grad", &mask_grad);
  m.impl("apply_masks", &apply_masks);
  m.impl("any_nonfinite", &any_nonfinite);
  m.impl("update", &update);
  m.impl("key_histograms", &key_histograms);
  m.impl("take_top", &take_top);
  m.impl("commit", &commit);
  m.impl("split_grad", &split_grad);
  m.impl("fold_grad", &fold_grad);
  m.impl("structured_update", &structured_update);
  m.impl("unit_grow", &unit_grow);
}

}  // namespace rigl_fast

// Lets setup.py's prebuilt `rigl_fast._C` be imported as a module; importing it registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
