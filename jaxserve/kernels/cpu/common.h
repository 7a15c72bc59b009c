// Shared by the CPU kernels: a parallel loop on XLA's own intra-op thread pool, and the vector type.
//
// The kernels run inside an XLA:CPU executable, so they use the thread pool XLA hands to FFI handlers instead of
// OpenMP: no second set of spinning threads competing with XLA's for the same cores.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// One SIMD register of floats: 16 lanes under AVX-512, 8 under AVX2; GCC lowers wider types on narrower ISAs.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat*>(p); }
inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat*>(p) = v; }
inline vfloat splat(float x) { return vfloat{} + x; }

// Runs body(i) for i in [0, n). Work is claimed from a shared counter by the calling thread and by helpers
// scheduled on the pool, so the loop finishes even if the pool's threads are busy elsewhere (the caller then does
// every item itself); state lives in a shared_ptr because a late helper may start after the loop returned.
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, Body body) {
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body]() {
    int64_t finished = 0;
    for (int64_t i = state->next.fetch_add(1); i < n; i = state->next.fetch_add(1)) {
      body(i);
      ++finished;
    }
    state->done.fetch_add(finished);
  };
  // Helpers get a copy of the state pointer only: `body` is touched solely while items remain, and the caller
  // waits until every item is done, so it outlives every call.
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

}  // namespace jaxserve
