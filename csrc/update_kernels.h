// The topology update kernels. Compiled once per instruction set: the including file defines RIGL_ISA (the
// namespace) and may switch the target with `#pragma GCC target` before including this; nothing else
// includes it.
#pragma once

#include "common.h"
#include "select.h"

namespace rigl_fast {
namespace RIGL_ISA {
namespace {

// Elements per parallel task: below this a layer runs on one thread (the fork costs more than it saves).
constexpr int64_t kGrain = 1 << 15;
// Inner block of the write pass: it finishes one block (a few KiB of every operand) before the next.
constexpr int64_t kBlock = 2048;

// Number of active positions of a mask (bytes are 0/1).
int64_t count_active(const uint8_t* mp, int64_t n) {
  return at::parallel_reduce(0, n, kGrain, int64_t(0), [&](int64_t b, int64_t e, int64_t acc) {
    uint64_t s = 0;
    for (int64_t i = b; i < e; ++i) s += mp[i];
    return acc + static_cast<int64_t>(s);
  }, std::plus<int64_t>());
}

// An IEEE value is NaN or inf iff its exponent bits are all ones; 1 for such a value, else 0.
template <typename T> inline uint32_t nonfinite_bit(T x);
template <> inline uint32_t nonfinite_bit(float x) {
  uint32_t b; std::memcpy(&b, &x, 4); return (b & 0x7f800000u) == 0x7f800000u;
}
template <> inline uint32_t nonfinite_bit(double x) {
  uint64_t b; std::memcpy(&b, &x, 8); return (b & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}
template <> inline uint32_t nonfinite_bit(at::Half x) { return (x.x & 0x7c00u) == 0x7c00u; }
template <> inline uint32_t nonfinite_bit(at::BFloat16 x) { return (x.x & 0x7f80u) == 0x7f80u; }

// Both selections of a layer, from one read of weight, mask and score (plus small samples), and the
// finiteness check of weight and score folded into the same read. Returns false, with nothing decided,
// if the check is on and finds a NaN/inf.
//
// The pass brackets each selection's threshold in a band from a sample (see select_top): it counts the keys
// above the band and collects those inside. The grow selection competes among positions not kept, which is
// only known once keep is resolved; so the pass treats the positions whose keep key falls in keep's band as
// undecided (they are collected anyway) and adds them to grow's count or band afterwards. Whenever a band
// misses its threshold, that selection (and grow after keep) is redone exactly by select_top.
template <typename W, typename S>
bool select_layer_t(LayerView& L, bool check_finite) {
  using namespace detail;
  const int64_t n = L.n;
  const W* wp = static_cast<const W*>(L.w);
  const S* sp = static_cast<const S*>(L.score);
  const uint8_t* mp = L.mask;

  const int64_t n_active = count_active(mp, n);
  TORCH_CHECK(L.n_keep <= n_active, "rigl_fast: n_keep (", L.n_keep, ") exceeds the active count (", n_active, ")");
  Keep& keep = L.keep;
  const bool keep_sel = L.n_keep > 0 && L.n_keep < n_active;  // otherwise keep is all or nothing
  keep.drop_form = keep_sel && 2 * L.n_keep > n_active;
  keep.sel = L.n_keep == 0 ? sel_none() : sel_all();
  const int64_t kk = keep.drop_form ? n_active - L.n_keep : L.n_keep;  // keep's k, in its own key order
  const bool keep_low = !keep.drop_form;
  // kKeyMax - key == kKeyMax ^ key on [0, kKeyMax]; the key loops are written branch-free (bit ops, no
  // ternaries) because GCC will not if-convert them otherwise, and they are the bulk of the update.
  const uint32_t flip = keep.drop_form ? static_cast<uint32_t>(kKeyMax) : 0u;
  auto keep_keys = [&](int64_t b, int64_t len, int32_t* __restrict out) {
    const W* __restrict w = wp + b;
    const uint8_t* __restrict m = mp + b;
    for (int64_t j = 0; j < len; ++j) {
      const uint32_t active = 0u - static_cast<uint32_t>(m[j]);
      out[j] = static_cast<int32_t>(((abs_key(w[j]) ^ flip) & active) | ~active);  // inactive -> -1
    }
  };
  // grow's keys once keep is known: |score|, -1 for kept positions
  auto grow_keys = [&](int64_t b, int64_t len, int32_t* __restrict out) {
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
  };
  const int64_t eligible = n - L.n_keep;  // positions grow competes for
  const bool grow_sel = L.n_grow > 0 && L.n_grow < eligible;
  L.grow = L.n_grow == 0 ? sel_none() : sel_all();
  if (n > (int64_t{1} << 32)) {  // band entries hold 32-bit indices: the exact path (and a separate check)
    if (check_finite) {
      std::atomic<bool> bad{false};
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        uint32_t f = 0;
        for (int64_t i = b; i < e; ++i) f |= nonfinite_bit(wp[i]) | nonfinite_bit(sp[i]);
        if (f) bad.store(true);
      });
      if (bad.load()) return false;
    }
    if (keep_sel) keep.sel = select_top(n, kk, keep_low, keep_keys);
    if (grow_sel) L.grow = select_top(n, L.n_grow, true, grow_keys);
    return true;
  }

