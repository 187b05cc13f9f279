"""One MoE FFN layer, forward + backward, router included: fused path vs transformers' experts implementations.

    python benchmarks/moe_layer.py            # full: 4 shapes x {balanced, skewed} routing, T = 16384
    python benchmarks/moe_layer.py --quick    # shorter timing windows
    python benchmarks/moe_layer.py --shapes smollm2 --routing skewed --impls upcycled_fused,grouped_mm
    python benchmarks/moe_layer.py --device cpu --shapes tiny --tokens 64   # checks the script only (no numbers)

Every row is transformers' own Qwen3MoeSparseMoeBlock (router + experts) with the SAME weights, inputs and
routing; only `config._experts_implementation` changes ("grouped_mm", "eager", "upcycled_fused").
"ideal" = top_k x (one dense SwiGLU FFN of the expert's shape over the same T tokens, forward + backward),
timed in the same run. efficiency = ideal / time. Times: median of triton.testing.do_bench (or CUDA events).
Peak memory: max_memory_allocated during one forward + backward above the memory held before it, minus the
parameter gradients it allocates (the same for every implementation), i.e. activations and temporaries.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {  # name: (hidden, expert width, experts, top_k)
    "llama3-8b": (4096, 14336, 8, 2),
    "llama3-8b-fine-g8": (4096, 1792, 64, 8),
    "1b": (2048, 8192, 8, 2),
    "smollm2-135m": (576, 1536, 8, 2),
    "1b-train": (2048, 4096, 8, 2),  # the MoE layer of benchmarks/train_step.py's 1b model
    "tiny": (64, 64, 4, 2),  # for checking the script on a CPU (benchmarks/gpu_check.sh --dry-run); means nothing
}
ALIASES = {"llama": "llama3-8b", "fine": "llama3-8b-fine-g8", "smollm2": "smollm2-135m"}


def load_fused():
    try:
        from upcycled_moe.fused_moe import fused_experts_forward
    except Exception:  # the package __init__ needs the modeling file; fall back to the flat file
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "upcycled_moe", "fused_moe.py")
        spec = importlib.util.spec_from_file_location("fused_moe", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fused_experts_forward = mod.fused_experts_forward
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("upcycled_fused", fused_experts_forward)


def bench(fn, warmup_ms, rep_ms, grad_to_none, device="cuda"):
    if torch.device(device).type != "cuda":  # the CPU check: a few wall-clock runs
        from timing import median_ms

        def reset_and_run():
            for t in grad_to_none or []:
                t.grad = None
            fn()

        return median_ms(reset_and_run, device, reps=3, warmup=1)
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    except ImportError:
        pass
    # CUDA-event fallback (no triton): same idea, median of many runs after a warm-up
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    n_warm = max(1, int(warmup_ms / max(est, 1e-3)))
    n_rep = max(5, int(rep_ms / max(est, 1e-3)))
    for _ in range(n_warm):
        fn()
    times = []
    for _ in range(n_rep):
        for t in grad_to_none or []:
            t.grad = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def build_block(hidden, inter, experts, top_k, dtype, device, seed):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                         num_experts_per_tok=top_k, norm_topk_prob=False, hidden_act="silu")
    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0, hidden**-0.5)
        block.experts.down_proj.normal_(0, inter**-0.5)
    return block.to(device=device, dtype=dtype), cfg


def make_inputs(block, tokens, routing, dtype, device, seed):
    """Balanced: random router. Skewed: Zipf-like expert popularity p_e ~ (e+1)^-1.2 via a shared direction."""
    hidden = block.gate.weight.shape[1]
    experts = block.gate.weight.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    wg = torch.randn(experts, hidden, generator=g) * hidden**-0.5
    if routing == "skewed":
        u = torch.randn(hidden, generator=g)
        u = u / u.norm()
        x = x + 4.0 * u  # every token leans the same way...
        wg = wg + (-1.2 * torch.log(torch.arange(1, experts + 1).float()) / 4.0)[:, None] * u  # ...toward low e
    with torch.no_grad():
        block.gate.weight.copy_(wg.to(block.gate.weight.dtype))
    return x.to(device=device, dtype=dtype)


def load_stats(block, x):
    with torch.no_grad():
        _, _, idx = block.gate(x)
        counts = torch.bincount(idx.reshape(-1), minlength=block.gate.weight.shape[0]).float()
    return {"max_over_mean": round((counts.max() / counts.mean()).item(), 2), "min": int(counts.min().item()),
            "empty_experts": int((counts == 0).sum().item())}


def memory_of_one_step(fwd, gout, leaves, param_grad_bytes, device):
    """(bytes the forward saves, peak bytes of fwd + bwd above the start minus the parameter gradients); NaN
    off CUDA, where the allocator keeps no such statistics."""
    if torch.device(device).type != "cuda":
        return float("nan"), float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fwd()
    saved = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    out.backward(gout)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - param_grad_bytes
    for p in leaves:
        p.grad = None
    return saved, peak


def run_shape(name, args, device, dtype, results):
    hidden, inter, experts, top_k = SHAPES[name]
    T = args.tokens
    block, cfg = build_block(hidden, inter, experts, top_k, dtype, device, seed=0)
    params = list(block.parameters())
    gout = torch.randn(1, T, hidden, device=device, dtype=dtype)

    # ideal: top_k x dense SwiGLU FFN of the expert's shape over the same T tokens
    w1 = block.experts.gate_up_proj[0].detach().clone().requires_grad_(True)
    w2 = block.experts.down_proj[0].detach().clone().requires_grad_(True)
    xd = torch.randn(T, hidden, device=device, dtype=dtype, requires_grad=True)
    gd = gout[0]

    def dense_step():
        gate, up = F.linear(xd, w1).chunk(2, dim=-1)
        F.linear(F.silu(gate) * up, w2).backward(gd)

    dense_ms = bench(dense_step, args.warmup_ms, args.rep_ms, [xd, w1, w2], device)
    ideal_ms = top_k * dense_ms
    del w1, w2, xd
    param_grad_bytes = sum(p.numel() * p.element_size() for p in params)

    def fwd():
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    for routing in args.routing:
        x0 = make_inputs(block, T, routing, dtype, device, seed=1).view(1, T, hidden)
        stats = load_stats(block, x0.view(T, hidden))
        x = x0.clone().requires_grad_(True)
        ref_out = None
        rows = []
        for impl in args.impls:
            cfg._experts_implementation = impl
            block.experts.config._experts_implementation = impl

            def step():
                fwd().backward(gout)

            try:
                for p in params + [x]:
                    p.grad = None
                out = fwd()
                if ref_out is None:
                    ref_out = out.detach().float()
                    err = 0.0
                else:
                    err = ((out.detach().float() - ref_out).norm() / ref_out.norm()).item()
                out.backward(gout)
                del out
                for p in params + [x]:
                    p.grad = None
                saved, peak = memory_of_one_step(fwd, gout, params + [x], param_grad_bytes, device)
                rep = args.rep_ms if impl != "eager" else min(args.rep_ms, args.eager_rep_ms)
                ms = bench(step, args.warmup_ms, rep, params + [x], device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()  # (only CUDA raises it)
                rows.append({"impl": impl, "error": "OOM"})
                print(f"  {name:18s} {routing:8s} {impl:15s} OOM", flush=True)
                continue
            rows.append({"impl": impl, "ms": ms, "rel_err_vs_first": err, "peak_act_mib": peak / 2**20,
                         "saved_fwd_mib": saved / 2**20})
        base_ms = next((r["ms"] for r in rows if r["impl"] == "grouped_mm" and "ms" in r), None)
        for r in rows:
            if "ms" not in r:
                continue
            r["efficiency"] = ideal_ms / r["ms"]
            r["speedup_vs_grouped_mm"] = base_ms / r["ms"] if base_ms else None
            sp = f"{r['speedup_vs_grouped_mm']:.2f}x" if base_ms else "-"
            print(f"  {name:18s} {routing:8s} {r['impl']:15s} {r['ms']:8.2f} ms  eff {r['efficiency']:.3f}  "
                  f"vs grouped_mm {sp:>6s}  peak act {r['peak_act_mib']:8.0f} MiB  saved fwd "
                  f"{r['saved_fwd_mib']:8.0f} MiB  relerr {r['rel_err_vs_first']:.1e}", flush=True)
        results.append({"shape": name, "hidden": hidden, "expert_width": inter, "experts": experts, "top_k": top_k,
                        "tokens": T, "routing": routing, "loads": stats, "dense_ffn_ms": dense_ms,
                        "ideal_ms": ideal_ms, "rows": rows})
        print(f"  {name:18s} {routing:8s} ideal {ideal_ms:.2f} ms (top_k x dense {dense_ms:.2f} ms)  loads {stats}",
              flush=True)
        del x, x0
    del block, params
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def profile_shape(name, args, device, dtype):
    """Host (CPU) enqueue time per fwd+bwd and the top GPU kernels, per implementation (diagnostics)."""
    hidden, inter, experts, top_k = SHAPES[name]
    T = args.tokens
    block, cfg = build_block(hidden, inter, experts, top_k, dtype, device, seed=0)
    x = make_inputs(block, T, "balanced", dtype, device, seed=1).view(1, T, hidden).requires_grad_(True)
    gout = torch.randn(1, T, hidden, device=device, dtype=dtype)

    def step():
        out = block(x)
        (out[0] if isinstance(out, tuple) else out).backward(gout)

    for impl in [i for i in args.impls if i != "eager"]:
        block.experts.config._experts_implementation = impl
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # keep the GPU busy so that only host time is measured
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        host_ms = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        total = sum(e.device_time_total for e in events) / 10 / 1e3
        print(f"[profile] {name} {impl}: host enqueue {host_ms:.2f} ms/iter, GPU kernel time {total:.2f} ms/iter")
        for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
            print(f"    {e.device_time_total / 10 / 1e3:7.3f} ms  x{e.count // 10:<3d} {e.key[:90]}")


def markdown(results, env):
    lines = [f"device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"triton {env['triton']}; dtype {env['dtype']}; T = {env['tokens']} tokens; fwd+bwd, router included", "",
             "| shape (H, I, E, k) | routing (max/mean load, empty) | ideal ms | " +
             " | ".join(env["impls"]) + " | fused peak act MiB vs grouped_mm |",
             "|---|---|---|" + "---|" * len(env["impls"]) + "---|"]
    for res in results:
        cells = []
        by = {r["impl"]: r for r in res["rows"]}
        for impl in env["impls"]:
            r = by.get(impl)
            if r is None or "ms" not in r:
                cells.append(r["error"] if r else "-")
            else:
                sp = f", {r['speedup_vs_grouped_mm']:.2f}x" if r.get("speedup_vs_grouped_mm") else ""
                cells.append(f"{r['ms']:.2f} ms ({r['efficiency']:.3f}{sp})")
        f, g = by.get("upcycled_fused"), by.get("grouped_mm")
        mem = (f"{f['peak_act_mib']:.0f} vs {g['peak_act_mib']:.0f}" if f and g and "ms" in f and "ms" in g else "-")
        lines.append(f"| {res['shape']} ({res['hidden']}, {res['expert_width']}, {res['experts']}, {res['top_k']}) | "
                     f"{res['routing']} ({res['loads']['max_over_mean']}, {res['loads']['empty_experts']}) | "
                     f"{res['ideal_ms']:.2f} | " + " | ".join(cells) + f" | {mem} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short timing windows")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--routing", default="balanced,skewed")
    ap.add_argument("--impls", default="upcycled_fused,grouped_mm,eager")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--md", default=None, help="write a markdown table here")
    ap.add_argument("--profile", action="store_true", help="print host enqueue time and top GPU kernels, no table")
    ap.add_argument("--device", default="cuda", help="cuda (measurements) or cpu (checks the script only)")
    args = ap.parse_args()
    args.shapes = [ALIASES.get(s, s) for s in args.shapes.split(",") if s]
    args.routing = [r for r in args.routing.split(",") if r]
    args.impls = [i for i in args.impls.split(",") if i]
    args.warmup_ms, args.rep_ms, args.eager_rep_ms = (100, 300, 300) if args.quick else (300, 1000, 500)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("moe_layer.py needs a CUDA GPU (nothing measured); --device cpu only checks the script.")
        return 2
    if args.profile and device != "cuda":
        print("error: --profile needs --device cuda (it reads GPU kernel times)", file=sys.stderr)
        return 2
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    load_fused()
    dtype = getattr(torch, args.dtype)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "triton": triton_version, "python": platform.python_version(),
           "dtype": args.dtype, "tokens": args.tokens, "impls": args.impls, "quick": args.quick,
           "command": "python " + " ".join(sys.argv)}
    print(json.dumps(env), flush=True)
    if args.profile:
        for name in args.shapes:
            profile_shape(name, args, "cuda", dtype)
        return 0
    results = []
    for name in args.shapes:
        run_shape(name, args, device, dtype, results)
    md = markdown(results, env)
    print()
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
