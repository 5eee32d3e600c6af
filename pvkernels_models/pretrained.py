"""The two pretrained networks the models may use, in plain torch (no torchvision), and where
their weights are looked for.

``VGG16Features``: torchvision's ``vgg16().features`` with the same state_dict keys
(``features.0.weight`` ...), so torchvision's ``vgg16-397923af.pth`` loads (its classifier
keys are ignored); the perceptual loss uses it. ``FIDInceptionV3``: the InceptionV3 of
pytorch-fid (the TensorFlow FID graph ported to torch), keys matching
``pt_inception-2015-12-05-6726825d.pth`` so that file loads with strict=True; returns the
2048-d pool3 features FID is defined on. Nothing here downloads: the files are found at an
explicit path, an environment variable or torch hub's cache (``torch.hub.get_dir()/checkpoints``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG16_FILE = "vgg16-397923af.pth"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "PVKERNELS_INCEPTION_WEIGHTS"


def hub_checkpoint(filename: str) -> Path:
    """Where torch.hub (and torchvision) cache a downloaded weight file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def find_weights(filename: str, path: Optional[str] = None, flag: str = "path",
                 env: Optional[str] = None) -> tuple[Optional[Path], str]:
    """The first of ``path``, ``$env``, the hub cache's ``filename`` that exists.

    An explicitly given ``path`` or ``$env`` that does not exist is an error (naming ``flag`` or
    the variable), never a silent fallback.

    Returns:
        (the file or None, a sentence saying where it looked, for messages).
    """
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: no file at {path}")
        return Path(path), f"{flag} {path}"
    if env and os.environ.get(env):
        if not Path(os.environ[env]).is_file():
            raise FileNotFoundError(f"${env}: no file at {os.environ[env]}")
        return Path(os.environ[env]), f"${env} {os.environ[env]}"
    cached = hub_checkpoint(filename)
    looked = f"{flag} (not given), " + (f"${env} (not set), " if env else "") + f"the torch hub cache {cached}"
    return (cached if cached.is_file() else None), looked


def _load_strict(cls: type, state: dict, path: Path, what: str) -> nn.Module:
    """cls() with every tensor taken from state (strict), in eval mode and frozen."""
    with torch.device("meta"):  # no random init to overwrite, and the global RNG is left alone
        module = cls()
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a {what} weight file: {str(exc).splitlines()[0]}") from exc
    return module.eval().requires_grad_(False)


# -- VGG16 ---------------------------------------------------------------------------------
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` (13 3x3 convs + ReLU, 5 max pools), same indices.

    ``forward(x)`` returns the activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3
    (the LPIPS taps). Shape: x (N, 3, H, W) ImageNet-normalised, H, W >= 16.
    """

    TAPS = (3, 8, 15, 22, 29)
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in _VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 16:
            raise ValueError(f"VGG16Features: expected (N, 3, H, W) with H, W >= 16 (four 2x poolings "
                             f"before relu5_3), got {tuple(x.shape)}")
        out = []
        for i, layer in enumerate(self.features[: self.TAPS[-1] + 1]):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out


def load_vgg16(path: str | Path) -> VGG16Features:
    """VGG16Features from a torchvision vgg16 state_dict file (its ``features.*`` keys, strictly)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    return _load_strict(VGG16Features, features, Path(path), "torchvision vgg16")


# -- InceptionV3 for FID --------------------------------------------------------------------
class _Conv(nn.Module):
    """conv (no bias) + batch norm (eps 1e-3, TensorFlow's) + ReLU: torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TensorFlow's average pool leaves the zero padding out of the mean; torchvision's counts it
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class _InceptionE(nn.Module):
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # the FID graph's last block max-pools here (the paper's network average-pools)
        pooled = F.max_pool2d(x, 3, 1, 1) if self.pool == "max" else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in pytorch-fid (TensorFlow's 2015-12-05 FID graph), pool3 features.

    ``forward(x)``: images in [0, 1] are resized to 299x299 (bilinear), scaled to [-1, 1] and
    mapped to their 2048-d average-pool features. Grey images (C=1) are repeated to RGB.
    Shape: x (N, 1 or 3, H, W) -> (N, 2048).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _InceptionA(192, 32), _InceptionA(256, 64), _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280, "avg"), _InceptionE(2048, "max")
        # the 1008-way classifier of the TF graph: unused for FID, kept so the file loads strictly
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FIDInceptionV3: expected images (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = F.interpolate(x.float().expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_inception(path: str | Path) -> FIDInceptionV3:
    """FIDInceptionV3 from ``pt_inception-2015-12-05-6726825d.pth`` (strict), in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return _load_strict(FIDInceptionV3, state, Path(path), "pytorch-fid InceptionV3")
