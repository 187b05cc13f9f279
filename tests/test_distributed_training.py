"""Sharded and multi-machine training through `accelerate launch`, on CPU processes (gloo), as users launch it.

FSDP2 (the shipped fsdp.yaml) with 2 processes and the SLURM script's multi-machine path (two one-process
"machines" on 127.0.0.1, multinode_fsdp.yaml) give the losses of one process with gradient accumulation 2. Every
launch has a deadline, after which it and every process it started are killed: no rank is left waiting for a peer.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ENV, REPO_ROOT
from test_pretraining import base_args, train_records, trace
from trainer_scripts.checkpointing import list_checkpoints
from trainer_scripts.config import PretrainConfig, build_config
from trainer_scripts.continued_pretraining import run
from trainer_scripts.metrics import read_jsonl

CONFIGS = REPO_ROOT / "trainer_scripts" / "accelerate_configs"
STEPS = dict(max_steps=4, save_steps=2, trace_data=True, max_eval_blocks=4)
MARKER = "UPCYCLED_MOE_TEST_LAUNCH"
IDS = [1, 50, 200, 7, 9, 300]


def launch_cmd(config: str, args: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *flags,
            "-m", "trainer_scripts.continued_pretraining", *args]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A launch with its output in files (a pipe nobody reads while polling would fill up and stall the ranks),
    marked so that ``kill`` finds every process under it."""
    marker = f"{log}-{time.time_ns()}"
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**ENV, **(env or {}), MARKER: marker}, stdout=out, stderr=err)
    proc.log, proc.marker = log, marker
    return proc


def output(proc: subprocess.Popen) -> tuple[int, str, str]:
    return proc.returncode, Path(f"{proc.log}.out").read_text(), Path(f"{proc.log}.err").read_text()


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launch and every process it started, found by the marker in their environment. Killing the
    launcher alone, or its session (killpg), left the ranks running: they finished the run it was to interrupt."""
    import psutil

    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == proc.marker:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    proc.wait(timeout=30)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for a launch, then kill whatever of it is left: after a deadline, or a failed rank whose peers would
    wait for it forever. Returns (returncode, stdout, stderr)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    kill(proc)
    return output(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_losses(ref: Path, out: Path, steps) -> None:
    a, b = train_records(ref), train_records(out)
    for step in steps:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
        assert b[step]["aux_loss"] == pytest.approx(a[step]["aux_loss"], rel=1e-4), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3), step


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir, corpus) -> Path:
    """The reference: one process, gradient accumulation 2 (the global batch of 2 processes), uninterrupted."""
    out = tmp_path_factory.mktemp("one") / "run"
    run(build_config(PretrainConfig, base_args(tiny_dir, corpus, out, gradient_accumulation_steps=2, **STEPS)))
    return out


FAKE_SRUN = """#!/bin/bash
# srun on one machine: the command once per node, all at once, each with its SLURM_NODEID; the first failure ends it
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
for _ in "${pids[@]}"; do wait -n || exit 1; done
"""


def sbatch_on_two_machines(tmp_path: Path, args: list[str]) -> tuple[list[str], dict]:
    """trainer_scripts/slurm/train_multinode.sbatch as SLURM runs it on 2 nodes of 1 GPU, on this machine: srun and
    scontrol stand-ins start its `accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip
    127.0.0.1` (multinode_fsdp.yaml) as two concurrent one-process "machines"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\necho 127.0.0.2\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("report_to: none\n")
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "1", "MAIN_PROCESS_PORT": str(free_port())}
    return ["bash", str(REPO_ROOT / "trainer_scripts" / "slurm" / "train_multinode.sbatch"), str(run_yaml), *args], env


