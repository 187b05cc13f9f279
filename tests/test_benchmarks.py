"""The benchmark scripts run end to end on a CPU (their numbers there mean nothing: this checks the code that the GPU
sessions rely on, so device time is not spent finding a broken script)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN_STEP = ROOT / "benchmarks" / "train_step.py"
TINY = ["--device", "cpu", "--models", "tiny", "--seq", "32", "--steps", "2", "--warmup", "1", "--no-compile"]


def import_benchmark(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def run_script(*args):
    proc = subprocess.run([sys.executable, str(TRAIN_STEP), *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_step_benchmark_runs_dense_and_moe_with_the_models_flop_count(tmp_path):
    out = tmp_path / "train.json"
    run_script(*TINY, "--accum", "2", "--ce-chunk", "16", "--moe-impls", "upcycled_fused,eager", "--json", str(out))
    result = json.loads(out.read_text())
    rows = {(r["moe"], r["impl"]): r for r in result["results"]}
    assert set(rows) == {(False, "dense"), (True, "upcycled_fused"), (True, "eager")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["accum"] == 2
        assert math.isfinite(r["loss"]) and 5.0 < r["loss"] < 8.0  # ~ln(512) for an untrained model
        assert r["tokens_per_s"] == pytest.approx(2 * 32 * 2 / (r["step_ms"] / 1e3))

    # the FLOP count agrees with a measured one (FlopCounterMode; causal attention by the pairs the model attends)
    from test_metrics import measured_training_flops

    train_step = import_benchmark("train_step")
    for moe in (False, True):
        model, _ = train_step.build("tiny", moe, "eager", torch.float32, "sdpa", 8, 2, torch.device("cpu"))
        measured = measured_training_flops(model, 32)
        for r in (r for (m, _), r in rows.items() if m == moe):
            assert r["flops_per_token"] * 32 == pytest.approx(measured, rel=1e-9), (r["impl"], measured)
    # same active shape: the dense twin and the MoE multiply (nearly) the same parameters per token
    dense, moe = rows[(False, "dense")], rows[(True, "upcycled_fused")]
    assert abs(moe["active_matmul_params"] - dense["active_matmul_params"]) / dense["active_matmul_params"] < 0.05
    assert moe["params"] > 2 * dense["params"]  # 8 experts: far more parameters in total


def test_lm_loss_benchmark_chunked_and_full_losses_agree():
    lm_loss = import_benchmark("lm_loss")
    common = dict(device="cpu", dtype="float32", hidden=32, vocab=300, batch=2, seq=50, reps=1, threads=1)
    full = lm_loss.measure(chunk=0, **common)
    chunked = lm_loss.measure(chunk=16, **common)
    assert full["loss"] == pytest.approx(chunked["loss"], rel=1e-5)
    assert full["ms"] > 0 and chunked["ms"] > 0


def test_router_terms_benchmark_batched_form_agrees_and_dispatches_fewer_operators(capsys):
    router_terms = import_benchmark("router_terms")
    assert router_terms.main(["--layers", "6", "--tokens", "64", "--reps", "1"]) == 0  # asserts the values agree
    counts = {}
    for line in capsys.readouterr().out.splitlines():
        name, rest = line.split("aten operators fwd+bwd")
        counts[name.strip()] = int(rest.split()[0])
    per_layer, batched = counts["one pass per layer"], counts["batched (the model's)"]
    assert batched * 4 < per_layer


def test_host_overhead_benchmark_runs_and_reports_no_graph_break(capsys):
    host_overhead = import_benchmark("host_overhead")
    assert host_overhead.main(["--layers", "3", "--steps", "2", "--backend", "eager"]) == 0
    out = capsys.readouterr().out
    assert "3 layers on cpu: step eager" in out
    breaks = [line for line in out.splitlines() if "graph break x" in line]
    assert not breaks and "graph breaks: 0" in out, out  # the fused experts are custom ops under compilation


def test_conversion_benchmark_runs_both_tools_alternating_and_reports_ratios_and_profile(tmp_path, tiny_dense_dirs,
                                                                                        capsys):
    """Side by side without mergekit: a stand-in `mergekit-moe` whose child holds 150 MiB (the peak must count a
    process the command spawned); ours is the real command on a tiny model, profiled."""
    conversion = import_benchmark("conversion")
    assert conversion.schedule([4, 8], ["ours", "mergekit"], 2) == [
        (0, 4, "ours"), (0, 4, "mergekit"), (0, 8, "ours"), (0, 8, "mergekit"),
        (1, 4, "mergekit"), (1, 4, "ours"), (1, 8, "mergekit"), (1, 8, "ours")]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "mergekit-moe"
    fake.write_text(f'#!/bin/sh\nmkdir -p "$2" && cp "$1" "$2/config.yml"\n'
                    f"{sys.executable} -c 'import time; b = bytearray(150 * 2**20); time.sleep(0.3)'\necho done\n")
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    conversion.main(["--source", str(tiny_dense_dirs["llama"]), "--experts", "2", "--mergekit-venv", str(venv),
                     "--profile", "--json", "--workdir", str(work)])
    result = json.loads(capsys.readouterr().out)
    runs = {r["tool"]: r for r in result["runs"]}
    assert set(runs) == {"ours", "mergekit"} and not list(work.glob("*-2/"))  # outputs removed after measuring
    assert runs["mergekit"]["peak_rss_mib"] >= 150 > runs["mergekit"]["output_mib"] > 0
    config = (work / "mergekit-2.yml").read_text()
    assert "gate_mode: random" in config and config.count("source_model:") == 2 and "dtype: bfloat16" in config
    line = result["summary"][0]
    assert line["wall_ratio"] == pytest.approx(runs["ours"]["wall_s"] / runs["mergekit"]["wall_s"])
    assert line["rss_ratio"] == pytest.approx(runs["ours"]["peak_rss_mib"] / runs["mergekit"]["peak_rss_mib"])
    profile = runs["ours"]["profile"]
    phases = profile["phases_s"]
    assert {"read", "build", "cast", "check", "write", "plan (config, model class on meta)"} <= set(phases)
    assert sum(phases.values()) == pytest.approx(profile["conversion_s"], rel=0.05)
    assert 0 < profile["startup_and_imports_s"] < runs["ours"]["wall_s"]
