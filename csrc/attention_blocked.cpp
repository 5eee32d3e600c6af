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

// S = A Bt: A (rows x D, row stride lda) times the first `cols` columns (a multiple of kLanes) of
// Bt (D x cols, row stride ldb) into S (row stride lds). upper: only the column chunks from the
// rows' own on (S^T of a causal score matrix: key j sees queries i >= j), where the columns start
// at chunk `chunk0` of the whole matrix.
struct Product {
  const float* A;
  int64_t lda;
  const float* Bt;
  int64_t ldb;
  float* S;
  int64_t lds;
  int64_t cols, D;
  bool upper;
  int64_t chunk0;
};

// What is fused into the stores of a Product (the non-causal forward's scores): `add` (row stride
// add_ld, or nullptr), a matrix added to S as it is stored (the bias); colmax, the running max of
// each column chunk over the stored rows < n_valid (the softmax's max pass).
struct OnStore {
  const float* add = nullptr;
  int64_t add_ld = 0;
  vfloat* colmax = nullptr;
  int64_t n_valid = 0;
};

// The rows i_begin <= i < i_end (i_end - i_begin a multiple of R) of a Product, R rows at a time so
// each loaded vector of Bt feeds R independent FMA chains. FUSED: with the work of on_store, else
// plain stores (compiled apart: the max would cost a compare and a blend per stored vector).
template <int R, bool FUSED>
void rows_dot_cols_by(Product p, int64_t i_begin, int64_t i_end, OnStore on_store) {
  const auto [A, lda, Bt, ldb, S, lds, cols, D, upper, chunk0] = p;
  const auto [add, add_ld, colmax, n_valid] = on_store;
  // stores the rows i0.. of column chunk c, then folds their max (in registers) into colmax
  auto put = [&](int64_t i0, int64_t c, const vfloat* rows) {
    vfloat m = simd::splat(-std::numeric_limits<float>::infinity());
    for (int r = 0; r < R; ++r) {
      vfloat x = rows[r];
      if (FUSED && add != nullptr) x += load(add + (i0 + r) * add_ld + c * kLanes);
      store(S + (i0 + r) * lds + c * kLanes, x);
      if (FUSED && i0 + r < n_valid) m = simd::max(m, x);
    }
    if (FUSED && colmax != nullptr) colmax[c] = simd::max(colmax[c], m);
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

// The rows i < n_rows (a multiple of 8) of a Product: 8 rows a block (16 accumulators) with 32
// registers; with 16, 6 (12 accumulators, the classic 6 x 16 sgemm block) and 2 for the rest.
template <bool FUSED = false>
void rows_dot_cols(const Product& p, int64_t n_rows, const OnStore& on_store = {}) {
  if constexpr (kRegisters >= 32) {
    rows_dot_cols_by<8, FUSED>(p, 0, n_rows, on_store);
  } else {
    const int64_t n6 = n_rows / 6 * 6;
    rows_dot_cols_by<6, FUSED>(p, 0, n6, on_store);
    rows_dot_cols_by<2, FUSED>(p, n6, n_rows, on_store);
  }
}

// The keys j a row i of P sums over in rows_times_mat: kAll, j < N; kCausal (a causal P), j <= i
// (j < min(row0 + i0 + R, N) for a block of R rows from i0); kCausalTransposed (P^T of a causal
// P, whose columns j are the queries from row0 on), j >= i (max(0, i0 - row0) <= j < N).
enum class Mask { kAll, kCausal, kCausalTransposed };

// O[i, :] = sum_j P(i, j) M[j, :] (M is Np x DC*kLanes) for rows i < n_rows, over the keys j of
// `mask` (accumulate: O += that). COLUMN: P is stored transposed (P(i, j) = P[j * Np + i], the
// four rows' entries adjacent). row0: where the block of P starts in the whole matrix (kCausal:
// its first query row; kCausalTransposed: its first query column).
template <int DC, bool COLUMN>
void rows_times_mat(const float* P, int64_t Np, const float* M, float* O, int64_t n_rows, int64_t N, Mask mask,
                    const float* row_scale, int64_t row0, bool accumulate) {
  constexpr int64_t Dp = DC * kLanes;
  // R rows x DB vector columns of O per block, all DC at once with 32 registers (8 rows for narrow
  // heads, 4 for wide ones); with 16, blocks of 2 columns (4 rows: 8 accumulators, 6 loads per 8
  // FMAs, where wider blocks ran load-bound on the M operands). Rows past n_rows (< Np, zero
  // padded; R <= 8 <= kLanes) are computed and ignored.
  constexpr int DB = kRegisters >= 32 ? DC : (DC % 2 == 0 ? 2 : 1);
  constexpr int R = kRegisters >= 32 ? (DC <= 2 ? 8 : 4) : (DB == 1 ? 8 : 4);
  for (int64_t i0 = 0; i0 < n_rows; i0 += R) {
    const int64_t lo = mask == Mask::kCausalTransposed ? std::max<int64_t>(0, i0 - row0) : 0;
    const int64_t hi = mask == Mask::kCausal ? std::min(row0 + i0 + R, N) : N;
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
        for (int dc = 0; dc < DB; ++dc) {
          float* o = O + (i0 + r) * Dp + (dc0 + dc) * kLanes;
          store(o, accumulate ? load(o) + acc[r][dc] * f : acc[r][dc] * f);
        }
      }
    }
  }
}

