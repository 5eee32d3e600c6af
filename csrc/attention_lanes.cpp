// Attention over short sequences (temporal T <= 32, spatial S <= 16) that the rows kernel does
// not take (attention.cpp holds the crossovers): kLanes sequences side by side, one per vector
// lane. The blocked kernels would pad every score row to kLanes queries (T = 18 computes 32 with
// 16 lanes). Here a work unit is kLanes consecutive (b, a, h) sequences: consecutive heads of
// one item first, whose rows are adjacent in memory, so the unit reads whole (H * Dh) rows like
// the blocked kernels do. The staged tensors are [row][d][lane] and every score, exp and FMA is
// lane-wise on kLanes independent sequences: nothing is padded but the rows to a multiple of 4
// and the last unit's idle lanes, and the softmax needs no horizontal reductions.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention.h"

namespace pvkernels {
namespace attention {
namespace {

using simd::kRegisters, simd::load, simd::store;

// Register blocks of the lane-wise products: kRows x kCols accumulators plus kRows + kCols
// operands (4 x 4 with 32 registers: 8 loads per 16 FMAs; 4 x 2 with 16: 6 per 8).
constexpr int kRows = 4;
constexpr int kCols = kRegisters >= 32 ? 4 : 2;

struct LaneSizes {
  int64_t seqs, units, N, N4, D, Dq, H;
};
LaneSizes lane_sizes(const Sizes& z) {
  const int64_t seqs = z.B * z.A * z.H;
  return {seqs, (seqs + kLanes - 1) / kLanes, z.N, (z.N + 3) / 4 * 4, z.D, (z.D + 3) / 4 * 4, z.H};
}

// Per-lane element offsets of the kLanes sequences of `unit` in a tensor seen through `v` (whose
// sd field is unused for lse); -1 marks an idle lane. phase: the head of lane 0 (lane l holds
// head (phase + l) % H).
struct Lanes {
  int64_t off[kLanes];
  int64_t phase;
  bool full;
};
Lanes lanes_of(int64_t unit, const LaneSizes& s, int64_t A, const View& v) {
  Lanes ln;
  ln.full = (unit + 1) * kLanes <= s.seqs;
  ln.phase = unit * kLanes % s.H;
  for (int64_t l = 0; l < kLanes; ++l) {
    const int64_t seq = unit * kLanes + l, item = seq / s.H, h = seq % s.H;
    ln.off[l] = seq < s.seqs ? item / A * v.sb + item % A * v.sa + h * v.sh : -1;
  }
  return ln;
}

// dst[n][d][lane] = scale * x[lane's sequence, row n, d] for n < N, d < D (zero on idle lanes);
// the other entries are left as they are (zero from the workspace's allocation). Rows with unit
// stride go kLanes elements at a time (a masked tail when kLanes does not divide D) through a
// kLanes x kLanes transpose.
// Rows are read kAhead rows ahead of use: a unit's rows of one tensor are two or more short
// sequential runs (one per item), too short for the hardware prefetchers to catch up with.
constexpr int64_t kAhead = 2;
template <typename T>
void gather_lanes(const T* base, const View& v, const Lanes& ln, int64_t N, int64_t D, int64_t Dq, float scale,
                  float* dst) {
  if (v.sd == 1) {
    vfloat r[kLanes];
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
        const int w = static_cast<int>(std::min<int64_t>(kLanes, D - d0));
        for (int64_t l = 0; l < kLanes; ++l) {
          const T* p = base + ln.off[l] + n * v.sn + d0;
          if (n + kAhead < N) __builtin_prefetch(p + kAhead * v.sn);
          r[l] = ln.off[l] < 0 ? vfloat{} : w == kLanes ? simd::load_f32(p) : simd::load_f32_partial(p, w);
        }
        simd::transpose(r);
        for (int k = 0; k < w; ++k) store(dst + (n * Dq + d0 + k) * kLanes, r[k] * scale);
      }
    }
    return;
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const T* row = ln.off[l] >= 0 ? base + ln.off[l] + n * v.sn : nullptr;
      for (int64_t d = 0; d < D; ++d) {
        dst[(n * Dq + d) * kLanes + l] = row ? static_cast<float>(row[d * v.sd]) * scale : 0.f;
      }
    }
  }
}

