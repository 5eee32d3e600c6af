// Counter-based normal generator shared by every backend (Philox4x32-10 + Box-Muller).
//
// Element n of a tensor gets lane n % 4 of the Philox block at counter n / 4 (low word c0,
// high word c1), keyed by the 64-bit seed. The same stream is implemented in torch ops
// (pvkernels/ops/rng.py) and in Triton, so a seed gives the same noise on every backend up
// to float rounding, and the result never depends on how work is split between threads.
//
// Written with GCC vector extensions (16 lanes): they compile to AVX-512 where the target has
// it and to narrower registers elsewhere, with no libm call in the loop. Tuned for AVX-512;
// other targets are correct but several times slower.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pvkernels {

typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// 32 x 32 -> 64-bit products of every lane: even lanes and odd lanes as two 64-bit multiplies
// (vpmuludq; left to itself GCC emits the much slower 64 x 64 vpmullq).
static inline void mulhilo(u32x16 a, uint32_t m, u32x16* hi, u32x16* lo) {
#if defined(__AVX512F__)
  const __m512i va = reinterpret_cast<__m512i&>(a);
  const __m512i vm = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i even = _mm512_mul_epu32(va, vm);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(va, 32), vm);
  const __m512i h = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  const __m512i l = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
#else
  const u64x8 a64 = reinterpret_cast<u64x8&>(a);
  const u64x8 even = (a64 & 0xffffffffull) * static_cast<uint64_t>(m);
  const u64x8 odd = (a64 >> 32) * static_cast<uint64_t>(m);
  const u64x8 h = (even >> 32) | (odd & 0xffffffff00000000ull);
  const u64x8 l = (even & 0xffffffffull) | (odd << 32);
#endif
  *hi = reinterpret_cast<const u32x16&>(h);
  *lo = reinterpret_cast<const u32x16&>(l);
}

// ln(u) for u in (0, 1]: Cephes' logf polynomial (mantissa in [sqrt(1/2), sqrt(2))).
static inline f32x16 log_f32x16(f32x16 u) {
  i32x16 bits = reinterpret_cast<i32x16&>(u);
  i32x16 e = ((bits >> 23) & 0xff) - 126;
  i32x16 mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  f32x16 m = reinterpret_cast<f32x16&>(mbits);
  i32x16 small = m < 0.70710678f;  // all-ones lanes where true
  e += small;                      // e -= 1 there
  f32x16 x = small ? (m + m - 1.0f) : (m - 1.0f);
  f32x16 z = x * x;
  f32x16 y = 7.0376836292e-2f * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  f32x16 ef = __builtin_convertvector(e, f32x16);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return x + y + 0.693359375f * ef;
}

// cos and sin of 2*pi*u for u in [0, 1): exact quadrant reduction on u, then Taylor
// polynomials on [-pi/4, pi/4] (error < 2e-9).
static inline void sincos_2pi_f32x16(f32x16 u, f32x16* c, f32x16* s) {
  i32x16 q = __builtin_convertvector(u * 4.0f + 0.5f, i32x16);  // truncation = round (u >= 0)
  f32x16 x = (u - __builtin_convertvector(q, f32x16) * 0.25f) * 6.28318530717958647f;
  f32x16 x2 = x * x;
  f32x16 sn = x * (1.0f + x2 * (-1.6666667e-1f + x2 * (8.3333333e-3f + x2 * (-1.9841270e-4f + x2 * 2.7557319e-6f))));
  f32x16 cs = 1.0f + x2 * (-0.5f + x2 * (4.1666667e-2f + x2 * (-1.3888889e-3f + x2 * (2.4801587e-5f -
                                                                                       x2 * 2.7557319e-7f))));
  i32x16 quadrant = q & 3;
  i32x16 swap = (quadrant & 1) != 0;
  f32x16 cq = swap ? sn : cs, sq = swap ? cs : sn;
  i32x16 neg_c = (quadrant == 1) | (quadrant == 2), neg_s = quadrant >= 2;
  *c = neg_c ? -cq : cq;
  *s = neg_s ? -sq : sq;
}

