// Factorised spatio-temporal attention on the CPU, reading (B, T, S, H, Dh) in place with any
// strides (q, k, v may be views of one packed projection). The kernels serve both axes: the
// tensor is seen as (b, a, n, h, d) with n the attended axis (T for temporal, S for spatial).
// - Short sequences (temporal T <= 32, spatial S <= 16): 16 (b, a, h) sequences side by side,
//   one per vector lane (lane_forward / lane_backward): no padded scores, a lane-wise softmax.
// - Longer ones: a (b, a) item's heads are staged in an fp32 scratch that stays in cache, the
//   scores are kept transposed (keys x queries) so that the fp32 softmax over keys is lane-wise
//   on 16 queries at once, then P V (forward_kernel / backward_kernel).
// Backwards recompute P from the saved log-sum-exp instead of storing it. GCC vector
// extensions (x86: AVX-512 exp, streaming stores).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace pvkernels {
namespace {

// Strides of a (B, T, S, H, Dh) tensor in (b, a, n, h, d) order.
struct View {
  int64_t sb, sa, sn, sh, sd;
};

View view_of(const at::Tensor& x, bool temporal) {
  if (temporal) return {x.stride(0), x.stride(2), x.stride(1), x.stride(3), x.stride(4)};
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
}

// lse (B, T, S, H) contiguous, seen in (b, a, n, h) order
View lse_view(const at::Tensor& lse, bool temporal) {
  return {lse.stride(0), temporal ? lse.stride(2) : lse.stride(1), temporal ? lse.stride(1) : lse.stride(2),
          lse.stride(3), 0};
}

// The operands of a forward / backward call: typed pointers and (b, a, n, h, d) strides.
template <typename T>
struct FwdOperands {
  const T *qp, *kp, *vp;
  T* op;
  float* lp;
  View qv, kv, vv, ov, lv;
};
template <typename T>
FwdOperands<T> fwd_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                            at::Tensor& lse, bool temporal) {
  return {q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
          lse.mutable_data_ptr<float>(), view_of(q, temporal), view_of(k, temporal), view_of(v, temporal),
          view_of(out, temporal), lse_view(lse, temporal)};
}
template <typename T>
struct BwdOperands {
  const T *gp, *qp, *kp, *vp;
  const float* lp;
  T *dqp, *dkp, *dvp;
  View gv, qv, kv, vv, lv, dqv, dkv, dvv;
};
template <typename T>
BwdOperands<T> bwd_operands(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, bool temporal) {
  return {grad_out.const_data_ptr<T>(), q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
          lse.const_data_ptr<float>(), dq.mutable_data_ptr<T>(), dk.mutable_data_ptr<T>(), dv.mutable_data_ptr<T>(),
          view_of(grad_out, temporal), view_of(q, temporal), view_of(k, temporal), view_of(v, temporal),
          lse_view(lse, temporal), view_of(dq, temporal), view_of(dk, temporal), view_of(dv, temporal)};
}

struct Sizes {
  int64_t B, A, N, H, D, Np;  // Np: N rounded up to 16 floats (rows of the transposed scratch)
};

Sizes sizes_of(const at::Tensor& q, bool temporal) {
  Sizes z;
  z.B = q.size(0);
  z.A = temporal ? q.size(2) : q.size(1);
  z.N = temporal ? q.size(1) : q.size(2);
  z.H = q.size(3);
  z.D = q.size(4);
  z.Np = (z.N + 15) / 16 * 16;
  return z;
}

// 16 fp32 lanes (one AVX-512 register; GCC splits it on narrower machines). Scratch rows are
// padded to a multiple of 16 with zeros so every inner loop runs whole vectors.
constexpr int64_t W = 16;
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

