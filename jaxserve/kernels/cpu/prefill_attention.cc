// Paged prefill (chunk) attention: T queries per row over that row's own KV pages, read in place.
//
// Why: for a chunk of T > 1 queries the pure-JAX path gathers every page of the block-table bucket, transposes it
// into [B, Hkv, S, D] copies and runs dense einsums with a causal mask over all of it; on XLA:CPU the copies and
// the masked-out half of the scores cost about as much as every matmul of the layer. This is compute-bound, so the
// kernel is organised for the FMA units: a work item is (row, KV head, tile of queries), its query rows (query x
// group head, padded to whole vectors) are held transposed [D, rows] so that for each key the scores of all rows
// are one broadcast-FMA per d and vector register, and the online softmax (running max and sum per query head)
// runs vectorised across rows with no horizontal reductions. The values are then accumulated vectorised over D
// with a few rows' accumulators in registers. Keys are addressed one by one through the block table, so any page
// size works and a tile reads only the keys in [min window start, max position] of its queries.
//
// A page id outside [0, num_pages) in a column a tile will read fails the call with InvalidArgument (checked
// before any work); other columns are never read, so they may hold anything.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace jaxserve {
namespace {

namespace ffi = xla::ffi;

constexpr int64_t kTileRows = 32;  // query rows (query x group head) per work item, before padding to vectors
constexpr int kKeyBlock = 16;      // keys per online-softmax step
constexpr int kScoreKeys = 8;      // keys per score micro-kernel call: kScoreKeys * 2 accumulators in registers

inline vint load_int(const int32_t* p) { return *reinterpret_cast<const vint*>(p); }

struct Problem {
  const float* q;        // [B, T, Hkv, G, D]
  const float* k;        // [num_pages, Hkv, page_size, D]
  const float* v;        // [num_pages, Hkv, page_size, D]
  const int32_t* table;  // [B, cols]
  const int32_t* pos;    // [B, T]
  float* out;            // [B, T, Hkv, G, D]
  int64_t steps, cols, heads, groups, page_size, dim, window, tile_queries, tiles;
};

// Allowed keys [first, last]; empty when first > last.
struct KeyRange {
  int64_t first, last;
};

// The keys a query at `at` may attend to, clamped to the table's columns: j <= at, j > at - window (window > 0).
inline KeyRange query_keys(int64_t at, int64_t window, int64_t limit) {
  if (at < 0) return {1, 0};  // padding query
  const int64_t first = window > 0 ? std::max<int64_t>(at - window + 1, 0) : 0;
  return {first, std::min(at, limit)};
}

// st[k, r] = sum_d qt[d, r] * key_k[d] for kScoreKeys keys and RV vectors of rows; qt and st are offset to the
// first row vector, with a row stride of `rp` floats.
template <int RV>
inline void scores(const float* qt, int64_t rp, const float* const* keys, int64_t d, float* st) {
  vfloat acc[kScoreKeys][RV] = {};
  for (int64_t i = 0; i < d; ++i) {
    vfloat qv[RV];
#pragma GCC unroll 4
    for (int r = 0; r < RV; ++r) qv[r] = load(qt + i * rp + r * kLanes);
#pragma GCC unroll 8
    for (int k = 0; k < kScoreKeys; ++k) {
      const vfloat kk = splat(keys[k][i]);
#pragma GCC unroll 4
      for (int r = 0; r < RV; ++r) acc[k][r] += kk * qv[r];
    }
  }
  for (int k = 0; k < kScoreKeys; ++k)
    for (int r = 0; r < RV; ++r) store(st + k * rp + r * kLanes, acc[k][r]);
}

// acc[i, 0:d] = acc[i] * rescale[i] + sum_j w[j, i] * values_j[0:d] for RG rows (w has a row stride of rp).
// NV > 0: d == NV * kLanes and the accumulators stay in registers; NV == 0: any d.
template <int NV, int RG>
inline void accumulate(float* acc, int64_t d, const float* w, int64_t rp, const float* const* values, int nk,
                       const float* rescale) {
  if constexpr (NV > 0) {
    vfloat a[RG][NV];
    for (int i = 0; i < RG; ++i)
      for (int v = 0; v < NV; ++v) a[i][v] = load(acc + i * d + v * kLanes) * rescale[i];
    for (int j = 0; j < nk; ++j) {
      const float* row = values[j];
      vfloat wj[RG];
#pragma GCC unroll 8
      for (int i = 0; i < RG; ++i) wj[i] = splat(w[j * rp + i]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const vfloat x = load(row + v * kLanes);
#pragma GCC unroll 8
        for (int i = 0; i < RG; ++i) a[i][v] += wj[i] * x;
      }
    }
    for (int i = 0; i < RG; ++i)
      for (int v = 0; v < NV; ++v) store(acc + i * d + v * kLanes, a[i][v]);
  } else {
    for (int i = 0; i < RG; ++i) {
      float* a = acc + i * d;
      for (int64_t x = 0; x < d; ++x) a[x] *= rescale[i];
      for (int j = 0; j < nk; ++j) {
        const float wj = w[j * rp + i];
        const float* row = values[j];
        for (int64_t x = 0; x < d; ++x) a[x] += wj * row[x];
      }
    }
  }
}

// Attention of the queries of tile `tile` of row b, KV head h, over the keys in `keys` (the union of the tile's
// queries' allowed keys); each query head masks by its own position.
template <int NV>
void attend(const Problem& p, int64_t b, int64_t tile, int64_t h, KeyRange keys) {
  const int64_t d = p.dim, g = p.groups, ps = p.page_size;
  const int64_t t0 = tile * p.tile_queries, t1 = std::min(t0 + p.tile_queries, p.steps);
  const int64_t rows = (t1 - t0) * g, rp = (rows + kLanes - 1) / kLanes * kLanes, vecs = rp / kLanes;
  auto out_row = [&](int64_t r) { return p.out + (((b * p.steps + t0 + r / g) * p.heads + h) * g + r % g) * d; };
  if (keys.first > keys.last) {  // every query of the tile is padding (or windowed past the table): zeros
    for (int64_t r = 0; r < rows; ++r) std::fill(out_row(r), out_row(r) + d, 0.0f);
    return;
  }

  std::vector<float> scratch(d * rp + kKeyBlock * rp + rp * d + 3 * rp + d, 0.0f);
  float* qt = scratch.data();           // [D, rp] queries pre-scaled by d**-0.5, transposed; padding rows zero
  float* st = qt + d * rp;              // [kKeyBlock, rp] scores, then softmax weights
  float* acc = st + kKeyBlock * rp;     // [rp, D] unnormalised output
  float* top = acc + rp * d;            // [rp] running max
  float* total = top + rp;              // [rp] running sum of weights
  float* rescale = total + rp;          // [rp] this block's rescale of acc
  const float* zeros = rescale + rp;    // [D] stands in for keys past the range
  std::vector<int32_t> bounds(2 * rp);  // [rp] first and [rp] last allowed key of each query row
  int32_t* lo = bounds.data();
  int32_t* hi = lo + rp;

  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t limit = p.cols * ps - 1;
  for (int64_t r = 0; r < rp; ++r) {
    KeyRange range{1, 0};
    if (r < rows) {
      const float* q = p.q + (((b * p.steps + t0 + r / g) * p.heads + h) * g + r % g) * d;
      for (int64_t i = 0; i < d; ++i) qt[i * rp + r] = q[i] * scale;
      range = query_keys(p.pos[b * p.steps + t0 + r / g], p.window, limit);
    }
    lo[r] = static_cast<int32_t>(range.first);
    hi[r] = static_cast<int32_t>(range.last);
    top[r] = -INFINITY;
  }

  const int32_t* row_pages = p.table + b * p.cols;
  const vfloat neg_inf = splat(-INFINITY);
  const float* kp[kKeyBlock];
  const float* vp[kKeyBlock];
  for (int64_t kb = keys.first; kb <= keys.last; kb += kKeyBlock) {
    const int nk = static_cast<int>(std::min<int64_t>(kKeyBlock, keys.last - kb + 1));
    for (int j = 0; j < kKeyBlock; ++j) {
      if (j < nk) {
        const int64_t key = kb + j;
        const int64_t chunk = ((static_cast<int64_t>(row_pages[key / ps]) * p.heads + h) * ps + key % ps) * d;
        kp[j] = p.k + chunk;
        vp[j] = p.v + chunk;
      } else {
        kp[j] = vp[j] = zeros;
      }
    }
    for (int64_t rv = 0; rv < vecs; rv += 2) {
      float* s = st + rv * kLanes;
      const float* qr = qt + rv * kLanes;
      for (int half = 0; half < kKeyBlock / kScoreKeys && half * kScoreKeys < nk; ++half) {
        if (vecs - rv >= 2)
          scores<2>(qr, rp, kp + half * kScoreKeys, d, s + half * kScoreKeys * rp);
        else
          scores<1>(qr, rp, kp + half * kScoreKeys, d, s + half * kScoreKeys * rp);
      }
    }
    // Online softmax, vectorised across rows: mask, block max, weights, rescale of what came before.
    vint active{};
    for (int64_t rv = 0; rv < vecs; ++rv) {
      const int64_t r0 = rv * kLanes;
      const vint first = load_int(lo + r0), last = load_int(hi + r0);
      vfloat block_top = neg_inf;
      for (int j = 0; j < kKeyBlock; ++j) {
        const int32_t key = static_cast<int32_t>(kb + j);
        vfloat s = load(st + j * rp + r0);
        s = (first <= key) & (key <= last) ? s : neg_inf;
        store(st + j * rp + r0, s);
        block_top = s > block_top ? s : block_top;
      }
      active |= block_top != neg_inf;
      const vfloat old_top = load(top + r0);
      const vfloat new_top = block_top > old_top ? block_top : old_top;
      const vfloat safe = new_top == neg_inf ? splat(0.0f) : new_top;  // no key yet: any finite value
      vfloat sum{};
      for (int j = 0; j < kKeyBlock; ++j) {
        const vfloat s = load(st + j * rp + r0);
        const vfloat w = s == neg_inf ? splat(0.0f) : vexp(s - safe);
        store(st + j * rp + r0, w);
        sum += w;
      }
      const vfloat resc = vexp(old_top - safe);  // 1 when the max did not move; ~0 when nothing came before
      store(total + r0, load(total + r0) * resc + sum);
      store(top + r0, new_top);
      store(rescale + r0, resc);
    }
    bool any = false;
    for (int i = 0; i < kLanes; ++i) any |= active[i] != 0;
    if (!any) continue;  // no query of the tile may see these keys (non-contiguous positions)
    constexpr int kGroup = NV >= 8 ? 2 : 4;
    int64_t r = 0;
    for (; r + kGroup <= rows; r += kGroup)
      accumulate<NV, kGroup>(acc + r * d, d, st + r, rp, vp, nk, rescale + r);
    for (; r < rows; ++r) accumulate<NV, 1>(acc + r * d, d, st + r, rp, vp, nk, rescale + r);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = total[r] > 0.0f ? 1.0f / total[r] : 0.0f;  // padding query: zeros
    float* o = out_row(r);
    for (int64_t i = 0; i < d; ++i) o[i] = acc[r * d + i] * inv;
  }
}

// Items are (row, KV head, query tile), ordered so that each thread's consecutive items share a head's pages and
// the costly last tiles of a row come first, leaving the cheap ones to balance the end.
template <int NV>
void attend_all(ffi::ThreadPool& pool, const Problem& p, const std::vector<KeyRange>& ranges, int64_t batch) {
  const int64_t per_row = p.heads * p.tiles;
  parallel_for(pool, batch * per_row, [&](int64_t item) {
    const int64_t b = item / per_row, h = item % per_row / p.tiles, tile = p.tiles - 1 - item % p.tiles;
    attend<NV>(p, b, tile, h, ranges[b * p.tiles + tile]);
  });
}

ffi::Error PagedPrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pool,
                                 ffi::Buffer<ffi::F32> v_pool, ffi::Buffer<ffi::S32> block_table,
                                 ffi::Buffer<ffi::S32> positions, int32_t sliding_window,
                                 ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k_pool.dimensions(), vd = v_pool.dimensions();
  const auto td = block_table.dimensions(), pd = positions.dimensions(), od = out->dimensions();
  if (ffi::Error e = check_paged_attention("paged_prefill_attention", qd, kd, vd, td, pd, od, sliding_window);
      e.failure())
    return e;
  const int64_t batch = qd[0], steps = qd[1], heads = qd[2], groups = qd[3], dim = qd[4];
  const int64_t num_pages = kd[0], page_size = kd[2], cols = td[1];
  if (page_size <= 0 || cols * page_size > INT32_MAX)
    return ffi::Error::InvalidArgument("paged_prefill_attention: page_size must be positive, n * page_size < 2**31");
  if (batch * steps * heads * groups * dim == 0) return ffi::Error::Success();

