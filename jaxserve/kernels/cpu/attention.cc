// Paged decode attention: one query per row over that row's own KV pages, read in place, once.
//
// Why: decode attention on CPU is bound by how fast the keys and values stream from memory. XLA either gathers
// every page of the block-table bucket into a copy (XLA:CPU copies at ~6 GB/s) or loops over page columns with many
// small ops, and both read every column of the bucket, not only the pages a row uses. Here each (row, block of KV
// heads) item walks only the pages holding its allowed keys, with an online (flash-decoding) softmax in float32,
// and serves all G query heads of a KV head from the same pass so each page is read once.
//
// A page id outside [0, num_pages) in a column that will be read fails the call with InvalidArgument (checked
// before any work); columns past a row's last page are never read, so they may hold anything.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace jaxserve {
namespace {

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr vint kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
constexpr vint kIota = {0, 1, 2, 3, 4, 5, 6, 7};
#endif

// Sum of the lanes by a shuffle tree: log2(kLanes) shuffle-adds instead of a serial chain of kLanes adds.
inline float hsum(vfloat v) {
  for (int step = kLanes / 2; step > 0; step /= 2) v += __builtin_shuffle(v, kIota ^ step);
  return v[0];
}

struct Problem {
  const float* q;          // row b's [Hkv, G, D] at q + b * q_row
  const float* k;          // [num_pages, Hkv, page_size, D]
  const float* v;          // [num_pages, Hkv, page_size, D]
  const int32_t* table;    // [B, cols]
  float* out;              // [B, Hkv, G, D]
  int64_t cols, heads, groups, page_size, dim;
  int64_t q_row = heads * groups * dim;  // floats from one row of q to the next (and of k_new, v_new)
  // This step's keys and values, set when the call writes them into the pools itself (k and v then point into
  // the pools it writes): row b's k_new, v_new [Hkv, D] at k_new + b * q_row (they share q's buffer), q before
  // RoPE, cos and sin [B, D], slots [B].
  const float* k_new = nullptr;
  const float* v_new = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int32_t* slots = nullptr;
  float* k_write = nullptr;  // the pools k and v point into, writable
  float* v_write = nullptr;
};

// out[0:d] = RoPE(x) * mul in the half-split (Hugging Face) convention: x * cos + [-x[d/2:], x[:d/2]] * sin.
inline void rope(const float* x, const float* cos, const float* sin, int64_t d, float mul, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = (x[i] * cos[i] + -x[i + half] * sin[i]) * mul;
  for (int64_t i = half; i < d; ++i) out[i] = (x[i] * cos[i] + x[i - half] * sin[i]) * mul;
}

// The allowed keys of one row, [first, last]; empty when first > last.
struct KeyRange {
  int64_t first, last;
};

// Largest of s[0:n]: whole vectors, then the tail.
inline float page_max(const float* s, int64_t n) {
  vfloat m = splat(-INFINITY);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat x = load(s + j);
    m = x > m ? x : m;
  }
  float best = -INFINITY;
  for (int i = 0; i < kLanes; ++i) best = std::max(best, m[i]);
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best;
}

// s[0:n] = exp(s - top), returning their sum; vectorised (vexp) over whole vectors, std::exp on the tail.
inline float exp_and_sum(float* s, int64_t n, float top) {
  vfloat acc{};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat w = vexp(load(s + j) - top);
    store(s + j, w);
    acc += w;
  }
  float sum = hsum(acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    sum += s[j];
  }
  return sum;
}

// NV > 0: D == NV * kLanes, so the loops have fixed trip counts and the accumulators stay in registers.
// NV == 0: any D, whole vectors then a scalar tail.
template <int NV>
inline float dot(const float* a, const float* __restrict b, int64_t d) {
  const int64_t nv = NV > 0 ? NV : d / kLanes;
  vfloat acc{};
  for (int64_t i = 0; i < nv; ++i) acc += load(a + i * kLanes) * load(b + i * kLanes);
  float s = hsum(acc);
  if constexpr (NV == 0)
    for (int64_t i = nv * kLanes; i < d; ++i) s += a[i] * b[i];
  return s;
}

