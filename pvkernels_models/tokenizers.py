"""VQVAE (image) and CViViT (its video counterpart on pseudo videos).

CViViT embeds every frame in patches, runs space-time blocks with causal temporal attention
(frame t sees frames <= t, so the last frame, the image, sees the whole pseudo video),
quantises the tokens with pvkernels.nn.VectorQuantizer and decodes with mirrored blocks. The
reconstruction of the last frame is the image. With frames=1 it is a ViT image tokenizer.
Its loss weighs the frames as VideoDiffusion's does: ``L_last + lambda * mean(L_other frames)``.

VQVAE quantises each latent position into ``groups`` codes (the position's vector split in
``groups`` parts, one shared codebook): with groups = T it has as many codes per image as
CViViT's last frame can draw on (patch 4 = VQVAE's downsampling 4, so 16 codes per frame on
16x16 images, and the last frame sees all T frames' codes through the causal attention).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import pvkernels
from pvkernels._backend import check_sizes

from .losses import frame_weighted_mean


class VQVAE(nn.Module):
    """Conv encoder (two stride-2 convs), VectorQuantizer, mirrored decoder.

    ``forward(x)`` -> (reconstruction, codes, vq_loss); ``loss(x)`` = MSE + vq_loss (the optional
    GAN and perceptual terms are added by the trainer, see ``losses``). ``groups`` codes per
    latent position (S/4 x S/4 positions): ``codes`` is (B, S/4, S/4, groups).
    Shape: images (B, C, S, S) in [0, 1], S divisible by 4.
    """

    def __init__(self, channels: int = 1, width: int = 64, dim: int = 32, codebook_size: int = 128,
                 decay: float | None = 0.99, groups: int = 1, backend: str = "auto"):
        super().__init__()
        check_sizes("VQVAE", channels=channels, width=width, dim=dim, codebook_size=codebook_size, groups=groups)
        self.groups, self.dim = groups, dim
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, groups * dim, 1))
        self.quantizer = pvkernels.nn.VectorQuantizer(dim, codebook_size, decay=decay, backend=backend)
        self.decoder = nn.Sequential(
            nn.Conv2d(groups * dim, width, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(width, width, 4, 2, 1),
            nn.ReLU(), nn.ConvTranspose2d(width, channels, 4, 2, 1))

    def forward(self, x):
        z = self.encoder(x).permute(0, 2, 3, 1)  # channels last for the quantiser
        B, H, W, _ = z.shape
        zq, codes, vq_loss = self.quantizer(z.reshape(B, H, W, self.groups, self.dim))
        recon = torch.sigmoid(self.decoder(zq.reshape(B, H, W, -1).permute(0, 3, 1, 2)))
        return recon, codes, vq_loss

    def loss(self, x, generator=None, return_recon=False):
        """MSE + VQ loss; with ``return_recon`` also the reconstruction (for the GAN and perceptual terms)."""
        recon, _, vq_loss = self(x)
        loss = F.mse_loss(recon, x) + vq_loss
        return (loss, recon) if return_recon else loss

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the GAN term's adaptive weight is measured."""
        return self.decoder[-1].weight


class CViViT(nn.Module):
    """Video tokenizer for pseudo videos; ``forward(video)`` -> (reconstruction, codes, vq_loss).

    ``other_weight`` is lambda of the loss (None: 1 / (T - 1)); ``backend`` that of every op.
    Shape: videos (B, T, C, S, S) in [0, 1] with T == frames, S divisible by ``patch``.
    """

    def __init__(self, channels: int = 1, image_size: int = 16, frames: int = 4, patch: int = 4, dim: int = 64,
                 depth: int = 2, heads: int = 4, codebook_size: int = 128, code_dim: int = 16,
                 decay: float | None = 0.95, other_weight: float | None = None, backend: str = "auto"):
        super().__init__()
        check_sizes("CViViT", channels=channels, image_size=image_size, frames=frames, patch=patch, dim=dim,
                     depth=depth, heads=heads, codebook_size=codebook_size, code_dim=code_dim)
        if other_weight is not None and not other_weight >= 0:
            raise ValueError(f"other_weight must be >= 0 or None, got {other_weight}")
        self.other_weight = other_weight if other_weight is not None else 1 / max(frames - 1, 1)
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be divisible by patch {patch}")
        self.channels, self.image_size, self.frames, self.patch = channels, image_size, frames, patch
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.pos_space = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.pos_time = nn.Parameter(torch.randn(frames, dim) * 0.02)
        block = lambda: pvkernels.nn.SpaceTimeBlock(dim, heads, causal_time=True, backend=backend)  # noqa: E731
        self.encoder = nn.ModuleList([block() for _ in range(depth)])
        # factorised, l2-normalised codes (as in ViT-VQGAN), matched by angle; at initialisation
        # the tokens all point almost the same way, so codes unused for ~15 steps are restarted
        # from batch vectors (else the codebook collapses onto one code)
        self.to_code = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, code_dim))
        self.quantizer = pvkernels.nn.VectorQuantizer(code_dim, codebook_size, decay=decay, metric="cosine",
                                                      dead_threshold=0.5, restart_dead=True, backend=backend)
        self.from_code = nn.Linear(code_dim, dim)
        self.decoder = nn.ModuleList([block() for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, channels * patch * patch)

    def forward(self, video):
        B, T, C, H, W = video.shape
        if T != self.frames:
            raise ValueError(f"CViViT: expected {self.frames} frames, got {T}")
        p = self.patch
        tokens = video.reshape(B, T, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, T, -1, C * p * p)
        h = self.embed(tokens) + self.pos_space + self.pos_time[:, None]
        for blk in self.encoder:
            h = blk(h)
        h, codes, vq_loss = self.quantizer(F.normalize(self.to_code(h), dim=-1))
        h = self.from_code(h)
        for blk in self.decoder:
            h = blk(h)
        out = self.head(self.norm(h)).reshape(B, T, H // p, W // p, C, p, p)
        recon = torch.sigmoid(out.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, T, C, H, W))
        return recon, codes, vq_loss

    def loss(self, video, generator=None, return_recon=False):
        """Frame-weighted MSE + VQ loss; with ``return_recon`` also the reconstruction."""
        recon, _, vq_loss = self(video)
        loss = frame_weighted_mean((recon - video).pow(2), self.other_weight) + vq_loss
        return (loss, recon) if return_recon else loss

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the GAN term's adaptive weight is measured."""
        return self.head.weight
