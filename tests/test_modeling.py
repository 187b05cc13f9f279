"""The UpcycledMoe model family behaves like a native Transformers MoE: config validation, routing, losses,
generation, attention/experts implementations, gradient checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import upcycled_moe  # noqa: F401  (registers the Auto classes)
from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM, UpcycledMoeModel
from upcycled_moe.modeling_upcycled_moe import (
    capacity_keep_mask,
    load_balancing_loss,
    route,
    router_z_loss,
    routing_statistics,
    stable_topk,
)


def small_config(**overrides) -> UpcycledMoeConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    return UpcycledMoeConfig(**{**base, **overrides})


def small_model(**overrides) -> UpcycledMoeForCausalLM:
    torch.manual_seed(0)
    return UpcycledMoeForCausalLM(small_config(**overrides)).eval()


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def test_minimal_config_builds_a_working_moe():
    config = UpcycledMoeConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                               vocab_size=100)
    assert (config.num_experts, config.num_experts_per_tok, config.router_type) == (8, 2, "softmax_topk")
    assert config.router_aux_loss_coef == 1e-2 and config.capacity_factor is None
    model = UpcycledMoeForCausalLM(config)
    ids = torch.randint(0, 100, (1, 6))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss) and out.aux_loss is not None
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 256, 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(router_type="softmax"), "router_type must be one of"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(mlp_layer_types=["sparse"]), "mlp_layer_types has 1 entries but num_hidden_layers=2"),
        (dict(mlp_layer_types=["sparse", "moe"]), "mlp_layer_types entries must be one of"),
        (dict(layer_types=["sliding_attention", "full_attention"]), "sliding_window is not set"),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
        (dict(norm_type="batchnorm"), "norm_type must be one of"),
    ],
)
def test_config_rejects_bad_values_with_one_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_width_not_multiple_of_8_warns_and_still_runs():
    with pytest.warns(UserWarning, match="not a multiple of 8"):
        config = small_config(moe_intermediate_size=100)
    assert not config.grouped_mm_compatible
    model = UpcycledMoeForCausalLM(config)
    ids = torch.randint(0, 128, (1, 5))
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    with pytest.warns(UserWarning, match="grouped_mm cannot take"):
        model.set_experts_implementation("grouped_mm")
    assert model.config._experts_implementation == "upcycled_fused"
    torch.testing.assert_close(model(ids, labels=ids).loss, loss)


def test_config_round_trip_and_auto_registration(tmp_path):
    config = small_config(router_type="topk_softmax", num_shared_experts=1, mlp_layer_types=["dense", "sparse"])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, UpcycledMoeConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    assert type(AutoModel.from_config(loaded)) is UpcycledMoeModel
    assert type(AutoModelForCausalLM.from_config(loaded)) is UpcycledMoeForCausalLM


# ----------------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------------
def test_routing_functions_follow_their_definitions():
    torch.manual_seed(1)
    logits = torch.randn(7, 8)
    p = torch.softmax(logits, -1)
    top_p, top_i = torch.topk(p, 2)
    for router_type, expected in [
        ("softmax_topk", top_p),
        ("topk_softmax", top_p / top_p.sum(-1, keepdim=True)),
        ("sigmoid_topk", torch.topk(torch.sigmoid(logits), 2).values),
    ]:
        config = small_config(router_type=router_type)
        _, weights, index = route(logits, config)
        torch.testing.assert_close(weights, expected)
        assert torch.equal(index, top_i)


def test_stable_topk_takes_tied_groups_whole():
    # two virtual groups of 4 bit-identical scores; top-4 must pick one whole group, never a mix
    scores = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.3, 0.3, 0.3, 0.3], [0.5] * 4 + [0.2] * 4])
    _, index = stable_topk(scores, 4)
    assert index.tolist() == [[4, 5, 6, 7], [0, 1, 2, 3]]


def test_capacity_drops_slots_beyond_capacity_first_choices_first():
    index = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])  # expert 0 is asked 4 times, capacity 2
    keep = capacity_keep_mask(index, num_experts=3, capacity=2)
    # first choices in token order: t0->0, t1->0, t2->0 (3rd: dropped), t3->1; then second choices:
    # t0->1 (2nd for expert 1), t1->1 (3rd: dropped), t2->2, t3->0 (4th: dropped)
    assert keep.tolist() == [[True, True], [True, False], [False, True], [True, False]]


def test_capacity_factor_zeroes_dropped_slots_in_the_router():
    model = small_model(capacity_factor=0.5)
    router = model.model.layers[0].mlp.gate
    hidden = torch.randn(16, 64)
    logits, weights, index = router(hidden)
    capacity = model.config.expert_capacity(16)
    for e in range(model.config.num_experts):
        assert int(((index == e) & (weights > 0)).sum()) <= capacity
    assert int((weights == 0).sum()) >= 16 * 2 - capacity * model.config.num_experts
    # dropped slots carry the sentinel index num_experts (every experts implementation skips it) and weight 0
    _, _, chosen = route(logits, model.config)
    dropped = ~capacity_keep_mask(chosen, model.config.num_experts, capacity)
    assert dropped.any() and (index[dropped] == model.config.num_experts).all() and (weights[dropped] == 0).all()
    assert torch.equal(index[~dropped], chosen[~dropped])


def test_router_jitter_only_in_training():
    model = small_model(router_jitter_noise=0.5)
    router = model.model.layers[0].mlp.gate
    hidden = torch.randn(8, 64)
    assert torch.equal(router(hidden)[0], router(hidden)[0])
    router.train()
    assert not torch.equal(router(hidden)[0], router(hidden)[0])


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def test_aux_and_z_loss_equal_their_definitions_on_a_hand_built_routing():
    config = small_config(num_experts=4, num_experts_per_tok=2, router_type="softmax_topk")
    logits = torch.tensor(
        [[2.0, 1.0, 0.0, -1.0], [2.0, 0.5, 1.0, -1.0], [0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0]]
    )
    # by hand: top-2 of each row; in the last row experts 0, 1, 2 tie and the lowest index wins
    chosen = [[0, 1], [0, 2], [1, 2], [3, 0]]
    counts = torch.zeros(4)
    for row in chosen:
        for e in row:
            counts[e] += 1
    assert counts.tolist() == [3.0, 2.0, 2.0, 1.0]
    f = counts / 8.0
    p = torch.softmax(logits, -1).mean(0)
    expected_aux = 4 * (f * p).sum()
    expected_z = (torch.logsumexp(logits, -1) ** 2).mean()
    aux = load_balancing_loss((logits, logits * 1.0), config)
    torch.testing.assert_close(aux, expected_aux)
    torch.testing.assert_close(router_z_loss((logits,)), expected_z)
    # padding rows are excluded
    mask = torch.tensor([[1, 1, 1, 0]])
    counts3 = torch.tensor([2.0, 2.0, 2.0, 0.0])
    expected_masked = 4 * ((counts3 / 6.0) * torch.softmax(logits[:3], -1).mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss((logits,), config, mask), expected_masked)


def _per_layer_reference(logits_list, config, mask):
    """The router terms layer by layer, written out directly (the batched code must equal this)."""
    E, k = config.num_experts, config.num_experts_per_tok
    aux, z, loads, ent, dropped = [], [], [], [], []
    for logits in logits_list:
        probs, _, index = route(logits, config)
        n = mask.sum()
        counts = torch.stack([((index == e).float() * mask[:, None]).sum() for e in range(E)])
        aux.append(E * ((counts / (n * k)) * (probs * mask[:, None]).sum(0) / n).sum())
        z.append((torch.logsumexp(logits, -1) ** 2 * mask).sum() / n)
        loads.append(counts / counts.sum())
        ent.append((-(probs * probs.clamp(min=1e-12).log()).sum(-1) * mask).sum() / n)
        keep = torch.ones_like(index, dtype=torch.bool)
        if config.capacity_factor is not None:  # real tokens only: choice by choice, token by token, first come
            capacity, used = math.ceil(config.capacity_factor * int(mask.sum()) * k / E), [0] * E
            keep[:] = False
            for choice in range(k):
                for t in range(index.shape[0]):
                    e = int(index[t, choice])
                    if mask[t] and used[e] < capacity:
                        keep[t, choice], used[e] = True, used[e] + 1
        dropped.append(((~keep).float() * mask[:, None]).sum() / (mask.sum() * k))
    return torch.stack(aux).mean(), torch.stack(z).mean(), torch.stack(loads), torch.stack(ent), torch.stack(dropped)


@pytest.mark.parametrize("router_type", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_batched_router_terms_equal_the_per_layer_definitions(router_type):
    config = small_config(num_experts=8, num_experts_per_tok=2, router_type=router_type, capacity_factor=1.0)
    torch.manual_seed(0)
    layers = [(torch.randn(3 * 10, 8) * (1 + i)).requires_grad_(True) for i in range(4)]
    attention_mask = (torch.rand(3, 10) > 0.3).long()
    mask = attention_mask.reshape(-1).float()
    ref_aux, ref_z, ref_load, ref_ent, ref_drop = _per_layer_reference(layers, config, mask)
    ref_grads = torch.autograd.grad(ref_aux + ref_z, layers)
    aux = load_balancing_loss(layers, config, attention_mask)
    z = router_z_loss(layers, attention_mask)
    torch.testing.assert_close(aux, ref_aux)
    torch.testing.assert_close(z, ref_z)
    for got, want in zip(torch.autograd.grad(aux + z, layers), ref_grads):
        torch.testing.assert_close(got, want)
    stats = routing_statistics(layers, config, attention_mask)
    torch.testing.assert_close(stats["expert_load"], ref_load)
    torch.testing.assert_close(stats["router_entropy"], ref_ent)
    torch.testing.assert_close(stats["dropped_fraction"], ref_drop)
    assert ref_drop.sum() > 0  # capacity 1.0 on random routing drops something: the dropped path is exercised


def test_zero_weighted_router_terms_are_reported_but_build_no_backward_graph():
    model = small_model(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    ids = torch.randint(0, 128, (2, 12))
    out = model(ids, labels=ids)
    assert out.aux_loss > 0 and out.z_loss > 0  # still reported
    assert not out.aux_loss.requires_grad and not out.z_loss.requires_grad
    model.config.router_aux_loss_coef, model.config.router_z_loss_coef = 0.1, 0.01
    out = model(ids, labels=ids)
    assert out.aux_loss.requires_grad and out.z_loss.requires_grad


def test_balanced_routing_gives_aux_loss_one():
    config = small_config(num_experts=4, num_experts_per_tok=1, router_type="topk_softmax")
    logits = torch.eye(4) * 10  # each token goes to a different expert, probabilities symmetric
    torch.testing.assert_close(load_balancing_loss((logits,), config), torch.tensor(1.0))


def _switch_aux_by_hand(logits, k, balance_probs):
    """E * sum_e f_e * P_e with plain python loops: f_e = share of the T*k slots sent to e (top-k of the logits, ties
    to the lower index), P_e = mean over tokens of the balance probability of e."""
    rows = logits.tolist()
    num_tokens, num_experts = len(rows), len(rows[0])
    counts, prob_sums = [0.0] * num_experts, [0.0] * num_experts
    for row in rows:
        order = sorted(range(num_experts), key=lambda e: (-row[e], e))
        for e in order[:k]:
            counts[e] += 1
        probs = balance_probs(row)
        for e in range(num_experts):
            prob_sums[e] += probs[e]
    return num_experts * sum(counts[e] / (num_tokens * k) * prob_sums[e] / num_tokens for e in range(num_experts))


def _softmax_list(row):
    exps = [math.exp(v - max(row)) for v in row]
    return [v / sum(exps) for v in exps]


def _normalised_sigmoid_list(row):
    sig = [1.0 / (1.0 + math.exp(-v)) for v in row]
    return [v / sum(sig) for v in sig]


@pytest.mark.parametrize("router_type, balance_probs", [("topk_softmax", _softmax_list),
                                                         ("sigmoid_topk", _normalised_sigmoid_list)])
def test_aux_loss_equals_the_switch_formula_by_hand(router_type, balance_probs):
    config = small_config(num_experts=6, num_experts_per_tok=2, router_type=router_type)
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float() * 2
    expected = _switch_aux_by_hand(logits, 2, balance_probs)
    assert load_balancing_loss((logits,), config).item() == pytest.approx(expected, rel=1e-5)
    # two layers: the mean over layers
    other = logits.flip(0) * 0.5
    expected2 = (expected + _switch_aux_by_hand(other, 2, balance_probs)) / 2
    assert load_balancing_loss((logits, other), config).item() == pytest.approx(expected2, rel=1e-5)


@pytest.mark.parametrize("router_type, score", [("softmax_topk", _softmax_list),
                                                 ("sigmoid_topk", lambda r: [1 / (1 + math.exp(-v)) for v in r])])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_norm_topk_prob_renormalises_the_model_routers_weights(router_type, score, norm_topk_prob):
    model = small_model(num_experts=6, num_experts_per_tok=3, router_type=router_type, norm_topk_prob=norm_topk_prob)
    router = model.model.layers[1].mlp.gate
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    logits, weights, index = router(hidden)
    for t, row in enumerate(logits.tolist()):
        scores = score(row)
        top = sorted(range(6), key=lambda e: (-scores[e], e))[:3]
        kept = [scores[e] for e in top]
        if norm_topk_prob:
            kept = [v / sum(kept) for v in kept]
        assert index[t].tolist() == top
        assert weights[t].tolist() == pytest.approx(kept, rel=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(5)) == norm_topk_prob


def test_loss_includes_router_terms_whenever_labels_are_given():
    model = small_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    ids = torch.randint(0, 128, (2, 12))
    out = model(ids, labels=ids)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    assert out.router_logits is None  # not asked for
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (24, 8)
    assert out.router_logits[0].dtype == torch.float32


def test_routing_statistics_shapes_and_balance():
    model = small_model(capacity_factor=1.0)
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, output_router_logits=True)
    stats = routing_statistics(out.router_logits, model.config)
    assert stats["expert_load"].shape == (2, 8)
    torch.testing.assert_close(stats["expert_load"].sum(-1), torch.ones(2))
    assert (stats["imbalance"] >= 1.0).all()
    assert (stats["router_entropy"] > 0).all() and (stats["router_entropy"] <= math.log(8) + 1e-5).all()
    assert ((stats["dropped_fraction"] >= 0) & (stats["dropped_fraction"] < 1)).all()


# ----------------------------------------------------------------------------------------------------------------
# Generation, implementations, gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=4, layer_types=["sliding_attention"] * 2,
                                                     qk_norm=True, num_shared_experts=1)])
def test_greedy_generation_with_cache_equals_without(overrides):
    model = small_model(**overrides)
    prompt = torch.randint(0, 128, (2, 7))
    with_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, 27)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=4, layer_types=["full_attention", "sliding_attention"])])
def test_static_cache_generation_equals_dynamic(overrides):
    """generate(cache_implementation="static") hands the model its masks prebuilt, as a dict per layer type (the
    forward used to rebuild masks from that dict: AttributeError 'dict' object has no attribute 'ndim')."""
    model = small_model(**overrides)
    torch.manual_seed(1)
    prompt = torch.randint(1, 128, (2, 7))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # a left-padded row
    dynamic = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    static = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                            cache_implementation="static")
    assert static.shape == (2, 15)
    assert torch.equal(static, dynamic)


def test_sdpa_and_eager_attention_agree():
    torch.manual_seed(0)
    config = small_config(sliding_window=5, layer_types=["sliding_attention", "full_attention"])
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    a = eager(ids, attention_mask=mask).logits
    b = sdpa(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_experts_implementations_agree_with_working_backward(gated):
    overrides = dict(mlp_gated=gated, hidden_act="silu" if gated else "relu2", capacity_factor=1.0)
    model = small_model(**overrides)
    ids = torch.randint(0, 128, (2, 16))
    grad_out = torch.randn(2, 16, 128)
    results = {}
    for impl in ("eager", "grouped_mm", "upcycled_fused"):
        model.zero_grad()
        model.set_experts_implementation(impl)
        logits = model(ids).logits
        logits.backward(grad_out)  # a real upstream gradient (grouped_mm rejects stride-0 ones)
        experts = model.model.layers[1].mlp.experts
        weight = experts.gate_up_proj if gated else experts.up_proj
        results[impl] = (logits.detach(), weight.grad.clone(), model.model.embed_tokens.weight.grad.clone())
    for impl in ("grouped_mm", "upcycled_fused"):
        for a, b in zip(results["eager"], results[impl]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert results["eager"][1].abs().sum() > 0


def _count_expert_rows(model, impl, monkeypatch):
    """Rows each expert GEMM multiplies, observed by spies that call the real code: the fused path's own record, the
    arguments transformers passes to torch's grouped_mm, the rows the eager loop feeds each expert FFN."""
    from upcycled_moe import fused_moe

    rows = []
    if impl == "upcycled_fused":
        monkeypatch.setattr(fused_moe, "COUNT_ROWS", True)
        monkeypatch.setattr(fused_moe, "GEMM_ROWS", rows)
    elif impl == "grouped_mm":
        real = torch.nn.functional.grouped_mm

        def spy(a, b, offs=None, **kw):
            rows.append(int(offs[-1]))
            return real(a, b, offs=offs, **kw)

        monkeypatch.setattr(torch.nn.functional, "grouped_mm", spy)
    else:
        for layer in model.model.layers:
            experts = layer.mlp.experts
            real_ffn = experts.expert_ffn

            def ffn(expert_idx, x, real_ffn=real_ffn):
                rows.append(x.shape[0])
                return real_ffn(expert_idx, x)

            monkeypatch.setattr(experts, "expert_ffn", ffn)
    return rows


