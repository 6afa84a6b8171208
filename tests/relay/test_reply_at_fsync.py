"""The 250 goes out from the event loop the moment the message is durable and in the queue
(server/session.py, ``_accept``; journal/_journal.py, ``durable``), not at the session task's
next turn, which under load comes a whole batch of tasks later. Over plain TCP and over TLS,
on real loopback sockets; a stream without the fast paths (a test's memory stream) answers
from the task as before."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from atmosrelay.server.context import SessionContext
from atmosrelay.server.session import Session
from atmosrelay.stream_io import TLSStream, start_tls
from tests.relay.test_session_deadlines import Peer, context
from tests.relay.test_stream_io import pair
from tests.relay.test_tls_stream import client_context, server_context

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"

Streams = Callable[[], Awaitable[tuple[trio.abc.Stream, trio.abc.Stream]]]


async def plain() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    return await pair()


async def tls() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    server, client = await pair()
    ours = start_tls(server, server_context(), server_side=True)
    assert isinstance(ours, TLSStream)
    theirs = trio.SSLStream(client, client_context(), server_hostname="mx.example")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ours.do_handshake)
        nursery.start_soon(theirs.do_handshake)
    return ours, theirs


async def memory() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    server, client = trio.testing.memory_stream_pair()
    return server, client


@asynccontextmanager
async def session(ctx: SessionContext, streams: Streams) -> AsyncIterator[Peer]:
    server, client = await streams()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Session(server, "192.0.2.1", "trusted", ctx).run)
        peer = Peer(client)
        assert (await peer.reply()).startswith(b"220 ")
        yield peer
        nursery.cancel_scope.cancel()
    await client.aclose()


class Order(logging.Handler):
    """The session's "queued" log line, which it writes when its task resumes after the
    append, in one list with the moments the 250 is handed to the kernel."""

    def __init__(self, events: list[str]) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        if " queued " in record.getMessage():
            self.events.append("task resumed")


@pytest.mark.parametrize(
    ("streams", "from_the_loop"), [(plain, True), (tls, True), (memory, False)]
)
async def test_the_250_is_written_when_the_message_is_queued(
    tmp_path: Path, streams: Streams, from_the_loop: bool
) -> None:
    events: list[str] = []
    queued_then: list[list[str]] = []
    logger = logging.getLogger("atmosrelay.smtp")
    handler, level = Order(events), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with trio.fail_after(30):
            async with context(tmp_path) as ctx, session(ctx, streams) as peer:

                def written(seconds: float) -> None:  # as the 250 is handed to the kernel
                    events.append("250 written")
                    queued_then.append(list(ctx.queue.state.messages))

                ctx.on_data_reply = written
                assert (await peer.cmd(b"EHLO c")).startswith(b"250")
                for _ in range(2):  # the second message: the session goes on as before
                    assert (await peer.cmd(b"MAIL FROM:<alice@example.org>")).startswith(b"250")
                    assert (await peer.cmd(b"RCPT TO:<bob@example.net>")).startswith(b"250")
                    assert (await peer.cmd(b"DATA")).startswith(b"354")
                    reply = await peer.cmd(MESSAGE[:-2])
                    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
                    # the queue had the message when the 250 left
                    assert reply.split()[-1].decode() in queued_then[-1]
                assert (await peer.cmd(b"QUIT")).startswith(b"221")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    one = ["250 written", "task resumed"] if from_the_loop else ["task resumed", "250 written"]
    assert events == one * 2
