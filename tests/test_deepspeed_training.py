"""DeepSpeed ZeRO-3 (the shipped deepspeed_zero3.yaml) on CPU: 2 processes over gloo, DeepSpeed's CPU accelerator.

Opt-in (`./run.sh test --run deepspeed` after `pip install deepspeed`): ~5 minutes on 2 cores, and DeepSpeed builds
a C++ op on first use; the default run lists it as NOT RUN. On a GPU, benchmarks/gpu_check.sh runs the same config.

One ZeRO-3 run is compared with one process and accumulation 2 (same global batch), then resumed from its first
checkpoint (DeepSpeed's sharded engine state) and compared with itself, and its final folder is loaded.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ENV, REPO_ROOT
from test_pretraining import base_args, run_script, trace, train_records


def _need_deepspeed():
    if importlib.util.find_spec("deepspeed") is None:  # a dev extra: its absence is a broken setup, not a skip
        pytest.fail("deepspeed is not installed: pip install deepspeed (hjson, ninja, msgpack, py-cpuinfo, einops), or drop --run deepspeed")


def launch_zero3(args: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO_ROOT / "trainer_scripts" / "accelerate_configs" / "deepspeed_zero3.yaml"), "--num_processes", "2",
           "--main_process_port", "0", "-m", "trainer_scripts.continued_pretraining", *args]
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, (ENV["PYTHONPATH"], os.environ.get("PYTHONPATH"))))}
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (res.returncode == 0) == ok, res.stderr[-4000:]  # a refused run: each rank exits 2, the launcher 1
    return res


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; GPUs: test_pretraining.py::test_sharded_configs_on_gpu")
def test_zero3_on_cpu_matches_one_process_and_resumes(tmp_path, tiny_dir, corpus):
    _need_deepspeed()
    common = dict(max_steps=4, save_steps=2, save_total_limit=3, trace_data=True)
    one, zero3 = tmp_path / "one", tmp_path / "zero3"
    run_script(base_args(tiny_dir, corpus, one, gradient_accumulation_steps=2, **common))
    res = launch_zero3(base_args(tiny_dir, corpus, zero3, **common))
    assert "2 process(es), DistributedType.DEEPSPEED" in res.stdout  # sharded, not the plain-DDP fallback
    a, b = train_records(one), train_records(zero3)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3), step
    assert trace(one) == trace(zero3)
    assert any((zero3 / "checkpoint-2").rglob("zero_pp_rank_1_*optim_states.pt"))  # each rank's optimizer shard

    # as if killed after checkpoint-2: resume from DeepSpeed's sharded state, reach the same losses
    again = tmp_path / "again"
    shutil.copytree(zero3, again)
    shutil.rmtree(again / "checkpoint-4")
    refused = launch_zero3(base_args(tiny_dir, corpus, again, **common) + ["--resume"], ok=False)
    assert "--trust_deepspeed_checkpoint=true" in refused.stderr, refused.stderr[-2000:]  # a pickle load: opt-in only
    launch_zero3(base_args(tiny_dir, corpus, again, **common) + ["--resume", "--trust_deepspeed_checkpoint=true"])
    c = train_records(again)
    for step in (3, 4):
        assert c[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
    s1, s2 = (json.loads((d / "training_summary.json").read_text()) for d in (zero3, again))
    assert s2["ppl_after"] == pytest.approx(s1["ppl_after"], rel=1e-5)

    from upcycled_moe import UpcycledMoeForCausalLM

    model = UpcycledMoeForCausalLM.from_pretrained(again)  # gathered from the ZeRO-3 shards into one folder
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    ppl_one = json.loads((one / "training_summary.json").read_text())["ppl_after"]
    assert s1["ppl_after"] == pytest.approx(ppl_one, rel=1e-3)
