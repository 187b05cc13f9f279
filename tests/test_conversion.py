"""Conversion tool (issue 3): an upcycled model provably starts where the dense model was.

Real components only: transformers' own dense classes saved with save_pretrained (tiny random models of every
family, from conftest's `tiny_dense_dirs`), the real conversion path on the saved folders, our model class loading
the result. SmolLM2-135M tests live in test_conversion_smollm2.py.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from upcycled_moe import UpcycledMoeForCausalLM
from upcycled_moe.conversion import UpcycleError, UpcycleOptions, upcycle, upcycle_in_memory
from upcycled_moe.conversion.methods import drop_upcycle, generator_for, place_scale, routing_weights
from upcycled_moe.conversion.verify import greedy as verify_greedy


def load_dense(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_moe(folder):
    return UpcycledMoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def tensors(folder) -> dict:
    out = {}
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(Path(folder) / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@torch.no_grad()
def max_logit_diff(dense, moe, ids):
    return (dense(ids).logits - moe(ids).logits).abs().max().item()


def greedy(model, ids, n=30):
    return verify_greedy(model, ids, n, stop_at_eos=False)  # exactly n tokens, KV cache


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity,num_experts,top_k", [(1, 8, 2), (4, 16, 4)])
def test_topk_softmax_is_function_preserving(tmp_path, tiny_dense_dirs, family, granularity, num_experts, top_k):
    """topk_softmax with exact scaling: max |Δlogit| <= 1e-3 in fp32 and identical 30-token greedy generations."""
    out = upcycle(tiny_dense_dirs[family], tmp_path / "moe", num_experts=num_experts, top_k=top_k,
                  granularity=granularity, router="topk_softmax", dtype="float32", router_init_std=0.02)
    dense, moe = load_dense(tiny_dense_dirs[family]), load_moe(out)
    assert moe.config.num_experts == num_experts and moe.config.moe_intermediate_size == 96 // granularity
    assert max_logit_diff(dense, moe, IDS) <= 1e-3
    assert greedy(dense, IDS[:1]) == greedy(moe, IDS[:1])


def test_family_config_mapping(tmp_path, tiny_dense_dirs):
    """Each family's particulars land in the MoE config (they are what makes the logits equal above)."""
    cfg = {f: upcycle_in_memory(tiny_dense_dirs[f], num_experts=2, top_k=1).config for f in FAMILIES}
    assert cfg["llama"].attention_bias and cfg["llama"].attention_out_bias
    assert cfg["llama"].rope_parameters["rope_type"] == "llama3"
    assert cfg["mistral"].layer_types == ["sliding_attention"] * 2 and cfg["mistral"].sliding_window == 8
    assert cfg["qwen2"].attention_bias and not cfg["qwen2"].attention_out_bias
    assert cfg["qwen2"].layer_types == ["full_attention", "sliding_attention"] and cfg["qwen2"].tie_word_embeddings
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].head_dim == 32
    n = cfg["nemotron"]
    assert (n.norm_type, n.mlp_gated, n.hidden_act) == ("layernorm1p", False, "relu2")
    assert n.rope_parameters["partial_rotary_factor"] == 0.5


def test_shared_expert_keeps_the_dense_function(tmp_path, tiny_dense_dirs):
    """Shared expert = dense FFN at half output, routed experts at the other half: still exact."""
    folder = tiny_dense_dirs["llama"]
    moe = upcycle_in_memory(folder, num_experts=4, top_k=2, router="topk_softmax", shared_expert=True,
                            dtype="float32")
    assert moe.config.num_shared_experts == 1
    assert max_logit_diff(load_dense(folder), moe, IDS) <= 1e-4


