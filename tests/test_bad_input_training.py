"""Bad and hostile input to the training commands (upcycle-moe-pretrain, upcycle-moe-finetune), table-driven.

Every case runs the real entry point (``main(argv)`` in-process; a few through ``python -m``) and must end with
exactly ONE ``error:`` line on stderr, exit status 2, and the file system as it was (every file and folder under
the case's folder and the shared model/data folders: same names, sizes, mtimes, link targets).
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ENV, REPO_ROOT
from trainer_scripts import continued_pretraining, finetune
from trainer_scripts.checkpointing import list_checkpoints
from trainer_scripts.config import PretrainConfig, build_config

PRETRAIN, FINETUNE = "upcycle-moe-pretrain", "upcycle-moe-finetune"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"example number {i} of a tiny fine-tuning set"}) + "\n"
                            for i in range(8)))
    return path


def pretrain_args(model, data, out, **extra) -> list[str]:
    args = dict(model_name_or_path=model, train_files=data, output_dir=out, block_size=64, micro_batch_size=2,
                max_steps=4, warmup_steps=1, learning_rate=3e-3, logging_steps=1, eval_steps=0, save_steps=2,
                save_total_limit=3, max_eval_blocks=4, report_to="none")
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def finetune_args(model, data, out, **extra) -> list[str]:
    args = dict(model_name_or_path=model, train_file=data, output_dir=out, max_steps=1,
                per_device_train_batch_size=2, max_seq_length=32, save_strategy="no", use_cpu="true")
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dir, corpus) -> Path:
    """A whole 4-step run (checkpoints 2 and 4 and the final model), copied by the cases that need one."""
    out = tmp_path_factory.mktemp("run") / "run"
    continued_pretraining.run(build_config(PretrainConfig, pretrain_args(tiny_dir, corpus, out)))
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 4]
    return out


@dataclass
class Ctx:
    tmp: Path
    model: Path
    data: Path
    sft: Path
    finished: Path
    monkeypatch: pytest.MonkeyPatch
    roots: list = field(default_factory=list)

    def run_copy(self) -> Path:
        dst = self.tmp / "prev_run"
        shutil.copytree(self.finished, dst, symlinks=True)
        return dst

    def model_copy(self, where: Path | None = None) -> Path:
        dst = where or self.tmp / "model_copy"
        shutil.copytree(self.model, dst)
        return dst

    def file(self, name: str, content: bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(content)
        return p


def flip_byte(path: Path, offset: int) -> None:
    """Same-size corruption: one byte changed in place (mtime restored so only the content differs)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def snapshot(*roots: Path) -> dict:
    state = {}
    for root in roots:
        if not os.path.lexists(root):
            state[str(root)] = None
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                state[p] = (os.readlink(p) if os.path.islink(p) else None, st.st_mode, st.st_size, st.st_mtime_ns)
        state[str(root)] = os.lstat(root).st_mode
    return state


# --------------------------------------------------------------------------------------------- the cases
def _pre(ctx, out=None, **extra):
    return PRETRAIN, pretrain_args(ctx.model, ctx.data, out or ctx.tmp / "out", **extra)


def _ft(ctx, out=None, **extra):
    return FINETUNE, finetune_args(ctx.model, ctx.sft, out or ctx.tmp / "out", **extra)


def case_yaml_nan(ctx):
    prog, argv = _pre(ctx)
    path = ctx.file("nan.yaml", b"router_lr_scale: .nan\n")
    return prog, argv + [f"--config={path}"], "router_lr_scale.*finite"


def case_config_not_utf8(ctx):
    prog, argv = _pre(ctx)
    path = ctx.file("latin1.yaml", "seed: 1 # caf\xe9".encode("latin-1"))
    return prog, argv + [f"--config={path}"], "latin1.yaml is not UTF-8"


def case_overwrite_then_typo_keeps_the_previous_run(ctx):
    prev = ctx.run_copy()
    prog, argv = _pre(ctx, out=prev, overwrite_output_dir="true", experts_implementation="no_such_kernel")
    return prog, argv, "cannot load the model .*no_such_kernel"


def case_overwrite_symlink(ctx):
    prev = ctx.run_copy()
    link = ctx.tmp / "link"
    link.symlink_to(prev)
    prog, argv = _pre(ctx, out=link, overwrite_output_dir="true")
    return prog, argv, "is a symlink"


def case_overwrite_current_directory(ctx):
    work = ctx.tmp / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    ctx.monkeypatch.chdir(work)
    prog, argv = _pre(ctx, out=".", overwrite_output_dir="true")
    return prog, argv, "current directory"


def case_overwrite_parent_of_current_directory(ctx):
    (ctx.tmp / "work" / "sub").mkdir(parents=True)
    ctx.monkeypatch.chdir(ctx.tmp / "work" / "sub")
    prog, argv = _pre(ctx, out=ctx.tmp / "work", overwrite_output_dir="true")
    return prog, argv, "current directory or a folder above it"


