// Lookup-free quantisation entropy on the CPU, streamed over the 2^d codes of each row without
// the N x 2^d probability matrix. A row's code probabilities factor over its d bits, so the log
// probability of code c = (ch, cl) (high and low bit halves) is lh[ch] + ll[cl]: two tables of
// 2^(d/2) entries built per row (doubling, all terms <= 0: no cancellation), then one pass over
// the (ch, cl) grid with kLanes codes per step. Forward: the clamped entropy
// -sum_c p log max(p, eps). Backward: per bit, the sums of u(c) = p(c) g(c) over the codes whose
// bit is 1 and 0, g(c) = dH/dp weighted per row plus an optional per-code gradient of avg_prob.
// Math in fp32 (tables and sums), parallel over rows; extra memory O(threads * 2^(d/2)).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "simd.h"

namespace pvkernels {
namespace {

using simd::kLanes, simd::vfloat;

constexpr int kMaxBits = 24;
// exp(-87) ~ 1.6e-38 is the smallest probability kept (lanes below are 0): no denormals, and
// 2^24 codes of it sum to < 3e-31, far below what an fp32 entropy resolves
constexpr float kMinLogP = -87.0f;

// The log-probability table of k bits (features f0 .. f0 + k - 1, the first the highest bit of
// the index): t[j] = sum_i (bit i of j ? lqp : lqm)[f0 + i]; padded to `padded` entries with -inf.
void log_table(const float* lqp, const float* lqm, int f0, int k, int64_t padded, float* t) {
  t[0] = 0.0f;
  for (int i = 0; i < k; ++i) {
    const int64_t n = int64_t{1} << i;
    for (int64_t j = n - 1; j >= 0; --j) {  // in place: index 2 j + bit from j
      const float base = t[j];
      t[2 * j] = base + lqm[f0 + i];
      t[2 * j + 1] = base + lqp[f0 + i];
    }
  }
  for (int64_t j = int64_t{1} << k; j < padded; ++j) t[j] = -std::numeric_limits<float>::infinity();
}

// p = exp(lp) where lp >= kMinLogP, else 0 (exp of a clamped argument: -inf padding stays finite)
inline vfloat prob(vfloat lp) {
  return lp >= kMinLogP ? simd::exp(simd::max(lp, simd::splat(kMinLogP))) : simd::splat(0.0f);
}

struct Shape {
  int64_t rows;
  int d, dl, dh;      // bits, low bits, high bits
  int64_t nl, nh;     // 2^dl, 2^dh
  int64_t padded;     // nl rounded up to whole vectors
};

Shape shape_of(const at::Tensor& lqp, int64_t low_bits) {
  Shape s;
  s.rows = lqp.size(0);
  s.d = static_cast<int>(lqp.size(1));
  s.dl = static_cast<int>(low_bits);
  s.dh = s.d - s.dl;
  s.nl = int64_t{1} << s.dl;
  s.nh = int64_t{1} << s.dh;
  s.padded = simd::round_up(s.nl);
  return s;
}

void check(const at::Tensor& lqp, const at::Tensor& lqm, int64_t low_bits) {
  TORCH_CHECK_VALUE(lqp.dim() == 2 && lqm.sizes() == lqp.sizes(),
                    "lfq_entropy: the cpp kernel takes two (rows, d) log-factor tables of one shape, got ",
                    lqp.sizes(), " and ", lqm.sizes());
  TORCH_CHECK_TYPE(lqp.scalar_type() == at::kFloat && lqm.scalar_type() == at::kFloat,
                   "lfq_entropy: the cpp kernel takes float32 log factors, got ", lqp.scalar_type());
  TORCH_CHECK_VALUE(lqp.is_contiguous() && lqm.is_contiguous(), "lfq_entropy: log factors must be contiguous");
  TORCH_CHECK_VALUE(lqp.device().is_cpu() && lqm.device().is_cpu(), "lfq_entropy: the cpp backend needs CPU tensors");
  const int64_t d = lqp.size(1);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxBits, "lfq_entropy: d = ", d, " bits per codebook, expected 1 to ", kMaxBits);
  TORCH_CHECK_VALUE(low_bits >= 1 && low_bits <= d, "lfq_entropy: low_bits = ", low_bits, ", expected 1 to d = ", d);
}

}  // namespace

