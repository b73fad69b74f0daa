// The topology update's kernel templates. Compiled once per instruction set: the including file defines RIGL_ISA
// (the namespace) and may switch the target with `#pragma GCC target` before including this. Included by the entry
// points of each instruction set's translation units (update_ops.h, shard_kernels.h, unit_kernels.h), which share
// its key functors, write block and dispatch; it defines templates only, so each unit instantiates what it uses.
#pragma once

#include "common.h"
#include "select.h"

namespace rigl_fast {
namespace RIGL_ISA {
namespace {

// Inner block of the write pass: it finishes one block (a few KiB of every operand) before the next.
constexpr int64_t kBlock = 2048;

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

// Keep's keys: |w| bits xor `flip` for active positions, -1 for inactive ones. Written branch-free (bit ops,
// no ternaries) because GCC will not if-convert the key loops otherwise, and they are the bulk of the update.
// The sharded update's keys are the same with flip 0, and with skip 1 where its eligible positions are the
// unflagged ones (mask bytes are 0 or 1).
template <typename W>
struct KeepKeys {
  const W* wp;
  const uint8_t* mp;
  uint32_t flip;
  uint8_t skip = 0;
  void operator()(int64_t b, int64_t len, int32_t* __restrict out) const {
    const W* __restrict w = wp + b;
    const uint8_t* __restrict m = mp + b;
    for (int64_t j = 0; j < len; ++j) {
      const uint32_t active = 0u - static_cast<uint32_t>(m[j] ^ skip);
      out[j] = static_cast<int32_t>(((abs_key(w[j]) ^ flip) & active) | ~active);
    }
  }
};

// Grow's keys once keep is decided: |score| bits, -1 for kept positions.
template <typename W, typename S>
struct GrowKeys {
  const W* wp;
  const S* sp;
  const uint8_t* mp;
  const Keep* keep;
  void operator()(int64_t b, int64_t len, int32_t* __restrict out) const {
    const W* __restrict w = wp + b;
    const S* __restrict sc = sp + b;
    const uint8_t* __restrict m = mp + b;
    int64_t ku;
    if (keep->block_threshold(b, b + len, ku)) {
      const int32_t k32 = static_cast<int32_t>(ku);
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t kept = static_cast<uint32_t>(m[j]) &
                              static_cast<uint32_t>(static_cast<int32_t>(abs_key(w[j])) > k32);
        out[j] = static_cast<int32_t>(abs_key(sc[j]) | (0u - kept));
      }
    } else {
      for (int64_t j = 0; j < len; ++j)
        out[j] = (m[j] && keep->kept(abs_key(w[j]), b + j)) ? -1 : static_cast<int32_t>(abs_key(sc[j]));
    }
  }
};

// One layer between the phases of select_layers.
struct Pending {
  bool keep_sel = false, grow_sel = false;  // whether each needs a selection (else all or nothing)
  int64_t kk = 0;                           // keep's k, in its own key order (drop form: the dropped count)
  uint32_t flip = 0;                        // keep's key transform (kKeyMax in the drop form)
  bool exact = false;                       // no band pass: the exact path (LayerView::exact)
  detail::Band kb{0, kKeyMax, 0}, gb{0, kKeyMax, 0};
  std::vector<uint64_t> kband, gband;       // band entries (packed key, index)
  std::vector<uint32_t> kband_score;        // |score| key of each keep band entry, in the same order
  int64_t k_above = 0, g_above = 0;         // keys above each band
  bool missed = false, bad = false;         // a band overflowed; a NaN/inf was seen
};

// A layer's data with its element types.
template <typename W, typename S>
struct Typed {
  int64_t n;
  W* wp;
  const S* sp;
  uint8_t* mp;
  explicit Typed(const LayerView& L)
      : n(L.n), wp(static_cast<W*>(L.w)), sp(static_cast<const S*>(L.score)), mp(L.mask) {}
};

// Phase 1 (one thread per layer): the active count, the form of keep, and each selection's band from a
// sample of short runs (keep's keys, and |score| at positions that keep's estimate does not keep).
template <typename W, typename S>
void prepare_t(LayerView& L, Pending& P) {
  using namespace detail;
  const auto [n, wp, sp, mp] = Typed<W, S>(L);
  int64_t n_active = 0;
  for (int64_t i = 0; i < n; ++i) n_active += mp[i];
  TORCH_CHECK(L.n_keep <= n_active, "rigl_fast: n_keep (", L.n_keep, ") exceeds the active count (", n_active, ")");
  Keep& keep = L.keep;
  P.keep_sel = L.n_keep > 0 && L.n_keep < n_active;
  keep.drop_form = P.keep_sel && 2 * L.n_keep > n_active;
  keep.sel = L.n_keep == 0 ? sel_none() : sel_all();
  P.kk = keep.drop_form ? n_active - L.n_keep : L.n_keep;
  P.flip = keep.drop_form ? static_cast<uint32_t>(kKeyMax) : 0u;  // kKeyMax - key == kKeyMax ^ key
  P.grow_sel = L.n_grow > 0 && L.n_grow < n - L.n_keep;  // grow competes for the n - n_keep positions not kept
  L.grow = L.n_grow == 0 ? sel_none() : sel_all();
  P.exact = L.exact || n > kBandMaxNumel;  // band entries hold 32-bit indices
  if (P.exact || !(P.keep_sel || P.grow_sel)) return;

  const KeepKeys<W> keep_keys{wp, mp, P.flip};
  const int64_t runs = sample_runs(n);
  std::vector<int32_t> rk(runs * kRun);  // keep's key at each sampled position
  std::vector<uint32_t> rs(runs * kRun), ks, gs;
  ks.reserve(runs * kRun);
  gs.reserve(runs * kRun);
  int64_t positions = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t b = run_start(r, runs, n), len = std::min(kRun, n - b);
    keep_keys(b, len, rk.data() + positions);
    for (int64_t j = 0; j < len; ++j) {
      rs[positions + j] = abs_key(sp[b + j]);
      if (rk[positions + j] >= 0) ks.push_back(static_cast<uint32_t>(rk[positions + j]));
    }
    positions += len;
  }
  if (P.keep_sel) P.kb = band_from_sample(ks, positions, n, P.kk);
  if (!P.grow_sel) return;
  for (int64_t j = 0; j < positions; ++j) {
    bool kept_est;
    if (!P.keep_sel) kept_est = rk[j] >= 0 && L.n_keep > 0;
    else if (keep.drop_form) kept_est = rk[j] >= 0 && rk[j] < P.kb.mid;
    else kept_est = rk[j] >= P.kb.mid;
    if (!kept_est) gs.push_back(rs[j]);
  }
  P.gb = band_from_sample(gs, positions, n, L.n_grow);
}

// Phase 2 (all threads on one layer): one read of weight, mask and score. Counts the keys above each band,
// collects the entries inside, and checks that weight and score are finite.
//
// Grow competes among positions not kept, which is only known once keep is decided; so the pass gives grow
// only the positions surely not kept, and leaves those in keep's band (collected anyway, with their |score|)
// for phase 3 to add to grow's count or band.
template <typename W, typename S>
void scan_t(LayerView& L, Pending& P) {
  using namespace detail;
  const auto [n, wp, sp, mp] = Typed<W, S>(L);
  const uint32_t check_score = L.check_score;
  if (P.exact) {  // only the check
    std::atomic<bool> bad{false};
    parallel_work(n, 1, [&](int64_t b, int64_t e) {
      uint32_t f = 0;
      for (int64_t i = b; i < e; ++i) f |= nonfinite_bit(wp[i]) | (nonfinite_bit(sp[i]) & check_score);
      if (f) bad.store(true);
    });
    P.bad = bad.load();
    return;
  }
  // Keep: keys > k_hi chosen, [k_lo, k_lo + k_width] the band. An active position is surely kept if its key
  // is above the band (normal form) or below it (drop form). Without a keep selection the band is empty
  // (lo past every key) and k_hi says all or nothing; likewise for grow.
  const uint32_t flip = P.flip;
  const uint32_t k_lo = P.keep_sel ? static_cast<uint32_t>(P.kb.lo) : 0x80000000u;
  const uint32_t k_width = P.keep_sel ? static_cast<uint32_t>(P.kb.hi - P.kb.lo) : 0u;
  const int32_t k_hi = P.keep_sel ? static_cast<int32_t>(P.kb.hi) : (L.n_keep > 0 ? -1 : static_cast<int32_t>(kKeyMax));
  const uint32_t drop_mask = L.keep.drop_form ? 0xffffffffu : 0u;
  const uint32_t g_lo = P.grow_sel ? static_cast<uint32_t>(P.gb.lo) : 0x80000000u;
  const uint32_t g_width = P.grow_sel ? static_cast<uint32_t>(P.gb.hi - P.gb.lo) : 0u;
  const int32_t g_hi = static_cast<int32_t>(P.gb.hi);
  const uint32_t k_flip = tie_flip(!L.keep.drop_form), g_flip = tie_flip(true);
  const int64_t cap = std::max<int64_t>(1 << 16, n / 16);
  std::atomic<int64_t> k_above{0}, g_above{0};
  std::atomic<bool> overflow{false}, bad{false};
  std::mutex mu;
  parallel_work(n, 2, [&](int64_t b, int64_t e) {  // reads weight, mask and score; computes three keys
    std::vector<uint64_t> kl, gl;
    std::vector<uint32_t> kls;
    int64_t kc = 0, gc = 0;
    uint32_t nonfinite = 0;
    alignas(64) uint8_t kflag[kKeyBlock], gflag[kKeyBlock];
    for (int64_t s = b; s < e; s += kKeyBlock) {
      const int64_t len = std::min(kKeyBlock, e - s);
      const W* __restrict w = wp + s;
      const S* __restrict sc = sp + s;
      const uint8_t* __restrict m = mp + s;
      // keep's key, |score|, and grow's key (-1 unless the position is surely not kept) at j
      auto keys = [=](int64_t j, int32_t& kw, uint32_t& sk, int32_t& gk) {
        const uint32_t active = 0u - static_cast<uint32_t>(m[j]);
        kw = static_cast<int32_t>(((abs_key(w[j]) ^ flip) & active) | ~active);
        const uint32_t in_kband = (static_cast<uint32_t>(kw) - k_lo) <= k_width;
        const uint32_t sure_kept = (drop_mask & static_cast<uint32_t>(static_cast<uint32_t>(kw) < k_lo)) |
                                   (~drop_mask & static_cast<uint32_t>(kw > k_hi));
        sk = abs_key(sc[j]);
        gk = static_cast<int32_t>(sk | (0u - (in_kband | sure_kept)));
      };
      int32_t c1 = 0, c2 = 0;
      for (int64_t j = 0; j < len; ++j) {  // vectorised: counts above the bands, band flags, the check
        int32_t kw, gk;
        uint32_t sk;
        keys(j, kw, sk, gk);
        c1 += kw > k_hi;
        c2 += gk > g_hi;
        kflag[j] = (static_cast<uint32_t>(kw) - k_lo) <= k_width;
        gflag[j] = (static_cast<uint32_t>(gk) - g_lo) <= g_width;
        nonfinite |= nonfinite_bit(w[j]) | (nonfinite_bit(sc[j]) & check_score);
      }
      kc += c1;
      gc += c2;
      if (overflow.load(std::memory_order_relaxed)) continue;  // a fallback follows; counts and check go on
      pad_flags(kflag, len);
      pad_flags(gflag, len);
      for_each_flagged(kflag, len, [&](int64_t j) {  // the few band entries: their keys again
        int32_t kw, gk;
        uint32_t sk;
        keys(j, kw, sk, gk);
        kl.push_back(pack(static_cast<uint32_t>(kw), s + j, k_flip));
        kls.push_back(sk);
      });
      for_each_flagged(gflag, len, [&](int64_t j) {
        int32_t kw, gk;
        uint32_t sk;
        keys(j, kw, sk, gk);
        gl.push_back(pack(static_cast<uint32_t>(gk), s + j, g_flip));
      });
      if (static_cast<int64_t>(std::max(kl.size(), gl.size())) > cap) overflow.store(true);
    }
    k_above += kc;
    g_above += gc;
    if (nonfinite) bad.store(true);
    std::lock_guard<std::mutex> lock(mu);
    P.kband.insert(P.kband.end(), kl.begin(), kl.end());
    P.kband_score.insert(P.kband_score.end(), kls.begin(), kls.end());
    P.gband.insert(P.gband.end(), gl.begin(), gl.end());
  });
  P.k_above = k_above.load();
  P.g_above = g_above.load();
  P.bad = bad.load();
  P.missed = overflow.load() || P.kband.size() > static_cast<size_t>(cap) || P.gband.size() > static_cast<size_t>(cap);
}

// Phase 3 (one thread per layer): both selections from the bands. A band that misses its threshold (an
// unlucky sample, or ties that overflow it) sends that selection, and grow after keep, to the exact select_top.
template <typename W, typename S>
void resolve_t(LayerView& L, Pending& P) {
  using namespace detail;
  const auto [n, wp, sp, mp] = Typed<W, S>(L);
  Keep& keep = L.keep;
  const bool keep_low = !keep.drop_form;
  const KeepKeys<W> keep_keys{wp, mp, P.flip};
  const GrowKeys<W, S> grow_keys{wp, sp, mp, &keep};
  bool grow_exact = P.exact || P.missed;
  if (P.keep_sel) {
    const int64_t need = P.kk - P.k_above;
    if (P.exact || P.missed || need <= 0 || need > static_cast<int64_t>(P.kband.size())) {
      keep.sel = select_top(n, P.kk, keep_low, keep_keys, P.exact);
      grow_exact = true;
    } else {
      keep.sel = band_select(P.kband, need, keep_low, P.kb.lo, P.kb.hi);
    }
  }
  if (!P.grow_sel) return;
  if (!grow_exact) {
    // the undecided positions: those keep did not keep compete for grow
    const uint32_t k_flip = tie_flip(keep_low), g_flip = tie_flip(true);
    const uint32_t g_lo = static_cast<uint32_t>(P.gb.lo), g_width = static_cast<uint32_t>(P.gb.hi - P.gb.lo);
    int64_t above = P.g_above;
    for (size_t t = 0; t < P.kband.size(); ++t) {
      const uint64_t entry = P.kband[t];
      const int64_t i = static_cast<uint32_t>(entry) ^ k_flip;
      const int64_t key = static_cast<int64_t>(entry >> 32) ^ P.flip;  // back to the |w| key
      if (keep.kept(key, i)) continue;
      const uint32_t g = P.kband_score[t];
      if (static_cast<int64_t>(g) > P.gb.hi) ++above;
      else if (g - g_lo <= g_width) P.gband.push_back(pack(g, i, g_flip));
    }
    const int64_t need = L.n_grow - above;
    if (need > 0 && need <= static_cast<int64_t>(P.gband.size())) {
      L.grow = band_select(P.gband, need, true, P.gb.lo, P.gb.hi);
      return;
    }
  }
  L.grow = select_top(n, L.n_grow, true, grow_keys, P.exact);
}

// Writes positions [s, s + len) of a layer given the new mask there (nw) and new & old (both): weight and states
// keep their values where both, the grad where new.
template <typename W>
inline void write_block(const LayerView& L, int64_t s, int64_t len, const uint8_t* nw, const uint8_t* both) {
  select_bits_inplace<sizeof(W)>(static_cast<W*>(L.w) + s, both, len);
  for (const auto& d : L.states) select_inplace_any(d.first + s * d.second, both, len, d.second);
  if (L.grad) select_inplace_any(L.grad + s * L.grad_bytes, nw, len, L.grad_bytes);
  std::memcpy(L.mask + s, nw, len);
}

template <typename W, typename S>
void write_layer_t(LayerView& L) {
  const auto [n, wp, sp, mp] = Typed<W, S>(L);
  const Keep& keep = L.keep;
  const Sel& grow = L.grow;
  // a pass over weight and score, each state and the grad
  const int64_t passes = 2 + static_cast<int64_t>(L.states.size()) + (L.grad != nullptr);
  parallel_work(n, passes, [&](int64_t b, int64_t e) {
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
      write_block<W>(L, s, len, nw, both);
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

// f(W(), S()) for a layer's weight and score types. A score comes in its weight's type, or as fp32 for an fp16/bf16
// weight (rigl_ops.cpp converts any other first): 6 pairs compiled, not 16, which halves the build's time.
template <typename F>
void dispatch_layer(const LayerView& L, F&& f) {
  dispatch(L.w_type, [&](auto w) {
    using W = decltype(w);
    if (L.s_type == L.w_type) return f(w, w);
    if constexpr (sizeof(W) == 2) {
      if (L.s_type == FloatType::f32) return f(w, float());
    }
    TORCH_CHECK(false, "rigl_fast: internal error: a score type the kernels are not compiled for");
  });
}

}  // namespace

}  // namespace RIGL_ISA
}  // namespace rigl_fast
