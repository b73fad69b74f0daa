// CPU implementations of the rigl_fast op contract (rigl_fast/ops.py), registered as torch.library ops
// under the namespace `rigl_fast`. Schemas are defined here; fake (meta) implementations live in
// rigl_fast/_cpp.py so torch.compile can trace the ops.
//
// Masking is done on bit patterns (value & -(uint)mask): a select, never a multiply, so NaN/inf off the mask
// become +0.0 and the code is the same for every dtype of a given width.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "select.h"

namespace rigl_fast {
namespace {

// Elements per parallel task: below this a layer runs on one thread (the fork costs more than it saves).
constexpr int64_t kGrain = 1 << 15;
// Inner block: the fused passes finish one block (a few KiB of every operand) before the next, so operands
// read twice stay in L1.
constexpr int64_t kBlock = 2048;

template <int Bytes> struct UInt;
template <> struct UInt<1> { using type = uint8_t; };
template <> struct UInt<2> { using type = uint16_t; };
template <> struct UInt<4> { using type = uint32_t; };
template <> struct UInt<8> { using type = uint64_t; };

// out[i] = keep[i] ? in[i] : +0 for an element of `Bytes` bytes. keep is 0/1 bytes. Vectorises.
template <int Bytes>
inline void select_bits(void* out, const void* in, const uint8_t* __restrict keep, int64_t n) {
  using U = typename UInt<Bytes>::type;
  U* __restrict o = static_cast<U*>(out);
  const U* __restrict x = static_cast<const U*>(in);
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] & static_cast<U>(U(0) - static_cast<U>(keep[i]));
}

// In-place variant; same pointer in and out, so no __restrict.
template <int Bytes>
inline void select_bits_inplace(void* t, const uint8_t* __restrict keep, int64_t n) {
  using U = typename UInt<Bytes>::type;
  U* __restrict o = static_cast<U*>(t);
  for (int64_t i = 0; i < n; ++i) o[i] = o[i] & static_cast<U>(U(0) - static_cast<U>(keep[i]));
}

inline void select_any(void* out, const void* in, const uint8_t* keep, int64_t n, int64_t bytes) {
  switch (bytes) {
    case 1: select_bits<1>(out, in, keep, n); break;
    case 2: select_bits<2>(out, in, keep, n); break;
    case 4: select_bits<4>(out, in, keep, n); break;
    case 8: select_bits<8>(out, in, keep, n); break;
    default: TORCH_CHECK(false, "rigl_fast: unsupported element size ", bytes);
  }
}

inline void select_inplace_any(void* t, const uint8_t* keep, int64_t n, int64_t bytes) {
  switch (bytes) {
    case 1: select_bits_inplace<1>(t, keep, n); break;
    case 2: select_bits_inplace<2>(t, keep, n); break;
    case 4: select_bits_inplace<4>(t, keep, n); break;
    case 8: select_bits_inplace<8>(t, keep, n); break;
    default: TORCH_CHECK(false, "rigl_fast: unsupported element size ", bytes);
  }
}

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
// acc += grad / n with torch's rounding: the quotient is rounded to grad's dtype before the add.
template <typename T>
void accumulate(T* __restrict acc, const T* __restrict g, int64_t n, int64_t div) {
  using op_t = at::opmath_type<T>;
  const op_t d = static_cast<op_t>(div);
  for (int64_t i = 0; i < n; ++i) {
    const T q = static_cast<T>(static_cast<op_t>(g[i]) / d);
    acc[i] = static_cast<T>(static_cast<op_t>(acc[i]) + static_cast<op_t>(q));
  }
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
  if (!acc.has_value()) {
    at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) {
      select_any(op + b * bytes, gp + b * bytes, mp + b, e - b, bytes);
    });
    return out;
  }
  const at::Tensor& a = *acc;
  TORCH_CHECK(a.scalar_type() == g.scalar_type() && a.sizes() == g.sizes() && a.is_contiguous(),
              "rigl_fast: the accumulator must be contiguous, with grad's dtype and shape");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "rigl_fast_mask_grad", [&] {
    auto* ap = a.mutable_data_ptr<scalar_t>();
    const auto* gs = reinterpret_cast<const scalar_t*>(gp);
    at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; s += kBlock) {
        const int64_t len = std::min(kBlock, e - s);
        accumulate<scalar_t>(ap + s, gs + s, len, n);
        select_bits<sizeof(scalar_t)>(op + s * bytes, gp + s * bytes, mp + s, len);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------ apply_masks
struct Piece {
  char* data;
  const uint8_t* mask;
  int64_t begin, end, bytes;
};

// Cuts every (tensor, mask) pair into pieces of about kGrain elements so one parallel_for covers all.
std::vector<Piece> pieces(const std::vector<Work>& ts, const std::vector<const uint8_t*>& ms) {
  std::vector<Piece> out;
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i].work;
    const int64_t n = t.numel();
    for (int64_t b = 0; b < n; b += kGrain)
      out.push_back({static_cast<char*>(t.data_ptr()), ms.empty() ? nullptr : ms[i], b,
                     std::min(n, b + kGrain), static_cast<int64_t>(t.element_size())});
  }
  return out;
}

