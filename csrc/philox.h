// Counter-based normal generator shared by every backend (Philox4x32-10 + Box-Muller).
//
// Element n of a tensor gets lane n % 4 of the Philox block at counter n / 4, keyed by the
// 64-bit seed. The same stream is implemented in torch ops (pvkernels/ops/rng.py) and in
// Triton, so a seed gives the same noise on every backend up to float rounding, and the
// result never depends on how the work is split between threads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace pvkernels {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// ln(u) for u in (0, 1]: Cephes' logf polynomial, written branch-free so loops calling it
// vectorise (no libm call).
static inline float fast_logf(float u) {
  union { float f; uint32_t i; } bits{u};
  int32_t e = static_cast<int32_t>((bits.i >> 23) & 0xff) - 126;
  bits.i = (bits.i & 0x007fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m = bits.f;
  bool small = m < 0.70710678f;
  e -= small ? 1 : 0;
  float x = small ? (m + m - 1.0f) : (m - 1.0f);
  float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  float ef = static_cast<float>(e);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return x + y + 0.693359375f * ef;
}

// cos and sin of 2*pi*u for u in [0, 1): exact quadrant reduction on u, then Taylor
// polynomials on [-pi/4, pi/4] (error < 2e-9).
static inline void sincos_2pi(float u, float* c, float* s) {
  float q = static_cast<float>(static_cast<int32_t>(u * 4.0f + 0.5f));
  float x = (u - q * 0.25f) * 6.28318530717958647f;
  float x2 = x * x;
  float sn = x * (1.0f + x2 * (-1.6666667e-1f + x2 * (8.3333333e-3f +
                 x2 * (-1.9841270e-4f + x2 * 2.7557319e-6f))));
  float cs = 1.0f + x2 * (-0.5f + x2 * (4.1666667e-2f + x2 * (-1.3888889e-3f +
                 x2 * (2.4801587e-5f - x2 * 2.7557319e-7f))));
  int32_t quadrant = static_cast<int32_t>(q) & 3;
  float cq = quadrant == 0 ? cs : quadrant == 1 ? -sn : quadrant == 2 ? -cs : sn;
  float sq = quadrant == 0 ? sn : quadrant == 1 ? cs : quadrant == 2 ? -sn : -cs;
  *c = cq;
  *s = sq;
}

// Writes the standard normals of elements [first, first + count) to out.
inline void philox_normals(uint64_t seed, int64_t first, int64_t count, float* out) {
  constexpr int kChunk = 64;
  const uint32_t key0 = static_cast<uint32_t>(seed);
  const uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  float lanes[4][kChunk];
  float interleaved[4 * kChunk];
  const int64_t end = first + count;
  for (int64_t block = first >> 2; block * 4 < end; block += kChunk) {
    // Structure of arrays so that the loop over counters vectorises.
    for (int j = 0; j < kChunk; ++j) {
      uint64_t counter = static_cast<uint64_t>(block + j);
      uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
      uint32_t c2 = 0, c3 = 0, k0 = key0, k1 = key1;
      for (int round = 0; round < 10; ++round) {
        uint64_t p0 = static_cast<uint64_t>(kPhiloxRoundA) * c0;
        uint64_t p2 = static_cast<uint64_t>(kPhiloxRoundB) * c2;
        c0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
        c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
        c1 = static_cast<uint32_t>(p2);
        c3 = static_cast<uint32_t>(p0);
        k0 += kPhiloxKeyA;
        k1 += kPhiloxKeyB;
      }
      // u1 in (0, 1) (odd multiples of 2^-24, never 0), u2 in [0, 1).
      float u1a = static_cast<float>(static_cast<int32_t>(((c0 >> 9) << 1) | 1u)) * 5.9604645e-8f;
      float u2a = static_cast<float>(static_cast<int32_t>(c1 >> 8)) * 5.9604645e-8f;
      float u1b = static_cast<float>(static_cast<int32_t>(((c2 >> 9) << 1) | 1u)) * 5.9604645e-8f;
      float u2b = static_cast<float>(static_cast<int32_t>(c3 >> 8)) * 5.9604645e-8f;
      float ra = __builtin_sqrtf(-2.0f * fast_logf(u1a));
      float rb = __builtin_sqrtf(-2.0f * fast_logf(u1b));
      float ca, sa, cb, sb;
      sincos_2pi(u2a, &ca, &sa);
      sincos_2pi(u2b, &cb, &sb);
      lanes[0][j] = ra * ca;
      lanes[1][j] = ra * sa;
      lanes[2][j] = rb * cb;
      lanes[3][j] = rb * sb;
    }
    for (int j = 0; j < kChunk; ++j) {
      for (int lane = 0; lane < 4; ++lane) interleaved[4 * j + lane] = lanes[lane][j];
    }
    const int64_t lo = std::max(first, block * 4), hi = std::min(end, (block + kChunk) * 4);
    std::memcpy(out + (lo - first), interleaved + (lo - block * 4), sizeof(float) * (hi - lo));
  }
}

}  // namespace pvkernels
