// Counter-based normal generator shared by every backend (Philox4x32-10 + Box-Muller).
//
// Element n of a tensor gets lane n % 4 of the Philox block at counter n / 4 (low word c0,
// high word c1), keyed by the 64-bit seed. The same stream is implemented in torch ops
// (pvkernels/ops/rng.py) and in Triton, so a seed gives the same noise on every backend up
// to float rounding, and the result never depends on how work is split between threads.
//
// Written once against simd.h: kLanes counters per step (4 kLanes normals), no libm call in
// the loop.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace pvkernels {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// cos and sin of 2*pi*u for u in [0, 1): exact quadrant reduction on u, then Taylor
// polynomials on [-pi/4, pi/4] (error < 2e-9).
inline void sincos_2pi(simd::vfloat u, simd::vfloat* c, simd::vfloat* s) {
  using simd::vfloat, simd::vint;
  const vint q = __builtin_convertvector(u * 4.0f + 0.5f, vint);  // truncation = round (u >= 0)
  const vfloat x = (u - __builtin_convertvector(q, vfloat) * 0.25f) * 6.28318530717958647f;
  const vfloat x2 = x * x;
  const vfloat sn =
      x * (1.0f + x2 * (-1.6666667e-1f + x2 * (8.3333333e-3f + x2 * (-1.9841270e-4f + x2 * 2.7557319e-6f))));
  const vfloat cs = 1.0f + x2 * (-0.5f + x2 * (4.1666667e-2f + x2 * (-1.3888889e-3f + x2 * (2.4801587e-5f -
                                                                                             x2 * 2.7557319e-7f))));
  const vint quadrant = q & 3;
  const vint swap = (quadrant & 1) != 0;
  const vfloat cq = swap ? sn : cs, sq = swap ? cs : sn;
  const vint neg_c = (quadrant == 1) | (quadrant == 2), neg_s = quadrant >= 2;
  *c = neg_c ? -cq : cq;
  *s = neg_s ? -sq : sq;
}

// Writes the standard normals of elements [first, first + count) to out.
inline void philox_normals(uint64_t seed, int64_t first, int64_t count, float* out) {
  using simd::kLanes, simd::vfloat, simd::vint, simd::vuint;
  constexpr int64_t kStep = 4 * kLanes;  // normals per step
  const uint32_t key0 = static_cast<uint32_t>(seed);
  const uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  const vuint iota = __builtin_convertvector(simd::iota(), vuint);
  const int64_t end = first + count;
  for (int64_t block = first >> 2; block * 4 < end; block += kLanes) {
    vuint c0 = static_cast<uint32_t>(block) + iota;  // counters block .. block + kLanes - 1
    vuint c1 = static_cast<uint32_t>(static_cast<uint64_t>(block) >> 32) + (c0 < iota ? 1u : 0u);
    vuint c2 = {}, c3 = {};
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      vuint hi0, lo0, hi2, lo2;
      simd::mul_hi_lo(c0, kPhiloxRoundA, &hi0, &lo0);
      simd::mul_hi_lo(c2, kPhiloxRoundB, &hi2, &lo2);
      c0 = hi2 ^ c1 ^ k0;
      c2 = hi0 ^ c3 ^ k1;
      c1 = lo2;
      c3 = lo0;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    // u1 in (0, 1) (odd multiples of 2^-24, never 0), u2 in [0, 1).
    const float scale = 5.9604645e-8f;
    const vfloat u1a = __builtin_convertvector(reinterpret_cast<vint>(((c0 >> 9) << 1) | 1u), vfloat) * scale;
    const vfloat u2a = __builtin_convertvector(reinterpret_cast<vint>(c1 >> 8), vfloat) * scale;
    const vfloat u1b = __builtin_convertvector(reinterpret_cast<vint>(((c2 >> 9) << 1) | 1u), vfloat) * scale;
    const vfloat u2b = __builtin_convertvector(reinterpret_cast<vint>(c3 >> 8), vfloat) * scale;
    const vfloat ra = simd::sqrt(-2.0f * simd::log(u1a)), rb = simd::sqrt(-2.0f * simd::log(u1b));
    vfloat ca, sa, cb, sb;
    sincos_2pi(u2a, &ca, &sa);
    sincos_2pi(u2b, &cb, &sb);
    // element 4 j + l is lane l of counter j
    const int64_t lo = std::max(first, block * 4), hi = std::min(end, block * 4 + kStep);
    if (hi - lo == kStep) {
      simd::store_interleaved4(out + (lo - first), ra * ca, ra * sa, rb * cb, rb * sb);
    } else {
      float all[kStep];
      simd::store_interleaved4(all, ra * ca, ra * sa, rb * cb, rb * sb);
      for (int64_t n = lo; n < hi; ++n) out[n - first] = all[n - block * 4];
    }
  }
}

}  // namespace pvkernels
