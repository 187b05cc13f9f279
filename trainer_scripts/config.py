"""Options as a dataclass of plain values: defaults < YAML file < ``--key=value`` overrides.

Everything is checked here, before any model or data is touched: unknown keys, wrong types, impossible values.
Errors are :class:`ConfigError` with one line per problem.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A problem with the options or the inputs they name, found before heavy work."""


def one_line(error: BaseException | str) -> str:
    """An exception's whole message on one line: libraries put the reason on later lines, so keep them all."""
    text = str(error) if not isinstance(error, str) else error
    return " ".join(text.split()) or type(error).__name__


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks remove temporary folders."""


def describe_exception(e: BaseException) -> str:
    """One line for an error that no check of ours anticipated (OS, libraries): what and where."""
    import errno

    if isinstance(e, OSError) and e.errno is not None:
        where = " ".join(str(f) for f in (e.filename, e.filename2) if f) or "(no file named)"
        if e.errno == errno.ENOSPC:
            return f"no space left on the device while writing {where}: free space or write elsewhere"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied: {where} ({e.strerror}); fix its permissions or use another path"
        return f"{e.strerror or type(e).__name__}: {where}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not valid UTF-8 text ({one_line(e)}); save it as UTF-8"
    return f"{type(e).__name__}: {one_line(e)} (run with UPCYCLED_MOE_DEBUG=1 for the traceback)"


def run_cli(prog: str, body) -> None:
    """Run a command's ``body()`` so that every failure ends in ONE ``prog: error: ...`` line on stderr and exit
    status 2, SIGTERM included. ``UPCYCLED_MOE_DEBUG=1`` re-raises unexpected errors with their traceback."""
    import signal
    import threading

    def on_sigterm(signum, frame):
        raise Terminated()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    message = None
    try:
        body()
    except ConfigError as e:
        message = str(e)
    except Terminated:
        message = "stopped by SIGTERM; checkpoints written so far are whole (continue with --resume)"
    except KeyboardInterrupt:
        message = "interrupted; checkpoints written so far are whole (continue with --resume)"
    except Exception as e:
        if os.environ.get("UPCYCLED_MOE_DEBUG") == "1":
            raise
        message = describe_exception(e)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if message is not None:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def check_finite(name: str, value: float) -> float:
    """The one NaN/inf check of every float option: NaN passes every `<`/`>` comparison, so range checks cannot
    catch it."""
    if not math.isfinite(value):
        raise ConfigError(f"option {name!r} must be a finite number, got {value!r}")
    return value


def _strip_optional(tp):
    """(base type, optional?) for `X | None` / Optional[X]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def _coerce(name: str, value: Any, tp) -> Any:
    """Convert a value from YAML or the command line to the declared type, or raise ConfigError."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "~")):
        if optional:
            return None
        raise ConfigError(f"option {name!r} cannot be empty")
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):  # e.g. bool | str: keep YAML's own typing
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"option {name!r} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"option {name!r} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {name!r} must be an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"option {name!r} must be an integer, got {value!r}")
        return int(as_float)
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"option {name!r} must be a number, got {value!r}")
        try:
            number = float(value)  # also accepts "1e-4", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise ConfigError(f"option {name!r} must be a number, got {value!r}") from None
        return check_finite(name, number)
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"option {name!r} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        (item_tp,) = typing.get_args(base) or (str,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(f"{name}[]", v, item_tp) for v in value]
    if origin is dict or base is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"option {name!r} is not a valid YAML mapping: {one_line(e)}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"option {name!r} must be a mapping, got {value!r}")
        return dict(value)
    return value


def non_finite_options(*option_objects) -> list[str]:
    """``name must be a finite number`` for every NaN/inf float field of the given dataclasses (also catches values
    set in code or by a library, which ``_coerce`` never saw)."""
    problems = []
    for obj in option_objects:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name} must be a finite number, got {value}")
    return problems


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """``--config FILE`` and ``--key=value`` / ``--key value`` / bare ``--flag`` (= true) pairs; values stay strings."""
    config_file = None
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if config_file is None and arg.endswith((".yaml", ".yml")):
                config_file = arg
                i += 1
                continue
            raise ConfigError(f"unexpected argument {arg!r}: options are written --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        if key == "config":
            config_file = value
        else:
            overrides[key] = value  # a string: converted by the declared type (so "no" stays "no", "1e-4" a float)
        i += 1
    return config_file, overrides


def build_config(cls, argv: list[str] | None = None):
    """Defaults, then the YAML file, then the command-line overrides; unknown keys rejected; validated."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(describe(cls))
        raise SystemExit(0)
    config_file, overrides = parse_overrides(argv)
    values = read_config_file(config_file) if config_file else {}
    values.update(overrides)
    return from_dict(cls, values)


