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

// exp(x) for the softmax, written so that the compiler vectorises it inside `omp simd` loops
// (std::exp is a scalar libm call here). Cephes expf: 2^n * exp(r), |r| <= ln2/2, degree-6
// polynomial, ~1 ulp; exp(0) == 1 exactly, so a one-key (first causal) row is exact.
#pragma omp declare simd notinbranch
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: below every probability that matters
  x = x > 88.0f ? 88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y * scale;
}

template <typename T>
inline float ld(const T* p) {
  return static_cast<float>(*p);
}

// Copies the N x D rows of one sequence into dst (row-major N x D, fp32).
template <typename T>
void load_rows(const T* base, int64_t sn, int64_t sd, int64_t N, int64_t D, float* dst) {
  for (int64_t n = 0; n < N; ++n) {
    const T* row = base + n * sn;
    float* out = dst + n * D;
    if (sd == 1) {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d * sd]);
    }
  }
}

// Copies the sequence transposed: dst[d * Np + n] (D x Np, fp32), so score rows vectorise over keys.
template <typename T>
void load_cols(const T* base, int64_t sn, int64_t sd, int64_t N, int64_t D, int64_t Np, float* dst) {
  for (int64_t n = 0; n < N; ++n) {
    const T* row = base + n * sn;
    for (int64_t d = 0; d < D; ++d) dst[d * Np + n] = static_cast<float>(row[d * sd]);
  }
}

