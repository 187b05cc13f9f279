"""UpcycledMoe: a decoder-only sparse Mixture-of-Experts model upcycled from a dense Llama/Mistral/Qwen/Nemotron.

One model, one file, read top to bottom: rotary helpers, norms, attention, dense MLP, router, experts, sparse MoE
block, decoder layer, pre-trained model, model, losses, causal-LM head. Shipped as remote code next to the weights,
so it imports only torch and transformers (and its sibling files, relatively).
"""

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import wraps

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_upcycled_moe import UpcycledMoeConfig

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (argument, output field, mask helpers) and warns
# on the old name; 5.17-5.23 know only the old one. A folder on the Hub keeps this file for years, so the model accepts
# both names from its callers and speaks to transformers in the installed release's own vocabulary.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(MoeModelOutputWithPast)} else "past_key_values"
MASK_CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def one_cache(cache, past_key_values):
    """The KV cache a caller passed under either name (`cache` from 5.24's generate, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values` (its pre-5.24 name), not both")
    return cache if cache is not None else past_key_values


try:  # optional fused experts path (Triton / grouped GEMM); the model works without it
    from .fused_moe import fused_experts_forward

    ALL_EXPERTS_FUNCTIONS.register("upcycled_fused", fused_experts_forward)
except ImportError:
    fused_experts_forward = None


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (full or partial, as in Nemotron)
# ----------------------------------------------------------------------------------------------------------------
def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Rotates the first cos.shape[-1] channels of each head; the rest pass through (partial rotary)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_rot = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_rot = (k_rot * cos) + (rotate_half(k_rot) * sin)
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)


class UpcycledMoeRotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: UpcycledMoeConfig, device=None):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        position_ids = position_ids[:, None, :].float()
        device_type = x.device.type if isinstance(x.device.type, str) and x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv_freq.float() @ position_ids.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------------------------
class UpcycledMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class UpcycledMoeLayerNorm1P(nn.LayerNorm):
    """Nemotron's LayerNorm: the stored weight is an offset from 1 (zero-centred gamma)."""

    def forward(self, hidden_states):
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            return F.layer_norm(hidden_states, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


def make_norm(config: UpcycledMoeConfig, size: int) -> nn.Module:
    if config.norm_type == "layernorm1p":
        return UpcycledMoeLayerNorm1P(size, eps=config.rms_norm_eps)
    return UpcycledMoeRMSNorm(size, eps=config.rms_norm_eps)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class UpcycledMoeAttention(nn.Module):
    """GQA self-attention with the source families' variations: q/k/v/o biases, q/k norm, sliding window."""

    def __init__(self, config: UpcycledMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = UpcycledMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = UpcycledMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if is_sliding else None

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, router, routed experts, sparse MoE block
# ----------------------------------------------------------------------------------------------------------------
class UpcycledMoeMLP(nn.Module):
    """The dense FFN: gated (SwiGLU: down(act(gate) * up)) or plain (Nemotron: down(relu2(up)))."""

    def __init__(self, config: UpcycledMoeConfig, intermediate_size: int):
        super().__init__()
        self.gated = config.mlp_gated
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k that breaks ties by lower index, so a virtual group of bit-identical experts is taken whole."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def route(router_logits: torch.Tensor, config: UpcycledMoeConfig):
    """(T, E) fp32 logits -> (balance probabilities (T, E), top-k weights (T, k), top-k indices (T, k))."""
    k = config.num_experts_per_tok
    if config.router_type == "sigmoid_topk":
        scores = torch.sigmoid(router_logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    else:
        scores = probs = torch.softmax(router_logits, dim=-1)
    top_k_weights, top_k_index = stable_topk(scores, k)
    if config.router_type == "topk_softmax" or config.norm_topk_prob:
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return probs, top_k_weights, top_k_index


def capacity_keep_mask(top_k_index: torch.Tensor, num_experts: int, capacity, token_mask=None) -> torch.Tensor:
    """(T, k) bool: slots within each expert's capacity. First choices of all tokens outrank second choices.
    Padding tokens (token_mask False) take no slot and are never kept."""
    one_hot = F.one_hot(top_k_index, num_experts)  # (T, k, E)
    if token_mask is not None:
        one_hot = one_hot * token_mask.view(-1, 1, 1)
    one_hot = one_hot.transpose(0, 1).reshape(-1, num_experts)  # choice-major: every first choice, then second ...
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # -1 for padding slots, which is why they are masked below
    keep = (position < capacity).view(top_k_index.shape[1], -1).t()
    return keep if token_mask is None else keep & token_mask.view(-1, 1)


def capacity_keep(top_k_index: torch.Tensor, config: UpcycledMoeConfig, token_mask=None):
    """The slots that run under `config.capacity_factor` (None when dropless). The capacity counts real tokens
    only, so padding neither shrinks nor fills it (a tensor count: no host sync)."""
    num_tokens = top_k_index.shape[0] if token_mask is None else token_mask.sum().double()
    capacity = config.expert_capacity(num_tokens)
    if capacity is None:
        return None
    return capacity_keep_mask(top_k_index, config.num_experts, capacity, token_mask)


class UpcycledMoeRouter(nn.Module):
    """Linear router computed in float32; returns (router_logits, top_k_weights, top_k_index)."""

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, hidden_states, token_mask=None):
        """`token_mask` (T,) bool marks real tokens; with a capacity factor, padding is dropped first."""
        hidden_states = hidden_states.float()
        if self.training and self.config.router_jitter_noise > 0:
            eps = self.config.router_jitter_noise
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - eps, 1.0 + eps)
        router_logits = F.linear(hidden_states, self.weight.float())
        _, top_k_weights, top_k_index = route(router_logits, self.config)
        keep = capacity_keep(top_k_index, self.config, token_mask)
        if keep is not None:  # dropped slots: the sentinel index num_experts, which every experts path skips
            top_k_index = top_k_index.masked_fill(~keep, self.config.num_experts)
            top_k_weights = top_k_weights * keep  # for implementations that compute sentinels (batched_mm)
        return router_logits, top_k_weights, top_k_index


class ExpertsSentinelMixin:
    """transformers' experts implementations mask sentinel slots (index num_experts) only when the module says it
    may receive them (`_is_expert_parallel`); capacity drops send them too."""

    @property
    def _is_expert_parallel(self):  # 5.17's experts decorator never sets it
        return getattr(self, "_receives_sentinels", False) or self.config.capacity_factor is not None

    @_is_expert_parallel.setter
    def _is_expert_parallel(self, value):
        self._receives_sentinels = value


# Implementations whose GEMMs follow autocast by themselves (F.linear; fused_moe casts like nn.Linear).
_AUTOCAST_AWARE_EXPERTS = ("eager", "upcycled_fused")


def follow_autocast(forward):
    """Runs transformers' experts implementations with the weights cast to the autocast dtype, as nn.Linear does.

    grouped_mm / batched_mm compute in the weights' dtype, so fp32 weights under bf16 autocast would run fp32 GEMMs
    (on CUDA grouped_mm's slow fp32 path). The cast happens inside the experts' forward, after any hook that
    gathers the parameters (DeepSpeed ZeRO-3), and is differentiable: gradients reach the fp32 weights in fp32."""

    @wraps(forward)
    def forward_in_autocast_dtype(self, hidden_states, top_k_index, top_k_weights):
        device_type = hidden_states.device.type
        if self.config._experts_implementation in _AUTOCAST_AWARE_EXPERTS or not torch.is_autocast_enabled(
            device_type
        ):
            return forward(self, hidden_states, top_k_index, top_k_weights)
        dtype = torch.get_autocast_dtype(device_type)
        cast = {name: p.to(dtype) for name, p in self.named_parameters(recurse=False) if p.is_floating_point()}
        with torch.nn.utils.stateless._reparametrize_module(self, cast):  # what torch.func.functional_call uses
            out = forward(self, hidden_states.to(dtype), top_k_index, top_k_weights.to(dtype))
        return out.to(hidden_states.dtype)

    return forward_in_autocast_dtype


@use_experts_implementation
class UpcycledMoeExperts(ExpertsSentinelMixin, nn.Module):
    """Gated routed experts as fused 3D parameters (transformers' layout: gate rows first, then up)."""

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def expert_ffn(self, expert_idx, x):
        gate, up = F.linear(x, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return eager_experts_loop(self, hidden_states, top_k_index, top_k_weights)


@use_experts_implementation(has_gate=False)
class UpcycledMoePlainExperts(ExpertsSentinelMixin, nn.Module):
    """Routed experts without a gate (Nemotron: down(relu2(up)))."""

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def expert_ffn(self, expert_idx, x):
        return F.linear(self.act_fn(F.linear(x, self.up_proj[expert_idx])), self.down_proj[expert_idx])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return eager_experts_loop(self, hidden_states, top_k_index, top_k_weights)


UpcycledMoeExperts.forward = follow_autocast(UpcycledMoeExperts.forward)
UpcycledMoePlainExperts.forward = follow_autocast(UpcycledMoePlainExperts.forward)


def eager_experts_loop(experts, hidden_states, top_k_index, top_k_weights):
    """Reference path: one GEMM pair per expert that received tokens; accumulates in float32."""
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)
        expert_hit = (expert_mask.sum(dim=(-1, -2)) > 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == experts.num_experts:  # sentinel slot: dropped
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        expert_out = experts.expert_ffn(expert_idx, hidden_states[token_idx])
        out.index_add_(0, token_idx, (expert_out * top_k_weights[token_idx, top_k_pos, None]).float())
    return out.to(hidden_states.dtype)


class UpcycledMoeSparseMoeBlock(nn.Module):
    """Router + routed experts (+ always-on shared expert)."""

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__()
        self.config = config  # read here, not through self.gate: PEFT's target_parameters wrap the router
        self.gate = UpcycledMoeRouter(config)
        self.experts = UpcycledMoeExperts(config) if config.mlp_gated else UpcycledMoePlainExperts(config)
        if config.num_shared_experts > 0:
            width = config.num_shared_experts * config.shared_expert_intermediate_size
            self.shared_expert = UpcycledMoeMLP(config, width)

    def forward(self, hidden_states, return_router_logits: bool = False, token_mask=None):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)
        router_logits, top_k_weights, top_k_index = self.gate(flat, token_mask)
        if self.config.capacity_factor is not None and self.experts.num_experts < self.config.num_experts:
            # Expert parallel (transformers set num_experts to this rank's share): its token dispatch needs every id
            # to name a real expert, so a dropped slot goes to expert 0 with the weight of 0 it already has.
            top_k_index = top_k_index.masked_fill(top_k_index == self.config.num_experts, 0)
        out = self.experts(flat, top_k_index, top_k_weights.to(flat.dtype))
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(flat)
        out = out.view(batch_size, sequence_length, hidden_dim)
        return (out, router_logits) if return_router_logits else out


# ----------------------------------------------------------------------------------------------------------------
# Decoder layer and the model
# ----------------------------------------------------------------------------------------------------------------
class UpcycledMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: UpcycledMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = UpcycledMoeAttention(config, layer_idx)
        if config.mlp_layer_types[layer_idx] == "sparse":
            self.mlp = UpcycledMoeSparseMoeBlock(config)
        else:
            self.mlp = UpcycledMoeMLP(config, config.intermediate_size)
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        position_embeddings=None,
        output_router_logits=False,
        past_key_values=None,
        token_mask=None,
        **kwargs,
    ):
        """Returns the hidden states, or (hidden states, router logits or None) with `output_router_logits`. The
        logits travel as a return value rather than through transformers' output-capture hooks, whose ContextVar
        lookups break the graph of a torch.compile'd layer."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=one_cache(cache, past_key_values),
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        router_logits = None
        if isinstance(self.mlp, UpcycledMoeSparseMoeBlock):
            hidden_states, router_logits = self.mlp(hidden_states, return_router_logits=True, token_mask=token_mask)
        else:
            hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return (hidden_states, router_logits) if output_router_logits else hidden_states


def attended_pairs(seq_len: int, window: int | None = None) -> int:
    """(query, key) pairs a causal layer scores over `seq_len` tokens. Query i sees keys i-w+1..i (w = the window,
    including itself), so it sees min(i+1, w): summed, s(s+1)/2 without a window (or with w >= s), and w(w+1)/2 for
    the first w queries plus w for each of the other s-w, i.e. s*w - w(w-1)/2, with one."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return seq_len * window - window * (window - 1) // 2


