"""Supervised fine-tuning of an UpcycledMoe model with the Hugging Face Trainer: full, or LoRA through PEFT.

    upcycle-moe-finetune --model_name_or_path=runs/cpt --train_file=chat.jsonl --output_dir=runs/sft \\
        --use_lora=true --num_train_epochs=1 --per_device_train_batch_size=4
    accelerate launch -m trainer_scripts.finetune --config sft.yaml      # several GPUs: Trainer uses Accelerate

Options: this script's own (``FinetuneArguments`` below) plus every ``transformers.TrainingArguments`` field, from a
YAML file (``--config``) and ``--key=value`` overrides; unknown keys are rejected before anything is loaded.

Data: JSON lines with a chat column (``messages``: a list of {role, content}; rendered with the tokenizer's chat
template) or a text column (``text``). The loss covers every token of a sequence (prompt included); padding is
masked by position, so the end-of-turn token is trained even where it doubles as the pad token.

MoE specifics handled here:
- LoRA: attention via ``target_modules`` (q/k/v/o_proj), routed experts via ``target_parameters``
  (``mlp.experts.gate_up_proj`` / ``down_proj``, PEFT >= 0.17); the router is frozen by default (``train_router``).
- The load-balancing and z-loss terms come from the model; under Trainer the model weights them by the
  micro-batch's share of label tokens (``num_items_in_batch``), so gradient accumulation and the number of ranks do
  not change their effective weight.
- Trainer's FLOP count (``total_flos``) counts ACTIVE parameters (top_k / num_experts of the routed experts) and
  real tokens only (not padding).
- Gradient checkpointing: ``gradient_checkpointing=true`` works on transformers 5.17-5.22 and 5.23+ (where the
  option is called ``activation_checkpointing``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

from .checkpointing import check_output_dir, staged_files
from .config import (
    ConfigError,
    _coerce,
    _strip_optional,
    data_builder,
    expand_data_files,
    non_finite_options,
    one_line,
    parse_overrides,
    read_config_file,
    run_cli,
)


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "an UpcycledMoe folder (e.g. a continued-pretraining output)"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "defaults to the model folder"})
    train_file: str = field(default=None, metadata={"help": "JSON lines: a chat column (messages) or a text column"})
    validation_file: str | None = field(default=None, metadata={"help": "held-out JSON lines (same format)"})
    text_column: str = field(default="text", metadata={"help": "text column (when there is no chat column)"})
    messages_column: str = field(default="messages", metadata={"help": "chat column: list of {role, content}"})
    max_seq_length: int = field(default=1024, metadata={"help": "longer examples are truncated"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "comma-separated modules (attention)"})
    lora_target_experts: bool = field(default=True, metadata={"help": "LoRA on the routed experts' 3D parameters (target_parameters)"})
    train_router: bool = field(default=False, metadata={"help": "train the router (frozen by default, full and LoRA)"})
    merge_lora: bool = field(default=False, metadata={"help": "also save the merged full model to output_dir/merged"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "None: the model's"})
    router_z_loss_coef: float | None = field(default=None, metadata={"help": "None: the model's"})
    experts_implementation: str | None = field(default=None, metadata={"help": "eager, grouped_mm, ... (None: default)"})
    loss_chunk_size: int = field(default=4096, metadata={"help": "training loss from the LM head in chunks of this many tokens, no full logits (0 = full logits)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "allow a non-empty output_dir"})
    base_model_id: str | None = field(default=None, metadata={"help": "Hub id of model_name_or_path, for the model card's base_model (an adapter's card names the model it applies to)"})


def parse_args(argv: list[str] | None = None):
    from transformers import HfArgumentParser, TrainingArguments

    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    config_file, overrides = parse_overrides(argv)
    values: dict = read_config_file(config_file) if config_file else {}
    values.update(overrides)
    # gradient checkpointing: one spelling for transformers 5.17-5.22 (gradient_*) and 5.23+ (activation_*)
    ta_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    new_names = "activation_checkpointing" in ta_fields
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        src, dst = (old, new) if new_names else (new, old)
        if src in values:
            values[dst] = values.pop(src)
    ckpt_key = "activation_checkpointing" if new_names else "gradient_checkpointing"
    if values.get(ckpt_key):
        values.setdefault(ckpt_key + "_kwargs", {"use_reentrant": False})
    values.setdefault("report_to", "none")
    values.setdefault("remove_unused_columns", False)
    known = {f.name for f in dataclasses.fields(FinetuneArguments)} | ta_fields
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}; run with --help for the list")
    import typing

    for cls in (FinetuneArguments, TrainingArguments):  # "1e-3" from YAML / the command line is a number here
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in values and isinstance(values[f.name], (str, float)) and f.name in hints:
                base, _ = _strip_optional(hints[f.name])
                if base in (bool, int, float):  # floats too: YAML's .nan / .inf are rejected here
                    values[f.name] = _coerce(f.name, values[f.name], hints[f.name])
    try:
        ft, ta = parser.parse_dict(values, allow_extra_keys=False)
    except (ValueError, TypeError) as e:  # TrainingArguments' own checks: the whole reason, on one line
        raise ConfigError(f"invalid training arguments: {one_line(e)}") from None
    problems = non_finite_options(ft, ta)
    if not ft.model_name_or_path:
        problems.append("model_name_or_path is required")
    if not ft.train_file:
        problems.append("train_file is required")
    if "output_dir" not in values:
        problems.append("output_dir is required")
    if ft.max_seq_length < 2:
        problems.append("max_seq_length must be >= 2")
    if problems:
        raise ConfigError("; ".join(problems))
    return ft, ta


# ------------------------------------------------------------------------------------------------------ data
def load_examples(ft: FinetuneArguments):
    import datasets

    out = {}
    for split, path in (("train", ft.train_file), ("validation", ft.validation_file)):
        if path is None:
            continue
        files = expand_data_files([path], f"{split}_file")
        builder = data_builder(files, f"{split}_file")
        if builder != "json":
            raise ConfigError(f"{split}_file: {path} must be JSON lines (.jsonl / .json)")
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset("json", data_files=files, split="train")
        except Exception as e:
            raise ConfigError(f"{split}_file: could not read {path}: {str(e).splitlines()[0]}") from None
        finally:
            datasets.enable_progress_bars()
        if len(ds) == 0:
            raise ConfigError(f"{split}_file: {path} holds no examples")
        if ft.messages_column not in ds.column_names and ft.text_column not in ds.column_names:
            raise ConfigError(
                f"{split}_file: {path} has neither a {ft.messages_column!r} (chat) nor a {ft.text_column!r} (text) "
                f"column (columns: {', '.join(ds.column_names)})"
            )
        out[split] = ds
    return out


def tokenize_examples(ds, tokenizer, ft: FinetuneArguments, num_proc=None):
    chat = ft.messages_column in ds.column_names
    if chat and not tokenizer.chat_template:
        raise ConfigError("the data is chat (messages) but the tokenizer has no chat template")

    def fn(batch):
        if chat:
            texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch[ft.messages_column]]
        else:
            texts = [t + (tokenizer.eos_token or "") for t in batch[ft.text_column]]
        enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=ft.max_seq_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": [list(ids) for ids in enc["input_ids"]]}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenising")


def make_collator(tokenizer):
    """Pads a batch and masks the padded label positions (-100). By position, not by token id: the pad token is
    often the EOS / end-of-turn token (SmolLM2: ``<|im_end|>``), and masking it by id would drop every end of turn
    from the loss, so the model would never learn to stop."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")