// s[0..jn) = scale * q_i . K^T (+ bias row), q_i given in fp32.
inline void score_row(const float* qi, const float* Kt, const float* bias_row, int64_t jn, int64_t D, int64_t Np,
                      float scale, float* s) {
  if (bias_row != nullptr) {
    for (int64_t j = 0; j < jn; ++j) s[j] = bias_row[j];
  } else {
    for (int64_t j = 0; j < jn; ++j) s[j] = 0.0f;
  }
  for (int64_t d = 0; d < D; ++d) {
    const float qd = qi[d] * scale;
    const float* kt = Kt + d * Np;
#pragma omp simd
    for (int64_t j = 0; j < jn; ++j) s[j] += qd * kt[j];
  }
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, at::Tensor& out,
                    at::Tensor& lse, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
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
  const int64_t N = z.N, D = z.D, Np = z.Np;
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(D * Np + N * D + Np + 2 * D);
    float* Kt = ws.data();
    float* V = Kt + D * Np;
    float* s = V + N * D;
    float* qi = s + Np;
    float* acc = qi + D;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / z.A, a = item % z.A;
      for (int64_t h = 0; h < z.H; ++h) {
        load_cols(kp + b * kv.sb + a * kv.sa + h * kv.sh, kv.sn, kv.sd, N, D, Np, Kt);
        load_rows(vp + b * vv.sb + a * vv.sa + h * vv.sh, vv.sn, vv.sd, N, D, V);
        const T* qbase = qp + b * qv.sb + a * qv.sa + h * qv.sh;
        T* obase = op + b * ov.sb + a * ov.sa + h * ov.sh;
        float* lbase = lp + b * l_sb + a * l_sa + h * l_sh;
        const float* bias_h = bias != nullptr ? bias + h * N * N : nullptr;
        for (int64_t i = 0; i < N; ++i) {
          const int64_t jn = causal ? i + 1 : N;
          load_rows(qbase + i * qv.sn, 0, qv.sd, 1, D, qi);
          score_row(qi, Kt, bias_h != nullptr ? bias_h + i * N : nullptr, jn, D, Np, scale, s);
          float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
          for (int64_t j = 0; j < jn; ++j) m = s[j] > m ? s[j] : m;
          float l = 0.0f;
#pragma omp simd reduction(+ : l)
          for (int64_t j = 0; j < jn; ++j) {
            const float p = fast_exp(s[j] - m);
            s[j] = p;
            l += p;
          }
          for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
          for (int64_t j = 0; j < jn; ++j) {
            const float pj = s[j];
            const float* vj = V + j * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += pj * vj[d];
          }
          const float inv = 1.0f / l;
          T* oi = obase + i * ov.sn;
          for (int64_t d = 0; d < D; ++d) oi[d * ov.sd] = static_cast<T>(acc[d] * inv);
          lbase[i * l_sn] = m + std::log(l);
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const float* bias, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     float* dbias_acc, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
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
  const int64_t N = z.N, D = z.D, Np = z.Np, H = z.H;
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    // dbias is accumulated per thread (summed by the caller): no atomics in the hot loop
    float* dbias_t = dbias_acc != nullptr ? dbias_acc + at::get_thread_num() * H * N * N : nullptr;
    std::vector<float> ws(2 * D * Np + 5 * N * D + 2 * Np + 2 * D);
    float* Kt = ws.data();
    float* Vt = Kt + D * Np;
    float* K = Vt + D * Np;
    float* Q = K + N * D;
    float* G = Q + N * D;
    float* dK = G + N * D;
    float* dV = dK + N * D;
    float* p = dV + N * D;
    float* ds = p + Np;
    float* dqi = ds + Np;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / z.A, a = item % z.A;
      for (int64_t h = 0; h < H; ++h) {
        const T* kbase = kp + b * kv.sb + a * kv.sa + h * kv.sh;
        const T* vbase = vp + b * vv.sb + a * vv.sa + h * vv.sh;
        load_cols(kbase, kv.sn, kv.sd, N, D, Np, Kt);
        load_cols(vbase, vv.sn, vv.sd, N, D, Np, Vt);
        load_rows(kbase, kv.sn, kv.sd, N, D, K);
        load_rows(qp + b * qv.sb + a * qv.sa + h * qv.sh, qv.sn, qv.sd, N, D, Q);
        load_rows(gp + b * gv.sb + a * gv.sa + h * gv.sh, gv.sn, gv.sd, N, D, G);
        std::fill(dK, dK + 2 * N * D, 0.0f);  // dK and dV
        const float* lbase = lp + b * l_sb + a * l_sa + h * l_sh;
        const float* bias_h = bias != nullptr ? bias + h * N * N : nullptr;
        T* dqbase = dqp + b * dqv.sb + a * dqv.sa + h * dqv.sh;
        for (int64_t i = 0; i < N; ++i) {
          const int64_t jn = causal ? i + 1 : N;
          const float* qi = Q + i * D;
          const float* gi = G + i * D;
          score_row(qi, Kt, bias_h != nullptr ? bias_h + i * N : nullptr, jn, D, Np, scale, p);
          const float li = lbase[i * l_sn];
#pragma omp simd
          for (int64_t j = 0; j < jn; ++j) p[j] = fast_exp(p[j] - li);
          // dP_ij = dO_i . V_j
          for (int64_t j = 0; j < jn; ++j) ds[j] = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            const float gd = gi[d];
            const float* vt = Vt + d * Np;
#pragma omp simd
            for (int64_t j = 0; j < jn; ++j) ds[j] += gd * vt[j];
          }
          float delta = 0.0f;  // rowsum(P * dP) == dO_i . O_i
#pragma omp simd reduction(+ : delta)
          for (int64_t j = 0; j < jn; ++j) delta += p[j] * ds[j];
#pragma omp simd
          for (int64_t j = 0; j < jn; ++j) ds[j] = p[j] * (ds[j] - delta);
          if (dbias_t != nullptr) {
            float* row = dbias_t + (h * N + i) * N;
#pragma omp simd
            for (int64_t j = 0; j < jn; ++j) row[j] += ds[j];
          }
          for (int64_t d = 0; d < D; ++d) dqi[d] = 0.0f;
          for (int64_t j = 0; j < jn; ++j) {
            const float dsj = ds[j] * scale;
            const float pj = p[j];
            const float* kj = K + j * D;
            float* dkj = dK + j * D;
            float* dvj = dV + j * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
              dqi[d] += dsj * kj[d];
              dkj[d] += dsj * qi[d];
              dvj[d] += pj * gi[d];
            }
          }
          T* dqrow = dqbase + i * dqv.sn;
          for (int64_t d = 0; d < D; ++d) dqrow[d * dqv.sd] = static_cast<T>(dqi[d]);
        }
        T* dkbase = dkp + b * dkv.sb + a * dkv.sa + h * dkv.sh;
        T* dvbase = dvp + b * dvv.sb + a * dvv.sa + h * dvv.sh;
        for (int64_t j = 0; j < N; ++j) {
          for (int64_t d = 0; d < D; ++d) {
            dkbase[j * dkv.sn + d * dkv.sd] = static_cast<T>(dK[j * D + d]);
            dvbase[j * dvv.sn + d * dvv.sd] = static_cast<T>(dV[j * D + d]);
          }
        }
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
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
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
    if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
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
