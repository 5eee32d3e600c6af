"""Image-quality metrics: PSNR, the Frechet distance behind FID and the kernel distance behind KID.

``frechet_distance`` is the closed form between two Gaussians fitted to feature sets; ``fid``
is that distance on the 2048-d pool3 features of pytorch-fid's InceptionV3, with its standard
weights file (``pretrained.INCEPTION_FILE``; nothing is downloaded). Where those weights are
not present (offline), callers may use the features of a small classifier trained on the same
data: those numbers are labelled "offline FID" / "offline KID" and are not comparable with
published FIDs. ``kernel_distance`` is KID's unbiased squared MMD (cubic polynomial kernel)
with a jackknife standard error over the generated samples. It is reported as it is computed,
not times 1000 as papers print Inception KIDs: every place that shows it says so (``KID_SCALE``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .pretrained import INCEPTION_ENV, INCEPTION_FILE, FIDInceptionV3, find_weights, load_inception

# said wherever a KID is shown: on the offline classifier's unnormalised features it is often in
# the hundreds or more, which reads as the x 1000 of published KIDs; it is the plain value
KID_SCALE = "the plain value, not x 1000"


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    Args:
        x, y: images of the same shape (N, ...) in [0, data_range].
        data_range: the span of valid pixel values.

    Returns:
        (N,) float64 tensor; +inf where x == y.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() < 2:
        raise ValueError(f"psnr: expected a batch (N, ...), got shape {tuple(x.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64.

    The symmetric form of the trace term is equal to Tr((S_a S_b)^1/2) and needs only
    symmetric eigendecompositions (no complex parts, no scipy).

    Args:
        feats_a, feats_b: (N, D) and (M, D) feature matrices, N, M >= 2.
    """
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"frechet_distance: {name} must be (N, D) with N >= 2, got {tuple(f.shape)}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ ({feats_a.shape[1]} vs {feats_b.shape[1]})")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * torch.trace(cross)
    return float(value.clamp_min(0.0))


def kernel_distance(feats_real: torch.Tensor, feats_fake: torch.Tensor) -> tuple[float, float]:
    """KID: the unbiased squared MMD with kernel k(a, b) = (a.b / D + 1)^3, in float64, and its
    standard error.

    The error is the jackknife over the fake samples (the reals are held fixed: here they are
    the whole dataset), from leave-one-out estimates computed in closed form from row sums.

    Args:
        feats_real, feats_fake: (M, D) and (N, D) features, M >= 2, N >= 3.

    Returns:
        (kid, standard error).
    """
    if feats_real.dim() != 2 or feats_fake.dim() != 2 or feats_real.shape[1] != feats_fake.shape[1]:
        raise ValueError(f"kernel_distance: need (M, D) and (N, D) features, got {tuple(feats_real.shape)} and "
                         f"{tuple(feats_fake.shape)}")
    if feats_real.shape[0] < 2 or feats_fake.shape[0] < 3:
        raise ValueError(f"kernel_distance: need M >= 2 real and N >= 3 fake samples, got {feats_real.shape[0]}, "
                         f"{feats_fake.shape[0]}")
    x, y = feats_real.double(), feats_fake.double()
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    rows_yy = k_yy.sum(1) - k_yy.diagonal()  # (N,): sum over k != j of k(y_j, y_k)
    cols_xy = k_xy.sum(0)  # (N,)
    kid = term_xx + rows_yy.sum() / (n * (n - 1)) - 2 * cols_xy.sum() / (m * n)
    # leave fake j out: its row and column of k_yy, its column of k_xy
    loo = (term_xx + (rows_yy.sum() - 2 * rows_yy) / ((n - 1) * (n - 2))
           - 2 * (cols_xy.sum() - cols_xy) / (m * (n - 1)))
    se = ((n - 1) / n * (loo - loo.mean()).pow(2).sum()).sqrt()
    return float(kid), float(se)


def find_inception_weights(path: Optional[str] = None, flag: str = "--inception-weights") -> tuple[Optional[Path], str]:
    """The FID Inception weights: ``path`` (given as ``flag``), ``$PVKERNELS_INCEPTION_WEIGHTS``
    or torch hub's ``checkpoints/pt_inception-2015-12-05-6726825d.pth``; (file or None, where it looked)."""
    return find_weights(INCEPTION_FILE, path, flag, INCEPTION_ENV)


@torch.no_grad()
def inception_features(images: torch.Tensor, model: FIDInceptionV3, batch_size: int = 32) -> torch.Tensor:
    """(N, 2048) pool3 features of images (N, 1 or 3, H, W) in [0, 1], in batches (299x299 each)."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i: i + batch_size].to(device)).double().cpu()
                      for i in range(0, len(images), batch_size)])


def fid(real: torch.Tensor, fake: torch.Tensor, weights: Union[str, Path, FIDInceptionV3, None] = None,
        batch_size: int = 32) -> float:
    """Frechet Inception Distance between two image sets, as pytorch-fid computes it.

    Args:
        real, fake: images (N, C, H, W) and (M, C, H, W) in [0, 1], C = 1 or 3, N, M >= 2
            (FID is only comparable across papers with thousands of images).
        weights: a loaded FIDInceptionV3, the path of its weights file, or None to look in
            ``$PVKERNELS_INCEPTION_WEIGHTS`` and torch hub's cache.
        batch_size: images per Inception forward.

    Returns:
        The FID (float, >= 0).

    Example:
        >>> fid(real_images, samples, weights="pt_inception-2015-12-05-6726825d.pth")
    """
    if isinstance(weights, FIDInceptionV3):
        model = weights
    else:
        path, looked = find_inception_weights(None if weights is None else str(weights), "fid(weights=...)")
        if path is None:
            raise FileNotFoundError(f"fid: no InceptionV3 weights ({INCEPTION_FILE}); looked in {looked}")
        model = load_inception(path)
    return frechet_distance(inception_features(real, model, batch_size), inception_features(fake, model, batch_size))


class SmallClassifier(torch.nn.Module):
    """A small CNN classifier whose penultimate features stand in for Inception's offline."""

    def __init__(self, channels: int, num_classes: int = 10, width: int = 32):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, 64), nn.ReLU())
        self.classify = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.classify(self.features(x))


@torch.enable_grad()
def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 300, seed: int = 0,
                     progress: Optional[Callable[[int, int], None]] = None) -> SmallClassifier:
    """Fits SmallClassifier on (images, labels) for the offline FID features (seconds on digits);
    ``progress(step, steps)`` is called after every step."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallClassifier(images.shape[1], int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(steps):
        idx = torch.randint(0, len(images), (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, steps)
    return model.eval()


@torch.no_grad()
def offline_scores(real_features: torch.Tensor, fake: torch.Tensor, classifier: SmallClassifier) -> dict:
    """Offline FID and KID (with its standard error) of ``fake`` images on SmallClassifier
    features, against precomputed features of the reals (e.g. the whole dataset)."""
    fake_features = classifier.features(fake)
    kid, kid_se = kernel_distance(real_features, fake_features)
    return {"offline_fid": frechet_distance(real_features, fake_features), "offline_kid": kid,
            "offline_kid_se": kid_se}
