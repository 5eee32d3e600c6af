"""Every Triton kernel variant the dispatch launches on a GPU, compiled for sm_80 and sm_90 on
this CPU-only machine: no compile error, no register spill (stack bytes), and the resources
of each variant written to benchmarks/results/local/triton-resources-<triton version>.json (not
tracked by git). ``PVKERNELS_BENCH_SAVE_REFERENCE=1`` puts them in the committed reference,
benchmarks/results/triton-resources.json, which holds one set of rows per tested triton (3.6 and
3.8, the range setup.py claims): each run replaces its own version's rows only.

The launches come from the launchers' own planning functions (``_attention_fwd_launches``,
``_attention_bwd_launches``, ``_vq_lookup_launches``, ``_pseudo_video_launches``,
``_lfq_entropy_fwd_launches``, ``_lfq_entropy_bwd_launches``) called on
meta tensors, with the GPU settings (no interpreter), over the shapes below: every block class
of each launcher's config function plus the benchmark and test shapes. A variant is one
(kernel, pointer dtypes, constexprs, warps, stages); flags such as causal / bias / noise are
runtime arguments of the kernels, so they are one binary each; an autotuned launch counts
every config it may pick. Compiling takes seconds per
variant on a cold triton cache (~/.triton/cache or TRITON_CACHE_DIR) and milliseconds once
cached: the sweep runs in ``os.cpu_count()`` worker processes, once per pytest run.

``python -m tests.test_triton_compile [JSON]`` prints the README table (per triton) from the reference.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "triton-resources.json"  # the committed reference
LOCAL_RESULTS_DIR = ROOT / "benchmarks" / "results" / "local"  # every other run's (gitignored)
SAVE_REFERENCE = "PVKERNELS_BENCH_SAVE_REFERENCE"  # as benchmarks/harness.py
TARGETS = (80, 90)
KERNELS = ("_attention_fwd_kernel", "_attention_bwd_fused_kernel", "_attention_bwd_delta_kernel",
           "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel", "_vq_lookup_fwd_kernel", "_vq_topk_fwd_kernel",
           "_pseudo_video_kernel", "_lfq_entropy_fwd_kernel", "_lfq_entropy_bwd_kernel")
# sequence lengths and head dims on both sides of every block-class boundary of attention's
# _TILES, which include the benchmark shapes (T = 8, 18; S = 64, 256, 1024; Dh = 32, 64) and
# the test shapes (N = 1 .. 150, Dh = 8 .. 128)
ATTENTION_N = (1, 7, 18, 33, 64, 65, 256, 1024)
ATTENTION_D = (8, 24, 40, 64, 100, 128)
VQ_D = (3, 16, 25, 33, 64, 65, 256)  # (N, K) = (65536, 8192), the GPU benchmark's
VQ_K = (1, 2, 32, 64)  # nearest codes per row: the argmin, and each class of top-k slots (vq._top_slots)
LFQ_D = tuple(range(1, 25))  # every bits per codebook the op takes (each half's tile class, odd halves)
# (B, C, H, W), schedule: the GPU benchmark (1024 x 3 x 32 x 32, T = 18), the CPU ones, the tests'
# odd sizes, and planes past one block (tiled, with the halo of sigma 3 and of sigma 8)
PSEUDO_VIDEO = [((1024, 3, 32, 32), 3.0), ((4, 3, 16, 16), 3.0), ((3, 2, 17, 29), 3.0), ((2, 3, 5, 7), 3.0),
                ((2, 3, 64, 64), 3.0), ((1, 3, 70, 90), 3.0), ((2, 3, 256, 256), 3.0), ((2, 3, 256, 256), 8.0)]


def gpu_launches() -> list:
    """Every launch the triton backend plans for the shapes above (meta tensors, GPU settings)."""
    import torch

    from pvkernels import schedules
    from pvkernels.ops import attention, lfq, pseudo_video, vq

    meta = "meta"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    launches = []
    for N, D, dtype, temporal, packed in itertools.product(ATTENTION_N, ATTENTION_D, dtypes, (True, False),
                                                           (True, False)):
        B, A, H = 2, 3, 4
        shape = (B, N, A, H, D) if temporal else (B, A, N, H, D)
        # the views of a packed projection (heads packed: the head dim a constexpr), or of one whose
        # heads are 3 * Dh apart (the head dim read at run time; attention._head_dim_meta)
        qkv = torch.empty(*shape[:3], 3, H, D, device=meta, dtype=dtype)
        q, k, v = (qkv if packed else qkv.view(*shape[:3], H, 3, D).transpose(3, 4)).unbind(3)
        out = torch.empty(shape, device=meta, dtype=dtype)
        lse = torch.empty(shape[:4], device=meta)
        for causal, bias_state in itertools.product((False, True) if temporal else (False,), ("none", "fixed", "grad")):
            bias = None if bias_state == "none" else torch.empty(H, N, N, device=meta, dtype=dtype)
            dbias = torch.empty(H, N, N, device=meta)
            launches += attention._attention_fwd_launches(q, k, v, bias, out, lse, temporal, causal)
            launches += attention._attention_bwd_launches(out, q, k, v, bias, out, lse, lse, out, out, out, dbias,
                                                          temporal, causal, bias_state == "grad")
    for D, dtype, cosine, k in itertools.product(VQ_D, dtypes, (False, True), VQ_K):
        z = torch.empty(65536, D, device=meta, dtype=dtype)
        codebook = torch.empty(8192, D, device=meta, dtype=dtype)
        dot_fp32 = cosine or dtype == torch.float32
        e = torch.empty(8192, D, device=meta) if dot_fp32 else codebook
        top = () if k == 1 else (k,)
        launches += vq._vq_lookup_launches(z, codebook, e, torch.empty(8192, device=meta),
                                           torch.empty(65536, *top, dtype=torch.int64, device=meta),
                                           torch.empty(65536, *top, D, device=meta, dtype=dtype), dot_fp32, k)
    for ((B, C, H, W), sigma), dtype, order in itertools.product(PSEUDO_VIDEO, dtypes, ("high", "first")):
        x = torch.empty(B, C, H, W, device=meta, dtype=dtype)
        p = schedules.combine(schedules.linear_blur(18, sigma, order), schedules.ddpm_noise(18, "linear", order))
        out = torch.empty(B, 18, C, H, W, device=meta, dtype=dtype)
        launches += pseudo_video._pseudo_video_launches(x, out, None, p["blur_sigma"], p["noise_std"],
                                                        p["signal_scale"], order == "first", 1, 3.0)
    for d, grad_avg in itertools.product(LFQ_D, (True, False)):
        rows, codebooks = 16384, 2
        lqp = torch.empty(rows, d, device=meta)
        w = torch.empty(rows, device=meta)
        launches += lfq._lfq_entropy_fwd_launches(lqp, lqp, w)
        launches += lfq._lfq_entropy_bwd_launches(lqp, lqp, w, w, torch.empty(codebooks, 2 ** d, device=meta)
                                                  if grad_avg else None, lqp, lqp)
    return [one for launch in launches for one in _configs_of(launch)]


def _configs_of(launch) -> list:
    """An autotuned launch is every one of its configs (the GPU may pick any)."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(launch.kernel, Autotuner):
        return [launch]
    return [launch._replace(kernel=launch.kernel.fn,
                            meta=dict(launch.meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
            for c in launch.kernel.configs]


def _keywords(launch) -> dict:
    """What a launch passes by name: its runtime keyword arguments and its meta."""
    return {**launch.kwargs, **launch.meta}


def _worker(shard: int, n_shards: int) -> None:
    """Compiles this shard's variants (both targets) and prints their rows as JSON."""
    sys.path.insert(0, str(ROOT))
    from tests.triton_resources import compile_variant, describe, variant_key

    variants = {}
    for launch in gpu_launches():
        variants.setdefault(variant_key(launch.kernel, launch.args, _keywords(launch)), launch)
    rows = []
    for i, key in enumerate(sorted(variants)):
        if i % n_shards != shard:
            continue
        launch = variants[key]
        for arch in TARGETS:
            row = compile_variant(launch.kernel, launch.args, _keywords(launch), arch)
            row["variant"] = describe(launch.kernel, launch.args, _keywords(launch))
            rows.append(row)
    json.dump(rows, sys.stdout)


def compile_all(n_shards: int | None = None) -> list:
    """Rows of every variant x target, from ``n_shards`` worker processes without the interpreter."""
    n_shards = n_shards or max(1, min(16, os.cpu_count() or 1))  # 16: the GPU machine's cores
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PVKERNELS_NO_CPP"] = "1"  # the workers only plan launches: no C++ extension needed
    procs = [subprocess.Popen([sys.executable, "-c", f"from tests.test_triton_compile import _worker; "
                               f"_worker({i}, {n_shards})"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n_shards)]
    rows = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"compile worker failed ({p.returncode}):\n{err[-4000:]}")
        rows += json.loads(out)
    return sorted(rows, key=lambda r: (KERNELS.index(r["kernel"]), r["variant"], r["target"]))


def write_results(rows: list) -> Path:
    """This run's rows, tagged with the triton that compiled them, into the local file, or with
    PVKERNELS_BENCH_SAVE_REFERENCE=1 into the reference in place of that version's earlier rows."""
    import triton

    rows = [dict(r, triton=triton.__version__) for r in rows]
    if os.environ.get(SAVE_REFERENCE) == "1":
        path = RESULTS
        if path.exists():
            rows = [r for r in json.loads(path.read_text())["rows"] if r.get("triton") != triton.__version__] + rows
    else:
        path = LOCAL_RESULTS_DIR / f"triton-resources-{triton.__version__}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
    versions = sorted({r["triton"] for r in rows}, key=lambda v: tuple(int(p) for p in v.split(".")[:3]))
    rows.sort(key=lambda r: (versions.index(r["triton"]), KERNELS.index(r["kernel"]), r["variant"], r["target"]))
    path.write_text(json.dumps({"triton": versions, "targets": [f"sm_{a}" for a in TARGETS], "rows": rows},
                               indent=1) + "\n")
    return path


def table(rows: list) -> str:
    """The README table: per triton, kernel and target, variants, register / shared ranges, spills, occupancy,
    variants with vector loads."""
    lines = ["| triton | kernel | target | variants | registers | dynamic shared (KB) | spills | occupancy (min-max) "
             "| vector loads |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for version in dict.fromkeys(r.get("triton", "?") for r in rows):
        for kernel in KERNELS:
            for arch in TARGETS:
                group = [r for r in rows if r.get("triton", "?") == version and r["kernel"] == kernel
                         and r["target"] == f"sm_{arch}" and "error" not in r]
                if not group:
                    continue
                regs = [r["registers"] for r in group]
                shared = [r["dynamic_shared"] / 1024 for r in group]
                occ = [r["occupancy"] for r in group]
                spills = sum(r["stack"] > 0 for r in group)
                vector = sum(r.get("vector_loads", 0) > 0 for r in group)
                lines.append(f"| {version} | `{kernel.strip('_')}` | sm_{arch} | {len(group)} | "
                             f"{min(regs)}-{max(regs)} | {min(shared):.0f}-{max(shared):.0f} | {spills} | "
                             f"{min(occ):.0%}-{max(occ):.0%} | {vector} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def resources():
    pytest.importorskip("triton")
    rows = compile_all()
    write_results(rows)
    return rows


def test_every_variant_compiles(resources):
    errors = [f"{r['kernel']} {r['variant']} {r['target']}: {r['error']}" for r in resources if "error" in r]
    assert not errors, "\n".join(errors)


# The measured exceptions (kernel, operand dtypes, constexprs the variant has): the most stack bytes
# allowed. fp32 dK/dV at head dim 65-128 sits at 255 registers with every tile, warp count, stage
# count and fp32-product mode tried (bf16x6: 8-248 B of stack, tf32x3: 0-24 B); with a bias it
# spills 8 B (two registers) for sm_80 with triton 3.8 (0 B with 3.6). The fp32 one-launch backward
# of a one-block sequence past head dim 64 (16 frames) or past 16 frames spills 8-248 B with triton
# 3.6 and 8-424 B with 3.8 (a bias: the most), yet on an H200 (triton 3.6, no bias) it ran 1.64x
# (1024x16x8x80) and 3.33x (8192x18x8x64) the spill-free three-kernel backward
# (benchmarks/attention_tiles.py; _TILES). With a bias only, 8-16 B: the H200-timed tiles of the
# fp32 forward of 17-32 frames on 2 warps and of the fp32 one-launch backward of 16 frames, the
# 16-bit one-launch backward of 32 frames at Dh 65-128, 16-bit dK/dV and fp32 dQ at Dh 33-64, with
# the head dim a constexpr: their spill-free stage or warp counts cost the variants without a bias
# registers, or spill with the head dim read at run time. The 16-bit forward of 17-32 frames on 2
# warps (H200 1.29x 4 warps, with the head dim read at run time) spills 40-72 B with a bias and the
# head dim at run time, none with it a constexpr. Anything else that spills, or more, fails, on
# either triton.
ALLOWED_SPILL = {("_attention_bwd_dkdv_kernel", "fp32", "BLOCK_D=128"): 8,
                 ("_attention_bwd_fused_kernel", "fp32", "BLOCK_D=128"): 352,
                 ("_attention_bwd_fused_kernel", "fp32", "BLOCK_M=32"): 424,
                 ("_attention_fwd_kernel", "fp32", "HAS_BIAS=1 BLOCK_M=32 BLOCK_N=16 w2"): 16,
                 ("_attention_bwd_fused_kernel", "fp32", "HAS_BIAS=1 BLOCK_M=16"): 8,
                 ("_attention_bwd_fused_kernel", "bf16 fp16", "HAS_BIAS=1 BLOCK_M=32 BLOCK_D=128"): 8,
                 ("_attention_bwd_dkdv_kernel", "bf16 fp16", "HAS_BIAS=1 BLOCK_M=32 BLOCK_D=64"): 8,
                 ("_attention_bwd_dq_kernel", "fp32", "HAS_BIAS=1 BLOCK_D=64 w8 s3"): 8,
                 ("_attention_fwd_kernel", "bf16 fp16", "HAS_BIAS=1 HEAD_DIM=0 BLOCK_M=32 BLOCK_D=64 w2"): 72}


def _allowed_stack(row) -> int:
    dtype, consts = row["variant"].split(" ", 1)
    return max([v for (k, d, c), v in ALLOWED_SPILL.items()
                if row["kernel"] == k and dtype in d.split() and set(c.split()) <= set(consts.split())], default=0)


def test_no_variant_spills(resources):
    spills = [f"{r['kernel']} {r['variant']} {r['target']}: {r['registers']} registers, {r['stack']} B stack"
              for r in resources if r.get("stack", 0) > _allowed_stack(r)]
    assert not spills, f"{len(spills)} of {len(resources)} variants spill:\n" + "\n".join(spills)


def test_packed_heads_load_vectors(resources):
    # the head dim a constexpr (heads packed: attention._head_dim_meta): every attention variant loads
    # its rows with vector instructions from head dim 16 on (at 8 a thread of 4-8 warps holds less than
    # a vector); the runtime head dim (heads not packed) is compiled too
    attention = [r for r in resources if r["kernel"].startswith("_attention") and "error" not in r]
    head_dims = [int(r["variant"].split("HEAD_DIM=")[1].split()[0]) for r in attention]
    scalar = [f"{r['kernel']} {r['variant']} {r['target']}" for r, d in zip(attention, head_dims)
              if d >= 16 and r["vector_loads"] == 0]
    assert not scalar, "\n".join(scalar)
    assert 0 in head_dims and max(head_dims) >= 16


def test_every_kernel_and_target_is_covered(resources):
    seen = {(r["kernel"], r["target"]) for r in resources}
    assert seen == {(k, f"sm_{a}") for k in KERNELS for a in TARGETS}
    for r in resources:
        if "error" not in r:
            assert r["blocks_per_sm"] >= 1, f"{r['kernel']} {r['variant']} {r['target']} cannot be resident"


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else RESULTS).read_text())["rows"]))
