"""benchmarks/gpu_check.sh: its CPU dry run goes through every stage, and what it leaves in the output folder is what
the device tool can bring back (at most 8 flat files of at most 16 MiB, plain names), so device time is never spent
on a broken script."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "pytest_gpu", "train_tiny", "profile_1b_moe", "moe_layer", "pretrain_fsdp", "pretrain_deepspeed_zero3"]


def import_gpu_check():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_check

        return gpu_check
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))


def check(*args, env_extra=None, timeout=60):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("gpu_check")
    out, tmp = root / "out", root / "tmp"
    tmp.mkdir()
    res = check("--dry-run", str(out), "--jobs", "2", "--budget", "1500", "--tokenizer", str(smollm2_tokenizer_dir),
                env_extra={"TMPDIR": str(tmp)}, timeout=1600)
    return res, out, tmp


def test_dry_run_leaves_only_what_the_device_tool_returns(dry_run):
    res, out, tmp = dry_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.json", "summary.md", "profile_1b_moe.txt", "gpu_check_logs.tar.gz"])
    for p in out.iterdir():  # flat, plain names, each within the 16 MiB a returned file may have
        assert p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
        assert 0 < p.stat().st_size <= 16 * 2**20
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = set(tar.getnames())
        assert {f"logs/{s}.log" for s in STAGES if s != "pretrain_deepspeed_zero3"} <= names
        assert {"summary.json", "train_tiny.json", "moe_layer.json", "env.json"} <= names
        train_log = tar.extractfile("logs/train_tiny.log").read().decode()
    assert "--precisions bf16,amp" in train_log and "| tiny | MoE upcycled_fused | amp |" in train_log
    assert not list(tmp.glob("gpu_check_*"))  # its work folder (logs, models) is gone


def test_dry_run_summary_records_every_stage_and_what_was_not_run(dry_run):
    import torch

    _, out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["env"]["torch"] == torch.__version__
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == STAGES
    for name in STAGES[:-1]:
        assert stages[name]["status"] == "ok", stages[name]
    try:
        import deepspeed  # noqa: F401

        assert stages["pretrain_deepspeed_zero3"]["status"] == "ok"
    except ImportError:
        assert stages["pretrain_deepspeed_zero3"]["status"] == "skipped"
        assert "deepspeed is not importable" in stages["pretrain_deepspeed_zero3"]["reason"]
    assert "collected" in stages["pytest_gpu"]["result"]["collected"]
    assert "CUDA tests themselves" in stages["pytest_gpu"]["not_run"]
    rows = stages["train_tiny"]["result"]
    assert sorted((r["moe"], r["precision"]) for r in rows) == [(False, "amp"), (False, "bf16"), (True, "amp"),
                                                                 (True, "bf16")]
    assert all("error" not in r and 5.0 < r["loss"] < 8.0 and r["accum"] == 2 for r in rows)
    # amp is the training scripts' path: fp32 master weights, bf16 autocast; bf16 is bf16 weights, no autocast
    assert {(r["precision"], r["weights_dtype"], r["autocast"]) for r in rows} == {("amp", "float32", True),
                                                                                   ("bf16", "bfloat16", False)}
    assert stages["pretrain_fsdp"]["result"]["steps"] == 2
    assert all(t["status"] == "not evaluated (dry run on a CPU)" for t in summary["targets"]) and summary["targets"]
    assert summary["elapsed_s"] <= summary["budget_s"]

    md = (out / "summary.md").read_text()
    assert md.startswith("### gpu_check.sh dry run (CPU")
    assert "| pretrain_fsdp | ok |" in md and "not run: fsdp sharding itself" in md
    assert "| tiny | MoE upcycled_fused | amp | 2 x 32 x 2 |" in md
    assert "| tiny (64, 64, 4, 2) | balanced" in md  # the moe_layer table
    profile = (out / "profile_1b_moe.txt").read_text()  # (the profile mode of train_step.py is tested only here)
    assert "[profile] tiny MoE upcycled_fused amp" in profile and "aten::" in profile


def test_targets_are_judged_from_the_measured_rows():
    gpu_check = import_gpu_check()

    def row(model, moe, precision, step_ms, mfu):
        return {"model": model, "moe": moe, "impl": "upcycled_fused" if moe else "dense", "precision": precision,
                "accum": 4, "step_ms": step_ms, "mfu": mfu}

    rows = [row("1b", False, "bf16", 1000.0, 0.53), row("1b", True, "bf16", 1080.0, 0.49),
            row("1b", False, "amp", 1000.0, 0.53), row("1b", True, "amp", 1200.0, 0.44),
            row("smollm2", False, "bf16", 100.0, 0.3), row("smollm2", True, "bf16", 120.0, 0.25)]
    stages = [{"name": "train_1b", "result": rows[:4]}, {"name": "train_smollm2", "result": rows[4:]}]
    got = {t["target"]: t for t in gpu_check.evaluate_targets(stages, dry=False)}
    mfu, ratio, small, amp = (got[k] for k in gpu_check.TARGETS)
    assert mfu["status"] == "missed" and mfu["values"] == {"bf16": 0.49, "amp": 0.44}
    assert ratio["status"] == "missed" and ratio["values"]["bf16"] == pytest.approx(1.08)
    assert small["status"] == "met" and small["values"] == {"bf16": pytest.approx(1.2)}  # no amp row: bf16 alone
    assert amp["status"] == "missed" and amp["values"]["amp/bf16"] == pytest.approx(1200 / 1080)
    stages[1]["result"] = [dict(rows[4], error="OOM"), rows[5]]  # the dense twin ran out of memory: no ratio
    again = gpu_check.evaluate_targets(stages, dry=False)
    assert [t["status"] for t in again] == ["missed", "missed", "not measured", "missed"]


def test_the_device_plan_runs_the_shapes_and_configs_the_issue_names(tmp_path):
    plan = {s["name"]: " && ".join(" ".join(map(str, c)) for c in s["cmds"])
            for s in import_gpu_check().stage_plan(False, tmp_path, tmp_path / "tok")}
    assert list(plan) == ["env", "pytest_gpu", "train_1b", "profile_1b_moe", "train_smollm2", "moe_layer",
                          "pretrain_fsdp", "pretrain_deepspeed_zero3"]
    assert "-m gpu" in plan["pytest_gpu"] and "test_fused_moe.py" in plan["pytest_gpu"]
    for name, model in (("train_1b", "1b"), ("train_smollm2", "smollm2")):
        assert f"--models {model}" in plan[name] and "--precisions bf16,amp" in plan[name]
        assert "--accum 4" in plan[name] and "--device cpu" not in plan[name]
    assert "--models 1b" in plan["profile_1b_moe"] and "--no-dense --profile" in plan["profile_1b_moe"]
    assert "--quick" in plan["moe_layer"] and "--shapes 1b-train,smollm2" in plan["moe_layer"]
    assert "accelerate_configs/fsdp.yaml --num_processes 1" in plan["pretrain_fsdp"]
    assert "accelerate_configs/deepspeed_zero3.yaml --num_processes 1" in plan["pretrain_deepspeed_zero3"]


def test_a_hung_stage_is_killed_with_its_children_and_the_budget_skips_the_rest(tmp_path, monkeypatch):
    gpu_check = import_gpu_check()
    pidfile = tmp_path / "child.pid"
    hang = {"name": "hang", "timeout": 2, "cmds": [["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"]]}
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 1)
    monkeypatch.setattr(gpu_check, "RESERVE_S", 0)
    t0 = time.monotonic()
    record = gpu_check.run_stage(hang, tmp_path, time.monotonic() + 60, dict(os.environ))
    assert record["status"] == "timeout" and time.monotonic() - t0 < 20
    child = int(pidfile.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()
    late = gpu_check.run_stage(dict(hang, timeout=100), tmp_path, time.monotonic() + 0.5, dict(os.environ))
    assert late["status"] == "skipped" and late["reason"].startswith("out of time")


def test_bad_invocations_are_one_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: no output folder")
    res = check("--dry-run", str(tmp_path / "o"), "--only", "env,nonsense")
    assert res.returncode == 2 and "error: --only names unknown stages ['nonsense']" in res.stderr
    assert not (tmp_path / "o").exists()  # nothing written before every check passed
    (tmp_path / "file").write_text("x")
    res = check("--dry-run", str(tmp_path / "file"))
    assert res.returncode == 2 and "is a file" in res.stderr and (tmp_path / "file").read_text() == "x"
    res = check(str(tmp_path / "o"), "--jobs", "2")  # timings on a GPU need the stages one at a time
    assert res.returncode == 2 and "error: --jobs 2" in res.stderr


def test_the_log_bundle_stays_within_what_one_returned_file_may_hold(tmp_path):
    gpu_check = import_gpu_check()
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    noise = os.urandom(gpu_check.MAX_FILE_BYTES)  # incompressible: gzip cannot rescue it
    for i in range(3):
        (work / "logs" / f"stage{i}.log").write_bytes(noise + f"the end of stage {i}\n".encode())
    summary = {"dry_run": True, "date": "today", "budget_s": 1, "elapsed_s": 0.0, "env": None, "stages": [],
               "targets": []}
    gpu_check.write_outputs(out, work, summary)
    bundle = out / "gpu_check_logs.tar.gz"
    assert bundle.stat().st_size <= 16 * 2**20
    with tarfile.open(bundle) as tar:
        for i in range(3):  # each log's end (where a failure shows) is kept
            assert tar.extractfile(f"logs/stage{i}.log").read().endswith(f"the end of stage {i}\n".encode())
