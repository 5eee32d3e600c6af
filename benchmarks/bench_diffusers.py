"""diffusers' AnimateDiff motion module, unpatched (AttnProcessor2_0: SDPA) vs patch_diffusers.

At Stable Diffusion 1.5's widths: a motion module (``AnimateDiffTransformer3D``, 8 heads, two
self-attentions over 16 frames at every latent pixel) at each level of the UNet it meets, 320
channels at 64x64 (a 512x512 video), 640 at 32x32, 1280 at 16x16 and 8x8 (1280 / 8 = head dim 160:
fused on the CPU, past the Triton kernels' 128 on a GPU, where the patch falls back and says so);
forward (inference, no grad) and forward + backward. Three cases:
- ``attention``: the lines AttnProcessor2_0 runs between the projections and the output
  projection (view + transpose, SDPA, transpose + reshape copy) against the patch's (the
  (batch, n, heads, head_dim) views to pvkernels' kernels), on (batch * pixels, frames, channels)
  projections. On CUDA also each SDPA backend, and past 65535 sequences where they fail.
- ``module``: the whole motion module; ``extra_info["attention_share"]``: its two attention
  layers' share of its time (the ``attention`` lines timed alone at the module's shape).
- ``unet step``: a small UNetMotionModel training step (forward, backward, Adam), the share of
  every motion attention in it.

Provider "reference" is diffusers' own code, unpatched; "patched" the same after the patch.
Skipped without diffusers (``pip install -e ".[test]"`` installs it). On a shared machine,
``python -m benchmarks.bench_diffusers [--cpu-time] [--rounds N] [--attention-only | --fused | --latte]``
times the providers of every case (``--attention-only``: the attention lines' cases alone; ``--fused``:
the motion modules alone, their projections fused as ``fuse_qkv_projections()`` fuses them;
``--latte``: a Latte-1-wide layer pair and its spatial attention lines, 256 and 1024 tokens) in
alternating rounds (``--cpu-time``: one thread's CPU time, which other jobs disturb far less) and
prints the table of the README.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from pvkernels import integrations
from pvkernels.integrations._attention import attend
from pvkernels.ops.attention import fused_head_dim_limit

from . import harness
from .harness import DEVICE, QUICK, case_key, run, sync, time_calls

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")

FRAMES = 4 if QUICK else 16
HEADS = 2 if QUICK else 8


def levels(device: str = DEVICE, quick: bool = QUICK) -> list:
    """(channels, latent side, batch) of the motion modules a 512x512 SD 1.5 video meets."""
    if quick:
        return [(32, 8, 1)]
    out = [(320, 64, 1), (640, 32, 1), (1280, 16, 1), (1280, 8, 1)]
    if device == "cuda":  # 128 x 128 latent at batch 4: 65536 sequences, where SDPA's kernels fail
        out += [(320, 128, 4)]
    return out


# Motion modules per level in SD 1.5's UNetMotionModel at a 64x64 latent (diffusers' defaults:
# layers_per_block 2, up blocks 3 layers, use_motion_mid_block): down blocks 2 each, the mid block 1
# (8x8), up blocks 3 each; every module holds two self-attention layers (double_self_attention).
SD15_MODULES = {(320, 64, 1): 5, (640, 32, 1): 5, (1280, 16, 1): 5, (1280, 8, 1): 6}


def providers(device: str = DEVICE) -> list:
    if device == "cuda":
        return ["reference", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "patched"]
    return ["reference", "patched"]


# On a GPU also bf16, what diffusers runs there and the only dtype SDPA's flash and cuDNN backends take.
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def _level_name(level) -> str:
    C, side, B = level
    return f"{C}ch {side}x{side}" + (f" b{B}" if B > 1 else "")


# the attention lines ------------------------------------------------------------------------

def diffusers_core(query, key, value, heads):
    """AttnProcessor2_0's lines between the projections and to_out (no mask, no qk norm)."""
    batch_size = query.shape[0]
    head_dim = key.shape[-1] // heads
    q, k, v = (t.view(batch_size, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)


def patched_core(query, key, value, heads):
    """The same lines in the patch's processor: views of the projections to the fused kernels."""
    batch_size = query.shape[0]
    head_dim = key.shape[-1] // heads
    q, k, v = (t.view(batch_size, -1, heads, head_dim) for t in (query, key, value))
    return attend(q, k, v, None, causal=False).view(batch_size, -1, heads * head_dim)


def core_fn(provider: str):
    if provider == "patched":
        return patched_core
    if provider.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                      "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[provider[5:]])

        def fn(*args):
            with sdpa_kernel(chosen):
                return diffusers_core(*args)
        return fn
    return diffusers_core


def core_call(provider: str, n_seq: int, frames: int, channels: int, mode: str, device: str = DEVICE,
              dtype: torch.dtype = torch.float32, heads: int = HEADS):
    """A call of the attention lines on fresh (n_seq, frames, channels) projections (``frames``: the
    attended axis, tokens for a spatial call)."""
    fn = core_fn(provider)
    qkv = [torch.randn(n_seq, frames, channels, device=device, dtype=dtype, requires_grad=mode != "fwd")
           for _ in range(3)]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*qkv, heads)
        return call
    grad = torch.randn(n_seq, frames, channels, device=device, dtype=dtype)
    return lambda: torch.autograd.grad(fn(*qkv, heads), qkv, grad)