def _block_by_hand(block, hidden, config):
    """The sparse block written out token by token: sum over kept slots of weight * SwiGLU expert; dropped slots
    contribute nothing."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    _, weights, index = route(flat.float() @ block.gate.weight.float().t(), config)
    keep = capacity_keep_mask(index, config.num_experts, config.expert_capacity(flat.shape[0]))
    experts, inter = block.experts, config.moe_intermediate_size
    out = []
    for t in range(flat.shape[0]):
        acc = torch.zeros(flat.shape[-1])
        for j in range(index.shape[1]):
            if keep[t, j]:
                e = int(index[t, j])
                gate_up = experts.gate_up_proj[e] @ flat[t]
                acc = acc + weights[t, j] * (experts.down_proj[e] @ (F.silu(gate_up[:inter]) * gate_up[inter:]))
        out.append(acc)
    return torch.stack(out).view(hidden.shape), keep


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "upcycled_fused"])
def test_capacity_drops_are_not_computed_and_contribute_nothing(impl, monkeypatch):
    model = small_model(capacity_factor=0.5, num_experts=4)
    model.set_experts_implementation(impl)
    block = model.model.layers[0].mlp
    hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    params = [hidden, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    grad_out = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(9))
    ref, keep = _block_by_hand(block, hidden, model.config)
    ref_grads = torch.autograd.grad(ref, params, grad_out)
    kept = int(keep.sum())
    assert 0 < kept < keep.numel()
    rows = _count_expert_rows(model, impl, monkeypatch)
    out = block(hidden)
    grads = torch.autograd.grad(out, params, grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for name, got, want in zip(("hidden", "router", "gate_up", "down"), grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
    # the expert GEMMs multiply only the kept slots: grouped kernels see kept rows, the eager loop feeds kept rows
    assert rows and (sum(rows) == kept if impl == "eager" else set(rows) == {kept}), (rows, kept)
    # the statistics still report the share dropped
    logits = block.gate(hidden.detach().view(-1, 64))[0]
    stats = routing_statistics((logits,), model.config)
    assert stats["dropped_fraction"].item() == pytest.approx(1 - kept / keep.numel())


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "upcycled_fused"])
def test_expert_gemms_follow_autocast_in_every_implementation(impl, monkeypatch):
    """fp32 weights under bf16 autocast (how the scripts train): every implementation's expert GEMMs run in bf16 as
    nn.Linear's do, and the gradients reach the fp32 weights in fp32."""
    from upcycled_moe import fused_moe

    model = small_model(num_experts=4).train()
    model.set_experts_implementation(impl)
    dtypes = []  # dtypes of the operands of each expert GEMM
    if impl == "upcycled_fused":
        fused_moe.GEMM_CALLS.clear()
    elif impl == "grouped_mm":
        real = torch.nn.functional.grouped_mm

        def spy(a, b, offs=None, **kw):
            dtypes.append((a.dtype, b.dtype))
            return real(a, b, offs=offs, **kw)

        monkeypatch.setattr(torch.nn.functional, "grouped_mm", spy)
    else:
        real_linear = F.linear

        def linear(x, w, b=None):
            out = real_linear(x, w, b)
            if w.dim() == 2 and w.shape == model.model.layers[0].mlp.experts.gate_up_proj.shape[1:]:
                dtypes.append((out.dtype, out.dtype))
            return out

        monkeypatch.setattr(F, "linear", linear)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    if impl == "upcycled_fused":
        assert set(fused_moe.GEMM_CALLS) == {("grouped_mm", torch.bfloat16)}
    else:
        assert dtypes and set(dtypes) == {(torch.bfloat16, torch.bfloat16)}, dtypes
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.grad.dtype == torch.float32
    assert experts.gate_up_proj.grad.abs().sum() > 0
    model.zero_grad()
    model.set_experts_implementation("eager")
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, eager.loss, atol=2e-2, rtol=2e-2)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = small_model(router_z_loss_coef=1e-3)
    model.train()
    ids = torch.randint(0, 128, (2, 16))

    def grads():
        model.zero_grad()
        torch.manual_seed(3)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and "model.layers.0.mlp.gate.weight" in plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


