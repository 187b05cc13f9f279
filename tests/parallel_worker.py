"""One torchrun rank of tests/test_parallel_inference.py: loads each saved UpcycledMoe folder (remote code) sharded
with transformers' own engine, tensor- and expert-parallel, and compares it with the same folder loaded whole in this
process. Rank 0 writes one JSON report; the test asserts on it.

    python -m torch.distributed.run --nproc_per_node 2 tests/parallel_worker.py OUT.json FOLDER=MODE[,MODE] ...

MODE: "tp" (`from_pretrained(..., tp_plan="auto")`, the documented call) or "ep" (expert parallel through
`DistributedConfig`, in the installed release's vocabulary, see `expert_parallel_config`) or "ep_all_to_all"
(5.21+: the tokens exchanged by all-to-all) or "pp" (pipeline parallel).
"""

import dataclasses
import json
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

NEW_TOKENS = 6


def expert_parallel_config(world_size: int) -> DistributedConfig:
    """Experts split over all ranks, in the installed release's vocabulary (feature-detected, not by version).

    5.21+ name it `ep_size`. `ep_size` must divide `fsdp_size * tp_size`, so at inference (no FSDP) it comes with
    `tp_size` equal to it: the dense modules then follow the TP plan and the experts the EP plan. There
    `DistributedConfig(enable_expert_parallel=True)` alone resolves to ep_size=1 and shards nothing, and with
    `tp_size` set it turns into `tp_plan={}`, which `from_pretrained` rejects ("tp_size=2 was requested, but ... has
    no tp_plan"). 5.17-5.20 know only the flag, need `tp_plan="auto"` to start the engine, and then apply the expert
    plan alone (attention and dense FFNs stay whole on every rank)."""
    if "ep_size" in {f.name for f in dataclasses.fields(DistributedConfig)}:
        return DistributedConfig(tp_size=world_size, ep_size=world_size)
    return DistributedConfig(tp_plan="auto", enable_expert_parallel=True)


def all_to_all_config(world_size: int) -> DistributedConfig:
    """Expert parallel with the tokens exchanged by all-to-all (what 5.21+ use in training), at inference: the path
    that needs every expert id to name a real expert, so the capacity's dropped slots must not carry a sentinel."""
    if "ep_implementation" not in {f.name for f in dataclasses.fields(DistributedConfig)}:
        raise SystemExit("this transformers has no `DistributedConfig.ep_implementation` (all-to-all expert parallel)")
    return DistributedConfig(tp_size=world_size, ep_size=world_size, ep_implementation="all_to_all")


def load(folder, mode, world_size):
    kwargs = {"trust_remote_code": True, "dtype": torch.float32}
    if mode == "tp":
        with warnings.catch_warnings():  # the call users type; transformers points them to DistributedConfig
            warnings.simplefilter("ignore", FutureWarning)
            return AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", **kwargs).eval()
    if mode == "ep":
        return AutoModelForCausalLM.from_pretrained(
            folder, distributed_config=expert_parallel_config(world_size), **kwargs
        ).eval()
    if mode == "ep_all_to_all":
        return AutoModelForCausalLM.from_pretrained(
            folder, distributed_config=all_to_all_config(world_size), **kwargs
        ).eval()
    if mode == "pp":  # the decoder layers split evenly over the ranks (base_model_pp_plan)
        return AutoModelForCausalLM.from_pretrained(
            folder, distributed_config=DistributedConfig(pp_size=world_size), **kwargs
        ).eval()
    if mode == "one":
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    raise ValueError(mode)


def parameter_bytes(model):
    """(bytes held on this rank, full bytes of the sharded parameters, their bytes here, names left whole)."""
    here = sharded_full = sharded_here = 0
    whole = []
    for name, p in model.named_parameters():  # a tied weight appears once
        full = p.numel() * p.element_size()
        if isinstance(p, DTensor) and any(not placement.is_replicate() for placement in p.placements):
            local = p.to_local()
            sharded_full += full
            sharded_here += local.numel() * local.element_size()
            here += local.numel() * local.element_size()
        else:
            whole.append(name)
            here += full
    return here, sharded_full, sharded_here, whole


def run(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return logits, tokens


def main(out_path, jobs):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    report = []
    for job in jobs:
        folder, modes = job.rsplit("=", 1)
        reference = load(folder, "one", world_size)
        vocab = reference.config.vocab_size
        torch.manual_seed(0)
        ids = torch.randint(1, vocab, (2, 9))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # a left-padded row: padding must not change the real tokens' results
        ref_logits, ref_tokens = run(reference, ids, mask)
        with torch.no_grad():  # the share of (token, expert) slots the capacity drops: the sentinel path runs
            router_logits = reference(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        statistics = sys.modules[type(reference).__module__].routing_statistics
        dropped = statistics(router_logits, reference.config, mask)["dropped_fraction"].max().item()
        full_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
        del reference
        for mode in modes.split(","):
            start = time.perf_counter()
            model = load(folder, mode, world_size)
            load_s = time.perf_counter() - start
            logits, tokens = run(model, ids, mask)
            here, sharded_full, sharded_here, whole = parameter_bytes(model)
            per_rank = [None] * world_size
            dist.all_gather_object(per_rank, {"bytes": here, "sharded_bytes": sharded_here})
            valid = mask.bool()
            layouts = {}  # how a routed expert weight and a query projection are laid out on this rank
            for name, p in model.named_parameters():
                kind = "experts" if ".mlp.experts." in name else "q_proj" if "self_attn.q_proj.weight" in name else None
                if kind and kind not in layouts:
                    local = p.to_local() if isinstance(p, DTensor) else p
                    split = [dim for dim, (a, b) in enumerate(zip(local.shape, p.shape)) if a != b]
                    layouts[kind] = {"name": name, "split_dims": split, "full_shape": list(p.shape),
                                     "local_shape": list(local.shape)}
            report.append({
                "folder": folder, "mode": mode, "world_size": world_size,
                "transformers": __import__("transformers").__version__,
                "experts_implementation": model.config._experts_implementation,
                "full_bytes": full_bytes, "sharded_full_bytes": sharded_full, "per_rank": per_rank,
                "whole_parameters": whole, "layouts": layouts, "dropped_fraction": dropped,
                "max_abs_dlogit": (logits - ref_logits)[valid].abs().max().item(),
                "max_abs_logit": ref_logits[valid].abs().max().item(),
                "tokens": tokens.tolist(), "reference_tokens": ref_tokens.tolist(),
                "load_s": load_s,
            })
            del model
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