// float-typed unaligned access: unlike memcpy (a char access, which may alias anything) it lets
// the compiler keep sizes and flags in registers across stores
typedef float v16u __attribute__((vector_size(64), aligned(4)));
inline v16 vload(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void vstore(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
inline v16 splat(float f) { return v16{} + f; }
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
inline v16i lane_index(int64_t base) {
  v16i idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return idx + static_cast<int32_t>(base);
}

// exp(x) on 16 lanes (std::exp is a scalar libm call): 2^n * e^r with |r| <= ln2/2 (Cody-Waite
// reduction) and e^r by its Taylor polynomial to degree 6 (relative error < 2e-7, ~2 ulp);
// e^0 == 1 exactly, so a one-key (first causal) row is exact. With AVX-512 the clamp, the
// rounding and the 2^n scaling are one instruction each (vmaxps, vrndscaleps, vscalefps): the
// softmax's exps are a fifth of a long row's time (S = 256: 64K per head).
inline v16 vexp(v16 x) {
#ifdef __AVX512F__
  // -inf (masked lanes) -> ~6e-39, callers zero those lanes; NaN stays NaN (vmaxps returns its
  // second operand when either is NaN); large x overflow to +inf in vscalefps, as expf does
  x = (v16)_mm512_max_ps((__m512)splat(-88.0f), (__m512)x);
  const v16 n = (v16)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT);
#else
  x = x < -88.0f ? splat(-88.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
#endif
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  v16 y = splat(1.0f / 720);
  y = y * r + 1.0f / 120;
  y = y * r + 1.0f / 24;
  y = y * r + 1.0f / 6;
  y = y * r + 0.5f;
  y = y * r + 1.0f;
  y = y * r + 1.0f;
#ifdef __AVX512F__
  return (v16)_mm512_scalef_ps((__m512)y, (__m512)n);
#else
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  return y * reinterpret_cast<const v16&>(bits);
#endif
}

// In-register 16 x 16 transpose: four butterfly stages swapping the off-diagonal s x s blocks
// (s = 8, 4, 2, 1), each one two-source permute per row pair.
template <int s>
inline void transpose_stage(v16* r) {
  constexpr v16i lo = {0 & s ? 16 + 0 - s : 0,    1 & s ? 16 + 1 - s : 1,    2 & s ? 16 + 2 - s : 2,
                       3 & s ? 16 + 3 - s : 3,    4 & s ? 16 + 4 - s : 4,    5 & s ? 16 + 5 - s : 5,
                       6 & s ? 16 + 6 - s : 6,    7 & s ? 16 + 7 - s : 7,    8 & s ? 16 + 8 - s : 8,
                       9 & s ? 16 + 9 - s : 9,    10 & s ? 16 + 10 - s : 10, 11 & s ? 16 + 11 - s : 11,
                       12 & s ? 16 + 12 - s : 12, 13 & s ? 16 + 13 - s : 13, 14 & s ? 16 + 14 - s : 14,
                       15 & s ? 16 + 15 - s : 15};
  constexpr v16i hi = {0 & s ? 16 + 0 : 0 + s,    1 & s ? 16 + 1 : 1 + s,    2 & s ? 16 + 2 : 2 + s,
                       3 & s ? 16 + 3 : 3 + s,    4 & s ? 16 + 4 : 4 + s,    5 & s ? 16 + 5 : 5 + s,
                       6 & s ? 16 + 6 : 6 + s,    7 & s ? 16 + 7 : 7 + s,    8 & s ? 16 + 8 : 8 + s,
                       9 & s ? 16 + 9 : 9 + s,    10 & s ? 16 + 10 : 10 + s, 11 & s ? 16 + 11 : 11 + s,
                       12 & s ? 16 + 12 : 12 + s, 13 & s ? 16 + 13 : 13 + s, 14 & s ? 16 + 14 : 14 + s,
                       15 & s ? 16 + 15 : 15 + s};
  for (int i = 0; i < W; ++i) {
    if (i & s) continue;
    const v16 a = r[i], b = r[i + s];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + s] = __builtin_shuffle(a, b, hi);
  }
}
inline void transpose16(v16* r) {
  transpose_stage<8>(r);
  transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (both multiples of 16)
void transpose_tiles(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  v16 t[W];
  for (int64_t r0 = 0; r0 < rows; r0 += W) {
    for (int64_t c0 = 0; c0 < cols; c0 += W) {
      for (int i = 0; i < W; ++i) t[i] = vload(src + (r0 + i) * lds + c0);
      transpose16(t);
      for (int i = 0; i < W; ++i) vstore(dst + (c0 + i) * ldd + r0, t[i]);
    }
  }
}

// S[i, :] = A[i, :D] . Bt[:D, :] for rows i < n_rows (a multiple of 8) and the first `cols`
// columns (a multiple of 16) of Bt (row stride ldb) and S (row stride Np), eight rows at a time
// so each loaded vector of Bt feeds eight independent FMA chains. upper: only the column chunks
// from the rows' own on (S^T of a causal score matrix: key j sees queries i >= j), where the
// columns start at chunk `chunk0` of the whole matrix. add (row stride add_ld): a matrix added to
// S as it is stored (the bias); colmax: the running max of each column chunk over the stored
// rows < n_valid (the softmax's max pass, fused).
void rows_dot_cols(const float* A, int64_t lda, const float* Bt, int64_t ldb, float* S, int64_t Np, int64_t cols,
                   int64_t n_rows, int64_t D, bool upper, int64_t chunk0 = 0, const float* add = nullptr,
                   int64_t add_ld = 0, v16* colmax = nullptr, int64_t n_valid = 0) {
  constexpr int R = 8;
  // stores the rows i0.. of column chunk c, then folds their max (in registers) into colmax
  auto put = [&](int64_t i0, int64_t c, const v16* rows) {
    v16 m = splat(-std::numeric_limits<float>::infinity());
    for (int r = 0; r < R; ++r) {
      v16 x = rows[r];
      if (add != nullptr) x += vload(add + (i0 + r) * add_ld + c * W);
      vstore(S + (i0 + r) * Np + c * W, x);
      if (i0 + r < n_valid) m = vmax(m, x);
    }
    if (colmax != nullptr) colmax[c] = vmax(colmax[c], m);
  };
  for (int64_t i0 = 0; i0 < n_rows; i0 += R) {
    const float* a = A + i0 * lda;
    int64_t c = upper ? std::max<int64_t>(0, i0 / W - chunk0) : 0;
    // two column chunks at a time: 16 accumulators, 10 loads per 16 FMAs
    for (; c + 2 <= cols / W; c += 2) {
      v16 acc0[R] = {}, acc1[R] = {};
      const float* bt = Bt + c * W;
      for (int64_t d = 0; d < D; ++d) {
        const v16 b0 = vload(bt + d * ldb), b1 = vload(bt + d * ldb + W);
        for (int r = 0; r < R; ++r) {
          const float x = a[r * lda + d];
          acc0[r] += x * b0;
          acc1[r] += x * b1;
        }
      }
      put(i0, c, acc0);
      put(i0, c + 1, acc1);
    }
    for (; c < cols / W; ++c) {
      v16 acc[R] = {};
      const float* bt = Bt + c * W;
      for (int64_t d = 0; d < D; ++d) {
        const v16 b0 = vload(bt + d * ldb);
        for (int r = 0; r < R; ++r) acc[r] += a[r * lda + d] * b0;
      }
      put(i0, c, acc);
    }
  }
}

// O[i, :] = sum_j P(i, j) M[j, :] (M is Np x DC*16) for rows i < n_rows.
// COLUMN: P is stored transposed (P(i, j) = P[j * Np + i], the four rows' entries adjacent).
// mode 0: j < N; mode 1 (causal P): j < min(row0 + i0 + R, N); mode 2 (P^T of a causal P):
// i0 <= j < N. row0: the index of row 0 in the whole matrix (a block of query rows).
template <int DC, bool COLUMN>
void rows_times_mat(const float* P, int64_t Np, const float* M, float* O, int64_t n_rows, int64_t N, int mode,
                    const float* row_scale, int64_t row0) {
  constexpr int64_t Dp = DC * W;
  // 8 rows per block for narrow heads (16 accumulators), 4 for wide ones (register budget);
  // rows past n_rows (< Np, zero padded) are computed and ignored
  constexpr int R = DC <= 2 ? 8 : 4;
  for (int64_t i0 = 0; i0 < n_rows; i0 += R) {
    const int64_t lo = mode == 2 ? i0 : 0;
    const int64_t hi = mode == 1 ? std::min(row0 + i0 + R, N) : N;
    v16 acc[R][DC] = {};
    for (int64_t j = lo; j < hi; ++j) {
      float p[R];
      for (int r = 0; r < R; ++r) p[r] = COLUMN ? P[j * Np + i0 + r] : P[(i0 + r) * Np + j];
      const float* m = M + j * Dp;
      for (int dc = 0; dc < DC; ++dc) {
        const v16 mv = vload(m + dc * W);
        for (int r = 0; r < R; ++r) acc[r][dc] += p[r] * mv;
      }
    }
    for (int r = 0; r < R; ++r) {
      const float f = row_scale != nullptr ? row_scale[i0 + r] : 1.0f;
      for (int dc = 0; dc < DC; ++dc) vstore(O + (i0 + r) * Dp + dc * W, acc[r][dc] * f);
    }
  }
}

using RowsTimesMat = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, int, const float*,
                              int64_t);
template <bool COLUMN>
RowsTimesMat rows_times_mat_for(int64_t Dp) {
  static const RowsTimesMat table[] = {rows_times_mat<1, COLUMN>, rows_times_mat<2, COLUMN>,
                                       rows_times_mat<3, COLUMN>, rows_times_mat<4, COLUMN>,
                                       rows_times_mat<5, COLUMN>, rows_times_mat<6, COLUMN>,
                                       rows_times_mat<7, COLUMN>, rows_times_mat<8, COLUMN>};
  return table[Dp / W - 1];
}

inline v16 bitcast_f(v16i x) { return reinterpret_cast<const v16&>(x); }
inline v16i bitcast_i(v16 x) { return reinterpret_cast<const v16i&>(x); }

// log(x) on 16 lanes, x > 0 normal (Cephes logf, ~1 ulp): the log-sum-exp of 16 queries at once.
inline v16 vlog(v16 x) {
  const v16i xi = bitcast_i(x);
  v16i e = ((xi >> 23) & 0xff) - 126;
  v16 m = bitcast_f((xi & 0x807fffff) | 0x3f000000);  // [0.5, 1)
  const v16i small = m < 0.70710678118654752f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const v16 z = m * m;
  v16 y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const v16 fe = __builtin_convertvector(e, v16);
  y += fe * -2.12194440e-4f;
  y += z * -0.5f;
  return m + y + fe * 0.693359375f;
}

struct Padded {
  int64_t N8, Np, Dp;  // rows rounded to 8, keys to 16, head dim to 16
};
Padded padded(const Sizes& z) { return {(z.N + 7) / 8 * 8, z.Np, (z.D + W - 1) / W * W}; }

// bias^T as fp32 (H, N keys, Np queries), zero padded: added to S^T 16 queries at a time
at::Tensor padded_bias(const at::Tensor& bias) {
  const int64_t H = bias.size(0), N = bias.size(1);
  at::Tensor out = at::zeros({H, N, (N + W - 1) / W * W}, bias.options().dtype(at::kFloat));
  out.narrow(2, 0, N).copy_(bias.transpose(1, 2));
  return out;
}

// Outputs past this size are written with non-temporal stores: they would not stay in L2
// anyway, and streaming skips reading each line before it is overwritten.
constexpr int64_t kStreamBytes = 4 << 20;
bool streamed(const at::Tensor& out) { return out.numel() * out.element_size() >= kStreamBytes; }
inline void store_line(float* dst, v16 x, bool stream) {
#ifdef __AVX512F__
  if (stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    _mm512_stream_ps(dst, (__m512)x);
    return;
  }
#endif
  vstore(dst, x);
}
inline void store_fence() {  // order the streaming stores before the kernel returns
#ifdef __AVX512F__
  _mm_sfence();
#endif
}

// 16 consecutive elements of a float32 / bfloat16 / float16 row <-> 16 fp32 lanes, vectorised
// (an element-wise static_cast is a scalar loop: bf16 inputs ran 2.7x slower than fp32 on it).
// Conversions to 16 bits round to nearest even, as c10::BFloat16 / c10::Half do.
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t v16w __attribute__((vector_size(64)));  // unsigned: logical shifts
inline v16 load16(const float* p) { return vload(p); }
inline v16 load16(const c10::BFloat16* p) {
  return bitcast_f(__builtin_convertvector(*reinterpret_cast<const u16x16*>(p), v16i) << 16);
}
inline v16 load16(const c10::Half* p) {
#ifdef __AVX512F__
  return (v16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  v16 r;
  for (int i = 0; i < W; ++i) r[i] = static_cast<float>(p[i]);
  return r;
#endif
}
// stream: a non-temporal store for float32 rows of large outputs (see store_line)
inline void store16(float* p, v16 x, bool stream) { store_line(p, x, stream); }
inline void store16(c10::BFloat16* p, v16 x, bool) {
  const v16w bits = reinterpret_cast<const v16w&>(x);
  v16w r = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  r = x != x ? v16w{} + 0x7fc0u : r;  // NaN -> the quiet NaN c10 uses
  *reinterpret_cast<u16x16*>(p) = __builtin_convertvector(r, u16x16);
}
inline void store16(c10::Half* p, v16 x, bool) {
#ifdef __AVX512F__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < W; ++i) p[i] = static_cast<c10::Half>(x[i]);
#endif
}

// A group of heads of one (b, a) item is staged as [head][row][Dp] fp32. Rows are copied in
// address order (row, then head): for the common layouts (contiguous, packed qkv) that is one
// H * Dh run per row, which the hardware prefetcher streams, instead of H scattered 2-line
// reads per row (temporal rows lie S * H * Dh elements apart).
template <typename T>
void load_group(const T* base, const View& v, int64_t N, int64_t G, int64_t D, int64_t Np, int64_t Dp, float scale,
                float* dst) {
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < G; ++h) {
      const T* row = base + n * v.sn + h * v.sh;
      float* out = dst + (h * Np + n) * Dp;
      if (v.sd == 1 && D % W == 0) {
        for (int64_t d = 0; d < D; d += W) vstore(out + d, load16(row + d) * scale);
      } else if (v.sd == 1) {
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d]) * scale;
      } else {
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d * v.sd]) * scale;
      }
    }
  }
}

