// The update's entry points (select_layers, write_layer; common.h declares them), compiled once per instruction set
// by update_base.cpp and update_avx2.cpp; nothing else includes it.
#pragma once

#include "update_kernels.h"

namespace rigl_fast {
namespace RIGL_ISA {

// Runs fn(i) for every layer i, the layers shared out dynamically among the threads (their sizes differ), as many
// threads as the layers' positions call for (threads_for).
template <typename Fn>
void for_each_layer(const std::vector<LayerView>& layers, const Fn& fn) {
  const size_t count = layers.size();
  int64_t positions = 0;
  for (const LayerView& L : layers) positions += L.n;
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(threads_for(positions), static_cast<int64_t>(count));
  parallel_tasks(workers, positions, [&](int64_t b, int64_t e) {  // one worker a thread
    for (int64_t t = b; t < e; ++t)
      for (size_t i = next++; i < count; i = next++) fn(i);
  });
}

bool select_layers(std::vector<LayerView>& layers, bool check_finite) {
  std::vector<Pending> pending(layers.size());
  auto typed = [&](LayerView& L, auto phase) { dispatch_layer(L, phase); };
  for_each_layer(layers, [&](size_t i) {
    typed(layers[i], [&](auto w, auto s) { prepare_t<decltype(w), decltype(s)>(layers[i], pending[i]); });
  });
  for (size_t i = 0; i < layers.size(); ++i) {
    typed(layers[i], [&](auto w, auto s) { scan_t<decltype(w), decltype(s)>(layers[i], pending[i]); });
    if (check_finite && pending[i].bad) return false;
  }
  for_each_layer(layers, [&](size_t i) {
    typed(layers[i], [&](auto w, auto s) { resolve_t<decltype(w), decltype(s)>(layers[i], pending[i]); });
  });
  return true;
}

void write_layer(LayerView& L) {
  dispatch_layer(L, [&](auto w, auto s) { write_layer_t<decltype(w), decltype(s)>(L); });
}

}  // namespace RIGL_ISA
}  // namespace rigl_fast
