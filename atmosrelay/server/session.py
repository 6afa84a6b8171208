"""One SMTP submission session: drives ``smtp.ServerConnection`` over a trio stream.

A thin driver: the protocol is ``atmosrelay.smtp``'s, the rules are the acceptance
pipeline's (``atmosrelay.submission``), the same for HTTP. The order of a message's life:

    AUTH (key checked by accounts.KeyChecker, bcrypt off the event loop); a suspended
                member gets 521 and the connection closes
    MAIL FROM   authenticated? key still valid? then pipeline.check_mail: member active,
                sender domain verified and not paused, room under the limits
    RCPT TO     pipeline.check_rcpt: suppressed for every category? room for one more?
                (the limit of recipients per message is the protocol core's)
    DATA/BDAT   bytes counted against the shared in-flight budget while they arrive
    end         pipeline.submit: every check again, header From, suppression of bulk mail,
                the limits counted, the ACCEPTED record -> journal group commit -> fsync
                -> only then "250 2.0.0 Ok: queued as <id>", written from the event loop
                the moment the queue has the message (``_accept``), not at this task's
                next turn, which under load comes a whole batch of tasks later

Time limits are deadlines, not per-read timeouts, so a peer cannot stretch them by sending
one byte at a time (docs/security.md):

    a command       must arrive whole within ``idle_timeout`` of the wait for it starting
    DATA or BDAT    the phase ends within ``data_timeout`` of its start, plus 1 s for every
                    ``min_data_rate`` bytes received (Postfix's smtpd_min_data_rate)
    the session     421 4.4.2 at the first command boundary past ``max_session_time``
    a reply         written within ``idle_timeout`` (a peer that never reads is dropped)

On shutdown a session waiting for a command gets 421 4.3.2 at once; a session inside DATA
finishes its message first (the runtime bounds that with a deadline). Never echo exception
text to the peer; log it.
"""

from __future__ import annotations

import itertools
import logging
from typing import Final

import attrs
import trio

from atmosrelay._text import printable as _clean
from atmosrelay.accounts.api_keys import PREFIX, Verified
from atmosrelay.logs import fields
from atmosrelay.policy.member import MemberSnapshot, MemberStatus
from atmosrelay.queue.records import Recipient
from atmosrelay.refusals import Code, Refusal
from atmosrelay.sections import ListenerMode
from atmosrelay.server.context import SessionContext
from atmosrelay.smtp import (
    NEED_DATA,
    AuthChallenge,
    AuthCredentials,
    BdatChunk,
    ChunkEnd,
    CommandError,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Expn,
    Greet,
    Hello,
    Help,
    MailFrom,
    MailParams,
    MessageData,
    MessageRejected,
    Noop,
    Quit,
    RcptParams,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Rset,
    ServerConnection,
    StartTLS,
    State,
    TLSReady,
    Vrfy,
)
from atmosrelay.smtp import replies as R
from atmosrelay.smtp._extensions import Address, AddressError
from atmosrelay.stream_io import StreamIO, start_tls, tls_failure, tls_name
from atmosrelay.submission import Envelope, Submission

log = logging.getLogger("atmosrelay.smtp")

RECEIVE_SIZE: Final = 64 * 1024
TLS_HANDSHAKE_TIMEOUT: Final = 30.0
MIN_DATA_RESERVE: Final = 64 * 1024  # DATA is refused (452 4.3.1) unless this much budget is free
_ids = itertools.count(1)


def _loggable_username(username: str) -> str:
    """A username for the log, unless it carries a key (a client that swapped the username
    and the password, or pasted both into one): then only that it was redacted."""
    if PREFIX in username or len(username) > 253:
        return "<redacted: not a DID or handle>"
    return _clean(username)


@attrs.define
class _Transaction:
    sender: Address
    params: MailParams
    recipients: list[tuple[Address, RcptParams]] = attrs.field(factory=list)
    data: bytearray = attrs.field(factory=bytearray)
    held: int = 0  # bytes taken from the budget
    refused: Reply | None = None


