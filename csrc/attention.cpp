// Factorised spatio-temporal attention on the CPU, reading (B, T, S, H, Dh) in place with any
// strides (q, k, v may be views of one packed projection). One kernel serves both axes: the
// tensor is seen as (b, a, n, h, d) with n the attended axis (T for temporal, S for spatial).
// Work item = one (b, a) row, all heads: K (transposed) and V of a sequence are copied once
// into an fp32 scratch that stays in cache, each query row computes its scores, an fp32
// softmax and P V. Backward recomputes P from the saved log-sum-exp instead of storing it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
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

inline v16 vload(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void vstore(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
inline v16 splat(float f) { return v16{} + f; }
// horizontal sum / max by halving shuffles (4 steps, not 15 scalar extracts)
inline float hsum(v16 v) {
  v += __builtin_shuffle(v, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, v16i{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, v16i{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  v += __builtin_shuffle(v, v16i{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
  return v[0];
}
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
inline float hmax(v16 v) {
  v = vmax(v, __builtin_shuffle(v, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = vmax(v, __builtin_shuffle(v, v16i{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3}));
  v = vmax(v, __builtin_shuffle(v, v16i{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1}));
  v = vmax(v, __builtin_shuffle(v, v16i{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0}));
  return v[0];
}

inline v16i lane_index(int64_t base) {
  v16i idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return idx + static_cast<int32_t>(base);
}

// exp(x) on 16 lanes (std::exp is a scalar libm call). Cephes expf: 2^n * exp(r), |r| <= ln2/2,
// degree-6 polynomial, ~1 ulp; exp(0) == 1 exactly, so a one-key (first causal) row is exact.
inline v16 vexp(v16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;  // exp(-87) ~ 1.6e-38; masked lanes are zeroed by the caller
  x = x > 88.0f ? splat(88.0f) : x;
  const v16 t = x * 1.44269504088896341f;
  const v16 n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: needs no -ffast-math
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 y = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  return y * reinterpret_cast<const v16&>(bits);
}

// dst (rows x ld, fp32) = scale * the N x D rows of one sequence; the padding stays zero.
template <typename T>
void load_rows(const T* base, int64_t sn, int64_t sd, int64_t N, int64_t D, int64_t ld, float scale, float* dst) {
  for (int64_t n = 0; n < N; ++n) {
    const T* row = base + n * sn;
    float* out = dst + n * ld;
    if (sd == 1) {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d]) * scale;
    } else {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d * sd]) * scale;
    }
  }
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

template <typename T>
void store_rows(const float* src, int64_t ld, float scale, int64_t N, int64_t D, T* base, int64_t sn, int64_t sd) {
  for (int64_t n = 0; n < N; ++n) {
    T* row = base + n * sn;
    const float* in = src + n * ld;
    if (sd == 1) {
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(in[d] * scale);
    } else {
      for (int64_t d = 0; d < D; ++d) row[d * sd] = static_cast<T>(in[d] * scale);
    }
  }
}

// S[i, :] = A[i, :D] . Bt[:D, :] for rows i < n_rows (a multiple of 4), four rows at a time so
// each loaded key vector feeds four independent FMA chains. causal: only the key chunks a row
// of the block can see.
void rows_dot_cols(const float* A, int64_t lda, const float* Bt, int64_t Np, float* S, int64_t n_rows, int64_t D,
                   bool causal) {
  for (int64_t i0 = 0; i0 < n_rows; i0 += 4) {
    const int64_t nc = causal ? (i0 + 3) / W + 1 : Np / W;
    const float* a0 = A + i0 * lda;
    const float* a1 = a0 + lda;
    const float* a2 = a1 + lda;
    const float* a3 = a2 + lda;
    for (int64_t c = 0; c < nc; ++c) {
      v16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
      const float* bt = Bt + c * W;
      for (int64_t d = 0; d < D; ++d) {
        const v16 b = vload(bt + d * Np);
        s0 += a0[d] * b;
        s1 += a1[d] * b;
        s2 += a2[d] * b;
        s3 += a3[d] * b;
      }
      vstore(S + i0 * Np + c * W, s0);
      vstore(S + (i0 + 1) * Np + c * W, s1);
      vstore(S + (i0 + 2) * Np + c * W, s2);
      vstore(S + (i0 + 3) * Np + c * W, s3);
    }
  }
}

// O[i, :] = sum_j P[i, j] M[j, :] (M is Np x DC*16) for rows i < n_rows. mode 0: j < N; mode 1
// (causal P): j < min(i0 + 4, N); mode 2 (transposed causal P): i0 <= j < N.
template <int DC>
void rows_times_mat(const float* P, int64_t Np, const float* M, float* O, int64_t n_rows, int64_t N, int mode) {
  constexpr int64_t Dp = DC * W;
  for (int64_t i0 = 0; i0 < n_rows; i0 += 4) {
    const int64_t lo = mode == 2 ? i0 : 0;
    const int64_t hi = mode == 1 ? std::min(i0 + 4, N) : N;
    v16 acc[4][DC] = {};
    const float* p = P + i0 * Np;
    for (int64_t j = lo; j < hi; ++j) {
      const float p0 = p[j], p1 = p[Np + j], p2 = p[2 * Np + j], p3 = p[3 * Np + j];
      const float* m = M + j * Dp;
      for (int dc = 0; dc < DC; ++dc) {
        const v16 mv = vload(m + dc * W);
        acc[0][dc] += p0 * mv;
        acc[1][dc] += p1 * mv;
        acc[2][dc] += p2 * mv;
        acc[3][dc] += p3 * mv;
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int dc = 0; dc < DC; ++dc) vstore(O + (i0 + r) * Dp + dc * W, acc[r][dc]);
  }
}

using RowsTimesMat = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, int);
RowsTimesMat rows_times_mat_for(int64_t Dp) {
  static const RowsTimesMat table[] = {rows_times_mat<1>, rows_times_mat<2>, rows_times_mat<3>, rows_times_mat<4>,
                                       rows_times_mat<5>, rows_times_mat<6>, rows_times_mat<7>, rows_times_mat<8>};
  return table[Dp / W - 1];
}

// Softmax of score row i in place (bias row added, keys >= jn masked): returns the row's max and
// sum; lanes past jn become exactly 0.
inline void softmax_row(float* s, const float* bias_row, int64_t jn, float* max_out, float* sum_out) {
  const int64_t nc = (jn + W - 1) / W;
  v16 m = splat(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < nc; ++c) {
    v16 x = vload(s + c * W);
    if (bias_row != nullptr) x += vload(bias_row + c * W);
    x = lane_index(c * W) < static_cast<int32_t>(jn) ? x : splat(-std::numeric_limits<float>::infinity());
    vstore(s + c * W, x);
    m = vmax(m, x);
  }
  const float mx = hmax(m);
  v16 l = {};
  for (int64_t c = 0; c < nc; ++c) {
    v16 p = vexp(vload(s + c * W) - mx);
    p = lane_index(c * W) < static_cast<int32_t>(jn) ? p : v16{};
    vstore(s + c * W, p);
    l += p;
  }
  *max_out = mx;
  *sum_out = hsum(l);
}

struct Padded {
  int64_t N4, Np, Dp;  // rows rounded to 4, keys to 16, head dim to 16
};
Padded padded(const Sizes& z) { return {(z.N + 3) / 4 * 4, z.Np, (z.D + W - 1) / W * W}; }

// bias as fp32 (H, N, Np), zero padded, so score rows add it vector by vector
at::Tensor padded_bias(const at::Tensor& bias, int64_t Np) {
  const int64_t H = bias.size(0), N = bias.size(1);
  at::Tensor out = at::zeros({H, N, Np}, bias.options().dtype(at::kFloat));
  out.narrow(2, 0, N).copy_(bias);
  return out;
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, at::Tensor& out,
                    at::Tensor& lse, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const Padded pd = padded(z);
  const View qv = view_of(q, temporal), kv = view_of(k, temporal), vv = view_of(v, temporal),
             ov = view_of(out, temporal);
  // lse is (B, T, S, H) contiguous
  const int64_t l_sb = lse.stride(0), l_sa = temporal ? lse.stride(2) : lse.stride(1),
                l_sn = temporal ? lse.stride(1) : lse.stride(2), l_sh = lse.stride(3);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t N = z.N, D = z.D, Np = pd.Np, Dp = pd.Dp, N4 = pd.N4;
  const RowsTimesMat pv = rows_times_mat_for(Dp);
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(5 * Np * Dp + Np * Np, 0.0f);
    float* Q = ws.data();     // Np x Dp, pre-scaled by 1/sqrt(Dh)
    float* K = Q + Np * Dp;   // Np x Dp
    float* Kt = K + Np * Dp;  // Dp x Np
    float* V = Kt + Np * Dp;  // Np x Dp
    float* P = V + Np * Dp;   // Np x Np scores, then probabilities
    float* O = P + Np * Np;   // Np x Dp
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / z.A, a = item % z.A;
      for (int64_t h = 0; h < z.H; ++h) {
        load_rows(qp + b * qv.sb + a * qv.sa + h * qv.sh, qv.sn, qv.sd, N, D, Dp, scale, Q);
        load_rows(kp + b * kv.sb + a * kv.sa + h * kv.sh, kv.sn, kv.sd, N, D, Dp, 1.0f, K);
        transpose_tiles(K, Dp, Kt, Np, Np, Dp);
        load_rows(vp + b * vv.sb + a * vv.sa + h * vv.sh, vv.sn, vv.sd, N, D, Dp, 1.0f, V);
        rows_dot_cols(Q, Dp, Kt, Np, P, N4, D, causal);
        float* lbase = lp + b * l_sb + a * l_sa + h * l_sh;
        const float* bias_h = bias != nullptr ? bias + h * N * Np : nullptr;
        for (int64_t i = 0; i < N; ++i) {
          const int64_t jn = causal ? i + 1 : N;
          float mx, sum;
          float* p = P + i * Np;
          softmax_row(p, bias_h != nullptr ? bias_h + i * Np : nullptr, jn, &mx, &sum);
          lbase[i * l_sn] = mx + std::log(sum);
          const float r = 1.0f / sum;  // normalise P (N x N) rather than O (N x Dh): fewer lanes for T < Dh
          for (int64_t c = 0; c < (jn + W - 1) / W; ++c) vstore(p + c * W, vload(p + c * W) * r);
        }
        for (int64_t i = N; i < N4; ++i) std::fill(P + i * Np, P + (i + 1) * Np, 0.0f);
        pv(P, Np, V, O, N4, N, causal ? 1 : 0);
        store_rows(O, Dp, 1.0f, N, D, op + b * ov.sb + a * ov.sa + h * ov.sh, ov.sn, ov.sd);
      }
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const float* bias, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     float* dbias_acc, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const Padded pd = padded(z);
  const View gv = view_of(grad_out, temporal), qv = view_of(q, temporal), kv = view_of(k, temporal),
             vv = view_of(v, temporal), dqv = view_of(dq, temporal), dkv = view_of(dk, temporal),
             dvv = view_of(dv, temporal);
  const int64_t l_sb = lse.stride(0), l_sa = temporal ? lse.stride(2) : lse.stride(1),
                l_sn = temporal ? lse.stride(1) : lse.stride(2), l_sh = lse.stride(3);
  const T* gp = grad_out.const_data_ptr<T>();
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const float* lp = lse.const_data_ptr<float>();
  T* dqp = dq.mutable_data_ptr<T>();
  T* dkp = dk.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t N = z.N, D = z.D, Np = pd.Np, Dp = pd.Dp, N4 = pd.N4, H = z.H;
  const RowsTimesMat mm = rows_times_mat_for(Dp);
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    // dbias is accumulated per thread (summed by the caller): no atomics in the hot loop
    float* dbias_t = dbias_acc != nullptr ? dbias_acc + at::get_thread_num() * H * N * N : nullptr;
    std::vector<float> ws(7 * Np * Dp + 3 * Np * Np, 0.0f);
    float* Q = ws.data();     // Np x Dp, pre-scaled: S = Q Kt and dK = dS^T Q
    float* K = Q + Np * Dp;   // Np x Dp
    float* G = K + Np * Dp;   // Np x Dp, upstream gradient
    float* O = G + Np * Dp;   // Np x Dp, product output
    float* Kt = O + Np * Dp;  // Dp x Np
    float* Vt = Kt + Np * Dp; // Dp x Np (V rows are loaded into O first)
    float* P = Vt + Np * Dp;  // Np x Np
    float* dS = P + Np * Np;  // Np x Np
    float* Tr = dS + Np * Np; // Np x Np, transposes
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / z.A, a = item % z.A;
      for (int64_t h = 0; h < H; ++h) {
        const T* kbase = kp + b * kv.sb + a * kv.sa + h * kv.sh;
        load_rows(qp + b * qv.sb + a * qv.sa + h * qv.sh, qv.sn, qv.sd, N, D, Dp, scale, Q);
        load_rows(kbase, kv.sn, kv.sd, N, D, Dp, 1.0f, K);
        transpose_tiles(K, Dp, Kt, Np, Np, Dp);
        load_rows(vp + b * vv.sb + a * vv.sa + h * vv.sh, vv.sn, vv.sd, N, D, Dp, 1.0f, O);
        transpose_tiles(O, Dp, Vt, Np, Np, Dp);
        load_rows(gp + b * gv.sb + a * gv.sa + h * gv.sh, gv.sn, gv.sd, N, D, Dp, 1.0f, G);
        rows_dot_cols(Q, Dp, Kt, Np, P, N4, D, causal);   // scores
        rows_dot_cols(G, Dp, Vt, Np, dS, N4, D, causal);  // dP = dO V^T
        const float* lbase = lp + b * l_sb + a * l_sa + h * l_sh;
        const float* bias_h = bias != nullptr ? bias + h * N * Np : nullptr;
        for (int64_t i = 0; i < N; ++i) {
          const int64_t jn = causal ? i + 1 : N;
          const int64_t nc = (jn + W - 1) / W;
          const float li = lbase[i * l_sn];
          float* p = P + i * Np;
          float* ds = dS + i * Np;
          const float* br = bias_h != nullptr ? bias_h + i * Np : nullptr;
          v16 delta = {};
          for (int64_t c = 0; c < nc; ++c) {
            v16 x = vload(p + c * W);
            if (br != nullptr) x += vload(br + c * W);
            v16 pc = vexp(x - li);
            pc = lane_index(c * W) < static_cast<int32_t>(jn) ? pc : v16{};
            vstore(p + c * W, pc);
            delta += pc * vload(ds + c * W);
          }
          const float dl = hsum(delta);  // rowsum(P * dP) == dO_i . O_i
          for (int64_t c = 0; c < nc; ++c) vstore(ds + c * W, vload(p + c * W) * (vload(ds + c * W) - dl));
          if (dbias_t != nullptr) {
            float* row = dbias_t + (h * N + i) * N;
            for (int64_t j = 0; j < jn; ++j) row[j] += ds[j];
          }
        }
        for (int64_t i = N; i < N4; ++i) {
          std::fill(P + i * Np, P + (i + 1) * Np, 0.0f);
          std::fill(dS + i * Np, dS + (i + 1) * Np, 0.0f);
        }
        const int64_t out_q = b * dqv.sb + a * dqv.sa + h * dqv.sh;
        mm(dS, Np, K, O, N4, N, causal ? 1 : 0);  // dQ = dS K
        store_rows(O, Dp, scale, N, D, dqp + out_q, dqv.sn, dqv.sd);
        transpose_tiles(P, Np, Tr, Np, Np, Np);
        mm(Tr, Np, G, O, N4, N, causal ? 2 : 0);  // dV = P^T dO
        store_rows(O, Dp, 1.0f, N, D, dvp + b * dvv.sb + a * dvv.sa + h * dvv.sh, dvv.sn, dvv.sd);
        transpose_tiles(dS, Np, Tr, Np, Np, Np);
        mm(Tr, Np, Q, O, N4, N, causal ? 2 : 0);  // dK = dS^T (Q / sqrt(Dh))
        store_rows(O, Dp, 1.0f, N, D, dkp + b * dkv.sb + a * dkv.sa + h * dkv.sh, dkv.sn, dkv.sd);
      }
    }
  });
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
  at::Tensor bias32;
  if (bias.has_value()) bias32 = padded_bias(*bias, (bias->size(1) + W - 1) / W * W);
  const float* bp = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
  switch (q.scalar_type()) {
    case at::kFloat: forward_kernel<float>(q, k, v, bp, out, lse, temporal, causal); break;
    case at::kHalf: forward_kernel<c10::Half>(q, k, v, bp, out, lse, temporal, causal); break;
    default: forward_kernel<c10::BFloat16>(q, k, v, bp, out, lse, temporal, causal); break;
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpp(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, bool temporal, bool causal,
    bool bias_grad) {
  (void)out;  // delta = rowsum(P * dP) is recomputed from P, which the backward rebuilds anyway
  check_inputs(q, k, v, bias, temporal);
  const char* name = op_name(temporal);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(), name,
                    ": grad_out must match q in shape and dtype");
  TORCH_CHECK_VALUE(lse.dim() == 4 && lse.scalar_type() == at::kFloat, name, ": lse must be float32 (B, T, S, H)");
  TORCH_CHECK_VALUE(!bias_grad || bias.has_value(), name, ": bias_grad needs a bias");
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(q.sizes(), opts), dv = at::empty(q.sizes(), opts);
  const int64_t H = q.size(3), N = temporal ? q.size(1) : q.size(2);
  at::Tensor dbias = at::empty({0}, q.options());
  at::Tensor acc;
  if (bias_grad) acc = at::zeros({at::get_num_threads(), H, N, N}, q.options().dtype(at::kFloat));
  if (q.numel() > 0) {
    at::Tensor bias32;
    if (bias.has_value()) bias32 = padded_bias(*bias, (bias->size(1) + W - 1) / W * W);
    const float* bp = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
    float* ap = bias_grad ? acc.mutable_data_ptr<float>() : nullptr;
    switch (q.scalar_type()) {
      case at::kFloat: backward_kernel<float>(grad_out, q, k, v, bp, lse, dq, dk, dv, ap, temporal, causal); break;
      case at::kHalf: backward_kernel<c10::Half>(grad_out, q, k, v, bp, lse, dq, dk, dv, ap, temporal, causal); break;
      default: backward_kernel<c10::BFloat16>(grad_out, q, k, v, bp, lse, dq, dk, dv, ap, temporal, causal); break;
    }
  }
  if (bias_grad) dbias = acc.sum(0).to(bias->scalar_type());
  return {dq, dk, dv, dbias};
}

}  // namespace pvkernels