using RowsTimesMat = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, Mask, const float*,
                              int64_t, bool);
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

// N keys (= queries) of head dim D, and their padded sizes.
struct Dims {
  int64_t N, D;
  int64_t N8, Np, Dp;  // rows rounded to 8, keys to kLanes (>= 8), head dim to kLanes
};
Dims dims_of(const Sizes& z) { return {z.N, z.D, (z.N + 7) / 8 * 8, simd::round_up(z.N), simd::round_up(z.D)}; }

// The (b, a) item's head h of a tensor seen through v.
template <typename P>
P* head_ptr(P* base, const View& v, int64_t b, int64_t a, int64_t h) {
  return base + b * v.sb + a * v.sa + h * v.sh;
}

// A group of heads of one (b, a) item is staged as [head][row][Dp] fp32. Rows are copied in
// address order (row, then head): for the common layouts (contiguous, packed qkv) that is one
// H * Dh run per row, which the hardware prefetcher streams, instead of H scattered 2-line
// reads per row (temporal rows lie S * H * Dh elements apart).
template <typename T>
void load_group(const T* base, const View& v, const Dims& d, int64_t G, float scale, float* dst) {
  for (int64_t n = 0; n < d.N; ++n) {
    for (int64_t h = 0; h < G; ++h) {
      const T* row = base + n * v.sn + h * v.sh;
      float* out = dst + (h * d.Np + n) * d.Dp;
      if (v.sd == 1) {
        simd::to_f32(row, d.D, out, scale);
      } else {
        for (int64_t i = 0; i < d.D; ++i) out[i] = static_cast<float>(row[i * v.sd]) * scale;
      }
    }
  }
}

template <typename T>
void store_group(const float* src, const Dims& d, int64_t G, float scale, T* base, const View& v, bool stream) {
  for (int64_t n = 0; n < d.N; ++n) {
    for (int64_t h = 0; h < G; ++h) {
      T* row = base + n * v.sn + h * v.sh;
      const float* in = src + (h * d.Np + n) * d.Dp;
      if (v.sd == 1) {
        simd::from_f32(in, d.D, row, scale, stream);
      } else {
        for (int64_t i = 0; i < d.D; ++i) row[i * v.sd] = static_cast<T>(in[i] * scale);
      }
    }
  }
}

// heads per group: the staged tensors of a group stay within ~budget floats (L2-sized)
int64_t heads_per_group(int64_t H, int64_t per_head, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(H, budget / per_head));
}

// ---- forward ----------------------------------------------------------------------------------

constexpr int64_t QB = 32;  // queries per forward block: N keys x 32 scores are 32 KB at N = 256

