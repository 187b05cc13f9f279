"""End-to-end training step: tokens/s and MFU (active parameters) of UpcycledMoe vs the dense model of the same
active shape.

    python benchmarks/train_step.py                      # smollm2 + 1b, dense and MoE (upcycled_fused)
    python benchmarks/train_step.py --models smollm2 --moe-impls upcycled_fused,grouped_mm
    python benchmarks/train_step.py --no-compile --no-fused-ce   # plain eager transformers-style step

Step = forward + backward + fused AdamW (torch.optim.AdamW(fused=True)), random tokens, seq 2048, median of --steps
steps after --warmup steps. --precisions picks the weights: "bf16" (bf16 weights and optimizer states) and/or "amp"
(fp32 master weights and optimizer states, forward and backward under bf16 autocast: what `upcycle-moe-pretrain`
runs with mixed_precision bf16, the default on GPUs that support it). Both models are UpcycledMoeForCausalLM:
the MoE one has every MLP sparse (num_experts experts of width moe_width, top-k; router aux loss in the loss);
the dense twin of the same ACTIVE shape has mlp_layer_types all "dense" with FFN width top_k x moe_width (a
Llama-shaped model with the same active parameters and FLOPs per token).
MFU = tokens/s x FLOPs/token / the device's dense bf16 peak (trainer_scripts.metrics.peak_tflops_of) with FLOPs/token = 6 x model.num_active_parameters() (every parameter but the
embedding lookup, a tied/untied lm_head counted once, experts scaled by k/E) + 6 x layers x seq x attention width.
Speed options (on by default, each can be turned off): torch.compile of each decoder layer (regional; the fused
experts call is opaque to the compiler), the model's chunked linear + cross-entropy (no full fp32 logits), sdpa
attention (flash kernel on H100). The loss is the model's own (`model(input_ids, labels=...)`): chunked LM head +
cross-entropy (config.loss_chunk_size = --ce-chunk, no full logits) plus the router aux loss.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import Timer, sync  # noqa: E402  (benchmarks/timing.py)

PRECISIONS = {"bf16": "bf16 weights and optimizer states", "amp": "fp32 master weights, bf16 autocast"}

MODELS = {
    # upcycled SmolLM2-135M: every expert a copy-shaped FFN of width 1536 (8 experts, top-2 -> 2 x 1536 active);
    # its dense twin of the same active shape has an FFN of width 3072.
    "smollm2": dict(hidden_size=576, moe_width=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, batch=16),
    # ~1B-active MoE: hidden 2048, 16 layers, 8 experts of width 4096, top-2 (3.6B total); dense twin: Llama-1B-ish
    # (FFN width 8192).
    "1b": dict(hidden_size=2048, moe_width=4096, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False, batch=8),
    # a few-MB model for checking the script itself on a CPU (tests/test_benchmarks.py); its numbers mean nothing
    "tiny": dict(hidden_size=64, moe_width=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, batch=2),
}


def build(name, moe, impl, dtype, attn, experts, top_k, device):
    from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM

    spec = dict(MODELS[name])
    spec.pop("batch")
    width = spec.pop("moe_width")
    layers = spec["num_hidden_layers"]
    cfg = UpcycledMoeConfig(
        **spec, intermediate_size=width if moe else top_k * width,  # dense twin: same active FFN width
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
        mlp_layer_types=["sparse" if moe else "dense"] * layers, router_type="softmax_topk",
        router_aux_loss_coef=1e-2 if moe else 0.0, max_position_embeddings=4096, use_cache=False,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = UpcycledMoeForCausalLM(cfg).to(dtype)
    if moe:
        model.set_experts_implementation(impl)
    return model, cfg


def flops_per_token(model, cfg, seq):
    """The training scripts' count (trainer_scripts.metrics: 6 x the model's active parameters + causal attention by
    the pairs each layer attends), and the active parameter count."""
    from trainer_scripts.metrics import flops_per_token as training_flops_per_token

    active = model.num_active_parameters()
    return training_flops_per_token(model, seq, active), active


def profile_step(label, step, n, device):
    """Where a step's GPU time goes: kernel time by kernel, and the share of the wall time the GPU is busy."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
        sync(device)
    wall = (time.perf_counter() - t0) / n * 1e3
    if gpu:
        events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        kernel_time = lambda e: e.device_time_total  # noqa: E731
    else:  # CPU: self time per operator
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        kernel_time = lambda e: e.self_cpu_time_total  # noqa: E731
    total = sum(kernel_time(e) for e in events) / n / 1e3
    what = "GPU kernel time" if gpu else "CPU operator self time"
    print(f"[profile] {label}: wall {wall:.1f} ms/step (profiler on), {what} {total:.1f} ms/step", flush=True)
    for e in sorted(events, key=lambda e: -kernel_time(e))[:40]:
        print(f"    {kernel_time(e) / n / 1e3:8.3f} ms  x{e.count // n:<4d} {e.key[:110]}", flush=True)


def peak_flops(device) -> float:
    """The device's dense bf16 peak in FLOP/s (the training scripts' table); NaN where unknown (a CPU)."""
    from trainer_scripts.metrics import detect_peak_tflops

    peak = detect_peak_tflops(device)
    return peak * 1e12 if peak else float("nan")


