"""Shared benchmark plumbing: device, sync, copy bandwidth, hot-loop and in-context timings,
side-by-side ratios, JSON results.

Every provider of one case runs on one device (``DEVICE``: CUDA when present, else the CPU), at
the same shape and dtype, for the same number of rounds, and the device is part of the case
key, so a speedup is always a ratio of two timings measured side by side on one device.

Two figures per provider:
- hot loop: the op called back to back (inputs and the allocator's free lists warm);
- in context: before each call a foreign torch op that allocates and frees about the op's
  footprint (as the layers around it in a model do), then the caches are flushed by writing a
  buffer larger than the last-level cache (as ``triton.testing.do_bench`` does on a GPU); the
  call alone is timed. On the CPU the minor page faults per call are counted in both figures:
  a fresh output that the allocator took from the kernel is zeroed page by page on first touch.
On the CPU a call is timed by the clock; on CUDA by events around it on the stream, without a
synchronisation per call (``time_calls``; until 2026-12-04 by the clock with one, which counted
each call's Python launch overhead in full: the H200 results of that date).

Where a run's JSON goes: ``benchmarks/results/local/`` (gitignored), so a benchmark run never
changes a clone's tracked files. The committed reference results in ``benchmarks/results/``
change only on purpose: ``PVKERNELS_BENCH_SAVE_REFERENCE=1`` (never for a quick run).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

QUICK = os.environ.get("PVKERNELS_BENCH_QUICK") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
ROUNDS = 3 if QUICK else 10
RESULTS_DIR = Path(__file__).parent / "results"  # the committed reference results
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"  # every other run's results: gitignored
SAVE_REFERENCE = "PVKERNELS_BENCH_SAVE_REFERENCE"
# eager baselines a competent user would write; speedup_vs_eager is against the fastest of them
EAGER = ("reference", "batched", "kornia", "opencv", "matmul", "faiss") + tuple(
    f"sdpa_{b}" for b in ("flash", "efficient", "cudnn", "math"))
_rows: list[dict] = []
_medians: dict = {}
_bandwidth: dict = {}
_gemm_rate: dict = {}
_flush: dict = {}


def sync(device: str = DEVICE) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def case_key(*parts, device: str = DEVICE) -> str:
    """The case key of a result row: its parts and the device, so no ratio crosses devices."""
    return "/".join(str(p) for p in parts) + f"/{device}"


def copy_bandwidth(device: str = DEVICE, working_set: int | None = None, after: int = 0) -> float:
    """Measured copy bandwidth (bytes read + written per second) of the device, once per session
    and size: of memory (256 MB copied: a 512 MB working set, quick 128 MB), or of a copy of
    ``working_set`` bytes (source and destination, at most the memory copy's): the rate of data that
    size in whatever cache holds it. ``after``: bytes of other tensors copied before each timed copy
    (what the ops between two calls of a kernel move), so that it finds in the caches only what they
    left there; 0: the copy again and again, as a hot loop finds it."""
    size = (128 if QUICK else 512) * 2**20
    if working_set is not None:
        size = max(min(size, working_set), 2**16)
    key = (device, size, after)
    if key not in _bandwidth:
        src = torch.rand(size // 8, device=device)
        dst = torch.empty_like(src)
        between = None
        if after > 0:
            other = torch.rand(max(after // 8, 1), device=device)
            between = functools.partial(torch.empty_like(other).copy_, other)
        _bandwidth[key] = 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), device, before=between)
    return _bandwidth[key]


def gemm_rate(dtype: torch.dtype, device: str = DEVICE) -> float:
    """Measured matmul rate (flop/s) of the device in ``dtype`` (TF32 off), once per session."""
    key = (device, dtype)
    if key not in _gemm_rate:
        n = 512 if QUICK else (4096 if device == "cuda" else 2048)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        with tf32_off():
            _gemm_rate[key] = 2 * n**3 / _best_time(lambda: a @ b, device)
    return _gemm_rate[key]


class tf32_off:
    """Matmuls and convolutions in full fp32 (no TF32) inside the block."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _best_time(fn, device: str, repeats: int = 5, before=None) -> float:
    """The least seconds of ``repeats`` timed calls of fn (``before()`` untimed before each)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
            sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), 32 MB when unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def flush_caches(device: str = DEVICE) -> None:
    """Writes a buffer larger than the last-level cache (256 MB on a GPU, as do_bench)."""
    if device not in _flush:
        size = 256 * 2**20 if device == "cuda" else 2 * last_level_cache_bytes()
        _flush[device] = torch.empty(size // 4, device=device)
    _flush[device].fill_(1.0)


def foreign_op(nbytes: int, device: str = DEVICE) -> None:
    """A torch op of another library that allocates and frees about ``nbytes``, in three tensors."""
    a = torch.empty(max(nbytes // 12, 1), device=device).fill_(0.5)
    b = torch.exp(a)
    del a
    torch.tanh(b)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_calls(call, rounds: int, device: str = DEVICE, before=None) -> tuple[float, float]:
    """Median seconds of ``call`` over ``rounds`` timed calls (``before()`` untimed before each),
    and the median minor page faults per call (0 on CUDA). On the CPU a call is timed by the clock
    from a synchronised start to its end. On CUDA by events recorded on the stream around it, with
    no synchronisation between calls (as ``triton.testing.do_bench``): the GPU's time from the
    call's first work to its last, the Python that launches it overlapping the work queued before
    it (the previous call in a hot loop, ``before``'s flush in context) as in a model's step; a
    call whose launching outlasts that work shows it as the GPU's idle time between its kernels."""
    if device == "cuda":
        return _cuda_time_calls(call, rounds, before), 0.0
    times, faults = [], []
    for _ in range(rounds):
        if before is not None:
            before()
        sync(device)
        f0 = minor_faults()
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
        faults.append(minor_faults() - f0)
    return sorted(times)[rounds // 2], sorted(faults)[rounds // 2]


def _cuda_time_calls(call, rounds: int, before=None) -> float:
    """Median seconds between CUDA events recorded before and after each call, synchronised once."""
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    torch.cuda.synchronize()
    for start, end in marks:
        if before is not None:
            before()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) / 1e3 for start, end in marks)[rounds // 2]


def speedups(op: str, case: str, provider: str, median: float) -> dict:
    """speedup_vs_<base> for the reference, the compiled reference and the fastest eager form
    timed so far in this (op, case): same device by construction of the case key."""
    out = {}
    for base in ("reference", "compiled"):
        if provider != base and (op, case, base) in _medians:
            out[f"speedup_vs_{base}"] = _medians[(op, case, base)] / median
    eager = {p: t for (o, c, p), t in _medians.items() if o == op and c == case and p in EAGER and p != provider}
    if eager and provider not in EAGER:
        fastest = min(eager, key=eager.get)
        out["fastest_eager"] = fastest
        out["speedup_vs_eager"] = eager[fastest] / median
    return out


def run(benchmark, fn, op: str, case: str, provider: str, bytes_moved: int, device: str = DEVICE,
        flops: float | None = None, extra: dict | None = None, rounds: int = ROUNDS,
        in_context: bool = True) -> None:
    """Times fn in a hot loop (pytest-benchmark) and in context, records both, and puts GB/s,
    the roofline, page faults and speedups in extra_info.

    ``extra``: more fields for extra_info and the saved rows (e.g. a GEMM roofline, peak memory).
    ``rounds``: the same for every provider of a case; ``in_context=False`` for whole training
    steps of other people's models, which are their own context.
    """
    def call():
        out = fn()
        sync(device)
        return out

    call()  # warm-up outside the timing (compiles, first-touch allocations)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    # the hot loop: pytest-benchmark's clock on the CPU; on CUDA the calls' events (time_calls),
    # pytest-benchmark's synchronised wall clock (Python launch included) kept as wall_ms
    wall = benchmark.stats.stats.median
    if device == "cuda":
        median = time_calls(fn, rounds, device)[0]
    else:
        median, (_, hot_faults) = wall, time_calls(fn, 1, device)
    context, context_faults = (time_calls(fn, rounds, device,
                                          before=lambda: (foreign_op(bytes_moved, device), flush_caches(device)))
                               if in_context else (float("nan"), float("nan")))
    _medians[(op, case, provider)] = median
    _medians[(op, case + "/in_context", provider)] = context
    bw = copy_bandwidth(device)
    info = {
        "op": op, "case": case, "provider": provider, "device": device, "rounds": rounds,
        "median_ms": median * 1e3, "in_context_ms": context * 1e3,
        "GB/s": bytes_moved / median / 1e9,
        "roofline_ms": bytes_moved / bw * 1e3,
        "fraction_of_copy_bandwidth": bytes_moved / median / bw,
        "copy_bandwidth_GB/s": bw / 1e9,
    }
    if device == "cpu":
        info.update(minor_faults_hot=hot_faults, minor_faults_in_context=context_faults)
    else:
        info["wall_ms"] = wall * 1e3
    if flops:
        info["GFLOP/s"] = flops / median / 1e9
    info.update(speedups(op, case, provider, median))
    info.update({k + "_in_context": v for k, v in speedups(op, case + "/in_context", provider, context).items()
                 if k.startswith("speedup")})
    info.update(extra or {})
    if flops and "gemm_rate_GFLOP/s" in info:
        info["fraction_of_gemm_rate"] = info["GFLOP/s"] / info["gemm_rate_GFLOP/s"]
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


def machine() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    isa = [f for f in ("avx512f", "avx2") if f in Path("/proc/cpuinfo").read_text()] if Path("/proc/cpuinfo").exists() else []
    return f"{_cpu_name()} ({isa[0] if isa else 'no AVX'}), {torch.get_num_threads()} threads"


def saving_reference(quick: bool | None = None) -> bool:
    """Whether this run replaces the committed reference results: only when asked for with
    PVKERNELS_BENCH_SAVE_REFERENCE=1, and never for a quick run (tiny shapes are no reference)."""
    quick = QUICK if quick is None else quick
    return os.environ.get(SAVE_REFERENCE) == "1" and not quick


def result_path(op: str, quick: bool | None = None, device: str = DEVICE) -> Path:
    """The JSON file a run writes for ``op``: benchmarks/results/local/<op>-<device>[-quick].json
    (untracked), or the committed benchmarks/results/<op>-<device>.json when saving the reference."""
    quick = QUICK if quick is None else quick
    folder = RESULTS_DIR if saving_reference(quick) else LOCAL_RESULTS_DIR
    return folder / f"{op}-{device}{'-quick' if quick else ''}.json"


def write_results(terminal) -> None:
    if not _rows:
        return
    name = machine()
    for op in sorted({r["op"] for r in _rows}):
        rows = [r for r in _rows if r["op"] == op]
        path = result_path(op)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": name, "torch": torch.__version__, "rows": rows}, indent=1))
        terminal.write_line(f"\n{op} on {name} (saved to {path}); hot loop | in context (ms, x fastest eager)")
        terminal.write_line(f"{'case':<40}{'provider':<15}{'hot':>9}{'x eager':>8}{'context':>9}{'x eager':>8}"
                            f"{'GB/s':>8}{'roof ms':>9}")
        for r in rows:
            terminal.write_line(
                f"{r['case']:<40}{r['provider']:<15}{r['median_ms']:>9.2f}{r.get('speedup_vs_eager', float('nan')):>8.2f}"
                f"{r['in_context_ms']:>9.2f}{r.get('speedup_vs_eager_in_context', float('nan')):>8.2f}"
                f"{r['GB/s']:>8.1f}{r['roofline_ms']:>9.2f}")
    if saving_reference():
        terminal.write_line(f"\nthe committed reference results in {RESULTS_DIR} were replaced: commit them on purpose")
    else:
        terminal.write_line(f"\nresults in {LOCAL_RESULTS_DIR} (not tracked by git); {SAVE_REFERENCE}=1 (without "
                            f"PVKERNELS_BENCH_QUICK) replaces the committed reference in {RESULTS_DIR}")
