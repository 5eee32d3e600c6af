// The memory side of the 320-channel motion-module attention (issue 19) without the attention: per
// item, three 20 KB runs read (q, k, v: 16 frames x 320 channels, fp32) and one written with
// streaming stores (the output), F rounds of 8 independent FMAs per line read standing in for the
// compute, and the next item's lines prefetched (one per line read, or in bursts). ORDER sets the
// order of the reads within an item: 0 as they lie; 1 head by head as the rows kernel reads
// diffusers' layout (8 heads x 16 rows x 40 floats: 160-byte pieces 1280 bytes apart); 2 a
// sequential copy of the item into a scratch first, then order 1 on the scratch. AVX-512 only.
//
//   g++ -O2 -march=native -o /tmp/read_pattern benchmarks/read_pattern.cpp
//   ORDER=1 /tmp/read_pattern ITEMS F PREFETCH   # e.g. 4096 (336 MB: from memory) or 8 (in L2)
//
// PREFETCH: 0 none, 1 prefetcht1 a line per line read (the next item), 2 prefetcht0, 3 prefetcht1
// two items ahead, 4 prefetcht2, 5/6/7 prefetcht1 in bursts of 40/120/10 lines. Prints the median
// of 7 passes (us an item) and the bytes moved per second. benchmarks/README.md, "Sixteenth session".
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: [ORDER=0|1|2] %s ITEMS F PREFETCH\n", argv[0]);
    return 2;
  }
  const long n = std::atol(argv[1]);
  const int F = std::atoi(argv[2]), mode = std::atoi(argv[3]);
  const int order = std::getenv("ORDER") ? std::atoi(std::getenv("ORDER")) : 0;
  if (n < 1 || F < 0 || mode < 0 || mode > 7 || order < 0 || order > 2) {
    std::fprintf(stderr, "ITEMS >= 1, F >= 0, PREFETCH 0-7, ORDER 0-2\n");
    return 2;
  }
  const long R = 20480, L = R / 64;  // bytes, lines of a run
  float* in[3];
  for (auto& p : in) {
    p = static_cast<float*>(std::aligned_alloc(4096, n * R));
    std::fill(p, p + n * R / 4, 0.5f);
  }
  float* out = static_cast<float*>(std::aligned_alloc(4096, n * R));
  std::fill(out, out + n * R / 4, 0.0f);
  float* scratch = static_cast<float*>(std::aligned_alloc(4096, 3 * R));
  const __m512 m = _mm512_set1_ps(0.999f);
  __m512 d0 = m, c0 = m, c1 = m, c2 = m, c3 = m, c4 = m, c5 = m, c6 = m, c7 = m;
  std::vector<double> times;
  for (int pass = 0; pass < 7; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < n; ++it) {
      const long ahead = mode == 3 ? 2 : 1, burst = mode == 5 ? 40 : mode == 6 ? 120 : mode == 7 ? 10 : 0;
      const bool prefetch = mode != 0 && it + ahead < n;
      auto line = [&](long l) { return reinterpret_cast<const char*>(in[l / L] + (it + ahead) * R / 4) + l % L * 64; };
      long done = 0;  // lines of the next item prefetched
      if (order == 2)
        for (long l = 0; l < 3 * L; ++l) _mm512_store_ps(scratch + l * 16, _mm512_load_ps(in[l / L] + it * R / 4 + l % L * 16));
      for (int o = 0; o < 3; ++o) {
        const float* x = order == 2 ? scratch + o * L * 16 : in[o] + it * R / 4;
        for (long l = 0; l < L; ++l) {
          long e = l * 16;  // the element this load starts at
          if (order != 0) {  // head h, row r, piece c of the row's 40 floats (0, 16, 24)
            const long h = l / 40, r = l % 40 * 2 / 5, c = l % 40 - (r * 5 + 1) / 2;  // rows of 3, 2, 3, ... loads
            e = r * 320 + h * 40 + std::min<long>(c * 16, 24);
          }
          const __m512 v = _mm512_loadu_ps(x + e);
          if (prefetch && burst > 0) {
            if ((o * L + l) % burst == 0)
              for (long b = 0; b < burst && done < 3 * L; ++b) _mm_prefetch(line(done++), _MM_HINT_T1);
          } else if (prefetch) {
            const char* p = line(done++);
            if (mode == 2) _mm_prefetch(p, _MM_HINT_T0);
            else if (mode == 4) _mm_prefetch(p, _MM_HINT_T2);
            else _mm_prefetch(p, _MM_HINT_T1);
          }
          d0 = _mm512_add_ps(d0, v);
          for (int f = 0; f < F; ++f) {
            c0 = _mm512_fmadd_ps(c0, m, m), c1 = _mm512_fmadd_ps(c1, m, m), c2 = _mm512_fmadd_ps(c2, m, m);
            c3 = _mm512_fmadd_ps(c3, m, m), c4 = _mm512_fmadd_ps(c4, m, m), c5 = _mm512_fmadd_ps(c5, m, m);
            c6 = _mm512_fmadd_ps(c6, m, m), c7 = _mm512_fmadd_ps(c7, m, m);
          }
        }
      }
      float* y = out + it * R / 4;
      for (long l = 0; l < L; ++l) _mm512_stream_ps(y + l * 16, d0);
    }
    _mm_sfence();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / n * 1e6);
  }
  std::sort(times.begin(), times.end());
  // the sums printed (to no one's interest) so that the compiler keeps the work
  const float sums = _mm512_reduce_add_ps(d0 + c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7);
  std::printf("items %ld F %d prefetch %d order %d: %.2f us an item, %.1f GB/s (%g)\n", n, F, mode, order, times[3],
              4.0 * R / times[3] / 1e3, sums);
  return 0;
}
