// What the three attention kernel families share (attention_rows.cpp: short sequences with
// unit-stride rows, an item at a time; attention_lanes.cpp: other short sequences, one per vector
// lane; attention_blocked.cpp: longer ones, blocked). All read (B, T, S, H, Dh) with any strides
// (rows: unit stride along Dh), seen as (b, a, n, h, d) with n the attended axis (T temporal, S
// spatial), and all backwards recompute P from the saved log-sum-exp. attention.cpp is the entry.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>

#include "simd.h"

namespace pvkernels {
namespace attention {

using simd::kLanes, simd::vfloat, simd::vint;

// Strides of a (B, T, S, H, Dh) tensor in (b, a, n, h, d) order.
struct View {
  int64_t sb, sa, sn, sh, sd;
};

inline View view_of(const at::Tensor& x, bool temporal) {
  if (temporal) return {x.stride(0), x.stride(2), x.stride(1), x.stride(3), x.stride(4)};
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
}

// lse (B, T, S, H) contiguous, seen in (b, a, n, h) order
inline View lse_view(const at::Tensor& lse, bool temporal) {
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
  int64_t B, A, N, H, D;
};

inline Sizes sizes_of(const at::Tensor& q, bool temporal) {
  return {q.size(0), temporal ? q.size(2) : q.size(1), temporal ? q.size(1) : q.size(2), q.size(3), q.size(4)};
}

// The largest head dim the kernels take (attention.py's MAX_HEAD_DIM["cpp"] says the same).
constexpr int64_t kMaxHeadDim = 256;

// Outputs past this size are written with non-temporal stores: they would not stay in L2
// anyway, and streaming skips reading each line before it is overwritten.
constexpr int64_t kStreamBytes = 4 << 20;
inline bool streamed(const at::Tensor& out) { return out.numel() * out.element_size() >= kStreamBytes; }

// A new output tensor: below kCachedBytes PyTorch's own (at::empty); from there on a buffer from a
// cache of them (attention.cpp, OutputCache: whole 2 MiB pages from 2 MiB on, whole 4 KiB pages
// below), which keeps a freed output's buffer for the next output of its size, up to
// PVKERNELS_CPU_OUTPUT_CACHE_MB in all (default 1024; 0: at::empty every time), emptied by
// pvkernels.empty_cache(); new buffers from 2 MiB on marked for transparent huge pages
// (madvise(MADV_HUGEPAGE), as PyTorch's allocator does under THP_MEM_ALLOC_ENABLE=1). Fresh memory
// is faulted in on every call otherwise (glibc maps outputs past 32 MB anew and trims its heap
// between calls), which costs more than the kernels' arithmetic: one thread faults 84 MB in ~38 ms
// on 4 KiB pages, ~6 ms on 2 MiB pages, and on a VM whose free memory is handed back to the host
// (virtio free page reporting, this project's CI machines) huge pages come from that memory:
// 0.3-1.3 s for a 320-channel forward + backward's 156 pages in a third of the calls
// (benchmarks/README.md, "Output buffers"). Outputs of 1.3-3.9 MB (small latents: 16-64 items at
// 1280 channels, 64-196 at 320) faulted in 60-440 pages a forward + backward called in a loop,
// 1.07-1.58x its time, before they were cached too ("Nineteenth session"); below 64 KiB none did.
constexpr int64_t kCachedBytes = 64 << 10;
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// The softmax of kLanes queries, lane-wise, from their scores' max m and sum l of exp(score -
// softmax_shift(m)). A query whose keys are all masked (a -inf bias, alone or with the causal
// mask) gets what SDPA gives it: a zero output row, and lse +inf, so that a backward's
// P = exp(s - lse) vanishes there too (exp(-inf - -inf) would be NaN).
inline vfloat softmax_shift(vfloat m) {
  return m == simd::splat(-std::numeric_limits<float>::infinity()) ? vfloat{} : m;
}
inline vfloat softmax_rinv(vfloat m, vfloat l) {  // 1 / l
  return m == simd::splat(-std::numeric_limits<float>::infinity()) ? vfloat{} : 1.0f / l;
}
inline vfloat softmax_lse(vfloat m, vfloat l) {  // m + log(l)
  constexpr float inf = std::numeric_limits<float>::infinity();
  return m == simd::splat(-inf) ? simd::splat(inf) : m + simd::log(l);
}
// The backward's P = exp(s - lse) sums to 1 over a query's keys only up to lse's rounding, one
// relative error for the whole row (an ulp of lse: 8e-6 at lse 100), which delta = rowsum(P * dP)
// would carry into dS = P * (dP - delta), where dP - delta cancels on a peaked softmax (dQ and dK
// up to 55x the error of torch's fp32 softmax backward at scores ~100; test_attention.py). delta
// times 1 / the row's sum divides it out (in dS and dV it is only a relative error); 1 where the
// row is all masked (lse +inf: the sum ~0) or NaN.
inline vfloat softmax_renorm(vfloat sum) { return 1.0f / (sum > 0.5f ? sum : simd::splat(1.0f)); }

// vector-aligned start inside a buffer allocated kLanes floats longer: whole-line vector access
inline float* aligned(float* p) {
  constexpr uintptr_t mask = sizeof(vfloat) - 1;
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + mask) & ~mask);
}

