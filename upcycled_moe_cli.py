"""Console entry points: `upcycle-moe`, `upcycle-moe-pretrain`, `upcycle-moe-finetune`.

They live outside the `upcycled_moe` package because importing the package registers the model family with
transformers' Auto classes, and that imports torch and transformers: 30-40 s and 430 MB on a small machine, before
`--help` could print a line. Here `--help` and usage errors are answered from the torch-free argument code alone;
only a command that will run imports the package (and then parses its arguments again, the same way).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HELP = ("-h", "--help")


def _package_cli():
    """upcycled_moe/cli.py as a standalone module, without running the package's __init__ (its parser building
    imports nothing heavy; its commands import the package when they run)."""
    path = Path(importlib.util.find_spec("upcycled_moe").submodule_search_locations[0]) / "cli.py"
    spec = importlib.util.spec_from_file_location("_upcycled_moe_cli_arguments", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _exit_without_teardown(status: int):
    """The console script's exit once its command has finished (its files closed): atexit handlers run and the
    streams are flushed, but the interpreter does not tear down the thousands of modules torch and transformers
    loaded (measured 5-13 s of a 50-90 s conversion on a loaded 2-core machine)."""
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(status)


def upcycle_moe(argv: list[str] | None = None) -> int:
    console = argv is None  # the console script; a caller passing argv gets the status back
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _package_cli().build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (one `error:` line, exit 2)
        return int(exc.code or 0)
    from upcycled_moe.cli import main

    status = main(argv)
    if console:
        _exit_without_teardown(status)
    return status


def pretrain(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in HELP for a in argv):
        from trainer_scripts.config import PretrainConfig, describe

        print(describe(PretrainConfig))
        raise SystemExit(0)
    from trainer_scripts.continued_pretraining import main

    main(argv)


def finetune(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in HELP for a in argv) and "--help-all" not in argv:
        from trainer_scripts.config import describe
        from trainer_scripts.finetune import FinetuneArguments  # torch-free at import

        print(describe(FinetuneArguments))
        print("\nPlus every transformers TrainingArguments field (learning_rate, num_train_epochs, ...): "
              "`upcycle-moe-finetune --help-all` lists them (it imports transformers).")
        raise SystemExit(0)
    from trainer_scripts.finetune import main

    main(["--help" if a == "--help-all" else a for a in argv])