# Which class of the code saved next to the weights answers each Auto class (written into every config.json).
AUTO_MAP = {
    "AutoConfig": "configuration_upcycled_moe.UpcycledMoeConfig",
    "AutoModel": "modeling_upcycled_moe.UpcycledMoeModel",
    "AutoModelForCausalLM": "modeling_upcycled_moe.UpcycledMoeForCausalLM",
    "AutoModelForSequenceClassification": "modeling_upcycled_moe.UpcycledMoeForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_upcycled_moe.UpcycledMoeForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_upcycled_moe.UpcycledMoeForQuestionAnswering",
}


class UpcycledMoePreTrainedModel(PreTrainedModel):
    config_class = UpcycledMoeConfig
    config: UpcycledMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UpcycledMoeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False  # data-dependent expert loop in the eager path
    _supports_attention_backend = True
    _can_record_outputs = {  # router logits are returned by the decoder layers (see UpcycledMoeDecoderLayer)
        "hidden_states": OutputRecorder(UpcycledMoeDecoderLayer, index=0),
        "attentions": UpcycledMoeAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, UpcycledMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, UpcycledMoePlainExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, UpcycledMoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, UpcycledMoeLayerNorm1P):
            init.zeros_(module.weight)  # gamma = weight + 1
            init.zeros_(module.bias)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """No explicit choice -> the fused path (faster and leaner than grouped_mm at every shape measured,
        BENCHMARKS.md); an explicit `experts_implementation` always wins."""
        if requested_experts is None and fused_experts_forward is not None:
            requested_experts = "upcycled_fused"
        if requested_experts == "grouped_mm" and not self.config.grouped_mm_compatible:
            fallback = "upcycled_fused" if fused_experts_forward is not None else "eager"
            warnings.warn(
                f"grouped_mm cannot take hidden_size={self.config.hidden_size} / moe_intermediate_size="
                f"{self.config.moe_intermediate_size} (not multiples of 8): using {fallback!r} instead",
                stacklevel=2,
            )
            requested_experts = fallback
        return super().get_correct_experts_implementation(requested_experts)

    def num_active_parameters(self) -> int:
        """Parameters one token multiplies (for FLOPs and MFU): every matrix but the input embedding lookup (a tied
        LM head counts once), the routed experts at k/E of their size."""
        total = routed = embed = 0
        for name, p in self.named_parameters():  # tied parameters appear once
            n = getattr(p, "ds_numel", p.numel())  # DeepSpeed ZeRO-3 partitions parameters
            total += n
            if ".mlp.experts." in name:
                routed += n
            elif "embed_tokens" in name:
                embed += n
        if self.config.tie_word_embeddings:
            embed = 0
        return round(total - embed - routed * (1 - self.config.num_experts_per_tok / self.config.num_experts))

    def training_flops(self, seq_lens, active_params: int | None = None) -> int:
        """Training FLOPs (forward + backward) of sequences of these lengths: 6 x ACTIVE parameters per token, plus
        12 x attention width per attended (query, key) pair and layer (scores and weighted sum are two matrix products
        of 2 FLOPs per multiply-add; the backward pass is twice the forward). Real lengths, not padded ones: padding
        does no useful work. The one FLOP count of the project: Trainer's (6 x tokens x ALL parameters) overstates an
        MoE by the experts it never runs."""
        if active_params is None:
            active_params = self.num_active_parameters()
        config = self.config
        width = config.num_attention_heads * config.head_dim
        total = 0
        for n in seq_lens:
            n = int(n)
            pairs = sum(attended_pairs(n, config.sliding_window if kind == "sliding_attention" else None)
                        for kind in config.layer_types)
            total += 6 * active_params * n + 12 * width * pairs
        return total

    def floating_point_ops(self, input_dict) -> int:
        """`training_flops` of a batch, each row at its real length (attention_mask), for Trainer's FLOP count."""
        ids = input_dict.get(self.main_input_name)
        if ids is None:
            return 0
        mask = input_dict.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None and mask.dim() == 2 else [ids.shape[-1]] * ids[..., 0].numel()
        return self.training_flops(lengths)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Every Auto class resolves to the code saved next to the weights, whichever class is saved."""
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


class UpcycledMoeModel(UpcycledMoePreTrainedModel):
    def __init__(self, config: UpcycledMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [UpcycledMoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = make_norm(config, config.hidden_size)
        self.rotary_emb = UpcycledMoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        output_router_logits=None,
        past_key_values=None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        """`cache` is the KV cache (transformers >= 5.24's name); `past_key_values`, its older name, is accepted too."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = one_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if isinstance(attention_mask, dict):  # generate() with a static cache builds the masks, one per layer type
            causal_masks, attention_mask = attention_mask, None
        else:
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                MASK_CACHE_NAME: cache,
                "position_ids": position_ids,
            }
            causal_masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self.config.layer_types:
                causal_masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        router_logits = [] if output_router_logits else None
        token_mask = None  # real tokens, for the capacity (padding must neither fill nor size it)
        if self.config.capacity_factor is not None and attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1]:].reshape(-1).bool()
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer_idx, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_masks[self.config.layer_types[layer_idx]],
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                output_router_logits=bool(output_router_logits),
                token_mask=token_mask,
                **{CACHE_NAME: cache},  # the name this release's gradient checkpointing clears
                **kwargs,
            )
            if output_router_logits:
                hidden_states, logits = hidden_states
                if logits is not None:  # dense layers have no router
                    router_logits.append(logits)
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            router_logits=tuple(router_logits) if router_logits is not None else None,
            **{CACHE_NAME: cache},
        )


