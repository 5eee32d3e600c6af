// Fused VQ codebook lookup on the CPU: for each row z_i, argmin_k ||e_k||^2 - 2 <z_i, e_k>
// (||z_i||^2 is constant per row, so it is dropped) plus the gather zq_i = e_{idx_i}, without
// the N x K distance matrix. Rows are split into tiles of BN, the codebook into tiles of BK;
// each (BN x BK) block of dot products is one small single-threaded GEMM (ATen's BLAS) into a
// reused scratch, scanned at once by a kLanes-wide running min/argmin (simd.h), or for the k nearest
// codes (vq_lookup_topk) by a small sorted top-k per row that most groups of scores skip with one
// compare against the row's k-th best. Parallel over row tiles; extra memory O(threads * BN * BK)
// plus a fp32 copy of the codebook. Math in fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace pvkernels {
namespace {

// BN x BK fp32 = 512 KiB of dot products per thread: stays in L2 between the GEMM that writes
// it and the scan that reads it. BN amortises the packing of each codebook tile by the BLAS.
constexpr int64_t BN = 256;
constexpr int64_t BK = 512;
using simd::kLanes, simd::vfloat, simd::vint;  // BK is a multiple of kLanes

inline at::TensorOptions f32() { return at::TensorOptions().dtype(at::kFloat); }

// The codebook as fp32, contiguous; for the cosine metric rows are normalised (as
// F.normalize, eps 1e-12) and the bias is 0, so the same argmin of bias - 2 <z, e> serves both.
template <typename scalar_t>
std::tuple<at::Tensor, std::vector<float>> prepare_codebook(const at::Tensor& codebook, bool cosine) {
  const int64_t K = codebook.size(0), D = codebook.size(1);
  at::Tensor cb = at::empty({K, D}, codebook.options().dtype(at::kFloat));
  float* cp = cb.mutable_data_ptr<float>();
  simd::to_f32(codebook.const_data_ptr<scalar_t>(), K * D, cp);  // codebook is contiguous
  std::vector<float> bias(K, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    float* row = cp + k * D;
    double sq = 0.0;
    for (int64_t d = 0; d < D; ++d) sq += static_cast<double>(row[d]) * row[d];
    if (cosine) {
      const float inv = static_cast<float>(1.0 / std::max(std::sqrt(sq), 1e-12));
      for (int64_t d = 0; d < D; ++d) row[d] *= inv;
    } else {
      bias[k] = static_cast<float>(sq);
    }
  }
  return {cb, bias};
}

// Running (value, index) of one row, lane by lane: lane l sees k = l, l + kLanes, ... in
// ascending order and keeps the first strict minimum, so the smallest index wins exact ties once
// the lanes are merged by (value, index).
struct RowMin {
  vfloat value;
  vint index;
  void reset() {
    value = simd::splat(std::numeric_limits<float>::infinity());
    index = vint{};
  }
  std::pair<float, int32_t> best() const {
    const float v = simd::reduce_min(value);
    return {v, simd::reduce_min(value == v ? index : vint{} + std::numeric_limits<int32_t>::max())};
  }
};

// Scans rows [i0, i0 + R) of a tile of dot products (row stride ld) into their running minima:
// scores bias[k] - 2 dots[k] for k in [0, n) of a tile starting at k0; n is a multiple of kLanes
// (2 * dots is exact, so the fused multiply-add rounds as bias - 2 * dots does). R rows at once:
// each bias vector is loaded once and R independent compare/blend chains hide each other's latency.
template <int R>
void scan_rows(const float* dots, int64_t ld, int64_t i0, const float* bias, int32_t k0, int64_t n, RowMin* rows) {
  vfloat v[R];
  vint x[R];
  for (int r = 0; r < R; ++r) v[r] = rows[i0 + r].value, x[r] = rows[i0 + r].index;
  vint k = simd::iota(k0);
  for (int64_t j = 0; j < n; j += kLanes) {
    const vfloat b = simd::load(bias + j);
    for (int r = 0; r < R; ++r) {
      const vfloat s = b - 2.0f * simd::load(dots + (i0 + r) * ld + j);
      const vint lt = s < v[r];
      v[r] = lt ? s : v[r];
      x[r] = lt ? k : x[r];
    }
    k += kLanes;
  }
  for (int r = 0; r < R; ++r) rows[i0 + r].value = v[r], rows[i0 + r].index = x[r];
}

void scan_tile(const float* dots, int64_t ld, int64_t bn, const float* bias, int32_t k0, int64_t n, RowMin* rows) {
  int64_t i = 0;
  for (; i + 4 <= bn; i += 4) scan_rows<4>(dots, ld, i, bias, k0, n, rows);
  for (; i < bn; ++i) scan_rows<1>(dots, ld, i, bias, k0, n, rows);
}

// The k nearest codes of one row, best first: (value, index) ascending, lexicographically, so an
// exact tie goes to the smaller index. Empty slots hold (+inf, kNoCode), worse than every code
// (a NaN score counts as +inf: such a code still fills a slot, after every finite one).
constexpr int32_t kNoCode = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxTopK = 64;  // as pvkernels/ops/vq.py's MAX_TOPK

inline bool before(float v, int32_t x, float w, int32_t y) { return v < w || (v == w && x < y); }

inline void insert_sorted(float* value, int32_t* index, int k, float s, int32_t code) {
  int pos = k - 1;
  for (; pos > 0 && before(s, code, value[pos - 1], index[pos - 1]); --pos) {
    value[pos] = value[pos - 1];
    index[pos] = index[pos - 1];
  }
  value[pos] = s;
  index[pos] = code;
}

// Scans one row of a tile of dot products (scores bias[j] - 2 dots[j], j in [0, n), n a multiple of
// kLanes) into its sorted top-k. Most groups of kGroup scores hold nothing better than the row's
// k-th best: their minimum (a running `s < m ? s : m`, which skips NaN lanes) is compared once, and
// only a group that reaches it is walked score by score.
// Aligned to a cache line: unchanged, it ran 4-6% slower (Zen 4, k = 8) when edits elsewhere in the
// extension moved its start from 0 to 48 mod 64.
constexpr int kGroup = 4;
__attribute__((aligned(64))) void scan_row_topk(const float* dots, const float* bias, int32_t k0, int64_t n,
                                                float* value, int32_t* index, int k) {
  const float inf = std::numeric_limits<float>::infinity();
  alignas(64) float s[kGroup * kLanes];
  auto walk = [&](int64_t j, int count) {
    for (int l = 0; l < count; ++l) {
      const float v = s[l] == s[l] ? s[l] : inf;
      const int32_t code = k0 + static_cast<int32_t>(j + l);
      if (before(v, code, value[k - 1], index[k - 1])) insert_sorted(value, index, k, v, code);
    }
  };
  int64_t j = 0;
  for (; j + kGroup * kLanes <= n; j += kGroup * kLanes) {
    vfloat m = simd::splat(inf);
    for (int g = 0; g < kGroup; ++g) {
      const vfloat v = simd::load(bias + j + g * kLanes) - 2.0f * simd::load(dots + j + g * kLanes);
      simd::store(s + g * kLanes, v);
      m = v < m ? v : m;
    }
    if (simd::reduce_min(m) <= value[k - 1]) walk(j, kGroup * kLanes);
  }
  for (; j < n; j += kLanes) {
    const vfloat v = simd::load(bias + j) - 2.0f * simd::load(dots + j);
    simd::store(s, v);
    walk(j, kLanes);
  }
}

// The fp32 codebook (K x D, contiguous) and each code's score bias, padded to K_pad codes (a
// multiple of kLanes): padded columns score +inf - 2 * 0 = +inf and never win.
struct Codebook {
  const float* cp;
  int64_t K, K_pad, D;
  std::vector<float> bias;  // K_pad
};
Codebook padded_codebook(const at::Tensor& cb, const std::vector<float>& bias_in) {
  const int64_t K = cb.size(0), K_pad = simd::round_up(K);
  Codebook book{cb.const_data_ptr<float>(), K, K_pad, cb.size(1),
                std::vector<float>(K_pad, std::numeric_limits<float>::infinity())};
  std::copy(bias_in.begin(), bias_in.end(), book.bias.begin());
  return book;
}

// How the codebook is split across threads: `count` splits of `blocks` BK-tiles each (the last may
// hold fewer). Few row tiles (small N) would leave threads idle: the codebook is then split too.
struct Splits {
  int64_t count, blocks;
};
Splits plan_splits(int64_t n_tiles, int64_t K) {
  const int64_t n_k_blocks = (K + BK - 1) / BK;
  const int64_t threads = at::get_num_threads();
  const int64_t count = n_tiles >= threads ? 1 : std::min(n_k_blocks, (threads + n_tiles - 1) / n_tiles);
  const int64_t blocks = (n_k_blocks + count - 1) / count;
  return {(n_k_blocks + blocks - 1) / blocks, blocks};
}

// A thread's current row tile of z (up to BN rows from t * BN) as fp32 (bn, D): a view of z for
// fp32; fp16/bf16 rows are upcast into `buffer` once per tile.
template <typename scalar_t>
struct RowTile {
  static constexpr bool kFloat = std::is_same<scalar_t, float>::value;
  const scalar_t* zp;
  int64_t N, D;
  at::Tensor buffer, rows;
  int64_t loaded = -1;

