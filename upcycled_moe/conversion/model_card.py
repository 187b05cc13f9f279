"""Model cards (README.md) of every output: converted folders, stock exports, continued-pretraining and fine-tune runs.

The converted folder's card is rendered from the template in model_cards/. The template ships inside the package
(upcycled_moe/model_cards/upcycled_moe.md, declared in setup.py's package_data) so it works from an installed wheel;
the repository's top-level model_cards/ holds the same file (a test keeps the two identical). Placeholders are
`{{name}}`; an unknown placeholder is an error, not silently left in the card.

Cards and config.json are published on the Hub, so neither may carry a local path: `public_record` reduces every
absolute path to its file or folder name, and sources are named by Hub id where there is one. The metadata is
built by one function (`card_metadata`) through huggingface_hub's ModelCardData, for all four kinds of output.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path, PurePath, PureWindowsPath

from .sources import HUB_ID

TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "upcycled_moe.md"

# The Hub's vocabulary for base_model_relation (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model):
# adapter, merge, quantized, finetune. An upcycled MoE copies ONE dense model's weights into experts and changes them
# (scaled, re-drawn, a router added), later trains them: not an adapter, not a quantisation, and not a merge of
# several models -- "finetune" is the Hub's relation for a model whose weights derive from a single base model (the
# one the Hub infers for such repositories). Experts taken from several models (multi-source, Branch-Train-MiX)
# combine models, as mergekit's MoE merges do: "merge", with every source listed in base_model.
RELATION_SINGLE_SOURCE = "finetune"
RELATION_SEVERAL_SOURCES = "merge"
CARD_BEGIN = "<!-- upcycled-moe:status -->"
CARD_END = "<!-- /upcycled-moe:status -->"

DEFAULT_FLAGS = {
    "num_experts": "--num-experts",
    "top_k": "--top-k",
    "granularity": "--granularity",
    "router": "--router",
    "router_init_std": "--router-init-std",
    "scaling": "--scaling",
    "drop_ratio": "--drop-ratio",
    "noise_std": "--noise-std",
    "dtype": "--dtype",
    "seed": "--seed",
}


# ---------------------------------------------------------------------------------------------------- no local paths


def is_local_path(text: str) -> bool:
    """An absolute or explicitly relative path (a Hub id `owner/name` is neither)."""
    return (os.path.isabs(text) or text.startswith(("~", "./", "../", ".\\", "..\\"))
            or bool(PureWindowsPath(text).drive))


def public_name(text: str) -> str:
    """A path's last component (file or folder name); anything else unchanged."""
    if not is_local_path(text):
        return text
    name = (PureWindowsPath(text) if PureWindowsPath(text).drive else PurePath(os.path.expanduser(text))).name
    return name or text.strip("/\\~.") or "."


def local_name(text: str) -> str:
    """The file or folder name of something that is (or looks like) a local path; a Hub id unchanged."""
    if is_local_path(text) or os.path.exists(text):
        return Path(os.path.normpath(os.path.expanduser(text))).name or text
    return text


