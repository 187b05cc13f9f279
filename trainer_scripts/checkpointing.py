"""Checkpoints: ``accelerator.save_state`` into a temporary folder, then one atomic rename to
``checkpoint-{step}``; the newest ``save_total_limit`` kept. A folder that exists under a final name is complete
(``training_state.json`` is written last, before the rename). ``--resume`` takes the newest one and refuses a
broken one instead of starting over.

``training_state.json`` records the size and SHA-256 of every file of the checkpoint: sizes catch a truncated
copy, hashes a same-size corruption (accelerate silently skips an unreadable RNG file, and a flipped weight byte
only shows as a traceback or a diverging run). A mismatch names the file and the newest checkpoint that is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil

from .config import ConfigError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
FINAL_TMP_PREFIX = ".tmp-final-"
STATE_FILE = "training_state.json"
RUN_FILE = "run_config.yaml"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of finished checkpoint folders, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def sha256_of(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11; we support 3.10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _problem(path: str) -> str | None:
    """What is wrong with a checkpoint folder (None: whole). Reads every file once to check its hash."""
    if not os.path.isdir(path):
        return "does not exist"
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        int(state["step"])
        files = dict(state["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{STATE_FILE}: {type(e).__name__}"
    planted = sorted(n for n in os.listdir(path) if n.startswith("custom_checkpoint_"))
    if planted:  # accelerate unpickles these with weights_only=False: code execution from a planted file
        return (f"{planted[0]} is a pickle that accelerate would load with weights_only=False and this script never "
                "writes; delete it if you did not put it there")
    for name, expected in sorted(files.items()):
        p = os.path.join(path, name)
        size, digest = (expected, None) if isinstance(expected, int) else (expected.get("size"), expected.get("sha256"))
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return f"{name} is missing or has the wrong size"
        if digest is not None and sha256_of(p) != digest:
            return f"{name} does not match its recorded SHA-256 (corrupted)"
    return None


def _previous_valid(path: str) -> str | None:
    """The newest whole checkpoint older than ``path`` in the same run folder."""
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    step = int(m.group(1)) if m else None
    for s, p in reversed(list_checkpoints(os.path.dirname(os.path.normpath(path)) or ".")):
        if (step is None or s < step) and _problem(p) is None:
            return p
    return None


def read_checkpoint(path: str) -> dict:
    """The training state of a checkpoint folder, after checking that every file is whole. ConfigError if not."""
    if not os.path.isdir(path):
        raise ConfigError(f"resume: checkpoint {path} does not exist")
    problem = _problem(path)
    if problem is not None:
        previous = _previous_valid(path)
        fix = (f"resume from the previous whole checkpoint with --resume={previous}" if previous
               else "no earlier whole checkpoint exists: start a new run in another output_dir")
        raise ConfigError(f"resume: checkpoint {path} is incomplete or corrupt ({problem}); {fix}")
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    state["path"] = path
    state["step"] = int(state["step"])
    return state


def resolve_resume(resume: str, output_dir: str) -> str:
    """The checkpoint folder that ``resume`` names ('latest'/'true' = newest in output_dir)."""
    if str(resume).lower() in ("latest", "true", "yes", "1"):
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(
                f"resume: {output_dir} holds no checkpoint-N folder to resume from (refusing to start over; "
                "drop --resume to start a new run)"
            )
        return found[-1][1]
    return resume


def _manifest(folder: str) -> dict[str, dict]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            files[os.path.relpath(p, folder)] = {"size": os.path.getsize(p), "sha256": sha256_of(p)}
    return files


def write_json_atomic(path: str, obj) -> None:
    with open(path + ".part", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


def save_checkpoint(accelerator, output_dir: str, step: int, extra_state: dict, keep: int, save_extra=None) -> str:
    """Every process calls this. ``save_extra(folder)``, called on every process after ``save_state``, writes
    state that is not accelerate's (it may be collective). Returns the final folder; a failed save (disk full,
    SIGTERM) leaves no temporary folder behind."""
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    if accelerator.is_main_process:
        for name in os.listdir(output_dir):  # leftovers of a save that was killed
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        if save_extra is not None:
            save_extra(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(os.path.join(tmp, STATE_FILE), dict(extra_state, step=step, files=_manifest(tmp)))
            if os.path.exists(final):  # a checkpoint of the same step from an earlier, killed attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(output_dir)
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if accelerator.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def staged_files(out_dir: str, main: bool = True):
    """A temporary folder inside ``out_dir`` (same file system) to write a set of files into; on success each file
    is moved into ``out_dir`` with an atomic rename, on failure the folder is removed. So a crash or a full disk
    never leaves a half-written weight file under its final name. Every process may enter it (same path, for
    savers that are collective); only ``main`` creates, moves and removes."""
    tmp = os.path.join(out_dir, FINAL_TMP_PREFIX + "model")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        os.makedirs(tmp)
    try:
        yield tmp
        if main:
            for root, dirs, names in os.walk(tmp):
                rel = os.path.relpath(root, tmp)
                for d in dirs:
                    os.makedirs(os.path.join(out_dir, rel, d), exist_ok=True)
                for name in names:
                    os.replace(os.path.join(root, name), os.path.join(out_dir, rel, name))
            _fsync_dir(out_dir)
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(out: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse an output folder that writing (and, with ``overwrite``, clearing) would damage something the user
    did not name: the model or data it contains, the current directory or a folder above it, the home folder,
    the root, or the target of a symlink."""
    if not out or not out.strip():
        raise ConfigError("output_dir is empty (an unset shell variable?): name the run folder")
    real = _real(out)
    for path in inputs:
        if not path or not os.path.exists(os.path.expanduser(path)):
            continue
        if _inside(_real(path), real) if overwrite else _real(path) == real:
            raise ConfigError(f"output_dir {out} contains the input {path}: writing the run there would overwrite "
                              "it; use another output_dir")
    if not overwrite:
        return
    if os.path.islink(out.rstrip(os.sep) or out):
        raise ConfigError(f"output_dir {out} is a symlink (to {real}): --overwrite_output_dir would clear the folder "
                          "it points to; name the real folder or another one")
    for what, folder in (("the root folder", "/"), ("your home folder", _real("~")),
                         ("the current directory", os.getcwd())):
        if _inside(_real(folder), real):
            raise ConfigError(f"output_dir {out} is {what} or a folder above it: refusing to clear it with "
                              "--overwrite_output_dir; name a dedicated run folder")


