// Top-k selection by threshold with the spec's tie rule (among equal keys the lower flat index ranks first,
// or, for a "bottom-k" selection, the higher index is dropped first). No sort of the layer, no index
// temporaries the size of the layer.
//
// Fast path: a strided sample gives a key L that at least k eligible positions reach (with a wide margin);
// one pass collects those few candidates (key, index) and nth_element finds the k-th. If the sample was
// wrong, or ties make the candidate set large (e.g. all zeros), an exact radix select on the key bits
// (12/10/10-bit digits) plus one pass that finds the needed tie's index takes over.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace rigl_fast {

constexpr int64_t kKeyMax = 0x7fffffff;

// |x| compared as fp32 (the reference compares `x.abs().float()`): the bits of a non-negative float order
// like the float itself, so selection works on integer keys in [0, kKeyMax]. Inputs are finite.
template <typename T>
inline uint32_t abs_key(T x) {
  const float f = static_cast<float>(x);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b & 0x7fffffffu;
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

namespace detail {

constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kKeyBlock = 1024;

struct Cand {
  uint32_t key, idx_lo;  // idx stored split so a candidate is 12 bytes even for layers >= 2^32
  uint32_t idx_hi;
  int64_t idx() const { return (static_cast<int64_t>(idx_hi) << 32) | idx_lo; }
};

// The exact path: radix select on the keys, then the needed tie by a chunked count.
template <typename BlockKeys>
Sel radix_select(int64_t n, int64_t k, bool tie_low, const BlockKeys& block_keys) {
  constexpr int kWidths[3] = {11, 10, 10};  // keys have 31 bits
  uint32_t prefix = 0;
  int shift = 31;
  int64_t need = k;
  for (int lv = 0; lv < 3; ++lv) {
    const int width = kWidths[lv];
    const int nb = 1 << width;
    const int next = shift - width;
    std::vector<int64_t> hist(nb, 0);
    std::mutex mu;
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      std::vector<uint32_t> h(nb, 0);
      alignas(64) int32_t keys[kKeyBlock];
      for (int64_t s = b; s < e; s += kKeyBlock) {
        const int64_t len = std::min(kKeyBlock, e - s);
        block_keys(s, len, keys);
        for (int64_t j = 0; j < len; ++j) {
          const int32_t key = keys[j];
          if (key >= 0 && (static_cast<uint32_t>(key) >> shift) == prefix)
            ++h[(static_cast<uint32_t>(key) >> next) & (nb - 1)];
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int j = 0; j < nb; ++j) hist[j] += h[j];
    });
    if (lv == 0) {
      int64_t total = 0;
      for (int64_t c : hist) total += c;
      if (k >= total) return sel_all();
    }
    int bin = nb - 1;
    for (; bin > 0 && hist[bin] < need; --bin) need -= hist[bin];
    prefix = (prefix << width) | static_cast<uint32_t>(bin);
    shift = next;
    if (hist[bin] == need)  // the whole bin is taken: everything at or above it
      return Sel{(static_cast<int64_t>(prefix) << shift) - 1, -1, true};
  }
  // the k-th key is exactly `prefix`; `need` of the keys equal to it are taken, from the chosen end
  const int64_t T = prefix;
  const int64_t chunk = 1 << 16;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<int64_t> ties(nchunks, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      int64_t cnt = 0;
      alignas(64) int32_t keys[kKeyBlock];
      for (int64_t s = c * chunk, end = std::min(n, (c + 1) * chunk); s < end; s += kKeyBlock) {
        const int64_t len = std::min(kKeyBlock, end - s);
        block_keys(s, len, keys);
        for (int64_t j = 0; j < len; ++j) cnt += keys[j] == T;
      }
      ties[c] = cnt;
    }
  });
  for (int64_t step = 0; step < nchunks; ++step) {
    const int64_t c = tie_low ? step : nchunks - 1 - step;
    if (ties[c] < need) {
      need -= ties[c];
      continue;
    }
    const int64_t lo = c * chunk, hi = std::min(n, (c + 1) * chunk);
    for (int64_t j = 0; j < hi - lo; ++j) {
      const int64_t i = tie_low ? lo + j : hi - 1 - j;
      int32_t key;
      block_keys(i, 1, &key);
      if (key == T && --need == 0) return Sel{T, i, tie_low};
    }
  }
  TORCH_CHECK(false, "rigl_fast: internal error in radix_select (tie count)");
}

}  // namespace detail

