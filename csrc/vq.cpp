// Fused VQ codebook lookup on the CPU: for each row z_i, argmin_k ||e_k||^2 - 2 <z_i, e_k>
// (||z_i||^2 is constant per row, so it is dropped) plus the gather zq_i = e_{idx_i}, without
// the N x K distance matrix. Rows are split into tiles of BN, the codebook into tiles of BK;
// each (BN x BK) block of dot products is one small single-threaded GEMM (ATen's BLAS) into a
// reused scratch, scanned at once by a kLanes-wide running min/argmin (simd.h). Parallel over row tiles;
// extra memory O(threads * BN * BK) plus a fp32 copy of the codebook. Math in fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
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

template <typename scalar_t>
void vq_lookup_kernel(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& cb,
                      const std::vector<float>& bias_in, at::Tensor& idx, at::Tensor& zq) {
  const int64_t N = z.size(0), D = z.size(1), K = cb.size(0);
  const int64_t K_pad = simd::round_up(K);
  // padded columns score +inf - 2 * 0 = +inf and never win
  std::vector<float> bias(K_pad, std::numeric_limits<float>::infinity());
  std::copy(bias_in.begin(), bias_in.end(), bias.begin());
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const scalar_t* ep = codebook.const_data_ptr<scalar_t>();
  const float* cp = cb.const_data_ptr<float>();
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  scalar_t* qp = zq.mutable_data_ptr<scalar_t>();
  const int64_t n_tiles = (N + BN - 1) / BN;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // Few row tiles (small N) would leave threads idle: split the codebook too, keep each
  // split's (min, argmin) per row, and merge the splits in ascending k (strict <: ties stay
  // with the smallest index).
  const int64_t n_k_blocks = (K + BK - 1) / BK;
  const int64_t threads = at::get_num_threads();
  int64_t splits = n_tiles >= threads ? 1 : std::min(n_k_blocks, (threads + n_tiles - 1) / n_tiles);
  const int64_t blocks_per_split = (n_k_blocks + splits - 1) / splits;
  splits = (n_k_blocks + blocks_per_split - 1) / blocks_per_split;
  std::vector<float> part_value(splits > 1 ? splits * N : 0);
  std::vector<int32_t> part_index(splits > 1 ? splits * N : 0);
  auto emit = [&](int64_t row, int64_t k) {
    ip[row] = k;
    std::memcpy(qp + row * D, ep + k * D, D * sizeof(scalar_t));
  };

  at::parallel_for(0, n_tiles * splits, 1, [&](int64_t begin, int64_t end) {
    at::Tensor dots = at::empty({BN, std::min(BK, K_pad)}, f32);
    at::Tensor zt = std::is_same<scalar_t, float>::value ? at::Tensor() : at::empty({BN, D}, f32);
    std::vector<RowMin> rows(BN);
    int64_t loaded = -1;
    at::Tensor zs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / splits, split = item % splits;
      const int64_t n0 = t * BN, bn = std::min(BN, N - n0);
      if (loaded != t) {
        if constexpr (std::is_same<scalar_t, float>::value) {
          zs = at::from_blob(const_cast<float*>(zp + n0 * D), {bn, D}, f32);
        } else {  // fp16/bf16 rows upcast once per tile
          simd::to_f32(zp + n0 * D, bn * D, zt.mutable_data_ptr<float>());
          zs = zt.narrow(0, 0, bn);
        }
        loaded = t;
      }
      for (int64_t i = 0; i < bn; ++i) rows[i].reset();
      const int64_t k_begin = split * blocks_per_split * BK, k_end = std::min(K, k_begin + blocks_per_split * BK);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
        const int64_t bk = std::min(BK, K - k0), bk_pad = std::min(BK, K_pad - k0);
        at::Tensor et = at::from_blob(const_cast<float*>(cp + k0 * D), {bk, D}, f32);
        at::Tensor out = dots.narrow(0, 0, bn).narrow(1, 0, bk);
        at::mm_out(out, zs, et.t());
        float* dp = dots.mutable_data_ptr<float>();
        const int64_t ld = dots.size(1);
        if (bk_pad > bk) {  // the padding tail of the last tile
          for (int64_t i = 0; i < bn; ++i) std::memset(dp + i * ld + bk, 0, (bk_pad - bk) * sizeof(float));
        }
        scan_tile(dp, ld, bn, bias.data() + k0, static_cast<int32_t>(k0), bk_pad, rows.data());
      }
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
  });
  if (splits > 1) {
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
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_lookup_cpp(const at::Tensor& z, const at::Tensor& codebook, bool cosine) {
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
  const int64_t N = z.size(0), D = z.size(1);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor zq = at::empty({N, D}, codebook.options());
  if (N == 0) return {idx, zq};
  const at::Tensor zc = z.contiguous(), ec = codebook.contiguous();
  simd::with_element_type(z.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto [cb, bias] = prepare_codebook<scalar_t>(ec, cosine);
    vq_lookup_kernel<scalar_t>(zc, ec, cb, bias, idx, zq);
  });
  return {idx, zq};
}

}  // namespace pvkernels
