"""lfq_entropy, forward + backward of both entropy terms: the peer's dense softmax over all 2^d
codes (reference, what vector-quantize-pytorch's LFQ runs), torch.compile of it (compiled), cpp
(CPU), triton (CUDA).

Inputs are LFQ's at its defaults: x ~ N(0, 1) per bit, inv_temperature 100 (most codes of a token
are far below fp32's range, which the fused kernels skip a row of the code grid at a time) and, as
the worst case of the fused kernels, inv_temperature 0.1 (every code alive: 2^d exps per token).
extra_info carries tokens/s, the probability matrix the reference builds, the peak memory growth
of one call, and the fused kernels' compute floor: every code of every token pays one exp forward
and one backward (the rest of the per-code work is a few adds and selects), so the floor is
2 N 2^d exps at the device's exp rate, measured here as torch.exp on a cache-resident vector.
"""
from __future__ import annotations

import pytest
import torch

from pvkernels import lfq_entropy

from . import harness
from .bench_vq import peak_memory_growth_mb
from .harness import DEVICE, QUICK, _best_time, case_key, run

_exp_rate: dict = {}


def exp_rate(device: str = DEVICE) -> float:
    """torch.exp's rate (elements/s) on a 1 MB fp32 vector, once per session (all threads on a
    CPU: the vector is split between them)."""
    if device not in _exp_rate:
        x = torch.randn(1 << 18, device=device)
        y = torch.empty_like(x)
        _exp_rate[device] = x.numel() * 20 / _best_time(lambda: [torch.exp(x, out=y) for _ in range(20)], device)
    return _exp_rate[device]


def shapes(device: str = DEVICE, quick: bool = QUICK) -> list:
    """(N tokens, d bits, inv_temperature) cases."""
    if quick:
        return [(256, 8, 100.0)]
    if device == "cuda":
        return [(4096, 16, 100.0), (4096, 16, 0.1), (16384, 18, 100.0)]
    return [(1024, 16, 100.0), (1024, 16, 0.1), (4096, 12, 100.0), (16384, 18, 100.0)]


def providers(N: int, d: int, device: str = DEVICE) -> list:
    fused = ["cpp"] if device == "cpu" else ["triton"]
    dense_gb = N * 2 ** d * 4 / 2**30  # the dense form holds ~8 such matrices at once
    return (["reference", "compiled"] if dense_gb <= (4.0 if device == "cuda" else 0.5) else []) + fused


def dense_entropy(x, t):
    """The peer's block: the full N x 2^d softmax, its clamped entropy and the batch mean."""
    d = x.shape[-1]
    codes = ((torch.arange(2 ** d, device=x.device)[:, None] >> torch.arange(d - 1, -1, -1, device=x.device)) & 1)
    prob = (2 * t * torch.einsum("ncd,kd->nck", x, codes.float() * 2 - 1)).softmax(-1)
    per_sample = (-prob * prob.clamp(min=1e-5).log()).sum(-1).mean()
    return per_sample, prob.mean(0)


_compiled = torch.compile(dense_entropy, dynamic=False)


def step(entropy_fn, x, g_avg):
    x.grad = None
    per_sample, avg_prob = entropy_fn(x)
    (per_sample + (avg_prob * g_avg).sum()).backward()
    return x.grad


@pytest.mark.parametrize("shape, provider", [(s, p) for s in shapes() for p in providers(s[0], s[1])])
def bench_lfq_entropy(benchmark, shape, provider):
    N, d, t = shape
    x = torch.randn(N, 1, d, device=DEVICE, requires_grad=True)
    g_avg = torch.randn(1, 2 ** d, device=DEVICE)
    entropy_fn = {"reference": lambda x: dense_entropy(x, t), "compiled": lambda x: _compiled(x, t)}.get(
        provider, lambda x: lfq_entropy(x, t, backend=provider))
    fn = lambda: step(entropy_fn, x, g_avg)  # noqa: E731
    fn()
    codes = N * 2 ** d
    extra = {"dense_matrix_MB": codes * 4 / 2**20, "peak_memory_growth_MB": peak_memory_growth_mb(fn),
             "exp_rate_G/s": exp_rate() / 1e9, "compute_floor_ms": 2 * codes / exp_rate() * 1e3,
             "inv_temperature": t}
    run(benchmark, fn, "lfq_entropy", case_key(f"N={N}", f"d={d}", f"t={t}"), provider,
        bytes_moved=N * d * 4 * 3 + 2 ** d * 4 * 2, extra=extra)
    median_ms = benchmark.extra_info["median_ms"]
    after = {"tokens_per_s": N / (median_ms / 1e3), "fraction_of_compute_floor": extra["compute_floor_ms"] / median_ms}
    benchmark.extra_info.update(after)
    harness._rows[-1].update(after)
