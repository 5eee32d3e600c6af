"""pvkernels: fused kernels for pseudo-video training of image generators.

Backends: "reference" (plain PyTorch, the oracle), "cpp" (csrc/, built with ninja against the
running torch on first import and cached), "triton" (CUDA tensors, or CPU under
TRITON_INTERPRET=1). See DESIGN.md for the contract.
"""
from . import _backend
from ._backend import BACKENDS, cpp_available, empty_cache, triton_available

_backend.load_cpp()

from . import schedules  # noqa: E402
from .ops.pseudo_video import pseudo_video, pseudo_video_reference  # noqa: E402
from .ops.vq import vq_lookup, vq_lookup_reference  # noqa: E402
from .ops.attention import spatial_attention, temporal_attention  # noqa: E402
from .ops.lfq import lfq_entropy, lfq_entropy_reference  # noqa: E402
from . import nn  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "cpp_available", "empty_cache", "triton_available", "lfq_entropy", "lfq_entropy_reference", "nn",
           "pseudo_video", "pseudo_video_reference", "schedules", "spatial_attention", "temporal_attention", "vq_lookup", "vq_lookup_reference"]