# ----------------------------------------------------------------------------------------------------- model
def load_model(ft: FinetuneArguments):
    import torch

    from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM

    kwargs = {"experts_implementation": ft.experts_implementation} if ft.experts_implementation else {}
    model = UpcycledMoeForCausalLM.from_pretrained(ft.model_name_or_path, dtype=torch.float32, **kwargs)
    assert isinstance(model.config, UpcycledMoeConfig)
    if ft.router_aux_loss_coef is not None:
        model.config.router_aux_loss_coef = ft.router_aux_loss_coef
    if ft.router_z_loss_coef is not None:
        model.config.router_z_loss_coef = ft.router_z_loss_coef
    model.config.use_cache = False
    model.config.loss_chunk_size = ft.loss_chunk_size
    return model


def router_parameters(model):
    return [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]


def apply_lora(model, ft: FinetuneArguments):
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in ft.lora_target_modules.split(",") if t.strip()]
    params = None
    if ft.lora_target_experts and "sparse" in model.config.mlp_layer_types:
        first = "gate_up_proj" if model.config.mlp_gated else "up_proj"
        params = [f"mlp.experts.{first}", "mlp.experts.down_proj"]
    config = LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=0.0, target_modules=targets,
                        target_parameters=params, task_type="CAUSAL_LM",
                        modules_to_save=["gate"] if ft.train_router else None)
    return get_peft_model(model, config)