// The kernels of each family, <family>_forward<T> and <family>_backward<T>, declared here and
// instantiated in the family's file by PVKERNELS_ATTENTION_INSTANTIATE(family) for float,
// c10::Half and c10::BFloat16. bias: the family's fp32 layout of the (H, N, N) bias (lane_bias for
// lanes, padded_bias for rows and blocked) or nullptr; dbias_acc: per thread sums of dS in that
// layout (reduced by lane_bias_grad / padded_bias_grad) or nullptr.
#define PVKERNELS_ATTENTION_FORWARD(family, T)                                                             \
  void family##_forward T(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, \
                          at::Tensor& out, at::Tensor& lse, bool temporal, bool causal)
#define PVKERNELS_ATTENTION_BACKWARD(family, T)                                                                \
  void family##_backward T(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,              \
                           const at::Tensor& v, const float* bias, const at::Tensor& lse, at::Tensor& dq,     \
                           at::Tensor& dk, at::Tensor& dv, float* dbias_acc, bool temporal, bool causal)
#define PVKERNELS_ATTENTION_DECLARE(family)                       \
  template <typename T>                                           \
  PVKERNELS_ATTENTION_FORWARD(family, );                          \
  template <typename T>                                           \
  PVKERNELS_ATTENTION_BACKWARD(family, )
#define PVKERNELS_ATTENTION_INSTANTIATE_FOR(family, T)     \
  template PVKERNELS_ATTENTION_FORWARD(family, <T>);        \
  template PVKERNELS_ATTENTION_BACKWARD(family, <T>)
#define PVKERNELS_ATTENTION_INSTANTIATE(family)                   \
  PVKERNELS_ATTENTION_INSTANTIATE_FOR(family, float);             \
  PVKERNELS_ATTENTION_INSTANTIATE_FOR(family, c10::Half);         \
  PVKERNELS_ATTENTION_INSTANTIATE_FOR(family, c10::BFloat16)

PVKERNELS_ATTENTION_DECLARE(rows);
PVKERNELS_ATTENTION_DECLARE(lanes);
PVKERNELS_ATTENTION_DECLARE(blocked);

at::Tensor lane_bias(const at::Tensor& bias);                     // [phase][N][N][lane]
at::Tensor lane_bias_grad_acc(int64_t threads, int64_t H, int64_t N);
at::Tensor lane_bias_grad(const at::Tensor& acc);
at::Tensor padded_bias(const at::Tensor& bias);                   // [H][N keys][Np queries]: blocked and rows
at::Tensor padded_bias_grad_acc(int64_t threads, int64_t H, int64_t N);
at::Tensor padded_bias_grad(const at::Tensor& acc);

}  // namespace attention
}  // namespace pvkernels
