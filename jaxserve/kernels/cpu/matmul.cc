// y[M, N] = x[M, K] @ W for float32 weights pre-packed as [kStreams, N / kTile, ceil(K / kStreams), kTile].
//
// Why: decode multiplies a handful of rows by every weight of the model, so its speed is the speed at which the
// weights stream from memory. XLA:CPU's small-M GEMM reads [K, N] weights at ~11 GB/s on a 2-core Zen 5 at 8 rows;
// reading each kTile-column panel as contiguous runs, with all rows of x accumulated in registers, reads them at
// 25-28 GB/s there (a jitted reduction streams 28-36 GB/s). A panel is reused from L2 for every group of kRows
// rows, so prefill chunks stream the weights once too.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace jaxserve {
namespace {

namespace ffi = xla::ffi;

// The register tile, per instruction set (python reads kTile through jaxserve_matmul_tile()):
// - AVX-512 (32 registers): 48-column panels; 8 rows x 3 registers of accumulators, 3 of weights and 1 broadcast
//   use 28 of them. 64-column panels (32 accumulators) spill and read 19-26 GB/s at 8 rows on a 2-core Zen 5
//   against 25-28 GB/s for 48.
// - AVX2 (16 registers): 8-column panels, one register wide; 8 rows x 1 accumulator, 1 weight and 1 broadcast.
//   On a 2-core Zen 3 VM a C++ chain of the 110M model's 8-row matmuls read 17-18 GB/s this way, against ~10.5
//   GB/s for 48-column panels done 2 rows at a time (4 passes over each panel, all that 16 registers allow at that
//   width); decode_mbu.py's kernel chain went from 10.8 to 15.6-19.5 GB/s.
#if defined(__AVX512F__)
constexpr int64_t kTile = 48;
#else
constexpr int64_t kTile = 8;
#endif
constexpr int kVecs = kTile / kLanes;  // registers per row of a panel
constexpr int kRows = 8;               // rows of x per pass

// How the weights are read. K is split into kStreams runs of kq = ceil(K / kStreams) rows, and run s of every panel
// is stored in region s of the packed array, panel after panel: a thread doing panels [a, b) reads kStreams long
// contiguous streams, one line of each in turn. The order of the K sum changes with kStreams, not its terms.
// - One run per core is not what this memory does best: on a 2-core Zen 2 VM a bare read loop on both cores reads
//   ~27 GB/s with one run each and ~36-40 with four. Runs inside one panel (this kernel's earlier layout) are too
//   short to gain from it: 4 runs of 6 KB read less than one run prefetched 8 KB ahead. With four long runs, each
//   prefetched 2 KB ahead, a JAX chain of the 110M model's 8-row matmuls read 24.3 and 20.8 GB/s against 21.8
//   and 19.0 for one panel-long run prefetched 8 KB ahead (medians of 15, alternated in one process); 2 or 3 runs
//   and 1-4 KB ahead were within the noise of it, 8 runs slower. A single row is read without software prefetch:
//   its loop is short enough for the core to run its loads far ahead (27.4 against 25.8 GB/s with it).
// - AVX-512: each run prefetched 8 rows (1.5 KB) ahead. A core streaming one run waits on memory latency (a
//   2-core Sapphire Rapids VM reads one run per core at ~7 GB/s, eight at ~11); there 4 runs prefetched, inside
//   each panel, took a chain of 8-row matmuls from 11.5 to 17.1 GB/s. Six runs, on the same kind of VM: with both
//   cores reading, 8-row matmuls of 768 x 3072 (benchmarks/kernel_vs_read.py, C++ outside XLA) ran at 0.846-0.857
//   of the bandwidth probe's rate against 0.813-0.825 with four (three alternated runs of 40 rounds each; eight:
//   0.64-0.89); in a JAX chain of the 110M model's projections at 8 rows six runs took 0.968 of four's time
//   (paired median of 80 alternated rounds). One core alone reads as fast with 4, 6 or 8 runs: the gain is the two
//   cores' reads together.
// - AVX-512 on AMD Zen (a 2-core Zen 4 VM, same harness and shapes, both cores, runs of 30-40 rounds): six runs
//   prefetched 1.5 KB ahead read at 0.69-0.84 of the probe; two runs 3 KB (16 panel rows) ahead at 0.94-1.00, one
//   run 3 KB ahead 0.89-0.99, 1-6 runs without prefetch 0.74-0.96, 8 or 12 runs 0.50-0.77. Prefetched into L2
//   (prefetcht1) instead of L1, two runs read faster still: 3 KB ahead 0.86-1.13, 6 KB ahead 0.94-1.23 (medians of
//   five runs 0.893 into L1 at 3 KB, 1.063 and 0.987 into L2; kernel GB/s medians 21.9, 26.9, 31.1), four runs 6 KB
//   ahead 0.99-1.17. Two runs, 6 KB (32 panel rows) ahead, into L2: decode_mbu.py's batch-8 step of bench-110m took
//   22.83-23.44 ms against 25.96-26.61 with 3 KB into L1 (three alternated runs each).
#if defined(__AVX512F__) && JAXSERVE_AMD_ZEN
constexpr int kStreams = 2;
#elif defined(__AVX512F__)
constexpr int kStreams = 6;
#else
constexpr int kStreams = 4;
#endif
#if defined(__AVX512F__) && JAXSERVE_AMD_ZEN
constexpr int64_t kPrefetchBytes = 32 * kTile * 4;
constexpr int kPrefetchLocality = 2;  // prefetcht1: into L2
#elif defined(__AVX512F__)
constexpr int64_t kPrefetchBytes = 8 * kTile * 4;
constexpr int kPrefetchLocality = 3;  // prefetcht0: into L1
#else
constexpr int64_t kPrefetchBytes = 2048;
constexpr int kPrefetchLocality = 3;
#endif
constexpr int64_t kRowBytes = kTile * 4;
constexpr int64_t kRowsPerLine = kRowBytes >= 64 ? 1 : 64 / kRowBytes;  // panel rows per 64-byte line
static_assert(kRowBytes % 64 == 0 || 64 % kRowBytes == 0, "panel rows must tile cache lines");

// K rows of run s of a K-row matrix split into runs of kq: the last runs may be shorter, or empty.
inline int64_t run_rows(int64_t k_size, int64_t kq, int s) { return std::clamp<int64_t>(k_size - s * kq, 0, kq); }

// x (one group of gather_rows' layout, [k][R]) @ one panel into y[R, kTile] (row stride ldy). The panel's run s
// starts at w + s * region.
template <int R>
inline void panel_rows(const float* x, int64_t k_size, int64_t kq, const float* w, int64_t region, float* y,
                       int64_t ldy) {
  vfloat acc[R][kVecs] = {};
  const auto row = [&](const float* wk, const float* xk) {
    vfloat wv[kVecs];
#pragma GCC unroll 8
    for (int j = 0; j < kVecs; ++j) wv[j] = load(wk + j * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vfloat xr = splat(xk[r]);
#pragma GCC unroll 8
      for (int j = 0; j < kVecs; ++j) acc[r][j] += xr * wv[j];
    }
  };
  const float* ws[kStreams];
  const float* xs[kStreams];
  for (int s = 0; s < kStreams; ++s) {
    ws[s] = w + s * region;
    xs[s] = x + s * kq * R;
  }
  // The last run is the shortest: that many rows of every run are done in turn, a line of each at a time; then
  // what the longer runs hold past it.
  const int64_t common = run_rows(k_size, kq, kStreams - 1) / kRowsPerLine * kRowsPerLine;
  for (int64_t i = 0; i < common; i += kRowsPerLine)
#pragma GCC unroll 8
    for (int s = 0; s < kStreams; ++s) {
      if constexpr (kPrefetchBytes > 0 && R > 1) {
        const char* ahead = reinterpret_cast<const char*>(ws[s] + i * kTile) + kPrefetchBytes;
#pragma GCC unroll 8
        for (int64_t b = 0; b < kRowBytes * kRowsPerLine; b += 64)
          __builtin_prefetch(ahead + b, 0, kPrefetchLocality);
      }
#pragma GCC unroll 8
      for (int64_t j = i; j < i + kRowsPerLine; ++j) row(ws[s] + j * kTile, xs[s] + j * R);
    }
  for (int s = 0; s < kStreams; ++s)
    for (int64_t j = common; j < run_rows(k_size, kq, s); ++j) row(ws[s] + j * kTile, xs[s] + j * R);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVecs; ++j) store(y + r * ldy + j * kLanes, acc[r][j]);
}

