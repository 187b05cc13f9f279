"""Bad and hostile input to every conversion command (convert, verify, export, experiment), one class per case.

Every case runs the real entry point and must end in exactly one `error:` line on stderr, exit status 2, and the
file system as it was: same files, same sizes, same modification times, no new folder, no temporary folder left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from upcycled_moe.cli import main

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------- workspace


def snapshot(root: Path) -> dict:
    """Every entry under root: type, size, mtime (ns) and link target; a changed or added entry shows up."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            link = os.readlink(path) if path.is_symlink() else None
            state[str(path.relative_to(root))] = (st.st_mode, st.st_size if not path.is_dir() else 0,
                                                  st.st_mtime_ns, link)
    return state


@pytest.fixture(scope="module")
def tiny_moe(tiny_dense_dirs, tmp_path_factory):
    from upcycled_moe.conversion import upcycle

    return upcycle(tiny_dense_dirs["qwen3"], tmp_path_factory.mktemp("moe") / "moe", num_experts=4, top_k=2,
                   router="topk_softmax")  # Qwen3: exportable to qwen3_moe


@pytest.fixture
def ws(tmp_path, tiny_dense_dirs, tiny_moe, monkeypatch):
    """dense/ (tiny Llama), moe/ (an upcycled tiny Qwen3), cwd/ (the working directory, holding a file), home/ ($HOME),
    keep/ (a user's folder that symlinks point at)."""
    shutil.copytree(tiny_dense_dirs["llama"], tmp_path / "dense")
    shutil.copytree(tiny_moe, tmp_path / "moe")
    for name in ("cwd", "home", "keep"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "precious.txt").write_text("do not delete\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def write(path: Path, data) -> None:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


# ---------------------------------------------------------------------------------------------------- setups


def corrupt_same_size_header(ws):
    p = ws / "dense" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[9:20] = b"\xff" * 11  # inside the JSON header: same size, not JSON any more
    p.write_bytes(bytes(data))


def corrupt_same_size_data(ws):
    p = ws / "dense" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-4096:] = b"\xff" * 4096  # the last tensor's bytes: 0xffffffff is a NaN in float32
    p.write_bytes(bytes(data))


def truncate(path):
    def setup(ws):
        p = ws / path
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return setup


def symlink_output(ws):
    (ws / "link").symlink_to(ws / "keep", target_is_directory=True)


def bad_head_count(ws):
    p = ws / "dense" / "config.json"
    config = json.loads(p.read_text())
    config["num_attention_heads"] = 5  # hidden 64 is not a multiple of 5: transformers' validator says so on line 2
    p.write_text(json.dumps(config))


def other_vocab_dense(ws):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(ws / "dense300")


def disk_full(monkeypatch):
    """Every file the writer opens fails with ENOSPC after 1 KiB, like a full disk."""
    from upcycled_moe.conversion import writer

    class Full:
        def __init__(self, path, mode):
            self.f, self.path, self.left = open(path, mode), path, 1024

        def write(self, data):
            n = len(memoryview(data).cast("B"))
            if n > self.left:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            self.left -= n
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(writer, "open", Full, raising=False)


