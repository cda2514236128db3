#!/usr/bin/env bash
# The whole test suite on one CUDA GPU, in one command (about 5 minutes on one
# H100/H200), from the repository root:
#
#   bash tools/gpu_suite.sh
#
# gpuaio is installed the way a user installs it, from a wheel: .whl/*.whl
# where that folder holds gpuaio's wheel and the test requirements the machine
# lacks (a machine with no package index: see tests/gpu-results/README.md),
# else `pip install .[test]`. The tests then import gpuaio from the checkout;
# the plugin's own tests start child pytest processes that find the installed
# package and its pytest11 entry point.
#
# Every test has a time limit (pytest-timeout's thread method: a hung test is
# named, with every thread's stack, even when it hangs inside a driver call).
# GPUAIO_EXTRA_WHEELS (a glob, e.g. '.whl/cu12/*.whl') installs more wheels into
# the same target, ahead of the machine's own packages: how the suite runs with
# cuda-bindings 12.x on a machine whose Python has 13.x.
# Writes under $OUT (default ./out): pytest.log, junit.xml, times.txt (each
# test's time) and summary.md, the row for tests/gpu-results/README.md.
set -o pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
site=${GPUAIO_SITE:-/tmp/gpuaio-site}
if compgen -G ".whl/gpuaio-*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl || exit
else
    python3 -m pip install -q --target "$site" ".[test]" || exit
fi
if [ -n "${GPUAIO_EXTRA_WHEELS:-}" ]; then
    # shellcheck disable=SC2086  # the glob is meant to expand
    python3 -m pip install -q --no-index --no-deps --upgrade --target "$site" $GPUAIO_EXTRA_WHEELS || exit
fi
export PYTHONPATH=$site PYTHONUNBUFFERED=1
bindings=$(python3 -c 'import cuda.bindings; print(cuda.bindings.__version__)' 2>&1 | tail -1)
echo "cuda-bindings $bindings"
# Each test's time as it ends: survives a run cut short by the limit below.
export GPUAIO_TEST_TIMES=${GPUAIO_TEST_TIMES:-$OUT/times.txt}
# Fewer random programs per configuration than CI's 100: the GPU run has a
# time limit, and CI runs the full count on every strategy and loop.
export GPUAIO_PROPERTY_EXAMPLES=${GPUAIO_PROPERTY_EXAMPLES:-25}
# A tree copied onto the GPU machine may carry an older .git than its files:
# "-dirty" then says the files are not that commit (set GPUAIO_GIT_COMMIT).
commit=${GPUAIO_GIT_COMMIT:-$(git describe --always --dirty 2>/dev/null || echo unknown)}
card=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
start=$(date +%s)
# SIGINT first: pytest then stops and still prints its failures and summary.
timeout -s INT -k 30 "${GPUAIO_SUITE_LIMIT_S:-480}" python3 -m pytest -p no:cacheprovider -q -rfE \
    --gpuaio-backend=cuda -m "not gpuaio_sim_only" --timeout 120 --timeout-method thread \
    --durations 25 --junitxml "$OUT/junit.xml" tests "$@" 2>&1 | tee "$OUT/pytest.log"
rc=$?
wall=$(($(date +%s) - start))
python3 - "$OUT" "$commit" "$card" "$wall" "$rc" "$bindings" <<'EOF'
import sys, datetime, xml.etree.ElementTree as ET
out, commit, card, wall, rc, bindings = sys.argv[1:]
name, _, driver = card.partition(", ")
try:
    suite = ET.parse(f"{out}/junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError):
    n = None
date = datetime.date.today().isoformat()
if n is None:
    row = f"| {date} | {name} | {driver} | {commit} | - | - | - | no junit.xml: the run ended early (cuda-bindings {bindings}, exit {rc}, {wall} s) |"
else:
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    failed = n["failures"] + n["errors"]
    row = (f"| {date} | {name} | {driver} | {commit} | {passed} | {failed} | {n['skipped']} "
           f"| tools/gpu_suite.sh, cuda-bindings {bindings}, {wall} s wall, exit {rc} |")
open(f"{out}/summary.md", "w").write(row + "\n")
print(row)
EOF
exit $rc