def test_dense_and_sparse_layer_pattern_and_shared_expert_shapes():
    model = small_model(mlp_layer_types=["dense", "sparse"], num_shared_experts=2,
                        shared_expert_intermediate_size=32, moe_intermediate_size=32, num_experts=16,
                        num_experts_per_tok=4)
    names = dict(model.named_parameters())
    assert names["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64)
    assert names["model.layers.1.mlp.experts.gate_up_proj"].shape == (16, 64, 64)
    assert names["model.layers.1.mlp.shared_expert.up_proj.weight"].shape == (64, 64)
    out = model(torch.randint(0, 128, (1, 9)), output_router_logits=True)
    assert len(out.router_logits) == 1  # only the sparse layer routes


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["upcycled_fused", "grouped_mm", "eager"])
def test_bf16_on_cuda_matches_fp32_eager_reference(impl):
    torch.manual_seed(0)
    reference = small_model(num_shared_experts=1).float()
    model = small_model(num_shared_experts=1).to("cuda", torch.bfloat16)
    model.set_experts_implementation(impl)
    ids = torch.randint(0, 128, (4, 64))
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids.cuda()).logits.float().cpu()
    rel = (got - expected).norm() / expected.norm()
    assert rel < 3e-2, rel
    prompt = ids[:2, :8].cuda()
    assert model.generate(prompt, max_new_tokens=12, do_sample=False).shape == (2, 20)
    out = model(ids.cuda(), labels=ids.cuda())
    out.loss.backward()
    assert torch.isfinite(model.model.layers[0].mlp.experts.gate_up_proj.grad.float()).all()