// Whether a page's KV heads are read side by side (one stream per head) or one head's chunk after another.
// - AVX-512 builds other than AMD Zen (tuned on a 2-core Sapphire Rapids VM): side by side, so that the hardware
//   prefetcher keeps many lines in flight: 8 rows x 257 keys x 12 heads went from 13.4 to 17.3 GB/s against one
//   chunk after another.
// - AVX2 builds (tuned on a 2-core Zen 3 VM): one chunk after another. There 12 chained calls at 8 rows x 257 keys
//   took 9.2 ms this way against 11.2 ms side by side (alternated, medians of 12); merely touching every line in
//   the side-by-side order took as long as the whole kernel. Software prefetch of the next chunk or page, per key or
//   in bursts, measured slower there; side by side, a fixed distance ahead per stream gains (kAheadKeys).
// - AVX-512 builds on AMD Zen (a 2-core Zen 4 VM): one chunk after another as well. benchmarks/kernel_vs_read.py
//   attention (8 rows x 257 keys x 12 heads, 12 layers, both cores, runs of 30 rounds): kernel / probe 1.00-1.06
//   against 0.63-0.85 side by side (with the prefetch 2, 4 or 8 keys ahead, or none).
#if defined(__AVX512F__) && !JAXSERVE_AMD_ZEN
constexpr bool kHeadsSideBySide = true;
#else
constexpr bool kHeadsSideBySide = false;
#endif

// Query rows whose values are accumulated together (R below): side by side, as many as keep R * NV accumulators in
// half the (AVX-512) registers; else one.
template <int NV>
constexpr int kRowsTogether = kHeadsSideBySide && NV > 0 ? (16 / NV > 0 ? 16 / NV : 1) : 1;

// Side by side, every stream (a head's keys, then a group of heads' values, then the next page's keys) is
// prefetched kAheadKeys keys ahead of its reads, one prefetch per line. Why: the loads of a score or value loop
// carry several times the instructions of a bare read, so the core's out-of-order window holds fewer lines in
// flight, and each 4 KB head chunk is a fresh stream the hardware prefetcher must first detect. On the 2-core
// Sapphire Rapids VM (benchmarks/kernel_vs_read.py, 8 rows x 257 keys x 12 heads, alternated runs of 30 rounds)
// the kernel read 1.11-1.12x slower than a bare read of its pages on one core against 1.26x without it (kernel /
// probe 0.87-0.89 against 0.77-0.78), and 1.14-1.17x against 1.23-1.29x on both; inside XLA 12 chained calls took
// 0.89-0.90 of the time. 2 and 3 keys ahead were as good, 6 and 8 no better (6: 1.034 of 4's time inside XLA).
constexpr int64_t kAheadKeys = 4;

// Software prefetch of one key or value row of d floats into L1, a 64-byte line at a time. It and the lambdas that
// call it are always inlined: to GCC a function that only prefetches has no effects, and GCC 12 (-O1 and above)
// deleted the calls it had not inlined, prefetches and all.
#define JAXSERVE_ALWAYS_INLINE __attribute__((always_inline))
inline JAXSERVE_ALWAYS_INLINE void prefetch_row(const float* row, int64_t d) {
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t i = 0; i < d; i += kLine) __builtin_prefetch(row + i, 0, 3);
}

// scores[j] = q . k[j] for j < n (one head's keys, D apart), four keys at a time: four independent FMA chains in
// flight and q held in registers, instead of one dot's latency after another (on the Zen 3 VM a chain of calls
// with their pages in cache went from 2.64 to 2.48 ms).
template <int NV>
inline void head_scores(const float* q, const float* k, int64_t n, int64_t d, float* scores) {
  int64_t j = 0;
  if constexpr (NV > 0) {
    vfloat qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = load(q + i * kLanes);
    for (; j + 4 <= n; j += 4) {
      vfloat acc[4] = {};
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i)
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) acc[t] += qv[i] * load(k + (j + t) * d + i * kLanes);
      for (int t = 0; t < 4; ++t) scores[j + t] = hsum(acc[t]);
    }
  }
  for (; j < n; ++j) scores[j] = dot<NV>(q, k + j * d, d);
}

// A no-op per-key hook for accumulate.
inline void no_prefetch(int64_t) {}

