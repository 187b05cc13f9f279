"""Training metrics (trainer_scripts/metrics.py) and packing (trainer_scripts/data.py), each checked against an
independent count: FLOPs measured by torch's FlopCounterMode and attended (query, key) pairs read off the model's own
attention probabilities; tokens kept by packing counted from the documents."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM
from upcycled_moe.modeling_upcycled_moe import eager_attention_forward
from trainer_scripts import metrics
from trainer_scripts.metrics import Throughput, flops_per_token, peak_tflops_of, training_flops


def measured_training_flops(model, seq_len: int) -> int:
    """FLOPs of one forward + backward of a ``seq_len`` sequence, measured, with causal attention counted by the pairs
    the model attends to (FlopCounterMode counts the whole seq x seq score matrix that eager attention computes).

    - matrix products outside attention: FlopCounterMode over a real training step (eager experts and attention,
      full logits, every parameter trained), aten.mm only;
    - attention: the cost of one (query, key) pair measured by FlopCounterMode on eager attention, times the number
      of pairs whose attention probability is non-zero in each layer;
    - the model's active-parameter convention also counts the norm weights (6 per weight per token): added from
      the parameters' names."""
    model.set_attn_implementation("eager")
    if "sparse" in model.config.mlp_layer_types:
        model.set_experts_implementation("eager")
    model.config.loss_chunk_size = 0
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(ids, labels=ids, output_attentions=True)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    matmuls = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    pairs = sum(int((a[0] > 0).sum()) for a in out.attentions)  # over layers and heads

    cfg, attn = model.config, model.model.layers[0].self_attn
    q = torch.randn(1, cfg.num_attention_heads, seq_len, cfg.head_dim, requires_grad=True)
    kv = [torch.randn(1, cfg.num_key_value_heads, seq_len, cfg.head_dim, requires_grad=True) for _ in range(2)]
    counter = FlopCounterMode(display=False)
    with counter:
        o, _ = eager_attention_forward(attn, q, *kv, None, scaling=1.0)
        o.sum().backward()
    per_pair = counter.get_total_flops() / (cfg.num_attention_heads * seq_len * seq_len)

    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    return matmuls + round(per_pair * pairs) + 6 * norms * seq_len


def tiny(layer_types, sliding_window=None, **overrides):
    torch.manual_seed(0)
    config = UpcycledMoeConfig(**{**dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=len(layer_types), num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=256, num_experts=4,
                                         num_experts_per_tok=2, layer_types=layer_types,
                                         sliding_window=sliding_window), **overrides})
    return UpcycledMoeForCausalLM(config)


@pytest.mark.parametrize("seq_len,window", [(48, 16), (20, 32), (64, 7)])
def test_training_flops_match_a_measured_count_with_sliding_window_layers(seq_len, window):
    """A causal window w over s tokens attends s*w - w*(w-1)/2 pairs (about s*w for s >> w), not half of a full
    layer's s*(s+1)/2: the sliding layer costs nearly twice the old count."""
    model = tiny(["full_attention", "sliding_attention", "sliding_attention"], sliding_window=window)
    expected = measured_training_flops(model, seq_len)
    assert training_flops(model, [seq_len]) == expected
    assert flops_per_token(model, seq_len) * seq_len == pytest.approx(expected, rel=1e-12)


def test_training_flops_match_a_measured_count_dense_mlp_and_sums_over_sequences():
    model = tiny(["full_attention", "full_attention"], mlp_layer_types=["dense", "sparse"])
    one, two = measured_training_flops(model, 24), measured_training_flops(model, 9)
    assert training_flops(model, [24]) == one
    assert training_flops(model, [24, 9]) == one + two  # padded batches: count each sequence by its real length


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 SXM5 80GB", 989.5), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.5), ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.5),
    ("NVIDIA H800 PCIe", 756.0), ("NVIDIA H800", 989.5),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-SXM4-40GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A10G", 125.0), ("NVIDIA A10", 125.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("Tesla T4", None), ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_tflops_tell_the_variants_apart(name, peak):
    """Dense bf16 peaks from NVIDIA's datasheets (half the "with sparsity" figure); device names as
    torch.cuda.get_device_name reports them."""
    assert peak_tflops_of(name) == peak


def test_throughput_times_only_training_steps(monkeypatch):
    """Eval and checkpoint time between two logs is not training time: tokens/s (and MFU) leave it out."""
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    speed = Throughput()
    for _ in range(2):
        speed.start()  # running already: no-op
        clock[0] += 1.0  # a training step
        speed.add(1000)
    speed.pause()
    clock[0] += 30.0  # eval + checkpoint
    speed.start()
    clock[0] += 2.0  # a training step
    speed.add(1000)
    assert speed.rate() == pytest.approx(3000 / 4.0)
    clock[0] += 1.0  # the next step: the clock kept running after the log
    speed.add(500)
    speed.pause()
    clock[0] += 10.0  # a second eval
    assert speed.rate() == pytest.approx(500.0)
    speed.start()
    clock[0] += 4.0
    speed.add(1000)
    assert speed.rate() == pytest.approx(250.0)


# ------------------------------------------------------------------------------------------------- packing
def _docs(n):
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)[:20]).split()
    return [" ".join(words[i % 997 : i % 997 + 1 + i % 5]) for i in range(n)]


@pytest.mark.parametrize("streaming", [False, True])
def test_packing_drops_only_the_final_remainder_over_several_map_batches(smollm2_tokenizer_dir, streaming):
    """2,500 short documents are three map batches (datasets' batch_size 1000): the blocks hold every token of the
    concatenation, in order, up to the last block boundary -- not a remainder per batch."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trainer_scripts.data import tokenize_and_pack

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    docs = _docs(2500)
    flat = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    block = 7
    ds = Dataset.from_dict({"text": docs})
    if streaming:
        ds = ds.to_iterable_dataset(num_shards=1)
    packed = tokenize_and_pack(ds, tokenizer, block, "text")
    blocks = [r["input_ids"] for r in packed]
    kept = [t for b in blocks for t in b]
    assert all(len(b) == block for b in blocks)
    assert len(flat) - len(kept) < block, (len(flat), len(kept))
    assert kept == flat[: len(kept)]
    if streaming:  # a second pass (the next epoch) gives the same blocks
        assert [r["input_ids"] for r in packed] == blocks


def test_loss_curves_show_router_loss_values_without_axis_offset():
    """The aux loss of a balanced run moves in the fourth decimal: every y tick must read as the value itself, with
    no "+4.324"-style offset text in the corner that a reader misses."""
    records = [{"step": s, "loss": 3.0 - 0.01 * s, "lm_loss": 2.99 - 0.01 * s, "aux_loss": 4.3241 + 1e-4 * (s % 3),
                "z_loss": 12.5001 + 1e-4 * s} for s in range(1, 20)]
    records.append({"step": 19, "eval/loss": 2.9, "eval/perplexity": 18.2})
    fig = metrics.loss_curves_figure(records)
    fig.canvas.draw()
    axes = fig.get_axes()
    assert len(axes) == 3, axes  # loss, aux loss, z-loss (twin axis)
    for ax in axes:
        assert ax.yaxis.get_offset_text().get_text() == "", ax.get_ylabel()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels and all(float(t.replace("\u2212", "-")) > 1 for t in labels), (ax.get_ylabel(), labels)
    assert metrics.loss_curves_figure([{"step": 1, "expert_load": [[0.5, 0.5]]}]) is None
