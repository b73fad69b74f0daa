// Top-k selection by threshold with the spec's tie rule (among equal keys the lower flat index ranks first,
// or, for a "bottom-k" selection, the higher index is dropped first). No sort of the layer, no index
// temporaries the size of the layer.
//
// Fast path: a sample of short runs of positions brackets the k-th key in a narrow key band; one pass counts
// the keys above the band and collects the few inside, and a histogram of the band plus nth_element on one
// bucket finds the k-th (update_kernels.h runs this for keep and grow together in one pass). If the band
// misses (an unlucky sample, or ties that overflow it, e.g. all zeros), an exact radix select on the key
// bits (11/10/10-bit digits) plus a chunked count of the needed tie takes over.
//
// Included only by update_kernels.h, inside the instruction-set namespace RIGL_ISA.
#pragma once

#include "common.h"

namespace rigl_fast {
namespace RIGL_ISA {

// |x| compared as fp32 (the reference compares `x.abs().float()`): the bits of a non-negative float order
// like the float itself, so selection works on integer keys in [0, kKeyMax]. Inputs are finite.
template <typename T>
inline uint32_t abs_key(T x) {
  const float f = static_cast<float>(x);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b & 0x7fffffffu;
}

namespace detail {

constexpr int64_t kKeyBlock = 1024;

// The radix select's histogram: adds 1 to h[(key >> lo) & (nb - 1)] for every key in positions [b, e) that is
// >= 0 and has key >> hi == prefix (hi <= 31, prefix <= kKeyMax >> hi). h has nb + kSpareBins entries: each key
// that does not count adds 1 to a spare one, which the caller ignores. So no branch on the key (whether it
// counts is as good as random in the first pass), and the spares take turns so that their increments do not
// wait on each other.
constexpr int64_t kSpareBins = 8;
template <typename BlockKeys>
void digit_histogram(const BlockKeys& block_keys, int64_t b, int64_t e, uint32_t prefix, int hi, int lo,
                     int64_t nb, int64_t* h) {
  alignas(64) int32_t keys[kKeyBlock];
  alignas(64) uint32_t bin[kKeyBlock];
  for (int64_t s = b; s < e; s += kKeyBlock) {
    const int64_t len = std::min(kKeyBlock, e - s);
    block_keys(s, len, keys);
    for (int64_t j = 0; j < len; ++j) {  // vectorised; a key of -1 never has a valid prefix
      const uint32_t key = static_cast<uint32_t>(keys[j]);
      const uint32_t hit = 0u - static_cast<uint32_t>((key >> hi) == prefix);
      bin[j] = (((key >> lo) & static_cast<uint32_t>(nb - 1)) & hit) |
               ((static_cast<uint32_t>(nb) + (static_cast<uint32_t>(j) & (kSpareBins - 1))) & ~hit);
    }
    for (int64_t j = 0; j < len; ++j) ++h[bin[j]];
  }
}

// How many keys in positions [b, e) equal T: the per-chunk tie counts of a threshold selection.
template <typename BlockKeys>
int64_t count_key(const BlockKeys& block_keys, int64_t b, int64_t e, int64_t T) {
  int64_t cnt = 0;
  alignas(64) int32_t keys[kKeyBlock];
  for (int64_t s = b; s < e; s += kKeyBlock) {
    const int64_t len = std::min(kKeyBlock, e - s);
    block_keys(s, len, keys);
    int32_t c = 0;  // vectorised: a block's count fits in 32 bits
    for (int64_t j = 0; j < len; ++j) c += keys[j] == T;
    cnt += c;
  }
  return cnt;
}

// The position of the need-th key equal to T in [lo, hi), counted from lo (from_low) or from hi - 1; -1 if
// fewer than `need` keys there equal T. Finds the tie cutoff inside the one chunk that holds it.
template <typename BlockKeys>
int64_t nth_key(const BlockKeys& block_keys, int64_t lo, int64_t hi, int64_t T, int64_t need, bool from_low) {
  alignas(64) int32_t keys[kKeyBlock];
  for (int64_t done = 0; done < hi - lo; done += kKeyBlock) {
    const int64_t len = std::min(kKeyBlock, hi - lo - done);
    const int64_t s = from_low ? lo + done : hi - done - len;
    block_keys(s, len, keys);
    for (int64_t t = 0; t < len; ++t) {
      const int64_t j = from_low ? t : len - 1 - t;
      if (keys[j] == T && --need == 0) return s + j;
    }
  }
  return -1;
}

// The exact path: radix select on the keys, then the needed tie by a chunked count.
template <typename BlockKeys>
Sel radix_select(int64_t n, int64_t k, bool tie_low, const BlockKeys& block_keys) {
  select_paths().exact.fetch_add(1, std::memory_order_relaxed);
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
    parallel_work(n, 1, [&](int64_t b, int64_t e) {
      std::vector<int64_t> h(nb + kSpareBins, 0);  // a thread's range can exceed 2^32 positions of one key
      digit_histogram(block_keys, b, e, prefix, shift, next, nb, h.data());
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
  parallel_work(nchunks, chunk, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) ties[c] = count_key(block_keys, c * chunk, std::min(n, (c + 1) * chunk), T);
  });
  for (int64_t step = 0; step < nchunks; ++step) {
    const int64_t c = tie_low ? step : nchunks - 1 - step;
    if (ties[c] < need) {
      need -= ties[c];
      continue;
    }
    const int64_t i = nth_key(block_keys, c * chunk, std::min(n, (c + 1) * chunk), T, need, tie_low);
    TORCH_CHECK(i >= 0, "rigl_fast: internal error in radix_select (tie count)");
    return Sel{T, i, tie_low};
  }
  TORCH_CHECK(false, "rigl_fast: internal error in radix_select (tie count)");
}

// Samples are runs of kRun consecutive positions (one or two cache lines) spread over the layer: run r starts
// at a pseudo-random offset inside the r-th of `runs` equal strides. (Starts at a fixed stride alias with the
// layer's own period: on a 3x3 conv weight a stride that is a multiple of 9 samples the same kernel taps, whose
// magnitudes differ systematically, and the bands then miss on real weights.)
constexpr int64_t kRun = 16;

inline int64_t sample_runs(int64_t n) {
  const int64_t want = std::min<int64_t>(8192, std::max<int64_t>(1024, n / 32));
  return std::max<int64_t>(1, std::min(n / kRun, want / kRun));
}

inline int64_t run_start(int64_t r, int64_t runs, int64_t n) {
  const int64_t stride = n / runs;
  const uint64_t slack = static_cast<uint64_t>(std::max<int64_t>(1, stride - kRun + 1));
  return r * stride + static_cast<int64_t>((static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ull >> 17) % slack);
}

// A key range [lo, hi] that holds the k-th largest key of the layer with high probability, from a sample of
// the eligible keys found at `positions` sampled positions (of n); `mid` is the sample's own estimate of the
// k-th key. `sample` is reordered.
struct Band {
  int64_t lo, hi, mid;
};

inline Band band_from_sample(std::vector<uint32_t>& sample, int64_t positions, int64_t n, int64_t k) {
  // the k-th's expected rank in the sample, and a margin of ~3.5 standard deviations either side (a miss only
  // costs the exact path)
  const double rank = static_cast<double>(k) * positions / n;
  const double margin = 3.5 * std::sqrt(rank + 1.0) + 3.0;
  const int64_t m = static_cast<int64_t>(sample.size());
  const int64_t r_hi = static_cast<int64_t>(std::floor(rank - margin));  // 1-based; < 1: no upper bound
  const int64_t r_lo = static_cast<int64_t>(std::ceil(rank + margin));   // > m: no lower bound
  const int64_t r_mid = std::max<int64_t>(1, static_cast<int64_t>(std::llround(rank)));
  Band b{0, kKeyMax, 0};  // keys above hi are only counted
  auto begin = sample.begin(), end = sample.end();
  if (r_lo <= m) {
    std::nth_element(begin, begin + (r_lo - 1), end, std::greater<uint32_t>());
    b.lo = sample[r_lo - 1];
    end = begin + (r_lo - 1);  // the r_lo - 1 largest are now in front of it
  }
  if (r_mid <= end - begin) {
    std::nth_element(begin, begin + (r_mid - 1), end, std::greater<uint32_t>());
    b.mid = sample[r_mid - 1];
    end = begin + (r_mid - 1);
  } else {
    b.mid = b.lo;
  }
  if (r_hi >= 1 && r_hi <= end - begin) {
    std::nth_element(begin, begin + (r_hi - 1), end, std::greater<uint32_t>());
    b.hi = std::max<int64_t>(b.lo, static_cast<int64_t>(sample[r_hi - 1]) - 1);  // its equals go in the band
  }
  return b;
}

// A band entry packs (key, rank of the index among ties) into 64 bits so that "outranks" is one integer
// compare: the larger packed value comes first. Layers of more than kBandMaxNumel (2^32) positions take the
// exact path.
inline uint32_t tie_flip(bool tie_low) { return tie_low ? 0xffffffffu : 0u; }
inline uint64_t pack(uint32_t key, int64_t i, uint32_t flip) {
  return (static_cast<uint64_t>(key) << 32) | (static_cast<uint32_t>(i) ^ flip);
}

// The need-th largest of `entries` (1-based; they are reordered) as a Sel.
inline Sel nth_sel(std::vector<uint64_t>& entries, int64_t need, bool tie_low) {
  std::nth_element(entries.begin(), entries.begin() + (need - 1), entries.end(), std::greater<uint64_t>());
  const uint64_t kth = entries[need - 1];
  return Sel{static_cast<int64_t>(kth >> 32), static_cast<int64_t>(static_cast<uint32_t>(kth) ^ tie_flip(tie_low)),
             tie_low};
}

// Puts into `sub` the entries of the bucket of a key histogram (2^bits buckets or fewer over [lo, hi]) that holds
// the need-th largest of n entries, and makes `need` its rank there: nth_sel then orders only that bucket. key(i)
// is entry i's key, in [lo, hi] or -1 (not counted); entry(i) its packed form.
template <typename Key, typename Entry>
inline void histogram_bucket(int64_t n, const Key& key, const Entry& entry, int64_t& need, int64_t lo, int64_t hi,
                             int bits, std::vector<uint64_t>& sub) {
  const uint32_t width = static_cast<uint32_t>(hi - lo);
  const int shift = std::max(0, static_cast<int>(std::bit_width(width)) - bits);
  const uint32_t nb = (width >> shift) + 1;
  // -1 - lo >= 2^31 lands past the last bucket: in the spare one at nb, whatever the shift
  const auto bucket_of = [&](int64_t i) {
    return std::min((static_cast<uint32_t>(key(i)) - static_cast<uint32_t>(lo)) >> shift, nb);
  };
  std::vector<int64_t> hist(nb + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++hist[bucket_of(i)];
  uint32_t bucket = nb - 1;
  for (; bucket > 0 && hist[bucket] < need; --bucket) need -= hist[bucket];
  sub.clear();
  sub.reserve(hist[bucket]);
  for (int64_t i = 0; i < n; ++i)
    if (bucket_of(i) == bucket) sub.push_back(entry(i));
}

// The need-th entry (1-based) of a band whose keys lie in [lo, hi], as a Sel: everything above the band is
// already chosen. `band` is not reordered.
inline Sel band_select(const std::vector<uint64_t>& band, int64_t need, bool tie_low, int64_t lo, int64_t hi) {
  select_paths().band.fetch_add(1, std::memory_order_relaxed);
  std::vector<uint64_t> sub;
  if (band.size() <= 4096) {
    sub = band;
  } else {
    histogram_bucket(
        static_cast<int64_t>(band.size()), [&](int64_t i) { return static_cast<int64_t>(band[i] >> 32); },
        [&](int64_t i) { return band[i]; }, need, lo, hi, 11, sub);
  }
  return nth_sel(sub, need, tie_low);
}

// Calls visit(j) for every j < len with flags[j] != 0; flags are bytes, zero-padded to a multiple of 8.
// Eight flags are tested with one load, and only the set ones are visited (the band is a few percent).
template <typename Visit>
inline void for_each_flagged(const uint8_t* flags, int64_t len, const Visit& visit) {
  if constexpr (std::endian::native == std::endian::little) {
    for (int64_t j8 = 0; j8 < len; j8 += 8) {
      uint64_t x;
      std::memcpy(&x, flags + j8, 8);
      while (x) {
        const int bit = std::countr_zero(x) & ~7;
        visit(j8 + (bit >> 3));
        x &= ~(uint64_t{0xff} << bit);
      }
    }
  } else {
    for (int64_t j = 0; j < len; ++j)
      if (flags[j]) visit(j);
  }
}

// Pads a block's flags with zeros up to the next multiple of 8 (the array has room: kKeyBlock is one).
inline void pad_flags(uint8_t* flags, int64_t len) {
  for (int64_t j = len; j < ((len + 7) & ~int64_t{7}); ++j) flags[j] = 0;
}

}  // namespace detail

// The k positions of largest key among positions 0..n-1. block_keys(b, len, out) writes the keys of
// positions b..b+len-1 to out: a key in [0, kKeyMax], or -1 for a position that does not compete (computed
// a block at a time so the key loops vectorise). Ties: lower index first if tie_low, else higher first.
//
// A sample of short runs of positions brackets the k-th key between two sample keys lo <= hi. One pass
// counts the keys above hi (a vectorised compare) and collects the few in [lo, hi] (the band); if the count
// leaves the k-th inside the band, band_select finds it there. Otherwise (an unlucky sample, or ties that make
// the band huge) the exact radix select runs; it runs straight away if `exact` (see LayerView::exact).
template <typename BlockKeys>
Sel select_top(int64_t n, int64_t k, bool tie_low, const BlockKeys& block_keys, bool exact) {
  using namespace detail;
  if (k <= 0 || n <= 0) return sel_none();
  if (k >= n) return sel_all();
  if (exact || n > kBandMaxNumel) return radix_select(n, k, tie_low, block_keys);
  const int64_t runs = sample_runs(n);
  std::vector<uint32_t> sample;
  sample.reserve(runs * kRun);
  int64_t positions = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t b = run_start(r, runs, n), len = std::min(kRun, n - b);
    int32_t keys[kRun];
    block_keys(b, len, keys);
    positions += len;
    for (int64_t j = 0; j < len; ++j)
      if (keys[j] >= 0) sample.push_back(static_cast<uint32_t>(keys[j]));
  }
  const Band bd = band_from_sample(sample, positions, n, k);
  // one pass: count keys > hi, collect keys in [lo, hi]; too big a band means the exact path is cheaper
  const int64_t cap = std::max<int64_t>(1 << 16, n / 16);
  const uint32_t flip = tie_flip(tie_low), lo = static_cast<uint32_t>(bd.lo);
  const uint32_t width = static_cast<uint32_t>(bd.hi - bd.lo);
  const int32_t hi = static_cast<int32_t>(bd.hi);
  std::vector<uint64_t> band;
  std::atomic<int64_t> total{0}, above{0};
  std::atomic<bool> overflow{false};
  std::mutex mu;
  parallel_work(n, 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> local;
    int64_t cnt = 0;
    alignas(64) int32_t keys[kKeyBlock];
    alignas(64) uint8_t flags[kKeyBlock];
    for (int64_t s = b; s < e && !overflow.load(std::memory_order_relaxed); s += kKeyBlock) {
      const int64_t len = std::min(kKeyBlock, e - s);
      block_keys(s, len, keys);
      int32_t c = 0;
      for (int64_t j = 0; j < len; ++j) {  // vectorised: count above the band, flag the band
        c += keys[j] > hi;
        flags[j] = (static_cast<uint32_t>(keys[j]) - lo) <= width;
      }
      cnt += c;
      pad_flags(flags, len);
      for_each_flagged(flags, len,
                       [&](int64_t j) { local.push_back(pack(static_cast<uint32_t>(keys[j]), s + j, flip)); });
      if (total.load(std::memory_order_relaxed) + static_cast<int64_t>(local.size()) > cap) overflow.store(true);
    }
    above += cnt;
    total += static_cast<int64_t>(local.size());
    std::lock_guard<std::mutex> lock(mu);
    band.insert(band.end(), local.begin(), local.end());
  });
  const int64_t need = k - above.load();
  if (overflow.load() || need <= 0 || need > static_cast<int64_t>(band.size()))
    return radix_select(n, k, tie_low, block_keys);
  return band_select(band, need, tie_low, bd.lo, bd.hi);
}

}  // namespace RIGL_ISA
}  // namespace rigl_fast
