"""lucidrains' phenaki-pytorch: CViViT's spatial and temporal transformers on pvkernels' attention.

phenaki's ``Attention`` is cosine-similarity attention: q and k are l2-normalised, multiplied by
learned per-dimension scales and the product by a fixed scale (8); the spatial transformers add a
``ContinuousPositionBias`` (heads, S, S), the causal temporal ones ALiBi. The patched forward
hands that to the fused kernels as a pre-scaled q, the bias as the (H, n, n) additive bias
(with its gradient) and causality as the kernels' causal mask, without the (b, h, n, n) score
tensors. The layer norm, the projections and the ALiBi cache are the peer's own code.

Not computed here (the original runs, the reason is counted): ``mask``, ``context``
(cross-attention), null key/values, attention dropout in training, float64, a dim_head past the
fused kernels' limit (256 cpp, 128 triton), a bias of another shape. CViViT's quantizer is patched
too (``patch_vector_quantize``), inside the same Patch: its default ``LFQ``
(``lookup_free_quantization=True``) on ``pvkernels.lfq_entropy``, or its ``VectorQuantize`` with
``lookup_free_quantization=False``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import vector_quantize
from ._attention import attend, unsupported
from ._patching import (Patch, PeerVersionError, attention_problems, check_peer, dispatching, import_peer, missing,
                        patch_modules)

DISTRIBUTION = "phenaki-pytorch"
TESTED = (("0.5.0", "0.6"),)
_ATTENTION_PARAMS = ("x", "mask", "context", "attn_bias")
_ATTRIBUTES = ("heads", "causal", "scale", "norm", "to_q", "to_kv", "q_scale", "k_scale", "to_out",
               "attn_dropout", "num_null_kv")


def _peer():
    return import_peer("phenaki_pytorch.attention", DISTRIBUTION)


def _check(mod) -> None:
    problems = missing(mod, ("Attention", "AlibiPositionalBias"), "phenaki_pytorch.attention")
    if hasattr(mod, "Attention"):
        problems += attention_problems(mod, _ATTENTION_PARAMS, dict(dim=8, dim_head=4, heads=2, causal=True),
                                       _ATTRIBUTES + ("rel_pos_bias",))
    check_peer(DISTRIBUTION, TESTED, problems)


def _reason(attn, a) -> Optional[str]:
    x = a["x"]
    if a["mask"] is not None:
        return "mask (key padding mask)"
    if a["context"] is not None:
        return "context (cross-attention)"
    if attn.num_null_kv > 0:
        return "null key/values (num_null_kv > 0)"
    if attn.training and attn.attn_dropout.p > 0:
        return "attention dropout > 0 in training"
    if x.dim() != 3:
        return f"input of {x.dim()} dims, not (batch, n, dim)"
    heads = attn.heads
    return unsupported(x, heads, attn.to_q.out_features // heads, x.shape[1], a["attn_bias"])


def _forward(attn, a) -> torch.Tensor:
    x, bias = a["x"], a["attn_bias"]
    B, n, _ = x.shape
    H = attn.heads
    q = attn.to_q(attn.norm(x))
    k, v = attn.to_kv(x).chunk(2, dim=-1)  # as in the peer: keys and values of the input before its norm
    d = q.shape[-1] // H
    # sim = scale * <q/|q| * q_scale, k/|k| * k_scale>; the kernel divides by sqrt(d)
    # + the empty null_kv's sum (exactly 0): it gets the empty gradient the peer's concat gives it
    q_scale = attn.q_scale + attn.null_kv.sum()
    q = F.normalize(q.view(B, n, H, d), dim=-1) * q_scale * (attn.scale * math.sqrt(d))
    k = F.normalize(k.view(B, n, H, d), dim=-1) * attn.k_scale
    v = v.view(B, n, H, d)
    if attn.causal:
        alibi = attn.rel_pos_bias(x.new_empty(()).expand(H, n, n))  # reads the shape; caches as the peer does
        bias = alibi if bias is None else bias + alibi
    dtype = torch.promote_types(q.dtype, v.dtype)  # q_scale (fp32) promotes a 16-bit q under autocast
    out = attend(q.to(dtype), k.to(dtype), v.to(dtype), bias, attn.causal)
    return attn.to_out(out.view(B, n, H * d))


def patch_phenaki(model: Optional[torch.nn.Module] = None, *, strict: bool = False) -> Patch:
    """Puts pvkernels' attention into phenaki-pytorch's ``Attention`` (CViViT's transformers) and
    ``patch_vector_quantize`` into its quantizer (the default ``LFQ``, or ``VectorQuantize`` with
    ``lookup_free_quantization=False``).

    Args:
        model: a module (a ``CViViT``, a ``Transformer``, ...): only its modules are patched.
            None patches the classes (every instance, until ``unpatch()``).
        strict: raise a ValueError naming the reason instead of falling back.

    Returns:
        A :class:`Patch`; its ``stats`` count attention and quantizer calls together.

    Example:
        >>> from phenaki_pytorch import CViViT
        >>> cvivit = CViViT(dim=256, codebook_size=8192, image_size=64, patch_size=8,
        ...                 temporal_patch_size=2, spatial_depth=2, temporal_depth=2,
        ...                 use_vgg_and_gan=False, lookup_free_quantization=False)
        >>> p = pvkernels.integrations.patch_phenaki(cvivit)
        >>> loss = cvivit(torch.randn(1, 3, 9, 64, 64))
    """
    mod = _peer()
    _check(mod)
    patch = Patch("phenaki", strict)
    forward = dispatching(patch, _reason, _forward, mod.Attention.forward)
    patch_modules(patch, model, mod.Attention, {"forward": forward})
    vq_mod = vector_quantize._peer()
    if vector_quantize.present(vq_mod, model):
        try:
            vector_quantize.check(vq_mod, model)
        except PeerVersionError as exc:
            if model is not None:
                raise
            warnings.warn(f"patch_phenaki: attention patched, VectorQuantize and LFQ not: {exc}", RuntimeWarning,
                          stacklevel=2)
        else:
            vector_quantize.install(patch, vq_mod, model)
    return patch


__all__ = ["patch_phenaki", "TESTED"]
