#!/usr/bin/env bash
# The prepared device check, for a session that is lent a GPU (device tool, repo root):
#   bash benchmarks/gpu_check.sh
# 1) every Triton kernel against the oracle on CUDA (the tests pick CUDA tensors for triton
#    when a GPU is present), 2) the benchmark suite's reference / compiled / triton providers at
#    GPU sizes, with the fraction of the measured copy bandwidth in extra_info. Results are
#    copied to $OUT (brought back by the tool); commit them under benchmarks/results/.
# Not yet run on a device: no session so far was lent one.
set -uo pipefail
export PYTHONPATH="$PWD" PVKERNELS_BUILD_DIR=/tmp/pvk-build
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest tests/ -q -x -k triton -p no:cacheprovider 2>&1 | tail -25
python3 -m pytest benchmarks/ --benchmark-only -q -k "reference or compiled or triton" -p no:cacheprovider \
  2>&1 | grep -v "^bench_\|^-\|^Name\|^Legend\|^  Outliers\|^  OPS" | tail -80
mkdir -p "${OUT:-/tmp/pvk-out}" && cp benchmarks/results/*-cuda.json "${OUT:-/tmp/pvk-out}/" 2>/dev/null
exit 0
