"""A stand-in MX: aiosmtpd (an SMTP server that is not ours) on 127.0.0.1, port 0, in a
thread of its own with a plain asyncio loop. It offers STARTTLS with a trustme certificate,
can refuse chosen recipients, and keeps every envelope it accepted."""

from __future__ import annotations

import asyncio
import collections
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.parser import BytesHeaderParser

import attrs
import trustme
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

TIMEOUT = 10.0


@attrs.frozen
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls: bool
    subject: str


@attrs.define
class Sink:
    port: int = 0
    refuse: dict[str, str] = attrs.field(factory=dict)  # recipient -> reply line
    received: list[Received] = attrs.field(factory=list)
    subjects: collections.Counter[str] = attrs.field(factory=collections.Counter)
    arrived: threading.Condition = attrs.field(factory=threading.Condition)

    async def handle_RCPT(
        self, server: object, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: object, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        subject = str(BytesHeaderParser().parsebytes(content)["Subject"])
        received = Received(
            envelope.mail_from, tuple(envelope.rcpt_tos), content, session.ssl is not None, subject
        )
        with self.arrived:
            self.received.append(received)
            self.subjects[subject] += 1
            self.arrived.notify_all()
        return "250 2.0.0 stored by the sink"

    def snapshot(self) -> list[Received]:
        with self.arrived:
            return list(self.received)

    def subject_counts(self) -> collections.Counter[str]:
        with self.arrived:
            return collections.Counter(self.subjects)

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Block (a thread) until ``done()`` or ``timeout``; returns ``done()``. It runs with
        the sink's lock held, so the sink waits while it runs: keep it cheap (the
        ``subjects`` counter, not a parse of every message)."""
        with self.arrived:
            return self.arrived.wait_for(done, timeout)


@contextmanager
def aiosmtpd_in_thread(
    factory: Callable[[asyncio.AbstractEventLoop], AioSMTP],
) -> Iterator[int]:
    """Serve ``factory(loop)``'s SMTP protocol on 127.0.0.1, port 0, in a thread with its own
    loop; yields the port. A plain asyncio loop, not the policy's: trio-asyncio (imported
    by other tests) installs its own event-loop policy process-wide."""
    loop = asyncio.SelectorEventLoop()
    started = threading.Event()
    holder: dict[str, int] = {}

    def run() -> None:
        server = loop.run_until_complete(loop.create_server(lambda: factory(loop), "127.0.0.1", 0))
        holder["port"] = server.sockets[0].getsockname()[1]
        started.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(TIMEOUT)
    try:
        yield holder["port"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)


@contextmanager
def aiosmtpd_sink(ca: trustme.CA | None = None, hostname: str = "mx.example.net") -> Iterator[Sink]:
    """The sink, offering STARTTLS with a certificate from ``ca`` when given."""
    sink = Sink()
    tls: ssl.SSLContext | None = None
    if ca is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(hostname).configure_cert(tls)

    def factory(loop: asyncio.AbstractEventLoop) -> AioSMTP:
        return AioSMTP(
            sink,
            tls_context=tls,
            hostname=hostname,
            decode_data=False,
            enable_SMTPUTF8=True,
            loop=loop,
        )

    with aiosmtpd_in_thread(factory) as port:
        sink.port = port
        yield sink
