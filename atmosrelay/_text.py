"""Peer bytes made fit for a log line or a journal record: printable, escaped, bounded.

Whatever a client or a remote server sends (control characters, an ANSI escape, invalid
UTF-8, a megabyte on one line) is shown as text an operator can read and cannot be fooled by:
non-printable characters are escaped as Python does in ``repr``, and the result is cut to
``limit`` characters of the input with a marker saying how much was left out.
"""

from __future__ import annotations


def printable(data: bytes | str, limit: int = 120) -> str:
    """``data`` escaped and bounded (see the module docstring)."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    shown = repr(text[:limit])[1:-1]
    if len(text) > limit:
        shown += f"...(+{len(text) - limit} chars)"
    return shown