def run(name, moe, impl, args, results, precision="bf16"):
    amp = precision == "amp"
    dtype = torch.float32 if amp else torch.bfloat16
    batch = args.batch or MODELS[name]["batch"]
    seq = args.seq
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.empty_cache()
    model, cfg = build(name, moe, impl, dtype, args.attn, args.experts, args.top_k, device)
    n_params = sum(p.numel() for p in model.parameters())
    fpt, active = flops_per_token(model, cfg, seq)
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=g)

    model.train()
    model.config.loss_chunk_size = args.ce_chunk if args.fused_ce else 0  # the model's own chunked LM loss

    def loss_fn():  # LM loss + router aux loss, exactly what training with labels runs
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model(input_ids=ids, labels=ids).loss

    def step():
        for _ in range(args.accum):  # micro-batches per optimizer step (the optimizer's cost is amortised)
            loss = loss_fn()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if args.profile:
        for _ in range(args.warmup):
            step()
        profile_step(f"{name} {'MoE ' + impl if moe else 'dense'} {precision}", step, args.profile_steps, device)
        return
    t_compile = time.perf_counter()
    try:
        for _ in range(args.warmup):
            loss = step()
        sync(device)
        t_compile = time.perf_counter() - t_compile
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            with Timer(device) as t:
                loss = step()
            times.append(t.ms)
        # one micro-batch's forward+backward alone (no optimizer), to show the optimizer's share
        fb = []
        for _ in range(max(3, args.steps // 2)):
            with Timer(device) as t:
                loss_fn().backward()
            fb.append(t.ms)
            opt.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError as err:
        print(f"{name} {'moe' if moe else 'dense'} {impl} {precision}: OOM ({str(err)[:120]})", flush=True)
        results.append({"model": name, "moe": moe, "impl": impl, "precision": precision, "accum": args.accum,
                        "error": "OOM", "batch": batch})
        del model, opt
        torch.cuda.empty_cache()
        return
    times.sort()
    fb.sort()
    ms = times[len(times) // 2]
    fb_ms = fb[len(fb) // 2]
    tokens = batch * seq * args.accum
    tps = tokens / (ms / 1e3)
    mfu = tps * fpt / peak_flops(device)
    row = {"model": name, "moe": moe, "impl": impl if moe else "dense", "precision": precision,
           "weights_dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "autocast": amp, "batch": batch,
           "seq": seq, "accum": args.accum,
           "params": n_params, "active_matmul_params": active, "flops_per_token": fpt, "step_ms": ms,
           "fwd_bwd_ms": fb_ms, "tokens_per_s": tps, "mfu": mfu, "loss": loss.item(),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan"), "warmup_s": t_compile}
    results.append(row)
    print(f"{name:8s} {'MoE ' + impl if moe else 'dense':22s} {precision:4s} batch {batch:3d}  step {ms:8.1f} ms  "
          f"(fwd+bwd {fb_ms:7.1f})  {tps / 1e3:7.1f}k tok/s  MFU {100 * mfu:5.1f}%  params {n_params / 1e9:.2f}B "
          f"active {active / 1e9:.3f}B  peak {row['peak_mem_gib']:.1f} GiB  loss {row['loss']:.3f}  "
          f"warmup {t_compile:.0f}s", flush=True)
    del model, opt
    if gpu:
        torch.cuda.empty_cache()


def dense_twin_of(row, results):
    """The dense row measured with the same model, weights and accumulation (the MoE's "step vs dense" baseline)."""
    return next((d for d in results if not d["moe"] and "error" not in d and all(
        d.get(k) == row.get(k) for k in ("model", "precision", "accum"))), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,1b", help="comma list of " + ", ".join(MODELS))
    ap.add_argument("--device", default="cuda", help="cuda (measurements) or cpu (checks the script only)")
    ap.add_argument("--moe-impls", default="upcycled_fused")
    ap.add_argument("--precisions", default="bf16", help="comma list of " + "; ".join(
        f"{k}: {v}" for k, v in PRECISIONS.items()))
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="0: per-model default (smollm2 16, 1b 8)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (step ms covers all)")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-fused-ce", dest="fused_ce", action="store_false")
    ap.add_argument("--ce-chunk", type=int, default=8192)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels per step instead of timing")
    ap.add_argument("--profile-steps", type=int, default=3)
    args = ap.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        print(f"error: --precisions {args.precisions!r}: each must be one of {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_step.py needs a CUDA GPU (nothing measured); --device cpu only checks the script.")
        return 2
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__, "transformers": transformers.__version__,
           "triton": tv, "compile": args.compile, "fused_ce": args.fused_ce, "attn": args.attn,
           "precisions": precisions, "accum": args.accum,
           "command": "python " + " ".join(sys.argv)}
    print(json.dumps(env), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for name in args.models.split(","):
        variants = ([] if args.no_dense else [(False, "dense")]) + [(True, i) for i in args.moe_impls.split(",") if i]
        for precision in precisions:
            for moe, impl in variants:
                try:
                    run(name, moe, impl, args, results, precision)
                except Exception as err:  # noqa: BLE001 - record and go on with the other variants
                    print(f"{name} {impl} {precision}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                    results.append({"model": name, "moe": moe, "impl": impl, "precision": precision,
                                    "accum": args.accum, "error": type(err).__name__,
                                    "batch": args.batch or MODELS[name]["batch"]})
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    print()
    print("| model | variant | weights | batch x seq x accum | params | step ms | fwd+bwd ms | tokens/s | MFU (active) "
          "| step vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {'MoE ' + r['impl'] if r['moe'] else 'dense'} | {r['precision']} | {r['batch']} | - "
                  f"| {r['error']} | - | - | - | - |")
            continue
        dense = dense_twin_of(r, results)
        ratio = f"{r['step_ms'] / dense['step_ms']:.2f}x" if dense else "-"
        print(f"| {r['model']} | {'MoE ' + r['impl'] if r['moe'] else 'dense'} | {r['precision']} | "
              f"{r['batch']} x {r['seq']} x {r['accum']} | "
              f"{r['params'] / 1e9:.2f}B | {r['step_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}k | "
              f"{100 * r['mfu']:.1f}% | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
