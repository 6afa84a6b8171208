"""Addresses, MAIL/RCPT parameters and EHLO capabilities: parsing and formatting.

Paths follow RFC 5321 section 4.1.2 (extended by RFC 6531 for SMTPUTF8): quoted local parts,
address literals, the null path ``<>``, and source routes (``<@a,@b:user@c>``) accepted and
ignored (section 4.1.1.3 says servers SHOULD NOT use them). Length limits from section
4.5.3.1: local part 64 octets, domain 255, path 256, counted in UTF-8 octets.

Parameters: SIZE (RFC 1870), BODY (RFC 6152; BINARYMIME is not offered), SMTPUTF8 (RFC 6531),
RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT (RFC 3461), AUTH= on MAIL (RFC 4954, kept as is).
A parameter of an extension the server did not advertise is refused with 555 5.5.4.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from atmosrelay.smtp import _replies as R
from atmosrelay.smtp._replies import Reply

MAX_LOCAL_PART: Final = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN: Final = 255  # RFC 5321 4.5.3.1.2
MAX_PATH: Final = 256  # RFC 5321 4.5.3.1.3, angle brackets included
MAX_ENVID: Final = 100  # RFC 3461 4.4
MAX_ORCPT: Final = 500  # RFC 3461 4.2, conservative

# The character classes below are written as what they exclude: a class that names the
# range \u0080-\U0010ffff takes re.compile 6-12 ms to build (it maps the whole range),
# ~25 ms at every start of every process; the complement of a few ASCII characters, under
# a millisecond. tests/protocol/test_commands.py checks each against its definition over
# every code point.
# RFC 5322 atext, plus any non-ASCII character (RFC 6531 extends atext with UTF8-non-ascii):
# [A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff], i.e. all but controls, space, DEL and
# the specials "(),.:;<>@[\]
_ATEXT: Final = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]'
_DOT_STRING: Final = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# qtextSMTP %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP "\" %d32-126, plus UTF-8:
# [\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff] is all but controls, DEL, " and \
_QTEXT: Final = r'[^\x00-\x1f"\\\x7f]'
_QUOTED: Final = re.compile(rf'"(?:{_QTEXT}|\\[\x20-\x7e])*"')
# a domain label: letters, digits and any non-ASCII character, hyphens inside
_LET_DIG: Final = r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"  # [A-Za-z0-9\u0080-\U0010ffff]
_LDH: Final = r"[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"  # the same and "-"
_LABEL: Final = re.compile(rf"{_LET_DIG}(?:{_LDH}*{_LET_DIG})?")
_IPV4: Final = re.compile(
    r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"
)
_XTEXT_CHAR: Final = re.compile(r"\+([0-9A-F]{2})")
_ESMTP_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_ENHANCED: Final = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})")  # ASCII digits only
# The common case in one match: <dot-atom@host.name>, ASCII, LDH labels of 1-63 characters.
_SIMPLE_PATH: Final = re.compile(
    r"<([A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*)"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)>"
)


class AddressError(ValueError):
    """An address or parameter is malformed; ``reply`` says how to answer it."""

    def __init__(self, reply: Reply, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply


@attrs.frozen
class Address:
    """A mailbox ``local@domain``; the null path is ``Address("", "")``."""

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def is_ascii(self) -> bool:
        return self.local.isascii() and self.domain.isascii()

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def domain_ascii(self) -> str:
        """The domain with U-labels as A-labels (IDNA), lower-cased; literals as they are."""
        if self.domain.startswith("["):
            return self.domain
        if self.domain.isascii():  # the common case: nothing for IDNA to do but lower-case
            return self.domain.lower()
        try:
            return self.domain.encode("idna").decode("ascii").lower()
        except UnicodeError as exc:
            raise AddressError(R.BAD_RECIPIENT_SYNTAX, f"bad IDNA domain: {exc}") from None


NULL_PATH: Final = Address("", "")


def _check_domain(domain: str, bad: Reply) -> None:
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        if _IPV4.fullmatch(inner):
            return
        if inner[:5].lower() == "ipv6:":
            import ipaddress  # lazily: rare

            try:
                ipaddress.IPv6Address(inner[5:])
                return
            except ValueError:
                pass
        raise AddressError(bad, "bad address literal")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError(bad, "domain longer than 255 octets")
    labels = domain.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError(bad, "bad domain syntax")


def parse_path(text: str, *, allow_null: bool, bad: Reply, postmaster_ok: bool = False) -> Address:
    """Parse ``<...>`` (the angle brackets included). Raises AddressError with ``bad``."""
    simple = _SIMPLE_PATH.fullmatch(text)
    if simple is not None and len(text) <= MAX_PATH:
        local, domain = simple.group(1), simple.group(2)
        if len(local) <= MAX_LOCAL_PART and len(domain) <= MAX_DOMAIN:
            return Address(local, domain)
    if len(text.encode("utf-8")) > MAX_PATH:
        raise AddressError(bad, "path longer than 256 octets")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError(bad, "path must be in angle brackets")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return NULL_PATH
        raise AddressError(bad, "null path not allowed here")
    if inner.startswith("@"):  # a source route: accepted and ignored (RFC 5321 4.1.1.3)
        route, colon, rest = inner.partition(":")
        if not colon:
            raise AddressError(bad, "bad source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError(bad, "bad source route")
            _check_domain(hop[1:], bad)
        inner = rest
    if postmaster_ok and inner.lower() == "postmaster":
        return Address("postmaster", "")  # RFC 5321 4.1.1.3: <Postmaster> with no domain
    if inner.startswith('"'):
        m = _QUOTED.match(inner)
        if not m or inner[m.end() : m.end() + 1] != "@":
            raise AddressError(bad, "bad quoted local part")
        local, domain = m.group(0), inner[m.end() + 1 :]
    else:
        local, at, domain = inner.rpartition("@")
        if not at or not _DOT_STRING.fullmatch(local):
            raise AddressError(bad, "bad local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError(bad, "local part longer than 64 octets")
    _check_domain(domain, bad)
    return Address(local, domain)


def decode_xtext(value: str) -> str:
    """RFC 3461 section 4: ``+XX`` hex escapes, printable ASCII otherwise."""
    if any(not 33 <= ord(c) <= 126 or c == "=" for c in value):
        raise AddressError(R.PARAMETER_SYNTAX, "bad xtext")
    if "+" in _XTEXT_CHAR.sub("", value):
        raise AddressError(R.PARAMETER_SYNTAX, "bad xtext escape")
    return _XTEXT_CHAR.sub(lambda m: chr(int(m.group(1), 16)), value)


def encode_xtext(value: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


@attrs.frozen
class MailParams:
    size: int | None = None
    body: str | None = None  # "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None
    auth: str | None = None  # RFC 4954 AUTH=, kept verbatim


@attrs.frozen
class RcptParams:
    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of SUCCESS/FAILURE/DELAY
    orcpt: tuple[str, str] | None = None  # (addr-type, decoded address)


@attrs.frozen
class Capabilities:
    """What a server advertises in its EHLO reply; chosen by the caller per connection."""

    pipelining: bool = True
    size: int | None = 50 * 1000 * 1000  # RFC 1870; None: SIZE not advertised
    eightbitmime: bool = True
    smtputf8: bool = True
    enhancedstatuscodes: bool = True
    chunking: bool = True
    dsn: bool = True
    starttls: bool = False
    auth: tuple[str, ...] = ()  # e.g. ("PLAIN", "LOGIN"); empty: AUTH not advertised

    def keywords(self) -> list[str]:
        out = []
        if self.pipelining:
            out.append("PIPELINING")
        if self.size is not None:
            out.append(f"SIZE {self.size}")
        for flag, word in (
            (self.eightbitmime, "8BITMIME"),
            (self.smtputf8, "SMTPUTF8"),
            (self.enhancedstatuscodes, "ENHANCEDSTATUSCODES"),
            (self.chunking, "CHUNKING"),
            (self.dsn, "DSN"),
            (self.starttls, "STARTTLS"),
        ):
            if flag:
                out.append(word)
        if self.auth:
            out.append("AUTH " + " ".join(self.auth))
        return out

    def ehlo_reply(self, hostname: str, client: str) -> Reply:
        greeting = f"{hostname} greets {client}"
        return Reply(250, None, (greeting, *self.keywords()))


def _split_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key) or (eq and not value):
            raise AddressError(R.PARAMETER_SYNTAX, f"bad parameter {item[:20]!r}")
        key = key.upper()
        if key in params:
            raise AddressError(R.PARAMETER_SYNTAX, f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def _need(caps: Capabilities, offered: bool, key: str) -> None:
    if not offered:
        raise AddressError(R.PARAMETER_NOT_IMPLEMENTED, f"{key} not offered")


_NO_MAIL_PARAMS: Final = MailParams()
_NO_RCPT_PARAMS: Final = RcptParams()


def parse_mail_params(text: str, caps: Capabilities) -> MailParams:
    """MAIL FROM parameters. Raises AddressError (501/555/552)."""
    if not text or text.isspace():
        return _NO_MAIL_PARAMS  # frozen, so one instance serves every parameterless MAIL
    p = _split_params(text)
    size = body = ret = envid = auth = None
    smtputf8 = False
    for key, value in p.items():
        if key == "SIZE":
            _need(caps, caps.size is not None, key)
            if value is None or not value.isdigit() or len(value) > 20:
                raise AddressError(R.PARAMETER_SYNTAX, "bad SIZE")
            size = int(value)
            if caps.size and size > caps.size:
                raise AddressError(R.MESSAGE_TOO_BIG, "declared SIZE over the limit")
        elif key == "BODY":
            _need(caps, caps.eightbitmime, key)
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise AddressError(R.PARAMETER_NOT_IMPLEMENTED, "BODY must be 7BIT or 8BITMIME")
            body = value.upper()
        elif key == "SMTPUTF8":
            _need(caps, caps.smtputf8, key)
            if value is not None:
                raise AddressError(R.PARAMETER_SYNTAX, "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            _need(caps, caps.dsn, key)
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise AddressError(R.PARAMETER_SYNTAX, "RET must be FULL or HDRS")
            ret = value.upper()
        elif key == "ENVID":
            _need(caps, caps.dsn, key)
            if value is None or len(value) > MAX_ENVID:
                raise AddressError(R.PARAMETER_SYNTAX, "bad ENVID")
            envid = decode_xtext(value)
        elif key == "AUTH":
            _need(caps, bool(caps.auth), key)
            if value is None:
                raise AddressError(R.PARAMETER_SYNTAX, "AUTH= needs a value")
            auth = value
        else:
            raise AddressError(R.PARAMETER_NOT_IMPLEMENTED, f"unknown parameter {key}")
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid, auth=auth)


_NOTIFY_WORDS: Final = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_rcpt_params(text: str, caps: Capabilities) -> RcptParams:
    """RCPT TO parameters. Raises AddressError (501/555)."""
    if not text or text.isspace():
        return _NO_RCPT_PARAMS
    p = _split_params(text)
    notify: tuple[str, ...] | None = None
    orcpt: tuple[str, str] | None = None
    for key, value in p.items():
        if key == "NOTIFY":
            _need(caps, caps.dsn, key)
            words = tuple((value or "").upper().split(","))
            if words != ("NEVER",) and not (
                set(words) <= _NOTIFY_WORDS and len(set(words)) == len(words)
            ):
                raise AddressError(
                    R.PARAMETER_SYNTAX, "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY"
                )
            notify = words
        elif key == "ORCPT":
            _need(caps, caps.dsn, key)
            addr_type, semi, addr = (value or "").partition(";")
            if not semi or not addr_type or not addr or len(value or "") > MAX_ORCPT:
                raise AddressError(R.PARAMETER_SYNTAX, "ORCPT must be addr-type;xtext")
            orcpt = (addr_type.lower(), decode_xtext(addr))
        else:
            raise AddressError(R.PARAMETER_NOT_IMPLEMENTED, f"unknown parameter {key}")
    return RcptParams(notify=notify, orcpt=orcpt)


def format_mail_params(p: MailParams) -> str:
    if p == _NO_MAIL_PARAMS:
        return ""
    out = []
    if p.size is not None:
        out.append(f"SIZE={p.size}")
    if p.body:
        out.append(f"BODY={p.body}")
    if p.smtputf8:
        out.append("SMTPUTF8")
    if p.ret:
        out.append(f"RET={p.ret}")
    if p.envid is not None:
        out.append(f"ENVID={encode_xtext(p.envid)}")
    if p.auth is not None:
        out.append(f"AUTH={p.auth}")
    return "".join(" " + x for x in out)


def format_rcpt_params(p: RcptParams) -> str:
    if p == _NO_RCPT_PARAMS:
        return ""
    out = []
    if p.notify:
        out.append("NOTIFY=" + ",".join(p.notify))
    if p.orcpt:
        out.append(f"ORCPT={p.orcpt[0]};{encode_xtext(p.orcpt[1])}")
    return "".join(" " + x for x in out)


def format_path(addr: Address) -> str:
    return f"<{addr.local}@{addr.domain}>" if addr.domain else f"<{addr.local}>"


@attrs.frozen
class ServerCapabilities:
    """An EHLO reply as the client reads it: keyword -> its parameters (upper-cased keys)."""

    hostname: str
    keywords: dict[str, tuple[str, ...]]

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def size(self) -> int | None:
        """The advertised SIZE limit, or None (absent, 0 = no limit, or not a number we can
        trust: only ASCII digits, at most 20 of them, since ``str.isdigit`` also accepts
        digits like "\u00b2" that ``int`` refuses, and ``int`` refuses over 4,300 digits)."""
        params = self.keywords.get("SIZE")
        if params and params[0].isascii() and params[0].isdigit() and len(params[0]) <= 20:
            return int(params[0]) or None
        return None

    @property
    def auth(self) -> tuple[str, ...]:
        return tuple(m.upper() for m in self.keywords.get("AUTH", ()))

    @classmethod
    def parse(cls, reply: Reply) -> ServerCapabilities:
        """Read an EHLO reply leniently: a line that is not ``keyword [params]`` (an empty
        one, as Postfix's smtp-sink ends its reply with ``250 ``; an odd keyword) is skipped,
        never an error. Keywords are case-insensitive (RFC 5321 section 4.1.1.1)."""
        first, *rest = reply.lines or ("",)
        keywords: dict[str, tuple[str, ...]] = {}
        for line in rest:
            words = line.split()
            if words and _ESMTP_KEYWORD.fullmatch(words[0]):
                keywords[words[0].upper()] = tuple(words[1:])
        return cls(hostname=first.split(" ", 1)[0] if first else "", keywords=keywords)


def parse_enhanced(text: str) -> tuple[str | None, str]:
    """Split ``"2.1.0 Ok"`` into ("2.1.0", "Ok"); (None, text) when there is none."""
    m = _ENHANCED.match(text)
    if m and (len(text) == m.end() or text[m.end()] == " "):
        return m.group(0), text[m.end() + 1 :]
    return None, text
