"""pvkernels.integrations.patch_magvit2 against magvit2-pytorch's VideoTokenizer (tiny ones).

The tokenizer's LFQ runs on pvkernels.lfq_entropy; the convolutions, attention and losses are the
peer's. Training parity: the total loss and its breakdown (reconstruction, LFQ aux loss,
per-sample / batch entropy, commitment, perceptual), every gradient at each of 5 SGD steps and
every final parameter and buffer, patched by instance (a deep copy) and by class (a fresh model).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("magvit2_pytorch")
from magvit2_pytorch import VideoTokenizer  # noqa: E402
from magvit2_pytorch import magvit2_pytorch as peer  # noqa: E402

from pvkernels import integrations  # noqa: E402
from pvkernels.integrations import PeerVersionError  # noqa: E402

from .parity import fake_version, instance_and_class  # noqa: E402


def tokenizer(**kw):
    def build():
        # a tiny stand-in for VGG16 (no weights to download): the perceptual loss still picks a
        # random frame per video from the torch RNG, as with the real one
        vgg = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
        kwargs = dict(image_size=16, init_dim=8, codebook_size=2 ** 5, layers=("residual", "compress_space"),
                      use_gan=False, vgg=vgg, perceptual_loss_weight=0.1, flash_attn=False)
        return VideoTokenizer(**{**kwargs, **kw})
    return build


def video(gen):
    return torch.randn(2, 3, 3, 16, 16, generator=gen)


def loss_step(model, x):
    loss, breakdown = model(x, return_loss=True)
    quantizer = breakdown.quantizer_loss_breakdown
    return loss, {"recon_loss": breakdown.recon_loss, "lfq_aux_loss": breakdown.lfq_aux_loss,
                  "perceptual_loss": breakdown.perceptual_loss,
                  "per_sample_entropy": quantizer.per_sample_entropy, "batch_entropy": quantizer.batch_entropy,
                  "commitment": quantizer.commitment}


@pytest.mark.parametrize("kw", [{}, dict(num_codebooks=2, codebook_size=2 ** 4, lfq_spherical=True)],
                         ids=["default", "two_codebooks_spherical"])
def test_video_tokenizer_training_parity(kw):
    by_instance, by_class = instance_and_class(tokenizer(**kw), integrations.patch_magvit2, video, loss_step)
    for p in (by_instance, by_class):
        assert p.stats == {"fast": 5, "fallback": {}}, p.stats


def test_codes_and_patch_by_name():
    """return_codes in training (the entropy is computed, then dropped) and ``patch("magvit2")``."""
    torch.manual_seed(0)
    model = tokenizer()()
    x = video(torch.Generator().manual_seed(0))
    expected = model(x, return_codes=True)
    with integrations.patch("magvit2", model) as p:
        got = model(x, return_codes=True)
        assert "[pvkernels: magvit2]" in repr(model.quantizers)
    assert torch.equal(got, expected) and p.stats == {"fast": 1, "fallback": {}}
    assert "pvkernels" not in repr(model)


def test_fsq_tokenizer_has_nothing_to_patch():
    model = VideoTokenizer(image_size=16, init_dim=8, use_fsq=True, fsq_levels=[4, 4], layers=("residual",),
                           use_gan=False, perceptual_loss_weight=0.0)
    with integrations.patch_magvit2(model) as p:
        model(video(torch.Generator().manual_seed(0)), return_loss=True)
    assert p.modules == 0 and p.stats == {"fast": 0, "fallback": {}}


def test_peer_version_and_structure(monkeypatch):
    fake_version(monkeypatch, "magvit2-pytorch", "0.9.0")
    with pytest.raises(PeerVersionError, match="magvit2-pytorch 0.9.0"):
        integrations.patch_magvit2()
    monkeypatch.undo()
    monkeypatch.setattr(peer, "LFQ", type("LFQ", (nn.Module,), {}))
    with pytest.raises(PeerVersionError, match="no longer vector-quantize-pytorch's LFQ"):
        integrations.patch_magvit2()
