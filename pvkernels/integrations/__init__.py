"""Patches that put pvkernels' kernels into other people's models (DESIGN.md §5).

    from pvkernels import integrations
    p = integrations.patch_vector_quantize(model)   # only this model's modules
    p = integrations.patch_phenaki()                # class level: every instance until p.unpatch()
    with integrations.patch_video_diffusion(unet) as p:
        ...
    p.stats   # {"fast": calls on our kernels, "fallback": {reason: count}}

A patched forward computes what the original computes (outputs, gradients, buffers, state_dict
and RNG use), or calls the original and counts why. An untested peer version or structure
raises :class:`PeerVersionError` (``PVKERNELS_ALLOW_UNTESTED=1`` patches anyway).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ._patching import Patch, PeerVersionError
from .diffusers import patch_diffusers
from .magvit2 import patch_magvit2
from .phenaki import patch_phenaki
from .vector_quantize import patch_vector_quantize
from .video_diffusion import patch_video_diffusion

PEERS = ("vector_quantize", "phenaki", "video_diffusion", "magvit2", "diffusers")


def patch(name: str, model: Optional[nn.Module] = None, **kwargs) -> Patch:
    """``patch("vector_quantize" | "phenaki" | "video_diffusion" | "magvit2" | "diffusers", model=None,
    strict=False)``: the peer's ``patch_<name>`` function. The peers are imported only when a patch
    is made."""
    functions = {"vector_quantize": patch_vector_quantize, "phenaki": patch_phenaki,
                 "video_diffusion": patch_video_diffusion, "magvit2": patch_magvit2,
                 "diffusers": patch_diffusers}
    if name not in functions:
        raise ValueError(f"pvkernels.integrations.patch: name must be one of {PEERS}, got {name!r}")
    return functions[name](model, **kwargs)

__all__ = ["PEERS", "Patch", "PeerVersionError", "patch", "patch_diffusers", "patch_magvit2", "patch_phenaki",
           "patch_vector_quantize", "patch_video_diffusion"]
