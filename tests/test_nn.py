"""pvkernels.nn: a bad input to a module is a clear error naming the module, what it expected and what it got."""
import pytest
import torch

from pvkernels.nn import (LookupFreeQuantizer, PseudoVideo, SpaceTimeBlock, SpatialAttention, TemporalAttention,
                          VectorQuantizer)

ATTENTION = [lambda: SpaceTimeBlock(64, 4, backend="reference"), lambda: SpatialAttention(64, 4, backend="reference"),
             lambda: TemporalAttention(64, 4, backend="reference")]


@pytest.mark.parametrize("make", ATTENTION, ids=["SpaceTimeBlock", "SpatialAttention", "TemporalAttention"])
@pytest.mark.parametrize("x, error, message", [
    (torch.randn(2, 3, 64), ValueError, "x must be 4-D (B, T, S, dim), got 3-D with shape (2, 3, 64)"),
    (torch.randn(2, 3, 5, 1, 64), ValueError, "x must be 4-D (B, T, S, dim), got 5-D"),
    (torch.randn(2, 3, 5, 32), ValueError, "x's last dim must be dim=64, got 32"),
    (torch.ones(2, 3, 5, 64, dtype=torch.int64), TypeError, "x must be floating point, got torch.int64"),
    ([[1.0] * 64], TypeError, "x must be a torch.Tensor, got list"),
], ids=["3-D", "5-D", "width", "int", "list"])
def test_attention_modules_say_what_they_expected_and_got(make, x, error, message):
    module = make()
    with pytest.raises(error) as exc:
        module(x)
    assert str(exc.value).startswith(f"{type(module).__name__}: {message}"), str(exc.value)


@pytest.mark.parametrize("make, error, message", [
    (lambda: SpatialAttention(10, 3), ValueError, "SpatialAttention: dim (10) must be a positive multiple of heads (3)"),
    (lambda: TemporalAttention(8, 0), ValueError, "TemporalAttention: dim (8) must be a positive multiple of heads (0)"),
    (lambda: SpaceTimeBlock(-8, 2), ValueError, "SpaceTimeBlock: dim (-8) must be a positive multiple of heads (2)"),
    (lambda: SpatialAttention(8, 2.0), TypeError, "SpatialAttention: heads must be an int, got 2.0"),
    (lambda: TemporalAttention(True, 1), TypeError, "TemporalAttention: dim must be an int, got True"),
    (lambda: SpaceTimeBlock(8, 2, mlp_ratio=0), ValueError, "SpaceTimeBlock: mlp_ratio must be a finite number > 0, got 0"),
], ids=["not-a-multiple", "no-heads", "negative", "float-heads", "bool-dim", "no-mlp"])
def test_attention_modules_check_their_widths(make, error, message):
    with pytest.raises(error) as exc:
        make()
    assert str(exc.value) == message


def test_attention_modules_still_take_good_input():
    x = torch.randn(2, 3, 5, 64)
    for make in ATTENTION:
        assert make()(x).shape == x.shape