// For each of R query rows r: acc[r][0:d] = acc[r] * rescale[r] + sum_j w[r][j] * v[r][j, 0:d]. The R rows' value
// runs (one per KV head, or shared within a group) are read side by side, R streams in flight instead of one.
// ahead(j) runs before key j's values are added (the side-by-side order's software prefetch).
template <int NV, int R, typename Ahead = void (*)(int64_t)>
inline void accumulate(const float* const* w, const float* const* v, int64_t n, const float* rescale,
                       float* const* acc, int64_t d, Ahead ahead = no_prefetch) {
  if constexpr (NV > 0) {
    vfloat a[R][NV];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NV; ++i) a[r][i] = load(acc[r] + i * kLanes) * rescale[r];
    for (int64_t j = 0; j < n; ++j) {
      ahead(j);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const vfloat wj = splat(w[r][j]);
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) a[r][i] += wj * load(v[r] + j * NV * kLanes + i * kLanes);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NV; ++i) store(acc[r] + i * kLanes, a[r][i]);
  } else {
    for (int r = 0; r < R; ++r) {
      for (int64_t i = 0; i < d; ++i) acc[r][i] *= rescale[r];
      for (int64_t j = 0; j < n; ++j) {
        if (r == 0) ahead(j);
        for (int64_t i = 0; i < d; ++i) acc[r][i] += w[r][j] * v[r][j * d + i];
      }
    }
  }
}

// One query row's scores over a page fused with its values over the page before: scores[t] = q . k[t] for t < n_s,
// and acc = acc * rescale + sum_t w[t] * v[t] for t < n_v. Why: the keys and the values are then read side by side,
// two streams in flight instead of one after the other; on the Zen 3 VM 12 chained calls at 8 rows x 257 keys went
// from 9.01 to 8.33 ms (alternated, medians of 20), where merely touching each page's keys and values side by side
// took 8.3 ms.
template <int NV>
inline void scores_and_values(const float* q, const float* k, int64_t n_s, float* scores, const float* w,
                              const float* v, int64_t n_v, float rescale, float* acc, int64_t d) {
  if constexpr (NV > 0) {
    vfloat a[NV];
    for (int i = 0; i < NV; ++i) a[i] = load(acc + i * kLanes) * rescale;
    const int64_t both = std::min(n_s, n_v);
    int64_t t = 0;
    for (; t < both; ++t) {
      vfloat s{};
      const vfloat wt = splat(w[t]);
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) {
        s += load(q + i * kLanes) * load(k + t * d + i * kLanes);
        a[i] += wt * load(v + t * d + i * kLanes);
      }
      scores[t] = hsum(s);
    }
    for (int64_t u = t; u < n_v; ++u) {
      const vfloat wt = splat(w[u]);
      for (int i = 0; i < NV; ++i) a[i] += wt * load(v + u * d + i * kLanes);
    }
    for (int i = 0; i < NV; ++i) store(acc + i * kLanes, a[i]);
    head_scores<NV>(q, k + t * d, n_s - t, d, scores + t);
  } else {
    accumulate<0, 1>(&w, &v, n_v, &rescale, &acc, d);
    head_scores<0>(q, k, n_s, d, scores);
  }
}

// The first of a page's `keys` keys (rows of d floats) that starts at or after a 4 KB boundary of memory, when a
// head's chunk of keys spans exactly one or more 4 KB but does not start on a boundary; else 0. Why: XLA:CPU
// places buffers 64-byte aligned, so each 4 KB chunk of a pool usually straddles two 4 KB pages and the chunk's
// stream restarts mid-way; scoring every full page from this key and wrapping round makes each side-by-side
// stream walk one 4 KB page of memory from its start, as with an aligned pool. The scores are the same numbers in
// any order. 12 chained calls (8 rows x 272 keys x 12 heads, pools placed by hand in one process, alternated,
// medians of 15; 2-core Sapphire Rapids VM): pools at 2048 bytes past a boundary 14.6 -> 15.9 and 15.6 -> 17.0
// GB/s, at 1344 bytes 14.9 -> 15.3, against 16.8-17.3 for 4 KB-aligned pools. Values are still added in key order
// (their sums must not depend on where a buffer lies), so that part of the misalignment cost stays.
inline int64_t boundary_key(const float* chunk, int64_t keys, int64_t d) {
  const int64_t row = d * static_cast<int64_t>(sizeof(float));
  const int64_t into = static_cast<int64_t>(reinterpret_cast<uintptr_t>(chunk) % 4096);
  if (into == 0 || keys * row % 4096 != 0) return 0;
  const int64_t key = (4096 - into + row - 1) / row;
  return key < keys ? key : 0;
}

