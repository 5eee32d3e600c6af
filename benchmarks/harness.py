"""Shared benchmark plumbing: device sync, copy bandwidth, side-by-side ratios, JSON results.

Providers of one (op, case) are timed in one pytest session in a fixed order (reference and
compiled reference first), so each kernel's speedup is a ratio measured side by side.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

QUICK = os.environ.get("PVKERNELS_BENCH_QUICK") == "1"
HAS_CUDA = torch.cuda.is_available()
RESULTS_DIR = Path(__file__).parent / "results"
_rows: list[dict] = []
_medians: dict = {}
_bandwidth: dict = {}


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Measured copy bandwidth (bytes read + written per second) of the device, once per session."""
    if device not in _bandwidth:
        n = (64 if QUICK else 256) * 2**20 // 4
        src = torch.rand(n, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        sync()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            sync()
            best = min(best, time.perf_counter() - start)
        _bandwidth[device] = 2 * src.numel() * 4 / best
    return _bandwidth[device]


def run(benchmark, fn, op: str, case: str, provider: str, bytes_moved: int, device: str = "cpu",
        flops: float | None = None, rounds: int | None = None, extra: dict | None = None) -> None:
    """Times fn (synchronised), records its median and puts GB/s, roofline and speedups in extra_info.

    ``extra``: more fields for extra_info and the saved rows (e.g. a GEMM roofline, peak memory).
    """

    def call():
        out = fn()
        sync()
        return out

    call()  # warm-up outside the timing (compiles, first-touch allocations)
    benchmark.pedantic(call, rounds=rounds or (3 if QUICK else 10), iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _medians[(op, case, provider)] = median
    bw = copy_bandwidth(device)
    info = {
        "op": op, "case": case, "provider": provider, "device": device, "median_ms": median * 1e3,
        "GB/s": bytes_moved / median / 1e9,
        "roofline_ms": bytes_moved / bw * 1e3,
        "fraction_of_copy_bandwidth": bytes_moved / median / bw,
        "copy_bandwidth_GB/s": bw / 1e9,
    }
    if flops:
        info["GFLOP/s"] = flops / median / 1e9
    for base in ("reference", "compiled"):
        if provider != base and (op, case, base) in _medians:
            info[f"speedup_vs_{base}"] = _medians[(op, case, base)] / median
    info.update(extra or {})
    benchmark.extra_info.update(info)
    _rows.append(info)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(terminal) -> None:
    if not _rows:
        return
    tag = ("cuda" if HAS_CUDA else "cpu") + ("-quick" if QUICK else "")
    RESULTS_DIR.mkdir(exist_ok=True)
    machine = torch.cuda.get_device_name() if HAS_CUDA else f"{_cpu_name()}, {torch.get_num_threads()} threads"
    for op in sorted({r["op"] for r in _rows}):
        rows = [r for r in _rows if r["op"] == op]
        path = RESULTS_DIR / f"{op}-{tag}.json"
        path.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=1))
        terminal.write_line(f"\n{op} on {machine} (saved to {path})")
        terminal.write_line(f"{'case':<36}{'provider':<12}{'ms':>9}{'GB/s':>8}{'roof ms':>9}"
                            f"{'x ref':>8}{'x compiled':>11}")
        for r in rows:
            terminal.write_line(
                f"{r['case']:<36}{r['provider']:<12}{r['median_ms']:>9.2f}{r['GB/s']:>8.1f}{r['roofline_ms']:>9.2f}"
                f"{r.get('speedup_vs_reference', float('nan')):>8.2f}{r.get('speedup_vs_compiled', float('nan')):>11.2f}")
