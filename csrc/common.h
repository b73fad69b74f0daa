// Declarations shared by the op registrations (rigl_ops.cpp, export_kernels.cpp) and the kernels, which are compiled
// once per instruction set (*_base.cpp, *_avx2.cpp) into namespaces of their own and picked at run time.
//
// Everything defined in this header is compiled for the baseline instruction set: it is parsed before any
// `#pragma GCC target`, so its out-of-line copies are the same in every translation unit; code inlined from
// it into an AVX2 kernel is compiled for AVX2 there.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>  // _mm_stream_ps, _mm_sfence (product_kernels.h); baseline SSE, parsed before any target switch
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RIGL_FAST_HAVE_AVX2 1
#include <immintrin.h>  // the AVX2 intrinsics of *_avx2.cpp (product_kernels.h); parsed here, at the baseline
#else
#define RIGL_FAST_HAVE_AVX2 0
#endif

namespace at {
class Tensor;
}

namespace rigl_fast {

constexpr int64_t kKeyMax = 0x7fffffff;
// Positions per span of the multi-tensor loops (spans): how finely work is cut, not how many threads run it.
constexpr int64_t kGrain = 1 << 15;

// ------------------------------------------------------------------------------------------ threads
// Every parallel loop chooses its thread count by the size of its work: clamp(work / kThreadWork, 1, threads),
// work counted in element passes (reading, masking and writing one element is about 1). kThreadWork is about half a
// millisecond of one thread's masking, so a call under about a millisecond runs on the calling thread alone. Larger
// calls (below kRegionWork, outside a TrainingRegion: both below) share chunks with helper threads that the caller
// never waits for unless they claimed one (ChunkState), not an OpenMP region: a region waits for every thread of the
// pool, and where another process's threads spin on the cores, waking one costs a scheduler time slice
// (milliseconds). Sub-millisecond kernels took 6-30x their quiet time that way, and calls of a few milliseconds
// stalled at 8 or 16 ms (issue 21).
constexpr int64_t kThreadWork = 1 << 19;
// From this much work (about 8 ms of one thread) the chunks are shared in an OpenMP region instead, on
// torch's own pool: right after one of torch's parallel ops (a matmul, an elementwise op, an optimizer step) that
// pool's threads spin for a while before they sleep, and a helper from the inter-op pool then shares a core with a
// spinning thread and does little of the work. Measured on 2 vCPUs (an MLP step of 4 sparse-computed 2048x2048
// layers at batch 256, compute='sparse'): 112 and 87 ms per step with the region against 127 and 119 ms with the
// helpers, and under the competing process of issue 21 293 and 287 ms against 350 and 431 ms. At this size a
// region's wait for a descheduled thread is a fraction of the call; below it the helpers keep their advantage (every
// exported product of the bench's batch-1 grid, up to 4096x4096 at 80%, stays below it).
constexpr int64_t kRegionWork = 16 * kThreadWork;

// Inside a TrainingRegion (the sparse-compute products of training, export_kernels.cpp's *_t ops) every call worth
// more than one thread shares its chunks in an OpenMP region, whatever its size: those products run between torch's
// own parallel ops, so torch's OpenMP threads are spinning when they start, and an inter-op helper that claimed a
// chunk can lose its core to one, the caller then waiting for that chunk. Measured on 2 vCPUs: the row-by-row
// weight gradient of a 2048x2048 layer at 95%, batch 256, right after the input-gradient product took 6.4 ms on two
// threads with helpers, 5.1 ms on one thread, about 2.5 ms in a region. For the same reason a region is cheap there
// (its threads are awake), so two threads run from half the work (kThreadWork / 2, about a quarter of a millisecond
// of one thread): a 1024x1024 layer at 95%, batch 64, timed op by op in a training loop, took 1.15-1.18 ms a call
// against 1.30-1.55 ms (the forward product 0.15 against 0.21-0.24 ms, the weight gradient 0.22-0.26 against
// 0.39-0.43 ms).
inline bool& training_region() {
  static thread_local bool on = false;
  return on;
}
struct TrainingRegion {
  bool old;
  TrainingRegion() : old(training_region()) { training_region() = true; }
  ~TrainingRegion() { training_region() = old; }
};

// How many parallel loops ran on more than one thread since this library loaded: diagnostics, the tests check that
// small calls open none (torch.ops.rigl_fast.parallel_regions). One counter per library: inline.
inline std::atomic<int64_t>& parallel_regions() {
  static std::atomic<int64_t> count{0};
  return count;
}

// The threads for `work` element passes in all.
inline int64_t threads_for(int64_t work) {
  return std::clamp<int64_t>(work / kThreadWork, 1, std::max(1, at::get_num_threads()));
}

// Shares the work of a parallel call: chunks claimed one at a time from a counter by the calling thread and by
// helpers from torch's inter-op pool. Unlike an OpenMP region, nothing waits for a helper that has not started: the
// caller runs whatever chunks are left, and waits only for chunks already claimed (each a small part of the call).
// A helper that starts after the call has returned finds no chunk and leaves without touching the call's data; the
// state it reads is shared, kept alive by the helper's own reference.
struct ChunkState {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
  std::function<void(int64_t)> run;  // the call's chunk c: only called on a claimed chunk, while the call waits
  std::atomic<bool> failed{false};
  std::exception_ptr error;