class Session:
    def __init__(
        self, stream: trio.abc.Stream, peer: str, mode: ListenerMode, ctx: SessionContext
    ) -> None:
        self.io = StreamIO(stream)  # its stream; plain TCP skips trio's per-call wrapping
        self.peer = peer
        self.mode = ListenerMode(mode)
        self.ctx = ctx
        self.id = f"s{next(_ids)}"
        self.tls = self.mode is ListenerMode.IMPLICIT
        self.tls_version = tls_name(stream)  # known at once for implicit TLS
        self.did: str | None = ctx.trusted_did if self.mode is ListenerMode.TRUSTED else None
        self.username = ""
        self.key_id: str | None = None  # None for a trusted session
        self._generation = ctx.keys.generation  # of the account store, when last checked
        self.member: MemberSnapshot | None = None
        self._close = False  # close once the queued replies are written (521 after AUTH)
        self.helo = ""
        self.tx: _Transaction | None = None
        self._out = bytearray()  # replies not yet written: pipelined ones go out together
        self._ends_at = trio.current_time() + ctx.max_session_time
        self._command_deadline: float | None = None  # set when the wait for a command starts
        self._data_started: float | None = None  # set when a DATA or BDAT phase starts
        self._data_ended: float | None = None  # a message's end of data, until its reply goes
        self._data_bytes = 0
        self.wait_deadline: float | None = None  # while waiting for the peer (the watch's)
        self._expiry = R.IDLE_TIMEOUT  # what the wait's deadline answers
        self._waits = trio.CancelScope()  # cancelled by the watch: a wait ends the session
        self.conn = self._new_connection(after_starttls=False)

    def _new_connection(self, *, after_starttls: bool) -> ServerConnection:
        auth = self.tls and self.mode is not ListenerMode.TRUSTED and self.did is None
        caps = attrs.evolve(
            self.ctx.capabilities,
            starttls=self.mode is ListenerMode.STARTTLS and not self.tls,
            auth=("PLAIN", "LOGIN") if auth else (),
        )
        refusal = (
            R.ENCRYPTION_REQUIRED
            if self.mode is ListenerMode.STARTTLS and not self.tls
            else R.AUTH_NOT_AVAILABLE
        )
        return ServerConnection(
            capabilities=caps,
            tls=self.tls,
            after_starttls=after_starttls,
            max_recipients=self.ctx.max_recipients,
            auth_unavailable=refusal,
        )

    def _log(self, what: str, *details: str, **values: object) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %s %s",
                self.id,
                self.peer,
                what,
                " ".join(details),
                extra=fields(what, session=self.id, peer=self.peer, did=self.did, **values),
            )

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until QUIT, EOF, a timeout, a protocol breach or shutdown. Closes the stream."""
        self._log("connect", self.mode)
        self.ctx.sessions.add(self)
        try:
            if self.mode is ListenerMode.TRUSTED:
                await self._load_member()  # no AUTH here: the member is known from the start
            with self._waits:
                await self._loop()
            if self._waits.cancel_called:  # a wait for the peer ended by the watch
                await self._wait_ended()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._log("disconnected", type(exc).__name__)
        except trio.TooSlowError:
            self._log("timeout", "the peer does not read its replies")
        except Exception:  # the session's outermost edge: log it, never tell the peer
            log.exception("%s %s session failed", self.id, self.peer)
        finally:
            self.ctx.sessions.discard(self)
            self._end_transaction()
            await self.io.aclose()
            self._log("close")

    async def _loop(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                self._log("protocol-error", _clean(str(exc)))
                if exc.reply is not None:
                    self._queue(exc.reply)
                await self._flush()
                return
            if event is NEED_DATA:
                await self._flush()
                data = await self._receive()
                if data is None:
                    return
                self.conn.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                await self._flush()
                return
            if isinstance(event, TLSReady):
                await self._flush()  # the 220 goes out in plaintext, before the handshake
                if not await self._start_tls():
                    return
                continue
            if isinstance(event, MessageData):
                self._collect(event.data)
                continue
            if isinstance(event, BdatChunk):
                if self._data_started is None:
                    self._start_data_phase()
                if self.tx is not None and self.tx.held == 0 and not self._reserve():
                    self.tx.refused = R.INFLIGHT_FULL
                continue
            self._command_deadline = None  # a whole command arrived: the next wait starts anew
            reply = await self._answer(event)  # type: ignore[arg-type]
            if reply is not None:  # None: already queued (a 250 at the fsync, in _accept)
                self._queue(reply)
            if self.conn.state is State.CLOSED or self._close:
                await self._flush()
                return
            if self.ctx.shutdown.is_set() and self.conn.state in (State.READY, State.CONNECTED):
                await self._send(R.SHUTTING_DOWN)
                return

    def _start_data_phase(self) -> None:
        if self._data_started is None:
            self.ctx.data_started()  # its message is on its way to the journal (ctx.gather)
        self._data_started, self._data_bytes = trio.current_time(), 0

    def _end_data_phase(self) -> None:
        """The end of data is read (before the append: the journal need not wait for this
        message), or the transaction ended without it."""
        if self._data_started is not None:
            self._data_started = None
            self.ctx.data_arrived()

    def _deadline(self, in_data: bool) -> tuple[float, Reply]:
        """When the wait for the peer ends, and what it is told then."""
        ctx = self.ctx
        if in_data:
            assert self._data_started is not None
            extra = self._data_bytes / ctx.min_data_rate
            return self._data_started + ctx.data_timeout + extra, R.DATA_TIMEOUT
        if self._command_deadline is None:
            self._command_deadline = trio.current_time() + ctx.idle_timeout
        if self._ends_at <= self._command_deadline:
            return self._ends_at, R.SESSION_TIME_LIMIT
        return self._command_deadline, R.IDLE_TIMEOUT

    async def _receive(self) -> bytes | None:
        """Bytes from the peer, or None when the session must end (EOF is b"" and goes on
        to the protocol object; None means shutdown, already answered, or the wait's end
        by the watch, answered by ``run``). The wait is cancelled by the context's watch at
        its deadline (server/context.py), or at shutdown if it is for a command."""
        in_data = self._data_started is not None
        if self.ctx.shutdown.is_set() and not in_data:
            await self._send(R.SHUTTING_DOWN)
            return None
        deadline, self._expiry = self._deadline(in_data)
        self.ctx.wait_until(deadline)
        self.wait_deadline = deadline
        try:
            data = await self.io.read(RECEIVE_SIZE)
        finally:
            self.wait_deadline = None
        if self._waits.cancel_called:  # expired as the bytes came: the deadline wins
            return None
        self._data_bytes += len(data) if in_data else 0
        return data

    @property
    def waiting_for_command(self) -> bool:
        """Not inside DATA or BDAT (which no wait begins or ends)."""
        return self._data_started is None

    def expire(self) -> None:
        """The watch's: the wait for the peer is past its deadline, or shutdown came."""
        self._waits.cancel()

    async def _wait_ended(self) -> None:
        """Answer a wait the watch ended (the session then closes)."""
        if self.ctx.shutdown.is_set() and self.waiting_for_command:
            self._log("shutdown")
            await self._send(R.SHUTTING_DOWN)
        else:
            self._log("timeout", self._expiry.lines[0], self.conn.state.value)
            await self._send(self._expiry)

    async def _send(self, reply: Reply) -> None:
        """Queue a reply and write it at once (for replies that end the session)."""
        self._queue(reply)
        await self._flush()

    def _queue(self, reply: Reply) -> None:
        """Queue a reply; it is written before the session next waits for the peer, so the
        replies to a pipelined group leave in one write (RFC 2920), in order."""
        try:
            self._out += self.conn.send(reply)
        except Exception:
            self.conn.send_failed()
            raise

    async def _flush(self) -> None:
        """Write the queued replies; trio.TooSlowError if the peer reads none in idle_timeout."""
        if self._out or self.io.unsent:
            data, self._out = bytes(self._out), bytearray()
            await self.io.write(data, self.ctx.idle_timeout)
            self._replied()

    def _replied(self) -> None:
        if self._data_ended is not None:
            self.ctx.on_data_reply(trio.current_time() - self._data_ended)
            self._data_ended = None

    def _reply_now(self, reply: Reply) -> None:
        """Queue ``reply`` and hand the kernel the queue now, without waiting: called by the
        journal on the event loop the moment a message is durable, before this task runs
        again (``_accept``). What the kernel does not take is written by the next flush."""
        self._queue(reply)
        try:
            if self.io.write_now(bytes(self._out)):
                self._out = bytearray()
                self._replied()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._out = bytearray()  # the next read or write meets the same error

    async def _start_tls(self) -> bool:
        tls = start_tls(self.io.stream, self.ctx.tls_context, server_side=True)
        with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                self.ctx.tls_failures += 1
                self._log("tls-failed", tls_failure(exc))
                return False
            self.tls, self.io = True, StreamIO(tls)
            self.tls_version = tls_name(tls)
            self.conn = self._new_connection(after_starttls=True)
            self._log("starttls", self.tls_version or "?")
            return True
        self.ctx.tls_failures += 1
        self._log("tls-timeout")
        return False

    # -- events -----------------------------------------------------------------------------
    async def _answer(self, event: Event) -> Reply | None:
        if isinstance(event, (CommandError, AuthChallenge, MessageRejected)):
            if isinstance(event, CommandError):
                self._log(
                    "refused", str(event.reply.code), event.verb or "-", code=event.reply.code
                )
            if isinstance(event, MessageRejected):
                self._log("message-refused", str(event.reply.code))
                self._end_transaction()
            return event.reply
        if isinstance(event, Greet):
            if self.ctx.journal_failed():
                return R.JOURNAL_FAILED  # a 421: the connection closes
            return R.for_host(R.GREETING, self.ctx.hostname)
        if isinstance(event, Hello):
            self.helo = event.hostname
            self._end_transaction()
            if event.extended:
                return self.conn.ehlo_reply(self.ctx.hostname)
            return R.for_host(R.HELO_OK, self.ctx.hostname)
        if isinstance(event, StartTLS):
            return R.READY_TO_START_TLS
        if isinstance(event, AuthCredentials):
            return await self._auth(event)
        if isinstance(event, MailFrom):
            return await self._mail(event)
        if isinstance(event, RcptTo):
            return self._rcpt(event)
        if isinstance(event, Data):
            if not self._reserve():
                return R.INFLIGHT_FULL
            self._start_data_phase()
            return R.START_DATA
        if isinstance(event, ChunkEnd):
            return R.CHUNK_OK.format(size=event.size)
        if isinstance(event, EndOfMessage):
            self._data_ended = trio.current_time()
            self._end_data_phase()
            try:
                return await self._accept()
            finally:
                self._end_transaction()
        if isinstance(event, Rset):
            self._end_transaction()
            return R.OK
        if isinstance(event, Quit):
            return R.CLOSING
        if isinstance(event, Vrfy):
            return R.VRFY_CANNOT
        if isinstance(event, Expn):
            return R.EXPN_DISABLED
        if isinstance(event, Noop):
            return R.OK
        if isinstance(event, Help):
            return R.HELP
        raise AssertionError(f"unexpected event {event!r}")

    async def _auth(self, event: AuthCredentials) -> Reply:
        result = await self.ctx.keys.verify(event.username, event.password, self.peer)
        if not isinstance(result, Verified):
            self._log("auth-failed", _loggable_username(event.username), result.reason)
            return R.AUTH_FAILED
        self.did, self.username, self.key_id = result.did, event.username, result.key_id
        self._generation = self.ctx.keys.generation
        await self._load_member()
        if self.member is None or self.member.status is MemberStatus.REMOVED:
            self._log("auth-failed", _loggable_username(event.username), "member removed")
            self.did = self.key_id = None
            self.member = None
            return R.AUTH_FAILED
        if self.member.suspended:
            self._log("auth-refused", result.did, self.member.suspension_reason)
            self._close = True
            return R.SUSPENDED_AT_CONNECT
        self._log("auth", _loggable_username(event.username), result.did, f"key={result.key_id}")
        return R.AUTH_SUCCESS

    async def _recheck(self) -> bool:
        """At MAIL: if the account store changed since this session last looked (a key
        revoked, a member suspended or removed, a domain dropped or paused), look again.
        False when the session's credentials are gone."""
        keys = self.ctx.keys
        if self._generation == keys.generation or self.did is None:
            return self.did is None or self.member is not None
        self._generation = keys.generation
        if self.key_id is not None and not await keys.still_valid(self.did, self.key_id):
            return False
        await self._load_member()
        return self.member is not None and self.member.status is not MemberStatus.REMOVED

    async def _load_member(self) -> None:
        assert self.did is not None
        self.member = await self.ctx.pipeline.member(self.did)

    def _refused(self, what: str, refusal: Refusal) -> Reply:
        self._log(
            what,
            self.did or "-",
            refusal.code.value,
            _clean(refusal.log),
            refusal=refusal.code.value,
            code=refusal.reply.code,
        )
        return refusal.reply

    async def _mail(self, event: MailFrom) -> Reply:
        if self.ctx.journal_failed():
            return R.JOURNAL_FAILED  # before reading a message that could not be kept
        if self.did is None:
            return R.AUTH_REQUIRED
        if not await self._recheck():
            self._log("mail-refused", self.did, f"key={self.key_id} revoked or member removed")
            return R.CREDENTIALS_REVOKED
        if event.sender.is_null:
            return R.NULL_SENDER_REFUSED
        assert self.member is not None
        refusal = self.ctx.pipeline.check_mail(self.member, _domain_of(event.sender))
        if refusal is not None:
            return self._refused("mail-refused", refusal)
        self._end_transaction()
        self.tx = _Transaction(event.sender, event.params)
        return R.SENDER_OK

    def _rcpt(self, event: RcptTo) -> Reply:
        tx = self.tx
        assert tx is not None
        assert self.member is not None
        refusal = self.ctx.pipeline.check_rcpt(
            self.member, str(event.recipient), len(tx.recipients)
        )
        if refusal is not None:
            return self._refused("rcpt-refused", refusal)
        tx.recipients.append((event.recipient, event.params))
        return R.RECIPIENT_OK

    # -- message bytes ------------------------------------------------------------------------
    def _reserve(self) -> bool:
        """Take an initial share of the in-flight budget for the message about to arrive."""
        tx = self.tx
        if tx is None:
            return True
        want = max(MIN_DATA_RESERVE, min(tx.params.size or 0, self.ctx.capabilities.size or 0))
        if not self.ctx.budget.take(want):
            return False
        tx.held += want
        return True

    def _collect(self, data: bytes) -> None:
        tx = self.tx
        if tx is None or tx.refused is not None:
            return
        tx.data += data
        over = len(tx.data) - tx.held
        if over > 0:
            grow = max(over, MIN_DATA_RESERVE)
            if self.ctx.budget.take(grow):
                tx.held += grow
            else:
                tx.refused = R.INFLIGHT_FULL
                tx.data = bytearray()  # drop what we hold; the rest is drained unkept

    def _end_transaction(self) -> None:
        self._end_data_phase()
        if self.tx is not None:
            self.ctx.budget.release(self.tx.held)
            self.tx = None

    async def _accept(self) -> Reply | None:
        tx = self.tx
        assert tx is not None
        assert self.did is not None
        if tx.refused is not None:
            self._log("message-refused", str(tx.refused.code), "in-flight budget full")
            return tx.refused
        envelope = Envelope(
            sender=str(tx.sender),
            sender_domain=_domain_of(tx.sender),
            recipients=tuple(Recipient(str(a), p.notify, p.orcpt) for a, p in tx.recipients),
            ret=tx.params.ret,
            envid=tx.params.envid,
            smtputf8=tx.params.smtputf8,
            eight_bit=tx.params.body == "8BITMIME",
        )
        client = {"ip": self.peer, "tls": self.tls_version, "helo": self.helo}
        # The 250 goes out the moment the message is durable and queued, from the event loop
        # (queue/store.py), not at this task's next turn: under load a turn is long.
        armed = True

        def durable(queue_id: str) -> None:
            nonlocal armed
            if armed:  # not once this task has left (cancelled)
                self._reply_now(R.QUEUED.format(queue_id=queue_id))
                armed = False

        try:
            result = await self.ctx.pipeline.submit(
                Submission(self.did, envelope, bytes(tx.data), client, durable=durable)
            )
            replied = not armed
        finally:
            armed = False
        if isinstance(result, Refusal):
            if result.code is Code.TEMPORARILY_UNAVAILABLE:
                self.ctx.journal_failed()  # logs it, if this is the failure that poisoned it
            return self._refused("message-refused", result)
        record = result.record
        if log.isEnabledFor(logging.INFO):  # the 250 path: build the line only if it is kept
            self._log(
                "queued",
                record.id,
                f"from={_clean(record.sender)}",
                f"rcpt={len(record.recipients)}",
                f"size={record.size}",
                f"category={record.category}",
                *([f"suppressed={len(result.suppressed)}"] if result.suppressed else []),
                queue_id=record.id,
                code=250,
                recipients=len(record.recipients),
                size=record.size,
            )
        return None if replied else R.QUEUED.format(queue_id=record.id)


def _domain_of(address: Address) -> str:
    """The domain as the account store spells it: IDNA (A-labels), lower case."""
    try:
        return address.domain_ascii
    except AddressError:
        return address.domain.lower()
