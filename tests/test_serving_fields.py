"""`upcycle-moe export --to mixtral|qwen2_moe|qwen3_moe` writes what vLLM's and SGLang's loaders read.

Neither engine installs here (CUDA-only wheels), so this is a static check: each engine's model file was read and the
names and config fields it needs are transcribed below, per engine x architecture, with the file and commit read.
A real export of a tiny model is then compared with them. What this cannot see (kernels, numerics, quantisation,
sliding windows, tensor parallel sharding) is listed in docs/serving.md.

Sources (GitHub, read 2026-12-02 through the project's code index):
  vLLM   vllm/model_executor/models/mixtral.py    @ f0e26957c6af4d1ce3d0642120b011949da65885
  vLLM   vllm/model_executor/models/qwen2_moe.py  @ 8bbabf03350e7821e2ffc6a5b3d9931e5f6df4c0 (same at 002fb907)
  vLLM   vllm/model_executor/models/qwen3_moe.py  @ 2e0831b0ab951c8896d4dd5d6cb9c3350a4574de
  SGLang python/sglang/srt/models/mixtral.py      @ 7f1f5bc113cea04dc96cdec553455d73879df04d
  SGLang python/sglang/srt/models/qwen2_moe.py    @ 0115497da8f2340cdce444597387cf2a4d499f5c
  SGLang python/sglang/srt/models/qwen3_moe.py    @ e3d8e9aec2c7f120ad4d4c6e7ee08cc19346fdbd
  (https://github.com/<repo>/blob/<commit>/<path>)

How each engine treats a checkpoint name (from the same files):
- vLLM: a parameter with no tensor fails DefaultModelLoader's "Following weights were not initialized from
  checkpoint" check, or keeps uninitialised memory where the check exempts the layer (default_loader.py @ 00b5ad07
  exempts layers whose quant_method defines process_weights_after_loading); a name with no parameter raises
  KeyError in load_weights, except names ending in ".bias", which are skipped without a word (so an o_proj bias it
  has no slot for is silently dropped). A tied lm_head shares the embedding's parameter: it needs no tensor.
- SGLang: names with no parameter are skipped silently, and a parameter nobody loads keeps its uninitialised memory.
  None of the three classes ties lm_head to the embedding (sgl-project/sglang PR #20127, "Qwen3MoE, Qwen2MoE ...
  always create a separate ParallelLMHead, ignoring config.tie_word_embeddings"), so lm_head.weight must be stored.
Either way the set of exported names must be exactly the set each engine builds: one missing or extra name is a
failed load (vLLM) or a silently wrong model (SGLang).
"""

import json
import re

import pytest
from safetensors import safe_open

from upcycled_moe.conversion import export, upcycle

VLLM = "https://github.com/vllm-project/vllm/blob/{}/vllm/model_executor/models/{}.py"
SGLANG = "https://github.com/sgl-project/sglang/blob/{}/python/sglang/srt/models/{}.py"
SOURCES = {
    ("vllm", "mixtral"): VLLM.format("f0e26957c6af4d1ce3d0642120b011949da65885", "mixtral"),
    ("vllm", "qwen2_moe"): VLLM.format("8bbabf03350e7821e2ffc6a5b3d9931e5f6df4c0", "qwen2_moe"),
    ("vllm", "qwen3_moe"): VLLM.format("2e0831b0ab951c8896d4dd5d6cb9c3350a4574de", "qwen3_moe"),
    ("sglang", "mixtral"): SGLANG.format("7f1f5bc113cea04dc96cdec553455d73879df04d", "mixtral"),
    ("sglang", "qwen2_moe"): SGLANG.format("0115497da8f2340cdce444597387cf2a4d499f5c", "qwen2_moe"),
    ("sglang", "qwen3_moe"): SGLANG.format("e3d8e9aec2c7f120ad4d4c6e7ee08cc19346fdbd", "qwen3_moe"),
}

