"""Interop over real loopback sockets with thin harnesses around the sans-IO objects:
Python's smtplib against our ServerConnection, and our ClientConnection against aiosmtpd."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import pytest
import trustme
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from atmosrelay.smtp import (
    NEED_DATA,
    Address,
    AuthPlain,
    Capabilities,
    ClientConnection,
    ConnectionClosed,
    Data,
    Event,
    Hello,
    MailFrom,
    MessageData,
    Quit,
    RcptTo,
    ServerConnection,
    ServerReply,
    StartTLS,
    State,
    TLSReady,
)
from atmosrelay.smtp import replies as R
from tests.protocol.helpers import answer
from tests.sink import aiosmtpd_in_thread

TIMEOUT = 10


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


def _client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# -- smtplib -> our server ---------------------------------------------------------------------
@contextmanager
def our_server(caps: Capabilities, tls_ctx: ssl.SSLContext) -> Iterator[tuple[int, list[Event]]]:
    """One connection, driven by a thread: recv -> ServerConnection -> answer -> sendall.
    Like the relay will, it offers AUTH only once the stream is encrypted."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    events: list[Event] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sock, _ = listener.accept()
            sock.settimeout(TIMEOUT)
            plain = attrs.evolve(caps, auth=())
            conn = ServerConnection(capabilities=plain, auth_unavailable=R.ENCRYPTION_REQUIRED)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                    continue
                if isinstance(event, TLSReady):
                    sock = tls_ctx.wrap_socket(sock, server_side=True)
                    conn = ServerConnection(capabilities=caps, after_starttls=True)
                    continue
                if isinstance(event, ConnectionClosed):
                    break
                events.append(event)  # type: ignore[arg-type]
                reply = answer(conn, event)  # type: ignore[arg-type]
                if reply is not None:
                    sock.sendall(conn.send(reply))
                if conn.state is State.CLOSED:
                    break
            sock.close()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], events
    finally:
        thread.join(TIMEOUT)
        listener.close()
        assert not errors, errors
        assert not thread.is_alive()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_starttls_auth_and_send(ca: trustme.CA, mechanism: str) -> None:
    caps = Capabilities(starttls=True, auth=("PLAIN", "LOGIN"))
    body = b"Subject: interop\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
    with (
        our_server(caps, _server_ctx(ca)) as (port, events),
        smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp,
    ):
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")  # AUTH is offered only over TLS
        smtp.starttls(context=_client_ctx(ca))
        smtp.ehlo("client.test")
        assert smtp.has_extn("auth")
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        smtp.user, smtp.password = "alice", "secret"
        code, _ = smtp.auth(mechanism, method)
        assert code == 235
        refused = smtp.sendmail("alice@example.org", ["bob@example.net", "carol@example.net"], body)
        assert refused == {}
    data = b"".join(e.data for e in events if isinstance(e, MessageData))
    assert data == body
    assert [type(e).__name__ for e in events if not isinstance(e, MessageData)][-6:] == [
        "MailFrom",
        "RcptTo",
        "RcptTo",
        "Data",
        "EndOfMessage",
        "Quit",
    ]


def test_smtplib_sees_refusals(ca: trustme.CA) -> None:
    with (
        our_server(Capabilities(size=100), _server_ctx(ca)) as (port, _),
        smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp,
        pytest.raises(smtplib.SMTPSenderRefused) as info,
    ):
        smtp.sendmail("a@example.org", ["b@example.net"], b"x" * 500)
    assert info.value.smtp_code == 552


# -- our client -> aiosmtpd --------------------------------------------------------------------
class _Sink:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: object, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 stored"


def _authenticator(
    server: object, session: object, envelope: object, mechanism: str, data: object
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.password == b"secret"
    return AuthResult(success=ok, handled=False)  # handled=True means "I replied myself"


@contextmanager
def aiosmtpd_server(ca: trustme.CA) -> Iterator[tuple[int, _Sink]]:
    sink = _Sink()

    def factory(loop: asyncio.AbstractEventLoop) -> AioSMTP:
        return AioSMTP(
            sink,
            tls_context=_server_ctx(ca),
            require_starttls=True,
            authenticator=_authenticator,
            auth_require_tls=True,
            hostname="aiosmtpd.test",
            loop=loop,
        )

    with aiosmtpd_in_thread(factory) as port:
        yield port, sink


class _Wire:
    """Drives a ClientConnection over a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = ClientConnection()

    def reply(self) -> ServerReply | TLSReady:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
                continue
            assert isinstance(event, (ServerReply, TLSReady)), event
            return event

    def command(self, command: Event) -> ServerReply:
        self.sock.sendall(self.conn.send(command))
        event = self.reply()
        assert isinstance(event, ServerReply)
        return event


def test_our_client_against_aiosmtpd_with_starttls_and_auth(ca: trustme.CA) -> None:
    body = b"Subject: to aiosmtpd\r\n\r\n.a dot line\r\n.\r\n..\r\nlast line"
    with aiosmtpd_server(ca) as (port, sink):
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        wire = _Wire(sock)
        greeting = wire.reply()
        assert isinstance(greeting, ServerReply)
        assert greeting.reply.code == 220
        ehlo = wire.command(Hello("relay.test", True))
        assert ehlo.capabilities is not None
        assert ehlo.capabilities.has("STARTTLS")
        assert wire.command(StartTLS()).reply.code == 220
        assert isinstance(wire.reply(), TLSReady)
        tls = _client_ctx(ca).wrap_socket(sock, server_hostname="127.0.0.1")
        wire.sock, wire.conn = tls, ClientConnection(after_starttls=True)
        ehlo = wire.command(Hello("relay.test", True))
        assert ehlo.capabilities is not None
        assert "PLAIN" in ehlo.capabilities.auth
        assert wire.command(AuthPlain("alice", "wrong")).reply.code == 535
        assert wire.command(AuthPlain("alice", "secret")).reply.code == 235
        assert wire.command(MailFrom(Address("alice", "example.org"))).reply.code == 250
        assert wire.command(RcptTo(Address("bob", "example.net"))).reply.code == 250
        assert wire.command(Data()).reply.code == 354
        tls.sendall(
            wire.conn.send_data(body[:30]) + wire.conn.send_data(body[30:]) + wire.conn.end_data()
        )
        done = wire.reply()
        assert isinstance(done, ServerReply)
        assert done.reply.code == 250
        assert wire.command(Quit()).reply.code == 221
        tls.close()
    (envelope,) = sink.envelopes
    assert envelope.mail_from == "alice@example.org"
    assert envelope.rcpt_tos == ["bob@example.net"]
    # aiosmtpd un-stuffs independently; our end_data added the final CRLF.
    assert envelope.original_content == body + b"\r\n"