  // samples: keep's keys, and |score| at positions that keep's estimate does not keep. The runs are far
  // apart, so their cache lines are fetched a few runs ahead.
  const int64_t runs = sample_runs(n);
  std::vector<int32_t> rk(runs * kRun);  // keep's key at each sampled position
  std::vector<uint32_t> rs(runs * kRun), ks, gs;
  ks.reserve(runs * kRun);
  gs.reserve(runs * kRun);
  int64_t positions = 0;
  constexpr int64_t kAhead = 8;
  auto prefetch = [&](int64_t r) {
    const int64_t b = run_start(r, runs, n);
    __builtin_prefetch(wp + b);
    __builtin_prefetch(wp + b + kRun - 1);
    __builtin_prefetch(sp + b);
    __builtin_prefetch(sp + b + kRun - 1);
    __builtin_prefetch(mp + b);
  };
  for (int64_t r = 0; r < std::min(runs, kAhead); ++r) prefetch(r);
  for (int64_t r = 0; r < runs; ++r) {
    if (r + kAhead < runs) prefetch(r + kAhead);
    const int64_t b = run_start(r, runs, n), len = std::min(kRun, n - b);
    keep_keys(b, len, rk.data() + positions);
    for (int64_t j = 0; j < len; ++j) {
      rs[positions + j] = abs_key(sp[b + j]);
      if (rk[positions + j] >= 0) ks.push_back(static_cast<uint32_t>(rk[positions + j]));
    }
    positions += len;
  }
  Band kb{0, kKeyMax, 0};
  if (keep_sel) kb = band_from_sample(ks, positions, n, kk);
  for (int64_t j = 0; j < positions; ++j) {
    bool kept_est;
    if (!keep_sel) kept_est = rk[j] >= 0 && L.n_keep > 0;
    else if (keep.drop_form) kept_est = rk[j] >= 0 && rk[j] < kb.mid;
    else kept_est = rk[j] >= kb.mid;
    if (!kept_est) gs.push_back(rs[j]);
  }
  Band gb{0, kKeyMax, 0};
  if (grow_sel) gb = band_from_sample(gs, positions, n, L.n_grow);

  // the pass. Keep: keys > k_hi chosen, [k_lo, k_lo + k_width] the band. An active position is surely kept
  // if its key is above the band (normal form) or below it (drop form); in the band it is undecided.
  // Without a keep selection the band is empty (lo past every key) and k_hi says all or nothing.
  const uint32_t k_lo = keep_sel ? static_cast<uint32_t>(kb.lo) : 0x80000000u;
  const uint32_t k_width = keep_sel ? static_cast<uint32_t>(kb.hi - kb.lo) : 0u;
  const int32_t k_hi = keep_sel ? static_cast<int32_t>(kb.hi) : (L.n_keep > 0 ? -1 : static_cast<int32_t>(kKeyMax));
  const uint32_t drop_mask = keep.drop_form ? 0xffffffffu : 0u;
  const uint32_t g_lo = grow_sel ? static_cast<uint32_t>(gb.lo) : 0x80000000u;
  const uint32_t g_width = grow_sel ? static_cast<uint32_t>(gb.hi - gb.lo) : 0u;
  const int32_t g_hi = static_cast<int32_t>(gb.hi);
  const uint32_t k_flip = tie_flip(keep_low), g_flip = tie_flip(true);
  const int64_t cap = std::max<int64_t>(1 << 16, n / 16);
  std::vector<uint64_t> kband, gband;
  std::vector<uint32_t> kband_score;  // |score| key of each keep band entry, in the same order
  std::atomic<int64_t> k_above{0}, g_above{0};
  std::atomic<bool> overflow{false}, bad{false};
  std::mutex mu;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> kl, gl;
    std::vector<uint32_t> kls;
    int64_t kc = 0, gc = 0;
    uint32_t nonfinite = 0;
    alignas(64) int32_t kkey[kKeyBlock], gkey[kKeyBlock];
    alignas(64) uint32_t skey[kKeyBlock];
    alignas(64) uint8_t kflag[kKeyBlock], gflag[kKeyBlock];
    for (int64_t s = b; s < e; s += kKeyBlock) {
      const int64_t len = std::min(kKeyBlock, e - s);
      const W* __restrict w = wp + s;
      const S* __restrict sc = sp + s;
      const uint8_t* __restrict m = mp + s;
      int32_t c1 = 0, c2 = 0;
      for (int64_t j = 0; j < len; ++j) {  // vectorised: keys, counts above the bands, band flags
        const uint32_t active = 0u - static_cast<uint32_t>(m[j]);
        const int32_t kw = static_cast<int32_t>(((abs_key(w[j]) ^ flip) & active) | ~active);
        const uint32_t in_kband = (static_cast<uint32_t>(kw) - k_lo) <= k_width;
        const uint32_t sure_kept = (drop_mask & static_cast<uint32_t>(static_cast<uint32_t>(kw) < k_lo)) |
                                   (~drop_mask & static_cast<uint32_t>(kw > k_hi));
        const uint32_t sk = abs_key(sc[j]);
        const int32_t gk = static_cast<int32_t>(sk | (0u - (in_kband | sure_kept)));  // not surely free -> -1
        c1 += kw > k_hi;
        c2 += gk > g_hi;
        kkey[j] = kw;
        gkey[j] = gk;
        skey[j] = sk;
        kflag[j] = static_cast<uint8_t>(in_kband);
        gflag[j] = (static_cast<uint32_t>(gk) - g_lo) <= g_width;
        nonfinite |= nonfinite_bit(w[j]) | nonfinite_bit(sc[j]);
      }
      kc += c1;
      gc += c2;
      if (overflow.load(std::memory_order_relaxed)) continue;  // a fallback follows; counts and check go on
      pad_flags(kflag, len);
      pad_flags(gflag, len);
      for_each_flagged(kflag, len, [&](int64_t j) {
        kl.push_back(pack(static_cast<uint32_t>(kkey[j]), s + j, k_flip));
        kls.push_back(skey[j]);
      });
      for_each_flagged(gflag, len, [&](int64_t j) { gl.push_back(pack(static_cast<uint32_t>(gkey[j]), s + j, g_flip)); });
      if (static_cast<int64_t>(std::max(kl.size(), gl.size())) > cap) overflow.store(true);
    }
    k_above += kc;
    g_above += gc;
    if (nonfinite) bad.store(true);
    std::lock_guard<std::mutex> lock(mu);
    kband.insert(kband.end(), kl.begin(), kl.end());
    kband_score.insert(kband_score.end(), kls.begin(), kls.end());
    gband.insert(gband.end(), gl.begin(), gl.end());
  });
  if (check_finite && bad.load()) return false;
  const bool missed = overflow.load() || kband.size() > static_cast<size_t>(cap) || gband.size() > static_cast<size_t>(cap);