// Attention of row b's query heads for KV heads [h0, h1) over keys [keys.first, keys.last], written to out[b].
// The heads of a block are visited together for each page: their K (and V) chunks are adjacent in the pool, so a
// page is two contiguous runs (keys, then values), read in the order kHeadsSideBySide says; one head after another,
// a page's scores are computed together with the previous page's values (scores_and_values). Side by side, each
// stream is prefetched a few keys ahead (kAheadKeys). Prefetch of the row's whole next page in a burst (1.4x on a
// Zen 5 with one stream) cost 20-30% on the Sapphire Rapids VM on top of the streams: its requests hold the core's
// few line-fill buffers that demand loads need.
template <int NV>
void attend(const Problem& p, int64_t b, int64_t h0, int64_t h1, KeyRange keys) {
  const int64_t rows = (h1 - h0) * p.groups, d = p.dim, ps = p.page_size;  // rows: query heads of the block
  float* out = p.out + (b * p.heads + h0) * p.groups * d;  // [rows, D], the unnormalised accumulator until the end
  std::fill(out, out + rows * d, 0.0f);
  if (keys.first > keys.last) return;  // padding row, or a window entirely past the table: zeros

  std::vector<float> scratch(rows * (d + 2 * ps + 3));
  float* query = scratch.data();       // [rows, D], pre-scaled by d**-0.5
  float* scores = query + rows * d;    // [rows, page_size], then the softmax weights
  float* second = scores + rows * ps;  // [rows, page_size], the previous page's weights (one head after another)
  float* top = second + rows * ps;     // [rows] running max
  float* total = top + rows;           // [rows] running sum of weights
  float* rescale = total + rows;       // [rows] this page's correction of the running accumulators
  std::vector<const float*> weights(rows), values(rows);
  std::vector<float*> accs(rows);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float* q = p.q + b * p.q_row + h0 * p.groups * d;
  if (p.slots != nullptr) {  // RoPE this step's query and key, and write its key and value into the pools
    const float *cos = p.cos + b * d, *sin = p.sin + b * d;
    for (int64_t r = 0; r < rows; ++r) rope(q + r * d, cos, sin, d, scale, query + r * d);
    const int64_t slot = p.slots[b];
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t at = ((slot / ps) * p.heads + h) * ps * d + slot % ps * d, from = b * p.q_row + h * d;
      rope(p.k_new + from, cos, sin, d, 1.0f, p.k_write + at);
      std::copy(p.v_new + from, p.v_new + from + d, p.v_write + at);
    }
  } else {
    for (int64_t i = 0; i < rows * d; ++i) query[i] = q[i] * scale;
  }
  std::fill(top, top + rows, -INFINITY);
  std::fill(total, total + rows, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    weights[r] = scores + r * ps;
    accs[r] = out + r * d;
  }

  const int32_t* row_pages = p.table + b * p.cols;
  // Page column c of the row: its first allowed key j0, the n allowed keys from there, and the block's keys and
  // values in that page, [h1 - h0, ps, D] each.
  struct Page {
    int64_t j0, n;
    const float *k, *v;
  };
  const auto page = [&](int64_t c) {
    const int64_t j0 = std::max<int64_t>(keys.first - c * ps, 0);
    const int64_t at = (static_cast<int64_t>(row_pages[c]) * p.heads + h0) * ps * d;
    return Page{j0, std::min<int64_t>(keys.last - c * ps, ps - 1) + 1 - j0, p.k + at, p.v + at};
  };
  // Folds row r's scores s[0:n] of a page into its running max and sum; s becomes the page's softmax weights and
  // the return value the factor that rescales the row's accumulator before their values are added.
  const auto fold = [&](int64_t r, float* s, int64_t n) {
    const float new_top = std::max(top[r], page_max(s, n));
    const float sum = exp_and_sum(s, n, new_top);
    const float factor = std::exp(top[r] - new_top);  // 0 on the first page: top is -inf
    total[r] = total[r] * factor + sum;
    top[r] = new_top;
    return factor;
  };
  if constexpr (kHeadsSideBySide) {
    const int64_t heads = h1 - h0, last = keys.last / ps;
    // The page's keys in the order they are scored: from the boundary key (full pages), wrapping round.
    const auto first_key = [&](const Page& pg) { return pg.n == ps ? boundary_key(pg.k, ps, d) : 0; };
    const auto scored = [](const Page& pg, int64_t first, int64_t s) {
      return pg.j0 + (first + s < pg.n ? first + s : first + s - pg.n);
    };
    // Key (or value) j of every head of the block.
    const auto prefetch_heads = [&](const float* kv, int64_t j) JAXSERVE_ALWAYS_INLINE {
      for (int64_t h = 0; h < heads; ++h) prefetch_row(kv + (h * ps + j) * d, d);
    };
    for (int64_t c = keys.first / ps; c <= last; ++c) {
      const Page pg = page(c);
      const int64_t j0 = pg.j0, n = pg.n;
      const float *k = pg.k, *v = pg.v;
      const int64_t first = first_key(pg);
      for (int64_t s = 0; s < n; ++s) {
        if (s + kAheadKeys < n)
          prefetch_heads(k, scored(pg, first, s + kAheadKeys));
        else if (s + kAheadKeys - n < n)  // past the keys: the page's first values, read next
          prefetch_heads(v, j0 + s + kAheadKeys - n);
        const int64_t j = scored(pg, first, s);
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t r = h * p.groups; r < (h + 1) * p.groups; ++r)
            scores[r * ps + j - j0] = dot<NV>(query + r * d, k + (h * ps + j) * d, d);
      }
      for (int64_t r = 0; r < rows; ++r) {
        rescale[r] = fold(r, scores + r * ps, n);
        values[r] = v + (r / p.groups * ps + j0) * d;
      }
      // The values, R rows at a time: each group prefetches its own rows ahead; the last, past its values, the
      // next page's first keys. (A group's first values were prefetched with the keys.)
      const Page next = c < last ? page(c + 1) : Page{0, 0, nullptr, nullptr};
      const int64_t next_first = c < last ? first_key(next) : 0;
      constexpr int R = kRowsTogether<NV>;
      const auto ahead_of = [&](int64_t r0, int64_t r1) {
        return [&, r0, r1](int64_t j) JAXSERVE_ALWAYS_INLINE {
          if (j + kAheadKeys < n) {
            for (int64_t r = r0; r < r1; ++r) prefetch_row(values[r] + (j + kAheadKeys) * d, d);
          } else if (r1 == rows && j + kAheadKeys - n < next.n) {
            prefetch_heads(next.k, scored(next, next_first, j + kAheadKeys - n));
          }
        };
      };
      int64_t r = 0;
      for (; r + R <= rows; r += R)
        accumulate<NV, R>(&weights[r], &values[r], n, rescale + r, &accs[r], d, ahead_of(r, r + R));
      for (; r < rows; ++r)
        accumulate<NV, 1>(&weights[r], &values[r], n, rescale + r, &accs[r], d, ahead_of(r, r + 1));
    }
  } else {
    // Two score buffers: this page's scores are written while the previous page's weights are read.
    float* now = scores;
    float* before = second;
    int64_t before_n = 0;  // keys of the previous page: none before the first
    std::fill(rescale, rescale + rows, 1.0f);
    for (int64_t c = keys.first / ps; c <= keys.last / ps; ++c) {
      const auto [j0, n, k, v] = page(c);
      for (int64_t r = 0; r < rows; ++r)
        scores_and_values<NV>(query + r * d, k + (r / p.groups * ps + j0) * d, n, now + r * ps, before + r * ps,
                              values[r], before_n, rescale[r], accs[r], d);
      for (int64_t r = 0; r < rows; ++r) {
        rescale[r] = fold(r, now + r * ps, n);
        values[r] = v + (r / p.groups * ps + j0) * d;
      }
      before_n = n;
      std::swap(now, before);
    }
    for (int64_t r = 0; r < rows; ++r) {  // the last page's values
      const float* w = before + r * ps;
      accumulate<NV, 1>(&w, &values[r], before_n, rescale + r, &accs[r], d);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / total[r];
    for (int64_t i = 0; i < d; ++i) out[r * d + i] *= inv;
  }
}

