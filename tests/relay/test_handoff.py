"""The hand-off between a session process and the journal's owner (server/handoff.py), both
ends in this process over a real socketpair, the owner's on a real QueueStore and journal
(in memory, crashable, with faults injected where a test says): a message is answered only
once it is durable, the journal's failures come back as the errors the pipeline maps to 452
and 451, a peer that sends what no session process would is refused or cut off, and an
owner that goes away fails what is in hand."""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme

from atmosrelay.accounts.store import Store
from atmosrelay.queue.store import QueueStore
from atmosrelay.runtime import make_context
from atmosrelay.server.context import SessionContext
from atmosrelay.server.handoff import (
    ACCEPT,
    COUNT,
    DOWN,
    FAILED,
    OK,
    UP,
    Handoff,
    HandoffLost,
    RemoteQueue,
)
from atmosrelay.stream_io import StreamIO
from journal import FS, JournalFatalError, JournalFullError, open_journal
from journal.testing import CrashableMemFS, FaultFS
from tests.queue.factories import accepted_record
from tests.relay.harness import enroll, make_config

MESSAGE = b"From: alice@example.org\r\nSubject: handed over\r\n\r\nbody\r\n"


def _stream(sock: trio.socket.SocketType) -> StreamIO:
    return StreamIO(trio.SocketStream(sock))


@asynccontextmanager
async def owner(tmp_path: Path, fs: FS) -> AsyncIterator[tuple[SessionContext, QueueStore]]:
    """The owner's context and queue, on a journal in ``fs``."""
    ca = trustme.CA()
    config = make_config(tmp_path, ca)
    enroll(config)
    store = Store(config.accounts_db)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        async with open_journal("/j", fs=fs) as journal:
            queue = QueueStore(journal)
            yield make_context(config, store, queue, tls), queue
    finally:
        store.close()


@asynccontextmanager
async def linked(
    tmp_path: Path, fs: FS
) -> AsyncIterator[tuple[SessionContext, QueueStore, RemoteQueue]]:
    """A session process's queue (``RemoteQueue``) linked to an owner on ``fs``."""
    async with owner(tmp_path, fs) as (ctx, queue):
        ours, theirs = trio.socket.socketpair()
        with ours, theirs:
            remote = RemoteQueue(_stream(theirs))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Handoff(queue, ctx).serve, 0, _stream(ours))
                nursery.start_soon(remote.out.run)
                nursery.start_soon(remote.run)
                yield ctx, queue, remote
                nursery.cancel_scope.cancel()


def _counted(fs: FaultFS, op: str) -> int:
    """How many ``op`` operations ``fs`` has seen (the journal's open made some)."""
    return sum(1 for r in fs.log if r.op == op)


async def test_the_answer_comes_once_the_record_is_durable(tmp_path: Path) -> None:
    fs = CrashableMemFS()
    record = accepted_record("bob@example.net", size=len(MESSAGE))
    seen: list[bool] = []
    with trio.fail_after(30):
        async with linked(tmp_path, fs) as (ctx, queue, remote):
            await remote.accept(
                record, MESSAGE, lambda: seen.append(record.id in queue.state.messages)
            )
            assert seen == [True]  # ``then`` ran, and the owner's queue had it by then
            assert ctx.pipeline.accepted["smtp"] == 1
            crashed = fs.crash_clone()  # a power cut the moment the session was answered
    async with open_journal("/j", fs=crashed) as journal:
        restored = await QueueStore.recover(journal)
        assert list(restored.state.messages) == [record.id]
        stored = await journal.read(restored.state.messages[record.id].position)
        assert stored.payload.endswith(MESSAGE)