# ----------------------------------------------------------------------------------------------------------------
# Router losses and statistics
# ----------------------------------------------------------------------------------------------------------------
def _token_mask(attention_mask, num_tokens, device):
    """Flat (T,) float mask of real tokens; padding (attention_mask == 0) is excluded from router losses."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != num_tokens:
        return torch.ones(num_tokens, device=device)
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def _stack_router_logits(router_logits) -> torch.Tensor:
    """(layers, T, E) float32 on the first layer's device: every router statistic is then one batched pass over all
    sparse layers instead of a dozen small kernels per layer (launch overhead dominates these tiny tensors). Takes
    the per-layer (T, E) logits, or their stack."""
    if isinstance(router_logits, torch.Tensor):  # already stacked (the forward stacks once for both losses)
        return router_logits.float()
    device = router_logits[0].device
    return torch.stack([logits.to(device=device, dtype=torch.float32) for logits in router_logits])


def load_balancing_loss(router_logits, config: UpcycledMoeConfig, attention_mask=None) -> torch.Tensor:
    """Switch loss E * sum_e f_e * P_e per sparse layer (f_e: share of token-slots, P_e: mean probability),
    averaged over layers; 1.0 when perfectly balanced."""
    logits = _stack_router_logits(router_logits)
    num_layers, num_tokens, num_experts = logits.shape
    k = config.num_experts_per_tok
    mask = _token_mask(attention_mask, num_tokens, logits.device)
    n = mask.sum().clamp(min=1.0)
    probs, _, top_k_index = route(logits, config)
    slots = torch.zeros(num_layers, num_experts, device=logits.device).scatter_add_(
        1, top_k_index.reshape(num_layers, -1), mask.repeat_interleave(k).expand(num_layers, -1)
    )
    f = slots / (n * k)
    p = torch.einsum("lte,t->le", probs, mask) / n
    return (num_experts * (f * p).sum(-1)).mean()


def router_z_loss(router_logits, attention_mask=None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, averaged over sparse layers."""
    logits = _stack_router_logits(router_logits)
    mask = _token_mask(attention_mask, logits.shape[1], logits.device)
    z = torch.logsumexp(logits, dim=-1).pow(2)  # (layers, T)
    return ((z @ mask) / mask.sum().clamp(min=1.0)).mean()