// A forward thread's fp32 workspace in one vector-aligned allocation, zero-filled once: the
// padding of the staged heads (rows >= N, head dims >= D) is never written and stays zero.
struct ForwardScratch {
  std::vector<float> buffer;
  float* Qg;    // G x Np x Dp, pre-scaled by 1/sqrt(Dh)
  float* Kg;    // G x Np x Dp
  float* Vg;    // G x Np x Dp
  float* Og;    // G x Np x Dp
  float* Qt;    // Dp x Np
  float* Pt;    // Np x QB: a block's scores, then probabilities, transposed [key][query]
  float* rinv;  // Np: 1 / softmax denominators
  ForwardScratch(int64_t G, int64_t per_head, int64_t Np)
      : buffer(4 * G * per_head + per_head + Np * QB + Np + kLanes, 0.0f),
        Qg(aligned(buffer.data())),
        Kg(Qg + G * per_head),
        Vg(Kg + G * per_head),
        Og(Vg + G * per_head),
        Qt(Og + G * per_head),
        Pt(Qt + per_head),
        rinv(Pt + Np * QB) {}
  ForwardScratch(const ForwardScratch&) = delete;
  ForwardScratch& operator=(const ForwardScratch&) = delete;
};

// One head of the forward: its staged K, V and O (Np x Dp), its bias and its log-sum-exp output.
struct ForwardHead {
  const float *K, *V;
  float* O;
  const float* bias;  // transposed [key][query] (row stride Np), or nullptr
  float* lse;         // query i's at lse[i * lse_stride]
  int64_t lse_stride;
};

// The max over keys j < jmax of a causal chunk of scores (query lanes[l] sees keys j <= lanes[l]),
// from m on; col: the chunk's scores (key j's at col[j * QB]). The bias (bias_col, key j's at
// bias_col[j * bias_ld]), which the causal product leaves out, is added to the scores here.
vfloat causal_max(float* col, const float* bias_col, int64_t bias_ld, int64_t jmax, const vint& lanes, vfloat m) {
  for (int64_t j = 0; j < jmax; ++j) {
    float* s = col + j * QB;
    vfloat x = load(s);
    if (bias_col != nullptr) {
      x += load(bias_col + j * bias_ld);
      store(s, x);
    }
    x = lanes >= static_cast<int32_t>(j) ? x : simd::splat(-std::numeric_limits<float>::infinity());
    m = simd::max(m, x);
  }
  return m;
}

// Scores become exp(score - m) for keys j < jmax (col as in causal_max); returns their sum.
vfloat exp_and_sum(float* col, int64_t jmax, const vint& lanes, vfloat m, bool causal) {
  vfloat l = {};
  for (int64_t j = 0; j < jmax; ++j) {
    float* s = col + j * QB;
    vfloat p = simd::exp(load(s) - m);
    // masked lanes: exp(-inf - m) is clamped to ~1e-38, so zero them exactly
    if (causal) p = lanes >= static_cast<int32_t>(j) ? p : vfloat{};
    store(s, p);
    l += p;
  }
  return l;
}

// The softmax over keys of the kLanes queries of chunk c in the block of queries from c0, lane-wise:
// the block's scores become exp(score - max), rinv 1 / their sums (P is normalised on O's rows, in
// the P V product), and the queries' log-sum-exp is written out. m: the max the product fused
// (-inf where causal: it is taken here).
void softmax_over_keys(const Dims& d, const ForwardHead& h, ForwardScratch& s, int64_t c0, int64_t c, vfloat m,
                       bool causal) {
  const int64_t q0 = c * kLanes;
  const int64_t jmax = causal ? std::min(d.N, (c + 1) * kLanes) : d.N;
  const vint lanes = iota(q0);
  float* col = s.Pt + q0 - c0;
  if (causal) m = causal_max(col, h.bias != nullptr ? h.bias + q0 : nullptr, d.Np, jmax, lanes, m);
  const vfloat l = exp_and_sum(col, jmax, lanes, softmax_shift(m), causal);
  store(s.rinv + q0, softmax_rinv(m, l));
  const vfloat lse = softmax_lse(m, l);
  for (int64_t i = q0; i < std::min(d.N, (c + 1) * kLanes); ++i) h.lse[i * h.lse_stride] = lse[i - q0];
}