def attention_flops(n_seq: int, frames: int, channels: int, mode: str) -> float:
    """The attention's multiply-adds, 2 flops each: Q K^T and P V forward (frames^2 x head dim x
    heads each, per sequence); the backward's recomputed scores, dP, dQ, dK and dV 2.5 times that."""
    return 4 * n_seq * frames * frames * channels * (1 if mode == "fwd" else 3.5)


def _warm_or_skip(call, provider):
    try:
        call()
    except (RuntimeError, ValueError) as exc:  # an SDPA backend refusing the shape (65535 sequences)
        pytest.skip(f"{provider} cannot run this case on {DEVICE}: {str(exc).strip().splitlines()[0][:200]}")


def _cases(rows: list) -> dict:
    """parametrize kwargs with readable ids: "320ch_64x64-fwd-patched"."""
    return dict(argvalues=rows, ids=["-".join(_level_name(v).replace(" ", "_") if i == 0 else v for i, v in enumerate(r))
                                     for r in rows])


@pytest.mark.parametrize("level, mode, dtype, provider", **_cases(
    [(lv, m, str(dt).removeprefix("torch."), p) for lv in levels() for m in ("fwd", "fwd+bwd") for dt in DTYPES
     for p in providers()]))
def bench_motion_attention(benchmark, level, mode, dtype, provider):
    C, side, B = level
    limit = fused_head_dim_limit(torch.device(DEVICE))
    if provider == "patched" and C // HEADS > limit:
        pytest.skip(f"head dim {C // HEADS} > {limit}: the patch falls back to AttnProcessor2_0 here")
    n_seq = B * side * side
    dt = getattr(torch, dtype)
    call = core_call(provider, n_seq, FRAMES, C, mode, dtype=dt)
    _warm_or_skip(call, provider)
    numel = n_seq * FRAMES * C
    case = case_key("attention", mode, _level_name(level), f"{FRAMES} frames", *([dtype] if dt != torch.float32 else []))
    run(benchmark, call, "diffusers", case, provider, (4 if mode == "fwd" else 12) * numel * dt.itemsize,
        flops=attention_flops(n_seq, FRAMES, C, mode))


# the motion module --------------------------------------------------------------------------

def motion_module(channels: int, device: str = DEVICE, fused: bool = False):
    """AnimateDiff's motion module as UNetMotionModel / MotionAdapter build it at this width; fused:
    its projections fused, as UNetMotionModel.fuse_qkv_projections() fuses them."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    torch.manual_seed(0)
    module = AnimateDiffTransformer3D(num_attention_heads=HEADS, attention_head_dim=channels // HEADS,
                                      in_channels=channels, norm_num_groups=8 if QUICK else 32,
                                      activation_fn="geglu", positional_embeddings="sinusoidal",
                                      num_positional_embeddings=32, double_self_attention=True).to(device)
    if fused:
        for attn in module.modules():
            if isinstance(attn, Attention):
                attn.fuse_projections()
                attn.set_processor(FusedAttnProcessor2_0())
    return module


def module_call(provider: str, level, mode: str, device: str = DEVICE, fused: bool = False):
    """(call, patch or None): one forward (no grad) or forward + backward of the motion module."""
    C, side, B = level
    module = motion_module(C, device, fused)
    p = integrations.patch_diffusers(module) if provider == "patched" else None
    x = torch.randn(B * FRAMES, C, side, side, device=device, requires_grad=mode != "fwd")
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return module(x, num_frames=FRAMES)
        return call, p
    params = list(module.parameters())
    # fused: to_q, to_k and to_v are left unused (to_qkv holds their weights)
    return lambda: torch.autograd.grad(module(x, num_frames=FRAMES).square().mean(), [x] + params,
                                       allow_unused=fused), p


def attention_seconds(provider: str, shapes: dict, mode: str, rounds: int, device: str = DEVICE) -> float:
    """The attention lines alone at the (n_seq, frames, channels) shapes a run met, each times
    its count: seconds per run."""
    total = 0.0
    for (n_seq, frames, channels), count in shapes.items():
        fused = channels // HEADS <= fused_head_dim_limit(torch.device(device))
        core = "patched" if provider == "patched" and fused else "reference"
        call = core_call(core, n_seq, frames, channels, mode, device)
        call()
        total += count * time_calls(call, rounds, device)[0]
    return total


def attention_shapes(model, run_once) -> dict:
    """{(n_seq, frames, channels): calls} of the motion modules' self-attention in one run."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    shapes: dict = {}

    def record(attn, args, kwargs):
        key = tuple((args[0] if args else kwargs["hidden_states"]).shape)
        shapes[key] = shapes.get(key, 0) + 1
    hooks = [a.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
             if isinstance(m, AnimateDiffTransformer3D) for a in m.modules() if isinstance(a, Attention)]
    try:
        run_once()
    finally:
        for h in hooks:
            h.remove()
    return shapes


