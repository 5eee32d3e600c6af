"""Where a SpaceTimeBlock forward+backward spends its time, per attention backend.

    python -m benchmarks.block_profile

For the block shapes of bench_attention.py: the median wall time of 10 calls and, from
torch.profiler over 5 more, the self time of the GEMM ops (mm, addmm, bmm: the linear layers,
plus the reference attention's own bmm) and of the attention ops. The GEMMs are the same for
every backend, so they bound what faster attention kernels can gain on the whole block:
reference time / (cpp time - cpp attention time) is the block's speedup with free attention.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

import pvkernels

from .bench_attention import block_shapes


def measure(shape, backend):
    B, T, S, dim, heads = shape
    torch.manual_seed(0)
    block = pvkernels.nn.SpaceTimeBlock(dim, heads, backend=backend)
    x = torch.randn(B, T, S, dim, requires_grad=True)
    params = [x] + list(block.parameters())

    def call():
        return torch.autograd.grad(block(x).square().mean(), params)

    for _ in range(3):
        call()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            call()
    events = prof.key_averages()
    per_call = lambda keep: sum(e.self_cpu_time_total for e in events if keep(e.key)) / 5 / 1e3  # noqa: E731
    gemm = per_call(lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm"))
    attention = per_call(lambda k: "attention" in k or "softmax" in k)
    return sorted(times)[5] * 1e3, gemm, attention


def main():
    print(f"{'block (B, T, S, dim, heads)':<28}{'backend':<11}{'ms':>7}{'GEMM ms':>9}{'attn ms':>9}")
    for shape in block_shapes():
        rows = {backend: measure(shape, backend) for backend in ("reference", "cpp")}
        for backend, (ms, gemm, attention) in rows.items():
            print(f"{str(shape):<28}{backend:<11}{ms:>7.1f}{gemm:>9.1f}{attention:>9.1f}")
        ref_ms = rows["reference"][0]
        cpp_ms, _, cpp_attention = rows["cpp"]
        print(f"  speedup {ref_ms / cpp_ms:.2f}x; with attention free it would be at most "
              f"{ref_ms / (cpp_ms - cpp_attention):.2f}x")


if __name__ == "__main__":
    main()
