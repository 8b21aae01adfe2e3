"""A failure as the one line of text an ExportError's reason carries."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The exception's first non-blank line (else its type's name), at most 400 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:400]