@pytest.mark.parametrize("level, mode, provider", **_cases([(lv, m, p) for lv in levels() if lv[2] == 1
                                                            for m in ("fwd", "fwd+bwd") for p in ("reference", "patched")]))
def bench_motion_module(benchmark, level, mode, provider):
    C, side, B = level
    call, p = module_call(provider, level, mode)
    rounds = 3 if QUICK else 5
    run(benchmark, call, "diffusers", case_key("module", mode, _level_name(level), f"{FRAMES} frames"), provider,
        bytes_moved=0, rounds=rounds, in_context=False)
    attention = attention_seconds(provider, {(B * side * side, FRAMES, C): 2}, mode, rounds)
    extra = {"attention_ms": attention * 1e3, "attention_share": attention / benchmark.stats.stats.median}
    if p is not None:
        extra.update(patch_fast=p.stats["fast"], patch_fallback=dict(p.stats["fallback"]))
    benchmark.extra_info.update(extra)
    harness._rows[-1].update(extra)


# a small UNetMotionModel training step ------------------------------------------------------

UNET_CHANNELS, UNET_SIDE = ((16, 32), 8) if QUICK else ((64, 128, 256), 32)


def unet_step(provider: str, device: str = DEVICE):
    """(step, patch or None, model): one Adam step of a small UNetMotionModel on one 16-frame video."""
    import diffusers

    torch.manual_seed(0)
    n = len(UNET_CHANNELS)
    model = diffusers.UNetMotionModel(
        block_out_channels=UNET_CHANNELS, layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlockMotion",) * (n - 1) + ("DownBlockMotion",),
        up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * (n - 1), num_attention_heads=HEADS,
        motion_num_attention_heads=HEADS, motion_max_seq_length=32, sample_size=UNET_SIDE).to(device)
    p = integrations.patch_diffusers(model) if provider == "patched" else None
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(1, 4, FRAMES, UNET_SIDE, UNET_SIDE, device=device)
    text = torch.randn(1, 7, 32, device=device).repeat_interleave(FRAMES, dim=0)
    t = torch.tensor([500], device=device)

    def step():
        model(x, t, text).sample.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, p, model


@pytest.mark.parametrize("provider", ["reference", "patched"])
def bench_unet_step(benchmark, provider):
    step, p, model = unet_step(provider)
    rounds = 3 if QUICK else 5
    run(benchmark, step, "diffusers", case_key("unet step", "x".join(map(str, UNET_CHANNELS)),
                                               f"{UNET_SIDE}x{UNET_SIDE}", f"{FRAMES} frames"),
        provider, bytes_moved=0, rounds=rounds, in_context=False)
    shapes = attention_shapes(model, step)
    attention = attention_seconds(provider, shapes, "fwd+bwd", rounds)
    extra = {"attention_ms": attention * 1e3, "attention_share": attention / benchmark.stats.stats.median}
    if p is not None:
        extra.update(patch_fast=p.stats["fast"], patch_fallback=dict(p.stats["fallback"]))
    benchmark.extra_info.update(extra)
    harness._rows[-1].update(extra)


# a Latte-1-wide layer pair ------------------------------------------------------------------

LATTE_HEADS, LATTE_HEAD_DIM = 16, 72  # Latte-1: 1152 channels