# Config fields each loader reads as `config.X` (no getattr default): they must be in config.json, since an engine
# on transformers 4 fills missing ones from its own (different) class defaults.
COMMON_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps", "num_experts_per_tok"]
CONFIG_FIELDS = {
    # MixtralModel / MixtralDecoderLayer / MixtralForCausalLM; MixtralAttention reads config.rope_parameters
    ("vllm", "mixtral"): ["max_position_embeddings", "num_local_experts", "intermediate_size", "rope_parameters",
                          "tie_word_embeddings"],
    # Qwen2MoeSparseMoeBlock (num_experts, moe_intermediate_size, norm_topk_prob, shared_expert_intermediate_size),
    # Qwen2MoeDecoderLayer (rope_parameters, decoder_sparse_step, intermediate_size, hidden_act)
    ("vllm", "qwen2_moe"): ["num_experts", "moe_intermediate_size", "norm_topk_prob", "shared_expert_intermediate_size",
                            "rope_parameters", "decoder_sparse_step", "intermediate_size", "hidden_act",
                            "tie_word_embeddings"],
    ("vllm", "qwen3_moe"): ["num_experts", "moe_intermediate_size", "norm_topk_prob", "rope_parameters",
                            "decoder_sparse_step", "intermediate_size", "hidden_act", "tie_word_embeddings",
                            "pad_token_id"],
    ("sglang", "mixtral"): ["max_position_embeddings", "num_local_experts", "intermediate_size", "pad_token_id"],
    ("sglang", "qwen2_moe"): ["num_experts", "moe_intermediate_size", "norm_topk_prob",
                              "shared_expert_intermediate_size", "pad_token_id"],
    # Qwen3MoeDecoderLayer: `attention_bias = config.attention_bias`
    ("sglang", "qwen3_moe"): ["num_experts", "moe_intermediate_size", "norm_topk_prob", "attention_bias",
                              "pad_token_id"],
}
# getattr(config, "rope_theta", 10000) in every SGLang file above and in vLLM before rope_parameters: on
# transformers 4 (which knows no rope_parameters) only a top-level rope_theta carries the source's base.
NEEDS_TOP_LEVEL_ROPE_THETA = {("sglang", "mixtral"), ("sglang", "qwen2_moe"), ("sglang", "qwen3_moe")}

ENGINES = sorted(SOURCES)


def sparse_layers(engine, arch, cfg):
    """Which layers get a MoE block."""
    n = cfg["num_hidden_layers"]
    if arch == "mixtral" or engine == "sglang":
        # Mixtral: every layer. SGLang Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: `self.is_layer_sparse = True`
        # ("all layers are sparse"): mlp_only_layers and decoder_sparse_step are not read.
        return set(range(n))
    # vLLM Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer
    mlp_only = cfg.get("mlp_only_layers", [])
    return {i for i in range(n) if i not in mlp_only and cfg["num_experts"] > 0
            and (i + 1) % cfg["decoder_sparse_step"] == 0}


def attention_names(engine, arch, cfg, prefix):
    names = {f"{prefix}.{p}_proj.weight" for p in "qkvo"}
    if arch == "qwen2_moe":
        # vLLM Qwen2MoeAttention: QKVParallelLinear(..., bias=True) always; SGLang: bias=getattr(config, "qkv_bias",
        # True). o_proj: bias=False in both.
        qkv_bias = True if engine == "vllm" else cfg.get("qkv_bias", True)
        names |= {f"{prefix}.{p}_proj.bias" for p in "qkv"} if qkv_bias else set()
    elif arch == "qwen3_moe":
        names |= {f"{prefix}.q_norm.weight", f"{prefix}.k_norm.weight"}
        bias = cfg.get("attention_bias", False)
        names |= {f"{prefix}.{p}_proj.bias" for p in "qkv"} if bias else set()
        if bias and engine == "sglang":  # SGLang: o_proj bias=attention_bias; vLLM: o_proj bias=False
            names.add(f"{prefix}.o_proj.bias")
    return names  # Mixtral: bias=False everywhere