// Writes the standard normals of elements [first, first + count) to out.
inline void philox_normals(uint64_t seed, int64_t first, int64_t count, float* out) {
  const uint32_t key0 = static_cast<uint32_t>(seed);
  const uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  const u32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t end = first + count;
  for (int64_t block = first >> 2; block * 4 < end; block += 16) {
    u32x16 c0 = static_cast<uint32_t>(block) + iota;  // counters block .. block + 15
    u32x16 c1 = static_cast<uint32_t>(static_cast<uint64_t>(block) >> 32) + (c0 < iota ? 1u : 0u);
    u32x16 c2 = {}, c3 = {};
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      u32x16 hi0, lo0, hi2, lo2;
      mulhilo(c0, kPhiloxRoundA, &hi0, &lo0);
      mulhilo(c2, kPhiloxRoundB, &hi2, &lo2);
      c0 = hi2 ^ c1 ^ k0;
      c2 = hi0 ^ c3 ^ k1;
      c1 = lo2;
      c3 = lo0;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    // u1 in (0, 1) (odd multiples of 2^-24, never 0), u2 in [0, 1).
    const float scale = 5.9604645e-8f;
    f32x16 u1a = __builtin_convertvector(reinterpret_cast<i32x16>(((c0 >> 9) << 1) | 1u), f32x16) * scale;
    f32x16 u2a = __builtin_convertvector(reinterpret_cast<i32x16>(c1 >> 8), f32x16) * scale;
    f32x16 u1b = __builtin_convertvector(reinterpret_cast<i32x16>(((c2 >> 9) << 1) | 1u), f32x16) * scale;
    f32x16 u2b = __builtin_convertvector(reinterpret_cast<i32x16>(c3 >> 8), f32x16) * scale;
    f32x16 la = -2.0f * log_f32x16(u1a), lb = -2.0f * log_f32x16(u1b);
    f32x16 ra, rb;
    for (int j = 0; j < 16; ++j) {
      ra[j] = __builtin_sqrtf(la[j]);
      rb[j] = __builtin_sqrtf(lb[j]);
    }
    f32x16 ca, sa, cb, sb;
    sincos_2pi_f32x16(u2a, &ca, &sa);
    sincos_2pi_f32x16(u2b, &cb, &sb);
    const f32x16 n0 = ra * ca, n1 = ra * sa, n2 = rb * cb, n3 = rb * sb;
    // 4 x 16 -> 64 interleave (element 4j + l is lane l of counter j) with two shuffle levels.
    const i32x16 pair_lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const i32x16 pair_hi = pair_lo + 8;
    const f32x16 p01a = __builtin_shuffle(n0, n1, pair_lo), p01b = __builtin_shuffle(n0, n1, pair_hi);
    const f32x16 p23a = __builtin_shuffle(n2, n3, pair_lo), p23b = __builtin_shuffle(n2, n3, pair_hi);
    const u64x8 quad_lo = {0, 8, 1, 9, 2, 10, 3, 11}, quad_hi = quad_lo + 4;
    const u64x8 a = reinterpret_cast<const u64x8&>(p01a), b = reinterpret_cast<const u64x8&>(p01b);
    const u64x8 c = reinterpret_cast<const u64x8&>(p23a), d = reinterpret_cast<const u64x8&>(p23b);
    const u64x8 q[4] = {__builtin_shuffle(a, c, quad_lo), __builtin_shuffle(a, c, quad_hi),
                        __builtin_shuffle(b, d, quad_lo), __builtin_shuffle(b, d, quad_hi)};
    const int64_t lo = std::max(first, block * 4), hi = std::min(end, (block + 16) * 4);
    if (hi - lo == 64) {
      std::memcpy(out + (lo - first), q, sizeof(q));
    } else {
      const float* all = reinterpret_cast<const float*>(q);
      for (int64_t n = lo; n < hi; ++n) out[n - first] = all[n - block * 4];
    }
  }
}

}  // namespace pvkernels
