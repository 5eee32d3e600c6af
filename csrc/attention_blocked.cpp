// Attention over longer sequences (temporal T > 32, spatial S > 16; attention.cpp holds the
// crossover): a (b, a) item's heads are staged in an fp32 scratch that stays in cache, the scores
// are kept transposed (keys x queries) so that the fp32 softmax over keys is lane-wise on kLanes
// queries at once, in blocks of 32 queries that stay in L1, then P V; the backward recomputes P
// from the saved log-sum-exp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "attention.h"

namespace pvkernels {
namespace attention {
namespace {

using simd::kRegisters, simd::load, simd::store, simd::iota;

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (both multiples of kLanes)
void transpose_tiles(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  vfloat t[kLanes];
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
      for (int i = 0; i < kLanes; ++i) t[i] = load(src + (r0 + i) * lds + c0);
      simd::transpose(t);
      for (int i = 0; i < kLanes; ++i) store(dst + (c0 + i) * ldd + r0, t[i]);
    }
  }
}

// S[i, :] = A[i, :D] . Bt[:D, :] for rows i0 <= i < i1 (i1 - i0 a multiple of R) and the first
// `cols` columns (a multiple of kLanes) of Bt (row stride ldb) and S (row stride Np), R rows at a
// time so each loaded vector of Bt feeds R independent FMA chains. upper: only the column chunks
// from the rows' own on (S^T of a causal score matrix: key j sees queries i >= j), where the
// columns start at chunk `chunk0` of the whole matrix. add (row stride add_ld): a matrix added to
// S as it is stored (the bias); colmax: the running max of each column chunk over the stored
// rows < n_valid (the softmax's max pass, fused).
template <int R>
void rows_dot_cols_by(const float* A, int64_t lda, const float* Bt, int64_t ldb, float* S, int64_t Np, int64_t cols,
                      int64_t i_begin, int64_t i_end, int64_t D, bool upper, int64_t chunk0, const float* add,
                      int64_t add_ld, vfloat* colmax, int64_t n_valid) {
  // stores the rows i0.. of column chunk c, then folds their max (in registers) into colmax
  auto put = [&](int64_t i0, int64_t c, const vfloat* rows) {
    vfloat m = simd::splat(-std::numeric_limits<float>::infinity());
    for (int r = 0; r < R; ++r) {
      vfloat x = rows[r];
      if (add != nullptr) x += load(add + (i0 + r) * add_ld + c * kLanes);
      store(S + (i0 + r) * Np + c * kLanes, x);
      if (i0 + r < n_valid) m = simd::max(m, x);
    }
    if (colmax != nullptr) colmax[c] = simd::max(colmax[c], m);
  };
  for (int64_t i0 = i_begin; i0 < i_end; i0 += R) {
    const float* a = A + i0 * lda;
    int64_t c = upper ? std::max<int64_t>(0, i0 / kLanes - chunk0) : 0;
    // two column chunks at a time: 2R accumulators, 2 + R loads per 2R FMAs
    for (; c + 2 <= cols / kLanes; c += 2) {
      vfloat acc0[R] = {}, acc1[R] = {};
      const float* bt = Bt + c * kLanes;
      for (int64_t d = 0; d < D; ++d) {
        const vfloat b0 = load(bt + d * ldb), b1 = load(bt + d * ldb + kLanes);
        for (int r = 0; r < R; ++r) {
          const float x = a[r * lda + d];
          acc0[r] += x * b0;
          acc1[r] += x * b1;
        }
      }
      put(i0, c, acc0);
      put(i0, c + 1, acc1);
    }
    for (; c < cols / kLanes; ++c) {
      vfloat acc[R] = {};
      const float* bt = Bt + c * kLanes;
      for (int64_t d = 0; d < D; ++d) {
        const vfloat b0 = load(bt + d * ldb);
        for (int r = 0; r < R; ++r) acc[r] += a[r * lda + d] * b0;
      }
      put(i0, c, acc);
    }
  }
}

// rows_dot_cols_by for rows i < n_rows (a multiple of 8): 8 rows a block (16 accumulators) with 32
// registers; with 16, 6 (12 accumulators, the classic 6 x 16 sgemm block) and 2 for the rest.
void rows_dot_cols(const float* A, int64_t lda, const float* Bt, int64_t ldb, float* S, int64_t Np, int64_t cols,
                   int64_t n_rows, int64_t D, bool upper, int64_t chunk0 = 0, const float* add = nullptr,
                   int64_t add_ld = 0, vfloat* colmax = nullptr, int64_t n_valid = 0) {
  if constexpr (kRegisters >= 32) {
    rows_dot_cols_by<8>(A, lda, Bt, ldb, S, Np, cols, 0, n_rows, D, upper, chunk0, add, add_ld, colmax, n_valid);
  } else {
    const int64_t n6 = n_rows / 6 * 6;
    rows_dot_cols_by<6>(A, lda, Bt, ldb, S, Np, cols, 0, n6, D, upper, chunk0, add, add_ld, colmax, n_valid);
    rows_dot_cols_by<2>(A, lda, Bt, ldb, S, Np, cols, n6, n_rows, D, upper, chunk0, add, add_ld, colmax, n_valid);
  }
}

// O[i, :] = sum_j P(i, j) M[j, :] (M is Np x DC*kLanes) for rows i < n_rows.
// COLUMN: P is stored transposed (P(i, j) = P[j * Np + i], the four rows' entries adjacent).
// mode 0: j < N; mode 1 (causal P): j < min(row0 + i0 + R, N); mode 2 (P^T of a causal P):
// i0 <= j < N. row0: the index of row 0 in the whole matrix (a block of query rows).
template <int DC, bool COLUMN>
void rows_times_mat(const float* P, int64_t Np, const float* M, float* O, int64_t n_rows, int64_t N, int mode,
                    const float* row_scale, int64_t row0) {
  constexpr int64_t Dp = DC * kLanes;
  // R rows x DB vector columns of O per block, all DC at once with 32 registers (8 rows for narrow
  // heads, 4 for wide ones); with 16, blocks of 2 columns (4 rows: 8 accumulators, 6 loads per 8
  // FMAs, where wider blocks ran load-bound on the M operands). Rows past n_rows (< Np, zero
  // padded; R <= 8 <= kLanes) are computed and ignored.
  constexpr int DB = kRegisters >= 32 ? DC : (DC % 2 == 0 ? 2 : 1);
  constexpr int R = kRegisters >= 32 ? (DC <= 2 ? 8 : 4) : (DB == 1 ? 8 : 4);
  for (int64_t i0 = 0; i0 < n_rows; i0 += R) {
    const int64_t lo = mode == 2 ? i0 : 0;
    const int64_t hi = mode == 1 ? std::min(row0 + i0 + R, N) : N;
    for (int dc0 = 0; dc0 < DC; dc0 += DB) {
      vfloat acc[R][DB] = {};
      for (int64_t j = lo; j < hi; ++j) {
        float p[R];
        for (int r = 0; r < R; ++r) p[r] = COLUMN ? P[j * Np + i0 + r] : P[(i0 + r) * Np + j];
        const float* m = M + j * Dp + dc0 * kLanes;
        for (int dc = 0; dc < DB; ++dc) {
          const vfloat mv = load(m + dc * kLanes);
          for (int r = 0; r < R; ++r) acc[r][dc] += p[r] * mv;
        }
      }
      for (int r = 0; r < R; ++r) {
        const float f = row_scale != nullptr ? row_scale[i0 + r] : 1.0f;
        for (int dc = 0; dc < DB; ++dc) store(O + (i0 + r) * Dp + (dc0 + dc) * kLanes, acc[r][dc] * f);
      }
    }
  }
}

using RowsTimesMat = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, int, const float*,
                              int64_t);
