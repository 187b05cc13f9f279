"""`--help` and usage errors answer without importing torch or transformers (that import alone took 30-40 s and
430 MB on a 2-core machine). Checked by what a fresh interpreter has imported after the entry point returns, and by
the installed console scripts pointing at those entry points."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, REPO_ROOT

PROBE = r"""
import contextlib, io, json, sys
import upcycled_moe_cli
out, err = io.StringIO(), io.StringIO()
code = None
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = getattr(upcycled_moe_cli, sys.argv[1])(sys.argv[2:])
    except SystemExit as e:
        code = e.code
heavy = sorted(m for m in ("torch", "transformers", "upcycled_moe") if m in sys.modules)
print(json.dumps({"code": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue(), "heavy": heavy}))
"""

CASES = [
    # (entry point, argv, exit status, text that must appear in stdout + stderr)
    ("upcycle_moe", ["--help"], 0, "convert"),
    ("upcycle_moe", ["convert", "--help"], 0, "--num-experts"),
    ("upcycle_moe", ["verify", "--help"], 0, "--max-logit-diff"),
    ("upcycle_moe", ["export", "--help"], 0, "--to"),
    ("upcycle_moe", ["experiment", "--help"], 0, "usage"),
    ("upcycle_moe", [], 2, "error: the following arguments are required: COMMAND"),
    ("upcycle_moe", ["convert"], 2, "error: the following arguments are required: output"),
    ("upcycle_moe", ["convert", "src", "out", "--top-k", "two"], 2, "error: argument --top-k"),
    ("upcycle_moe", ["verify", "a", "b", "--max-logit-diff", "nan"], 2, "expected a finite number, got 'nan'"),
    ("upcycle_moe", ["frobnicate"], 2, "error: argument COMMAND: invalid choice"),
    ("pretrain", ["--help"], 0, "model_name_or_path"),
    ("finetune", ["--help"], 0, "use_lora"),
]


@pytest.mark.parametrize("entry,argv,status,text", CASES, ids=[" ".join([c[0], *c[1]]) for c in CASES])
def test_help_and_usage_errors_import_no_torch(entry, argv, status, text):
    res = subprocess.run([sys.executable, "-c", PROBE, entry, *argv], cwd=REPO_ROOT, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["code"] == status, got
    assert text in got["stdout"] + got["stderr"], got
    assert got["heavy"] == [], f"{entry} {argv} imported {got['heavy']}"
    if status:
        assert got["stderr"].count("\n") == 1 and got["stderr"].startswith("error: "), got["stderr"]


def test_finetune_help_all_still_lists_training_arguments():
    res = subprocess.run([sys.executable, "-c", PROBE, "finetune", "--help-all"], cwd=REPO_ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["code"] == 0 and "--learning_rate" in got["stdout"] and "--use_lora" in got["stdout"], got


def test_console_scripts_use_the_light_entry_points():
    """The commands a user types are the scripts pip generated next to this interpreter."""
    expected = {"upcycle-moe": "upcycle_moe", "upcycle-moe-pretrain": "pretrain", "upcycle-moe-finetune": "finetune"}
    for name, function in expected.items():
        script = Path(sys.executable).parent / name
        assert script.is_file(), f"{script} is missing: reinstall the package (pip install -e .)"
        assert f"from upcycled_moe_cli import {function}" in script.read_text(), script.read_text()
