"""A saved folder loads as remote code (trust_remote_code=True) in a process where `import upcycled_moe` is
impossible, through AutoConfig / AutoModel / AutoModelForCausalLM and the three task-head Auto classes, with
identical logits, and generates with its KV
cache exactly what a cache-free greedy loop gives, without deprecation warnings — on both ends of the supported
range: the newest transformers (what a fresh install resolves) and 5.17 (the oldest, the GPU machine's)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import BLOCK_PACKAGE, CACHE, run_python
from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM

LOAD_BLOCKED = BLOCK_PACKAGE + r"""
try:
    import upcycled_moe
    raise SystemExit("the package was importable")
except ImportError:
    pass

import torch, transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
folder, ids_path = sys.argv[1], sys.argv[2]
ids = torch.load(ids_path)
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(lm).__name__ == "UpcycledMoeForCausalLM" and type(lm).__module__.startswith("transformers_modules")
with torch.no_grad():
    torch.save({"logits": lm(ids).logits, "hidden": base(ids).last_hidden_state,
                "generated": lm.generate(ids[:1], max_new_tokens=8, do_sample=False),
                "generated_batch": lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                               do_sample=False, pad_token_id=0)}, ids_path + ".out")
heads = {}  # the task heads (reward models, classifiers, QA) from the same folder, as remote code
from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)
for auto in (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoModelForQuestionAnswering):
    head = auto.from_pretrained(folder, trust_remote_code=True, num_labels=3).eval()
    assert type(head).__module__.startswith("transformers_modules"), type(head)
    with torch.no_grad():
        out = head(ids[:1])
    layer = head.score if hasattr(head, "score") else head.qa_outputs
    heads[type(head).__name__] = {"out": out.logits if hasattr(out, "logits") else torch.stack(
        [out.start_logits, out.end_logits], -1), "weight": layer.weight, "bias": layer.bias}
torch.save(heads, ids_path + ".heads")
print("version", transformers.__version__)
"""


def greedy_without_cache(model, ids, new_tokens):
    """Greedy decoding by re-running the whole sequence each step: the reference that needs no KV cache at all."""
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    config = UpcycledMoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, qk_norm=True, num_shared_experts=1,
                               mlp_layer_types=["sparse", "dense", "sparse"], router_type="topk_softmax",
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})
    model = UpcycledMoeForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("remote") / "model"
    model.save_pretrained(folder)
    ids = torch.randint(0, 128, (2, 10))
    ids_path = folder.parent / "ids.pt"
    torch.save(ids, ids_path)
    with torch.no_grad():
        expected = {"logits": model(ids).logits, "hidden": model.model(ids).last_hidden_state,
                    "generated": greedy_without_cache(model, ids[:1], 8),
                    "generated_batch": greedy_without_cache(model, ids, 8)}
    return folder, ids_path, expected


def test_saved_folder_is_self_contained(saved_model):
    folder, _, _ = saved_model
    names = {p.name for p in folder.iterdir()}
    assert {"configuration_upcycled_moe.py", "modeling_upcycled_moe.py", "config.json", "model.safetensors"} <= names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_upcycled_moe.UpcycledMoeConfig",
        "AutoModel": "modeling_upcycled_moe.UpcycledMoeModel",
        "AutoModelForCausalLM": "modeling_upcycled_moe.UpcycledMoeForCausalLM",
        "AutoModelForSequenceClassification": "modeling_upcycled_moe.UpcycledMoeForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_upcycled_moe.UpcycledMoeForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_upcycled_moe.UpcycledMoeForQuestionAnswering",
    }


def _check_remote_load(saved_model, tmp_path, env_extra, version_prefix):
    folder, ids_path, expected = saved_model
    result = run_python(LOAD_BLOCKED.replace("sys.argv[1], sys.argv[2]", f"{str(folder)!r}, {str(ids_path)!r}"),
                        env_extra={"HF_MODULES_CACHE": str(tmp_path / "modules"), **env_extra})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"version {version_prefix}" in result.stdout
    assert "deprecated" not in result.stderr.lower(), result.stderr[-3000:]
    got = torch.load(str(ids_path) + ".out")
    assert torch.equal(got["logits"], expected["logits"])
    assert torch.equal(got["hidden"], expected["hidden"])
    assert torch.equal(got["generated"], expected["generated"])  # with the KV cache == without any cache
    assert torch.equal(got["generated_batch"], expected["generated_batch"])
    heads = torch.load(str(ids_path) + ".heads")
    hidden = expected["hidden"][:1]  # each head reads the decoder's last hidden states
    assert sorted(heads) == ["UpcycledMoeForQuestionAnswering", "UpcycledMoeForSequenceClassification",
                             "UpcycledMoeForTokenClassification"]
    seq = heads["UpcycledMoeForSequenceClassification"]
    torch.testing.assert_close(seq["out"], hidden[:, -1] @ seq["weight"].T)  # no pad token: the last position
    for name in ("UpcycledMoeForTokenClassification", "UpcycledMoeForQuestionAnswering"):
        torch.testing.assert_close(heads[name]["out"], hidden @ heads[name]["weight"].T + heads[name]["bias"])
    return result.stdout.split("version ", 1)[1].split()[0]


def test_remote_code_loads_without_the_package_newest_transformers(saved_model, tmp_path, tested_versions):
    import transformers

    tested_versions["remote code, installed (newest) transformers"] = _check_remote_load(
        saved_model, tmp_path, {}, transformers.__version__)


@pytest.fixture(scope="session")
def transformers_517():
    """transformers 5.17.0 (the GPU machine's) installed beside the newest, put first on PYTHONPATH."""
    target = CACHE / "transformers-5.17.0"
    if not (target / "transformers" / "__init__.py").exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
               "transformers==5.17.0", "huggingface-hub>=1.5,<2"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:  # the oldest supported release must be tested: a failed install is a failure
            pytest.fail(f"cannot install transformers 5.17.0 from the package index: {result.stderr[-500:]}")
    return target


def test_remote_code_loads_without_the_package_transformers_5_17(saved_model, tmp_path, transformers_517,
                                                                   tested_versions):
    tested_versions["remote code, oldest supported transformers"] = _check_remote_load(
        saved_model, tmp_path, {"PYTHONPATH": str(transformers_517)}, "5.17.0")
