#!/usr/bin/env bash
# The device check, one command from the repo root on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh            (writes into $OUT, default /tmp/pvk-out)
# It runs on the GPU machine as that machine is (Python 3.12, torch 2.11, triton 3.6, no network):
# pvkernels runs from this working tree through PYTHONPATH, and the only install is of wheels
# carried in .whl/, into a folder of its own on PYTHONPATH: diffusers, which the GPU image lacks,
# and huggingface_hub 1.x (diffusers wants >= 1.32, the image's transformers < 2.0), made here with
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#     diffusers==0.42.1 huggingface_hub==1.33.0 importlib_metadata==10.2.0 lazy-importer==0.1.0
# and passed to the device tool as carry [".whl"] (7 MB).
# Steps, most wanted first, each under its own time limit inside a budget (PVK_GPU_CHECK_BUDGET,
# 450 s), none of which stops the others when it fails; PVK_GPU_CHECK_STEPS="cuda bench-vq" runs
# only those (a rerun), PVK_BENCH_K a pytest -k filter for the bench steps ("not compiled and not
# flex" leaves out the torch.compile providers, whose compiles take most of a bench step):
#   env        what is installed (torch, triton, the GPU, diffusers, the triton wheel's cuobjdump)
#   cuda       tests/test_cuda.py: the real 16-bit / fp32 tensor-core paths, atomics, > 65535 rows,
#              torch.compile, the Philox stream, NaNs, the modules, diffusers past 65535 sequences
#   triton     the rest of the test suite's triton cases on CUDA
#   bench-*    pytest benchmarks/bench_<name>.py --benchmark-only, one file per step (diffusers,
#              attention, pseudo_video, vq, lfq: GPU shapes on CUDA; the C++ extension is not built),
#              so a step out of time loses only its own file's results
#   tiles      python -m benchmarks.attention_tiles: each candidate tile of the attention kernels at
#              the motion modules' shapes, timed and checked (what _TILES is chosen from)
#   compile    tests/test_triton_compile.py: every variant for sm_80 / sm_90, no spills (the same
#              sweep runs on a CPU in CI: last)
# $OUT gets summary.txt (one screen, also printed at the end) and gpu-check.tar.gz: every log, the
# junit XML of each pytest step, this run's benchmark results (*-cuda.json, which the benchmarks write
# to benchmarks/results/local/) and triton-resources-<triton>.json. Two files, since the device tool
# brings back at most 8; the unpacked files stay in $LOG (printed at the end).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/pvk-out}"
mkdir -p "$OUT"
LOG=$(mktemp -d /tmp/pvk-gpu-check.XXXXXX)
touch "$LOG/.start"  # result files newer than this are this run's
BUDGET=${PVK_GPU_CHECK_BUDGET:-450}
STEPS=${PVK_GPU_CHECK_STEPS:-}
START=$(date +%s)
export PVKERNELS_BUILD_DIR="${PVKERNELS_BUILD_DIR:-/tmp/pvk-build}" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/pvk-triton-cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then  # the carried wheels, beside the image's packages
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$LOG/site" .whl/*.whl \
        > "$LOG/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$LOG/site"
fi
: > "$LOG/steps.txt"

# step NAME LIMIT_S CMD...: runs CMD with the smaller of LIMIT_S and the budget left, logs to
# $LOG/NAME.log, records "NAME rc seconds" (rc 124: out of time) and never fails the script
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then
        return
    fi
    local left=$((BUDGET - ($(date +%s) - START) - 15))
    if [ "$left" -lt 20 ]; then
        echo "$name skipped 0 (budget spent)" >> "$LOG/steps.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $(($(date +%s) - t0))" >> "$LOG/steps.txt"
    tail -3 "$LOG/$name.log"
}

report_env() {
    # installs nothing: the GPU machine has no network, and a pip run could swap its CUDA torch away
    echo "pvkernels from $PWD (PYTHONPATH); $("$PY" --version)"
    "$PY" - <<'EOF'
import importlib.util, os
if os.path.exists(os.path.join(os.environ["LOG"], "wheels.log")):
    print("carried wheels:", " ".join(sorted(os.listdir(".whl"))), "->", open(os.path.join(os.environ["LOG"], "wheels.log")).read().strip() or "installed")
missing = [m for m in ("torch", "triton", "pytest", "pytest_benchmark", "numpy", "scipy", "sklearn", "PIL", "diffusers")
           if importlib.util.find_spec(m) is None]
if missing:
    print("MISSING (not installed; the steps that import them fail):", " ".join(missing))
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
import triton
print("triton", triton.__version__)
try:
    import diffusers
    print("diffusers", diffusers.__version__, "from", os.path.dirname(diffusers.__file__))
except Exception as exc:  # the diffusers test and bench skip without it
    print("diffusers does not import:", repr(exc)[:300])
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
print("triton's cuobjdump (the compile sweep reads registers with it):", "present" if os.path.exists(cuobjdump) else "MISSING")
EOF
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    return 0
}

