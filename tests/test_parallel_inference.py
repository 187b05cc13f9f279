"""Serving-scale loading with transformers' own engine: a saved UpcycledMoe folder (remote code) loaded with
`tp_plan="auto"` (tensor parallel) and with `DistributedConfig` expert parallelism, under torchrun with gloo on CPU,
holds about 1/world of its sharded parameters on each rank, and gives the logits and greedy tokens of one process;
pipeline parallel (`DistributedConfig(pp_size=...)`, the config's `base_model_pp_plan`) too.

Covered: gated (SwiGLU) and plain (relu2) experts, a shared expert, a dense layer, q/k norms, q/k/v/o biases, tied
embeddings, Nemotron's LayerNorm1P, a capacity factor that drops slots, and a folder written by `upcycle-moe convert`;
on the installed (newest) transformers and on 5.17, the oldest supported, whose expert-parallel vocabulary differs.
One torchrun launch per release checks every folder and mode (tests/parallel_worker.py does the work)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _tiny
from test_remote_code import transformers_517  # noqa: F401  (the fixture that installs 5.17 into the test cache)

from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM
from upcycled_moe.cli import main as cli_main

WORKER = Path(__file__).with_name("parallel_worker.py")
# every split size divides by 4 (heads, KV heads, widths, vocabulary, experts): the newest release runs on 4 ranks
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=128, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, bos_token_id=1, eos_token_id=2)
FOLDERS = {
    # gated experts + shared expert + a dense layer + q/k norms + biases + tied embeddings; 2 query heads per KV head;
    # 4 layers, so that pipeline parallel gives each of 4 ranks one (a rank without layers crashes in transformers)
    "gated": dict(num_attention_heads=8, num_key_value_heads=4, qk_norm=True, attention_bias=True,
                  num_shared_experts=1, shared_expert_intermediate_size=32, tie_word_embeddings=True,
                  num_hidden_layers=4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    # Nemotron-style plain relu2 experts, LayerNorm1P, dropping capacity
    "plain": dict(mlp_gated=False, hidden_act="relu2", norm_type="layernorm1p", capacity_factor=1.0,
                  router_type="topk_softmax"),
}
# Parameters no plan shards: norms (per channel or per head), the router (replicated: every rank routes alike), and
# the biases added after a rowwise all-reduce.
WHOLE_UNDER_TP = re.compile(r"(norm|layernorm)\.(weight|bias)$|\.mlp\.gate\.weight$|\.(o_proj|down_proj)\.bias$")


def _generic(name: str) -> str:
    """transformers' plan key for a module or parameter name: layer numbers become `*`."""
    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)


@pytest.mark.parametrize("name", [*FOLDERS, "all_dense"])
def test_plans_name_every_module_they_shard_and_nothing_else(name):
    """Each plan rule names a module or parameter this config builds (a renamed module would leave it sharding
    nothing, silently), and every parameter but norms, router and post-reduce biases has a TP rule."""
    overrides = FOLDERS.get(name, {"mlp_layer_types": ["dense", "dense"]})
    with torch.device("meta"):
        model = UpcycledMoeForCausalLM(UpcycledMoeConfig(**{**COMMON, **overrides}))
    params = {_generic(n) for n, _ in model.named_parameters()}
    names = params | {_generic(n) for n, _ in model.named_modules()}
    tp_plan = {**type(model)._tp_plan, **{f"model.{k}": v for k, v in model.config.base_model_tp_plan.items()}}
    ep_plan = {f"model.{key}": style for key, style in model.config.base_model_ep_plan.items()}
    assert not (tp_plan.keys() | ep_plan.keys()) - names
    uncovered = {p for p in params if p not in tp_plan and p.rpartition(".")[0] not in tp_plan}
    assert uncovered and all(WHOLE_UNDER_TP.search(p) for p in uncovered), uncovered
    experts = {p for p in params if ".mlp.experts." in p}
    assert {p for p in experts if p in ep_plan} == experts  # whole experts per rank: every expert weight
    assert bool(ep_plan) == bool(experts)  # no sparse layer: no expert plan (transformers then refuses EP)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    out = {}
    for name, overrides in FOLDERS.items():
        torch.manual_seed(0)
        model = UpcycledMoeForCausalLM(UpcycledMoeConfig(**{**COMMON, **overrides}))
        with torch.no_grad():  # non-trivial norms and biases, so a wrongly sharded one shows in the logits
            for param_name, p in model.named_parameters():
                if "norm" in param_name or param_name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / name)
        out[name] = root / name
    # the conversion CLI's output: conftest's tiny Llama (q/k/v/o biases, llama3 RoPE) with as many KV heads as
    # query heads (its 2 KV heads do not split over 4 ranks), layer 0 kept dense, a shared expert
    _tiny("llama", num_key_value_heads=4).save_pretrained(root / "llama")
    out["converted"] = root / "converted"
    assert cli_main(["convert", str(root / "llama"), str(out["converted"]), "--num-experts", "4",
                     "--top-k", "2", "--moe-layers", "1", "--shared-expert", "--quiet"]) == 0
    return out