at::Tensor lfq_entropy_fwd_cpp(const at::Tensor& lqp, const at::Tensor& lqm, int64_t low_bits, double log_eps) {
  check(lqp, lqm, low_bits);
  const Shape s = shape_of(lqp, low_bits);
  at::Tensor out = at::empty({s.rows}, lqp.options());
  const float* P = lqp.const_data_ptr<float>();
  const float* M = lqm.const_data_ptr<float>();
  float* H = out.mutable_data_ptr<float>();
  const float leps = static_cast<float>(log_eps);
  at::parallel_for(0, s.rows, 1, [&](int64_t begin, int64_t end) {
    simd::FlushDenormals ftz;
    std::vector<float> ll(s.padded), lh(s.nh);
    for (int64_t r = begin; r < end; ++r) {
      log_table(P + r * s.d, M + r * s.d, s.dh, s.dl, s.padded, ll.data());
      log_table(P + r * s.d, M + r * s.d, 0, s.dh, s.nh, lh.data());
      vfloat acc = {};
      for (int64_t ch = 0; ch < s.nh; ++ch) {
        const float a = lh[ch];
        if (a < kMinLogP) continue;  // every code of this row of the grid is below the floor
        for (int64_t v = 0; v < s.padded; v += kLanes) {
          const vfloat lp = a + simd::load(ll.data() + v);
          acc += prob(lp) * simd::max(lp, simd::splat(leps));
        }
      }
      H[r] = -simd::reduce_add(acc);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lfq_entropy_bwd_cpp(const at::Tensor& lqp, const at::Tensor& lqm,
                                                       int64_t low_bits, double log_eps, const at::Tensor& w_entropy,
                                                       const at::Tensor& w_avg,
                                                       const std::optional<at::Tensor>& grad_avg) {
  check(lqp, lqm, low_bits);
  const Shape s = shape_of(lqp, low_bits);
  for (const at::Tensor* w : {&w_entropy, &w_avg}) {
    TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == s.rows && w->scalar_type() == at::kFloat && w->is_contiguous(),
                      "lfq_entropy: row weights must be contiguous float32 (rows,) = (", s.rows, ",), got ",
                      w->sizes());
  }
  const bool has_g = grad_avg.has_value() && grad_avg->defined();
  int64_t C = 1;
  const float* G = nullptr;
  if (has_g) {
    TORCH_CHECK_VALUE(grad_avg->dim() == 2 && grad_avg->size(1) == (int64_t{1} << s.d) &&
                          grad_avg->scalar_type() == at::kFloat && grad_avg->is_contiguous(),
                      "lfq_entropy: grad_avg must be contiguous float32 (C, 2^d), got ", grad_avg->sizes());
    C = grad_avg->size(0);
    TORCH_CHECK_VALUE(C >= 1 && s.rows % C == 0, "lfq_entropy: rows = ", s.rows, " is not a multiple of C = ", C);
    G = grad_avg->const_data_ptr<float>();
  }
  at::Tensor plus = at::empty({s.rows, s.d}, lqp.options()), minus = at::empty({s.rows, s.d}, lqp.options());
  const float* P = lqp.const_data_ptr<float>();
  const float* M = lqm.const_data_ptr<float>();
  const float* WH = w_entropy.const_data_ptr<float>();
  const float* WA = w_avg.const_data_ptr<float>();
  float* AP = plus.mutable_data_ptr<float>();
  float* AM = minus.mutable_data_ptr<float>();
  const float leps = static_cast<float>(log_eps);
  const int tail = s.nl < kLanes ? static_cast<int>(s.nl) : kLanes;  // lanes of G a step may read
  at::parallel_for(0, s.rows, 1, [&](int64_t begin, int64_t end) {
    simd::FlushDenormals ftz;
    std::vector<float> ll(s.padded), lh(s.nh), low(s.padded);
    std::vector<double> ap(s.d), am(s.d);
    for (int64_t r = begin; r < end; ++r) {
      log_table(P + r * s.d, M + r * s.d, s.dh, s.dl, s.padded, ll.data());
      log_table(P + r * s.d, M + r * s.d, 0, s.dh, s.nh, lh.data());
      std::fill(low.begin(), low.end(), 0.0f);
      std::fill(ap.begin(), ap.end(), 0.0), std::fill(am.begin(), am.end(), 0.0);
      const vfloat wh = simd::splat(WH[r]), wa = simd::splat(has_g ? WA[r] : 0.0f);
      const float* g_row = has_g ? G + (r % C) * (s.nh * s.nl) : nullptr;
      for (int64_t ch = 0; ch < s.nh; ++ch) {
        const float a = lh[ch];
        if (a < kMinLogP) continue;
        vfloat high = {};
        for (int64_t v = 0; v < s.padded; v += kLanes) {
          const vfloat lp = a + simd::load(ll.data() + v);
          // dH/dp of -p log max(p, eps): -(log p + 1) where p >= eps, -log eps below
          vfloat g = wh * (lp >= leps ? -(lp + 1.0f) : simd::splat(-leps));
          if (has_g) {
            const float* gp = g_row + ch * s.nl + v;
            g += wa * (tail == kLanes ? simd::load(gp) : simd::load_partial(gp, tail));
          }
          const vfloat u = prob(lp) * g;
          simd::store(low.data() + v, simd::load(low.data() + v) + u);
          high += u;
        }
        const double sum = simd::reduce_add(high);
        for (int i = 0; i < s.dh; ++i) ((ch >> (s.dh - 1 - i)) & 1 ? ap : am)[i] += sum;
      }
      // the low bits' sums by halving: the top bit of an n-entry table splits it into halves
      // (minus, plus); folding the halves leaves the table of the remaining bits, O(2^dl) in all
      for (int64_t i = s.dh, n = s.nl; i < s.d; ++i, n /= 2) {
        double sums[2] = {0.0, 0.0};
        for (int64_t k = 0; k < n / 2; ++k) {
          sums[0] += low[k], sums[1] += low[k + n / 2];
          low[k] += low[k + n / 2];
        }
        am[i] += sums[0], ap[i] += sums[1];
      }
      for (int i = 0; i < s.d; ++i) {
        AP[r * s.d + i] = static_cast<float>(ap[i]);
        AM[r * s.d + i] = static_cast<float>(am[i]);
      }
    }
  });
  return {plus, minus};
}

}  // namespace pvkernels
