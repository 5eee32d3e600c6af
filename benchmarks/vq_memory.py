"""Peak resident memory growth of one VQ lookup, each provider in a fresh subprocess.

    python benchmarks/vq_memory.py [--N 65536] [--K 8192] [--D 64] [--providers cpp,reference,...]

The child builds z (N, D) and the codebook (K, D), resets the peak-RSS mark (Linux VmHWM via
/proc/self/clear_refs), runs the lookup once and reports VmHWM - VmRSS in MB. At N=65536,
K=8192 the reference's distance matrix alone is 2.1 GB; pvkernels' cpp lookup must grow the
peak by < 200 MB (exit status 1 otherwise). Results go to benchmarks/results/vq_memory-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, torch, pvkernels
N, K, D, provider = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

z, e = torch.randn(N, D), torch.randn(K, D)
if provider == "faiss":
    import faiss
    index = faiss.IndexFlatL2(D)
    index.add(e.numpy())
    zn = z.numpy()
    fn = lambda: index.search(zn, 1)
else:
    fn = {
        "reference": lambda: (lambda i: (i, e[i]))(torch.cdist(z, e).argmin(1)),
        "matmul": lambda: (lambda i: (i, e[i]))((e.pow(2).sum(1) - 2.0 * z @ e.T).argmin(1)),
        "cpp": lambda: pvkernels.vq_lookup(z, e, backend="cpp"),
    }[provider]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kb("VmRSS")
out = fn()
print((status_kb("VmHWM") - before) / 1024)
"""

LIMIT_MB = 200.0


def measure(provider: str, N: int, K: int, D: int) -> float:
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", CHILD, str(N), str(K), str(D), provider], cwd=root,
                         capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=65536)
    parser.add_argument("--K", type=int, default=8192)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--providers", default="cpp,faiss,matmul,reference")
    args = parser.parse_args()
    rows = []
    print(f"peak RSS growth of one lookup, N={args.N} K={args.K} D={args.D} "
          f"(distance matrix {args.N * args.K * 4 / 1e9:.2f} GB)")
    for provider in args.providers.split(","):
        try:
            mb = measure(provider, args.N, args.K, args.D)
        except subprocess.CalledProcessError as exc:
            print(f"{provider:<10} failed: {exc.stderr.strip().splitlines()[-1] if exc.stderr else exc}")
            continue
        rows.append({"provider": provider, "N": args.N, "K": args.K, "D": args.D, "peak_rss_growth_MB": mb})
        print(f"{provider:<10} {mb:10.1f} MB")
    out = Path(__file__).parent / "results" / "vq_memory-cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    cpp = [r["peak_rss_growth_MB"] for r in rows if r["provider"] == "cpp"]
    if cpp and cpp[0] >= LIMIT_MB:
        print(f"FAIL: the cpp lookup grew the peak RSS by {cpp[0]:.1f} MB >= {LIMIT_MB} MB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
