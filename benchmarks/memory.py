"""Peak resident memory growth of one call of each op, each provider in a fresh subprocess.

    python benchmarks/memory.py [--op vq_lookup|pseudo_video|lfq_entropy|lfq_entropy_d18|all]

The child builds the inputs, resets the peak-RSS mark (Linux VmHWM via /proc/self/clear_refs),
runs the op once and reports VmHWM - VmRSS(before) in MB, so the figure is what the call adds:
its output plus whatever it allocates on the way. Limits checked for the cpp backend (exit
status 1 when exceeded):
- vq_lookup at N=65536, K=8192, D=64 (the reference's distance matrix alone is 2.1 GB): < 200 MB;
- pseudo_video at B=128, C=3, 32x32, T=18, blur + noise: the output plus 16 MB of scratch;
- lfq_entropy forward + backward at N=4096, d=16 (the reference's probability matrix alone is
  1 GB): < 100 MB; at N=16384, d=18 (lfq_entropy_d18, 17 GB per dense matrix): < 300 MB.
Results go to benchmarks/results/local/memory-cpu.json (not tracked by git);
PVKERNELS_BENCH_SAVE_REFERENCE=1 replaces the committed benchmarks/results/memory-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, torch, pvkernels
from pvkernels import schedules
op, provider = sys.argv[1], sys.argv[2]

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

if op == "vq_lookup":
    z, e = torch.randn(65536, 64), torch.randn(8192, 64)
    if provider == "faiss":
        import faiss
        index = faiss.IndexFlatL2(64)
        index.add(e.numpy())
        zn = z.numpy()
        fn = lambda: index.search(zn, 1)
    else:
        fn = {
            "reference": lambda: (lambda i: (i, e[i]))(torch.cdist(z, e).argmin(1)),
            "matmul": lambda: (lambda i: (i, e[i]))((e.pow(2).sum(1) - 2.0 * z @ e.T).argmin(1)),
            "cpp": lambda: pvkernels.vq_lookup(z, e, backend="cpp"),
        }[provider]
elif op.startswith("lfq_entropy"):
    N, d = (16384, 18) if op.endswith("d18") else (4096, 16)
    x = torch.randn(N, 1, d, requires_grad=True)
    g = torch.randn(1, 2 ** d)

    def fn():  # forward + backward of both entropy terms, as LFQ's training step runs them
        per_sample, avg_prob = pvkernels.lfq_entropy(x, 100.0, backend=provider)
        (per_sample + (avg_prob * g).sum()).backward()
else:
    x = torch.rand(128, 3, 32, 32)
    p = schedules.combine(schedules.linear_blur(18, 3.0), schedules.ddpm_noise(18))
    fn = lambda: pvkernels.pseudo_video(x, **p, seed=0, backend=provider)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kb("VmRSS")
out = fn()
print((status_kb("VmHWM") - before) / 1024)
"""

PROVIDERS = {"vq_lookup": ["cpp", "faiss", "matmul", "reference"], "pseudo_video": ["cpp", "reference"],
             "lfq_entropy": ["cpp", "reference"], "lfq_entropy_d18": ["cpp"]}
LIMITS_MB = {"vq_lookup": 200.0, "pseudo_video": 128 * 18 * 3 * 32 * 32 * 4 / 2**20 + 16.0,
             "lfq_entropy": 100.0, "lfq_entropy_d18": 300.0}


def measure(op: str, provider: str) -> float:
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", CHILD, op, provider], cwd=root, capture_output=True, text=True,
                         check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=[*PROVIDERS, "all"], default="all")
    args = parser.parse_args()
    rows, failed = [], False
    for op in PROVIDERS if args.op == "all" else [args.op]:
        print(f"{op}: peak RSS growth of one call (cpp limit {LIMITS_MB[op]:.0f} MB)")
        for provider in PROVIDERS[op]:
            try:
                mb = measure(op, provider)
            except subprocess.CalledProcessError as exc:
                print(f"  {provider:<10} failed: {exc.stderr.strip().splitlines()[-1] if exc.stderr else exc}")
                continue
            rows.append({"op": op, "provider": provider, "peak_rss_growth_MB": mb})
            print(f"  {provider:<10} {mb:10.1f} MB")
            if provider == "cpp" and mb >= LIMITS_MB[op]:
                print(f"  FAIL: cpp grew the peak RSS by {mb:.1f} MB >= {LIMITS_MB[op]:.0f} MB")
                failed = True
    results = Path(__file__).parent / "results"  # the committed reference; a run's own: results/local
    reference = os.environ.get("PVKERNELS_BENCH_SAVE_REFERENCE") == "1"
    out = (results if reference else results / "local") / "memory-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"saved to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
