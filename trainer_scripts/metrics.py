"""Training metrics: expert load / router entropy / dropped slots (from the model's ``routing_statistics``), FLOPs
and MFU counted on ACTIVE parameters, tokens/s, logging to Accelerate trackers and a JSON-lines file, and the final
PNG plots (loss curves, per-layer x per-expert load heatmap).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

# Dense bf16 peak of known accelerators, TFLOP/s (no 2:4 sparsity figures).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "A10G": 125.0, "A10": 125.0,
               "L40S": 362.0, "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


# ------------------------------------------------------------------------------------------------- FLOPs, MFU
def parameter_counts(model) -> dict[str, int]:
    """total / active / routed-expert / embedding parameter counts; active is the model's own definition
    (``num_active_parameters``: routed experts at top_k / num_experts, the embedding lookup excluded)."""
    total = expert = embed = 0
    for name, p in model.named_parameters():  # tied parameters appear once
        n = getattr(p, "ds_numel", p.numel())
        total += n
        if ".mlp.experts." in name:
            expert += n
        elif "embed_tokens" in name:
            embed += n
    return {"total": total, "active": model.num_active_parameters(), "routed_experts": expert, "embedding": embed}


def flops_per_token(model, seq_len: int, active_params: int | None = None) -> float:
    """Training FLOPs per token: 6 x active parameters + causal attention (6 x layers x seq x heads x head_dim)."""
    config = model.config
    if active_params is None:
        active_params = parameter_counts(model)["active"]
    attn = 0.0
    for kind in config.layer_types:
        span = min(seq_len, config.sliding_window) if kind == "sliding_attention" and config.sliding_window else seq_len
        attn += 6 * span * config.num_attention_heads * config.head_dim
    return 6.0 * active_params + attn


# --------------------------------------------------------------------------------------------- routing stats
class RoutingMeter:
    """Sums the model's ``routing_statistics`` over micro-batches; ``reduce`` averages over steps and processes."""

    def __init__(self, config, sparse_layers: list[int]):
        self.config, self.layers = config, sparse_layers
        self.reset()

    def reset(self):
        self.sums, self.count = None, 0

    @torch.no_grad()
    def update(self, router_logits, attention_mask=None):
        from upcycled_moe.modeling_upcycled_moe import routing_statistics

        if not router_logits:
            return
        stats = routing_statistics(router_logits, self.config, attention_mask)
        stats = {k: v.detach().float() for k, v in stats.items()}
        if self.sums is None:
            self.sums = {k: torch.zeros_like(v) for k, v in stats.items()}
        for k, v in stats.items():
            self.sums[k] += v
        self.count += 1

    def reduce(self, accelerator) -> dict[str, torch.Tensor] | None:
        """Means over the micro-batches since the last reset, averaged over processes (all processes call this)."""
        if self.sums is None:
            return None
        keys = sorted(self.sums)
        packed = torch.cat([self.sums[k].reshape(-1) for k in keys] + [torch.tensor([float(self.count)], device=self.sums[keys[0]].device)])
        packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum")
        total = packed[-1].item()
        out, i = {}, 0
        for k in keys:
            n = self.sums[k].numel()
            out[k] = (packed[i : i + n] / max(total, 1.0)).reshape(self.sums[k].shape).cpu()
            i += n
        self.reset()
        return out


def routing_scalars(stats: dict[str, torch.Tensor], sparse_layers: list[int], per_expert: bool) -> dict[str, float]:
    out = {}
    for row, layer in enumerate(sparse_layers):
        out[f"router/layer_{layer}/load_max_over_mean"] = stats["imbalance"][row].item()
        out[f"router/layer_{layer}/entropy"] = stats["router_entropy"][row].item()
        out[f"router/layer_{layer}/dropped_fraction"] = stats["dropped_fraction"][row].item()
        if per_expert:
            for e, v in enumerate(stats["expert_load"][row].tolist()):
                out[f"expert_load/layer_{layer}/expert_{e}"] = v
    out["router/mean_load_max_over_mean"] = stats["imbalance"].mean().item()
    out["router/mean_entropy"] = stats["router_entropy"].mean().item()
    out["router/mean_dropped_fraction"] = stats["dropped_fraction"].mean().item()
    return out


# --------------------------------------------------------------------------------------------------- logging
class Throughput:
    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int):
        self.tokens += tokens

    def rate(self) -> float:
        """Tokens per second since the last call (resets)."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate


class MetricsLog:
    """Main process: ``metrics.jsonl`` (every record, appended across resumes) + Accelerate trackers (scalars)."""

    def __init__(self, accelerator, output_dir: str):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")

    def log(self, record: dict, step: int, lists: dict | None = None):
        if not self.accelerator.is_main_process:
            return
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        self.accelerator.log(scalars, step=step)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **record, **(lists or {})}) + "\n")

    def truncate_after(self, step: int):
        """On resume: drop records newer than the checkpoint (they are recomputed identically)."""
        if self.accelerator.is_main_process:
            truncate_jsonl(self.path, step)


def truncate_jsonl(path: str, step: int) -> None:
    """Keep the records of ``path`` up to ``step`` (atomically); no-op when the file does not exist."""
    if not os.path.exists(path):
        return
    keep = [rec for rec in read_jsonl(path) if rec.get("step", 0) <= step]
    with open(path + ".part", "w", encoding="utf-8") as f:
        for rec in keep:
            f.write(json.dumps(rec) + "\n")
    os.replace(path + ".part", path)


def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
    return out


# ----------------------------------------------------------------------------------------------------- plots
def plot_run(metrics_path: str, out_dir: str, sparse_layers: list[int]) -> list[str]:
    """loss_curves.png and expert_load_heatmap.png (mean of the logged ``expert_load`` over the whole run, resumes
    included); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    written = []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/perplexity" in r]
    if train or evals:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        if train:
            steps = [r["step"] for r in train]
            ax1.plot(steps, [r["loss"] for r in train], label="loss (lm + router terms)")
            ax1.plot(steps, [r["lm_loss"] for r in train], label="lm loss", alpha=0.8)
        if evals:
            ax1.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="held-out lm loss")
        ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
        ax1.set_title("training loss")
        if train:
            ax2.plot(steps, [r["aux_loss"] for r in train], label="load-balancing (aux) loss")
            ax2.set_ylabel("aux loss (1.0 = balanced)")
            ax2b = ax2.twinx()
            ax2b.plot(steps, [r["z_loss"] for r in train], color="tab:red", alpha=0.6, label="z-loss")
            ax2b.set_ylabel("z-loss")
            ax2.legend(loc="upper left"), ax2b.legend(loc="upper right")
        ax2.set_xlabel("step"), ax2.set_title("router losses"), ax2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "loss_curves.png"), dpi=110)
        plt.close(fig)
        written.append("loss_curves.png")
    loads = [r["expert_load"] for r in records if "expert_load" in r]
    if loads:
        load = torch.tensor(loads).mean(0).numpy()
        num_experts = load.shape[1]
        fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * num_experts + 2), max(3, 0.3 * len(sparse_layers) + 1.5)))
        im = ax.imshow(load * num_experts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert"), ax.set_ylabel("layer")
        ax.set_yticks(range(len(sparse_layers)), [str(i) for i in sparse_layers])
        if num_experts <= 32:
            ax.set_xticks(range(num_experts))
        ax.set_title("expert load x num_experts (1 = balanced), run mean", fontsize=10)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "expert_load_heatmap.png"), dpi=110)
        plt.close(fig)
        written.append("expert_load_heatmap.png")
    return written