def public_record(value):
    """`value` (a provenance record, options, ...) with every local path reduced to its file or folder name: cards
    and config.json go to the Hub, where a home directory or user name is a privacy leak."""
    if isinstance(value, dict):
        return {k: public_record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_record(v) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return public_name(value)
    return value


# ---------------------------------------------------------------------------------------------------- metadata


def hub_ids(*candidates) -> list[str]:
    """The candidates that are Hub ids (`owner/name`, not a local path), deduplicated in order."""
    out = []
    for c in candidates:
        if isinstance(c, str) and HUB_ID.match(c) and not is_local_path(c) and not Path(c).exists() and c not in out:
            out.append(c)
    return out


def source_base_models(upcycling: dict | None) -> list[str]:
    """The Hub ids this model derives from: the `base_model` option, else the source's id (several for multi-source)."""
    if not upcycling:
        return []
    options, source = upcycling.get("options") or {}, upcycling.get("source") or {}
    multi = upcycling.get("multi_source")
    if options.get("base_model"):
        return hub_ids(options["base_model"])
    if multi:
        parts = [multi["base_model"]] + list(multi["experts"]) + ([multi["shared_expert"]] if multi["shared_expert"] else [])
        return hub_ids(*(p.get("base_model") or p["source_model"] for p in parts))
    return hub_ids(source.get("base_model"), source.get("hub_id"), source.get("name_or_path"))


def source_licenses(upcycling: dict | None) -> set[str]:
    if not upcycling:
        return set()
    multi = upcycling.get("multi_source")
    if multi:
        parts = [multi["base_model"]] + list(multi["experts"]) + ([multi["shared_expert"]] if multi["shared_expert"] else [])
        return {p.get("license") for p in parts}
    return {(upcycling.get("source") or {}).get("license")}


def card_metadata(upcycling: dict | None, *, remote_code: bool = True, library_name: str = "transformers",
                  base_model: list[str] | str | None = None, relation: str | None = None, tags=(),
                  datasets: list[str] | None = None):
    """The card's metadata (huggingface_hub.ModelCardData): license carried from the source, base_model and the
    Hub's relation, library, task and tags. Unknown fields are left out rather than guessed (a wrong license or a
    base_model id the Hub does not know is worse than none)."""
    from huggingface_hub import ModelCardData

    bases = [base_model] if isinstance(base_model, str) else list(base_model or source_base_models(upcycling))
    licenses = source_licenses(upcycling)
    source = (upcycling or {}).get("source") or {}
    fields = {
        "license": licenses.pop() if len(licenses) == 1 and None not in licenses else None,
        "language": source.get("language"),
        "library_name": library_name,
        "pipeline_tag": "text-generation",
        "base_model": (bases[0] if len(bases) == 1 else bases) or None,
        "base_model_relation": (relation or (RELATION_SEVERAL_SOURCES if len(bases) > 1 else RELATION_SINGLE_SOURCE))
        if bases else None,
        "datasets": datasets or None,
        "tags": list(dict.fromkeys(["moe", "upcycled", "upcycling", "mixture-of-experts"]
                                   + (["upcycled_moe", "custom_code"] if remote_code else [])
                                   + [t for t in tags if t])),
    }
    return ModelCardData(**{k: v for k, v in fields.items() if v is not None})


def front_matter(data) -> str:
    return "---\n" + data.to_yaml() + "\n---\n"


def card_data_of(text: str):
    """The ModelCardData of a card's text (None: no metadata block)."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    except Exception:  # noqa: BLE001 - a hand-edited card with broken YAML: rebuilt from the provenance instead
        return None
    return card.data if card.data.to_dict() else None


def card_body(text: str) -> str:
    """A card's text without its metadata block."""
    match = re.match(r"^\s*---\s*\n.*?\n---\s*\n", text, flags=re.S)
    return text[match.end():] if match else text


def usage_snippet(repo: str, remote_code: bool) -> str:
    """Loading code that matches the folder. The tokenizer gets trust_remote_code=True too: transformers 5 reads the
    model's config before tokenizer_config.json, and for a custom model type that read asks "run the custom code?
    [y/N]" interactively unless told (the folder cannot avoid it: AutoTokenizer loads AutoConfig first)."""
    trust = ", trust_remote_code=True" if remote_code else ""
    pin = "  # pin revision= when loading remote code from the Hub" if remote_code else ""
    return "\n".join([
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'repo = "{repo}"{pin}',
        f"tokenizer = AutoTokenizer.from_pretrained(repo{trust})",
        f'model = AutoModelForCausalLM.from_pretrained(repo{trust}, dtype="auto")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=30)[0], skip_special_tokens=True))",
        "```",
    ])


REPO_PLACEHOLDER = "path/or/hub-id/of/this/folder"


# ---------------------------------------------------------------------------------------------------- converted folder


def render(template: str, values: dict) -> str:
    def substitute(match):
        key = match.group(1)
        if key not in values:
            raise KeyError(f"model card template uses unknown placeholder {{{{{key}}}}}")
        return str(values[key])

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", substitute, template)


def source_name(description: dict) -> str:
    """How the card names the source: its Hub id, else its file or folder name (never a local path)."""
    base = description.get("base_model") or description.get("hub_id")
    if base:
        return base
    path = description.get("path") or description.get("name_or_path")
    return public_name(path) if path else "a dense model"


def source_note(description: dict) -> str:
    """Said when the source was a quantised GGUF: the experts inherit that file's quantisation error."""
    quant = description.get("quantization")
    if not quant:
        return ""
    original = f", a quantisation of `{description['base_model']}`" if description.get("base_model") else ""
    return (f"\n\nThe source was the **{quant}-quantised GGUF** `{public_name(description.get('path', 'model.gguf'))}`"
            f"{original}, dequantised to float32 by transformers before upcycling: the experts carry that file's "
            "quantisation error, and function preservation is measured against the dequantised model, not the "
            "original full-precision weights.")


def multi_source_text(multi: dict) -> str:
    """The experts' sources and the router's start, for an MoE built from several models."""
    lines = [f"- Experts from several models (gate mode `{multi['gate_mode']}`); attention, embeddings and norms "
             + ("averaged over the expert sources (Branch-Train-MiX)." if multi["base_weights"] == "average"
                else f"from `{multi['base_model']['source_model']}`.")]
    for e, expert in enumerate(multi["experts"]):
        part = f" slice {expert['ffn_slice']}" if expert["ffn_slice"] else ""
        lines.append(f"  - expert(s) {e}: `{expert['source_model']}`{part} x {expert['copies']}")
    if multi["shared_expert"]:
        lines.append(f"- Shared expert from `{multi['shared_expert']['source_model']}` (half the output).")
    return "\n".join(lines)


def method_text(plan) -> str:
    o = plan.options
    multi = (getattr(plan.config, "upcycling", None) or {}).get("multi_source")
    if multi:
        return multi_source_text(multi) + f"\n- {o.num_experts} routed experts, top-{o.top_k}, router `{o.router}`."
    g = o.granularity
    lines = [
        f"- {o.num_experts} routed experts per MoE layer ({o.num_groups} copies of the dense FFN x granularity {g}, "
        f"expert width {plan.config.moe_intermediate_size}), top-{o.top_k}, router `{o.router}`.",
        f"- MoE layers: {plan.moe_layers if len(plan.moe_layers) < len(plan.config.mlp_layer_types) else 'all'}; "
        "every other weight is copied from the dense model.",
    ]
    if g > 1:
        lines.append(
            f"- Virtual-group router initialisation: expert e holds dense shard e mod {g}; the {g} experts of a group "
            "share one router row, so top-k selects whole groups and every token gets each shard "
            f"{o.top_k // g} time(s)."
        )
    lines.append(f"- Router init: normal, std {o.router_init_std}.")
    scales = sorted(set(round(v, 6) for v in plan.scales.values()))
    placement = {
        "exact": "function-preserving placement (gated MLP: up and down x sqrt(s); relu2 MLP: up and down x s^(1/3))",
        "calibrated": "function-preserving placement, s calibrated per layer on sample text so the mean gain is 1",
        "paper": "the paper's equal split, s^(1/3) on every expert matrix",
        "none": "no weight scaling",
    }[o.scaling]
    lines.append(f"- Weight scaling `{o.scaling}`: {placement}; s = {scales[0] if len(scales) == 1 else scales}.")
    if o.drop_ratio > 0:
        lines.append(f"- Drop-Upcycling: {o.drop_ratio:g} of each expert's neurons re-drawn (Nakamura et al. 2025).")
    if o.noise_std > 0:
        lines.append(f"- Noise upcycling: N(0, {o.noise_std:g}^2) added to {o.noise_fraction:g} of expert weights.")
    if o.shared_expert:
        lines.append("- Shared expert initialised from the dense FFN (half the output; routed experts the other half).")
    return "\n".join(lines)


def verify_text(results: dict | None) -> str:
    if not results:
        return "Not run at conversion time (`upcycle-moe verify DENSE MOE` or `convert --verify`)."
    rows = [
        "| metric | value |",
        "|---|---|",
        f"| max abs logit difference | {results['max_abs_logit_diff']:.3g} |",
        f"| mean KL(dense ‖ moe) | {results['mean_kl']:.3g} |",
        f"| perplexity dense | {results['ppl_dense']:.4f} |",
        f"| perplexity MoE | {results['ppl_moe']:.4f} ({100 * (results['ppl_ratio'] - 1):+.2f} %) |",
        f"| greedy answer identical ({results.get('generated_length', results['generated_tokens'])} tokens, to EOS or "
        f"{results['generated_tokens']}) | {results['greedy_match']} |",
    ]
    return f"On {results['tokens']} tokens of held-out text ({results['dtype']}):\n\n" + "\n".join(rows)


def command_text(plan) -> str:
    o, d = plan.options, plan.source.description
    multi = (getattr(plan.config, "upcycling", None) or {}).get("multi_source")
    if multi:
        return shlex.join(["upcycle-moe", "convert", "--config", public_name(multi["config_file"]), "OUTPUT"])
    source = d.get("embedded") or d.get("hub_id") or (public_name(d["path"]) if d.get("path") else "SOURCE")
    parts = ["upcycle-moe", "convert", source, "OUTPUT"]
    for key, flag in DEFAULT_FLAGS.items():
        parts += [flag, str(getattr(o, key))]
    if o.shared_expert:
        parts.append("--shared-expert")
    if o.moe_layers != "all":
        layers = o.moe_layers if isinstance(o.moe_layers, str) else ",".join(map(str, o.moe_layers))
        parts += ["--moe-layers", layers]
    return shlex.join(parts)


def render_model_card(plan, verify_results: dict | None = None, template: Path = TEMPLATE) -> str:
    from .convert import _tool_version, provenance

    d = plan.source.description
    upcycling = getattr(plan.config, "upcycling", None) or provenance(plan)
    bases = source_base_models(upcycling)
    name = bases[0] if len(bases) == 1 else source_name(d)
    options = public_record(plan.options.to_dict())
    options_table = "\n".join(f"| `{k}` | `{v}` |" for k, v in options.items() if k != "extra_config")
    architecture = d.get("architecture", plan.source.model_type)
    values = {
        "metadata": card_metadata(upcycling, tags=[architecture]).to_yaml(),
        "base_model": name,
        "architecture": architecture,
        "model_name": f"{name.split('/')[-1]} upcycled to "
        f"{plan.options.num_experts} experts (top-{plan.options.top_k})",
        "tool_version": _tool_version(),
        "source_note": source_note(d),
        "method": method_text(plan),
        "options_table": options_table,
        "verify": verify_text(verify_results),
        "usage": usage_snippet(REPO_PLACEHOLDER, remote_code=True),
        "command": command_text(plan),
    }
    return render(template.read_text(encoding="utf-8"), values)


# ---------------------------------------------------------------------------------------------------- stock export

STOCK_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}


