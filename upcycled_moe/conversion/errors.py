"""The single exception type of the conversion tool, and how any other failure is told to the user in one line."""

from __future__ import annotations

import contextlib
import errno
import math
import os


class UpcycleError(ValueError):
    """A user error (bad option, bad source, bad output path). The CLI prints `error: <message>` and exits 2."""

    exit_status = 2


class VerificationFailed(UpcycleError):
    """A measurement failed (verify's thresholds, greedy text, cache consistency): exit status 1, not a usage error."""

    exit_status = 1


def reason(exc: BaseException) -> str:
    """The whole message of a library's exception on one line: transformers' and huggingface_hub's validators put
    the useful part ("hidden size 64 is not a multiple of 5 heads") after a generic first line."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def describe_os_error(exc: OSError) -> str:
    """"<what>: <file>" for permission denied, disk full and friends, with the fix when there is an obvious one."""
    what = exc.strerror or reason(exc)
    where = exc.filename if exc.filename is not None else ""
    hint = {
        errno.ENOSPC: "free some space or choose another output folder",
        errno.EDQUOT: "free some space or choose another output folder",
        errno.EACCES: "check the permissions",
        errno.EPERM: "check the permissions",
        errno.EROFS: "choose a writable output folder",
    }.get(exc.errno)
    text = f"{what}: {where}" if where else what
    return f"{text} ({hint})" if hint else text


def finite_number(value, name: str):
    """`value` as a finite int/float, or UpcycleError. NaN compares false with every bound, so a plain range check
    lets it through (nan < 0 and nan > 1 are both False); every float option goes through here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpcycleError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UpcycleError(f"{name} must be a finite number, got {value!r}")
    return value


# What the command was doing, innermost last: the last-resort handler of the CLI names it in its message.
_STEPS: list[str] = []


@contextlib.contextmanager
def step(what: str):
    """Mark a phase of a command ("reading the source", "writing the output") for error messages."""
    _STEPS.append(what)
    try:
        yield
    except BaseException as exc:
        if getattr(exc, "_upcycle_step", None) is None:
            try:
                exc._upcycle_step = what
            except AttributeError:  # exceptions with __slots__
                pass
        raise
    finally:
        _STEPS.pop()


def step_of(exc: BaseException) -> str | None:
    return getattr(exc, "_upcycle_step", None)


def read_utf8(path, what: str, fix: str = "save it as UTF-8") -> str:
    """The text of a regular, readable UTF-8 file (options, configs, verification text); else one UpcycleError
    saying which file and why. Every text input of the conversion tool is read here."""
    regular_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise UpcycleError(f"{what} {os.fspath(path)!r} is not valid UTF-8 (byte {exc.start}): {fix}") from None
    except OSError as exc:
        raise UpcycleError(f"cannot read the {what}: {describe_os_error(exc)}") from None


def regular_file(path, what: str = "file") -> None:
    """Refuse anything but a regular file before opening it: a FIFO would block the read forever, a device or a
    folder gives a confusing error later."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UpcycleError(f"{what} {os.fspath(path)!r} does not exist") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UpcycleError(f"{what} {os.fspath(path)!r} is {kind}: expected a regular file")