def mlp_names(engine, arch, cfg, i):
    if arch == "mixtral":  # MixtralMoE: gate + FusedMoE with ckpt names w1 (gate), w3 (up), w2 (down)
        prefix = f"model.layers.{i}.block_sparse_moe"
        n = cfg["num_local_experts"]
        experts = {f"{prefix}.experts.{e}.{w}.weight" for e in range(n) for w in ("w1", "w2", "w3")}
        return {f"{prefix}.gate.weight"} | experts
    prefix = f"model.layers.{i}.mlp"
    if i not in sparse_layers(engine, arch, cfg):
        return {f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down")}
    names = {f"{prefix}.gate.weight"}
    experts = range(cfg["num_experts"])
    names |= {f"{prefix}.experts.{e}.{p}_proj.weight" for e in experts for p in ("gate", "up", "down")}
    shared = cfg.get("shared_expert_intermediate_size", 0)
    if arch == "qwen2_moe":
        # Both engines: shared_expert_gate = nn.Linear(hidden, 1) always; shared_expert only if the width is > 0
        names.add(f"{prefix}.shared_expert_gate.weight")
    if shared > 0 and (engine, arch) != ("sglang", "qwen3_moe"):  # vLLM Qwen3-MoE: getattr(..., 0) > 0, with a gate
        names |= {f"{prefix}.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")}
        names.add(f"{prefix}.shared_expert_gate.weight")
    return names


def expected_names(engine, arch, cfg):
    """The checkpoint names `engine`'s `arch` class loads, built from the config as its __init__ does."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    # vLLM: `if config.tie_word_embeddings: self.lm_head.weight = self.model.embed_tokens.weight`; SGLang never ties
    if engine == "sglang" or not cfg.get("tie_word_embeddings", False):
        names.add("lm_head.weight")
    for i in range(cfg["num_hidden_layers"]):
        names |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
        names |= attention_names(engine, arch, cfg, f"model.layers.{i}.self_attn")
        names |= mlp_names(engine, arch, cfg, i)
    return names


def head_dim_read(engine, arch):
    """Whether the attention reads config.head_dim; the others use hidden_size // num_attention_heads."""
    # vLLM Mixtral: getattr(config, "head_dim", None); vLLM/SGLang Qwen3-MoE: getattr(config, "head_dim", ...).
    # vLLM and SGLang Qwen2MoeAttention, SGLang MixtralAttention: `self.head_dim = hidden_size // self.total_num_heads`
    return (engine, arch) in {("vllm", "mixtral"), ("vllm", "qwen3_moe"), ("sglang", "qwen3_moe")}


# ---------------------------------------------------------------------------------------------------------------
# One real export per architecture (plus Qwen2-MoE with a shared expert), built once for the module.
# ---------------------------------------------------------------------------------------------------------------
EXPORTS = {
    # SmolLM2's shape: a Llama with tied embeddings and no attention biases
    "mixtral": ("plain_llama", dict(router="topk_softmax")),
    "qwen2_moe": ("plain_llama", dict()),  # the default softmax_topk router, no shared expert (width 0)
    "qwen2_moe_shared": ("plain_llama", dict(shared_expert=True)),
    "qwen3_moe": ("qwen3", dict()),  # head_dim 32 != hidden_size / heads = 16: read from config
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dense_dirs):
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch

    root = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    plain = root / "plain_llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
                     ).save_pretrained(plain)
    out = {}
    for name, (family, options) in EXPORTS.items():
        source = plain if family == "plain_llama" else tiny_dense_dirs[family]
        moe = upcycle(source, root / f"moe_{name}", num_experts=4, top_k=2, dtype="float32", **options)
        out[name] = export(moe, root / name, name.removesuffix("_shared"))
    return out


def read_export(folder):
    cfg = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text())["weight_map"])
    else:
        with safe_open(folder / "model.safetensors", "pt") as f:
            names = set(f.keys())
    return cfg, names


CASES = [(engine, arch, name) for name in EXPORTS for (engine, arch) in ENGINES
         if arch == name.removesuffix("_shared")]


