"""LM head + cross-entropy, forward + backward: the model's chunked loss (config.loss_chunk_size) vs full logits.

    python benchmarks/lm_loss.py                         # SmolLM2's head (576 x 49152), 16 x 2048 tokens, on CUDA
    python benchmarks/lm_loss.py --device cpu --tokens 4096 --dtype float32
    python benchmarks/lm_loss.py --hidden 2048 --vocab 32000 --chunks 0 4096 8192 16384

Each variant runs in a fresh process so that its peak memory is its own: max_memory_allocated on CUDA, VmHWM (peak
RSS) minus the RSS before the inputs were made on CPU. "full" is transformers' path (bf16/fp32 logits, upcast to
fp32, cross_entropy); "chunk N" is `chunked_causal_lm_loss`, which never holds more than N x vocab logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
import torch
import torch.nn.functional as F
from timing import median_ms, sync
from upcycled_moe.modeling_upcycled_moe import chunked_causal_lm_loss
a = json.loads(sys.argv[1])
dev, dtype = torch.device(a["device"]), getattr(torch, a["dtype"])
torch.set_num_threads(a["threads"]) if dev.type == "cpu" else None
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
g = torch.Generator(device="cpu").manual_seed(0)
B, T = a["batch"], a["seq"]
h0 = (torch.randn(B, T, a["hidden"], generator=g) * 0.5).to(dev, dtype)
w = (torch.randn(a["vocab"], a["hidden"], generator=g) * a["hidden"] ** -0.5).to(dev, dtype).requires_grad_(True)
labels = torch.randint(0, a["vocab"], (B, T), generator=g).to(dev)
h = h0.clone().requires_grad_(True)
def step():
    if a["chunk"]:
        loss = chunked_causal_lm_loss(h, w, labels, a["chunk"])
    else:  # transformers' ForCausalLMLoss: logits, upcast, shift, cross-entropy
        logits = F.linear(h, w).float()
        shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100)
    loss.backward()
    h.grad = None; w.grad = None
    return loss
loss = step(); sync(dev)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss("VmRSS")
step(); sync(dev)
peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else rss("VmHWM") - base
print(json.dumps({"ms": median_ms(step, dev, a["reps"]), "peak_mib": peak, "loss": loss.item()}))
"""


def measure(**args) -> dict:
    env = dict(os.environ)
    paths = (str(REPO), str(REPO / "benchmarks"), env.get("PYTHONPATH", ""))  # the package, timing.py
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"lm_loss child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=0, help="shorthand: batch 1 x this many tokens")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 8192], help="0 = full logits")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.tokens:
        args.batch, args.seq = 1, args.tokens
    rows = []
    for chunk in args.chunks:
        r = measure(device=args.device, dtype=args.dtype, hidden=args.hidden, vocab=args.vocab, batch=args.batch,
                    seq=args.seq, chunk=chunk, reps=args.reps, threads=args.threads)
        r["chunk"] = chunk
        rows.append(r)
        print(f"{'full logits' if chunk == 0 else f'chunk {chunk}':12s} {r['ms']:9.2f} ms  peak {r['peak_mib']:9.1f} MiB  "
              f"loss {r['loss']:.5f}", flush=True)
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
