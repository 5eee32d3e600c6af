from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._backend import requested_backend
from ..ops.pseudo_video import pseudo_video


class PseudoVideo(torch.nn.Module):
    """Data transform: a batch of images (B, C, H, W) -> its pseudo video (B, T, C, H, W).

    Holds the per-frame parameters; ``forward`` calls :func:`pvkernels.pseudo_video`.

    Example:
        >>> make_video = PseudoVideo(**pvkernels.schedules.ddpm_noise(frames=8))
        >>> video = make_video(images, seed=step)
    """

    def __init__(self, blur_sigma: Optional[Sequence[float]] = None, noise_std: Optional[Sequence[float]] = None,
                 signal_scale: Optional[Sequence[float]] = None, order: str = "high", truncate: float = 3.0,
                 backend: str = "auto"):
        super().__init__()
        self.blur_sigma = None if blur_sigma is None else [float(v) for v in blur_sigma]
        self.noise_std = None if noise_std is None else [float(v) for v in noise_std]
        self.signal_scale = None if signal_scale is None else [float(v) for v in signal_scale]
        requested_backend("PseudoVideo", backend)
        self.order, self.truncate, self.backend = order, truncate, backend
        # validate once, at construction, on a tiny input
        pseudo_video(torch.zeros(0, 1, 2, 2), self.blur_sigma, self.noise_std, self.signal_scale, order, seed=0,
                     truncate=truncate, backend="reference")

    @property
    def frames(self) -> int:
        return len(next(p for p in (self.blur_sigma, self.noise_std, self.signal_scale) if p is not None))

    def forward(self, x: torch.Tensor, seed: Optional[int] = None, noise: Optional[torch.Tensor] = None):
        return pseudo_video(x, self.blur_sigma, self.noise_std, self.signal_scale, self.order, seed, noise,
                            self.truncate, self.backend)

    def extra_repr(self) -> str:
        return f"frames={self.frames}, order={self.order!r}, truncate={self.truncate}, backend={self.backend!r}"
