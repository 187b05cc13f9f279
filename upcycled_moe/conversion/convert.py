"""Dense → UpcycledMoe: the conversion plan, the offline tool (`upcycle`) and online upcycling (`upcycle_in_memory`).

Both paths build the same plan: one `TensorPlan` per tensor of the MoE state dict (names from docs/contract.md,
checked against the model class instantiated on the meta device), each producing its rows on demand from the dense
source. Offline, the plan is streamed to sharded safetensors; online, it fills an uninitialised model in place.

Shared expert: when enabled it is a copy of the dense FFN. To keep the step-0 output equal to the dense output, the
shared expert's down projection is halved and the routed experts are scaled to half the dense output (s/2 with the
same placement), rather than zeroing the routed experts, which would give the router no gradient at step 0.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

import torch

from .errors import UpcycleError, VerificationFailed, reason, step
from .profiling import profile_session, timed
from .families import dense_config_fields, is_gated
from .methods import (
    ExpertRecipe,
    Multipliers,
    activation_scale,
    build_expert,
    calibrated_scale,
    generator_for,
    place_scale,
    router_weight,
    selected_mass,
    shard_slice,
)
from .options import UpcycleOptions
from .sample_text import calibration_text, read_text
from .sources import DenseSource, open_source
from .writer import AtomicFolder, TensorPlan, check_output, materialise, write_sharded


# UpcycledMoeConfig fields a user may set through `extra_config` (training behaviour; norm_topk_prob also sets the
# activation scale, so it must be chosen here, not changed after the conversion).
EXTRA_CONFIG_FIELDS = (
    "norm_topk_prob",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "router_jitter_noise",
    "capacity_factor",
    "output_router_logits",
)
COPY_CHUNK_BYTES = 16 * 1024 * 1024  # a big embedding is copied in chunks of this size (peak RSS)
SHARED_EXPERT_SHARE = 0.5


def _tool_version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"


def _torch_dtype(name: str, source: DenseSource) -> torch.dtype:
    if name == "auto":
        dtype = source.dtype
        return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass
class ConversionPlan:
    """Everything decided before the first weight is read (except calibration, which runs the dense model)."""

    source: DenseSource
    options: UpcycleOptions
    config: object  # UpcycledMoeConfig
    dtype: torch.dtype
    moe_layers: list[int]
    scales: dict[int, float]
    calibration: dict[int, float] = field(default_factory=dict)
    tensors: list[TensorPlan] = field(default_factory=list)
    # Several sources (multi_source.py); left empty, every expert is a shard of `source`, as in plain upcycling.
    experts: list[ExpertSlot] = field(default_factory=list)
    shared_source: DenseSource | None = None
    averaged: list[DenseSource] = field(default_factory=list)  # non-FFN tensors averaged over these (BTX)
    router_init: str = "upcycle"
    routers: dict[int, torch.Tensor] = field(default_factory=dict)  # precomputed rows (prompt-initialised)

    def expert_slots(self) -> list[ExpertSlot]:
        """Which dense FFN rows each routed expert is built from."""
        if self.experts:
            return self.experts
        width = self.config.intermediate_size
        return [ExpertSlot(self.source, shard_slice(e, self.options.granularity, width))
                for e in range(self.options.num_experts)]


@dataclass(frozen=True)
class ExpertSlot:
    """Routed expert e = rows `rows` of the intermediate dimension of `source`'s FFN (gate/up rows, down columns)."""

    source: DenseSource
    rows: slice


