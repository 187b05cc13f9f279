#!/usr/bin/env bash
# The comparisons' device calls (docs/results.md, "How to run the next comparison"); prepare them here first with
# `bash experiments/prepare_device.sh`. Two calls on ONE warm machine (it stays warm 30 s after a call):
#
#   A  carry [.whl, .carry/a]                                      bash experiments/device.sh setup
#   B  carry [.carry/b, .carry/corpus, runs/experiments/_runs]    bash experiments/device.sh NAME
#
# NAME: dense_vs_upcycled, routing, granularity, scaling, drop_upcycling (the order to run them in). B trains the
# comparison's arms back to back under `timeout` (the runner starts no arm it cannot finish in --time-limit), then
# writes $OUT/NAME.tgz (report, plots, each run's records: no weights) + $OUT/NAME-results.md + $OUT/NAME.log.
# Unpack NAME.tgz in the repository root here: its runs/experiments/_runs/* are what the next call B carries to
# skip the finished arms. Exit status 3: arms are left; the same call B (in a later task: A first) continues.
#
# Settings for tests and other machines (environment): PYTHON, DEVICE_STATE (folder kept between calls on one
# machine), DEVICE_BASE (a save_pretrained base model instead of the carried GGUF), DEVICE_SETS (extra runner
# arguments), DEVICE_TIMEOUT (seconds, default 480), DEVICE_TIME_LIMIT (the runner's, default 420): with the
# report after a kill, call B ends within about 9 minutes.
set -uo pipefail
# run in the repository root (the device call's folder): .carry/, .whl/ and runs/ are read and written there
PY=${PYTHON:-python3}
STATE=${DEVICE_STATE:-/root/upcycled_moe_device}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:?OUT is the folder whose files come back from the device call}

fail() { echo "error: $*" >&2; exit 2; }

if [ "${1:-}" = setup ]; then
    mkdir -p "$STATE/smollm2" || fail "cannot create $STATE"
    [ -f .carry/a/gguf.part1 ] || fail "call A carries .carry/a (run bash experiments/prepare_device.sh here first)"
    ls .whl/*.whl >/dev/null 2>&1 || fail "call A carries .whl (run bash experiments/prepare_device.sh here first)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" .whl/*.whl \
        || fail "installing the carried wheels failed"
    cp .carry/a/gguf.part1 "$STATE/smollm2/" || fail "cannot copy the first GGUF part into $STATE"
    nvidia-smi -L 2>/dev/null
    echo "setup done: now call B (bash experiments/device.sh NAME) within 30 s, on this warm machine"
    exit 0
fi

NAME=${1:?usage: bash experiments/device.sh setup, or: bash experiments/device.sh COMPARISON}
case " dense_vs_upcycled routing granularity scaling drop_upcycling " in
    *" $NAME "*) ;;
    *) fail "unknown comparison $NAME (dense_vs_upcycled, routing, granularity, scaling, drop_upcycling)" ;;
esac
[ -d .carry ] || fail "no .carry folder here: run this in the repository root, with the carry of call B"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 UPCYCLED_MOE_CACHE="$STATE/cache"
[ -d "$STATE/site" ] && export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${DEVICE_BASE:-}" ]; then
    BASE=(--set "base_model.source=$DEVICE_BASE")
else
    if [ ! -f "$STATE/smollm2/$GGUF" ]; then
        [ -f "$STATE/smollm2/gguf.part1" ] || fail "the first GGUF part is not on this machine: call A (setup) ran on another machine or it was given back; run call A, then this call within 30 s"
        [ -f .carry/b/gguf.part2 ] || fail "call B carries .carry/b (run bash experiments/prepare_device.sh here first)"
        cat "$STATE/smollm2/gguf.part1" .carry/b/gguf.part2 >"$STATE/smollm2/$GGUF.part" || fail "cannot assemble the GGUF"
        (cd "$STATE/smollm2" && sed "s/$GGUF\$/$GGUF.part/" "$OLDPWD/.carry/b/gguf.sha256" | sha256sum -c --quiet) \
            || fail "the assembled GGUF does not match .carry/b/gguf.sha256: prepare again here and rerun calls A and B"
        mv "$STATE/smollm2/$GGUF.part" "$STATE/smollm2/$GGUF"
    fi
    BASE=(--set "base_model.source=$STATE/smollm2" --set "base_model.gguf_file=$GGUF")
fi
# shellcheck disable=SC2206  # DEVICE_SETS is a list of words on purpose
ARGS=("$NAME" --out "runs/experiments/$NAME" --set corpus.prepared=.carry/corpus "${BASE[@]}" ${DEVICE_SETS:-})
nvidia-smi -L 2>/dev/null
timeout -k 15 "${DEVICE_TIMEOUT:-480}" "$PY" -m experiments.runner "${ARGS[@]}" --time-limit "${DEVICE_TIME_LIMIT:-420}" \
    --bundle "$OUT" 2>&1 | tee "$OUT/$NAME.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then  # killed or failed: report what exists, and how far every arm got
    echo "[device] runner exit status $rc: reporting the finished runs and the progress of the others" | tee -a "$OUT/$NAME.log"
    "$PY" -m experiments.runner "${ARGS[@]}" --report-only --bundle "$OUT" 2>&1 | tee -a "$OUT/$NAME.log"
    rc=${PIPESTATUS[0]}
fi
exit "$rc"
