"""What an inbound message says, read with the standard library's ``email`` parser.

Pure: bytes in, a ``Report`` out; no store, no clock. Attribution (which member, which
message) is the processor's (processor.py), from what this finds.

    multipart/report; report-type=delivery-status   (RFC 3464 DSN)
        -> "dsn": one ``RecipientReport`` per per-recipient block (Final-Recipient,
           Action, Status, Diagnostic-Code, Remote-MTA), and the returned message's headers
    multipart/report; report-type=feedback-report   (RFC 5965 ARF)
        -> "arf": Feedback-Type, Original-Mail-From, Original-Rcpt-To, Source-IP, and the
           reported message's headers (X-Atmos-Member-Did, Feedback-ID, Message-ID, To)
    anything else
        -> "plain": Subject and From, and for a bounce that is not a DSN (an old MTA's
           text), the first enhanced status code in its text

A message the parser cannot read at all is "unparseable": the processor keeps and counts
it. Nothing here raises for any input (the fuzz-style test feeds it garbage).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import re
from typing import Final

import attrs

from atmosrelay._text import printable

_STATUS: Final = re.compile(rb"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
MAX_FIELD: Final = 500  # characters kept of any one field


@attrs.frozen
class RecipientReport:
    """One per-recipient block of a DSN."""

    recipient: str  # Final-Recipient's address (the type prefix removed)
    original: str  # Original-Recipient's address, or ""
    action: str  # failed, delayed, delivered, relayed, expanded (lower case)
    status: str  # the enhanced status code, e.g. 5.1.1 ("" when missing)
    diagnostic: str
    remote_mta: str


@attrs.frozen
class Report:
    shape: str  # "dsn", "arf", "plain" or "unparseable"
    subject: str = ""
    from_address: str = ""  # the From header's address, lower case
    recipients: tuple[RecipientReport, ...] = ()
    feedback_type: str = ""  # ARF: abuse, fraud, virus, other, not-spam, ...
    original_mail_from: str = ""  # ARF
    original_rcpt_to: tuple[str, ...] = ()  # ARF
    source_ip: str = ""  # ARF
    # headers of the message the report is about (DSN: the returned message; ARF: the
    # reported one), lower-case name -> first value
    about: dict[str, str] = attrs.field(factory=dict)
    text_status: str = ""  # plain: the first enhanced status code in the text
    problem: str = ""  # unparseable: what went wrong


def _clip(value: object) -> str:
    return printable(str(value or ""))[:MAX_FIELD].strip()


def _address(value: str) -> str:
    """The address of a DSN or ARF address field ("rfc822; a@b", "<a@b>", "a@b")."""
    _, _, rest = value.rpartition(";") if ";" in value else ("", "", value)
    _, addr = email.utils.parseaddr(rest.strip())
    return (addr or rest.strip().strip("<>")).strip()


def _headers(msg: email.message.Message) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in msg.items():
        out.setdefault(name.lower(), _clip(value))
    return out


def _about(part: email.message.Message) -> dict[str, str]:
    """Headers of an embedded message (message/rfc822, or text/rfc822-headers)."""
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], email.message.Message):
            return _headers(inner[0])
        return {}
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return _headers(email.message_from_bytes(payload, policy=email.policy.compat32))
    return {}


def parse(raw: bytes) -> Report:
    try:
        return _parse(raw)
    except Exception as exc:  # the parser's own failure on a hostile message: kept, counted
        return Report("unparseable", problem=_clip(f"{type(exc).__name__}: {exc}"))


def _parse(raw: bytes) -> Report:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    subject = _clip(msg.get("Subject", ""))
    from_address = email.utils.parseaddr(_clip(msg.get("From", "")))[1].lower()
    base = Report("plain", subject=subject, from_address=from_address)
    if msg.get_content_type() == "multipart/report":
        report_type = str(msg.get_param("report-type") or "").lower()
        parts = _messages(msg.get_payload())
        if not parts:
            return attrs.evolve(base, shape="unparseable", problem="a report without parts")
        if report_type == "delivery-status":
            return _dsn(parts, base)
        if report_type == "feedback-report":
            return _arf(parts, base)
    status = _STATUS.search(_text(msg))
    return attrs.evolve(base, text_status=b".".join(status.groups()).decode() if status else "")


def _messages(payload: object) -> list[email.message.Message]:
    if not isinstance(payload, list):
        return []
    return [p for p in payload if isinstance(p, email.message.Message)]


def _text(msg: email.message.Message) -> bytes:
    """The text parts' bytes (bounded), to look for a status code in a non-DSN bounce."""
    out = b""
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                out += payload[:65536]
        if len(out) > 262144:
            break
    return out


def _dsn(parts: list[email.message.Message], base: Report) -> Report:
    recipients: list[RecipientReport] = []
    about: dict[str, str] = {}
    for part in parts:
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            for block in _messages(part.get_payload())[1:]:  # the first block is per-message
                final = _clip(block.get("Final-Recipient", ""))
                if not final:
                    continue
                status = _STATUS.search(_clip(block.get("Status", "")).encode())
                recipients.append(
                    RecipientReport(
                        recipient=_address(final).lower(),
                        original=_address(_clip(block.get("Original-Recipient", ""))).lower(),
                        action=_clip(block.get("Action", "")).lower(),
                        status=b".".join(status.groups()).decode() if status else "",
                        diagnostic=_clip(block.get("Diagnostic-Code", "")),
                        remote_mta=_address(_clip(block.get("Remote-MTA", ""))),
                    )
                )
        elif ctype in ("message/rfc822", "text/rfc822-headers", "message/global"):
            about = about or _about(part)
    if not recipients:
        return attrs.evolve(
            base, shape="unparseable", problem="a delivery-status report with no recipient"
        )
    return attrs.evolve(base, shape="dsn", recipients=tuple(recipients), about=about)


def _arf(parts: list[email.message.Message], base: Report) -> Report:
    fields: email.message.Message | None = None
    about: dict[str, str] = {}
    for part in parts:
        ctype = part.get_content_type()
        if ctype == "message/feedback-report":
            inner = _messages(part.get_payload())
            if inner:  # a parser that read it as a message
                fields = inner[0]
            else:
                text = part.get_payload(decode=True)
                if isinstance(text, bytes):
                    fields = email.message_from_bytes(
                        text.lstrip(b"\r\n"), policy=email.policy.compat32
                    )
        elif ctype in ("message/rfc822", "text/rfc822-headers"):
            about = about or _about(part)
    if fields is None:
        return attrs.evolve(
            base, shape="unparseable", problem="a feedback report with no report part"
        )
    return attrs.evolve(
        base,
        shape="arf",
        feedback_type=_clip(fields.get("Feedback-Type", "")).lower(),
        original_mail_from=_address(_clip(fields.get("Original-Mail-From", ""))).lower(),
        original_rcpt_to=tuple(
            _address(_clip(v)).lower() for v in fields.get_all("Original-Rcpt-To", [])
        ),
        source_ip=_clip(fields.get("Source-IP", "")),
        about=about,
    )
