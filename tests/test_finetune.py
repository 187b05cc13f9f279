"""Fine-tuning (trainer_scripts/finetune.py): HF Trainer + PEFT on a tiny UpcycledMoe model, real tokenizer and text."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_moe_dir
from trainer_scripts.finetune import FinetuneArguments, main, make_collator, parse_args, run, tokenize_examples
from trainer_scripts.metrics import training_flops


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """With a card declaring a license, as a converted folder has: the fine-tune cards carry it."""
    folder = make_tiny_moe_dir(tmp_path_factory.mktemp("ft") / "model", smollm2_tokenizer_dir)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny MoE\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("ftdata")
    names = sorted(topics, key=lambda k: -len(topics[k]))[:16]  # long topics: every example fills max_seq_length
    chat, text = root / "chat.jsonl", root / "text.jsonl"
    with open(chat, "w") as f:
        for k in names:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Explain the Python topic '{k}'."},
                                             {"role": "assistant", "content": topics[k][:600]}]}) + "\n")
    with open(text, "w") as f:
        for k in names:
            f.write(json.dumps({"text": topics[k]}) + "\n")
    return {"chat": chat, "text": text}


def args(model, train, out, **extra):
    base = dict(model_name_or_path=model, train_file=train, output_dir=out, max_steps=2, per_device_train_batch_size=2,
                max_seq_length=32, learning_rate=1e-3, logging_steps=1, use_cpu="true", save_strategy="no", seed=0,
                data_seed=0)
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def test_lora_chat_attention_and_experts_router_frozen(tmp_path, tiny_dir, data):
    out = tmp_path / "lora"
    ft, ta = parse_args(args(tiny_dir, data["chat"], out, use_lora="true", gradient_checkpointing="true",
                             merge_lora="true", max_seq_length=64, base_model_id="example-org/tiny-upcycled-moe"))
    metrics = run(ft, ta)
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] < 20
    # our cards, not PEFT's empty template: the adapter's (peft, applies to the MoE) and the merged model's
    from conftest import check_public_card

    common = dict(license="apache-2.0", base_model="example-org/tiny-upcycled-moe", pipeline_tag="text-generation")
    card = check_public_card(out, tiny_dir.parent, library_name="peft", base_model_relation="adapter", **common)
    assert "Model Card for Model ID" not in card.text and "LoRA adapter (r=16" in card.text
    assert f"| final train loss | {metrics['train_loss']:.4f} |" in card.text and "`chat.jsonl`" in card.text
    card = check_public_card(out / "merged", tiny_dir.parent, library_name="transformers",
                             base_model_relation="finetune", **common)
    assert "full fine-tune (the LoRA adapter merged)" in card.text
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(adapter_cfg["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("experts" in k and "lora_A" in k for k in adapter), sorted(adapter)[:5]
    assert any("q_proj.lora_B" in k for k in adapter)
    assert not any("gate.weight" in k for k in adapter)  # router frozen: not in the adapter
    before = load_file(tiny_dir / "model.safetensors")
    merged = load_file(out / "merged" / "model.safetensors")
    for layer in (0, 1):
        key = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(merged[key], before[key])  # the router did not move
        e = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        assert not torch.equal(merged[e], before[e])  # the experts did (merged LoRA delta)
    assert (out / "merged" / "modeling_upcycled_moe.py").exists()  # remote code travels with the merged model


def test_full_finetune_router_loss_weighting_under_accumulation_and_active_flops(tmp_path, tiny_dir, data):
    """bs 4 x accumulation 1 == bs 2 x accumulation 2 with plain SGD and a large router z-loss weight: the router
    terms are weighted by the micro-batch's share of tokens, not over-counted per micro-batch. (The z-loss is a mean
    over tokens, so the two must agree exactly; the Switch aux loss is a product of per-batch means, so it is not
    additive over micro-batches by definition.) Router frozen by default; FLOPs on active parameters."""
    common = dict(optim="sgd", max_steps=1, learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0,
                  router_aux_loss_coef=0.0)
    m1 = run(*parse_args(args(tiny_dir, data["text"], tmp_path / "a", per_device_train_batch_size=4,
                              router_z_loss_coef=1.0, **common)))
    m2 = run(*parse_args(args(tiny_dir, data["text"], tmp_path / "b", per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, router_z_loss_coef=1.0, **common)))
    run(*parse_args(args(tiny_dir, data["text"], tmp_path / "c", per_device_train_batch_size=4,
                         router_z_loss_coef=0.0, **common)))
    a, b, c = (load_file(tmp_path / x / "model.safetensors") for x in "abc")
    from conftest import check_public_card  # a full fine-tune gets a card too (Trainer writes none)

    card = check_public_card(tmp_path / "a", tiny_dir.parent, license="apache-2.0", library_name="transformers")
    assert "A full fine-tune of the UpcycledMoe model `model`" in card.text and "`text.jsonl`" in card.text
    before = load_file(tiny_dir / "model.safetensors")
    accumulation_gap = max((a[k] - b[k]).abs().max().item() for k in a)
    z_effect = max((a[k] - c[k]).abs().max().item() for k in a)
    assert accumulation_gap < 1e-6 and z_effect > 1e-4, (accumulation_gap, z_effect)
    moved = 0
    for k in a:
        if k.endswith("mlp.gate.weight"):
            assert torch.equal(a[k], before[k]), k  # router frozen by default
        else:
            moved += not torch.equal(a[k], before[k])
    assert moved > 10
    # Trainer's FLOPs: the measured count (FlopCounterMode; causal attention by attended pairs) of 4 sequences of 32
    from test_metrics import measured_training_flops
    from upcycled_moe import UpcycledMoeForCausalLM

    model = UpcycledMoeForCausalLM.from_pretrained(tiny_dir)
    all_parameters = 6 * 4 * 32 * sum(p.numel() for p in model.parameters())
    expected = 4 * measured_training_flops(model, 32)
    assert m1["total_flos"] == pytest.approx(expected, rel=1e-9)
    assert m2["total_flos"] == pytest.approx(expected, rel=1e-9)
    assert expected < all_parameters  # active parameters, not every expert


CHATS = [
    [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "An ordered, mutable sequence."}],
    [{"role": "user", "content": "And a tuple?"}, {"role": "assistant", "content": "An immutable one."},
     {"role": "user", "content": "Hashable?"}, {"role": "assistant", "content": "Yes, when its items are."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
]


def _chat_file(path):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return path


def test_collator_trains_every_end_of_turn_token_and_masks_only_padding(smollm2_tokenizer_dir):
    """SmolLM2 pads with its end-of-turn token <|im_end|>: masking labels by token id would hide every end of turn
    from the loss (the model never learns to stop). Padding is masked by position."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == im_end  # the case at hand
    ft = FinetuneArguments(max_seq_length=128)
    rows = tokenize_examples(Dataset.from_dict({"messages": CHATS}), tokenizer, ft)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) == 3  # so two of the three are padded
    batch = make_collator(tokenizer)([rows[i] for i in range(3)])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert mask.sum(-1).tolist() == lengths
    real = mask.bool()
    assert torch.equal(labels[real], ids[real])  # every real token is a target, <|im_end|> included
    assert (labels[~real] == -100).all() and int((labels == -100).sum()) == sum(max(lengths) - n for n in lengths)
    turns = [len(m) + 1 for m in CHATS]  # the template's system turn, then each message: each ends with <|im_end|>
    assert (labels == im_end).sum(-1).tolist() == turns


