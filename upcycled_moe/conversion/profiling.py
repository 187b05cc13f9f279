"""Where a conversion's time goes, by phase (read, scale, write, ...), for benchmarks/conversion.py --profile.

Set UPCYCLED_MOE_PROFILE=FILE and `upcycle` writes the seconds spent in each phase to FILE as JSON. Phases are
exclusive (a phase inside another is not counted twice), so they add up to the conversion's time. Off (the
default), `timed` is one global lookup per call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

ENV = "UPCYCLED_MOE_PROFILE"
_totals: dict[str, float] | None = None
_stack: list[list] = []  # [phase, start, time spent in nested phases]


@contextmanager
def timed(phase: str):
    if _totals is None:
        yield
        return
    _stack.append([phase, time.perf_counter(), 0.0])
    try:
        yield
    finally:
        name, start, nested = _stack.pop()
        elapsed = time.perf_counter() - start
        _totals[name] = _totals.get(name, 0.0) + elapsed - nested
        if _stack:
            _stack[-1][2] += elapsed


def seconds_since_process_start() -> float | None:
    """Interpreter start-up and imports before the conversion began (Linux /proc, 10 ms resolution)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


@contextmanager
def profile_session():
    """Profile the enclosed conversion when UPCYCLED_MOE_PROFILE names a file; nothing otherwise."""
    global _totals
    path = os.environ.get(ENV)
    if not path or _totals is not None:
        yield
        return
    before = seconds_since_process_start()
    _totals = {}
    start = time.perf_counter()
    try:
        with timed("other"):
            yield
    finally:
        total = time.perf_counter() - start
        record = {"startup_and_imports_s": before, "conversion_s": total, "phases_s": _totals}
        _totals = None
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
        except OSError as exc:  # a profile is a side note: it never fails a conversion or hides its error
            print(f"warning: could not write the profile to {path}: {exc.strerror or exc}", file=sys.stderr)
