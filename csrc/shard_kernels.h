// The per-shard kernels of the sharded (FSDP2) update (ops.Backend.key_histograms, take_top, commit): the passes
// of distributed.radix_top_k's radix select and the write after it. Each takes every layer at once and runs one
// parallel loop over spans of all of them (common.h: spans). Compiled once per instruction set, after
// update_kernels.h (whose key functor, write block and dispatch they share), by shard_base.cpp and shard_avx2.cpp;
// nothing else includes it.
#pragma once

#include "common.h"
#include "select.h"
#include "update_kernels.h"

namespace rigl_fast {
namespace RIGL_ISA {
namespace {

using detail::kKeyBlock;

// Positions [s, s + len) of a strided shard, in flat order, into out: the multi-index of s, then runs along the
// last dimension with a carry into the ones before.
template <typename T>
void gather(const ShardValues& v, int64_t s, int64_t len, T* __restrict out) {
  const int64_t last = static_cast<int64_t>(v.sizes.size()) - 1;
  c10::SmallVector<int64_t, 8> idx(last + 1);
  int64_t off = 0;
  for (int64_t d = last, rest = s; d >= 0; --d) {
    idx[d] = rest % v.sizes[d];
    rest /= v.sizes[d];
    off += idx[d] * v.strides[d];
  }
  const T* x = static_cast<const T*>(v.data);
  const int64_t step = v.strides[last];
  for (int64_t j = 0; j < len;) {
    const int64_t run = std::min(len - j, v.sizes[last] - idx[last]);
    for (int64_t r = 0; r < run; ++r) out[j + r] = x[off + r * step];
    j += run;
    off += run * step;
    idx[last] += run;
    for (int64_t d = last; d > 0 && idx[d] == v.sizes[d]; --d) {
      off += v.strides[d - 1] - idx[d] * v.strides[d];
      idx[d] = 0;
      ++idx[d - 1];
    }
  }
}

// A shard's selection keys, for select.h's block functions: |x| bits (as fp32, like reference.selection_keys)
// at eligible positions, -1 elsewhere. Blocks of a strided shard are gathered first (at most kKeyBlock long).
template <typename T>
struct ShardKeys {
  const ShardValues* v;
  uint8_t skip;  // the flag of positions that do not compete
  void operator()(int64_t b, int64_t len, int32_t* __restrict out) const {
    if (v->strides.empty()) {
      KeepKeys<T>{static_cast<const T*>(v->data), v->flags, 0u, skip}(b, len, out);
      return;
    }
    TORCH_INTERNAL_ASSERT(len <= kKeyBlock);
    alignas(64) T buf[kKeyBlock];
    gather(*v, b, len, buf);
    KeepKeys<T>{buf, v->flags + b, 0u, skip}(0, len, out);
  }
};

// fn(keys) with layer l's key functor, typed by its dtype.
template <typename Fn>
void with_keys(const std::vector<ShardValues>& values, int64_t l, bool flag_value, const Fn& fn) {
  dispatch(values[l].type, [&](auto t) { fn(ShardKeys<decltype(t)>{&values[l], static_cast<uint8_t>(!flag_value)}); });
}

}  // namespace

void key_histograms(const std::vector<ShardValues>& values, bool flag_value, const int64_t* prefixes, int shift,
                    int bits, int64_t* out) {
  const int hi = shift + bits;
  const int64_t nb = int64_t{1} << bits;
  std::vector<int64_t> numel(values.size(), 0);  // a layer no key can match has nothing to count
  for (size_t l = 0; l < values.size(); ++l)
    if (prefixes[l] >= 0 && prefixes[l] <= (kKeyMax >> hi)) numel[l] = values[l].n;
  const auto sp = spans(numel);
  std::mutex mu;
  parallel_spans(sp, [&](int64_t first, int64_t last) {
    // this task's counts of its current layer, added to the layer's row when the task is done with it
    std::vector<int64_t> h(nb + detail::kSpareBins, 0);
    for (int64_t p = first; p < last; ++p) {
      const Span& S = sp[p];
      with_keys(values, S.layer, flag_value, [&](const auto& keys) {
        detail::digit_histogram(keys, S.b, S.e, static_cast<uint32_t>(prefixes[S.layer]), hi, shift, nb, h.data());
      });
      if (p + 1 < last && sp[p + 1].layer == S.layer) continue;
      std::lock_guard<std::mutex> lock(mu);
      int64_t* row = out + S.layer * nb;
      for (int64_t j = 0; j < nb; ++j) row[j] += std::exchange(h[j], 0);
    }
  });
}

// Per layer a Sel: eligible keys above the threshold, and the ties up to the n_ties-th (the tie cutoff). The
// cutoff of a layer that has ties to place comes from per-span tie counts (one parallel loop over every such
// layer), a scan of them in index order to the span where the count reaches n_ties, and a search inside that
// span; then one parallel loop writes every layer, one integer compare per element in every block the cutoff
// does not cut (Sel::block_threshold).
void take_top(const std::vector<ShardValues>& values, bool flag_value, const int64_t* thresholds,
              const int64_t* n_ties, const std::vector<uint8_t*>& outs) {
  const size_t L = values.size();
  std::vector<Sel> sel(L);
  std::vector<int64_t> tied_numel(L, 0);
  for (size_t l = 0; l < L; ++l) {
    const int64_t T = thresholds[l];
    // T > kKeyMax takes nothing; T < 0 every eligible position, so has no ties to count
    sel[l] = T > kKeyMax ? sel_none() : Sel{T, -1, true};
    if (T >= 0 && T <= kKeyMax && n_ties[l] > 0) {
      tied_numel[l] = values[l].n;
      sel[l].cutoff = std::numeric_limits<int64_t>::max();  // every tie, unless the scan finds the n_ties-th
    }
  }
  const auto tied = spans(tied_numel);
  std::vector<int64_t> ties(tied.size());
  parallel_spans(tied, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const Span& S = tied[p];
      with_keys(values, S.layer, flag_value,
                [&](const auto& keys) { ties[p] = detail::count_key(keys, S.b, S.e, thresholds[S.layer]); });
    }
  });
  std::vector<std::pair<int64_t, int64_t>> cut;  // (span holding a layer's cutoff, the tie wanted in it)
  int64_t need = 0;
  for (size_t p = 0; p < tied.size(); ++p) {
    if (p == 0 || tied[p].layer != tied[p - 1].layer) need = n_ties[tied[p].layer];
    if (need <= 0) continue;
    if (ties[p] >= need) cut.emplace_back(p, need);
    need -= ties[p];
  }
  parallel_work(static_cast<int64_t>(cut.size()), kGrain, [&](int64_t b, int64_t e) {  // a span each
    for (int64_t c = b; c < e; ++c) {
      const Span& S = tied[cut[c].first];
      with_keys(values, S.layer, flag_value, [&](const auto& keys) {
        sel[S.layer].cutoff = detail::nth_key(keys, S.b, S.e, thresholds[S.layer], cut[c].second, true);
      });
    }
  });
  std::vector<int64_t> numel(L);
  for (size_t l = 0; l < L; ++l) numel[l] = values[l].n;
  const auto sp = spans(numel);
  parallel_spans(sp, [&](int64_t first, int64_t last) {
    alignas(64) int32_t k[kKeyBlock];
    for (int64_t p = first; p < last; ++p) {
      const Span& S = sp[p];
      const Sel& s = sel[S.layer];
      uint8_t* out = outs[S.layer];
      with_keys(values, S.layer, flag_value, [&](const auto& keys) {
        for (int64_t b = S.b; b < S.e; b += kKeyBlock) {
          const int64_t len = std::min(kKeyBlock, S.e - b);
          keys(b, len, k);
          int64_t U;
          if (s.block_threshold(b, b + len, U)) {
            const int32_t u = static_cast<int32_t>(U);  // in [-1, kKeyMax]; ineligible keys (-1) never pass
            for (int64_t j = 0; j < len; ++j) out[b + j] = k[j] > u;
          } else {
            for (int64_t j = 0; j < len; ++j) out[b + j] = s.chosen(k[j], b + j);  // T >= 0 here: -1 never chosen
          }
        }
      });
    }
  });
}

void commit_layers(const std::vector<LayerView>& layers, const std::vector<const uint8_t*>& keep,
                   const std::vector<const uint8_t*>& grow) {
  std::vector<int64_t> numel(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) numel[l] = layers[l].n;
  const auto sp = spans(numel);
  parallel_spans(sp, [&](int64_t first, int64_t last) {
    alignas(64) uint8_t nw[kBlock], both[kBlock];
    for (int64_t p = first; p < last; ++p) {
      const Span& S = sp[p];
      const LayerView& Lv = layers[S.layer];
      const uint8_t* __restrict kp = keep[S.layer];
      const uint8_t* __restrict gp = grow[S.layer];
      dispatch(Lv.w_type, [&](auto w) {
        for (int64_t s = S.b; s < S.e; s += kBlock) {
          const int64_t len = std::min(kBlock, S.e - s);
          for (int64_t j = 0; j < len; ++j) {
            nw[j] = kp[s + j] | gp[s + j];
            both[j] = nw[j] & Lv.mask[s + j];
          }
          write_block<decltype(w)>(Lv, s, len, nw, both);
        }
      });
    }
  });
}

}  // namespace RIGL_ISA
}  // namespace rigl_fast
