"""DDPM (image) and VideoDiffusion (its video counterpart on pseudo videos).

Both predict epsilon under the same noise schedule and work on the model's scale: images (and
pseudo-video frames) with the data in [-1, 1]. VideoDiffusion is a factorised space-time U-Net
in the shape of Ho et al.'s video diffusion: DDPM's spatial layers, shared by every frame, with
temporal attention (pvkernels.nn.TemporalAttention, pre-norm residual, T5 relative bias) after
every resolution level and at the middle, and a frame embedding added to every block's time
embedding. The temporal output projections and the frame embedding start at zero, so at
initialisation VideoDiffusion is DDPM on every frame (same seed, same spatial weights). All
frames are denoised jointly with one t; the last frame is the image.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pvkernels

from .losses import frame_weighted_mean


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
    """The epsilon-prediction objective and the ancestral sampler shared by both models."""

    def __init__(self, timesteps: int, schedule: str):
        super().__init__()
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.timesteps = timesteps
        self.register_buffer("alpha_bar", noise_schedule(timesteps, schedule), persistent=False)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weigh(self, sq_err: torch.Tensor) -> torch.Tensor:
        """The scalar loss from the squared epsilon errors (the mean)."""
        return sq_err.mean()

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The x0 prediction clipped to the data range [-1, 1] while sampling."""
        return x0.clamp(-1, 1)

    def loss(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Epsilon-prediction loss of clean data ``x0`` (model scale) at one random t per example.

        t and the noise are drawn from ``generator`` (where it lives, then moved: a CPU
        generator keeps runs resumable bit for bit on any device).
        """
        where = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator, device=where).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=where).to(x0.device)
        ab = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        return self.weigh((self.denoise(x_t, t) - eps).pow(2))

    def posterior_step(self, x: torch.Tensor, x0: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x_{step-1} ~ q(x_{step-1} | x_step = x, x0) with standard normal ``noise``
        (at step 0 the posterior mean, x0 itself)."""
        ab = self.alpha_bar[step]
        ab_prev = self.alpha_bar[step - 1] if step > 0 else torch.ones_like(ab)
        beta = 1 - ab / ab_prev
        mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * x) / (1 - ab)
        return mean + (beta * (1 - ab_prev) / (1 - ab)).sqrt() * noise if step > 0 else mean

    @torch.no_grad()
    def sample_like(self, shape, generator: Optional[torch.Generator] = None, device="cpu",
                    progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Ancestral sampling (DDPM) with the x0 prediction clipped (``clip_x0``) at every step:
        x_{t-1} ~ q(x_{t-1} | x_t, x0_hat). Returns data on the model scale. ``progress(done,
        timesteps)`` is called after every step."""
        where = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, device=where).to(device)
        for step in range(self.timesteps - 1, -1, -1):
            ab = self.alpha_bar[step]
            t = torch.full((shape[0],), step, device=device, dtype=torch.int64)
            x0 = self.clip_x0((x - (1 - ab).sqrt() * self.denoise(x, t)) / ab.sqrt())
            noise = torch.randn(shape, generator=generator, device=where).to(device) if step > 0 else None
            x = self.posterior_step(x, x0, step, noise)
            if progress is not None:
                progress(self.timesteps - step, self.timesteps)
        return x


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

    ``loss(x0)`` takes images on the model scale, ``2 * image - 1``; ``sample(n)`` returns
    images in [0, 1].
    Shape: images (B, C, S, S), S divisible by 2.
    """

    LEVELS = ("down", "mid", "up")  # where VideoDiffusion mixes the frames

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
        return self._unet(x_t, self.temb(_timestep_embedding(t, self.width)))

    def _unet(self, x, temb, mix=lambda level, h: h):
        """The U-Net on images (N, C, S, S); ``mix(level, h)`` runs after each level (identity here)."""
        h0 = mix("down", self.down(self.inp(x), temb))
        h = mix("mid", self.mid(self.pool(h0), temb))
        return self.out(mix("up", self.dec(torch.cat([self.up(h), h0], 1), temb)))

    def sample(self, n: int, generator: Optional[torch.Generator] = None, progress=None) -> torch.Tensor:
        """n images in [0, 1] (the x0 clip keeps the last step inside the range); ``progress``
        as ``sample_like``'s."""
        shape = (n, self.channels, self.image_size, self.image_size)
        return (self.sample_like(shape, generator, self.alpha_bar.device, progress) + 1) / 2


class _TemporalMixer(nn.Module):
    """h + TemporalAttention(LayerNorm(h)) over the frames at each position of a feature map,
    with the attention's output projection zero-initialised (the identity at init)."""

    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = pvkernels.nn.TemporalAttention(dim, heads, causal=False, rel_pos="t5", backend=backend)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        N, C, H, W = h.shape
        tokens = h.view(N // frames, frames, C, H * W).transpose(2, 3)  # (B, T, S, C)
        tokens = tokens + self.attn(self.norm(tokens))
        return tokens.transpose(2, 3).reshape(N, C, H, W)


class VideoDiffusion(DDPM):
    """Video counterpart of DDPM, trained on pseudo videos (see the module docstring).

    Args:
        channels, image_size, width, timesteps, schedule: as DDPM (its layers, shared by frames).
        frames: T, the pseudo-video length.
        heads: heads of every temporal attention.
        other_weight: lambda in ``loss = L_last + lambda * mean(L_other frames)``; None means
            1 / (T - 1).
        clip_frames: "last" clips only the last frame's x0 prediction to [-1, 1] while sampling
            (pseudo videos with noise frames leave that range), "all" clips every frame (blur
            and identity pseudo videos stay inside it).
        backend: of the temporal attention ops.

    ``loss(video)`` takes pseudo videos on the model scale; ``sample(n)`` returns the last
    frames in [0, 1]; ``sample_video(n)`` the whole videos on the model scale.
    Shape: videos (B, T, C, S, S) with T == frames.
    """

    def __init__(self, channels: int = 1, image_size: int = 16, frames: int = 4, width: int = 32, heads: int = 4,
                 timesteps: int = 200, schedule: str = "linear", other_weight: Optional[float] = None,
                 clip_frames: str = "last", backend: str = "auto"):
        super().__init__(channels, image_size, width, timesteps, schedule)  # first: DDPM's init, draw for draw
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if other_weight is not None and not other_weight >= 0:
            raise ValueError(f"other_weight must be >= 0 or None, got {other_weight}")
        if clip_frames not in ("last", "all"):
            raise ValueError(f"clip_frames must be 'last' or 'all', got {clip_frames!r}")
        self.frames, self.clip_frames = frames, clip_frames
        self.other_weight = other_weight if other_weight is not None else 1 / max(frames - 1, 1)
        self.frame_emb = nn.Parameter(torch.zeros(frames, 4 * width))
        dims = {"down": width, "mid": 2 * width, "up": width}
        self.temporal = nn.ModuleDict({level: _TemporalMixer(dims[level], heads, backend) for level in self.LEVELS})

    def denoise(self, x_t, t):
        B, T = x_t.shape[:2]
        if T != self.frames:
            raise ValueError(f"VideoDiffusion: expected {self.frames} frames, got {T}")
        # the time embedding of the flattened batch, exactly as DDPM computes it, plus the frame's
        temb = self.temb(_timestep_embedding(t.repeat_interleave(T), self.width)) + self.frame_emb.repeat(B, 1)
        out = self._unet(x_t.flatten(0, 1), temb, lambda level, h: self.temporal[level](h, T))
        return out.view_as(x_t)

    def weigh(self, sq_err):
        return frame_weighted_mean(sq_err, self.other_weight)

    def clip_x0(self, x0):
        if self.clip_frames == "all":
            return x0.clamp(-1, 1)
        return torch.cat([x0[:, :-1], x0[:, -1:].clamp(-1, 1)], 1)

    def sample_video(self, n: int, generator: Optional[torch.Generator] = None, progress=None) -> torch.Tensor:
        shape = (n, self.frames, self.channels, self.image_size, self.image_size)
        return self.sample_like(shape, generator, self.alpha_bar.device, progress)

    def sample(self, n: int, generator: Optional[torch.Generator] = None, progress=None) -> torch.Tensor:
        return (self.sample_video(n, generator, progress)[:, -1] + 1) / 2
