#!/usr/bin/env bash
# Every missing GPU figure of BENCHMARKS.md in one bounded run (8 minutes by default, install included).
#
#   bash benchmarks/gpu_check.sh                   # on a machine with one NVIDIA GPU
#   bash benchmarks/gpu_check.sh --dry-run         # every stage at toy size on CPU (what tests/test_gpu_check.py runs)
#   bash benchmarks/gpu_check.sh --fetch-wheels    # here, with PyPI: the pinned wheels for an offline GPU machine
#   bash benchmarks/gpu_check.sh --budget 300 --stages env,kernels
#
# Results: gpu_check.json, gpu_check.md (paste into BENCHMARKS.md) and gpu_check.log in $OUT if set, else in
# benchmarks/results/gpu_check/. The Markdown is also printed at the end. See benchmarks/gpu_check.py.
set -u
START=$(date +%s)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1

if [ "${1:-}" = "--fetch-wheels" ]; then
    # Pure-Python wheels of what the device image lacks or has in other versions, pinned in gpu_wheels.txt, into
    # benchmarks/wheelhouse/ (kept out of git; name it in the device tool's `carry`).
    PY="${GPU_CHECK_PYTHON:-}"
    [ -z "$PY" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
    [ -z "$PY" ] && PY=python3
    mkdir -p benchmarks/wheelhouse
    rm -f benchmarks/wheelhouse/*.whl
    # for the device machine's interpreter (CPython 3.12, x86-64 Linux); all but wcwidth are pure Python anyway
    grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$' |
        xargs "$PY" -m pip download --no-deps --only-binary=:all: --implementation cp \
            --python-version "${GPU_CHECK_WHEEL_PYTHON:-3.12}" --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
            -d benchmarks/wheelhouse || exit 1
    if [ -d .git ] && ! grep -qx '/benchmarks/wheelhouse/' .git/info/exclude 2>/dev/null; then
        mkdir -p .git/info && echo '/benchmarks/wheelhouse/' >> .git/info/exclude
    fi
    ls -l benchmarks/wheelhouse
    du -sh benchmarks/wheelhouse
    exit 0
fi

# The orchestrator needs only the standard library: any python3 runs it; it finds or installs the one that has
# torch for the stages. A dry run uses the project's venv when there is one.
PY="${GPU_CHECK_ORCHESTRATOR_PYTHON:-}"
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ] && [ -z "$PY" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
done
[ -z "$PY" ] && PY="$(command -v python3 || command -v python)"
if [ -z "$PY" ]; then
    echo "gpu_check: no python3 on PATH" >&2
    exit 1
fi
exec "$PY" -u benchmarks/gpu_check.py --start "$START" "$@"