template <typename T>
void store_group(const float* src, int64_t N, int64_t G, int64_t D, int64_t Np, int64_t Dp, float scale, T* base,
                 const View& v, bool stream) {
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < G; ++h) {
      T* row = base + n * v.sn + h * v.sh;
      const float* in = src + (h * Np + n) * Dp;
      if (v.sd == 1 && D % W == 0) {
        for (int64_t d = 0; d < D; d += W) store16(row + d, vload(in + d) * scale, stream);
      } else if (v.sd == 1) {
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(in[d] * scale);
      } else {
        for (int64_t d = 0; d < D; ++d) row[d * v.sd] = static_cast<T>(in[d] * scale);
      }
    }
  }
}

// 64-byte aligned start inside a buffer allocated W floats longer: whole-line vector access
float* aligned(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63));
}

// heads per group: the staged tensors of a group stay within ~budget floats (L2-sized)
int64_t heads_per_group(int64_t H, int64_t per_head, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(H, budget / per_head));
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, at::Tensor& out,
                    at::Tensor& lse, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const Padded pd = padded(z);
  const auto [qp, kp, vp, op, lp, qv, kv, vv, ov, lv] = fwd_operands<T>(q, k, v, out, lse, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t N = z.N, D = z.D, Np = pd.Np, Dp = pd.Dp, N8 = pd.N8, H = z.H;
  const int64_t per_head = Np * Dp;
  const int64_t G = heads_per_group(H, per_head, 65536);
  const RowsTimesMat pv = rows_times_mat_for<true>(Dp);
  const bool stream = streamed(out);
  constexpr int64_t QB = 32;  // queries per block: N keys x 32 scores are 32 KB at N = 256
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(4 * G * per_head + per_head + Np * QB + Np + W, 0.0f);
    float* Qg = aligned(ws.data());    // G x Np x Dp, pre-scaled by 1/sqrt(Dh)
    float* Kg = Qg + G * per_head;     // G x Np x Dp
    float* Vg = Kg + G * per_head;     // G x Np x Dp
    float* Og = Vg + G * per_head;     // G x Np x Dp
    float* Qt = Og + G * per_head;     // Dp x Np
    float* Pt = Qt + per_head;         // Np x QB: a block's scores, then probabilities, transposed [key][query]
    float* rinv = Pt + Np * QB;        // Np: 1 / softmax denominators
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / z.A, a = item % z.A;
      for (int64_t h0 = 0; h0 < H; h0 += G) {
        const int64_t g = std::min(G, H - h0);
        load_group(qp + b * qv.sb + a * qv.sa + h0 * qv.sh, qv, N, g, D, Np, Dp, scale, Qg);
        load_group(kp + b * kv.sb + a * kv.sa + h0 * kv.sh, kv, N, g, D, Np, Dp, 1.0f, Kg);
        load_group(vp + b * vv.sb + a * vv.sa + h0 * vv.sh, vv, N, g, D, Np, Dp, 1.0f, Vg);
        for (int64_t hh = 0; hh < g; ++hh) {
          const int64_t h = h0 + hh;
          // S^T[j][i] = k_j . q_i: with keys as rows, a 16-lane vector holds 16 queries, so the
          // softmax over keys is lane-wise (no horizontal max / sum per query)
          transpose_tiles(Qg + hh * per_head, Dp, Qt, Np, Np, Dp);
          float* lbase = lp + b * lv.sb + a * lv.sa + h * lv.sh;
          const float* bias_h = bias != nullptr ? bias + h * N * Np : nullptr;  // transposed [j][i]
          // blocks of QB queries: the block's scores (N keys x QB) stay in L1 through the
          // softmax and the P V product
          for (int64_t c0 = 0; c0 < Np; c0 += QB) {
            const int64_t qb = std::min(QB, Np - c0);
            const int64_t keys = causal ? std::min(N8, (c0 + qb + 7) / 8 * 8) : N8;  // causal: keys <= queries
            v16 colmax[QB / W];
            for (v16& m : colmax) m = splat(-std::numeric_limits<float>::infinity());
            if (causal) {
              rows_dot_cols(Kg + hh * per_head, Dp, Qt + c0, Np, Pt, QB, qb, keys, D, true, c0 / W);
            } else {  // the bias added and the max taken as the scores are stored
              rows_dot_cols(Kg + hh * per_head, Dp, Qt + c0, Np, Pt, QB, qb, keys, D, false, c0 / W,
                            bias_h != nullptr ? bias_h + c0 : nullptr, Np, colmax, N);
            }
            for (int64_t c = c0 / W; c < (c0 + qb) / W; ++c) {
              const int64_t jmax = causal ? std::min(N, (c + 1) * W) : N;
              const v16i lanes = lane_index(c * W);
              v16 m = colmax[c - c0 / W];
              for (int64_t j = 0; causal && j < jmax; ++j) {  // causal: the max over the unmasked keys
                float* col = Pt + j * QB + c * W - c0;
                v16 x = vload(col);
                if (bias_h != nullptr) {
                  x += vload(bias_h + j * Np + c * W);
                  vstore(col, x);
                }
                x = lanes >= static_cast<int32_t>(j) ? x : splat(-std::numeric_limits<float>::infinity());
                m = vmax(m, x);
              }
              v16 l = {};
              for (int64_t j = 0; j < jmax; ++j) {
                float* col = Pt + j * QB + c * W - c0;
                v16 p = vexp(vload(col) - m);
                // masked lanes: exp(-inf - m) is clamped to ~1e-38, so zero them exactly
                if (causal) p = lanes >= static_cast<int32_t>(j) ? p : v16{};
                vstore(col, p);
                l += p;
              }
              vstore(rinv + c * W, 1.0f / l);  // P is normalised on O's rows, in the P V product
              const v16 lse_c = m + vlog(l);
              for (int64_t i = c * W; i < std::min(N, (c + 1) * W); ++i) lbase[i * lv.sn] = lse_c[i - c * W];
            }
            pv(Pt, QB, Vg + hh * per_head, Og + hh * per_head + c0 * Dp, qb, N, causal ? 1 : 0, rinv + c0, c0);
          }
        }
        store_group(Og, N, g, D, Np, Dp, 1.0f, op + b * ov.sb + a * ov.sa + h0 * ov.sh, ov, stream);
      }
    }
    store_fence();
  });
}