  void work() {
    c10::ParallelGuard guard(true);  // parallel loops inside a chunk run inline, as inside an OpenMP region
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      try {
        run(c);
      } catch (...) {
        if (!failed.exchange(true)) error = std::current_exception();
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// fn(first, last) over [0, n), items that take `work` element passes in all, on up to threads_for(work) threads
// (threads_for(2 work) inside a TrainingRegion) (ChunkState), or in one call on this thread.
template <typename Fn>
inline void parallel_tasks(int64_t n, int64_t work, const Fn& fn) {
  if (n <= 0) return;
  const bool twice = training_region() && work <= std::numeric_limits<int64_t>::max() / 2;  // see training_region
  const int64_t threads = std::min(threads_for(twice ? 2 * work : work), n);
  if (threads == 1 || c10::ParallelGuard::is_enabled() || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  parallel_regions().fetch_add(1, std::memory_order_relaxed);
  auto st = std::make_shared<ChunkState>();
  st->chunks = std::min(n, 8 * threads);  // small enough for the caller to take over a late helper's share
  st->run = [&fn, n, chunks = st->chunks](int64_t c) { fn(c * n / chunks, (c + 1) * n / chunks); };
  if (work >= kRegionWork || training_region()) {  // torch's OpenMP threads take the chunks (see kRegionWork)
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { st->work(); });
    st->run = nullptr;
    if (st->failed.load()) std::rethrow_exception(st->error);
    return;
  }
  for (int64_t t = 1; t < threads; ++t) at::launch([st] { st->work(); });
  st->work();
  while (st->done.load(std::memory_order_acquire) < st->chunks) std::this_thread::yield();
  st->run = nullptr;
  if (st->failed.load()) std::rethrow_exception(st->error);
}

// The same for n items of `work_per_item` element passes each.
template <typename Fn>
inline void parallel_work(int64_t n, int64_t work_per_item, const Fn& fn) {
  const int64_t per = std::max<int64_t>(1, work_per_item);
  parallel_tasks(n, n > std::numeric_limits<int64_t>::max() / per ? std::numeric_limits<int64_t>::max() : n * per, fn);
}

// Position i with key `key` is chosen iff key > T, or key == T and i is on the chosen side of `cutoff`
// (i <= cutoff when ties go to lower indices, i >= cutoff otherwise).
struct Sel {
  int64_t T, cutoff;
  bool tie_low;
  inline bool chosen(int64_t key, int64_t i) const {
    return key > T || (key == T && (tie_low ? i <= cutoff : i >= cutoff));
  }
  // For the index block [b, e): U with chosen(key, i) == (key > U) for every i in the block, or false
  // when the tie cutoff falls inside it. Lets the write pass use one integer compare per element.
  inline bool block_threshold(int64_t b, int64_t e, int64_t& U) const {
    if (T < 0 || T > kKeyMax) {
      U = T < 0 ? -1 : kKeyMax;
      return true;
    }
    const bool all = tie_low ? e - 1 <= cutoff : b >= cutoff;
    const bool none = tie_low ? b > cutoff : e - 1 < cutoff;
    if (!all && !none) return false;
    U = all ? T - 1 : T;
    return true;
  }
};

inline Sel sel_none() { return Sel{std::numeric_limits<int64_t>::max(), -1, true}; }
inline Sel sel_all() { return Sel{-1, -1, true}; }

// ------------------------------------------------------------------------------------------ masking
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

// Which positions are kept. A small keep set is selected directly (top n_keep |w|, lower index first);
// a large one as its complement, the n_active - n_keep smallest |w| dropped with the higher index dropped
// first (the same set), so the selection only ever looks for the smaller side. Keys of that selection are
// |w| bits xor `flip` (kKeyMax - |w| bits in the drop form), -1 for inactive positions.
struct Keep {
  Sel sel = sel_all();
  bool drop_form = false;
  // chosen for an active position with |w| key `key` at index i
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

enum class FloatType { f32, f64, f16, bf16 };

// The band method packs a position into 32 bits, so it serves layers of up to 2^32 positions; larger ones take
// the exact path (radix select), which is 64-bit throughout.
constexpr int64_t kBandMaxNumel = int64_t{1} << 32;

// How many selections the band method resolved and how many took the exact radix path, since the library
// loaded (torch.ops.rigl_fast.select_paths(); diagnostics, and the tests check which path ran). One shared
// object: inline, so every translation unit, whatever its instruction set, uses the same counters.
struct SelectPaths {
  std::atomic<int64_t> band{0}, exact{0};
};
inline SelectPaths& select_paths() {
  static SelectPaths counts;
  return counts;
}

// One layer of an update, as raw pointers to contiguous data.
struct LayerView {
  void* w;
  FloatType w_type;
  const void* score;
  FloatType s_type;
  uint8_t* mask;
  int64_t n, n_keep, n_grow;
  bool exact = false;  // skip the band method: layers of more than kBandMaxNumel positions (or a test's knob)
  bool check_score = true;  // false: rigl_ops.cpp checked the score's finiteness itself (an fp64 score made fp32)
  std::vector<std::pair<char*, int64_t>> states;  // (data, element size)
  char* grad = nullptr;
  int64_t grad_bytes = 0;
  Keep keep;  // the selections, written by select_layers
  Sel grow = sel_none();
};

// ------------------------------------------------------------------------------------------ multi-tensor loops
// Positions [b, e) of tensor `layer`. A multi-tensor op cuts every tensor into spans of at most kGrain positions
// and runs one parallel loop over all of them, so many small layers share out as well as one large one.
struct Span {
  int64_t layer, b, e;
};

// The spans of tensors of numel[0], numel[1], ... positions, in tensor and position order (a tensor of 0
// positions has none).
inline std::vector<Span> spans(const std::vector<int64_t>& numel) {
  std::vector<Span> out;
  for (size_t l = 0; l < numel.size(); ++l)
    for (int64_t b = 0; b < numel[l]; b += kGrain)
      out.push_back({static_cast<int64_t>(l), b, std::min(numel[l], b + kGrain)});
  return out;
}

// fn(first, last) over ranges of `sp`'s indices, in parallel.
template <typename Fn>
inline void parallel_spans(const std::vector<Span>& sp, const Fn& fn) {
  int64_t total = 0;
  for (const Span& s : sp) total += s.e - s.b;
  parallel_tasks(static_cast<int64_t>(sp.size()), total, fn);
}

// One shard's values and eligibility flags for the ops of the sharded update. Values are read in flat
// (row-major) order: from `data` directly when contiguous (`strides` empty), else through sizes and strides
// (in elements), a block at a time, so a strided shard needs no contiguous copy.
struct ShardValues {
  const void* data;
  FloatType type;
  int64_t n;
  std::vector<int64_t> sizes, strides;
  const uint8_t* flags;
};

// The units of a structured layer (ops.Units): the weight viewed as (out, fan_in), W2[o, f] at flat position
// o * fan_in + f, or f * out + o when transposed; each row cut into units of `group` consecutive fan-in positions,
// every unit to hold `target` active ones.
struct UnitLayout {
  int64_t out, fan_in;
  bool transposed;
  int64_t group, target;
};

// One exported sparse product (export_kernels.cpp, product_kernels.h): y = x W^T over each row's active
// weights, W given as (value, index) pairs: row o's are [begin, begin + size) with begin = o * k, size = k
// (constant fan-in), or begin = crow[o], size = crow[o + 1] - crow[o] (compressed rows). x is fp32: the row
// (in) when B == 1, else transposed (in, B); y is fp32 (out) when B == 1, else (out, B).
struct ProductView {
  const float* x;
  const void* values;
  FloatType v_type;
  const void* indices;
  bool idx16;             // int16 indices, else int32
  const int64_t* crow;    // nullptr: constant fan-in k
  int64_t k, B, in, out;  // B: the lanes of x's transposed rows (>= batch)
  float* y;               // (batch, out) fp32
  int64_t batch;
};

// One sampled dense-dense product (export_kernels.cpp's sampled_grad, product_kernels.h): y[p] = sum_b gt[rows[p], b] *
// xt[cols[p], b] for each pair p < nnz, accumulated in fp32: the weight gradient of y = x W^T at W's active
// positions. xt is x transposed, (in, ld) fp32, gt the output gradient transposed, (out, ld) fp32, both contiguous.
struct SampledView {
  const float* xt;
  const float* gt;
  const void* rows;
  const void* cols;
  bool rows16, cols16;  // int16 indices, else int32
  int64_t nnz, B, in, out;
  float* y;
  const int64_t* out_index;  // nullptr: pair p's sum goes to y[p]; else to y[out_index[p]] (a dense gradient)
  int64_t y_size;            // y's length (out_index checked against it)
  int64_t ld;                // the row stride of xt and gt (>= B; the lanes past B are not read)
  const int64_t* crow = nullptr;  // rows mode: y is the dense (out, in) result, row r's pairs [crow[r], crow[r+1])
  int y_kind = 0;                 // rows mode: 0 fp32 into y; 1 bf16, 2 fp16 into y16 (rounded once), y unused
  void* y16 = nullptr;
};

// The instruction set whose kernels run: AVX2 where the CPU has it, unless RIGL_FAST_CPU_ISA=base asks for the
// baseline build (read on every call, so tests can compare the two).
inline const char* kernel_isa() {
  const char* env = std::getenv("RIGL_FAST_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "base") == 0) return "base";
#if RIGL_FAST_HAVE_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("bmi2");
  if (avx2) return "avx2";
#endif
  return "base";
}

// The kernel `fn` of the instruction set kernel_isa() picks, as a function pointer.
#if RIGL_FAST_HAVE_AVX2
#define RIGL_FAST_KERNEL(fn) (std::strcmp(kernel_isa(), "avx2") == 0 ? &avx2::fn : &base::fn)
#else
#define RIGL_FAST_KERNEL(fn) (&base::fn)
#endif

// The update kernels of one instruction set: select_layers decides both selections of every layer (and,
// if asked, checks that weights and scores are finite: false if not, with nothing decided); write_layer
// applies a layer's. The kernels of the sharded update (ops.Backend.key_histograms, take_top, commit; the
// flag value is the one of eligible positions): key_histograms adds to out, (layers, 2^bits) int64 row-major;
// take_top writes one bool byte per position to outs[l]; commit_layers writes every layer given its keep and
// grow flags (LayerView's score and counts are unused). The structured update's (ops.Backend.structured_update,
// unit_grow; the grow is per unit): structured_commit grows every unit of layers whose keep select_layers decided
// (with n_grow 0) and writes them; unit_grow writes the grow flags of every unit given keep flags (the shard's
// flags, kept positions flagged) to outs[l]. transpose_rows writes rows [r0, r1) of the fp32 (rows, cols) src
// (row stride rs, unit column stride) as columns of the (cols, ld) dst (export_kernels.cpp: transposed_f32);
// transpose_rows_16 the same from a bf16 (bf16 true) or fp16 src, widened exactly to fp32;
// compress_rows packs the entries of an fp32 weight's rows [r0, r1) that a bit mask selects (take_values),
// compress_rows_16 those of a bf16 / fp16 weight, widened to fp32; round_values rounds fp32 values to bf16 / fp16
// in place (held as fp32).
#define RIGL_FAST_DECLARE_KERNELS(ISA)                                                                       \
  namespace ISA {                                                                                            \
  bool select_layers(std::vector<LayerView>& layers, bool check_finite);                                     \
  void write_layer(LayerView& L);                                                                            \
  void key_histograms(const std::vector<ShardValues>& values, bool flag_value, const int64_t* prefixes,       \
                      int shift, int bits, int64_t* out);                                                    \
  void take_top(const std::vector<ShardValues>& values, bool flag_value, const int64_t* thresholds,          \
                const int64_t* n_ties, const std::vector<uint8_t*>& outs);                                   \
  void commit_layers(const std::vector<LayerView>& layers, const std::vector<const uint8_t*>& keep,          \
                     const std::vector<const uint8_t*>& grow);                                               \
  void structured_commit(const std::vector<LayerView>& layers, const std::vector<UnitLayout>& units);        \
  void unit_grow(const std::vector<ShardValues>& scores, const std::vector<UnitLayout>& units,               \
                 const std::vector<uint8_t*>& outs);                                                         \
  bool sparse_product(const ProductView& p);                                                                 \
  bool sampled_product(const SampledView& s);                                                                \
  void transpose_rows(const float* src, int64_t rs, int64_t cols, float* dst, int64_t ld, int64_t r0,        \
                      int64_t r1);                                                                           \
  void transpose_rows_16(const uint16_t* src, bool bf16, int64_t rs, int64_t cols, float* dst, int64_t ld,    \
                         int64_t r0, int64_t r1);                                                            \
  bool compress_rows(const float* w, int64_t cols, const uint8_t* bits, const int64_t* starts, int64_t r0,   \
                     int64_t r1, float* out);                                                                \
  bool compress_rows_16(const uint16_t* w, bool bf16, int64_t cols, const uint8_t* bits,                   \
                        const int64_t* starts, int64_t r0, int64_t r1, float* out);                          \
  void round_values(float* v, int64_t n, bool bf16);                                                       \
  }
RIGL_FAST_DECLARE_KERNELS(base)
#if RIGL_FAST_HAVE_AVX2
RIGL_FAST_DECLARE_KERNELS(avx2)
#endif

}  // namespace rigl_fast
