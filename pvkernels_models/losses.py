"""The video models' frame weighting, and the tokenizers' optional loss terms: a PatchGAN
hinge GAN and an LPIPS perceptual loss.

Both act on images, i.e. on the last frame of a pseudo video (that frame is the image the
models are judged on, and it keeps the extra cost at one image per example). The GAN's
generator term is weighted as in VQGAN: ``adaptive_weight`` balances its gradient against the
reconstruction's at the decoder's last layer. LPIPS uses VGG16 features; its learned channel
weights (the official lpips ``vgg.pth``) are optional and default to uniform weights.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pretrained import VGG16_FILE, VGG16Features, find_weights, load_vgg16


def frame_weighted_mean(sq_err: torch.Tensor, other_weight: float) -> torch.Tensor:
    """``L_last + other_weight * mean(L_other frames)`` of a video's squared errors (B, T, ...),
    L_t the mean over frame t. The plain mean over frames (weight 1/T on the image) is
    other_weight = T - 1; with one frame it is L_last."""
    per_frame = sq_err.transpose(0, 1).flatten(1).mean(1)
    return per_frame[-1] + other_weight * per_frame[:-1].mean() if len(per_frame) > 1 else per_frame[0]


def last_frame(x: torch.Tensor) -> torch.Tensor:
    """The image of a pseudo video (B, T, C, H, W); images (B, C, H, W) pass through."""
    return x[:, -1] if x.dim() == 5 else x


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs, one real/fake logit per patch.

    GroupNorm rather than VQGAN's BatchNorm: real and fake go through in one batch (one forward
    for DistributedDataParallel), which batch statistics would mix, and there are no running
    buffers to keep in sync between processes.
    Shape: (B, C, S, S) in [0, 1], S divisible by 2**layers -> logits (B, 1, S / 2**layers, same).
    """

    def __init__(self, channels: int = 1, width: int = 32, layers: int = 2):
        super().__init__()
        self.layers = layers
        blocks, cin = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for i in range(1, layers):
            blocks += [nn.Conv2d(cin, width * 2 ** i, 4, 2, 1), nn.GroupNorm(8, width * 2 ** i), nn.LeakyReLU(0.2)]
            cin = width * 2 ** i
        blocks.append(nn.Conv2d(cin, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 2 ** self.layers or x.shape[-2] % 2 ** self.layers:
            raise ValueError(f"PatchDiscriminator: expected (B, C, H, W) with H, W divisible by "
                             f"{2 ** self.layers}, got {tuple(x.shape)}")
        return self.net(2 * x - 1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: mean(relu(1 - D(real)) + relu(1 + D(fake))) / 2."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's hinge term: -mean(D(fake))."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's weight of the GAN term: ||grad rec_loss|| / ||grad g_loss|| at the decoder's last
    layer, so the GAN term neither drowns nor vanishes beside the reconstruction (detached).

    Both graphs are kept (retain_graph) for the backward of the total loss that follows.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# -- perceptual loss ---------------------------------------------------------------------------
LPIPS_FILE = "vgg.pth"


def find_lpips_weights(path: Optional[str] = None) -> tuple[Optional[Path], str]:
    """The official LPIPS channel weights: ``path`` (--lpips-weights) or the ``weights/v0.1/vgg.pth``
    shipped inside an installed ``lpips`` package (located without importing it)."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--lpips-weights: no file at {path}")
        return Path(path), f"--lpips-weights {path}"
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None, "--lpips-weights (not given), the lpips package (not installed)"
    bundled = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / LPIPS_FILE
    return (bundled if bundled.is_file() else None), f"--lpips-weights (not given), {bundled}"


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity on VGG16 features (Zhang et al. 2018).

    For each of the five VGG taps: unit-normalise the features over channels, square the
    difference, weight the channels, average over space; sum over taps. ``channel_weights``
    are the lpips ``lin0..lin4`` weights, or uniform (1 / channels) when None. Frozen (VGG16
    has no dropout or batch norm, so train/eval mode makes no difference).
    Shape: x, y (N, 1 or 3, H, W) in [0, 1], H, W >= 16 -> (N,).
    """

    # ImageNet normalisation expressed on [-1, 1] inputs, as lpips' ScalingLayer
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, vgg: VGG16Features, channel_weights: Optional[list[torch.Tensor]] = None, source: str = ""):
        super().__init__()
        self.source = source  # where the weights came from, for the training log
        self.vgg = vgg.eval().requires_grad_(False)
        self.uniform = channel_weights is None
        if channel_weights is None:
            channel_weights = [torch.full((1, c, 1, 1), 1.0 / c) for c in VGG16Features.CHANNELS]
        for i, w in enumerate(channel_weights):
            self.register_buffer(f"lin{i}", w.reshape(1, -1, 1, 1).float())
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.vgg(((2 * x - 1) - self.shift) / self.scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        total = 0.0
        for i, (fx, fy) in enumerate(zip(self._features(x), self._features(y))):
            diff = (F.normalize(fx, dim=1, eps=1e-10) - F.normalize(fy, dim=1, eps=1e-10)).pow(2)
            total = total + (diff * getattr(self, f"lin{i}")).sum(1).mean((1, 2))
        return total


def load_lpips(vgg_path: Optional[str] = None, lpips_path: Optional[str] = None) -> LPIPS:
    """LPIPS from the VGG16 weights (``vgg_path`` = --perceptual-weights, else torch hub's
    ``checkpoints/vgg16-397923af.pth``) and, if found, the lpips channel weights.

    Raises:
        FileNotFoundError: no VGG16 weights, naming --perceptual-weights and where it looked
            (training never goes on silently without the term it was asked for).
    """
    path, looked = find_weights(VGG16_FILE, vgg_path, "--perceptual-weights")
    if path is None:
        raise FileNotFoundError(f"--perceptual-weight > 0 needs torchvision's VGG16 weights ({VGG16_FILE}); "
                                f"none found (looked in {looked}); pass --perceptual-weights PATH or "
                                "set --perceptual-weight 0")
    vgg = load_vgg16(path)
    lin_path, lin_looked = find_lpips_weights(lpips_path)
    weights = None
    if lin_path is not None:
        state = torch.load(lin_path, map_location="cpu", weights_only=True)
        keys = [f"lin{i}.model.1.weight" for i in range(5)]
        shapes = [(1, c, 1, 1) for c in VGG16Features.CHANNELS]
        if any(k not in state or tuple(state[k].shape) != s for k, s in zip(keys, shapes)):
            raise ValueError(f"{lin_path} is not an lpips VGG weight file (expected {', '.join(keys)})")
        weights = [state[k] for k in keys]
    source = f"VGG16 {path}; " + (f"lpips channel weights {lin_path}" if weights is not None else
                                  f"uniform channel weights (no lpips vgg.pth: looked in {lin_looked})")
    return LPIPS(vgg, weights, source)
