"""experiments/btx.py's pipeline (fine-tune twice, merge with `convert --config`, measure) on a tiny random model:
the mechanics only; the real run on SmolLM2-135M is in docs/results.md."""

import json
import math
from pathlib import Path

import torch
from conftest import _tiny


def test_btx_pipeline_runs_end_to_end_on_a_tiny_model(tmp_path, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    from experiments import btx

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    _tiny("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")  # gate_mode hidden reads the prompts with the base's tokenizer
    out = tmp_path / "out"
    argv = ["--out", out, "--dense", tmp_path / "dense", "--tokenizer", smollm2_tokenizer_dir, "--steps", 2,
            "--batch", 2, "--seq", 32, "--eval-blocks", 2, "--prompts", 2, "--prompt-tokens", 16, "--top-k", "1",
            "--gate-modes", "hidden",
            "--code-root", Path(btx.__file__).parent.parent / "upcycled_moe"]  # a small tree of Python files
    args = btx.parser().parse_args([str(a) for a in argv])
    doc = btx.run(args)
    assert (out / "results.json").is_file() and (out / "routing_shares.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["summary"] == doc["summary"]
    assert set(doc["summary"]) == {"base", "code-FT", "prose-FT", "MoE(hidden, top-1)"}
    for name, row in doc["summary"].items():
        assert math.isfinite(row["code_ppl"]) and math.isfinite(row["prose_ppl"]), (name, row)
    shares = doc["summary"]["MoE(hidden, top-1)"]["code_own_expert_share"]
    assert len(shares) == 2 and all(0 <= s <= 1 for s in shares)
    # the fine-tunes changed the MLP and nothing else (LoRA on gate/up/down only, merged back)
    from safetensors.torch import load_file

    base = load_file(tmp_path / "dense" / "model.safetensors")
    code = load_file(out / "finetunes" / doc["finetunes"]["code"]["folder"] / "model.safetensors")
    assert not torch.equal(code["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(code["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert not (out / "moe").exists()  # the MoE folders are removed unless --keep-moe
    tokenizer, data, _ = btx.prepare(args)  # the same settings find the cached fine-tune instead of training again
    again = btx.finetune(tmp_path / "dense", tokenizer, data["code"]["train"], out / "finetunes", args, "code")
    assert again["reused"] and again["folder"] == doc["finetunes"]["code"]["folder"]