def test_paper_scaling_is_exact_for_relu2_but_not_for_swiglu(tiny_dense_dirs):
    """s^(1/3) on every matrix: exact for Nemotron's relu2, off for SwiGLU (method.md); 'exact' is exact for both.

    Measured on one layer with inputs of realistic scale (tiny random weights keep SiLU in its linear range
    otherwise, which would hide the error)."""
    kw = dict(num_experts=16, top_k=4, granularity=4, router="topk_softmax", dtype="float32")
    x = torch.randn(1, 256, 64, generator=torch.Generator().manual_seed(0)) * 8
    rel = {}
    for family in ("llama", "nemotron"):
        dense_mlp = load_dense(tiny_dense_dirs[family]).model.layers[0].mlp
        with torch.no_grad():
            ref = dense_mlp(x)
            for scaling in ("exact", "paper"):
                moe = upcycle_in_memory(tiny_dense_dirs[family], scaling=scaling, **kw)
                rel[family, scaling] = ((moe.model.layers[0].mlp(x) - ref).norm() / ref.norm()).item()
    assert rel["llama", "exact"] < 1e-5 and rel["nemotron", "exact"] < 1e-5
    assert rel["nemotron", "paper"] < 1e-5
    assert rel["llama", "paper"] > 0.02  # 1000x the exact placement's error


def test_scale_placement_formulas():
    assert place_scale(4.0, "exact", True, "silu").__dict__ == {"gate": 1.0, "up": 2.0, "down": 2.0}
    relu2 = place_scale(8.0, "exact", False, "relu2")
    assert relu2.up == pytest.approx(2.0) and relu2.down == pytest.approx(2.0)
    paper = place_scale(8.0, "paper", True, "silu")
    assert (paper.gate, paper.up, paper.down) == pytest.approx((2.0, 2.0, 2.0))
    assert place_scale(8.0, "none", True, "silu").__dict__ == {"gate": 1.0, "up": 1.0, "down": 1.0}
    assert place_scale(3.0, "exact", False, "gelu").__dict__ == {"gate": 1.0, "up": 1.0, "down": 3.0}


def test_softmax_topk_default_scale_and_small_gain(tiny_dense_dirs):
    """Default softmax_topk: s = E·G²/T recorded per layer, and the step-0 function stays close to the dense one."""
    folder = tiny_dense_dirs["qwen3"]
    moe = upcycle_in_memory(folder, num_experts=16, top_k=4, granularity=4, dtype="float32")
    assert set(moe.config.upcycling["activation_scale"].values()) == {4 * 16 / 4}
    dense = load_dense(folder)
    with torch.no_grad():
        pd = torch.log_softmax(dense(IDS).logits, -1)
        pm = torch.log_softmax(moe(IDS).logits, -1)
    kl = (pd.exp() * (pd - pm)).sum(-1).mean().item()
    assert kl < 1e-3


# ---------------------------------------------------------------------------------------------------- virtual groups


def shard_counts(top_k_index, granularity):
    shards = top_k_index % granularity
    return torch.stack([(shards == j).sum(-1) for j in range(granularity)], -1)