  RowTile(const scalar_t* z, int64_t n, int64_t d)
      : zp(z), N(n), D(d), buffer(kFloat ? at::Tensor() : at::empty({BN, d}, f32())) {}

  const at::Tensor& load(int64_t t) {
    if (loaded == t) return rows;
    const int64_t n0 = t * BN, bn = std::min(BN, N - n0);
    if constexpr (kFloat) {
      rows = at::from_blob(const_cast<float*>(zp + n0 * D), {bn, D}, f32());
    } else {
      simd::to_f32(zp + n0 * D, bn * D, buffer.mutable_data_ptr<float>());
      rows = buffer.narrow(0, 0, bn);
    }
    loaded = t;
    return rows;
  }
};

// The rows zs (bn x D, fp32) against codes [k_begin, k_end): one GEMM of up to BK codes at a time
// into the thread's scratch `dots` (BN x min(BK, K_pad)), scanned at once into `rows` by `select`.
template <typename Select>
void scan_codes(const at::Tensor& zs, const Codebook& book, int64_t k_begin, int64_t k_end, at::Tensor& dots,
                const Select& select, typename Select::Rows& rows) {
  const int64_t bn = zs.size(0), D = book.D;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    const int64_t bk = std::min(BK, book.K - k0), bk_pad = std::min(BK, book.K_pad - k0);
    at::Tensor et = at::from_blob(const_cast<float*>(book.cp + k0 * D), {bk, D}, f32());
    at::Tensor out = dots.narrow(0, 0, bn).narrow(1, 0, bk);
    at::mm_out(out, zs, et.t());
    float* dp = dots.mutable_data_ptr<float>();
    const int64_t ld = dots.size(1);
    if (bk_pad > bk) {  // the padding tail of the last tile
      for (int64_t i = 0; i < bn; ++i) std::memset(dp + i * ld + bk, 0, (bk_pad - bk) * sizeof(float));
    }
    select.scan(dp, ld, bn, book.bias.data() + k0, static_cast<int32_t>(k0), bk_pad, rows);
  }
}