template <typename T>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const float* bias, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     float* dbias_acc, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const Padded pd = padded(z);
  const auto [gp, qp, kp, vp, lp, dqp, dkp, dvp, gv, qv, kv, vv, lv, dqv, dkv, dvv] =
      bwd_operands<T>(grad_out, q, k, v, lse, dq, dk, dv, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t N = z.N, D = z.D, Np = pd.Np, Dp = pd.Dp, N8 = pd.N8, H = z.H;
  const int64_t per_head = Np * Dp;
  const int64_t G = heads_per_group(H, per_head, 8192);
  const RowsTimesMat mm_col = rows_times_mat_for<true>(Dp);
  const RowsTimesMat mm_row = rows_times_mat_for<false>(Dp);
  const bool stream = streamed(dq);
  const int64_t n_chunks = (N + W - 1) / W;
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    // dbias^T (H x N x Np) is accumulated per thread (summed by the caller): no atomics
    float* dbias_t = dbias_acc != nullptr ? dbias_acc + at::get_thread_num() * H * N * Np : nullptr;
    std::vector<float> ws(7 * G * per_head + 2 * per_head + 2 * Np * Np + W, 0.0f);
    float* Qg = aligned(ws.data());           // pre-scaled: S = Q K^T and dK = dS^T Q
    float* Kg = Qg + G * per_head;
    float* Vg = Kg + G * per_head;
    float* Gg = Vg + G * per_head;   // upstream gradient
    float* dQg = Gg + G * per_head;
    float* dKg = dQg + G * per_head;
    float* dVg = dKg + G * per_head;
    float* Qt = dVg + G * per_head;  // Dp x Np
    float* Gt = Qt + per_head;       // Dp x Np
    float* Pt = Gt + per_head;       // Np x Np, [key][query]
    float* dSt = Pt + Np * Np;       // Np x Np, dP^T then dS^T
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / z.A, a = item % z.A;
      for (int64_t h0 = 0; h0 < H; h0 += G) {
        const int64_t g = std::min(G, H - h0);
        load_group(qp + b * qv.sb + a * qv.sa + h0 * qv.sh, qv, N, g, D, Np, Dp, scale, Qg);
        load_group(kp + b * kv.sb + a * kv.sa + h0 * kv.sh, kv, N, g, D, Np, Dp, 1.0f, Kg);
        load_group(vp + b * vv.sb + a * vv.sa + h0 * vv.sh, vv, N, g, D, Np, Dp, 1.0f, Vg);
        load_group(gp + b * gv.sb + a * gv.sa + h0 * gv.sh, gv, N, g, D, Np, Dp, 1.0f, Gg);
        for (int64_t hh = 0; hh < g; ++hh) {
          const int64_t h = h0 + hh;
          const float* Q = Qg + hh * per_head;
          const float* Gh = Gg + hh * per_head;
          transpose_tiles(Q, Dp, Qt, Np, Np, Dp);
          transpose_tiles(Gh, Dp, Gt, Np, Np, Dp);
          rows_dot_cols(Kg + hh * per_head, Dp, Qt, Np, Pt, Np, Np, N8, D, causal);   // S^T
          rows_dot_cols(Vg + hh * per_head, Dp, Gt, Np, dSt, Np, Np, N8, D, causal);  // dP^T = V dO^T
          const float* lbase = lp + b * lv.sb + a * lv.sa + h * lv.sh;
          const float* bias_h = bias != nullptr ? bias + h * N * Np : nullptr;
          float* dbias_h = dbias_t != nullptr ? dbias_t + h * N * Np : nullptr;
          for (int64_t c = 0; c < n_chunks; ++c) {
            const int64_t jmax = causal ? std::min(N, (c + 1) * W) : N;
            const v16i lanes = lane_index(c * W);
            v16 lse_c = {};
            for (int64_t i = c * W; i < std::min(N, (c + 1) * W); ++i) lse_c[i - c * W] = lbase[i * lv.sn];
            v16 delta = {};
            for (int64_t j = 0; j < jmax; ++j) {
              float* col = Pt + j * Np + c * W;
              v16 x = vload(col);
              if (bias_h != nullptr) x += vload(bias_h + j * Np + c * W);
              v16 p = vexp(x - lse_c);
              if (causal) p = lanes >= static_cast<int32_t>(j) ? p : v16{};
              p = lanes < static_cast<int32_t>(N) ? p : v16{};  // padded queries
              vstore(col, p);
              delta += p * vload(dSt + j * Np + c * W);
            }
            // delta_i = rowsum(P * dP) == dO_i . O_i, lane-wise
            for (int64_t j = 0; j < jmax; ++j) {
              float* dcol = dSt + j * Np + c * W;
              const v16 ds = vload(Pt + j * Np + c * W) * (vload(dcol) - delta);
              vstore(dcol, ds);
              if (dbias_h != nullptr) vstore(dbias_h + j * Np + c * W, vload(dbias_h + j * Np + c * W) + ds);
            }
          }
          mm_col(dSt, Np, Kg + hh * per_head, dQg + hh * per_head, N8, N, causal ? 1 : 0, nullptr, 0);  // dQ = dS K
          mm_row(Pt, Np, Gh, dVg + hh * per_head, N8, N, causal ? 2 : 0, nullptr, 0);   // dV = P^T dO
          mm_row(dSt, Np, Q, dKg + hh * per_head, N8, N, causal ? 2 : 0, nullptr, 0);   // dK = dS^T Q
        }
        store_group(dQg, N, g, D, Np, Dp, scale, dqp + b * dqv.sb + a * dqv.sa + h0 * dqv.sh, dqv, stream);
        store_group(dKg, N, g, D, Np, Dp, 1.0f, dkp + b * dkv.sb + a * dkv.sa + h0 * dkv.sh, dkv, stream);
        store_group(dVg, N, g, D, Np, Dp, 1.0f, dvp + b * dvv.sb + a * dvv.sa + h0 * dvv.sh, dvv, stream);
      }
    }
    store_fence();
  });
}