@torch.no_grad()
def routing_statistics(router_logits, config: UpcycledMoeConfig, attention_mask=None) -> dict[str, torch.Tensor]:
    """Per sparse layer: expert load (share of token-slots), max/mean imbalance, router entropy, dropped share."""
    logits = _stack_router_logits(router_logits)
    num_layers, num_tokens, num_experts = logits.shape
    mask = _token_mask(attention_mask, num_tokens, logits.device)
    probs, _, top_k_index = route(logits, config)
    keep = torch.ones_like(top_k_index, dtype=torch.bool)
    if config.capacity_factor is not None:
        real = mask.bool() if attention_mask is not None else None
        keep = torch.stack([capacity_keep(index, config, real) for index in top_k_index])
    slot_mask = mask[None, :, None].expand_as(top_k_index)
    counts = torch.zeros(num_layers, num_experts, device=logits.device).scatter_add_(
        1, top_k_index.reshape(num_layers, -1), slot_mask.reshape(num_layers, -1)
    )
    load = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
    n = mask.sum().clamp(min=1.0)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # (layers, T)
    slots = slot_mask.sum((1, 2)).clamp(min=1.0)
    return {
        "expert_load": load,  # (layers, experts)
        "imbalance": load.max(-1).values / load.mean(-1),  # max/mean per layer; 1.0 = balanced
        "router_entropy": (entropy @ mask) / n,
        "dropped_fraction": ((~keep).float() * slot_mask).sum((1, 2)) / slots,
    }