def prepare_output_dir(cfg, fingerprint: dict, inputs: list[str] = ()) -> dict | None:
    """Check output_dir against the run about to start. Returns the training state of the checkpoint to resume
    from (``read_checkpoint``), or None.

    Refuses (ConfigError) a folder that holds another run, a resume with no / a broken checkpoint, a resume
    whose data order would differ, and an output folder ``check_output_dir`` refuses. Writes nothing.
    """
    out = cfg.output_dir
    check_output_dir(out, list(inputs), cfg.overwrite_output_dir and not cfg.resume_requested)
    run_file = os.path.join(out, RUN_FILE)
    exists = os.path.isdir(out) and bool(os.listdir(out))
    if cfg.resume_requested:
        if not os.path.isdir(out) and str(cfg.resume).lower() in ("latest", "true", "yes", "1"):
            raise ConfigError(f"resume: {out} does not exist (refusing to start over; drop --resume to start a new run)")
        path = resolve_resume(cfg.resume, out)
        state = read_checkpoint(path)
        saved = state.get("fingerprint", {})
        diff = sorted(k for k in fingerprint if k in saved and saved[k] != fingerprint[k])
        if diff:
            details = ", ".join(f"{k}: {saved[k]!r} -> {fingerprint[k]!r}" for k in diff)
            raise ConfigError(f"resume: the checkpoint was written with other settings that change the data order or the model ({details})")
        return state
    if exists:
        if cfg.overwrite_output_dir:
            return None
        what = "another run" if os.path.exists(run_file) or list_checkpoints(out) else "other files"
        raise ConfigError(
            f"output_dir {out} already holds {what}: use --resume to continue it, another output_dir, "
            "or --overwrite_output_dir to replace it"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir {out} is a file; name a folder")
    return None


def clear_output_dir(out: str) -> None:
    """Remove what ``out`` holds (links themselves, never what they point to). Only after every check passed."""
    for name in os.listdir(out):
        p = os.path.join(out, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
