"""The tokenizers' optional loss terms: PatchGAN hinge loss, adaptive weight, LPIPS on VGG16."""
import json

import pytest
import torch

from pvkernels_models.losses import (PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, last_frame,
                                     load_lpips)
from pvkernels_models.pretrained import VGG16_FILE, VGG16Features, load_vgg16
from pvkernels_models.train import main

FAST = ["--image-size", "16", "--batch-size", "4", "--eval-samples", "8", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random VGG16 saved with torchvision's vgg16 keys (classifier included, as in the real file)."""
    torch.manual_seed(0)
    state = VGG16Features().state_dict()
    state["classifier.6.weight"] = torch.zeros(10, 4)  # ignored by the loader
    path = tmp_path_factory.mktemp("hub") / VGG16_FILE
    torch.save(state, path)
    return path


def test_vgg16_has_torchvisions_layout(vgg_file):
    model = VGG16Features()
    # torchvision's vgg16 has 138,357,544 parameters, 123,642,856 of them in its classifier
    assert sum(p.numel() for p in model.parameters()) == 138357544 - 123642856
    # torchvision's conv indices in vgg16().features (ReLUs and max pools in between)
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert list(model.state_dict()) == [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]
    loaded = load_vgg16(vgg_file)
    saved = torch.load(vgg_file, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    assert [f.shape[1] for f in loaded(torch.rand(1, 3, 16, 16))] == list(VGG16Features.CHANNELS)


def test_vgg16_rejects_a_foreign_file(tmp_path):
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg16 weight file"):
        load_vgg16(tmp_path / "x.pth")


def test_lpips_is_zero_for_identical_images_and_differentiable(vgg_file):
    lpips = load_lpips(str(vgg_file))
    assert lpips.uniform and "uniform channel weights" in lpips.source
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    y = torch.rand(2, 1, 16, 16, requires_grad=True)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.isfinite().all() and y.grad.abs().max() > 0
    assert all(p.grad is None for p in lpips.parameters())  # VGG16 stays frozen
    with pytest.raises(ValueError, match="H, W >= 16"):
        lpips(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


def test_lpips_channel_weights_file(vgg_file, tmp_path):
    # lpips' own file layout; weights of 1 / channels must give the uniform result
    lin = {f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), 1.0 / c) for i, c in enumerate(VGG16Features.CHANNELS)}
    torch.save(lin, tmp_path / "vgg.pth")
    learned = load_lpips(str(vgg_file), str(tmp_path / "vgg.pth"))
    assert not learned.uniform and f"lpips channel weights {tmp_path / 'vgg.pth'}" in learned.source
    x, y = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(learned(x, y), load_lpips(str(vgg_file))(x, y))
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an lpips VGG weight file"):
        load_lpips(str(vgg_file), str(tmp_path / "bad.pth"))


def test_missing_vgg_weights_name_the_flag_and_where_it_looked(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--perceptual-weights: no file at /nonexistent"):
        load_lpips("/nonexistent")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(FileNotFoundError, match=f"--perceptual-weight > 0 needs .*{VGG16_FILE}.*{tmp_path}"):
        load_lpips(None)


def test_vgg_weights_found_in_the_hub_cache(vgg_file, tmp_path, monkeypatch):
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / VGG16_FILE).symlink_to(vgg_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILE) in load_lpips(None).source


def test_patch_discriminator_and_hinge_losses():
    disc = PatchDiscriminator(3, width=16, layers=2)
    assert disc(torch.rand(5, 3, 12, 8)).shape == (5, 1, 3, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        disc(torch.rand(5, 3, 10, 8))
    # a mixed batch gives each image the logits it gets alone (no batch statistics)
    a, b = torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(disc(torch.cat([a, b]))[:2], disc(a))
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -3.0)).item() == 0.0  # both beyond the margin
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == -2.0
    video = torch.rand(2, 4, 1, 8, 8)
    assert torch.equal(last_frame(video), video[:, -1]) and last_frame(a) is a


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    rec, g = (w * a).sum(), (w * b).sum()  # gradients a and b
    weight = adaptive_weight(rec, g, w)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx((a.norm() / (b.norm() + 1e-4)).item(), rel=1e-6)
    assert adaptive_weight((w * a).sum(), (w * 0).sum(), w).item() == 1e4  # clamped when D gives no gradient


def test_cli_perceptual_loss(vgg_file, tmp_path, capsys):
    argv = ["--model", "cvivit", "--frames", "2", "--perceptual-weight", "0.5", "--out", str(tmp_path), *FAST]
    assert main([*argv, "--perceptual-weights", str(vgg_file)]) == 0
    assert "perceptual loss: VGG16" in capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-2]["perceptual"] > 0
    assert main([*argv, "--perceptual-weights", str(tmp_path / "missing.pth")]) == 2
    assert "--perceptual-weights: no file at" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "ddpm", "--gan-weight", "0.1"], "apply to the tokenizers"),
    (["--model", "vqvae", "--perceptual-weight", "-1"], "--perceptual-weight must be >= 0"),
    # the tokenizers take --inception-weights too (their reconstruction FID): a missing file is exit 2
    (["--model", "vqvae", "--inception-weights", "x.pth"], "--inception-weights: no file at x.pth"),
])
def test_loss_flags_bad_arguments_exit_2(argv, message, capsys):
    try:
        code = main([*argv, "--out", "x"])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
