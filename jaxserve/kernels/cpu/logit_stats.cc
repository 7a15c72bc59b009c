// Per-row statistics of float32 logits [B, V] that greedy decoding and logprobs need: the maximum, the first id
// holding it, and log(sum(exp(logits - max))), over the first `valid` ids (the rest are padding rows of the
// vocabulary that may never be sampled).
//
// Why: XLA:CPU runs each of those passes over [B, V] on one thread at ~8 GB/s and masks the padding in a pass of
// its own: ~1.3 ms at 8 x 32016 on a 2-core Sapphire Rapids VM, 3-4% of a 110M decode step. Here each row is read
// from memory once and then from cache, with every pool thread taking rows.
#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace jaxserve {
namespace {

namespace ffi = xla::ffi;

struct RowStats {
  float top;
  int32_t argmax;
  float log_total;
};

// The maximum and the first id holding it, in one pass: each lane keeps the first index of its own maximum. NaNs
// are skipped here (a comparison with NaN is false) and caught by the caller.
void max_and_first(const float* l, int64_t n, float& top, int64_t& first) {
  int64_t i = 0;
  top = -std::numeric_limits<float>::infinity();
  first = 0;
  if (n >= kLanes) {
    vint iota;
    for (int j = 0; j < kLanes; ++j) iota[j] = j;
    vfloat vmax = load(l);
    vint vfirst = iota;
    for (i = kLanes; i + kLanes <= n; i += kLanes) {
      const vfloat v = load(l + i);
      const vint greater = v > vmax;
      vmax = greater ? v : vmax;
      vfirst = greater ? iota + static_cast<int32_t>(i) : vfirst;
    }
    for (int j = 0; j < kLanes; ++j) top = vmax[j] > top ? vmax[j] : top;
    first = n;
    for (int j = 0; j < kLanes; ++j)
      if (vmax[j] == top && vfirst[j] < first) first = vfirst[j];
  }
  for (; i < n; ++i)  // the tail's ids come after every lane's, so only a strictly larger value replaces
    if (l[i] > top || (i == 0 && !(l[i] < top))) top = l[i], first = i;
}

// A row with a NaN has no maximum: like XLA's max, top and log_total are NaN, and argmax is the last id (what
// `jnp.min(jnp.where(logits == top, ids, V - 1))` gives then).
RowStats row_stats(const float* l, int64_t n, int64_t vocab) {
  float top;
  int64_t first;
  max_and_first(l, n, top, first);
  // Summed in float32 vectors over blocks of kBlock ids, the blocks' sums added in double: one float32 lane
  // running over a whole 32000-id row (1000 terms each under AVX2) was off by 2.5e-6 relative in a test.
  constexpr int64_t kBlock = 64 * kLanes;
  const vfloat vtop = splat(top);
  double total = 0;
  int64_t i = 0;
  while (i + 4 * kLanes <= n) {
    vfloat acc[4] = {};
    for (const int64_t end = std::min(n, i + kBlock); i + 4 * kLanes <= end; i += 4 * kLanes)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[j] += vexp(load(l + i + j * kLanes) - vtop);
    const vfloat lanes = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int k = 0; k < kLanes; ++k) total += lanes[k];
  }
  for (; i < n; ++i) total += std::exp(l[i] - top);
  if (std::isnan(total)) {  // a NaN in the row, or an infinite maximum (inf - inf): rare, so checked only now
    for (i = 0; i < n; ++i)
      if (std::isnan(l[i])) return {std::nanf(""), static_cast<int32_t>(vocab - 1), std::nanf("")};
  }
  return {top, static_cast<int32_t>(first), static_cast<float>(std::log(total))};
}

ffi::Error LogitStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, int32_t valid,
                      ffi::ResultBuffer<ffi::F32> top, ffi::ResultBuffer<ffi::S32> argmax,
                      ffi::ResultBuffer<ffi::F32> log_total) {
  const auto d = logits.dimensions();
  if (d.size() != 2) return ffi::Error::InvalidArgument("logit_stats: logits must be [B, V]");
  const int64_t rows = d[0], vocab = d[1];
  if (valid < 1 || valid > vocab) return ffi::Error::InvalidArgument("logit_stats: valid must be in [1, V]");
  if (top->element_count() != rows || argmax->element_count() != rows || log_total->element_count() != rows)
    return ffi::Error::InvalidArgument("logit_stats: outputs must be [B]");
  parallel_for(pool, rows, [&](int64_t r) {
    const RowStats s = row_stats(logits.typed_data() + r * vocab, valid, vocab);
    top->typed_data()[r] = s.top;
    argmax->typed_data()[r] = s.argmax;
    log_total->typed_data()[r] = s.log_total;
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxserve

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveLogitStats, jaxserve::LogitStats,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int32_t>("valid")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