// The k positions of largest key among positions 0..n-1. block_keys(b, len, out) writes the keys of
// positions b..b+len-1 to out: a key in [0, kKeyMax], or -1 for a position that does not compete (computed
// a block at a time so the key loops vectorise). Ties: lower index first if tie_low, else higher first.
template <typename BlockKeys>
Sel select_top(int64_t n, int64_t k, bool tie_low, const BlockKeys& block_keys) {
  using detail::kKeyBlock;
  using detail::Cand;
  if (k <= 0 || n <= 0) return sel_none();
  if (k >= n) return sel_all();
  // sample: every stride-th position
  const int64_t stride = std::max<int64_t>(1, n / 16384);
  std::vector<uint32_t> sample;
  for (int64_t i = 0; i < n; i += stride) {
    int32_t key;
    block_keys(i, 1, &key);
    if (key >= 0) sample.push_back(static_cast<uint32_t>(key));
  }
  const int64_t positions = (n + stride - 1) / stride;
  const double r = static_cast<double>(k) * positions / n;  // the k-th's expected rank in the sample
  const int64_t rank = static_cast<int64_t>(std::ceil(r * 1.15 + 4.0 * std::sqrt(r) + 8.0));
  int64_t L = 0;
  if (rank < static_cast<int64_t>(sample.size())) {
    std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(), std::greater<uint32_t>());
    L = sample[rank - 1];
  }
  // collect every eligible key >= L, unless there are too many (then the exact path is cheaper)
  const int64_t cap = std::max<int64_t>(1 << 16, std::min<int64_t>(n / 8, 4 * k + (1 << 14)));
  std::vector<Cand> cand;
  std::atomic<int64_t> total{0};
  std::atomic<bool> overflow{false};
  std::mutex mu;
  at::parallel_for(0, n, detail::kGrain, [&](int64_t b, int64_t e) {
    std::vector<Cand> local;
    const int32_t l = static_cast<int32_t>(L);  // L >= 0, so ineligible (-1) never passes
    alignas(64) int32_t keys[kKeyBlock];
    for (int64_t s = b; s < e && !overflow.load(std::memory_order_relaxed); s += kKeyBlock) {
      const int64_t len = std::min(kKeyBlock, e - s);
      block_keys(s, len, keys);
      // candidates are a few percent of positions: test 16 keys at a time (vectorised), look closer on a hit
      for (int64_t g = 0; g < len; g += 16) {
        const int64_t ge = std::min(len, g + 16);
        int hit = 0;
        for (int64_t j = g; j < ge; ++j) hit |= keys[j] >= l;
        if (!hit) continue;
        for (int64_t j = g; j < ge; ++j) {
          if (keys[j] >= l) {
            const int64_t i = s + j;
            local.push_back(Cand{static_cast<uint32_t>(keys[j]), static_cast<uint32_t>(i),
                                 static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32)});
          }
        }
      }
      if (total.load(std::memory_order_relaxed) + static_cast<int64_t>(local.size()) > cap) overflow.store(true);
    }
    total += static_cast<int64_t>(local.size());
    std::lock_guard<std::mutex> lock(mu);
    cand.insert(cand.end(), local.begin(), local.end());  // order is irrelevant: nth_element orders by index
  });
  const int64_t c = total.load();
  if (overflow.load() || c > cap || c < k) return detail::radix_select(n, k, tie_low, block_keys);
  auto before = [tie_low](const Cand& a, const Cand& b) {
    if (a.key != b.key) return a.key > b.key;
    return tie_low ? a.idx() < b.idx() : a.idx() > b.idx();
  };
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
  return Sel{cand[k - 1].key, cand[k - 1].idx(), tie_low};
}

}  // namespace rigl_fast