def build_moe_config(source: DenseSource, options: UpcycleOptions, dtype: torch.dtype):
    """The UpcycledMoeConfig for this source and these options (dense part from the family, MoE part from options)."""
    from ..configuration_upcycled_moe import UpcycledMoeConfig
    from ..modeling_upcycled_moe import AUTO_MAP

    fields = dense_config_fields(source.config)
    width, num_layers = fields["intermediate_size"], fields["num_hidden_layers"]
    options.check_against_source(num_layers, width)
    layers = options.resolve_moe_layers(num_layers)
    bad = sorted(set(options.extra_config) - set(EXTRA_CONFIG_FIELDS))
    if bad:
        raise UpcycleError(f"extra_config may only set {list(EXTRA_CONFIG_FIELDS)}, got {bad}")
    fields.update(
        num_experts=options.num_experts,
        num_experts_per_tok=options.top_k,
        moe_intermediate_size=width // options.granularity,
        router_type=options.router,
        mlp_layer_types=["sparse" if i in layers else "dense" for i in range(num_layers)],
        num_shared_experts=1 if options.shared_expert else 0,
        shared_expert_intermediate_size=width,
        **{"norm_topk_prob": False, **options.extra_config},
    )
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the grouped-GEMM multiple-of-8 hint is for training, not conversion
            config = UpcycledMoeConfig(**fields)
    except (ValueError, TypeError, StrictDataclassError) as exc:  # the config is a strict dataclass: wrong types
        raise UpcycleError(f"invalid MoE config: {reason(exc)}") from None
    config.dtype = dtype
    config.architectures = ["UpcycledMoeForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    return config, layers


def layer_router(plan: ConversionPlan, layer: int) -> torch.Tensor:
    """The router of `layer` exactly as stored (in the output dtype).

    upcycle: small normal rows tied in virtual groups (near function-preserving); random: independent normal rows
    of the model's initializer_range (a router meant to be trained); hidden / cheap_embed: rows computed from
    prompts before the plan (multi_source.prompt_routers)."""
    o, cfg = plan.options, plan.config
    if plan.routers:
        return plan.routers[layer].to(plan.dtype)
    if plan.router_init == "random":
        g = generator_for(o.seed, "router-random", layer)
        return router_weight(o.num_experts, 1, cfg.hidden_size, cfg.initializer_range, g).to(plan.dtype)
    g = generator_for(o.seed, "router", layer)
    return router_weight(o.num_experts, o.granularity, cfg.hidden_size, o.router_init_std, g).to(plan.dtype)


def base_scales(options: UpcycleOptions, layers: list[int], norm_topk_prob: bool = False) -> dict[int, float]:
    """Per-layer activation scale s before any calibration (1 for scaling='none')."""
    if options.scaling == "none":
        return {i: 1.0 for i in layers}
    s = activation_scale(options.router, options.num_experts, options.top_k, options.granularity, norm_topk_prob)
    if options.shared_expert:
        s *= 1.0 - SHARED_EXPERT_SHARE
    return {i: s for i in layers}


def plan_conversion(source: DenseSource, options: UpcycleOptions, tokenizer=None, to: str | None = None,
                    before_weights=None) -> ConversionPlan:
    """Config, scales (calibrated if asked) and the list of tensor plans in the model's state-dict order.

    `before_weights(plan)` fills in the multi-source fields and runs the checks that need the config; it is called
    before calibration, the first step that reads weights."""
    dtype = _torch_dtype(options.dtype, source)
    config, layers = build_moe_config(source, options, dtype)
    check_export_target(to, config)
    plan = ConversionPlan(source, options, config, dtype, layers, base_scales(options, layers, config.norm_topk_prob))
    if before_weights is not None:
        before_weights(plan)
    if options.scaling == "calibrated":
        plan.calibration = measure_selected_mass(plan, tokenizer=tokenizer)
        target = 1.0 - SHARED_EXPERT_SHARE if options.shared_expert else 1.0
        plan.scales = {i: target * calibrated_scale(m, options.granularity) for i, m in plan.calibration.items()}
    plan.tensors = tensor_plans(plan)
    return plan


class DenseMlpCache:
    """The dense FFN matrices of one (source, layer), kept while the experts built from it are produced. Only one is
    held at a time, so memory does not grow with the number of sources. In float32 when the experts are computed
    (scaled, re-drawn, noised); in the stored dtype when they are plain copies, which need no arithmetic (a cast
    through float32 would give the same bits, at twice the memory traffic)."""

    def __init__(self, gated: bool, copies_only: bool = False):
        self.gated = gated
        self.copies_only = copies_only
        self.key, self.value = None, None
        self.built, self.built_for = None, None  # the last expert built (shared by its gate_up and down tensors)

    def _read(self, source: DenseSource, name: str) -> torch.Tensor:
        tensor = source.get(name)
        return tensor if self.copies_only else tensor.float()

    def get(self, source: DenseSource, layer: int):
        if self.key != (id(source), layer):
            self.value = None  # free the previous one first
            prefix = f"model.layers.{layer}.mlp."
            gate = self._read(source, prefix + "gate_proj.weight") if self.gated else None
            up = self._read(source, prefix + "up_proj.weight")
            down = self._read(source, prefix + "down_proj.weight")
            self.key, self.value = (id(source), layer), (gate, up, down)
        return self.value


def _copy_producer(source: DenseSource, name: str, dtype: torch.dtype, multiplier: float = 1.0):
    """Copy a dense tensor, in row chunks of at most COPY_CHUNK_BYTES (embeddings can be GBs)."""

    def produce():
        shape = source.shape(name)
        if not shape:
            yield source.get(name).to(dtype).reshape(1)
            return
        step = max(1, COPY_CHUNK_BYTES // (4 * max(1, math.prod(shape[1:]))))
        for start in range(0, shape[0], step):
            with timed("read"):
                chunk = source.get(name, slice(start, min(start + step, shape[0])))
            with timed("cast"):
                if multiplier != 1.0:
                    chunk = chunk.float() * multiplier
                chunk = chunk.to(dtype)
            yield chunk

    return produce


def _average_producer(sources: list[DenseSource], name: str, dtype: torch.dtype):
    """The element-wise mean of one tensor over several sources (Branch-Train-MiX's non-FFN weights), in row chunks:
    one accumulator and one source chunk alive at a time, whatever the number of sources."""

    def produce():
        shape = sources[0].shape(name)
        rows = [None] if not shape else None
        if rows is None:
            step = max(1, COPY_CHUNK_BYTES // (8 * max(1, math.prod(shape[1:]))))
            rows = [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]
        for r in rows:
            total = None
            for src in sources:
                chunk = (src.get(name) if r is None else src.get(name, r)).float()
                total = chunk.clone() if total is None else total.add_(chunk)  # an in-memory source's own tensor
            total /= len(sources)
            yield total.to(dtype).reshape(1) if r is None else total.to(dtype)

    return produce


def tensor_plans(plan: ConversionPlan) -> list[TensorPlan]:
    """One TensorPlan per tensor of the MoE model, in its state-dict order, checked against the model class."""
    from ..modeling_upcycled_moe import UpcycledMoeForCausalLM

    source, o, cfg, dtype = plan.source, plan.options, plan.config, plan.dtype
    gated = is_gated(source.model_type)
    recipes = {
        i: ExpertRecipe(
            granularity=o.granularity,
            multipliers=place_scale(plan.scales[i], o.scaling, gated, cfg.hidden_act),
            drop_ratio=o.drop_ratio,
            noise_std=o.noise_std,
            noise_fraction=o.noise_fraction,
            seed=o.seed,
        )
        for i in plan.moe_layers
    }
    copies_only = all(r.multipliers == Multipliers() and r.drop_ratio == 0 and r.noise_std == 0
                      for r in recipes.values())
    cache = DenseMlpCache(gated, copies_only)
    with torch.device("meta"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = UpcycledMoeForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    del meta
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    dense_names = set(source.names())
    sparse = set(plan.moe_layers)
    plans = []
    for name, shape in expected.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(.+)", name)
        layer = int(m.group(1)) if m else None
        if m and layer in sparse:
            produce = _sparse_producer(plan, cache, recipes[layer], layer, m.group(2), gated)
        elif name in dense_names:
            produce = (_average_producer(plan.averaged, name, dtype) if plan.averaged
                       else _copy_producer(source, name, dtype))
        else:
            raise RuntimeError(f"no rule builds {name}: the model class and the conversion disagree (contract drift)")
        plans.append(TensorPlan(name, shape, dtype, produce))
    return plans


def _cast_stacked(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(1, Σ rows, cols) in `dtype`: the parts cast straight into place (one pass; no float32 concatenation)."""
    out = torch.empty((1, sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=dtype)
    start = 0
    for part in parts:
        out[0, start : start + part.shape[0]].copy_(part)
        start += part.shape[0]
    return out


def _sparse_producer(plan, cache, recipe, layer, leaf, gated):
    """Producers for a sparse layer's router, routed experts (one expert per chunk) and shared expert.

    Without per-expert randomness (no Drop-Upcycling, no noise) the experts built from the same rows of the same
    source are identical, scaled or not: each is built once and the same tensor yielded for every copy (the writer
    checks it once), so N experts cost one build and N writes."""
    dtype, slots = plan.dtype, plan.expert_slots()

    def build(e, slot, which):
        key = None if recipe.per_expert else (id(slot.source), layer, slot.rows.start, slot.rows.stop)
        if key is None or cache.built_for != key:
            cache.built = None
            with timed("read"):
                dense = cache.get(slot.source, layer)
            with timed("build"):
                cache.built, cache.built_for = build_expert(*dense, e, layer, recipe, rows=slot.rows), key
        g, u, d = cache.built
        with timed("cast"):
            return _cast_stacked([g, u] if which == "gate_up_proj" else [u if which == "up_proj" else d], dtype)

    def experts(which):
        def produce():
            built, built_for = None, None
            for e, slot in enumerate(slots):
                key = (id(slot.source), slot.rows.start, slot.rows.stop)
                if recipe.per_expert or key != built_for:
                    built = None  # only one expert's chunk alive while it is written
                    built, built_for = build(e, slot, which), key
                yield built

        return produce

    if leaf == "gate.weight":
        return lambda: iter([layer_router(plan, layer)])
    if leaf in ("experts.gate_up_proj", "experts.up_proj", "experts.down_proj"):
        if (leaf == "experts.gate_up_proj") != gated and leaf != "experts.down_proj":
            raise RuntimeError(f"{leaf} does not match a {'gated' if gated else 'plain'} MLP")
        return experts(leaf.split(".", 1)[1])
    shared = re.fullmatch(r"shared_expert\.(gate_proj|up_proj|down_proj)\.weight", leaf)
    if shared:
        name = f"model.layers.{layer}.mlp.{shared.group(1)}.weight"
        scaled = plan.options.scaling != "none" and shared.group(1) == "down_proj"
        return _copy_producer(plan.shared_source or plan.source, name, dtype, SHARED_EXPERT_SHARE if scaled else 1.0)
    raise RuntimeError(f"no rule builds model.layers.{layer}.mlp.{leaf} (contract drift)")


# ---------------------------------------------------------------------------------------------------- calibration


def _token_batches(tokenizer, text: str, max_tokens: int, length: int = 512) -> list[torch.Tensor]:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:max_tokens]
    return [ids[i : i + length].unsqueeze(0) for i in range(0, ids.numel(), length) if ids[i : i + length].numel() > 1]


@torch.no_grad()
def measure_selected_mass(plan: ConversionPlan, tokenizer=None) -> dict[int, float]:
    """Per MoE layer, the mean over real tokens of the routing weight the initial router gives its top-k.

    Runs the dense model on sample text, captures each layer's FFN input and applies that layer's router (exactly
    as it will be stored). The calibrated s = G / mean makes the mean gain s · E[Σ selected w] / G equal to 1.
    """
    source, o = plan.source, plan.options
    tokenizer = tokenizer or source.load_tokenizer()
    if tokenizer is None:
        raise UpcycleError("scaling='calibrated' needs the source's tokenizer (none found): pass tokenizer=")
    text = read_text(o.calibration_text, calibration_text)
    batches = _token_batches(tokenizer, text, o.calibration_tokens)
    if not batches:
        raise UpcycleError("the calibration text is too short")
    model = source.load_dense_model(torch.float32)
    model.eval()
    routers = {i: layer_router(plan, i).float() for i in plan.moe_layers}
    totals = {i: [0.0, 0] for i in plan.moe_layers}
    hooks = []

    def hook_for(i):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            mass = selected_mass(x @ routers[i].t(), o.router, o.top_k, plan.config.norm_topk_prob)
            totals[i][0] += mass.sum().item()
            totals[i][1] += mass.numel()

        return hook

    try:
        for i in plan.moe_layers:
            hooks.append(model.model.layers[i].mlp.register_forward_pre_hook(hook_for(i)))
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {i: total / count for i, (total, count) in totals.items()}


# ---------------------------------------------------------------------------------------------------- provenance


def provenance(plan: ConversionPlan) -> dict:
    """The config's `upcycling` field: source, every option, the scales used and the tool version. Local paths are
    reduced to file or folder names (model_card.public_record): config.json is published with the weights."""
    from .model_card import public_record

    o = plan.options
    record = {
        "tool": "upcycled-moe",
        "tool_version": _tool_version(),
        "source": dict(plan.source.description),
        "options": json.loads(json.dumps(o.to_dict(), default=str)),
        "moe_layers": plan.moe_layers,
        "activation_scale": {str(i): plan.scales[i] for i in plan.moe_layers},
        "scale_placement": o.scaling,
        "dtype": str(plan.dtype).replace("torch.", ""),
    }
    if plan.calibration:
        record["calibration_mean_selected_mass"] = {str(i): v for i, v in plan.calibration.items()}
    if o.shared_expert:
        record["shared_expert_init"] = (
            f"dense FFN with down_proj x {SHARED_EXPERT_SHARE}; routed experts scaled to the other half"
            if o.scaling != "none"
            else "dense FFN copy (no scaling)"
        )
    return public_record(record)


# ---------------------------------------------------------------------------------------------------- offline tool


def _code_files() -> list[Path]:
    """configuration/modeling files and the sibling modules the modeling file imports relatively."""
    package = Path(__file__).resolve().parent.parent
    files, todo = [], ["configuration_upcycled_moe.py", "modeling_upcycled_moe.py"]
    while todo:
        name = todo.pop()
        path = package / name
        if path in files or not path.is_file():
            continue
        files.append(path)
        for dep in re.findall(r"^\s*from\s+\.(\w+)\s+import", path.read_text(encoding="utf-8"), flags=re.M):
            todo.append(dep + ".py")
    return files


def _say(quiet: bool, message: str):
    if not quiet:
        print(message, flush=True)


def upcycle(source, output, *, quiet: bool = True, tokenizer=None, to: str | None = None, **options) -> Path:
    """Convert a dense checkpoint into an UpcycledMoe folder at `output` (streamed, atomic). Returns the path.

    `options` are UpcycleOptions fields (or pass `options=UpcycleOptions(...)`). `to` writes a stock Mixtral /
    Qwen2-MoE / Qwen3-MoE instead (refused before any weight is read when it cannot express the model). Raises
    UpcycleError on bad input, always before `output` is touched. With `verify=True`, a failed verification raises
    VerificationFailed after the model is written (its card and config record the measurement).
    """
    with profile_session():
        return _upcycle(source, output, quiet=quiet, tokenizer=tokenizer, to=to, **options)


def _upcycle(source, output, *, quiet: bool, tokenizer, to: str | None, **options) -> Path:
    opts = options.pop("options", None)
    opts = UpcycleOptions.from_dict(opts.to_dict() if opts is not None else {}, **options)
    start = time.perf_counter()
    check_export_target(to)
    texts = read_option_texts(opts)
    local = Path(source).expanduser() if isinstance(source, (str, Path)) else None
    source_folder = None
    if local is not None and local.exists():
        source_folder = local if local.is_dir() else local.parent
    out = check_output(output, opts.overwrite, source_folder)
    with step("reading the source"), timed("open the source (config, headers, checks)"):
        src = open_source(source, allow_bin=opts.allow_bin, revision=opts.revision, gguf_file=opts.gguf_file,
                          tokenizer=tokenizer)
    if opts.verify:
        _check_verify_tokenizer(tokenizer or src.load_tokenizer(), texts.get("verify_text"), opts.verify_text)
    with step("planning the conversion"), timed("plan (config, model class on meta)"):
        plan = plan_conversion(src, opts, tokenizer=tokenizer, to=to)
        plan.config.upcycling = provenance(plan)
    _say(quiet, f"upcycling {src.description.get('path') or src.description.get('hub_id') or 'model'} "
                f"({src.model_type}) into {opts.num_experts} experts top-{opts.top_k}, G={opts.granularity}, "
                f"router {opts.router}, scaling {opts.scaling}, {len(plan.tensors)} tensors")
    write_conversion(plan, out, texts=texts, quiet=quiet, to=to)
    _say(quiet, f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return out


def read_option_texts(opts: UpcycleOptions) -> dict[str, str]:
    """The verification and calibration texts, read (and checked) before anything else."""
    with step("reading the text files"):
        return {name: read_text(getattr(opts, name), None) for name in ("verify_text", "calibration_text")
                if getattr(opts, name) is not None}


def check_export_target(to: str | None, config=None) -> None:
    """`to` names a stock target, and (once the config exists) that target can express the model exactly."""
    from .export import TARGETS, inexpressible

    if to is None:
        return
    if to not in TARGETS:
        raise UpcycleError(f"unknown export target {to!r}; choose one of {list(TARGETS)}")
    reasons = inexpressible(config, to) if config is not None else []
    if reasons:
        raise UpcycleError(f"this model cannot be exported to {to} exactly: " + "; ".join(reasons)
                           + " (leave out --to to write an UpcycledMoe model)")


def write_conversion(plan: ConversionPlan, out: Path, *, texts: dict, quiet: bool, to: str | None = None) -> None:
    """Write the planned MoE at `out` (atomically), or export it to the stock `to` through a temporary sibling."""
    opts = plan.options
    if to is None:
        with step(f"writing {out}"), timed("commit (rename into place)"), AtomicFolder(out, opts.overwrite) as tmp:
            failed = _write_moe(plan, tmp, texts, quiet)
    else:
        from .export import export

        with tempfile.TemporaryDirectory(prefix=f".{out.name}.moe-", dir=out.parent) as work:
            with step(f"writing the MoE to export it to {to}"):
                failed = _write_moe(plan, Path(work), texts, quiet)
            with step(f"exporting to {out}"):
                export(work, out, to, overwrite=opts.overwrite, max_shard_size=opts.max_shard_size)
    if failed:
        raise VerificationFailed(f"verify failed: {'; '.join(failed)} (the model was written to {out}; its card "
                                 "records the measurement)")


def _write_moe(plan: ConversionPlan, folder: Path, texts: dict, quiet: bool) -> list[str]:
    """Shards, side files, optional verification and the card into `folder`; returns the failed checks."""
    opts, src = plan.options, plan.source
    done = [0]

    def progress(tensor_plan):
        done[0] += 1
        if not quiet and (done[0] % 50 == 0 or done[0] == len(plan.tensors)):
            print(f"  wrote {done[0]}/{len(plan.tensors)} tensors", flush=True)

    write_sharded(folder, plan.tensors, opts.max_shard_size, progress=progress)
    with timed("side files (config, code, tokenizer)"):
        write_side_files(folder, plan)
    results, failed = None, []
    if opts.verify:
        from .verify import failures, format_report, verify

        _say(quiet, "verifying against the dense model ...")
        with step("verifying the MoE against the dense model"), timed("verify"):
            dense = src.load_dense_model(torch.float32)
            results = verify(dense, folder, text=texts.get("verify_text"), tokenizer=src.load_tokenizer())
        _say(quiet, format_report(results))
        failed = failures(results, require_greedy_match=opts.function_preserving)
        plan.config.upcycling["verify"] = results
        plan.config.save_pretrained(folder)
    with timed("model card"):
        write_model_card(folder, plan, results)
    return failed


def _check_verify_tokenizer(tokenizer, text: str | None, path) -> None:
    """--verify can run: a tokenizer, and a text long enough; checked before the conversion rather than after it."""
    if tokenizer is None:
        raise UpcycleError("--verify needs the source's tokenizer, and none was found next to the weights")
    if text is not None and len(tokenizer(text, add_special_tokens=False).input_ids) < 2:
        raise UpcycleError(f"the verification text {str(path)!r} is too short: it needs at least 2 tokens")


def write_side_files(folder: Path, plan: ConversionPlan) -> None:
    """config.json (with auto_map and provenance), the code files, tokenizer and generation config."""
    from transformers import GenerationConfig

    plan.config.save_pretrained(folder)
    for path in _code_files():
        shutil.copy2(path, folder / path.name)
    plan.source.save_tokenizer(folder)
    gen = plan.source.generation_config()
    if gen is None:
        gen = GenerationConfig.from_model_config(plan.config)
    gen.save_pretrained(folder)


def write_model_card(folder: Path, plan: ConversionPlan, verify_results: dict | None) -> None:
    from .model_card import render_model_card

    (folder / "README.md").write_text(render_model_card(plan, verify_results), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- online


def upcycle_in_memory(source_or_model, model_class=None, tokenizer=None, **options):
    """Online upcycling: the UpcycledMoe model built in memory from a dense path, Hub id, GGUF or model.

    The model is allocated uninitialised in the output dtype and every parameter is filled in place from the plan,
    so no second copy of the MoE is ever made.
    """
    from transformers.initialization import no_init_weights

    if model_class is None:
        from ..modeling_upcycled_moe import UpcycledMoeForCausalLM as model_class
    opts = options.pop("options", None)
    opts = UpcycleOptions.from_dict(opts.to_dict() if opts is not None else {}, **options)
    src = open_source(source_or_model, allow_bin=opts.allow_bin, revision=opts.revision, gguf_file=opts.gguf_file,
                      tokenizer=tokenizer)
    plan = plan_conversion(src, opts, tokenizer=tokenizer)
    plan.config.upcycling = provenance(plan)
    with no_init_weights():
        model = model_class._from_config(plan.config, dtype=plan.dtype)
    state = dict(model.state_dict(keep_vars=True))
    for tensor_plan in plan.tensors:
        target = state[tensor_plan.name]
        with torch.no_grad():
            materialise(tensor_plan, out=target.data)
    if plan.config.tie_word_embeddings:
        model.tie_weights()
    gen = src.generation_config()
    if gen is not None:
        model.generation_config = gen
    model.eval()
    return model


__all__ = ["ConversionPlan", "build_moe_config", "plan_conversion", "upcycle", "upcycle_in_memory"]