void apply_masks(at::TensorList tensors, at::TensorList masks) {
  TORCH_CHECK(tensors.size() == masks.size(), "rigl_fast: apply_masks got ", tensors.size(), " tensors and ",
              masks.size(), " masks");
  std::vector<Work> ws;
  std::vector<const uint8_t*> ms;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_mask(tensors[i], masks[i], "tensors");
    ws.emplace_back(tensors[i]);
    ms.push_back(reinterpret_cast<const uint8_t*>(masks[i].const_data_ptr<bool>()));
  }
  const auto ps = pieces(ws, ms);
  at::parallel_for(0, static_cast<int64_t>(ps.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Piece& p = ps[i];
      select_inplace_any(p.data + p.begin * p.bytes, p.mask + p.begin, p.end - p.begin, p.bytes);
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
  struct P { const char* base; at::ScalarType st; int64_t b, e; };
  std::vector<P> ps;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "rigl_fast (cpp): any_nonfinite needs CPU tensors");
    TORCH_CHECK(!t.is_complex(), "rigl_fast: any_nonfinite does not support complex tensors");
    cs.push_back(t.contiguous());
    const int64_t n = t.numel();
    for (int64_t b = 0; b < n; b += kGrain)
      ps.push_back({static_cast<const char*>(cs.back().const_data_ptr()), t.scalar_type(), b,
                    std::min(n, b + kGrain)});
  }
  std::atomic<bool> found{false};
  at::parallel_for(0, static_cast<int64_t>(ps.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e && !found.load(std::memory_order_relaxed); ++i)
      if (piece_nonfinite(ps[i].base, ps[i].st, ps[i].b, ps[i].e)) found.store(true);
  });
  return at::scalar_tensor(found.load(), at::TensorOptions().dtype(at::kBool));
}

// ------------------------------------------------------------------------------------------ update
struct LayerArgs {
  Work w;
  at::Tensor mask, score;
  int64_t n_keep, n_grow;
  std::vector<Work*> states;
  Work* grad = nullptr;
};

// Number of active positions of a mask (bytes are 0/1).
int64_t count_active(const uint8_t* mp, int64_t n) {
  return at::parallel_reduce(0, n, kGrain, int64_t(0), [&](int64_t b, int64_t e, int64_t acc) {
    uint64_t s = 0;
    for (int64_t i = b; i < e; ++i) s += mp[i];
    return acc + static_cast<int64_t>(s);
  }, std::plus<int64_t>());
}

// Which positions are kept. A small keep set is selected directly (top n_keep |w|, lower index first);
// a large one as its complement, the n_active - n_keep smallest |w| dropped with the higher index dropped
// first (the same set), so the selection only ever looks for the smaller side.
struct Keep {
  Sel sel;
  bool drop_form;
  // chosen for an active position with key `key` at index i
  inline bool kept(int64_t key, int64_t i) const {
    return drop_form ? !sel.chosen(kKeyMax - key, i) : sel.chosen(key, i);
  }
  // U with kept(key, i) == (key > U) over the block, or false if a tie cutoff falls inside it
  inline bool block_threshold(int64_t b, int64_t e, int64_t& U) const {
    int64_t u;
    if (!sel.block_threshold(b, e, u)) return false;
    U = drop_form ? kKeyMax - u - 1 : u;  // not (kKeyMax - key > u)  <=>  key > kKeyMax - u - 1
    return true;
  }
};

