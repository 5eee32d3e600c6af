"""Peers' multi-head attention over one axis of n tokens, on pvkernels' fused attention.

Peers hold q, k, v as (B, n, H, d) (after splitting heads off a projection). The fused ops take
(B, T, S, H, Dh) and attend over T or S, reading strided views in place, so a (B, n, H, d) view
becomes a (B, n, 1, H, d) temporal problem (short n, or causal) or a (B, 1, n, H, d) spatial one.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import fused_slower, requested_backend
from ..ops.attention import fused_head_dim_limit, spatial_attention, temporal_attention

# the cpp short-sequence kernel covers T <= 32 on the temporal op and only S <= 16 on the spatial one
_TEMPORAL_UP_TO = 32
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _op(n: int, causal: bool) -> str:
    return "temporal_attention" if causal or n <= _TEMPORAL_UP_TO else "spatial_attention"


def unsupported(x: torch.Tensor, heads: int, head_dim: int, n: int, bias: Optional[torch.Tensor]) -> Optional[str]:
    """Why a (B, n, heads, head_dim) attention of input ``x`` (its dtype and device) with this bias
    is not run on the fused kernels."""
    if x.dtype not in FUSED_DTYPES:
        return f"dtype {x.dtype} (the fused attention takes float32/float16/bfloat16)"
    limit = fused_head_dim_limit(x.device)
    if head_dim > limit:
        return f"dim_head {head_dim} > {limit}"
    if bias is not None and tuple(bias.shape) != (heads, n, n):
        return f"attention bias of shape {tuple(bias.shape)}, not (heads, n, n) = {(heads, n, n)}"
    return None


def slower_than_sdpa(x: torch.Tensor, n: int, head_dim: int, causal: bool) -> Optional[str]:
    """For a peer whose own attention is SDPA (diffusers): why its call should stay there, where
    ``backend="auto"`` takes the reference because the fused kernel measured slower at this shape
    class (``_backend.CROSSOVERS``; the reference would add permute copies to SDPA), unless
    ``PVKERNELS_BACKEND`` asks for a backend. Peers that attend with einsums keep the reference."""
    op, fused = _op(n, causal), "triton" if x.device.type == "cuda" else "cpp"
    if requested_backend(op, "auto")[0] == "auto" and fused_slower(op, dtype=x.dtype, n=n, head_dim=head_dim)(fused):
        return (f"{op} over n = {n}, head dim {head_dim}, in {str(x.dtype)[6:]}: the {fused} kernel measured slower "
                "than SDPA there (pvkernels._backend.CROSSOVERS)")
    return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
           causal: bool) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias [+ causal mask]) v`` for (B, n, H, d) views; returns
    (B, n, H, d) contiguous. Differentiable in q, k, v and bias."""
    if _op(q.shape[1], causal) == "temporal_attention":
        o = temporal_attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), causal=causal, bias=bias)
        return o.squeeze(2)
    return spatial_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), bias=bias).squeeze(1)