  // Each tile's key range (the union of its queries' allowed keys), and a check of the only page ids it will read.
  const int64_t tile_queries = std::min(std::max<int64_t>(kTileRows / std::max<int64_t>(groups, 1), 1), steps);
  const int64_t tiles = (steps + tile_queries - 1) / tile_queries;
  const int32_t* table = block_table.typed_data();
  const int32_t* pos = positions.typed_data();
  std::vector<KeyRange> ranges(batch * tiles);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t tile = 0; tile < tiles; ++tile) {
      KeyRange range{INT64_MAX, -1};
      for (int64_t t = tile * tile_queries; t < std::min((tile + 1) * tile_queries, steps); ++t) {
        const KeyRange keys = query_keys(pos[b * steps + t], sliding_window, cols * page_size - 1);
        if (keys.first > keys.last) continue;
        range = {std::min(range.first, keys.first), std::max(range.last, keys.last)};
      }
      ranges[b * tiles + tile] = range;
      if (range.first > range.last) continue;
      for (int64_t c = range.first / page_size; c <= range.last / page_size; ++c) {
        const int32_t page = table[b * cols + c];
        if (page < 0 || page >= num_pages)
          return ffi::Error::InvalidArgument("paged_prefill_attention: block_table[" + std::to_string(b) + ", " +
                                             std::to_string(c) + "] = " + std::to_string(page) +
                                             " is outside [0, " + std::to_string(num_pages) + ")");
      }
    }
  }
  const Problem p{q.typed_data(), k_pool.typed_data(), v_pool.typed_data(), table, pos, out->typed_data(),
                  steps, cols, heads, groups, page_size, dim, sliding_window, tile_queries, tiles};
  with_vectors_per_dim(dim, [&](auto nv) { attend_all<decltype(nv)::value>(pool, p, ranges, batch); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxserve

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedPrefillAttention, jaxserve::PagedPrefillAttention,
                              jaxserve::paged_attention_binding());
