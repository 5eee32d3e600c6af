// The one SIMD layer of csrc/: a vector of kLanes fp32 lanes and everything the kernels do with
// it, for three targets chosen at compile time by the -march the extension is built with:
//   AVX-512F                             kLanes = 16, 32 vector registers
//   AVX2 + FMA (+F16C)                   kLanes = 8,  16 registers
//   plain C++ (any other CPU, or -DPVKERNELS_SIMD_PLAIN): kLanes = 8, GCC vector extensions (Clang
//     has them too; built here with GCC 12 only) that every target lowers (SSE2/NEON pairs, scalar)
// Kernels read kLanes / kRegisters and never spell a width (pvkernels/_backend.py's target_isa
// mirrors the choice below for the build cache). The vector types are GCC vector
// extensions (arithmetic, comparisons and ?: selects are plain operators); intrinsics appear
// only here, where one instruction does what a generic expression would not (2^n scaling,
// streaming stores, masked loads, 32x32->64 products, fp16 conversion, transposes).
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if !defined(PVKERNELS_SIMD_PLAIN) && defined(__AVX512F__)
#define PVKERNELS_SIMD_AVX512 1
#elif !defined(PVKERNELS_SIMD_PLAIN) && defined(__AVX2__) && defined(__FMA__)
#define PVKERNELS_SIMD_AVX2 1
#endif
#if defined(PVKERNELS_SIMD_AVX512) || defined(PVKERNELS_SIMD_AVX2)
#include <immintrin.h>
#endif

namespace pvkernels {
namespace simd {

#if defined(PVKERNELS_SIMD_AVX512)
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
constexpr bool kPlain = false;
#elif defined(PVKERNELS_SIMD_AVX2)
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
constexpr bool kPlain = false;
#else
constexpr int kLanes = 8;  // the kernels' blocking assumes kLanes >= 8
constexpr int kRegisters = 16;
constexpr bool kPlain = true;
#endif

typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vuint __attribute__((vector_size(4 * kLanes)));  // logical shifts
typedef uint64_t vu64 __attribute__((vector_size(4 * kLanes)));    // kLanes / 2 lanes
typedef uint16_t vu16 __attribute__((vector_size(2 * kLanes), aligned(2)));
// float-typed unaligned access: unlike memcpy (a char access, which may alias anything) it lets
// the compiler keep sizes and flags in registers across stores
typedef float vfloat_u __attribute__((vector_size(4 * kLanes), aligned(4)));

constexpr int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

inline vfloat splat(float f) {  // a broadcast (vfloat{} + f would add 0.0 first: -0.0 is not folded)
#if defined(PVKERNELS_SIMD_AVX512)
  return (vfloat)_mm512_set1_ps(f);
#elif defined(PVKERNELS_SIMD_AVX2)
  return (vfloat)_mm256_set1_ps(f);
#else
  vfloat r;
  for (int l = 0; l < kLanes; ++l) r[l] = f;
  return r;
#endif
}
inline vfloat bitcast_f(vint x) { return reinterpret_cast<const vfloat&>(x); }
inline vint bitcast_i(vfloat x) { return reinterpret_cast<const vint&>(x); }
inline vfloat max(vfloat a, vfloat b) { return a > b ? a : b; }
inline vint iota(int32_t base = 0) {  // base, base + 1, ...
  vint r;
  for (int l = 0; l < kLanes; ++l) r[l] = l;
  return r + base;
}

// ---- loads and stores -------------------------------------------------------------------
inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat_u*>(p); }
inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat_u*>(p) = v; }

// Lanes [0, n) of p, the others zero (0 <= n <= kLanes); reads nothing past p + n.
inline vfloat load_partial(const float* p, int n) {
#if defined(PVKERNELS_SIMD_AVX512)
  return (vfloat)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
#elif defined(PVKERNELS_SIMD_AVX2)
  return (vfloat)_mm256_maskload_ps(p, (__m256i)(iota() < n));
#else
  vfloat r = {};
  for (int l = 0; l < n; ++l) r[l] = p[l];
  return r;
#endif
}
// Writes v's lanes [first, first + n) to p[0 .. n) (with AVX-512 a masked store at p - first:
// p - first .. p must lie in the same array; nothing outside p[0 .. n) is written).
inline void store_lanes(float* p, vfloat v, int first, int n) {
#if defined(PVKERNELS_SIMD_AVX512)
  _mm512_mask_storeu_ps(p - first, static_cast<__mmask16>(((1u << n) - 1) << first), (__m512)v);
#else
  float x[kLanes];
  store(x, v);
  std::memcpy(p, x + first, n * sizeof(float));
#endif
}