def test_flop_count_leaves_out_padding(tmp_path, tiny_dir):
    """One step over the three chats of different lengths in one padded batch: FLOPs of the real tokens only."""
    from transformers import AutoTokenizer

    from upcycled_moe import UpcycledMoeForCausalLM

    chat = _chat_file(tmp_path / "chat.jsonl")
    metrics = run(*parse_args(args(tiny_dir, chat, tmp_path / "out", max_steps=1, per_device_train_batch_size=3,
                                   max_seq_length=128)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    lengths = [len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in CHATS]
    model = UpcycledMoeForCausalLM.from_pretrained(tiny_dir)
    assert metrics["total_flos"] == training_flops(model, lengths)
    assert metrics["total_flos"] < training_flops(model, [max(lengths)] * 3)


def _fails(capsys, argv, pattern):
    import re

    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("upcycle-moe-finetune: error:"), err
    assert re.search(pattern, err[-1]), err[-1]
    assert time.perf_counter() - t0 < 30


def test_finetune_bad_inputs(tmp_path, capsys, tiny_dir, data):
    out = tmp_path / "out"
    no_cols = tmp_path / "bad.jsonl"
    no_cols.write_text('{"prompt": "x"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(capsys, args(tiny_dir, data["text"], out, lora_rank=4), "unknown option.*lora_rank")
    _fails(capsys, args(tiny_dir, tmp_path / "missing.jsonl", out), "missing.jsonl does not exist")
    _fails(capsys, args(tiny_dir, empty, out), "empty.jsonl is empty")
    _fails(capsys, args(tiny_dir, no_cols, out), "neither a 'messages' .* nor a 'text' .*prompt")
    _fails(capsys, args(tiny_dir, data["text"], out, max_seq_length=100000), "beyond the model's max_position")
    assert not out.exists()
