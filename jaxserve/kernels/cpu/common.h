// Shared by the CPU kernels: a parallel loop on XLA's own intra-op thread pool, and the vector type.
//
// The kernels run inside an XLA:CPU executable, so they use the thread pool XLA hands to FFI handlers instead of
// OpenMP: no second set of spinning threads competing with XLA's for the same cores.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// Whether -march=native compiled for an AMD Zen core (GCC 12 names Zen 4 znver3 too). The read orders of the
// matmul and the decode attention are chosen per vendor as well as per instruction set: each was tuned on one kind
// of 2-core VM, and on a Zen 4 the Sapphire Rapids orders read 15-35% slower (see matmul.cc and attention.cc).
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || defined(__znver4__) || defined(__znver5__)
#define JAXSERVE_AMD_ZEN 1
#else
#define JAXSERVE_AMD_ZEN 0
#endif

// One SIMD register of floats: 16 lanes under AVX-512, 8 under AVX2; GCC lowers wider types on narrower ISAs.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(4)));

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat*>(p); }
inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat*>(p) = v; }
// x - 0 is exactly x for every float (0 + x is not: -0 + 0 = +0), so this compiles to a bare broadcast.
inline vfloat splat(float x) { return x - vfloat{}; }

// e**x for x in float32 range (clamped to [-87, 88]): Cody-Waite reduction to r in [-ln2/2, ln2/2], a degree-6
// Taylor polynomial (relative error ~1e-7), and the power of two put into the exponent bits. exp(0) is exactly 1.
inline vfloat vexp(vfloat x) {
  const vfloat lo = splat(-87.0f), hi = splat(88.0f), magic = splat(12582912.0f);  // 1.5 * 2**23
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vfloat t = x * splat(1.44269504088896341f) + magic;  // round(x / ln2) in the low mantissa bits
  const vfloat n = t - magic;
  const vfloat r = (x - n * splat(0.693359375f)) + n * splat(2.12194440e-4f);
  vfloat p = splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const vint bits = (((vint)t - (vint)magic) + 127) << 23;
  return p * (vfloat)bits;
}

// Calls f(std::integral_constant<int, NV>{}) with NV = dim / kLanes when that is 1, 2, 4 or 8, so a kernel's loops
// over D have fixed trip counts and its accumulators stay in registers; NV = 0 (any dim, scalar tails) otherwise.
template <typename F>
void with_vectors_per_dim(int64_t dim, F f) {
  switch (dim > 0 && dim % kLanes == 0 ? dim / kLanes : 0) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

// Checks the operand shapes both paged attention kernels share: q and out [B, T, Hkv, G, D], k_pool and v_pool
// [num_pages, Hkv, page_size, D], block_table [B, n], positions [B, T], and sliding_window >= 0. Messages start with
// `name`. The python wrappers check the same first; this keeps a direct FFI caller from reading out of bounds.
template <typename Dims>
xla::ffi::Error check_paged_attention(const std::string& name, Dims qd, Dims kd, Dims vd, Dims td, Dims pd, Dims od,
                                      int32_t sliding_window) {
  using xla::ffi::Error;
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 || pd.size() != 2 || od.size() != 5)
    return Error::InvalidArgument(name + ": q and out must be [B, T, Hkv, G, D], pools [num_pages, Hkv, page_size, "
                                  "D], block_table [B, n], positions [B, T]");
  for (size_t i = 0; i < 4; ++i)
    if (vd[i] != kd[i]) return Error::InvalidArgument(name + ": k_pool and v_pool differ");
  for (size_t i = 0; i < 5; ++i)
    if (od[i] != qd[i]) return Error::InvalidArgument(name + ": out must have q's shape");
  if (kd[1] != qd[2] || kd[3] != qd[4] || td[0] != qd[0] || pd[0] != qd[0] || pd[1] != qd[1])
    return Error::InvalidArgument(name + ": shapes of q, pools, block_table, positions disagree");
  if (sliding_window < 0) return Error::InvalidArgument(name + ": sliding_window < 0");
  return Error::Success();
}

// What both paged attention kernels (decode and prefill) take: q, k_pool, v_pool, block_table, positions and the
// sliding window, returning out.
inline auto paged_attention_binding() {
  return xla::ffi::Ffi::Bind()
      .Ctx<xla::ffi::ThreadPool>()
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // q
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // k_pool
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // v_pool
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // block_table
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // positions
      .Attr<int32_t>("sliding_window")
      .Ret<xla::ffi::Buffer<xla::ffi::F32>>();
}

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

// Runs body(begin, end) over [0, n) in order-preserving pieces: [0, n) is cut into one contiguous range per
// worker (the calling thread and pool helpers, as in parallel_for), each worker takes pieces of `grain` items from
// the front of its own range, and one that runs out takes pieces from the back of the others'. Why: a worker then
// reads its range as one long stream, as with one chunk per thread, yet a core that runs slow (a VM's vCPU sharing
// its core, a helper woken late) no longer holds up the call: with one fixed half each, the two halves of the
// 110M model's decode matmuls ended 43-97 us apart on average in 415-480 us calls (2-core Zen 2 VM).
template <typename Body>
void parallel_ranges(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, Body body) {
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), std::max<int64_t>(n, 1));
  if (workers <= 1 || n <= grain) {
    if (n > 0) body(int64_t{0}, n);
    return;
  }
  // Range w is [front, back), packed into one word so both ends move by compare-and-swap.
  struct alignas(64) Range {
    std::atomic<uint64_t> ends;
  };
  struct State {
    explicit State(int64_t count) : ranges(new Range[count]) {}
    std::unique_ptr<Range[]> ranges;
    std::atomic<int64_t> joined{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>(workers);
  for (int64_t w = 0; w < workers; ++w)
    state->ranges[w].ends =
        static_cast<uint64_t>(w * n / workers) << 32 | static_cast<uint64_t>((w + 1) * n / workers);
  // Takes up to `grain` items from the front (or back) of range w: [begin, end), empty when the range is.
  const auto take = [state, grain](int64_t w, bool front) {
    uint64_t ends = state->ranges[w].ends.load();
    while (true) {
      const int64_t lo = static_cast<int64_t>(ends >> 32), hi = static_cast<int64_t>(ends & 0xffffffffu);
      if (lo >= hi) return std::pair<int64_t, int64_t>{lo, lo};
      const int64_t a = front ? lo : std::max(lo, hi - grain), b = front ? std::min(hi, lo + grain) : hi;
      const uint64_t next = front ? static_cast<uint64_t>(b) << 32 | static_cast<uint64_t>(hi)
                                  : static_cast<uint64_t>(lo) << 32 | static_cast<uint64_t>(a);
      if (state->ranges[w].ends.compare_exchange_weak(ends, next)) return std::pair<int64_t, int64_t>{a, b};
    }
  };
  auto work = [state, workers, take, &body]() {
    const int64_t me = state->joined.fetch_add(1);
    int64_t finished = 0;
    for (int64_t i = 0; i < workers; ++i) {
      const int64_t w = (me + i) % workers;
      for (auto [a, b] = take(w, i == 0); a < b; std::tie(a, b) = take(w, i == 0)) {
        body(a, b);
        finished += b - a;
      }
    }
    state->done.fetch_add(finished);
  };
  // As in parallel_for: helpers hold the state only, and `body` is touched solely while items remain.
  for (int64_t h = 1; h < workers; ++h) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

}  // namespace jaxserve
