"""Model card (README.md) of a converted folder, rendered from the template in model_cards/.

The template ships inside the package (upcycled_moe/model_cards/upcycled_moe.md, declared in setup.py's package_data)
so it works from an installed wheel; the repository's top-level model_cards/ holds the same file (a test keeps the
two identical). Placeholders are `{{name}}`; an unknown placeholder is an error, not silently left in the card.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .sources import HUB_ID

TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "upcycled_moe.md"

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


def render(template: str, values: dict) -> str:
    def substitute(match):
        key = match.group(1)
        if key not in values:
            raise KeyError(f"model card template uses unknown placeholder {{{{{key}}}}}")
        return str(values[key])

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", substitute, template)


def base_model_id(description: dict, options) -> str | None:
    """The Hub id to credit in `base_model`: the option, else the source's Hub id when it has one (None: unknown,
    and the card leaves `base_model` out rather than write an id the Hub would reject)."""
    for candidate in (options.base_model, description.get("base_model"), description.get("hub_id"),
                      description.get("name_or_path")):
        if candidate and HUB_ID.match(candidate):
            return candidate
    return None


def source_name(description: dict) -> str:
    base = description.get("base_model") or description.get("hub_id")
    if base:
        return base
    path = description.get("path") or description.get("name_or_path")
    return Path(path).name if path else "a dense model"


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
        return shlex.join(["upcycle-moe", "convert", "--config", multi["config_file"], "OUTPUT"])
    source = d.get("embedded") or d.get("hub_id") or d.get("path") or "SOURCE"
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
    from .convert import _tool_version

    d = plan.source.description
    base = base_model_id(d, plan.options)
    name = base or source_name(d)
    options_table = "\n".join(f"| `{k}` | `{v}` |" for k, v in plan.options.to_dict().items() if k != "extra_config")
    values = {
        "base_model_yaml": f"base_model: {base}\n" if base else "",
        "base_model": name,
        "architecture": d.get("architecture", plan.source.model_type),
        "model_name": f"{name.split('/')[-1]} upcycled to "
        f"{plan.options.num_experts} experts (top-{plan.options.top_k})",
        "tool_version": _tool_version(),
        "method": method_text(plan),
        "options_table": options_table,
        "verify": verify_text(verify_results),
        "repo": "path/or/hub-id/of/this/folder",
        "command": command_text(plan),
    }
    return render(template.read_text(encoding="utf-8"), values)
