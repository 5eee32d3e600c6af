"""The mechanics every peer patch shares (pvkernels/integrations/_patching.py), on a toy module: two
patches of the same methods at once, undone in either order, leave the class and its instances exactly
as they were."""
import copy

import pytest
import torch

from pvkernels.integrations._patching import Patch, dispatching, patch_modules


class Toy(torch.nn.Module):
    def forward(self, x):
        return x + 1


FORWARD = Toy.__dict__["forward"]


def toy_patch(model):
    """A patch whose fast path doubles: which patches a call went through shows in the result."""
    patch = Patch("toy")
    make = dispatching(patch, lambda module, arguments: None, lambda module, arguments: 2 * arguments["x"],
                       Toy.forward)
    patch_modules(patch, model, Toy, {"forward": make})
    return patch


@pytest.mark.parametrize("first, second", [("class", "class"), ("instance", "instance"), ("class", "instance"),
                                           ("instance", "class")])
@pytest.mark.parametrize("undo", ["last first", "first first"])
def test_two_patches_undone_in_either_order(first, second, undo):
    toy = Toy()
    x = torch.ones(2)
    patches = [toy_patch(None if how == "class" else toy) for how in (first, second)]
    assert torch.equal(toy(x), 2 * x)  # the outer patch's fast path
    assert "[pvkernels: toy]" in repr(toy)
    copy_while_patched = copy.deepcopy(toy)
    for p in (patches[::-1] if undo == "last first" else patches):
        p.unpatch()
        assert not p.active
    assert vars(Toy)["forward"] is FORWARD and "extra_repr" not in vars(Toy)
    for module in (toy, Toy()):
        assert torch.equal(module(x), x + 1) and "pvkernels" not in repr(module)
        assert "forward" not in vars(module) and "extra_repr" not in vars(module)
    assert torch.equal(copy_while_patched(x), x + 1)  # a copy's replacements call through once undone
    assert sum(p.stats["fast"] for p in patches) == 1 and all(p.stats["fallback"] == {} for p in patches)


def test_one_patch_undone_while_another_stays():
    toy = Toy()
    x = torch.ones(2)
    first, second = toy_patch(None), toy_patch(toy)
    first.unpatch()
    assert torch.equal(toy(x), 2 * x) and torch.equal(Toy()(x), x + 1)
    assert second.stats["fast"] == 1 and first.stats["fast"] == 0
    second.unpatch()
    assert torch.equal(toy(x), x + 1) and vars(Toy)["forward"] is FORWARD and "extra_repr" not in vars(Toy)


@pytest.mark.parametrize("strict", ["yes", 1, None])
def test_strict_must_be_a_bool(strict):
    with pytest.raises(TypeError, match=r"pvkernels.integrations\[toy\]: strict must be True or False, got "):
        Patch("toy", strict)
