// Fused pseudo-video construction on the CPU: one pass per image plane that reads the plane
// once, and for every frame runs the separable reflect-padded Gaussian blur (vertical then
// horizontal, symmetric taps), the signal scale and the in-register Philox noise, writing
// the frame straight into the (B, T, C, H, W) output. Math in fp32; parallel over planes
// (order "first") or plane x frame pairs (order "high").
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "philox.h"
#include "simd.h"

namespace pvkernels {
namespace {

struct Frame {
  float scale = 1.0f;
  float noise_std = 0.0f;
  int64_t radius = 0;
  std::vector<float> taps;  // taps[i] weighs offsets +i and -i, i = 0..radius
};

// Same formula as the reference (_gaussian_taps): computed in double, normalised, rounded.
std::vector<Frame> make_frames(const std::vector<double>& sigma, const std::vector<double>& noise_std,
                               const std::vector<double>& scale, double truncate, int64_t H, int64_t W) {
  std::vector<Frame> frames(sigma.size());
  for (size_t t = 0; t < sigma.size(); ++t) {
    Frame& f = frames[t];
    f.scale = static_cast<float>(scale[t]);
    f.noise_std = static_cast<float>(noise_std[t]);
    if (sigma[t] > 0.0) {
      double r = std::ceil(truncate * sigma[t]);
      f.radius = static_cast<int64_t>(std::min<double>(r, static_cast<double>(std::min(H, W) - 1)));
    }
    std::vector<double> g(f.radius + 1);
    double total = 0.0;
    for (int64_t i = 0; i <= f.radius; ++i) {
      double d = static_cast<double>(i) / (sigma[t] > 0.0 ? sigma[t] : 1.0);
      g[i] = std::exp(-0.5 * d * d);
      total += i == 0 ? g[i] : 2.0 * g[i];
    }
    f.taps.resize(f.radius + 1);
    for (int64_t i = 0; i <= f.radius; ++i) f.taps[i] = static_cast<float>(g[i] / total);
  }
  return frames;
}

inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

using simd::kLanes, simd::vfloat, simd::load, simd::store;

constexpr int64_t kRows = 4;  // rows per step: independent accumulators hide the FMA latency

// Scratch of one worker. Planes are stored with rows padded to a multiple of kLanes floats
// (stride Wp) so both passes run on whole vectors with the accumulators in registers; the
// padding lanes hold finite junk that never reaches a valid lane or the output.
struct Scratch {
  int64_t Wp, row_len;
  std::vector<float> src, tmp, state, eps, rows;
  Scratch(int64_t H, int64_t W, int64_t max_radius)
      : Wp(simd::round_up(W)),
        row_len(Wp + 2 * max_radius + kLanes),
        src(H * Wp),
        tmp(H * Wp),
        state(H * Wp),
        eps(H * W + kLanes),
        rows(kRows * row_len) {}
};

// Vertical pass of rows [y0, y0 + R) into tmp.
template <int R>
inline void vertical_rows(const float* src, float* tmp, const float* g, int64_t r, int64_t y0, int64_t H,
                          int64_t Wp) {
  for (int64_t xb = 0; xb < Wp; xb += kLanes) {
    vfloat acc[R];
    for (int k = 0; k < R; ++k) acc[k] = g[0] * load(src + (y0 + k) * Wp + xb);
    for (int64_t i = 1; i <= r; ++i) {
      for (int k = 0; k < R; ++k) {
        acc[k] += g[i] * (load(src + reflect(y0 + k - i, H) * Wp + xb) + load(src + reflect(y0 + k + i, H) * Wp + xb));
      }
    }
    for (int k = 0; k < R; ++k) store(tmp + (y0 + k) * Wp + xb, acc[k]);
  }
}

// Horizontal pass of rows [y0, y0 + R) of tmp through reflect-padded row copies; finish()
// applies scale and noise and stores.
template <int R, typename Finish>
inline void horizontal_rows(const float* tmp, float* rows, int64_t row_len, const float* g, int64_t r, int64_t y0,
                            int64_t W, int64_t Wp, const Finish& finish) {
  for (int k = 0; k < R; ++k) {
    const float* in = tmp + (y0 + k) * Wp;
    float* row = rows + k * row_len + r;
    for (int64_t xb = 0; xb < Wp; xb += kLanes) store(row + xb, load(in + xb));
    for (int64_t i = 1; i <= r; ++i) {
      row[-i] = in[i];
      row[W - 1 + i] = in[W - 1 - i];
    }
  }
  for (int64_t xb = 0; xb < Wp; xb += kLanes) {
    vfloat acc[R];
    for (int k = 0; k < R; ++k) acc[k] = g[0] * load(rows + k * row_len + r + xb);
    for (int64_t i = 1; i <= r; ++i) {
      for (int k = 0; k < R; ++k) {
        const float* c = rows + k * row_len + r + xb;
        acc[k] += g[i] * (load(c - i) + load(c + i));
      }
    }
    for (int k = 0; k < R; ++k) finish(acc[k], y0 + k, xb);
  }
}

// dst = scale * G(f) src + noise_std * eps (eps has row stride W and may be null when
// noise_std == 0). src and dst (row stride Wp) may alias: the vertical pass reads src
// completely into tmp first. If out (fp32, W == Wp, vector aligned) is given, the frame is
// also streamed there (written once, not read again here: no read-for-ownership).
// noinline, noclone: one compiled copy for every dtype (GCC would otherwise specialise it per
// caller and contract its products into FMAs differently), so a 16-bit frame is the fp32 frame
// rounded once, bit for bit.
__attribute__((noinline, noclone)) void blur_frame(const Frame& f, const float* src, float* dst, const float* eps,
                                                   int64_t H, int64_t W, Scratch& s, float* out) {
  const int64_t r = f.radius, Wp = s.Wp;
  const float* g = f.taps.data();
  const float scale = f.scale, sd = f.noise_std;
  auto finish = [&](vfloat acc, int64_t y, int64_t xb) {
    acc *= scale;
    if (eps) acc += sd * load(eps + y * W + xb);
    store(dst + y * Wp + xb, acc);
    if (out) simd::store_stream(out + y * Wp + xb, acc);
  };
  if (r == 0) {
    for (int64_t y = 0; y < H; ++y)
      for (int64_t xb = 0; xb < Wp; xb += kLanes) finish(load(src + y * Wp + xb), y, xb);
    return;
  }
  float* tmp = s.tmp.data();
  int64_t y = 0;
  for (; y + kRows <= H; y += kRows) vertical_rows<kRows>(src, tmp, g, r, y, H, Wp);
  for (; y < H; ++y) vertical_rows<1>(src, tmp, g, r, y, H, Wp);
  y = 0;
  for (; y + kRows <= H; y += kRows) horizontal_rows<kRows>(tmp, s.rows.data(), s.row_len, g, r, y, W, Wp, finish);
  for (; y < H; ++y) horizontal_rows<1>(tmp, s.rows.data(), s.row_len, g, r, y, W, Wp, finish);
}

template <typename scalar_t>
void load_plane(const scalar_t* base, int64_t sh, int64_t sw, int64_t H, int64_t W, float* dst, int64_t dst_stride) {
  for (int64_t y = 0; y < H; ++y) {
    const scalar_t* p = base + y * sh;
    float* d = dst + y * dst_stride;
    if (sw == 1) {
      simd::to_f32(p, W, d);
    } else {
      for (int64_t x = 0; x < W; ++x) d[x] = static_cast<float>(p[x * sw]);
    }
  }
}

template <typename scalar_t>
void store_plane(const float* src, int64_t src_stride, int64_t H, int64_t W, scalar_t* dst) {
  for (int64_t y = 0; y < H; ++y) simd::from_f32(src + y * src_stride, W, dst + y * W);
}

template <typename scalar_t>
void pseudo_video_kernel(const at::Tensor& x, const std::vector<Frame>& frames, bool first_order, uint64_t seed,
                         const std::optional<at::Tensor>& noise, at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t T = static_cast<int64_t>(frames.size());
  const int64_t HW = H * W, P = B * C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t xsb = x.stride(0), xsc = x.stride(1), xsh = x.stride(2), xsw = x.stride(3);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const float* np = noise ? noise->const_data_ptr<float>() : nullptr;
  int64_t ns[5] = {0, 0, 0, 0, 0};
  if (noise) for (int d = 0; d < 5; ++d) ns[d] = noise->stride(d);
  int64_t max_radius = 0;
  for (const Frame& f : frames) max_radius = std::max(max_radius, f.radius);

  // eps of frame t of plane (b, c), or null when that frame has no noise.
  auto make_eps = [&](int64_t b, int64_t t, int64_t c, Scratch& s) -> const float* {
    if (frames[t].noise_std == 0.0f) return nullptr;
    float* e = s.eps.data();
    if (np) {
      const float* base = np + b * ns[0] + t * ns[1] + c * ns[2];
      load_plane<float>(base, ns[3], ns[4], H, W, e, W);
    } else {
      philox_normals(seed, ((b * T + t) * C + c) * HW, HW, e);
    }
    return e;
  };
  auto out_frame = [&](int64_t b, int64_t t, int64_t c) { return op + ((b * T + t) * C + c) * HW; };
  // fp32 frames whose rows are whole vectors are streamed straight from the kernel.
  const bool direct = std::is_same<scalar_t, float>::value && W % kLanes == 0 &&
                      simd::stream_aligned(op);
  auto direct_out = [&](int64_t b, int64_t t, int64_t c) {
    return direct ? reinterpret_cast<float*>(out_frame(b, t, c)) : nullptr;
  };

  if (!first_order) {
    // ~64k output pixels per task at least: tiny inputs stay on one thread (no wake-up cost).
    at::parallel_for(0, P * T, std::max<int64_t>(1, 65536 / HW), [&](int64_t begin, int64_t end) {
      Scratch s(H, W, max_radius);
      int64_t loaded = -1;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t p = item / T, t = item % T, b = p / C, c = p % C;
        if (loaded != p) {
          load_plane<scalar_t>(xp + b * xsb + c * xsc, xsh, xsw, H, W, s.src.data(), s.Wp);
          loaded = p;
        }
        if (t == T - 1) {  // the clean frame: x itself (exact through fp32 for fp16/bf16/fp32)
          store_plane<scalar_t>(s.src.data(), s.Wp, H, W, out_frame(b, t, c));
          continue;
        }
        blur_frame(frames[t], s.src.data(), s.state.data(), make_eps(b, t, c, s), H, W, s, direct_out(b, t, c));
        if (!direct) store_plane<scalar_t>(s.state.data(), s.Wp, H, W, out_frame(b, t, c));
      }
      simd::stream_fence();
    });
  } else {
    at::parallel_for(0, P, std::max<int64_t>(1, 65536 / (HW * T)), [&](int64_t begin, int64_t end) {
      Scratch s(H, W, max_radius);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        float* state = s.state.data();
        load_plane<scalar_t>(xp + b * xsb + c * xsc, xsh, xsw, H, W, state, s.Wp);
        store_plane<scalar_t>(state, s.Wp, H, W, out_frame(b, T - 1, c));
        for (int64_t t = T - 2; t >= 0; --t) {  // the chain is carried in fp32
          blur_frame(frames[t], state, state, make_eps(b, t, c, s), H, W, s, direct_out(b, t, c));
          if (!direct) store_plane<scalar_t>(state, s.Wp, H, W, out_frame(b, t, c));
        }
      }
      simd::stream_fence();
    });
  }
}

}  // namespace

