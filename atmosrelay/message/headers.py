"""Header processing at acceptance: read the relay's own headers, stamp ours, touch nothing else.

The header section is parsed as RFC 5322 bytes (fields ``name: value``, continuation lines
starting with a space or tab, the section ending at the first empty line); the body bytes
after it are kept exactly as received. A header section that does not parse is refused
(554 5.6.0, with what is wrong).

Read and removed: ``X-Atmos-Category`` (``transactional``, ``login-link``,
``password-reset``, ``mfa-otp`` and ``verification`` are transactional; anything else, or
none, is bulk), ``X-Atmos-Tags`` (comma-separated, at most 10, each at most 64 characters)
and ``X-Atmos-Metadata`` (a JSON object of string to string, at most 1 KiB). An invalid one
is refused naming the header. ``X-Postscale-Tags`` and ``X-Postscale-Metadata`` are read
and removed as the same two (a client set up for that relay works unchanged); a message
with both spellings of one is refused.

``From`` must appear once (and ``Sender`` at most once); their values are handed back for
the policy to check against the member's domains (atmosrelay/policy/sender.py).

Added: ``Date`` and ``Message-ID`` when missing; ``X-Atmos-Member-Did`` (the sender's DID, to
attribute complaints and bounces) and ``Feedback-ID`` in Gmail's feedback-loop form
``a:b:c:SenderId``, here ``<first tag or "none">:<DID's method-specific id>:<category>:<sender id>``
(the sender id is the operator's domain).

RFC 8058 one-click unsubscribe: one message may go to several recipients and the token is per
recipient, so ``List-Unsubscribe`` and ``List-Unsubscribe-Post`` are added at delivery, to each
recipient's copy, before DKIM signing (``unsubscribe_headers``). The journal keeps one copy of
the message and the ``bulk`` flag.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import hmac
import json
import re
from typing import Final
from urllib.parse import quote

import attrs

from atmosrelay._random import RANDOM

TRANSACTIONAL: Final = frozenset(
    {"transactional", "login-link", "password-reset", "mfa-otp", "verification"}
)
CATEGORY_HEADER: Final = "x-atmos-category"
TAGS_HEADER: Final = "x-atmos-tags"
METADATA_HEADER: Final = "x-atmos-metadata"
TAGS_ALIAS: Final = "x-postscale-tags"
METADATA_ALIAS: Final = "x-postscale-metadata"
OWN_HEADERS: Final = frozenset(
    {CATEGORY_HEADER, TAGS_HEADER, METADATA_HEADER, TAGS_ALIAS, METADATA_ALIAS}
)
STAMPED: Final = frozenset({"x-atmos-member-did", "feedback-id"})  # a client may not forge these
MAX_TAGS: Final = 10
MAX_TAG: Final = 64
MAX_METADATA: Final = 1024
MAX_HEADER_SECTION: Final = 1024 * 1024
_FIELD_NAME: Final = re.compile(
    rb"[\x21-\x39\x3b-\x7e]+"
)  # printable ASCII but ":" (RFC 5322 3.6.8)
_TAG: Final = re.compile(r"[A-Za-z0-9_.\-]+")
_FOLD: Final = re.compile(r"\r\n([ \t])")  # a fold: the CRLF goes, the space stays


class MessageError(ValueError):
    """The message is refused; ``detail`` says why (it goes into the 554 reply, with the
    enhanced status ``status``: 5.6.0 by default, 5.6.7 for 8-bit headers without SMTPUTF8)."""

    def __init__(self, detail: str, status: str = "5.6.0") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


_EIGHT_BIT: Final = re.compile(rb"[\x80-\xff]")


def check_octets(message: bytes, *, smtputf8: bool, eight_bit_mime: bool) -> None:
    """Refuse what a downstream server could read differently from us (docs/security.md):

    - NUL anywhere (RFC 5322 section 2.1 forbids it; a server that strips NULs could see an
      end of data, or a header, that we did not);
    - raw 8-bit octets in the header section unless MAIL said SMTPUTF8 (RFC 6531 section
      3.2: only then may headers carry UTF-8), with 5.6.7;
    - 8-bit octets in the body unless MAIL said BODY=8BITMIME (RFC 6152) or SMTPUTF8.

    Each names the line. Two scans of C speed on the 250 path (``in`` and ``isascii``);
    the line is found only for a message being refused.
    """
    nul = message.find(b"\0")
    if nul != -1:
        raise MessageError(f"NUL octet on line {_line_of(message, nul)}")
    if smtputf8 or message.isascii():  # SMTPUTF8 implies 8-bit content (RFC 6531 3.1)
        return
    end = message.find(b"\r\n\r\n")
    head_end = len(message) if end == -1 else end + 2
    found = _EIGHT_BIT.search(message, 0, head_end)
    if found is not None:
        raise MessageError(
            f"8-bit octet in header line {_line_of(message, found.start())} "
            "without SMTPUTF8 (RFC 6531)",
            "5.6.7",
        )
    if not eight_bit_mime:
        found = _EIGHT_BIT.search(message, head_end)
        if found is not None:
            raise MessageError(
                f"8-bit octet on line {_line_of(message, found.start())} of the message "
                "without BODY=8BITMIME (RFC 6152)"
            )


def _line_of(message: bytes, index: int) -> int:
    return message.count(b"\r\n", 0, index) + 1


@attrs.frozen
class Field:
    name: str  # as written
    raw: bytes  # the whole field, folded lines and final CRLF included

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def value(self) -> str:
        text = self.raw.split(b":", 1)[1].decode("utf-8", "replace")
        if text.find("\r\n") in (-1, len(text) - 2):  # one line: nothing to unfold
            return text.strip()
        return _FOLD.sub(r"\1", text).strip()


def split_header(message: bytes) -> tuple[list[Field], bytes]:
    """(header fields, body bytes). Raises MessageError if the section does not parse."""
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    elif end == -1:
        if len(message) > MAX_HEADER_SECTION:
            raise MessageError("no end to the header section")
        head, body = message if message.endswith(b"\r\n") else message + b"\r\n", b""
    else:
        head, body = message[: end + 2], message[end + 4 :]
    if len(head) > MAX_HEADER_SECTION:
        raise MessageError("header section over 1 MiB")
    fields: list[Field] = []
    lines = head.split(b"\r\n")[:-1]
    current: list[bytes] = []
    for number, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            if not current:
                raise MessageError("the header section starts with a continuation line")
            current.append(line)
            continue
        if current:
            fields.append(_field(current))
        name, colon, _ = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise MessageError(f"header line {number} is not 'Name: value'")
        current = [line]
    if current:
        fields.append(_field(current))
    return fields, body


def _field(lines: list[bytes]) -> Field:
    raw = b"\r\n".join(lines) + b"\r\n"
    return Field(raw.split(b":", 1)[0].decode("ascii"), raw)


@attrs.frozen
class Processed:
    message: bytes
    category: str
    bulk: bool
    tags: tuple[str, ...]
    metadata: dict[str, str]
    message_id: str
    from_value: str = ""  # the From field's value, unfolded
    sender_value: str | None = None  # the Sender field's, if any


def _one(index: dict[str, list[Field]], key: str) -> Field | None:
    found = index.get(key)
    if not found:
        return None
    if len(found) > 1:
        raise MessageError(f"more than one {found[0].name} header")
    return found[0]


def _either(index: dict[str, list[Field]], key: str, alias: str) -> Field | None:
    ours, theirs = _one(index, key), _one(index, alias)
    if ours is not None and theirs is not None:
        raise MessageError(f"both {ours.name} and {theirs.name}; send one")
    return ours or theirs


def _tags(field: Field | None) -> tuple[str, ...]:
    if field is None:
        return ()
    tags = tuple(t.strip() for t in field.value.split(",") if t.strip())
    if len(tags) > MAX_TAGS:
        raise MessageError(f"{field.name} has {len(tags)} tags; at most {MAX_TAGS}")
    for tag in tags:
        if len(tag) > MAX_TAG or not _TAG.fullmatch(tag):
            raise MessageError(
                f"{field.name}: {tag[:70]!r} is not a tag (letters, digits, '_', '.', '-'; "
                f"at most {MAX_TAG})"
            )
    return tags


def _metadata(field: Field | None) -> dict[str, str]:
    if field is None:
        return {}
    text = field.value
    if len(text.encode("utf-8")) > MAX_METADATA:
        raise MessageError(f"{field.name} is over {MAX_METADATA} bytes")
    try:
        data = json.loads(text)
    except ValueError:
        raise MessageError(f"{field.name} is not JSON") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise MessageError(f"{field.name} must be a JSON object of string to string")
    return data


@functools.lru_cache(maxsize=4)
def _date_header(second: int) -> bytes:
    """The Date header added at ``second`` (formatdate shows whole seconds): made once a
    second, not once a message, as it cost 2-3% of accepting a message without one."""
    return f"Date: {email.utils.formatdate(second, usegmt=True)}\r\n".encode()


def process(
    message: bytes, *, did: str, operator_domain: str, hostname: str, now: float
) -> Processed:
    """Read and remove the X-Atmos-* headers, add Date/Message-ID if missing, stamp ours.
    Raises MessageError naming what is wrong."""
    fields, body = split_header(message)
    index: dict[str, list[Field]] = {}
    for f in fields:
        index.setdefault(f.key, []).append(f)
    from_field = _one(index, "from")
    if from_field is None:
        raise MessageError("no From header")
    sender_field = _one(index, "sender")
    category_field = _one(index, CATEGORY_HEADER)
    category = category_field.value.strip().lower() if category_field else "bulk"
    if category_field is not None and not _TAG.fullmatch(category or "-"):
        raise MessageError(f"X-Atmos-Category: {category[:40]!r} is not a category name")
    tags = _tags(_either(index, TAGS_HEADER, TAGS_ALIAS))
    metadata = _metadata(_either(index, METADATA_HEADER, METADATA_ALIAS))
    bulk = category not in TRANSACTIONAL
    kept = [f for f in fields if f.key not in OWN_HEADERS and f.key not in STAMPED]
    added: list[bytes] = []
    if _one(index, "date") is None:
        added.append(_date_header(int(now)))
    mid_field = _one(index, "message-id")
    if mid_field is None:
        message_id = f"<{RANDOM.take(16).hex()}@{hostname}>"
        added.append(f"Message-ID: {message_id}\r\n".encode())
    else:
        message_id = mid_field.value
    member = did.split(":", 2)[2]
    feedback = f"{tags[0] if tags else 'none'}:{member}:{category}:{operator_domain}"
    stamps = [
        f"X-Atmos-Member-Did: {did}\r\n".encode(),
        f"Feedback-ID: {feedback}\r\n".encode(),
    ]
    head = b"".join(stamps) + b"".join(f.raw for f in kept) + b"".join(added)
    return Processed(
        head + b"\r\n" + body,
        category,
        bulk,
        tags,
        metadata,
        message_id,
        from_field.value,
        sender_field.value if sender_field is not None else None,
    )


def unsubscribe_token(secret: bytes, did: str, recipient: str) -> str:
    """An HMAC bound to the member and the recipient: the unsubscribe URL proves itself."""
    mac = hmac.new(secret, f"{did}\0{recipient.lower()}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:20]).decode("ascii").rstrip("=")


def unsubscribe_headers(
    *, secret: bytes, did: str, recipient: str, base_url: str, mailto_domain: str
) -> bytes:
    """RFC 8058 headers for one recipient's copy of a bulk message (added at delivery)."""
    token = unsubscribe_token(secret, did, recipient)
    query = f"did={did}&rcpt={recipient}&t={token}".replace("@", "%40").replace(":", "%3A")
    url = f"{base_url.rstrip('/')}/unsubscribe?{query}"
    # the mailto's subject carries the member and the recipient too, so a reply to it
    # proves itself as the one-click POST does (atmosrelay/inbound/addresses.py)
    subject = quote(f"unsubscribe {did} {recipient} {token}", safe="")
    mailto = f"mailto:unsubscribe@{mailto_domain}?subject={subject}"
    return (
        f"List-Unsubscribe: <{url}>, <{mailto}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    ).encode()
