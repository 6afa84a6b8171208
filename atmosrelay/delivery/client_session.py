"""Client sessions to a destination, driving ``smtp.ClientConnection``.

``open_remote`` connects and greets; ``Remote.send`` runs one transaction on it (RSET first
when the one before it did not end with its end of data), and a lane's worker sends many.
Expected failures are values: every recipient ends a transaction with an ``Outcome`` (sent,
deferred with the remote reply, bounced with the remote reply); no host answering is
``ConnectFailed``, which carries the outcomes too; only bugs raise.

    open_remote: for each MX host (each of its addresses) in order: connect (next on
    failure or a 4xx/5xx greeting); EHLO (HELO if EHLO is refused); STARTTLS when offered
    (opportunistic), or required by policy; EHLO again over TLS
    send: refuse to corrupt: 8-bit content to a server without 8BITMIME bounces 5.6.3, non-ASCII
    addresses without SMTPUTF8 bounce 5.6.7, a message over the server's SIZE bounces 5.3.4
    MAIL, then every RCPT (pipelined when offered); DATA if any recipient was accepted,
    or, where the server offers CHUNKING (RFC 3030) and did not lately fail to understand
    BDAT (quirks.py), the content as one BDAT LAST chunk: undotted, and with PIPELINING in
    the same write as its envelope (one write and one round trip a message instead of two)
    outcome per recipient from its RCPT reply and the final reply to the data

Timeouts are the minimums of RFC 5321 section 4.5.3.2, as named constants.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from atmosrelay._text import printable
from atmosrelay.delivery.destination import Destination
from atmosrelay.delivery.quirks import bdat_not_understood, bdat_works
from atmosrelay.queue.records import Outcome, RecipientState
from atmosrelay.smtp import (
    NEED_DATA,
    Address,
    Bdat,
    ClientConnection,
    Data,
    Event,
    Hello,
    MailFrom,
    MailParams,
    Quit,
    RcptParams,
    RcptTo,
    RemoteProtocolError,
    Rset,
    ServerReply,
    StartTLS,
    TLSReady,
    whole_content,
)
from atmosrelay.smtp._extensions import ServerCapabilities
from atmosrelay.smtp._states import CLOSE_CODE
from atmosrelay.stream_io import StreamIO, start_tls, tls_failure

CONNECT_TIMEOUT: Final = 30.0
GREETING_TIMEOUT: Final = 300.0  # RFC 5321 4.5.3.2.1: initial 220, 5 minutes
COMMAND_TIMEOUT: Final = 300.0  # 4.5.3.2.2/3: MAIL and RCPT, 5 minutes
DATA_INIT_TIMEOUT: Final = 120.0  # 4.5.3.2.4: DATA initiation, 2 minutes
DATA_BLOCK_TIMEOUT: Final = 180.0  # 4.5.3.2.5: each data block, 3 minutes
DATA_END_TIMEOUT: Final = 600.0  # 4.5.3.2.6: DATA termination, 10 minutes
TLS_TIMEOUT: Final = 60.0
BLOCK: Final = 64 * 1024
# BDAT content up to this size goes in the write of its envelope; a larger one waits for the
# envelope's replies (a refused one is not sent for nothing), and goes in pieces this size.
INLINE_CHUNK: Final = 1024 * 1024
# Replies that say a command was not understood (RFC 5321 4.2.4), never a message's verdict
_NOT_UNDERSTOOD: Final = frozenset({500, 502})
# A remote's reply is kept in the attempt record (and a DSN's Diagnostic-Code) up to this
# many characters, escaped; RFC 5321 4.5.3.1.5 puts a reply line at 512 octets.
MAX_RECORDED_REPLY: Final = 512


@attrs.frozen
class Envelope:
    sender: str  # "" for a DSN
    recipients: tuple[str, ...]
    notify: dict[str, tuple[str, ...] | None] = attrs.field(factory=dict)
    orcpt: dict[str, tuple[str, str] | None] = attrs.field(factory=dict)
    ret: str | None = None
    envid: str | None = None


Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class _Failed(Exception):
    """This host did not work; try the next one (the reason is for the outcome)."""

    def __init__(self, status: str, reply: str | None) -> None:
        super().__init__(reply or status)
        self.status = status
        self.reply = reply


def _address(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(local, domain) if text else Address("", "")


SENT, DEFERRED, BOUNCED = RecipientState.SENT, RecipientState.DEFERRED, RecipientState.BOUNCED


def _enhanced(code: int, enhanced: str | None, default_class: str) -> str:
    if enhanced:
        return enhanced
    return {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}.get(str(code)[0], default_class)


def _reply_text(reply: ServerReply) -> str:
    """The remote's reply as it goes into the attempt record and the DSN: verbatim but
    escaped (a reply is the peer's text) and bounded (a reply may have 200 lines of 2 KB)."""
    r = reply.reply
    prefix = f"{r.code} {r.enhanced} " if r.enhanced else f"{r.code} "
    return printable(prefix + " ".join(r.lines), MAX_RECORDED_REPLY)


class _Wire:
    def __init__(self, stream: trio.abc.Stream, conn: ClientConnection) -> None:
        self.io = StreamIO(stream)  # its stream; plain TCP skips trio's per-call wrapping
        self.conn = conn
        self.tail = b""  # the last bytes received: what a malformed reply looked like
        # No transaction open: greeted, or the last one ended with the reply to its end of
        # data. Anything else (MAIL taken, then every RCPT or DATA refused) needs an RSET.
        self.idle = True
        self.confused = False  # the remote's replies can no longer be trusted to match

    async def reply(self, within: float = math.inf, ack: bool = False) -> ServerReply | TLSReady:
        """The next reply, whole within ``within`` seconds (trio.TooSlowError) or the
        caller's own scope. A reply already received (pipelined replies often come in one
        segment) costs no timer at all. ``ack``: acknowledge what arrived before waiting
        for more (``_group_replies``)."""
        deadline = math.inf
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                raw = printable(self.tail, MAX_RECORDED_REPLY)
                raise _Failed("4.5.0", f"protocol error: {exc}; received: {raw}") from None
            if event is NEED_DATA:
                if ack:
                    self.io.ack_now()
                    ack = False
                if within == math.inf:
                    data = await self.io.read(BLOCK)
                else:
                    if deadline == math.inf:
                        deadline = trio.current_time() + within
                    # trio.fail_at's work without its generator-based context manager,
                    # which was half the cost of a timed read (two a transaction)
                    with trio.CancelScope(deadline=deadline) as timer:
                        data = await self.io.read(BLOCK)
                    if timer.cancelled_caught:
                        raise trio.TooSlowError
                self.tail = (self.tail + data)[-MAX_RECORDED_REPLY:]
                self.conn.receive_data(data)
                continue
            if isinstance(event, (ServerReply, TLSReady)):
                return event
            raise _Failed("4.4.2", "connection closed by the server")

    async def command(self, command: Event) -> ServerReply:
        await self.io.write(self.conn.send(command))
        event = await self.reply()
        if not isinstance(event, ServerReply):
            raise _Failed("4.5.0", "unexpected TLS switch")
        return event


# What a remote server (or the network) can do to a session: outcomes, never crashes. A
# LocalProtocolError is not among them: it means this relay tried to send what SMTP does not
# allow (a bug, or a message that should never have been accepted), and it must surface as
# a crash the lane's supervisor logs, not hide as a 4.5.0 deferral retried for five days.
_EXPECTED = (
    _Failed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    trio.TooSlowError,
    RemoteProtocolError,
)


def _failure(exc: BaseException, host: str) -> _Failed:
    """The temporary failure an expected exception means."""
    if isinstance(exc, _Failed):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return _Failed("4.4.2", f"timeout talking to {host}")
    if isinstance(exc, RemoteProtocolError):  # one _Wire did not see
        return _Failed("4.5.0", f"protocol error with {host}: {exc}")
    return _Failed("4.4.2", f"connection to {host} lost")


class Remote:
    """An open, greeted connection to one MX host, ready for transactions in turn, so a lane
    reuses it for several messages. RSET goes first only where the last transaction did not
    end with the reply to its end of data (RFC 5321 4.1.1.4: the end of data clears the
    server's buffers): the common message on a kept connection costs one command and one
    reply less at both ends, and a round trip less where the server does not pipeline."""

    def __init__(
        self, wire: _Wire, host: str, caps: ServerCapabilities, tls: bool, chunking: bool = True
    ) -> None:
        self._wire = wire
        self.host = host
        self.caps = caps
        self.tls = tls
        self.chunking = chunking and caps.has("CHUNKING") and bdat_works(host, trio.current_time())
        self.usable = True

    async def send(self, envelope: Envelope, message: bytes) -> tuple[Outcome, ...]:
        """One transaction. Never raises for what the server does: a connection lost or a
        timeout defers every recipient still open, and the connection is not reused."""
        try:
            reset = not self._wire.idle
            if reset and not self.caps.has("PIPELINING"):
                with trio.fail_after(COMMAND_TIMEOUT):
                    _check_reset(await self._wire.command(Rset()))
                reset = False
            outcomes = await _send(
                self._wire, self.caps, envelope, message, reset=reset, chunking=self.chunking
            )
            if self.chunking and self._wire.confused:  # BDAT not understood, CHUNKING offered
                bdat_not_understood(self.host, trio.current_time())
            self.usable = not (self._wire.conn.closed or self._wire.confused)  # 421: closed
            return outcomes
        except _EXPECTED as exc:
            reason = _failure(exc, self.host)
        except BaseException:  # a bug or a cancellation: the connection is mid-transaction
            self.usable = False
            raise
        self.usable = False
        return tuple(Outcome(r, DEFERRED, reason.status, reason.reply) for r in envelope.recipients)

    async def aclose(self) -> None:
        """A polite QUIT (its reply changes nothing), then close."""
        if self.usable and self._wire.conn.can_send(Quit()):
            with (
                trio.move_on_after(5),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await self._wire.io.write(self._wire.conn.send(Quit()))
        self.usable = False
        await self._wire.io.aclose()


class ConnectFailed(Exception):
    """No host of the destination would take a transaction; ``status`` says defer (4) or
    bounce (5)."""

    def __init__(self, status: str, reply: str | None) -> None:
        super().__init__(reply or status)
        self.status = status
        self.reply = reply

    def outcomes(self, recipients: tuple[str, ...]) -> tuple[Outcome, ...]:
        outcome = BOUNCED if self.status.startswith("5") else DEFERRED
        return tuple(Outcome(r, outcome, self.status, self.reply) for r in recipients)


async def open_remote(
    destination: Destination,
    *,
    helo: str,
    tls: ssl.SSLContext,
    require_tls: bool = False,
    chunking: bool = True,
    connect: Connect = _open_tcp,
) -> Remote:
    """Connect, greet and say EHLO (with STARTTLS when offered or required), trying the
    destination's hosts in order. Raises ConnectFailed when none will do. ``chunking``:
    send with BDAT to a host that offers CHUNKING (else always DATA)."""
    last = _Failed("4.4.1", "no MX host answered")
    for host, port in destination.hosts:
        for address in destination.addresses.get(host, (host,)):
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await connect(address, port)
            except (OSError, trio.TooSlowError) as exc:
                last = _Failed("4.4.1", f"connect to {host}:{port} failed: {type(exc).__name__}")
                continue
            try:
                return await _open(stream, host, helo, tls, require_tls, chunking)
            except _EXPECTED as exc:
                last = _failure(exc, host)
            await trio.aclose_forcefully(stream)
    raise ConnectFailed(last.status, last.reply)


async def _hello(wire: _Wire, helo: str) -> ServerCapabilities:
    with trio.fail_after(COMMAND_TIMEOUT):
        reply = await wire.command(Hello(helo, True))
    if reply.reply.code >= 400:
        with trio.fail_after(COMMAND_TIMEOUT):
            reply = await wire.command(Hello(helo, False))
        if reply.reply.code >= 400:
            raise _Failed(
                _enhanced(reply.reply.code, reply.reply.enhanced, "4.0.0"), _reply_text(reply)
            )
        return ServerCapabilities(hostname="", keywords={})
    assert reply.capabilities is not None
    return reply.capabilities


async def _open(
    stream: trio.abc.Stream,
    host: str,
    helo: str,
    tls: ssl.SSLContext,
    require_tls: bool,
    chunking: bool,
) -> Remote:
    wire = _Wire(stream, ClientConnection())
    secure = False
    with trio.fail_after(GREETING_TIMEOUT):
        greeting = await wire.reply()
    assert isinstance(greeting, ServerReply)
    if greeting.reply.code >= 400:  # this host will not talk: the next MX might
        raise _Failed(
            _enhanced(greeting.reply.code, greeting.reply.enhanced, "4.0.0"), _reply_text(greeting)
        )
    caps = await _hello(wire, helo)
    if caps.has("STARTTLS"):
        with trio.fail_after(COMMAND_TIMEOUT):
            reply = await wire.command(StartTLS())
        if reply.reply.code == 220:
            with trio.fail_after(TLS_TIMEOUT):
                switched = await wire.reply()
            if not isinstance(switched, TLSReady):
                raise _Failed("4.5.0", "no TLS switch after 220")
            tls_stream = start_tls(wire.io.stream, tls, server_hostname=host)
            try:
                with trio.fail_after(TLS_TIMEOUT):
                    await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:  # what went wrong, for `queue show`
                why = tls_failure(exc)
                raise _Failed("4.7.5", f"TLS handshake with {host} failed: {why}") from None
            wire = _Wire(tls_stream, ClientConnection(after_starttls=True))
            caps = await _hello(wire, helo)
            secure = True
        elif require_tls:
            raise _Failed("4.7.5", f"STARTTLS refused by {host}: {_reply_text(reply)}")
    elif require_tls:
        raise _Failed("4.7.5", f"{host} does not offer STARTTLS and TLS is required")
    return Remote(wire, host, caps, secure, chunking)


def _check_reset(reply: ServerReply) -> None:
    if reply.reply.code != 250:
        raise _Failed("4.4.2", _reply_text(reply))


async def _timed_reply(wire: _Wire, seconds: float, ack: bool = False) -> ServerReply:
    event = await wire.reply(seconds, ack)
    if not isinstance(event, ServerReply):
        raise _Failed("4.5.0", "unexpected TLS switch")
    return event


async def _group_replies(wire: _Wire, n: int, last: float = DATA_INIT_TIMEOUT) -> list[ServerReply]:
    """The replies to a pipelined group of ``n`` commands, the last within ``last`` seconds
    (DATA's, or BDAT LAST's), the others within COMMAND_TIMEOUT. A 421 closes the connection
    (RFC 5321 3.8): it stands for every reply still due, so the remote's own words reach the
    outcomes rather than "connection closed".

    Where part of the answer has come and the rest has not, what came is acknowledged at
    once: a server that sends its first replies while it still reads the group (Postfix
    does, when a BDAT chunk spans several reads) and has Nagle's algorithm on holds its
    last reply until then, and a delayed ACK would cost 40 ms a message. Where the whole
    answer comes in one segment, as it mostly does, this costs nothing."""
    replies: list[ServerReply] = []
    while len(replies) < n:
        timeout = last if len(replies) == n - 1 else COMMAND_TIMEOUT
        reply = await _timed_reply(wire, timeout, ack=bool(replies))
        replies.append(reply)
        if reply.reply.code == CLOSE_CODE:
            replies += [reply] * (n - len(replies))
    return replies


async def _send(
    wire: _Wire,
    caps: ServerCapabilities,
    envelope: Envelope,
    message: bytes,
    *,
    reset: bool,
    chunking: bool,
) -> tuple[Outcome, ...]:
    """One transaction. Where the server offers PIPELINING (RFC 2920) the whole envelope
    goes in one write, RSET (``reset``) MAIL RCPT... DATA, and the replies are read in turn:
    two round trips a message (the envelope, then the content) instead of five."""
    wire.idle = False  # until the reply to the end of data
    recipients = envelope.recipients
    eight_bit = not message.isascii()
    utf8 = not (envelope.sender.isascii() and all(r.isascii() for r in recipients))

    def all_(outcome: RecipientState, status: str, reply: str | None) -> tuple[Outcome, ...]:
        return tuple(Outcome(r, outcome, status, reply) for r in recipients)

    if eight_bit and not caps.has("8BITMIME"):
        return all_(BOUNCED, "5.6.3", "8-bit message and the server does not offer 8BITMIME")
    if utf8 and not caps.has("SMTPUTF8"):
        return all_(BOUNCED, "5.6.7", "non-ASCII address and the server does not offer SMTPUTF8")
    if caps.size is not None and len(message) > caps.size:
        return all_(
            BOUNCED,
            "5.3.4",
            f"message of {len(message)} octets over the server's SIZE {caps.size}",
        )
    dsn = caps.has("DSN")
    params = MailParams(
        size=len(message) if caps.size is not None else None,
        body="8BITMIME" if eight_bit else None,
        smtputf8=utf8,
        ret=envelope.ret if dsn else None,
        envid=envelope.envid if dsn else None,
    )
    mail_from = MailFrom(_address(envelope.sender), params)
    rcpts = [
        RcptTo(
            _address(r),
            RcptParams(notify=envelope.notify.get(r), orcpt=envelope.orcpt.get(r))
            if dsn
            else RcptParams(),
        )
        for r in recipients
    ]
    if chunking:
        return await _send_chunked(wire, caps, mail_from, rcpts, recipients, message, reset)
    data: ServerReply | None = None  # the reply to DATA, once it was sent
    if caps.has("PIPELINING"):
        group: list[Event] = [*([Rset()] if reset else []), mail_from, *rcpts, Data()]
        await wire.io.write(b"".join(wire.conn.send(c) for c in group))
        answers = await _group_replies(wire, len(group))
        if reset:
            _check_reset(answers.pop(0))
        mail, replies, data = answers[0], answers[1:-1], answers[-1]
    else:
        mail, replies = await _envelope_in_turn(wire, mail_from, rcpts)
    if mail.reply.code >= 400:
        if data is not None and data.reply.code == 354:  # a server that took DATA anyway
            await _abandon_data(wire)
        outcome = BOUNCED if mail.reply.code >= 500 else DEFERRED
        return all_(
            outcome, _enhanced(mail.reply.code, mail.reply.enhanced, "4.0.0"), _reply_text(mail)
        )
    outcomes, accepted = _rcpt_outcomes(recipients, replies)
    if not accepted and data is not None and data.reply.code == 354:
        await _abandon_data(wire)  # every recipient refused, and DATA taken anyway
    if accepted:
        if data is None:
            with trio.fail_after(DATA_INIT_TIMEOUT):
                data = await wire.command(Data())
        if data.reply.code != 354:
            outcome = BOUNCED if data.reply.code >= 500 else DEFERRED
            for r in accepted:
                outcomes[r] = Outcome(
                    r,
                    outcome,
                    _enhanced(data.reply.code, data.reply.enhanced, "4.0.0"),
                    _reply_text(data),
                )
        else:
            for i in range(0, len(message), BLOCK):
                block = wire.conn.send_data(message[i : i + BLOCK])
                if i + BLOCK >= len(message):
                    block += wire.conn.end_data()  # the last block and the end in one write
                await wire.io.write(block, DATA_BLOCK_TIMEOUT)  # a timer only if it waits
            if not message:
                await wire.io.write(wire.conn.end_data())
            final = await _timed_reply(wire, DATA_END_TIMEOUT)
            wire.idle = True
            _final_outcomes(outcomes, accepted, final)
    return tuple(outcomes[r] for r in recipients)


async def _envelope_in_turn(
    wire: _Wire, mail_from: MailFrom, rcpts: list[RcptTo]
) -> tuple[ServerReply, list[ServerReply]]:
    """MAIL, then each RCPT after its reply (no PIPELINING); none after a refused MAIL."""
    with trio.fail_after(COMMAND_TIMEOUT):
        mail = await wire.command(mail_from)
    replies = []
    if mail.reply.code < 400:
        for c in rcpts:
            with trio.fail_after(COMMAND_TIMEOUT):
                replies.append(await wire.command(c))
    return mail, replies


def _rcpt_outcomes(
    recipients: tuple[str, ...], replies: list[ServerReply]
) -> tuple[dict[str, Outcome], list[str]]:
    """The outcomes the RCPT replies decide (the refused recipients), and the accepted."""
    outcomes: dict[str, Outcome] = {}
    accepted = []
    for r, reply in zip(recipients, replies, strict=True):
        code = reply.reply.code
        if code < 300:
            accepted.append(r)
        else:
            outcome = BOUNCED if code >= 500 else DEFERRED
            outcomes[r] = Outcome(
                r, outcome, _enhanced(code, reply.reply.enhanced, "4.0.0"), _reply_text(reply)
            )
    return outcomes, accepted


def _final_outcomes(outcomes: dict[str, Outcome], accepted: list[str], final: ServerReply) -> None:
    """Each accepted recipient's outcome from the reply to the end of the content."""
    code = final.reply.code
    outcome = SENT if code < 300 else (BOUNCED if code >= 500 else DEFERRED)
    for r in accepted:
        outcomes[r] = Outcome(
            r, outcome, _enhanced(code, final.reply.enhanced, "2.0.0"), _reply_text(final)
        )


async def _send_chunked(
    wire: _Wire,
    caps: ServerCapabilities,
    mail_from: MailFrom,
    rcpts: list[RcptTo],
    recipients: tuple[str, ...],
    message: bytes,
    reset: bool,
) -> tuple[Outcome, ...]:
    """One transaction with the content as one BDAT LAST chunk (RFC 3030): no dot-stuffing,
    and no DATA round trip. With PIPELINING, the content of a message up to INLINE_CHUNK
    goes in the same write as its envelope, [RSET] MAIL RCPT... BDAT, and the replies are
    read in turn: one write and one round trip a message. A server that refused every
    recipient reads the chunk and refuses it too (RFC 3030 section 2); that reply changes
    no outcome."""
    content = whole_content(message)
    inline = caps.has("PIPELINING") and len(content) <= INLINE_CHUNK
    final: ServerReply | None = None  # the reply to BDAT LAST, once it was sent
    if caps.has("PIPELINING"):
        group: list[Event] = [*([Rset()] if reset else []), mail_from, *rcpts]
        out = b"".join(wire.conn.send(c) for c in group)
        if inline:
            out += wire.conn.send(Bdat(content, last=True))
        await _write_pieces(wire, out)
        answers = await _group_replies(
            wire, len(group) + inline, DATA_END_TIMEOUT if inline else COMMAND_TIMEOUT
        )
        if reset:
            _check_reset(answers.pop(0))
        mail, replies = answers[0], answers[1 : 1 + len(rcpts)]
        final = answers[-1] if inline else None
    else:
        mail, replies = await _envelope_in_turn(wire, mail_from, rcpts)
    if mail.reply.code >= 400:
        outcome = BOUNCED if mail.reply.code >= 500 else DEFERRED
        status = _enhanced(mail.reply.code, mail.reply.enhanced, "4.0.0")
        return tuple(Outcome(r, outcome, status, _reply_text(mail)) for r in recipients)
    outcomes, accepted = _rcpt_outcomes(recipients, replies)
    if accepted:
        if final is None:
            line, chunk = wire.conn.send_parts(Bdat(content, last=True))
            await _write_pieces(wire, chunk, line)
            final = await _timed_reply(wire, DATA_END_TIMEOUT)
        # after a refused chunk the server's transaction may stand: the next one resets it
        wire.idle = final.reply.code < 300
        if final.reply.code in _NOT_UNDERSTOOD:
            # CHUNKING offered, BDAT unknown: the content was read as commands, whose replies
            # are still coming. No verdict on the message, and the connection is done.
            wire.confused = True
            why = "BDAT unknown, though CHUNKING was offered: " + _reply_text(final)
            outcomes.update((r, Outcome(r, DEFERRED, "4.5.0", why)) for r in accepted)
        else:
            _final_outcomes(outcomes, accepted, final)
    return tuple(outcomes[r] for r in recipients)


async def _write_pieces(wire: _Wire, out: bytes, head: bytes = b"") -> None:
    """``head`` then ``out`` in pieces of INLINE_CHUNK, each taken within DATA_BLOCK_TIMEOUT
    (a large chunk is never copied whole)."""
    first = INLINE_CHUNK - len(head)  # a slice of all of ``out`` is ``out`` itself
    await wire.io.write(head + out[:first] if head else out[:first], DATA_BLOCK_TIMEOUT)
    for i in range(first, len(out), INLINE_CHUNK):
        await wire.io.write(out[i : i + INLINE_CHUNK], DATA_BLOCK_TIMEOUT)


async def _abandon_data(wire: _Wire) -> None:
    """An empty message ended at once after a 354 for no accepted recipient (RFC 2920 3.1)."""
    await wire.io.write(wire.conn.end_data())
    await _timed_reply(wire, DATA_END_TIMEOUT)
    wire.idle = True
