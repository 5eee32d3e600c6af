"""vq_lookup: cdist + argmin + gather (reference), the eager matmul expansion (matmul), torch.compile
of it (compiled), FAISS's exact IndexFlatL2 k=1 search (CPU), cpp (CPU), triton (CUDA); and the k
nearest codes (``k=8``, ``k=32``): the same forms with ``topk(k, largest=False)`` in place of the
argmin, FAISS's k search.

Every provider runs on ``DEVICE`` at the same shape and dtype, with TF32 off (TF32 would change
the argmin). extra_info carries the GEMM floor (2*N*K*D flops at the device's matmul rate in
that dtype, measured in this session: every exact method pays it), the fraction of that rate
reached, and the growth of the peak memory during one call (CPU: Linux VmHWM, reset through
/proc/self/clear_refs; CUDA: the caching allocator's peak). The large-N memory check, where
the reference needs a 2.1 GB distance matrix, is benchmarks/memory.py.
"""
from __future__ import annotations

import pytest
import torch

from pvkernels import vq_lookup

from .harness import DEVICE, QUICK, case_key, gemm_rate, run, tf32_off

try:
    import faiss
except ImportError:
    faiss = None


def shapes(device: str = DEVICE, quick: bool = QUICK) -> list:
    """(N, K, D, dtype) cases of the nearest code."""
    if quick:
        return [(512, 64, 16, "float32")]
    if device == "cuda":
        return [(65536, 8192, D, dt) for D in (64, 256) for dt in ("float32", "bfloat16")]
    return [(16384, K, D, "float32") for K in (1024, 8192) for D in (64, 256)]


def topk_shapes(device: str = DEVICE, quick: bool = QUICK) -> list:
    """(N, K, D, dtype, k) cases of the k nearest codes."""
    if quick:
        return [(512, 64, 16, "float32", 8)]
    if device == "cuda":
        return [(65536, 8192, 64, dt, k) for dt in ("float32", "bfloat16") for k in (8, 32)]
    return [(16384, K, 64, "float32", k) for K in (1024, 8192) for k in (8, 32)]


def providers(dtype: str, device: str = DEVICE) -> list:
    names = ["reference", "matmul", "compiled"]
    if device == "cpu":
        return names + (["faiss"] if faiss is not None and dtype == "float32" else []) + ["cpp"]
    return names + ["triton"]


def cdist_argmin(z, e):
    idx = torch.cdist(z, e).argmin(1)
    return idx, e[idx]


def matmul_expansion(z, e):
    idx = (e.pow(2).sum(1) - 2.0 * z @ e.T).argmin(1)
    return idx, e[idx]


def cdist_topk(z, e, k):
    idx = torch.cdist(z, e).topk(k, dim=1, largest=False).indices
    return idx, e[idx]


def matmul_topk(z, e, k):
    idx = (e.pow(2).sum(1) - 2.0 * z @ e.T).topk(k, dim=1, largest=False).indices
    return idx, e[idx]


_compiled = torch.compile(matmul_expansion, dynamic=False)
_compiled_topk = torch.compile(matmul_topk, dynamic=False)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_growth_mb(fn, device: str = DEVICE) -> float | None:
    """Growth of the peak resident set (CPU) or allocated memory (CUDA) during one call, in MB."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def provider_fn(provider, z, e, k=1):
    if provider == "faiss":
        index = faiss.IndexFlatL2(z.shape[1])
        index.add(e.numpy())
        zn = z.numpy()
        return lambda: index.search(zn, k)  # distances and ids; no gather
    if k > 1:
        return {
            "reference": lambda: cdist_topk(z, e, k),
            "matmul": lambda: matmul_topk(z, e, k),
            "compiled": lambda: _compiled_topk(z, e, k),
        }.get(provider, lambda: vq_lookup(z, e, backend=provider, k=k))
    return {
        "reference": lambda: cdist_argmin(z, e),
        "matmul": lambda: matmul_expansion(z, e),
        "compiled": lambda: _compiled(z, e),
    }.get(provider, lambda: vq_lookup(z, e, backend=provider))


@pytest.mark.parametrize("shape, provider", [(s + (1,), p) for s in shapes() for p in providers(s[3])]
                         + [(s, p) for s in topk_shapes() for p in providers(s[3])])
def bench_vq_lookup(benchmark, shape, provider):
    N, K, D, dtype, k = shape
    dt = getattr(torch, dtype)
    z = torch.randn(N, D, device=DEVICE, dtype=dt)
    e = torch.randn(K, D, device=DEVICE, dtype=dt)
    fn = provider_fn(provider, z, e, k)
    with tf32_off():
        try:
            fn()  # warm-up (compiles) before the memory reading
        except RuntimeError as exc:  # e.g. cdist without a kernel for this dtype on this device
            pytest.skip(f"{provider} cannot run {dtype} on {DEVICE}: {str(exc).splitlines()[0]}")
        flops = 2.0 * N * K * D
        rate = gemm_rate(dt)
        extra = {"gemm_rate_GFLOP/s": rate / 1e9, "gemm_roofline_ms": flops / rate * 1e3,
                 "peak_memory_growth_MB": peak_memory_growth_mb(fn), "distance_matrix_MB": N * K * 4 / 2**20}
        size = z.element_size()
        bytes_moved = (N * D + K * D) * size + N * k * (D * size + 8)  # read z and the codebook, write zq and idx
        top = () if k == 1 else (f"k={k}",)  # the k = 1 cases keep their keys
        run(benchmark, fn, "vq_lookup", case_key(f"N={N}", f"K={K}", f"D={D}", dtype, *top), provider, bytes_moved,
            flops=flops, extra=extra)