// The inverse of gather_lanes (idle lanes are not written). stream: write whole aligned lines
// with non-temporal stores (large outputs: skips reading each line into the cache before
// overwriting it, a third of the kernel's memory traffic)
template <typename T>
void scatter_lanes(const float* src, int64_t N, int64_t D, int64_t Dq, float scale, T* base, const View& v,
                   const Lanes& ln, bool stream) {
  if (v.sd == 1) {
    vfloat r[kLanes];
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
        const int w = static_cast<int>(std::min<int64_t>(kLanes, D - d0));
        for (int k = 0; k < kLanes; ++k) r[k] = k < w ? load(src + (n * Dq + d0 + k) * kLanes) * scale : vfloat{};
        simd::transpose(r);
        for (int64_t l = 0; l < kLanes; ++l) {
          if (ln.off[l] < 0) continue;
          T* p = base + ln.off[l] + n * v.sn + d0;
          if (w == kLanes) {
            simd::store_from_f32(p, r[l], stream);
          } else {
            simd::store_from_f32_partial(p, r[l], w);
          }
        }
      }
    }
    return;
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < kLanes; ++l) {
      if (ln.off[l] < 0) continue;
      T* row = base + ln.off[l] + n * v.sn;
      for (int64_t d = 0; d < D; ++d) row[d * v.sd] = static_cast<T>(src[(n * Dq + d) * kLanes + l] * scale);
    }
  }
}

// S[i][j] = sum_d A[i][d] B[j][d] on each lane, in kRows x kCols blocks.
// A, B: [N4][Dq][kLanes]; S: [N4][N4][kLanes]. causal: only blocks that hold some j <= i.
void lane_dot(const float* A, const float* B, float* S, int64_t N4, int64_t Dq, bool causal) {
  const int64_t rs = Dq * kLanes;
  for (int64_t i0 = 0; i0 < N4; i0 += kRows) {
    for (int64_t j0 = 0; j0 < (causal ? i0 + kRows : N4); j0 += kCols) {
      vfloat acc[kRows][kCols] = {};
      for (int64_t d = 0; d < Dq; ++d) {
        vfloat a[kRows], b[kCols];
        for (int r = 0; r < kRows; ++r) a[r] = load(A + (i0 + r) * rs + d * kLanes);
        for (int c = 0; c < kCols; ++c) b[c] = load(B + (j0 + c) * rs + d * kLanes);
        for (int r = 0; r < kRows; ++r)
          for (int c = 0; c < kCols; ++c) acc[r][c] += a[r] * b[c];
      }
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kCols; ++c) store(S + ((i0 + r) * N4 + j0 + c) * kLanes, acc[r][c]);
    }
  }
}

// O[i][d] = row_scale[i] * sum_j P(i, j) M[j][d] on each lane, in kRows x kCols blocks; P(i, j)
// is P[i][j], or P[j][i] when TRANS. P: [N4][N4][kLanes] with zeros outside the valid entries;
// causal: P(i, j) == 0 for j > i (plain) or j < i (TRANS), and those j are skipped.
template <bool TRANS>
void lane_mm(const float* P, const float* M, float* O, int64_t N4, int64_t Dq, bool causal, const float* row_scale) {
  for (int64_t i0 = 0; i0 < N4; i0 += kRows) {
    const int64_t lo = TRANS && causal ? i0 : 0;
    const int64_t hi = !TRANS && causal ? i0 + kRows : N4;
    for (int64_t d0 = 0; d0 < Dq; d0 += kCols) {
      vfloat acc[kRows][kCols] = {};
      for (int64_t j = lo; j < hi; ++j) {
        vfloat p[kRows], m[kCols];
        for (int r = 0; r < kRows; ++r) p[r] = load(P + (TRANS ? j * N4 + i0 + r : (i0 + r) * N4 + j) * kLanes);
        for (int c = 0; c < kCols; ++c) m[c] = load(M + (j * Dq + d0 + c) * kLanes);
        for (int r = 0; r < kRows; ++r)
          for (int c = 0; c < kCols; ++c) acc[r][c] += p[r] * m[c];
      }
      for (int r = 0; r < kRows; ++r) {
        const vfloat f = row_scale != nullptr ? load(row_scale + (i0 + r) * kLanes) : simd::splat(1.0f);
        for (int c = 0; c < kCols; ++c) store(O + ((i0 + r) * Dq + d0 + c) * kLanes, acc[r][c] * f);
      }
    }
  }
}

// The (H, N, N) bias per lane: [phase][i][j][lane] = bias[(phase + lane) % H][i][j] (a unit's
// lanes hold heads phase, phase + 1, ...; there are at most H distinct phases).
at::Tensor lane_heads(int64_t H) {  // [phase * kLanes + lane] -> head
  at::Tensor heads = at::empty({H * kLanes}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = heads.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < H * kLanes; ++i) p[i] = (i / kLanes + i % kLanes) % H;
  return heads;
}

