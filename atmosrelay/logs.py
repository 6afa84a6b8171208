"""The relay's log lines: an ISO-8601 UTC timestamp on every line, as text or as JSON.

``[relay] log_format = "text"`` (the default) writes

    2026-11-27T00:41:44.123Z INFO atmosrelay.smtp: 01M8... 127.0.0.1 queued 01M8...

and ``"json"`` one object per line, for a log shipper:

    {"ts": "2026-11-27T00:41:44.123Z", "level": "info", "logger": "atmosrelay.smtp",
     "event": "queued", "message": "...", "queue_id": "01M8...", "did": "did:plc:...", ...}

A call site gives its structured fields with ``extra=fields("queued", queue_id=..., ...)``;
the text format shows only the message (which already says the same), the JSON format adds
the fields. A line without fields has the event ``"log"``.

Two rules hold in both formats, whatever a call site does: the final line (message, fields,
traceback) passes through ``redact_keys``, so no API key reaches the log even by mistake;
and a line is one line: peer bytes are escaped where they are logged (``_text.printable``),
and JSON escapes any control character left.

The lifecycle lines (``listening on ...``, ``ready``) go to standard output through the
same formatter on the ``atmosrelay.lifecycle`` logger, always at INFO whatever the level;
everything else goes to standard error at ``[relay] log_level``, which SIGHUP may change.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, TextIO

from atmosrelay._text import redact_keys

FORMATS: Final = ("text", "json")
LIFECYCLE: Final = "atmosrelay.lifecycle"

_FIELDS: Final = "atmos_fields"  # the LogRecord attribute fields() sets


def fields(event: str, **values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the event's name and its structured fields (None values
    are left out)."""
    return {_FIELDS: {"event": event, **{k: v for k, v in values.items() if v is not None}}}


def timestamp(created: float) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2026-11-27T00:41:44.123Z``."""
    whole = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + (
        f".{int((created - whole) * 1000):03d}Z"
    )


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <message>`` (the lifecycle lines: ``<ts> atmosrelay: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == LIFECYCLE:
            line = f"{timestamp(record.created)} atmosrelay: {message}"
        else:
            line = f"{timestamp(record.created)} {record.levelname} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact_keys(line) if "atmos_" in line else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": "log",
            "message": record.getMessage(),
        }
        out.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        line = json.dumps(out, default=str, ensure_ascii=False)
        return redact_keys(line) if "atmos_" in line else line


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log_format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


_OURS: Final = "_atmosrelay_handler"


def configure(
    level: str, fmt: str, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> None:
    """Install the relay's two handlers (replacing any earlier ones of ours): lifecycle lines
    on standard output, the rest on standard error."""
    chosen = formatter(fmt)
    root = logging.getLogger()
    lifecycle = logging.getLogger(LIFECYCLE)
    for logger in (root, lifecycle):
        for old in [h for h in logger.handlers if getattr(h, _OURS, False)]:
            logger.removeHandler(old)
    err = logging.StreamHandler(stderr or sys.stderr)
    out = logging.StreamHandler(stdout or sys.stdout)
    for handler in (err, out):
        handler.setFormatter(chosen)
        setattr(handler, _OURS, True)
    root.addHandler(err)
    set_level(level)
    lifecycle.addHandler(out)
    lifecycle.setLevel(logging.INFO)
    lifecycle.propagate = False


def set_level(level: str) -> None:
    """Change the level of everything but the lifecycle lines (SIGHUP does this)."""
    logging.getLogger().setLevel(level.upper())


def announce(message: str) -> None:
    """A lifecycle line (standard output, always shown)."""
    logging.getLogger(LIFECYCLE).info(message, extra=fields("lifecycle"))