// rows_times_mat for a head dim of Dp floats (DC = 1 .. kMaxHeadDim / kLanes vectors)
template <bool COLUMN, int... DC>
RowsTimesMat rows_times_mat_pick(int64_t Dp, std::integer_sequence<int, DC...>) {
  static const RowsTimesMat table[] = {rows_times_mat<DC + 1, COLUMN>...};
  return table[Dp / kLanes - 1];
}
template <bool COLUMN>
RowsTimesMat rows_times_mat_for(int64_t Dp) {
  return rows_times_mat_pick<COLUMN>(Dp, std::make_integer_sequence<int, kMaxHeadDim / kLanes>{});
}

struct Padded {
  int64_t N8, Np, Dp;  // rows rounded to 8, keys to kLanes (>= 8), head dim to kLanes
};
Padded padded(const Sizes& z) { return {(z.N + 7) / 8 * 8, simd::round_up(z.N), simd::round_up(z.D)}; }

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
      if (v.sd == 1) {
        simd::to_f32(row, D, out, scale);
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
      if (v.sd == 1) {
        simd::from_f32(in, D, row, scale, stream);
      } else {
        for (int64_t d = 0; d < D; ++d) row[d * v.sd] = static_cast<T>(in[d] * scale);
      }
    }
  }
}

