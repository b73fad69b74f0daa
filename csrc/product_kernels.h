// The exported sparse products' kernels (ProductView in common.h; the ops are in export_kernels.cpp): a
// gather-multiply-reduce over each row's (value, index) pairs, accumulated in fp32; the gathered inputs are
// never materialised. Compiled once per instruction set like update_kernels.h (the including file defines
// RIGL_ISA and may switch the target first): the batched loop vectorises to 8-wide FMAs under AVX2. Returns
// false when an index is out of range (that row is left at 0; the caller raises). Also the sampled product
// (SampledView, the training's weight gradient at the active positions): a dot product over the batch per pair.
#pragma once

#include "common.h"

namespace rigl_fast {
namespace RIGL_ISA {
namespace {

// batch columns accumulated at once (B > 1): one block of fp32 accumulators stays in registers / L1
constexpr int64_t kBatchBlock = 64;

struct FanInRows {  // (out, k) tables
  int64_t k;
  int64_t begin(int64_t o) const { return o * k; }
  int64_t size(int64_t) const { return k; }
};
struct CSRRows {  // compressed rows, crow checked monotone by the caller
  const int64_t* crow;
  int64_t begin(int64_t o) const { return crow[o]; }
  int64_t size(int64_t o) const { return crow[o + 1] - crow[o]; }
};

template <typename I>
inline uint32_t index_at(const I* ix, int64_t j) {  // negative indices become huge: one unsigned bound check
  return static_cast<uint32_t>(static_cast<int32_t>(ix[j]));
}

// B == 1: a gather-multiply-reduce per output row; four accumulators for instruction-level parallelism. (AVX2
// gathers were tried here and gained nothing: the loop is bound by its loads, one gathered input per weight.)
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
      const uint32_t i0 = index_at(ix, j), i1 = index_at(ix, j + 1), i2 = index_at(ix, j + 2),
                     i3 = index_at(ix, j + 3);
      bad |= (i0 >= in) | (i1 >= in) | (i2 >= in) | (i3 >= in);
      if (bad) break;
      a0 += static_cast<float>(v[j]) * x[i0];
      a1 += static_cast<float>(v[j + 1]) * x[i1];
      a2 += static_cast<float>(v[j + 2]) * x[i2];
      a3 += static_cast<float>(v[j + 3]) * x[i3];
    }
    for (; !bad && j < k; ++j) {
      const uint32_t i0 = index_at(ix, j);
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

using Float8 = float __attribute__((vector_size(32)));

inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

inline void store8(float* p, Float8 v) { std::memcpy(p, &v, sizeof v); }

// One full block of kBatchBlock = 64 lanes of one row: eight 8-lane accumulators held in registers across the
// row's pairs (a float[64] array here was kept in memory, a load and a store per vector and pair: 2-3x slower).
// False when an index is out of range (out then untouched).
template <typename V, typename I>
inline bool row_block64(const float* xt, const V* v, const I* ix, int64_t k, int64_t in, int64_t B, float* out) {
  Float8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
  for (int64_t j = 0; j < k; ++j) {
    const uint32_t i = index_at(ix, j);
    if (i >= in) return false;
    const float vj = static_cast<float>(v[j]);
    const float* xr = xt + static_cast<int64_t>(i) * B;
    if (j + 8 < k) {  // the row of xt eight pairs ahead, its four cache lines (~10% at 2048x2048; clamped: a bad
                      // index is reported by its own pair)
      const float* nx = xt + static_cast<int64_t>(std::min<uint32_t>(index_at(ix, j + 8), in - 1)) * B;
      __builtin_prefetch(nx);
      __builtin_prefetch(nx + 16);
      __builtin_prefetch(nx + 32);
      __builtin_prefetch(nx + 48);
    }
    a0 += vj * load8(xr);
    a1 += vj * load8(xr + 8);
    a2 += vj * load8(xr + 16);
    a3 += vj * load8(xr + 24);
    a4 += vj * load8(xr + 32);
    a5 += vj * load8(xr + 40);
    a6 += vj * load8(xr + 48);
    a7 += vj * load8(xr + 56);
  }
  store8(out, a0);
  store8(out + 8, a1);
  store8(out + 16, a2);
  store8(out + 24, a3);
  store8(out + 32, a4);
  store8(out + 40, a5);
  store8(out + 48, a6);
  store8(out + 56, a7);
  return true;
}

// Rows per batched work item: their outputs meet in a (kBatchBlock, kRowGroup) tile in L1, written to y (batch,
// n_rows) as runs of kRowGroup floats, one cache line a batch row. Written a row at a time instead (a column of y:
// nb floats n_rows apart), the nb lines of a column share one L1 set when n_rows is a power of two and evicted each
// other at every row: 2.4x slower at 1024x1024, batch 64, 95% sparse, than at 1019 rows.
constexpr int64_t kRowGroup = 16;

// B > 1: xt is x transposed, (in, B) fp32 (B lanes a row, >= batch; lanes past batch are not computed), so each
// gathered input is a contiguous vector of lanes; y is (batch, n_rows) fp32. Work item w = (batch block, group of
// kRowGroup rows): acc[b] += v * xt[idx, b0 + b] per row (vectorised by the compiler; fused multiply-adds where the
// instruction set has them), then the group's tile written to y.
template <typename V, typename I, typename Rows>
bool rows_batched(const float* xt, const V* values, const I* indices, float* y, int64_t in, const Rows& rows,
                  int64_t B, int64_t batch, int64_t n_rows, int64_t w0, int64_t w1) {
  bool ok = true;
  const int64_t n_groups = (n_rows + kRowGroup - 1) / kRowGroup;
  alignas(32) float acc[kBatchBlock];
  alignas(64) float tile[kBatchBlock * kRowGroup];
  for (int64_t w = w0; w < w1; ++w) {
    // block-major: a thread's consecutive items share one batch block, whose (in, kBatchBlock) slice of xt
    // (in * 256 bytes) can stay in its L2 while the rows are walked (against row-major items, which cycle
    // through all of xt, it measured about the same here: kept for the larger batches)
    const int64_t o0 = (w % n_groups) * kRowGroup, ng = std::min(kRowGroup, n_rows - o0);
    const int64_t b0 = (w / n_groups) * kBatchBlock;
    const int64_t nb = std::min(kBatchBlock, B - b0), nw = std::min(nb, batch - b0);
    for (int64_t r = 0; r < ng; ++r) {
      const int64_t o = o0 + r;
      const V* v = values + rows.begin(o);
      const I* ix = indices + rows.begin(o);
      const int64_t k = rows.size(o);
      bool row_ok = true;
      if (nb == kBatchBlock) {  // the common case
        row_ok = row_block64(xt + b0, v, ix, k, in, B, acc);
      } else {  // the last, partial block
        std::fill(acc, acc + nb, 0.f);
        for (int64_t j = 0; j < k; ++j) {
          const uint32_t i = index_at(ix, j);
          if (i >= in) {
            row_ok = false;
            break;
          }
          const float vj = static_cast<float>(v[j]);
          const float* __restrict__ xr = xt + static_cast<int64_t>(i) * B + b0;
#pragma GCC ivdep
          for (int64_t b = 0; b < nb; ++b) acc[b] += vj * xr[b];
        }
      }
      if (!row_ok) {
        ok = false;
        std::fill(acc, acc + nb, 0.f);
      }
      for (int64_t b = 0; b < nw; ++b) tile[b * kRowGroup + r] = acc[b];
    }
    if (ng == kRowGroup) {  // a fixed-size copy (inlined as vector moves; a call of memcpy per batch row was 1.3x
                            // slower in all)
      for (int64_t b = 0; b < nw; ++b)
        std::memcpy(y + (b0 + b) * n_rows + o0, tile + b * kRowGroup, kRowGroup * sizeof(float));
    } else {
      for (int64_t b = 0; b < nw; ++b) std::memcpy(y + (b0 + b) * n_rows + o0, tile + b * kRowGroup, ng * sizeof(float));
    }
  }
  return ok;
}

template <typename V, typename I, typename Rows>
bool run_product(const ProductView& p, const Rows& rows) {
  const V* v = static_cast<const V*>(p.values);
  const I* ix = static_cast<const I*>(p.indices);
  // pairs per row, for the parallel grain (compressed rows: the mean)
  const int64_t per_row = std::max<int64_t>(1, p.crow ? (p.out ? p.crow[p.out] / p.out : 1) : p.k);
  std::atomic<bool> ok{true};
  // threads by the work (common.h: threads_for), a (value, index) pair counted as one element pass; batched, a pair
  // covers up to kBatchBlock lanes in vectors of 4 to 8
  if (p.B == 1) {
    parallel_work(p.out, per_row, [&](int64_t o0, int64_t o1) {
      if (!rows_b1<V, I>(p.x, v, ix, p.y, p.in, rows, o0, o1)) ok = false;
    });
  } else {
    const int64_t n_blocks = (p.batch + kBatchBlock - 1) / kBatchBlock;  // none of padding lanes only
    const int64_t n_groups = (p.out + kRowGroup - 1) / kRowGroup;
    parallel_work(n_groups * n_blocks, kRowGroup * per_row * std::max<int64_t>(1, std::min(p.B, kBatchBlock) / 4),
                  [&](int64_t w0, int64_t w1) {
      if (!rows_batched<V, I>(p.x, v, ix, p.y, p.in, rows, p.B, p.batch, p.out, w0, w1)) ok = false;
    });
  }
  return ok.load();
}

template <typename V, typename Rows>
bool run_index(const ProductView& p, const Rows& rows) {
  return p.idx16 ? run_product<V, int16_t>(p, rows) : run_product<V, int32_t>(p, rows);
}

template <typename Rows>
bool run_values(const ProductView& p, const Rows& rows) {
  switch (p.v_type) {
    case FloatType::f32: return run_index<float>(p, rows);
    case FloatType::f64: return run_index<double>(p, rows);
    case FloatType::f16: return run_index<c10::Half>(p, rows);
    default: return run_index<c10::BFloat16>(p, rows);
  }
}

// sampled_product: one dot product of two contiguous B-vectors per pair, in 32 fp32 partial sums: four 8-lane
// vectors (GCC/Clang vector extensions; under AVX2 four independent fused multiply-adds, which keep the loads busy),
// the last B % 8 lanes in a scalar sum. A fixed reduction tree at the end. Each product's place in the sum depends
// only on b and B, so the result is the same on any thread count (a pair is one thread's) and, but for the fusing
// of multiply-adds (AVX2 fuses, the baseline does not), on either instruction set. The accumulators stay in
// registers: a float[32] array here was spilled around the tail and reduction (3x slower at B = 64).
// Q dot products g . xs[q] of n lanes sharing g (pairs of one row of the weight): per pair, chunk c of 8 lanes goes to
// accumulator c % 2, the last n % 8 lanes to a scalar sum, then a fixed tree. Each pair's arithmetic is the same for
// any Q, so grouping (which depends on where a thread's range starts) never changes a result. Loads per multiply-
// add: (1 + Q) / Q, 2 for a single pair; 2 Q vector accumulators (16 registers at Q = 4 with the two of g).
template <int Q>
inline void dot_group(const float* __restrict__ g, const float* const* xs, int64_t n, float* sums) {
  Float8 a[Q], b[Q];
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q) a[q] = b[q] = Float8{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const Float8 g0 = load8(g + i), g1 = load8(g + i + 8);
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      a[q] += g0 * load8(xs[q] + i);
      b[q] += g1 * load8(xs[q] + i + 8);
    }
  }
  if (i + 8 <= n) {
    const Float8 g0 = load8(g + i);
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) a[q] += g0 * load8(xs[q] + i);
    i += 8;
  }
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q) {
    float tail = 0.f;
    for (int64_t j = i; j < n; ++j) tail += g[j] * xs[q][j];
    const Float8 t = a[q] + b[q];
    const float r0 = t[0] + t[4], r1 = t[1] + t[5], r2 = t[2] + t[6], r3 = t[3] + t[7];
    sums[q] = ((r0 + r2) + (r1 + r3)) + tail;
  }
}