// Row tiles x codebook tiles: each (bn x bk) block of dot products is one GEMM into a per-thread
// scratch, scanned at once by `select`. Where the codebook is split (plan_splits), each split
// keeps its own result per row, and `select.merge` combines the splits in ascending k. Select
// provides Rows (per-thread state of BN rows), prepare(splits), rows(), reset(rows, bn),
// scan(dots, ld, bn, bias, k0, n, rows), finish(rows, n0, bn, split, splits), merge(splits).
template <typename scalar_t, typename Select>
void scan_codebook(const at::Tensor& z, const at::Tensor& cb, const std::vector<float>& bias_in, Select& select) {
  const int64_t N = z.size(0), D = z.size(1);
  const Codebook book = padded_codebook(cb, bias_in);
  const int64_t n_tiles = (N + BN - 1) / BN;
  const Splits splits = plan_splits(n_tiles, book.K);
  select.prepare(splits.count);

  at::parallel_for(0, n_tiles * splits.count, 1, [&](int64_t begin, int64_t end) {
    at::Tensor dots = at::empty({BN, std::min(BK, book.K_pad)}, f32());
    RowTile<scalar_t> tile(z.const_data_ptr<scalar_t>(), N, D);
    typename Select::Rows rows = select.rows();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / splits.count, split = item % splits.count;
      const int64_t n0 = t * BN, bn = std::min(BN, N - n0);
      const at::Tensor& zs = tile.load(t);
      select.reset(rows, bn);
      const int64_t k_begin = split * splits.blocks * BK, k_end = std::min(book.K, k_begin + splits.blocks * BK);
      scan_codes(zs, book, k_begin, k_end, dots, select, rows);
      select.finish(rows, n0, bn, split, splits.count);
    }
  });
  if (splits.count > 1) select.merge(splits.count);
}

