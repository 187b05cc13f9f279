"""Experts from several dense models (`upcycle-moe convert --config FILE OUTPUT`, mergekit-moe files accepted)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAMILIES, _tiny
from safetensors import safe_open

from upcycled_moe.cli import main


def perturbed(model, seed: int, scale: float = 0.05):
    """A "fine-tune" of `model`: every weight moved by noise (its own FFN, attention and norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=g))
    return model


def save_sources(root: Path, family: str, count: int, tokenizer_dir=None, **overrides) -> list[Path]:
    """The base (index 0) and count - 1 perturbed copies of a tiny model of `family`, saved to disk."""
    out = []
    for i in range(count):
        model = _tiny(family, **overrides)
        if i:
            perturbed(model, seed=i)
        path = root / f"{family}-{i}"
        model.save_pretrained(path)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                shutil.copy2(f, path / f.name)
        out.append(path)
    return out


def tensors(folder: Path) -> dict:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(folder / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def dense_tensors(folder: Path) -> dict:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def family_sources(tmp_path_factory):
    """family -> [base, fine-tune 1, fine-tune 2] folders."""
    root = tmp_path_factory.mktemp("sources")
    return {family: save_sources(root, family, 3) for family in FAMILIES}


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny Llama with the real SmolLM2 tokenizer, and two fine-tunes of it (prompts need real tokens)."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir))
    root = tmp_path_factory.mktemp("tok-sources")
    return save_sources(root, "llama", 3, smollm2_tokenizer_dir, vocab_size=vocab)


@torch.no_grad()
def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model(input_ids=ids, use_cache=False).logits


def moe_logits(folder, ids):
    from upcycled_moe.modeling_upcycled_moe import UpcycledMoeForCausalLM

    with torch.no_grad():
        model = UpcycledMoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return model(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------------- mechanics


@pytest.mark.parametrize("family", FAMILIES)
def test_each_expert_is_its_sources_ffn_and_the_rest_is_the_base(tmp_path, family_sources, family):
    base, a, b = family_sources[family]
    cfg = write_yaml(tmp_path / "moe.yaml", {
        "base_model": str(base), "gate_mode": "random", "dtype": "float32",
        "experts": [{"source_model": str(a)}, {"source_model": str(b), "copies": 2}, {"source_model": str(base)}],
    })
    out = tmp_path / "moe"
    assert cli("convert", "--config", cfg, out, "--quiet") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["router_type"]) == (4, "topk_softmax")
    assert [e["source_model"] for e in config["upcycling"]["multi_source"]["experts"]] == [a.name, b.name, base.name]  # names, never local paths
    moe, dense = tensors(out), {p: dense_tensors(p) for p in (base, a, b)}
    order = [a, b, b, base]
    for layer in range(2):
        mlp = f"model.layers.{layer}.mlp"
        for e, src in enumerate(order):
            d = dense[src]
            if family == "nemotron":
                assert torch.equal(moe[f"{mlp}.experts.up_proj"][e], d[f"{mlp}.up_proj.weight"])
            else:
                want = torch.cat([d[f"{mlp}.gate_proj.weight"], d[f"{mlp}.up_proj.weight"]])
                assert torch.equal(moe[f"{mlp}.experts.gate_up_proj"][e], want)
            assert torch.equal(moe[f"{mlp}.experts.down_proj"][e], d[f"{mlp}.down_proj.weight"])
        router = moe[f"{mlp}.gate.weight"]
        assert router.shape[0] == 4 and not torch.equal(router[1], router[2])  # random: untied rows
    for name, value in dense[base].items():
        if ".mlp." not in name:
            assert torch.equal(moe[name], value), name


def test_base_weights_average_is_the_mean_of_the_expert_sources(tmp_path, family_sources):
    base, a, b = family_sources["qwen3"]
    cfg = write_yaml(tmp_path / "moe.yaml", {
        "base_model": str(base), "base_weights": "average", "dtype": "float32",
        "experts": [str(a), str(b)], "top_k": 1,
    })
    assert cli("convert", "--config", cfg, tmp_path / "moe", "--quiet") == 0
    moe, da, db = tensors(tmp_path / "moe"), dense_tensors(a), dense_tensors(b)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_norm.weight"):
        torch.testing.assert_close(moe[name], (da[name] + db[name]) / 2, rtol=0, atol=1e-6)
        assert not torch.equal(moe[name], dense_tensors(base)[name])


@pytest.mark.parametrize("router,gate_mode,atol", [("topk_softmax", "upcycle", 1e-4), ("topk_softmax", "random", 1e-4),
                                                    ("softmax_topk", "upcycle", 2e-2)])
def test_identical_sources_give_the_dense_function(tmp_path, family_sources, router, gate_mode, atol):
    """All experts copies of one model: the MoE computes the dense model (exactly with a renormalising router)."""
    base = family_sources["mistral"][1]
    cfg = write_yaml(tmp_path / "moe.yaml", {
        "base_model": str(base), "gate_mode": gate_mode, "router": router, "dtype": "float32",
        "experts": [str(base)] * 3 + [{"source_model": str(base), "copies": 1}],
    })
    assert cli("convert", "--config", cfg, tmp_path / "moe", "--quiet") == 0
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    diff = (moe_logits(tmp_path / "moe", ids) - logits(base, ids)).abs().max().item()
    assert diff <= atol, diff


def test_ffn_slices_of_one_source_rebuild_it_and_a_shared_expert_keeps_the_function(tmp_path, family_sources):
    base = family_sources["llama"][2]
    cfg = write_yaml(tmp_path / "moe.yaml", {
        "base_model": str(base), "router": "topk_softmax", "dtype": "float32", "top_k": 2,
        "experts": [{"source_model": str(base), "ffn_slice": f"{j}/2"} for j in range(2)] * 2,
        "shared_experts": [{"source_model": str(base)}],
    })
    assert cli("convert", "--config", cfg, tmp_path / "moe", "--quiet") == 0
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (config["moe_intermediate_size"], config["num_shared_experts"]) == (48, 1)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    diff = (moe_logits(tmp_path / "moe", ids) - logits(base, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_export_to_stock_qwen3_moe_gives_the_same_logits(tmp_path, family_sources):
    base, a, b = family_sources["qwen3"]
    cfg = write_yaml(tmp_path / "moe.yaml", {"base_model": str(base), "gate_mode": "random", "dtype": "float32",
                                             "experts": [str(a), str(b), str(base)], "experts_per_token": 2})
    assert cli("convert", "--config", cfg, tmp_path / "ours", "--quiet") == 0
    cfg2 = write_yaml(tmp_path / "moe2.yaml", {**yaml.safe_load(cfg.read_text()), "router": "softmax_topk"})
    assert cli("convert", "--config", cfg2, tmp_path / "stock", "--to", "qwen3_moe", "--quiet") == 0
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert sorted(os.listdir(tmp_path)) == ["moe.yaml", "moe2.yaml", "ours", "stock"]  # no temporary folder left
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    assert cli("convert", "--config", cfg2, tmp_path / "ours2", "--quiet") == 0
    torch.testing.assert_close(logits(tmp_path / "stock", ids), moe_logits(tmp_path / "ours2", ids),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- routing

CODE = ["def add(a, b):\n    return a + b", "import os\nfor name in os.listdir('.'):\n    print(name)",
        "class Stack:\n    def push(self, x):\n        self.items.append(x)"]
PROSE = ["The old lighthouse keeper walked along the shore every morning.",
         "She opened the letter slowly, afraid of what her sister had written.",
         "In spring the meadows behind the village fill with yellow flowers."]


@torch.no_grad()
def top1_shares(folder, tokenizer_dir, texts) -> list[list[float]]:
    """Per layer, the share of the texts' tokens whose first choice is each expert (the model's own router)."""
    from transformers import AutoTokenizer

    from upcycled_moe.modeling_upcycled_moe import UpcycledMoeForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = UpcycledMoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    picks = {i: [] for i in range(len(model.model.layers))}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: picks[i].append(out[0].argmax(-1)))
             for i, layer in enumerate(model.model.layers)]
    for text in texts:
        model(input_ids=torch.tensor([tok(text, add_special_tokens=False).input_ids]), use_cache=False)
    for h in hooks:
        h.remove()
    n = model.config.num_experts
    return [torch.bincount(torch.cat(p), minlength=n).float().div(torch.cat(p).numel()).tolist()
            for p in picks.values()]


# cheap_embed: the tiny Llama has attention output biases, a constant added to every token's residual stream and most
# of each MoE input (|mean| 7.3 of |h| 8.1 at layer 0). Rows taken from the raw embeddings had a large component
# along it, so every token went to one expert (code 1.0 / 0.96 to expert 0, prose 0.03 / 0.24 to expert 1); adding
# only the biases fixed layer 0 alone (prose 0.70 / 0.30), so the layers below run (uniform attention, MLPs).
@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_prompt_routing_sends_each_domain_to_its_expert(tmp_path, vocab_model, smollm2_tokenizer_dir, gate_mode):
    base, code_model, prose_model = vocab_model
    cfg = write_yaml(tmp_path / "moe.yaml", {
        "base_model": str(base), "gate_mode": gate_mode, "experts_per_token": 1, "dtype": "float32",
        "experts": [{"source_model": str(code_model), "positive_prompts": CODE, "negative_prompts": PROSE},
                    {"source_model": str(prose_model), "positive_prompts": PROSE, "negative_prompts": CODE}],
    })
    out = tmp_path / "moe"
    assert cli("convert", "--config", cfg, out, "--quiet") == 0
    code, prose = top1_shares(out, smollm2_tokenizer_dir, CODE), top1_shares(out, smollm2_tokenizer_dir, PROSE)
    print(f"\n{gate_mode}: code tokens to expert 0 per layer {[round(s[0], 2) for s in code]}, "
          f"prose tokens to expert 1 {[round(s[1], 2) for s in prose]}")
    for layer in range(2):
        assert code[layer][0] > 0.6 and prose[layer][1] > 0.6, (layer, code, prose)


def test_hidden_prompts_run_through_the_averaged_base(tmp_path, vocab_model):
    """With base_weights: average the output's attention, norms and embeddings are the sources' mean, so the
    prompts must run through those: the routers equal those built on a base that holds the averaged weights."""
    base, a, b = vocab_model
    da, db, dbase = dense_tensors(a), dense_tensors(b), dense_tensors(base)
    averaged = {k: (v if ".mlp." in k else (da[k] + db[k]) / 2) for k, v in dbase.items()}
    from safetensors.torch import save_file

    shutil.copytree(base, tmp_path / "avg-base")
    save_file(averaged, tmp_path / "avg-base" / "model.safetensors", metadata={"format": "pt"})
    routers = {}
    for name, base_model, weights in (("average", base, "average"), ("reference", tmp_path / "avg-base", "base")):
        cfg = write_yaml(tmp_path / f"{name}.yaml", {
            "base_model": str(base_model), "base_weights": weights, "gate_mode": "hidden", "dtype": "float32",
            "experts": [{"source_model": str(a), "positive_prompts": CODE, "negative_prompts": PROSE},
                        {"source_model": str(b), "positive_prompts": PROSE, "negative_prompts": CODE}],
        })
        assert cli("convert", "--config", cfg, tmp_path / name, "--quiet") == 0
        routers[name] = tensors(tmp_path / name)["model.layers.1.mlp.gate.weight"]
    torch.testing.assert_close(routers["average"], routers["reference"], rtol=0, atol=1e-5)  # the stored base's
    # routers differ from these by up to 0.019 (layer 1: what the code before this test gave)


def test_mergekit_moe_file_is_accepted_as_it_is(tmp_path, vocab_model):
    base, a, b = vocab_model
    cfg = write_yaml(tmp_path / "mergekit.yml", f"""\
base_model: {base}
gate_mode: cheap_embed # one of "hidden", "cheap_embed", or "random"
dtype: bfloat16
experts_per_token: 1
experts:
  - source_model: {a}
    positive_prompts:
      - "def main():"
    negative_prompts:
      - "Once upon a time"
  - source_model: {b}
    positive_prompts:
      - "Once upon a time"
shared_experts:
  - source_model: {base}
    positive_prompts:
      - "hello"
""")
    out = tmp_path / "moe"
    assert cli("convert", "--config", cfg, out, "--quiet") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["num_shared_experts"]) == (2, 1, 1)
    assert config["dtype"] == "bfloat16" and config["router_type"] == "topk_softmax"
    assert config["upcycling"]["multi_source"]["gate_mode"] == "cheap_embed"
    router = tensors(out)["model.layers.0.mlp.gate.weight"].float()
    assert torch.allclose(router.norm(dim=-1), torch.ones(2), atol=1e-2)  # unit rows from the prompts
    assert not torch.equal(router, tensors(out)["model.layers.1.mlp.gate.weight"].float())  # each layer's inputs


# ---------------------------------------------------------------------------------------------------- bad input


def _bad_cases(family_sources, vocab_model, tmp_path):
    base, a, _ = (str(p) for p in family_sources["llama"])
    tok_base, tok_a, _ = (str(p) for p in vocab_model)
    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(tok_a, other_vocab)
    data = json.loads((other_vocab / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other_vocab / "tokenizer.json").write_text(json.dumps(data))
    wider = save_sources(tmp_path, "llama", 1, intermediate_size=128)[0]
    ok = {"base_model": base, "experts": [base, a]}
    return [
        ({**ok, "foo": 1}, ["foo", "unknown key"]),
        ({**ok, "architecture": "mixtral"}, ["architecture", "not supported", "--to"]),
        ({**ok, "experts": [{"source_model": a, "residual_scale": 0.1}, base]}, ["experts[0].residual_scale"]),
        ({**ok, "experts": []}, ["experts", "non-empty list"]),
        ({**ok, "experts": [base, str(tmp_path / "missing")]}, ["experts[1].source_model", "does not exist"]),
        ({**ok, "experts": [base, str(family_sources["qwen2"][0])]}, ["experts[1].source_model", "qwen2"]),
        ({**ok, "experts": [base, str(wider)]}, ["experts[1].source_model", "intermediate_size"]),
        ({"base_model": tok_base, "experts": [tok_base, str(other_vocab)]}, ["experts[1].source_model", "vocabulary"]),
        ({**ok, "gate_mode": "hidden"}, ["experts[0].positive_prompts", "hidden"]),
        ({**ok, "gate_mode": "uniform_random"}, ["gate_mode", "uniform_random"]),
        ({**ok, "num_experts": 8}, ["num_experts", "experts list"]),
        ({**ok, "experts_per_token": 3}, ["top_k=3", "num_experts=2"]),
        ({**ok, "experts": [{"source_model": base, "ffn_slice": "2/2"}, a]}, ["experts[0].ffn_slice", "0 <= j < G"]),
        ({**ok, "experts": [{"source_model": base, "ffn_slice": "0/5"}] * 5, "top_k": 5},
         ["experts[0].ffn_slice", "divide"]),
        ({**ok, "experts": [{"source_model": base, "ffn_slice": "0/2"}, a]}, ["experts", "same width"]),
        ({**ok, "gate_mode": "cheap_embed", "experts": [{"source_model": base, "positive_prompts": ["x"]},
                                                        {"source_model": a, "positive_prompts": ["y"]}]},
         ["base_model", "tokenizer"]),
        ({**ok, "experts": [{"source_model": f"{base}+some/lora"}, a]}, ["experts[0].source_model", "LoRA"]),
        ("experts: [unclosed\n", ["not valid YAML"]),
    ]


def test_bad_files_give_one_error_line_and_write_nothing(capsys, tmp_path, family_sources, vocab_model):
    cases = _bad_cases(family_sources, vocab_model, tmp_path / "extra")  # built outside the watched folder
    work = tmp_path / "work"
    work.mkdir()
    for i, (data, needles) in enumerate(cases):
        cfg = write_yaml(tmp_path / f"bad{i}.yaml", data)
        capsys.readouterr()
        code = cli("convert", "--config", cfg, work / "out")
        err = capsys.readouterr().err.strip()
        assert code == 2, (i, err)
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (i, err)
        for needle in [str(cfg)] + needles:
            assert needle in err, (i, needle, err)
        assert os.listdir(work) == [], (i, os.listdir(work))


def test_command_line_mistakes(capsys, tmp_path, family_sources):
    base = str(family_sources["llama"][0])
    cfg = write_yaml(tmp_path / "moe.yaml", {"base_model": base, "experts": [base, base]})
    for argv, needle in ([["convert", base, "--config", cfg, tmp_path / "out"], "SOURCE"],
                         [["convert", tmp_path / "out"], "SOURCE is missing"],
                         [["convert", "--config", cfg, tmp_path / "out", "--num-experts", "4"],
                          "--num-experts (command line)"],
                         [["convert", "--config", cfg, tmp_path / "out", "--to", "mixtral"], "attention biases"]):
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err
        assert sorted(os.listdir(tmp_path)) == ["moe.yaml"]


# ---------------------------------------------------------------------------------------------------- streaming

PEAK_RSS_CHILD = r"""
import gc, json, sys
from upcycled_moe.conversion.multi_source import upcycle_multi
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
peaks = []
for config, output in zip(sys.argv[1::2], sys.argv[2::2]):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS: one process (one import of torch) measures both runs
    upcycle_multi(config, output)
    peaks.append(peak())
print(json.dumps(peaks))
"""


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_number_of_sources(tmp_path):
    """8 experts from 2 sources, then from 8 sources with averaged base weights: one layer's FFN of one source
    (12 MiB in fp32 here) is all that is held, so holding every source's layer (100 MiB) would show (a cache that
    keeps every source gave 493 vs 659 MiB; 2-core CPU, torch 2.13, transformers 5.24)."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048,
                                         num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8))
    paths = []
    for i in range(8):
        if i:
            perturbed(model, seed=i)
        model.save_pretrained(tmp_path / f"src{i}")
        paths.append(str(tmp_path / f"src{i}"))
    del model
    argv = []
    for n, extra in ((2, {}), (8, {"base_weights": "average"})):
        cfg = write_yaml(tmp_path / f"moe{n}.yaml", {"base_model": paths[0], "gate_mode": "random", **extra,
                                                     "experts": [paths[i * n // 8] for i in range(8)]})
        argv += [str(cfg), str(tmp_path / f"moe{n}")]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, *argv], capture_output=True, text=True,
                          cwd=tmp_path)  # not the repository root first on sys.path: the package PYTHONPATH names
    assert proc.returncode == 0, proc.stderr[-2000:]
    two, eight = json.loads(proc.stdout.split("\n")[-2])
    print(f"\npeak RSS, 8 experts from 2 sources: {two:.0f} MiB, from 8 sources (averaged base): {eight:.0f} MiB")
    assert (tmp_path / "moe8" / "config.json").is_file()
    assert eight <= two + 30, (two, eight)


def test_model_card_names_every_source(tmp_path, family_sources):
    base, a, b = family_sources["llama"]
    cfg = write_yaml(tmp_path / "moe.yaml", {"base_model": str(base), "experts": [str(a), {"source_model": str(b),
                                                                                          "copies": 3}]})
    assert cli("convert", "--config", cfg, tmp_path / "moe", "--quiet") == 0
    card = (tmp_path / "moe" / "README.md").read_text()  # by folder and file name: no local path on the Hub
    assert f"`{a.name}` x 1" in card and f"`{b.name}` x 3" in card and f"convert --config {cfg.name} OUTPUT" in card
    for text in (card, (tmp_path / "moe" / "config.json").read_text()):
        assert str(a.parent) not in text and str(tmp_path) not in text


def test_plain_copies_skip_the_float32_round_trip(tmp_path, family_sources, monkeypatch):
    """Copies (topk_softmax, G = 1) are read and written in the stored dtype, bit-exact; scaled experts go
    through float32."""
    from transformers import AutoModelForCausalLM

    from upcycled_moe.conversion import convert as convert_module
    from upcycled_moe.conversion import upcycle

    AutoModelForCausalLM.from_pretrained(family_sources["llama"][1], dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16")
    seen = []
    get = convert_module.DenseMlpCache.get
    monkeypatch.setattr(convert_module.DenseMlpCache, "get",
                        lambda self, *a: seen.append(get(self, *a)[1].dtype) or get(self, *a))
    upcycle(tmp_path / "bf16", tmp_path / "copies", num_experts=4, top_k=2, router="topk_softmax")
    assert set(seen) == {torch.bfloat16}
    moe, dense = tensors(tmp_path / "copies"), dense_tensors(tmp_path / "bf16")
    for e in range(4):
        assert torch.equal(moe["model.layers.1.mlp.experts.down_proj"][e], dense["model.layers.1.mlp.down_proj.weight"])
    seen.clear()
    upcycle(tmp_path / "bf16", tmp_path / "scaled", num_experts=4, top_k=2)  # softmax_topk: s = 2 on the experts
    assert set(seen) == {torch.float32}