// Pairs [p0, p1); an out-of-range pair (or output position) is skipped and makes the result false.
template <typename IR, typename IC>
bool sampled_pairs(const SampledView& s, int64_t p0, int64_t p1) {
  const IR* rows = static_cast<const IR*>(s.rows);
  const IC* cols = static_cast<const IC*>(s.cols);
  bool ok = true;
  for (int64_t p = p0; p < p1; ++p) {
    const uint32_t r = index_at(rows, p), c = index_at(cols, p);
    const int64_t at = s.out_index ? s.out_index[p] : p;
    if (r >= s.out || c >= s.in || static_cast<uint64_t>(at) >= static_cast<uint64_t>(s.y_size)) {
      ok = false;
      continue;  // the op raises
    }
    const float* g = s.gt + static_cast<int64_t>(r) * s.ld;
    // up to four pairs of this row at once (compressed rows keep a row's pairs together), all in range
    int q = 1;
    while (q < 4 && p + q < p1 && index_at(rows, p + q) == r && index_at(cols, p + q) < s.in &&
           static_cast<uint64_t>(s.out_index ? s.out_index[p + q] : p + q) < static_cast<uint64_t>(s.y_size))
      ++q;
    if (q < 4) {
      const float* x1[1] = {s.xt + static_cast<int64_t>(c) * s.ld};
      dot_group<1>(g, x1, s.B, &s.y[at]);
      continue;
    }
    const float* xs[4];
    float sums[4];
    for (int u = 0; u < 4; ++u) xs[u] = s.xt + static_cast<int64_t>(index_at(cols, p + u)) * s.ld;
    dot_group<4>(g, xs, s.B, sums);
    for (int u = 0; u < 4; ++u) s.y[s.out_index ? s.out_index[p + u] : p + u] = sums[u];
    p += 3;
  }
  return ok;
}

