"""UpcycledMoe → a stock Transformers MoE architecture (Mixtral, Qwen2-MoE, Qwen3-MoE), when expressible.

The stock classes load without remote code and are served by vLLM/SGLang. Tensors are written in each family's
original per-expert checkpoint layout (what vLLM reads and what transformers converts on load), streamed one expert
at a time. Scaling lives in the expert weights already, so the stock class computes the same logits. Models the
target cannot express are refused with the reason (never approximated).

Routing equivalences: topk_softmax = softmax, top-k, renormalise = Mixtral's router = Qwen-MoE with
norm_topk_prob=True; softmax_topk = Qwen-MoE with norm_topk_prob=False (or as configured). Qwen2-MoE always has a
shared expert behind a sigmoid gate: a zero gate weight gives sigmoid(0) = 1/2, folded into the shared down_proj as x2;
without a shared expert, its width is 0 (it contributes exactly 0).

What the serving engines' loaders need beyond transformers (docs/serving.md, tests/test_serving_fields.py): vLLM's
Qwen2-MoE always has q/k/v biases (zeros are written when the model has none) and no module for a zero-width shared
expert (no tensors are written for it); SGLang's three classes never tie lm_head to the embedding (lm_head is
written, untied); engines on transformers 4 read rope_theta and Qwen3-MoE's num_experts from config.json, where
transformers 5 writes neither (transformers4_fields adds them).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .errors import UpcycleError
from .sources import TOKENIZER_FILES, SafetensorsFile, read_json
from .writer import AtomicFolder, TensorPlan, check_output, write_sharded

TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe")


class MoeCheckpoint:
    """An UpcycledMoe folder: its config and tensors, read lazily."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "config.json").exists():
            raise UpcycleError(f"{self.folder} is not a model folder (no config.json)")
        raw = read_json(self.folder / "config.json", "config")
        if raw.get("model_type") != "upcycled_moe":
            raise UpcycleError(f"{self.folder} is a {raw.get('model_type')!r} model, not an upcycled_moe one")
        from ..configuration_upcycled_moe import UpcycledMoeConfig

        self.config = UpcycledMoeConfig.from_pretrained(self.folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = dict.fromkeys(read_json(index, "weights index")["weight_map"].values())
            paths = [self.folder / f for f in files]
        elif (self.folder / "model.safetensors").is_file():
            paths = [self.folder / "model.safetensors"]
        else:
            raise UpcycleError(f"{self.folder} has no safetensors weights")
        self.files: dict[str, SafetensorsFile] = {}
        for p in paths:
            st = SafetensorsFile(p)
            self.files.update({name: st for name in st.tensors})

    def shape(self, name):
        return self.files[name].tensors[name][1]

    def dtype(self, name):
        return self.files[name].tensors[name][0]

    def get(self, name, rows=None):
        return self.files[name].read(name, rows)


def inexpressible(config, target: str) -> list[str]:
    """Why `target` cannot represent this model exactly (empty: it can)."""
    c = config
    reasons = []
    if c.router_type == "sigmoid_topk":
        reasons.append("sigmoid_topk routing has no stock equivalent")
    if c.norm_type != "rms":
        reasons.append(f"norm_type {c.norm_type!r} (stock MoE classes use RMSNorm)")
    if not c.mlp_gated:
        reasons.append("plain (ungated) experts: stock MoE classes use gated (SwiGLU-style) experts")
    if c.capacity_factor is not None:
        reasons.append("a capacity factor drops tokens; stock classes are dropless")
    rope = c.rope_parameters or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        reasons.append("partial rotary embeddings")
    sliding = "sliding_attention" in c.layer_types
    if target == "mixtral":
        if c.router_type == "softmax_topk" and not c.norm_topk_prob:
            reasons.append("softmax_topk without renormalisation (Mixtral renormalises the top-k): use qwen2_moe/qwen3_moe")
        if c.attention_bias or c.attention_out_bias:
            reasons.append("attention biases (Mixtral has none)")
        if c.qk_norm:
            reasons.append("q/k norm (Mixtral has none): use qwen3_moe")
        if c.num_shared_experts:
            reasons.append("a shared expert (Mixtral has none): use qwen2_moe")
        if "dense" in c.mlp_layer_types:
            reasons.append("dense (non-MoE) layers (every Mixtral layer is MoE): use qwen2_moe/qwen3_moe")
        if sliding and "full_attention" in c.layer_types:
            reasons.append("mixed sliding/full attention layers")
    elif target == "qwen2_moe":
        if c.qk_norm:
            reasons.append("q/k norm (Qwen2-MoE has none): use qwen3_moe")
        if c.attention_out_bias:
            reasons.append("an o_proj bias (Qwen2-MoE has none)")
    elif target == "qwen3_moe":
        if not c.qk_norm:
            reasons.append("no q/k norm (Qwen3-MoE always normalises q and k): use qwen2_moe")
        if c.attention_bias != c.attention_out_bias:
            reasons.append("q/k/v bias without o_proj bias (Qwen3-MoE has both or neither): use qwen2_moe")
        if c.num_shared_experts:
            reasons.append("a shared expert (Qwen3-MoE has none): use qwen2_moe")
    else:
        reasons.append(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    return reasons


def stock_aux_loss_coef(config) -> float:
    """Our coefficient in the stock classes' convention. transformers' load_balancing_loss_func (Mixtral, Qwen2-MoE,
    Qwen3-MoE) counts top-k slots per token, so its f sums to k; ours is the share of slots (f sums to 1, a balanced
    router scores 1). Its loss is k times ours: dividing the coefficient by k keeps the training term. Exact for one
    sparse layer; with several, it pools f and P over the layers before the product, ours averages per layer."""
    return config.router_aux_loss_coef / config.num_experts_per_tok


def stock_config(config, target: str):
    """The stock config with the same architecture and routing."""
    from transformers import AutoConfig

    c = config
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters or {}),
        attention_dropout=c.attention_dropout,
        tie_word_embeddings=False,  # lm_head is written: SGLang's MoE classes never tie it to the embedding
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        num_experts_per_tok=c.num_experts_per_tok,
        router_aux_loss_coef=stock_aux_loss_coef(c),
        output_router_logits=c.output_router_logits,
    )
    norm = c.router_type == "topk_softmax" or c.norm_topk_prob
    dense_layers = [i for i, t in enumerate(c.mlp_layer_types) if t == "dense"]
    sliding = "sliding_attention" in c.layer_types
    if target == "mixtral":
        fields = dict(common, intermediate_size=c.moe_intermediate_size, num_local_experts=c.num_experts,
                      sliding_window=c.sliding_window if sliding else None,
                      router_jitter_noise=c.router_jitter_noise)
    else:
        fields = dict(common, intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
                      num_experts=c.num_experts, norm_topk_prob=norm, decoder_sparse_step=1,
                      mlp_only_layers=dense_layers, use_sliding_window=sliding,
                      sliding_window=c.sliding_window if sliding else None, layer_types=list(c.layer_types))
        if target == "qwen2_moe":  # q/k/v biases always (zeros without them): vLLM's Qwen2-MoE cannot omit them
            fields.update(qkv_bias=True,
                          shared_expert_intermediate_size=c.num_shared_experts * c.shared_expert_intermediate_size)
        else:
            fields.update(attention_bias=c.attention_bias)
    stock = AutoConfig.for_model(target, **fields)
    stock.architectures = [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                            "qwen3_moe": "Qwen3MoeForCausalLM"}[target]]
    if getattr(c, "upcycling", None):
        from .model_card import public_record  # folders converted before provenance dropped local paths

        stock.upcycling = public_record(dict(c.upcycling, exported_to=target))
    return stock