def case_overwrite_output_holding_the_model(ctx):
    model = ctx.model_copy(ctx.tmp / "out" / "model")
    return PRETRAIN, pretrain_args(model, ctx.data, ctx.tmp / "out", overwrite_output_dir="true"), \
        "contains the input .*model"


def case_overwrite_output_holding_the_data(ctx):
    (ctx.tmp / "out").mkdir()
    data = ctx.tmp / "out" / "corpus.jsonl"
    shutil.copy(ctx.data, data)
    return PRETRAIN, pretrain_args(ctx.model, data, ctx.tmp / "out", overwrite_output_dir="true"), \
        "contains the input .*corpus.jsonl"


def case_corrupt_model_weights(ctx):
    model = ctx.model_copy()
    flip_byte(model / "model.safetensors", 3)  # the header length: same size, unreadable
    return PRETRAIN, pretrain_args(model, ctx.data, ctx.tmp / "out"), "cannot load the .*model_copy"


def case_truncated_model_weights(ctx):
    model = ctx.model_copy()
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    return PRETRAIN, pretrain_args(model, ctx.data, ctx.tmp / "out"), "cannot load the .*model_copy"


def case_model_config_not_utf8(ctx):
    model = ctx.model_copy()
    (model / "config.json").write_bytes(b'{"model_type": "upcycled_moe", "x": "\xff"}')
    return PRETRAIN, pretrain_args(model, ctx.data, ctx.tmp / "out"), "config.*model_copy|model_copy.*config"


def case_config_override_rejected_by_the_model(ctx):
    prog, argv = _pre(ctx, model_config_overrides="{router_jitter_noise: 2.0}")
    return prog, argv, r"router_jitter_noise must be in \[0, 1\), got 2.0"


def case_train_file_not_utf8(ctx):
    data = ctx.file("bad.jsonl", b'{"text": "caf\xe9 cr\xe8me"}\n' * 20)
    return PRETRAIN, pretrain_args(ctx.model, data, ctx.tmp / "out"), "bad.jsonl holds text that is not valid UTF-8"


def case_resume_same_size_corrupt_weights(ctx):
    prev = ctx.run_copy()
    flip_byte(prev / "checkpoint-4" / "model.safetensors", 20_000)
    prog, argv = _pre(ctx, out=prev, resume="latest")
    return prog, argv, r"checkpoint-4 .*model\.safetensors does not match .*SHA-256.*--resume=.*checkpoint-2"


def case_resume_corrupt_rng_state(ctx):
    prev = ctx.run_copy()
    flip_byte(prev / "checkpoint-4" / "random_states_0.pkl", 40)
    prog, argv = _pre(ctx, out=prev, resume="latest")
    return prog, argv, r"random_states_0\.pkl does not match .*--resume=.*checkpoint-2"


def case_resume_every_checkpoint_corrupt(ctx):
    prev = ctx.run_copy()
    for step in (2, 4):
        flip_byte(prev / f"checkpoint-{step}" / "optimizer.bin", 100)
    prog, argv = _pre(ctx, out=prev, resume="latest")
    return prog, argv, "checkpoint-4 .*optimizer.bin .*no earlier whole checkpoint"


class _Evil:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def case_resume_planted_pickle_is_never_loaded(ctx):
    import torch

    prev = ctx.run_copy()
    _Evil.marker = ctx.tmp / "pwned"  # unpickling would create it (and break the snapshot)
    planted = prev / "checkpoint-4" / "custom_checkpoint_0.pkl"
    torch.save({"state": _Evil()}, planted)
    prog, argv = _pre(ctx, out=prev, resume="latest")
    return prog, argv, r"custom_checkpoint_0\.pkl is a pickle .*--resume=.*checkpoint-2"


def case_permission_denied_creating_the_output(ctx):
    out = ctx.tmp / "out"
    real = os.makedirs

    def makedirs(path, *a, **k):
        if os.path.abspath(path) == str(out):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    ctx.monkeypatch.setattr(os, "makedirs", makedirs)
    prog, argv = _pre(ctx, out=out)
    return prog, argv, f"permission denied: {re.escape(str(out))}"


def case_ft_invalid_yaml(ctx):
    prog, argv = _ft(ctx)
    path = ctx.file("bad.yaml", b"learning_rate: [1e-3,\n")
    return prog, argv + [f"--config={path}"], "bad.yaml is not valid YAML"


def case_ft_yaml_not_utf8(ctx):
    prog, argv = _ft(ctx)
    path = ctx.file("latin1.yaml", b"seed: 1 # caf\xe9")
    return prog, argv + [f"--config={path}"], "latin1.yaml is not UTF-8"


def case_ft_yaml_nan(ctx):
    prog, argv = _ft(ctx)
    path = ctx.file("nan.yaml", b"learning_rate: .nan")
    return prog, argv + [f"--config={path}"], "learning_rate.*finite"


