// The structured update's grow (ops.Backend.structured_update, unit_grow): every unit of a layer grows its target
// minus its kept count, the largest |score| among its positions not kept, ties to the lower index within the unit.
// A segmented selection: units are small (N:M: M positions; fan_in: one row), so each is selected on its own, from
// its own keys, with no sort of the layer and nothing the size of a layer but the flags written out.
//
// Work is cut into tiles of whole units (kTile positions or so) and one parallel loop runs the tiles of every layer.
// A tile's keys are loaded into a unit-major buffer (for a transposed layer, whose units are strided by `out` in
// flat order, the tile is a block of the stored (fan_in, out) tensor: each stored row gives a contiguous run of one
// position to each unit column), the units are selected there, and the result goes back out in flat order: as
// grow flags (unit_grow), or through the update's block write (structured_commit), so that after keep's selection a
// structured update reads and writes each position once.
//
// Compiled once per instruction set, after update_kernels.h and shard_kernels.h (whose key functors, write block
// and dispatch it shares), by shard_base.cpp and shard_avx2.cpp; nothing else includes it.
#pragma once

#include "common.h"
#include "select.h"
#include "shard_kernels.h"
#include "update_kernels.h"

namespace rigl_fast {
namespace RIGL_ISA {
namespace {

using detail::kKeyBlock;

// Units up to this size are selected by counting, for each position, the positions that outrank it: g^2 compares,
// cheaper than building a candidate list for N:M's groups of 2 to 16.
constexpr int64_t kCountGroup = 32;
// Positions of a tile (unless one row holds more): its buffers, 5 bytes a position, stay in the core's caches
// between the load, the selection and the write.
constexpr int64_t kTile = 8192;
// The least width of a transposed tile, in columns: each stored row is read (and written) in runs this long. Wider
// runs cut the page and cache-line changes of the strided walk (64 measured 1.2x faster than 16; 128 no better).
constexpr int64_t kMinWidth = 64;
constexpr int64_t kNMSpan = 64;

// A task's scratch for the units of its tiles: the tile's keys and grow flags, unit-major (row o - o0 at
// (o - o0) * pitch, then the fan-in in order), and the candidates of one unit's selection.
struct TileScratch {
  std::vector<int32_t> keys;
  std::vector<uint8_t> grow;
  std::vector<uint64_t> sub;
};

// grow[j] for the g positions of one unit (G: g known at compile time, 0 if not), from their keys (|score| bits, -1
// at kept positions): the target - kept largest keys among the unkept positions, ties to the lower j.
template <int G>
inline void unit_select(const int32_t* __restrict keys, int64_t g_run, int64_t target, uint8_t* __restrict grow,
                        TileScratch& s) {
  const int64_t g = G ? G : g_run;
  int64_t kept = 0;
  for (int64_t j = 0; j < g; ++j) kept += keys[j] < 0;
  int64_t need = target - kept;
  if (g <= kCountGroup) {
    // branch-free: whether a unit grows nothing, some or all of its unkept positions is as good as random, and
    // the count gives each case (kept positions, -1, never outrank an unkept one)
    for (int64_t j = 0; j < g; ++j) {
      const int32_t k = keys[j];
      int64_t ahead = 0;
      for (int64_t i = 0; i < g; ++i) ahead += (keys[i] > k) | ((keys[i] == k) & (i < j));
      grow[j] = static_cast<uint8_t>(k >= 0) & static_cast<uint8_t>(ahead < need);
    }
    return;
  }
  if (need <= 0 || need >= g - kept) {  // nothing to grow, or every unkept position
    const uint8_t any = need > 0;
    for (int64_t j = 0; j < g; ++j) grow[j] = any & static_cast<uint8_t>(keys[j] >= 0);
    return;
  }
  // the need-th largest (key, lower index first) among the unkept: a histogram of their keys over their range
  // (2 to 4 in a bucket on average) finds the bucket holding it, and only that bucket is ordered
  uint32_t lo = std::numeric_limits<uint32_t>::max();
  int32_t hi = 0;
  for (int64_t j = 0; j < g; ++j) {  // vectorised; a kept key, -1, is the largest uint32 and the smallest int32
    lo = std::min(lo, static_cast<uint32_t>(keys[j]));
    hi = std::max(hi, keys[j]);
  }
  const int bits = std::clamp(static_cast<int>(std::bit_width(static_cast<uint64_t>(g - kept))) - 2, 1, 11);
  const uint32_t flip = detail::tie_flip(true);
  detail::histogram_bucket(
      g, [&](int64_t j) { return keys[j]; },
      [&](int64_t j) { return detail::pack(static_cast<uint32_t>(keys[j]), j, flip); }, need, lo, hi, bits, s.sub);
  const Sel sel = detail::nth_sel(s.sub, need, true);
  for (int64_t j = 0; j < g; ++j) grow[j] = sel.chosen(keys[j], j);  // T >= 0: a kept key (-1) is never chosen
}

// Rows [o0, o1) by fan-in positions [f0, f1) of one layer's units (f0 and f1 at unit boundaries).
struct Tile {
  int64_t layer, o0, o1, f0, f1;
};

// The distance between rows in a tile's buffers. A transposed tile is filled a stored row at a time, one element per
// tile row, so its rows are an odd number of cache lines apart: a power-of-two fan-in would put all of them in one
// cache set.
inline int64_t tile_pitch(const UnitLayout& u, const Tile& t) {
  return u.transposed ? 16 * (((t.f1 - t.f0 + 15) / 16) | 1) : t.f1 - t.f0;
}

// Selects every unit of a tile. N:M's usual groups get loops of their own (the count of a unit of 4 unrolls into a
// few vector compares).
inline void select_units(const UnitLayout& u, const Tile& t, TileScratch& s) {
  const int64_t pitch = tile_pitch(u, t), span = t.f1 - t.f0;
  const auto each = [&](auto G) {
    for (int64_t r = 0; r < t.o1 - t.o0; ++r)
      for (int64_t at = r * pitch; at < r * pitch + span; at += u.group)
        unit_select<decltype(G)::value>(s.keys.data() + at, u.group, u.target, s.grow.data() + at, s);
  };
  switch (u.group) {
    case 2: return each(std::integral_constant<int, 2>());
    case 4: return each(std::integral_constant<int, 4>());
    case 8: return each(std::integral_constant<int, 8>());
    case 16: return each(std::integral_constant<int, 16>());
    default: return each(std::integral_constant<int, 0>());
  }
}

// Calls fn(p, len, idx, stride) for runs of consecutive flat positions of a tile: positions p, ..., p + len - 1
// (len <= kKeyBlock) sit at idx, idx + stride, ... of the tile's buffers.
template <typename Fn>
void tile_runs(const UnitLayout& u, const Tile& t, const Fn& fn) {
  if (!u.transposed) {  // whole rows: the tile is one range of flat positions, in unit-major order already
    const int64_t n = (t.o1 - t.o0) * u.fan_in;
    for (int64_t s = 0; s < n; s += kKeyBlock) fn(t.o0 * u.fan_in + s, std::min(kKeyBlock, n - s), s, int64_t{1});
  } else {
    const int64_t pitch = tile_pitch(u, t);
    for (int64_t f = t.f0; f < t.f1; ++f) fn(f * u.out + t.o0, t.o1 - t.o0, f - t.f0, pitch);
  }
}

// Selects every unit of a tile: keys(p, len, out) writes the keys of flat positions p..p+len-1 (|score| bits, -1
// where kept); sink(p, len, grow, keys) receives the grow flags and keys of such a run.
template <typename Keys, typename Sink>
void grow_tile(const UnitLayout& u, const Tile& t, const Keys& keys, const Sink& sink, TileScratch& s) {
  const int64_t size = (t.o1 - t.o0) * tile_pitch(u, t);
  s.keys.resize(size);
  s.grow.resize(size);
  int32_t* kb = s.keys.data();
  uint8_t* gb = s.grow.data();
  alignas(64) int32_t kseg[kKeyBlock];
  alignas(64) uint8_t gseg[kKeyBlock];
  tile_runs(u, t, [&](int64_t p, int64_t len, int64_t idx, int64_t stride) {
    keys(p, len, kseg);
    for (int64_t j = 0; j < len; ++j) kb[idx + j * stride] = kseg[j];
  });
  select_units(u, t, s);
  tile_runs(u, t, [&](int64_t p, int64_t len, int64_t idx, int64_t stride) {
    for (int64_t j = 0; j < len; ++j) {
      gseg[j] = gb[idx + j * stride];
      kseg[j] = kb[idx + j * stride];
    }
    sink(p, len, gseg, kseg);
  });
}

// fn(tile, scratch) for the tiles of every layer, in one parallel loop. A layer stored (out, fan_in) is tiled by
// whole rows. A transposed layer by blocks of its stored (fan_in, out) tensor, kMinWidth to kKeyBlock columns
// wide: the whole fan-in for fan_in's units (a unit is a column), and for N:M's a few units' worth of stored rows
// (kNMSpan fan-in positions: contiguous reads, and a tile of enough columns).
template <typename Fn>
void for_each_tile(const std::vector<UnitLayout>& units, const Fn& fn) {
  std::vector<Tile> tiles;
  int64_t positions = 0;
  for (size_t l = 0; l < units.size(); ++l) {
    const UnitLayout& u = units[l];
    const int64_t L = static_cast<int64_t>(l);
    positions += u.out * u.fan_in;
    if (!u.transposed) {
      const int64_t rows = std::max<int64_t>(1, kTile / u.fan_in);
      for (int64_t o = 0; o < u.out; o += rows) tiles.push_back({L, o, std::min(u.out, o + rows), 0, u.fan_in});
      continue;
    }
    const int64_t span = std::min(u.fan_in, u.group * std::max<int64_t>(1, kNMSpan / u.group));
    const int64_t pitch = tile_pitch(u, Tile{L, 0, 0, 0, span});
    const int64_t width = std::clamp<int64_t>((kTile / pitch) & ~int64_t{15}, kMinWidth, kKeyBlock);
    for (int64_t f = 0; f < u.fan_in; f += span)
      for (int64_t o = 0; o < u.out; o += width)
        tiles.push_back({L, o, std::min(u.out, o + width), f, std::min(u.fan_in, f + span)});
  }
  parallel_tasks(static_cast<int64_t>(tiles.size()), positions, [&](int64_t b, int64_t e) {
    TileScratch s;
    for (int64_t t = b; t < e; ++t) fn(tiles[t], s);
  });
}

}  // namespace

void structured_commit(const std::vector<LayerView>& layers, const std::vector<UnitLayout>& units) {
  for_each_tile(units, [&](const Tile& T, TileScratch& s) {
    const LayerView& L = layers[T.layer];
    dispatch_layer(L, [&](auto w, auto sc) {
      using W = decltype(w);
      using S = decltype(sc);
      const GrowKeys<W, S> keys{static_cast<const W*>(L.w), static_cast<const S*>(L.score), L.mask, &L.keep};
      const auto write = [&](int64_t p, int64_t len, const uint8_t* grow, const int32_t* k) {
        alignas(64) uint8_t nw[kKeyBlock], both[kKeyBlock];
        for (int64_t t = 0; t < len; ++t) {
          nw[t] = grow[t] | static_cast<uint8_t>(k[t] < 0);  // a kept position's key is -1
          both[t] = nw[t] & L.mask[p + t];
        }
        write_block<W>(L, p, len, nw, both);
      };
      grow_tile(units[T.layer], T, keys, write, s);
    });
  });
}

void unit_grow(const std::vector<ShardValues>& scores, const std::vector<UnitLayout>& units,
               const std::vector<uint8_t*>& outs) {
  for_each_tile(units, [&](const Tile& T, TileScratch& s) {
    uint8_t* out = outs[T.layer];
    // eligible for grow: the positions not flagged kept
    with_keys(scores, T.layer, false, [&](const auto& keys) {
      grow_tile(units[T.layer], T, keys,
                [&](int64_t p, int64_t len, const uint8_t* grow, const int32_t*) { std::memcpy(out + p, grow, len); },
                s);
    });
  });
}

}  // namespace RIGL_ISA
}  // namespace rigl_fast
