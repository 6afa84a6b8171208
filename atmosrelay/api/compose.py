"""A ``POST /v1/send`` body made into a message, with the standard library's ``email``.

The JSON gives the parts; ``email.message.EmailMessage`` writes the MIME (text/plain,
text/html, or multipart/alternative with both), the RFC 2047 encoded words of non-ASCII
header values and the quoted-printable or base64 of non-ASCII bodies (7-bit output: the
message needs neither 8BITMIME nor SMTPUTF8 unless an address itself is not ASCII). The
relay's own settings go in as the same ``X-Atmos-*`` headers an SMTP client would write,
so the acceptance pipeline reads both ways in with one parser (message/headers.py).

What a client may not set in ``headers``: the fields the JSON has its own place for (From,
To, Subject, Reply-To), the ones the relay writes (DKIM-Signature, List-Unsubscribe,
List-Unsubscribe-Post, Feedback-ID, X-Atmos-*, X-Postscale-*), those of the MIME structure
(Content-Type, Content-Transfer-Encoding, MIME-Version), and those that would send mail to
someone the envelope does not name (Cc, Bcc). Each is refused naming the header.
"""

from __future__ import annotations

import email.policy
import json
import re
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from typing import Final

import attrs

from atmosrelay._random import RANDOM
from atmosrelay.api.models import SendRequest
from atmosrelay.queue.records import Recipient
from atmosrelay.smtp import AddressError, parse_path
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
_SEVEN_BIT: Final = email.policy.SMTP.clone(cte_type="7bit")
_UTF8: Final = email.policy.SMTPUTF8.clone(cte_type="7bit")


class ComposeError(ValueError):
    """The request cannot be made into a message; the text names the field."""


@attrs.frozen
class Composed:
    envelope: Envelope
    message: bytes
    message_id: str


def _mailbox(value: str, field: str) -> tuple[str, str]:
    """(display name, address) of one ``"addr"`` or ``"Name <addr>"``."""
    if "\r" in value or "\n" in value:
        raise ComposeError(f"{field}: a line break in an address")
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
        parse_path(f"<{addr}>", allow_null=False, bad=R.BAD_RECIPIENT_SYNTAX)
    except AddressError:
        raise ComposeError(f"{field}: {addr[:80]!r} is not an address") from None
    return name, addr


def _domain(addr: str) -> str:
    domain = addr.rpartition("@")[2]
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ComposeError(f"from: the domain {domain[:80]!r} is not a domain name") from None


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
        if "\r" in value or "\n" in value:
            raise ComposeError(f"headers: {name} has a line break in its value")
    addresses = [from_addr, *(a for _, a in to), *(a for _, a in reply_to)]
    utf8 = not all(a.isascii() for a in addresses)
    policy = _UTF8 if utf8 else _SEVEN_BIT
    msg = EmailMessage(policy=policy)
    try:
        msg["From"] = _header_address(from_name, from_addr)
        msg["To"] = [_header_address(n, a) for n, a in to]
        if reply_to:
            msg["Reply-To"] = [_header_address(n, a) for n, a in reply_to]
        msg["Subject"] = req.subject
        message_id = f"<{RANDOM.take(16).hex()}@{hostname}>"
        msg["Message-ID"] = message_id
        for name, value in req.headers.items():
            msg[name] = value
        if req.category is not None:
            msg["X-Atmos-Category"] = req.category
        if req.tags:
            msg["X-Atmos-Tags"] = ", ".join(req.tags)
        if req.metadata:
            msg["X-Atmos-Metadata"] = json.dumps(req.metadata, ensure_ascii=True)
        if req.text is not None:
            msg.set_content(req.text)
            if req.html is not None:
                msg.add_alternative(req.html, subtype="html")
        else:
            assert req.html is not None
            msg.set_content(req.html, subtype="html")
        data = msg.as_bytes(policy=policy)
    except (ValueError, TypeError, IndexError) as exc:  # the email package's own refusals
        raise ComposeError(f"the message could not be written: {_clean(str(exc))}") from None
    envelope = Envelope(
        sender=from_addr,
        sender_domain=_domain(from_addr),
        recipients=tuple(Recipient(a) for _, a in to),
        smtputf8=utf8,
        eight_bit=utf8,
    )
    return Composed(envelope, data, message_id)


def _header_address(name: str, addr: str) -> HeaderAddress:
    local, _, domain = addr.rpartition("@")
    return HeaderAddress(display_name=name, username=local, domain=domain)


def _clean(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:200]
