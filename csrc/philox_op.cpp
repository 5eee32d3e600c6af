// Test hook: the normals of csrc/philox.h at any element index, as pseudo_video draws them.
// The tests compare this stream with the reference at counters past 2**32 and 2**34, which no
// tensor of a test reaches through pseudo_video (2**34 elements). Registered with the other ops in
// registration.cpp, which says why it ships in the extension.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "philox.h"

namespace pvkernels {
at::Tensor philox_normal_cpp(int64_t seed, int64_t first, int64_t count) {
  TORCH_CHECK_VALUE(seed >= 0 && first >= 0 && count >= 0,
                    "philox_normal: seed, first and count must be >= 0, got ", seed, ", ", first, ", ", count);
  at::Tensor out = at::empty({count}, at::kFloat);
  philox_normals(static_cast<uint64_t>(seed), first, count, out.data_ptr<float>());
  return out;
}
}  // namespace pvkernels
