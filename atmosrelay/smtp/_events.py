"""Events: what the server connection reports, and what the client connection is given.

Server side, ``ServerConnection.next_event()`` returns one of these. Every event that ends
with a reply from the caller is a *command*; events with a ``reply`` field carry the reply the
connection chose itself (a protocol error, a SASL challenge), which the caller sends as is.
``MessageData`` and ``BdatChunk`` need no reply: more data follows.

Client side, commands are these same classes given to ``ClientConnection.send()``, and the
client reports ``ServerReply`` (one per command, in order) and ``TLSReady``.
"""

from __future__ import annotations

import enum

import attrs

from atmosrelay.smtp._extensions import Address, MailParams, RcptParams, ServerCapabilities
from atmosrelay.smtp._replies import Reply


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # a reply is owed: send() it before the next event


NEED_DATA = _Sentinel.NEED_DATA
PAUSED = _Sentinel.PAUSED


class Event:
    """Base class of everything next_event() returns (besides the two sentinels)."""

    __slots__ = ()


# -- commands (the caller replies) -----------------------------------------------------------
@attrs.frozen
class Greet(Event):
    """Not from the peer: the connection starts owing a greeting (send GREETING)."""


@attrs.frozen
class Hello(Event):
    hostname: str
    extended: bool  # EHLO (True) or HELO


@attrs.frozen
class StartTLS(Event):
    pass


@attrs.frozen
class AuthCredentials(Event):
    """A complete SASL exchange (PLAIN or LOGIN). Reply AUTH_SUCCESS or AUTH_FAILED."""

    mechanism: str
    authzid: str
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class MailFrom(Event):
    sender: Address
    params: MailParams = attrs.field(factory=MailParams)


@attrs.frozen
class RcptTo(Event):
    recipient: Address
    params: RcptParams = attrs.field(factory=RcptParams)


@attrs.frozen
class Data(Event):
    """The DATA command. Reply START_DATA (354) to receive the message."""


@attrs.frozen
class EndOfMessage(Event):
    """CRLF.CRLF after DATA, or the end of a BDAT LAST chunk. Reply QUEUED (after fsync)."""


@attrs.frozen
class ChunkEnd(Event):
    """The end of a BDAT chunk that is not the last. Reply CHUNK_OK."""

    size: int


@attrs.frozen
class Rset(Event):
    pass


@attrs.frozen
class Noop(Event):
    pass


@attrs.frozen
class Quit(Event):
    pass


@attrs.frozen
class Vrfy(Event):
    argument: str


@attrs.frozen
class Expn(Event):
    argument: str


@attrs.frozen
class Help(Event):
    argument: str


# -- replies the connection chose (the caller sends ``reply`` unchanged) --------------------
@attrs.frozen
class CommandError(Event):
    """A command the connection refuses itself: unknown, malformed, out of sequence, a
    parameter not offered. ``verb`` names the command for logs: a known verb upper-cased
    ("MAIL", "AUTH"), or "" for anything else (an unknown word, undecodable bytes, a SASL
    response line). Never the line itself: an AUTH line or a pipelined SASL response carries
    credentials, and an unknown "verb" may be a base64 password sent after a refused AUTH."""

    reply: Reply
    verb: str


@attrs.frozen
class AuthChallenge(Event):
    """A SASL step: send ``reply`` (334) and the client answers with a line."""

    reply: Reply


@attrs.frozen
class MessageRejected(Event):
    """The message was drained to its end but is refused (too big, bad line endings, line
    too long): send ``reply``; the transaction is over, the connection stays usable."""

    reply: Reply


# -- data (no reply) ------------------------------------------------------------------------
@attrs.frozen
class MessageData(Event):
    """Message bytes: dot-unstuffed (DATA) or raw (BDAT), CRLF kept."""

    data: bytes


@attrs.frozen
class BdatChunk(Event):
    """A BDAT command was read; its ``size`` bytes follow as MessageData."""

    size: int
    last: bool


@attrs.frozen
class ConnectionClosed(Event):
    """The peer closed its side (EOF), or the session is over."""


# -- client side -------------------------------------------------------------------------------
@attrs.frozen
class ServerReply(Event):
    """The server's reply to ``command`` (``Greet`` for the greeting)."""

    command: Event | None  # None: an unsolicited 421 (the server is closing)
    reply: Reply
    capabilities: ServerCapabilities | None = None  # parsed, for a positive EHLO reply


@attrs.frozen
class TLSReady(Event):
    """The server accepted STARTTLS: wrap the stream in TLS and continue with a fresh
    ClientConnection(after_starttls=True)."""


@attrs.frozen
class AuthPlain(Event):
    """Client command: AUTH PLAIN with an initial response (RFC 4616)."""

    username: str
    password: str = attrs.field(repr=False)
    authzid: str = ""


@attrs.frozen
class AuthLogin(Event):
    """Client command: AUTH LOGIN, answered over two 334 challenges."""

    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class Bdat(Event):
    """Client command: one BDAT chunk (RFC 3030)."""

    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    last: bool = False


__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthChallenge",
    "AuthCredentials",
    "AuthLogin",
    "AuthPlain",
    "Bdat",
    "BdatChunk",
    "ChunkEnd",
    "CommandError",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "Expn",
    "Greet",
    "Hello",
    "Help",
    "MailFrom",
    "MessageData",
    "MessageRejected",
    "Noop",
    "Quit",
    "RcptTo",
    "Rset",
    "ServerReply",
    "StartTLS",
    "TLSReady",
    "Vrfy",
]
