"""Host overhead of a training step: a model so small that its arithmetic is negligible, so the step time is the
Python, dispatcher, autograd and kernel-launch work per layer (what bounds the SmolLM2 shape on an H100).
Eager vs each decoder layer torch.compile'd in place (regional, as benchmarks/train_step.py and
`upcycle-moe-pretrain --torch_compile` do it), with the graph breaks dynamo reports.

    python benchmarks/host_overhead.py                          # CPU, 30 layers, inductor
    python benchmarks/host_overhead.py --device cuda --layers 30
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import median_ms  # noqa: E402  (benchmarks/timing.py)


def main(argv=None) -> int:
    import torch._dynamo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure(args)
    finally:  # leave the process as it was (the tests call main() in-process)
        torch.set_num_threads(threads)
        torch._dynamo.reset()


def measure(args) -> int:
    import torch._dynamo

    from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM

    device = torch.device(args.device)
    config = UpcycledMoeConfig(vocab_size=256, hidden_size=32, intermediate_size=32, moe_intermediate_size=32,
                               num_hidden_layers=args.layers, num_attention_heads=2, num_key_value_heads=2,
                               num_experts=4, num_experts_per_tok=2, use_cache=False)  # as in training
    torch.manual_seed(0)
    with torch.device(device):
        model = UpcycledMoeForCausalLM(config).train()
    ids = torch.randint(0, 256, (1, 16), device=device)

    def step():
        out = model(input_ids=ids, labels=ids)  # labels: the router logits are collected for the aux loss
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    eager = median_ms(step, device, args.steps, warmup=5)
    for layer in model.model.layers:
        layer.compile(backend=args.backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step()
    reasons = {k.splitlines()[0][:90]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    compiled = median_ms(step, device, args.steps, warmup=5)
    print(f"{args.layers} layers on {args.device}: step eager {eager:.2f} ms, regional {args.backend} {compiled:.2f} ms "
          f"({compiled / args.layers:.3f} ms per layer)")
    for reason, count in reasons.items():
        print(f"  graph break x{count}: {reason}")
    print(f"graph breaks: {sum(reasons.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
