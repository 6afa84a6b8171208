"""Group commit: concurrent appends share fsyncs, and none returns before its fsync."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from journal import JournalFatalError, Position, RecordTooLargeError, open_journal
from journal._fs import File
from journal.testing import CrashableMemFS, FaultFS
from tests.journal.helpers import HookedFile

DIR = "/gc"


class RecordingFS(CrashableMemFS):
    """Records, in one global order, each fsync with the size it made durable; the test adds
    each acknowledgement to the same list."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self._events_lock = threading.Lock()
        # While closed, an fsync of a file written since open waits (in the writer thread)
        # for the test to open it: appends made meanwhile must queue for the next batch.
        self.gate = threading.Event()
        self.gate.set()
        self.synced = threading.Event()  # set by each fsync, before it waits for the gate

    def event(self, e: tuple[str, int]) -> None:
        with self._events_lock:
            self.events.append(e)
        self.synced.set()

    def _after(self, op: str, inner: File) -> None:
        if op == "sync":
            self.event(("sync", inner.size()))
            self.gate.wait(30)

    def create(self, path: str) -> File:
        return HookedFile(super().create(path), self._after)

    def open(self, path: str) -> File:
        return HookedFile(super().open(path), self._after)


@pytest.mark.parametrize("appenders", [1, 10, 100])
async def test_every_append_returns_after_an_fsync_that_covers_it(appenders: int) -> None:
    fs = RecordingFS()
    per_task = 20
    first_ends: list[int] = []  # where each task's first record ends
    with trio.fail_after(30):
        async with open_journal(DIR, fs=fs, segment_size=1 << 30) as journal:
            syncs_at_open = journal.syncs
            events_at_open = len(fs.events)
            # The first fsync after this is held until every task has queued its first
            # append, so that sharing shows whatever the writer thread's timing.
            fs.gate.clear()
            queued = 0
            all_queued = trio.Event()

            async def appender(k: int) -> None:
                nonlocal queued
                for i in range(per_task):
                    if i == 0:
                        queued += 1
                        if queued == appenders:
                            all_queued.set()
                    # append() queues the record before its first checkpoint: once the last
                    # task has set the event and run on to here, every first record waits.
                    pos = await journal.append(1, b"%d-%d|" % (k, i) + b"p" * 200)
                    record = await journal.read(pos)
                    end = pos.offset + 17 + len(record.payload)
                    fs.event(("ack", end))
                    if i == 0:
                        first_ends.append(end)

            async with trio.open_nursery() as nursery:
                for k in range(appenders):
                    nursery.start_soon(appender, k)
                await all_queued.wait()
                fs.gate.set()
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
        # Group commit: the first records of all the tasks, queued while one fsync was held,
        # are covered by that fsync and the next: two fsyncs for N appends, in every
        # interleaving. (How much a free-running journal shares is a speed figure, in bench/.)
        syncs_after = [v for kind, v in fs.events[events_at_open:] if kind == "sync"]
        assert len(first_ends) == appenders
        assert max(first_ends) <= syncs_after[1], (first_ends, syncs_after[:3])


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


