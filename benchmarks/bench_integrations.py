"""Other people's models, unpatched vs patched with pvkernels.integrations, side by side.

- vector-quantize-pytorch: ``VectorQuantize(dim=64, codebook_size=8192, decay=0.8)``, one
  training forward + backward on (16, 1024, 64); plus the peak-RSS growth of one step, each
  provider in a fresh subprocess (the unpatched step builds the N x K distances and one-hot).
- phenaki-pytorch: a ``CViViT`` (dim 256, 8 heads of 32, 64x64, patch 8, temporal patch 2,
  9 frames, depth 2 + 2, VectorQuantize instead of LFQ), one training step (batch 1); and its
  attention alone (one spatial and one temporal layer, forward + backward, at that model's shapes).
- video-diffusion-pytorch: a small ``Unet3D`` in ``GaussianDiffusion``, one training step.

Provider "reference" is the peer's own code, unpatched; "patched" the same model after the patch.

Needs the peers (``pip install -e ".[integrations]"``, see the README); skipped without them.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pvkernels import integrations

from .harness import QUICK, run

# "reference" is the peer's own code, unpatched: the harness puts speedup_vs_reference on "patched"
PROVIDERS = ["reference", "patched"]


def _time(benchmark, case, provider, fn, rounds):
    run(benchmark, fn, op="integrations", case=case, provider=provider, bytes_moved=0, rounds=rounds,
        in_context=False)


def _maybe_patched(provider, model, patch_fn):
    return patch_fn(model) if provider == "patched" else None


# vector-quantize-pytorch ------------------------------------------------------------------

VQ_SHAPE, VQ_CODES = ((2, 256, 64), 512) if QUICK else ((16, 1024, 64), 8192)


@pytest.mark.parametrize("provider", PROVIDERS)
def bench_vq_training_step(benchmark, provider):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=VQ_SHAPE[-1], codebook_size=VQ_CODES, decay=0.8).train()
    x = torch.randn(*VQ_SHAPE, requires_grad=True)
    patch = _maybe_patched(provider, vq, integrations.patch_vector_quantize)

    def step():
        quantized, _, loss = vq(x)
        (quantized.sum() + loss).backward()
    case = f"VectorQuantize K={VQ_CODES} x{tuple(VQ_SHAPE)}"
    _time(benchmark, case, provider, step, rounds=3)
    if patch is not None:
        assert patch.stats["fallback"] == {}, patch.stats
        patch.unpatch()


_MEMORY_CHILD = r"""
import sys, torch
from vector_quantize_pytorch import VectorQuantize
from pvkernels import integrations
shape, codes, patched = eval(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "patched"
torch.manual_seed(0)
vq = VectorQuantize(dim=shape[-1], codebook_size=codes, decay=0.8).train()
x = torch.randn(*shape, requires_grad=True)
if patched:
    integrations.patch_vector_quantize(vq)
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
quantized, _, loss = vq(x)  # warm-up: lazily built state, thread pools
(quantized.sum() + loss).backward()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kb("VmRSS")
quantized, _, loss = vq(x)
(quantized.sum() + loss).backward()
print((status_kb("VmHWM") - before) / 1024)
"""


def vq_step_peak_rss_mb(provider: str) -> float:
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, repr(VQ_SHAPE), str(VQ_CODES), provider],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_vq_training_step_memory(benchmark):
    pytest.importorskip("vector_quantize_pytorch")
    grown = {p: vq_step_peak_rss_mb(p) for p in PROVIDERS}
    benchmark.extra_info.update({f"peak_rss_growth_MB_{p}": v for p, v in grown.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nVectorQuantize training step, peak RSS growth: {json.dumps(grown)}")
    if not QUICK:
        assert grown["patched"] < 200, grown


# phenaki-pytorch ----------------------------------------------------------------------------

def _cvivit():
    phenaki = pytest.importorskip("phenaki_pytorch")
    dim, size = (64, 32) if QUICK else (256, 64)
    return phenaki.CViViT(dim=dim, codebook_size=8192, image_size=size, patch_size=8, temporal_patch_size=2,
                          spatial_depth=2, temporal_depth=2, dim_head=32, heads=8, use_vgg_and_gan=False,
                          lookup_free_quantization=False), size


@pytest.mark.parametrize("provider", PROVIDERS)
def bench_phenaki_cvivit_training_step(benchmark, provider):
    torch.manual_seed(0)
    model, size = _cvivit()
    video = torch.randn(1, 3, 9, size, size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    patch = _maybe_patched(provider, model, integrations.patch_phenaki)

    def step():
        loss = model(video)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _time(benchmark, f"phenaki CViViT step {size}x{size}x9", provider, step, rounds=3 if QUICK else 5)
    if patch is not None:
        assert patch.stats["fallback"] == {}, patch.stats
        patch.unpatch()


@pytest.mark.parametrize("axis", ["spatial", "temporal"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_phenaki_attention(benchmark, provider, axis):
    """One phenaki Attention layer, forward + backward, at the CViViT step's shapes: spatial over
    the 64 patches of each of 5 token frames (with the position bias), temporal (causal, ALiBi)
    over the 5 token frames of each of 64 patches."""
    peer = pytest.importorskip("phenaki_pytorch.attention")
    torch.manual_seed(0)
    dim, frames, patches = (64, 5, 16) if QUICK else (256, 5, 64)
    attn = peer.Attention(dim=dim, dim_head=32, heads=8, causal=axis == "temporal")
    shape = (frames, patches, dim) if axis == "spatial" else (patches, frames, dim)
    x = torch.randn(*shape, requires_grad=True)
    bias = torch.randn(8, patches, patches, requires_grad=True) if axis == "spatial" else None
    patch = _maybe_patched(provider, attn, integrations.patch_phenaki)

    def step():
        attn(x, attn_bias=bias).sum().backward()
    _time(benchmark, f"phenaki {axis} Attention fwd+bwd {tuple(shape)}", provider, step,
          rounds=10)
    if patch is not None:
        patch.unpatch()


# video-diffusion-pytorch --------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def bench_unet3d_training_step(benchmark, provider):
    vdp = pytest.importorskip("video_diffusion_pytorch.video_diffusion_pytorch")
    torch.manual_seed(0)
    frames, size = (4, 8) if QUICK else (8, 32)
    unet = vdp.Unet3D(dim=32, dim_mults=(1, 2, 4))
    model = vdp.GaussianDiffusion(unet, image_size=size, num_frames=frames, timesteps=1000)
    videos = torch.rand(2, 3, frames, size, size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    patch = _maybe_patched(provider, model, integrations.patch_video_diffusion)

    def step():
        torch.manual_seed(0)  # the same t and noise every round
        model(videos).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _time(benchmark, f"Unet3D(32, 1-2-4) step 2x{frames}x{size}x{size}", provider, step,
          rounds=3 if QUICK else 5)
    if patch is not None:
        assert patch.stats["fallback"] == {}, patch.stats
        patch.unpatch()

