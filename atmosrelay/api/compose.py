"""A ``POST /v1/send`` body made into a message, with the standard library's ``email``.

The JSON gives the parts; the message is text/plain, text/html, or multipart/alternative
with both. The encodings are the ``email`` package's: display names and non-ASCII or long
header values as RFC 2047 encoded words, folded (``email.utils.formataddr``,
``email.header.Header``), non-ASCII bodies or bodies with over-long lines as UTF-8
quoted-printable (``email.quoprimime``); an ASCII body whose lines fit goes as 7bit. So the
output is 7-bit: it needs neither 8BITMIME nor SMTPUTF8 unless an address itself is not
ASCII. The few structural lines around them (the header names, MIME-Version, the part
headers, a random boundary) are written here: ``EmailMessage`` writes the same message
at 0.7 ms of CPU, ten times this, which was a third of a send's cost (bench/README.md).
``tests/api/test_compose.py`` parses what this writes with the ``email`` package and
checks every field and part comes back as given.

The relay's own settings go in as the same ``X-Atmos-*`` headers an SMTP client would
write, so the acceptance pipeline reads both ways in with one parser (message/headers.py).

What a client may not set in ``headers``: the fields the JSON has its own place for (From,
To, Subject, Reply-To), the ones the relay writes (DKIM-Signature, List-Unsubscribe,
List-Unsubscribe-Post, Feedback-ID, X-Atmos-*, X-Postscale-*), those of the MIME structure
(Content-Type, Content-Transfer-Encoding, MIME-Version), and those that would send mail to
someone the envelope does not name (Cc, Bcc, Sender). Each is refused naming the header.
"""

from __future__ import annotations

import email.utils
import json
import re
from email import quoprimime
from email.header import Header
from typing import Final

import attrs

from atmosrelay._random import RANDOM
from atmosrelay.api.models import SendRequest
from atmosrelay.queue.records import Recipient
from atmosrelay.smtp import Address, AddressError, parse_path
from atmosrelay.smtp import replies as R
from atmosrelay.submission.pipeline import Envelope

RESERVED: Final = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "sender",
        "dkim-signature",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "feedback-id",
        "content-type",
        "content-transfer-encoding",
        "mime-version",
    }
)
RESERVED_PREFIXES: Final = ("x-atmos-", "x-postscale-")
_FIELD_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
# "addr@domain" or "Display Name <addr@domain>": one mailbox, nothing around it.
_MAILBOX: Final = re.compile(
    r"\s*(?:(?P<name>[^<>]*?)\s*<(?P<addr>[^<>\s]+)>|(?P<bare>[^<>\s,;]+))\s*"
)
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
MAX_LINE: Final = 998  # octets in a line, CRLF excluded (RFC 5322 2.1.1)


class ComposeError(ValueError):
    """The request cannot be made into a message; the text names the field."""


@attrs.frozen
class Composed:
    envelope: Envelope
    message: bytes
    message_id: str


def _text(value: str, field: str) -> str:
    """A header value as given: no control character (a CR or LF would start a header of
    the client's choosing; a tab is fine)."""
    if _CONTROL.search(value):
        raise ComposeError(f"{field}: a control character (line break, NUL, ...) in the value")
    return value


def _mailbox(value: str, field: str) -> tuple[str, Address]:
    """(display name, address) of one ``"addr"`` or ``"Name <addr>"``; the address is
    parsed as SMTP would parse it in MAIL or RCPT."""
    _text(value, field)
    found = _MAILBOX.fullmatch(value)
    if found is None:
        raise ComposeError(f"{field}: {value[:80]!r} is not one address")
    name = (found["name"] or "").strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].replace('\\"', '"')
    addr = found["addr"] or found["bare"]
    if "@" not in addr:
        raise ComposeError(f"{field}: {value[:80]!r} is not an address")
    try:
        return name, parse_path(f"<{addr}>", allow_null=False, bad=R.BAD_RECIPIENT_SYNTAX)
    except AddressError:
        raise ComposeError(f"{field}: {addr[:80]!r} is not an address") from None


