"""Runs a peer's own test suite N times with a pvkernels patch, each run under another seed, and
reports how often each test passed (not collected by pytest, not run by CI: a run of
vector-quantize-pytorch's suite takes minutes).

    python tests/integrations/run_peer_suite.py PATH/TO/THEIR/tests --runs 20 [--patch vector_quantize]
        [--seed 0] [--control | --no-patch] [--json OUT.json] [-- EXTRA PYTEST ARGS]

Each run is ``python -m pytest PATH -p pvkernels.integrations.pytest_plugin --pvkernels-patch NAME``
in a fresh process (the interpreter running this script; use the venv that has the peer), with a
small seeding plugin written to a temporary folder: before every test it seeds torch, numpy and
random from (run seed, test id), so runs differ from each other (torch's default seed is the same
in every process: unseeded suites would repeat one draw) and a failure can be replayed with
``--seed``. Per-test outcomes come from each run's JUnit XML, the fast / fallback counts from the
plugin's summary. ``--control`` also runs every seed without the patch, so a test that fails
under some seeds on its own (vector-quantize-pytorch 1.31's test_fsp roundtrip tolerance) is told
apart from a failure the patch causes: the report counts, per test, the seeds where it failed
patched but passed unpatched. The peer's tests are read where they are and never copied here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

SEED_PLUGIN = '''
import random
import zlib

import pytest


def pytest_addoption(parser):
    parser.addoption("--peer-suite-seed", type=int, default=0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    seed = (item.config.getoption("--peer-suite-seed") * 1_000_003 + zlib.crc32(item.nodeid.encode())) % 2**31
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass
    import torch
    torch.manual_seed(seed)
'''

_FAST = re.compile(r"^fast calls \(pvkernels kernels\): (\d+)", re.M)
_FALLBACK = re.compile(r"^fallback x(\d+): (.+)$", re.M)
_SUMMARY = re.compile(r"^=* ?(\d+ (?:passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s.*?)(?: =+)?$", re.M)


def outcomes(junit: Path) -> dict:
    """test id -> "passed" | "failed" | "error" | "skipped" from one run's JUnit XML."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        result[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        result[name] = {"failure": "failed"}.get(result[name], result[name])
    return result


def run_once(tests: Path, seed: int, patch: str | None, plugin_dir: str, junit: Path, extra: list) -> dict:
    cmd = [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--rootdir", str(tests), "-p", "peer_suite_seed", f"--peer-suite-seed={seed}", f"--junitxml={junit}"]
    if patch:
        cmd += ["-p", "pvkernels.integrations.pytest_plugin", "--pvkernels-patch", patch]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [plugin_dir, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run(cmd + extra, cwd=tests.parent, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    fast = _FAST.search(out)
    summary = _SUMMARY.findall(proc.stdout)
    return {
        "seed": seed, "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
        "tests": outcomes(junit) if junit.exists() else {},
        "fast": int(fast.group(1)) if fast else None,
        "fallback": {reason: int(n) for n, reason in _FALLBACK.findall(out)},
        "summary": summary[-1] if summary else f"no pytest summary (exit {proc.returncode})",
        "tail": out[-3000:] if proc.returncode != 0 else "",
    }


def _failed(outcome: str | None) -> bool:
    return outcome in ("failed", "error")


def report(runs: list, patch: str | None, control: list | None = None) -> str:
    counts = defaultdict(Counter)
    for r in runs:
        for name, outcome in r["tests"].items():
            counts[name][outcome] += 1
    n = len(runs)
    green = sum(r["returncode"] == 0 for r in runs)
    lines = [f"{green} of {n} runs green ({'patch ' + repr(patch) if patch else 'unpatched'}; "
             f"seeds {runs[0]['seed']}..{runs[-1]['seed']})"]
    header = "| test | passed | failed | error | skipped |"
    if control is not None:
        only_patched = Counter()
        for r, c in zip(runs, control):
            for name, outcome in r["tests"].items():
                if _failed(outcome) and not _failed(c["tests"].get(name)):
                    only_patched[name] += 1
        control_passed = Counter()
        for c in control:
            control_passed.update(name for name, outcome in c["tests"].items() if outcome == "passed")
        clean = sum(not any(_failed(o) and not _failed(c["tests"].get(t)) for t, o in r["tests"].items())
                    for r, c in zip(runs, control))
        lines.append(f"{sum(c['returncode'] == 0 for c in control)} of {n} control runs green (unpatched, same "
                     f"seeds); {clean} of {n} patched runs fail nothing that passed unpatched at the same seed")
        header += " passed unpatched | failed only patched |"
    lines += ["", header, "|---|" + "---:|" * (header.count("|") - 2)]
    for name in sorted(counts, key=lambda t: (counts[t]["passed"] + counts[t]["skipped"] == n, t)):
        c = counts[name]
        row = f"| `{name}` | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |"
        if control is not None:
            row += f" {control_passed[name]} | {only_patched[name]} |"
        lines.append(row)
    if patch:
        fallbacks = Counter()
        for r in runs:
            fallbacks.update(r["fallback"])
        fast = [r["fast"] for r in runs if r["fast"] is not None]
        lines += ["", f"fast calls per run: {min(fast, default=0)}-{max(fast, default=0)}; fallbacks per run: "
                  f"{min((sum(r['fallback'].values()) for r in runs), default=0)}-"
                  f"{max((sum(r['fallback'].values()) for r in runs), default=0)}"]
        lines += [f"  fallback x{v / n:g} per run: {reason}" for reason, v in fallbacks.most_common()]
    failing = [r for r in runs if r["returncode"] != 0]
    if failing:
        lines += ["", f"first failing run (seed {failing[0]['seed']}): {failing[0]['summary']}", failing[0]["tail"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", type=Path, help="the peer's tests/ folder (a checkout of its repository)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first run; run i uses seed + i")
    parser.add_argument("--patch", default="vector_quantize", help="pvkernels.integrations.patch name")
    parser.add_argument("--no-patch", action="store_true", help="run the suite without a patch (the control)")
    parser.add_argument("--control", action="store_true",
                        help="also run every seed without the patch and compare test by test")
    parser.add_argument("--json", type=Path, help="write every run's outcomes and stats here")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    tests = args.tests.resolve()
    if not tests.is_dir():
        parser.error(f"{tests} is not a folder")
    if args.control and args.no_patch:
        parser.error("--control compares with the patch: leave out --no-patch")
    patch = None if args.no_patch else args.patch
    runs, control = [], [] if args.control else None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "peer_suite_seed.py").write_text(SEED_PLUGIN)
        for i in range(args.runs):
            for label, name, into in (("run", patch, runs),) + ((("control", None, control),) if args.control else ()):
                r = run_once(tests, args.seed + i, name, tmp, Path(tmp) / f"{label}{i}.xml", extra)
                into.append(r)
                bad = sorted(t for t, o in r["tests"].items() if _failed(o))
                print(f"{label} {i + 1}/{args.runs} seed {r['seed']}: {r['summary']} ({r['seconds']} s)"
                      + (f"; failing: {', '.join(bad)}" if bad else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"patch": patch, "tests": str(tests), "python": sys.executable,
                                         "runs": runs, "control": control}, indent=1))
    print()
    print(report(runs, patch, control))
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
