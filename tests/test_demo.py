"""The demo's own checks (upcycled_moe/demo.py): they pass on the real upcycled SmolLM2 and catch each way a run can
be wrong, including the failure transformers 5.24 caused (a dropped KV cache: "Python-------------------")."""

import pytest
from transformers import AutoTokenizer

from upcycled_moe.conversion import upcycle_in_memory
from upcycled_moe.demo import check_results, generate_both_ways

PROMPT = "What is a Python list comprehension?"
GOOD_VERIFY = {"greedy_match": True, "cache_consistent": True, "ppl_ratio": 1.0006}
GOOD_SUMMARY = {"ppl_before": 25.08, "ppl_after": 23.93}
GOOD_ANSWER = "A Python list comprehension is a concise way to create a new list."


def test_check_results_accepts_a_good_run():
    assert check_results(GOOD_VERIFY, GOOD_SUMMARY, [1, 2, 3], [1, 2, 3], GOOD_ANSWER) == []


@pytest.mark.parametrize("change, expected", [
    (dict(verify={"greedy_match": False}), "differs from the dense model"),
    (dict(verify={"cache_consistent": False}), "with and without its KV cache"),
    (dict(verify={"ppl_ratio": 1.2}), "perplexity is"),
    (dict(verify={"ppl_ratio": float("nan")}), "perplexity is"),
    (dict(summary={"ppl_after": 25.5}), "did not lower"),
    (dict(summary={"ppl_after": float("nan")}), "did not lower"),
    (dict(uncached=[1, 2, 4]), "after training, greedy generation with the KV cache"),
    (dict(answer="Python------------------------"), "not a sensible one"),
    (dict(answer="Sure."), "not a sensible one"),
    (dict(answer="It is a way to write loops in one line of code."), "not a sensible one"),
])
def test_check_results_reports_each_problem(change, expected):
    verified = {**GOOD_VERIFY, **change.get("verify", {})}
    summary = {**GOOD_SUMMARY, **change.get("summary", {})}
    problems = check_results(verified, summary, [1, 2, 3], change.get("uncached", [1, 2, 3]),
                             change.get("answer", GOOD_ANSWER))
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.slow
def test_demo_checks_on_the_real_upcycled_smollm2(smollm2_dir, monkeypatch):
    """Before training the upcycled SmolLM2 answers sensibly and identically with and without the cache; with the
    cache dropped, the same checks fail."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    moe = upcycle_in_memory(smollm2_dir, num_experts=4, top_k=2, router="topk_softmax").eval()
    cached, uncached = generate_both_ways(moe, tokenizer, PROMPT, max_new_tokens=24)
    answer = tokenizer.decode(cached, skip_special_tokens=True)
    assert check_results(GOOD_VERIFY, GOOD_SUMMARY, cached, uncached, answer) == [], answer

    forward = moe.model.forward  # the model as transformers 5.24 saw it before the fix: the cache never arrives

    def forward_dropping_the_cache(*args, cache=None, past_key_values=None, **kwargs):
        return forward(*args, **kwargs)

    monkeypatch.setattr(moe.model, "forward", forward_dropping_the_cache)
    cached, uncached = generate_both_ways(moe, tokenizer, PROMPT, max_new_tokens=24)
    problems = check_results(GOOD_VERIFY, GOOD_SUMMARY, cached, uncached, tokenizer.decode(cached))
    assert any("with the KV cache differs" in p for p in problems), problems