async def test_a_full_disk_is_journal_full_and_the_link_goes_on(tmp_path: Path) -> None:
    fs = FaultFS(CrashableMemFS(), only="append", error=errno.ENOSPC)
    first = accepted_record("bob@example.net", size=len(MESSAGE))
    second = accepted_record("carol@example.net", size=len(MESSAGE))
    called: list[str] = []
    with trio.fail_after(30):
        async with linked(tmp_path, fs) as (_, queue, remote):
            fs.fail_at = _counted(fs, "append")  # the next one: the first record's
            with pytest.raises(JournalFullError):
                await remote.accept(first, MESSAGE, lambda: called.append(first.id))
            await remote.accept(second, MESSAGE, lambda: called.append(second.id))
            assert called == [second.id]
            assert list(queue.state.messages) == [second.id]
            assert not remote.journal.poisoned


async def test_a_failed_fsync_is_fatal_and_says_poisoned(tmp_path: Path) -> None:
    fs = FaultFS(CrashableMemFS(), only="sync", error=errno.EIO)
    record = accepted_record("bob@example.net", size=len(MESSAGE))
    with trio.fail_after(30):
        async with linked(tmp_path, fs) as (_, _, remote):
            fs.fail_at = _counted(fs, "sync")
            with pytest.raises(JournalFatalError):
                await remote.accept(record, MESSAGE, lambda: pytest.fail("answered"))
            assert remote.journal.poisoned  # the session process's ctx.journal_failed() sees it


class RawPeer:
    """An owner's hand-off, and the socket of its session process: this test."""

    def __init__(self, ctx: SessionContext, queue: QueueStore, sock: trio.socket.SocketType):
        self.ctx = ctx
        self.queue = queue
        self.sock = sock
        self.handoff = Handoff(queue, ctx)
        self.ended = trio.Event()  # the owner's end of the link is closed


@asynccontextmanager
async def raw_peer(tmp_path: Path) -> AsyncIterator[RawPeer]:
    """An owner whose session process is this test, writing frames by hand."""
    async with owner(tmp_path, CrashableMemFS()) as (ctx, queue):
        ours, theirs = trio.socket.socketpair()
        peer = RawPeer(ctx, queue, theirs)

        async def serve() -> None:
            await peer.handoff.serve(0, _stream(ours))
            peer.ended.set()

        with ours, theirs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                yield peer
                nursery.cancel_scope.cancel()


async def _answer(sock: trio.socket.SocketType) -> tuple[int, int, bytes]:
    data = b""
    while len(data) < DOWN.size:
        more = await sock.recv(DOWN.size - len(data))
        assert more, "the owner closed the link"
        data += more
    length, kind, number = DOWN.unpack(data)
    body = b""
    while len(body) < length:
        body += await sock.recv(length - len(body))
    return kind, number, body


async def test_a_head_that_does_not_decode_is_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from atmosrelay.queue.records import encode_accepted

    good = encode_accepted(accepted_record("bob@example.net", size=len(MESSAGE)), MESSAGE)
    with trio.fail_after(30):
        async with raw_peer(tmp_path) as peer:
            queue, sock = peer.queue, peer.sock
            junk = b"\x05\x00\x00\x00{nope" + MESSAGE
            await sock.send(UP.pack(len(junk), ACCEPT, 7, 0) + junk)
            assert await _answer(sock) == (FAILED, 7, b"")
            await sock.send(UP.pack(len(good), ACCEPT, 8, 0) + good)  # the link goes on
            assert await _answer(sock) == (OK, 8, b"")
            assert len(queue.state.messages) == 1
    assert any("does not decode" in r.getMessage() for r in caplog.records)


async def test_a_frame_longer_than_any_record_ends_the_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with trio.fail_after(30):
        async with raw_peer(tmp_path) as peer:
            queue, sock = peer.queue, peer.sock
            await sock.send(UP.pack(0xFFFFFFFF, ACCEPT, 1, 0))
            assert await sock.recv(100) == b""  # the owner closed its end
            assert not queue.state.messages
    assert any("malformed frame" in r.getMessage() for r in caplog.records)


