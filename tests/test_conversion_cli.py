"""`upcycle-moe` command line: every bad input is one clear line `error: ...` and exit status 2."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import BLOCK_PACKAGE
from upcycled_moe.cli import COMMANDS, main, register_command


def fails(capsys, argv, *needles):
    capsys.readouterr()  # drop what the test's own setup printed
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def llama(tiny_dense_dirs, tmp_path):
    """A private copy of the tiny Llama folder (some tests damage it)."""
    dst = tmp_path / "dense"
    shutil.copytree(tiny_dense_dirs["llama"], dst)
    return dst


def test_convert_cli_end_to_end_with_yaml_and_flags(capsys, llama, tmp_path):
    cfg = tmp_path / "opts.yaml"
    cfg.write_text(yaml.safe_dump({"num_experts": 4, "top_k": 1, "router": "topk_softmax", "seed": 3}))
    out = tmp_path / "moe"
    assert main(["convert", str(llama), str(out), "--config", str(cfg), "--top-k", "2", "--moe-layers", "1",
                 "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["router_type"]) == (4, 2, "topk_softmax")
    assert config["mlp_layer_types"] == ["dense", "sparse"] and config["upcycling"]["options"]["seed"] == 3


@pytest.fixture(scope="module")
def tiny_llama_with_tokenizer(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny random Llama with the real SmolLM2 tokenizer (verify needs real text tokenised)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
    out = tmp_path_factory.mktemp("dense") / "llama-tok"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_convert_verify_and_verify_cli(capsys, tiny_llama_with_tokenizer, tmp_path):
    out = tmp_path / "moe"
    assert main(["convert", str(tiny_llama_with_tokenizer), str(out), "--router", "topk_softmax", "--num-experts",
                 "4", "--dtype", "float32", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "max |delta logit|" in printed and "greedy answer agrees     True" in printed
    card = (out / "README.md").read_text()
    assert "perplexity MoE" in card and re.search(r"\| greedy answer identical \(\d+ tokens, to EOS or 30\) \| True \|", card)
    assert json.loads((out / "config.json").read_text())["upcycling"]["verify"]["greedy_match"] is True
    assert main(["verify", str(tiny_llama_with_tokenizer), str(out), "--max-tokens", "64", "--generate-tokens",
                 "5", "--max-logit-diff", "1e-3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["max_abs_logit_diff"] <= 1e-3 and results["ppl_ratio"] == pytest.approx(1, abs=1e-4)
    # a failed threshold is exit status 1 (a measurement, not a usage error); -1 cannot be met
    assert main(["verify", str(tiny_llama_with_tokenizer), str(out), "--max-tokens", "64", "--generate-tokens",
                 "2", "--max-ppl-increase", "-1"]) == 1
    assert "verify failed: perplexity" in capsys.readouterr().err


def test_missing_path(capsys, tmp_path):
    fails(capsys, ["convert", tmp_path / "nope", tmp_path / "out"], "does not exist")


def test_folder_without_weights(capsys, llama, tmp_path):
    for f in llama.glob("*.safetensors"):
        f.unlink()
    fails(capsys, ["convert", llama, tmp_path / "out"], "has no weights")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, ["convert", empty, tmp_path / "out"], "has no weights")


def test_corrupt_and_truncated_safetensors(capsys, llama, tmp_path):
    weights = llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    fails(capsys, ["convert", llama, tmp_path / "out"], "truncated")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    fails(capsys, ["convert", llama, tmp_path / "out"], "corrupt")
    weights.write_bytes(b"abc")
    fails(capsys, ["convert", llama, tmp_path / "out"], "not a safetensors file")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_with_the_config(capsys, llama, tmp_path):
    config = json.loads((llama / "config.json").read_text())
    config["intermediate_size"] = 128
    (llama / "config.json").write_text(json.dumps(config))
    fails(capsys, ["convert", llama, tmp_path / "out"], "shape mismatch", "mlp")


def test_unsupported_architecture_lists_the_supported_ones(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    fails(capsys, ["convert", tmp_path / "gpt2", tmp_path / "out"], "'gpt2'", "llama, mistral, qwen2, qwen3, nemotron")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--num-experts", "2", "--top-k", "4"], "top_k=4 is larger than num_experts=2"),
        (["--num-experts", "10", "--top-k", "5", "--granularity", "5"], "granularity=5 does not divide"),
        (["--num-experts", "16", "--top-k", "2", "--granularity", "4"], "multiple of granularity=4"),
        (["--drop-ratio", "1.5"], "drop_ratio"),
        (["--moe-layers", "0,7"], "out of range"),
        (["--moe-layers", "sometimes"], "moe_layers"),
        (["--dtype", "int3"], "dtype"),
        (["--router", "hash"], "invalid choice"),
    ],
)
def test_bad_options(capsys, llama, tmp_path, flags, needle):
    fails(capsys, ["convert", llama, tmp_path / "out", *flags], needle)
    assert not (tmp_path / "out").exists()


def test_yaml_options_validated_before_any_weight_is_read(capsys, llama, tmp_path):
    (llama / "model.safetensors").write_bytes(b"garbage that would fail if read")
    cfg = tmp_path / "o.yaml"
    cfg.write_text("num_experts: 4\ntop_k: 9\n")
    fails(capsys, ["convert", llama, tmp_path / "out", "--config", cfg], "top_k=9")
    cfg.write_text("num_experts: 4\nrouter_type: softmax_topk\n")
    fails(capsys, ["convert", llama, tmp_path / "out", "--config", cfg], "unknown option", "router_type")
    cfg.write_text("- just\n- a list\n")
    fails(capsys, ["convert", llama, tmp_path / "out", "--config", cfg], "mapping")
    fails(capsys, ["convert", llama, tmp_path / "out", "--config", tmp_path / "missing.yaml"], "does not exist")


def test_bin_only_with_opt_in(capsys, tmp_path, tiny_dense_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dirs["qwen3"])
    folder = tmp_path / "bin"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    fails(capsys, ["convert", folder, tmp_path / "out"], "--allow-bin")
    assert main(["convert", str(folder), str(tmp_path / "out"), "--allow-bin", "--num-experts", "4", "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_output_inside_the_source_and_existing_output(capsys, llama, tmp_path):
    fails(capsys, ["convert", llama, llama / "moe"], "inside the source folder")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    fails(capsys, ["convert", llama, out], "not empty", "--overwrite")


def test_hub_id_offline_is_a_clear_error(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fails(capsys, ["convert", "some-org/some-dense-model", tmp_path / "out"], "some-org/some-dense-model", "offline")


def test_export_refusal_is_one_line(capsys, tiny_dense_dirs, tmp_path):
    from upcycled_moe.conversion import upcycle

    moe = upcycle(tiny_dense_dirs["nemotron"], tmp_path / "moe", num_experts=4, top_k=2)
    fails(capsys, ["export", moe, tmp_path / "mixtral", "--to", "mixtral"], "cannot be exported to mixtral",
          "norm_type")


def test_subcommands_are_extensible(capsys):
    seen = {}
    register_command("hello", "say hello", lambda p: p.add_argument("--name", default="x"),
                     lambda a: seen.setdefault("name", a.name) and 0)
    try:
        assert main(["hello", "--name", "moe"]) == 0 and seen == {"name": "moe"}
    finally:
        COMMANDS.pop("hello")
    fails(capsys, ["frobnicate"], "invalid choice")


def test_model_card_template_is_shipped_in_the_package_and_matches_the_repository_copy():
    from upcycled_moe.conversion.model_card import TEMPLATE

    repo_copy = Path(__file__).resolve().parent.parent / "model_cards" / "upcycled_moe.md"
    assert TEMPLATE.parent.parent.name == "upcycled_moe"  # inside the package: package_data ships it in the wheel
    assert TEMPLATE.read_text() == repo_copy.read_text()


def test_gguf_source_card_says_it_was_quantised_and_carries_its_license():
    """SmolLM2's embedded GGUF: license and quantisation read from its metadata (no weights loaded), said on the card."""
    from conftest import smollm2_gguf_path
    from upcycled_moe.conversion.model_card import card_metadata, source_note
    from upcycled_moe.conversion.sources import gguf_facts

    gguf = smollm2_gguf_path()
    facts = gguf_facts(gguf)
    assert facts == {"license": "apache-2.0", "language": ["en"], "quantization": "Q4_1"}
    source = {"path": str(gguf), "format": "gguf", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", **facts}
    note = source_note(source)
    assert f"**Q4_1-quantised GGUF** `{gguf.name}`" in note and "dequantised to float32" in note
    assert str(gguf.parent) not in note
    data = card_metadata({"source": source, "options": {}})
    assert (data.license, data.base_model, data.base_model_relation) == ("apache-2.0", source["base_model"], "finetune")


# The cards' usage snippets, run as a user would paste them: the package blocked (remote code only), stdin closed
CARD_SNIPPETS = BLOCK_PACKAGE + r"""
import re
for folder in sys.argv[1:]:
    card = open(folder + "/README.md", encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    exec(code.replace("path/or/hub-id/of/this/folder", folder).replace("max_new_tokens=30", "max_new_tokens=2"), {})
print("SNIPPETS RAN")
"""


def test_convert_and_export_cards_carry_license_base_model_and_no_local_path(tmp_path, tiny_llama_with_tokenizer):
    """Both cards load as Hub cards with the source's license (from its card), base_model and the Hub's relation;
    no local path in README.md or config.json (source and options named by file name); the usage snippets run
    without the package and without the interactive "run the custom code?" prompt (stdin closed)."""
    import os
    import subprocess
    import sys

    from conftest import check_public_card

    private = tmp_path / "home-of-a-user"
    src = private / "llama-src"
    shutil.copytree(tiny_llama_with_tokenizer, src)
    (src / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a dense model\n")
    (private / "held-out.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert main(["convert", str(src), str(tmp_path / "moe"), "--router", "topk_softmax", "--num-experts", "4",
                 "--dtype", "float32", "--verify", "--verify-text", str(private / "held-out.txt"),
                 "--base-model", base, "--quiet"]) == 0
    expected = dict(license="mit", language="en", base_model=base, base_model_relation="finetune",
                    library_name="transformers", pipeline_tag="text-generation")
    card = check_public_card(tmp_path / "moe", private, **expected)
    assert {"moe", "upcycling", "custom_code", "llama"} <= set(card.data.tags)
    assert "trust_remote_code=True)" in card.text and "upcycle-moe convert llama-src OUTPUT" in card.text
    provenance = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycling"]
    assert provenance["source"]["path"] == "llama-src" and provenance["options"]["verify_text"] == "held-out.txt"
    assert provenance["source"]["license"] == "mit"

    assert main(["export", str(tmp_path / "moe"), str(tmp_path / "mixtral"), "--to", "mixtral"]) == 0
    card = check_public_card(tmp_path / "mixtral", private, **expected)
    assert "mixtral" in card.data.tags and "custom_code" not in card.data.tags
    assert "trust_remote_code" not in card.text and "MixtralForCausalLM" in card.text
    assert json.loads((tmp_path / "mixtral" / "config.json").read_text())["upcycling"]["exported_to"] == "mixtral"

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run([sys.executable, "-c", CARD_SNIPPETS, str(tmp_path / "moe"), str(tmp_path / "mixtral")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SNIPPETS RAN" in proc.stdout
    assert "run the custom code" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]


@pytest.mark.parametrize("router", ["sigmoid_topk", "softmax_topk"])
def test_calibrated_scale_makes_the_mean_gain_one_on_real_text(tiny_llama_with_tokenizer, router):
    """Calibration (per layer, on real text through the dense model) vs the formula's s; re-measured independently
    through the MoE's own routers on the calibration text: mean over tokens of s · Σ selected weights / G is 1.
    (Held-out behaviour on a real model: test_conversion_smollm2's perplexity test.)"""
    from upcycled_moe.conversion import upcycle_in_memory
    from upcycled_moe.conversion.methods import activation_scale
    from upcycled_moe.conversion.sample_text import calibration_text

    kw = dict(num_experts=8, top_k=2, router=router, router_init_std=0.05, dtype="float32")
    formula = upcycle_in_memory(tiny_llama_with_tokenizer, **kw)
    moe = upcycle_in_memory(tiny_llama_with_tokenizer, scaling="calibrated", calibration_tokens=1024, **kw)
    s_formula = activation_scale(router, 8, 2, 1)
    assert set(formula.config.upcycling["activation_scale"].values()) == {s_formula}
    scales = {int(k): v for k, v in moe.config.upcycling["activation_scale"].items()}
    assert all(abs(s / s_formula - 1) > 0.01 for s in scales.values())  # the measurement moved it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer)
    ids = tok(calibration_text(), return_tensors="pt", add_special_tokens=False).input_ids[:, :1024]
    mass = {}

    def record(i):
        def hook(module, args, out):  # returns None: the output is left alone
            mass[i] = out[1].sum(-1).mean().item()

        return hook

    hooks = [moe.model.layers[i].mlp.gate.register_forward_hook(record(i)) for i in scales]
    with torch.no_grad():
        moe(ids.view(2, 512))
    for h in hooks:
        h.remove()
    for i, s in scales.items():
        assert s * mass[i] == pytest.approx(1.0, abs=0.01)  # G = 1; the MoE's own activations


def test_quiet_convert_prints_nothing_even_from_libraries(capsys, llama, tmp_path, monkeypatch):
    """--quiet means errors only: transformers' GGUF dequantisation draws a plain tqdm bar on stderr, which the
    library's own progress-bar switch does not reach. Here the source load draws one; the error line still shows."""
    from tqdm.auto import tqdm

    import upcycled_moe.conversion.convert as convert_module

    real_open = convert_module.open_source

    def open_with_a_bar(*args, **kwargs):
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        return real_open(*args, **kwargs)

    monkeypatch.setattr(convert_module, "open_source", open_with_a_bar)
    assert main(["convert", str(llama), str(tmp_path / "moe"), "--num-experts", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert main(["convert", str(llama), str(tmp_path / "moe"), "--num-experts", "2", "--quiet"]) == 2  # exists
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
