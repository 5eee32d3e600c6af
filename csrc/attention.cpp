// Factorised spatio-temporal attention on the CPU: the entry of the three kernel families (the
// checks, the measured crossovers between them and the dtype switch). q, k, v are read in
// place as (B, T, S, H, Dh) with any strides (views of one packed projection too):
// - short sequences with unit-stride rows (attention_rows.cpp): an item's heads one at a time,
//   the scores dot products of the rows (or, with AVX-512 below Dh 48 and past n 24, q alone
//   transposed), kept key x query so the softmax is lane-wise;
// - other short sequences (attention_lanes.cpp): kLanes (b, a, h) sequences side by side, one
//   per vector lane: no padded scores, a lane-wise softmax;
// - longer ones (attention_blocked.cpp): a (b, a) item's heads staged in fp32, scores kept
//   transposed in blocks of 32 queries that stay in L1.
// All backwards recompute P from the saved log-sum-exp. Outputs from 64 KiB on reuse cached buffers
// (OutputCache).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "attention.h"

namespace pvkernels {

namespace {

// The cache of output buffers (attention.h, empty_output): by size class (size_class), kept
// when their tensor is freed for the next output of that class, up to limit() bytes in all. Never
// destroyed: a tensor freed during the process's exit still returns its buffer to it.
class OutputCache {
 public:
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache;
    return *cache;
  }
  static size_t limit() {  // PVKERNELS_CPU_OUTPUT_CACHE_MB, read once
    static const size_t bytes = [] {
      const char* env = std::getenv("PVKERNELS_CPU_OUTPUT_CACHE_MB");
      if (env == nullptr || *env == '\0') return kDefaultMB << 20;
      char* end = nullptr;
      const long long mb = std::strtoll(env, &end, 10);
      TORCH_CHECK_VALUE(*end == '\0' && mb >= 0, "PVKERNELS_CPU_OUTPUT_CACHE_MB must be a whole number of MB >= 0 ",
                        "(0: no cache), got '", env, "'");
      return static_cast<size_t>(std::min<long long>(mb, 1LL << 40)) << 20;  // past 1 PB: unbounded
    }();
    return bytes;
  }
  // a buffer of `bytes` (a whole number of pages) from the cache or, failing that, a new one
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    const bool huge = bytes >= kPage;
    TORCH_CHECK(posix_memalign(&p, huge ? kPage : kSmallPage, bytes) == 0, "pvkernels: out of memory allocating ",
                bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
    return p;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= limit()) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  size_t release() {  // frees every cached buffer; returns their bytes
    std::multimap<size_t, void*> buffers;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      buffers.swap(free_);
      std::swap(bytes, cached_);
    }
    for (auto& entry : buffers) std::free(entry.second);
    return bytes;
  }
  static constexpr size_t kPage = 2 << 20, kSmallPage = 4 << 10;
  // the size class of `bytes`: whole 2 MiB pages from kPage on, whole 4 KiB pages below
  static size_t size_class(size_t bytes) {
    const size_t page = bytes >= kPage ? kPage : kSmallPage;
    return (bytes + page - 1) / page * page;
  }
  static constexpr size_t kDefaultMB = 1024;

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size class -> buffers
  size_t cached_ = 0;
};

}  // namespace

at::Tensor attention::empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto contiguous = options.memory_format(at::MemoryFormat::Contiguous);
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kCachedBytes || OutputCache::limit() == 0) return at::empty(sizes, contiguous);
  const size_t size = OutputCache::size_class(static_cast<size_t>(bytes));
  void* p = OutputCache::instance().take(size);
  return at::from_blob(p, sizes, [size](void* q) { OutputCache::instance().give(q, size); }, contiguous);
}

int64_t release_output_cache_cpp() { return static_cast<int64_t>(OutputCache::instance().release()); }

namespace {

// The kernel family of a call, chosen in this one place (the measurements are in
// benchmarks/README.md, "The cpp kernels for short sequences"): short sequences (temporal T <= 32,
// spatial S <= 16) with unit-stride rows an item at a time (attention_rows.cpp), where that kernel
// measured faster than the lanes one: 8 <= n, Dh >= 16 with AVX-512; with AVX2 8 <= n <= 16 and
// Dh >= 32 (1.0-1.5x the lanes kernel there; even at Dh 16-24; 0.85-1.13x at n 18 and 32, whose
// padded lanes it computes); plain C++ builds: never (not measured); other short sequences side by
// side in vector lanes (attention_lanes.cpp); the blocked kernel past them (spatially an item's rows are
// adjacent and it stages them cheaply). The (H, N, N) bias and its gradient are kept in fp32, keys x
// queries (padded_bias: rows and blocked) or lane by lane (lane_bias: lanes).
enum class Kind { rows, lanes, blocked };
struct Family {
  Kind kind;