def read_config_file(config_file: str) -> dict[str, Any]:
    """The option: value mapping of a YAML file; ConfigError for a missing, unreadable, non-UTF-8 or invalid file."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {config_file} is not valid YAML: {one_line(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {config_file} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {config_file} cannot be read: {e.strerror or one_line(e)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {config_file} must hold a mapping of option: value")
    return loaded


def from_dict(cls, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown option(s): {', '.join(hints)}; run with --help for the list")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def describe(cls) -> str:
    lines = [f"Options of {cls.__name__} (YAML file via --config FILE, overrides as --key=value):"]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        doc = f.metadata.get("help", "")
        tp = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  --{f.name} ({tp}, default {default!r}) {doc}")
    return "\n".join(lines)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def opt(default, help: str = ""):
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
DATA_EXTENSIONS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".json": "json", ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def expand_data_files(patterns: list[str], what: str) -> list[str]:
    """Globs to existing, non-empty files, in a stable order. ConfigError when missing or empty."""
    import glob

    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise ConfigError(f"{what}: {pattern} does not exist")
        for m in matches:
            if os.path.isdir(m):
                raise ConfigError(f"{what}: {m} is a folder; give files (globs allowed), or dataset_name=FOLDER")
            if os.path.getsize(m) == 0:
                raise ConfigError(f"{what}: {m} is empty")
            files.append(m)
    return files


def data_builder(files: list[str], what: str) -> str:
    kinds = set()
    for f in files:
        name = f[:-3] if f.endswith(".gz") else f
        ext = os.path.splitext(name)[1].lower()
        if ext not in DATA_EXTENSIONS:
            raise ConfigError(
                f"{what}: cannot tell the format of {f} (known endings: {', '.join(sorted(DATA_EXTENSIONS))})"
            )
        kinds.add(DATA_EXTENSIONS[ext])
    if len(kinds) > 1:
        raise ConfigError(f"{what}: files of different formats ({', '.join(sorted(kinds))}); use one format")
    return kinds.pop()


@dataclasses.dataclass
class PretrainConfig:
    """All options of ``continued_pretraining`` (see trainer_scripts/README.md for guidance)."""

    # --- model
    model_name_or_path: str | None = opt(None, "an UpcycledMoe folder, or a dense source (folder / Hub id) with `upcycling` options")
    upcycling: dict | None = opt(None, "online upcycling: options for UpcycledMoeForCausalLM.from_dense (e.g. {num_experts: 8, top_k: 2}); set for a dense source")
    tokenizer_name_or_path: str | None = opt(None, "defaults to the model's folder")
    gguf_file: str | None = opt(None, "a GGUF file inside model_name_or_path (dense source / tokenizer)")
    router_aux_loss_coef: float | None = opt(None, "load-balancing loss weight (None: the model's, 1e-2 by default; paper: 1e-2 to 1e-3)")
    router_z_loss_coef: float | None = opt(None, "router z-loss weight (None: the model's)")
    model_config_overrides: dict = opt({}, "other model config fields to change, e.g. {capacity_factor: 2.0}")
    experts_implementation: str | None = opt(None, "transformers experts kernel: eager, grouped_mm, ... (None: the model's default)")
    attn_implementation: str | None = opt(None, "sdpa, eager, flash_attention_2, ... (None: transformers' default)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (saves memory)")
    torch_compile: bool = opt(False, "compile each decoder layer with torch.compile (regional: quick to compile; each layer is one graph, the fused experts included). Recommended on GPUs")
    torch_compile_backend: str = opt("inductor", "torch.compile backend (inductor; aot_eager to check graphs without code generation)")
    torch_compile_mode: str | None = opt(None, "torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs")
    loss_chunk_size: int = opt(4096, "LM loss from the head in chunks of this many tokens, gradients in the same pass: the (tokens x vocab) logits never exist whole (0 = full logits)")
    # --- data
    train_files: list[str] = opt([], "local .txt/.md, .json/.jsonl, .parquet or .csv files (globs allowed)")
    validation_files: list[str] = opt([], "held-out files; default: validation_split of the training documents")
    dataset_name: str | None = opt(None, "a Hub dataset id, a folder written by save_to_disk, or a folder of data files")
    dataset_config_name: str | None = opt(None, "Hub dataset configuration")
    dataset_split: str = opt("train", "split used for training")
    text_column: str = opt("text", "column holding the text")
    validation_split: float = opt(0.05, "fraction of training documents held out when no validation data is given")
    streaming: bool = opt(False, "stream the data (corpora larger than RAM / disk cache); order = stream order after a shuffle buffer")
    shuffle_buffer_size: int = opt(10000, "streaming: shuffle buffer, in packed blocks (0 = no shuffle)")
    streaming_validation_documents: int = opt(200, "streaming without validation data: first N documents are held out")
    block_size: int = opt(1024, "tokens per training sequence (packed); at most the model's max_position_embeddings")
    preprocessing_num_workers: int | None = opt(None, "processes for tokenisation/packing (datasets.map num_proc)")
    data_cache_dir: str | None = opt(None, "datasets cache folder")
    max_eval_blocks: int = opt(256, "held-out blocks used for perplexity")
    # --- optimisation
    seed: int = opt(42, "seed for the model init, data order and dropout")
    max_steps: int = opt(1000, "optimizer steps")
    micro_batch_size: int = opt(8, "sequences per process per forward pass")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    learning_rate: float = opt(2e-4, "peak LR; the paper resets to the dense model's ORIGINAL peak LR")
    min_lr_ratio: float = opt(0.1, "cosine floor as a fraction of the peak (paper: decay back to the original minimum)")
    warmup_steps: int = opt(100, "linear warmup steps before the cosine decay")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only; norms, biases and the router excluded)")
    router_lr_scale: float = opt(1.0, "router learning rate = learning_rate x this (0 freezes the router)")
    adam_beta1: float = opt(0.9)
    adam_beta2: float = opt(0.95)
    adam_epsilon: float = opt(1e-8)
    fused_adamw: bool | None = opt(None, "fused AdamW kernel (None: when torch supports it on the device)")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    mixed_precision: str = opt("auto", "auto (bf16 where supported on GPU, else no), no, bf16, fp16")
    # --- distributed gradient sparsification (wired by upcycled_moe.dgs; DDP only)
    dgs_density: float | None = opt(None, "DGS: fraction of gradient coordinates sent per step (None = off)")
    dgs_start_step: int = opt(10, "DGS: plain all-reduce before this step")
    dgs_momentum: float = opt(0.9, "DGS: SAMomentum coefficient (kept in the hook; the optimizer becomes plain SGD)")
    dgs_weight_decay: float = opt(0.0, "DGS: L2 decay added to the gradient inside the hook (all parameters)")
    # --- output, logging, checkpoints
    output_dir: str | None = opt(None, "run folder: checkpoints, logs, plots and the final model")
    overwrite_output_dir: bool = opt(False, "delete what output_dir holds and start a new run there")
    resume: str | None = opt(None, "'latest' (or true) = newest checkpoint in output_dir, or a checkpoint folder")
    trust_deepspeed_checkpoint: bool = opt(False, "allow a DeepSpeed resume: DeepSpeed reads its engine state "
                                           "with torch.load(weights_only=False), a pickle; only for checkpoints you wrote")
    save_steps: int = opt(500, "checkpoint (model + optimizer state, to resume) every N steps and at the end; 0 = no "
                               "checkpoints, only the final model folder")
    save_dtype: str = opt("auto", "dtype of the final model folder: auto (the source's: a bfloat16 model stays "
                                  "bfloat16; training itself runs on float32 master weights), float32, bfloat16, float16")
    save_total_limit: int = opt(3, "checkpoints kept (oldest deleted)")
    logging_steps: int = opt(10, "log every N steps")
    eval_steps: int = opt(200, "held-out perplexity every N steps (0 = only before and after)")
    report_to: str = opt("tensorboard", "Accelerate trackers: tensorboard, wandb, ..., all, none")
    run_name: str = opt("continued_pretraining", "tracker project / run name")
    log_expert_load_per_expert: bool = opt(True, "log one scalar per layer x expert (besides per-layer summaries)")
    peak_tflops: float | None = opt(None, "accelerator peak for MFU (None: known GPUs, bf16 dense; no MFU on CPU)")
    trace_data: bool = opt(False, "write the sample indices of every step to data_trace.jsonl (debugging, tests)")
    generate_prompt: str | None = opt(None, "a prompt to complete with the final model (greedy), printed at the end")
    generate_max_new_tokens: int = opt(40)

    @property
    def resume_requested(self) -> bool:
        return self.resume is not None and str(self.resume).lower() not in ("false", "no", "0", "")

    def validate(self) -> None:
        problems = non_finite_options(self)
        if problems:  # NaN slips through every range check below
            raise ConfigError("; ".join(problems))
        if not self.model_name_or_path:
            problems.append("model_name_or_path is required")
        if not self.output_dir:
            problems.append("output_dir is required")
        if not self.train_files and not self.dataset_name:
            problems.append("give training data: train_files=... or dataset_name=...")
        if self.train_files and self.dataset_name:
            problems.append("give either train_files or dataset_name, not both")
        positive = ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "block_size", "logging_steps",
                    "save_total_limit", "max_eval_blocks", "generate_max_new_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_steps", "eval_steps", "shuffle_buffer_size", "dgs_start_step",
                     "streaming_validation_documents", "loss_chunk_size"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) is more than max_steps ({self.max_steps})")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.validation_split < 1:
            problems.append(f"validation_split must be in [0, 1), got {self.validation_split}")
        if self.validation_split == 0 and not self.validation_files and not self.streaming:
            problems.append("validation_split=0 needs validation_files (held-out perplexity is always measured)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.router_lr_scale < 0:
            problems.append("weight_decay, max_grad_norm and router_lr_scale must be >= 0")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.save_dtype not in SAVE_DTYPES:
            problems.append(f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.dgs_density is not None and not 0 < self.dgs_density <= 1:
            problems.append(f"dgs_density must be in (0, 1], got {self.dgs_density}")
        if not 0 <= self.dgs_momentum < 1 or self.dgs_weight_decay < 0:
            problems.append("dgs_momentum must be in [0, 1) and dgs_weight_decay >= 0")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            problems.append("peak_tflops must be > 0")
        if self.torch_compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.torch_compile_backend not in backends:
                problems.append(f"torch_compile_backend must be one of {sorted(backends)}, got {self.torch_compile_backend!r}")
            modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
            if self.torch_compile_mode not in modes:
                problems.append(f"torch_compile_mode must be one of {modes[1:]} (or unset), got {self.torch_compile_mode!r}")
        if self.upcycling is not None and not isinstance(self.upcycling, dict):
            problems.append("upcycling must be a mapping of from_dense options")
        if problems:
            raise ConfigError("; ".join(problems))
