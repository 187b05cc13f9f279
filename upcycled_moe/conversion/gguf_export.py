"""UpcycledMoe → one GGUF file for llama.cpp / Ollama / LM Studio, through llama.cpp's own converter.

The model is first exported to a stock Mixtral or Qwen3-MoE folder (export.py) in a staging folder next to the
output, then `convert_hf_to_gguf.py` from a llama.cpp source tree turns that folder into GGUF. Writing GGUF here
would be a second implementation of llama.cpp's tensor and tokenizer mapping; its converter is the one llama.cpp
tests against its own graphs.

llama.cpp's graphs are narrower than the transformers classes of the same name (vendor/llama.cpp/src/models/ in
llama-cpp-python 0.3.36): Mixtral (its `llama` graph) and Qwen3-MoE always renormalise the top-k router weights,
whatever norm_topk_prob says; Qwen2-MoE never does and always has a shared expert, so our zero-width shared
expert has no GGUF form; the llama graph has no sliding window. Models those graphs would compute differently are
refused with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import UpcycleError
from .writer import check_parent_writable

CONVERTER = "convert_hf_to_gguf.py"
ENV_VAR = "UPCYCLED_MOE_LLAMA_CPP"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
VIA = ("mixtral", "qwen3_moe")  # the stock exports whose llama.cpp graphs are checked (tests/test_llamacpp.py)
GET_IT = (f"pass --llama-cpp DIR (or set {ENV_VAR}) naming a llama.cpp source tree (`git clone "
          "https://github.com/ggml-org/llama.cpp`) or an unpacked llama-cpp-python sdist (`pip download --no-binary "
          ":all: --no-deps llama-cpp-python`; its vendor/llama.cpp is found)")


def find_converter(llama_cpp=None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py under `llama_cpp` (or $UPCYCLED_MOE_LLAMA_CPP): a llama.cpp tree, or the
    llama-cpp-python sdist that vendors one."""
    root = llama_cpp if llama_cpp is not None else os.environ.get(ENV_VAR)
    if not root:
        raise UpcycleError(f"--to gguf needs llama.cpp's {CONVERTER}: {GET_IT}")
    root = Path(root).expanduser()
    for candidate in (root / CONVERTER, root / "vendor" / "llama.cpp" / CONVERTER):
        if candidate.is_file():
            return candidate.resolve()
    raise UpcycleError(f"{root} holds no {CONVERTER} (nor vendor/llama.cpp/{CONVERTER}): {GET_IT}")


def converter_env(script: Path) -> dict:
    """The converter imports `gguf`: the tree's own gguf-py goes first, matching the script's version."""
    env = dict(os.environ)
    gguf_py = script.parent / "gguf-py"
    if gguf_py.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(gguf_py), env.get("PYTHONPATH"))))
    return env


def check_converter_imports(script: Path) -> None:
    """Its requirements (requirements/requirements-convert_hf_to_gguf.txt) beyond ours, checked before any export."""
    probe = "import gguf, sentencepiece"
    res = subprocess.run([sys.executable, "-c", probe], env=converter_env(script), capture_output=True, text=True)
    if res.returncode != 0:
        missing = (res.stderr.strip().splitlines() or ["an import failed"])[-1]
        raise UpcycleError(f"llama.cpp's converter cannot run in this Python ({missing}): pip install sentencepiece "
                           f"(and gguf, unless {script.parent / 'gguf-py'} exists)")


def llama_cpp_limits(config) -> list[str]:
    """What llama.cpp's Mixtral / Qwen3-MoE graphs compute differently from this model (empty: nothing)."""
    reasons = []
    if not (config.router_type == "topk_softmax" or config.norm_topk_prob):
        reasons.append("llama.cpp's mixtral and qwen3moe graphs always renormalise the top-k router weights, this "
                       "model does not: convert with --router topk_softmax")
    if "sliding_attention" in config.layer_types:
        reasons.append("sliding-window attention (llama.cpp's llama graph attends to the whole context)")
    if "dense" in (config.mlp_layer_types or []):
        reasons.append("dense MLP layers between the MoE layers (llama.cpp's mixtral and qwen3moe graphs require a "
                       "router in every layer): convert with --moe-layers all")
    if getattr(config, "attention_out_bias", False):
        reasons.append("an o_proj bias (llama.cpp's graphs have none, so the GGUF would not load)")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        reasons.append(f"rope_type {rope_type!r} (only the default RoPE is checked through llama.cpp's converter)")
    return reasons


def gguf_via(config) -> str:
    """The stock export llama.cpp's converter gets: Mixtral where it expresses the model, else Qwen3-MoE."""
    from .export import inexpressible

    limits = llama_cpp_limits(config)
    if limits:
        raise UpcycleError("this model cannot be exported to GGUF exactly: " + "; ".join(limits))
    why = {target: inexpressible(config, target) for target in VIA}
    for target in VIA:
        if not why[target]:
            return target
    raise UpcycleError("this model cannot be exported to GGUF exactly: " +
                       "; ".join(f"as {t}: {', '.join(r)}" for t, r in why.items()))


def check_gguf_output(output, overwrite: bool, source_folder: Path) -> Path:
    """A .gguf file path the user named: not a folder, not inside the source, replaced only with --overwrite."""
    text = os.fspath(output) if isinstance(output, (str, os.PathLike)) else ""
    if not text.strip():
        raise UpcycleError(f"the output path is empty ({output!r}): name the .gguf file to write")
    named = Path(text).expanduser()
    if named.suffix != ".gguf":
        raise UpcycleError(f"output {text!r} must be a file name ending in .gguf (e.g. runs/model-f16.gguf)")
    if named.is_symlink():
        raise UpcycleError(f"output {text!r} is a symbolic link: name the real file, or remove the link")
    out = named.resolve()
    if out.is_dir():
        raise UpcycleError(f"output {out} is a folder: name the .gguf file to write")
    if out.exists() and not overwrite:
        raise UpcycleError(f"output {out} exists: pass --overwrite to replace it")
    if out.is_relative_to(source_folder):
        raise UpcycleError(f"output {out} is inside the source folder {source_folder}: choose a file outside it")
    check_parent_writable(out)
    return out


def export_gguf(moe, output, *, llama_cpp=None, outtype: str = "f16", overwrite: bool = False,
                quiet: bool = True) -> Path:
    """Write `moe` (an UpcycledMoe folder) as the GGUF file `output` with llama.cpp's converter. Every check runs
    before anything is written; the staging folder (stock export, partial GGUF) is removed whatever happens."""
    from .export import MoeCheckpoint, export

    if outtype not in OUTTYPES:
        raise UpcycleError(f"unknown GGUF type {outtype!r}; choose one of {list(OUTTYPES)}")
    script = find_converter(llama_cpp)
    checkpoint = MoeCheckpoint(moe)
    via = gguf_via(checkpoint.config)
    out = check_gguf_output(output, overwrite, checkpoint.folder)
    check_converter_imports(script)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # named like the source: the converter takes general.name from the folder's name
        stock = export(checkpoint.folder, staging / checkpoint.folder.name, via)
        partial = staging / out.name
        cmd = [sys.executable, str(script), str(stock), "--outfile", str(partial), "--outtype", outtype]
        if not quiet:
            print(f"converting the {via} export with {script}")
        res = subprocess.run(cmd, env=converter_env(script), capture_output=True, text=True)
        if res.returncode != 0 or not partial.is_file():
            last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
            raise UpcycleError(f"llama.cpp's {CONVERTER} failed on the {via} export: {last}")
        os.replace(partial, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"wrote {out} (GGUF {outtype} via {via}, llama.cpp's {script.name})")
    return out
