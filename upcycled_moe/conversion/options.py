"""Every conversion option in one dataclass, validated before any weight is read (mergekit style).

Options come from keyword arguments, from a YAML file (`--config FILE`) or from the command line; unknown keys are
refused with the list of known ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UpcycleError, finite_number, read_utf8, reason

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_topk")
SCALINGS = ("exact", "paper", "calibrated", "none")
DTYPES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

# Router init std: logits std = std * |x|; at |x| ~ sqrt(d) the softmax_topk gain is about 1 + 0.02 at 0.0005 for
# E8G1T2 (method.md table), and the measured perplexity change on SmolLM2-135M is far below 1 % (see README of
# the conversion package / tests). Small but non-zero: a zero router ties every expert and gets no gradient.
DEFAULT_ROUTER_INIT_STD = 0.0005


@dataclass
class UpcycleOptions:
    """How to turn a dense checkpoint into an UpcycledMoe model. Defaults follow the paper (He et al. 2024).

    num_experts: total routed experts per MoE layer (E·G in the paper's notation).
    top_k: experts per token (T).
    granularity: G; each expert has width F/G; with G > 1 the router starts with virtual groups.
    router: routing function (softmax_topk = the paper's softmax-then-top-k).
    router_init_std: std of the router's normal init (small keeps softmax_topk near function-preserving).
    scaling: "exact" (function-preserving placement of the scale), "paper" (s^(1/3) on every expert matrix),
        "calibrated" (exact placement, per-layer scale measured on sample text through the dense model), "none".
    calibration_text / calibration_tokens: text file and token budget for "calibrated" (built-in sample by default).
    drop_ratio: Drop-Upcycling ratio r (floor(r·width) neurons re-drawn per expert); 0 = plain copies.
    noise_std / noise_fraction: Gaussian noise added to a fraction of every routed-expert weight.
    shared_expert: add an always-on shared expert initialised from the dense FFN.
    moe_layers: "all", "every:N" (layers i with (i+1) % N == 0, Qwen-MoE's decoder_sparse_step) or a list of indices.
    dtype: output dtype ("auto" keeps the source's).
    seed: everything random derives from it, per layer and expert, so the result does not depend on order.
    base_model: Hub id credited in the model card (default: the source's Hub id when it has one).
    extra_config: UpcycledMoeConfig training fields to set (router_aux_loss_coef, capacity_factor, ...).
    """

    num_experts: int = 8
    top_k: int = 2
    granularity: int = 1
    router: str = "softmax_topk"
    router_init_std: float = DEFAULT_ROUTER_INIT_STD
    scaling: str = "exact"
    calibration_text: str | None = None
    calibration_tokens: int = 4096
    drop_ratio: float = 0.0
    noise_std: float = 0.0
    noise_fraction: float = 1.0
    shared_expert: bool = False
    moe_layers: Any = "all"
    dtype: str = "auto"
    seed: int = 0
    max_shard_size: Any = "2GB"
    revision: str | None = None
    gguf_file: str | None = None
    allow_bin: bool = False
    overwrite: bool = False
    verify: bool = False
    verify_text: str | None = None
    base_model: str | None = None
    extra_config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict | None = None, **overrides) -> "UpcycleOptions":
        """Build from a mapping (YAML or kwargs); dashes in keys are accepted, unknown keys are refused."""
        merged: dict[str, Any] = {}
        for source in (values or {}), overrides:
            if not isinstance(source, dict):
                raise UpcycleError(f"options must be a mapping of option names to values, got {type(source).__name__}")
            for key, value in source.items():
                merged[str(key).replace("-", "_")] = value
        known = set(cls.field_names())
        unknown = sorted(k for k in merged if k not in known)
        if unknown:
            raise UpcycleError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "UpcycleOptions":
        """Options from a YAML mapping; command-line values given in `overrides` win."""
        return cls.from_dict(read_yaml_mapping(path), **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every option on its own (source-dependent checks happen once the source config is read)."""
        problems: list[str] = []

        def integer(name, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be an integer, got {value!r}")
                return False
            if value < minimum:
                problems.append(f"{name} must be >= {minimum}, got {value}")
                return False
            return True

        def number(name, low, high, low_open=False):
            value = getattr(self, name)
            try:
                finite_number(value, name)
            except UpcycleError as exc:
                problems.append(str(exc))
                return
            if value < low or value > high or (low_open and value == low):
                bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
                problems.append(f"{name} must be in {bound}, got {value}")

        ok_e = integer("num_experts", 1)
        ok_k = integer("top_k", 1)
        ok_g = integer("granularity", 1)
        integer("seed", 0)
        integer("calibration_tokens", 16)
        if ok_e and ok_k and self.top_k > self.num_experts:
            problems.append(f"top_k={self.top_k} is larger than num_experts={self.num_experts}")
        if ok_e and ok_g and self.num_experts % self.granularity:
            problems.append(
                f"num_experts={self.num_experts} must be a multiple of granularity={self.granularity} "
                "(num_experts counts all fine-grained experts, E·G)"
            )
        if ok_k and ok_g and self.granularity > 1 and self.top_k % self.granularity:
            problems.append(
                f"top_k={self.top_k} must be a multiple of granularity={self.granularity} so that top-k selects "
                "whole virtual groups (each token then gets every dense shard top_k/granularity times)"
            )
        if self.router not in ROUTERS:
            problems.append(f"router must be one of {list(ROUTERS)}, got {self.router!r}")
        if self.scaling not in SCALINGS:
            problems.append(f"scaling must be one of {list(SCALINGS)}, got {self.scaling!r}")
        number("router_init_std", 0.0, 10.0, low_open=True)
        number("drop_ratio", 0.0, 1.0)
        number("noise_std", 0.0, 10.0)
        number("noise_fraction", 0.0, 1.0)
        for name in ("shared_expert", "allow_bin", "overwrite", "verify"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.dtype, str) and self.dtype.lower() in DTYPES:
            self.dtype = DTYPES[self.dtype.lower()]
        else:
            problems.append(f"dtype must be one of {sorted(set(DTYPES))}, got {self.dtype!r}")
        try:
            self.moe_layers = normalise_moe_layers(self.moe_layers)
        except UpcycleError as exc:
            problems.append(str(exc))
        try:
            self.max_shard_size = parse_size(self.max_shard_size)
        except UpcycleError as exc:
            problems.append(str(exc))
        for name in ("calibration_text", "verify_text", "revision", "gguf_file", "base_model"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                problems.append(f"{name} must be a string, got {value!r}")
        if not isinstance(self.extra_config, dict):
            problems.append("extra_config must be a mapping of UpcycledMoeConfig fields to values")
        else:
            for key, value in self.extra_config.items():
                if isinstance(value, float) and not math.isfinite(value):
                    problems.append(f"extra_config.{key} must be a finite number, got {value!r}")
        if problems:
            raise UpcycleError("invalid options: " + "; ".join(problems))

    def check_against_source(self, num_layers: int, intermediate_size: int) -> None:
        """The checks that need the source config (never its weights)."""
        if intermediate_size % self.granularity:
            raise UpcycleError(
                f"granularity={self.granularity} does not divide the dense FFN width intermediate_size="
                f"{intermediate_size}: pick a divisor"
            )
        layers = self.resolve_moe_layers(num_layers)
        if not layers:
            raise UpcycleError(f"moe_layers={self.moe_layers!r} selects no layer of the {num_layers}-layer source")

    @property
    def function_preserving(self) -> bool:
        """Whether the MoE is meant to give the dense model's outputs (so `--verify` requires equal greedy text).
        Drop-Upcycling, noise, the paper's equal split, calibrated or no scaling change the function on purpose."""
        return self.scaling == "exact" and self.drop_ratio == 0 and self.noise_std == 0

    @property
    def num_groups(self) -> int:
        """E in the paper's notation: copies of the full dense FFN per layer."""
        return self.num_experts // self.granularity

    def resolve_moe_layers(self, num_layers: int) -> list[int]:
        """The layer indices that become MoE layers."""
        spec = self.moe_layers
        if spec == "all":
            return list(range(num_layers))
        if isinstance(spec, str) and spec.startswith("every:"):
            step = int(spec.split(":", 1)[1])
            return [i for i in range(num_layers) if (i + 1) % step == 0]
        bad = [i for i in spec if i >= num_layers]
        if bad:
            raise UpcycleError(f"moe_layers {bad} out of range: the source has {num_layers} layers (0..{num_layers - 1})")
        return sorted(spec)


def read_yaml_mapping(path: str | Path, what: str = "options file") -> dict:
    """A YAML file holding a mapping (an empty file is an empty mapping); else one line naming the file."""
    import yaml

    path = Path(path)
    text = read_utf8(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UpcycleError(f"{what} {str(path)!r} is not valid YAML: {reason(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UpcycleError(f"{what} {str(path)!r} must hold a mapping of option names to values")
    return data


def normalise_moe_layers(spec) -> str | list[int]:
    """"all", "every:N" / "every-N", "0,2,5" or a list of ints → "all", "every:N" or a sorted list."""
    error = UpcycleError(
        f"moe_layers must be 'all', 'every:N' or a list of layer indices like '0,2,4', got {spec!r}"
    )
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return "all"
        match = re.fullmatch(r"every[:\-_ ]?(\d+)", text)
        if match:
            step = int(match.group(1))
            if step < 1:
                raise error
            return "all" if step == 1 else f"every:{step}"
        try:
            spec = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
        except ValueError:
            raise error from None
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise error
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in spec):
        raise error
    return sorted(set(spec))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value) -> int:
    """"2GB" / "500MiB" / an int number of bytes → bytes (transformers' max_shard_size convention)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _UNITS:
            raise UpcycleError(f"max_shard_size must be a size like '2GB' or '500MiB', got {value!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1024:
        raise UpcycleError(f"max_shard_size must be at least 1KB, got {value!r}")
    return size