// k = 1: a running (min, argmin) per row; writes idx (N) and zq (N, D).
template <typename scalar_t>
struct NearestCode {
  using Rows = std::vector<RowMin>;
  int64_t N, D;
  const scalar_t* ep;
  int64_t* ip;
  scalar_t* qp;
  std::vector<float> part_value;
  std::vector<int32_t> part_index;

  void prepare(int64_t splits) {
    part_value.resize(splits > 1 ? splits * N : 0);
    part_index.resize(splits > 1 ? splits * N : 0);
  }
  Rows rows() const { return Rows(BN); }
  void reset(Rows& rows, int64_t bn) const {
    for (int64_t i = 0; i < bn; ++i) rows[i].reset();
  }
  void scan(const float* dots, int64_t ld, int64_t bn, const float* bias, int32_t k0, int64_t n, Rows& rows) const {
    scan_tile(dots, ld, bn, bias, k0, n, rows.data());
  }
  void emit(int64_t row, int64_t k) const {
    ip[row] = k;
    std::memcpy(qp + row * D, ep + k * D, D * sizeof(scalar_t));
  }
  void finish(const Rows& rows, int64_t n0, int64_t bn, int64_t split, int64_t splits) {
    for (int64_t i = 0; i < bn; ++i) {
      const auto [v, k] = rows[i].best();
      if (splits == 1) {
        emit(n0 + i, k);
      } else {
        part_value[split * N + n0 + i] = v;
        part_index[split * N + n0 + i] = k;
      }
    }
  }
  void merge(int64_t splits) const {  // strict <: ties stay with the smallest index
    for (int64_t row = 0; row < N; ++row) {
      float v = part_value[row];
      int32_t k = part_index[row];
      for (int64_t split = 1; split < splits; ++split) {
        if (part_value[split * N + row] < v) {
          v = part_value[split * N + row];
          k = part_index[split * N + row];
        }
      }
      emit(row, k);
    }
  }
};

// k > 1: a sorted top-k per row; writes idx (N, k) and zq (N, k, D).
template <typename scalar_t>
struct NearestCodes {
  struct Rows {
    std::vector<float> value;
    std::vector<int32_t> index;
  };
  int64_t N, D;
  int k;
  const scalar_t* ep;
  int64_t* ip;
  scalar_t* qp;
  Rows parts;  // splits x N x k

  void prepare(int64_t splits) {
    parts.value.resize(splits > 1 ? splits * N * k : 0);
    parts.index.resize(splits > 1 ? splits * N * k : 0);
  }
  Rows rows() const { return {std::vector<float>(BN * k), std::vector<int32_t>(BN * k)}; }
  void reset(Rows& rows, int64_t bn) const {
    std::fill_n(rows.value.begin(), bn * k, std::numeric_limits<float>::infinity());
    std::fill_n(rows.index.begin(), bn * k, kNoCode);
  }
  void scan(const float* dots, int64_t ld, int64_t bn, const float* bias, int32_t k0, int64_t n, Rows& rows) const {
    for (int64_t i = 0; i < bn; ++i) {
      scan_row_topk(dots + i * ld, bias, k0, n, rows.value.data() + i * k, rows.index.data() + i * k, k);
    }
  }
  void emit(int64_t row, const int32_t* index) const {
    for (int j = 0; j < k; ++j) {
      ip[row * k + j] = index[j];
      std::memcpy(qp + (row * k + j) * D, ep + index[j] * D, D * sizeof(scalar_t));
    }
  }
  void finish(const Rows& rows, int64_t n0, int64_t bn, int64_t split, int64_t splits) {
    if (splits == 1) {
      for (int64_t i = 0; i < bn; ++i) emit(n0 + i, rows.index.data() + i * k);
      return;
    }
    const int64_t at = (split * N + n0) * k;
    std::copy_n(rows.value.begin(), bn * k, parts.value.begin() + at);
    std::copy_n(rows.index.begin(), bn * k, parts.index.begin() + at);
  }
  void merge(int64_t splits) const {  // each split's list is sorted: insert the later ones into the first
    std::vector<float> value(k);
    std::vector<int32_t> index(k);
    for (int64_t row = 0; row < N; ++row) {
      std::copy_n(parts.value.begin() + row * k, k, value.begin());
      std::copy_n(parts.index.begin() + row * k, k, index.begin());
      for (int64_t split = 1; split < splits; ++split) {
        const int64_t at = (split * N + row) * k;
        for (int j = 0; j < k; ++j) {
          const float v = parts.value[at + j];
          const int32_t x = parts.index[at + j];
          if (!before(v, x, value[k - 1], index[k - 1])) break;  // the rest of this split is worse still
          insert_sorted(value.data(), index.data(), k, v, x);
        }
      }
      emit(row, index.data());
    }
  }
};

}  // namespace

