"""VectorQuantizer: the VQ bottleneck on top of the fused ``pvkernels.vq_lookup``.

Two ways to learn the codebook: gradient (codebook + commitment loss, ``decay=None``) or EMA
(``decay`` given; per-code counts and sums accumulated with scatter-adds, no N x K one-hot,
Laplace-smoothed). Codebook usage (perplexity, dead codes) is tracked in both modes, dead
codes can be restarted from batch vectors, and EMA statistics are all-reduced when a
``torch.distributed`` process group is initialised (restart candidates come from rank 0).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._backend import check_real, check_size, requested_backend
from ..ops.vq import METRICS, vq_lookup


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """Quantises the last dimension of its input to the nearest of ``codebook_size`` codes.

    Args:
        dim: feature size D of the vectors and codes.
        codebook_size: number of codes K.
        beta: weight of the commitment loss ``||z - sg(zq)||^2``. The weights and constants
            here must be finite numbers >= 0 (eps > 0), the sizes ints >= 1.
        decay: EMA decay of the codebook statistics; ``None`` learns the codebook by gradient
            through the codebook loss ``||sg(z) - zq||^2`` instead.
        metric: "l2" or "cosine" (nearest code by angle; the losses stay Euclidean).
        eps: Laplace smoothing of the EMA counts.
        dead_threshold: a code is dead while its EMA count (assignments per step) is below it
            (the default, 1e-3, flags codes unused for ~700 steps at decay 0.99).
        restart_dead: replace dead codes by random vectors of the current batch (training only).
        backend: backend of ``vq_lookup``.

    Returns (forward):
        ``(zq_st, idx, loss)``: the quantised vectors with the straight-through gradient
        (``z + sg(zq - z)``, dtype of ``z``), the int64 code indices and the scalar loss
        (codebook + beta * commitment, or beta * commitment in EMA mode).

    Shape:
        z: (..., D) -> zq_st: (..., D), idx: (...), loss: ().

    Buffers: ``cluster_size`` (K, EMA of per-code counts), ``ema_sum`` (K, D, EMA mode),
    ``perplexity`` (of the last batch's assignments); the ``dead_codes`` property counts codes
    below ``dead_threshold``.

    Example:
        >>> vq = pvkernels.nn.VectorQuantizer(64, 512)
        >>> zq, idx, loss = vq(torch.randn(8, 16, 16, 64))
        >>> zq.shape, idx.shape, float(vq.perplexity) > 1
        (torch.Size([8, 16, 16, 64]), torch.Size([8, 16, 16]), True)
    """

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25, decay: Optional[float] = 0.99,
                 metric: str = "l2", eps: float = 1e-5, dead_threshold: float = 1e-3, restart_dead: bool = False,
                 backend: str = "auto"):
        super().__init__()
        owner = "VectorQuantizer"
        dim, codebook_size = check_size(owner, "dim", dim), check_size(owner, "codebook_size", codebook_size)
        if decay is not None and check_real(owner, "decay", decay) >= 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1) or None, got {decay}")
        if metric not in METRICS:
            raise ValueError(f"VectorQuantizer: metric must be one of {METRICS}, got {metric!r}")
        requested_backend(owner, backend)
        self.dim, self.codebook_size = dim, codebook_size
        self.beta, self.decay, self.metric = check_real(owner, "beta", beta), decay, metric
        self.eps = check_real(owner, "eps", eps, positive=True)
        self.dead_threshold = check_real(owner, "dead_threshold", dead_threshold)
        self.restart_dead, self.backend = restart_dead, backend
        if decay is None:
            init = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", torch.randn(codebook_size, dim))
            self.register_buffer("ema_sum", self.codebook.clone())
        # starts at one assignment per code: consistent with ema_sum = codebook, and not dead
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)

    @property
    def dead_codes(self) -> torch.Tensor:
        """Number of codes whose EMA count is below ``dead_threshold``."""
        return (self.cluster_size < self.dead_threshold).sum()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}, decay={self.decay}, "
                f"metric={self.metric!r}, restart_dead={self.restart_dead}")

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"VectorQuantizer: z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() == 0 or z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: z must be (..., dim) = (..., {self.dim}), got shape {tuple(z.shape)}")
        if not z.is_floating_point():  # it is cast to the codebook's dtype for the lookup: the losses would fail
            raise TypeError(f"VectorQuantizer: z must be floating point, got {z.dtype}")
        # the lookup runs in the codebook's dtype; zq carries the codebook's gradient (decay=None)
        idx, zq = vq_lookup(z.detach().to(self.codebook.dtype), self.codebook, self.metric, self.backend)
        if z.numel() == 0:  # an empty batch contributes nothing (mse_loss of nothing is NaN)
            loss = (zq.sum() * 0.0).to(z.dtype) + (z.sum() * 0.0)
        else:
            commitment = F.mse_loss(z, zq.detach().to(z.dtype))
            if self.decay is None:
                loss = F.mse_loss(zq, z.detach().to(zq.dtype)) + self.beta * commitment
            else:
                loss = self.beta * commitment
        if self.training:
            with torch.no_grad():
                self._update(z.detach().reshape(-1, self.dim), idx.reshape(-1))
        zq_st = z + (zq.to(z.dtype) - z).detach()
        return zq_st, idx, loss

    def _update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """Per-code counts (and sums), usage statistics, EMA codebook, dead-code restart."""
        K = self.codebook_size
        counts = torch.zeros(K, device=idx.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        sums = None
        if self.decay is not None:
            sums = torch.zeros(K, self.dim, device=idx.device).index_add_(0, idx, flat.float())
        if _distributed():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        total = counts.sum()
        p = counts / total.clamp_min(1.0)
        self.perplexity.copy_(torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()))
        decay = 0.99 if self.decay is None else self.decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        if sums is not None:
            self.ema_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing
            self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        if self.restart_dead and flat.shape[0] > 0:
            self._restart(flat)

    def _restart(self, flat: torch.Tensor) -> None:
        """Dead codes take random vectors of this batch (rank 0's, so every rank agrees)."""
        dead = self.cluster_size < self.dead_threshold
        pick = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        candidates = flat[pick].to(self.codebook.dtype)
        if _distributed():
            dist.broadcast(candidates, 0)
        mask = dead.unsqueeze(1)
        self.codebook.data.copy_(torch.where(mask, candidates, self.codebook.data))
        fresh = max(1.0, self.dead_threshold)  # alive again, with one step's weight
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, fresh), self.cluster_size))
        if self.decay is not None:
            self.ema_sum.copy_(torch.where(mask, candidates.float() * fresh, self.ema_sum))