// Columns of a gradient row built at once in an L1 buffer (16 KiB) and then copied to y.
constexpr int64_t kRowChunk = 4096;

// dst[0, n) = src[0, n) with streaming stores where dst is 16-byte aligned (x86): the dense gradient is written
// once and read next by the optimizer, not by this thread, so its lines are not read in first (a normal store
// reads each line before writing it) nor kept in cache. The caller fences (stream_fence) before it returns.
inline void stream_copy(float* dst, const float* src, int64_t n) {
#if defined(__SSE__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
}

inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();  // streaming stores are weakly ordered: visible to other threads after this
#endif
}

// fp32 rounded to bf16 (K = 1) or fp16 (K = 2) bits, to nearest even, as ATen's conversions round (a NaN: c10's).
template <int K>
inline uint16_t narrow(float v) {
  if constexpr (K == 1) return c10::BFloat16(v).x;
  else return c10::Half(v).x;
}

#if defined(RIGL_ISA_AVX2)
// Eight fp32 values rounded to bf16 as narrow<1> rounds, their bits in the low halves of the 32-bit lanes:
// (u + 0x7FFF + bit 16 of u) >> 16, a NaN 0x7FC0.
inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
#endif

// stream_copy into a bf16 / fp16 destination, rounding each value (narrow). AVX2 and bf16: sixteen values a step,
// rounded in registers and streamed where dst is 32-byte aligned; the rest one at a time with plain stores.
template <int K>
inline void stream_copy_16(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(RIGL_ISA_AVX2)
  if (K == 1 && (reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    for (; i + 16 <= n; i += 16) {
      const __m256i lo = bf16_bits8(_mm256_loadu_ps(src + i)), hi = bf16_bits8(_mm256_loadu_ps(src + i + 8));
      // packus interleaves the 128-bit lanes (lo0 hi0 lo1 hi1): the permute puts them in order
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), packed);
    }
  }