def read_only_parent(monkeypatch):
    """What a read-only output parent does to the temporary folder (the tests run as root, where chmod is moot)."""
    from upcycled_moe.conversion import writer

    def refuse(**kw):
        raise PermissionError(errno.EACCES, "Permission denied", kw.get("dir"))

    monkeypatch.setattr(writer.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(writer.os, "access", lambda *a, **k: True)  # root passes os.access: exercise the mkdtemp path


def unreadable_weights(monkeypatch):
    import builtins

    real_open = builtins.open

    def guarded(path, *a, **k):
        if str(path).endswith("dense/model.safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    from upcycled_moe.conversion import sources

    monkeypatch.setattr(sources, "open", guarded, raising=False)


def no_hub(monkeypatch):
    """Fail loudly if anything is sent to the Hub (a mistyped local path must never be)."""
    import huggingface_hub

    def called(*a, **k):
        raise AssertionError(f"sent to the Hub: {a}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", called)


# ---------------------------------------------------------------------------------------------------- the table

C, V, E, X = "convert", "verify", "export", "experiment"
CASES = [
    # --- NaN / inf pass every float check
    ("nan-router-std", [C, "{dense}", "{out}", "--router-init-std", "nan"], None, None, "router_init_std"),
    ("nan-drop-ratio", [C, "{dense}", "{out}", "--drop-ratio", "nan"], None, None, "drop_ratio"),
    ("inf-noise-std", [C, "{dense}", "{out}", "--noise-std", "inf"], None, None, "noise_std"),
    ("nan-noise-fraction", [C, "{dense}", "{out}", "--noise-fraction", "nan"], None, None, "noise_fraction"),
    ("yaml-nan", [C, "{dense}", "{out}", "--config", "{ws}/o.yaml"],
     lambda ws: write(ws / "o.yaml", "router_init_std: .nan\n"), None, "router_init_std"),
    ("yaml-inf-extra-config", [C, "{dense}", "{out}", "--config", "{ws}/o.yaml"],
     lambda ws: write(ws / "o.yaml", "extra_config: {router_aux_loss_coef: .inf}\n"), None, "router_aux_loss_coef"),
    ("yaml-wrong-type-extra-config", [C, "{dense}", "{out}", "--config", "{ws}/o.yaml"],
     lambda ws: write(ws / "o.yaml", "extra_config: {norm_topk_prob: maybe}\n"), None, "norm_topk_prob"),
    ("verify-nan-threshold", [V, "{dense}", "{moe}", "--max-logit-diff", "nan"], None, None, "finite"),
    ("verify-inf-threshold", [V, "{dense}", "{moe}", "--max-ppl-increase", "inf"], None, None, "finite"),
    ("experiment-nan", [X, str(REPO / "experiments" / "smoke.yaml"), "--dry-run", "--out", "{out}",
                        "--set", "upcycling.router_init_std=.nan"], None, None, "router_init_std"),
    # --- deleting what the user did not name
    ("symlink-output", [C, "{dense}", "{ws}/link", "--overwrite"], symlink_output, None, "symbolic link"),
    ("empty-output", [C, "{dense}", "", "--overwrite"], None, None, "empty"),
    ("dot-output", [C, "{dense}", ".", "--overwrite"], None, None, "current folder"),
    ("home-output", [C, "{dense}", "{ws}/home", "--overwrite"], None, None, "home folder"),
    ("root-output", [C, "{dense}", "/", "--overwrite"], None, None, "root folder"),
    ("parent-of-cwd", [C, "{dense}", "{ws}", "--overwrite"], None, None, "is or holds the"),
    ("output-is-source", [C, "{dense}", "{dense}", "--overwrite"], None, None, "inside the source"),
    ("output-inside-source", [C, "{dense}", "{dense}/moe", "--overwrite"], None, None, "inside the source"),
    ("output-holds-source", [C, "{ws}/keep/dense", "{ws}/keep", "--overwrite"],
     lambda ws: shutil.copytree(ws / "dense", ws / "keep" / "dense"), None, "inside the output"),
    ("export-symlink-output", [E, "{moe}", "{ws}/link", "--to", "qwen3_moe", "--overwrite"], symlink_output, None,
     "symbolic link"),
    ("export-empty-output", [E, "{moe}", "", "--to", "qwen3_moe", "--overwrite"], None, None, "empty"),
    # --- OS errors: permission denied, disk full
    ("read-only-parent", [C, "{dense}", "{out}"], None, read_only_parent, "Permission denied"),
    ("unreadable-weights", [C, "{dense}", "{out}"], None, unreadable_weights, "Permission denied"),
    ("disk-full", [C, "{dense}", "{out}"], None, disk_full, "No space left on device"),
    ("disk-full-overwrite", [C, "{dense}", "{ws}/keep", "--overwrite"], None, disk_full, "No space left"),
    ("export-disk-full", [E, "{moe}", "{out}", "--to", "qwen3_moe"], None, disk_full, "No space left"),
    ("export-read-only-parent", [E, "{moe}", "{out}", "--to", "qwen3_moe"], None, read_only_parent, "Permission"),
    # --- invalid UTF-8 / YAML / JSON, library validation errors
    ("yaml-not-utf8", [C, "{dense}", "{out}", "--config", "{ws}/o.yaml"],
     lambda ws: write(ws / "o.yaml", b"seed: 1\n# caf\xe9\n"), None, "UTF-8"),
    ("yaml-invalid", [C, "{dense}", "{out}", "--config", "{ws}/o.yaml"],
     lambda ws: write(ws / "o.yaml", "num_experts: [4\n"), None, "not valid YAML"),
    ("verify-text-not-utf8", [C, "{dense}", "{out}", "--verify", "--verify-text", "{ws}/t.txt"],
     lambda ws: write(ws / "t.txt", b"\xff\xfe text"), None, "UTF-8"),
    ("verify-text-missing", [C, "{dense}", "{out}", "--verify", "--verify-text", "{ws}/none.txt"], None, None,
     "does not exist"),
    ("verify-text-empty", [C, "{dense}", "{out}", "--verify", "--verify-text", "{ws}/t.txt"],
     lambda ws: write(ws / "t.txt", "  \n"), None, "empty"),
    ("verify-no-tokenizer", [C, "{dense}", "{out}", "--verify"], None, None, "tokenizer"),
    ("transformers-validation", [C, "{dense}", "{out}"], bad_head_count, None, "not a multiple"),
    ("config-not-json", [C, "{dense}", "{out}"], lambda ws: write(ws / "dense" / "config.json", "{oops"), None,
     "not valid JSON"),
    ("config-not-utf8", [C, "{dense}", "{out}"], lambda ws: write(ws / "dense" / "config.json", b"\xff{}"), None,
     "UTF-8"),
    ("truncated-weights", [C, "{dense}", "{out}"], truncate("dense/model.safetensors"), None, "truncated"),
    ("same-size-corrupt-header", [C, "{dense}", "{out}"], corrupt_same_size_header, None, "corrupt"),
    ("same-size-corrupt-data", [C, "{dense}", "{out}"], corrupt_same_size_data, None, "NaN"),
    ("experiment-yaml-invalid", [X, "{ws}/e.yaml", "--dry-run"], lambda ws: write(ws / "e.yaml", "name: [x\n"),
     None, "YAML"),
    ("experiment-yaml-not-utf8", [X, "{ws}/e.yaml", "--dry-run"], lambda ws: write(ws / "e.yaml", b"name: \xff\n"),
     None, "UnicodeDecodeError"),
    ("experiment-missing", [X, "{ws}/none.yaml", "--dry-run"], None, None, "does not exist"),
    ("export-config-not-json", [E, "{moe}", "{out}", "--to", "qwen3_moe"],
     lambda ws: write(ws / "moe" / "config.json", "{oops"), None, "not valid JSON"),
    ("export-truncated-weights", [E, "{moe}", "{out}", "--to", "qwen3_moe"],
     truncate("moe/model-00001-of-00001.safetensors"), None, "truncated"),
    ("export-bad-shard-size", [E, "{moe}", "{out}", "--to", "qwen3_moe", "--max-shard-size", "lots"], None, None,
     "max_shard_size"),
    # --- verify trusts its inputs
    ("verify-dense-as-moe", [V, "{dense}", "{dense}"], None, None, "not an upcycled_moe"),
    ("verify-vocab-mismatch", [V, "{ws}/dense300", "{moe}"], other_vocab_dense, None, "vocabulary"),
    ("verify-negative-tokens", [V, "{dense}", "{moe}", "--generate-tokens", "-3"], None, None, "at least 1"),
    ("verify-zero-max-tokens", [V, "{dense}", "{moe}", "--max-tokens", "0"], None, None, "at least 2"),
    ("verify-text-not-utf8", [V, "{dense}", "{moe}", "--text", "{ws}/t.txt"],
     lambda ws: write(ws / "t.txt", b"\xff\xfe"), None, "UTF-8"),
    ("verify-truncated-moe", [V, "{dense}", "{moe}"], truncate("moe/model-00001-of-00001.safetensors"), None,
     "truncated"),
    ("verify-moe-config-not-json", [V, "{dense}", "{moe}"], lambda ws: write(ws / "moe" / "config.json", "{"),
     None, "not valid JSON"),
    # --- mistyped local paths never go to the Hub
    ("typo-dot-slash", [C, "./my-modle", "{out}"], None, no_hub, "does not exist"),
    ("typo-absolute", [C, "/abs/missing", "{out}"], None, no_hub, "does not exist"),
    ("typo-dot-dot", [C, "../x", "{out}"], None, no_hub, "does not exist"),
    ("typo-existing-parent", [C, "precious.txt/model", "{out}"], None, no_hub, "does not exist"),
    ("verify-typo-dense", [V, "./my-modle", "{moe}"], None, no_hub, "does not exist"),
    ("verify-typo-moe", [V, "{dense}", "./my-moe"], None, no_hub, "no such folder"),
]


@pytest.mark.parametrize("argv,setup,patch,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_changed(ws, capsys, monkeypatch, argv, setup, patch,
                                                                 needle):
    if setup is not None:
        setup(ws)
    if patch is not None:
        patch(monkeypatch)
    values = {"ws": ws, "dense": ws / "dense", "moe": ws / "moe", "out": ws / "out"}
    argv = [a.format(**values) for a in argv]
    before = snapshot(ws)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert needle in lines[0], lines[0]
    assert snapshot(ws) == before, f"the file system changed: {lines[0]}"


# ---------------------------------------------------------------------------------------------------- subprocesses


def run_cli(*argv, env=None, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "upcycled_moe.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kw)


def test_subprocess_exit_status_and_one_line(ws):
    done = run_cli("convert", ws / "dense", ws / "out", "--router-init-std", "nan", cwd=ws / "cwd")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert not (ws / "out").exists()


def test_fifo_as_weight_file_is_refused_not_read(ws):
    """A FIFO blocks open() until a writer appears: it must be refused from its stat, never opened."""
    (ws / "dense" / "model.safetensors").unlink()
    os.mkfifo(ws / "dense" / "model.safetensors")
    (ws / "gguf").mkdir()
    os.mkfifo(ws / "gguf" / "model.gguf")
    before = snapshot(ws)
    for source in (ws / "dense", ws / "gguf" / "model.gguf"):
        done = run_cli("convert", source, ws / "out", timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "FIFO" in done.stderr, done.stderr
    assert snapshot(ws) == before


def test_unexpected_exception_is_one_line_with_the_step_and_debug_shows_the_traceback(ws):
    code = ("import sys, upcycled_moe.conversion.convert as c\n"
            "def boom(*a, **k): raise RuntimeError('planner exploded\\nsecond line')\n"
            "c.plan_conversion = boom\n"
            "from upcycled_moe.cli import main\n"
            f"sys.exit(main(['convert', {str(ws / 'dense')!r}, {str(ws / 'out')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "error: RuntimeError: planner exploded second line (while planning the conversion)" in done.stderr
    debug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "UPCYCLED_MOE_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not (ws / "out").exists() and not list(ws.glob(".out.*"))


def test_sigterm_during_the_write_removes_the_temporary_folder(ws):
    """The writer is slowed down (it announces itself, then sleeps) so the signal lands mid-write."""
    code = ("import sys, time, upcycled_moe.conversion.convert as c\n"
            "real = c.write_sharded\n"
            "def slow(folder, *a, **k):\n"
            "    real(folder, *a, **k); print('WRITING', flush=True); time.sleep(60)\n"
            "c.write_sharded = slow\n"
            "from upcycled_moe.cli import main\n"
            f"sys.exit(main(['convert', {str(ws / 'dense')!r}, {str(ws / 'keep')!r}, '--overwrite', '--quiet']))\n")
    before = snapshot(ws)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        assert list(ws.glob(".keep.tmp-*")), "the temporary folder should exist mid-write"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and err.count("\n") == 1 and "SIGTERM" in err, err
    assert snapshot(ws) == before  # old output intact, no temporary folder left


# ---------------------------------------------------------------------------------------------------- atomic writes


def test_overwrite_replaces_the_output_atomically(ws, monkeypatch):
    """The old output survives a failure of the final rename; after success only the new content remains."""
    from upcycled_moe.conversion import writer

    real_replace = os.replace
    calls = []

    def failing_second(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old renamed away; the new one fails to come in
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", failing_second)
    before = snapshot(ws)
    assert main(["convert", str(ws / "dense"), str(ws / "keep"), "--overwrite", "--quiet"]) == 2
    assert snapshot(ws) == before
    monkeypatch.setattr(writer.os, "replace", real_replace)
    assert main(["convert", str(ws / "dense"), str(ws / "keep"), "--overwrite", "--quiet"]) == 0
    assert not (ws / "keep" / "precious.txt").exists() and (ws / "keep" / "config.json").is_file()
    assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".")) == []


def test_verify_failures_policy():
    from upcycled_moe.conversion.verify import failures

    results = {"cache_consistent": True, "greedy_match": False, "generated_tokens": 3, "max_abs_logit_diff": 0.0,
               "ppl_ratio": 1.0}
    assert failures(results) and not failures(results, require_greedy_match=False)
    assert failures(dict(results, greedy_match=True, cache_consistent=False), require_greedy_match=False)
    assert failures(dict(results, greedy_match=True, max_abs_logit_diff=float("nan")), max_logit_diff=1.0)


def test_verify_exits_1_when_the_greedy_text_differs(ws, capsys, smollm2_tokenizer_dir):
    """A random MoE is not an upcycling of the dense model: `verify` used to exit 0 on it."""
    from conftest import make_tiny_moe_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    moe = make_tiny_moe_dir(ws / "random_moe", smollm2_tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 initializer_range=1.0)  # far from the MoE's small-init logits
                     ).save_pretrained(ws / "dense_tok")
    tok.save_pretrained(ws / "dense_tok")
    capsys.readouterr()
    argv = ["verify", str(ws / "dense_tok"), str(moe), "--max-tokens", "16", "--generate-tokens", "4"]
    assert main(argv) == 1, capsys.readouterr()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: verify failed:") and "greedy answer differs" in err[0], err
    assert main([*argv, "--allow-greedy-mismatch"]) == 0
