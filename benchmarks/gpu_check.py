"""Every GPU-only check of the project in one time-boxed run, for the few minutes a device is lent.

    bash benchmarks/gpu_check.sh [OUTDIR]              # on the GPU machine (default OUTDIR: $OUT)
    bash benchmarks/gpu_check.sh --dry-run OUTDIR      # here, on a CPU: tiny shapes, every stage, seconds

Device time is scarce (15 minutes per task, 10 per command), so the run is prepared here and checked here: the dry
run goes through the same stages with tiny shapes on the CPU (tests/test_gpu_check.py runs it), skipping only what
needs CUDA and saying so in the summary. Each stage gets a time box (its own limit, cut to what is left of the whole
budget), a hang is killed with its whole process group, and a failed stage is recorded and the next one starts.
After every stage OUTDIR is rewritten with what exists so far, so a run killed from outside still leaves its
results. OUTDIR receives at most four flat files, within what the device tool returns (8 files, 16 MiB each):
summary.json, summary.md, profile_1b_moe.txt and gpu_check_logs.tar.gz (every stage's log and raw JSON).
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CONFIGS = ROOT / "trainer_scripts" / "accelerate_configs"
OUT_FILES = ("summary.json", "summary.md", "profile_1b_moe.txt", "gpu_check_logs.tar.gz")
MAX_FILE_BYTES = 16 * 2**20  # the device tool returns files up to 16 MiB
LOG_TAIL_BYTES = 8 * 2**20  # per log in the bundle: its last 8 MiB (shorter if the bundle would not fit)
BUDGET_S = 540  # 9 minutes on the device, inside one 10-minute command
RESERVE_S = 10  # kept back for the final summary
MIN_STAGE_S = 15  # a stage left less than this is skipped, not started
DRY_BOX = 300  # a dry run's time box per stage: only a guard against hangs (a loaded 2-core CI machine is slow)
TARGETS = {  # issue 15: on one H100/H200, measured by this script in one run
    "1b MoE MFU (active) >= 48 %": ("mfu", "1b", 0.48),
    "1b MoE step <= 1.10 x dense twin": ("ratio", "1b", 1.10),
    "smollm2 MoE step <= 1.25 x dense twin": ("ratio", "smollm2", 1.25),
    "mixed precision (amp) step within 5 % of bf16 weights (1b MoE)": ("amp", "1b", 1.05),
}


def python():
    return sys.executable


def stage_plan(dry: bool, work: Path, tokenizer: Path | None) -> list[dict]:
    """The stages in priority order. Real: the shapes the issue names; dry: the same commands at tiny shapes."""
    train = [python(), str(BENCH / "train_step.py"), "--precisions", "bf16,amp"]
    if dry:
        train += ["--device", "cpu", "--models", "tiny", "--seq", "32", "--steps", "1", "--warmup", "1",
                  "--no-compile", "--accum", "2"]
        models = [("train_tiny", "tiny")]
        layer = ["--device", "cpu", "--shapes", "tiny", "--tokens", "64", "--routing", "balanced"]
    else:
        train += ["--accum", "4", "--steps", "4", "--warmup", "2"]
        models = [("train_1b", "1b"), ("train_smollm2", "smollm2")]
        layer = ["--shapes", "1b-train,smollm2"]
    stages = [{"name": "env", "timeout": DRY_BOX if dry else 60, "cmd": [python(), str(Path(__file__)), "env", "--json",
                                                     str(work / "env.json")]}]
    pytest = [python(), "-m", "pytest", *gpu_test_files(), "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
              "--durations=15"]
    if dry:  # the CUDA tests cannot run here: check that they are collected
        stages.append({"name": "pytest_gpu", "timeout": DRY_BOX, "cmd": pytest + ["--collect-only"],
                       "skipped_part": "the CUDA tests themselves (collected only: no GPU)"})
    else:
        stages.append({"name": "pytest_gpu", "timeout": 150, "cmd": pytest + ["--junitxml", str(work / "pytest.xml")]})
    for name, model in models:
        model_flags = ["--models", model] if not dry else []
        stages.append({"name": name, "timeout": DRY_BOX if dry else (170 if model == "1b" else 120),
                       "cmd": train + model_flags + ["--json", str(work / f"{name}.json")]})
        if model in ("1b", "tiny"):  # the 1b MoE step's kernels: what the next speed-up works on
            stages.append({"name": "profile_1b_moe", "timeout": DRY_BOX if dry else 100,
                           "cmd": train + model_flags + ["--no-dense", "--profile", "--profile-steps", "2"]
                           + ([] if dry else ["--accum", "1"])})
    stages.append({"name": "moe_layer", "timeout": DRY_BOX if dry else 90,
                   "cmd": [python(), str(BENCH / "moe_layer.py"), "--quick", "--impls", "upcycled_fused,grouped_mm",
                           *layer, "--json", str(work / "moe_layer.json"), "--md", str(work / "moe_layer.md")]})
    inputs = work / "pretrain_inputs"
    model_dir, corpus = inputs / "model", inputs / "corpus.jsonl"
    make_inputs = [python(), str(Path(__file__)), "make-inputs", str(inputs), "--tokenizer", str(tokenizer)] \
        + (["--tiny"] if dry else [])
    for launcher in ("fsdp", "deepspeed_zero3"):
        stages.append({"name": f"pretrain_{launcher}", "timeout": DRY_BOX if dry else 120, "launcher": launcher,
                       "cmds": [make_inputs,
                                pretrain_command(launcher, model_dir, corpus, work / f"pretrain_{launcher}", dry)]})
        if dry:  # the script runs a CPU machine as MULTI_CPU (gloo), whatever the config says
            stages[-1]["skipped_part"] = f"{launcher} sharding itself (on a CPU the script trains as MULTI_CPU)"
    for stage in stages:
        stage.setdefault("cmds", [stage.pop("cmd", None)])
    return stages


def gpu_test_files() -> list[str]:
    """The test files with CUDA tests (those that use the `gpu` marker): collecting only them keeps the stage short."""
    marked = re.compile(r"@pytest\.mark\.gpu\b|pytestmark\s*=.*mark\.gpu\b")
    return [str(p) for p in sorted((ROOT / "tests").glob("test_*.py")) if marked.search(p.read_text(errors="replace"))]


def pretrain_command(launcher, model_dir, corpus, out, dry):
    """`upcycle-moe-pretrain` under `accelerate launch` with the shipped config, on the one device there is."""
    beside = Path(sys.executable).parent / "upcycle-moe-pretrain"  # a venv's console scripts sit beside its python
    entry = str(beside) if beside.exists() else shutil.which("upcycle-moe-pretrain")
    target = [entry] if entry else ["-m", "trainer_scripts.continued_pretraining"]
    steps = dict(block_size=64, micro_batch_size=2, max_steps=2) if dry else \
        dict(block_size=2048, micro_batch_size=4, max_steps=6)
    args = dict(model_name_or_path=model_dir, train_files=corpus, output_dir=out, warmup_steps=1, logging_steps=1,
                eval_steps=0, save_steps=0, max_eval_blocks=4, report_to="none", mixed_precision="auto", **steps)
    return [python(), "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{launcher}.yaml"),
            "--num_processes", "1", "--main_process_port", "0", *target, *[f"--{k}={v}" for k, v in args.items()]]


def make_pretrain_inputs(inputs: Path, tokenizer: Path | None, dry: bool) -> None:
    """inputs/model: a random UpcycledMoe of the upcycled SmolLM2's shape (tiny in a dry run) with the real SmolLM2
    tokenizer; inputs/corpus.jsonl: Python's bundled documentation. Made once and shared by the FSDP and the
    DeepSpeed stage (which may run at the same time in a dry run: the folder appears whole or not at all)."""
    if inputs.exists():
        print(f"{inputs} exists (made by the other pretraining stage)")
        return
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoTokenizer

    from trainer_scripts.data import write_pydoc_corpus
    from upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM

    if tokenizer is None or not (tokenizer / "tokenizer.json").exists():
        raise FileNotFoundError(f"no SmolLM2 tokenizer at {tokenizer} (benchmarks/prepare_device.sh carries one)")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    shape = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if dry else \
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3)
    cfg = UpcycledMoeConfig(vocab_size=len(tok), max_position_embeddings=2048, num_experts=8, num_experts_per_tok=2,
                            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            **shape)
    torch.manual_seed(0)
    tmp = inputs.with_name(f"{inputs.name}.tmp{os.getpid()}")
    model = UpcycledMoeForCausalLM(cfg)
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    write_pydoc_corpus(str(tmp / "corpus.jsonl"))
    try:
        tmp.rename(inputs)
    except OSError:  # the other stage made it first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{inputs}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, shape {shape}")


# ------------------------------------------------------------------------------------------------------ running
def run_stage(stage: dict, work: Path, deadline: float, env: dict) -> dict:
    name = stage["name"]
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    record = {"name": name, "command": " && ".join(" ".join(map(str, c)) for c in stage["cmds"]),
              "log": f"logs/{name}.log"}
    left = deadline - time.monotonic() - RESERVE_S
    limit = min(stage["timeout"], left)
    if limit < MIN_STAGE_S:
        return {**record, "status": "skipped", "reason": f"out of time ({max(left, 0):.0f} s of the budget left)",
                "seconds": 0.0}
    if stage.get("launcher") == "deepspeed_zero3" and not importable("deepspeed"):
        return {**record, "status": "skipped", "seconds": 0.0,
                "reason": "deepspeed is not importable here (benchmarks/prepare_device.sh carries its wheel)"}
    t0 = time.monotonic()
    rc, status, reason = 0, "ok", ""
    with open(log, "w", encoding="utf-8") as f:
        for cmd in stage["cmds"]:  # in sequence, all inside the one time box
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: a hang is killed whole
            try:
                rc = proc.wait(timeout=max(1.0, limit - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                kill_group(proc)
                rc, status, reason = None, "timeout", f"killed after its time box of {limit:.0f} s"
                break
            if rc != 0:
                what = " ".join([Path(str(cmd[1])).name, *map(str, cmd[2:3])])
                status, reason = "failed", f"exit status {rc} ({what})"
                break
    if status == "failed":
        reason += ": " + last_line(log)
    record.update(status=status, reason=reason, returncode=rc, seconds=round(time.monotonic() - t0, 1))
    if stage.get("skipped_part"):
        record["not_run"] = stage["skipped_part"]
    return record


def last_line(log: Path) -> str:
    """The last line of a failed stage that says why (an error line, else the last line)."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if "Error" in x or x.startswith("error:") or "FAILED" in x]
    return (errors or lines or [""])[-1][:300]


