"""Experts from several dense models of one architecture (Branch-Train-MiX; what mergekit-moe builds).

A YAML file names the base model (attention, embeddings and norms come from it, or from the mean of the expert
sources with `base_weights: average`, as Branch-Train-MiX does), the expert sources (each optionally one FFN slice
and several copies), an optional shared expert and how the routers start (`gate_mode`):

- upcycle: the small tied router of plain upcycling (identical sources give the dense model's function);
- hidden: per expert, the positive minus the negative prompts' normalised mean hidden state at each MoE layer's
  input, run through the base model (its attention, norms and embeddings averaged with `base_weights: average`);
- cheap_embed: the same without attention scores: from the prompts' token embeddings, the layers below run with
  uniform causal attention (each token's values averaged over its prefix) and their dense MLPs;
- random: independent normal rows with the model's initializer_range.

The file is a superset of mergekit-moe's: a mergekit-moe file is accepted as it is, and the keys mergekit has but
this tool does not support are refused by name. Everything is checked (keys, types, sources' architectures,
shapes and vocabularies, prompts) before any weight is read; every error names the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UpcycleError, step
from .families import dense_config_fields
from .model_card import public_record
from .options import UpcycleOptions, read_yaml_mapping

GATE_MODES = ("upcycle", "hidden", "cheap_embed", "random")
BASE_WEIGHTS = ("base", "average")
# mergekit-moe keys (or values) that have no equivalent here: refused by name, never ignored.
MERGEKIT_UNSUPPORTED = {
    "architecture": "the output is an UpcycledMoe model: write a stock one with --to mixtral|qwen2_moe|qwen3_moe",
    "noise_scale": "router noise per expert is not supported: remove it (noise_std adds noise to expert weights)",
    "residual_scale": "scaled experts are not supported: remove it (the shared expert's share is fixed at 1/2)",
}
SPEC_KEYS = ("base_model", "base_weights", "experts", "shared_experts", "gate_mode", "experts_per_token")
EXPERT_KEYS = ("source_model", "copies", "ffn_slice", "positive_prompts", "negative_prompts")
SHARED_KEYS = ("source_model", "positive_prompts", "negative_prompts")
# UpcycleOptions fields that the file's structure decides, with where to say it instead.
SET_BY_SPEC = {
    "num_experts": "the experts list sets it (the sum of their copies): list the experts instead",
    "granularity": "ffn_slice sets it: give each expert ffn_slice: 'j/G'",
    "shared_expert": "name the shared expert's model under shared_experts: [{source_model: ...}]",
    "gguf_file": "name each .gguf file itself as a source_model",
    "verify": "verify compares one dense model with its MoE: run `upcycle-moe verify DENSE MOE` on a source",
    "verify_text": "verify compares one dense model with its MoE: run `upcycle-moe verify DENSE MOE` on a source",
}
# Config fields that may differ between fine-tunes of one base (everything else must match).
MAY_DIFFER = ("pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "attention_dropout")
MAX_PROMPT_TOKENS = 512


@dataclass
class ExpertSpec:
    key: str  # where it is in the file, e.g. "experts[2]"
    source_model: str
    copies: int = 1
    ffn_slice: tuple[int, int] | None = None  # (index j, of G)
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)


@dataclass
class MultiSourceSpec:
    where: str  # the file, for error messages
    base_model: str
    experts: list[ExpertSpec]
    options: UpcycleOptions
    gate_mode: str = "upcycle"
    base_weights: str = "base"
    shared: ExpertSpec | None = None

    @property
    def num_experts(self) -> int:
        return sum(e.copies for e in self.experts)


# ---------------------------------------------------------------------------------------------------- parsing


def is_multi_source(data: dict) -> bool:
    """A config file names its sources when it lists experts (ours and mergekit-moe's files both do)."""
    return "experts" in data


def load_spec(path, **overrides) -> MultiSourceSpec | None:
    """The multi-source spec in a YAML file, or None when the file holds plain options (no `experts`)."""
    data = read_yaml_mapping(path, "config file")
    if not is_multi_source(data):
        return None
    return parse_spec(data, where=str(path), **overrides)


def _fail(where: str, key: str, message: str):
    raise UpcycleError(f"{where}: {key}: {message}")


def _strings(where, key, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(where, key, "must be a list of strings (prompts)")
    for i, prompt in enumerate(value):
        if not prompt.strip():
            _fail(where, f"{key}[{i}]", "is empty: write an example prompt or remove it")
    return list(value)


def _ffn_slice(where, key, value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"index", "of"}:
        j, g = value["index"], value["of"]
    elif isinstance(value, str) and value.count("/") == 1:
        j, g = (part.strip() for part in value.split("/"))
    else:
        _fail(where, key, f"must be 'j/G' (slice j of G equal slices of the FFN width) or {{index: j, of: G}}, "
                          f"got {value!r}")
    try:
        j, g = int(j), int(g)
    except (TypeError, ValueError):
        _fail(where, key, f"must be 'j/G' with integers, got {value!r}")
    if not (g >= 1 and 0 <= j < g):
        _fail(where, key, f"slice {j} of {g} does not exist: use 0 <= j < G")
    return j, g


def _expert(where, key, value, allowed) -> ExpertSpec:
    if isinstance(value, str):
        value = {"source_model": value}
    if not isinstance(value, dict):
        _fail(where, key, "must be a mapping with at least source_model: MODEL")
    for name in value:
        if name in MERGEKIT_UNSUPPORTED:
            _fail(where, f"{key}.{name}", f"not supported: {MERGEKIT_UNSUPPORTED[name]}")
        if name not in allowed:
            _fail(where, f"{key}.{name}", f"unknown key; known keys: {list(allowed)}")
    source = value.get("source_model")
    if not isinstance(source, str) or not source.strip():
        _fail(where, f"{key}.source_model", "is missing: name a model folder, .gguf file or Hub id "
                                            "(LoRA 'model+adapter' references are not supported)")
    if "+" in source and not Path(source).expanduser().exists():
        _fail(where, f"{key}.source_model", f"{source!r} looks like mergekit's 'model+LoRA' reference, which is "
                                            "not supported: merge the adapter into the model first")
    copies = value.get("copies", 1)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        _fail(where, f"{key}.copies", f"must be an integer >= 1, got {copies!r}")
    return ExpertSpec(
        key=key,
        source_model=source,
        copies=copies,
        ffn_slice=_ffn_slice(where, f"{key}.ffn_slice", value.get("ffn_slice")),
        positive_prompts=_strings(where, f"{key}.positive_prompts", value.get("positive_prompts")),
        negative_prompts=_strings(where, f"{key}.negative_prompts", value.get("negative_prompts")),
    )


def parse_spec(data: dict, where: str = "config", **overrides) -> MultiSourceSpec:
    """Check every key of a multi-source file (and the command line's `overrides`) without opening any source."""
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    overrides = {str(k).replace("-", "_"): v for k, v in overrides.items()}
    option_fields = set(UpcycleOptions.field_names()) - set(SET_BY_SPEC) - {"base_model"}
    for key in list(data) + list(overrides):
        label = key if key in data else f"--{key.replace('_', '-')} (command line)"
        if key in MERGEKIT_UNSUPPORTED:
            _fail(where, label, f"not supported: {MERGEKIT_UNSUPPORTED[key]}")
        if key in SET_BY_SPEC:
            _fail(where, label, f"cannot be set with a file that lists experts: {SET_BY_SPEC[key]}")
        if key not in SPEC_KEYS and key not in option_fields:
            _fail(where, label, f"unknown key; known keys: {sorted(set(SPEC_KEYS) | option_fields)}")
    raw_experts = data.get("experts")
    if not isinstance(raw_experts, list) or not raw_experts:
        _fail(where, "experts", "must be a non-empty list of {source_model: MODEL, ...}")
    experts = [_expert(where, f"experts[{i}]", e, EXPERT_KEYS) for i, e in enumerate(raw_experts)]
    shared = data.get("shared_experts")
    if shared is not None:
        if not isinstance(shared, list) or len(shared) != 1:
            _fail(where, "shared_experts", "must be a list of exactly one {source_model: MODEL} (one shared expert "
                                           "is supported)")
        shared = _expert(where, "shared_experts[0]", shared[0], SHARED_KEYS)
    base = data.get("base_model", experts[0].source_model)
    if not isinstance(base, str) or not base.strip():
        _fail(where, "base_model", "must name a model folder, .gguf file or Hub id")
    gate_mode = data.get("gate_mode")
    if gate_mode is None:  # mergekit's default is hidden; without prompts it cannot be
        gate_mode = "hidden" if any(e.positive_prompts for e in experts) else "upcycle"
    if gate_mode not in GATE_MODES:
        _fail(where, "gate_mode", f"must be one of {list(GATE_MODES)}, got {gate_mode!r}")
    base_weights = data.get("base_weights", "base")
    if base_weights not in BASE_WEIGHTS:
        _fail(where, "base_weights", f"must be 'base' (attention, embeddings and norms of base_model) or 'average' "
                                     f"(their mean over the expert sources), got {base_weights!r}")
    _check_prompts(where, gate_mode, experts)
    slices = {e.ffn_slice[1] if e.ffn_slice else 1 for e in experts}
    if len(slices) > 1 or (slices != {1} and any(e.ffn_slice is None for e in experts)):
        _fail(where, "experts", "all experts must have the same width: give every expert an ffn_slice 'j/G' with "
                                "the same G, or none")
    values = {k: v for k, v in data.items() if k in option_fields}
    if "experts_per_token" in data:
        if "top_k" in data:
            _fail(where, "experts_per_token", "and top_k both set: keep one")
        values["top_k"] = data["experts_per_token"]
    values.update(overrides)
    if gate_mode != "upcycle" and "router" not in values:
        values["router"] = "topk_softmax"  # Mixtral's renormalised router: these routers are not near-uniform
    values.update(num_experts=sum(e.copies for e in experts), granularity=slices.pop(),
                  shared_expert=shared is not None)
    try:
        options = UpcycleOptions.from_dict(values)
    except UpcycleError as exc:
        raise UpcycleError(f"{where}: {exc}") from None
    return MultiSourceSpec(where, base, experts, options, gate_mode, base_weights, shared)


def _check_prompts(where, gate_mode, experts):
    if gate_mode not in ("hidden", "cheap_embed"):
        for e in experts:
            if e.positive_prompts or e.negative_prompts:
                _fail(where, f"{e.key}.positive_prompts", f"prompts are only used by gate_mode hidden or "
                                                          f"cheap_embed, and gate_mode is {gate_mode!r}: remove "
                                                          "them or change gate_mode")
        return
    for e in experts:
        if not e.positive_prompts:
            _fail(where, f"{e.key}.positive_prompts", f"gate_mode {gate_mode} needs at least one prompt per "
                                                      "expert showing what it should receive")
    first = (experts[0].positive_prompts, experts[0].negative_prompts)
    if len(experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first for e in experts[1:]):
        _fail(where, "experts", "every expert has the same prompts, so their routers would be identical: give each "
                                "expert prompts of its own domain")


# ---------------------------------------------------------------------------------------------------- sources


def _local_folder(text: str) -> Path | None:
    path = Path(text).expanduser()
    if not path.exists():
        return None
    return path.resolve() if path.is_dir() else path.resolve().parent


def open_sources(spec: MultiSourceSpec) -> dict[str, object]:
    """Every named model opened once (headers and configs only, except GGUF files, which are opened last)."""
    from .sources import open_source

    named = [("base_model", spec.base_model)] + [(f"{e.key}.source_model", e.source_model) for e in spec.experts]
    if spec.shared is not None:
        named.append(("shared_experts[0].source_model", spec.shared.source_model))
    named.sort(key=lambda item: item[1].endswith(".gguf"))  # dequantising reads weights: after the rest is checked
    sources: dict[str, object] = {}
    for key, text in named:
        if text in sources:
            continue
        with step(f"reading {key}"):
            try:
                sources[text] = open_source(text, allow_bin=spec.options.allow_bin, revision=spec.options.revision)
            except UpcycleError as exc:
                raise UpcycleError(f"{spec.where}: {key}: {exc}") from None
    return sources


def _architecture(source) -> dict:
    return {k: v for k, v in dense_config_fields(source.config).items() if k not in MAY_DIFFER}


def vocabulary_fingerprint(source) -> str | None:
    """sha256 of what defines the token ids (vocabulary, merges, added tokens), or None without tokenizer files.
    Chat templates and other tokenizer_config settings may differ between fine-tunes; the ids may not."""
    folder = getattr(source, "folder", None)
    h = hashlib.sha256()
    found = False
    if folder is not None:
        tokenizer_json = Path(folder) / "tokenizer.json"
        if tokenizer_json.is_file():
            from .sources import read_json

            data = read_json(tokenizer_json, "tokenizer")
            added = [(t.get("id"), t.get("content")) for t in data.get("added_tokens") or [] if isinstance(t, dict)]
            h.update(json.dumps([data.get("model"), added], sort_keys=True, default=str).encode())
            found = True
        for name in ("vocab.json", "merges.txt", "tokenizer.model"):
            if (Path(folder) / name).is_file() and not tokenizer_json.is_file():
                h.update(name.encode() + (Path(folder) / name).read_bytes())
                found = True
    else:
        tokenizer = source.load_tokenizer()
        if tokenizer is not None:
            h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
            found = True
    return h.hexdigest() if found else None


def _tokenizer_files_digest(source) -> str | None:
    """sha256 of the tokenizer files' bytes: equal bytes need no vocabulary comparison (which costs seconds for a
    49k-token vocabulary)."""
    folder = getattr(source, "folder", None)
    if folder is None:
        return None
    h = hashlib.sha256()
    found = False
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model"):
        if (Path(folder) / name).is_file():
            h.update(name.encode() + (Path(folder) / name).read_bytes())
            found = True
    return h.hexdigest() if found else None


def check_compatible(spec: MultiSourceSpec, sources: dict) -> None:
    """Every source has the base's architecture, shapes and vocabulary; slices fit the FFN width."""
    base = sources[spec.base_model]
    want = _architecture(base)
    base_files = _tokenizer_files_digest(base)
    base_vocab = None
    entries = [(e.key, e) for e in spec.experts] + ([("shared_experts[0]", spec.shared)] if spec.shared else [])
    for key, entry in entries:
        src = sources[entry.source_model]
        where = f"{spec.where}: {key}.source_model"
        if src is base:
            continue
        if src.model_type != base.model_type:
            raise UpcycleError(f"{where}: {entry.source_model} is a {src.model_type} model and base_model "
                               f"{spec.base_model} a {base.model_type} one: every source must have the base's "
                               "architecture")
        have = _architecture(src)
        diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        if diff:
            k = diff[0]
            raise UpcycleError(f"{where}: {entry.source_model} has {k}={have.get(k)!r} where base_model has "
                               f"{want.get(k)!r} (differs in {diff}): every source must have the base's shapes")
        if base_files is not None and _tokenizer_files_digest(src) == base_files:
            continue
        base_vocab = base_vocab or vocabulary_fingerprint(base)
        vocab = vocabulary_fingerprint(src)
        if vocab is not None and base_vocab is not None and vocab != base_vocab:
            raise UpcycleError(f"{where}: {entry.source_model}'s tokenizer has another vocabulary than base_model "
                               f"{spec.base_model}'s: token ids would mean different things; use fine-tunes of one "
                               "base with its tokenizer")
    width = base.config.intermediate_size
    g = spec.options.granularity
    if width % g:
        first = next(e for e in spec.experts if e.ffn_slice)
        raise UpcycleError(f"{spec.where}: {first.key}.ffn_slice: G={g} does not divide the FFN width "
                           f"intermediate_size={width}: pick a divisor")


def tokenize_prompts(spec: MultiSourceSpec, base) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Expert key -> (positive, negative) token ids of its prompts, through the base model's tokenizer."""
    if spec.gate_mode not in ("hidden", "cheap_embed"):
        return {}
    tokenizer = base.load_tokenizer()
    if tokenizer is None:
        raise UpcycleError(f"{spec.where}: base_model: {spec.base_model} has no tokenizer, and gate_mode "
                           f"{spec.gate_mode} needs one to read the prompts: add its tokenizer files")
    out = {}
    for e in spec.experts:
        lists = []
        for kind, prompts in (("positive_prompts", e.positive_prompts), ("negative_prompts", e.negative_prompts)):
            ids = []
            for i, prompt in enumerate(prompts):
                tokens = tokenizer(prompt, add_special_tokens=False).input_ids[:MAX_PROMPT_TOKENS]
                if not tokens:
                    _fail(spec.where, f"{e.key}.{kind}[{i}]", "gives no tokens: write a longer prompt")
                ids.append(torch.tensor(tokens, dtype=torch.long))
            lists.append(ids)
        out[e.key] = tuple(lists)
    return out


# ---------------------------------------------------------------------------------------------------- routers


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def router_row(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """A unit row pointing towards the positive prompts' mean (and away from the negatives' mean)."""
    row = _unit(positive) if negative is None else _unit(positive) - _unit(negative)
    if row.norm() < 1e-6:
        raise UpcycleError("the positive and negative prompts of an expert give the same mean: make them differ")
    return _unit(row)


@torch.no_grad()
def prompt_model(base, layers: list[int], averaged=()):
    """The dense model the prompts run through: the base, with every weight outside the MoE layers' MLPs replaced
    by its mean over `averaged` (base_weights: average), so attention, norms and embeddings are the output's own.
    The MoE layers' MLPs stay the base's dense MLP: the stand-in for the MoE whose routers are being computed."""
    model = base.load_dense_model(torch.float32)
    model.eval()
    if averaged:
        moe_mlps = tuple(f"model.layers.{i}.mlp." for i in layers)
        for name, param in model.named_parameters():
            if not name.startswith(moe_mlps):
                param.copy_(sum(src.get(name).float() for src in averaged) / len(averaged))
    return model


def embedding_inputs(model, layers: list[int], ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """cheap_embed's stand-in for each MoE layer's input, without attention scores: from the token embeddings, each
    layer below adds its attention output under uniform causal attention (each token's values averaged over its
    prefix: no queries, keys or softmax) and its dense MLP's output; the layer's pre-MLP norm gives the input.

    Raw embeddings are not enough: whatever every token's input has in common moves each expert's logit by a fixed
    amount. On a tiny Llama with attention output biases, rows from raw embeddings sent 96-100 % of the code
    tokens and 76-97 % of the prose tokens to the code expert; on SmolLM2-135M (docs/results.md) 86 % of code and
    74 % of prose tokens. Leaving the MLPs out worked on the tiny model, and on SmolLM2 sent about 90 % of both
    domains to the prose expert."""
    x = model.get_input_embeddings()(ids).float()
    out = {}
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    positions = torch.arange(1, x.shape[0] + 1, dtype=x.dtype).unsqueeze(-1)
    for i, layer in enumerate(model.model.layers[: max(layers) + 1]):
        attn = layer.self_attn
        v = attn.v_proj(layer.input_layernorm(x)).cumsum(0) / positions  # uniform causal attention
        v = v.unflatten(-1, (config.num_key_value_heads, -1)).repeat_interleave(groups, dim=1).flatten(1)
        x = x + attn.o_proj(v)
        h = layer.post_attention_layernorm(x)
        if i in layers:
            out[i] = h.float()
        x = x + layer.mlp(h)
    return out


@torch.no_grad()
def prompt_means(spec: MultiSourceSpec, base, layers: list[int], prompts,
                 averaged=()) -> dict[str, list[dict[int, torch.Tensor]]]:
    """Expert key -> [positive, negative] mean (of per-prompt token means) input vector per MoE layer.

    hidden: each layer's MoE input (the dense MLP's input: after the post-attention norm), the prompts run through
    the model the output has (prompt_model); cheap_embed: embedding_inputs (no attention scores)."""
    model = prompt_model(base, layers, averaged)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if spec.gate_mode == "hidden":
        def hook_for(i):
            def hook(module, args):
                captured[i] = args[0][0].float()
            return hook

        hooks = [model.model.layers[i].mlp.register_forward_pre_hook(hook_for(i)) for i in layers]

    def layer_inputs(ids):
        if spec.gate_mode == "cheap_embed":
            return embedding_inputs(model, layers, ids)
        model(input_ids=ids.unsqueeze(0), use_cache=False)
        return captured

    def mean_of(ids_list):
        sums = {i: 0.0 for i in layers}
        for ids in ids_list:
            inputs = layer_inputs(ids)
            for i in layers:
                sums[i] = sums[i] + inputs[i].mean(0)
        return {i: sums[i] / len(ids_list) for i in layers}

    try:
        return {key: [mean_of(pos), mean_of(neg) if neg else None] for key, (pos, neg) in prompts.items()}
    finally:
        for h in hooks:
            h.remove()


def prompt_routers(spec: MultiSourceSpec, base, layers: list[int], prompts, averaged=()) -> dict[int, torch.Tensor]:
    """(N, d) float32 router per MoE layer; the copies of an expert share its row."""
    means = prompt_means(spec, base, layers, prompts, averaged)
    routers = {}
    for i in layers:
        rows = []
        for e in spec.experts:
            pos, neg = means[e.key]
            try:
                row = router_row(pos[i], neg[i] if neg is not None else None)
            except UpcycleError as exc:
                raise UpcycleError(f"{spec.where}: {e.key}.negative_prompts: {exc} (layer {i})") from None
            rows.extend([row] * e.copies)
        routers[i] = torch.stack(rows)
    return routers


# ---------------------------------------------------------------------------------------------------- conversion


def upcycle_multi(config, output, *, quiet: bool = True, to: str | None = None, **overrides) -> Path:
    """Build an MoE at `output` from the sources a multi-source YAML file (or a parsed spec) names.

    Checks the whole file and every source before any weight is read; then the base model runs the prompts (gate
    modes hidden / cheap_embed) and the tensors are streamed as in single-source conversion."""
    from .convert import ExpertSlot, check_export_target, plan_conversion, provenance, read_option_texts, \
        write_conversion
    from .methods import shard_slice
    from .writer import check_output

    start = time.perf_counter()
    if isinstance(config, MultiSourceSpec):
        spec = config
    else:
        spec = load_spec(config, **overrides)
        if spec is None:
            raise UpcycleError(f"{config}: experts: the file lists no experts; name the sources under experts: "
                               "[{source_model: MODEL}, ...] or pass SOURCE")
    opts = spec.options
    check_export_target(to)
    texts = read_option_texts(opts)
    names = [spec.base_model] + [e.source_model for e in spec.experts]
    names += [spec.shared.source_model] if spec.shared else []
    out = check_output(output, opts.overwrite)
    for folder in dict.fromkeys(_local_folder(n) for n in names):
        if folder is not None:
            check_output(output, opts.overwrite, folder)  # never inside a source, nor holding one
    sources = open_sources(spec)
    check_compatible(spec, sources)
    base = sources[spec.base_model]
    prompts = tokenize_prompts(spec, base)
    width = base.config.intermediate_size

    def fill(plan):
        slots = []
        for e in spec.experts:
            j = e.ffn_slice[0] if e.ffn_slice else 0
            slots += [ExpertSlot(sources[e.source_model], shard_slice(j, opts.granularity, width))] * e.copies
        plan.experts = slots
        plan.shared_source = sources[spec.shared.source_model] if spec.shared else None
        if spec.base_weights == "average":
            plan.averaged = list({id(s): s for s in (sources[e.source_model] for e in spec.experts)}.values())
        plan.router_init = spec.gate_mode
        if prompts:  # the first weights read: everything above is checked
            with step(f"running the {spec.gate_mode} prompts"):
                plan.routers = prompt_routers(spec, base, plan.moe_layers, prompts, plan.averaged)

    with step("planning the conversion"):
        plan = plan_conversion(base, opts, to=to, before_weights=fill)
        plan.config.upcycling = provenance(plan)
        plan.config.upcycling["multi_source"] = public_record(describe(spec, sources))  # no local paths
    _say = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    _say(f"building {spec.num_experts} experts from {len(set(e.source_model for e in spec.experts))} source(s), "
         f"gate_mode {spec.gate_mode}, router {opts.router}, top-{opts.top_k}, base weights {spec.base_weights}")
    write_conversion(plan, out, texts=texts, quiet=quiet, to=to)
    _say(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return out


def describe(spec: MultiSourceSpec, sources: dict) -> dict:
    """Provenance: which model each expert came from (with its fingerprint), the gate mode and the base weights."""
    def source(text):
        d = sources[text].description
        return {"source_model": text, "fingerprint": d.get("fingerprint"), "architecture": d.get("architecture"),
                "base_model": d.get("base_model") or d.get("hub_id"), "license": d.get("license")}

    experts = []
    for e in spec.experts:
        experts.append({**source(e.source_model), "copies": e.copies,
                        "ffn_slice": f"{e.ffn_slice[0]}/{e.ffn_slice[1]}" if e.ffn_slice else None,
                        "positive_prompts": e.positive_prompts, "negative_prompts": e.negative_prompts})
    return {"base_model": source(spec.base_model), "base_weights": spec.base_weights, "gate_mode": spec.gate_mode,
            "experts": experts, "shared_expert": source(spec.shared.source_model) if spec.shared else None,
            "config_file": os.fspath(spec.where)}


__all__ = ["MultiSourceSpec", "load_spec", "parse_spec", "upcycle_multi"]
