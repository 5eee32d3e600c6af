import hashlib
import io
import pickle
import tarfile

import pytest
import torch

from pvkernels_models import data
from pvkernels_models.data import DownloadError, download_cifar10, load_dataset, sample_batch
from pvkernels_models.train import main


def test_digits_resized_in_unit_range():
    images, labels = load_dataset("digits", size=16)
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.1


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        batch = {"data": torch.randint(0, 256, (4, 3072), dtype=torch.uint8).numpy(), "labels": [1, 2, 3, 4]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    images, labels = load_dataset("cifar10", size=16, data_dir=str(tmp_path))
    assert images.shape == (20, 3, 16, 16) and labels.tolist()[:4] == [1, 2, 3, 4]


def test_folder_of_images(tmp_path):
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (20, 10), (40 * i, 10, 200)).save(tmp_path / f"img{i}.png")
    images, _ = load_dataset(f"folder:{tmp_path}", size=8)
    assert images.shape == (3, 3, 8, 8)
    assert images[2, 0, 0, 0].item() == pytest.approx(80 / 255, abs=1e-6)


@pytest.mark.parametrize("spec, kwargs, error, match", [
    ("cifar10", {}, ValueError, "data-dir"),
    ("cifar10", {"data_dir": "/nonexistent"}, FileNotFoundError, "not found"),
    ("folder:/nonexistent", {}, FileNotFoundError, "no images"),
    ("imagenet", {}, ValueError, "unknown data"),
])
def test_bad_data_specs(spec, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_dataset(spec, size=8, **kwargs)


def test_sample_batch_is_reproducible():
    images = torch.arange(10.0).view(10, 1, 1, 1)
    a = [sample_batch(images, 4, g) for g in [torch.Generator().manual_seed(1)] for _ in range(3)]
    g = torch.Generator().manual_seed(1)
    assert all(torch.equal(x, sample_batch(images, 4, g)) for x in a)
    with pytest.raises(ValueError, match="batch_size"):
        sample_batch(images, 0, torch.Generator())


def fake_cifar10_archive(path, names=None):
    """A small cifar-10-python.tar.gz (4 random images per batch); returns its file:// URL and md5."""
    names = names or [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] + ["cifar-10-batches-py/test_batch"]
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            batch = {"data": torch.randint(0, 256, (4, 3072), dtype=torch.uint8).numpy(), "labels": [0, 1, 2, 3]}
            blob = pickle.dumps(batch)
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_download_checks_md5_and_extracts(tmp_path):
    url, md5 = fake_cifar10_archive(tmp_path / "c10.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="has md5 .* expected 0+;"):
        download_cifar10(root, url=url, md5="0" * 32)
    assert not (root / "cifar-10-batches-py").exists() and list(root.iterdir()) == []  # nothing half-written
    folder = download_cifar10(root, url=url, md5=md5)
    assert sorted(p.name for p in folder.iterdir())[:2] == ["data_batch_1", "data_batch_2"]
    assert download_cifar10(root, url="file:///nonexistent", md5=md5) == folder  # present: no fetch
    images, labels = load_dataset("cifar10", size=8, data_dir=str(root))
    assert images.shape == (20, 3, 8, 8) and labels.tolist()[:4] == [0, 1, 2, 3]


def test_cifar10_download_failure_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DownloadError, match="could not download CIFAR-10 from file:///nonexistent.*extract it so "
                                            f"that {tmp_path}/cifar-10-batches-py/ holds data_batch_1"):
        download_cifar10(tmp_path, url="file:///nonexistent/c10.tar.gz")
    url, md5 = fake_cifar10_archive(tmp_path / "evil.tar.gz", ["cifar-10-batches-py/data_batch_1", "../evil"])
    with pytest.raises(DownloadError, match=r"unexpected entries \(\.\./evil\)"):
        download_cifar10(tmp_path / "data", url=url, md5=md5)
    assert not (tmp_path / "evil").exists()


def test_cli_download(tmp_path, monkeypatch, capsys):
    common = ["--model", "vqvae", "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--download",
              "--steps", "1", "--image-size", "8", "--batch-size", "4", "--eval-samples", "4", "--no-progress"]
    monkeypatch.setattr(data, "CIFAR10_URL", "file:///nonexistent/c10.tar.gz")
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    assert "could not download CIFAR-10" in capsys.readouterr().err
    url, md5 = fake_cifar10_archive(tmp_path / "c10.tar.gz")
    monkeypatch.setattr(data, "CIFAR10_URL", url)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    with pytest.raises(ValueError, match="--download only applies to --data cifar10"):
        load_dataset("digits", size=8, download=True)