def kill_group(proc):
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------------------ results
def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_results(record: dict, work: Path) -> None:
    """What each stage measured, read from the files it wrote (or its log)."""
    name = record["name"]
    if name == "env":
        record["result"] = read_json(work / "env.json")
    elif name == "pytest_gpu":
        record["result"] = pytest_counts(work / "pytest.xml", work / "logs" / "pytest_gpu.log")
    elif name.startswith("train_"):
        data = read_json(work / f"{name}.json")
        record["result"] = data["results"] if data else None
    elif name == "moe_layer":
        data = read_json(work / "moe_layer.json")
        record["result"] = data["results"] if data else None
    elif name.startswith("pretrain_"):
        record["result"] = pretrain_result(work / name)


def pytest_counts(xml: Path, log: Path) -> dict | None:
    if xml.exists():
        try:
            suite = ET.parse(xml).getroot()
        except ET.ParseError:
            return None
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                  if c.find("failure") is not None or c.find("error") is not None]
        return counts
    try:  # --collect-only (dry run): "N/M tests collected (K deselected)"
        last = [line for line in log.read_text().splitlines() if "collected" in line]
        return {"collected": last[-1].strip()} if last else None
    except OSError:
        return None


def pretrain_result(out: Path) -> dict | None:
    records = []
    try:
        for line in (out / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "tokens_per_s" in r:
                records.append(r)
    except (OSError, ValueError):
        return None
    if not records:
        return None
    steady = records[2:] or records  # the first steps compile and warm up
    tps = sorted(r["tokens_per_s"] for r in steady)
    mfu = sorted(r["mfu"] for r in steady if r.get("mfu") is not None)
    return {"steps": records[-1].get("step"), "loss_last": records[-1].get("loss"),
            "median_tokens_per_s": tps[len(tps) // 2], "median_mfu": mfu[len(mfu) // 2] if mfu else None}


def train_rows(stages: list[dict]) -> list[dict]:
    return [r for s in stages if s["name"].startswith("train_") and s.get("result") for r in s["result"]]


def evaluate_targets(stages: list[dict], dry: bool) -> list[dict]:
    rows = [r for r in train_rows(stages) if "error" not in r]

    def find(model, moe, precision):
        return next((r for r in rows if r["model"] == model and r["moe"] == moe and r["precision"] == precision), None)

    out = []
    for label, (kind, model, bound) in TARGETS.items():
        if dry:
            out.append({"target": label, "status": "not evaluated (dry run on a CPU)"})
            continue
        values = {}
        for precision in ("bf16", "amp"):
            moe, dense = find(model, True, precision), find(model, False, precision)
            if kind == "mfu" and moe:
                values[precision] = moe["mfu"]
            elif kind == "ratio" and moe and dense:
                values[precision] = moe["step_ms"] / dense["step_ms"]
        if kind == "amp":
            bf16, amp = find(model, True, "bf16"), find(model, True, "amp")
            values = {"amp/bf16": amp["step_ms"] / bf16["step_ms"]} if bf16 and amp else {}
        if not values:
            out.append({"target": label, "status": "not measured"})
            continue
        met = all(v >= bound if kind == "mfu" else v <= bound for v in values.values())
        out.append({"target": label, "values": values, "status": "met" if met else "missed"})
    return out


def write_outputs(out: Path, work: Path, summary: dict) -> None:
    """summary.json, summary.md, the 1b MoE profile and one bundle of every log: four flat files in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (work / "summary.md").write_text(markdown(summary))
    profile = work / "logs" / "profile_1b_moe.log"
    files = {"summary.json": work / "summary.json", "summary.md": work / "summary.md"}
    if profile.exists():
        files["profile_1b_moe.txt"] = profile
    bundle = work / "gpu_check_logs.tar.gz"
    members = [p for p in sorted(work.rglob("*")) if p.is_file() and p != bundle
               and p.suffix in (".log", ".json", ".jsonl", ".md", ".xml")
               and not any(part.startswith("pretrain_inputs") for part in p.parts)]
    for tail in (LOG_TAIL_BYTES, LOG_TAIL_BYTES // 8, LOG_TAIL_BYTES // 64):  # shorter tails until it fits
        with tarfile.open(bundle, "w:gz") as tar:
            for path in members:
                add_tail(tar, path, path.relative_to(work).as_posix(), tail)
        if bundle.stat().st_size <= MAX_FILE_BYTES:
            break
    files["gpu_check_logs.tar.gz"] = bundle
    for name, src in files.items():
        data = src.read_bytes()
        if len(data) > MAX_FILE_BYTES and name != "gpu_check_logs.tar.gz":  # keep the end: where a failure is
            data = data[-MAX_FILE_BYTES:]
        tmp = out / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out / name)


def add_tail(tar: tarfile.TarFile, path: Path, arcname: str, tail: int) -> None:
    import io

    data = path.read_bytes()
    if len(data) > tail:
        data = f"[... head cut, last {tail} bytes kept ...]\n".encode() + data[-tail:]
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------------------ markdown
def fmt(v, spec, scale=1.0, suffix=""):
    try:
        return f"{v * scale:{spec}}{suffix}" if v is not None and v == v else "-"
    except (TypeError, ValueError):
        return "-"


def markdown(summary: dict) -> str:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from train_step import dense_twin_of  # the baseline train_step's own table uses

    env = summary.get("env") or {}
    gpu = env.get("gpu") or "none (CPU)"
    kind = "dry run (CPU, tiny shapes: no number here means anything)" if summary["dry_run"] else "run"
    lines = [f"### gpu_check.sh {kind}, {summary['date']}", "",
             f"Device: {gpu}; driver {env.get('driver', '-')}; torch {env.get('torch', '-')}, transformers "
             f"{env.get('transformers', '-')}, triton {env.get('triton', '-')}, "
             f"accelerate {env.get('accelerate', '-')}, "
             f"deepspeed {env.get('deepspeed', '-')}; Python {env.get('python', '-')}. "
             f"Wall time {summary['elapsed_s']:.0f} s of a {summary['budget_s']} s budget.", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    for s in summary["stages"]:
        note = "; ".join(x for x in (s.get("reason"), f"not run: {s['not_run']}" if s.get("not_run") else "") if x)
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} | {note or '-'} |")
    pytest = next((s.get("result") for s in summary["stages"] if s["name"] == "pytest_gpu"), None)
    if pytest:
        lines += ["", "CUDA tests (`pytest -m gpu`): " + (
            pytest.get("collected") or f"{pytest['tests']} run, {pytest['failures']} failed, {pytest['errors']} "
            f"errors, {pytest['skipped']} skipped" + (f"; failed: {', '.join(pytest['failed_tests'])}"
                                                      if pytest.get("failed_tests") else ""))]
    rows = train_rows(summary["stages"])
    if rows:
        lines += ["", "Training step (`benchmarks/train_step.py`; bf16 = bf16 weights and optimizer states, amp = "
                  "fp32 master weights under bf16 autocast, as `upcycle-moe-pretrain` runs):", "",
                  "| model | variant | weights | batch x seq x accum | step ms | fwd+bwd ms | tokens/s | MFU (active) | "
                  "step vs dense | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            variant = "MoE " + r["impl"] if r["moe"] else "dense twin"
            if "error" in r:
                lines.append(f"| {r['model']} | {variant} | {r.get('precision')} | {r.get('batch')} | {r['error']} "
                             "| - | - | - | - | - |")
                continue
            dense = dense_twin_of(r, rows)
            lines.append(f"| {r['model']} | {variant} | {r['precision']} | {r['batch']} x {r['seq']} x {r['accum']} | "
                         f"{r['step_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}k | "
                         f"{fmt(r['mfu'], '.1f', 100, '%')} | "
                         f"{fmt(r['step_ms'] / dense['step_ms'] if dense else None, '.2f', 1, 'x')} | "
                         f"{fmt(r.get('peak_mem_gib'), '.1f')} |")
    layer = summary.get("moe_layer_md")
    if layer:
        lines += ["", "One MoE layer (`benchmarks/moe_layer.py --quick`):", "", layer.strip()]
    pre = [s for s in summary["stages"] if s["name"].startswith("pretrain_")]
    if pre:
        lines += ["", "`upcycle-moe-pretrain` under `accelerate launch`, one process (random weights of the upcycled "
                  "SmolLM2's shape; steady state = steps after the first two):", "",
                  "| config | status | steps | tokens/s | MFU |", "|---|---|---|---|---|"]
        for s in pre:
            r = s.get("result") or {}
            lines.append(f"| {s['name'][len('pretrain_'):]}.yaml | {s['status']} | {r.get('steps', '-')} | "
                         f"{fmt(r.get('median_tokens_per_s'), '.0f')} | {fmt(r.get('median_mfu'), '.1f', 100, '%')} |")
    lines += ["", "Targets (issue 15):", "", "| target | values | status |", "|---|---|---|"]
    for t in summary["targets"]:
        vals = ", ".join(f"{k} {v:.3f}" for k, v in (t.get("values") or {}).items()) or "-"
        lines.append(f"| {t['target']} | {vals} | {t['status']} |")
    if summary.get("profile_top"):
        lines += ["", "Kernel profile of the 1b MoE step (top lines; the whole list is in profile_1b_moe.txt):", "",
                  "```", *summary["profile_top"], "```"]
    return "\n".join(lines) + "\n"


def profile_top(work: Path, n: int = 25) -> list[str]:
    try:
        text = (work / "logs" / "profile_1b_moe.log").read_text().splitlines()
    except OSError:
        return []
    keep, taken = [], 0
    for line in text:
        if line.startswith("[profile]"):
            keep.append(line)
            taken = 0
        elif line.startswith("    ") and keep and taken < n:
            keep.append(line)
            taken += 1
    return keep


# ------------------------------------------------------------------------------------------------------ main
def env_report(path: str) -> int:
    """GPU, driver and the versions of everything the checks use (the header of every table)."""
    import platform

    report = {"python": platform.python_version(), "host": platform.node()}
    for mod in ("torch", "transformers", "triton", "accelerate", "peft", "datasets", "deepspeed", "safetensors"):
        try:
            report[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - a missing package is a finding, not a failure
            report[mod] = f"not importable ({type(err).__name__})"
    import torch

    report["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
        report["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        report["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        if q.returncode == 0 and q.stdout.strip():
            report["driver"] = q.stdout.split(",")[1].strip()
    print(json.dumps(report, indent=1))
    Path(path).write_text(json.dumps(report))
    return 0


def main(argv=None) -> int:
    if argv and argv[0] == "env":
        ap = argparse.ArgumentParser()
        ap.add_argument("env")
        ap.add_argument("--json", required=True)
        return env_report(ap.parse_args(argv).json)
    if argv and argv[0] == "make-inputs":
        ap = argparse.ArgumentParser()
        ap.add_argument("make_inputs")
        ap.add_argument("inputs", type=Path)
        ap.add_argument("--tokenizer", type=Path)
        ap.add_argument("--tiny", action="store_true")
        a = ap.parse_args(argv)
        make_pretrain_inputs(a.inputs, a.tokenizer, a.tiny)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=os.environ.get("OUT"), help="where the results go (default $OUT)")
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                    help="tiny shapes on the CPU: checks every stage in seconds (also GPU_CHECK_DRY_RUN=1)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default 540)")
    ap.add_argument("--only", default="", help="comma list of stage names to run (default all)")
    ap.add_argument("--tokenizer", default=None, help="the SmolLM2 tokenizer folder for the pretraining stages "
                    "(default $UPCYCLED_MOE_TEST_CACHE/smollm2-tokenizer)")
    ap.add_argument("--jobs", type=int, default=1, help="dry run only: stages run at once (timings need 1 on a GPU)")
    args = ap.parse_args(argv)
    if args.jobs < 1 or (args.jobs > 1 and not args.dry_run):
        print(f"error: --jobs {args.jobs}: give 1, or more only with --dry-run (GPU timings need the stages one at a "
              "time)", file=sys.stderr)
        return 2
    if not args.outdir:
        print("error: no output folder: give one (gpu_check.sh OUTDIR) or set $OUT", file=sys.stderr)
        return 2
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        print(f"error: output folder {out} is a file; give a folder", file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; run with --dry-run to check the script on a CPU", file=sys.stderr)
            return 2
    cache = Path(os.environ.get("UPCYCLED_MOE_TEST_CACHE", Path.home() / ".cache" / "upcycled_moe_tests"))
    tokenizer = Path(args.tokenizer) if args.tokenizer else cache / "smollm2-tokenizer"
    only = {s for s in args.only.split(",") if s}
    names = [s["name"] for s in stage_plan(args.dry_run, Path("work"), tokenizer)]
    if only - set(names):
        print(f"error: --only names unknown stages {sorted(only - set(names))}; the stages are {', '.join(names)}",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.budget
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path,
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "UPCYCLED_MOE_TEST_CACHE": str(cache)}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, also on a machine with a GPU
    summary = {"schema": 1, "dry_run": args.dry_run, "date": datetime.datetime.now(datetime.timezone.utc)
               .strftime("%Y-%m-%d %H:%M UTC"), "budget_s": args.budget, "elapsed_s": 0.0,
               "command": " ".join([Path(__file__).name, *(argv if argv is not None else sys.argv[1:])]),
               "env": None, "stages": [], "targets": []}
    plan = [s for s in stage_plan(args.dry_run, work, tokenizer) if not only or s["name"] in only]
    order = {s["name"]: i for i, s in enumerate(plan)}
    lock = threading.Lock()

    def one(stage):
        print(f"[gpu_check] {stage['name']} ...", flush=True)
        record = run_stage(stage, work, deadline, env)
        stage_results(record, work)
        print(f"[gpu_check] {stage['name']}: {record['status']} ({record['seconds']:.0f} s) {record.get('reason', '')}",
              flush=True)
        with lock:  # the output folder is rewritten after every stage: a run killed from outside keeps its results
            summary["stages"] = sorted(summary["stages"] + [record], key=lambda r: order[r["name"]])
            if record["name"] == "env":
                summary["env"] = record.get("result")
            if record["name"] == "moe_layer" and (work / "moe_layer.md").exists():
                summary["moe_layer_md"] = (work / "moe_layer.md").read_text()
            summary["profile_top"] = profile_top(work)
            summary["targets"] = evaluate_targets(summary["stages"], args.dry_run)
            summary["elapsed_s"] = round(time.monotonic() - start, 1)
            write_outputs(out, work, summary)

    try:
        if args.jobs == 1:
            for stage in plan:
                one(stage)
        else:  # dry run only: the stages share no files but the pretraining inputs, made atomically
            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                for future in [pool.submit(one, stage) for stage in plan]:
                    future.result()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [s["name"] for s in summary["stages"] if s["status"] in ("failed", "timeout")]
    print(f"[gpu_check] done in {summary['elapsed_s']:.0f} s; results in {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
