"""Dense source families → UpcycledMoeConfig fields. One function per family, so the differences stay visible.

All families share the Llama key skeleton; only the MLP of an MoE layer changes names. What differs:
- llama: RMSNorm, SwiGLU, attention_bias on q/k/v/o.
- mistral: like llama, no biases, optional sliding window on every layer.
- qwen2: q/k/v bias, no o bias, sliding window per layer_types.
- qwen3: q/k RMSNorm over head_dim (qk_norm), explicit head_dim, optional attention_bias on q/k/v/o.
- nemotron: LayerNorm1P (weight + 1, with bias), plain up → relu2 → down MLP, partial rotary.
"""

from __future__ import annotations

from .errors import UpcycleError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "nemotron")

# GGUF general.architecture → transformers model_type (Mistral GGUFs use the llama architecture).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "nemotron": "nemotron"}


def check_supported(model_type: str | None) -> str:
    if model_type not in SUPPORTED_FAMILIES:
        raise UpcycleError(
            f"unsupported architecture {model_type!r}: supported source families are {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


def _common(config) -> dict:
    """Fields every family has under the same name."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        pad_token_id=getattr(config, "pad_token_id", None),
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_parameters=rope or None,
        attention_dropout=getattr(config, "attention_dropout", 0.0) or 0.0,
    )
    if getattr(config, "mlp_bias", False):
        raise UpcycleError(f"{config.model_type} checkpoints with mlp_bias=True are not supported (experts have no bias)")
    return fields


def _layer_types(config, sliding_window) -> tuple[int | None, list[str] | None]:
    types = getattr(config, "layer_types", None)
    if not sliding_window:
        return None, None
    if types is None:
        types = ["sliding_attention"] * config.num_hidden_layers
    return sliding_window, list(types)


def llama_fields(config) -> dict:
    bias = bool(getattr(config, "attention_bias", False))
    return dict(rms_norm_eps=config.rms_norm_eps, attention_bias=bias, attention_out_bias=bias)


def mistral_fields(config) -> dict:
    window, types = _layer_types(config, getattr(config, "sliding_window", None))
    return dict(rms_norm_eps=config.rms_norm_eps, attention_bias=False, sliding_window=window, layer_types=types)


def qwen2_fields(config) -> dict:
    window, types = _layer_types(config, getattr(config, "sliding_window", None))
    if window and types and "sliding_attention" not in types:
        window = None  # transformers keeps sliding_window set but no layer uses it
        types = None
    return dict(
        rms_norm_eps=config.rms_norm_eps,
        attention_bias=True,
        attention_out_bias=False,
        sliding_window=window,
        layer_types=types,
    )


def qwen3_fields(config) -> dict:
    fields = qwen2_fields(config)
    bias = bool(getattr(config, "attention_bias", False))
    fields.update(attention_bias=bias, attention_out_bias=bias, qk_norm=True, head_dim=config.head_dim)
    return fields


def nemotron_fields(config) -> dict:
    bias = bool(getattr(config, "attention_bias", False))
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "partial_rotary_factor" not in rope and getattr(config, "partial_rotary_factor", None) is not None:
        rope["partial_rotary_factor"] = config.partial_rotary_factor
    return dict(
        norm_type="layernorm1p",
        rms_norm_eps=config.norm_eps,
        mlp_gated=False,
        hidden_act=config.hidden_act,
        attention_bias=bias,
        attention_out_bias=bias,
        rope_parameters=rope or None,
    )


FAMILY_FIELDS = {
    "llama": llama_fields,
    "mistral": mistral_fields,
    "qwen2": qwen2_fields,
    "qwen3": qwen3_fields,
    "nemotron": nemotron_fields,
}


def dense_config_fields(config) -> dict:
    """UpcycledMoeConfig keyword arguments describing the dense part of a supported source config."""
    family = check_supported(getattr(config, "model_type", None))
    fields = _common(config)
    fields.update(FAMILY_FIELDS[family](config))
    return {k: v for k, v in fields.items() if v is not None or k in ("pad_token_id", "bos_token_id", "eos_token_id")}


def is_gated(model_type: str) -> bool:
    """Whether the family's FFN has a gate projection (SwiGLU) or is plain up → act → down."""
    return model_type != "nemotron"