// Items are (row, block of KV heads): whole rows where there are enough rows to keep every thread busy, else rows
// split into head blocks until there are about two items per thread.
template <int NV>
void attend_all(ffi::ThreadPool& pool, const Problem& p, const std::vector<KeyRange>& ranges) {
  const int64_t batch = static_cast<int64_t>(ranges.size());
  const int64_t wanted = 2 * std::max<int64_t>(pool.num_threads(), 1);
  const int64_t splits = std::clamp<int64_t>((wanted + batch - 1) / std::max<int64_t>(batch, 1), 1, p.heads);
  const int64_t block = (p.heads + splits - 1) / splits;
  const int64_t blocks = (p.heads + block - 1) / block;
  parallel_for(pool, batch * blocks, [&](int64_t item) {
    const int64_t b = item / blocks, h0 = item % blocks * block;
    attend<NV>(p, b, h0, std::min(h0 + block, p.heads), ranges[b]);
  });
}

// Each row's allowed keys, clamped to the table's columns, after checking the only page ids that will be read.
ffi::Error key_ranges(const int32_t* table, const int32_t* pos, int64_t batch, int64_t cols, int64_t page_size,
                      int64_t num_pages, int32_t sliding_window, std::vector<KeyRange>& ranges) {
  ranges.resize(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t at = pos[b];
    const int64_t first = sliding_window > 0 ? std::max<int64_t>(at - sliding_window + 1, 0) : 0;
    ranges[b] = {first, std::min<int64_t>(at, cols * page_size - 1)};  // at < 0 (padding) gives an empty range
    if (ranges[b].first > ranges[b].last) continue;
    for (int64_t c = ranges[b].first / page_size; c <= ranges[b].last / page_size; ++c) {
      const int32_t page = table[b * cols + c];
      if (page < 0 || page >= num_pages)
        return ffi::Error::InvalidArgument("paged_decode_attention: block_table[" + std::to_string(b) + ", " +
                                           std::to_string(c) + "] = " + std::to_string(page) +
                                           " is outside [0, " + std::to_string(num_pages) + ")");
    }
  }
  return ffi::Error::Success();
}