@pytest.mark.slow
def test_fsdp2_on_cpu_sigkill_then_resume_on_two_machines_matches_one_process(tmp_path, one_process, tiny_dir,
                                                                              corpus):
    """Like a cluster job that crashes and is resubmitted. fsdp.yaml, 2 local CPU processes: checkpoint-2 sharded
    (a file per rank), then the launch and its ranks SIGKILLed. The SLURM script resumes it on two one-process
    "machines" (sbatch_on_two_machines). Every step's loss, aux loss and grad norm, the data order and the evals equal
    the uninterrupted one-process run with accumulation 2 (= 2 local processes,
    test_pretraining.py::test_two_processes_match_one_process_with_accumulation); the final save_pretrained folder
    loads as remote code with that run's logits."""
    out = tmp_path / "run"
    args = base_args(tiny_dir, corpus, out, **STEPS)
    proc = start(launch_cmd("fsdp.yaml", args, "--num_processes", "2"), tmp_path / "killed")
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        if list_checkpoints(str(out)):
            kill(proc)
            killed = True
            break
        time.sleep(0.01)
    kill(proc)
    _, stdout, err = output(proc)
    assert killed, "the run ended (or hung) before it could be killed:\n" + err[-3000:]
    assert "2 process(es), DistributedType.FSDP" in stdout
    assert [s for s, _ in list_checkpoints(str(out))] == [2] and not (out / "training_summary.json").exists()
    ckpt = out / "checkpoint-2"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint: a file per rank
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part

    cmd, env = sbatch_on_two_machines(tmp_path, args + ["--resume"])
    rc, stdout, err = finish(start(cmd, tmp_path / "job", env))
    assert rc == 0, err[-3000:]
    assert "2 machines x 1 processes, rendezvous 127.0.0.1:" in stdout
    assert "2 process(es), DistributedType.FSDP" in stdout and "resuming at step 2" in stdout
    assert sorted(train_records(out)) == [1, 2, 3, 4]
    assert_same_losses(one_process, out, range(1, 5))
    assert trace(out) == trace(one_process)
    evals = [r for r in read_jsonl(str(out / "metrics.jsonl")) if "eval/loss" in r]
    ref_evals = [r for r in read_jsonl(str(one_process / "metrics.jsonl")) if "eval/loss" in r]
    assert [r["eval/loss"] for r in evals] == pytest.approx([r["eval/loss"] for r in ref_evals], rel=1e-5)

    # the final folder: full (gathered) weights and the model's own remote code (nothing of FSDP's), loaded in a
    # fresh process without this package
    assert not list(out.glob("_fsdp*.py"))
    full = (out / "model.safetensors").stat().st_size
    for shard in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp"):  # each rank holds about half of the weights
        assert shard.stat().st_size < 0.6 * full, (shard.name, shard.stat().st_size, full)
    logits = tmp_path / "logits.safetensors"
    code = (
        "import sys; sys.path = [p for p in sys.path if 'upcycled' not in p and p not in ('', '.')]\n"
        "import torch; from safetensors.torch import save_file; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        f"save_file({{'logits': m(input_ids=torch.tensor([{IDS}])).logits.detach()}}, {str(logits)!r})\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in ENV.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    from safetensors.torch import load_file

    from upcycled_moe import UpcycledMoeForCausalLM

    ref = UpcycledMoeForCausalLM.from_pretrained(one_process)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([IDS])).logits
    torch.testing.assert_close(load_file(logits)["logits"], expected, rtol=1e-4, atol=1e-5)


def test_fsdp_version_1_on_cpu_is_refused_with_one_line(monkeypatch):
    """FSDP2 is what the script switches Accelerate to on CPU processes; an FSDP1 config there is refused, not run
    as something else."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from trainer_scripts.config import ConfigError
    from trainer_scripts.continued_pretraining import fsdp_on_cpu

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    cpu = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU, state=SimpleNamespace())
    with pytest.raises(ConfigError, match="FSDP version 1.*set fsdp_version: 2"):
        fsdp_on_cpu(cpu, "no")
    assert cpu.distributed_type == DistributedType.MULTI_CPU and not vars(cpu.state)
