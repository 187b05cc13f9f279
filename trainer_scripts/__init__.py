"""Training scripts for upcycled MoE models.

- ``continued_pretraining``: Accelerate training loop (one CPU, one GPU, DDP / FSDP / DeepSpeed through
  ``accelerate launch``); console command ``upcycle-moe-pretrain``.
- ``finetune``: supervised fine-tuning with the Hugging Face Trainer, full or LoRA (PEFT); console command
  ``upcycle-moe-finetune``.

The pieces are kept apart: ``config`` (validated options), ``data`` (datasets -> packed blocks, deterministic
order), ``checkpointing`` (atomic ``save_state`` folders, resume), ``metrics`` (expert load, MFU, logging, plots).
"""