// The block of queries from c0: scores S^T (keys x queries, in L1), their softmax, O = P V.
void forward_block(const Dims& d, const ForwardHead& h, ForwardScratch& s, int64_t c0, bool causal,
                   RowsTimesMat pv) {
  const int64_t qb = std::min(QB, d.Np - c0);
  const int64_t keys = causal ? std::min(d.N8, (c0 + qb + 7) / 8 * 8) : d.N8;  // causal: keys <= queries
  vfloat colmax[QB / kLanes];
  for (vfloat& m : colmax) m = simd::splat(-std::numeric_limits<float>::infinity());
  const Product scores{h.K, d.Dp, s.Qt + c0, d.Np, s.Pt, QB, qb, d.D, causal, c0 / kLanes};
  if (causal) {
    rows_dot_cols(scores, keys);
  } else {  // the bias added and the max taken as the scores are stored
    rows_dot_cols<true>(scores, keys, {h.bias != nullptr ? h.bias + c0 : nullptr, d.Np, colmax, d.N});
  }
  for (int64_t c = c0 / kLanes; c < (c0 + qb) / kLanes; ++c) {
    softmax_over_keys(d, h, s, c0, c, colmax[c - c0 / kLanes], causal);
  }
  pv(s.Pt, QB, h.V, h.O + c0 * d.Dp, qb, d.N, causal ? Mask::kCausal : Mask::kAll, s.rinv + c0, c0, false);
}

// One head of the forward; Q: its staged queries.
void forward_head(const Dims& d, const ForwardHead& h, const float* Q, ForwardScratch& s, bool causal,
                  RowsTimesMat pv) {
  // S^T[j][i] = k_j . q_i: with keys as rows, a vector holds kLanes queries, so the softmax over
  // keys is lane-wise (no horizontal max / sum per query)
  transpose_tiles(Q, d.Dp, s.Qt, d.Np, d.Np, d.Dp);
  // blocks of QB queries: the block's scores (N keys x QB) stay in L1 through the softmax and the
  // P V product
  for (int64_t c0 = 0; c0 < d.Np; c0 += QB) forward_block(d, h, s, c0, causal, pv);
}

// ---- backward ---------------------------------------------------------------------------------

// Queries per backward block: the block's P^T and dS^T (N keys x BQB each) stay in L2 up to N ~
// 4096 (2 MB); whole (N x N) they left it from N ~ 512 on, and the backward at N = 1024-2048 ran
// 0.55-0.83x SDPA's (benchmarks/README.md, "Long spatial sequences").
constexpr int64_t BQB = 64;

// A backward thread's fp32 workspace, as ForwardScratch.
struct BackwardScratch {
  std::vector<float> buffer;
  float* Qg;   // G x Np x Dp each; Q pre-scaled: S = Q K^T and dK = dS^T Q
  float* Kg;
  float* Vg;
  float* Gg;   // upstream gradient
  float* dQg;
  float* dKg;
  float* dVg;
  float* Qt;   // Dp x Np
  float* Gt;   // Dp x Np
  float* Pt;   // Np x BQB, a block's probabilities, [key][query]
  float* dSt;  // Np x BQB, its dP^T then dS^T
  BackwardScratch(int64_t G, int64_t per_head, int64_t Np)
      : buffer(7 * G * per_head + 2 * per_head + 2 * Np * BQB + kLanes, 0.0f),
        Qg(aligned(buffer.data())),
        Kg(Qg + G * per_head),
        Vg(Kg + G * per_head),
        Gg(Vg + G * per_head),
        dQg(Gg + G * per_head),
        dKg(dQg + G * per_head),
        dVg(dKg + G * per_head),
        Qt(dVg + G * per_head),
        Gt(Qt + per_head),
        Pt(Gt + per_head),
        dSt(Pt + Np * BQB) {}
  BackwardScratch(const BackwardScratch&) = delete;
  BackwardScratch& operator=(const BackwardScratch&) = delete;
};

// One head of the backward: its staged operands and gradients (Np x Dp), bias and saved lse.
struct BackwardHead {
  const float *Q, *K, *V, *G;  // G: the upstream gradient dO
  float *dQ, *dK, *dV;
  const float* bias;  // transposed [key][query] (row stride Np), or nullptr
  float* dbias;       // this thread's sums of dbias^T, same layout, or nullptr
  const float* lse;   // query i's at lse[i * lse_stride]
  int64_t lse_stride;
};