def make_trainer_class():
    from transformers import Trainer

    class MoeTrainer(Trainer):
        """Trainer whose FLOP count is the model's (`floating_point_ops`: ACTIVE parameters, each sequence at its real
        length). Trainer's own is 6 x tokens x ALL parameters, padding included, and never asks the model."""

        def floating_point_ops(self, inputs):
            base = self.accelerator.unwrap_model(self.model)
            if hasattr(base, "get_base_model"):  # PEFT
                base = base.get_base_model()
            return base.floating_point_ops(inputs)

    return MoeTrainer


# ------------------------------------------------------------------------------------------------------- run
def run(ft: FinetuneArguments, ta) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    import upcycled_moe  # noqa: F401  (registers the model family)

    # preflight: model config, data, tokenizer, output folder -- before the weights
    if not os.path.isdir(ft.model_name_or_path):
        raise ConfigError(f"model_name_or_path: {ft.model_name_or_path} does not exist (an UpcycledMoe folder)")
    try:
        mc = AutoConfig.from_pretrained(ft.model_name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_name_or_path: cannot read a model config from {ft.model_name_or_path}: "
                          f"{one_line(e)}") from None
    if mc.model_type != "upcycled_moe":
        raise ConfigError(f"{ft.model_name_or_path} is a {mc.model_type} model; convert it first (upcycle-moe convert)")
    if ft.loss_chunk_size < 0:
        raise ConfigError(f"loss_chunk_size must be >= 0 (0 = full logits), got {ft.loss_chunk_size}")
    if ft.max_seq_length > mc.max_position_embeddings:
        raise ConfigError(f"max_seq_length={ft.max_seq_length} is beyond the model's max_position_embeddings={mc.max_position_embeddings}")
    if os.path.isdir(ta.output_dir) and os.listdir(ta.output_dir) and not ft.overwrite_output_dir \
            and not ta.resume_from_checkpoint:
        raise ConfigError(f"output_dir {ta.output_dir} is not empty: use another folder, resume_from_checkpoint, "
                          "or overwrite_output_dir=true")
    check_output_dir(ta.output_dir, [ft.model_name_or_path, ft.tokenizer_name_or_path, ft.train_file,
                                     ft.validation_file], ft.overwrite_output_dir)
    splits = load_examples(ft)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ft.tokenizer_name_or_path or ft.model_name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {ft.tokenizer_name_or_path or ft.model_name_or_path}: "
                          f"{one_line(e)}; set tokenizer_name_or_path") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    with ta.main_process_first(desc="tokenising"):
        tokenized = {k: tokenize_examples(v, tokenizer, ft, ta.dataloader_num_workers or None) for k, v in splits.items()}

    try:
        model = load_model(ft)
    except (OSError, ValueError, RuntimeError) as e:  # a corrupt or truncated weight file, a wrong kernel name
        raise ConfigError(f"model_name_or_path: cannot load the model from {ft.model_name_or_path}: "
                          f"{type(e).__name__}: {one_line(e)}") from None
    except Exception as e:
        if "safetensor" not in type(e).__name__.lower():
            raise
        raise ConfigError(f"model_name_or_path: cannot load the weights of {ft.model_name_or_path}: "
                          f"{type(e).__name__}: {one_line(e)} (a corrupt or truncated file?)") from None
    if not ft.train_router:
        for p in router_parameters(model):
            p.requires_grad_(False)
    if ft.use_lora:
        model = apply_lora(model, ft)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if ta.process_index == 0:
        print(f"[upcycle-moe-finetune] {'LoRA' if ft.use_lora else 'full'} fine-tuning: {trainable / 1e6:.2f}M of "
              f"{total / 1e6:.1f}M parameters trainable; router {'trained' if ft.train_router else 'frozen'}", flush=True)

    collator = make_collator(tokenizer)
    try:
        trainer = make_trainer_class()(model=model, args=ta, train_dataset=tokenized["train"],
                                       eval_dataset=tokenized.get("validation"), data_collator=collator,
                                       processing_class=tokenizer)
    except ValueError as e:  # Trainer's checks of the arguments against the model and data
        raise ConfigError(f"invalid training arguments: {one_line(e)}") from None
    result = trainer.train(resume_from_checkpoint=ta.resume_from_checkpoint)
    with staged_files(ta.output_dir, main=trainer.is_world_process_zero()) as staging:  # renamed into place when whole
        trainer.save_model(staging)
        trainer.accelerator.wait_for_everyone()
    metrics = dict(result.metrics)
    if "validation" in tokenized:
        metrics.update(trainer.evaluate())
    trainer.save_state()
    if ft.use_lora and ft.merge_lora and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.config.use_cache = True
        with staged_files(os.path.join(ta.output_dir, "merged")) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    metrics["total_flos"] = trainer.state.total_flos
    if trainer.is_world_process_zero():
        write_finetune_cards(ta.output_dir, ft, metrics, trainer.state.global_step)
    return metrics


