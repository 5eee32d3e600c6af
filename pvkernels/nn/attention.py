"""Module forms of spatial / temporal attention and the factorised SpaceTime block.

Tokens are (B, T, S, dim). Each attention module projects to a packed (B, T, S, 3, H, Dh) qkv
and hands it straight to the kernel (strided views, no permute copies; the qkv gradient comes
back packed).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import check_real, is_int, requested_backend
from ..ops.attention import packed_attention


def _check_dims(module: str, dim: int, heads: int) -> int:
    """The attention modules' width check: dim a positive multiple of heads (ints); returns the head dim."""
    for name, value in (("dim", dim), ("heads", heads)):
        if not is_int(value):
            raise TypeError(f"{module}: {name} must be an int, got {value!r}")
    if dim < 1 or heads < 1 or dim % heads:
        raise ValueError(f"{module}: dim ({dim}) must be a positive multiple of heads ({heads})")
    return dim // heads


def _check_tokens(module: str, x, dim: int) -> None:
    """The modules' input check, worded as the ops': tokens (B, T, S, dim), floating point."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{module}: x must be 4-D (B, T, S, dim), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{module}: x's last dim must be dim={dim}, got {x.shape[-1]}")
    if not x.is_floating_point():
        raise TypeError(f"{module}: x must be floating point, got {x.dtype}")


class SpatialAttention(torch.nn.Module):
    """Multi-head self-attention over the S tokens of each frame.

    Args:
        dim: token width. heads: number of heads (dim % heads == 0).
        backend: passed to :func:`pvkernels.spatial_attention`.

    Shape: (B, T, S, dim) -> (B, T, S, dim).

    Example:
        >>> attn = SpatialAttention(256, 8)
        >>> y = attn(torch.randn(2, 8, 64, 256))
    """

    def __init__(self, dim: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, _check_dims(type(self).__name__, dim, heads)
        requested_backend(type(self).__name__, backend)
        self.backend = backend
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def _qkv(self, x):
        B, T, S, _ = x.shape
        return self.qkv(x).view(B, T, S, 3, self.heads, self.head_dim)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_tokens(type(self).__name__, x, self.dim)
        o = packed_attention(self._qkv(x), temporal=False, bias=bias, backend=self.backend)
        return self.proj(o.flatten(3))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"


class TemporalAttention(SpatialAttention):
    """Multi-head self-attention over the T frames at each spatial position.

    Args:
        dim, heads: as :class:`SpatialAttention`.
        causal: frame t attends to frames <= t (C-ViViT).
        rel_pos: "t5" (a learned scalar per head and relative offset, offsets clamped to
            +-max_distance), "alibi" (fixed per-head linear distance penalty) or None.
        max_distance: clamp of the T5 offsets.

    Shape: (B, T, S, dim) -> (B, T, S, dim).
    """

    def __init__(self, dim: int, heads: int, causal: bool = True, rel_pos: Optional[str] = "t5",
                 max_distance: int = 32, backend: str = "auto"):
        super().__init__(dim, heads, backend)
        if rel_pos not in ("t5", "alibi", None):
            raise ValueError(f"TemporalAttention: rel_pos must be 't5', 'alibi' or None, got {rel_pos!r}")
        self.causal, self.rel_pos, self.max_distance = causal, rel_pos, max_distance
        if rel_pos == "t5":
            self.rel_bias = torch.nn.Parameter(torch.zeros(heads, 2 * max_distance + 1))
        elif rel_pos == "alibi":
            # geometric slopes 2^(-8 h / H) as in Press et al.
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
            self.register_buffer("alibi_slopes", slopes, persistent=False)

    def position_bias(self, T: int, device=None, dtype=None) -> Optional[torch.Tensor]:
        """The (H, T, T) additive bias of ``rel_pos`` (None without one)."""
        if self.rel_pos is None:
            return None
        pos = torch.arange(T, device=device)
        offset = pos.view(1, T) - pos.view(T, 1)  # key - query
        if self.rel_pos == "t5":
            index = offset.clamp(-self.max_distance, self.max_distance) + self.max_distance
            return self.rel_bias[:, index].to(dtype or self.rel_bias.dtype)
        return (-self.alibi_slopes.view(-1, 1, 1) * offset.abs().view(1, T, T)).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(type(self).__name__, x, self.dim)
        bias = self.position_bias(x.shape[1], x.device, x.dtype)
        o = packed_attention(self._qkv(x), temporal=True, causal=self.causal, bias=bias, backend=self.backend)
        return self.proj(o.flatten(3))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}, rel_pos={self.rel_pos}"


class SpaceTimeBlock(torch.nn.Module):
    """Factorised transformer block: x + spatial(norm(x)), + temporal(norm(.)), + MLP(norm(.)).

    Args:
        dim, heads: token width and heads of both attentions.
        causal_time: causal temporal attention (C-ViViT).
        mlp_ratio: hidden width of the GELU MLP as a multiple of dim.
        rel_pos: relative position bias of the temporal attention ("t5", "alibi", None).
        backend: passed to both attention ops.

    Shape: (B, T, S, dim) -> (B, T, S, dim).

    Example:
        >>> block = SpaceTimeBlock(256, 8)
        >>> y = block(torch.randn(2, 8, 64, 256))
    """

    def __init__(self, dim: int, heads: int, causal_time: bool = True, mlp_ratio: float = 4,
                 rel_pos: Optional[str] = "t5", backend: str = "auto"):
        super().__init__()
        _check_dims(type(self).__name__, dim, heads)
        hidden = int(math.ceil(dim * check_real(type(self).__name__, "mlp_ratio", mlp_ratio, positive=True)))
        self.dim = dim
        self.norm_space = torch.nn.LayerNorm(dim)
        self.space = SpatialAttention(dim, heads, backend)
        self.norm_time = torch.nn.LayerNorm(dim)
        self.time = TemporalAttention(dim, heads, causal_time, rel_pos, backend=backend)
        self.norm_mlp = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(type(self).__name__, x, self.dim)
        x = x + self.space(self.norm_space(x))
        x = x + self.time(self.norm_time(x))
        return x + self.mlp(self.norm_mlp(x))
