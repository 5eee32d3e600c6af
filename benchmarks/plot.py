"""Plots benchmarks/results/*.json (written by `pytest benchmarks/ --benchmark-only`) to PNG:
one chart per result file, speedup of each provider over the eager reference, per case.

    python benchmarks/plot.py [results_dir]
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(path: Path) -> Path:
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
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        rows = data.get("rows", []) if isinstance(data, dict) else []
        if rows and all("provider" in r for r in rows):  # memory-cpu.json, demo-cpu.json: not timings
            print(plot(path))
