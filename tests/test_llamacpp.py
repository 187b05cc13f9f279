"""`upcycle-moe export MOE OUT.gguf --to gguf`: llama.cpp's own converter, and llama.cpp's greedy tokens.

The default run checks the refusals (seconds, no llama.cpp): no converter, a model llama.cpp would compute
differently, a converter that fails; each is one error line, exit 2, nothing left behind.

Opt-in (`--run llamacpp`; 47 min on 2 busy cores the first time, nearly all of it building llama-cpp-python
0.3.36 from its sdist, cached under the test cache; ~3 min after): the real SmolLM2-135M-Instruct upcycled to
4 experts top-2 goes through Mixtral, a small random Qwen3 upcycled the same way through Qwen3-MoE, both to f32
GGUF with the converter the sdist vendors; llama.cpp (through llama-cpp-python, f32 KV cache) must tokenise the
chat prompts and generate the same greedy tokens as transformers.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import CACHE, ENV, make_tiny_moe_dir
from upcycled_moe.cli import main

LLAMA_CPP_PYTHON = "0.3.36"
BUILD = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"  # the sdist, its unpacked tree, the wheel, a --target site


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_gguf_without_a_converter_is_one_error_and_writes_nothing(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("UPCYCLED_MOE_LLAMA_CPP", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", str(tiny_dir), str(out / "m.gguf"), "--to", "gguf"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--llama-cpp" in lines[0], lines
    assert "convert_hf_to_gguf.py" in lines[0] and "pip download" in lines[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(tiny_dir), str(out / "m.gguf"), "--to", "gguf", "--llama-cpp", str(empty)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "holds no convert_hf_to_gguf.py" in lines[0], lines
    assert list(out.iterdir()) == []


def fake_llama_cpp(root: Path, script: str) -> Path:
    """A tree with a stand-in converter, and stand-in gguf / sentencepiece packages in its gguf-py."""
    for package in ("gguf", "sentencepiece"):
        (root / "gguf-py" / package).mkdir(parents=True)
        (root / "gguf-py" / package / "__init__.py").write_text("")
    (root / "convert_hf_to_gguf.py").write_text(script)
    return root


FAILING_CONVERTER = """
import sys
out = sys.argv[sys.argv.index("--outfile") + 1]
open(out, "wb").write(b"GGUF half written")
sys.exit("ValueError: Can not map tensor 'model.layers.0.mlp.gate.weight'")
"""


def test_gguf_refuses_what_llama_cpp_computes_differently(tmp_path, tiny_dir, capsys):
    tree = fake_llama_cpp(tmp_path / "llama.cpp", FAILING_CONVERTER)
    out = tmp_path / "out"
    out.mkdir()
    # tiny_dir routes softmax_topk without renormalising: llama.cpp's mixtral / qwen3moe graphs renormalise
    assert main(["export", str(tiny_dir), str(out / "m.gguf"), "--to", "gguf", "--llama-cpp", str(tree)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "renormalise" in lines[0] and "--router topk_softmax" in lines[0], lines
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("fields, says", [
    (dict(mlp_layer_types=["dense", "sparse"]), "--moe-layers all"),  # llama.cpp wants a router in every layer
    (dict(attention_bias=True, attention_out_bias=True), "o_proj bias"),  # its graphs have no o_proj bias
])
def test_gguf_refuses_what_llama_cpp_cannot_load(tmp_path, smollm2_tokenizer_dir, capsys, fields, says):
    moe = make_tiny_moe_dir(tmp_path / "moe", smollm2_tokenizer_dir, router_type="topk_softmax", **fields)
    tree = fake_llama_cpp(tmp_path / "llama.cpp", FAILING_CONVERTER)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert main(["export", str(moe), str(out / "m.gguf"), "--to", "gguf", "--llama-cpp", str(tree)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and says in lines[0], lines
    assert list(out.iterdir()) == []


def test_a_failing_converter_is_one_error_and_leaves_nothing(tmp_path, smollm2_tokenizer_dir, capsys):
    moe = make_tiny_moe_dir(tmp_path / "moe", smollm2_tokenizer_dir, router_type="topk_softmax")
    tree = fake_llama_cpp(tmp_path / "llama.cpp", FAILING_CONVERTER)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["export", str(moe), str(out / "m.gguf"), "--to", "gguf", "--llama-cpp", str(tree)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "convert_hf_to_gguf.py failed on the mixtral export" in lines[0], lines
    assert "Can not map tensor" in lines[0]
    assert list(out.iterdir()) == []  # neither the partial GGUF nor the staging folder with the stock export
    assert main(["export", str(moe), str(out / "m"), "--to", "gguf", "--llama-cpp", str(tree)]) == 2
    assert "ending in .gguf" in error_lines(capsys)[0]


# ---------------------------------------------------------------------------------------------------- opt-in


def pip(*args: str, env_extra: dict | None = None):
    res = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                         env={**os.environ, **(env_extra or {})}, timeout=3600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def llama_cpp_build() -> tuple[Path, Path]:
    """(the llama.cpp tree the sdist vendors, a --target site with llama_cpp and the converter's sentencepiece),
    built once per version: pip builds the sdist with CMake, CPU only, never into the test environment."""
    sdist = BUILD / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        pip("download", "--no-binary", ":all:", "--no-deps", "-d", str(BUILD),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}")
    tree = BUILD / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(BUILD / "src", filter="data")
    site = BUILD / "site"
    if not (site / "llama_cpp" / "llama.py").is_file():
        wheels = sorted((BUILD / "wheel").glob("llama_cpp_python-*.whl"))
        if not wheels:
            pip("wheel", "--no-deps", "-w", str(BUILD / "wheel"), str(sdist),
                env_extra={"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF "
                           "-DLLAMA_BUILD_EXAMPLES=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
            wheels = sorted((BUILD / "wheel").glob("llama_cpp_python-*.whl"))
        pip("install", "--no-deps", "--target", str(site), str(wheels[-1]), "diskcache>=5.6.1",
            "sentencepiece>=0.1.98,<0.3.0")
    return tree, site


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I reverse a list in Python?"]

LLAMA_GREEDY = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompts, n_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
# logits_all fills llm.scores; an f32 KV cache (GGML_TYPE_F32 = 0): the default f16 one moved a random Qwen3-MoE's logits by up to 1e-2
llm = Llama(path, n_ctx=512, n_threads=2, n_batch=512, logits_all=True, type_k=0, type_v=0, verbose=False)
out = []
for text, ids in prompts:
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(tok)
        if tok == llm.token_eos():
            break
        llm.eval([tok])
    out.append({"tokens": llm.tokenize(text.encode(), add_bos=False, special=True), "new": new})
print(json.dumps({"arch": llm.metadata.get("general.architecture"), "rows": out}))
"""


def transformers_greedy(folder: Path, prompts: list[str], n_new: int):
    """(chat text, its token ids, greedy new ids up to EOS) per prompt, from our model in transformers (f32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        rows.append((text, ids, gen[0, len(ids):].tolist()))
    return rows


def llama_greedy(gguf: Path, site: Path, rows, n_new: int):
    prompts = json.dumps([[text, ids] for text, ids, _ in rows])
    res = subprocess.run([sys.executable, "-c", LLAMA_GREEDY, str(gguf), prompts, str(n_new)], capture_output=True,
                         text=True, env={**ENV, "PYTHONPATH": str(site)}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])  # {"arch": ..., "rows": [{"tokens", "new"}, ...]}


def check_same_greedy(moe: Path, gguf: Path, site: Path, n_new: int = 24):
    rows = transformers_greedy(moe, PROMPTS, n_new)
    llama = llama_greedy(gguf, site, rows, n_new)
    assert len(llama["rows"]) == len(rows)
    for (text, ids, new), got in zip(rows, llama["rows"]):
        assert got["tokens"] == ids, text  # llama.cpp's tokenizer (pre-tokenizer, specials) = transformers'
        assert got["new"] == new, (text, new, got["new"])
    return rows, llama["arch"]


def random_qwen3_dir(path: Path, tokenizer_dir: Path) -> Path:
    """A small random Qwen3 (transformers' class) with the real SmolLM2 tokenizer, so it has a GGUF vocabulary."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)  # peaked logits: no near-ties
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def upcycle_cli(source: Path, out: Path):
    assert main(["convert", str(source), str(out), "--num-experts", "4", "--top-k", "2", "--router", "topk_softmax",
                 "--quiet"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("via", ["mixtral", "qwen3_moe"])
def test_gguf_in_llama_cpp_gives_transformers_greedy_tokens(tmp_path, via, smollm2_dir, smollm2_tokenizer_dir,
                                                            monkeypatch, tested_versions):
    tree, site = llama_cpp_build()
    source = smollm2_dir if via == "mixtral" else random_qwen3_dir(tmp_path / "qwen3", smollm2_tokenizer_dir)
    moe = upcycle_cli(source, tmp_path / "moe")
    gguf = tmp_path / "model-f32.gguf"
    monkeypatch.setenv("PYTHONPATH", str(site))  # the converter's sentencepiece
    assert main(["export", str(moe), str(gguf), "--to", "gguf", "--gguf-type", "f32", "--llama-cpp", str(tree)]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the staging folder is gone
    rows, arch = check_same_greedy(moe, gguf, site)
    assert arch == {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[via]  # llama.cpp runs Mixtral on its llama graph
    tested_versions[f"llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON}) greedy = transformers, via {via}"] = \
        __import__("transformers").__version__
    print(via, [len(new) for _, _, new in rows])
