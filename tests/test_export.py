"""`upcycle-moe export`: a stock Transformers MoE class (no remote code) gives the same logits as our model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from upcycled_moe import UpcycledMoeForCausalLM
from upcycled_moe.cli import main
from upcycled_moe.conversion import UpcycleError, export, upcycle

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory):
    """A Llama without attention biases (conftest's tiny Llama has them; Mixtral and Qwen2-MoE's o_proj do not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("plain") / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(out)
    return out


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "family,options,target,stock_class",
    [
        ("plain_llama", dict(router="topk_softmax"), "mixtral", "MixtralForCausalLM"),
        ("mistral", dict(router="topk_softmax"), "mixtral", "MixtralForCausalLM"),
        ("plain_llama", dict(), "qwen2_moe", "Qwen2MoeForCausalLM"),  # the default softmax_topk
        ("qwen2", dict(shared_expert=True, moe_layers="every:2"), "qwen2_moe", "Qwen2MoeForCausalLM"),
        ("qwen3", dict(router_init_std=0.02), "qwen3_moe", "Qwen3MoeForCausalLM"),
        ("qwen3", dict(router="topk_softmax", moe_layers=[0]), "qwen3_moe", "Qwen3MoeForCausalLM"),
    ],
)
def test_export_gives_identical_logits(tmp_path, tiny_dense_dirs, plain_llama, family, options, target,
                                       stock_class):
    source = plain_llama if family == "plain_llama" else tiny_dense_dirs[family]
    moe_dir = upcycle(source, tmp_path / "moe", num_experts=4, top_k=2, dtype="float32", **options)
    out = export(moe_dir, tmp_path / target, target)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == target and "auto_map" not in config
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(stock).__name__ == stock_class and type(stock).__module__.startswith("transformers.models")
    ours = UpcycledMoeForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    assert (logits(stock) - logits(ours)).abs().max().item() <= 1e-4
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    expert = "block_sparse_moe.experts.0.w1" if target == "mixtral" else "mlp.experts.0.gate_proj"
    assert any(expert in k for k in index)  # per-expert layout that vLLM/SGLang read


@pytest.mark.parametrize(
    "family,options,target,reason",
    [
        ("nemotron", dict(), "mixtral", "norm_type"),
        ("llama", dict(), "mixtral", "softmax_topk without renormalisation"),
        ("llama", dict(router="topk_softmax"), "mixtral", "attention biases"),
        ("llama", dict(), "qwen3_moe", "q/k norm"),
        ("llama", dict(router="sigmoid_topk"), "qwen2_moe", "sigmoid_topk"),
        ("qwen3", dict(shared_expert=True), "qwen3_moe", "shared expert"),
    ],
)
def test_inexpressible_models_are_refused_with_the_reason(tmp_path, tiny_dense_dirs, family, options, target,
                                                          reason):
    moe_dir = upcycle(tiny_dense_dirs[family], tmp_path / "moe", num_experts=4, top_k=2, **options)
    with pytest.raises(UpcycleError, match=reason):
        export(moe_dir, tmp_path / "out", target)
    assert not (tmp_path / "out").exists()


def test_export_cli(tmp_path, tiny_dense_dirs, capsys):
    moe_dir = upcycle(tiny_dense_dirs["qwen3"], tmp_path / "moe", num_experts=4, top_k=2)
    assert main(["export", str(moe_dir), str(tmp_path / "q3"), "--to", "qwen3_moe"]) == 0
    assert (tmp_path / "q3" / "config.json").is_file()
    assert main(["export", str(moe_dir), str(tmp_path / "q3"), "--to", "qwen3_moe"]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("target,router,top_k", [("mixtral", "topk_softmax", 4), ("qwen2_moe", "softmax_topk", 3)])
def test_exported_aux_loss_coefficient_balances_the_same(tmp_path, target, router, top_k):
    """transformers' load_balancing_loss_func counts top-k slots per token (its f sums to k), ours the share of slots
    (f sums to 1): the exported coefficient is ours / k, so coef x aux_loss is the same training term.
    One sparse layer: with several, transformers pools f and P over layers before the product (ours averages the
    per-layer losses), which no coefficient can convert."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(dense)
    moe_dir = upcycle(dense, tmp_path / "moe", num_experts=8, top_k=top_k, router=router, dtype="float32",
                      router_init_std=0.5, extra_config={"router_aux_loss_coef": 0.03})  # unbalanced at init
    out = export(moe_dir, tmp_path / target, target)
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = UpcycledMoeForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    mask = torch.ones_like(IDS)
    mask[1, -5:] = 0  # padding is excluded by both
    with torch.no_grad():
        theirs_out = stock(IDS, attention_mask=mask, output_router_logits=True)
        ours_out = ours(IDS, attention_mask=mask, output_router_logits=True)
    assert torch.allclose(theirs_out.router_logits[0], ours_out.router_logits[0], atol=1e-5)
    assert ours_out.aux_loss.item() > 1.02  # unbalanced (1.0 when balanced)
    assert stock.config.router_aux_loss_coef * theirs_out.aux_loss.item() == pytest.approx(
        ours.config.router_aux_loss_coef * ours_out.aux_loss.item(), rel=1e-5)