// The softmax's backward for the kLanes queries of chunk c in the block of queries from c0,
// lane-wise: P^T recomputed from the saved log-sum-exp over S^T, then dS^T = P^T * (dP^T - delta)
// over dP^T, summed into dbias^T.
void softmax_backward(const Dims& d, const BackwardHead& h, BackwardScratch& s, int64_t c0, int64_t c, bool causal) {
  const int64_t q0 = c * kLanes, Np = d.Np;
  float* const Pt = s.Pt + q0 - c0;
  float* const dSt = s.dSt + q0 - c0;
  const int64_t jmax = causal ? std::min(d.N, (c + 1) * kLanes) : d.N;
  const vint lanes = iota(q0);
  vfloat lse_c = {};
  for (int64_t i = q0; i < std::min(d.N, (c + 1) * kLanes); ++i) lse_c[i - q0] = h.lse[i * h.lse_stride];
  vfloat delta = {}, sum = {};
  for (int64_t j = 0; j < jmax; ++j) {
    float* col = Pt + j * BQB;
    vfloat x = load(col);
    if (h.bias != nullptr) x += load(h.bias + j * Np + q0);
    vfloat p = simd::exp(x - lse_c);
    if (causal) p = lanes >= static_cast<int32_t>(j) ? p : vfloat{};
    p = lanes < static_cast<int32_t>(d.N) ? p : vfloat{};  // padded queries
    store(col, p);
    delta += p * load(dSt + j * BQB);
    sum += p;
  }
  // delta_i = rowsum(P * dP) == dO_i . O_i, lane-wise
  delta *= softmax_renorm(sum);
  for (int64_t j = 0; j < jmax; ++j) {
    float* dcol = dSt + j * BQB;
    const vfloat ds = load(Pt + j * BQB) * (load(dcol) - delta);
    store(dcol, ds);
    if (h.dbias != nullptr) store(h.dbias + j * Np + q0, load(h.dbias + j * Np + q0) + ds);
  }
}

// One head of the backward, in blocks of BQB queries: the block's S^T and dP^T (keys x queries),
// the softmax's backward, its rows of dQ, and its terms of dK and dV.
void backward_head(const Dims& d, const BackwardHead& h, BackwardScratch& s, bool causal, RowsTimesMat mm_col,
                   RowsTimesMat mm_row) {
  transpose_tiles(h.Q, d.Dp, s.Qt, d.Np, d.Np, d.Dp);
  transpose_tiles(h.G, d.Dp, s.Gt, d.Np, d.Np, d.Dp);
  std::fill_n(h.dK, d.Np * d.Dp, 0.0f);
  std::fill_n(h.dV, d.Np * d.Dp, 0.0f);
  const Mask rows = causal ? Mask::kCausal : Mask::kAll, cols = causal ? Mask::kCausalTransposed : Mask::kAll;
  for (int64_t c0 = 0; c0 < d.Np; c0 += BQB) {
    const int64_t qb = std::min(BQB, d.Np - c0);
    const int64_t keys = causal ? std::min(d.N8, (c0 + qb + 7) / 8 * 8) : d.N8;  // causal: keys <= queries
    rows_dot_cols({h.K, d.Dp, s.Qt + c0, d.Np, s.Pt, BQB, qb, d.D, causal, c0 / kLanes}, keys);   // S^T
    rows_dot_cols({h.V, d.Dp, s.Gt + c0, d.Np, s.dSt, BQB, qb, d.D, causal, c0 / kLanes}, keys);  // dP^T = V dO^T
    for (int64_t c = c0 / kLanes; c < (c0 + qb) / kLanes; ++c) softmax_backward(d, h, s, c0, c, causal);
    mm_col(s.dSt, BQB, h.K, h.dQ + c0 * d.Dp, qb, d.N, rows, nullptr, c0, false);  // dQ = dS K
    // the block's queries past N (padding) have zero P and dS
    mm_row(s.Pt, BQB, h.G + c0 * d.Dp, h.dV, keys, qb, cols, nullptr, c0, true);   // dV += P^T dO
    mm_row(s.dSt, BQB, h.Q + c0 * d.Dp, h.dK, keys, qb, cols, nullptr, c0, true);  // dK += dS^T Q
  }
}

}  // namespace

