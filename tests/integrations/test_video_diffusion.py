"""pvkernels.integrations.patch_video_diffusion against video-diffusion-pytorch itself."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("video_diffusion_pytorch")
from video_diffusion_pytorch import video_diffusion_pytorch as peer  # noqa: E402

from pvkernels import integrations  # noqa: E402
from pvkernels.integrations import PeerVersionError  # noqa: E402

from ..utils import assert_close  # noqa: E402
from .parity import fake_version, instance_and_class, patched_copy, replica  # noqa: E402

FRAMES, SIZE = 5, 8


def unet():
    return peer.Unet3D(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)


def diffusion():
    return peer.GaussianDiffusion(unet(), image_size=SIZE, num_frames=FRAMES, timesteps=50, loss_type="l2")


def videos(gen):
    return torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=gen)


def diffusion_step(model, x):
    return model(x), {}


def denoise_step(model, x):
    out = model(x, torch.tensor([3, 41]))
    return out.square().mean(), {"out": out}


# temporal attention: init + 2 down + mid + 2 up levels; the mid-block spatial attention
CALLS_PER_STEP = 6 + 1


def test_gaussian_diffusion_training_parity():
    """The peer's own training loss (random t and noise from the same RNG stream): loss and every
    gradient at each of 4 SGD steps, every final parameter; by instance and by class."""
    by_instance, by_class = instance_and_class(diffusion, integrations.patch_video_diffusion, videos, diffusion_step,
                                               steps=4)
    for p in (by_instance, by_class):
        assert p.stats == {"fast": 4 * CALLS_PER_STEP, "fallback": {}}, p.stats


def test_unet_outputs_and_gradients():
    by_instance, _ = instance_and_class(unet, integrations.patch_video_diffusion, videos, denoise_step, steps=2)
    assert by_instance.stats["fast"] == 2 * CALLS_PER_STEP


@pytest.mark.parametrize("n", [9, 40])  # the temporal and the spatial fused kernel
def test_attention_with_rotary_and_bias(n):
    torch.manual_seed(0)
    rotary = peer.RotaryEmbedding(8)
    attn = peer.Attention(16, heads=2, dim_head=16, rotary_emb=rotary)
    twin = copy.deepcopy(attn)
    bias_module = peer.RelativePositionBias(heads=2, max_distance=32)
    x = torch.randn(2, 3, n, 16, requires_grad=True)
    grad = torch.randn(2, 3, n, 16)
    expected = attn(x, pos_bias=bias_module(n, x.device))
    expected.backward(grad)
    def learnt(*modules):  # the rotary frequencies are a parameter without gradient
        return [q for m in modules for q in m.parameters() if q.requires_grad]
    ref = [x.grad.clone()] + [q.grad.clone() for q in learnt(attn, bias_module)]
    x.grad = None
    bias_module.zero_grad(set_to_none=True)
    with integrations.patch_video_diffusion(twin) as p:
        got = twin(x, pos_bias=bias_module(n, x.device))
        got.backward(grad)
    assert p.stats == {"fast": 1, "fallback": {}}
    assert_close(got, expected, rtol=1e-4, atol=1e-5, name="out")
    grads = [x.grad] + [q.grad for q in learnt(twin, bias_module)]
    for i, (a, e) in enumerate(zip(grads, ref)):
        assert_close(a, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()), name=f"grad {i}")


def test_focus_present_mask_falls_back():
    torch.manual_seed(0)
    model = unet()
    x, t = videos(torch.Generator().manual_seed(0)), torch.tensor([3, 41])
    for mask, reason in ((torch.tensor([True, False]), "partly set"), (torch.tensor([True, True]), "all set")):
        expected = model(x, t, focus_present_mask=mask)
        with integrations.patch_video_diffusion(model) as p:
            got = model(x, t, focus_present_mask=mask)
        assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # the init temporal attention and the mid spatial attention get no mask: fast
        assert p.stats["fast"] == 2 and any(reason in r for r in p.stats["fallback"]), p.stats
        with integrations.patch_video_diffusion(model, strict=True), pytest.raises(ValueError, match=reason):
            model(x, t, focus_present_mask=mask)
    with integrations.patch_video_diffusion(model) as p:
        model(x, t, focus_present_mask=torch.tensor([False, False]))  # nobody focuses: plain attention
    assert p.stats == {"fast": CALLS_PER_STEP, "fallback": {}}


def test_a_deep_copy_of_a_patched_model_runs_its_own_weights():
    """The peer's Trainer deep-copies the model for its EMA: a copy of a patched model computes
    with its own weights, on the kernels and in the fallback (a focus_present_mask)."""
    torch.manual_seed(0)
    model = unet()
    reference = copy.deepcopy(model)
    x, t, mask = videos(torch.Generator().manual_seed(0)), torch.tensor([3, 41]), torch.tensor([True, False])
    with integrations.patch_video_diffusion(model) as p:
        twin = patched_copy(model, reference)
        got = twin(x, t, focus_present_mask=mask)
        assert p.stats["fast"] == 2 and p.stats["fallback"], p.stats
    assert_close(got, reference(x, t, focus_present_mask=mask), rtol=1e-4, atol=1e-5)


def test_a_data_parallel_replica_of_a_patched_model_runs_its_own_weights(monkeypatch):
    """nn.DataParallel's replica of a patched model (torch's replicate) computes with its own
    weights, on the kernels and in the fallback; the patch leaves no replication hook behind."""
    torch.manual_seed(0)
    model = unet()
    reference = copy.deepcopy(model)
    x, t, mask = videos(torch.Generator().manual_seed(0)), torch.tensor([3, 41]), torch.tensor([True, False])
    with integrations.patch_video_diffusion(model) as p:
        twin = replica(model, reference, monkeypatch)
        got = twin(x, t, focus_present_mask=mask)
        assert p.stats["fast"] == 2 and p.stats["fallback"], p.stats
    assert all("_replicate_for_data_parallel" not in vars(m) for m in model.modules())
    assert_close(got, reference(x, t, focus_present_mask=mask), rtol=1e-4, atol=1e-5)


def test_unpatch_print_and_version(monkeypatch):
    model = unet()
    forward = peer.Attention.forward
    with integrations.patch_video_diffusion(model) as p:
        assert "[pvkernels: video_diffusion]" in repr(model) and p.modules == CALLS_PER_STEP
    assert "pvkernels" not in repr(model) and all("forward" not in vars(m) for m in model.modules())
    with integrations.patch("video_diffusion"):
        assert peer.Attention.forward is not forward
    assert peer.Attention.forward is forward
    fake_version(monkeypatch, "video-diffusion-pytorch", "0.1.0")
    with pytest.raises(PeerVersionError, match="video-diffusion-pytorch 0.1.0"):
        integrations.patch_video_diffusion()


def test_making_a_patch_draws_no_random_numbers():
    """The structural check builds a tiny Attention (Linear init): under a forked RNG."""
    state = torch.get_rng_state()
    integrations.patch_video_diffusion().unpatch()
    assert torch.equal(torch.get_rng_state(), state)


def test_changed_attention_is_refused(monkeypatch):
    # an attribute the patch reads no longer set by the constructor, then a constructor that fails
    init = peer.Attention.__init__

    def without_rotary(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self.rotary_emb
    monkeypatch.setattr(peer.Attention, "__init__", without_rotary)
    with pytest.raises(PeerVersionError, match="Attention.rotary_emb is gone"):
        integrations.patch_video_diffusion()

    def failing(self, *args, **kwargs):
        raise TypeError("new required argument")
    monkeypatch.setattr(peer.Attention, "__init__", failing)
    with pytest.raises(PeerVersionError, match="failed: new required argument"):
        integrations.patch_video_diffusion()
