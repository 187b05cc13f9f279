"""Branch-Train-MiX on real weights: two fine-tunes of one dense model, merged into an MoE with prompt-initialised
routers (issue 13).

    python -m experiments.btx [--out runs/experiments/btx] [--steps 20] [--threads 1] ...

1. Branch + train: two LoRA fine-tunes of the dense model on its MLP projections only (gate/up/down), so attention,
   norms and embeddings stay the base's exactly, merged back (`merge_and_unload`) and saved as dense folders: one on
   Python source (the standard library's .py files), one on English prose (`pydoc_data.topics`). The held-out
   split is by file / by topic (a hash of its name), so no held-out text was trained on. Each fine-tune is cached
   under OUT/finetunes/ by a fingerprint of its settings: rerunning the analysis does not retrain.
2. MiX: `upcycle-moe convert --config` (the command users run) builds the MoE from a YAML file: expert 0 from the
   code fine-tune, expert 1 from the prose one; `gate_mode: hidden` with positive prompts from each domain's
   training split and the other domain's as negatives; and `gate_mode: random` for comparison.
3. Measure on the held-out blocks: the perplexity of every model on each domain, and per MoE layer the share of
   each domain's tokens whose first choice is its own expert (plotted: OUT/routing_shares.png).

Everything is written to OUT/results.json (numbers, settings, versions, device, wall times).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # upcycled_moe importable from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

CACHE = Path("~/.cache/upcycled_moe_tests").expanduser()
DEFAULT_DENSE = CACHE / "smollm2-135m-instruct-dense"
DOMAINS = ("code", "prose")
LORA_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # the MLP only: the base's attention stays exact
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MIN_CHARS = 500  # shorter files are mostly imports


# ---------------------------------------------------------------------------------------------------- data


def _held_out(name: str, fraction: float) -> bool:
    """A document's split is a function of its name only (no held-out file shares a line with training)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def documents(domain: str, code_root: str | None = None) -> dict[str, str]:
    """name -> text: Python files under `code_root` (the standard library; tests and installed packages left out,
    and files of 500 characters or fewer, mostly imports) or pydoc's topics."""
    if domain == "prose":
        from pydoc_data.topics import topics

        return {key: topics[key] for key in sorted(topics)}
    root = Path(code_root or sysconfig.get_paths()["stdlib"])
    out = {}
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS]
        for f in files:
            if f.endswith(".py"):
                path = Path(folder) / f
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if len(text) > MIN_CHARS:
                    out[path.relative_to(root).as_posix()] = text
    return dict(sorted(out.items()))