at::Tensor pseudo_video_cpp(const at::Tensor& x, c10::ArrayRef<double> blur_sigma, c10::ArrayRef<double> noise_std,
                            c10::ArrayRef<double> signal_scale, bool first_order, int64_t seed,
                            const std::optional<at::Tensor>& noise, double truncate) {
  TORCH_CHECK_VALUE(x.dim() == 4, "pseudo_video: x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   "pseudo_video: the cpp backend takes x as float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "pseudo_video: the cpp backend needs a CPU tensor, got ", x.device());
  const size_t T = blur_sigma.size();
  TORCH_CHECK_VALUE(T >= 1 && noise_std.size() == T && signal_scale.size() == T,
                    "pseudo_video: blur_sigma, noise_std and signal_scale must have the same length T >= 1");
  TORCH_CHECK_VALUE(truncate > 0.0, "pseudo_video: truncate must be > 0, got ", truncate);
  for (size_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(blur_sigma[t] >= 0.0 && noise_std[t] >= 0.0 && std::isfinite(signal_scale[t]),
                      "pseudo_video: blur_sigma and noise_std must be >= 0 and signal_scale finite (frame ", t, ")");
  }
  TORCH_CHECK_VALUE(blur_sigma[T - 1] == 0.0 && noise_std[T - 1] == 0.0 && signal_scale[T - 1] == 1.0,
                    "pseudo_video: the last frame must be the identity (blur_sigma 0, noise_std 0, signal_scale 1)");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  std::optional<at::Tensor> noise_f;
  if (noise) {
    TORCH_CHECK_VALUE(noise->dim() == 5 && noise->size(0) == B && noise->size(1) == static_cast<int64_t>(T) &&
                          noise->size(2) == C && noise->size(3) == H && noise->size(4) == W,
                      "pseudo_video: noise must have shape (B, T, C, H, W) = (", B, ", ", T, ", ", C, ", ", H, ", ",
                      W, "), got ", noise->sizes());
    noise_f = noise->to(at::kFloat);
  }
  at::Tensor out = at::empty({B, static_cast<int64_t>(T), C, H, W}, x.options());
  if (out.numel() == 0) return out;
  const auto frames = make_frames(std::vector<double>(blur_sigma.begin(), blur_sigma.end()),
                                  std::vector<double>(noise_std.begin(), noise_std.end()),
                                  std::vector<double>(signal_scale.begin(), signal_scale.end()), truncate, H, W);
  simd::with_element_type(x.scalar_type(), [&](auto tag) {
    pseudo_video_kernel<decltype(tag)>(x, frames, first_order, static_cast<uint64_t>(seed), noise_f, out);
  });
  return out;
}

}  // namespace pvkernels
