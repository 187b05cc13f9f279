"""Streaming and atomic output: the whole MoE is never held in memory, and OUTPUT is all-or-nothing."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from upcycled_moe.conversion import UpcycleError, upcycle
from upcycled_moe.conversion import convert as convert_module
from upcycled_moe.conversion.writer import TensorPlan, write_sharded

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from conversion import measure  # noqa: E402  benchmarks/conversion.py


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """A random Llama whose experts are large next to the process baseline: 16 fp32 experts of one layer's
    gate_up_proj are 134 MB, so holding a layer (let alone the model, 805 MB) would show in peak RSS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=2048,
                                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8))
    out = tmp_path_factory.mktemp("wide") / "llama"
    model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_number_of_experts(wide_llama_dir, tmp_path):
    runs = {n: measure(wide_llama_dir, tmp_path / f"moe{n}", num_experts=n, top_k=2, dtype="float32")
            for n in (4, 16)}
    print(f"\nwide llama fp32: 4 experts {runs[4]}, 16 experts {runs[16]}")
    assert runs[16]["output_mib"] > 3.5 * runs[4]["output_mib"]
    assert runs[16]["peak_rss_mib"] <= 1.10 * runs[4]["peak_rss_mib"]


def test_writer_streams_chunks_into_valid_sharded_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    full = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(3, 4, 2, generator=g).to(torch.bfloat16),
            "c": torch.arange(7, dtype=torch.int64)}

    def chunks(t):
        return lambda: iter(t.split(2))  # several chunks per tensor, as experts are produced

    plans = [TensorPlan(k, tuple(v.shape), v.dtype, chunks(v)) for k, v in full.items()]
    index = write_sharded(tmp_path, plans, max_shard_size=100)
    assert len(set(index["weight_map"].values())) == 3
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / shard, "pt") as f:
            assert torch.equal(f.get_tensor(name), full[name])
    bad = [TensorPlan("x", (4, 2), torch.float32, lambda: iter([torch.zeros(3, 2)]))]
    with pytest.raises(RuntimeError, match="rows"):
        write_sharded(tmp_path, bad, 10**6)


def test_failure_leaves_nothing_at_output(tmp_path, tiny_dense_dirs, monkeypatch):
    """A failure after the shards were written: OUTPUT absent, no temporary folder left."""

    def broken(folder, plan):
        raise OSError("disk full (simulated after the weights were written)")

    monkeypatch.setattr(convert_module, "write_side_files", broken)
    with pytest.raises(OSError):
        upcycle(tiny_dense_dirs["llama"], tmp_path / "moe", num_experts=4, top_k=2)
    assert os.listdir(tmp_path) == []


