"""Does the MoE start where the dense model was? Measured on real held-out text.

Reports max |Δlogit|, mean KL(dense ‖ moe) per token, both perplexities and whether greedy generations agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UpcycleError
from .sample_text import heldout_text, read_text

CHAT_PROMPT = "What is the capital of France?"


def load_moe(moe, dtype=torch.float32):
    """An UpcycledMoe model from a folder (through the installed package) or as given."""
    if isinstance(moe, torch.nn.Module):
        return moe
    path = Path(moe).expanduser()
    if not (path / "config.json").is_file():
        raise UpcycleError(f"{path} is not an UpcycledMoe folder (no config.json)")
    from .. import UpcycledMoeForCausalLM

    try:
        return UpcycledMoeForCausalLM.from_pretrained(path, dtype=dtype).eval()
    except (OSError, ValueError) as exc:
        raise UpcycleError(f"cannot load the MoE from {path}: {str(exc).splitlines()[0]}") from None


def load_dense(dense, dtype=torch.float32, allow_bin=False):
    """(model, tokenizer) for any dense SOURCE (folder, GGUF, Hub id) or a model."""
    from .sources import open_source

    if isinstance(dense, torch.nn.Module):
        return dense, None
    source = open_source(dense, allow_bin=allow_bin)
    return source.load_dense_model(dtype).eval(), source.load_tokenizer()


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
def greedy(model, prompt_ids: torch.Tensor, tokens: int, use_cache: bool = True) -> list[int]:
    """Exactly `tokens` greedy tokens through `generate()`, the path users take (its KV-cache handling included);
    EOS does not stop it, so the two models are compared token for token."""
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                         max_new_tokens=tokens, min_new_tokens=tokens, use_cache=use_cache,
                         pad_token_id=model.generation_config.pad_token_id or 0)
    return out[0, prompt_ids.shape[1]:].tolist()


def verify(dense, moe, *, text: str | None = None, text_path: str | None = None, max_tokens: int = 1024,
           seq_len: int = 512, generate_tokens: int = 30, prompt: str | None = None, tokenizer=None,
           dtype: torch.dtype = torch.float32, allow_bin: bool = False) -> dict:
    """Compare a dense model and its MoE on real held-out text. Both may be paths or loaded models."""
    dense_model, dense_tokenizer = load_dense(dense, dtype, allow_bin=allow_bin)
    moe_model = load_moe(moe, dtype)
    tokenizer = tokenizer or dense_tokenizer
    if tokenizer is None and not isinstance(moe, torch.nn.Module):
        tokenizer = _load_tokenizer(moe)
    if tokenizer is None:
        raise UpcycleError("verify needs a tokenizer (none found with the dense model or the MoE)")
    if text is None:
        text = read_text(text_path, heldout_text)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise UpcycleError("the verification text is too short")
    batches = [ids[:, i : i + seq_len] for i in range(0, ids.shape[1], seq_len) if ids[:, i : i + seq_len].shape[1] > 1]
    results = compare_logits(dense_model, moe_model, batches)
    results["ppl_ratio"] = results["ppl_moe"] / results["ppl_dense"]
    prompt_ids = _prompt_ids(tokenizer, ids, prompt)
    gen_d = greedy(dense_model, prompt_ids, generate_tokens)
    gen_m = greedy(moe_model, prompt_ids, generate_tokens)
    gen_m_uncached = greedy(moe_model, prompt_ids, generate_tokens, use_cache=False)
    results.update(
        greedy_match=gen_d == gen_m,
        cache_consistent=gen_m == gen_m_uncached,  # a dropped or misused KV cache shows here first
        generated_tokens=generate_tokens,
        prompt=tokenizer.decode(prompt_ids[0], skip_special_tokens=False),
        dense_generation=tokenizer.decode(gen_d, skip_special_tokens=True),
        moe_generation=tokenizer.decode(gen_m, skip_special_tokens=True),
        dtype=str(dtype).replace("torch.", ""),
    )
    return results


def format_report(r: dict) -> str:
    return "\n".join(
        [
            f"tokens compared          {r['tokens']} ({r['dtype']})",
            f"max |delta logit|        {r['max_abs_logit_diff']:.3g}",
            f"mean KL(dense || moe)    {r['mean_kl']:.3g}",
            f"perplexity dense         {r['ppl_dense']:.4f}",
            f"perplexity moe           {r['ppl_moe']:.4f}  ({100 * (r['ppl_ratio'] - 1):+.2f} %)",
            f"greedy {r['generated_tokens']} tokens agree   {r['greedy_match']}",
            f"moe cached == uncached   {r['cache_consistent']}",
            f"moe generation           {r['moe_generation']!r}",
        ]
    )