def torchrun(nproc: int, jobs: dict[Path, list[str]], tmp_path: Path, pythonpath=None) -> list[dict]:
    """One launch of the worker over every (folder, modes) job; returns rank 0's report."""
    report = tmp_path / f"report-{nproc}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), str(report), *(f"{folder}={','.join(modes)}" for folder, modes in jobs.items())]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return json.loads(report.read_text())


def check(entry: dict, old_ep_vocabulary: bool):
    """One (folder, mode) of the report: sharded 1/world, same logits and tokens as one process."""
    where = f"{Path(entry['folder']).name} {entry['mode']} x{entry['world_size']}, transformers {entry['transformers']}"
    world = entry["world_size"]
    assert entry["tokens"] == entry["reference_tokens"], where
    assert entry["max_abs_dlogit"] <= 1e-5, (where, entry["max_abs_dlogit"])
    assert entry["max_abs_logit"] > 1e-2, where  # logits that can differ at all
    if entry["mode"] == "pp":  # each rank holds its stage's layers only; together, all of them
        held = [rank["bytes"] for rank in entry["per_rank"]]
        assert max(held) < entry["full_bytes"] * 0.75 and sum(held) >= entry["full_bytes"], (where, held)
        return
    sharded, whole = entry["sharded_full_bytes"], entry["full_bytes"] - entry["sharded_full_bytes"]
    for rank, held in enumerate(entry["per_rank"]):
        assert held["sharded_bytes"] * world == sharded, (where, rank, held)
        assert held["bytes"] == whole + sharded // world, (where, rank, held)
    experts, q_proj = entry["layouts"]["experts"], entry["layouts"]["q_proj"]
    if entry["mode"] == "tp":  # every matrix but the router is split, experts along their width
        whole_names = entry["whole_parameters"]
        assert all(WHOLE_UNDER_TP.search(name) for name in whole_names), (where, whole_names)
        assert experts["split_dims"] == [1], (where, experts)
    else:  # whole experts per rank: the expert dimension is split
        assert experts["split_dims"] == [0], (where, experts)
        assert experts["local_shape"][0] * world == experts["full_shape"][0], (where, experts)
        assert not any(".mlp.experts." in name for name in entry["whole_parameters"]), where
        # 5.17-5.20 apply the expert plan alone; 5.21+ apply the TP plan to the rest
        assert q_proj["split_dims"] == ([] if old_ep_vocabulary else [0]), (where, q_proj)
    if Path(entry["folder"]).name == "plain":
        assert entry["dropped_fraction"] > 0, where  # the capacity really dropped slots


def summary(report):
    return [(Path(e["folder"]).name, e["mode"], e["world_size"], e["per_rank"][0]["bytes"], e["full_bytes"],
             e["sharded_full_bytes"], f"{e['max_abs_dlogit']:.1e}") for e in report]


def expect(report, jobs):
    """The report covers exactly the jobs asked for: nothing silently left out."""
    assert sorted((e["folder"], e["mode"]) for e in report) == sorted(
        (str(folder), mode) for folder, modes in jobs.items() for mode in modes)


def test_tp_and_ep_on_4_ranks_match_one_process_newest_transformers(folders, tmp_path, tested_versions):
    """4 ranks: a quarter of every head group and expert width under TP, one whole expert each under EP, one
    decoder layer each under PP."""
    # all-to-all token exchange only where it differs (the capacity's dropped slots), pipeline stages on one folder
    extra = {"plain": ["ep_all_to_all"], "gated": ["pp"]}
    jobs = {folder: ["tp", "ep", *extra.get(name, [])] for name, folder in folders.items()}
    report = torchrun(4, jobs, tmp_path)
    expect(report, jobs)
    for entry in report:
        check(entry, old_ep_vocabulary=False)
    print(summary(report))
    tested_versions["TP/EP parallel inference (4 ranks), installed (newest) transformers"] = report[0]["transformers"]


def test_tp_and_ep_on_2_ranks_match_one_process_transformers_5_17(folders, tmp_path, transformers_517,  # noqa: F811
                                                                  tested_versions):
    jobs = {folder: ["tp", "ep"] + (["pp"] if name == "gated" else []) for name, folder in folders.items()}
    report = torchrun(2, jobs, tmp_path, pythonpath=transformers_517)
    expect(report, jobs)
    assert {e["transformers"] for e in report} == {"5.17.0"}
    for entry in report:
        check(entry, old_ep_vocabulary=True)
    print(summary(report))
    tested_versions["TP/EP parallel inference (2 ranks), oldest supported transformers"] = "5.17.0"