#endif
  for (; i < n; ++i) dst[i] = narrow<K>(src[i]);
}

// Rows mode (s.crow): rows [r0, r1) of the dense (out, in) result y. Each row is built kRowChunk columns at a time
// in an L1 buffer (zeroed, then given the pairs' sums) and stream-copied to y: one write of y and no read of it
// (zeroing y in place and then writing the sums into it read each of its lines from memory first: 1.3x slower at
// 2048x2048, batch 256). The pairs of row r are [crow[r], crow[r + 1]) with columns cols[p], ascending (Tables
// builds them so; an unsorted row is still exact, through the slow path below); the same arithmetic per pair as
// sampled_pairs. K (s.y_kind): 0 writes fp32 y; 1 / 2 write bf16 / fp16 y16, each sum rounded once as it is streamed
// out (a bf16 weight's gradient, without an fp32 one written and converted after).
template <typename IC, int K>
bool sampled_rows(const SampledView& s, int64_t r0, int64_t r1) {
  const IC* cols = static_cast<const IC*>(s.cols);
  bool ok = true;
  alignas(64) float buf[kRowChunk];
  for (int64_t r = r0; r < r1; ++r) {
    float* yr = K == 0 ? s.y + r * s.in : nullptr;
    uint16_t* yr16 = K == 0 ? nullptr : static_cast<uint16_t*>(s.y16) + r * s.in;
    const float* g = s.gt + r * s.ld;
    const int64_t e = s.crow[r + 1];
    int64_t p = s.crow[r];
    for (int64_t c0 = 0; c0 < s.in; c0 += kRowChunk) {
      const int64_t c1 = std::min(s.in, c0 + kRowChunk);
      std::fill(buf, buf + (c1 - c0), 0.f);
      // this chunk's pairs: the ascending run with columns in [c0, c1)
      auto in_chunk = [&](int64_t q) {
        const uint32_t c = index_at(cols, q);
        return c >= static_cast<uint64_t>(c0) && c < static_cast<uint64_t>(c1);
      };
      while (p < e && in_chunk(p)) {
        if (p + 4 <= e && in_chunk(p + 1) && in_chunk(p + 2) && in_chunk(p + 3)) {
          const uint32_t c[4] = {index_at(cols, p), index_at(cols, p + 1), index_at(cols, p + 2),
                                 index_at(cols, p + 3)};
          const float* xs[4] = {s.xt + c[0] * s.ld, s.xt + c[1] * s.ld, s.xt + c[2] * s.ld, s.xt + c[3] * s.ld};
          float sums[4];
          dot_group<4>(g, xs, s.B, sums);
          for (int u = 0; u < 4; ++u) buf[c[u] - c0] = sums[u];
          p += 4;
          continue;
        }
        const uint32_t c = index_at(cols, p++);
        const float* x1[1] = {s.xt + static_cast<int64_t>(c) * s.ld};
        dot_group<1>(g, x1, s.B, &buf[c - c0]);
      }
      if constexpr (K == 0) stream_copy(yr + c0, buf, c1 - c0);
      else stream_copy_16<K>(yr16 + c0, buf, c1 - c0);
    }
    if (p < e) {  // pairs out of order or out of range: the rest of the row written directly (exact, slower)
      stream_fence();  // after the streamed chunks, which these stores may overwrite
      for (; p < e; ++p) {
        const uint32_t c = index_at(cols, p);
        if (c >= s.in) {
          ok = false;  // the op raises
          continue;
        }
        const float* x1[1] = {s.xt + static_cast<int64_t>(c) * s.ld};
        float sum;
        dot_group<1>(g, x1, s.B, &sum);
        if constexpr (K == 0) yr[c] = sum;
        else yr16[c] = narrow<K>(sum);
      }
    }
  }
  stream_fence();
  return ok;
}

