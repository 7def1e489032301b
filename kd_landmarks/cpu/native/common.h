// Helpers shared by the native CPU kernels (depthwise_cpu.cc, batch_norm_cpu.cc).
#ifndef KD_LANDMARKS_NATIVE_COMMON_H_
#define KD_LANDMARKS_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace kd_landmarks {

namespace ffi = xla::ffi;

// 8 float32 lanes with GCC/Clang vector extensions (the compiler maps them to SSE/AVX).
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

// Unaligned loads and stores through a 4-byte-aligned, may_alias view of the same vector type: one unaligned
// vector move (vmovups) under every -march/-mtune. Through memcpy instead, GCC 12 tuned for Haswell or Zen
// (-march=haswell, x86-64-v3, znver2, znver3: what -march=native means on an AMD EPYC) assembled each vector in
// a stack slot from smaller stores and read it back with one wide load, which cannot be forwarded from them:
// the BatchNorm moments of [8, 112, 112, 96] took 28 ms instead of 1.4 (measured on this Xeon with those flags).
typedef float v8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

inline v8 Load(const float* p) { return *reinterpret_cast<const v8_unaligned*>(p); }
inline void Store(float* p, v8 v) { *reinterpret_cast<v8_unaligned*>(p) = v; }

// Runs fn(0) ... fn(count - 1) on the calling thread and XLA's intra-op thread pool. Work is claimed
// from a shared counter, so the caller never waits for a task that has not started: if the pool is
// busy (or is this very thread), the caller does every chunk itself. Late tasks find nothing to claim.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, F fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  // A helper that starts after the caller returned only reads the counter: it never calls fn.
  auto worker = [state, count, fn_ptr = &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      (*fn_ptr)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(worker)(worker));  // each task owns a copy
  worker();
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// Splits [0, count) into `chunks` contiguous ranges run by ParallelFor; range_fn(begin, end, totals) adds its
// range's contribution into its own `size` zeroed totals. Returns the totals summed in range order (the same
// result for the same `chunks`, whatever the thread timing).
template <typename T, typename F>
std::vector<T> ReduceRanges(ffi::ThreadPool& pool, int64_t count, int64_t chunks, int64_t size, F range_fn) {
  std::vector<T> partial(chunks * size, T(0));
  ParallelFor(pool, chunks, [&](int64_t k) {
    range_fn(count * k / chunks, count * (k + 1) / chunks, partial.data() + k * size);
  });
  for (int64_t k = 1; k < chunks; ++k) {
    for (int64_t i = 0; i < size; ++i) partial[i] += partial[k * size + i];
  }
  partial.resize(size);
  return partial;
}

}  // namespace kd_landmarks

#endif  // KD_LANDMARKS_NATIVE_COMMON_H_