@dataclass
class UpcycledMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """Mixtral's output plus the (unweighted) router z-loss."""

    z_loss: torch.FloatTensor | None = None


def _label_token_count(labels: torch.Tensor) -> torch.Tensor:
    return (labels[..., 1:] != -100).sum()


def _chunked_cross_entropy(hidden, weight, labels, divisor, chunk, need_hidden, need_weight):
    """(loss, d_hidden or None, d_weight or None). Only the gradients asked for are built: a frozen head (LoRA) gets
    no fp32 vocab x hidden gradient, a no_grad forward computes the loss alone."""
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    weight_c = None  # the weight in the matmuls' dtype (autocast may differ from it), cast once
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        raw = F.linear(h, weight)
        logits = raw.float()
        valid = y != -100
        target = y.clamp(min=0)
        lse = torch.logsumexp(logits, dim=-1)
        total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
        if not (need_hidden or need_weight):
            continue
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: d CE / d logits = softmax - one_hot
        grad[torch.arange(h.shape[0], device=h.device), target] -= 1.0
        grad = grad.mul_((valid.float() / divisor)[:, None]).to(raw.dtype)
        del raw, logits
        if need_hidden:
            if weight_c is None:
                weight_c = weight.to(grad.dtype)
            d_hidden[start : start + chunk] = grad @ weight_c
        if need_weight:
            d_weight += grad.t() @ h.to(grad.dtype)
    return total / divisor, d_hidden, d_weight


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum of CE(h @ W^T, labels) over rows / divisor, with the logits built `chunk` rows at a time and the gradients
    computed in the same pass: the (rows, vocab) logits never exist whole (memory) and are never recomputed (speed).
    Labels equal to -100 are ignored. Matmuls follow autocast; softmax and the reductions are float32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, chunk):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        loss, d_hidden, d_weight = _chunked_cross_entropy(hidden, weight, labels, divisor, chunk, need_hidden,
                                                          need_weight)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        d_hidden, d_weight = ctx.saved_tensors
        d_hidden = d_hidden * grad_output.to(d_hidden.dtype) if d_hidden is not None else None
        d_weight = (d_weight * grad_output).to(ctx.weight_dtype) if d_weight is not None else None
        return d_hidden, d_weight, None, None, None


