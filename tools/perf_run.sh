#!/usr/bin/env bash
# Issue 13's one command: the small-copy probe, the transfer sweep (4 KiB to
# 1 GiB, both directions, with torch and CuPy), the completion suite
# (uvloop and asyncio, with peers, GIL stall) and the floor probe (the
# fastest hand-written awaitable per size against the same peers, asyncio
# and uvloop, 4 KiB-64 MiB, and the ladder of a 4 KiB upload), in one
# process tree, well inside 10 minutes on an H200. Results and logs go to
# $OUT (default /tmp/perf); run from the repository root on a GPU machine:
#
#   OUT=/tmp/perf bash tools/perf_run.sh [label]
#
# After the two suites, $OUT/targets.txt: the run's verdict on issue 13's targets
# (benchmarks/targets.py).
# PERF_PROBE=0, PERF_MAIN=0 or PERF_FLOOR=0 skip the probe, the two suites
# or the floor probe.
# PERF_TRANSFER_VARIANTS="ENV=V ENV=V;ENV=V;..." then reruns the sizes in
# PERF_VARIANT_SIZES (default 1M,4M,16M) and the 8 GiB soak once per entry,
# with PERF_VARIANT_ARGS as extra arguments (default --no-peers), into
# $OUT/variants.log; PERF_STAGE_VARIANTS reruns the probe's section 3.
set -o pipefail
OUT=${OUT:-/tmp/perf}
LABEL=${1:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export GPUAIO_GIT_COMMIT=${GPUAIO_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv,noheader | tee "$OUT/probe.log"
if [ "${PERF_PROBE:-1}" != 0 ]; then
    timeout 150 python3 tools/small_copy_probe.py --out "$OUT" --label="$LABEL" 2>&1 | tee -a "$OUT/probe.log"
    if [ -n "${PERF_STAGE_VARIANTS:-}" ]; then
        # Section 3 again under other settings: "ENV=VALUE;ENV=VALUE ..." (one per run).
        IFS=';' read -ra variants <<<"$PERF_STAGE_VARIANTS"
        for v in "${variants[@]}"; do
            echo "### variant: $v" | tee -a "$OUT/probe.log"
            env $v timeout 60 python3 tools/small_copy_probe.py --only-stages --reps 1500 \
                --out /tmp/variant 2>&1 | grep -E "total_us|mean_us|cpu_us|Error|error" | tee -a "$OUT/probe.log"
        done
    fi
    timeout 60 python3 tools/small_copy_probe.py --timelines --out /tmp/timelines 2>&1 | tee -a "$OUT/probe.log"
    echo "probe took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/probe.log"
fi
if [ "${PERF_MAIN:-1}" != 0 ]; then
    timeout 270 python3 benchmarks/transfers.py --out-dir "$OUT" 2>&1 | tee "$OUT/transfers.log"
    echo "through transfers: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/transfers.log"
    timeout 200 python3 benchmarks/completion.py --loops uvloop,asyncio --out-dir "$OUT" 2>&1 \
        | tee "$OUT/completion.log"
    echo "through completion: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/completion.log"
    # The run's verdict on issue 13's targets (benchmarks/targets.py), kept beside its files.
    tj=$(ls -t "$OUT"/*-transfers.json 2>/dev/null | head -1)
    cj=$(ls -t "$OUT"/*-completion.json 2>/dev/null | head -1)
    if [ -n "$tj" ]; then
        python3 benchmarks/targets.py "$tj" ${cj:+"$cj"} --label "${LABEL:-this run}" \
            | tee "$OUT/targets.txt"
    fi
fi
if [ "${PERF_FLOOR:-1}" != 0 ]; then
    # Whether a gap to the peers is gpuaio's or any awaitable's, on this host.
    for loop in asyncio uvloop; do
        timeout 150 python3 tools/floor_probe.py --loop "$loop" --skip stages,cold --out "$OUT" 2>&1 \
            | tee -a "$OUT/floor.log"
    done
    echo "through the floor probe: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/floor.log"
fi
if [ -n "${PERF_TRANSFER_VARIANTS:-}" ]; then
    # Some sizes and the 8 GiB soak again under other staging settings:
    # "ENV=VALUE ENV=VALUE;..." (one run each; an empty entry is the defaults).
    IFS=';' read -ra variants <<<"$PERF_TRANSFER_VARIANTS"
    for v in "${variants[@]}"; do
        echo "### variant: ${v:-defaults}" | tee -a "$OUT/variants.log"
        env $v timeout 90 python3 benchmarks/transfers.py --sizes "${PERF_VARIANT_SIZES:-1M,4M,16M}" \
            ${PERF_VARIANT_ARGS---no-peers} --flat-count 200 --out-dir /tmp/variant 2>&1 \
            | grep -E "^[0-9]+[KMG]iB|^  [hd]2[hd]_|gated path took|loop lag|memory over|setswitch|Error" \
            | tee -a "$OUT/variants.log"
        echo "  (at $(( $(date +%s) - t0 )) s)" | tee -a "$OUT/variants.log"
    done
fi
echo "all took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/perf.log"