def test_flops_count_active_parameters_only():
    model = small_model(num_experts=8, num_experts_per_tok=2, mlp_layer_types=["dense", "sparse"])
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total = model.num_parameters(exclude_embeddings=True)
    assert model.num_active_parameters() == total - experts + experts // 4
    tied = small_model(num_experts=8, num_experts_per_tok=2, mlp_layer_types=["dense", "sparse"],
                       tie_word_embeddings=True)
    assert tied.num_active_parameters() == model.num_active_parameters()  # the tied LM head still multiplies
    ids = torch.randint(0, 128, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :7] = 0  # Trainer's count follows each row's real length, never the padding
    assert model.floating_point_ops({"input_ids": ids, "attention_mask": mask}) == model.training_flops([10, 7, 3])
    assert model.floating_point_ops({"input_ids": ids}) == model.training_flops([10, 10, 10])
    assert model.training_flops([10]) > 6 * 10 * model.num_active_parameters()  # attention comes on top


def test_fused_experts_are_the_default_and_an_explicit_choice_wins(tmp_path):
    model = small_model()
    assert model.config._experts_implementation == "upcycled_fused"
    model.save_pretrained(tmp_path)
    assert UpcycledMoeForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").config._experts_implementation == "eager"


# ----------------------------------------------------------------------------------------------------------------
# Chunked LM loss (config.loss_chunk_size)
# ----------------------------------------------------------------------------------------------------------------
def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad()
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients(tied, num_items):
    model = small_model(tie_word_embeddings=tied, router_z_loss_coef=1e-3).train()
    ids = torch.randint(0, 128, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    full, full_grads = _loss_and_grads(model, ids, labels, **kwargs)
    model.config.loss_chunk_size = 5  # does not divide the 33 tokens: the last chunk is short
    chunked, chunked_grads = _loss_and_grads(model, ids, labels, **kwargs)
    assert full.logits is not None and chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss)
    assert chunked_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=name)
    model.eval()  # evaluation and generation keep their logits
    assert model(ids, labels=labels).logits.shape == (3, 11, 128)


