// The memory side of the motion-module attention (issue 19) without the attention: per item, three
// runs read (q, k, v: 16 frames x C channels, fp32; C = $CHANNELS, default 320: 20 KB runs) and one
// written with streaming stores (the output), F rounds of 8 independent FMAs per line read standing
// in for the compute, and the next item's lines prefetched (one per line read, or in bursts). ORDER
// sets the order of the reads within an item: 0 as they lie; 1 head by head as the rows kernel reads
// diffusers' layout (8 heads x 16 rows x C / 8 floats; at 320 channels 160-byte pieces 1280 bytes
// apart); 2 a sequential copy of the item into a scratch first, then order 1 on the scratch; 3 the
// three runs side by side in address order, a line of each a step (F rounds a step, not a line:
// F 4 is the 1280-channel kernel's 40,960 FMAs an item). AVX-512 only.
//
//   g++ -O2 -march=native -o /tmp/read_pattern benchmarks/read_pattern.cpp
//   ORDER=1 /tmp/read_pattern ITEMS F PREFETCH   # e.g. 4096 (336 MB: from memory) or 8 (in L2)
//   CHANNELS=1280 ORDER=1 /tmp/read_pattern 64 0 1   # the 8x8 level's 21 MB (in L3), no compute
//   CHANNELS=1280 ORDER=3 /tmp/read_pattern 2048 4 0   # the fastest order found, the kernel's FMAs
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
    std::fprintf(stderr, "usage: [ORDER=0|1|2|3] [CHANNELS=320] %s ITEMS F PREFETCH\n", argv[0]);
    return 2;
  }
  const long n = std::atol(argv[1]);
  const int F = std::atoi(argv[2]), mode = std::atoi(argv[3]);
  const int order = std::getenv("ORDER") ? std::atoi(std::getenv("ORDER")) : 0;
  const long C = std::getenv("CHANNELS") ? std::atol(std::getenv("CHANNELS")) : 320, Dh = C / 8;
  if (n < 1 || F < 0 || mode < 0 || mode > 7 || order < 0 || order > 3 || C % 8 != 0 || Dh < 16) {
    std::fprintf(stderr, "ITEMS >= 1, F >= 0, PREFETCH 0-7, ORDER 0-3, CHANNELS a multiple of 8 from 128\n");
    return 2;
  }
  const long R = 16 * C * 4, L = R / 64;  // bytes, lines of a run (L == C: Dh lines a head)
  float* in[3];
  for (auto& p : in) {
    p = static_cast<float*>(std::aligned_alloc(4096, n * R));
    std::fill(p, p + n * R / 4, 0.5f);
  }
  float* out = static_cast<float*>(std::aligned_alloc(4096, n * R));
  std::fill(out, out + n * R / 4, 0.0f);
  float* scratch = static_cast<float*>(std::aligned_alloc(4096, 3 * R));
  // the element each load of a run starts at (computed once: no divisions in the loop)
  std::vector<long> start(L);
  for (long l = 0; l < L; ++l) {
    start[l] = l * 16;
    if (order != 0) {  // head h, row r, piece c of the row's Dh floats (at Dh 40: 0, 16, 24)
      // a head's Dh loads spread over its 16 rows (at Dh 40 rows of 3, 2, 3, ... loads)
      const long h = l / Dh, r = l % Dh * 16 / Dh, c = l % Dh - (r * Dh + 15) / 16;
      start[l] = r * C + h * Dh + std::min(c * 16, Dh - 16);
    }
  }
  const __m512 m = _mm512_set1_ps(0.999f);
  __m512 d0 = m, c0 = m, c1 = m, c2 = m, c3 = m, c4 = m, c5 = m, c6 = m, c7 = m;
  std::vector<double> times;
  for (int pass = 0; pass < 7; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < n; ++it) {
      const long ahead = mode == 3 ? 2 : 1, burst = mode == 5 ? 40 : mode == 6 ? 120 : mode == 7 ? 10 : 0;
      const bool prefetch = mode != 0 && it + ahead < n;
      long done = 0, op = 0, at = 0;  // lines of the next item prefetched: operand op's first `at`, the ones before
      auto next_line = [&] {  // the next item's next line (no division: L is not a constant)
        const char* p = reinterpret_cast<const char*>(in[op] + (it + ahead) * R / 4) + at * 64;
        ++done;
        if (++at == L) at = 0, ++op;
        return p;
      };
      if (order == 2)
        for (int o = 0; o < 3; ++o)
          for (long l = 0; l < L; ++l)
            _mm512_store_ps(scratch + (o * L + l) * 16, _mm512_load_ps(in[o] + it * R / 4 + l * 16));
      if (order == 3) {  // q, k, v side by side: a line of each a step
        const float *x0 = in[0] + it * R / 4, *x1 = in[1] + it * R / 4, *x2 = in[2] + it * R / 4;
        for (long l = 0; l < L; ++l) {
          if (prefetch)  // any PREFETCH but 0: prefetcht1 a line per line read
            for (int b = 0; b < 3; ++b) _mm_prefetch(next_line(), _MM_HINT_T1);
          d0 = _mm512_or_ps(d0, _mm512_load_ps(x0 + l * 16));
          d0 = _mm512_or_ps(d0, _mm512_load_ps(x1 + l * 16));
          d0 = _mm512_or_ps(d0, _mm512_load_ps(x2 + l * 16));
          // (the FMAs written out as below: a lambda over c0..c7 kept them in memory, 1.2-1.6x slower)
          for (int f = 0; f < F; ++f) {
            c0 = _mm512_fmadd_ps(c0, m, m), c1 = _mm512_fmadd_ps(c1, m, m), c2 = _mm512_fmadd_ps(c2, m, m);
            c3 = _mm512_fmadd_ps(c3, m, m), c4 = _mm512_fmadd_ps(c4, m, m), c5 = _mm512_fmadd_ps(c5, m, m);
            c6 = _mm512_fmadd_ps(c6, m, m), c7 = _mm512_fmadd_ps(c7, m, m);
          }
        }
      }
      for (int o = 0; o < 3 && order != 3; ++o) {
        const float* x = order == 2 ? scratch + o * L * 16 : in[o] + it * R / 4;
        for (long l = 0; l < L; ++l) {
          const __m512 v = _mm512_loadu_ps(x + start[l]);
          if (prefetch && burst > 0) {
            if ((o * L + l) % burst == 0)
              for (long b = 0; b < burst && done < 3 * L; ++b) _mm_prefetch(next_line(), _MM_HINT_T1);
          } else if (prefetch) {
            const char* p = next_line();
            if (mode == 2) _mm_prefetch(p, _MM_HINT_T0);
            else if (mode == 4) _mm_prefetch(p, _MM_HINT_T2);
            else _mm_prefetch(p, _MM_HINT_T1);
          }
          d0 = _mm512_or_ps(d0, v);  // a 1-cycle chain (an add's 4 cycles held the loads back at 1280 channels)
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
  std::printf("channels %ld items %ld F %d prefetch %d order %d: %.2f us an item, %.1f GB/s (%g)\n", C, n, F, mode,
              order, times[3],
              4.0 * R / times[3] / 1e3, sums);
  return 0;
}
