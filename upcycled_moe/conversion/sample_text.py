"""Real English text available offline: CPython's pydoc topics (about 465 KB of technical prose).

Calibration and verification use disjoint halves (even / odd topics in sorted order), so the perplexity reported by
`verify` is measured on text the calibrated scale never saw.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UpcycleError, read_utf8


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
    text = read_utf8(p, "text file")
    if not text.strip():
        raise UpcycleError(f"text file {str(p)!r} is empty")
    return text
