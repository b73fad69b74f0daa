// The large fp32 buffers that the sparse training's ops return at every step (the dense weight gradient, the
// transposed inputs, the products' outputs), kept for reuse when the tensor holding one is freed. Included only by
// export_kernels.cpp.
//
// Why: each step frees these and asks for the same sizes again. glibc serves large requests with fresh mappings (or
// trims its heap and grows it back), and the first touch of fresh memory faults every page in, zero-filled by the
// kernel: with transparent huge pages 2 MiB at a time (~0.2 ms each here), else 4 KiB at a time. Measured on a
// 1024x1024 layer at 95%, batch 64, in training: the weight gradient's kernel took 0.44 ms without faults and
// 0.7-1.1 ms with them (7-180 faults a step, as the heap's state went), the whole layer 1.4 ms against 1.6-2.3.
// A dense layer's matmuls allocate the same sizes and mostly found mapped memory (no faults in most of the same
// runs, 20-80 a step in some); these ops, whose run time is a few times shorter, felt the faults most.
//
// The pool: buffers in size classes (8 a power of two: a request takes a buffer of its class, at most 12.5% larger,
// so inputs whose batch or sequence length varies from step to step reuse them too), a free list per class; a
// buffer goes back to it when its last tensor dies (the DataPtr's deleter, on any thread), up to kMaxHeld bytes
// held free in all (past that it is freed as before); release() frees every held buffer
// (`rigl_fast::release_buffers`, which `pruner.remove()` calls). Requests under kMinBytes come from at::empty as
// before: the heap serves those without faults.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <bit>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rigl_fast {

// Asks the kernel to back a new pool buffer's whole 2 MiB pages with huge pages (Linux; where transparent huge
// pages are in `madvise` mode, the default of many distributions, nothing does otherwise): its first touch then
// faults once per 2 MiB, not once per 4 KiB (a 4096x4096 fp32 gradient: 16384 faults, about 19 ms here, more than
// the sparse product itself). Advice only: any failure is ignored.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < static_cast<int64_t>(2 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}


// Also a c10::Allocator, so a pooled tensor's storage is an ordinary resizable one (resize_ asks the pool again);
// each buffer starts with a kHeader-byte header holding its class, the data after it.
class BufferPool final : public c10::Allocator {
 public:
  static constexpr int64_t kMinBytes = int64_t{1} << 20;
  static constexpr int64_t kMaxHeld = int64_t{1} << 30;
  static constexpr int64_t kHeader = 64;  // the class, in a header that keeps the data 64-byte aligned

  static BufferPool& get() {  // never destroyed: a tensor may die after static destructors ran
    static BufferPool* pool = new BufferPool();
    return *pool;
  }

  // An uninitialised tensor of these sizes and dtype (contiguous, on the CPU).
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    int64_t n = 1;
    for (const int64_t s : sizes) n *= s;
    if (n * static_cast<int64_t>(c10::elementSize(dtype)) < kMinBytes)
      return at::empty(sizes, at::TensorOptions().dtype(dtype));
    return at::detail::empty_generic(sizes, this, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
  }

  at::Tensor empty_f32(at::IntArrayRef sizes) { return empty(sizes, at::kFloat); }

  c10::DataPtr allocate(std::size_t n) override {
    if (n == 0) return {nullptr, nullptr, nullptr, c10::Device(c10::DeviceType::CPU)};
    const int64_t bytes = static_cast<int64_t>(n);
    const int64_t cls = bytes < kMinBytes ? (bytes + kHeader - 1) / kHeader * kHeader : size_class(bytes);
    void* base = cls < kMinBytes ? nullptr : take(cls);
    if (base == nullptr) {
      base = std::aligned_alloc(static_cast<std::size_t>(kHeader), static_cast<std::size_t>(cls + kHeader));
      TORCH_CHECK(base != nullptr, "rigl_fast: out of memory allocating ", bytes, " bytes");
      *static_cast<int64_t*>(base) = cls;
      advise_huge_pages(base, cls + kHeader);
    }
    return {static_cast<char*>(base) + kHeader, base, &BufferPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // The bytes of the class that holds `bytes`: rounded up to a multiple of 2^(floor(log2(bytes)) - 3), so 8 classes
  // between consecutive powers of two (a multiple of kHeader from kMinBytes up, as aligned_alloc needs).
  static int64_t size_class(int64_t bytes) {
    const int64_t step = int64_t{1} << (std::bit_width(static_cast<uint64_t>(bytes)) - 1 - 3);
    return (bytes + step - 1) / step * step;
  }

  // Frees every held buffer; returns the bytes freed.
  int64_t release() {
    std::vector<void*> out;
    int64_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& kv : free_) {
        freed += kv.first * static_cast<int64_t>(kv.second.size());
        out.insert(out.end(), kv.second.begin(), kv.second.end());
      }
      free_.clear();
      held_ = 0;
    }
    for (void* p : out) std::free(p);
    return freed;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

 private:
  static void give_back(void* base) { get().give(base, *static_cast<int64_t*>(base)); }

  void* take(int64_t cls) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(cls);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    held_ -= cls;
    return p;
  }

  void give(void* base, int64_t cls) {
    if (cls >= kMinBytes) {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + cls <= kMaxHeld) {
        free_[cls].push_back(base);
        held_ += cls;
        return;
      }
    }
    std::free(base);
  }

  std::mutex mu_;
  std::unordered_map<int64_t, std::vector<void*>> free_;
  int64_t held_ = 0;
};

}  // namespace rigl_fast