namespace {
void check_args(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(z.dim() == 2, "vq_lookup: the cpp kernel takes z as (N, D), got ", z.dim(), "-D");
  TORCH_CHECK_VALUE(codebook.dim() == 2, "vq_lookup: codebook must be 2-D (K, D), got ", codebook.dim(), "-D");
  TORCH_CHECK_VALUE(z.size(1) == codebook.size(1), "vq_lookup: z has D = ", z.size(1), " but the codebook has D = ",
                    codebook.size(1));
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, "vq_lookup: the codebook is empty (K = 0)");
  TORCH_CHECK_VALUE(codebook.size(0) < (int64_t{1} << 31) - BK, "vq_lookup: codebook too large (K = ",
                    codebook.size(0), ")");
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16,
                   "vq_lookup: the cpp backend takes float32, float16 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK_TYPE(codebook.scalar_type() == z.scalar_type(), "vq_lookup: z is ", z.scalar_type(),
                   " but the codebook is ", codebook.scalar_type(), "; use the same dtype");
  TORCH_CHECK_VALUE(z.device().is_cpu() && codebook.device().is_cpu(), "vq_lookup: the cpp backend needs CPU tensors");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_lookup_cpp(const at::Tensor& z, const at::Tensor& codebook, bool cosine) {
  check_args(z, codebook);
  const int64_t N = z.size(0), D = z.size(1);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor zq = at::empty({N, D}, codebook.options());
  if (N == 0) return {idx, zq};
  const at::Tensor zc = z.contiguous(), ec = codebook.contiguous();
  simd::with_element_type(z.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto [cb, bias] = prepare_codebook<scalar_t>(ec, cosine);
    NearestCode<scalar_t> select{N, D, ec.const_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>(),
                                 zq.mutable_data_ptr<scalar_t>()};
    scan_codebook<scalar_t>(zc, cb, bias, select);
  });
  return {idx, zq};
}

std::tuple<at::Tensor, at::Tensor> vq_lookup_topk_cpp(const at::Tensor& z, const at::Tensor& codebook, bool cosine,
                                                      int64_t k) {
  check_args(z, codebook);
  TORCH_CHECK_VALUE(k >= 1 && k <= codebook.size(0), "vq_lookup: k must be between 1 and K = ", codebook.size(0),
                    " (the codebook size), got ", k);
  TORCH_CHECK_VALUE(k <= kMaxTopK, "vq_lookup: k = ", k, " is more than the ", kMaxTopK,
                    " nearest codes the kernels keep per row");
  const int64_t N = z.size(0), D = z.size(1);
  at::Tensor idx = at::empty({N, k}, z.options().dtype(at::kLong));
  at::Tensor zq = at::empty({N, k, D}, codebook.options());
  if (N == 0) return {idx, zq};
  const at::Tensor zc = z.contiguous(), ec = codebook.contiguous();
  simd::with_element_type(z.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto [cb, bias] = prepare_codebook<scalar_t>(ec, cosine);
    NearestCodes<scalar_t> select{N, D, static_cast<int>(k), ec.const_data_ptr<scalar_t>(),
                                  idx.mutable_data_ptr<int64_t>(), zq.mutable_data_ptr<scalar_t>(), {}};
    scan_codebook<scalar_t>(zc, cb, bias, select);
  });
  return {idx, zq};
}

}  // namespace pvkernels
