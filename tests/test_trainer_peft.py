"""Real Trainer and PEFT code paths on small UpcycledMoe models and real text."""

import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM

SEQ = 32


def tiny_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    config = UpcycledMoeConfig(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         num_experts=4, num_experts_per_tok=2), **overrides})
    return UpcycledMoeForCausalLM(config)


def byte_blocks(text: str, n: int) -> list[list[int]]:
    data = list(text.encode("utf-8"))
    return [data[i * SEQ:(i + 1) * SEQ] for i in range(n)]


def as_dataset(blocks):
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def train(model, dataset, out_dir, **kwargs):
    args = TrainingArguments(output_dir=str(out_dir), report_to="none", use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True, seed=0, data_seed=0, **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def test_trainer_lowers_the_loss_with_the_aux_loss_in_it(real_text, tmp_path):
    model = tiny_moe(router_aux_loss_coef=0.1)
    dataset = as_dataset(byte_blocks(real_text, 64))
    batch = torch.tensor(dataset[:8]["input_ids"])
    router_before = model.model.layers[0].mlp.gate.weight.detach().clone()
    with torch.no_grad():
        before = model(batch, labels=batch)
    train(model, dataset, tmp_path, per_device_train_batch_size=8, max_steps=25, learning_rate=3e-3,
          lr_scheduler_type="constant")
    model.eval()
    with torch.no_grad():
        after = model(batch, labels=batch)
    assert after.loss < before.loss - 0.5, (before.loss, after.loss)
    assert after.aux_loss is not None and torch.isfinite(after.aux_loss)
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, router_before)  # the router learned


def _router_after_one_step(tmp_path, coef, **kwargs):
    model = tiny_moe(router_aux_loss_coef=coef, router_z_loss_coef=coef / 10)
    # the same sequence twice: every micro-batch split has the same router statistics, so a correct
    # implementation gives the same update however the batch is split
    block = byte_blocks("The router balances tokens across experts. " * 4, 1)[0]
    train(model, as_dataset([block, block]), tmp_path, max_steps=1, learning_rate=1.0, optim="sgd",
          lr_scheduler_type="constant", **kwargs)
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.gate." in n}


def test_aux_weight_does_not_change_with_gradient_accumulation(tmp_path):
    coef = 5.0
    full = _router_after_one_step(tmp_path / "a", coef, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    accum = _router_after_one_step(tmp_path / "b", coef, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    no_aux = _router_after_one_step(tmp_path / "c", 0.0, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    start = {n: p.detach() for n, p in tiny_moe().named_parameters() if ".mlp.gate." in n}
    for name in full:
        torch.testing.assert_close(accum[name], full[name], atol=1e-6, rtol=1e-5, msg=name)
        # the router terms really moved the router (so a mis-weighted aux term would show above)
        aux_part = (full[name] - start[name]) - (no_aux[name] - start[name])
        assert aux_part.abs().max() > 1e-3


def test_aux_weight_under_accumulation_with_unequal_label_counts(tmp_path):
    """Micro-batches with different numbers of label tokens: Trainer's accumulated step must equal one SGD step on
    the objective written out by hand, sum_i [CE_i / N + (n_i / N) (a * aux_i + z * zloss_i)] (n_i: micro-batch i's
    label tokens, N: the batch's). A per-micro-batch mean (1 / accumulation) is a different, wrong step."""
    coef = 5.0
    text = byte_blocks("The router balances tokens across experts; " * 3 + "Padding and prompts carry no labels. " * 3, 2)
    masked = [-100] * 24 + text[1][24:]  # second sequence: only its last 8 tokens are labels
    dataset = Dataset.from_dict({"input_ids": text, "labels": [text[0], masked]})
    model = tiny_moe(router_aux_loss_coef=coef, router_z_loss_coef=coef / 10)
    train(model, dataset, tmp_path, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
          per_device_train_batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0.0)  # plain SGD step
    got = {n: p.detach() for n, p in model.named_parameters() if ".mlp.gate." in n}

    def hand_step(share):
        reference = tiny_moe(router_aux_loss_coef=coef, router_z_loss_coef=coef / 10).train()
        counts = [sum(t != -100 for t in labels[1:]) for labels in dataset["labels"]]
        total = sum(counts)
        objective = 0.0
        for ids, labels, n in zip(dataset["input_ids"], dataset["labels"], counts):
            ids, labels = torch.tensor([ids]), torch.tensor([labels])
            out = reference(ids, output_router_logits=True)
            ce = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                   reduction="sum")
            objective = objective + ce / total + share(n, total) * (coef * out.aux_loss + coef / 10 * out.z_loss)
        objective.backward()
        return {n: (p - p.grad).detach() for n, p in reference.named_parameters() if ".mlp.gate." in n}

    expected = hand_step(lambda n, total: n / total)
    mean_per_micro_batch = hand_step(lambda n, total: 0.5)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
        assert (mean_per_micro_batch[name] - expected[name]).abs().max() > 1e-4  # the test tells the two apart


RANK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_trainer_peft import _router_after_one_step
    import torch.distributed as dist
    from pathlib import Path
    out = Path({out!r})
    result = _router_after_one_step(out / "run", 5.0, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                                    ddp_backend="gloo")
    if dist.get_rank() == 0:
        torch.save(result, out / "two_ranks.pt")
    """
)


@pytest.mark.slow
def test_aux_weight_does_not_change_with_the_number_of_ranks(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(RANK_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    two_ranks = torch.load(tmp_path / "two_ranks.pt")
    one_rank = _router_after_one_step(tmp_path / "one", 5.0, per_device_train_batch_size=2,
                                      gradient_accumulation_steps=1)
    for name in one_rank:
        torch.testing.assert_close(two_ranks[name], one_rank[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_on_attention_and_routed_experts_trains_saves_reloads_and_merges(real_text, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_moe(seed=1)
    base.save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(base, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in trainable)
    assert any("experts" in n and "lora" in n for n in trainable)
    assert not any(n.endswith("gate_up_proj") and "lora" not in n for n in trainable)  # base frozen

    batch = torch.tensor(byte_blocks(real_text, 8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses

    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(UpcycledMoeForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, adapted, atol=1e-5, rtol=1e-5)
        merged = reloaded.merge_and_unload()
        assert type(merged) is UpcycledMoeForCausalLM
        torch.testing.assert_close(merged(input_ids=batch).logits, adapted, atol=1e-4, rtol=1e-4)
        plain = UpcycledMoeForCausalLM.from_pretrained(tmp_path / "base").eval()
        assert (plain(input_ids=batch).logits - adapted).abs().max() > 1e-3  # the adapter changed the model
