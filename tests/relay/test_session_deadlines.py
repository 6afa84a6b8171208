"""A session's time limits on virtual time, driven over memory streams: deadlines that a
peer cannot stretch by dribbling bytes (docs/security.md, "Resource exhaustion").

The sessions here are trusted (no TLS or AUTH to set up). No message reaches the journal:
its owner thread would let the autojump clock move while an fsync runs, so a transaction is
ended by a refusal (a message without a From header gets 554 at once) instead of a 250.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from atmosrelay.accounts.store import Store
from atmosrelay.queue.store import QueueStore
from atmosrelay.runtime import make_context
from atmosrelay.server.context import NotWatched, SessionContext
from atmosrelay.server.session import Session
from journal import open_journal
from journal.testing import CrashableMemFS
from tests.relay.harness import ALICE, enroll, make_config

IDLE = b"421 4.4.2 Idle timeout, closing connection\r\n"
DATA_SLOW = b"421 4.4.2 Message data too slow, closing connection\r\n"
LIFETIME = b"421 4.4.2 Session time limit reached, reconnect to continue\r\n"
NO_FROM = b"554 5.6.0 Failed to parse message: no From header\r\n"


@asynccontextmanager
async def context(
    tmp_path: Path, watch: bool = True, **limits: float
) -> AsyncIterator[SessionContext]:
    """What sessions share, from the test config, with ``limits`` set on it, and its watch
    running (as the runtime runs it) unless ``watch`` is False."""
    ca = trustme.CA()
    config = make_config(tmp_path, ca)
    enroll(config)
    store = Store(config.accounts_db)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_tls)
    try:
        async with open_journal("/j", fs=CrashableMemFS()) as journal:
            ctx = make_context(config, store, QueueStore(journal), server_tls)
            ctx.trusted_did = ALICE
            for name, value in limits.items():
                setattr(ctx, name, value)
            async with trio.open_nursery() as watching:
                if watch:
                    await watching.start(ctx.watch)
                yield ctx
                watching.cancel_scope.cancel()
    finally:
        store.close()


class Peer:
    """The client end: whole replies, each with the virtual time it arrived."""

    def __init__(self, stream: trio.testing.MemoryReceiveStream | trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    async def reply(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = await self.stream.receive_some()
            if not data:
                return b""
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        if line[3:4] == b"-":
            return line + b"\r\n" + await self.reply()
        return line + b"\r\n"

    async def cmd(self, data: bytes) -> bytes:
        assert isinstance(self.stream, trio.abc.SendStream)
        await self.stream.send_all(data + b"\r\n")
        return await self.reply()


@asynccontextmanager
async def session(ctx: SessionContext, mode: str = "trusted") -> AsyncIterator[Peer]:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Session(server, "192.0.2.1", mode, ctx).run)
        peer = Peer(client)
        assert (await peer.reply()).startswith(b"220 ")
        yield peer
        nursery.cancel_scope.cancel()


async def dribble(stream: trio.abc.SendStream, data: bytes, every: float) -> None:
    for i in range(len(data)):
        await trio.sleep(every)
        await stream.send_all(data[i : i + 1])


async def test_idle_timeout(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with context(tmp_path) as ctx, session(ctx, mode="starttls") as peer:
        await peer.cmd(b"EHLO c")
        start = trio.current_time()
        assert await peer.reply() == IDLE
        assert trio.current_time() - start == 60.0
        assert await peer.reply() == b""


async def test_a_deadline_earlier_than_the_watch_expects_is_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The watch sleeps until the earliest deadline it knows; a wait that starts later with
    an earlier deadline (here: a shorter idle limit set on the context meanwhile) moves its
    wake."""
    with trio.fail_after(3600):  # (a wait the watch never ends would hang the test)
        await _two_idle_limits(tmp_path)


async def _two_idle_limits(tmp_path: Path) -> None:
    async with context(tmp_path) as ctx, session(ctx) as first:
        await first.cmd(b"EHLO c")
        start = trio.current_time()
        await trio.sleep(1.5)  # the first session waits until start + 60
        ctx.idle_timeout = 5.0
        async with session(ctx) as second:
            await second.cmd(b"EHLO c")
            second_start = trio.current_time()
            assert await second.reply() == IDLE
            assert trio.current_time() - second_start == 5.0
        assert await first.reply() == IDLE
        assert trio.current_time() - start == 60.0


async def test_a_session_does_not_wait_without_the_watch(tmp_path: Path) -> None:
    """Nothing would end its waits: the session fails at its first, and closes."""
    async with context(tmp_path, watch=False) as ctx:
        with pytest.raises(NotWatched):
            ctx.wait_until(trio.current_time() + 60)
        client, server = trio.testing.memory_stream_pair()
        with trio.fail_after(5):
            await Session(server, "192.0.2.1", "trusted", ctx).run()
        peer = Peer(client)
        assert (await peer.reply()).startswith(b"220 ")
        assert await peer.reply() == b""  # closed, having waited for nothing
        assert not ctx.sessions


