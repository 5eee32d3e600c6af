"""lucidrains' video-diffusion-pytorch: ``Unet3D``'s softmax attention on pvkernels' kernels.

``Unet3D`` uses one ``Attention`` class for its temporal attention (over the frames of every
pixel, rotary embedding over frames, T5-bucketed relative position bias) and its mid-block
spatial attention (over the pixels of every frame). The patched forward keeps the peer's qkv
projection and rotary embedding, then runs the (B, n, H, d) problem on the fused kernels with
the position bias as the (H, n, n) additive bias (with its gradient), without the
(..., h, n, n) score tensors. ``SpatialLinearAttention`` is linear attention, not softmax
attention: it is left as it is.

Not computed here (the original runs, the reason is counted): a ``focus_present_mask`` with
some samples set (per-sample masks), or with all set (the original skips attention then),
float64, a dim_head past the fused kernels' limit (256 cpp, 128 triton), a bias of another
shape.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._attention import attend, unsupported
from ._patching import Patch, attention_problems, check_peer, dispatching, import_peer, missing, patch_modules

DISTRIBUTION = "video-diffusion-pytorch"
TESTED = (("0.7.0", "0.8"),)
_ATTENTION_PARAMS = ("x", "pos_bias", "focus_present_mask")


def _peer():
    return import_peer("video_diffusion_pytorch.video_diffusion_pytorch", DISTRIBUTION)


def _check(mod) -> None:
    problems = missing(mod, ("Attention", "Unet3D"), "video_diffusion_pytorch")
    if hasattr(mod, "Attention"):
        problems += attention_problems(mod, _ATTENTION_PARAMS, dict(dim=8, heads=2, dim_head=4),
                                       ("heads", "scale", "rotary_emb", "to_qkv", "to_out"))
    check_peer(DISTRIBUTION, TESTED, problems)


def _reason(attn, a) -> Optional[str]:
    x, focus = a["x"], a["focus_present_mask"]
    if focus is not None and bool(focus.any()):
        return ("focus_present_mask all set (the original skips attention)" if bool(focus.all())
                else "focus_present_mask partly set (per-sample attention masks)")
    heads = attn.heads
    return unsupported(x, heads, attn.to_qkv.out_features // (3 * heads), x.shape[-2], a["pos_bias"])


def _forward(attn, a) -> torch.Tensor:
    x = a["x"]
    *lead, n, _ = x.shape
    H = attn.heads
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    d = q.shape[-1] // H
    q, k, v = (t.reshape(-1, n, H, d) for t in (q, k, v))
    if attn.rotary_emb is not None:
        # the peer rotates (..., h, n, d) along n; rotation is linear, so q * scale is left to
        # the kernel's 1/sqrt(d) (the peer's scale is dim_head ** -0.5)
        q, k = (attn.rotary_emb.rotate_queries_or_keys(t.transpose(1, 2)).transpose(1, 2) for t in (q, k))
    out = attend(q, k, v, a["pos_bias"], causal=False)
    return attn.to_out(out.view(*lead, n, H * d))


def patch_video_diffusion(model: Optional[torch.nn.Module] = None, *, strict: bool = False) -> Patch:
    """Puts pvkernels' attention into video-diffusion-pytorch's ``Attention`` (``Unet3D``'s
    temporal attention at every level and its mid-block spatial attention).

    Args:
        model: a module (a ``Unet3D``, a ``GaussianDiffusion``, ...): only its modules are
            patched. None patches the class (every instance, until ``unpatch()``).
        strict: raise a ValueError naming the reason instead of falling back.

    Returns:
        A :class:`Patch`.

    Example:
        >>> from video_diffusion_pytorch import Unet3D
        >>> unet = Unet3D(dim=32, dim_mults=(1, 2))
        >>> with pvkernels.integrations.patch_video_diffusion(unet) as p:
        ...     out = unet(torch.randn(1, 3, 5, 16, 16), torch.tensor([10]))
    """
    mod = _peer()
    _check(mod)
    patch = Patch("video_diffusion", strict)
    forward = dispatching(patch, _reason, _forward, mod.Attention.forward)
    patch_modules(patch, model, mod.Attention, {"forward": forward})
    return patch


__all__ = ["patch_video_diffusion", "TESTED"]
