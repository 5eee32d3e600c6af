"""vq_lookup: cdist + argmin + gather (reference), torch.compile of the matmul-expansion form
(compiled), the eager matmul expansion, FAISS's exact IndexFlatL2 k=1 search, cpp, triton.

extra_info carries the GEMM roofline (2*N*K*D flops at the machine's fp32 matmul rate, the
floor of every exact method) and the growth of the process's peak resident memory during one
call (Linux VmHWM, reset through /proc/self/clear_refs). The large-N memory check, where the
reference needs a 2.1 GB distance matrix, is benchmarks/vq_memory.py (one subprocess each).
"""
from __future__ import annotations

import pytest
import torch

from pvkernels import vq_lookup

from .harness import HAS_CUDA, QUICK, run

try:
    import faiss
except ImportError:
    faiss = None

GEMM_FLOPS = 340e9  # fp32 matmul rate of the 2-core CPU here (DESIGN.md); a floor for CPU rows
SHAPES = [(512, 64, 16)] if QUICK else [(16384, K, D) for K in (1024, 8192) for D in (64, 256)]
PROVIDERS = (["reference", "compiled", "matmul"] + (["faiss"] if faiss is not None else []) + ["cpp"]
             + (["triton"] if HAS_CUDA else []))


def cdist_argmin(z, e):
    idx = torch.cdist(z, e).argmin(1)
    return idx, e[idx]


def matmul_expansion(z, e):
    idx = (e.pow(2).sum(1) - 2.0 * z @ e.T).argmin(1)
    return idx, e[idx]


_compiled = torch.compile(matmul_expansion, dynamic=False)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_growth_mb(fn) -> float | None:
    """Growth of the peak resident set during one call of fn, in MB (None where unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


@pytest.mark.parametrize("shape, provider", [(s, p) for s in SHAPES for p in PROVIDERS])
def bench_vq_lookup(benchmark, shape, provider):
    N, K, D = shape
    device = "cuda" if provider == "triton" else "cpu"
    z = torch.randn(N, D, device=device)
    e = torch.randn(K, D, device=device)
    if provider == "faiss":
        index = faiss.IndexFlatL2(D)
        index.add(e.numpy())
        zn = z.numpy()
        fn = lambda: index.search(zn, 1)  # noqa: E731  (k=1: distances and ids; no gather)
    else:
        fn = {
            "reference": lambda: cdist_argmin(z, e),
            "compiled": lambda: _compiled(z, e),
            "matmul": lambda: matmul_expansion(z, e),
            "cpp": lambda: vq_lookup(z, e, backend="cpp"),
            "triton": lambda: vq_lookup(z, e, backend="triton"),
        }[provider]
    fn()  # warm-up (compiles) before the memory reading
    flops = 2.0 * N * K * D
    extra = {"gemm_roofline_ms": flops / GEMM_FLOPS * 1e3 if device == "cpu" else None,
             "peak_rss_growth_MB": peak_rss_growth_mb(fn) if device == "cpu" else None,
             "distance_matrix_MB": N * K * 4 / 2**20}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        extra["peak_cuda_growth_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    bytes_moved = (N * D + K * D) * 4 + N * (D * 4 + 8)  # read z and the codebook, write zq and idx
    run(benchmark, fn, "vq_lookup", f"N={N}/K={K}/D={D}", provider, bytes_moved, device, flops=flops,
        rounds=3 if provider in ("reference", "matmul") else None, extra=extra)