async def test_a_dribbled_command_is_timed_from_the_start_of_the_wait(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """One byte every 5 s used to restart the 60 s idle timer with each byte."""
    async with context(tmp_path) as ctx, session(ctx) as peer, trio.open_nursery() as n:
        await peer.cmd(b"EHLO c")
        start = trio.current_time()
        assert isinstance(peer.stream, trio.abc.SendStream)
        n.start_soon(dribble, peer.stream, b"NOOP" + b" " * 100, 4.5)
        assert await peer.reply() == IDLE
        assert trio.current_time() - start == 60.0
        n.cancel_scope.cancel()


async def message_phase(peer: Peer) -> None:
    assert (await peer.cmd(b"EHLO c")).startswith(b"250")
    assert (await peer.cmd(b"MAIL FROM:<alice@example.org>")).startswith(b"250")
    assert (await peer.cmd(b"RCPT TO:<bob@example.net>")).startswith(b"250")
    assert (await peer.cmd(b"DATA")).startswith(b"354")


async def feed(stream: trio.abc.SendStream, chunk: bytes, count: int, first_at: float) -> None:
    """``count`` chunks, one a second from ``first_at`` (off whole seconds: no ties)."""
    await trio.sleep(first_at)
    for _ in range(count):
        await stream.send_all(chunk)
        await trio.sleep(1.0)


async def test_data_below_the_minimum_rate_is_cut_when_the_rate_says(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """data_timeout 10 s plus 1 s per 100 bytes; 50 bytes a second (half the minimum rate):
    after 20 chunks (1,000 bytes, the last at +19.25) the deadline is 10 + 10 = +20 s."""
    limits = {"data_timeout": 10.0, "min_data_rate": 100}
    async with context(tmp_path, **limits) as ctx, session(ctx) as peer:
        await message_phase(peer)
        start = trio.current_time()
        assert isinstance(peer.stream, trio.abc.SendStream)
        async with trio.open_nursery() as n:
            n.start_soon(feed, peer.stream, b"x" * 48 + b"\r\n", 1000, 0.25)
            assert await peer.reply() == DATA_SLOW
            assert trio.current_time() - start == 20.0
            n.cancel_scope.cancel()


async def test_data_at_the_minimum_rate_may_outlast_data_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """200 bytes a second (twice the minimum) for 30 s: three times data_timeout, never cut."""
    limits = {"data_timeout": 10.0, "min_data_rate": 100}
    async with context(tmp_path, **limits) as ctx, session(ctx) as peer:
        await message_phase(peer)
        start = trio.current_time()
        assert isinstance(peer.stream, trio.abc.SendStream)
        await peer.stream.send_all(b"Subject: no From\r\n\r\n")
        await feed(peer.stream, (b"x" * 48 + b"\r\n") * 4, 30, 0.25)
        assert await peer.cmd(b".") == NO_FROM  # its end, answered: it was never cut
        assert trio.current_time() - start == 30.25


async def test_the_session_lifetime_ends_at_a_command_boundary(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with context(tmp_path, max_session_time=100.0) as ctx:
        start = trio.current_time()
        async with session(ctx) as peer:
            for at in (30.0, 60.0, 90.0):
                await trio.sleep_until(start + at)
                assert await peer.cmd(b"NOOP") == b"250 2.0.0 Ok\r\n"
            assert await peer.reply() == LIFETIME
            assert trio.current_time() - start == 100.0  # not 90 + 60 idle


async def test_a_message_in_progress_at_the_lifetime_limit_is_finished_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with context(tmp_path, max_session_time=100.0, idle_timeout=120.0) as ctx:
        start = trio.current_time()
        async with session(ctx) as peer:
            await trio.sleep_until(start + 95.0)
            await message_phase(peer)
            assert isinstance(peer.stream, trio.abc.SendStream)
            await peer.stream.send_all(b"Subject: no From\r\n\r\n")
            await trio.sleep_until(start + 105.0)
            assert await peer.cmd(b".") == NO_FROM  # answered past the limit...
            assert await peer.reply() == LIFETIME  # ...then the session ends, at once
            assert trio.current_time() - start == 105.0


async def test_a_peer_that_never_reads_its_replies_is_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Over a lockstep stream a write completes only when the peer reads: this one never
    does, so the greeting cannot be written; the session ends at the idle limit."""
    async with context(tmp_path) as ctx:
        client, server = trio.testing.lockstep_stream_pair()
        start = trio.current_time()
        with trio.fail_after(3600):
            await Session(server, "192.0.2.1", "trusted", ctx).run()
        assert trio.current_time() - start == 60.0
        await client.aclose()
