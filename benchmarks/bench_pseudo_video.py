"""pseudo_video against the eager forms a competent user writes, torch.compile, OpenCV, cpp, triton.

Providers (every one on ``DEVICE``, same images and frames):
- reference: the oracle's loop, one reflect pad + conv pair per frame over all images, eps
  from torch.randn per frame (torch's own generator: faster than the seeded Philox oracle);
- batched (order "high"): one depthwise conv pair over all frames at once (each frame's taps
  zero-padded to the largest radius) and one torch.randn for all noise; for order "first" the
  chain is sequential and the reference loop is the batched form;
- kornia (order "high", with blur): ``kornia.filters.gaussian_blur2d`` with one sigma per
  sample on the frames stacked along the batch (kernel 2R+1 for the largest radius R);
- compiled: torch.compile of the fastest of those forms (batched for "high", the loop for
  "first") with ``fallback_random`` (eager torch.randn: inductor's own RNG lowering is slower);
- opencv (CPU): cv2.GaussianBlur per image and frame; cpp (CPU); triton (CUDA).
Speedups are quoted against the fastest eager form (speedup_vs_eager).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pvkernels import pseudo_video, schedules
from pvkernels.ops.pseudo_video import _gaussian_taps, _radius, pseudo_video_reference

from .harness import DEVICE, QUICK, case_key, run

try:
    import cv2
except ImportError:
    cv2 = None
try:
    import kornia
except ImportError:
    kornia = None

CASES = {
    "blur_high": lambda T: schedules.linear_blur(T, 3.0, "high"),
    "blur_first": lambda T: schedules.linear_blur(T, 3.0, "first"),
    "noise_high": lambda T: schedules.ddpm_noise(T, "linear", "high"),
    "noise_first": lambda T: schedules.ddpm_noise(T, "linear", "first"),
    "blur_noise": lambda T: schedules.combine(schedules.linear_blur(T, 3.0), schedules.ddpm_noise(T)),
}


def frames(device: str = DEVICE, quick: bool = QUICK) -> tuple:
    return (4,) if quick else ((18,) if device == "cuda" else (4, 8, 18))


def shape(device: str = DEVICE, quick: bool = QUICK) -> tuple:
    if quick:
        return (4, 3, 16, 16)
    return (1024, 3, 32, 32) if device == "cuda" else (128, 3, 32, 32)


def providers(case: str, device: str = DEVICE) -> list:
    high, blur = case.endswith("high") or case == "blur_noise", case.startswith("blur")
    names = ["reference"] + (["batched"] if high else []) + (["kornia"] if high and blur and kornia else [])
    names.append("compiled")
    if device == "cpu":
        names += (["opencv"] if blur and not case.endswith("noise") and cv2 else []) + ["cpp"]
    else:
        names.append("triton")
    return names


def _randn_reference(x, p):
    B, C, H, W = x.shape
    noise = torch.randn(B, len(p["blur_sigma"]), C, H, W, device=x.device) if any(p["noise_std"]) else None
    return pseudo_video_reference(x, p["blur_sigma"], p["noise_std"], p["signal_scale"], p["order"] == "first", 0,
                                  noise, 3.0)


def batched_tables(p, H, W, C, device):
    """What a user builds once: per-frame taps zero-padded to the largest radius, scale, std."""
    sigma = p["blur_sigma"][:-1]
    radii = [_radius(s, 3.0, H, W) for s in sigma]
    R = max(radii)
    taps = torch.zeros(len(sigma), 2 * R + 1)
    for t, (s, r) in enumerate(zip(sigma, radii)):
        half = _gaussian_taps(s, r)
        taps[t, R - r:R + r + 1] = torch.tensor(half[:0:-1] + half)
    taps = taps.repeat_interleave(C, 0).to(device)  # one kernel per (frame, channel) group
    scale = torch.tensor(p["signal_scale"][:-1], device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(p["noise_std"][:-1], device=device).view(1, -1, 1, 1, 1)
    return R, taps.view(-1, 1, 2 * R + 1, 1), taps.view(-1, 1, 1, 2 * R + 1), scale, std, any(p["noise_std"])


def batched(x, tables):
    """Order "high" in one depthwise conv pair over every frame and one torch.randn."""
    R, taps_v, taps_h, scale, std, has_noise = tables
    B, C, H, W = x.shape
    F1 = scale.shape[1]
    y = x.repeat(1, F1, 1, 1)  # (B, (T-1) * C, H, W), frame-major
    if R > 0:
        y = F.conv2d(F.pad(y, (0, 0, R, R), mode="reflect"), taps_v, groups=F1 * C)
        y = F.conv2d(F.pad(y, (R, R, 0, 0), mode="reflect"), taps_h, groups=F1 * C)
    y = y.view(B, F1, C, H, W) * scale
    if has_noise:
        y = y + std * torch.randn(B, F1, C, H, W, device=x.device)
    return torch.cat([y, x.unsqueeze(1)], 1)


def kornia_blur(x, p):
    """kornia's gaussian_blur2d, one sigma per sample, on the frames stacked along the batch."""
    B, C, H, W = x.shape
    sigma = torch.tensor(p["blur_sigma"][:-1], device=x.device)
    R = _radius(float(sigma.max()), 3.0, H, W)
    F1 = sigma.numel()
    per_sample = sigma.repeat_interleave(B).unsqueeze(1).expand(-1, 2)
    y = kornia.filters.gaussian_blur2d(x.repeat(F1, 1, 1, 1), 2 * R + 1, per_sample, border_type="reflect")
    y = y.view(F1, B, C, H, W).transpose(0, 1) * torch.tensor(p["signal_scale"][:-1], device=x.device).view(1, -1, 1, 1, 1)
    if any(p["noise_std"]):
        std = torch.tensor(p["noise_std"][:-1], device=x.device).view(1, -1, 1, 1, 1)
        y = y + std * torch.randn(B, F1, C, H, W, device=x.device)
    return torch.cat([y, x.unsqueeze(1)], 1)


