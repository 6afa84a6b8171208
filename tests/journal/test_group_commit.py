"""Group commit: concurrent appends share fsyncs, and none returns before its fsync."""

from __future__ import annotations

import threading

import pytest
import trio

from journal import Position, RecordTooLargeError, open_journal
from journal._fs import File
from journal.testing import CrashableMemFS
from tests.journal.helpers import HookedFile

DIR = "/gc"


class RecordingFS(CrashableMemFS):
    """Records, in one global order, each fsync with the size it made durable; the test adds
    each acknowledgement to the same list."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self._events_lock = threading.Lock()

    def event(self, e: tuple[str, int]) -> None:
        with self._events_lock:
            self.events.append(e)

    def _after(self, op: str, inner: File) -> None:
        if op == "sync":
            self.event(("sync", inner.size()))

    def create(self, path: str) -> File:
        return HookedFile(super().create(path), self._after)

    def open(self, path: str) -> File:
        return HookedFile(super().open(path), self._after)


@pytest.mark.parametrize(("appenders", "sharing"), [(1, 1), (10, 2), (100, 5)])
async def test_every_append_returns_after_an_fsync_that_covers_it(
    appenders: int, sharing: int
) -> None:
    fs = RecordingFS()
    per_task = 20
    with trio.fail_after(30):
        async with open_journal(DIR, fs=fs, segment_size=1 << 30) as journal:
            syncs_at_open = journal.syncs

            async def appender(k: int) -> None:
                for i in range(per_task):
                    pos = await journal.append(1, b"%d-%d|" % (k, i) + b"p" * 200)
                    record = await journal.read(pos)
                    fs.event(("ack", pos.offset + 17 + len(record.payload)))

            async with trio.open_nursery() as nursery:
                for k in range(appenders):
                    nursery.start_soon(appender, k)
            syncs = journal.syncs - syncs_at_open
    total = appenders * per_task
    durable = 0
    acks = 0
    for kind, value in fs.events:
        if kind == "sync":
            durable = max(durable, value)
        else:
            acks += 1
            assert value <= durable, "an append returned before an fsync covered its record"
    assert acks == total
    if appenders == 1:
        assert syncs == total  # nothing to share
    else:
        # Group commit: with N appenders waiting, one fsync serves several of them. (How
        # many is a speed figure, measured in bench/; this only asserts that sharing happens.)
        assert syncs <= total / sharing, f"{syncs} fsyncs for {total} appends"


async def test_replay_after_concurrent_appends_is_in_acknowledgement_order() -> None:
    fs = CrashableMemFS()
    seen: list[Position] = []
    async with open_journal(DIR, fs=fs) as journal:

        async def appender(k: int) -> None:
            for i in range(10):
                seen.append(await journal.append(2, b"%03d-%03d" % (k, i)))

        async with trio.open_nursery() as nursery:
            for k in range(30):
                nursery.start_soon(appender, k)
        records = await trio.to_thread.run_sync(lambda: list(journal.records()))
    assert sorted(seen) == [r.position for r in records]
    assert [r.seq for r in records] == list(range(1, 301))
    for k in range(30):  # each task's own appends keep their order
        mine = [r.payload for r in records if r.payload.startswith(b"%03d-" % k)]
        assert mine == [b"%03d-%03d" % (k, i) for i in range(10)]


async def test_caller_mistakes_are_refused_before_anything_is_written() -> None:
    fs = CrashableMemFS()
    async with open_journal(DIR, fs=fs, max_record_size=100) as journal:
        with pytest.raises(RecordTooLargeError, match="over the limit of 100"):
            await journal.append(1, b"x" * 101)
        with pytest.raises(ValueError, match="0 is the journal's own"):
            await journal.append(0, b"x")
        syncs = journal.syncs
        await journal.append(1, b"fine")
        assert journal.syncs == syncs + 1


async def test_closed_journal_refuses_appends() -> None:
    from journal import JournalClosedError

    async with open_journal(DIR, fs=CrashableMemFS()) as journal:
        await journal.append(1, b"a")
    with pytest.raises(JournalClosedError):
        await journal.append(1, b"b")