// heads per group: the staged tensors of a group stay within ~budget floats (L2-sized)
int64_t heads_per_group(int64_t H, int64_t per_head, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(H, budget / per_head));
}

}  // namespace

template <typename T>
void blocked_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias,
                     at::Tensor& out, at::Tensor& lse, bool temporal, bool causal) {
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
    std::vector<float> ws(4 * G * per_head + per_head + Np * QB + Np + kLanes, 0.0f);
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
          // S^T[j][i] = k_j . q_i: with keys as rows, a vector holds kLanes queries, so the
          // softmax over keys is lane-wise (no horizontal max / sum per query)
          transpose_tiles(Qg + hh * per_head, Dp, Qt, Np, Np, Dp);
          float* lbase = lp + b * lv.sb + a * lv.sa + h * lv.sh;
          const float* bias_h = bias != nullptr ? bias + h * N * Np : nullptr;  // transposed [j][i]
          // blocks of QB queries: the block's scores (N keys x QB) stay in L1 through the
          // softmax and the P V product
          for (int64_t c0 = 0; c0 < Np; c0 += QB) {
            const int64_t qb = std::min(QB, Np - c0);
            const int64_t keys = causal ? std::min(N8, (c0 + qb + 7) / 8 * 8) : N8;  // causal: keys <= queries
            vfloat colmax[QB / kLanes];
            for (vfloat& m : colmax) m = simd::splat(-std::numeric_limits<float>::infinity());
            if (causal) {
              rows_dot_cols(Kg + hh * per_head, Dp, Qt + c0, Np, Pt, QB, qb, keys, D, true, c0 / kLanes);
            } else {  // the bias added and the max taken as the scores are stored
              rows_dot_cols(Kg + hh * per_head, Dp, Qt + c0, Np, Pt, QB, qb, keys, D, false, c0 / kLanes,
                            bias_h != nullptr ? bias_h + c0 : nullptr, Np, colmax, N);
            }
            for (int64_t c = c0 / kLanes; c < (c0 + qb) / kLanes; ++c) {
              const int64_t jmax = causal ? std::min(N, (c + 1) * kLanes) : N;
              const vint lanes = iota(c * kLanes);
              vfloat m = colmax[c - c0 / kLanes];
              for (int64_t j = 0; causal && j < jmax; ++j) {  // causal: the max over the unmasked keys
                float* col = Pt + j * QB + c * kLanes - c0;
                vfloat x = load(col);
                if (bias_h != nullptr) {
                  x += load(bias_h + j * Np + c * kLanes);
                  store(col, x);
                }
                x = lanes >= static_cast<int32_t>(j) ? x : simd::splat(-std::numeric_limits<float>::infinity());
                m = simd::max(m, x);
              }
              vfloat l = {};
              for (int64_t j = 0; j < jmax; ++j) {
                float* col = Pt + j * QB + c * kLanes - c0;
                vfloat p = simd::exp(load(col) - m);
                // masked lanes: exp(-inf - m) is clamped to ~1e-38, so zero them exactly
                if (causal) p = lanes >= static_cast<int32_t>(j) ? p : vfloat{};
                store(col, p);
                l += p;
              }
              store(rinv + c * kLanes, 1.0f / l);  // P is normalised on O's rows, in the P V product
              const vfloat lse_c = m + simd::log(l);
              for (int64_t i = c * kLanes; i < std::min(N, (c + 1) * kLanes); ++i) {
                lbase[i * lv.sn] = lse_c[i - c * kLanes];
              }
            }
            pv(Pt, QB, Vg + hh * per_head, Og + hh * per_head + c0 * Dp, qb, N, causal ? 1 : 0, rinv + c0, c0);
          }
        }
        store_group(Og, N, g, D, Np, Dp, 1.0f, op + b * ov.sb + a * ov.sa + h0 * ov.sh, ov, stream);
      }
    }
    simd::stream_fence();
  });
}