// ---- Short sequences: 16 sequences side by side, one per vector lane ----------------------
// For short sequences (temporal attention over T = 4..32 frames) the blocked kernels above pad
// every score row to 16 queries (T = 18 computes 32). Here a work unit is 16 consecutive
// (b, a, h) sequences, one per lane: consecutive heads of one item first, whose rows are
// adjacent in memory, so the unit reads whole (H * Dh) rows like the blocked kernels do. The
// staged tensors are [row][d][lane] and every score, exp and FMA is lane-wise on 16
// independent sequences: nothing is padded but the rows to a multiple of 4 and the last
// unit's idle lanes, and the softmax needs no horizontal reductions.
// Where it pays, measured at 8 heads, Dh 32 and 64: temporal attention up to T = 32 (1.4x at
// T = 8, 1.5x at T = 18, even at T = 48, 0.9x at T = 64), spatial up to S = 16 (1.35x at S = 8,
// even at 32, 0.9x at 64): spatially an item's rows are adjacent and the blocked kernels stage
// them cheaply.
bool short_sequences(int64_t N, bool temporal) { return N <= (temporal ? 32 : 16); }

struct LaneSizes {
  int64_t seqs, units, N, N4, D, Dq, H;
};
LaneSizes lane_sizes(const Sizes& z) {
  const int64_t seqs = z.B * z.A * z.H;
  return {seqs, (seqs + W - 1) / W, z.N, (z.N + 3) / 4 * 4, z.D, (z.D + 3) / 4 * 4, z.H};
}