class LoopTrace(trio.abc.Instrument):
    """The event loop's I/O waits and task steps, in order, while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.events: list[str | trio.lowlevel.Task] = []

    def after_io_wait(self, timeout: float) -> None:
        if self.on:
            self.events.append("io")

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.events.append(task)


async def test_an_appender_runs_in_the_first_batch_of_tasks_after_its_fsync() -> None:
    """The owner thread's wake-up is acted on right after the I/O wait that sees it
    (journal/_journal.py, ``_Waker``): the appender runs before the loop waits again. Through
    trio's ``run_sync_soon`` alone, a callback task would make it runnable only in that batch,
    and it would run after the next I/O wait."""
    fs = RecordingFS()
    trace = LoopTrace()
    trio.lowlevel.add_instrument(trace)
    try:
        with trio.fail_after(30):
            async with open_journal(DIR, fs=fs, segment_size=1 << 30) as journal:
                fs.gate.clear()  # the next fsync waits for the gate, in the owner thread
                appender: list[trio.lowlevel.Task] = []

                async def append() -> None:
                    appender.append(trio.lowlevel.current_task())
                    await journal.append(1, b"x")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(append)
                    await trio.testing.wait_all_tasks_blocked()  # parked on its batch
                    trace.on = True  # from here the loop only waits for the owner thread
                    fs.gate.set()
                trace.on = False
    finally:
        trio.lowlevel.remove_instrument(trace)
    events = trace.events
    first_io = events.index("io")  # the wake-up the owner thread sent after the fsync
    resumed = events.index(appender[0], first_io)
    assert "io" not in events[first_io + 1 : resumed], events


async def test_a_durable_callback_runs_on_the_loop_before_its_appender_resumes() -> None:
    """``append(..., durable=f)``: ``f`` gets the position once the fsync covers it, before
    the append returns (the session writes its 250 there)."""
    fs = RecordingFS()
    seen: list[tuple[Position, int]] = []
    with trio.fail_after(30):
        async with open_journal(DIR, fs=fs, segment_size=1 << 30) as journal:

            def durable(position: Position) -> None:
                seen.append((position, len(fs.events)))

            syncs_before = len(fs.events)
            position = await journal.append(1, b"x", durable)
            assert seen == [(position, syncs_before + 1)]  # after its one fsync
            assert [e for e in fs.events if e[0] == "sync"][-1][1] >= position.offset


async def test_a_durable_callback_runs_even_when_its_appender_was_cancelled() -> None:
    """The record belongs to the writer once appended; when it is durable, the callback is
    told so whether anyone still waits for the append or not."""
    fs = RecordingFS()
    seen: list[Position] = []
    with trio.fail_after(30):
        async with open_journal(DIR, fs=fs, segment_size=1 << 30) as journal:
            fs.gate.clear()  # the fsync waits
            with trio.CancelScope() as scope:
                scope.cancel()
                await journal.append(1, b"x", seen.append)
            assert seen == []  # not durable yet
            fs.gate.set()
            second = await journal.append(1, b"y")  # the next batch: the first is done by then
            assert len(seen) == 1 and seen[0].offset < second.offset


async def test_a_callback_that_raises_is_logged_and_the_batch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fs = RecordingFS()
    seen: list[str] = []

    def broken(position: Position) -> None:
        raise ValueError("a callback's own bug")

    with trio.fail_after(30):
        async with open_journal(DIR, fs=fs, segment_size=1 << 30) as journal:
            fs.gate.clear()  # the writer holds the first batch: the next two share one
            fs.synced.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(journal.append, 1, b"w")
                # until the writer waits in w's fsync
                assert await trio.to_thread.run_sync(fs.synced.wait, 10)
                nursery.start_soon(journal.append, 1, b"x", broken)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(journal.append, 1, b"y", lambda p: seen.append("second"))
                await trio.testing.wait_all_tasks_blocked()
                fs.gate.set()
            await journal.append(1, b"z")  # the journal still works
    assert seen == ["second"]
    assert journal.appends == 4 and journal.batches == 3  # w, then x and y together, then z
    assert "journal: a durable callback raised" in caplog.text
    assert "a callback's own bug" in caplog.text


async def test_no_callback_when_the_batch_failed() -> None:
    fs = FaultFS(CrashableMemFS(), only="sync", fail_at=1)  # the open's fsync, then ours
    seen: list[Position] = []
    with trio.fail_after(30):
        async with open_journal(DIR, fs=fs, segment_size=1 << 30) as journal:
            with pytest.raises(JournalFatalError):
                await journal.append(1, b"x", seen.append)
            assert journal.poisoned
    assert seen == []


async def test_a_durable_callback_runs_before_the_next_task_step_not_the_next_batch() -> None:
    """Under load the loop seldom waits for I/O: the owner thread's news is taken between two
    task steps (``_Waker.before_task_step``), so a 250 does not wait for the batch of tasks
    under way to end. Three tasks wake in one batch; the first of them to run lets the fsync
    finish and waits, blocking the loop, until the owner thread has queued its news. The
    callback must run before the other two run, with no I/O wait in between."""
    fs = RecordingFS()
    trace = LoopTrace()
    queued = threading.Event()
    woke: list[trio.lowlevel.Task] = []
    with trio.fail_after(30):
        async with open_journal(DIR, fs=fs, segment_size=1 << 30) as journal:
            journal.on_batch = lambda n, took: queued.set()  # after the news is queued
            trio.lowlevel.add_instrument(trace)
            try:
                fs.gate.clear()
                go = trio.Event()

                async def woken() -> None:
                    await go.wait()
                    woke.append(trio.lowlevel.current_task())
                    if len(woke) == 1:  # the first of the batch: two more run after it
                        fs.gate.set()
                        assert queued.wait(10)  # the owner thread has queued its news

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(journal.append, 1, b"x", lambda p: trace.events.append("cb"))
                    await trio.testing.wait_all_tasks_blocked()
                    for _ in range(3):
                        nursery.start_soon(woken)
                    await trio.testing.wait_all_tasks_blocked()
                    trace.on = True
                    go.set()
                trace.on = False
            finally:
                trio.lowlevel.remove_instrument(trace)
    events = trace.events
    first, cb = events.index(woke[0]), events.index("cb")
    assert first < cb < events.index(woke[1]) < events.index(woke[2]), events
    assert "io" not in events[first : events.index(woke[2])], events