template <typename IR, typename IC>
bool run_sampled(const SampledView& s) {
  std::atomic<bool> ok{true};
  // threads by the work (common.h: threads_for), in element passes (about a nanosecond each): a pair takes about
  // 1 ns per 8 lanes from L2 (more from L3, for large B), plus its indices and reduction
  parallel_work(s.nnz, 2 + s.B / 8, [&](int64_t p0, int64_t p1) {
    if (!sampled_pairs<IR, IC>(s, p0, p1)) ok = false;
  });
  return ok.load();
}

// dst[c * ld + i] = src[i * rs + c] for the 8x8 block at src, dst. AVX2: eight row loads, the unpack/shuffle/permute
// transpose in registers, eight row stores; baseline: four SSE 4x4 transposes. Each writes 32 contiguous bytes
// per dst row and reads 32 per src row: 2-3x the speed of 4x4 blocks over 32x32 tiles, whose 32 src rows 4 KiB
// apart (1024 columns) share one L1 set, and about a plain copy's speed.
inline void transpose8(const float* src, int64_t rs, float* dst, int64_t ld) {
#if defined(RIGL_ISA_AVX2)
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + rs), r2 = _mm256_loadu_ps(src + 2 * rs);
  __m256 r3 = _mm256_loadu_ps(src + 3 * rs), r4 = _mm256_loadu_ps(src + 4 * rs), r5 = _mm256_loadu_ps(src + 5 * rs);
  __m256 r6 = _mm256_loadu_ps(src + 6 * rs), r7 = _mm256_loadu_ps(src + 7 * rs);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + ld, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld, _mm256_permute2f128_ps(s3, s7, 0x31));
#elif defined(__SSE__)
  for (int64_t i = 0; i < 8; i += 4)
    for (int64_t c = 0; c < 8; c += 4) {
      const float* s = src + i * rs + c;
      __m128 q0 = _mm_loadu_ps(s), q1 = _mm_loadu_ps(s + rs);
      __m128 q2 = _mm_loadu_ps(s + 2 * rs), q3 = _mm_loadu_ps(s + 3 * rs);
      _MM_TRANSPOSE4_PS(q0, q1, q2, q3);
      float* d = dst + c * ld + i;
      _mm_storeu_ps(d, q0);
      _mm_storeu_ps(d + ld, q1);
      _mm_storeu_ps(d + 2 * ld, q2);
      _mm_storeu_ps(d + 3 * ld, q3);
    }
