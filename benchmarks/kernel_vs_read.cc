// Each CPU kernel against a bare read of the same bytes and against the bandwidth probe, alternated round by round
// in one process (see kernel_vs_read.py, which builds and runs this).
//
// Why: on a shared VM the bandwidth drifts by 2x within seconds, so two timings taken minutes apart (or an A/B of
// whole decode steps) cannot resolve a few percent. Within one round the kernel and the read of its bytes see the
// same machine; their ratio is what the kernel's own work and access order cost, and it stays put when the
// machine's speed does not. Both sides run on the same std::threads (rows claimed from one counter, or one range
// of panels each), so the FFI pool's wake-ups and XLA's dispatch are left out: what remains is the kernel's inner
// loop against memory.
//
// Usage: kernel_vs_read attention BATCH CONTEXT KV_HEADS GROUPS HEAD_DIM PAGE_SIZE LAYERS OFFSET THREADS ROUNDS
//        kernel_vs_read matmul ROWS K N MATRICES THREADS ROUNDS
// Prints one line per round: the GB/s of the kernel, of the read of its bytes (keys and values, or weights) and of
// the probe over as many bytes.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "attention.cc"
#include "bandwidth.cc"
#include "matmul.cc"

namespace jaxserve {
namespace {

// Threads kept for the whole run, spinning between jobs: run(part) calls part(t) on thread t of them (the caller
// is thread 0) and returns when all are done. Why not a std::thread per job: starting and joining threads for
// every matrix (tens of us each) cost 24 chained 768 x 3072 matmuls ~11% against the same bytes as one matrix,
// which two threads kept spinning do not (the XLA pool's threads also spin before they sleep).
class Team {
 public:
  explicit Team(int threads) : threads_(threads) {
    for (int t = 1; t < threads; ++t)
      helpers_.emplace_back([this, t] {
        for (int64_t seen = 0;;) {
          int64_t now;
          while ((now = generation_.load(std::memory_order_acquire)) == seen) {
            if (stop_.load(std::memory_order_relaxed)) return;
            __builtin_ia32_pause();
          }
          seen = now;
          (*part_)(t);
          finished_.fetch_add(1, std::memory_order_acq_rel);
        }
      });
  }
  ~Team() {
    stop_ = true;
    for (auto& h : helpers_) h.join();
  }
  int threads() const { return threads_; }
  void run(const std::function<void(int)>& part) {
    part_ = &part;
    finished_ = 0;
    generation_.fetch_add(1, std::memory_order_acq_rel);
    part(0);
    while (finished_.load(std::memory_order_acquire) < threads_ - 1) __builtin_ia32_pause();
  }