def latte_step(provider: str, side: int, device: str = DEVICE):
    """A forward + backward of one Latte layer pair (a spatial block over (side / 2)^2 patches, a
    temporal one over 16 frames) at Latte-1's width, random weights."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.LatteTransformer3DModel(
        num_attention_heads=LATTE_HEADS, attention_head_dim=LATTE_HEAD_DIM, in_channels=4, out_channels=8,
        num_layers=1, cross_attention_dim=LATTE_HEADS * LATTE_HEAD_DIM, sample_size=side, patch_size=2,
        norm_type="ada_norm_single", caption_channels=64, video_length=FRAMES).to(device)
    if provider == "patched":
        integrations.patch_diffusers(model)
    x = torch.randn(1, 4, FRAMES, side, side, device=device)
    text, t = torch.randn(1, 7, 64, device=device), torch.tensor([10], device=device)
    return lambda: model(x, timestep=t, encoder_hidden_states=text).sample.square().mean().backward()


# alternating rounds -------------------------------------------------------------------------

def _clocked(call, rounds: int, clock) -> list:
    times = []
    for _ in range(rounds):
        start = clock()
        call()
        sync("cpu")
        times.append(clock() - start)
    return times


# Tensors of (n_seq, frames, channels) each path must read or write once per call (the attention's
# memory floor; fp32). Patched: q, k, v read and o written; backward q, k, v, dO read and dq, dk,
# dv written, into buffers the cpp backend keeps between calls (csrc/attention.h, empty_output: no
# page faults). diffusers: the same, plus SDPA's output copied by transpose + reshape (read and
# written; its backward the same for dO) and O read again by SDPA's backward, into fresh memory.
MOVED = {"fwd": {"reference": 6, "patched": 4}, "fwd+bwd": {"reference": 6 + 2 + 8, "patched": 4 + 7}}


def interleaved(cpu_time: bool, rounds: int, attention_only: bool = False, fused: bool = False,
                latte: bool = False) -> None:
    """Every case's two providers in alternating rounds: medians, the ratio's range over the
    rounds and the attention share (its lines timed alone, the same clock); a markdown table.
    attention_only: the attention lines alone, no module or UNet step; fused: the motion modules
    alone, with fused projections (no attention share: the lines timed alone read separate ones);
    latte: a Latte-1-wide layer pair forward + backward and its spatial attention lines."""
    if cpu_time:
        torch.set_num_threads(1)
    clock = time.thread_time if cpu_time else time.perf_counter
    both = ("reference", "patched")
    cases = []  # (name, {provider: call}, {provider: attention shapes} or None, mode)
    roofline = {}  # attention case -> bytes each provider must move
    for side in ((8,) if QUICK else (32, 64)) if latte else ():
        tokens, channels = (side // 2) ** 2, LATTE_HEADS * LATTE_HEAD_DIM
        for mode in ("fwd", "fwd+bwd"):
            name = f"attention {mode}, Latte spatial, {tokens} tokens x {FRAMES} frames, {LATTE_HEADS} x {LATTE_HEAD_DIM}"
            calls = {p: core_call(p, FRAMES, tokens, channels, mode, "cpu", heads=LATTE_HEADS) for p in both}
            cases.append((name, calls, None, mode))
        cases.append((f"Latte layer pair fwd+bwd, {side}x{side} latent ({tokens} tokens), {FRAMES} frames",
                      {p: latte_step(p, side, "cpu") for p in both}, None, "fwd+bwd"))
    for level in ([] if latte else levels("cpu")):
        C, side, B = level
        shape = {(B * side * side, FRAMES, C): 2}
        for mode in ("fwd", "fwd+bwd"):
            if fused:
                cases.append((f"motion module {mode}, {_level_name(level)}, fused projections",
                              {p: module_call(p, level, mode, "cpu", fused=True)[0] for p in both}, None, mode))
                continue
            if C // HEADS <= fused_head_dim_limit(torch.device("cpu")):
                name = f"attention {mode}, {_level_name(level)}"
                calls = {p: core_call(p, B * side * side, FRAMES, C, mode, "cpu") for p in both}
                cases.append((name, calls, None, mode))
                element = B * side * side * FRAMES * C * 4
                roofline[name] = ({p: n * element for p, n in MOVED[mode].items()},
                                  attention_flops(B * side * side, FRAMES, C, mode))
            if not attention_only:
                cases.append((f"motion module {mode}, {_level_name(level)}",
                              {p: module_call(p, level, mode, "cpu")[0] for p in both}, {p: shape for p in both}, mode))
    if not attention_only and not fused and not latte:
        steps = {p: unet_step(p, "cpu") for p in both}
        cases.append((f"UNetMotionModel {'-'.join(map(str, UNET_CHANNELS))} step, {UNET_SIDE}x{UNET_SIDE}",
                      {p: s[0] for p, s in steps.items()},
                      {p: attention_shapes(s[2], s[0]) for p, s in steps.items()}, "fwd+bwd"))
    clock_name = "one thread, CPU time" if cpu_time else "wall clock"
    print(f"{FRAMES} frames, {LATTE_HEADS if latte else HEADS} heads, {clock_name}, {rounds} alternating rounds")
    print("| case | reference ms | patched ms | x | rounds' x range | attention share, ref -> patched |")
    print("|---|---:|---:|---:|---|---|")
    measured = {}
    for name, calls, shapes, mode in cases:
        for c in calls.values():
            c()  # warm-up
        times = {p: [] for p in both}
        for _ in range(rounds):
            for p in both:
                times[p] += _clocked(calls[p], 1, clock)
        ref, fast = (statistics.median(times[p]) for p in both)
        measured[name] = (ref, fast)
        ratios = [a / b for a, b in zip(times["reference"], times["patched"])]
        share = ""
        if shapes is not None:
            parts = []
            for p, median in zip(both, (ref, fast)):
                total = 0.0
                for (n_seq, frames, channels), count in shapes[p].items():
                    core = p if channels // HEADS <= fused_head_dim_limit(torch.device("cpu")) else "reference"
                    call = core_call(core, n_seq, frames, channels, mode, "cpu")
                    call()
                    total += count * statistics.median(_clocked(call, rounds, clock))
                parts.append(total / median)
            share = f"{parts[0]:.0%} -> {parts[1]:.0%}"
        print(f"| {name} | {ref * 1e3:.1f} | {fast * 1e3:.1f} | {ref / fast:.2f} | {min(ratios):.2f}-{max(ratios):.2f} "
              f"| {share} |", flush=True)
    for mode in ("fwd", "fwd+bwd"):  # the attention lines of a whole SD 1.5 UNet, from the medians above
        names = {f"attention {mode}, {_level_name(level)}": 2 * count for level, count in SD15_MODULES.items()}
        if all(n in measured for n in names):
            ref, fast = (sum(count * measured[n][i] for n, count in names.items()) for i in (0, 1))
            print(f"| attention {mode}, SD 1.5 UNet's {sum(SD15_MODULES.values())} motion modules "
                  f"({sum(names.values())} layers: sum of the medians above) | {ref * 1e3:.1f} | {fast * 1e3:.1f} "
                  f"| {ref / fast:.2f} |  |  |", flush=True)
    if not roofline:
        return
    # after set_num_threads(1): one thread's copy bandwidth and fp32 matmul rate
    bw, gemm = harness.copy_bandwidth("cpu"), harness.gemm_rate(torch.float32, "cpu")
    print(f"\nroofline: one thread's copy bandwidth of memory {bw / 1e9:.1f} GB/s (bytes read + written), its fp32 "
          f"matmul {gemm / 1e9:.0f} GFLOP/s; MB: the tensors each path reads and writes once (MOVED); the patched "
          "floor: the larger of its bytes at the copy bandwidth of a working set that size, copied after diffusers' "
          "bytes as the rounds run it after diffusers' call (the caches hold what that call left; its outputs "
          "reuse cached buffers: no page faults), and its flops at the matmul rate; x ceiling: diffusers' time over "
          "that floor")
    print("| case | MB diffusers | MB patched | x if both ran at copy bandwidth | copy GB/s at that size | GFLOP "
          "| patched floor ms, bytes / flops | x ceiling | patched, % of the floor's speed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (moved, flops) in roofline.items():
        ref, fast = measured[name]
        rate = harness.copy_bandwidth("cpu", working_set=moved["patched"], after=moved["reference"])
        floors = moved["patched"] / rate, flops / gemm
        floor = max(floors)
        print(f"| {name} | {moved['reference'] / 1e6:.0f} | {moved['patched'] / 1e6:.0f} "
              f"| {moved['reference'] / moved['patched']:.2f} | {rate / 1e9:.1f} | {flops / 1e9:.2f} "
              f"| {floors[0] * 1e3:.1f} / {floors[1] * 1e3:.1f} | {ref / floor:.2f} | {floor / fast:.0%} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-time", action="store_true", help="one thread's CPU time instead of wall clock")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per case (default 5)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--attention-only", action="store_true", help="the attention lines' cases alone")
    only.add_argument("--fused", action="store_true", help="the motion modules alone, their projections fused")
    only.add_argument("--latte", action="store_true", help="a Latte-1-wide layer pair and its spatial attention")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    interleaved(cpu_time=args.cpu_time, rounds=args.rounds, attention_only=args.attention_only, fused=args.fused,
                latte=args.latte)