#else
  for (int64_t i = 0; i < 8; ++i)
    for (int64_t c = 0; c < 8; ++c) dst[c * ld + i] = src[i * rs + c];
#endif
}

// For each byte of a mask, the positions of its set bits, in order (a left-packing permutation for 8 lanes).
struct CompressTable {
  alignas(32) int32_t idx[256][8];
  constexpr CompressTable() : idx{} {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j)
        if ((m >> j) & 1) idx[m][k++] = j;
    }
  }
};
inline constexpr CompressTable kCompress{};

}  // namespace

// Float element kinds of the weights and inputs these kernels widen to fp32: 0 fp32, 1 bf16, 2 fp16 (the 16-bit
// ones passed as their bits).
template <int K>
using Elem = std::conditional_t<K == 0, float, uint16_t>;

// An element's value as fp32, exactly (bf16 is the high half of an fp32).
template <int K>
inline float widen(Elem<K> v) {
  if constexpr (K == 0) {
    return v;
  } else if constexpr (K == 1) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  } else {
    return c10::detail::fp16_ieee_to_fp32_value(v);
  }
}

#if defined(RIGL_ISA_AVX2)
// Eight consecutive elements as fp32 (bf16: a zero-extension and a shift; fp16: one at a time, no F16C assumed).
template <int K>
inline __m256 load8_f32(const Elem<K>* p) {
  if constexpr (K == 0) {
    return _mm256_loadu_ps(p);
  } else if constexpr (K == 1) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  } else {
    alignas(32) float f[8];
    for (int j = 0; j < 8; ++j) f[j] = widen<2>(p[j]);
    return _mm256_load_ps(f);
  }
}
#endif

// Rows [r0, r1) of the (rows, cols) w packed by the bit mask, as fp32: row r's active entries, in column order, go to
// out[starts[r], starts[r + 1]). bits: ceil(cols / 8) bytes per row, bit j of byte b for column 8 b + j (bits past
// cols ignored). AVX2: every byte's 8 columns loaded whole, left-packed by one permute and stored whole, without a
// branch on the byte (at 95% sparsity a third of the bytes select something, at random: a test on each mispredicted
// often enough to double the time); the store's spill past the byte's entries lands on positions written next,
// hence only below limit = starts[r1], this range's end. Baseline: one bit at a time. A pass over the weight at
// about streaming speed, where gathering the entries at their positions missed the cache at every row. False where
// a row's bits do not count its span (the caller raises; rows are then left partly written).
template <int K>
bool compress_rows_k(const Elem<K>* w, int64_t cols, const uint8_t* bits, const int64_t* starts, int64_t r0,
                     int64_t r1, float* out) {
  const int64_t nb = (cols + 7) / 8, limit = starts[r1];
  for (int64_t r = r0; r < r1; ++r) {
    const Elem<K>* wr = w + r * cols;
    const uint8_t* br = bits + r * nb;
    int64_t k = starts[r], b = 0;
    const int64_t end = starts[r + 1];
#if defined(RIGL_ISA_AVX2)
    for (; b < cols / 8 && k + 8 <= limit; ++b) {
      const unsigned m = br[b];
      const __m256i ix = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.idx[m]));
      _mm256_storeu_ps(out + k, _mm256_permutevar8x32_ps(load8_f32<K>(wr + b * 8), ix));
      k += std::popcount(m);
    }
#endif
    for (; b < nb; ++b) {
      unsigned m = br[b];
      if (b * 8 + 8 > cols) m &= (1u << (cols - b * 8)) - 1;  // the bits past cols
      for (; m != 0; m &= m - 1) {
        if (k >= end) return false;
        out[k++] = widen<K>(wr[b * 8 + std::countr_zero(m)]);
      }
    }
    if (k != end) return false;
  }
  return true;
}

bool compress_rows(const float* w, int64_t cols, const uint8_t* bits, const int64_t* starts, int64_t r0, int64_t r1,
                   float* out) {
  return compress_rows_k<0>(w, cols, bits, starts, r0, r1, out);
}