def transformers4_fields(stock, target: str) -> dict:
    """config.json keys that transformers 5 writes under another name or not at all, as readers on transformers 4
    (vLLM and SGLang releases pinned to it, llama.cpp's converter reading the JSON) expect them. transformers 5 reads
    both spellings to the same value."""
    fields = {}
    if "rope_theta" in (stock.rope_parameters or {}):  # transformers 4 has no rope_parameters: its class default
        fields["rope_theta"] = stock.rope_parameters["rope_theta"]
    if target == "qwen3_moe":  # transformers 5 maps num_experts to num_local_experts; transformers 4 reads num_experts
        fields["num_experts"] = stock.num_experts
    return fields


def export_plans(moe: MoeCheckpoint, target: str) -> list[TensorPlan]:
    """Our tensors renamed / split per expert into the target's original checkpoint layout."""
    c = moe.config
    plans: list[TensorPlan] = []
    block = "block_sparse_moe" if target == "mixtral" else "mlp"
    expert_names = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                    "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[target]
    width = c.moe_intermediate_size

    def copy(name, scale=1.0):
        def produce():
            t = moe.get(name)
            yield t if scale == 1.0 else (t.float() * scale).to(t.dtype)
        return produce

    def expert_part(name, e, part):
        def produce():
            t = moe.get(name, slice(e, e + 1))[0]
            if part == "gate":
                t = t[:width]
            elif part == "up":
                t = t[width:]
            yield t.contiguous()
        return produce

    for name in moe.files:
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(.+)", name)
        if not m or c.mlp_layer_types[int(m.group(1))] == "dense":
            plans.append(TensorPlan(name, moe.shape(name), moe.dtype(name), copy(name)))
            continue
        prefix, leaf = f"model.layers.{m.group(1)}.{block}", m.group(2)
        dtype = moe.dtype(name)
        if leaf == "gate.weight":
            plans.append(TensorPlan(f"{prefix}.gate.weight", moe.shape(name), dtype, copy(name)))
        elif leaf == "experts.gate_up_proj":
            n, _, h = moe.shape(name)
            for e in range(n):
                plans.append(TensorPlan(f"{prefix}.experts.{e}.{expert_names[0]}.weight", (width, h), dtype,
                                        expert_part(name, e, "gate")))
                plans.append(TensorPlan(f"{prefix}.experts.{e}.{expert_names[1]}.weight", (width, h), dtype,
                                        expert_part(name, e, "up")))
        elif leaf == "experts.down_proj":
            n, h, i = moe.shape(name)
            for e in range(n):
                plans.append(TensorPlan(f"{prefix}.experts.{e}.{expert_names[2]}.weight", (h, i), dtype,
                                        expert_part(name, e, "down")))
        elif leaf.startswith("shared_expert."):
            # Qwen2-MoE multiplies the shared expert by sigmoid(gate) = 1/2 with a zero gate: fold x2 into down_proj
            scale = 2.0 if leaf == "shared_expert.down_proj.weight" else 1.0
            plans.append(TensorPlan(f"{prefix}.{leaf}", moe.shape(name), dtype, copy(name, scale)))
        else:
            raise RuntimeError(f"no export rule for {name}")
    embed = "model.embed_tokens.weight"
    dtype = moe.dtype(embed)
    if c.tie_word_embeddings and "lm_head.weight" not in moe.files:
        plans.append(TensorPlan("lm_head.weight", moe.shape(embed), dtype, copy(embed)))
    if target == "qwen2_moe":
        h = c.hidden_size
        for i in range(c.num_hidden_layers):
            if not c.attention_bias:
                for proj, heads in (("q", c.num_attention_heads), ("k", c.num_key_value_heads),
                                    ("v", c.num_key_value_heads)):
                    plans.append(zeros(f"model.layers.{i}.self_attn.{proj}_proj.bias", (heads * c.head_dim,), dtype))
            if c.mlp_layer_types[i] == "sparse":  # the gate only: a zero-width shared expert gets no tensors,
                # vLLM builds no module for it and raises KeyError on their names
                plans.append(zeros(f"model.layers.{i}.mlp.shared_expert_gate.weight", (1, h), dtype))
    return plans


