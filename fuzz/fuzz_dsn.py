"""Fuzz the DSN builder (atmosrelay/message/dsn.py): an arbitrary original message and an
arbitrary remote reply (the Diagnostic-Code is the remote's text, verbatim) into
``build_dsn``.

Invariant (fuzz/README.md): no exception; the DSN is CRLF-only with no bare CR or LF (it
is queued and sent like any message, and our client refuses bare line endings), it parses
as multipart/report with exactly the three RFC 3464 parts, and the remote's text cannot
add a field of its own to the delivery-status part. The first byte splits the rest into
the reply and the original.
"""

from __future__ import annotations

import email
import email.policy

from atmosrelay.message.dsn import RecipientStatus, build_dsn
from atmosrelay.smtp._dotstuff import _bare_line_ending
from fuzz._harness import atheris_main


def check_one(data: bytes) -> None:
    if not data:
        return
    cut = data[0] % (len(data))
    reply = data[1 : cut + 1].decode("utf-8", "replace")
    # What the relay accepted: lines end with CRLF and nowhere else (bare CR or LF is
    # refused at acceptance), so the original is made so.
    original = data[cut + 1 :].replace(b"\r", b"").replace(b"\n", b"\r\n")
    dsn = build_dsn(
        reporting_mta="mx.test",
        operator_domain="relay.test",
        sender="alice@example.org",
        original=original,
        statuses=[
            RecipientStatus(
                recipient="bob@example.net",
                action="failed",
                status="5.1.1",
                diagnostic=reply,
                remote_mta="mx.example.net",
                last_attempt=0.0,
            )
        ],
        envid=None,
        arrival=0.0,
        ret_full=bool(data[0] & 1),
    )
    assert not _bare_line_ending(dsn), "bare CR or LF in a DSN"
    parsed = email.message_from_bytes(dsn, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/report"
    parts = parsed.get_payload()
    assert isinstance(parts, list)
    assert len(parts) == 3
    status = parts[1].get_payload()
    text = status[1].as_string() if isinstance(status, list) else str(status)
    fields = {line.split(":", 1)[0].lower() for line in text.splitlines() if ":" in line[:40]}
    assert "x-injected" not in fields, "the remote's reply added a field"


if __name__ == "__main__":  # pragma: no cover
    atheris_main(check_one)