// Writes lanes [0, n) of v to p; writes nothing past p + n.
inline void store_partial(float* p, vfloat v, int n) {
#if defined(PVKERNELS_SIMD_AVX512)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
#elif defined(PVKERNELS_SIMD_AVX2)
  _mm256_maskstore_ps(p, (__m256i)(iota() < n), (__m256)v);
#else
  for (int l = 0; l < n; ++l) p[l] = v[l];
#endif
}

// Non-temporal store of a whole vector to p (aligned to sizeof(vfloat)): for outputs written once
// and not read again here, it skips the read-for-ownership of each line (a third of a streaming
// kernel's traffic). stream_fence() orders them before a kernel returns.
inline void store_stream(float* p, vfloat v) {
#if defined(PVKERNELS_SIMD_AVX512)
  _mm512_stream_ps(p, (__m512)v);
#elif defined(PVKERNELS_SIMD_AVX2)
  _mm256_stream_ps(p, (__m256)v);
#else
  store(p, v);
#endif
}
inline void stream_fence() {
#if defined(PVKERNELS_SIMD_AVX512) || defined(PVKERNELS_SIMD_AVX2)
  _mm_sfence();
#endif
}
inline bool stream_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(vfloat) == 0; }

// Makes the compiler hold v in a register from here on: a vector used by several FMAs is then
// loaded once (GCC otherwise folds the load into each FMA, loading it again every time).
inline void keep_in_register(vfloat& v) {
#if defined(PVKERNELS_SIMD_AVX512)
  asm("" : "+v"(v));
#elif defined(PVKERNELS_SIMD_AVX2)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// ---- fp32 / bf16 / fp16 rows <-> fp32 lanes -----------------------------------------------
// Vectorised (an element-wise static_cast is a scalar loop, which made bf16 inputs far slower
// than fp32); conversions to 16 bits round to nearest even, as c10::BFloat16 / c10::Half do.
inline vfloat load_f32(const float* p) { return load(p); }
inline vfloat load_f32(const c10::BFloat16* p) {
  return bitcast_f(__builtin_convertvector(*reinterpret_cast<const vu16*>(p), vint) << 16);
}
inline vfloat load_f32(const c10::Half* p) {
#if defined(PVKERNELS_SIMD_AVX512)
  return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(PVKERNELS_SIMD_AVX2) && defined(__F16C__)
  return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vfloat r;
  for (int l = 0; l < kLanes; ++l) r[l] = static_cast<float>(p[l]);
  return r;
#endif
}
// stream: a non-temporal store where p allows it (fp32 rows of large outputs, see store_stream)
inline void store_from_f32(float* p, vfloat v, bool stream = false) {
  if (stream && stream_aligned(p)) {
    store_stream(p, v);
  } else {
    store(p, v);
  }
}
inline void store_from_f32(c10::BFloat16* p, vfloat v, bool = false) {
  const vuint bits = reinterpret_cast<const vuint&>(v);
  vuint r = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  r = v != v ? vuint{} + 0x7fc0u : r;  // NaN -> the quiet NaN c10 uses
  *reinterpret_cast<vu16*>(p) = __builtin_convertvector(r, vu16);
}
inline void store_from_f32(c10::Half* p, vfloat v, bool = false) {
#if defined(PVKERNELS_SIMD_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(PVKERNELS_SIMD_AVX2) && defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int l = 0; l < kLanes; ++l) p[l] = static_cast<c10::Half>(v[l]);
#endif
}
// The first n (< kLanes) elements of a row: lanes past n are zero / not written.
template <typename T>
inline vfloat load_f32_partial(const T* p, int n) {
  if constexpr (std::is_same<T, float>::value) {
    return load_partial(p, n);
  } else {
    T buf[kLanes] = {};
    std::memcpy(buf, p, n * sizeof(T));
    return load_f32(buf);
  }
}
template <typename T>
inline void store_from_f32_partial(T* p, vfloat v, int n) {
  if constexpr (std::is_same<T, float>::value) {
    store_partial(p, v, n);
  } else {
    T buf[kLanes];
    store_from_f32(buf, v);
    std::memcpy(p, buf, n * sizeof(T));
  }
}

// Rows: dst[i] = scale * src[i] for i < n, whole vectors and a masked tail.
template <typename T>
inline void to_f32(const T* src, int64_t n, float* dst, float scale = 1.0f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load_f32(src + i) * scale);
  const int tail = static_cast<int>(n - i);
  if (tail > 0) store_partial(dst + i, load_f32_partial(src + i, tail) * scale, tail);
}
template <typename T>
inline void from_f32(const float* src, int64_t n, T* dst, float scale = 1.0f, bool stream = false) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_from_f32(dst + i, load(src + i) * scale, stream);
  const int tail = static_cast<int>(n - i);
  if (tail > 0) store_from_f32_partial(dst + i, load_partial(src + i, tail) * scale, tail);
}

