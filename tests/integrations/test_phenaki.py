"""pvkernels.integrations.patch_phenaki against phenaki-pytorch itself (tiny CViViTs)."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("phenaki_pytorch")
from phenaki_pytorch import CViViT  # noqa: E402
from phenaki_pytorch import attention as peer  # noqa: E402

from pvkernels import integrations  # noqa: E402
from pvkernels.integrations import PeerVersionError  # noqa: E402

from ..utils import assert_close  # noqa: E402
from .parity import fake_version, instance_and_class  # noqa: E402

DIM, HEADS, DIM_HEAD = 32, 4, 8


def cvivit(lfq: bool, **kw):
    return lambda: CViViT(dim=DIM, codebook_size=64, image_size=(16, 24), patch_size=4, temporal_patch_size=2,
                          spatial_depth=1, temporal_depth=1, dim_head=DIM_HEAD, heads=HEADS, use_vgg_and_gan=False,
                          lookup_free_quantization=lfq, **kw)


def video(frames=5):
    return lambda gen: torch.randn(2, 3, frames, 16, 24, generator=gen)


def reconstruction_step(model, x):
    loss, recon = model(x, return_recons=True)
    return loss, {"recon": recon}


@pytest.mark.parametrize("lfq", [False, True], ids=["vq", "lfq"])
def test_cvivit_training_parity(lfq):
    """Loss, reconstruction, every gradient at each of 5 SGD steps and every final parameter and
    buffer; by instance on a deep copy and by class on a fresh model. The default CViViT (LFQ) is
    patched end to end: attention and the LFQ's entropy (at the peer's inverse temperature 100)."""
    by_instance, by_class = instance_and_class(cvivit(lfq), integrations.patch_phenaki, video(), reconstruction_step)
    # per step: 4 transformers x 1 attention each, plus the quantizer (LFQ, or the VectorQuantize codebook)
    per_step = 4 + 1
    for p in (by_instance, by_class):
        assert p.stats == {"fast": 5 * per_step, "fallback": {}}, p.stats


def test_image_input_and_codebook_ids():
    """CViViT on a single image (one frame: temporal attention over T = 1) and the ids path."""
    torch.manual_seed(0)
    model = cvivit(False)().eval()
    image = torch.randn(2, 3, 16, 24)
    expected = model(image, return_recons_only=True)
    ids = model(torch.randn(1, 3, 5, 16, 24), return_only_codebook_ids=True)
    with integrations.patch_phenaki(model) as p:
        got = model(image, return_recons_only=True)
        torch.manual_seed(0)
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert p.stats["fast"] == 4 + 1 and ids.dtype == torch.int64


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [5, 40])  # the temporal and the spatial fused kernel
def test_attention_with_bias_and_gradients(causal, n):
    torch.manual_seed(0)
    attn = peer.Attention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, causal=causal)
    with torch.no_grad():
        attn.q_scale.uniform_(0.5, 2.0)
        attn.k_scale.uniform_(0.5, 2.0)
    twin = copy.deepcopy(attn)
    x = torch.randn(3, n, DIM, requires_grad=True)
    bias = torch.randn(HEADS, n, n, requires_grad=True)
    grad = torch.randn(3, n, DIM)
    expected = attn(x, attn_bias=bias)
    expected.backward(grad)
    ref_grads = {"x": x.grad.clone(), "bias": bias.grad.clone(), **{n: q.grad for n, q in attn.named_parameters()}}
    x.grad = bias.grad = None
    with integrations.patch_phenaki(twin) as p:
        got = twin(x, attn_bias=bias)
        got.backward(grad)
    assert p.stats == {"fast": 1, "fallback": {}}
    assert_close(got, expected, rtol=1e-4, atol=1e-5, name="out")
    grads = {"x": x.grad, "bias": bias.grad, **{n: q.grad for n, q in twin.named_parameters()}}
    for name, e in ref_grads.items():
        if e is None:  # the context norm of a self-attention layer
            assert grads[name] is None, name
        else:
            scale = float(e.abs().max()) if e.numel() else 1.0  # null_kv: (heads, 0, dim_head)
            assert_close(grads[name], e, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), name=name)


def test_unsupported_calls_fall_back():
    torch.manual_seed(0)
    x, context = torch.randn(2, 6, DIM), torch.randn(2, 4, DIM)
    cases = {
        "mask": (peer.Attention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS), dict(mask=torch.rand(2, 6) > 0.3)),
        "context": (peer.Attention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS), dict(context=context)),
        "null key/values": (peer.Attention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, num_null_kv=2), {}),
        "dropout": (peer.Attention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, dropout=0.1), {}),
        "float64": (peer.Attention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS).double(), dict(x=x.double())),
        "dim_head": (peer.Attention(dim=DIM, dim_head=272, heads=1), {}),  # past cpp's 256
        "shape": (peer.Attention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS), dict(attn_bias=torch.randn(2, HEADS, 6, 6))),
    }
    for reason, (attn, kw) in cases.items():
        kw = {"x": x, **kw}
        torch.manual_seed(1)
        expected = attn(**kw)
        with integrations.patch_phenaki(attn) as p:
            torch.manual_seed(1)  # dropout draws the same mask
            got = attn(**kw)
        assert torch.equal(got, expected), reason
        assert p.stats["fast"] == 0 and any(reason in r for r in p.stats["fallback"]), (reason, p.stats)
        with integrations.patch_phenaki(attn, strict=True), pytest.raises(ValueError, match=reason):
            attn(**kw)


def test_unpatch_print_and_state_dict():
    model = cvivit(False)()
    keys = list(model.state_dict())
    forward = peer.Attention.forward
    p = integrations.patch_phenaki(model)
    assert "[pvkernels: phenaki]" in repr(model) and list(model.state_dict()) == keys
    assert p.modules == 4 + 2  # four Attention layers, the VectorQuantize and its codebook
    p.unpatch()
    assert "pvkernels" not in repr(model)
    assert all("forward" not in vars(m) for m in model.modules())
    with integrations.patch_phenaki():
        assert peer.Attention.forward is not forward
    assert peer.Attention.forward is forward
    lfq_model = cvivit(True)()
    with integrations.patch_phenaki(lfq_model) as p:
        assert p.modules == 4 + 1 and "[pvkernels: phenaki]" in repr(lfq_model.vq)  # the LFQ
    assert "pvkernels" not in repr(lfq_model)


def test_making_a_patch_draws_no_random_numbers():
    """The structural check builds a tiny Attention (Linear init): under a forked RNG."""
    state = torch.get_rng_state()
    integrations.patch_phenaki().unpatch()
    assert torch.equal(torch.get_rng_state(), state)


def test_peer_version_error(monkeypatch):
    fake_version(monkeypatch, "phenaki-pytorch", "0.9.0")
    with pytest.raises(PeerVersionError, match="phenaki-pytorch 0.9.0"):
        integrations.patch_phenaki()
    monkeypatch.undo()
    monkeypatch.delattr(peer, "AlibiPositionalBias")
    with pytest.raises(PeerVersionError, match="AlibiPositionalBias is gone"):
        integrations.patch_phenaki()
