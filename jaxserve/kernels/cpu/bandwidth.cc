// The read-bandwidth probe: sums a float32 buffer with every pool thread, each reading its share as `streams`
// interleaved runs.
//
// Why: a roofline must be the fastest this machine reads memory, and one run per core is not it. On a 2-core
// Sapphire Rapids VM a jitted XLA reduction (one run per thread) reads ~16 GB/s, this loop ~22 GB/s with 8 runs per
// thread: against the former, a kernel that keeps several runs in flight would show an MBU over 100%. The sum is
// returned so the reads cannot be optimised away.
#include <cstdint>
#include <vector>

#include "common.h"

namespace jaxserve {
namespace {

namespace ffi = xla::ffi;

// Floats per step of one run: 4 registers, 256 bytes, so each step touches whole cache lines.
constexpr int64_t kStep = 4 * kLanes;

double sum_runs(const float* x, int64_t n, int64_t streams) {
  const int64_t run = n / streams / kStep * kStep;
  vfloat acc[4] = {};
  for (int64_t i = 0; i < run; i += kStep)
    for (int64_t s = 0; s < streams; ++s) {
      const float* p = x + s * run + i;
      for (int j = 0; j < 4; ++j) acc[j] += load(p + j * kLanes);
    }
  double total = 0;
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < kLanes; ++l) total += acc[j][l];
  for (int64_t i = streams * run; i < n; ++i) total += x[i];  // what does not fill a whole step of every run
  return total;
}

ffi::Error StreamRead(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, int32_t streams,
                      ffi::ResultBuffer<ffi::F32> out) {
  if (streams < 1) return ffi::Error::InvalidArgument("stream_read: streams must be >= 1");
  const int64_t n = static_cast<int64_t>(x.element_count());
  const int64_t parts = std::max<int64_t>(pool.num_threads(), 1);
  std::vector<double> sums(parts);
  parallel_for(pool, parts, [&](int64_t t) {
    const int64_t lo = t * n / parts, hi = (t + 1) * n / parts;
    sums[t] = sum_runs(x.typed_data() + lo, hi - lo, streams);
  });
  double total = 0;
  for (double s : sums) total += s;
  out->typed_data()[0] = static_cast<float>(total);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxserve

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveStreamRead, jaxserve::StreamRead,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int32_t>("streams")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