@pytest.mark.parametrize("granularity,num_experts,top_k", [(2, 8, 4), (4, 16, 4), (4, 16, 8), (8, 64, 8)])
def test_virtual_groups_give_every_shard_top_k_over_g_times(tiny_dense_dirs, granularity, num_experts, top_k):
    """Through the model's own router on real activations and on exact ties (zero input: every logit equal)."""
    model = upcycle_in_memory(tiny_dense_dirs["llama"], num_experts=num_experts, top_k=top_k,
                              granularity=granularity, router_init_std=0.02, dtype="float32")
    captured = []
    layer = model.model.layers[1].mlp
    handle = layer.gate.register_forward_hook(lambda m, a, out: captured.append(out[2]))
    with torch.no_grad():
        model(torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1)))
        x = torch.randn(512, 64, generator=torch.Generator().manual_seed(2))
        x[:16] = 0.0  # all logits tie: the stable top-k must still take whole groups
        x[16:32] = x[16:32].round()  # coarse inputs: frequent near-ties across groups
        _, _, index = layer.gate(x)
    handle.remove()
    expected = top_k // granularity
    for idx in (*captured, index):
        assert (shard_counts(idx, granularity) == expected).all()
    w = layer.gate.weight
    groups = w.view(num_experts // granularity, granularity, -1)
    assert torch.equal(groups, groups[:, :1].expand_as(groups))  # bit-identical rows inside a group


# ---------------------------------------------------------------------------------------------------- Drop-Upcycling


def match_neurons(expert_up, dense_up):
    """For each expert neuron, the index of the identical dense neuron, or -1 if it was re-drawn."""
    eq = (expert_up[:, None, :] == dense_up[None, :, :]).all(-1)
    return torch.where(eq.any(1), eq.float().argmax(1), torch.full((expert_up.shape[0],), -1))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("granularity", [1, 2])
def test_drop_upcycling_redraws_exactly_floor_r_width(tmp_path, tiny_dense_dirs, ratio, granularity):
    folder = tiny_dense_dirs["llama"]
    out = upcycle(folder, tmp_path / "moe", num_experts=4, top_k=2, granularity=granularity, drop_ratio=ratio,
                  router="topk_softmax", dtype="float32", scaling="none")
    moe, dense = tensors(out), load_dense(folder).state_dict()
    width = 96 // granularity
    for layer in range(2):
        gu = moe[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = moe[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(4):
            rows = slice((e % granularity) * width, (e % granularity + 1) * width)
            d_gate = dense[f"model.layers.{layer}.mlp.gate_proj.weight"][rows]
            d_up = dense[f"model.layers.{layer}.mlp.up_proj.weight"][rows]
            d_down = dense[f"model.layers.{layer}.mlp.down_proj.weight"][:, rows]
            which = match_neurons(gu[e, width:], d_up)
            assert (which == -1).sum().item() == math.floor(ratio * width)
            kept = which >= 0
            assert len(set(which[kept].tolist())) == kept.sum().item()  # a permutation of the kept neurons
            # gate rows and down columns move with their up row (function-preserving permutation)
            assert torch.equal(gu[e, :width][kept], d_gate[which[kept]])
            assert torch.equal(down[e][:, kept], d_down[:, which[kept]])
            assert not (match_neurons(gu[e, :width][~kept], d_gate) >= 0).any()


def test_drop_upcycling_draws_from_the_statistics_of_what_it_replaces():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(2000, 64, generator=g) * 0.5 + 0.3
    up = torch.randn(2000, 64, generator=g) * 2.0 - 1.0
    down = torch.randn(64, 2000, generator=g) * 0.1
    ng, nu, nd = drop_upcycle(gate, up, down, 0.5, generator_for(0, "drop", 0, 0))
    for new, old, dim in ((ng, gate, 0), (nu, up, 0), (nd, down, 1)):
        fresh = new.narrow(dim, 0, 1000)  # redrawn block sits first after the permutation
        assert fresh.mean().item() == pytest.approx(old.mean().item(), abs=0.02 * old.std().item() + 1e-3)
        assert fresh.std().item() == pytest.approx(old.std().item(), rel=0.02)
        kept_new = new.narrow(dim, 1000, 1000)
        assert not torch.equal(fresh, old.narrow(dim, 0, 1000))
        assert kept_new.numel() == 64000


def test_drop_ratio_zero_is_plain_copying(tmp_path, tiny_dense_dirs):
    """ratio 0: every expert is the (scaled) dense FFN, whatever the seed; a ratio > 0 with the same seed is not."""
    folder = tiny_dense_dirs["qwen2"]
    kw = dict(num_experts=4, top_k=2, dtype="float32")
    a = tensors(upcycle(folder, tmp_path / "a", drop_ratio=0.0, seed=3, **kw))
    b = tensors(upcycle(folder, tmp_path / "b", drop_ratio=0.0, seed=4, **kw))
    dropped = tensors(upcycle(folder, tmp_path / "c", drop_ratio=0.5, seed=3, **kw))
    experts = [k for k in a if ".experts." in k]
    assert experts and all(torch.equal(a[k], b[k]) for k in experts)  # no randomness reaches the experts
    assert not torch.equal(a["model.layers.0.mlp.gate.weight"], b["model.layers.0.mlp.gate.weight"])  # seeds differ
    assert all(not torch.equal(a[k], dropped[k]) for k in experts)
    dense = load_dense(folder).state_dict()
    gu = a["model.layers.0.mlp.experts.gate_up_proj"]
    s = math.sqrt(4 * 1 / 2)  # softmax_topk, N=4, G=1, T=2: s = N·G/T = 2; exact placement puts sqrt(s) on up
    for e in range(4):
        assert torch.equal(gu[e, :96], dense["model.layers.0.mlp.gate_proj.weight"])
        assert torch.allclose(gu[e, 96:], dense["model.layers.0.mlp.up_proj.weight"] * s)


@pytest.mark.parametrize("router,fraction", [("topk_softmax", 1.0), ("softmax_topk", 0.3)])
def test_noise_upcycling_adds_the_asked_noise_before_scaling(tiny_dense_dirs, router, fraction):
    """noise_std > 0: expert / multiplier - dense shard is N(0, std²) on `fraction` of the entries, per expert
    independent, the same for a seed."""
    folder = tiny_dense_dirs["llama"]
    std = 0.01
    kw = dict(num_experts=4, top_k=2, router=router, dtype="float32", noise_std=std, noise_fraction=fraction)
    sd = upcycle_in_memory(folder, seed=1, **kw).state_dict()
    again = upcycle_in_memory(folder, seed=1, **kw).state_dict()
    other = upcycle_in_memory(folder, seed=2, **kw).state_dict()
    dense = load_dense(folder).state_dict()
    s = 1.0 if router == "topk_softmax" else 4 * 1 / 2  # G for topk_softmax; N·G/T for softmax_topk
    up_down = math.sqrt(s)  # gated MLP, exact placement: gate x1, up and down x sqrt(s)
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.experts."
        gu, down = sd[name + "gate_up_proj"], sd[name + "down_proj"]
        assert torch.equal(gu, again[name + "gate_up_proj"]) and torch.equal(down, again[name + "down_proj"])
        assert not torch.equal(gu, other[name + "gate_up_proj"])
        dense_mlp = f"model.layers.{layer}.mlp."
        noises = []
        for e in range(4):
            for got, mult, ref in ((gu[e, :96], 1.0, dense[dense_mlp + "gate_proj.weight"]),
                                   (gu[e, 96:], up_down, dense[dense_mlp + "up_proj.weight"]),
                                   (down[e], up_down, dense[dense_mlp + "down_proj.weight"])):
                noise = got / mult - ref
                hit = noise.abs() > 1e-6
                assert hit.float().mean().item() == pytest.approx(fraction, abs=0.03)
                assert noise[hit].std().item() == pytest.approx(std, rel=0.06)
                assert noise[hit].mean().abs().item() < 3 * std / hit.sum().item() ** 0.5 + 1e-4
                noises.append(noise)
        assert not torch.equal(noises[0], noises[3])  # expert 1's gate noise is not expert 0's


def _rope_llama(tmp_path, rope_parameters):
    """initializer_range 0.1: attention scores large enough that position encodings visibly change the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope_parameters,
                         max_position_embeddings=32, initializer_range=0.1)
    folder = tmp_path / "dense"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
])
def test_scaled_rope_sources_convert_exactly(tmp_path, rope):
    """Linear / dynamic NTK / YaRN RoPE carry over: logits equal transformers' Llama past the original context (48
    tokens > max_position_embeddings 32: dynamic rescales there, yarn past its original 16)."""
    folder = _rope_llama(tmp_path, dict(rope))
    dense = load_dense(folder)
    assert dense.config.rope_parameters["rope_type"] == rope["rope_type"]
    moe = load_moe(upcycle(folder, tmp_path / "moe", num_experts=4, top_k=2, router="topk_softmax", dtype="float32"))
    assert moe.config.rope_parameters == dense.config.rope_parameters
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    assert max_logit_diff(dense, moe, ids) <= 1e-4
    plain = _rope_llama(tmp_path / "plain", {"rope_type": "default", "rope_theta": 10000.0})
    assert max_logit_diff(load_dense(plain), moe, ids) > 1e-2  # the scaling matters on these inputs


def test_sharded_safetensors_source_converts_exactly(tmp_path):
    """A source saved in several safetensors shards (with its index) converts like a single file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder,
                                                                                                max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    moe = load_moe(upcycle(folder, tmp_path / "moe", num_experts=4, top_k=2, router="topk_softmax", dtype="float32"))
    assert max_logit_diff(load_dense(folder), moe, IDS) <= 1e-4
    assert greedy(load_dense(folder), IDS[:1]) == greedy(moe, IDS[:1])


# ---------------------------------------------------------------------------------------------------- determinism, layers


def test_deterministic_for_a_seed_and_streaming_equals_in_memory(tmp_path, tiny_dense_dirs):
    folder = tiny_dense_dirs["mistral"]
    kw = dict(num_experts=8, top_k=2, drop_ratio=0.3, noise_std=1e-3, noise_fraction=0.5, dtype="float32")
    a = tensors(upcycle(folder, tmp_path / "a", seed=7, **kw))
    b = tensors(upcycle(folder, tmp_path / "b", seed=7, **kw))
    c = tensors(upcycle(folder, tmp_path / "c", seed=8, **kw))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.gate.weight"], c["model.layers.0.mlp.gate.weight"])
    online = upcycle_in_memory(folder, seed=7, **kw).state_dict()
    assert all(torch.equal(a[k], online[k]) for k in a)


def test_moe_layers_every_nth_and_list(tmp_path, tiny_dense_dirs):
    folder = tiny_dense_dirs["llama"]
    m = upcycle_in_memory(folder, moe_layers="every:2", router="topk_softmax", dtype="float32")
    assert m.config.mlp_layer_types == ["dense", "sparse"]
    sd = m.state_dict()
    assert "model.layers.0.mlp.gate_proj.weight" in sd and "model.layers.1.mlp.experts.gate_up_proj" in sd
    assert max_logit_diff(load_dense(folder), m, IDS) <= 1e-4
    assert upcycle_in_memory(folder, moe_layers=[0]).config.mlp_layer_types == ["sparse", "dense"]


def test_from_dense_accepts_a_model_and_records_provenance(tiny_dense_dirs):
    dense = load_dense(tiny_dense_dirs["nemotron"])
    moe = UpcycledMoeForCausalLM.from_dense(dense, num_experts=4, top_k=2, router="topk_softmax")
    assert max_logit_diff(dense, moe, IDS) <= 1e-4
    prov = moe.config.upcycling
    assert prov["tool"] == "upcycled-moe" and prov["tool_version"]
    assert prov["options"]["num_experts"] == 4 and prov["source"]["format"] == "in-memory"


def test_provenance_in_config_json(tmp_path, tiny_dense_dirs):
    out = upcycle(tiny_dense_dirs["qwen3"], tmp_path / "moe", num_experts=4, top_k=2, seed=5)
    prov = json.loads((out / "config.json").read_text())["upcycling"]
    assert prov["source"]["path"] == tiny_dense_dirs["qwen3"].name  # the folder's name: config.json is published
    assert prov["source"]["fingerprint"].startswith("sha256:")
    assert set(UpcycleOptions.field_names()) <= set(prov["options"])
    assert prov["options"]["seed"] == 5 and prov["tool_version"]


# ---------------------------------------------------------------------------------------------------- options


def test_options_yaml_and_unknown_keys(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text(yaml.safe_dump({"num-experts": 16, "top_k": 4, "granularity": 2, "moe_layers": "0,3"}))
    o = UpcycleOptions.from_yaml(path, top_k=8)
    assert (o.num_experts, o.top_k, o.granularity, o.moe_layers) == (16, 8, 2, [0, 3])
    path.write_text("num_expert: 4\n")
    with pytest.raises(UpcycleError, match="unknown option"):
        UpcycleOptions.from_yaml(path)


def test_defaults_match_the_issue():
    o = UpcycleOptions()
    assert (o.num_experts, o.top_k, o.granularity, o.router, o.scaling) == (8, 2, 1, "softmax_topk", "exact")
    assert 0 < o.router_init_std <= 0.002


def test_routing_weights_follow_the_model():
    """The conversion's routing weights are the model's own, for every router and norm_topk_prob."""
    from upcycled_moe import UpcycledMoeConfig
    from upcycled_moe.modeling_upcycled_moe import route

    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    logits[:, 4:] = logits[:, :4]  # tied pairs: the tie-breaking rule matters too
    for router in ("topk_softmax", "softmax_topk", "sigmoid_topk"):
        for norm in (False, True):
            config = UpcycledMoeConfig(num_experts=8, num_experts_per_tok=2, router_type=router, norm_topk_prob=norm)
            _, model_w, model_i = route(logits, config)
            w, i = routing_weights(logits, router, 2, norm_topk_prob=norm)
            assert torch.equal(i, model_i) and torch.equal(w, model_w), (router, norm)
            if router == "topk_softmax" or norm:
                assert torch.allclose(w.sum(-1), torch.ones(32))
            else:
                assert not torch.allclose(w.sum(-1), torch.ones(32))


# ---------------------------------------------------------------------------------------------------- norm_topk_prob


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_norm_topk_prob_conversion_is_function_preserving(tiny_dense_dirs, router):
    """With renormalised weights the selected mass is exactly 1 (as for topk_softmax), so the scale is G: exact."""
    folder = tiny_dense_dirs["llama"]
    moe = upcycle_in_memory(folder, num_experts=8, top_k=2, router=router, dtype="float32",
                            extra_config={"norm_topk_prob": True})
    assert moe.config.norm_topk_prob is True
    assert set(moe.config.upcycling["activation_scale"].values()) == {1.0}
    assert max_logit_diff(load_dense(folder), moe, IDS) <= 1e-4


def _pretrain_config(model, **values):
    from trainer_scripts.config import PretrainConfig

    return PretrainConfig(model_name_or_path=str(model), block_size=64, **values)


def test_norm_topk_prob_via_model_config_overrides_keeps_the_dense_function(tiny_dense_dirs):
    """Online upcycling in continued pretraining: the override reaches the conversion (it sets the scale)."""
    from trainer_scripts.continued_pretraining import load_model, read_model_config

    folder = tiny_dense_dirs["llama"]
    cfg = _pretrain_config(folder, upcycling={"num_experts": 8, "top_k": 2},
                           model_config_overrides={"norm_topk_prob": True})
    _, is_moe = read_model_config(cfg)
    moe = load_model(cfg, is_moe).eval()
    assert moe.config.norm_topk_prob is True
    assert max_logit_diff(load_dense(folder), moe, IDS) <= 1e-4  # 0.077 when set after the conversion


def test_routing_overrides_on_a_converted_model_are_refused_up_front(tmp_path, tiny_dense_dirs):
    """A converted checkpoint's experts are scaled for its routing: changing the routing breaks preservation."""
    from trainer_scripts.config import ConfigError
    from trainer_scripts.continued_pretraining import read_model_config

    out = upcycle(tiny_dense_dirs["llama"], tmp_path / "moe", num_experts=8, top_k=2, dtype="float32")
    for overrides in ({"norm_topk_prob": True}, {"num_experts_per_tok": 4}, {"router_type": "sigmoid_topk"}):
        with pytest.raises(ConfigError, match=f"model_config_overrides: {next(iter(overrides))}.*function"):
            read_model_config(_pretrain_config(out, model_config_overrides=overrides))
    read_model_config(_pretrain_config(out, model_config_overrides={"norm_topk_prob": False, "capacity_factor": 2.0}))
    top = upcycle(tiny_dense_dirs["llama"], tmp_path / "top", num_experts=8, top_k=2, router="topk_softmax")
    read_model_config(_pretrain_config(top, model_config_overrides={"norm_topk_prob": True}))  # no effect: allowed
