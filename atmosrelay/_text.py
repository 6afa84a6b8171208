"""Peer bytes made fit for a log line or a journal record: printable, escaped, bounded.

Whatever a client or a remote server sends (control characters, an ANSI escape, invalid
UTF-8, a megabyte on one line) is shown as text an operator can read and cannot be fooled by:
non-printable characters are escaped as Python does in ``repr``, and the result is cut to
``limit`` characters of the input with a marker saying how much was left out.
"""

from __future__ import annotations

import re
import sys
from typing import Final


def printable(data: bytes | str, limit: int = 120) -> str:
    """``data`` escaped and bounded (see the module docstring)."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    shown = repr(text[:limit])[1:-1]
    if len(text) > limit:
        shown += f"...(+{len(text) - limit} chars)"
    return shown


# An API key anywhere in a text: the prefix, the 8-character id, the secret (see
# accounts/api_keys.py). Matched loosely (any length of key characters) so that a
# mistyped or truncated key is caught too.
_KEY: Final = re.compile(r"atmos_([A-Za-z0-9_-]{0,8})[A-Za-z0-9_-]*")


def redact_keys(text: str) -> str:
    """``text`` with every API key cut to its id: ``atmos_<id>…``. The id is not secret
    (it is how keys are listed and revoked); the rest is."""
    return _KEY.sub(lambda m: f"atmos_{m.group(1)}…", text)


def print_error(message: str) -> None:
    """The one way the command line reports an error: ``atmosrelay: <message>`` on stderr,
    with any key in it redacted (an error may quote an argument, and an operator may paste
    a key where an id, a DID or an address belongs)."""
    print(f"atmosrelay: {redact_keys(message)}", file=sys.stderr)
