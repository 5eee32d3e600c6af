import pickle

import pytest
import torch

from pvkernels_models.data import load_dataset, sample_batch


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