ffi::Error PagedDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pool,
                                ffi::Buffer<ffi::F32> v_pool, ffi::Buffer<ffi::S32> block_table,
                                ffi::Buffer<ffi::S32> positions, int32_t sliding_window,
                                ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k_pool.dimensions(), vd = v_pool.dimensions();
  const auto td = block_table.dimensions(), pd = positions.dimensions(), od = out->dimensions();
  if (ffi::Error e = check_paged_attention("paged_decode_attention", qd, kd, vd, td, pd, od, sliding_window);
      e.failure())
    return e;
  if (qd[1] != 1) return ffi::Error::InvalidArgument("paged_decode_attention: q must hold one query per row (T = 1)");
  std::vector<KeyRange> ranges;
  if (ffi::Error e = key_ranges(block_table.typed_data(), positions.typed_data(), qd[0], td[1], kd[2], kd[0],
                                sliding_window, ranges);
      e.failure())
    return e;
  const Problem p{q.typed_data(), k_pool.typed_data(), v_pool.typed_data(), block_table.typed_data(),
                  out->typed_data(), td[1], qd[2], qd[3], kd[2], qd[4]};
  with_vectors_per_dim(qd[4], [&](auto nv) { attend_all<decltype(nv)::value>(pool, p, ranges); });
  return ffi::Error::Success();
}