// panel_rows for any rows <= kRows.
template <int R>
void panel_tail(int rows, const float* x, int64_t k_size, int64_t kq, const float* w, int64_t region, float* y,
                int64_t ldy) {
  if constexpr (R > 0) {
    if (rows == R) return panel_rows<R>(x, k_size, kq, w, region, y, ldy);
    panel_tail<R - 1>(rows, x, k_size, kq, w, region, y, ldy);
  }
}

// silu(gate) * up, elementwise over one panel's columns: the SwiGLU of an MLP, applied while its two products are
// still in cache. silu(g) = g / (1 + e**-g).
inline void swiglu(const float* gate, const float* up, float* out) {
#pragma GCC unroll 8
  for (int j = 0; j < kVecs; ++j) {
    const vfloat g = load(gate + j * kLanes);
    store(out + j * kLanes, g / (splat(1.0f) + vexp(-g)) * load(up + j * kLanes));
  }
}

// 8 floats, whatever the build's vector width: the 8 x 8 blocks of gather_rows.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }

// v[r][j] -> v[j][r]: three rounds of two-register shuffles (pairs, quads, halves).
inline void transpose8(v8 (&v)[8]) {
  typedef int32_t i8 __attribute__((vector_size(32)));
  v8 a[8], b[8];
  for (int p = 0; p < 4; ++p) {
    a[2 * p] = __builtin_shuffle(v[2 * p], v[2 * p + 1], i8{0, 8, 2, 10, 4, 12, 6, 14});
    a[2 * p + 1] = __builtin_shuffle(v[2 * p], v[2 * p + 1], i8{1, 9, 3, 11, 5, 13, 7, 15});
  }
  for (int q = 0; q < 2; ++q)
    for (int o = 0; o < 2; ++o) {
      b[4 * q + o] = __builtin_shuffle(a[4 * q + o], a[4 * q + 2 + o], i8{0, 1, 8, 9, 4, 5, 12, 13});
      b[4 * q + 2 + o] = __builtin_shuffle(a[4 * q + o], a[4 * q + 2 + o], i8{2, 3, 10, 11, 6, 7, 14, 15});
    }
  for (int j = 0; j < 4; ++j) {
    v[j] = __builtin_shuffle(b[j], b[4 + j], i8{0, 1, 2, 3, 8, 9, 10, 11});
    v[4 + j] = __builtin_shuffle(b[j], b[4 + j], i8{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

// x's first `rows` rows [rows, k] into out as groups of kRows rows (the last may hold fewer, R), each [k][R]: a
// pass then broadcasts x[r, k] for its R rows from one pointer at constant offsets. With R row pointers into
// [rows, k] the AVX2 loop ran out of general registers and reloaded five of them from the stack every two k; a JAX
// chain of the 110M model's 8-row matmuls read 17.5-17.7 GB/s this way against 16.6 (2-core Zen 3 VM, alternated
// in one process).
//
// With `scale`, each row is first RMS-normalised, x * rsqrt(mean(x**2) + eps) * scale: the norm that precedes a
// block's first projection, done here so that it is not an XLA op of its own between two kernel calls.
//
// A whole group of 8 rows is written 8 x 8 blocks at a time, each transposed in registers: the scalar strided
// writes took 7.9 us for 8 rows of K = 2048 (C++, in cache), the blocks 1.6 us.
void gather_rows(const float* x, int64_t rows, int64_t k, const float* scale, float eps, float* out) {
  std::vector<float> inv(rows, 1.0f);
  if (scale != nullptr)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * k;
      vfloat part[4] = {};
      int64_t i = 0;
      for (; i + 4 * kLanes <= k; i += 4 * kLanes)
        for (int j = 0; j < 4; ++j) part[j] += load(xr + i + j * kLanes) * load(xr + i + j * kLanes);
      const vfloat lanes = (part[0] + part[1]) + (part[2] + part[3]);
      float sum = 0.0f;
      for (int j = 0; j < kLanes; ++j) sum += lanes[j];
      for (; i < k; ++i) sum += xr[i] * xr[i];
      inv[r] = 1.0f / std::sqrt(sum / static_cast<float>(k) + eps);
    }
  const auto value = [&](int64_t r, int64_t i) {
    return scale != nullptr ? x[r * k + i] * inv[r] * scale[i] : x[r * k + i];
  };
  for (int64_t first = 0; first < rows; first += kRows) {
    const int64_t group = std::min<int64_t>(rows - first, kRows);  // the group's R
    float* at = out + first * k;
    int64_t i = 0;
    static_assert(kRows == 8, "whole groups are written as 8 x 8 blocks");
    if (group == kRows)
      for (; i + 8 <= k; i += 8) {
        v8 v[8];
        for (int r = 0; r < 8; ++r) {
          v[r] = load8(x + (first + r) * k + i);
          if (scale != nullptr) v[r] = v[r] * inv[first + r] * load8(scale + i);
        }
        transpose8(v);
        for (int j = 0; j < 8; ++j) store8(at + (i + j) * 8, v[j]);
      }
    for (; i < k; ++i)
      for (int64_t r = 0; r < group; ++r) at[i * group + r] = value(first + r, i);
  }
}

// Only the first `live` rows of x are multiplied; the rest are padding (a decode batch or prefill chunk rounded up
// to its compiled bucket) and get zeros (or their residual rows), so padding costs no arithmetic.
//
// y holds exactly the logical N columns (the last panel's zero padding is never stored), so no slice follows the
// call. With `swiglu`, w holds gate and up panels interleaved (gate panel p at 2p, up panel p at 2p + 1) and y is
// silu(x @ gate) * (x @ up): the MLP's two input projections in one pass over contiguous memory, without writing
// either product out.
//
// Two optional operands, each absent when empty, fold the XLA ops around a block's projections into the call (each
// such op costs a thunk of ~10 us in a decode step whose kernels take ~100-400 us): `norm_scale` [K] makes x the
// RMSNorm of x with that scale and `eps`; `residual` [M, N] is added to y.
ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::S32> live, ffi::Buffer<ffi::F32> norm_scale,
                        ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y, bool swiglu_pairs,
                        float eps) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2)
    return ffi::Error::InvalidArgument(
        "packed_matmul: x must be [M, K], w [kStreams, panels, ceil(K / kStreams), kTile], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1], kq = (k + kStreams - 1) / kStreams;
  const int64_t per_out = swiglu_pairs ? 2 : 1;  // weight panels per output panel
  if (wd[1] % per_out != 0) return ffi::Error::InvalidArgument("packed_matmul: swiglu needs an even panel count");
  const int64_t out_panels = wd[1] / per_out;
  if (wd[0] != kStreams || wd[2] != kq || wd[3] != kTile || yd[0] != m || n > out_panels * kTile ||
      n <= (out_panels - 1) * kTile)
    return ffi::Error::InvalidArgument("packed_matmul: shapes of x, w and y disagree");
  if (live.element_count() != 1) return ffi::Error::InvalidArgument("packed_matmul: live must hold one row count");
  const bool norm = norm_scale.element_count() != 0, add = residual.element_count() != 0;
  if (norm && norm_scale.element_count() != k)
    return ffi::Error::InvalidArgument("packed_matmul: norm_scale must hold K values");
  if (add && (residual.dimensions().size() != 2 || residual.dimensions()[0] != m || residual.dimensions()[1] != n))
    return ffi::Error::InvalidArgument("packed_matmul: residual must be [M, N]");
  const int64_t rows_live = std::clamp<int64_t>(live.typed_data()[0], 0, m);
  std::vector<float> gathered(rows_live * k);
  gather_rows(x.typed_data(), rows_live, k, norm ? norm_scale.typed_data() : nullptr, eps, gathered.data());
  const float* xp = gathered.data();
  const float* wp = w.typed_data();
  const int64_t panel_size = kq * kTile, region = wd[1] * panel_size;
  const float* rp = add ? residual.typed_data() : nullptr;
  float* yp = y->typed_data();
  // Pieces of ~128 KB of weights: small enough that the workers end close together, large enough to stay streams.
  const int64_t grain = std::max<int64_t>(1, (128 << 10) / (per_out * k * kTile * 4));
  parallel_ranges(pool, out_panels, grain, [&](int64_t first, int64_t last) {
    alignas(64) float gate[kRows][kTile], prod[kRows][kTile];
    for (int64_t p = first; p < last; ++p) {
      const float* panel = wp + p * per_out * panel_size;
      const int64_t cols = std::min<int64_t>(kTile, n - p * kTile);
      for (int64_t r = 0; r < rows_live; r += kRows) {
        const int rows = static_cast<int>(rows_live - r < kRows ? rows_live - r : kRows);
        float* out = yp + r * n + p * kTile;
        if (swiglu_pairs) {
          panel_tail<kRows>(rows, xp + r * k, k, kq, panel, region, gate[0], kTile);
          panel_tail<kRows>(rows, xp + r * k, k, kq, panel + panel_size, region, prod[0], kTile);
          for (int i = 0; i < rows; ++i) swiglu(gate[i], prod[i], prod[i]);
        } else if (cols == kTile && !add) {
          panel_tail<kRows>(rows, xp + r * k, k, kq, panel, region, out, n);
          continue;
        } else {
          panel_tail<kRows>(rows, xp + r * k, k, kq, panel, region, prod[0], kTile);
        }
        for (int i = 0; i < rows; ++i) {
          if (add) {
            const float* res = rp + (r + i) * n + p * kTile;
            for (int64_t j = 0; j < cols; ++j) out[i * n + j] = res[j] + prod[i][j];
          } else {
            std::copy(prod[i], prod[i] + cols, out + i * n);
          }
        }
      }
    }
  });
  if (add)
    std::copy(rp + rows_live * n, rp + m * n, yp + rows_live * n);
  else
    std::fill(yp + rows_live * n, yp + m * n, 0.0f);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxserve

// The panel width and the number of K runs this build packs for: the python side packs weights with them
// (kernels.matmul.tile() and streams()).
extern "C" int jaxserve_matmul_tile() { return static_cast<int>(jaxserve::kTile); }
extern "C" int jaxserve_matmul_streams() { return jaxserve::kStreams; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePackedMatmul, jaxserve::PackedMatmul,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // live rows
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // norm_scale [K], or empty
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // residual [M, N], or empty
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<bool>("swiglu")
                                  .Attr<float>("eps"));