// Non-temporal stores pay only where they write whole lines: with Dh % kLanes != 0 a line of the
// output holds the masked tail of one head and the start of the next, written by plain stores.
bool streams(const at::Tensor& out, const Sizes& z) { return streamed(out) && z.D % kLanes == 0; }
}  // namespace

at::Tensor lane_bias(const at::Tensor& bias) {
  const int64_t H = bias.size(0), N = bias.size(1);
  return bias.to(at::kFloat).index_select(0, lane_heads(H)).view({H, kLanes, N, N}).permute({0, 2, 3, 1})
      .contiguous();
}

// bias: lane_bias(...) or nullptr
template <typename T>
void lanes_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, at::Tensor& out,
                   at::Tensor& lse, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const LaneSizes s = lane_sizes(z);
  const auto [qp, kp, vp, op, lp, qv, kv, vv, ov, lv] = fwd_operands<T>(q, k, v, out, lse, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t N = s.N, N4 = s.N4, D = s.D, Dq = s.Dq, tile = N4 * Dq * kLanes;
  const bool stream = streams(out, z);
  at::parallel_for(0, s.units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(4 * tile + N4 * N4 * kLanes + N4 * kLanes + kLanes, 0.0f);
    float* Q = aligned(ws.data());  // [N4][Dq][kLanes], pre-scaled by 1/sqrt(Dh)
    float* K = Q + tile;
    float* V = K + tile;
    float* O = V + tile;
    float* P = O + tile;            // [N4][N4][kLanes]: scores, then unnormalised probabilities
    float* rinv = P + N4 * N4 * kLanes;  // [N4][kLanes]
    for (int64_t unit = begin; unit < end; ++unit) {
      gather_lanes(qp, qv, lanes_of(unit, s, z.A, qv), N, D, Dq, scale, Q);
      gather_lanes(kp, kv, lanes_of(unit, s, z.A, kv), N, D, Dq, 1.0f, K);
      gather_lanes(vp, vv, lanes_of(unit, s, z.A, vv), N, D, Dq, 1.0f, V);
      lane_dot(Q, K, P, N4, Dq, causal);
      const Lanes ll = lanes_of(unit, s, z.A, lv);
      const float* bias_u = bias != nullptr ? bias + ll.phase * N * N * kLanes : nullptr;
      for (int64_t i = 0; i < N; ++i) {
        float* row = P + i * N4 * kLanes;
        const int64_t jmax = causal ? i + 1 : N;
        vfloat m = simd::splat(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < jmax; ++j) {
          vfloat x = load(row + j * kLanes);
          if (bias_u != nullptr) x += load(bias_u + (i * N + j) * kLanes);
          store(row + j * kLanes, x);
          m = simd::max(m, x);
        }
        vfloat l = {};
        const vfloat shift = softmax_shift(m);
        for (int64_t j = 0; j < jmax; ++j) {
          const vfloat p = simd::exp(load(row + j * kLanes) - shift);
          store(row + j * kLanes, p);
          l += p;
        }
        for (int64_t j = jmax; j < N4; ++j) store(row + j * kLanes, vfloat{});
        store(rinv + i * kLanes, softmax_rinv(m, l));
        const vfloat lse_i = softmax_lse(m, l);
        for (int64_t ln = 0; ln < kLanes; ++ln)
          if (ll.off[ln] >= 0) lp[ll.off[ln] + i * lv.sn] = lse_i[ln];
      }
      lane_mm<false>(P, V, O, N4, Dq, causal, rinv);
      scatter_lanes(O, N, D, Dq, 1.0f, op, ov, lanes_of(unit, s, z.A, ov), stream);
    }
    simd::stream_fence();
  });
}

