"""The patched forwards on every pvkernels backend (``PVKERNELS_BACKEND`` steers "auto"): the
reference oracle, the cpp kernels and the Triton kernels (on a GPU, or the CPU interpreter)."""
from __future__ import annotations

import copy

import pytest
import torch

from pvkernels import integrations

from ..utils import assert_close

BACKENDS = ["reference", "cpp", "triton"]  # triton: a GPU, or the CPU interpreter (tests/conftest.py)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vector_quantize_on_every_backend(backend, monkeypatch):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    monkeypatch.setenv("PVKERNELS_BACKEND", backend)
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=16, codebook_size=64, decay=0.8)
    twin = copy.deepcopy(vq)
    x = torch.randn(2, 30, 16)
    expected = vq(x)
    with integrations.patch_vector_quantize(twin) as p:
        got = twin(x)
    assert torch.equal(got[1], expected[1]) and p.stats == {"fast": 1, "fallback": {}}
    assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    assert_close(twin._codebook.embed_avg, vq._codebook.embed_avg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lfq_on_every_backend(backend, monkeypatch):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    monkeypatch.setenv("PVKERNELS_BACKEND", backend)
    torch.manual_seed(0)
    lfq = vqp.LFQ(dim=10, codebook_size=2 ** 5, num_codebooks=2, spherical=True)
    twin = copy.deepcopy(lfq)
    x = torch.randn(2, 9, 10, requires_grad=True)
    (q, idx, aux), parts = lfq(x, inv_temperature=3.0, return_loss_breakdown=True)
    (gx,) = torch.autograd.grad(q.square().sum() + aux, x)
    with integrations.patch_vector_quantize(twin) as p:
        (q_fast, idx_fast, aux_fast), parts_fast = twin(x, inv_temperature=3.0, return_loss_breakdown=True)
        (gx_fast,) = torch.autograd.grad(q_fast.square().sum() + aux_fast, x)
    assert torch.equal(idx_fast, idx) and torch.equal(q_fast, q) and p.stats == {"fast": 1, "fallback": {}}
    for name, got, expected in zip(parts._fields, parts_fast, parts):
        assert_close(got, expected, rtol=1e-5, atol=1e-6, name=name)
    assert_close(gx_fast, gx, rtol=1e-5, atol=1e-6 * float(gx.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_phenaki_attention_on_every_backend(backend, causal, monkeypatch):
    peer = pytest.importorskip("phenaki_pytorch.attention")
    monkeypatch.setenv("PVKERNELS_BACKEND", backend)
    torch.manual_seed(0)
    attn = peer.Attention(dim=32, dim_head=8, heads=4, causal=causal)
    twin = copy.deepcopy(attn)
    x = torch.randn(3, 6, 32, requires_grad=True)
    expected = attn(x)
    (gx,) = torch.autograd.grad(expected.square().sum(), x)
    with integrations.patch_phenaki(twin) as p:
        got = twin(x)
        (gx_fast,) = torch.autograd.grad(got.square().sum(), x)
    assert p.stats == {"fast": 1, "fallback": {}}
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert_close(gx_fast, gx, rtol=1e-4, atol=1e-5 * float(gx.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_diffusion_attention_on_every_backend(backend, monkeypatch):
    vdp = pytest.importorskip("video_diffusion_pytorch.video_diffusion_pytorch")
    monkeypatch.setenv("PVKERNELS_BACKEND", backend)
    torch.manual_seed(0)
    attn = vdp.Attention(16, heads=2, dim_head=8, rotary_emb=vdp.RotaryEmbedding(8))
    twin = copy.deepcopy(attn)
    x, bias = torch.randn(2, 4, 7, 16), torch.randn(2, 7, 7)
    expected = attn(x, pos_bias=bias)
    with integrations.patch_video_diffusion(twin) as p:
        got = twin(x, pos_bias=bias)
    assert p.stats == {"fast": 1, "fallback": {}}
    assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_phenaki_attention_under_autocast():
    """bf16 autocast: the peer multiplies in bf16 with an fp32 softmax, the kernels multiply in
    fp32; the two agree to bf16 rounding."""
    peer = pytest.importorskip("phenaki_pytorch.attention")
    torch.manual_seed(0)
    attn = peer.Attention(dim=32, dim_head=8, heads=4, causal=True)
    twin = copy.deepcopy(attn)
    x = torch.randn(3, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn(x)
        with integrations.patch_phenaki(twin) as p:
            got = twin(x)
    assert got.dtype == expected.dtype == torch.bfloat16 and p.stats["fast"] == 1
    assert_close(got, expected, torch.bfloat16)