// Per-lane element offsets of the 16 sequences of `unit` in a tensor seen through `v` (whose
// sd field is unused for lse); -1 marks an idle lane. phase: the head of lane 0 (lane l holds
// head (phase + l) % H).
struct Lanes {
  int64_t off[W];
  int64_t phase;
  bool full;
};
Lanes lanes_of(int64_t unit, const LaneSizes& s, int64_t A, const View& v) {
  Lanes ln;
  ln.full = (unit + 1) * W <= s.seqs;
  ln.phase = unit * W % s.H;
  for (int64_t l = 0; l < W; ++l) {
    const int64_t seq = unit * W + l, item = seq / s.H, h = seq % s.H;
    ln.off[l] = seq < s.seqs ? item / A * v.sb + item % A * v.sa + h * v.sh : -1;
  }
  return ln;
}

// dst[n][d][lane] = scale * x[lane's sequence, row n, d] for n < N, d < D; the other entries
// are left as they are (zero from the workspace's allocation).
template <typename T>
void gather_lanes(const T* base, const View& v, const Lanes& ln, int64_t N, int64_t D, int64_t Dq, float scale,
                  float* dst) {
  if (v.sd == 1 && D % W == 0 && ln.full) {
    v16 r[W];
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t d0 = 0; d0 < D; d0 += W) {
        for (int64_t l = 0; l < W; ++l) r[l] = load16(base + ln.off[l] + n * v.sn + d0);
        transpose16(r);
        for (int64_t k = 0; k < W; ++k) vstore(dst + (n * Dq + d0 + k) * W, r[k] * scale);
      }
    }
    return;
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < W; ++l) {
      const T* row = ln.off[l] >= 0 ? base + ln.off[l] + n * v.sn : nullptr;
      for (int64_t d = 0; d < D; ++d) dst[(n * Dq + d) * W + l] = row ? static_cast<float>(row[d * v.sd]) * scale : 0.f;
    }
  }
}

// stream: write whole aligned lines with non-temporal stores (large outputs: skips reading each
// line into the cache before overwriting it, a third of the kernel's memory traffic)
template <typename T>
void scatter_lanes(const float* src, int64_t N, int64_t D, int64_t Dq, float scale, T* base, const View& v,
                   const Lanes& ln, bool stream) {
  if (v.sd == 1 && D % W == 0 && ln.full) {
    v16 r[W];
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t d0 = 0; d0 < D; d0 += W) {
        for (int64_t k = 0; k < W; ++k) r[k] = vload(src + (n * Dq + d0 + k) * W) * scale;
        transpose16(r);
        for (int64_t l = 0; l < W; ++l) store16(base + ln.off[l] + n * v.sn + d0, r[l], stream);
      }
    }
    return;
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < W; ++l) {
      if (ln.off[l] < 0) continue;
      T* row = base + ln.off[l] + n * v.sn;
      for (int64_t d = 0; d < D; ++d) row[d * v.sd] = static_cast<T>(src[(n * Dq + d) * W + l] * scale);
    }
  }
}

// S[i][j] = sum_d A[i][d] B[j][d] on each lane, in 4 x 4 blocks (8 loads per 16 FMAs).
// A, B: [N4][Dq][W]; S: [N4][N4][W]. causal: only blocks that hold some j <= i.
void lane_dot(const float* A, const float* B, float* S, int64_t N4, int64_t Dq, bool causal) {
  const int64_t rs = Dq * W;
  for (int64_t i0 = 0; i0 < N4; i0 += 4) {
    for (int64_t j0 = 0; j0 < (causal ? i0 + 4 : N4); j0 += 4) {
      v16 acc[4][4] = {};
      for (int64_t d = 0; d < Dq; ++d) {
        v16 a[4], b[4];
        for (int r = 0; r < 4; ++r) a[r] = vload(A + (i0 + r) * rs + d * W);
        for (int c = 0; c < 4; ++c) b[c] = vload(B + (j0 + c) * rs + d * W);
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * b[c];
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) vstore(S + ((i0 + r) * N4 + j0 + c) * W, acc[r][c]);
    }
  }
}

// O[i][d] = row_scale[i] * sum_j P(i, j) M[j][d] on each lane, in 4 x 4 blocks; P(i, j) is
// P[i][j], or P[j][i] when TRANS. P: [N4][N4][W] with zeros outside the valid entries;
// causal: P(i, j) == 0 for j > i (plain) or j < i (TRANS), and those j are skipped.
template <bool TRANS>
void lane_mm(const float* P, const float* M, float* O, int64_t N4, int64_t Dq, bool causal, const float* row_scale) {
  for (int64_t i0 = 0; i0 < N4; i0 += 4) {
    const int64_t lo = TRANS && causal ? i0 : 0;
    const int64_t hi = !TRANS && causal ? i0 + 4 : N4;
    for (int64_t d0 = 0; d0 < Dq; d0 += 4) {
      v16 acc[4][4] = {};
      for (int64_t j = lo; j < hi; ++j) {
        v16 p[4], m[4];
        for (int r = 0; r < 4; ++r) p[r] = vload(P + (TRANS ? j * N4 + i0 + r : (i0 + r) * N4 + j) * W);
        for (int c = 0; c < 4; ++c) m[c] = vload(M + (j * Dq + d0 + c) * W);
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) acc[r][c] += p[r] * m[c];
      }
      for (int r = 0; r < 4; ++r) {
        const v16 f = row_scale != nullptr ? vload(row_scale + (i0 + r) * W) : splat(1.0f);
        for (int c = 0; c < 4; ++c) vstore(O + ((i0 + r) * Dq + d0 + c) * W, acc[r][c] * f);
      }
    }
  }
}


// The (H, N, N) bias per lane: [phase][i][j][lane] = bias[(phase + lane) % H][i][j] (a unit's
// lanes hold heads phase, phase + 1, ...; there are at most H distinct phases).
at::Tensor lane_heads(int64_t H) {  // [phase * W + lane] -> head
  at::Tensor heads = at::empty({H * W}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = heads.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < H * W; ++i) p[i] = (i / W + i % W) % H;
  return heads;
}
at::Tensor lane_bias(const at::Tensor& bias) {
  const int64_t H = bias.size(0), N = bias.size(1);
  return bias.to(at::kFloat).index_select(0, lane_heads(H)).view({H, W, N, N}).permute({0, 2, 3, 1}).contiguous();
}