// The one dtype switch of the kernels: fn(T{}) for the element type T of a float32, float16 or
// bfloat16 tensor (the callers' checks admit no other).
template <typename Fn>
void with_element_type(c10::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    default: return fn(c10::BFloat16{});
  }
}

// ---- math -----------------------------------------------------------------------------------
// exp(x) (std::exp is a scalar libm call): 2^n * e^r with |r| <= ln2/2 (Cody-Waite reduction)
// and e^r by its Taylor polynomial to degree 6 (relative error < 2e-7, ~2 ulp); e^0 == 1
// exactly. x = -inf (masked lanes) gives ~6e-39 or 0, which callers zero; NaN stays NaN. With
// AVX-512 the clamp, the rounding and the 2^n scaling are one instruction each (vmaxps,
// vrndscaleps, vscalefps; large x overflow to +inf as expf does; elsewhere x is clamped to 88).
inline vfloat exp(vfloat x) {
#if defined(PVKERNELS_SIMD_AVX512)
  x = (vfloat)_mm512_max_ps((__m512)splat(-88.0f), (__m512)x);  // returns x when x is NaN
  const vfloat n = (vfloat)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT);
#else
  x = x < -88.0f ? splat(-88.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
#if defined(PVKERNELS_SIMD_AVX2)
  const vfloat n = (vfloat)_mm256_round_ps((__m256)(x * 1.44269504088896341f),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
#endif
#endif
  const vfloat r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vfloat y = splat(1.0f / 720);
  y = y * r + 1.0f / 120;
  y = y * r + 1.0f / 24;
  y = y * r + 1.0f / 6;
  y = y * r + 0.5f;
  y = y * r + 1.0f;
  y = y * r + 1.0f;
#if defined(PVKERNELS_SIMD_AVX512)
  return (vfloat)_mm512_scalef_ps((__m512)y, (__m512)n);
#else
  return y * bitcast_f((__builtin_convertvector(n, vint) + 127) << 23);
#endif
}

// log(x) for x > 0 normal (Cephes' logf polynomial, ~1 ulp; mantissa in [sqrt(1/2), sqrt(2))).
inline vfloat log(vfloat x) {
  const vint xi = bitcast_i(x);
  vint e = ((xi >> 23) & 0xff) - 126;
  vfloat m = bitcast_f((xi & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const vint small = m < 0.70710678118654752f;           // all-ones lanes where true
  e += small;                                            // e -= 1 there
  m = small ? m + m - 1.0f : m - 1.0f;
  const vfloat z = m * m;
  vfloat y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const vfloat fe = __builtin_convertvector(e, vfloat);
  y += fe * -2.12194440e-4f;
  y += z * -0.5f;
  return m + y + fe * 0.693359375f;
}

inline vfloat sqrt(vfloat x) {
#if defined(PVKERNELS_SIMD_AVX512)
  return (vfloat)_mm512_sqrt_ps((__m512)x);
#elif defined(PVKERNELS_SIMD_AVX2)
  return (vfloat)_mm256_sqrt_ps((__m256)x);
#else
  for (int l = 0; l < kLanes; ++l) x[l] = __builtin_sqrtf(x[l]);
  return x;
#endif
}

// The 32 x 32 -> 64-bit products of every lane with m, as high and low words: even and odd lanes
// as two unsigned 32-bit multiplies (vpmuludq; left to itself GCC emits a 64 x 64 multiply, which
// AVX2 does not have and AVX-512 runs much slower).
inline void mul_hi_lo(vuint a, uint32_t m, vuint* hi, vuint* lo) {
#if defined(PVKERNELS_SIMD_AVX512)
  const __m512i va = (__m512i)a, vm = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i even = _mm512_mul_epu32(va, vm), odd = _mm512_mul_epu32(_mm512_srli_epi64(va, 32), vm);
  *hi = (vuint)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = (vuint)_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
#elif defined(PVKERNELS_SIMD_AVX2)
  const __m256i va = (__m256i)a, vm = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32(va, vm), odd = _mm256_mul_epu32(_mm256_srli_epi64(va, 32), vm);
  *hi = (vuint)_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = (vuint)_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
#else
  const vu64 a64 = reinterpret_cast<const vu64&>(a);
  const vu64 even = (a64 & 0xffffffffull) * static_cast<uint64_t>(m), odd = (a64 >> 32) * static_cast<uint64_t>(m);
  const vu64 h = (even >> 32) | (odd & 0xffffffff00000000ull), l = (even & 0xffffffffull) | (odd << 32);
  *hi = reinterpret_cast<const vuint&>(h);
  *lo = reinterpret_cast<const vuint&>(l);
#endif
}

// ---- horizontal -----------------------------------------------------------------------------
// The smallest lane of a vfloat or vint.
template <typename V>
inline auto reduce_min(V v) {
#if defined(PVKERNELS_SIMD_AVX512)
  if constexpr (std::is_same<V, vfloat>::value) {
    return _mm512_reduce_min_ps((__m512)v);
  } else {
    return _mm512_reduce_min_epi32((__m512i)v);
  }
#else
  auto m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] < m ? v[l] : m;
  return m;
#endif
}

// The sum of the lanes of a vfloat.
inline float reduce_add(vfloat v) {
#if defined(PVKERNELS_SIMD_AVX512)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
#endif
}

// While alive, this thread flushes denormal results and inputs to zero (x86 MXCSR FTZ + DAZ;
// elsewhere a no-op): a kernel whose products of tiny probabilities and weights fall below
// FLT_MIN would otherwise take a microcode assist per denormal. Restores the previous mode.
class FlushDenormals {
 public:
#if defined(PVKERNELS_SIMD_AVX512) || defined(PVKERNELS_SIMD_AVX2)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// ---- shuffles -------------------------------------------------------------------------------
#if defined(PVKERNELS_SIMD_AVX512)
// One butterfly stage of the 16 x 16 transpose: swaps the off-diagonal s x s blocks, one
// two-source permute (vpermt2ps) per row of each pair.
template <int s>
inline void transpose_stage(vfloat* r) {
  vint lo, hi;
  for (int l = 0; l < 16; ++l) {
    lo[l] = l & s ? 16 + l - s : l;
    hi[l] = l & s ? 16 + l : l + s;
  }
  for (int i = 0; i < 16; ++i) {
    if (i & s) continue;
    const __m512 a = (__m512)r[i], b = (__m512)r[i + s];
    r[i] = (vfloat)_mm512_permutex2var_ps(a, (__m512i)lo, b);
    r[i + s] = (vfloat)_mm512_permutex2var_ps(a, (__m512i)hi, b);
  }
}
#endif

// In-register kLanes x kLanes transpose of r[0..kLanes).
inline void transpose(vfloat* r) {
#if defined(PVKERNELS_SIMD_AVX512)
  transpose_stage<8>(r), transpose_stage<4>(r), transpose_stage<2>(r), transpose_stage<1>(r);
#elif defined(PVKERNELS_SIMD_AVX2)
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved: (r0 r1) lanes 0,1 | 4,5 ...
    t[i] = _mm256_unpacklo_ps((__m256)r[i], (__m256)r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps((__m256)r[i], (__m256)r[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {  // quads: (r0 r1 r2 r3) of lanes 0 | 4, 1 | 5, 2 | 6, 3 | 7
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {  // the 128-bit halves of the two quads
    r[i] = (vfloat)_mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = (vfloat)_mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
#else
  for (int i = 0; i < kLanes; ++i) {
    for (int j = i + 1; j < kLanes; ++j) {
      const float x = r[i][j];
      r[i][j] = r[j][i];
      r[j][i] = x;
    }
  }
#endif
}

// The lane sums of r[0..kLanes) as one vector: lane l = sum of r[l]'s lanes (r is overwritten).
inline vfloat sum_each(vfloat* r) {
#if defined(PVKERNELS_SIMD_AVX2)
  __m256 h[4];
  for (int i = 0; i < 4; ++i) h[i] = _mm256_hadd_ps((__m256)r[2 * i], (__m256)r[2 * i + 1]);
  // per 128-bit half: the partial sums of r0..r3 (a) and r4..r7 (b)
  const __m256 a = _mm256_hadd_ps(h[0], h[1]), b = _mm256_hadd_ps(h[2], h[3]);
  return (vfloat)_mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
#elif defined(PVKERNELS_SIMD_AVX512)
  // a tree of two-source shuffles and adds, each step summing the two halves of the partial sums
  // of twice as many vectors: 256-bit halves (s1[i]: r[i]'s 8 partial sums beside r[i + 4]'s),
  // 128-bit quarters (s2[i]: quarter g holds r[i + 4 g]'s), 64-bit pairs, lanes: 30 shuffles and
  // 15 adds, against 64 shuffles for a 16 x 16 transpose
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 4; ++i) {
    for (int g = 0; g < 2; ++g) {  // r[i + 8 g] with r[i + 8 g + 4]
      const __m512 x = (__m512)r[i + 8 * g], y = (__m512)r[i + 8 * g + 4];
      s1[i + 4 * g] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
  }
  for (int i = 0; i < 4; ++i) {  // quarters r[i], r[i + 4], r[i + 8], r[i + 12]
    const __m512 x = s1[i], y = s1[i + 4];
    s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
  }
  for (int i = 0; i < 2; ++i) {
    const __m512d x = _mm512_castps_pd(s2[2 * i]), y = _mm512_castps_pd(s2[2 * i + 1]);
    s3[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  return (vfloat)_mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xDD));
#else
  transpose(r);
  vfloat s = r[0];
  for (int l = 1; l < kLanes; ++l) s += r[l];
  return s;
#endif
}

// out[4 j + i] = v[i][j] for i < 4, j < kLanes (four vectors interleaved, 4 kLanes floats).
inline void store_interleaved4(float* out, vfloat a, vfloat b, vfloat c, vfloat d) {
#if defined(PVKERNELS_SIMD_AVX512)
  // pairs, then pairs of pairs (64-bit elements), each a two-source permute
  const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i pair_hi = _mm512_add_epi32(pair_lo, _mm512_set1_epi32(8));
  const __m512i quad_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i quad_hi = _mm512_add_epi64(quad_lo, _mm512_set1_epi64(4));
  const __m512d ab0 = _mm512_castps_pd(_mm512_permutex2var_ps((__m512)a, pair_lo, (__m512)b));
  const __m512d ab1 = _mm512_castps_pd(_mm512_permutex2var_ps((__m512)a, pair_hi, (__m512)b));
  const __m512d cd0 = _mm512_castps_pd(_mm512_permutex2var_ps((__m512)c, pair_lo, (__m512)d));
  const __m512d cd1 = _mm512_castps_pd(_mm512_permutex2var_ps((__m512)c, pair_hi, (__m512)d));
  _mm512_storeu_pd(reinterpret_cast<double*>(out), _mm512_permutex2var_pd(ab0, quad_lo, cd0));
  _mm512_storeu_pd(reinterpret_cast<double*>(out + 16), _mm512_permutex2var_pd(ab0, quad_hi, cd0));
  _mm512_storeu_pd(reinterpret_cast<double*>(out + 32), _mm512_permutex2var_pd(ab1, quad_lo, cd1));
  _mm512_storeu_pd(reinterpret_cast<double*>(out + 48), _mm512_permutex2var_pd(ab1, quad_hi, cd1));
#elif defined(PVKERNELS_SIMD_AVX2)
  const __m256 ab0 = _mm256_unpacklo_ps((__m256)a, (__m256)b), ab1 = _mm256_unpackhi_ps((__m256)a, (__m256)b);
  const __m256 cd0 = _mm256_unpacklo_ps((__m256)c, (__m256)d), cd1 = _mm256_unpackhi_ps((__m256)c, (__m256)d);
  const __m256 q0 = _mm256_shuffle_ps(ab0, cd0, 0x44), q1 = _mm256_shuffle_ps(ab0, cd0, 0xEE);  // j = 0 | 4, 1 | 5
  const __m256 q2 = _mm256_shuffle_ps(ab1, cd1, 0x44), q3 = _mm256_shuffle_ps(ab1, cd1, 0xEE);  // j = 2 | 6, 3 | 7
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(q0, q1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(q2, q3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(q0, q1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(q2, q3, 0x31));
#else
  for (int j = 0; j < kLanes; ++j) {
    out[4 * j] = a[j], out[4 * j + 1] = b[j], out[4 * j + 2] = c[j], out[4 * j + 3] = d[j];
  }
#endif
}

}  // namespace simd
}  // namespace pvkernels