def test_chunked_loss_under_bf16_autocast_matches_the_full_loss():
    model = small_model(loss_chunk_size=8).train()
    ids = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, chunked_grads = _loss_and_grads(model, ids, ids)
        model.config.loss_chunk_size = 0
        full, full_grads = _loss_and_grads(model, ids, ids)
    torch.testing.assert_close(chunked.loss, full.loss, atol=2e-2, rtol=2e-2)
    w = "lm_head.weight"
    assert chunked_grads[w].dtype == torch.float32
    rel = (chunked_grads[w] - full_grads[w]).norm() / full_grads[w].norm()
    assert rel < 2e-2


class _NewTensorShapes(torch.overrides.TorchFunctionMode):
    """Shapes of the tensors torch functions return, except views of the given tensors' storage."""

    def __init__(self, *inputs):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in inputs}
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.storages:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("frozen", ["head", "hidden", "no_grad"])
def test_chunked_loss_builds_no_gradient_nobody_needs(frozen):
    from upcycled_moe.modeling_upcycled_moe import chunked_causal_lm_loss

    g = torch.Generator().manual_seed(5)
    hidden0 = torch.randn(3, 11, 64, generator=g)
    weight0 = torch.randn(100, 64, generator=g) * 0.1
    labels = torch.randint(0, 100, (3, 11), generator=g)
    labels[0, :4] = -100
    hidden = hidden0.clone().requires_grad_(frozen != "hidden")
    weight = weight0.clone().requires_grad_(frozen != "head")
    with torch.set_grad_enabled(frozen != "no_grad"), _NewTensorShapes(hidden, weight) as seen:
        loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=5)
    ref_hidden, ref_weight = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
    ref = F.cross_entropy((ref_hidden[:, :-1] @ ref_weight.t()).reshape(-1, 100), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert (100, 64) not in seen.shapes if frozen != "hidden" else (33, 64) not in seen.shapes, seen.shapes
    if frozen == "no_grad":
        assert loss.grad_fn is None and (33, 64) not in seen.shapes
        return
    ref.backward()
    loss.backward()
    trained, ref_trained = (weight, ref_weight) if frozen == "hidden" else (hidden, ref_hidden)
    torch.testing.assert_close(trained.grad, ref_trained.grad)


def test_chunked_loss_is_skipped_where_it_cannot_apply():
    from peft import LoraConfig, get_peft_model

    model = small_model(loss_chunk_size=4).train()
    ids = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", dtype=torch.float16):  # float16: unscaled gradients would underflow -> full path
        assert model(ids, labels=ids).logits is not None
    assert model(ids, labels=ids).logits is None  # the chunked path otherwise
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    out = peft_model(input_ids=ids, labels=ids)  # a LoRA-wrapped head: the wrapper must run, so full logits
    assert out.logits is not None and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------------------------------------
# Router logits as return values (no output-capture hooks inside a compiled layer)
# ----------------------------------------------------------------------------------------------------------------
def test_router_logits_hidden_states_and_attentions_together():
    model = small_model(mlp_layer_types=["sparse", "dense", "sparse"], num_hidden_layers=3,
                        layer_types=None, attn_implementation="eager")
    ids = torch.randint(0, 128, (2, 9))
    out = model(ids, output_router_logits=True, output_hidden_states=True, output_attentions=True)
    assert len(out.router_logits) == 2 and all(r.shape == (18, 8) for r in out.router_logits)
    assert len(out.hidden_states) == 4 and all(h.shape == (2, 9, 64) for h in out.hidden_states)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 4, 9, 9)
    # the same hidden states and logits whether or not router logits are asked for
    plain = model(ids, output_hidden_states=True)
    assert plain.router_logits is None
    for a, b in zip(plain.hidden_states, out.hidden_states):
        torch.testing.assert_close(a, b)
    # the returned logits are the router's own
    block = model.model.layers[2].mlp
    h = torch.randn(2, 9, 64)
    logits_direct = block.gate(h.view(-1, 64))[0]
    _, logits_block = block(h, return_router_logits=True)
    torch.testing.assert_close(logits_block, logits_direct)