@pytest.mark.parametrize("engine,arch,export_name", CASES, ids=[f"{e}-{n}" for e, _, n in CASES])
def test_exported_names_are_the_engines_parameters(exports, engine, arch, export_name):
    cfg, names = read_export(exports[export_name])
    assert cfg["model_type"] == arch
    expected = expected_names(engine, arch, cfg)
    assert not expected - names, f"{SOURCES[engine, arch]} needs tensors the export lacks: {sorted(expected - names)}"
    assert not names - expected, f"{SOURCES[engine, arch]} has no slot for: {sorted(names - expected)}"


@pytest.mark.parametrize("engine,arch,export_name", CASES, ids=[f"{e}-{n}" for e, _, n in CASES])
def test_exported_config_has_the_fields_the_engine_reads(exports, engine, arch, export_name):
    cfg, _ = read_export(exports[export_name])
    missing = [k for k in COMMON_FIELDS + CONFIG_FIELDS[engine, arch] if k not in cfg]
    assert not missing, f"{SOURCES[engine, arch]} reads config fields absent from config.json: {missing}"
    assert cfg["architectures"] == [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                     "qwen3_moe": "Qwen3MoeForCausalLM"}[arch]]  # both engines pick the class by it
    theta = cfg["rope_parameters"]["rope_theta"]
    if (engine, arch) in NEEDS_TOP_LEVEL_ROPE_THETA:
        assert cfg.get("rope_theta") == theta, "a transformers-4 engine would fall back to its default rope_theta"
    # the engine's own fixed choices agree with the model (what its class hard-codes or assumes)
    assert cfg["hidden_act"] == "silu"  # Qwen2MoeMLP / Qwen3MoeMLP raise otherwise; FusedMoE runs SiLU-and-mul
    if arch != "mixtral":
        assert cfg["norm_topk_prob"] in (True, False)  # FusedMoE(renormalize=config.norm_topk_prob)
    if not head_dim_read(engine, arch):
        assert cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) == (
            cfg["hidden_size"] // cfg["num_attention_heads"])


def test_the_expected_names_see_what_the_engines_would_reject(exports):
    """The table is not vacuous: each rule it transcribes flags the export that breaks it."""
    cfg, names = read_export(exports["qwen2_moe"])
    # vLLM Qwen2-MoE has q/k/v biases whatever the config says: a bias-free checkpoint fails to load
    assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= expected_names("vllm", "qwen2_moe", cfg)
    # a zero-width shared expert has no module in either engine (vLLM's load_weights raises KeyError on its tensors)
    assert cfg["shared_expert_intermediate_size"] == 0
    assert not any(re.search(r"\.shared_expert\.", n) for n in expected_names("vllm", "qwen2_moe", cfg))
    # SGLang never ties lm_head; vLLM does when told to
    tied = dict(cfg, tie_word_embeddings=True)
    assert "lm_head.weight" in expected_names("sglang", "qwen2_moe", tied)
    assert "lm_head.weight" not in expected_names("vllm", "qwen2_moe", tied)
    # SGLang makes every Qwen layer sparse: a dense layer would lose its weights there
    dense = dict(cfg, mlp_only_layers=[1])
    assert "model.layers.1.mlp.gate_proj.weight" in expected_names("vllm", "qwen2_moe", dense)
    assert "model.layers.1.mlp.gate_proj.weight" not in expected_names("sglang", "qwen2_moe", dense)


def test_transformers_still_loads_every_export_completely(exports):
    """The names the engines need cost transformers nothing: no unexpected tensor, and the only 'missing' ones are
    the zero-size shared_expert layers transformers builds for a Qwen2-MoE without a shared expert (no numbers: the
    logits are tests/test_export.py's check)."""
    import torch
    from transformers import AutoModelForCausalLM

    for name, folder in exports.items():
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        assert not info["unexpected_keys"] and not info["mismatched_keys"], name
        params = dict(model.named_parameters())
        assert all(params[k].numel() == 0 for k in info["missing_keys"]), (name, info["missing_keys"])
        assert bool(info["missing_keys"]) == (name == "qwen2_moe"), (name, info["missing_keys"])
