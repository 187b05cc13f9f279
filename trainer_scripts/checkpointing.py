"""Checkpoints: ``accelerator.save_state`` into a temporary folder, then one atomic rename to
``checkpoint-{step}``; the newest ``save_total_limit`` kept. A folder that exists under a final name is complete
(``training_state.json`` is written last, before the rename). ``--resume`` takes the newest one and refuses a
broken one instead of starting over.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from .config import ConfigError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
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


def read_checkpoint(path: str) -> dict:
    """The training state of a checkpoint folder, after checking that the folder is whole. ConfigError if not."""
    if not os.path.isdir(path):
        raise ConfigError(f"resume: checkpoint {path} does not exist")
    state_path = os.path.join(path, STATE_FILE)
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        step = int(state["step"])
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"resume: checkpoint {path} is incomplete or corrupt ({STATE_FILE}: {type(e).__name__}); "
            "delete it to resume from the one before, or start a new run in another output_dir"
        ) from None
    for name, size in files.items():
        p = os.path.join(path, name)
        if not os.path.exists(p) or (os.path.isfile(p) and os.path.getsize(p) != size):
            raise ConfigError(
                f"resume: checkpoint {path} is incomplete or corrupt ({name} is missing or has the wrong size); "
                "delete it to resume from the one before, or start a new run in another output_dir"
            )
    state["path"] = path
    state["step"] = step
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


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            sizes[os.path.relpath(p, folder)] = os.path.getsize(p)
    return sizes


def save_checkpoint(accelerator, output_dir: str, step: int, extra_state: dict, keep: int) -> str:
    """Every process calls this. Returns the final folder."""
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    if accelerator.is_main_process:
        for name in os.listdir(output_dir):  # leftovers of a save that was killed
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(extra_state, step=step, files=_file_sizes(tmp))
        state_path = os.path.join(tmp, STATE_FILE)
        with open(state_path + ".part", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(state_path + ".part", state_path)
        if os.path.exists(final):  # a checkpoint of the same step from an earlier, killed attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


def prepare_output_dir(cfg, fingerprint: dict) -> dict | None:
    """Check output_dir against the run about to start. Returns the training state of the checkpoint to resume
    from (``read_checkpoint``), or None.

    Refuses (ConfigError) a folder that holds another run, a resume with no / a broken checkpoint, and a resume
    whose data order would differ. Writes nothing.
    """
    out = cfg.output_dir
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
    return None


def clear_output_dir(out: str) -> None:
    for name in os.listdir(out):
        p = os.path.join(out, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