def test_existing_output_refused_then_replaced_with_overwrite(tmp_path, tiny_dense_dirs):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UpcycleError, match="--overwrite"):
        upcycle(tiny_dense_dirs["llama"], out, num_experts=4, top_k=2)
    assert (out / "keep.txt").read_text() == "precious"
    upcycle(tiny_dense_dirs["llama"], out, num_experts=4, top_k=2, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["num_experts"] == 4
    assert sorted(os.listdir(tmp_path)) == ["moe"]
    empty = tmp_path / "empty"
    empty.mkdir()
    upcycle(tiny_dense_dirs["llama"], empty, num_experts=4, top_k=2)  # an empty folder is fine
    assert (empty / "config.json").is_file()


def test_default_router_builds_each_layers_expert_once_bit_exact_with_the_float32_formula(tmp_path, tiny_dense_dirs,
                                                                                          monkeypatch):
    """softmax_topk (the default) scales every expert by the same s, so the experts of a layer are identical: each
    is built (read, scaled in float32, cast) once and written N times, with the bits of the float32 formula."""
    from upcycled_moe.conversion import methods

    builds = []
    real = methods.build_expert
    monkeypatch.setattr(convert_module, "build_expert", lambda *a, **k: builds.append(a[3]) or real(*a, **k))
    upcycle(tiny_dense_dirs["llama"], tmp_path / "moe", num_experts=6, top_k=2, dtype="bfloat16")
    assert len(builds) == 2  # once in each of the 2 layers, for gate_up_proj and down_proj (was 6 x 2 x 2)
    root = Path(tiny_dense_dirs["llama"])
    with safe_open(root / "model.safetensors", "pt") as f:
        dense = {k: f.get_tensor(k) for k in f.keys()}
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    moe = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(tmp_path / "moe" / shard, "pt") as f:
            moe.update({k: f.get_tensor(k) for k in f.keys()})
    r = 3.0 ** 0.5  # s = N / T = 3 on the output, split sqrt(s) on up and down (gate untouched)
    for layer in range(2):
        d = {m: dense[f"model.layers.{layer}.mlp.{m}_proj.weight"].float() for m in ("gate", "up", "down")}
        gate_up = torch.cat([d["gate"], d["up"] * r]).to(torch.bfloat16)
        down = (d["down"] * r).to(torch.bfloat16)
        for e in range(6):
            assert torch.equal(moe[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e], gate_up)
            assert torch.equal(moe[f"model.layers.{layer}.mlp.experts.down_proj"][e], down)


def test_writer_checks_a_repeated_chunk_once_and_still_refuses_nan(tmp_path, monkeypatch):
    """Identical experts are one tensor yielded N times: its NaN/inf check runs once; a distinct chunk is checked."""
    from upcycled_moe.conversion import writer

    checked = []
    real = writer.all_finite
    monkeypatch.setattr(writer, "all_finite", lambda t: checked.append(t) or real(t))
    expert = torch.ones(1, 3, 2)
    plans = [TensorPlan("experts", (5, 3, 2), torch.float32, lambda: iter([expert] * 5))]
    write_sharded(tmp_path, plans, 10**6)
    assert len(checked) == 1
    bad = torch.ones(1, 3, 2)
    bad[0, 2, 1] = float("nan")
    plans = [TensorPlan("experts", (3, 3, 2), torch.float32, lambda: iter([expert, expert, bad]))]
    with pytest.raises(UpcycleError, match="NaN or inf"):
        write_sharded(tmp_path, plans, 10**6)


def test_console_script_exits_without_tearing_down_the_interpreter(tmp_path):
    """Once a command has finished (files closed, streams flushed, atexit handlers run), `upcycle-moe` leaves
    without the interpreter's module teardown, which costs seconds after importing torch and transformers. The exit
    status and the one error line are kept; called as a function (argv given), it returns as before."""
    import subprocess

    code = (
        "import atexit, os, sys, upcycled_moe_cli\n"
        "class Witness:\n"
        "    def __del__(self, write=os.write):\n"
        "        write(1, b'module teardown')\n"
        "upcycled_moe_cli.witness = Witness()\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        f"sys.argv = ['upcycle-moe', 'convert', {str(tmp_path / 'missing')!r}, {str(tmp_path / 'out')!r}]\n"
        "sys.exit(upcycled_moe_cli.upcycle_moe())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "atexit ran" in proc.stdout and "module teardown" not in proc.stdout, proc.stdout


def test_gguf_header_is_parsed_once_while_transformers_loads_it(tmp_path):
    """transformers opens a GGUF file three times (config, weights, tokenizer) and rebuilds gguf's tensor-name table
    per module; inside gguf_parsed_once the same read-only reader and table are handed back, and gguf is as it was
    afterwards. (The dequantised SmolLM2 weights and tokenizer loaded this way are bit-identical to a plain load:
    checked by hand, 2026-12-02; the demo's perplexity check reads them too.)"""
    import gguf
    import numpy as np

    from upcycled_moe.conversion.sources import gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and gguf.GGUFReader(path, "r+") is not first
        assert first.tensors[0].name == "token_embd.weight"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)
    assert gguf.GGUFReader(path) is not first