def chunked_causal_lm_loss(hidden_states, lm_head_weight, labels, chunk_size, num_items_in_batch=None):
    """transformers' causal-LM loss (shift by one, -100 ignored, sum / num_items_in_batch or mean over labels) from
    the final hidden states, without materialising the logits."""
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if num_items_in_batch is None:
        divisor = (labels != -100).sum().clamp(min=1).float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
    if not torch.is_grad_enabled():  # autograd.Function reports needs_input_grad even under no_grad
        return _chunked_cross_entropy(hidden, lm_head_weight, labels, divisor, int(chunk_size), False, False)[0]
    return ChunkedLinearCrossEntropy.apply(hidden, lm_head_weight, labels, divisor, int(chunk_size))


# ----------------------------------------------------------------------------------------------------------------
# Causal LM head
# ----------------------------------------------------------------------------------------------------------------
class UpcycledMoeForCausalLM(UpcycledMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__(config)
        self.model = UpcycledMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_dense(cls, source_or_model, **options):
        """Online upcycling: build the MoE in memory from a dense checkpoint (path, Hub id, GGUF or model)."""
        try:
            from upcycled_moe.conversion import upcycle_in_memory
        except ImportError as err:
            raise ImportError("from_dense needs the upcycled-moe package: pip install upcycled-moe") from err
        return upcycle_in_memory(source_or_model, model_class=cls, **options)

    def _chunked_loss_applies(self, logits_to_keep, kwargs) -> bool:
        """The chunked loss needs a plain bias-free LM head whose weight is all here (not a PEFT wrapper, not a
        DeepSpeed ZeRO-3 partition), full-sequence logits and transformers' default label handling. Not in float16:
        its gradients are computed before the loss scaler could scale them, and would underflow."""
        head = self.lm_head
        device_type = head.weight.device.type
        fp16 = head.weight.dtype == torch.float16 or (
            torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
        )
        return bool(
            self.training
            and self.config.loss_chunk_size > 0
            and not fp16
            and type(head) is nn.Linear
            and head.bias is None
            and getattr(head.weight, "ds_id", None) is None
            and logits_to_keep in (0, None)
            and kwargs.get("shift_labels") is None
            and kwargs.get("ignore_index", -100) == -100
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ) -> UpcycledMoeCausalLMOutputWithPast:
        r"""Returns the LM loss plus `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss` whenever
        `labels` are given (balancing is never silently off). Under Trainer (`num_items_in_batch`) the router terms
        are weighted by this micro-batch's share of label tokens, so their effective weight does not change with
        gradient accumulation or the number of ranks. With `config.loss_chunk_size > 0`, training with labels skips
        the full logits (`logits` is None) and computes the same loss chunk by chunk. The KV cache is `cache`
        (transformers >= 5.24) or `past_key_values` (its older name)."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        has_sparse = "sparse" in self.config.mlp_layer_types
        need_router = has_sparse and (output_router_logits or labels is not None)
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=need_router,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        chunked = labels is not None and self._chunked_loss_applies(logits_to_keep, kwargs)
        logits = None
        if not chunked:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = aux_loss = z_loss = None
        router_logits = outputs.router_logits if need_router else None
        if router_logits:
            stacked = _stack_router_logits(router_logits)  # one batched pass over all sparse layers
            if isinstance(attention_mask, dict):  # prebuilt 4D masks (static-cache generation): no padding row mask
                attention_mask = None
            grad = torch.is_grad_enabled()
            with torch.set_grad_enabled(grad and self.config.router_aux_loss_coef > 0):  # a 0-weighted term
                aux_loss = load_balancing_loss(stacked, self.config, attention_mask)  # is reported, not trained
            with torch.set_grad_enabled(grad and self.config.router_z_loss_coef > 0):
                z_loss = router_z_loss(stacked, attention_mask)
        if chunked:
            loss = chunked_causal_lm_loss(hidden_states, self.lm_head.weight, labels, self.config.loss_chunk_size,
                                          kwargs.get("num_items_in_batch"))
        elif labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        if labels is not None:
            if aux_loss is not None:
                router_loss = self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
                num_items = kwargs.get("num_items_in_batch")
                if num_items is not None:  # Trainer sums micro-batch losses instead of averaging them
                    share = _label_token_count(labels).to(router_loss.device) / torch.as_tensor(
                        num_items, device=router_loss.device
                    ).clamp(min=1)
                    router_loss = router_loss * share
                loss = loss + router_loss.to(loss.device)

        return UpcycledMoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits if output_router_logits else None,
            z_loss=z_loss,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


UpcycledMoeConfig.register_for_auto_class()
UpcycledMoeModel.register_for_auto_class("AutoModel")
UpcycledMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# ----------------------------------------------------------------------------------------------------------------
# Task heads (reward models, classifiers, extractive QA): transformers' generic heads on this decoder
# ----------------------------------------------------------------------------------------------------------------
# The generic heads build their decoder with AutoModel.from_config, which a folder loaded as remote code cannot
# answer without asking to trust the code a second time; each head here builds UpcycledMoeModel itself. Like stock
# MoE heads they return no router loss.
class UpcycledMoeForSequenceClassification(GenericForSequenceClassification, UpcycledMoePreTrainedModel):
    def __init__(self, config: UpcycledMoeConfig):
        UpcycledMoePreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = UpcycledMoeModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class UpcycledMoeForTokenClassification(GenericForTokenClassification, UpcycledMoePreTrainedModel):
    def __init__(self, config: UpcycledMoeConfig):
        UpcycledMoePreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = UpcycledMoeModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=getattr(config, "token_classification_bias", True))
        self.post_init()


class UpcycledMoeForQuestionAnswering(GenericForQuestionAnswering, UpcycledMoePreTrainedModel):
    def __init__(self, config: UpcycledMoeConfig):
        UpcycledMoePreTrainedModel.__init__(self, config)
        self.model = UpcycledMoeModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


__all__ = [
    "AUTO_MAP",
    "ChunkedLinearCrossEntropy",
    "UpcycledMoeForCausalLM",
    "UpcycledMoeForQuestionAnswering",
    "UpcycledMoeForSequenceClassification",
    "UpcycledMoeForTokenClassification",
    "UpcycledMoeModel",
    "UpcycledMoePreTrainedModel",
    "chunked_causal_lm_loss",
    "load_balancing_loss",
    "routing_statistics",
    "router_z_loss",
]