def test_compiled_layers_do_not_break_the_graph():
    """Regional compilation of every decoder layer, forward and backward with the router losses: the fused experts
    run as custom ops under compilation, so nothing falls back to Python (it broke at every experts call)."""
    import torch._dynamo

    model = small_model().train()
    ids = torch.randint(0, 128, (2, 8))
    for layer in model.model.layers:
        layer.compile(backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        out = model(ids, labels=ids)  # labels: router logits are collected for the aux loss
        out.loss.backward()
        reasons = list(torch._dynamo.utils.counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert out.aux_loss is not None and torch.isfinite(out.loss)
    assert not reasons, reasons


def test_padding_neither_fills_nor_sizes_the_capacity():
    """A sequence's logits under a capacity factor do not depend on padded rows batched with it: padding takes no
    expert slot and the capacity is computed from real tokens (it used to count, and route, the padding too)."""
    model = small_model(capacity_factor=1.0, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 12))
    alone = model(ids, attention_mask=torch.ones_like(ids)).logits
    pad = torch.randint(0, 128, (1, 12))
    batch = torch.cat([ids, pad])
    mask = torch.ones_like(batch)
    mask[1] = 0  # a row of padding only
    together = model(batch, attention_mask=mask).logits[:1]
    torch.testing.assert_close(together, alone)
    # the router itself: padded tokens get the sentinel, and the capacity is ceil(1.0 * 12 real * 2 / 4) = 6
    router = model.model.layers[0].mlp.gate
    hidden = torch.randn(24, 64)
    real = mask.reshape(-1).bool()
    _, weights, index = router(hidden, real)
    assert (index[~real] == model.config.num_experts).all() and (weights[~real] == 0).all()
    for e in range(model.config.num_experts):
        assert int((index == e).sum()) <= 6
