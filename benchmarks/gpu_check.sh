#!/usr/bin/env bash
# Every GPU-only check in one time-boxed run (at most 9 minutes on one H100/H200), results under OUTDIR.
#   bash benchmarks/gpu_check.sh [OUTDIR]              on the GPU machine; OUTDIR defaults to $OUT
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR      here, on a CPU: tiny shapes, every stage (also GPU_CHECK_DRY_RUN=1)
# Wheels the device lacks: run benchmarks/prepare_device.sh here first; it prints the device call to make.
# The stages, their time boxes and the summary are in benchmarks/gpu_check.py.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
