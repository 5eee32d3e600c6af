#!/usr/bin/env bash
# The device check, one command from the repo root on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh            (writes into $OUT, default /tmp/pvk-out)
# Steps, each under its own time limit inside a 450 s budget (under 8 minutes in all), none of
# which stops the others when it fails:
#   env        what is installed (torch, triton, the GPU); installs only what is missing
#   cuda       tests/test_cuda.py: the real 16-bit / fp32 tensor-core paths, atomics, > 65535 rows,
#              torch.compile, the Philox stream, NaNs, the modules (issue 11, item 4)
#   bench      pytest benchmarks/ --benchmark-only (GPU shapes on CUDA), results/*-cuda.json
#   compile    tests/test_triton_compile.py: every variant for sm_80 / sm_90, no spills (item 1)
#   triton     the rest of the test suite's triton cases on CUDA, with what time is left
# $OUT gets every log, the junit XML of each pytest step, benchmarks/results/*-cuda.json,
# triton-resources.json and summary.txt (one screen, also printed at the end).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/pvk-out}"
mkdir -p "$OUT"
BUDGET=${PVK_GPU_CHECK_BUDGET:-450}
START=$(date +%s)
export PVKERNELS_BUILD_DIR="${PVKERNELS_BUILD_DIR:-/tmp/pvk-build}" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/pvk-triton-cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
: > "$OUT/steps.txt"

# step NAME LIMIT_S CMD...: runs CMD with the smaller of LIMIT_S and the budget left, logs to
# $OUT/NAME.log, records "NAME rc seconds" (rc 124: out of time) and never fails the script
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 15))
    if [ "$left" -lt 20 ]; then
        echo "$name skipped 0 (budget spent)" >> "$OUT/steps.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $(($(date +%s) - t0))" >> "$OUT/steps.txt"
    tail -3 "$OUT/$name.log"
}

have() { "$PY" -c "import $1" 2>/dev/null; }

install_missing() {
    # never reinstall torch / triton over a working pair (pip could swap the CUDA build away);
    # install only what is absent; the device machine may have no index: then say so and go on
    local missing=()
    have torch || missing+=("torch")
    have triton || missing+=("triton>=3.0,<3.9")
    have pytest || missing+=("pytest>=7")
    have pytest_benchmark || missing+=("pytest-benchmark>=4")
    have numpy || missing+=("numpy")
    have scipy || missing+=("scipy")
    have sklearn || missing+=("scikit-learn")
    have PIL || missing+=("pillow")
    have ninja || missing+=("ninja")
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        [ -d benchmarks/wheels ] && local local_wheels=(--find-links benchmarks/wheels) || local local_wheels=()
        "$PY" -m pip install -q "${local_wheels[@]}" "${missing[@]}" || echo "pip could not install: ${missing[*]}"
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || echo "(not pip-installed: PYTHONPATH=$PWD)"
    "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
import triton
print("triton", triton.__version__)
EOF
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
}

step env 120 install_missing
grep -q "available True" "$OUT/env.log" || echo "WARNING: no CUDA device visible; the CUDA steps will skip" | tee -a "$OUT/env.log"

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="")
step cuda 150 env PVKERNELS_NO_CPP=1 "${PYTEST[@]}" tests/test_cuda.py -rfE --junitxml="$OUT/cuda.xml"
step bench 200 "${PYTEST[@]}" benchmarks/ --benchmark-only --junitxml="$OUT/bench.xml"
cp benchmarks/results/*-cuda*.json "$OUT/" 2>/dev/null
step compile 90 "${PYTEST[@]}" tests/test_triton_compile.py -rfE --junitxml="$OUT/compile.xml"
cp benchmarks/results/triton-resources.json "$OUT/" 2>/dev/null
step triton 120 env PVKERNELS_NO_CPP=1 "${PYTEST[@]}" tests/ -k "triton and not test_cuda and not compile" -rfE \
    --junitxml="$OUT/triton.xml"

"$PY" - "$OUT" > "$OUT/summary.txt" 2>&1 <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET
out = sys.argv[1]
print(open(os.path.join(out, "env.log")).read().strip()[-600:])
print("\nstep       rc   seconds  tests (failed / errors / skipped)")
for line in open(os.path.join(out, "steps.txt")):
    name, rc, secs = line.split()
    counts = ""
    xml = os.path.join(out, name + ".xml")
    if os.path.exists(xml):
        s = ET.parse(xml).getroot()
        s = s if s.tag == "testsuite" else s[0]
        counts = f"{s.get('tests')} ({s.get('failures')} / {s.get('errors')} / {s.get('skipped')})"
    status = {"0": "ok", "124": "TIMEOUT"}.get(rc, "FAILED" if rc != "skipped" else "skipped")
    print(f"{name:<10} {rc:>4} {secs:>8}  {counts}  {status}")
for name in ("cuda", "compile", "triton"):
    log = os.path.join(out, name + ".log")
    failed = [l.strip() for l in open(log) if l.startswith(("FAILED", "ERROR"))] if os.path.exists(log) else []
    for l in failed[:6]:
        print(f"  {name}: {l[:150]}")
rows = [r for f in sorted(glob.glob(os.path.join(out, "*-cuda*.json"))) for r in json.load(open(f)).get("rows", [])]
fast = [r for r in rows if r.get("provider") == "triton"]
if fast:
    print(f"\n{'op':<20}{'case':<34}{'ms':>8}{'x ref':>7}{'x comp':>7}{'bw frac':>8}")
    for r in fast[:24]:
        print(f"{r['op'][:19]:<20}{r['case'][:33]:<34}{r['median_ms']:>8.3f}{r.get('speedup_vs_reference', 0):>7.2f}"
              f"{r.get('speedup_vs_compiled', 0):>7.2f}{r.get('fraction_of_copy_bandwidth', 0):>8.2f}")
res = os.path.join(out, "triton-resources.json")
if os.path.exists(res):
    r = json.load(open(res))["rows"]
    print(f"\ntriton-resources: {len(r)} variants x targets, {sum(x.get('stack', 0) > 0 for x in r)} spill, "
          f"{sum('error' in x for x in r)} fail to compile")
EOF
cat "$OUT/summary.txt"
echo "total $(($(date +%s) - START)) s; logs and results in $OUT"
exit 0