 private:
  int threads_;
  const std::function<void(int)>* part_ = nullptr;
  std::atomic<int64_t> generation_{0};
  std::atomic<int> finished_{0};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> helpers_;
};

// The run's team, made on first use with `threads` threads (every call of a run passes the same count).
Team& team(int threads) {
  static Team the_team(threads);
  if (the_team.threads() != threads) {
    fprintf(stderr, "one thread count per run\n");
    std::abort();
  }
  return the_team;
}

// Runs item(i) for i in [0, n) on `threads` threads (the caller one of them), claimed from one counter.
void on_threads(int threads, int64_t n, const std::function<void(int64_t)>& item) {
  std::atomic<int64_t> next{0};
  team(threads).run([&](int) {
    for (int64_t i = next++; i < n; i = next++) item(i);
  });
}

// Runs part(t) on thread t of `threads` (the caller is thread 0).
void each_thread(int threads, const std::function<void(int)>& part) { team(threads).run(part); }

double seconds_of(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A float buffer whose data starts `offset` bytes past a 4 KB boundary (XLA:CPU places its buffers at 64).
float* placed(size_t floats, int64_t offset) {
  char* raw = static_cast<char*>(std::aligned_alloc(4096, (floats * 4 + offset + 4095) / 4096 * 4096));
  float* p = reinterpret_cast<float*>(raw + offset);
  for (size_t i = 0; i < floats; ++i) p[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
  return p;
}

volatile float g_sink;

// The read-bandwidth probe (bandwidth.cc, as decode_mbu.py's roofline takes it): `bytes` of memory, each thread
// reading its share as 8 interleaved runs. Returns GB/s.
struct Probe {
  explicit Probe(double bytes) : n(static_cast<int64_t>(bytes / 4)), x(placed(n, 0)) {}
  double gbs(int threads) const {
    return n * 4.0 / seconds_of([&] {
             each_thread(threads, [&](int t) {
               g_sink = static_cast<float>(sum_runs(x + t * n / threads, n / threads, 8));
             });
           }) / 1e9;
  }
  int64_t n;
  float* x;
};

int attention(char** argv) {
  const int64_t batch = atoll(argv[0]), context = atoll(argv[1]), heads = atoll(argv[2]), groups = atoll(argv[3]);
  const int64_t dim = atoll(argv[4]), ps = atoll(argv[5]), layers = atoll(argv[6]), offset = atoll(argv[7]);
  const int threads = atoi(argv[8]), rounds = atoi(argv[9]);
  const int64_t keys = context + 1, cols = (keys + ps - 1) / ps, pages = batch * cols + 1;
  const size_t pool = static_cast<size_t>(pages) * heads * ps * dim;
  std::vector<float*> k(layers), v(layers);
  for (int64_t l = 0; l < layers; ++l) k[l] = placed(pool, offset), v[l] = placed(pool, offset);
  std::vector<int32_t> table(batch * cols);  // each row's pages in a run of its own, as a fresh engine's
  for (int64_t i = 0; i < batch * cols; ++i) table[i] = static_cast<int32_t>(1 + i);
  std::vector<float> q(batch * heads * groups * dim, 0.01f), out(q.size());
  const std::vector<KeyRange> ranges(batch, KeyRange{0, keys - 1});
  // The read: per page, every head's keys side by side, then every head's values; one add per vector, the loops
  // unrolled (with the head and vector loops left as runtime loops it read ~10% slower here). HEAD_DIM must be a
  // multiple of the vector width (kernel_vs_read.py checks).
  const auto read_row = [&](int64_t l, int64_t b) {
    with_vectors_per_dim(dim, [&](auto nv) {
      constexpr int NV = decltype(nv)::value > 0 ? decltype(nv)::value : 1;
      vfloat acc[NV] = {};
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t n = std::min(ps, keys - c * ps);
        for (const float* base : {k[l], v[l]}) {
          const float* page = base + static_cast<int64_t>(table[b * cols + c]) * heads * ps * dim;
          for (int64_t j = 0; j < n; ++j)
#pragma GCC unroll 16
            for (int64_t h = 0; h < heads; ++h)
#pragma GCC unroll 8
              for (int i = 0; i < NV; ++i) acc[i] += load(page + (h * ps + j) * dim + i * kLanes);
        }
      }
      vfloat all = acc[0];
      for (int i = 1; i < NV; ++i) all += acc[i];
      g_sink = all[0] + all[kLanes - 1];
    });
  };
  const double bytes = 2.0 * layers * batch * keys * heads * dim * 4;
  const Probe probe(bytes);
  for (int r = 0; r < rounds; ++r) {
    const double t_kernel = seconds_of([&] {
      for (int64_t l = 0; l < layers; ++l) {
        const Problem p{q.data(), k[l], v[l], table.data(), out.data(), cols, heads, groups, ps, dim};
        on_threads(threads, batch, [&](int64_t b) {
          with_vectors_per_dim(dim, [&](auto nv) { attend<decltype(nv)::value>(p, b, 0, heads, ranges[b]); });
        });
      }
    });
    const double t_read = seconds_of([&] {
      for (int64_t l = 0; l < layers; ++l) on_threads(threads, batch, [&](int64_t b) { read_row(l, b); });
    });
    printf("%.3f %.3f %.3f\n", bytes / t_kernel / 1e9, bytes / t_read / 1e9, probe.gbs(threads));
  }
  return 0;
}

int matmul(char** argv) {
  const int64_t rows = atoll(argv[0]), k_size = atoll(argv[1]), n = atoll(argv[2]), count = atoll(argv[3]);
  const int threads = atoi(argv[4]), rounds = atoi(argv[5]);
  const int64_t kq = (k_size + kStreams - 1) / kStreams, panels = (n + kTile - 1) / kTile;
  const int64_t panel_size = kq * kTile, region = panels * panel_size;
  std::vector<float*> w(count);
  for (auto& m : w) m = placed(kStreams * region, 64);
  std::vector<float> x(rows * k_size, 0.01f), y(rows * panels * kTile);
  // Panels in one contiguous range per thread, as parallel_ranges starts them.
  const auto ranges = [&](const std::function<void(int64_t, int64_t)>& f) {
    each_thread(threads, [&](int t) { f(t * panels / threads, (t + 1) * panels / threads); });
  };
  // The read: the kernel's order (kStreams runs, a panel row of each in turn) and software prefetch.
  const auto read_panels = [&](const float* m, int64_t a, int64_t b) {
    vfloat acc[kVecs] = {};
    for (int64_t p = a; p < b; ++p)
      for (int64_t i = 0; i < kq; ++i)
        for (int s = 0; s < kStreams; ++s) {
          if (i >= run_rows(k_size, kq, s)) continue;
          const float* at = m + s * region + p * panel_size + i * kTile;
          if constexpr (kPrefetchBytes > 0)
            __builtin_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, 0, kPrefetchLocality);
          for (int j = 0; j < kVecs; ++j) acc[j] += load(at + j * kLanes);
        }
    vfloat all = acc[0];
    for (int j = 1; j < kVecs; ++j) all += acc[j];
    g_sink = all[0] + all[kLanes - 1];
  };
  const double bytes = static_cast<double>(count) * k_size * n * 4;
  const Probe probe(bytes);
  for (int r = 0; r < rounds; ++r) {
    const double t_kernel = seconds_of([&] {
      for (const float* m : w)
        ranges([&](int64_t a, int64_t b) {
          for (int64_t p = a; p < b; ++p)
            for (int64_t r0 = 0; r0 < rows; r0 += kRows)
              panel_tail<kRows>(static_cast<int>(std::min<int64_t>(rows - r0, kRows)), x.data() + r0 * k_size,
                                k_size, kq, m + p * panel_size, region, y.data() + r0 * panels * kTile + p * kTile,
                                panels * kTile);
        });
    });
    const double t_read = seconds_of([&] {
      for (const float* m : w) ranges([&](int64_t a, int64_t b) { read_panels(m, a, b); });
    });
    printf("%.3f %.3f %.3f\n", bytes / t_kernel / 1e9, bytes / t_read / 1e9, probe.gbs(threads));
  }
  return 0;
}

}  // namespace
}  // namespace jaxserve

int main(int argc, char** argv) {
  if (argc == 12 && strcmp(argv[1], "attention") == 0) return jaxserve::attention(argv + 2);
  if (argc == 8 && strcmp(argv[1], "matmul") == 0) return jaxserve::matmul(argv + 2);
  fprintf(stderr, "usage: see the top of kernel_vs_read.cc\n");
  return 2;
}
