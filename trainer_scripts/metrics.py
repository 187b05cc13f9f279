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

# Dense bf16 peak of known accelerators, TFLOP/s: NVIDIA's datasheet figures (half the "with sparsity" ones). The first
# pattern found in the device name wins, so variants come before their family: an H100 PCIe (756) or NVL (835.5)
# is no H100 SXM (989.5), whose name (e.g. "NVIDIA H100 80GB HBM3") carries neither word. The A100's PCIe and SXM
# cards share one peak.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("GH200", 989.5), ("H200 NVL", 835.5), ("H200", 989.5),
    ("H100", 989.5), ("H800 PCIe", 756.0), ("H800", 989.5), ("A100", 312.0), ("A800", 312.0),
    ("A10G", 125.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)


def peak_tflops_of(device_name: str) -> float | None:
    """The dense bf16 peak for a ``torch.cuda.get_device_name`` string; None for a device not in the table."""
    name = device_name.lower()
    for pattern, value in PEAK_TFLOPS:
        if pattern.lower() in name:
            return value
    return None


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


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


def training_flops(model, seq_lens, active_params: int | None = None) -> int:
    """Training FLOPs of sequences of these real lengths: the model's own count (``training_flops``: active
    parameters, attention by attended pairs)."""
    return model.training_flops(seq_lens, active_params)


def flops_per_token(model, seq_len: int, active_params: int | None = None) -> float:
    """Training FLOPs per token of ``seq_len``-token sequences (``training_flops`` of one, per token)."""
    return training_flops(model, [seq_len], active_params) / seq_len


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
    """Tokens per second of training time: the clock runs from creation, stops at ``pause`` (call it before an
    evaluation or a checkpoint) and runs again at ``start`` (call it before every step; a no-op while it runs).
    With a CUDA ``device`` the clock stops only after the queued kernels have finished, so a step's work is not
    billed to whatever follows it."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.tokens, self.elapsed, self._t0 = 0, 0.0, time.perf_counter()

    def start(self):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def pause(self):
        if self._t0 is not None:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.elapsed += time.perf_counter() - self._t0
            self._t0 = None

    def add(self, tokens: int):
        self.tokens += tokens

    def rate(self) -> float:
        """Tokens per second of training time since the last call (resets; a running clock keeps running)."""
        running = self._t0 is not None
        self.pause()
        rate = self.tokens / max(self.elapsed, 1e-9)
        self.tokens, self.elapsed = 0, 0.0
        if running:
            self.start()
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


def loss_curves_figure(records: list[dict]):
    """The loss panels, or None without losses. Tick labels show the values themselves: the router losses move in
    the fourth decimal, and matplotlib's default axis offset (a corner "+4.324") hid them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/perplexity" in r]
    if not (train or evals):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    axes = [ax1, ax2]
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
        axes.append(ax2b)
    ax2.set_xlabel("step"), ax2.set_title("router losses"), ax2.grid(alpha=0.3)
    for ax in axes:
        ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------- plots
def plot_run(metrics_path: str, out_dir: str, sparse_layers: list[int]) -> list[str]:
    """loss_curves.png and expert_load_heatmap.png (mean of the logged ``expert_load`` over the whole run, resumes
    included); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    written = []
    fig = loss_curves_figure(records)
    if fig is not None:
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
