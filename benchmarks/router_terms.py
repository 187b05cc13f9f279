"""Router aux loss + z-loss over all sparse layers, forward + backward: one batched pass (what the model does) vs one
pass per layer (what it did before). Counts the aten operators dispatched (each one is at least one kernel launch on
a GPU, so this is host work) and times both.

    python benchmarks/router_terms.py                      # 16 layers x 16384 tokens x 8 experts, CPU
    python benchmarks/router_terms.py --device cuda --layers 30 --tokens 32768
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import median_ms  # noqa: E402  (benchmarks/timing.py)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> int:
    from upcycled_moe import UpcycledMoeConfig
    from upcycled_moe.modeling_upcycled_moe import load_balancing_loss, router_z_loss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    config = UpcycledMoeConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=args.layers,
                               num_attention_heads=4, num_experts=args.experts, num_experts_per_tok=args.top_k)
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(args.tokens, args.experts, generator=g).to(device) for _ in range(args.layers)]

    def batched(logits):
        return load_balancing_loss(logits, config) + router_z_loss(logits)

    def per_layer(logits):
        aux = torch.stack([load_balancing_loss([x], config) for x in logits]).mean()
        z = torch.stack([router_z_loss([x]) for x in logits]).mean()
        return aux + z

    results = {}
    for name, fn in (("one pass per layer", per_layer), ("batched (the model's)", batched)):
        def step():
            logits = [x.clone().requires_grad_(True) for x in base]
            loss = fn(logits)
            loss.backward()
            return loss

        value = step().item()
        counter = CountOps()
        with counter:
            step()
        copies = args.layers  # the clones that make fresh leaves, not part of either computation
        ms = median_ms(step, device, args.reps)
        results[name] = value
        print(f"{name:22s} aten operators fwd+bwd {counter.count - copies:5d}   median {ms:8.2f} ms   "
              f"aux + z = {value:.6f}", flush=True)
    a, b = results.values()
    assert abs(a - b) <= 1e-5 * abs(a), "the two forms disagree"
    return 0


if __name__ == "__main__":
    sys.exit(main())