def case_ft_training_arguments_error(ctx):
    prog, argv = _ft(ctx, load_best_model_at_end="true", eval_strategy="no", save_strategy="steps")
    return prog, argv, "load_best_model_at_end requires .*Save strategy"  # the reason, not only the first line


def case_ft_corrupt_model_weights(ctx):
    model = ctx.model_copy()
    flip_byte(model / "model.safetensors", 3)
    return FINETUNE, finetune_args(model, ctx.sft, ctx.tmp / "out"), "cannot load the .*model_copy"


def case_ft_output_is_the_model(ctx):
    model = ctx.model_copy()
    return FINETUNE, finetune_args(model, ctx.sft, model, overwrite_output_dir="true"), "contains the input"


NAN = ["learning_rate", "max_grad_norm", "weight_decay", "router_lr_scale", "adam_epsilon", "min_lr_ratio",
       "validation_split", "dgs_weight_decay", "router_aux_loss_coef", "peak_tflops"]
CASES = {f"nan_{name}": (lambda name: lambda ctx: (*_pre(ctx, **{name: "nan"}), f"{name}.*finite"))(name)
         for name in NAN}
CASES |= {"inf_max_grad_norm": lambda ctx: (*_pre(ctx, max_grad_norm="inf"), "max_grad_norm.*finite"),
          "nan_max_steps": lambda ctx: (*_pre(ctx, max_steps="nan"), "max_steps' must be an integer"),
          "ft_nan_learning_rate": lambda ctx: (*_ft(ctx, learning_rate="nan"), "learning_rate.*finite"),
          "ft_inf_max_grad_norm": lambda ctx: (*_ft(ctx, max_grad_norm="inf"), "max_grad_norm.*finite")}
CASES |= {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_exit_2_and_nothing_changed(case, tmp_path, monkeypatch, capsys, tiny_dir,
                                                                 corpus, sft_data, finished_run):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = Ctx(tmp_path, tiny_dir, corpus, sft_data, finished_run, monkeypatch)
    prog, argv, pattern = CASES[case](ctx)
    roots = [tmp_path, tiny_dir, corpus.parent, sft_data.parent, finished_run]
    before = snapshot(*roots)
    main = continued_pretraining.main if prog == PRETRAIN else finetune.main
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2, err
    assert [line for line in err if "error:" in line] == [err[-1]] and err[-1].startswith(f"{prog}: error: "), err
    assert "Traceback" not in "\n".join(err)
    assert re.search(pattern, err[-1]), err[-1]
    monkeypatch.undo()
    assert snapshot(*roots) == before


@pytest.mark.parametrize("prog,module,extra", [
    (PRETRAIN, "trainer_scripts.continued_pretraining", ["--learning_rate=nan"]),
    (FINETUNE, "trainer_scripts.finetune", ["--max_grad_norm=inf"]),
])
def test_bad_input_through_python_m(tmp_path, tiny_dir, corpus, sft_data, prog, module, extra):
    args = (pretrain_args(tiny_dir, corpus, tmp_path / "out") if prog == PRETRAIN
            else finetune_args(tiny_dir, sft_data, tmp_path / "out"))
    res = subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=REPO_ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert [x for x in lines if "error:" in x] == [lines[-1]] and "finite" in lines[-1], lines
    assert os.listdir(tmp_path) == []


def test_disk_full_at_a_checkpoint_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys, tiny_dir, corpus):
    from accelerate import Accelerator

    def full(self, output_dir, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "model.safetensors"))

    monkeypatch.setattr(Accelerator, "save_state", full)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        continued_pretraining.main([str(a) for a in pretrain_args(tiny_dir, corpus, out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"{PRETRAIN}: error: no space left on the device"), err
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")], os.listdir(out)
    assert not list_checkpoints(str(out)) and not (out / "model.safetensors").exists()


def test_sigterm_mid_run_is_one_error_line_and_leaves_no_temporary_folder(tmp_path, tiny_dir, corpus):
    out = tmp_path / "out"
    args = pretrain_args(tiny_dir, corpus, out, max_steps=400, save_steps=1, save_total_limit=1)
    proc = subprocess.Popen([sys.executable, "-m", "trainer_scripts.continued_pretraining", *args], cwd=REPO_ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(list_checkpoints(str(out))) < 1:
        time.sleep(0.05)
    time.sleep(0.3)  # most likely inside a checkpoint save now (one every step)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, stderr[-2000:]
    assert [x for x in lines if "error:" in x] == [lines[-1]] and "SIGTERM" in lines[-1], lines
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")], os.listdir(out)
    step, path = list_checkpoints(str(out))[-1]
    from trainer_scripts.checkpointing import read_checkpoint

    assert read_checkpoint(path)["step"] == step  # the newest checkpoint is whole
