"""pvkernels: fused kernels for pseudo-video training of image generators.

Backends: "reference" (plain PyTorch, the oracle), "cpp" (csrc/, built with ninja against the
running torch on first import and cached), "triton" (CUDA tensors, or CPU under
TRITON_INTERPRET=1). See DESIGN.md for the contract.
"""
import torch

from . import _backend
from ._backend import BACKENDS, cpp_available, triton_available

_backend.load_cpp()

from . import schedules  # noqa: E402
from .ops.pseudo_video import _pseudo_video_fake, pseudo_video, pseudo_video_reference  # noqa: E402
from .ops.vq import _vq_lookup_fake, vq_lookup, vq_lookup_reference  # noqa: E402
from .ops.attention import _attention_bwd_fake, _attention_fwd_fake, spatial_attention, temporal_attention  # noqa: E402,E501
from . import nn  # noqa: E402

if cpp_available():
    torch.library.register_fake("pvkernels_cpp::pseudo_video")(_pseudo_video_fake)
    torch.library.register_fake("pvkernels_cpp::vq_lookup")(_vq_lookup_fake)
    torch.library.register_fake("pvkernels_cpp::attention_fwd")(_attention_fwd_fake)
    torch.library.register_fake("pvkernels_cpp::attention_bwd")(_attention_bwd_fake)

__version__ = "0.1.0"
__all__ = ["BACKENDS", "cpp_available", "triton_available", "nn", "pseudo_video", "pseudo_video_reference",
           "schedules", "spatial_attention", "temporal_attention", "vq_lookup", "vq_lookup_reference"]