// bias: lane_bias(...) or nullptr
template <typename T>
void lane_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, at::Tensor& out,
                  at::Tensor& lse, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const LaneSizes s = lane_sizes(z);
  const auto [qp, kp, vp, op, lp, qv, kv, vv, ov, lv] = fwd_operands<T>(q, k, v, out, lse, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t N = s.N, N4 = s.N4, D = s.D, Dq = s.Dq, tile = N4 * Dq * W;
  const bool stream = streamed(out);
  at::parallel_for(0, s.units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(4 * tile + N4 * N4 * W + N4 * W + W, 0.0f);
    float* Q = aligned(ws.data());  // [N4][Dq][W], pre-scaled by 1/sqrt(Dh)
    float* K = Q + tile;
    float* V = K + tile;
    float* O = V + tile;
    float* P = O + tile;            // [N4][N4][W]: scores, then unnormalised probabilities
    float* rinv = P + N4 * N4 * W;  // [N4][W]
    for (int64_t unit = begin; unit < end; ++unit) {
      gather_lanes(qp, qv, lanes_of(unit, s, z.A, qv), N, D, Dq, scale, Q);
      gather_lanes(kp, kv, lanes_of(unit, s, z.A, kv), N, D, Dq, 1.0f, K);
      gather_lanes(vp, vv, lanes_of(unit, s, z.A, vv), N, D, Dq, 1.0f, V);
      lane_dot(Q, K, P, N4, Dq, causal);
      const Lanes ll = lanes_of(unit, s, z.A, lv);
      const float* bias_u = bias != nullptr ? bias + ll.phase * N * N * W : nullptr;
      for (int64_t i = 0; i < N; ++i) {
        float* row = P + i * N4 * W;
        const int64_t jmax = causal ? i + 1 : N;
        v16 m = splat(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < jmax; ++j) {
          v16 x = vload(row + j * W);
          if (bias_u != nullptr) x += vload(bias_u + (i * N + j) * W);
          vstore(row + j * W, x);
          m = vmax(m, x);
        }
        v16 l = {};
        for (int64_t j = 0; j < jmax; ++j) {
          const v16 p = vexp(vload(row + j * W) - m);
          vstore(row + j * W, p);
          l += p;
        }
        for (int64_t j = jmax; j < N4; ++j) vstore(row + j * W, v16{});
        vstore(rinv + i * W, 1.0f / l);
        const v16 lse_i = m + vlog(l);
        for (int64_t ln = 0; ln < W; ++ln)
          if (ll.off[ln] >= 0) lp[ll.off[ln] + i * lv.sn] = lse_i[ln];
      }
      lane_mm<false>(P, V, O, N4, Dq, causal, rinv);
      scatter_lanes(O, N, D, Dq, 1.0f, op, ov, lanes_of(unit, s, z.A, ov), stream);
    }
    store_fence();
  });
}

// dbias_acc: per thread [phase][N][N][W] lane-wise sums of dS (reduced by the caller) or nullptr
template <typename T>
void lane_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const float* bias, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   float* dbias_acc, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const LaneSizes s = lane_sizes(z);
  const auto [gp, qp, kp, vp, lp, dqp, dkp, dvp, gv, qv, kv, vv, lv, dqv, dkv, dvv] =
      bwd_operands<T>(grad_out, q, k, v, lse, dq, dk, dv, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t N = s.N, N4 = s.N4, D = s.D, Dq = s.Dq, tile = N4 * Dq * W;
  const bool stream = streamed(dq);
  at::parallel_for(0, s.units, 1, [&](int64_t begin, int64_t end) {
    float* dbias_t = dbias_acc != nullptr ? dbias_acc + at::get_thread_num() * s.H * N * N * W : nullptr;
    std::vector<float> ws(5 * tile + 2 * N4 * N4 * W + W, 0.0f);
    float* Q = aligned(ws.data());  // pre-scaled: S = Q K^T and dK = dS^T Q
    float* K = Q + tile;
    float* V = K + tile;
    float* dO = V + tile;
    float* X = dO + tile;         // dQ, dK, dV in turn
    float* P = X + tile;          // [N4][N4][W]: probabilities
    float* dS = P + N4 * N4 * W;  // dP, then dS
    for (int64_t unit = begin; unit < end; ++unit) {
      gather_lanes(qp, qv, lanes_of(unit, s, z.A, qv), N, D, Dq, scale, Q);
      gather_lanes(kp, kv, lanes_of(unit, s, z.A, kv), N, D, Dq, 1.0f, K);
      gather_lanes(vp, vv, lanes_of(unit, s, z.A, vv), N, D, Dq, 1.0f, V);
      gather_lanes(gp, gv, lanes_of(unit, s, z.A, gv), N, D, Dq, 1.0f, dO);
      lane_dot(Q, K, P, N4, Dq, causal);
      lane_dot(dO, V, dS, N4, Dq, causal);  // dP[i][j] = dO_i . v_j
      const Lanes ll = lanes_of(unit, s, z.A, lv);
      const float* bias_u = bias != nullptr ? bias + ll.phase * N * N * W : nullptr;
      float* dbias_u = dbias_t != nullptr ? dbias_t + ll.phase * N * N * W : nullptr;
      for (int64_t i = 0; i < N; ++i) {
        float* prow = P + i * N4 * W;
        float* drow = dS + i * N4 * W;
        const int64_t jmax = causal ? i + 1 : N;
        v16 lse_i = {};
        for (int64_t ln = 0; ln < W; ++ln) lse_i[ln] = ll.off[ln] >= 0 ? lp[ll.off[ln] + i * lv.sn] : 0.f;
        v16 delta = {};  // rowsum(P * dP) == dO_i . O_i
        for (int64_t j = 0; j < jmax; ++j) {
          v16 x = vload(prow + j * W);
          if (bias_u != nullptr) x += vload(bias_u + (i * N + j) * W);
          const v16 p = vexp(x - lse_i);
          vstore(prow + j * W, p);
          delta += p * vload(drow + j * W);
        }
        for (int64_t j = 0; j < jmax; ++j) {
          const v16 ds = vload(prow + j * W) * (vload(drow + j * W) - delta);
          vstore(drow + j * W, ds);
          if (dbias_u != nullptr) vstore(dbias_u + (i * N + j) * W, vload(dbias_u + (i * N + j) * W) + ds);
        }
        for (int64_t j = jmax; j < N4; ++j) vstore(prow + j * W, v16{}), vstore(drow + j * W, v16{});
      }
      // rows N..N4 of P and dS are zero: lane_dot of the zero rows of Q and dO
      lane_mm<false>(dS, K, X, N4, Dq, causal, nullptr);  // dQ = dS K (times the scale below)
      scatter_lanes(X, N, D, Dq, scale, dqp, dqv, lanes_of(unit, s, z.A, dqv), stream);
      lane_mm<true>(dS, Q, X, N4, Dq, causal, nullptr);  // dK = dS^T Q
      scatter_lanes(X, N, D, Dq, 1.0f, dkp, dkv, lanes_of(unit, s, z.A, dkv), stream);
      lane_mm<true>(P, dO, X, N4, Dq, causal, nullptr);  // dV = P^T dO
      scatter_lanes(X, N, D, Dq, 1.0f, dvp, dvv, lanes_of(unit, s, z.A, dvv), stream);
    }
    store_fence();
  });
}