@pytest.mark.parametrize("z, error, message", [
    (torch.randn(3, 7), ValueError, r"VectorQuantizer: z must be \(\.\.\., dim\) = \(\.\.\., 8\), got shape \(3, 7\)"),
    (torch.tensor(1.0), ValueError, r"VectorQuantizer: z must be \(\.\.\., dim\) = \(\.\.\., 8\), got shape \(\)"),
    (torch.ones(3, 8, dtype=torch.int64), TypeError, "VectorQuantizer: z must be floating point, got torch.int64"),
    ([1.0] * 8, TypeError, "VectorQuantizer: z must be a torch.Tensor, got list"),
], ids=["width", "0-D", "int", "list"])
def test_vector_quantizer_says_what_it_expected_and_got(z, error, message):
    with pytest.raises(error, match=message):
        VectorQuantizer(8, 4, backend="reference")(z)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, error, message", [
    (lambda: VectorQuantizer(8.0, 16), TypeError, "VectorQuantizer: dim must be an int, got 8.0"),
    (lambda: VectorQuantizer(8, 0), ValueError, "VectorQuantizer: codebook_size must be >= 1, got 0"),
    (lambda: VectorQuantizer(8, 16, beta=-1), ValueError, "VectorQuantizer: beta must be a finite number >= 0, got -1"),
    (lambda: VectorQuantizer(8, 16, beta=NAN), ValueError, "VectorQuantizer: beta must be a finite number >= 0, got nan"),
    (lambda: VectorQuantizer(8, 16, beta="0.25"), TypeError, "VectorQuantizer: beta must be a real number, got '0.25'"),
    (lambda: VectorQuantizer(8, 16, eps=0), ValueError, "VectorQuantizer: eps must be a finite number > 0, got 0"),
    (lambda: VectorQuantizer(8, 16, decay="0.99"), TypeError, "VectorQuantizer: decay must be a real number, got '0.99'"),
    (lambda: VectorQuantizer(8, 16, decay=1), ValueError, "VectorQuantizer: decay must be in [0, 1) or None, got 1"),
    (lambda: VectorQuantizer(8, 16, dead_threshold=-1e-3), ValueError,
     "VectorQuantizer: dead_threshold must be a finite number >= 0, got -0.001"),
    (lambda: VectorQuantizer(8, 16, backend="gpu"), ValueError,
     "VectorQuantizer: backend must be one of ('auto', 'triton', 'cpp', 'reference'), got 'gpu'"),
    (lambda: LookupFreeQuantizer(8, 4.0), TypeError, "LookupFreeQuantizer: bits must be an int, got 4.0"),
    (lambda: LookupFreeQuantizer(8.5, 4), TypeError, "LookupFreeQuantizer: dim must be an int, got 8.5"),
    (lambda: LookupFreeQuantizer(8, 4, num_codebooks=0), ValueError,
     "LookupFreeQuantizer: num_codebooks must be >= 1, got 0"),
    (lambda: LookupFreeQuantizer(8, 4, entropy_loss_weight=-0.1), ValueError,
     "LookupFreeQuantizer: entropy_loss_weight must be a finite number >= 0, got -0.1"),
    (lambda: LookupFreeQuantizer(8, 4, diversity_gamma=INF), ValueError,
     "LookupFreeQuantizer: diversity_gamma must be a finite number >= 0, got inf"),
    (lambda: LookupFreeQuantizer(8, 4, commitment_loss_weight=True), TypeError,
     "LookupFreeQuantizer: commitment_loss_weight must be a real number, got True"),
    (lambda: LookupFreeQuantizer(8, 4, inv_temperature=0), ValueError,
     "LookupFreeQuantizer: inv_temperature must be a finite number > 0, got 0"),
    (lambda: LookupFreeQuantizer(8, 4, codebook_scale=-1), ValueError,
     "LookupFreeQuantizer: codebook_scale must be a finite number > 0, got -1"),
    (lambda: LookupFreeQuantizer(8, 4, eps=0), ValueError, "LookupFreeQuantizer: eps must be a finite number > 0, got 0"),
    (lambda: SpatialAttention(8, 2, backend="cuda"), ValueError,
     "SpatialAttention: backend must be one of ('auto', 'triton', 'cpp', 'reference'), got 'cuda'"),
    (lambda: PseudoVideo(noise_std=[0.1, 0.2], backend=None), ValueError,
     "PseudoVideo: backend must be one of ('auto', 'triton', 'cpp', 'reference'), got None"),
], ids=["vq-float-dim", "vq-no-codes", "vq-negative-beta", "vq-nan-beta", "vq-str-beta", "vq-zero-eps",
        "vq-str-decay", "vq-decay-one", "vq-negative-dead", "vq-backend", "lfq-float-bits", "lfq-float-dim",
        "lfq-no-codebooks", "lfq-negative-entropy-weight", "lfq-inf-gamma", "lfq-bool-weight", "lfq-zero-temperature",
        "lfq-negative-scale", "lfq-zero-eps", "attention-backend", "pseudo-video-backend"])
def test_modules_check_their_arguments(make, error, message):
    with pytest.raises(error) as exc:
        make()
    assert str(exc.value) == message


def test_modules_take_numpy_and_int_arguments():
    np = pytest.importorskip("numpy")
    vq = VectorQuantizer(np.int64(8), np.int32(16), beta=np.float32(0.5), eps=1, backend="reference")
    assert (vq.dim, vq.codebook_size, vq.beta) == (8, 16, 0.5) and type(vq.dim) is int
    lfq = LookupFreeQuantizer(np.int64(8), np.int64(4), entropy_loss_weight=0, inv_temperature=np.float64(50))
    assert (lfq.bits, lfq.inv_temperature, lfq.entropy_loss_weight) == (4, 50.0, 0.0)
    assert vq(torch.randn(3, 8))[0].shape == (3, 8) and lfq(torch.randn(3, 8))[0].shape == (3, 8)