def _opencv(images, p):
    """OpenCV's GaussianBlur per image and frame (HWC layout prepared outside the timing)."""
    out = []
    for t, sigma in enumerate(p["blur_sigma"][:-1]):
        r = min(int(-(-3.0 * sigma // 1)), min(images.shape[1:3]) - 1)
        frames_t = []
        for k, img in enumerate(images):
            src = out[-1][k] if p["order"] == "first" and out else img
            frames_t.append(cv2.GaussianBlur(src, (2 * r + 1, 2 * r + 1), sigma, borderType=cv2.BORDER_REFLECT_101)
                            if r > 0 else src)
        out.append(frames_t)
    return out


def compiled_fastest(x, p):
    """torch.compile of the fastest eager form (batched for "high", the loop for "first"),
    a fresh static compile per case (dynamo's recompiles would turn shapes dynamic and, past
    its cache limit, fall back to eager silently), eager torch.randn inside the graph."""
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True
    if p["order"] == "high":
        tables = batched_tables(p, x.shape[2], x.shape[3], x.shape[1], x.device)
        fn = torch.compile(lambda x: batched(x, tables), dynamic=False)
    else:
        fn = torch.compile(lambda x: _randn_reference(x, p), dynamic=False)
    return lambda: fn(x)


def provider_fn(provider, x, p):
    if provider == "reference":
        return lambda: _randn_reference(x, p)
    if provider == "batched":
        tables = batched_tables(p, x.shape[2], x.shape[3], x.shape[1], x.device)
        return lambda: batched(x, tables)
    if provider == "kornia":
        return lambda: kornia_blur(x, p)
    if provider == "compiled":
        return compiled_fastest(x, p)
    if provider == "opencv":
        images = x.permute(0, 2, 3, 1).contiguous().numpy()
        return lambda: _opencv(images, p)
    return lambda: pseudo_video(x, **p, seed=1, backend=provider)


@pytest.mark.parametrize("case, T, provider",
                         [(c, T, p) for c in CASES for T in frames() for p in providers(c)])
def bench_pseudo_video(benchmark, case, T, provider):
    p = CASES[case](T)
    B, C, H, W = shape()
    x = torch.rand(B, C, H, W, device=DEVICE)
    bytes_moved = x.numel() * 4 * (1 + T)  # read the images once, write T frames
    run(benchmark, provider_fn(provider, x, p), "pseudo_video", case_key(case, f"T={T}", f"{B}x{C}x{H}x{W}"),
        provider, bytes_moved)
