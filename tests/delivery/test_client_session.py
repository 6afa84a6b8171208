"""One delivery attempt against fake MX servers built from our own ServerConnection, over
trio memory streams (no sockets): outcomes per recipient, MX fallback, TLS, refusals."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import attrs
import pytest
import trio
import trio.testing
import trustme

from atmosrelay.delivery.client_session import (
    DATA_BLOCK_TIMEOUT,
    DATA_END_TIMEOUT,
    ConnectFailed,
    Envelope,
    open_remote,
)
from atmosrelay.delivery.courier import client_context
from atmosrelay.delivery.resolver import Destination
from atmosrelay.queue.records import Outcome
from atmosrelay.smtp import (
    NEED_DATA,
    BdatChunk,
    Capabilities,
    ConnectionClosed,
    EndOfMessage,
    LocalProtocolError,
    MailFrom,
    MessageData,
    RcptTo,
    Reply,
    ServerConnection,
    TLSReady,
)
from atmosrelay.smtp import replies as R
from tests.protocol.helpers import answer

MESSAGE = (
    b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\n.dot first\r\nBody.\r\n"
)
CA = trustme.CA()


@attrs.define
class Host:
    caps: Capabilities = attrs.field(factory=lambda: Capabilities(size=10_000, chunking=False))
    greeting: Reply | None = None
    rcpt: dict[str, Reply] = attrs.field(factory=dict)
    final: Reply | None = None
    down: bool = False
    inject_after_starttls: bool = False
    delay: float = 0.0  # before answering the end of data (to overlap connections)
    close_after: int | None = None  # hang up silently after this many transactions
    lockstep: bool = False  # a write waits until the other side has read it
    stall_after_354: bool = False  # stop reading once DATA is answered 354
    stall_at_bdat: bool = False  # stop reading once a BDAT command is read
    received: list[bytes] = attrs.field(factory=list)
    octets: int = 0  # what the server read, all told
    commands: list[str] = attrs.field(factory=list)  # each event's name, in order
    connections: int = 0
    active: int = 0
    max_active: int = 0


@attrs.define
class FakeMX:
    hosts: dict[str, Host]
    nursery: trio.Nursery

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        spec = self.hosts[host]
        if spec.down:
            raise ConnectionRefusedError(f"{host} refuses")
        pair = (
            trio.testing.lockstep_stream_pair if spec.lockstep else trio.testing.memory_stream_pair
        )
        client, server = pair()
        self.nursery.start_soon(self._serve, server, host, spec)
        return client

    async def _serve(self, stream: trio.abc.Stream, host: str, spec: Host) -> None:
        spec.active += 1
        spec.connections += 1
        spec.max_active = max(spec.max_active, spec.active)
        try:
            await self._session(stream, host, spec)
        finally:
            spec.active -= 1

    async def _session(self, stream: trio.abc.Stream, host: str, spec: Host) -> None:
        conn = ServerConnection(capabilities=spec.caps)
        data = bytearray()
        transactions = 0
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                try:
                    chunk = bytes(await stream.receive_some(65536))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                spec.octets += len(chunk)
                conn.receive_data(chunk)
                continue
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, TLSReady):
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                CA.issue_cert(host).configure_cert(ctx)
                stream = trio.SSLStream(stream, ctx, server_side=True)
                conn = ServerConnection(capabilities=spec.caps, tls=True, after_starttls=True)
                continue
            if isinstance(event, MessageData):
                data += event.data
                continue
            spec.commands.append(type(event).__name__)
            if spec.stall_at_bdat and isinstance(event, BdatChunk):
                await trio.sleep_forever()
            reply = answer(conn, event)
            if reply is None:
                continue
            if spec.greeting is not None and type(event).__name__ == "Greet":
                reply = spec.greeting
            if isinstance(event, RcptTo) and str(event.recipient) in spec.rcpt:
                reply = spec.rcpt[str(event.recipient)]
            if isinstance(event, EndOfMessage):
                await trio.sleep(spec.delay)
                spec.received.append(bytes(data))
                data.clear()
                reply = spec.final or reply
                transactions += 1
            if isinstance(event, MailFrom) and spec.close_after == transactions != 0:
                await stream.aclose()
                return
            out = conn.send(reply)
            if spec.inject_after_starttls and reply == R.READY_TO_START_TLS:
                out += b"250 2.0.0 injected before the handshake\r\n"
            try:
                await stream.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if spec.stall_after_354 and reply.code == 354:
                await trio.sleep_forever()


@asynccontextmanager
async def fake_mx(**hosts: Host) -> AsyncIterator[FakeMX]:
    async with trio.open_nursery() as nursery:
        yield FakeMX(hosts, nursery)
        nursery.cancel_scope.cancel()


def tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    return ctx


def dest(*names: str) -> Destination:
    return Destination(tuple((n, 25) for n in names))


ENV = Envelope("alice@example.org", ("bob@example.net", "carol@example.net", "dave@example.net"))


async def go(
    mx: FakeMX,
    destination: Destination,
    envelope: Envelope = ENV,
    message: bytes = MESSAGE,
    **kw: object,
) -> tuple[str | None, dict[str, Outcome]]:
    """One attempt on a connection of its own, as a lane's first message makes it: the host
    that answered (None if none would) and the outcome per recipient."""
    with trio.fail_after(10):
        try:
            remote = await open_remote(
                destination, helo="relay.test", tls=tls(), connect=mx.connect, **kw
            )  # type: ignore[arg-type]
        except ConnectFailed as failed:
            return None, {o.recipient: o for o in failed.outcomes(envelope.recipients)}
        try:
            outcomes = await remote.send(envelope, message)
        finally:
            await remote.aclose()
    return remote.host, {o.recipient: o for o in outcomes}


async def test_delivers_and_the_bytes_arrive_intact() -> None:
    async with fake_mx(mx1=Host()) as mx:
        host, outcomes = await go(mx, dest("mx1"))
    assert host == "mx1"
    assert {o.outcome for o in outcomes.values()} == {"sent"}
    assert outcomes["bob@example.net"].reply == "250 2.0.0 Ok: queued as Q1"
    assert mx.hosts["mx1"].received == [MESSAGE]


async def test_outcomes_per_recipient_with_the_remote_reply_verbatim() -> None:
    spec = Host(
        rcpt={
            "bob@example.net": Reply(550, "5.1.1", ("No such user",)),
            "carol@example.net": Reply(450, "4.2.1", ("Mailbox busy",)),
        }
    )
    async with fake_mx(mx1=spec) as mx:
        _, outcomes = await go(mx, dest("mx1"))
    assert (outcomes["bob@example.net"].outcome, outcomes["bob@example.net"].reply) == (
        "bounced",
        "550 5.1.1 No such user",
    )
    assert (outcomes["carol@example.net"].outcome, outcomes["carol@example.net"].status) == (
        "deferred",
        "4.2.1",
    )
    assert outcomes["dave@example.net"].outcome == "sent"


@pytest.mark.parametrize("pipelining", [True, False])
async def test_rset_only_where_the_last_transaction_was_left_open(pipelining: bool) -> None:
    """A transaction that ended with the reply to its end of data needs no RSET before the
    next; one left open (MAIL taken, every recipient refused) does, or the server's own
    state machine would refuse the next MAIL with 503."""
    refused = Envelope("alice@example.org", ("bob@example.net",))
    taken = Envelope("alice@example.org", ("dave@example.net",))
    spec = Host(
        caps=Capabilities(size=10_000, pipelining=pipelining),
        rcpt={"bob@example.net": Reply(550, "5.1.1", ("No such user",))},
    )
    async with fake_mx(mx1=spec) as mx:
        with trio.fail_after(10):
            remote = await open_remote(
                dest("mx1"), helo="relay.test", tls=tls(), connect=mx.connect
            )
            results = [await remote.send(e, MESSAGE) for e in (refused, taken, taken, refused)]
            await remote.aclose()
    assert [[o.outcome for o in r] for r in results] == [
        ["bounced"],
        ["sent"],
        ["sent"],
        ["bounced"],
    ]
    transactions = [c for c in spec.commands if c in ("Rset", "MailFrom", "EndOfMessage")]
    assert transactions == [
        *("MailFrom",),
        *("Rset", "MailFrom", "EndOfMessage"),
        *("MailFrom", "EndOfMessage"),
        *("MailFrom",),
    ]


@pytest.mark.parametrize(
    ("spec", "limit"),
    [
        (Host(delay=DATA_END_TIMEOUT + 60), DATA_END_TIMEOUT),  # no reply to the end of data
        (Host(lockstep=True, stall_after_354=True), DATA_BLOCK_TIMEOUT),  # body never read
    ],
    ids=["final-reply", "data-block"],
)
async def test_a_remote_that_stops_defers_once_its_rfc_5321_timeout_passes(
    spec: Host, limit: float, autojump_clock: trio.testing.MockClock
) -> None:
    """RFC 5321 4.5.3.2: each wait on the remote has its own limit. A remote that stops
    answering, or stops reading the content, defers every recipient when that limit has
    passed (virtual time), and the connection is not reused."""
    async with fake_mx(mx1=spec) as mx:
        remote = await open_remote(dest("mx1"), helo="relay.test", tls=tls(), connect=mx.connect)
        start = trio.current_time()
        with trio.fail_after(2 * DATA_END_TIMEOUT):  # no limit at all: the test fails here
            outcomes = await remote.send(ENV, MESSAGE)
        waited = trio.current_time() - start
        assert not remote.usable
        await remote.aclose()
    assert limit <= waited < limit + 1
    assert {(o.outcome, o.status, o.reply) for o in outcomes} == {
        ("deferred", "4.4.2", "timeout talking to mx1")
    }


async def test_next_mx_on_connection_failure_or_refusing_greeting() -> None:
    async with fake_mx(
        a=Host(down=True), b=Host(greeting=Reply(421, "4.3.2", ("busy",))), c=Host()
    ) as mx:
        host, outcomes = await go(mx, dest("a", "b", "c"))
    assert host == "c"
    assert {o.outcome for o in outcomes.values()} == {"sent"}


async def test_every_mx_down_defers() -> None:
    async with fake_mx(a=Host(down=True), b=Host(down=True)) as mx:
        host, outcomes = await go(mx, dest("a", "b"))
    assert host is None
    assert {(o.outcome, o.status) for o in outcomes.values()} == {("deferred", "4.4.1")}


@pytest.mark.parametrize(
    ("caps", "envelope", "message", "status"),
    [
        (Capabilities(eightbitmime=False), ENV, MESSAGE.replace(b"Body", "Bödy".encode()), "5.6.3"),
        (
            Capabilities(smtputf8=False),
            Envelope("alice@example.org", ("bøb@example.net",)),
            MESSAGE,
            "5.6.7",
        ),
        (Capabilities(size=20), ENV, MESSAGE, "5.3.4"),
    ],
)
async def test_refuses_to_corrupt_bounces_instead(
    caps: Capabilities, envelope: Envelope, message: bytes, status: str
) -> None:
    async with fake_mx(mx1=Host(caps=caps)) as mx:
        _, outcomes = await go(mx, dest("mx1"), envelope, message)
    assert {(o.outcome, o.status) for o in outcomes.values()} == {("bounced", status)}
    assert not mx.hosts["mx1"].received


async def test_a_4xx_after_the_data_defers_every_accepted_recipient() -> None:
    async with fake_mx(mx1=Host(final=Reply(451, "4.3.0", ("try later",)))) as mx:
        _, outcomes = await go(mx, dest("mx1"))
    assert {(o.outcome, o.reply) for o in outcomes.values()} == {
        ("deferred", "451 4.3.0 try later")
    }


async def test_starttls_when_offered_and_required_tls() -> None:
    async with fake_mx(secure=Host(caps=Capabilities(starttls=True)), plain=Host()) as mx:
        host, outcomes = await go(mx, dest("secure"), require_tls=True)
        assert host == "secure"
        assert {o.outcome for o in outcomes.values()} == {"sent"}
        assert mx.hosts["secure"].received == [MESSAGE]
        _, refused = await go(mx, dest("plain"), require_tls=True)
    assert {(o.outcome, o.status) for o in refused.values()} == {("deferred", "4.7.5")}
    assert not mx.hosts["plain"].received  # nothing sent in clear


async def test_a_server_that_injects_after_its_starttls_220_is_refused() -> None:
    async with fake_mx(
        evil=Host(caps=Capabilities(starttls=True), inject_after_starttls=True)
    ) as mx:
        host, outcomes = await go(mx, dest("evil"))
    assert host is None
    assert {(o.outcome, o.status) for o in outcomes.values()} == {("deferred", "4.5.0")}
    assert "injection" in (outcomes["bob@example.net"].reply or "")
    assert not mx.hosts["evil"].received


async def test_our_own_protocol_errors_surface_instead_of_becoming_deferrals() -> None:
    """A bare LF in what the relay hands the client is a defect on this side: it raises (for
    the lane's supervisor to log and count) instead of turning into a 4.5.0 retried for days."""
    async with fake_mx(mx1=Host()) as mx:
        with pytest.raises(LocalProtocolError, match="bare CR or LF"):
            await go(mx, dest("mx1"), message=b"Subject: x\r\n\r\na bare\nline feed\r\n")
        assert mx.hosts["mx1"].received == []


async def _handshake(client: ssl.SSLContext) -> str | None:
    """A TLS handshake of ``client`` with a server whose certificate is signed by a CA the
    client was never told of; None when it completes, else the client's error."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert("mx.example").configure_cert(server_ctx)
    ours, theirs = trio.testing.memory_stream_pair()
    near = trio.SSLStream(ours, client, server_hostname="mx.example")
    far = trio.SSLStream(theirs, server_ctx, server_side=True)
    failed: list[str] = []

    async def client_side() -> None:
        try:
            await near.do_handshake()
        except trio.BrokenResourceError as exc:
            failed.append(str(exc.__cause__))
        await near.aclose()

    async def server_side() -> None:
        with suppress(trio.BrokenResourceError):  # the client's refusal: it says why
            await far.do_handshake()
        await far.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            nursery.start_soon(server_side)
    return failed[0] if failed else None


async def test_opportunistic_tls_takes_any_certificate_and_verified_tls_only_a_known_one() -> None:
    """``delivery.tls_verify = false`` (the default, RFC 7435): the handshake completes with
    a certificate no CA we know signed; with it on, the same handshake is refused."""
    assert await _handshake(client_context(False, "")) is None
    refused = await _handshake(client_context(True, ""))
    assert refused is not None and "CERTIFICATE_VERIFY_FAILED" in refused
