"""pvkernels.nn: a bad input to a module is a clear error naming the module, what it expected and what it got."""
import pytest
import torch

from pvkernels.nn import SpaceTimeBlock, SpatialAttention, TemporalAttention, VectorQuantizer

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
    (lambda: SpaceTimeBlock(8, 2, mlp_ratio=0), ValueError, "SpaceTimeBlock: mlp_ratio must be a positive finite number, got 0"),
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