// The same attention for a step whose keys and values are not in the pools yet, on the q/k/v projections' output
// as it is: qkv [B, 1, Hkv * (G + 2), D], each row's Hkv * G query heads, then its Hkv keys, then its Hkv values,
// before RoPE. The call applies RoPE (cos, sin [B, 1, D]) to the queries and keys, writes the keys and values at
// each real row's slot ([B, 1]; rows with position < 0 write nothing) and attends; out is [B, 1, Hkv, G, D]. The
// pools are returned as outputs aliased to their inputs, so the write is in place. Why: RoPE and the two pool
// scatters are otherwise five XLA ops per layer around this call, and splitting the packed projection's output
// into q, k and v three more (in a traced bench-110m step the call then began ~30 us after the projection's
// ended, against ~9 us with the output taken as it is).
ffi::Error PagedDecodeAttentionWrite(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                                     ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> k_pool,
                                     ffi::Buffer<ffi::F32> v_pool, ffi::Buffer<ffi::S32> block_table,
                                     ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> slots,
                                     int32_t sliding_window, ffi::ResultBuffer<ffi::F32> out,
                                     ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out) {
  const std::string name = "paged_decode_attention_write";
  // Pools may lead with a stage axis of 1 (see the python wrapper for why).
  const auto pool_dims = [](ffi::Span<const int64_t> d) { return d.size() == 5 && d[0] == 1 ? d.last(4) : d; };
  const auto od = out->dimensions(), kd = pool_dims(k_pool.dimensions()), vd = pool_dims(v_pool.dimensions());
  const auto td = block_table.dimensions(), pd = positions.dimensions(), xd = qkv.dimensions();
  if (ffi::Error e = check_paged_attention(name, od, kd, vd, td, pd, od, sliding_window); e.failure()) return e;
  const int64_t batch = od[0], heads = od[2], groups = od[3], dim = od[4], page_size = kd[2];
  const int64_t slots_total = kd[0] * kd[2];
  if (od[1] != 1) return ffi::Error::InvalidArgument(name + ": out must hold one query per row (T = 1)");
  if (xd.size() != 4 || xd[0] != batch || xd[1] != 1 || xd[2] != heads * (groups + 2) || xd[3] != dim)
    return ffi::Error::InvalidArgument(name + ": qkv must be [B, 1, Hkv * (G + 2), D]");
  for (auto d : {cos.dimensions(), sin.dimensions()})
    if (d.size() != 3 || d[0] != batch || d[1] != 1 || d[2] != dim)
      return ffi::Error::InvalidArgument(name + ": cos and sin must be [B, 1, D]");
  if (dim % 2 != 0) return ffi::Error::InvalidArgument(name + ": RoPE needs an even head_dim");
  if (slots.element_count() != batch) return ffi::Error::InvalidArgument(name + ": slots must be [B, 1]");
  if (k_out->element_count() != k_pool.element_count() || v_out->element_count() != v_pool.element_count())
    return ffi::Error::InvalidArgument(name + ": the pool outputs must have the pools' shape");
  const int32_t* pos = positions.typed_data();
  const int32_t* slot = slots.typed_data();
  for (int64_t b = 0; b < batch; ++b)
    if (pos[b] >= 0 && (slot[b] < 0 || slot[b] >= slots_total))
      return ffi::Error::InvalidArgument(name + ": slots[" + std::to_string(b) + "] = " + std::to_string(slot[b]) +
                                         " is outside [0, " + std::to_string(slots_total) + ")");
  std::vector<KeyRange> ranges;
  if (ffi::Error e = key_ranges(block_table.typed_data(), pos, batch, td[1], page_size, kd[0], sliding_window,
                                ranges);
      e.failure())
    return e;
  // Aliased outputs are the input buffers; should XLA ever hand over separate ones, start them as copies.
  float* kw = k_out->typed_data();
  float* vw = v_out->typed_data();
  if (kw != k_pool.typed_data()) std::copy(k_pool.typed_data(), k_pool.typed_data() + k_pool.element_count(), kw);
  if (vw != v_pool.typed_data()) std::copy(v_pool.typed_data(), v_pool.typed_data() + v_pool.element_count(), vw);
  const float* q = qkv.typed_data();
  Problem p{q, kw, vw, block_table.typed_data(), out->typed_data(), td[1], heads, groups, page_size, dim};
  p.q_row = heads * (groups + 2) * dim;
  p.k_new = q + heads * groups * dim;
  p.v_new = p.k_new + heads * dim;
  p.cos = cos.typed_data();
  p.sin = sin.typed_data();
  p.slots = slot;
  p.k_write = kw;
  p.v_write = vw;
  with_vectors_per_dim(dim, [&](auto nv) { attend_all<decltype(nv)::value>(pool, p, ranges); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxserve

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedDecodeAttention, jaxserve::PagedDecodeAttention,
                              jaxserve::paged_attention_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedDecodeAttentionWrite, jaxserve::PagedDecodeAttentionWrite,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // qkv
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // cos
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // sin
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // k_pool
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // v_pool
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // block_table
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // positions
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // slots
                                  .Attr<int32_t>("sliding_window")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()   // out
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()   // k_pool, aliased
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());  // v_pool, aliased
