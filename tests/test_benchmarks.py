"""The benchmark plumbing, GPU paths included, on the CPU: provider lists, case keys, speedups
that never cross devices, and the eager baselines computing what the op computes; where a run
writes its results."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import bench_attention, bench_pseudo_video, bench_vq, harness
from pvkernels.ops.attention import attention_reference
from pvkernels.ops.pseudo_video import pseudo_video_reference

from .utils import assert_close


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_provider_runs_on_the_case_device(device):
    fused = "cpp" if device == "cpu" else "triton"
    for case in bench_pseudo_video.CASES:
        names = bench_pseudo_video.providers(case, device)
        assert names[0] == "reference" and fused in names and "compiled" in names
        assert ("cpp" in names or "opencv" in names) == (device == "cpu")
        assert "triton" not in names or device == "cuda"
    for dtype in ("float32", "bfloat16"):
        names = bench_vq.providers(dtype, device)
        assert names[:3] == ["reference", "matmul", "compiled"] and names[-1] == fused
        assert "faiss" not in names or (device == "cpu" and dtype == "float32")
    names = bench_attention.providers(device)
    assert names[0] == "reference" and names[-1] == fused
    sdpa = {"sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex"}
    assert sdpa <= set(names) if device == "cuda" else not sdpa & set(names)


def test_gpu_shapes_of_issue_11():
    assert bench_pseudo_video.shape("cuda", quick=False) == (1024, 3, 32, 32)
    assert bench_pseudo_video.frames("cuda", quick=False) == (18,)
    temporal = bench_attention.shapes("temporal", "cuda", quick=False)
    assert (32, 18, 256, 8, 64) in temporal
    assert any(B * S > 65535 for B, T, S, H, D in temporal)  # more sequences than a CUDA grid's y/z
    assert {S for _, _, S, _, _ in bench_attention.shapes("spatial", "cuda", quick=False)} == {256, 1024}
    assert bench_vq.shapes("cuda", quick=False) == [(65536, 8192, D, dt) for D in (64, 256)
                                                   for dt in ("float32", "bfloat16")]


def test_case_keys_carry_the_device_and_speedups_stay_on_one():
    cpu, cuda = harness.case_key("blur", "T=18", device="cpu"), harness.case_key("blur", "T=18", device="cuda")
    assert cpu == "blur/T=18/cpu" and cuda == "blur/T=18/cuda"
    saved = dict(harness._medians)
    try:
        harness._medians.clear()
        harness._medians.update({("op", cpu, "reference"): 8.0, ("op", cpu, "batched"): 2.0,
                                 ("op", cpu, "compiled"): 4.0, ("op", cuda, "reference"): 0.5})
        got = harness.speedups("op", cpu, "cpp", 1.0)
        assert got == {"speedup_vs_reference": 8.0, "speedup_vs_compiled": 4.0, "fastest_eager": "batched",
                       "speedup_vs_eager": 2.0}
        assert harness.speedups("op", cuda, "triton", 0.25) == {"speedup_vs_reference": 2.0,
                                                                "fastest_eager": "reference", "speedup_vs_eager": 2.0}
        assert "speedup_vs_eager" not in harness.speedups("op", cpu, "batched", 2.0)  # eager forms are baselines
    finally:
        harness._medians.clear()
        harness._medians.update(saved)


@pytest.mark.parametrize("case", ["blur_high", "noise_high", "blur_noise"])
def test_pseudo_video_batched_form_equals_the_oracle(case):
    p = bench_pseudo_video.CASES[case](6)
    x = torch.rand(3, 2, 17, 29)
    tables = bench_pseudo_video.batched_tables(p, 17, 29, 2, "cpu")
    torch.manual_seed(1)
    got = bench_pseudo_video.batched(x, tables)
    torch.manual_seed(1)
    eps = torch.randn(3, 5, 2, 17, 29)  # the batched form's one draw, frames 0 .. T-2
    noise = torch.cat([eps, torch.zeros(3, 1, 2, 17, 29)], 1)
    expected = pseudo_video_reference(x, p["blur_sigma"], p["noise_std"], p["signal_scale"], False, 0, noise, 3.0)
    assert_close(got, expected, torch.float32)


@pytest.mark.skipif(bench_pseudo_video.kornia is None, reason="kornia not installed")
def test_pseudo_video_kornia_form_is_the_same_blur():
    # kornia blurs every frame with the window of the largest radius (normalised over it): the
    # same Gaussian up to the tail mass past 3 sigma of the smaller frames
    p = bench_pseudo_video.CASES["blur_high"](5)
    x = torch.rand(3, 2, 17, 29)
    expected = pseudo_video_reference(x, p["blur_sigma"], p["noise_std"], p["signal_scale"], False, 0, None, 3.0)
    assert_close(bench_pseudo_video.kornia_blur(x, p), expected, torch.float32, rtol=0, atol=5e-3)


@pytest.mark.parametrize("provider", ["sdpa_math", "sdpa_flash"])
@pytest.mark.parametrize("kind", ["temporal", "spatial"])
def test_attention_providers_compute_the_reference(provider, kind):
    # the explicit SDPA backends (those the CPU has) with the reference's permutes
    q, k, v = torch.randn(2, 5, 7, 3, 2, 16).unbind(3)
    fn = bench_attention.attention_fn(kind, provider, 5 if kind == "temporal" else 7, "cpu")
    temporal = kind == "temporal"
    assert_close(fn(q, k, v), attention_reference(q, k, v, None, temporal, temporal), torch.float32)


def test_vq_baselines_agree():
    z, e = torch.randn(300, 16), torch.randn(50, 16)
    idx, zq = bench_vq.cdist_argmin(z, e)
    idx2, zq2 = bench_vq.matmul_expansion(z, e)
    assert torch.equal(idx, idx2) and torch.equal(zq, e[idx])


def test_harness_timing_and_the_in_context_preamble():
    # the flush writes a buffer past the last-level cache (twice it, on the CPU)
    llc = harness.last_level_cache_bytes()
    assert llc >= 2**20
    harness.flush_caches("cpu")
    assert harness._flush["cpu"].numel() * 4 >= 2 * llc
    # the in-context preamble (a foreign op, the flush) runs before every call and is not timed;
    # the time is the median call's (10, 400, 50 ms: 50, where the mean is 153 and the minimum 10)
    events, naps = [], iter([0.01, 0.4, 0.05])

    def preamble():
        events.append("preamble")
        harness.foreign_op(2**20, "cpu")
        harness.flush_caches("cpu")
        time.sleep(0.3)

    def call():
        events.append("call")
        time.sleep(next(naps))

    seconds, _ = harness.time_calls(call, 3, "cpu", before=preamble)
    assert events == ["preamble", "call"] * 3
    assert 0.05 <= seconds < 0.1, seconds
    # minor page faults are counted in the call only: a fresh 64 MB output (past glibc's largest
    # mmap threshold, so new pages every time) faults page by page on first touch (>= 32 even
    # with 2 MB pages); the same allocation in the preamble adds none to an empty call. In a
    # process of its own: earlier tests of a session can leave the allocator holding such blocks.
    code = ("import torch\nfrom benchmarks import harness\n"
            "fresh = lambda: torch.ones(2**24)\n"
            "print(harness.time_calls(fresh, 3, 'cpu')[1], harness.time_calls(lambda: None, 3, 'cpu', before=fresh)[1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    in_call, in_preamble = map(float, out.split())
    assert in_call >= 32 and in_preamble == 0, out


def test_copy_bandwidth_after_other_bytes(monkeypatch):
    # _best_time runs `before` untimed before every timed call (the first, a warm-up, has none)
    events = []

    def before():
        events.append("before")
        time.sleep(0.05)

    assert harness._best_time(lambda: events.append("call"), "cpu", repeats=3, before=before) < 0.05
    assert events == ["call"] + ["before", "call"] * 3
    # the roofline's copy after diffusers' bytes: a key of its own, and before every timed copy a
    # copy of other tensors that reads and writes `after` bytes in all
    befores = []

    def best_time(fn, device, repeats=5, before=None):
        befores.append(before)
        return 1.0

    monkeypatch.setattr(harness, "_best_time", best_time)
    monkeypatch.setattr(harness, "_bandwidth", {})
    assert harness.copy_bandwidth("cpu", working_set=2**20, after=2**22) == 2**20
    assert harness.copy_bandwidth("cpu", working_set=2**20) == 2**20
    assert befores[1] is None and befores[0].args[0].numel() * 4 * 2 == 2**22


def test_harness_times_cuda_calls_by_events(monkeypatch):
    # on CUDA a call is timed by events recorded around it on the stream, with one synchronisation
    # before and one after all the calls (none per call: the launching overlaps the work queued
    # before it, as triton.testing.do_bench); the preamble runs before each start event
    log, clock = [], iter(range(100))

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = next(clock)
            log.append("record")

        def elapsed_time(self, end):  # ms
            return (end.at - self.at) * 10.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    naps = iter([0, 3, 1])  # clock ticks in each call: 10, 40, 20 ms between its events

    def call():
        log.append("call")
        for _ in range(next(naps)):
            next(clock)

    seconds, faults = harness.time_calls(call, 3, "cuda", before=lambda: log.append("preamble"))
    assert log == ["sync"] + ["preamble", "record", "call", "record"] * 3 + ["sync"]
    assert seconds == 0.02 and faults == 0


# --- where a benchmark run writes (issue 17): never over the committed reference results ---

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def _in_git_checkout() -> bool:
    try:
        return _git("rev-parse", "--show-toplevel").strip() == str(ROOT)
    except (OSError, subprocess.CalledProcessError):
        return False


needs_git = pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout of pvkernels")


def _untracked_and_ignored(path: Path) -> bool:
    rel = str(path.relative_to(ROOT))
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", rel], cwd=ROOT).returncode == 0
    return ignored and not _git("ls-files", "--", rel).strip()


class _Terminal:
    def __init__(self):
        self.lines = []

    def write_line(self, line):
        self.lines.append(line)


@needs_git
@pytest.mark.parametrize("quick", [False, True])
def test_a_benchmark_run_writes_where_git_does_not_track(quick, monkeypatch):
    # the results of a full run (`pytest benchmarks/ --benchmark-only`, as the README says) and of a
    # quick one go to an ignored folder, never over benchmarks/results/*.json
    monkeypatch.delenv("PVKERNELS_BENCH_SAVE_REFERENCE", raising=False)
    monkeypatch.setattr(harness, "QUICK", quick)
    row = {"op": "zz_readme_check", "case": "c/cpu", "provider": "cpp", "median_ms": 1.0, "in_context_ms": 1.0,
           "GB/s": 1.0, "roofline_ms": 1.0}
    monkeypatch.setattr(harness, "_rows", [row])
    terminal = _Terminal()
    written = []
    real_write_text = Path.write_text

    def record(self, *args, **kw):
        written.append(self)
        return real_write_text(self, *args, **kw)

    monkeypatch.setattr(Path, "write_text", record)
    try:
        harness.write_results(terminal)
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    assert len(written) == 1 and written[0].name.startswith("zz_readme_check-")
    assert _untracked_and_ignored(written[0]), f"a run wrote {written[0]}, which git would track"
    assert any(str(written[0]) in line for line in terminal.lines)  # the run says where
    for op in ("pseudo_video", "vq_lookup", "temporal_attention", "spatial_attention", "space_time_block"):
        path = harness.result_path(op, quick=quick, device="cpu")
        assert _untracked_and_ignored(path), f"{path} is tracked or not ignored"


@needs_git
def test_the_reference_results_change_only_when_asked(monkeypatch):
    monkeypatch.setenv("PVKERNELS_BENCH_SAVE_REFERENCE", "1")
    reference = harness.result_path("pseudo_video", quick=False, device="cpu")
    assert reference == harness.RESULTS_DIR / "pseudo_video-cpu.json"
    assert _git("ls-files", "--", str(reference.relative_to(ROOT))).strip()  # the committed file
    assert harness.result_path("pseudo_video", quick=True, device="cpu").parent == harness.LOCAL_RESULTS_DIR
    monkeypatch.setenv("PVKERNELS_BENCH_SAVE_REFERENCE", "0")
    assert harness.result_path("pseudo_video", quick=False, device="cpu").parent == harness.LOCAL_RESULTS_DIR


@needs_git
@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None, reason="pytest-benchmark not installed")
def test_a_quick_benchmark_run_leaves_the_checkout_clean(tmp_path):
    # the README's benchmark command, quick, on one small file and the providers that compile nothing
    def status():
        return _git("status", "--porcelain", "--untracked-files=all", "--", "benchmarks/results")

    before = status()
    env = {k: v for k, v in os.environ.items() if k != "PVKERNELS_BENCH_SAVE_REFERENCE"}
    env.update(PVKERNELS_BENCH_QUICK="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_vq.py", "--benchmark-only", "-q",
                          "-p", "no:cacheprovider", "-k", "reference or cpp", "-o", "addopts="],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "vq_lookup-cpu-quick.json" in res.stdout
    assert status() == before