// The (H, N, N) bias gradient from the per-thread [phase][N][N][W] sums of lane_backward.
at::Tensor lane_bias_grad(const at::Tensor& acc) {
  const int64_t H = acc.size(1), N = acc.size(2);
  const at::Tensor by_lane = acc.sum(0).permute({0, 3, 1, 2}).reshape({H * W, N, N});  // [phase, lane][i][j]
  return at::zeros({H, N, N}, acc.options()).index_add_(0, lane_heads(H), by_lane);
}

const char* op_name(bool temporal) { return temporal ? "temporal_attention" : "spatial_attention"; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
                  bool temporal) {
  const char* name = op_name(temporal);
  TORCH_CHECK_VALUE(q.dim() == 5, name, ": q must be 5-D (B, T, S, H, Dh), got ", q.dim(), "-D");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), name,
                    ": q, k and v must have the same shape, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   name, ": the cpp backend takes float32/float16/bfloat16, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), name,
                   ": q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), name,
                    ": the cpp backend needs CPU tensors");
  TORCH_CHECK_VALUE(q.size(4) <= 128, name, ": head dim Dh = ", q.size(4),
                    " > 128 is not supported by the cpp kernel (use backend='reference')");
  if (bias.has_value()) {
    const int64_t N = temporal ? q.size(1) : q.size(2);
    TORCH_CHECK_VALUE(bias->dim() == 3 && bias->size(0) == q.size(3) && bias->size(1) == N && bias->size(2) == N, name,
                      ": bias must have shape (H, N, N) = (", q.size(3), ", ", N, ", ", N, "), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), name, ": bias must be a CPU tensor");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& bias, bool temporal,
                                                     bool causal) {
  check_inputs(q, k, v, bias, temporal);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const bool short_seq = short_sequences(temporal ? q.size(1) : q.size(2), temporal);
  const at::Tensor bias32 = bias.has_value() ? (short_seq ? lane_bias(*bias) : padded_bias(*bias)) : at::Tensor();
  const float* bp = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
  switch (q.scalar_type()) {
    case at::kFloat: (short_seq ? lane_forward<float> : forward_kernel<float>)(q, k, v, bp, out, lse, temporal, causal);
      break;
    case at::kHalf:
      (short_seq ? lane_forward<c10::Half> : forward_kernel<c10::Half>)(q, k, v, bp, out, lse, temporal, causal);
      break;
    default:
      (short_seq ? lane_forward<c10::BFloat16> : forward_kernel<c10::BFloat16>)(q, k, v, bp, out, lse, temporal,
                                                                                causal);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpp(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, bool temporal, bool causal,
    bool bias_grad, bool packed_grad) {
  (void)out;  // delta = rowsum(P * dP) is recomputed from P, which the backward rebuilds anyway
  check_inputs(q, k, v, bias, temporal);
  const char* name = op_name(temporal);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(), name,
                    ": grad_out must match q in shape and dtype");
  TORCH_CHECK_VALUE(lse.dim() == 4 && lse.scalar_type() == at::kFloat, name, ": lse must be float32 (B, T, S, H)");
  TORCH_CHECK_VALUE(!bias_grad || bias.has_value(), name, ": bias_grad needs a bias");
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq, dk, dv, packed;
  if (packed_grad) {
    // one (B, T, S, 3, H, Dh) gradient for a packed qkv: written in place of the stack copy
    // autograd would otherwise make of three separate gradients
    packed = at::empty({q.size(0), q.size(1), q.size(2), 3, q.size(3), q.size(4)}, opts);
    dq = packed.select(3, 0), dk = packed.select(3, 1), dv = packed.select(3, 2);
  } else {
    dq = at::empty(q.sizes(), opts), dk = at::empty(q.sizes(), opts), dv = at::empty(q.sizes(), opts);
  }
  const int64_t H = q.size(3), N = temporal ? q.size(1) : q.size(2);
  const bool short_seq = short_sequences(N, temporal);
  // dbias is accumulated per thread (no atomics): [phase][N][N][lane] for the short-sequence
  // kernel, transposed [H][N][Np] for the blocked one
  at::Tensor acc;
  if (bias_grad) {
    acc = short_seq ? at::zeros({at::get_num_threads(), H, N, N, W}, q.options().dtype(at::kFloat))
                    : at::zeros({at::get_num_threads(), H, N, (N + W - 1) / W * W}, q.options().dtype(at::kFloat));
  }
  if (q.numel() > 0) {
    const at::Tensor bias32 = bias.has_value() ? (short_seq ? lane_bias(*bias) : padded_bias(*bias)) : at::Tensor();
    const float* bp = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
    float* ap = bias_grad ? acc.mutable_data_ptr<float>() : nullptr;
    switch (q.scalar_type()) {
      case at::kFloat:
        (short_seq ? lane_backward<float> : backward_kernel<float>)(grad_out, q, k, v, bp, lse, dq, dk, dv, ap,
                                                                    temporal, causal);
        break;
      case at::kHalf:
        (short_seq ? lane_backward<c10::Half> : backward_kernel<c10::Half>)(grad_out, q, k, v, bp, lse, dq, dk, dv,
                                                                              ap, temporal, causal);
        break;
      default:
        (short_seq ? lane_backward<c10::BFloat16> : backward_kernel<c10::BFloat16>)(grad_out, q, k, v, bp, lse, dq,
                                                                                      dk, dv, ap, temporal, causal);
    }
  }
  at::Tensor dbias = at::empty({0}, q.options());
  if (bias_grad) {
    dbias = short_seq ? lane_bias_grad(acc) : acc.sum(0).narrow(2, 0, N).transpose(1, 2);
    dbias = dbias.to(bias->scalar_type()).contiguous();
  }
  if (packed_grad) return {packed, at::empty({0}, q.options()), at::empty({0}, q.options()), dbias};
  return {dq, dk, dv, dbias};
}

}  // namespace pvkernels
