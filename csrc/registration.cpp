// The one place where the C++ ops are declared to torch.library (namespace pvkernels_cpp).
// Fake (meta) kernels live in Python next to each op so torch.compile can trace them.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace pvkernels {
at::Tensor pseudo_video_cpp(const at::Tensor& x, c10::ArrayRef<double> blur_sigma, c10::ArrayRef<double> noise_std,
                            c10::ArrayRef<double> signal_scale, bool first_order, int64_t seed,
                            const std::optional<at::Tensor>& noise, double truncate);
std::tuple<at::Tensor, at::Tensor> vq_lookup_cpp(const at::Tensor& z, const at::Tensor& codebook, bool cosine);
std::tuple<at::Tensor, at::Tensor> vq_lookup_topk_cpp(const at::Tensor& z, const at::Tensor& codebook, bool cosine,
                                                      int64_t k);
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& bias, bool temporal,
                                                     bool causal);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpp(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, bool temporal, bool causal,
    bool bias_grad, bool packed_grad);
at::Tensor lfq_entropy_fwd_cpp(const at::Tensor& lqp, const at::Tensor& lqm, int64_t low_bits, double log_eps);
std::tuple<at::Tensor, at::Tensor> lfq_entropy_bwd_cpp(const at::Tensor& lqp, const at::Tensor& lqm,
                                                       int64_t low_bits, double log_eps, const at::Tensor& w_entropy,
                                                       const at::Tensor& w_avg,
                                                       const std::optional<at::Tensor>& grad_avg);
at::Tensor philox_normal_cpp(int64_t seed, int64_t first, int64_t count);
int64_t release_output_cache_cpp();
}

TORCH_LIBRARY(pvkernels_cpp, m) {
  m.def(
      "pseudo_video(Tensor x, float[] blur_sigma, float[] noise_std, float[] signal_scale, bool first_order, "
      "int seed, Tensor? noise, float truncate) -> Tensor");
  m.def("vq_lookup(Tensor z, Tensor codebook, bool cosine) -> (Tensor, Tensor)");
  m.def("vq_lookup_topk(Tensor z, Tensor codebook, bool cosine, int k) -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, bool temporal, bool causal) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, "
      "bool temporal, bool causal, bool bias_grad, bool packed_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lfq_entropy_fwd(Tensor lqp, Tensor lqm, int low_bits, float log_eps) -> Tensor");
  m.def(
      "lfq_entropy_bwd(Tensor lqp, Tensor lqm, int low_bits, float log_eps, Tensor w_entropy, Tensor w_avg, "
      "Tensor? grad_avg) -> (Tensor, Tensor)");
  // A test hook (tests/test_pseudo_video.py), shipped on purpose: it checks the philox.h of this
  // very build (same compiler flags and ISA as the pseudo_video users run), which a separate test
  // extension would not, and would cost a second build (~20 s) per torch version and ISA. It is a
  // few lines, runs only when called, and no Python wrapper exposes it. No tensor argument says which
  // backend runs it, so its kernel is given here for every dispatch key, not in the CPU block.
  m.def("philox_normal(int seed, int first, int count) -> Tensor", &pvkernels::philox_normal_cpp);
  // frees the cached output buffers (attention.h, empty_output); returns their bytes
  m.def("release_output_cache() -> int", &pvkernels::release_output_cache_cpp);
}

TORCH_LIBRARY_IMPL(pvkernels_cpp, CPU, m) {
  m.impl("pseudo_video", &pvkernels::pseudo_video_cpp);
  m.impl("vq_lookup", &pvkernels::vq_lookup_cpp);
  m.impl("vq_lookup_topk", &pvkernels::vq_lookup_topk_cpp);
  m.impl("attention_fwd", &pvkernels::attention_fwd_cpp);
  m.impl("attention_bwd", &pvkernels::attention_bwd_cpp);
  m.impl("lfq_entropy_fwd", &pvkernels::lfq_entropy_fwd_cpp);
  m.impl("lfq_entropy_bwd", &pvkernels::lfq_entropy_bwd_cpp);
}

// The attention and LFQ ops are differentiated by their autograd Functions (pvkernels/ops), which run
// them without grad. Differentiating an op itself (a double backward: create_graph=True, then a
// gradient of the gradient) raises "derivative for pvkernels_cpp::... is not implemented", as the
// Triton custom ops do, where torch's deprecated fallback warned and took them for constants (a
// silently wrong second derivative). No cost without grad: the kernel redispatches.
TORCH_LIBRARY_IMPL(pvkernels_cpp, Autograd, m) {
  for (const char* op : {"attention_fwd", "attention_bwd", "lfq_entropy_fwd", "lfq_entropy_bwd"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}