template <typename T>
void blocked_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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
  const int64_t n_chunks = Np / kLanes;
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    // dbias^T (H x N x Np) is accumulated per thread (summed by the caller): no atomics
    float* dbias_t = dbias_acc != nullptr ? dbias_acc + at::get_thread_num() * H * N * Np : nullptr;
    std::vector<float> ws(7 * G * per_head + 2 * per_head + 2 * Np * Np + kLanes, 0.0f);
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
            const int64_t jmax = causal ? std::min(N, (c + 1) * kLanes) : N;
            const vint lanes = iota(c * kLanes);
            vfloat lse_c = {};
            for (int64_t i = c * kLanes; i < std::min(N, (c + 1) * kLanes); ++i) {
              lse_c[i - c * kLanes] = lbase[i * lv.sn];
            }
            vfloat delta = {};
            for (int64_t j = 0; j < jmax; ++j) {
              float* col = Pt + j * Np + c * kLanes;
              vfloat x = load(col);
              if (bias_h != nullptr) x += load(bias_h + j * Np + c * kLanes);
              vfloat p = simd::exp(x - lse_c);
              if (causal) p = lanes >= static_cast<int32_t>(j) ? p : vfloat{};
              p = lanes < static_cast<int32_t>(N) ? p : vfloat{};  // padded queries
              store(col, p);
              delta += p * load(dSt + j * Np + c * kLanes);
            }
            // delta_i = rowsum(P * dP) == dO_i . O_i, lane-wise
            for (int64_t j = 0; j < jmax; ++j) {
              float* dcol = dSt + j * Np + c * kLanes;
              const vfloat ds = load(Pt + j * Np + c * kLanes) * (load(dcol) - delta);
              store(dcol, ds);
              if (dbias_h != nullptr) {
                store(dbias_h + j * Np + c * kLanes, load(dbias_h + j * Np + c * kLanes) + ds);
              }
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
    simd::stream_fence();
  });
}


// bias^T as fp32 (H, N keys, Np queries), zero padded: added to S^T kLanes queries at a time
at::Tensor padded_bias(const at::Tensor& bias) {
  const int64_t H = bias.size(0), N = bias.size(1);
  at::Tensor out = at::zeros({H, N, simd::round_up(N)}, bias.options().dtype(at::kFloat));
  out.narrow(2, 0, N).copy_(bias.transpose(1, 2));
  return out;
}
// per-thread dbias^T sums, [thread][H][N][Np]
at::Tensor padded_bias_grad_acc(int64_t threads, int64_t H, int64_t N) {
  return at::zeros({threads, H, N, simd::round_up(N)}, at::TensorOptions().dtype(at::kFloat));
}
at::Tensor padded_bias_grad(const at::Tensor& acc) {
  return acc.sum(0).narrow(2, 0, acc.size(2)).transpose(1, 2);
}

#define PVKERNELS_INSTANTIATE(T)                                                                                  \
  template void blocked_forward<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const float*,          \
                                   at::Tensor&, at::Tensor&, bool, bool);                                         \
  template void blocked_backward<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,   \
                                    const float*, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, float*, \
                                    bool, bool);
PVKERNELS_INSTANTIATE(float)
PVKERNELS_INSTANTIATE(c10::Half)
PVKERNELS_INSTANTIATE(c10::BFloat16)
#undef PVKERNELS_INSTANTIATE

}  // namespace attention
}  // namespace pvkernels
