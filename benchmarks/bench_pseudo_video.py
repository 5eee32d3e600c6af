"""pseudo_video: reference (eager), torch.compile(reference), OpenCV per image, cpp, triton.

The eager and compiled baselines draw eps with torch.randn inside the timed call (torch's own
fastest generator; inductor fuses it), not with the seeded Philox oracle, which is ~10x slower
eagerly and which inductor cannot compile in reasonable time: the ratios are conservative.
"""
import pytest
import torch

from pvkernels import pseudo_video, schedules
from pvkernels.ops.pseudo_video import pseudo_video_reference

from .harness import HAS_CUDA, QUICK, run

try:
    import cv2
except ImportError:
    cv2 = None

CASES = {
    "blur_high": lambda T: schedules.linear_blur(T, 3.0, "high"),
    "blur_first": lambda T: schedules.linear_blur(T, 3.0, "first"),
    "noise_high": lambda T: schedules.ddpm_noise(T, "linear", "high"),
    "noise_first": lambda T: schedules.ddpm_noise(T, "linear", "first"),
    "blur_noise": lambda T: schedules.combine(schedules.linear_blur(T, 3.0), schedules.ddpm_noise(T)),
}
FRAMES = (4,) if QUICK else (4, 8, 18)
SHAPE = (4, 3, 16, 16) if QUICK else (128, 3, 32, 32)
GPU_SHAPE = (1024, 3, 32, 32)
PROVIDERS = ["reference", "compiled", "opencv", "cpp"] + (["triton"] if HAS_CUDA else [])
OPENCV_CASES = ("blur_high", "blur_first") if cv2 is not None else ()


def _randn_reference(x, p):
    B, C, H, W = x.shape
    noise = torch.randn(B, len(p["blur_sigma"]), C, H, W, device=x.device) if any(p["noise_std"]) else None
    return pseudo_video_reference(x, p["blur_sigma"], p["noise_std"], p["signal_scale"], p["order"] == "first", 0,
                                  noise, 3.0)


def _opencv(images, p):
    """OpenCV's GaussianBlur per image and frame (HWC layout prepared outside the timing)."""
    out = []
    for t, sigma in enumerate(p["blur_sigma"][:-1]):
        r = min(int(-(-3.0 * sigma // 1)), min(images.shape[1:3]) - 1)
        frames = []
        for k, img in enumerate(images):
            src = out[-1][k] if p["order"] == "first" and out else img
            frames.append(cv2.GaussianBlur(src, (2 * r + 1, 2 * r + 1), sigma, borderType=cv2.BORDER_REFLECT_101)
                          if r > 0 else src)
        out.append(frames)
    return out


@pytest.mark.parametrize("case, T, provider",
                         [(c, T, p) for c in CASES for T in FRAMES for p in PROVIDERS
                          if p != "opencv" or c in OPENCV_CASES])
def bench_pseudo_video(benchmark, case, T, provider):
    p = CASES[case](T)
    device = "cuda" if provider == "triton" else "cpu"
    B, C, H, W = GPU_SHAPE if provider == "triton" and not QUICK else SHAPE
    x = torch.rand(B, C, H, W, device=device)
    if provider == "compiled":
        # a fresh static compile per case: dynamo's recompiles would otherwise turn shapes
        # dynamic (minutes of sympy) and, past its cache limit, fall back to eager silently
        torch._dynamo.reset()
        compiled = torch.compile(_randn_reference, dynamic=False)
    fn = {
        "reference": lambda: _randn_reference(x, p),
        "compiled": lambda: compiled(x, p),
        "cpp": lambda: pseudo_video(x, **p, seed=1, backend="cpp"),
        "triton": lambda: pseudo_video(x, **p, seed=1, backend="triton"),
    }.get(provider)
    if provider == "opencv":
        images = x.permute(0, 2, 3, 1).contiguous().numpy()
        fn = lambda: _opencv(images, p)  # noqa: E731
    bytes_moved = x.numel() * 4 * (1 + T)  # read the images once, write T frames
    run(benchmark, fn, "pseudo_video", f"{case}/T={T}/{B}x{C}x{H}x{W}", provider, bytes_moved, device,
        rounds=3 if provider == "reference" else None)