export PY LOG
export -f report_env  # timeout runs programs, not shell functions: through bash -c
step env 60 bash -c report_env
# on CUDA the benchmarks' fused provider is triton: the C++ extension's build would only cost time
bench_env=(PVKERNELS_NO_CPP=1)
if ! grep -q "available True" "$LOG/env.log"; then
    bench_env=()
    echo "WARNING: no CUDA device visible; the CUDA steps will skip" | tee -a "$LOG/env.log"
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="")
# The test steps: -v names each test as it ends (its log outlives a step out of time, the junit
# XML does not); 8 workers compile triton kernels side by side; a test past 90 s has its stack
# dumped and its worker ended (the thread method: a signal waits for a CUDA call that never
# returns), which xdist reports as the worker crashing in that test. On 2026-12-04 both test steps
# ran out of time (test_cuda 35-36 of 66 tests done in 140-150 s with 4 or 8 workers, the rest
# never reported; the other triton tests all reported, then no summary in 80 s) with the signal
# method at 120 s, so which tests hung is not known. One inductor compile thread: inductor's pool
# of compile processes is one suspect of the hang at exit.
TESTS=("$PY" -m pytest -v -p no:cacheprovider -o addopts="" -rfE --durations=15)
"$PY" -c "import xdist" 2> /dev/null && TESTS+=(-n 8)
"$PY" -c "import pytest_timeout" 2> /dev/null && TESTS+=(--timeout 90 --timeout-method thread)
test_env=(PVKERNELS_NO_CPP=1 TORCHINDUCTOR_COMPILE_THREADS=1)
step cuda 140 env "${test_env[@]}" "${TESTS[@]}" tests/test_cuda.py --junitxml="$LOG/cuda.xml"
step triton 80 env "${test_env[@]}" "${TESTS[@]}" tests/ -k "triton and not test_cuda and not compile" \
    --junitxml="$LOG/triton.xml"
for name in diffusers:110 attention:80 pseudo_video:50 vq:50 lfq:50; do
    step "bench-${name%:*}" "${name#*:}" env "${bench_env[@]}" "${PYTEST[@]}" "benchmarks/bench_${name%:*}.py" --benchmark-only \
        ${PVK_BENCH_K:+-k "$PVK_BENCH_K"} --junitxml="$LOG/bench-${name%:*}.xml"
done
step tiles 90 env PVKERNELS_NO_CPP=1 "$PY" -m benchmarks.attention_tiles
step compile 90 env PVKERNELS_NO_CPP=1 "${PYTEST[@]}" tests/test_triton_compile.py -rfE --junitxml="$LOG/compile.xml"
# this run's results (benchmarks/results/local/ unless PVKERNELS_BENCH_SAVE_REFERENCE=1)
find benchmarks/results \( -name '*-cuda*.json' -o -name 'triton-resources*.json' \) -newer "$LOG/.start" \
    -exec cp {} "$LOG/" \;

"$PY" - "$LOG" > "$LOG/summary.txt" 2>&1 <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET
out = sys.argv[1]
print(open(os.path.join(out, "env.log")).read().strip()[-800:])
print(f"\n{'step':<18} rc  seconds  tests (failed / errors / skipped)")
for line in open(os.path.join(out, "steps.txt")):
    name, rc, secs = line.split()[:3]
    counts = ""
    xml = os.path.join(out, name + ".xml")
    if os.path.exists(xml):
        s = ET.parse(xml).getroot()
        s = s if s.tag == "testsuite" else s[0]
        counts = f"{s.get('tests')} ({s.get('failures')} / {s.get('errors')} / {s.get('skipped')})"
    status = {"0": "ok", "124": "TIMEOUT"}.get(rc, "FAILED" if rc != "skipped" else "skipped")
    print(f"{name:<18} {rc:>4} {secs:>8}  {counts}  {status}")
for log in sorted(glob.glob(os.path.join(out, "*.log"))):
    name = os.path.basename(log)[:-4]
    failed = [l.strip() for l in open(log) if l.startswith(("FAILED", "ERROR")) or " FAILED " in l or " ERROR " in l
              or "crashed" in l or "Timeout" in l]
    for l in dict.fromkeys(failed[:12]):
        print(f"  {name}: {l[:150]}")
tiles = os.path.join(out, "tiles.log")
if os.path.exists(tiles):
    print("\n" + "".join(open(tiles).readlines()[-60:]).strip())
rows = [r for f in sorted(glob.glob(os.path.join(out, "*-cuda*.json"))) for r in json.load(open(f)).get("rows", [])]
fast = [r for r in rows if r.get("provider") in ("triton", "patched")]
if fast:  # x eager: against the fastest eager form of the case (for diffusers: SDPA's best backend)
    print(f"\n{'op':<18}{'case':<46}{'ms':>8}{'x ref':>7}{'x comp':>7}{'x eager':>8} {'fastest eager':<15}{'bw frac':>7}")
    for r in fast[:80]:
        print(f"{r['op'][:17]:<18}{r['case'][:45]:<46}{r['median_ms']:>8.3f}{r.get('speedup_vs_reference', 0):>7.2f}"
              f"{r.get('speedup_vs_compiled', 0):>7.2f}{r.get('speedup_vs_eager', 0):>8.2f} "
              f"{r.get('fastest_eager', '')[:14]:<15}{r.get('fraction_of_copy_bandwidth', 0):>7.2f}")
for res in sorted(glob.glob(os.path.join(out, "triton-resources*.json"))):
    r = json.load(open(res))["rows"]
    print(f"\n{os.path.basename(res)}: {len(r)} variants x targets, {sum(x.get('stack', 0) > 0 for x in r)} spill, "
          f"{sum('error' in x for x in r)} fail to compile")
EOF
cp "$LOG/summary.txt" "$OUT/summary.txt"
tar -czf "$OUT/gpu-check.tar.gz" -C "$LOG" --exclude=./.start .
cat "$OUT/summary.txt"
echo "total $(($(date +%s) - START)) s; summary.txt and gpu-check.tar.gz in $OUT, the files unpacked in $LOG"
exit 0
