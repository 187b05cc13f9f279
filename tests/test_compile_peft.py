"""Habits of stock Mixtral / Qwen3-MoE that must work the same on UpcycledMoe (issue 14): torch.compile without graph
breaks (inference and training), and PEFT LoRA on the targets PEFT resolves for stock MoE models."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM
from upcycled_moe import fused_moe as fm

SHAPES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def tiny_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    return UpcycledMoeForCausalLM(UpcycledMoeConfig(**{**SHAPES, "num_experts": 4, "num_experts_per_tok": 2,
                                                       **overrides}))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, SHAPES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------
def test_fused_experts_op_is_registered_consistently():
    """The compiled path's custom op: schema, fake (shape) kernel and autograd formula agree with the real kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    w1 = (torch.randn(4, 2 * 8, 16, generator=g) / 4).requires_grad_()
    w2 = (torch.randn(4, 16, 8, generator=g) / 3).requires_grad_()
    weights, index = torch.randn(6, 4, generator=g).softmax(-1).topk(2)
    weights.requires_grad_()
    perm, tok, pos, offs = fm._route(index, 4)
    torch.library.opcheck(fm._FWD_OP, (x, weights, w1, w2, perm, tok, pos, offs, False, True, 8, "silu",
                                        torch.float32))
    # the grouped GEMM op of the non-Triton compiled path (expert 2 gets no rows)
    a = torch.randn(8, 16, generator=g, requires_grad=True)
    b = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    torch.library.opcheck(fm._GMM_OP, (a, b, torch.tensor([1, 3, 3, 8], dtype=torch.int32)))


def test_compiled_inference_is_one_graph(ids):
    model = tiny_moe().eval()
    assert model.config._experts_implementation == "upcycled_fused"
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")(ids).logits  # fullgraph: a break raises
    torch.testing.assert_close(compiled, eager)


def test_compiled_training_step_is_one_graph_with_eager_gradients(ids):
    """fullgraph through forward AND backward (aot_eager traces the backward too): loss and every gradient match."""
    eager, compiled = tiny_moe().train(), tiny_moe().train()
    loss = eager(ids, labels=ids).loss
    loss.backward()
    compiled_loss = torch.compile(compiled, fullgraph=True, backend="aot_eager")(ids, labels=ids).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss)
    grads = {n: p.grad for n, p in eager.named_parameters()}
    assert grads["model.layers.0.mlp.experts.gate_up_proj"].abs().sum() > 0
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)


# ----------------------------------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------------------------------
def lora_names(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))


def test_lora_on_the_targets_peft_resolves_for_stock_trains_and_reloads(ids, tmp_path):
    """PEFT's "all-linear" on stock Mixtral adds the router (`gate.weight`) and both expert matrices as
    target_parameters (from its table of stock MoE model types). The same targets on ours reach the same 14 modules,
    a Trainer step through them changes the loss, and the saved adapter reloads with the same logits."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    stock = get_peft_model(MixtralForCausalLM(MixtralConfig(**SHAPES, num_local_experts=4, num_experts_per_tok=2)),
                           LoraConfig(target_modules="all-linear", r=4))
    resolved = stock.peft_config["default"]
    assert set(resolved.target_parameters) == {"gate.weight", "gate_up_proj", "down_proj"}

    model = get_peft_model(tiny_moe(), LoraConfig(r=4, target_modules=sorted(resolved.target_modules),
                                                  target_parameters=sorted(resolved.target_parameters)))
    assert lora_names(model) == lora_names(stock) and len(lora_names(model)) == 14
    batch = ids[:1]
    with torch.no_grad():
        before = model(batch, labels=batch).loss
    blocks = ids.tolist() * 4
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, save_strategy="no",
                             per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks, "labels": blocks})).train()
    model.eval()
    with torch.no_grad():
        after = model(batch, labels=batch)
    assert abs(after.loss.item() - before.item()) > 1e-3
    trained = dict(model.named_parameters())
    for role in ("mlp.gate.lora_B", "mlp.experts.lora_B", "mlp.experts.base_layer.lora_B"):  # B starts at 0
        assert trained[f"base_model.model.model.layers.0.{role}.default.weight"].abs().sum() > 0, role

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_moe(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, after.logits)
