"""Image data for the pseudo-video models, as float tensors (N, C, S, S) in [0, 1].

``digits`` (the default) is scikit-learn's bundled 8x8 digits, so everything runs offline;
``cifar10`` reads the standard python batches from ``data_dir``; ``folder:PATH`` reads the
images of a folder. Pseudo videos are built from these batches on the fly with
``pvkernels.pseudo_video``.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < images.shape[-1]).clamp_(0.0, 1.0)


def load_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits (shipped with the package), resized to size x size."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError("data 'digits' needs scikit-learn: pip install 'pvkernels[models]'") from exc
    d = sk_load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _resize(images, size), torch.tensor(d.target, dtype=torch.int64)


def load_cifar10(data_dir: str | Path, train: bool = True, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its python batches (``cifar-10-batches-py/data_batch_*`` under data_dir)."""
    root = Path(data_dir)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python batches not found in {folder} (missing {', '.join(missing)}); "
                                "download cifar-10-python.tar.gz from the CIFAR-10 site and extract it there")
    data, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data.append(torch.tensor(batch["data"], dtype=torch.uint8).view(-1, 3, 32, 32))
        labels.append(torch.tensor(batch["labels"], dtype=torch.int64))
    return _resize(torch.cat(data).float() / 255.0, size), torch.cat(labels)


def load_folder(path: str | Path, size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image file of a folder (sorted), converted to RGB (or L for channels=1) and resized."""
    from PIL import Image

    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) \
        if Path(path).is_dir() else []
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found in folder {path}")
    mode = "RGB" if channels == 3 else "L"
    images = []
    for p in files:
        with Image.open(p) as img:
            img = img.convert(mode).resize((size, size), Image.BILINEAR)
            t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, channels)
            images.append(t.permute(2, 0, 1).float() / 255.0)
    return torch.stack(images), torch.zeros(len(images), dtype=torch.int64)


def load_dataset(spec: str, size: int, data_dir: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``digits`` | ``cifar10`` (with data_dir) | ``folder:PATH`` -> (images, labels)."""
    if spec == "digits":
        return load_digits(size)
    if spec == "cifar10":
        if data_dir is None:
            raise ValueError("data 'cifar10' needs --data-dir pointing at the extracted python batches")
        return load_cifar10(data_dir, size=size)
    if spec.startswith("folder:"):
        return load_folder(spec[len("folder:"):], size=size)
    raise ValueError(f"unknown data {spec!r}: expected 'digits', 'cifar10' or 'folder:PATH'")


def sample_batch(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A batch drawn uniformly with replacement: its only state is the generator's, so a run
    restored with the generator state continues exactly."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return images[torch.randint(0, len(images), (batch_size,), generator=generator)]
