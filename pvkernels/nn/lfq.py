"""LookupFreeQuantizer: lookup-free quantisation (MAGVIT-v2) on the fused ``pvkernels.lfq_entropy``.

Each of ``num_codebooks`` groups of ``bits`` features is quantised to its signs (a code of
{-s, +s}^bits, l2-normalised when ``spherical``), with the straight-through gradient; the index
is the bits read as a binary number (feature 0 the highest bit, as vector-quantize-pytorch's
LFQ). The auxiliary loss is its entropy loss, per-sample entropy minus ``diversity_gamma`` times
the entropy of the batch's mean code distribution (all-reduced under DDP), plus a commitment
loss; the entropy terms never build the N x 2^bits probabilities.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._backend import check_real, check_size, requested_backend
from ..ops.lfq import MAX_BITS, lfq_entropy


def _entropy(prob: torch.Tensor, eps: float) -> torch.Tensor:
    return (-prob * prob.clamp(min=eps).log()).sum(dim=-1)


class LookupFreeQuantizer(nn.Module):
    """Quantises the last dimension of its input to sign codes of ``num_codebooks x bits`` bits.

    Args:
        dim: feature size of the input; projected to ``num_codebooks * bits`` (and back) by
            linear layers when it differs.
        bits: bits per codebook (2^bits codes), 1 to 24.
        num_codebooks: independent codebooks the projected features are split into.
        entropy_loss_weight: weight of the entropy loss in the returned loss. The weights here
            must be finite numbers >= 0, inv_temperature, codebook_scale and eps > 0.
        diversity_gamma: weight of the codebook (batch) entropy inside the entropy loss.
        commitment_loss_weight: weight of ``||x - sg(q)||^2``.
        inv_temperature: inverse temperature of the code distribution ``softmax(2 t <x, c>)``.
        codebook_scale: magnitude of a code's entries.
        spherical: l2-normalise inputs and codes (binary spherical quantisation).
        eps: clamp of ``log p`` in both entropies.
        backend: backend of ``lfq_entropy``.

    Returns (forward):
        ``(q_st, indices, loss)``: the quantised features with the straight-through gradient
        (input's dtype), int64 indices (..., num_codebooks) and the scalar loss (0 in eval mode).
        ``self.last_losses`` holds the last training call's per-sample entropy, codebook entropy
        and commitment.

    Shape:
        x: (..., dim) -> q_st: (..., dim), indices: (..., num_codebooks), loss: ().

    Example:
        >>> lfq = pvkernels.nn.LookupFreeQuantizer(dim=64, bits=16)
        >>> q, idx, loss = lfq(torch.randn(8, 256, 64))
        >>> q.shape, idx.shape, int(idx.max()) < 2 ** 16
        (torch.Size([8, 256, 64]), torch.Size([8, 256, 1]), True)
    """

    def __init__(self, dim: int, bits: int, num_codebooks: int = 1, entropy_loss_weight: float = 0.1,
                 diversity_gamma: float = 1.0, commitment_loss_weight: float = 0.25, inv_temperature: float = 100.0,
                 codebook_scale: float = 1.0, spherical: bool = False, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        owner = "LookupFreeQuantizer"
        dim, bits = check_size(owner, "dim", dim), check_size(owner, "bits", bits)
        if bits > MAX_BITS:
            raise ValueError(f"LookupFreeQuantizer: bits must be 1 to {MAX_BITS}, got {bits}")
        num_codebooks = check_size(owner, "num_codebooks", num_codebooks)
        requested_backend(owner, backend)
        self.dim, self.bits, self.num_codebooks = dim, bits, num_codebooks
        self.entropy_loss_weight = check_real(owner, "entropy_loss_weight", entropy_loss_weight)
        self.diversity_gamma = check_real(owner, "diversity_gamma", diversity_gamma)
        self.commitment_loss_weight = check_real(owner, "commitment_loss_weight", commitment_loss_weight)
        self.inv_temperature = check_real(owner, "inv_temperature", inv_temperature, positive=True)
        self.codebook_scale = check_real(owner, "codebook_scale", codebook_scale, positive=True)
        self.spherical, self.eps, self.backend = spherical, check_real(owner, "eps", eps, positive=True), backend
        inner = bits * num_codebooks
        self.project_in = nn.Linear(dim, inner) if dim != inner else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if dim != inner else nn.Identity()
        self.register_buffer("powers", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)
        self.last_losses: dict = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, bits={self.bits}, num_codebooks={self.num_codebooks}, "
                f"spherical={self.spherical}, inv_temperature={self.inv_temperature}")

    def _normalise(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(..., num_codebooks) int indices -> (..., dim) features, as the quantiser outputs them."""
        bits = ((indices[..., None] & self.powers) != 0).float()
        codes = self._normalise((bits * 2 - 1) * self.codebook_scale)
        return self.project_out(codes.flatten(-2))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"LookupFreeQuantizer: x must be (..., dim={self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != x.shape[:-1]):
            raise ValueError(f"LookupFreeQuantizer: mask must be a bool tensor of x's token shape "
                             f"{tuple(x.shape[:-1])}, got {getattr(mask, 'shape', type(mask).__name__)}")
        dtype = x.dtype
        h = self.project_in(x).float()
        h = self._normalise(h.unflatten(-1, (self.num_codebooks, self.bits)))
        positive = h > 0
        indices = (positive.long() * self.powers).sum(-1)
        q = self._normalise(torch.where(positive, self.codebook_scale, -self.codebook_scale).to(h.dtype))
        loss = h.new_zeros(())
        if self.training:
            per_sample, avg_prob = lfq_entropy(h, self.inv_temperature, self.codebook_scale, self.spherical,
                                               self.eps, mask, self.backend)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                avg_prob = torch.distributed.nn.all_reduce(avg_prob) / dist.get_world_size()
            codebook_entropy = _entropy(avg_prob, self.eps).mean()
            commitment = F.mse_loss(h, q.detach(), reduction="none")
            commitment = (commitment[mask] if mask is not None else commitment).mean()
            loss = (self.entropy_loss_weight * (per_sample - self.diversity_gamma * codebook_entropy)
                    + self.commitment_loss_weight * commitment)
            self.last_losses = dict(per_sample_entropy=per_sample.detach(),
                                    codebook_entropy=codebook_entropy.detach(), commitment=commitment.detach())
        q_st = h + (q - h).detach()
        return self.project_out(q_st.flatten(-2).to(dtype)), indices, loss