def render_export_card(moe_folder: Path, stock_config, target: str) -> str:
    """The card of a stock export: the MoE folder's metadata (or, without a card there, the provenance's) with the
    stock library tags, a summary of the model and a usage snippet without remote code."""
    upcycling = getattr(stock_config, "upcycling", None)
    readme = Path(moe_folder) / "README.md"
    data = card_data_of(readme.read_text(encoding="utf-8")) if readme.is_file() else None
    fresh = card_metadata(upcycling, remote_code=False, tags=[target])
    if data is None:
        data = fresh
    else:
        data.tags = [t for t in (data.tags or []) if t not in ("custom_code", "upcycled_moe")] + [target]
        data.library_name, data.pipeline_tag = "transformers", "text-generation"
        for key in ("license", "base_model", "base_model_relation"):
            if getattr(data, key, None) is None and getattr(fresh, key, None) is not None:
                setattr(data, key, getattr(fresh, key))
    c = stock_config
    source = (upcycling or {}).get("source") or {}
    bases = source_base_models(upcycling)
    origin = bases[0] if len(bases) == 1 else source_name(source) if source else "a dense model"
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    lines = [
        front_matter(data).rstrip("\n"), "",
        f"# {origin.split('/')[-1]} upcycled to {experts} experts (top-{c.num_experts_per_tok}), {target} export", "",
        f"A stock `{STOCK_CLASSES[target]}` checkpoint (no remote code) of a Mixture-of-Experts model upcycled from "
        f"`{origin}` with [upcycled-moe](https://pypi.org/project/upcycled-moe/) and exported with "
        f"`upcycle-moe export MOE OUT --to {target}`: the same function as the UpcycledMoe folder it was exported "
        "from, in the layout transformers, vLLM and SGLang load natively." + source_note(source), "",
        "## Model", "",
        f"- {experts} routed experts per MoE layer, top-{c.num_experts_per_tok}, hidden size {c.hidden_size}, "
        f"{c.num_hidden_layers} layers.",
    ]
    options = (upcycling or {}).get("options") or {}
    if options:
        lines.append(f"- Upcycling options: router `{options.get('router')}`, scaling `{options.get('scaling')}`, "
                     f"granularity {options.get('granularity')}, seed {options.get('seed')}.")
    verify = (upcycling or {}).get("verify")
    if verify:
        lines += ["", "## Verification against the dense model (at conversion)", "", verify_text(verify)]
    lines += ["", "## Usage", "", usage_snippet(REPO_PLACEHOLDER, remote_code=False), "", "## Provenance", "",
              "The `upcycling` field of `config.json` records the source, every option and the tool version "
              f"(`exported_to: {target}`)."]
    return "\n".join(lines) + "\n"


def write_card(folder, text: str) -> None:
    """README.md written whole (a temporary file renamed into place)."""
    path = Path(folder) / "README.md"
    part = path.with_name("README.md.part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)