def split_blocks(tokenizer, docs: dict[str, str], seq: int, n_train: int, n_eval: int, held_out: float,
                 seed: int) -> dict[str, list[torch.Tensor]]:
    """Packed blocks of `seq` tokens (documents joined with EOS) from each split, documents in a seeded order."""
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    want = {"train": n_train, "eval": n_eval}
    streams: dict[str, list[int]] = {"train": [], "eval": []}
    for name in names:
        part = "eval" if _held_out(name, held_out) else "train"
        if len(streams[part]) >= want[part] * seq:
            if all(len(streams[p]) >= want[p] * seq for p in want):
                break
            continue
        streams[part] += tokenizer(docs[name], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    out = {}
    for part, ids in streams.items():
        if len(ids) < want[part] * seq:
            raise SystemExit(f"error: the {part} split has {len(ids)} tokens, fewer than the {want[part]} blocks of "
                             f"{seq} asked for: lower --eval-blocks / --steps or --seq")
        out[part] = [torch.tensor(ids[i * seq:(i + 1) * seq]) for i in range(want[part])]
    return out


# ---------------------------------------------------------------------------------------------------- branch + train


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def finetune(dense: Path, tokenizer, blocks: list[torch.Tensor], out: Path, args, domain: str) -> dict:
    """LoRA on the MLP projections, merged back and saved as a dense folder; cached by its settings."""
    settings = {"dense": str(dense), "domain": domain, "steps": args.steps, "batch": args.batch, "seq": args.seq,
                "lr": args.lr, "rank": args.rank, "alpha": 2 * args.rank, "seed": args.seed,
                "data": hashlib.sha256(torch.stack(blocks).numpy().tobytes()).hexdigest()[:16]}
    folder = out / f"{domain}-{_fingerprint(settings)}"
    record_file = folder / "finetune.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        record["reused"] = True
        return record
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS))
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed)).tolist()
    losses, start = [], time.perf_counter()
    for s in range(args.steps):
        batch = torch.stack([blocks[order[(s * args.batch + i) % len(order)]] for i in range(args.batch)])
        lr = args.lr * min(1.0, (s + 1) / max(1, args.steps // 10))  # a short warm-up, then constant
        for group in optim.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        _say(f"  {domain} step {s + 1}/{args.steps}: loss {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s)")
    wall = time.perf_counter() - start
    merged = model.merge_and_unload()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"domain": domain, "folder": folder.name, "settings": settings, "train_losses": losses,
              "train_wall_s": round(wall, 1), "s_per_step": round(wall / max(1, args.steps), 2),
              "tokens": args.steps * args.batch * args.seq}
    (tmp / "finetune.json").write_text(json.dumps(record, indent=1))
    tmp.rename(folder)
    record["reused"] = False
    return record


# ---------------------------------------------------------------------------------------------------- MiX


def build_moe(name: str, out: Path, base: Path, experts: dict[str, Path], prompts: dict[str, list[str]],
              gate_mode: str, top_k: int) -> tuple[Path, float]:
    """The MoE through `upcycle-moe convert --config` (the users' path); returns its folder and the wall time."""
    import yaml

    from upcycled_moe.cli import main

    entries = []
    for domain in DOMAINS:
        entry = {"source_model": str(experts[domain])}
        if gate_mode in ("hidden", "cheap_embed"):
            other = next(d for d in DOMAINS if d != domain)
            entry.update(positive_prompts=prompts[domain], negative_prompts=prompts[other])
        entries.append(entry)
    config = {"base_model": str(base), "gate_mode": gate_mode, "experts_per_token": top_k, "dtype": "float32",
              "experts": entries}
    cfg = out / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    folder = out / "moe" / name
    folder.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    code = main(["convert", "--config", str(cfg), str(folder), "--quiet", "--overwrite"])
    if code != 0:
        raise SystemExit(f"error: upcycle-moe convert --config {cfg} failed (exit {code})")
    return folder, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- measure


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    if json.loads((folder / "config.json").read_text()).get("model_type") == "upcycled_moe":
        from upcycled_moe.modeling_upcycled_moe import UpcycledMoeForCausalLM

        return UpcycledMoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def evaluate(folder: Path, blocks: dict[str, list[torch.Tensor]], batch: int) -> dict:
    """Per domain: perplexity (exp of the mean next-token loss over every held-out token) and, for an MoE, per
    layer the share of the domain's tokens whose first-choice expert is each expert."""
    model = _load(folder)
    picks: dict[int, list[torch.Tensor]] = {}
    hooks = []
    if getattr(model.config, "num_experts", None):
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                picks[i] = []
                hooks.append(gate.register_forward_hook(lambda m, a, out, i=i: picks[i].append(out[0].argmax(-1))))
    result = {}
    try:
        for domain, bs in blocks.items():
            for p in picks.values():
                p.clear()
            total, count = 0.0, 0
            for j in range(0, len(bs), batch):
                ids = torch.stack(bs[j:j + batch])
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                n = ids.shape[0] * (ids.shape[1] - 1)
                total, count = total + loss.item() * n, count + n
            entry = {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}
            if picks:
                n_exp = model.config.num_experts
                entry["top1_share"] = {str(i): torch.bincount(torch.cat(p).flatten(), minlength=n_exp).float()
                                       .div(torch.cat(p).numel()).tolist() for i, p in picks.items()}
            result[domain] = entry
    finally:
        for h in hooks:
            h.remove()
    del model
    return result


def own_expert_share(entry: dict, domain: str) -> list[float]:
    """Per layer, the share of the domain's tokens whose first choice is its own expert (expert index = domain's)."""
    own = DOMAINS.index(domain)
    return [shares[own] for _, shares in sorted(entry["top1_share"].items(), key=lambda kv: int(kv[0]))]


def plot_shares(results: dict, moe_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(moe_names), figsize=(5 * len(moe_names), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], moe_names):
        for domain in DOMAINS:
            shares = own_expert_share(results[name][domain], domain)
            ax.plot(range(len(shares)), shares, marker="o", ms=3, label=f"{domain} tokens -> {domain} expert")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(title=name, xlabel="layer", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of held-out tokens (top-1 choice)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- the run


def _say(message: str) -> None:
    print(message, flush=True)


def prepare(args) -> tuple[object, dict, dict]:
    """Each domain's train / held-out blocks, and its prompts: the first tokens of training blocks (in-domain
    text, never held-out text)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(args.tokenizer).expanduser())
    n_train = max(args.steps * args.batch, args.prompts)
    data = {d: split_blocks(tokenizer, documents(d, args.code_root), args.seq, n_train, args.eval_blocks,
                            args.held_out, args.seed) for d in DOMAINS}
    prompts = {d: [tokenizer.decode(b[:args.prompt_tokens]) for b in data[d]["train"][-args.prompts:]]
               for d in DOMAINS}
    return tokenizer, data, prompts


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = Path(args.dense).expanduser()
    tokenizer, data, prompts = prepare(args)
    held_out = {d: data[d]["eval"] for d in DOMAINS}
    finetunes, experts = {}, {}
    cache = Path(args.finetunes) if args.finetunes else out / "finetunes"
    for domain in DOMAINS:
        _say(f"fine-tuning on {domain}: {args.steps} steps of {args.batch} x {args.seq} tokens")
        finetunes[domain] = finetune(dense, tokenizer, data[domain]["train"], cache, args, domain)
        experts[domain] = cache / finetunes[domain]["folder"]
    models = {"base": dense, "code-FT": experts["code"], "prose-FT": experts["prose"]}
    moe_names, conversions = [], {}
    for gate_mode, top_k in [(g, int(k)) for g in args.gate_modes.split(",") for k in args.top_k.split(",")]:
        name = f"MoE({gate_mode}, top-{top_k})"
        _say(f"building {name}")
        folder, wall = build_moe(f"{gate_mode}-top{top_k}", out, dense, experts, prompts, gate_mode, top_k)
        models[name], conversions[name] = folder, round(wall, 1)
        moe_names.append(name)
    results = {}
    for name, folder in models.items():
        _say(f"evaluating {name}")
        t = time.perf_counter()
        results[name] = evaluate(folder, held_out, args.eval_batch)
        results[name]["eval_wall_s"] = round(time.perf_counter() - t, 1)
        _say("  " + ", ".join(f"{d} ppl {results[name][d]['perplexity']:.3f}" for d in DOMAINS))
    plot = out / "routing_shares.png"
    plot_shares(results, moe_names, plot)
    best_source = {d: min(results[n][d]["perplexity"] for n in ("code-FT", "prose-FT")) for d in DOMAINS}
    summary = {name: {
        **{f"{d}_ppl": round(results[name][d]["perplexity"], 4) for d in DOMAINS},
        **({f"{d}_own_expert_share": [round(s, 3) for s in own_expert_share(results[name][d], d)] for d in DOMAINS}
           if name in moe_names else {}),
        **({"ppl_at_most_better_source": {d: results[name][d]["perplexity"] <= best_source[d] for d in DOMAINS}}
           if name in moe_names else {}),
    } for name in models}
    if not args.keep_moe:
        shutil.rmtree(out / "moe", ignore_errors=True)  # ~0.9 GB each in fp32; rebuilt in a minute from the cache
    import peft
    import transformers

    document = {
        "experiment": "btx", "summary": summary, "details": results, "finetunes": finetunes,
        "conversion_wall_s": conversions, "prompts": prompts, "plot": plot.name,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "held_out_tokens_per_domain": args.eval_blocks * (args.seq - 1),
        "env": {"device": args.device_name, "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()},
        "wall_clock_s": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(document, indent=1))
    _say(f"wrote {out / 'results.json'} and {plot} in {document['wall_clock_s']:.0f} s")
    return document


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.btx", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/experiments/btx", help="results, plot and the cached fine-tunes")
    p.add_argument("--dense", default=str(DEFAULT_DENSE), help="the dense model folder both fine-tunes start from")
    p.add_argument("--tokenizer", default=str(CACHE / "smollm2-tokenizer"), help="its tokenizer folder")
    p.add_argument("--finetunes", default=None, help="where the fine-tunes are cached (default OUT/finetunes)")
    p.add_argument("--code-root", default=None, help="the Python files of the code domain (default: the stdlib)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of files / topics held out")
    p.add_argument("--eval-blocks", type=int, default=12, help="held-out blocks of --seq tokens per domain")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--prompts", type=int, default=12, help="positive prompts per expert (training blocks)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gate-modes", default="hidden,random")
    p.add_argument("--top-k", default="1,2")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device-name", default=f"{os.cpu_count()}-core CPU")
    p.add_argument("--keep-moe", action="store_true", help="keep the MoE folders under OUT/moe")
    return p


def main(argv=None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
