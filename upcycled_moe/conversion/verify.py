"""Does the MoE start where the dense model was? Measured on real held-out text.

Reports max |Δlogit|, mean KL(dense ‖ moe) per token, both perplexities and whether greedy generations agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UpcycleError, reason
from .sample_text import heldout_text, read_text

CHAT_PROMPT = "What is the capital of France?"


def check_moe_folder(moe) -> dict:
    """The config of an UpcycledMoe folder, every weight file's header checked, before transformers loads it (a
    dense folder would otherwise load with random experts, a damaged file end in a safetensors traceback)."""
    from .sources import SafetensorsFile, read_config_json, weight_files

    path = Path(moe).expanduser()
    if not path.is_dir():
        raise UpcycleError(f"MOE {str(moe)!r}: no such folder (expected a folder written by `upcycle-moe convert`)")
    config = read_config_json(path)
    if config.get("model_type") != "upcycled_moe":
        raise UpcycleError(f"MOE {path} is a {config.get('model_type')!r} model, not an upcycled_moe one: pass the "
                           "folder written by `upcycle-moe convert` (the dense model is the first argument)")
    kind, files = weight_files(path, allow_bin=False)
    if kind != "safetensors":
        raise UpcycleError(f"MOE {path} has no safetensors weights")
    for file in files:
        SafetensorsFile(file)
    return config


def load_moe(moe, dtype=torch.float32):
    """An UpcycledMoe model from a folder (through the installed package) or as given."""
    if isinstance(moe, torch.nn.Module):
        return moe
    check_moe_folder(moe)
    path = Path(moe).expanduser()
    from .. import UpcycledMoeForCausalLM

    try:
        return UpcycledMoeForCausalLM.from_pretrained(path, dtype=dtype).eval()
    except Exception as exc:  # noqa: BLE001 - transformers / safetensors / huggingface_hub validation errors
        raise UpcycleError(f"cannot load the MoE from {path}: {type(exc).__name__}: {reason(exc)}") from None


def check_same_vocabulary(dense_config, moe_config) -> None:
    dense_vocab = getattr(dense_config, "vocab_size", None)
    moe_vocab = moe_config.get("vocab_size") if isinstance(moe_config, dict) else moe_config.vocab_size
    if dense_vocab != moe_vocab:
        raise UpcycleError(f"the dense model's vocabulary ({dense_vocab} tokens) differs from the MoE's ({moe_vocab}):"
                           " the MoE was not upcycled from this dense model")


def load_dense(dense, dtype=torch.float32, allow_bin=False):
    """(model, tokenizer) for any dense SOURCE (folder, GGUF, Hub id) or a model."""
    from .sources import DenseSource, open_source

    if isinstance(dense, torch.nn.Module):
        return dense, None
    source = dense if isinstance(dense, DenseSource) else open_source(dense, allow_bin=allow_bin)
    try:
        model = source.load_dense_model(dtype).eval()
    except UpcycleError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers / safetensors errors on a checkpoint our checks passed
        raise UpcycleError(f"transformers cannot load the dense model: {type(exc).__name__}: {reason(exc)}") from None
    return model, source.load_tokenizer()


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001
        return None


def _prompt_ids(tokenizer, ids: torch.Tensor, prompt: str | None) -> torch.Tensor:
    """A chat prompt when the tokenizer has a template (the model's natural use), else the text's first tokens."""
    if prompt is None and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )
        return out["input_ids"]
    if prompt is not None:
        return tokenizer(prompt, return_tensors="pt").input_ids
    return ids[:, :32]


@torch.no_grad()
def compare_logits(dense, moe, batches) -> dict:
    """max |Δlogit|, mean KL(dense ‖ moe) and both mean NLLs over the batches."""
    max_diff, kl_sum, n_pos, nll_d, nll_m, n_tok = 0.0, 0.0, 0, 0.0, 0.0, 0
    for ids in batches:
        ld = dense(input_ids=ids).logits.float()[0]
        lm = moe(input_ids=ids).logits.float()[0]
        max_diff = max(max_diff, (ld - lm).abs().max().item())
        pd, pm = F.log_softmax(ld, -1), F.log_softmax(lm, -1)
        kl_sum += (pd.exp() * (pd - pm)).sum(-1).clamp_min(0).sum().item()
        n_pos += ld.shape[0]
        target = ids[0, 1:]
        nll_d += F.cross_entropy(ld[:-1], target, reduction="sum").item()
        nll_m += F.cross_entropy(lm[:-1], target, reduction="sum").item()
        n_tok += target.numel()
    return {
        "max_abs_logit_diff": max_diff,
        "mean_kl": kl_sum / n_pos,
        "ppl_dense": math.exp(nll_d / n_tok),
        "ppl_moe": math.exp(nll_m / n_tok),
        "tokens": n_pos,
    }


@torch.no_grad()
def greedy(model, prompt_ids: torch.Tensor, tokens: int, use_cache: bool = True, stop_at_eos: bool = True) -> list[int]:
    """Up to `tokens` greedy tokens through `generate()`, the path users take (its KV-cache handling included),
    ending at EOS as a user's answer does. `stop_at_eos=False` gives exactly `tokens` (EOS suppressed while fewer
    were made): it compares random test models token for token, but past a real model's EOS it compares the
    runners-up of a suppressed token, where bf16 rounding flips near-ties."""
    extra = {} if stop_at_eos else {"min_new_tokens": tokens}
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                         max_new_tokens=tokens, use_cache=use_cache,
                         pad_token_id=model.generation_config.pad_token_id or 0, **extra)
    return out[0, prompt_ids.shape[1]:].tolist()


def verify(dense, moe, *, text: str | None = None, text_path: str | None = None, max_tokens: int = 1024,
           seq_len: int = 512, generate_tokens: int = 30, prompt: str | None = None, tokenizer=None,
           dtype: torch.dtype = torch.float32, allow_bin: bool = False) -> dict:
    """Compare a dense model and its MoE on real held-out text. Both may be paths or loaded models.
    Everything that can be checked without loading a model is checked first."""
    for name, value, minimum in (("max_tokens", max_tokens, 2), ("seq_len", seq_len, 2),
                                 ("generate_tokens", generate_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UpcycleError(f"{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
    if text is None:
        text = read_text(text_path, heldout_text)
    moe_config = moe.config if isinstance(moe, torch.nn.Module) else check_moe_folder(moe)
    from .sources import open_source

    source = None if isinstance(dense, torch.nn.Module) else open_source(dense, allow_bin=allow_bin)
    check_same_vocabulary(dense.config if source is None else source.config, moe_config)
    dense_model, dense_tokenizer = load_dense(dense if source is None else source, dtype)
    moe_model = load_moe(moe, dtype)
    tokenizer = tokenizer or dense_tokenizer
    if tokenizer is None and not isinstance(moe, torch.nn.Module):
        tokenizer = _load_tokenizer(moe)
    if tokenizer is None:
        raise UpcycleError("verify needs a tokenizer (none found with the dense model or the MoE)")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise UpcycleError(f"the verification text{' ' + repr(str(text_path)) if text_path else ''} is too short: "
                           "it needs at least 2 tokens")
    batches = [ids[:, i : i + seq_len] for i in range(0, ids.shape[1], seq_len) if ids[:, i : i + seq_len].shape[1] > 1]
    results = compare_logits(dense_model, moe_model, batches)
    results["ppl_ratio"] = results["ppl_moe"] / results["ppl_dense"]
    prompt_ids = _prompt_ids(tokenizer, ids, prompt)
    gen_d = greedy(dense_model, prompt_ids, generate_tokens)
    gen_m = greedy(moe_model, prompt_ids, generate_tokens)
    gen_m_uncached = greedy(moe_model, prompt_ids, generate_tokens, use_cache=False)
    results.update(
        greedy_match=gen_d == gen_m,
        generated_length=len(gen_d),
        cache_consistent=gen_m == gen_m_uncached,  # a dropped or misused KV cache shows here first
        generated_tokens=generate_tokens,
        prompt=tokenizer.decode(prompt_ids[0], skip_special_tokens=False),
        dense_generation=tokenizer.decode(gen_d, skip_special_tokens=True),
        moe_generation=tokenizer.decode(gen_m, skip_special_tokens=True),
        dtype=str(dtype).replace("torch.", ""),
    )
    return results


def failures(r: dict, require_greedy_match: bool = True, max_logit_diff: float | None = None,
             max_ppl_increase: float | None = None) -> list[str]:
    """Why a verification failed (empty: it passed). A cached generation that differs from the uncached one is
    always a failure (a KV-cache bug); different greedy text is one unless the conversion changes the function on
    purpose (Drop-Upcycling, noise, paper/calibrated/no scaling), which the caller says."""
    failed = []
    if not r["cache_consistent"]:
        failed.append("the MoE's cached generation differs from its uncached one (a KV-cache bug)")
    if require_greedy_match and not r["greedy_match"]:
        failed.append("the MoE's greedy answer differs from the dense model's")
    if max_logit_diff is not None and not r["max_abs_logit_diff"] <= max_logit_diff:
        failed.append(f"max |delta logit| {r['max_abs_logit_diff']:.3g} > {max_logit_diff}")
    if max_ppl_increase is not None and not r["ppl_ratio"] - 1 <= max_ppl_increase:
        failed.append(f"perplexity +{100 * (r['ppl_ratio'] - 1):.2f} % > {100 * max_ppl_increase:.2f} %")
    return failed


def format_report(r: dict) -> str:
    return "\n".join(
        [
            f"tokens compared          {r['tokens']} ({r['dtype']})",
            f"max |delta logit|        {r['max_abs_logit_diff']:.3g}",
            f"mean KL(dense || moe)    {r['mean_kl']:.3g}",
            f"perplexity dense         {r['ppl_dense']:.4f}",
            f"perplexity moe           {r['ppl_moe']:.4f}  ({100 * (r['ppl_ratio'] - 1):+.2f} %)",
            f"greedy answer agrees     {r['greedy_match']}  ({r['generated_length']} tokens, to EOS or "
            f"{r['generated_tokens']})",
            f"moe cached == uncached   {r['cache_consistent']}",
            f"moe generation           {r['moe_generation']!r}",
        ]
    )