def _list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def compose(req: SendRequest, *, hostname: str) -> Composed:
    """Raises ComposeError naming what is wrong."""
    if req.text is None and req.html is None:
        raise ComposeError("give text, html, or both")
    from_name, from_addr = _mailbox(req.from_, "from")
    to = [_mailbox(v, "to") for v in _list(req.to)]
    reply_to = [_mailbox(v, "replyTo") for v in _list(req.replyTo)]
    for name, value in req.headers.items():
        key = name.lower()
        if not _FIELD_NAME.fullmatch(name):
            raise ComposeError(f"headers: {name[:80]!r} is not a header field name")
        if key in RESERVED or key.startswith(RESERVED_PREFIXES):
            raise ComposeError(f"headers: {name} is set by the relay or by its own field")
        _text(value, f"headers: {name}")
    _text(req.subject, "subject")
    addresses = [from_addr, *(a for _, a in to), *(a for _, a in reply_to)]
    utf8 = not all(a.is_ascii for a in addresses)
    message_id = f"<{RANDOM.take(16).hex()}@{hostname}>"
    head = [
        f"From: {_address(from_name, from_addr)}",
        f"To: {_addresses(to)}",
        *([f"Reply-To: {_addresses(reply_to)}"] if reply_to else []),
        _field("Subject", req.subject),
        f"Message-ID: {message_id}",
        *(_field(name, value) for name, value in req.headers.items()),
        *([f"X-Atmos-Category: {req.category}"] if req.category is not None else []),
        *([_own("X-Atmos-Tags", ", ".join(req.tags))] if req.tags else []),
        *(
            [_own("X-Atmos-Metadata", json.dumps(req.metadata, ensure_ascii=True))]
            if req.metadata
            else []
        ),
        "MIME-Version: 1.0",
    ]
    if req.text is not None and req.html is not None:
        boundary = f"=_{RANDOM.take(16).hex()}"  # 128 random bits: in no content
        head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        body = (
            f"\r\n--{boundary}\r\n{_part(req.text, 'plain')}"
            f"\r\n--{boundary}\r\n{_part(req.html, 'html')}"
            f"\r\n--{boundary}--\r\n"
        )
        message = "\r\n".join(head) + "\r\n" + body
    else:
        content, subtype = (req.text, "plain") if req.text is not None else (req.html, "html")
        assert content is not None
        message = "\r\n".join(head) + "\r\n" + _part(content, subtype)
    envelope = Envelope(
        sender=str(from_addr),
        sender_domain=_sender_domain(from_addr),
        recipients=tuple(Recipient(str(a)) for _, a in to),
        smtputf8=utf8,
        eight_bit=utf8,
    )
    return Composed(envelope, message.encode("utf-8"), message_id)


def _sender_domain(address: Address) -> str:
    """The domain as the account store spells it (IDNA, lower case), as SMTP's MAIL has it."""
    try:
        return address.domain_ascii
    except AddressError:
        raise ComposeError(f"from: {address.domain[:80]!r} is not a domain name") from None


def _address(name: str, address: Address) -> str:
    """``addr``, or ``Name <addr>`` with the name quoted or encoded by the email package."""
    addr = str(address)
    return email.utils.formataddr((name, addr), charset="utf-8") if name else addr


def _addresses(mailboxes: list[tuple[str, Address]]) -> str:
    return ",\r\n ".join(_address(n, a) for n, a in mailboxes)  # folded: 50 fit any line


def _fold(name: str, value: str) -> str | None:
    """``Name: value`` folded before spaces of the value (unfolding gives it back exactly),
    lines kept near 78 octets; None when a run without a space would pass MAX_LINE."""
    line, lines = f"{name}:", []
    for i, word in enumerate(value.split(" ")):
        piece = f" {word}"
        if i and len(line) + len(piece) > 78:
            lines.append(line)
            line = ""
        line += piece
    lines.append(line)
    if any(len(x) > MAX_LINE for x in lines):
        return None
    return "\r\n".join(lines)


def _field(name: str, value: str) -> str:
    """One header field as a reader will decode it: plain (folded) when it is ASCII, starts
    with no white space and holds nothing that reads as an encoded word; else RFC 2047
    encoded words by the email package, which fold anywhere and keep every character."""
    if value.isascii() and value[:1] not in (" ", "\t") and "=?" not in value:
        folded = _fold(name, value)
        if folded is not None:
            return folded
    return f"{name}: " + Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def _own(name: str, value: str) -> str:
    """An X-Atmos-* field: read back by the relay itself (message/headers.py), which
    unfolds but does not decode encoded words, so it is only ever folded."""
    folded = _fold(name, value)
    if folded is None:
        field = name.removeprefix("X-Atmos-").lower()
        raise ComposeError(f"{field}: a run of {MAX_LINE} characters without a space")
    return folded


def _part(content: str, subtype: str) -> str:
    """The part's own headers, a blank line, and its body with CRLF line ends: 7bit when it
    is ASCII with lines that fit, else UTF-8 quoted-printable by the email package."""
    lines = content.splitlines()
    if content.isascii() and all(len(line) <= MAX_LINE for line in lines):
        charset, cte = "us-ascii", "7bit"
        body = "".join(line + "\r\n" for line in lines)
    else:
        charset, cte = "utf-8", "quoted-printable"
        raw = "\r\n".join(lines).encode("utf-8").decode("latin-1")
        body = quoprimime.body_encode(raw, 76, "\r\n") + "\r\n"
    return (
        f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n\r\n{body}"
    )
