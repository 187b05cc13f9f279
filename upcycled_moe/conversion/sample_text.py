"""Real English text available offline: CPython's pydoc topics (about 465 KB of technical prose).

Calibration and verification use disjoint halves (even / odd topics in sorted order), so the perplexity reported by
`verify` is measured on text the calibrated scale never saw.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UpcycleError, describe_os_error, regular_file


def _topics(parity: int) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return "\n\n".join(topics[k].strip() for i, k in enumerate(keys) if i % 2 == parity)


def calibration_text() -> str:
    """Text the calibrated scaling measures routing on (even topics)."""
    return _topics(0)


def heldout_text() -> str:
    """Text verification measures on (odd topics): never used for calibration."""
    return _topics(1)


def read_text(path: str | None, default) -> str:
    if path is None:
        return default()
    p = Path(path).expanduser()
    regular_file(p, "text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UpcycleError(f"text file {str(p)!r} is not valid UTF-8 (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise UpcycleError(f"cannot read the text file: {describe_os_error(exc)}") from None
    if not text.strip():
        raise UpcycleError(f"text file {str(p)!r} is empty")
    return text