  // keep
  bool grow_exact = missed;
  if (keep_sel) {
    const int64_t need = kk - k_above.load();
    if (missed || need <= 0 || need > static_cast<int64_t>(kband.size())) {
      keep.sel = select_top(n, kk, keep_low, keep_keys);
      grow_exact = true;
    } else {
      keep.sel = band_select(kband, need, keep_low, kb.lo, kb.hi);
    }
  }
  if (!grow_sel) return true;
  if (!grow_exact) {
    // the undecided positions: those keep did not keep compete for grow
    int64_t above = g_above.load();
    for (size_t t = 0; t < kband.size(); ++t) {
      const uint64_t entry = kband[t];
      const int64_t i = static_cast<uint32_t>(entry) ^ k_flip;
      const int64_t key = static_cast<int64_t>(entry >> 32) ^ flip;  // back to the |w| key
      if (keep.kept(key, i)) continue;
      const uint32_t g = kband_score[t];
      if (static_cast<int32_t>(g) > g_hi) ++above;
      else if (g - g_lo <= g_width) gband.push_back(pack(g, i, g_flip));
    }
    const int64_t need = L.n_grow - above;
    if (need > 0 && need <= static_cast<int64_t>(gband.size())) {
      L.grow = band_select(gband, need, true, gb.lo, gb.hi);
      return true;
    }
  }
  L.grow = select_top(n, L.n_grow, true, grow_keys);
  return true;
}

template <typename W, typename S>
void write_layer_t(LayerView& L) {
  const int64_t n = L.n;
  W* wp = static_cast<W*>(L.w);
  const S* sp = static_cast<const S*>(L.score);
  uint8_t* mp = L.mask;
  const Keep& keep = L.keep;
  const Sel& grow = L.grow;
  char* gp = L.grad;
  const int64_t gbytes = L.grad_bytes;
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
      for (const auto& d : L.states) select_inplace_any(d.first + s * d.second, both, len, d.second);
      if (gp) select_inplace_any(gp + s * gbytes, nw, len, gbytes);
      std::memcpy(mp + s, nw, len);
    }
  });
}

template <typename F>
decltype(auto) dispatch(FloatType t, F&& f) {
  switch (t) {
    case FloatType::f32: return f(float());
    case FloatType::f64: return f(double());
    case FloatType::f16: return f(c10::Half());
    case FloatType::bf16: return f(c10::BFloat16());
  }
  TORCH_CHECK(false, "rigl_fast: unknown float type");
}

}  // namespace

bool select_layer(LayerView& L, bool check_finite) {
  return dispatch(L.w_type, [&](auto w) {
    return dispatch(L.s_type, [&](auto s) { return select_layer_t<decltype(w), decltype(s)>(L, check_finite); });
  });
}

void write_layer(LayerView& L) {
  dispatch(L.w_type, [&](auto w) {
    dispatch(L.s_type, [&](auto s) { write_layer_t<decltype(w), decltype(s)>(L); });
  });
}

}  // namespace RIGL_ISA
}  // namespace rigl_fast