template <typename W, typename S>
void update_layer(LayerArgs& L) {
  const int64_t n = L.mask.numel();
  W* wp = L.w.work.mutable_data_ptr<W>();
  const S* sp = L.score.const_data_ptr<S>();
  uint8_t* mp = reinterpret_cast<uint8_t*>(L.mask.mutable_data_ptr<bool>());

  const int64_t n_active = count_active(mp, n);
  TORCH_CHECK(L.n_keep <= n_active, "rigl_fast: n_keep (", L.n_keep, ") exceeds the active count (", n_active, ")");
  Keep keep{sel_all(), false};
  if (L.n_keep < n_active) {
    keep.drop_form = 2 * L.n_keep > n_active;
    // kKeyMax - key == kKeyMax ^ key on [0, kKeyMax]; the key loops are written branch-free (bit ops, no
    // ternaries) because GCC will not if-convert them otherwise, and they are the bulk of the update.
    const uint32_t flip = keep.drop_form ? static_cast<uint32_t>(kKeyMax) : 0u;
    keep.sel = select_top(n, keep.drop_form ? n_active - L.n_keep : L.n_keep, !keep.drop_form,
                          [&](int64_t b, int64_t len, int32_t* __restrict out) {
      const W* __restrict w = wp + b;
      const uint8_t* __restrict m = mp + b;
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t active = 0u - static_cast<uint32_t>(m[j]);
        out[j] = static_cast<int32_t>(((abs_key(w[j]) ^ flip) & active) | ~active);  // inactive -> -1
      }
    });
  }
  // grow: the n_grow largest |score| among positions not kept
  const Sel grow = select_top(n, L.n_grow, true, [&](int64_t b, int64_t len, int32_t* __restrict out) {
    const W* __restrict w = wp + b;
    const S* __restrict sc = sp + b;
    const uint8_t* __restrict m = mp + b;
    int64_t ku;
    if (keep.block_threshold(b, b + len, ku)) {
      const int32_t k32 = static_cast<int32_t>(ku);
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t kept = static_cast<uint32_t>(m[j]) &
                              static_cast<uint32_t>(static_cast<int32_t>(abs_key(w[j])) > k32);
        out[j] = static_cast<int32_t>(abs_key(sc[j]) | (0u - kept));  // kept -> -1
      }
    } else {
      for (int64_t j = 0; j < len; ++j)
        out[j] = (m[j] && keep.kept(abs_key(w[j]), b + j)) ? -1 : static_cast<int32_t>(abs_key(sc[j]));
    }
  });

  struct Dst { char* p; int64_t bytes; };
  std::vector<Dst> states;
  for (Work* s : L.states) states.push_back({static_cast<char*>(s->work.data_ptr()), s->work.element_size()});
  char* gp = L.grad ? static_cast<char*>(L.grad->work.data_ptr()) : nullptr;
  const int64_t gbytes = L.grad ? L.grad->work.element_size() : 0;

  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    alignas(64) uint8_t both[kBlock], nw[kBlock];
    for (int64_t s = b; s < e; s += kBlock) {
      const int64_t len = std::min(kBlock, e - s);
      int64_t ku, gu;
      if (keep.block_threshold(s, s + len, ku) && grow.block_threshold(s, s + len, gu)) {
        // keys are in [0, kKeyMax], thresholds in [-1, kKeyMax]: int32 compares, which vectorise
        const int32_t k32 = static_cast<int32_t>(ku), g32 = static_cast<int32_t>(gu);
        for (int64_t j = 0; j < len; ++j) {
          const uint8_t old = mp[s + j];
          const uint8_t k = old & static_cast<uint8_t>(static_cast<int32_t>(abs_key(wp[s + j])) > k32);
          const uint8_t g = static_cast<uint8_t>(static_cast<int32_t>(abs_key(sp[s + j])) > g32) & (k ^ 1);
          nw[j] = k | g;
          both[j] = (k | g) & old;
        }
      } else {
        for (int64_t j = 0; j < len; ++j) {
          const int64_t i = s + j;
          const bool old = mp[i];
          const bool k = old && keep.kept(abs_key(wp[i]), i);
          const bool g = !k && grow.chosen(abs_key(sp[i]), i);
          nw[j] = k | g;
          both[j] = nw[j] & old;
        }
      }
      select_bits_inplace<sizeof(W)>(wp + s, both, len);
      for (const Dst& d : states) select_inplace_any(d.p + s * d.bytes, both, len, d.bytes);
      if (gp) select_inplace_any(gp + s * gbytes, nw, len, gbytes);
      std::memcpy(mp + s, nw, len);
    }
  });
}

