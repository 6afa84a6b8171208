"""Delivery status notifications (RFC 3464): what goes back to the sender when mail bounces
(``Action: failed``) or is still being retried (``Action: delayed``).

A DSN is ``multipart/report; report-type=delivery-status`` with three parts: a human-readable
explanation, ``message/delivery-status`` (per-message fields, then one block per recipient:
Original-Recipient, Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code with the
remote reply verbatim, Last-Attempt-Date), and the original message's headers
(``text/rfc822-headers``, RFC 6522) or, when the submission asked RET=FULL, the whole message.

DSNs go out with a null reverse path and are signed with the operator key only. A DSN is never
sent about a message that had a null reverse path (no DSN loops, RFC 3461 section 6.2), and
the submission's NOTIFY decides which ones are wanted (RFC 3461 section 4.1).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from typing import Final

import attrs

from atmosrelay._random import RANDOM

HEADER_LIMIT: Final = 64 * 1024  # original headers beyond this are cut (a DSN stays small)
MAX_DIAGNOSTIC: Final = 1000  # characters of the remote's text kept in a DSN


@attrs.frozen
class RecipientStatus:
    recipient: str
    action: str  # "failed" or "delayed"
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str | None  # the remote reply verbatim, e.g. "550 5.1.1 No such user"
    remote_mta: str | None
    last_attempt: float
    original_recipient: tuple[str, str] | None = None  # ORCPT (type, address)


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _diagnostic(s: RecipientStatus) -> str:
    """The remote's text as recorded (already escaped once, by the delivery client), kept
    verbatim but for control characters, which become spaces: a CR or LF would end the
    field and start one of the peer's choosing (the client never lets one through today;
    this does not depend on it). Escaping it again would double every backslash."""
    return _CONTROL.sub(" ", (s.diagnostic or "")[:MAX_DIAGNOSTIC])


def wants_dsn(sender: str, notify: Sequence[str] | None, action: str) -> bool:
    """Whether a DSN of ``action`` is wanted for a recipient with these NOTIFY values."""
    if not sender:  # the message was itself a bounce: never a DSN for a DSN
        return False
    if notify is None:  # RFC 3461 4.1: absent NOTIFY means FAILURE (and DELAY at our choice)
        return action in ("failed", "delayed")
    if "NEVER" in notify:
        return False
    return {"failed": "FAILURE", "delayed": "DELAY"}[action] in notify


def _fields(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{k}: {v}\r\n" for k, v in pairs)


def build_dsn(
    *,
    reporting_mta: str,
    operator_domain: str,
    sender: str,
    original: bytes,
    statuses: Sequence[RecipientStatus],
    envid: str | None,
    arrival: float,
    ret_full: bool,
) -> bytes:
    """The DSN message, CRLF line endings, ready to be queued to ``sender``."""
    delayed = all(s.action == "delayed" for s in statuses)
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    boundary = f"dsn-{RANDOM.take(12).hex()}"
    human = [
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message is still being retried for:"
        if delayed
        else "Your message could not be delivered to:",
    ]
    human += [f"  <{s.recipient}>: {_diagnostic(s) or s.status}" for s in statuses]
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}")]
    if envid:
        per_message.append(("Original-Envelope-Id", envid))
    per_message.append(("Arrival-Date", email.utils.formatdate(arrival, usegmt=True)))
    blocks = [_fields(per_message)]
    for s in statuses:
        fields = []
        if s.original_recipient:
            fields.append(
                ("Original-Recipient", f"{s.original_recipient[0]}; {s.original_recipient[1]}")
            )
        fields += [
            ("Final-Recipient", f"rfc822; {s.recipient}"),
            ("Action", s.action),
            ("Status", s.status),
        ]
        if s.remote_mta:
            fields.append(("Remote-MTA", f"dns; {s.remote_mta}"))
        if s.diagnostic:
            fields.append(("Diagnostic-Code", f"smtp; {_diagnostic(s)}"))
        fields.append(("Last-Attempt-Date", email.utils.formatdate(s.last_attempt, usegmt=True)))
        blocks.append(_fields(fields))
    head, _, _ = original.partition(b"\r\n\r\n")
    if ret_full:
        third = b"Content-Type: message/rfc822\r\n\r\n" + original.rstrip(b"\r\n") + b"\r\n"
    else:
        third = b"Content-Type: text/rfc822-headers\r\n\r\n" + head[:HEADER_LIMIT] + b"\r\n"
    top = _fields(
        [
            ("From", f"Mail Delivery System <MAILER-DAEMON@{operator_domain}>"),
            ("To", sender),
            ("Subject", subject),
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Message-ID", f"<{RANDOM.take(16).hex()}@{reporting_mta}>"),
            ("Auto-Submitted", "auto-replied"),  # RFC 3834: no vacation replies to this
            ("MIME-Version", "1.0"),
            (
                "Content-Type",
                f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
            ),
        ]
    )
    parts = [
        top.encode() + b"\r\n",
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".encode(),
        ("\r\n".join(human) + "\r\n").encode("utf-8"),
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n".encode(),
        "\r\n".join(blocks).encode("utf-8"),
        f"--{boundary}\r\n".encode(),
        third,
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)