// v[0, n) rounded in place to bf16 (bf16 true) or fp16 and held as fp32: the values an autocast product multiplies
// (narrow, then widen; AVX2 and bf16: eight at a time in registers).
void round_values(float* v, int64_t n, bool bf16) {
  int64_t i = 0;
#if defined(RIGL_ISA_AVX2)
  if (bf16)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(v + i, _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(_mm256_loadu_ps(v + i)), 16)));
#endif
  if (bf16)
    for (; i < n; ++i) v[i] = widen<1>(narrow<1>(v[i]));
  else
    for (; i < n; ++i) v[i] = widen<2>(narrow<2>(v[i]));
}

// compress_rows for a bf16 (bf16 true) or fp16 weight, given as its bits: each 8 columns widened, then packed.
bool compress_rows_16(const uint16_t* w, bool bf16, int64_t cols, const uint8_t* bits, const int64_t* starts,
                      int64_t r0, int64_t r1, float* out) {
  return bf16 ? compress_rows_k<1>(w, cols, bits, starts, r0, r1, out)
              : compress_rows_k<2>(w, cols, bits, starts, r0, r1, out);
}

// Rows [r0, r1) of src in strips of 8 rows, each across all columns in 8x8 blocks (the edges one element at a time),
// widened to fp32 (Elem<K>): a bf16 or fp16 block is first widened into an L1 buffer (a shift per element for bf16,
// which the compiler vectorises), then transposed as an fp32 block is; the values exact, as a converting copy's.
template <int K>
void transpose_rows_k(const Elem<K>* src, int64_t rs, int64_t cols, float* dst, int64_t ld, int64_t r0, int64_t r1) {
  alignas(32) float block[64];
  int64_t r = r0;
  for (; r + 8 <= r1; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      if constexpr (K == 0) {
        transpose8(src + r * rs + c, rs, dst + c * ld + r, ld);
      } else {
        for (int64_t i = 0; i < 8; ++i)
          for (int64_t j = 0; j < 8; ++j) block[i * 8 + j] = widen<K>(src[(r + i) * rs + c + j]);
        transpose8(block, 8, dst + c * ld + r, ld);
      }
    }
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * ld + i] = widen<K>(src[i * rs + c]);
  }
  for (; r < r1; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = widen<K>(src[r * rs + c]);
}

void transpose_rows(const float* src, int64_t rs, int64_t cols, float* dst, int64_t ld, int64_t r0, int64_t r1) {
  transpose_rows_k<0>(src, rs, cols, dst, ld, r0, r1);
}

void transpose_rows_16(const uint16_t* src, bool bf16, int64_t rs, int64_t cols, float* dst, int64_t ld, int64_t r0,
                       int64_t r1) {
  if (bf16) transpose_rows_k<1>(src, rs, cols, dst, ld, r0, r1);
  else transpose_rows_k<2>(src, rs, cols, dst, ld, r0, r1);
}

bool sparse_product(const ProductView& p) {
  if (p.crow != nullptr) return run_values(p, CSRRows{p.crow});
  return run_values(p, FanInRows{p.k});
}

bool sampled_product(const SampledView& s) {
  if (s.crow != nullptr) {
    std::atomic<bool> ok{true};
    const int64_t per_row = (s.out ? s.nnz / s.out : 0) * (2 + s.B / 8) + s.in / 16 + 1;  // pairs, then zeroing
    parallel_work(s.out, per_row, [&](int64_t r0, int64_t r1) {
      bool fine;
      switch (s.y_kind) {
        case 1: fine = s.cols16 ? sampled_rows<int16_t, 1>(s, r0, r1) : sampled_rows<int32_t, 1>(s, r0, r1); break;
        case 2: fine = s.cols16 ? sampled_rows<int16_t, 2>(s, r0, r1) : sampled_rows<int32_t, 2>(s, r0, r1); break;
        default: fine = s.cols16 ? sampled_rows<int16_t, 0>(s, r0, r1) : sampled_rows<int32_t, 0>(s, r0, r1);
      }
      if (!fine) ok = false;
    });
    return ok.load();
  }
  if (s.rows16) return s.cols16 ? run_sampled<int16_t, int16_t>(s) : run_sampled<int16_t, int32_t>(s);
  return s.cols16 ? run_sampled<int32_t, int16_t>(s) : run_sampled<int32_t, int32_t>(s);
}

}  // namespace RIGL_ISA
}  // namespace rigl_fast