async def test_data_phase_counts_reach_the_owners_journal_wait(tmp_path: Path) -> None:
    """A session process's sessions in a data phase count in the owner's ``in_data`` (its
    journal waits for their records); when they have all arrived, the owner's writer is told
    at once (``gathered``), and a link that ends counts its sessions out. Each step is read
    back through an answer to an ACCEPT frame sent after it (frames are read in order)."""
    from atmosrelay.queue.records import encode_accepted

    def frame(number: int, in_data: int) -> bytes:
        payload = encode_accepted(accepted_record("bob@example.net", size=len(MESSAGE)), MESSAGE)
        return UP.pack(len(payload), ACCEPT, number, in_data) + payload

    with trio.fail_after(30):
        async with raw_peer(tmp_path) as peer:
            ctx, queue, sock = peer.ctx, peer.queue, peer.sock
            gathered = trio.Event()
            queue.journal.gathered = gathered.set  # type: ignore[method-assign]
            await sock.send(UP.pack(0, COUNT, 0, 3) + frame(1, 3))
            assert await _answer(sock) == (OK, 1, b"")
            assert ctx.in_data == 3 and ctx.gather() == ctx.group_wait > 0
            assert not gathered.is_set()
            await sock.send(frame(2, 0))  # the last of them arrived with this one
            assert await _answer(sock) == (OK, 2, b"")
            assert gathered.is_set() and ctx.in_data == 0 and ctx.gather() == 0
            gathered = trio.Event()
            queue.journal.gathered = gathered.set  # type: ignore[method-assign]
            await sock.send(frame(3, 2))
            assert await _answer(sock) == (OK, 3, b"")
            assert ctx.in_data == 2
            sock.close()  # the session process died with two sessions reading
            await gathered.wait()
            assert ctx.in_data == 0


async def test_an_owner_that_goes_away_fails_what_is_in_hand(tmp_path: Path) -> None:
    record = accepted_record("bob@example.net", size=len(MESSAGE))
    ours, theirs = trio.socket.socketpair()
    remote = RemoteQueue(_stream(theirs))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(remote.out.run)
            nursery.start_soon(remote.run)
            failed: list[BaseException] = []
            done = trio.Event()

            async def submit() -> None:
                try:
                    await remote.accept(record, MESSAGE, lambda: pytest.fail("answered"))
                except HandoffLost as exc:
                    failed.append(exc)
                done.set()

            nursery.start_soon(submit)
            header = await ours.recv(UP.size)  # the owner has the frame, then dies
            assert UP.unpack(header)[1] == ACCEPT
            ours.close()
            await done.wait()
            assert len(failed) == 1 and remote.lost
            with pytest.raises(HandoffLost):  # and nothing more is taken
                await remote.accept(record, MESSAGE)
            nursery.cancel_scope.cancel()
    theirs.close()


@pytest.mark.parametrize("final", [False, True])
async def test_a_process_that_dies_before_its_last_flush_leaves_its_counts_to_the_owner(
    tmp_path: Path, final: bool
) -> None:
    """The records a session process handed over after its last reported flush are given to
    the owner to count (``on_lost``) when it dies; not when it said its flush was its last."""
    import pickle

    from atmosrelay.queue.records import encode_accepted
    from atmosrelay.server.handoff import STATS

    flushed = accepted_record("bob@example.net", accepted_at=1_800_000_000.0)
    unflushed = accepted_record("carol@example.net", accepted_at=1_800_000_010.0)
    lost: list[tuple[list[str], float]] = []
    with trio.fail_after(30):
        async with raw_peer(tmp_path) as peer:
            sock, handoff = peer.sock, peer.handoff
            handoff.on_lost = lambda ids, since: lost.append((ids, since))
            for number, record in enumerate((flushed, unflushed), 1):
                payload = encode_accepted(record, MESSAGE)
                await sock.send(UP.pack(len(payload), ACCEPT, number, 0) + payload)
                assert await _answer(sock) == (OK, number, b"")
            stats = {"refused": {}, "tls_failures": 0, "data_reply": [], "sessions": 0}
            stats["counted"] = 1_800_000_005.0  # its last flush had the first only
            if final:
                stats["final"] = True
            body = pickle.dumps(stats)
            await sock.send(UP.pack(len(body), STATS, 0, 0) + body)
            sock.close()
            await peer.ended.wait()
    assert lost == ([] if final else [([unflushed.id], 1_800_000_005.0)])
