#!/usr/bin/env bash
# The GPU runs still owed, as device-tool commands (each stays inside the
# tool's 10-minute limit). Run from the repository root on a GPU machine with
# the .whl/ folder carried (see tests/gpu-results/README.md):
#
#   tools/gpu_outstanding.sh tests       # the whole GPU suite (tools/gpu_suite.sh)
#   tools/gpu_outstanding.sh bench       # completion JSON, mid-size transfers, loader
#   tools/gpu_outstanding.sh reliability # sticky fault, storm on CUDA, racecheck
#   tools/gpu_outstanding.sh multi       # peer copies and aggregate H2D (2 GPUs)
#
# Every stage writes its log and result files under $OUT (default ./out).
set -o pipefail
stage=${1:?usage: tools/gpu_outstanding.sh tests|bench|reliability|multi}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export GPUAIO_GIT_COMMIT=${GPUAIO_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}

case $stage in
tests)
    nvidia-smi -L | tee "$OUT/cards.log"
    OUT=$OUT bash tools/gpu_suite.sh   # the whole suite; see tests/gpu-results/README.md
    ;;
bench)
    timeout 240 python3 benchmarks/completion.py --out-dir "$OUT" 2>&1 | tee "$OUT/completion.log"
    timeout 180 python3 benchmarks/transfers.py --sizes 64M,256M,1G --no-peers \
        --out-dir "$OUT" 2>&1 | tee "$OUT/transfers.log"
    timeout 120 python3 benchmarks/loader.py --out-dir "$OUT" 2>&1 | tee "$OUT/loader.log"
    ;;
reliability)
    timeout 540 python3 tools/reliability_report.py --backend cuda --sanitizer \
        --storm-ops 10000 --soak-ops 200000 --out "$OUT/report-cuda.json" 2>&1 \
        | tee "$OUT/reliability.log"
    ;;
multi)
    timeout 300 python3 benchmarks/multi_gpu.py --out-dir "$OUT" 2>&1 | tee "$OUT/multi.log"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