# ------------------------------------------------------------------------------------------------ model card
def write_finetune_cards(out_dir: str, ft: FinetuneArguments, metrics: dict, steps: int) -> None:
    """Our card in place of PEFT's empty template (and on a full fine-tune, which gets none): what was trained, on
    what, from which model, the final losses; metadata valid for the Hub (an adapter: library peft, relation
    adapter). The merged folder of a LoRA run gets the full-model card."""
    write_card = finetune_card_writer(ft, metrics, steps)
    write_card(out_dir, adapter=ft.use_lora)
    if ft.use_lora and ft.merge_lora:
        write_card(os.path.join(out_dir, "merged"), adapter=False)


def model_hub_id(ft: FinetuneArguments) -> str | None:
    """The Hub id of the model fine-tuned: the option, else the one a Hub cache snapshot's path spells."""
    import re

    from upcycled_moe.conversion.model_card import hub_ids

    if ft.base_model_id:
        return ft.base_model_id
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", os.path.abspath(ft.model_name_or_path))
    return (hub_ids(f"{match.group(1)}/{match.group(2)}") or [None])[0] if match else None


def finetune_card_writer(ft: FinetuneArguments, metrics: dict, steps: int):
    import json

    from upcycled_moe.conversion.model_card import (card_data_of, card_metadata, front_matter, local_name,
                                                    usage_snippet, write_card)

    source_card = os.path.join(ft.model_name_or_path, "README.md")
    source = card_data_of(open(source_card, encoding="utf-8").read()) if os.path.isfile(source_card) else None
    try:
        with open(os.path.join(ft.model_name_or_path, "config.json"), encoding="utf-8") as f:
            upcycling = json.load(f).get("upcycling")
    except (OSError, ValueError):
        upcycling = None
    moe_id, moe_name = model_hub_id(ft), local_name(ft.model_name_or_path)
    data_files = ", ".join(f"`{local_name(f)}`" for f in (ft.train_file, ft.validation_file) if f)
    losses = {k: metrics[k] for k in ("train_loss", "eval_loss") if isinstance(metrics.get(k), (int, float))}

    def write(folder: str, adapter: bool) -> None:
        # an adapter applies to the MoE itself; a full model derives from it (or, unnamed, from the dense source)
        data = card_metadata(upcycling, library_name="peft" if adapter else "transformers",
                             base_model=moe_id,
                             relation="adapter" if adapter else "finetune",
                             tags=["lora" if adapter else "", "fine-tuned"])
        if adapter and not moe_id:
            data.base_model = data.base_model_relation = None  # the dense source is not what the adapter applies to
        if source is not None and source.license and not data.license:
            data.license = source.license
        kind = (f"LoRA adapter (r={ft.lora_r}, alpha={ft.lora_alpha}, attention{' and routed experts' if ft.lora_target_experts else ''})"
                if adapter else "full fine-tune" + (" (the LoRA adapter merged)" if ft.use_lora else ""))
        base = f"`{moe_id}`" if moe_id else f"the UpcycledMoe model `{moe_name}`"
        lines = [front_matter(data).rstrip("\n"), "", f"# {moe_name} fine-tuned", "",
                 f"A {kind} of {base} trained with `trainer_scripts/finetune.py` (upcycled-moe).", "",
                 "## Training", "", "| | |", "|---|---|", f"| data | {data_files} |", f"| steps | {steps:,} |",
                 f"| router | {'trained' if ft.train_router else 'frozen'} |",
                 f"| max sequence length | {ft.max_seq_length} |"]
        lines += [f"| final {k.replace('_', ' ')} | {v:.4f} |" for k, v in losses.items()]
        if adapter and not moe_id:
            lines += ["", f"Set `base_model:` above to the Hub id of `{moe_name}` before publishing (or pass "
                      "base_model_id=...): the Hub links an adapter to the model it applies to."]
        lines += ["", "## Usage", ""]
        if adapter:
            lines += ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                      "", 'repo = "path/or/hub-id/of/this/folder"',
                      "tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)",
                      "model = AutoPeftModelForCausalLM.from_pretrained(repo, trust_remote_code=True)", "```"]
        else:
            lines.append(usage_snippet("path/or/hub-id/of/this/folder", remote_code=True))
        write_card(folder, "\n".join(lines) + "\n")

    return write


def main(argv: list[str] | None = None) -> None:
    def body():
        metrics = run(*parse_args(argv))
        print(f"[upcycle-moe-finetune] done: {metrics}", flush=True)

    run_cli("upcycle-moe-finetune", body)


if __name__ == "__main__":
    main()
