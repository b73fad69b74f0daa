// Top-k selection by threshold (radix select on float bit patterns) with the spec's tie rule: among equal
// scores the lower flat index ranks first. No sort, no index temporaries the size of the layer.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace rigl_fast {

// |x| compared as fp32 (the reference compares `x.abs().float()`): the bits of a non-negative float order
// like the float itself, so selection works on uint32 keys. Inputs are finite (checked by the caller).
template <typename T>
inline uint32_t abs_key(T x) {
  const float f = static_cast<float>(x);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b & 0x7fffffffu;
}

// The result of a selection: position i (if eligible) is chosen iff key > T, or key == T and i <= cutoff.
struct Sel {
  int64_t T, cutoff;
  inline bool chosen(uint32_t key, int64_t i) const {
    const int64_t k = static_cast<int64_t>(key);
    return k > T || (k == T && i <= cutoff);
  }
};

constexpr Sel kNone{std::numeric_limits<int64_t>::max(), -1};
constexpr Sel kAll{-1, -1};

// Selects the k largest keys of positions 0..n-1, where key_of(i) returns the uint32 key or -1 for a
// position that does not compete. Radix digits of 12, 10 and 10 bits, most significant first: each pass
// histograms the positions whose higher digits equal the prefix found so far (histograms stay in L1);
// a pass stops early when the k-th key's bin is taken whole. Ties at the final key are resolved by one
// more pass that finds the index of the needed-th tie.
template <typename KeyOf>
Sel select_top(int64_t n, int64_t k, const KeyOf& key_of) {
  if (k <= 0 || n <= 0) return kNone;
  constexpr int kWidths[3] = {12, 10, 10};
  constexpr int64_t kGrain = 1 << 15;
  uint32_t prefix = 0;
  int shift = 32;
  int64_t need = k;  // how many still to take from the current prefix's range
  for (int lv = 0; lv < 3; ++lv) {
    const int width = kWidths[lv];
    const int nb = 1 << width;
    const int next = shift - width;
    std::vector<int64_t> hist(nb, 0);
    std::mutex mu;
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      std::vector<uint32_t> h(nb, 0);
      if (shift == 32) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t key = key_of(i);
          if (key >= 0) ++h[static_cast<uint32_t>(key) >> next];
        }
      } else {
        for (int64_t i = b; i < e; ++i) {
          const int64_t key = key_of(i);
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
      if (k >= total) return kAll;
    }
    int bin = nb - 1;
    for (; bin > 0 && hist[bin] < need; --bin) need -= hist[bin];
    prefix = (prefix << width) | static_cast<uint32_t>(bin);
    shift = next;
    if (hist[bin] == need)  // the whole bin is taken: everything at or above it
      return Sel{(static_cast<int64_t>(prefix) << shift) - 1, -1};
  }
  // shift == 0: the k-th key is exactly `prefix`, and `need` of the keys equal to it are taken, lowest
  // index first. Count ties per chunk in parallel, then walk to the chunk holding the needed-th.
  const int64_t T = prefix;
  const int64_t chunk = 1 << 16;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<int64_t> ties(nchunks, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      int64_t cnt = 0;
      for (int64_t i = c * chunk, end = std::min(n, (c + 1) * chunk); i < end; ++i) cnt += key_of(i) == T;
      ties[c] = cnt;
    }
  });
  for (int64_t c = 0; c < nchunks; ++c) {
    if (ties[c] < need) {
      need -= ties[c];
      continue;
    }
    for (int64_t i = c * chunk;; ++i)
      if (key_of(i) == T && --need == 0) return Sel{T, i};
  }
  TORCH_CHECK(false, "rigl_fast: internal error in select_top (tie count)");
}

}  // namespace rigl_fast
