"""The two cpp kernels for short sequences side by side: rows (attention_rows.cpp) and lanes
(attention_lanes.cpp), on the shapes where csrc/attention.cpp chooses between them.

``python -m benchmarks.attention_families [--mode fwd|fwd+bwd] [--rounds N] [SHAPE ...]``, SHAPE
``BxTxHxDh`` (temporal, (B, T, 1, H, Dh) contiguous, as diffusers' motion modules pass them): one
thread's CPU time, the kernels in alternating rounds (PVKERNELS_CPU_ATTENTION_KERNEL, read on every
call), the fastest round of each; prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import pvkernels

SHAPES = ["4096x16x8x40", "1024x16x8x80", "256x16x8x160", "1024x16x8x64", "2048x16x8x16", "2048x16x8x8",
          "1024x3x8x64", "1024x8x8x32", "1024x18x8x40", "512x32x8x64"]


def make_call(shape: str, mode: str):
    """One forward (no grad) or forward + backward of temporal attention at ``BxTxHxDh``."""
    B, T, H, D = (int(x) for x in shape.split("x"))
    q, k, v = (torch.randn(B, T, 1, H, D, requires_grad=mode != "fwd") for _ in range(3))
    grad = torch.randn(B, T, 1, H, D)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                pvkernels.temporal_attention(q, k, v, causal=False, backend="cpp")
        else:
            torch.autograd.grad(pvkernels.temporal_attention(q, k, v, causal=False, backend="cpp"), (q, k, v), grad)
    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shapes", nargs="*", default=SHAPES)
    ap.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    kernels = ("lanes", "rows")
    print(f"{args.mode}, one thread's CPU time, fastest of {args.rounds} alternating rounds, ms")
    print("| B x T x H x Dh | lanes | rows | lanes / rows |")
    print("|---|---:|---:|---:|")
    for shape in args.shapes:
        call = make_call(shape, args.mode)
        times = {kernel: [] for kernel in kernels}
        try:
            for rnd in range(args.rounds + 1):
                for kernel in kernels:
                    os.environ["PVKERNELS_CPU_ATTENTION_KERNEL"] = kernel
                    start = time.thread_time()
                    call()
                    if rnd > 0:  # the first round warms up
                        times[kernel].append(time.thread_time() - start)
        finally:
            os.environ.pop("PVKERNELS_CPU_ATTENTION_KERNEL", None)
        lanes, rows = (min(times[kernel]) * 1e3 for kernel in kernels)
        print(f"| {shape} | {lanes:.2f} | {rows:.2f} | {lanes / rows:.2f} |", flush=True)


if __name__ == "__main__":
    main()
