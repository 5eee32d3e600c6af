"""DDPM (image) and VideoDiffusion (its video counterpart on pseudo videos).

Both predict epsilon under the same noise schedule; the video model denoises a whole pseudo
video (B, T, C, H, W) with space-time attention and returns its last frame as the image.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import pvkernels


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def noise_schedule(timesteps: int, schedule: str) -> torch.Tensor:
    """alpha_bar_t for t = 1..timesteps (the DDPM linear or cosine schedule)."""
    if schedule == "linear":
        # DDPM's 1e-4..0.02 over 1000 steps, rescaled to `timesteps` steps
        betas = torch.linspace(1e-4 * 1000 / timesteps, 0.02 * 1000 / timesteps, timesteps, dtype=torch.float64)
        betas = betas.clamp(max=0.999)
        return torch.cumprod(1 - betas, 0).float()
    if schedule == "cosine":
        s = 0.008
        u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cumprod(1 - betas, 0).float()
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")


class _GaussianDiffusion(nn.Module):
    """The epsilon-prediction objective and ancestral sampler shared by both models."""

    def __init__(self, timesteps: int, schedule: str):
        super().__init__()
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.timesteps = timesteps
        self.register_buffer("alpha_bar", noise_schedule(timesteps, schedule), persistent=False)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # drawn where the generator lives, then moved: a CPU generator keeps runs resumable
        where = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator, device=where).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=where).to(x0.device)
        ab = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
        x_t = ab.sqrt() * (2 * x0 - 1) + (1 - ab).sqrt() * eps  # data scaled to [-1, 1]
        return F.mse_loss(self.denoise(x_t, t), eps)

    @torch.no_grad()
    def sample_like(self, shape, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        x = torch.randn(shape, generator=generator, device=device)
        ab_prev = torch.ones((), device=device)
        for step in range(self.timesteps - 1, -1, -1):
            ab = self.alpha_bar[step]
            ab_prev = self.alpha_bar[step - 1] if step > 0 else torch.ones((), device=device)
            beta = 1 - ab / ab_prev
            t = torch.full((shape[0],), step, device=device, dtype=torch.int64)
            eps = self.denoise(x, t)
            x = (x - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
            if step > 0:
                sigma = (beta * (1 - ab_prev) / (1 - ab)).sqrt()
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
        return ((x + 1) / 2).clamp(0, 1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class DDPM(_GaussianDiffusion):
    """Small image DDPM: a two-level conv U-Net predicting epsilon.

    Shape: images (B, C, S, S) in [0, 1], S divisible by 2.
    """

    def __init__(self, channels: int = 1, image_size: int = 16, width: int = 32, timesteps: int = 200,
                 schedule: str = "linear"):
        super().__init__(timesteps, schedule)
        if image_size % 2:
            raise ValueError(f"image_size must be even, got {image_size}")
        self.channels, self.image_size, tdim = channels, image_size, 4 * width
        self.temb = nn.Sequential(nn.Linear(width, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.width = width
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = _ResBlock(width, width, tdim)
        self.pool = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = _ResBlock(2 * width, 2 * width, tdim)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.dec = _ResBlock(2 * width, width, tdim)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def denoise(self, x_t, t):
        temb = self.temb(_timestep_embedding(t, self.width))
        h0, h = self._encode(x_t, temb)
        return self._decode(h0, h, temb)

    def _encode(self, x, temb):
        h0 = self.down(self.inp(x), temb)
        return h0, self.mid(self.pool(h0), temb)

    def _decode(self, h0, h, temb):
        return self.out(self.dec(torch.cat([self.up(h), h0], 1), temb))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.alpha_bar.device
        return self.sample_like((n, self.channels, self.image_size, self.image_size), generator, device)


class VideoDiffusion(DDPM):
    """Video counterpart of DDPM, trained on pseudo videos: the same U-Net runs on every frame
    and a space-time attention block (pvkernels.nn.SpaceTimeBlock: attention over the
    bottleneck positions of a frame, then over the frames at each position) mixes the frames
    at the bottleneck. Epsilon is predicted for the whole video; ``sample`` generates pseudo
    videos and returns their last frames, the images.

    Shape: videos (B, T, C, S, S) in [0, 1] with T == frames.
    """

    def __init__(self, channels: int = 1, image_size: int = 16, frames: int = 4, width: int = 32, heads: int = 4,
                 timesteps: int = 200, schedule: str = "linear"):
        super().__init__(channels, image_size, width, timesteps, schedule)
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frames = frames
        self.pos_time = nn.Parameter(torch.zeros(frames, 2 * width))
        self.space_time = pvkernels.nn.SpaceTimeBlock(2 * width, heads, causal_time=False)

    def denoise(self, x_t, t):
        B, T = x_t.shape[:2]
        temb = self.temb(_timestep_embedding(t.repeat_interleave(T), self.width))
        h0, h = self._encode(x_t.flatten(0, 1), temb)
        C, H, W = h.shape[1:]
        tokens = h.view(B, T, C, H * W).transpose(2, 3) + self.pos_time[:T, None]  # (B, T, S, C)
        h = self.space_time(tokens).transpose(2, 3).reshape(B * T, C, H, W)
        return self._decode(h0, h, temb).view_as(x_t)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (n, self.frames, self.channels, self.image_size, self.image_size)
        return self.sample_like(shape, generator, self.alpha_bar.device)[:, -1]