#define RIGL_DISPATCH_FLOAT(TYPE, NAME, ...)                                             \
  [&] {                                                                                  \
    switch (TYPE) {                                                                      \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }                     \
      case at::kDouble: { using NAME = double; return __VA_ARGS__(); }                   \
      case at::kHalf: { using NAME = at::Half; return __VA_ARGS__(); }                   \
      case at::kBFloat16: { using NAME = at::BFloat16; return __VA_ARGS__(); }           \
      default: TORCH_CHECK(false, "rigl_fast: update supports float32/float64/float16/bfloat16, got ", TYPE); \
    }                                                                                    \
  }()

void update(at::TensorList weights, at::TensorList masks, at::TensorList scores, at::IntArrayRef n_keep,
            at::IntArrayRef n_grow, at::TensorList states, at::IntArrayRef state_layer, at::TensorList grads,
            at::IntArrayRef grad_layer) {
  const size_t L = weights.size();
  TORCH_CHECK(masks.size() == L && scores.size() == L && n_keep.size() == L && n_grow.size() == L,
              "rigl_fast: update needs one mask, score, n_keep and n_grow per weight");
  TORCH_CHECK(states.size() == state_layer.size() && grads.size() == grad_layer.size(),
              "rigl_fast: update needs one layer index per state and per grad");
  // Works live in deques-by-index so the pointers in LayerArgs stay valid.
  std::vector<std::unique_ptr<Work>> state_ws, grad_ws;
  std::vector<LayerArgs> layers;
  layers.reserve(L);
  for (size_t i = 0; i < L; ++i) {
    check_mask(weights[i], masks[i], "weights");
    TORCH_CHECK(scores[i].sizes() == weights[i].sizes(), "rigl_fast: score ", i, " has shape ", scores[i].sizes(),
                ", its weight ", weights[i].sizes());
    const int64_t n = weights[i].numel();
    TORCH_CHECK(n_keep[i] >= 0 && n_grow[i] >= 0 && n_keep[i] + n_grow[i] <= n,
                "rigl_fast: layer ", i, " needs 0 <= n_keep, n_grow and n_keep + n_grow <= numel (", n,
                "), got n_keep=", n_keep[i], " n_grow=", n_grow[i]);
    layers.push_back(LayerArgs{Work(weights[i]), masks[i], scores[i].contiguous(), n_keep[i], n_grow[i], {}, nullptr});
  }
  for (size_t j = 0; j < states.size(); ++j) {
    const int64_t l = state_layer[j];
    TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(L), "rigl_fast: state layer index out of range");
    check_mask(states[j], masks[l], "states");
    state_ws.push_back(std::make_unique<Work>(states[j]));
    layers[l].states.push_back(state_ws.back().get());
  }
  for (size_t j = 0; j < grads.size(); ++j) {
    const int64_t l = grad_layer[j];
    TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(L), "rigl_fast: grad layer index out of range");
    TORCH_CHECK(layers[l].grad == nullptr, "rigl_fast: layer ", l, " got two grads");
    check_mask(grads[j], masks[l], "grads");
    grad_ws.push_back(std::make_unique<Work>(grads[j]));
    layers[l].grad = grad_ws.back().get();
  }
  // Layers run one after another, each parallel inside: a layer's operands stay in the shared L3 across
  // its selection passes, and small layers cost no fork.
  for (auto& la : layers) {
    RIGL_DISPATCH_FLOAT(la.w.work.scalar_type(), W, [&] {
      RIGL_DISPATCH_FLOAT(la.score.scalar_type(), S, [&] { update_layer<W, S>(la); });
    });
  }
  for (auto& la : layers) la.w.finish();
  for (auto& s : state_ws) s->finish();
  for (auto& g : grad_ws) g->finish();
}

}  // namespace

TORCH_LIBRARY(rigl_fast, m) {
  m.def("mask_grad(Tensor grad, Tensor mask, Tensor(a!)? acc, int n) -> Tensor");
  m.def("apply_masks(Tensor(a!)[] tensors, Tensor[] masks) -> ()");
  m.def("any_nonfinite(Tensor[] tensors) -> Tensor");
  m.def("update(Tensor(a!)[] weights, Tensor(b!)[] masks, Tensor[] scores, int[] n_keep, int[] n_grow, "
        "Tensor(c!)[] states, int[] state_layer, Tensor(d!)[] grads, int[] grad_layer) -> ()");
}

TORCH_LIBRARY_IMPL(rigl_fast, CPU, m) {
  m.impl("mask_grad", &mask_grad);
  m.impl("apply_masks", &apply_masks);
  m.impl("any_nonfinite", &any_nonfinite);
  m.impl("update", &update);
}

}  // namespace rigl_fast

// Lets setup.py's prebuilt `rigl_fast._C` be imported as a module; importing it registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