template <typename T>
void blocked_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias,
                     at::Tensor& out, at::Tensor& lse, bool temporal, bool causal) {
  const Sizes z = sizes_of(q, temporal);
  const Dims d = dims_of(z);
  const auto [qp, kp, vp, op, lp, qv, kv, vv, ov, lv] = fwd_operands<T>(q, k, v, out, lse, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t H = z.H, per_head = d.Np * d.Dp;
  const int64_t G = heads_per_group(H, per_head, 65536);
  const RowsTimesMat pv = rows_times_mat_for<true>(d.Dp);
  const bool stream = streamed(out);
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch s(G, per_head, d.Np);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / z.A, a = item % z.A;
      for (int64_t h0 = 0; h0 < H; h0 += G) {
        const int64_t g = std::min(G, H - h0);
        load_group(head_ptr(qp, qv, b, a, h0), qv, d, g, scale, s.Qg);
        load_group(head_ptr(kp, kv, b, a, h0), kv, d, g, 1.0f, s.Kg);
        load_group(head_ptr(vp, vv, b, a, h0), vv, d, g, 1.0f, s.Vg);
        for (int64_t hh = 0; hh < g; ++hh) {
          const int64_t h = h0 + hh, off = hh * per_head;
          const ForwardHead head{s.Kg + off, s.Vg + off, s.Og + off, bias != nullptr ? bias + h * d.N * d.Np : nullptr,
                                 head_ptr(lp, lv, b, a, h), lv.sn};
          forward_head(d, head, s.Qg + off, s, causal, pv);
        }
        store_group(s.Og, d, g, 1.0f, head_ptr(op, ov, b, a, h0), ov, stream);
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
  const Dims d = dims_of(z);
  const auto [gp, qp, kp, vp, lp, dqp, dkp, dvp, gv, qv, kv, vv, lv, dqv, dkv, dvv] =
      bwd_operands<T>(grad_out, q, k, v, lse, dq, dk, dv, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.D));
  const int64_t H = z.H, per_head = d.Np * d.Dp, per_bias = d.N * d.Np;
  const int64_t G = heads_per_group(H, per_head, 8192);
  const RowsTimesMat mm_col = rows_times_mat_for<true>(d.Dp);
  const RowsTimesMat mm_row = rows_times_mat_for<false>(d.Dp);
  const bool stream = streamed(dq);
  at::parallel_for(0, z.B * z.A, 1, [&](int64_t begin, int64_t end) {
    // dbias^T (H x N x Np) is accumulated per thread (summed by the caller): no atomics
    float* dbias_t = dbias_acc != nullptr ? dbias_acc + at::get_thread_num() * H * per_bias : nullptr;
    BackwardScratch s(G, per_head, d.Np);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / z.A, a = item % z.A;
      for (int64_t h0 = 0; h0 < H; h0 += G) {
        const int64_t g = std::min(G, H - h0);
        load_group(head_ptr(qp, qv, b, a, h0), qv, d, g, scale, s.Qg);
        load_group(head_ptr(kp, kv, b, a, h0), kv, d, g, 1.0f, s.Kg);
        load_group(head_ptr(vp, vv, b, a, h0), vv, d, g, 1.0f, s.Vg);
        load_group(head_ptr(gp, gv, b, a, h0), gv, d, g, 1.0f, s.Gg);
        for (int64_t hh = 0; hh < g; ++hh) {
          const int64_t h = h0 + hh, off = hh * per_head;
          const BackwardHead head{s.Qg + off, s.Kg + off, s.Vg + off, s.Gg + off, s.dQg + off, s.dKg + off, s.dVg + off,
                                  bias != nullptr ? bias + h * per_bias : nullptr,
                                  dbias_t != nullptr ? dbias_t + h * per_bias : nullptr, head_ptr(lp, lv, b, a, h),
                                  lv.sn};
          backward_head(d, head, s, causal, mm_col, mm_row);
        }
        store_group(s.dQg, d, g, scale, head_ptr(dqp, dqv, b, a, h0), dqv, stream);
        store_group(s.dKg, d, g, 1.0f, head_ptr(dkp, dkv, b, a, h0), dkv, stream);
        store_group(s.dVg, d, g, 1.0f, head_ptr(dvp, dvv, b, a, h0), dvv, stream);
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

PVKERNELS_ATTENTION_INSTANTIATE(blocked);

}  // namespace attention
}  // namespace pvkernels