  at::Tensor bias(const std::optional<at::Tensor>& b) const {
    if (!b.has_value()) return at::Tensor();
    return kind == Kind::lanes ? attention::lane_bias(*b) : attention::padded_bias(*b);
  }
  at::Tensor bias_grad_acc(int64_t H, int64_t N) const {
    const int64_t threads = at::get_num_threads();
    return kind == Kind::lanes ? attention::lane_bias_grad_acc(threads, H, N)
                               : attention::padded_bias_grad_acc(threads, H, N);
  }
  at::Tensor bias_grad(const at::Tensor& acc) const {
    return kind == Kind::lanes ? attention::lane_bias_grad(acc) : attention::padded_bias_grad(acc);
  }
  template <typename T>
  auto forward() const {
    switch (kind) {
      case Kind::rows: return attention::rows_forward<T>;
      case Kind::lanes: return attention::lanes_forward<T>;
      default: return attention::blocked_forward<T>;
    }
  }
  template <typename T>
  auto backward() const {
    switch (kind) {
      case Kind::rows: return attention::rows_backward<T>;
      case Kind::lanes: return attention::lanes_backward<T>;
      default: return attention::blocked_backward<T>;
    }
  }
};
// operands: the tensors the kernel reads (q, k, v and, backward, grad_out)
Family family_of(const at::Tensor& q, bool temporal, std::initializer_list<at::Tensor> operands) {
  const int64_t N = temporal ? q.size(1) : q.size(2);
  if (temporal ? N > 32 : N > 16) return {Kind::blocked};
  const bool unit_rows =
      std::all_of(operands.begin(), operands.end(), [](const at::Tensor& x) { return x.stride(4) == 1; });
  const int64_t D = q.size(4);
  bool rows = !simd::kPlain && N >= 8 && (simd::kRegisters >= 32 ? D >= 16 : N <= 16 && D >= 32);
  // PVKERNELS_CPU_ATTENTION_KERNEL=rows|lanes: one of the two wherever it can run (for comparing
  // them: benchmarks/attention_families.py)
  if (const char* forced = std::getenv("PVKERNELS_CPU_ATTENTION_KERNEL")) {
    const std::string kernel(forced);
    TORCH_CHECK_VALUE(kernel == "rows" || kernel == "lanes" || kernel.empty(),
                      "PVKERNELS_CPU_ATTENTION_KERNEL must be 'rows' or 'lanes', got '", kernel, "'");
    if (!kernel.empty()) rows = kernel == "rows";
  }
  return {rows && unit_rows ? Kind::rows : Kind::lanes};
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
  TORCH_CHECK_VALUE(q.size(4) <= attention::kMaxHeadDim, name, ": head dim Dh = ", q.size(4), " > ",
                    attention::kMaxHeadDim, " is not supported by the cpp kernel (use backend='reference')");
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
  at::Tensor out = attention::empty_output(q.sizes(), q.options());
  at::Tensor lse = attention::empty_output({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const Family family = family_of(q, temporal, {q, k, v});
  const at::Tensor bias32 = family.bias(bias);
  const float* bp = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
  simd::with_element_type(q.scalar_type(), [&](auto tag) {
    family.forward<decltype(tag)>()(q, k, v, bp, out, lse, temporal, causal);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpp(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, bool temporal, bool causal,
    bool bias_grad, bool packed_grad) {
  (void)out;  // delta = rowsum(P * dP) is recomputed from P, which the backward rebuilds anyway
  check_inputs(q, k, v, bias, temporal);
  const char* name = op_name(temporal);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(), name,
                    ": grad_out must match q in shape and dtype");
  TORCH_CHECK_VALUE(lse.dim() == 4 && lse.scalar_type() == at::kFloat, name, ": lse must be float32 (B, T, S, H)");
  TORCH_CHECK_VALUE(!bias_grad || bias.has_value(), name, ": bias_grad needs a bias");
  const auto opts = q.options();
  at::Tensor dq, dk, dv, packed;
  if (packed_grad) {
    // one (B, T, S, 3, H, Dh) gradient for a packed qkv: written in place of the stack copy
    // autograd would otherwise make of three separate gradients
    packed = attention::empty_output({q.size(0), q.size(1), q.size(2), 3, q.size(3), q.size(4)}, opts);
    dq = packed.select(3, 0), dk = packed.select(3, 1), dv = packed.select(3, 2);
  } else {
    dq = attention::empty_output(q.sizes(), opts), dk = attention::empty_output(q.sizes(), opts);
    dv = attention::empty_output(q.sizes(), opts);
  }
  const int64_t H = q.size(3), N = temporal ? q.size(1) : q.size(2);
  const Family family = family_of(q, temporal, {grad_out, q, k, v});
  // dbias is accumulated per thread (no atomics), in the kernel family's own layout
  const at::Tensor acc = bias_grad ? family.bias_grad_acc(H, N) : at::Tensor();
  if (q.numel() > 0) {
    const at::Tensor bias32 = family.bias(bias);
    const float* bp = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
    float* ap = bias_grad ? acc.mutable_data_ptr<float>() : nullptr;
    simd::with_element_type(q.scalar_type(), [&](auto tag) {
      family.backward<decltype(tag)>()(grad_out, q, k, v, bp, lse, dq, dk, dv, ap, temporal, causal);
    });
  }
  at::Tensor dbias = at::empty({0}, q.options());
  if (bias_grad) dbias = family.bias_grad(acc).to(bias->scalar_type()).contiguous();
  if (packed_grad) return {packed, at::empty({0}, q.options()), at::empty({0}, q.options()), dbias};
  return {dq, dk, dv, dbias};
}

}  // namespace pvkernels
