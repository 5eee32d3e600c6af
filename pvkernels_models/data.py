"""Image data for the pseudo-video models, as float tensors (N, C, S, S) in [0, 1].

``digits`` (the default) is scikit-learn's bundled 8x8 digits, so everything runs offline;
``cifar10`` reads the standard python batches from ``data_dir`` (``download_cifar10`` fetches
them when the network allows); ``folder:PATH`` reads the images of a folder. Pseudo videos
are built from these batches on the fly with ``pvkernels.pseudo_video``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}

# read when download_cifar10 runs (not bound as defaults), so a mirror or a test can replace them
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class DownloadError(RuntimeError):
    """A dataset could not be fetched (no network, bad checksum, bad archive)."""


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < images.shape[-1]).clamp_(0.0, 1.0)


def load_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits (shipped with the package), resized to size x size."""
    images, labels = _digits(size)
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=4)
def _digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # read and resized once per process and size (the experiments build dozens of runs)
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
    folder = root / CIFAR10_FOLDER if (root / CIFAR10_FOLDER).is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python batches not found in {folder} (missing {', '.join(missing)}); "
                                f"run with --download, or download {CIFAR10_URL} and extract it there")
    data, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data.append(torch.tensor(batch["data"], dtype=torch.uint8).view(-1, 3, 32, 32))
        labels.append(torch.tensor(batch["labels"], dtype=torch.int64))
    return _resize(torch.cat(data).float() / 255.0, size), torch.cat(labels)


def download_cifar10(data_dir: str | Path, url: Optional[str] = None, md5: Optional[str] = None,
                     timeout: float = 60.0) -> Path:
    """Fetches cifar-10-python.tar.gz, checks its md5 and extracts ``cifar-10-batches-py/`` under data_dir.

    Nothing is done when the batches are already there. The archive is streamed to a temporary
    file and extracted into a temporary folder beside the target, which is then renamed into
    place: an interrupted run never leaves a half-written dataset behind.

    Args:
        data_dir: where ``cifar-10-batches-py/`` goes (created if needed).
        url, md5: the archive and its checksum; None reads ``CIFAR10_URL`` / ``CIFAR10_MD5``.
        timeout: seconds without data before the connection is given up.

    Returns:
        The ``cifar-10-batches-py`` folder.

    Raises:
        DownloadError: the fetch failed or the archive is not the expected one; the message
            says where to put the files by hand.
    """
    url, md5 = url or CIFAR10_URL, md5 or CIFAR10_MD5
    root = Path(data_dir)
    target = root / CIFAR10_FOLDER
    if all((target / n).is_file() for n in _CIFAR10_BATCHES):
        return target
    by_hand = (f"download {url} yourself and extract it so that {target}/ holds "
               f"{', '.join(_CIFAR10_BATCHES)}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".cifar10-") as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        digest = hashlib.md5(usedforsecurity=False)  # a checksum, not security: allowed in FIPS mode
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except OSError as exc:  # URLError, HTTPError, timeouts and resets are all OSErrors
            raise DownloadError(f"could not download CIFAR-10 from {url} ({exc}); {by_hand}") from exc
        if digest.hexdigest() != md5:
            raise DownloadError(f"CIFAR-10 archive from {url} has md5 {digest.hexdigest()}, expected {md5}; {by_hand}")
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            unsafe = [m.name for m in members if not (m.isfile() or m.isdir())
                      or Path(m.name).is_absolute() or ".." in Path(m.name).parts
                      or Path(m.name).parts[:1] != (CIFAR10_FOLDER,)]
            if unsafe:
                raise DownloadError(f"CIFAR-10 archive from {url} has unexpected entries ({unsafe[0]}); {by_hand}")
            # the check above makes any Python safe; the "data" filter (where it exists) as well
            tar.extractall(Path(tmp) / "x", members=members,
                           **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        missing = [n for n in _CIFAR10_BATCHES if not (Path(tmp) / "x" / CIFAR10_FOLDER / n).is_file()]
        if missing:
            raise DownloadError(f"CIFAR-10 archive from {url} lacks {', '.join(missing)}; {by_hand}")
        if target.exists():  # an incomplete earlier copy: replaced only once the new one is complete
            shutil.rmtree(target)
        os.replace(Path(tmp) / "x" / CIFAR10_FOLDER, target)
    return target


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


def load_dataset(spec: str, size: int, data_dir: Optional[str] = None,
                 download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``digits`` | ``cifar10`` (with data_dir; fetched first with download) | ``folder:PATH`` -> (images, labels)."""
    if download and spec != "cifar10":
        raise ValueError(f"--download only applies to --data cifar10, not {spec!r}")
    if spec == "digits":
        return load_digits(size)
    if spec == "cifar10":
        if data_dir is None:
            raise ValueError("data 'cifar10' needs --data-dir pointing at the extracted python batches"
                             " (or where --download should put them)")
        if download:
            download_cifar10(data_dir)
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
