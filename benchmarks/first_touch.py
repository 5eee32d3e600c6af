"""What first touch costs the cpp ops, and what changes it: each variant in a fresh process.

    python -m benchmarks.first_touch

For the cpp temporal attention forward (4x18x256x8x32, a 19 MB output) and the cpp pseudo
video (blur + noise, T=18, 128x3x32x32, a 27 MB output): the median time and minor page faults
of one call in a hot loop, in context (benchmarks/harness.py: a foreign op that allocates,
then a cache flush), and right after the op's eager reference, with the allocator settings:
- default: glibc malloc as torch uses it (large blocks mmapped, then reused or trimmed);
- thp: ``THP_MEM_ALLOC_ENABLE=1``, torch's own switch that aligns CPU allocations of 2 MB and
  more to 2 MB and madvises them MADV_HUGEPAGE (one fault per 2 MB instead of per 4 KB);
- no_trim: ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at 1 GB, so freed blocks
  stay mapped in the heap and are reused without faults.
Results go to benchmarks/results/local/first_touch-cpu.json (not tracked by git).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "default": {},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "no_trim": {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)},
}

CHILD = r"""
import json, sys, torch, pvkernels
from benchmarks import harness
from pvkernels import schedules
from pvkernels.ops.attention import attention_reference
torch.manual_seed(0)
q, k, v = torch.randn(4, 18, 256, 3, 8, 32).unbind(3)
x = torch.rand(128, 3, 32, 32)
p = schedules.combine(schedules.linear_blur(18, 3.0), schedules.ddpm_noise(18))
cases = {
    "temporal_attention cpp fwd 4x18x256x8x32": (
        lambda: pvkernels.temporal_attention(q, k, v, backend="cpp"),
        lambda: attention_reference(q, k, v, None, True, True), 4 * q.numel() * 4),
    "pseudo_video cpp blur+noise T=18 128x3x32x32": (
        lambda: pvkernels.pseudo_video(x, **p, seed=1, backend="cpp"),
        lambda: pvkernels.pseudo_video(x, **p, seed=1, backend="reference"), 19 * x.numel() * 4),
}
rows = []
for name, (op, reference, nbytes) in cases.items():
    op(), reference()
    for context, before in (("hot", None), ("in context", lambda: (harness.foreign_op(nbytes), harness.flush_caches())),
                            ("after reference", reference)):
        seconds, faults = harness.time_calls(op, int(sys.argv[1]), before=before)
        rows.append({"case": name, "context": context, "median_ms": seconds * 1e3, "minor_faults": faults})
print(json.dumps(rows))
"""


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    rounds = "3" if os.environ.get("PVKERNELS_BENCH_QUICK") == "1" else "11"
    results = []
    for variant, env in VARIANTS.items():
        out = subprocess.run([sys.executable, "-c", CHILD, rounds], cwd=root, env={**os.environ, **env},
                             capture_output=True, text=True, check=True)
        for row in json.loads(out.stdout.strip().splitlines()[-1]):
            results.append({"variant": variant, **row})
            print(f"{variant:<9}{row['case']:<46}{row['context']:<17}{row['median_ms']:>9.2f} ms"
                  f"{row['minor_faults']:>7} faults", flush=True)
    path = Path(__file__).parent / "results" / "local" / "first_touch-cpu.json"  # untracked, as every run's
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
