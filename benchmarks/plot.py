"""Plots benchmark results (JSON written by `pytest benchmarks/ --benchmark-only`) to PNG: one
chart per result file, speedup of each provider over the eager reference, per case.

    python benchmarks/plot.py [results_dir] [--out DIR]

results_dir: a run's results, benchmarks/results/local/ (when it holds any), else the committed
reference results in benchmarks/results/. The PNGs go to --out, by default
benchmarks/results/local/ (not tracked by git), never beside the committed JSON.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# as in benchmarks/harness.py (not imported: it imports torch)
RESULTS_DIR = Path(__file__).parent / "results"
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"


def plot(path: Path, out_dir: Path = LOCAL_RESULTS_DIR) -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["provider"] != "reference"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(cases) * len(providers)), 5))
    for k, provider in enumerate(providers):
        xs, ys = [], []
        for i, case in enumerate(cases):
            match = [r for r in rows if r["case"] == case and r["provider"] == provider]
            if match and "speedup_vs_reference" in match[0]:
                xs.append(i + k * width)
                ys.append(match[0]["speedup_vs_reference"])
        ax.bar(xs, ys, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over eager reference (log)")
    ax.set_title(f"{path.stem} on {data['machine']} (torch {data['torch']})")
    ax.legend()
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.with_suffix(".png").name
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", type=Path,
                        default=LOCAL_RESULTS_DIR if any(LOCAL_RESULTS_DIR.glob("*.json")) else RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=LOCAL_RESULTS_DIR)
    args = parser.parse_args()
    for path in sorted(args.results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        rows = data.get("rows", []) if isinstance(data, dict) else []
        if rows and all("provider" in r for r in rows):  # memory-cpu.json, demo-cpu.json: not timings
            print(plot(path, args.out))
