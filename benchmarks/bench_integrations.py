"""Other people's models, unpatched vs patched with pvkernels.integrations, side by side.

- vector-quantize-pytorch: ``VectorQuantize(dim=64, codebook_size=8192, decay=0.8)``, one
  training forward + backward on (16, 1024, 64); plus the peak-RSS growth of one step, each
  provider in a fresh subprocess (the unpatched step builds the N x K distances and one-hot).
- phenaki-pytorch: a ``CViViT`` (dim 256, 8 heads of 32, 64x64, patch 8, temporal patch 2,
  9 frames, depth 2 + 2, VectorQuantize instead of LFQ), one Adam training step (batch 1); and
  its attention alone (one spatial and one temporal layer, forward + backward, at that model's
  shapes).
- video-diffusion-pytorch: ``Unet3D(dim=32, dim_mults=(1, 2, 4))`` in ``GaussianDiffusion``,
  one Adam training step on 2 videos of 8 frames, 32x32.
- vector-quantize-pytorch's ``LFQ(dim=16, codebook_size=2**16)``: one training forward + backward
  on 4096 tokens (the unpatched entropy builds 4096 x 65536 probabilities); ``LFQ`` with 2^18
  codes on 16384 tokens, patched only (17 GB per dense matrix: the unpatched step cannot run
  here); phenaki's default ``CViViT`` (LFQ with 2^16 codes, dim 256, 9 frames of 128x128, patch 8),
  one Adam step. Peak-RSS growth of one step for each, each provider in a fresh subprocess.

Provider "reference" is the peer's own code, unpatched; "patched" the same model after the patch.
Needs the peers (``pip install -e ".[integrations]"``, see the README); skipped without them.

On a machine shared with other jobs, ``python -m benchmarks.bench_integrations [--cpu-time]``
times the two providers of every case in alternating rounds (and with ``--cpu-time`` on one
thread, by the thread's CPU time, which other jobs disturb far less): the README's figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pvkernels import integrations

from .harness import QUICK, run

PROVIDERS = ["reference", "patched"]


def _peer(name):
    return pytest.importorskip(name)


# the cases: name -> (rounds, make(provider) -> step function) -----------------------------

VQ_SHAPE, VQ_CODES = ((2, 256, 64), 512) if QUICK else ((16, 1024, 64), 8192)
CVIVIT_DIM, CVIVIT_SIZE = (64, 32) if QUICK else (256, 64)
UNET_FRAMES, UNET_SIZE = (4, 8) if QUICK else (8, 32)


def vq_step(provider):
    vqp = _peer("vector_quantize_pytorch")
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=VQ_SHAPE[-1], codebook_size=VQ_CODES, decay=0.8).train()
    x = torch.randn(*VQ_SHAPE, requires_grad=True)
    if provider == "patched":
        integrations.patch_vector_quantize(vq, strict=True)

    def step():
        quantized, _, loss = vq(x)
        (quantized.sum() + loss).backward()
    return step


def cvivit_step(lfq: bool, size: int, dim: int, codebook_size: int):
    """One Adam step of phenaki's CViViT on a 1x3x9 video of size x size, with its LFQ (the peer's
    default) or a VectorQuantize (``lookup_free_quantization=False``)."""
    def make(provider):
        phenaki = _peer("phenaki_pytorch")
        torch.manual_seed(0)
        model = phenaki.CViViT(dim=dim, codebook_size=codebook_size, image_size=size, patch_size=8,
                               temporal_patch_size=2, spatial_depth=2, temporal_depth=2, dim_head=32, heads=8,
                               use_vgg_and_gan=False, lookup_free_quantization=lfq)
        video = torch.randn(1, 3, 9, size, size)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        if provider == "patched":
            integrations.patch_phenaki(model, strict=True)

        def step():
            model(video).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return make


def attention_step(axis):
    """One phenaki Attention layer, forward + backward, at the CViViT step's shapes: spatial over
    the patches of each of 5 token frames (with a position bias), temporal (causal, ALiBi) over
    the 5 token frames of each patch."""
    def make(provider):
        peer = _peer("phenaki_pytorch.attention")
        torch.manual_seed(0)
        patches = (CVIVIT_SIZE // 8) ** 2
        attn = peer.Attention(dim=CVIVIT_DIM, dim_head=32, heads=8, causal=axis == "temporal")
        shape = (5, patches, CVIVIT_DIM) if axis == "spatial" else (patches, 5, CVIVIT_DIM)
        x = torch.randn(*shape, requires_grad=True)
        bias = torch.randn(8, patches, patches, requires_grad=True) if axis == "spatial" else None
        if provider == "patched":
            integrations.patch_phenaki(attn, strict=True)
        return lambda: attn(x, attn_bias=bias).sum().backward()
    return make


def unet3d_step(provider):
    vdp = _peer("video_diffusion_pytorch.video_diffusion_pytorch")
    torch.manual_seed(0)
    model = vdp.GaussianDiffusion(vdp.Unet3D(dim=32, dim_mults=(1, 2, 4)), image_size=UNET_SIZE,
                                  num_frames=UNET_FRAMES, timesteps=1000)
    videos = torch.rand(2, 3, UNET_FRAMES, UNET_SIZE, UNET_SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if provider == "patched":
        integrations.patch_video_diffusion(model, strict=True)

    def step():
        torch.manual_seed(0)  # the same t and noise every round
        model(videos).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


LFQ_BITS, LFQ_TOKENS = (10, 512) if QUICK else (16, 4096)
LFQ_BIG_BITS, LFQ_BIG_TOKENS = (12, 1024) if QUICK else (18, 16384)
CVIVIT_LFQ_SIZE = 32 if QUICK else 128
# phenaki's default CViViT (lookup_free_quantization=True, codebook 2^16)
CVIVIT_LFQ_STEP = cvivit_step(True, CVIVIT_LFQ_SIZE, 256, 65536)


def lfq_step(bits, tokens):
    """LFQ(dim=bits, codebook_size=2**bits) at its defaults, training forward + backward."""
    def make(provider):
        vqp = _peer("vector_quantize_pytorch")
        torch.manual_seed(0)
        lfq = vqp.LFQ(dim=bits, codebook_size=2 ** bits).train()
        x = torch.randn(tokens // 1024 or 1, min(tokens, 1024), bits, requires_grad=True)
        if provider == "patched":
            integrations.patch_vector_quantize(lfq, strict=True)

        def step():
            quantized, _, aux_loss = lfq(x)
            (quantized.sum() + aux_loss).backward()
        return step
    return make


CASES = {
    f"VectorQuantize K={VQ_CODES} train step {tuple(VQ_SHAPE)}": (3, vq_step),
    f"phenaki CViViT train step 1x3x9x{CVIVIT_SIZE}x{CVIVIT_SIZE}":
        (5, cvivit_step(False, CVIVIT_SIZE, CVIVIT_DIM, 8192)),
    "phenaki spatial Attention fwd+bwd": (10, attention_step("spatial")),
    "phenaki temporal Attention fwd+bwd": (10, attention_step("temporal")),
    f"Unet3D(32, 1-2-4) train step 2x3x{UNET_FRAMES}x{UNET_SIZE}x{UNET_SIZE}": (5, unet3d_step),
    f"LFQ 2^{LFQ_BITS} codes train step, {LFQ_TOKENS} tokens": (3, lfq_step(LFQ_BITS, LFQ_TOKENS)),
    f"phenaki CViViT (LFQ 2^16) train step 1x3x9x{CVIVIT_LFQ_SIZE}x{CVIVIT_LFQ_SIZE}": (3, CVIVIT_LFQ_STEP),
}
# steps whose peak memory is measured (fresh process per provider), and the patched-only one
MEMORY_STEPS = {"vq": vq_step, "lfq": lfq_step(LFQ_BITS, LFQ_TOKENS), "lfq_big": lfq_step(LFQ_BIG_BITS, LFQ_BIG_TOKENS),
                "cvivit_lfq": CVIVIT_LFQ_STEP}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_integration(benchmark, provider, case):
    rounds, make = CASES[case]
    run(benchmark, make(provider), op="integrations", case=case, provider=provider, bytes_moved=0,
        rounds=rounds, in_context=False)  # strict=True: a fallback would raise


# memory of one step -----------------------------------------------------------------------

_MEMORY_CHILD = r"""
import sys, torch
from benchmarks.bench_integrations import MEMORY_STEPS
step = MEMORY_STEPS[sys.argv[1]](sys.argv[2])
step()  # warm-up: lazily built state, thread pools
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
before = status_kb("VmRSS")
step()
print((status_kb("VmHWM") - before) / 1024)
"""


def step_peak_rss_mb(name: str, provider: str) -> float:
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, name, provider], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


def vq_step_peak_rss_mb(provider: str) -> float:
    return step_peak_rss_mb("vq", provider)


def bench_vq_training_step_memory(benchmark):
    _peer("vector_quantize_pytorch")
    grown = {p: vq_step_peak_rss_mb(p) for p in PROVIDERS}
    benchmark.extra_info.update({f"peak_rss_growth_MB_{p}": v for p, v in grown.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nVectorQuantize training step, peak RSS growth (MB): {json.dumps(grown)}")
    if not QUICK:
        assert grown["patched"] < 200, grown


@pytest.mark.parametrize("name", ["lfq", "cvivit_lfq"])
def bench_lfq_training_step_memory(benchmark, name):
    _peer("phenaki_pytorch" if name == "cvivit_lfq" else "vector_quantize_pytorch")
    grown = {p: step_peak_rss_mb(name, p) for p in PROVIDERS}
    benchmark.extra_info.update({f"peak_rss_growth_MB_{p}": v for p, v in grown.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{name} training step, peak RSS growth (MB): {json.dumps(grown)}")


def bench_lfq_big_codebook(benchmark):
    """2^18 codes on 16384 tokens, patched only: seconds per step, tokens/s and peak RSS growth."""
    _peer("vector_quantize_pytorch")
    step = MEMORY_STEPS["lfq_big"]("patched")
    run(benchmark, step, op="integrations", case=f"LFQ 2^{LFQ_BIG_BITS} codes train step, {LFQ_BIG_TOKENS} tokens",
        provider="patched", bytes_moved=0, rounds=3, in_context=False,
        extra={"peak_rss_growth_MB": step_peak_rss_mb("lfq_big", "patched")})
    benchmark.extra_info["tokens_per_s"] = LFQ_BIG_TOKENS / (benchmark.extra_info["median_ms"] / 1e3)


# alternating rounds -------------------------------------------------------------------------

def interleaved(cpu_time: bool) -> None:
    if cpu_time:
        torch.set_num_threads(1)
    clock = time.thread_time if cpu_time else time.perf_counter
    for case, (rounds, make) in CASES.items():
        steps = {p: make(p) for p in PROVIDERS}
        for step in steps.values():
            step()  # warm-up
        times = {p: [] for p in PROVIDERS}
        for _ in range(rounds):
            for p, step in steps.items():
                start = clock()
                step()
                times[p].append(clock() - start)
        ref, fast = (statistics.median(times[p]) * 1e3 for p in PROVIDERS)
        ratios = [a / b for a, b in zip(*times.values())]
        print(f"{case}: reference {ref:.1f} ms, patched {fast:.1f} ms, x{ref / fast:.2f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    for name in ("vq", "lfq", "cvivit_lfq"):
        print(f"peak RSS growth of one {name} step (MB):", {p: step_peak_rss_mb(name, p) for p in PROVIDERS},
              flush=True)
    big = MEMORY_STEPS["lfq_big"]("patched")
    big()
    start = clock()
    big()
    print(f"LFQ 2^{LFQ_BIG_BITS} codes, {LFQ_BIG_TOKENS} tokens, patched: {clock() - start:.2f} s, "
          f"peak RSS growth {step_peak_rss_mb('lfq_big', 'patched'):.0f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-time", action="store_true", help="one thread's CPU time instead of wall clock")
    interleaved(cpu_time=parser.parse_args().cpu_time)