// dbias_acc: per thread [phase][N][N][kLanes] lane-wise sums of dS (reduced by the caller) or nullptr
template <typename T>
void lanes_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const float* bias, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                    float* dbias_acc, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const LaneSizes s = lane_sizes(z);
  const auto [gp, qp, kp, vp, lp, dqp, dkp, dvp, gv, qv, kv, vv, lv, dqv, dkv, dvv] =
      bwd_operands<T>(grad_out, q, k, v, lse, dq, dk, dv, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t N = s.N, N4 = s.N4, D = s.D, Dq = s.Dq, tile = N4 * Dq * kLanes;
  const bool stream = streams(dq, z);
  at::parallel_for(0, s.units, 1, [&](int64_t begin, int64_t end) {
    float* dbias_t = dbias_acc != nullptr ? dbias_acc + at::get_thread_num() * s.H * N * N * kLanes : nullptr;
    std::vector<float> ws(5 * tile + 2 * N4 * N4 * kLanes + kLanes, 0.0f);
    float* Q = aligned(ws.data());  // pre-scaled: S = Q K^T and dK = dS^T Q
    float* K = Q + tile;
    float* V = K + tile;
    float* dO = V + tile;
    float* X = dO + tile;         // dQ, dK, dV in turn
    float* P = X + tile;          // [N4][N4][kLanes]: probabilities
    float* dS = P + N4 * N4 * kLanes;  // dP, then dS
    for (int64_t unit = begin; unit < end; ++unit) {
      gather_lanes(qp, qv, lanes_of(unit, s, z.A, qv), N, D, Dq, scale, Q);
      gather_lanes(kp, kv, lanes_of(unit, s, z.A, kv), N, D, Dq, 1.0f, K);
      gather_lanes(vp, vv, lanes_of(unit, s, z.A, vv), N, D, Dq, 1.0f, V);
      gather_lanes(gp, gv, lanes_of(unit, s, z.A, gv), N, D, Dq, 1.0f, dO);
      lane_dot(Q, K, P, N4, Dq, causal);
      lane_dot(dO, V, dS, N4, Dq, causal);  // dP[i][j] = dO_i . v_j
      const Lanes ll = lanes_of(unit, s, z.A, lv);
      const float* bias_u = bias != nullptr ? bias + ll.phase * N * N * kLanes : nullptr;
      float* dbias_u = dbias_t != nullptr ? dbias_t + ll.phase * N * N * kLanes : nullptr;
      for (int64_t i = 0; i < N; ++i) {
        float* prow = P + i * N4 * kLanes;
        float* drow = dS + i * N4 * kLanes;
        const int64_t jmax = causal ? i + 1 : N;
        vfloat lse_i = {};
        for (int64_t ln = 0; ln < kLanes; ++ln) lse_i[ln] = ll.off[ln] >= 0 ? lp[ll.off[ln] + i * lv.sn] : 0.f;
        vfloat delta = {}, sum = {};  // rowsum(P * dP) == dO_i . O_i
        for (int64_t j = 0; j < jmax; ++j) {
          vfloat x = load(prow + j * kLanes);
          if (bias_u != nullptr) x += load(bias_u + (i * N + j) * kLanes);
          const vfloat p = simd::exp(x - lse_i);
          store(prow + j * kLanes, p);
          delta += p * load(drow + j * kLanes);
          sum += p;
        }
        delta *= softmax_renorm(sum);
        for (int64_t j = 0; j < jmax; ++j) {
          const vfloat ds = load(prow + j * kLanes) * (load(drow + j * kLanes) - delta);
          store(drow + j * kLanes, ds);
          if (dbias_u != nullptr) store(dbias_u + (i * N + j) * kLanes, load(dbias_u + (i * N + j) * kLanes) + ds);
        }
        for (int64_t j = jmax; j < N4; ++j) store(prow + j * kLanes, vfloat{}), store(drow + j * kLanes, vfloat{});
      }
      // rows N..N4 of P and dS are zero: lane_dot of the zero rows of Q and dO
      lane_mm<false>(dS, K, X, N4, Dq, causal, nullptr);  // dQ = dS K (times the scale below)
      scatter_lanes(X, N, D, Dq, scale, dqp, dqv, lanes_of(unit, s, z.A, dqv), stream);
      lane_mm<true>(dS, Q, X, N4, Dq, causal, nullptr);  // dK = dS^T Q
      scatter_lanes(X, N, D, Dq, 1.0f, dkp, dkv, lanes_of(unit, s, z.A, dkv), stream);
      lane_mm<true>(P, dO, X, N4, Dq, causal, nullptr);  // dV = P^T dO
      scatter_lanes(X, N, D, Dq, 1.0f, dvp, dvv, lanes_of(unit, s, z.A, dvv), stream);
    }
    simd::stream_fence();
  });
}

// The (H, N, N) bias gradient from the per-thread [phase][N][N][kLanes] sums of lane_backward.
at::Tensor lane_bias_grad(const at::Tensor& acc) {
  const int64_t H = acc.size(1), N = acc.size(2);
  const at::Tensor by_lane = acc.sum(0).permute({0, 3, 1, 2}).reshape({H * kLanes, N, N});  // [phase, lane][i][j]
  return at::zeros({H, N, N}, acc.options()).index_add_(0, lane_heads(H), by_lane);
}
// per-thread dS sums, [thread][phase][N][N][lane]
at::Tensor lane_bias_grad_acc(int64_t threads, int64_t H, int64_t N) {
  return at::zeros({threads, H, N, N, kLanes}, at::TensorOptions().dtype(at::kFloat));
}

PVKERNELS_ATTENTION_INSTANTIATE(lanes);

}  // namespace attention
}  // namespace pvkernels