def zeros(name, shape, dtype) -> TensorPlan:
    return TensorPlan(name, shape, dtype, lambda: iter([torch.zeros(shape, dtype=dtype)]))


def export(moe, output, to: str, *, overwrite: bool = False, max_shard_size="2GB", quiet: bool = True) -> Path:
    """Write `moe` (an UpcycledMoe folder) as a stock `to` model at `output`. Refuses what `to` cannot express."""
    from .options import parse_size

    if to not in TARGETS:
        raise UpcycleError(f"unknown export target {to!r}; choose one of {list(TARGETS)}")
    checkpoint = MoeCheckpoint(moe)
    reasons = inexpressible(checkpoint.config, to)
    if reasons:
        raise UpcycleError(f"this model cannot be exported to {to} exactly: " + "; ".join(reasons))
    out = check_output(output, overwrite, checkpoint.folder)
    stock = stock_config(checkpoint.config, to)
    stock.dtype = checkpoint.dtype("model.embed_tokens.weight")
    plans = export_plans(checkpoint, to)
    with AtomicFolder(out, overwrite) as tmp:
        write_sharded(tmp, plans, parse_size(max_shard_size))
        stock.save_pretrained(tmp)
        saved = {**read_json(tmp / "config.json", "config"), **transformers4_fields(stock, to)}
        (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (checkpoint.folder / name).is_file():
                shutil.copy2(checkpoint.folder / name, tmp / name)
        from .model_card import render_export_card, write_card

        write_card(tmp, render_export_card(checkpoint.folder, stock, to))
    if not quiet:
        print(f"wrote {out} ({to}, {len(plans)} tensors)")
    return out
