"""The cpp kernels against the eager reference on the issue-10 shapes, for whatever ISA the
loaded build targets (``PVKERNELS_MARCH=-march=x86-64-v3 PVKERNELS_BUILD_DIR=$(mktemp -d)`` for
an AVX2 build): reference and cpp alternate round by round, so each ratio is side by side.

    flock -x /tmp/pvk-cpu.lock python -m benchmarks.cpu_isa [--rounds 7] [--json out.json]

``--classes`` times the shape classes of the crossovers in pvkernels/_backend.py instead
(attention forward and forward+backward per dtype and sequence length, VQ per codebook shape,
pseudo videos per kind); ``--long-spatial`` fp32 spatial attention past L2 (n 256-4096, head dims
40-128, forward and forward+backward: the blocked kernel's crossovers); ``--cpu-time`` measures one thread's CPU time, which other jobs on a
shared machine disturb far less than wall time (use it for the crossovers' signs, not for tables).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import pvkernels
from pvkernels import _backend, schedules
from pvkernels.ops.attention import attention_reference
from pvkernels.ops.pseudo_video import pseudo_video_reference


def _pseudo_video_cases():
    x = torch.rand(128, 3, 32, 32)
    for name, p in (("blur high", schedules.linear_blur(18, 3.0, "high")),
                    ("blur first", schedules.linear_blur(18, 3.0, "first")),
                    ("noise high", schedules.ddpm_noise(18, "linear", "high")),
                    ("noise first", schedules.ddpm_noise(18, "linear", "first"))):
        def reference(p=p):  # eps from torch.randn, as benchmarks/bench_pseudo_video.py
            noise = torch.randn(128, 18, 3, 32, 32) if any(p["noise_std"]) else None
            return pseudo_video_reference(x, p["blur_sigma"], p["noise_std"], p["signal_scale"],
                                          p["order"] == "first", 0, noise, 3.0)
        yield f"pseudo_video {name}, 128x3x32x32, T=18", reference, \
            lambda p=p: pvkernels.pseudo_video(x, **p, seed=1, backend="cpp")


def _vq_cases():
    z, e = torch.randn(16384, 64), torch.randn(8192, 64)

    def reference():
        idx = torch.cdist(z, e).argmin(1)
        return idx, e[idx]
    yield "vq_lookup N=16384 K=8192 D=64", reference, lambda: pvkernels.vq_lookup(z, e, backend="cpp")


def _attention_cases():
    q, k, v = torch.randn(4, 18, 256, 3, 8, 32).unbind(3)
    yield ("temporal_attention fwd 4x18x256x8x32", lambda: attention_reference(q, k, v, None, True, True),
           lambda: pvkernels.temporal_attention(q, k, v, causal=True, backend="cpp"))
    yield ("spatial_attention fwd 4x18x256x8x32", lambda: attention_reference(q, k, v, None, False, False),
           lambda: pvkernels.spatial_attention(q, k, v, backend="cpp"))


def _attention_pair(qkv: torch.Tensor, temporal: bool, label: str, backward: bool):
    """The reference and cpp cases of attention on q, k, v = qkv.unbind(3) (temporal: causal):
    forward, and forward + backward into the packed qkv when ``backward``."""
    q, k, v = qkv.unbind(3)
    fn = pvkernels.temporal_attention if temporal else pvkernels.spatial_attention
    kw = {"causal": True} if temporal else {}
    yield (f"{label.format(mode='fwd')}", lambda: attention_reference(q, k, v, None, temporal, temporal),
           lambda: fn(q, k, v, backend="cpp", **kw))
    if backward:
        g, leaf = torch.randn(*q.shape), qkv.clone().requires_grad_(True)

        def grad(f):
            with torch.enable_grad():
                return torch.autograd.grad(f(*leaf.unbind(3)), leaf, g)
        yield (f"{label.format(mode='fwd+bwd')}",
               lambda: grad(lambda q, k, v: attention_reference(q, k, v, None, temporal, temporal)),
               lambda: grad(lambda q, k, v: fn(q, k, v, backend="cpp", **kw)))


def _class_cases():
    for kind in ("temporal", "spatial"):
        for n in ((8, 18, 32, 64) if kind == "temporal" else (8, 16, 64, 256)):
            shape = (4, n, 32, 8, 32) if kind == "temporal" else (4, 8, n, 8, 32)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                qkv = torch.randn(*shape[:3], 3, *shape[3:], dtype=dtype)
                yield from _attention_pair(qkv, kind == "temporal", f"{kind} {{mode}} N={n} {str(dtype)[6:]}",
                                           dtype == torch.float32)
    for K, D in ((1024, 64), (1024, 256), (8192, 64), (8192, 256)):
        z, e = torch.randn(4096, D), torch.randn(K, D)
        yield f"vq_lookup K={K} D={D}", lambda z=z, e=e: torch.cdist(z, e).argmin(1), \
            lambda z=z, e=e: pvkernels.vq_lookup(z, e, backend="cpp")
    x = torch.rand(32, 3, 32, 32)
    for name, p in (("blur", schedules.linear_blur(8, 3.0)), ("noise", schedules.ddpm_noise(8)),
                    ("blur+noise", schedules.combine(schedules.linear_blur(8, 3.0), schedules.ddpm_noise(8)))):
        def reference(p=p):
            noise = torch.randn(32, 8, 3, 32, 32) if any(p["noise_std"]) else None
            return pseudo_video_reference(x, p["blur_sigma"], p["noise_std"], p["signal_scale"], False, 0, noise, 3.0)
        yield f"pseudo_video {name} T=8", reference, lambda p=p: pvkernels.pseudo_video(x, **p, seed=1, backend="cpp")


def _long_spatial_cases():
    for D in (40, 64, 72, 128):
        for n in (256, 512, 1024, 2048, 4096):
            qkv = torch.randn(1, max(1, 2048 // n), n, 3, 8, D)  # views of a packed projection
            yield from _attention_pair(qkv, False, f"spatial {{mode}} {max(1, 2048 // n)}x{n}x8x{D} float32", True)


_clock = time.perf_counter


def _time(fn) -> float:
    start = _clock()
    fn()
    return _clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--classes", action="store_true", help="the crossovers' shape classes")
    parser.add_argument("--long-spatial", action="store_true", help="fp32 spatial attention, n 256-4096")
    parser.add_argument("--cpu-time", action="store_true", help="one thread, CPU time")
    args = parser.parse_args()
    if args.cpu_time:
        global _clock
        _clock = time.process_time
        torch.set_num_threads(1)
    if not _backend.cpp_available():
        raise SystemExit("the C++ extension is unavailable")
    rows = []
    isa = _backend.cpp_isa()
    march = os.environ.get("PVKERNELS_MARCH", "-march=native")
    print(f"isa: {isa}  march: {march}  threads: {torch.get_num_threads()}")
    print(f"{'case':<48}{'reference ms':>13}{'cpp ms':>9}{'x ref':>8}")
    with torch.no_grad():
        if args.long_spatial:
            cases = _long_spatial_cases()
        elif args.classes:
            cases = _class_cases()
        else:
            cases = (*_pseudo_video_cases(), *_vq_cases(), *_attention_cases())
        for case, reference, cpp in cases:
            reference(), cpp()  # warm-up
            ref_t, cpp_t = [], []
            for _ in range(args.rounds):
                ref_t.append(_time(reference))
                cpp_t.append(_time(cpp))
            r, c = statistics.median(ref_t) * 1e3, statistics.median(cpp_t) * 1e3
            rows.append({"case": case, "reference_ms": r, "cpp_ms": c, "speedup": r / c})
            print(f"{case:<48}{r:>13.2f}{c:>9.2f}{r / c:>8.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"isa": isa, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
