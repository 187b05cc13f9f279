"""Architecture parity: with every MLP layer dense, UpcycledMoe loaded with a dense model's weights gives the same
logits as transformers' own class (fp32, max abs diff <= 1e-5)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import FAMILIES
from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM
from upcycled_moe.conversion.families import dense_config_fields


def as_all_dense(dense) -> UpcycledMoeForCausalLM:
    fields = dense_config_fields(dense.config)
    config = UpcycledMoeConfig(**fields, mlp_layer_types=["dense"] * fields["num_hidden_layers"])
    model = UpcycledMoeForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or config.tie_word_embeddings), missing
    return model


def max_logit_diff(a, b, ids, attention_mask=None):
    with torch.no_grad():
        return (a(ids, attention_mask=attention_mask).logits - b(ids, attention_mask=attention_mask).logits).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_parity_with_transformers_classes(family, tiny_dense_dirs):
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense_dirs[family], dtype=torch.float32).eval()
    ours = as_all_dense(dense)
    torch.manual_seed(0)
    ids = torch.randint(0, dense.config.vocab_size, (2, 24))  # longer than the 8-token sliding windows
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    assert max_logit_diff(dense, ours, ids) <= 1e-5
    assert max_logit_diff(dense, ours, ids, mask) <= 1e-5
    with torch.no_grad():
        assert torch.equal(dense.generate(ids[:1], max_new_tokens=10, do_sample=False),
                           ours.generate(ids[:1], max_new_tokens=10, do_sample=False))


def test_dense_parity_on_the_real_smollm2(smollm2_dir, real_text):
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert dense.config.model_type == "llama" and dense.config.hidden_size == 576
    ours = as_all_dense(dense)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(real_text[:2000], return_tensors="pt").input_ids[:, :128]
    assert max_logit_diff(dense, ours, ids) <= 1e-5
