"""Configuration of UpcycledMoe: a decoder-only MoE built from a dense Llama/Mistral/Qwen2/Qwen3/Nemotron model.

Shipped as remote code next to the weights: imports only torch/transformers/huggingface_hub.
"""

import math
import warnings

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

ROUTER_TYPES = ("softmax_topk", "topk_softmax", "sigmoid_topk")
NORM_TYPES = ("rms", "layernorm1p")
MLP_LAYER_TYPES = ("sparse", "dense")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def _parallel_styles():
    """Names of the parallel styles the installed transformers registers (none without torch.distributed). Read
    from the registry rather than the version: the expert-parallel vocabulary changed in 5.21."""
    try:
        import transformers.distributed.mixin  # noqa: F401  (registers the expert-parallel styles where they exist)
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES
    except ImportError:
        return ()
    return tuple(ALL_PARALLEL_STYLES.keys())


@strict
class UpcycledMoeConfig(PreTrainedConfig):
    r"""Dense fields follow transformers' Llama/Qwen3/Nemotron names; MoE fields follow Qwen3-MoE's.

    Dense part:
        hidden_act: activation of the FFN ("silu" for SwiGLU sources, "relu2" for Nemotron).
        mlp_gated: True for gate/up/down (SwiGLU) FFNs, False for Nemotron's plain up -> act -> down.
        norm_type: "rms" (RMSNorm) or "layernorm1p" (Nemotron's LayerNorm with weight + 1 and a bias).
        attention_bias / attention_out_bias: bias on q/k/v and on o_proj (Llama: both; Qwen2: q/k/v only).
        qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
        layer_types: "full_attention" / "sliding_attention" per layer; sliding layers use `sliding_window`.

    MoE part:
        num_experts: routed experts per sparse layer (E·G in the paper's notation).
        num_experts_per_tok: top-k.
        moe_intermediate_size: width of one routed expert (intermediate_size // granularity when upcycled).
        router_type: "softmax_topk" (softmax over all experts, keep top-k as they are; the paper's default),
            "topk_softmax" (Mixtral: renormalise the kept k), "sigmoid_topk" (DeepSeek-V3 style scores).
        norm_topk_prob: renormalise the kept weights for softmax_topk / sigmoid_topk too.
        router_aux_loss_coef: Switch load-balancing loss weight, added whenever labels are given.
        router_z_loss_coef: router z-loss weight.
        router_jitter_noise: multiplicative uniform noise on the router input while training (0 = off).
        capacity_factor: tokens per expert capped at ceil(cf · real tokens · k / num_experts), padding excluded;
            None = dropless.
        mlp_layer_types: "sparse" / "dense" per layer (dense layers keep a dense FFN of intermediate_size).
        num_shared_experts / shared_expert_intermediate_size: always-on FFN(s) beside the routed experts.
        upcycling: provenance written by the conversion tool (source, options, tool version).

    Training:
        loss_chunk_size: > 0 computes the training loss (model.training with labels) from the LM head in chunks of
            this many tokens, gradients in the same pass, so the (tokens x vocab) logits never exist whole;
            `logits` is then None in the output. 0 (default): the usual full logits. Eval / generation always
            return logits; float16 training (loss scaling) and PEFT-wrapped heads use the full logits.
    """

    model_type = "upcycled_moe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the KV cache, by its 5.24+ and older names
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel plan in transformers' vocabulary (Qwen3-MoE's, plus our plain experts and shared expert):
        heads split colwise/rowwise, q/k norms replicated (per head, so they need no collective), routed experts split
        along their width with one all-reduce per MoE block, the router replicated. Only the rules for modules this
        config builds, so transformers warns about none. The LM head's rule is the causal-LM class's `_tp_plan`."""
        if "base_model_tp_plan" in self.__dict__:  # set on the instance (5.17 adds the tied embedding's rule so)
            return self.__dict__["base_model_tp_plan"]
        gated, dense, sparse = self.mlp_gated, "dense" in self.mlp_layer_types, "sparse" in self.mlp_layer_types
        plan = {"embed_tokens": "embedding_rowwise"}
        plan.update({f"layers.*.self_attn.{name}_proj": "colwise" for name in ("q", "k", "v")})
        if self.qk_norm:
            plan.update({f"layers.*.self_attn.{name}_norm": "replicated_with_grad_allreduce" for name in ("q", "k")})
        plan["layers.*.self_attn.o_proj"] = "rowwise"
        ffns = ["layers.*.mlp"] if dense else []  # the dense layers' FFN ...
        if sparse and self.num_shared_experts:
            ffns.append("layers.*.mlp.shared_expert")  # ... and the shared expert: colwise in, rowwise out
        for ffn in ffns:
            plan.update({f"{ffn}.gate_proj": "colwise"} if gated else {})
            plan.update({f"{ffn}.up_proj": "colwise", f"{ffn}.down_proj": "rowwise"})
        if sparse:
            # gate_up_proj holds [gate rows; up rows]: packed_colwise gives each rank matching slices of both
            plan["layers.*.mlp.experts.gate_up_proj" if gated else "layers.*.mlp.experts.up_proj"] = (
                "packed_colwise" if gated else "colwise"
            )
            plan["layers.*.mlp.experts.down_proj"] = "rowwise"
            plan["layers.*.mlp.experts"] = "moe_tp_experts"
        return plan

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, plan):
        self.__dict__["base_model_tp_plan"] = plan  # never serialised: transformers drops this key on save

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """Expert-parallel plan: whole experts per rank (`grouped_gemm` shards the expert dimension), in the
        vocabulary of the installed transformers. Releases that know `ep_dispatch_experts` (5.21+) route tokens to the
        experts' ranks through it and apply the TP plan to the rest; older ones (5.17-5.20) apply this plan alone,
        masking the router's choices to each rank's experts (`ep_router`) and summing the partial outputs
        (`moe_tp_experts`). Empty without sparse layers (transformers then refuses expert parallelism clearly)."""
        if "sparse" not in self.mlp_layer_types:
            return {}
        proj = "gate_up_proj" if self.mlp_gated else "up_proj"
        plan = {f"layers.*.mlp.experts.{proj}": "grouped_gemm", "layers.*.mlp.experts.down_proj": "grouped_gemm"}
        styles = _parallel_styles()
        if "ep_dispatch_experts" in styles:
            return {**plan, "layers.*.mlp.experts": "ep_dispatch_experts"}
        if "ep_router" in styles:
            return {"layers.*.mlp.gate": "ep_router", **plan, "layers.*.mlp.experts": "moe_tp_experts"}
        return {}

    # dense part
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    mlp_gated: bool = True
    norm_type: str = "rms"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_out_bias: bool | None = None
    attention_dropout: int | float = 0.0
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    # MoE part
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    router_type: str = "softmax_topk"
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 1e-2
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    capacity_factor: float | None = None
    mlp_layer_types: list[str] | None = None
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    output_router_logits: bool = False
    upcycling: dict | None = None
    loss_chunk_size: int = 0

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.intermediate_size
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self._check()

    def _check(self):
        """One clear message per mistake, raised when the config is built (not deep inside a forward)."""
        problems = []
        n, k = self.num_experts, self.num_experts_per_tok
        if n < 1:
            problems.append(f"num_experts must be >= 1, got {n}")
        if not 1 <= k <= max(n, 1):
            problems.append(f"num_experts_per_tok (top-k) must be between 1 and num_experts={n}, got {k}")
        if self.router_type not in ROUTER_TYPES:
            problems.append(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if self.norm_type not in NORM_TYPES:
            problems.append(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            problems.append(f"capacity_factor must be > 0 (or None for dropless routing), got {self.capacity_factor}")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            problems.append("router_aux_loss_coef and router_z_loss_coef must be >= 0")
        if not 0 <= self.router_jitter_noise < 1:
            problems.append(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise}")
        if self.num_shared_experts < 0:
            problems.append(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.loss_chunk_size < 0:
            problems.append(f"loss_chunk_size must be >= 0 (0 = full logits), got {self.loss_chunk_size}")
        for name, allowed in (("mlp_layer_types", MLP_LAYER_TYPES), ("layer_types", ATTENTION_LAYER_TYPES)):
            pattern = getattr(self, name)
            if len(pattern) != self.num_hidden_layers:
                problems.append(
                    f"{name} has {len(pattern)} entries but num_hidden_layers={self.num_hidden_layers}: "
                    "give one entry per layer"
                )
            bad = sorted({t for t in pattern if t not in allowed})
            if bad:
                problems.append(f"{name} entries must be one of {allowed}, got {bad}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            problems.append("layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        rotary_dim = self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0)
        if int(rotary_dim) % 2:
            problems.append(f"the rotary dimension ({rotary_dim}) must be even: check head_dim and partial_rotary_factor")
        for name in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("Invalid UpcycledMoeConfig: " + "; ".join(problems))
        if "sparse" in self.mlp_layer_types and (self.hidden_size % 8 or self.moe_intermediate_size % 8):
            warnings.warn(
                f"hidden_size={self.hidden_size} or moe_intermediate_size={self.moe_intermediate_size} is not a "
                "multiple of 8: grouped-GEMM experts kernels cannot use it, so the experts fall back to a per-expert "
                "loop (slower, same results). Pick multiples of 8 for speed.",
                stacklevel=3,
            )

    @property
    def grouped_mm_compatible(self) -> bool:
        """Whether bf16 grouped GEMMs can take these shapes (rows must be 16-byte multiples)."""
        return self.hidden_size % 8 == 0 and self.moe_intermediate_size % 8 == 0

    @property
    def sparse_layer_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.mlp_layer_types) if t == "sparse"]

    def expert_capacity(self, num_tokens):
        """Per-expert slot budget for a batch of `num_tokens` real tokens, or None when dropless. `num_tokens` may be
        a tensor (the model counts real tokens on the device, without a host sync): the result is then one too."""
        if self.capacity_factor is None:
            return None
        slots = self.capacity_factor * num_tokens * self.num_experts_per_tok / self.num_experts
        return slots.ceil() if hasattr(slots, "ceil") else math.ceil(slots)

    def active_parameter_fraction(self) -> float:
        """Fraction of routed-expert parameters a token uses (k / E): for FLOP and MFU accounting."""
        return self.num_experts_per_tok / self.num_experts


__all__ = ["UpcycledMoeConfig"]
