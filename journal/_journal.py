"""The journal for trio: group commit through one owner thread.

``open_journal()`` recovers the directory (in a worker thread), then starts the *owner
thread*, the only code that writes the journal. Any number of trio tasks call ``append()``;
each adds its record to the open batch and waits. The owner thread takes the whole batch,
writes it, fsyncs once, and wakes every task of that batch. While it fsyncs, the next batch
fills. So the fsyncs per append fall as concurrency rises, and no fsync ever runs on the trio
thread.

Why a long-lived owner thread and not ``trio.to_thread.run_sync`` per batch: a batch costs two
cross-thread wake-ups either way, but ``to_thread`` adds its own bookkeeping on each. On the
2-core development VM that was 125 us a hop against a 150 us fdatasync: a single appender got
45% of a plain write+fsync loop with ``to_thread``, about 60% with this thread (measured by
``bench/bench_journal.py``). The thread also takes the next batch straight after an fsync
without a round trip through trio when appends are waiting.

**Waiting for the others (``gather``).** Where records come one at a time from many
appenders, as when each message has its own connection, the owner thread woke for nearly
every record: about one fsync a record, and each batch costs the event loop's thread more
than its fsync, because the owner thread needs the GIL four or five times a batch (to take
it, around the write and the fsync, to wake the loop) and the event loop's thread waits to
get it back each time. So the owner may wait, before it takes a batch, for records the
caller says are on their way: ``gather`` (None: never) is asked, in the owner thread, each
time it wakes for records, and returns how long it may wait (0: write at once); the caller
ends the wait sooner with ``gathered()`` once nothing more is coming. The relay answers
with ``journal.group_wait`` while other sessions are reading a message (their data phase)
and 0 otherwise, and calls ``gathered()`` when the last of them has read its end: a lone
sender's record is never held, and a held one waits only for messages already arriving
(server/context.py). The wait releases the GIL and never lasts more than ``MAX_GATHER``
(10 ms), whatever ``gather`` says; closing ends it. Measured in bench/README.md (the
twenty-second run).

**Records nobody waits for (``patient``).** ``append(..., patient=True)`` says the appender
does not wait on this record's fsync to go on with its work: the relay's delivery outcomes,
appended by a task of their own while the lane's worker starts its next transaction
(delivery/dispatcher.py). A batch of patient records only is held up to ``patience`` (5 ms)
for more to join it; the first record appended without ``patient`` ends the wait (and the
batch then waits only as ``gather`` says), so a 250 never waits for outcomes. Draining a deep
queue, outcomes come one every 0.6 ms or so: they shared an fsync about seven at a time, held
up 15-16 at a time (docs/delivery.md).

Between batches the owner thread runs *jobs* (rotation, compaction steps); waiting batches
always go first, so a long compaction never stalls acceptance.

How a finished batch wakes its tasks: the owner thread queues the batch's event for ``_Waker``
and wakes the event loop through ``run_sync_soon``. ``_Waker`` is a trio instrument: before
every task step, and right after the loop's I/O wait, it looks at that queue (a deque's
length: the whole cost when it is empty) and sets every event in it, so the appenders run in
the next batch of tasks. Through ``run_sync_soon`` alone they would run a batch later still:
trio's callback task runs somewhere in the next batch and only then makes them runnable.
Under load a batch of tasks is long (at 50 TLS sessions, 5-20 ms on the development VM).

Even so an appender waits for the rest of the batch under way and for its own place in the
next. So ``append(..., durable=f)`` calls ``f(position)`` from the instrument itself: on the
event loop, between two task steps (or after the I/O wait), as soon as the loop learns the
record is durable, before the appender resumes, and even if the appender was cancelled
meanwhile; never for a failed batch. The queue adds the message to its state there
(queue/store.py) and a session writes its 250 there (server/session.py): at 50 TLS sessions
the mean from the end of DATA to the 250 went from 14-16 ms to 4-5 ms. A callback must be
quick and must not block, and may make only the trio calls that need no task (setting an
event, a non-blocking write); what it raises is logged, not propagated. The ``run_sync_soon``
callback does the same for whatever the instrument has not (it is idempotent); it is also
what wakes a loop asleep in its I/O wait.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Container, Generator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Final, TypeVar, cast

import attrs
import trio

from journal._extent import Extent, extent_of, offsets_within, records_since
from journal._fs import FS, OsFS
from journal._log import (
    DEFAULT_MAX_RECORD_SIZE,
    DEFAULT_SEGMENT_SIZE,
    Compaction,
    Log,
    Position,
    Record,
    RecoveryReport,
    check_record,
)
from journal.errors import (
    JournalClosedError,
    JournalError,
    JournalFatalError,
)

log = logging.getLogger("journal")

T = TypeVar("T")

# How long closing may wait for the owner thread to write what it holds. Bounded so that a
# hung disk cannot hang shutdown forever; whatever was not acknowledged was never promised.
CLOSE_TIMEOUT: Final = 30.0

# The longest ``gather`` may hold a batch: whatever it answers, a record is written soon.
MAX_GATHER: Final = 0.01
# How long a batch of patient records only is held for more (``append``'s ``patient``).
PATIENCE: Final = 0.005


@attrs.define(eq=False)
class _Batch:
    items: list[tuple[int, bytes]] = attrs.field(factory=list)
    done: trio.Event = attrs.field(factory=trio.Event)
    positions: list[Position] = attrs.field(factory=list)
    error: BaseException | None = None
    # (index in items, callback): run on the event loop when the batch is durable, before
    # its appenders are woken (``append``'s ``durable``)
    callbacks: list[tuple[int, Callable[[Position], None]]] = attrs.field(factory=list)
    impatient: int = 0  # records appended without ``patient``


class _Waker(trio.abc.Instrument):
    """Between two task steps, or right after the I/O wait, runs the durable batches'
    callbacks and sets the events the owner thread queued."""

    def __init__(self) -> None:
        # from any thread: an event to set, with the batch it ends (None for a job's)
        self.events: collections.deque[tuple[trio.Event, _Batch | None]] = collections.deque()

    def after_io_wait(self, timeout: float) -> None:
        self.set_queued()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.events:  # the one cost of every task step: a deque's length
            self.set_queued()

    def set_queued(self) -> None:
        events = self.events
        while events:
            event, batch = events.popleft()
            if batch is not None and batch.callbacks and batch.error is None:
                for index, callback in batch.callbacks:
                    try:
                        callback(batch.positions[index])
                    except Exception:  # trio would remove an instrument that raised
                        log.exception("journal: a durable callback raised")
            event.set()


@attrs.define(eq=False)
class _Job:
    steps: Generator[None, None, object]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: object = None
    error: BaseException | None = None


def _step_once(fn: Callable[[], T]) -> Generator[None, None, T]:
    return fn()
    yield  # a generator that finishes in one step


def _reraise(error: BaseException) -> None:
    """Raise a fresh copy in this task: one exception object must not travel through the
    tracebacks of several tasks."""
    if isinstance(error, JournalError):
        raise type(error)(*error.args) from error
    raise JournalFatalError(f"journal writer failed: {error!r}") from error


class Journal:
    """An open journal. Use ``open_journal()``; never construct this directly."""

    def __init__(self, log_: Log, recovery: RecoveryReport) -> None:
        self._log = log_
        self.recovery = recovery
        self._token = trio.lowlevel.current_trio_token()
        self._waker = _Waker()
        self._cv = threading.Condition()
        self._open = _Batch()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._closing = False
        self._stopped = trio.Event()
        self._close_error: JournalError | None = None
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self.batches = 0
        self.appends = 0
        # Called from the writer thread after each batch that reached the disk, with the
        # batch's size and the seconds its write and fsync took (metrics; must be quick and
        # thread-safe, and never raise).
        self.on_batch: Callable[[int, float], None] | None = None
        # Asked in the writer thread when it wakes for records, before it takes them: how
        # many seconds to wait for more to join the batch (0: none). See the module's notes;
        # must be quick, must only read, and must never raise.
        self.gather: Callable[[], float] | None = None
        self._gathering = False  # the writer waits for records on their way (cv guards it)
        # How long a batch of patient records only waits for more (0: not at all).
        self.patience = PATIENCE

    @property
    def directory(self) -> str:
        return self._log.directory

    @property
    def poisoned(self) -> bool:
        """An fsync or write failed: every append now raises ``JournalFatalError`` and only
        a restart (which re-reads the disk) makes the journal usable again. A cheap read of
        a flag, for callers that want to stop taking work at once."""
        return self._log.poisoned

    @property
    def syncs(self) -> int:
        """File fsyncs since open (recovery's included)."""
        return self._log.syncs

    # -- the trio side -------------------------------------------------------------
    async def append(
        self,
        rtype: int,
        payload: bytes,
        durable: Callable[[Position], None] | None = None,
        *,
        patient: bool = False,
    ) -> Position:
        """Append one record; return its position once an fsync has covered it.

        Raises ``RecordTooLargeError``/``ValueError`` (the caller's mistake, nothing written),
        ``JournalFullError`` (disk full: nothing of it can survive a crash, retry later),
        ``JournalFatalError`` (poisoned: restart), ``JournalClosedError``.

        Cancellation: once this is called the record belongs to the writer. A cancelled
        ``append`` may still become durable; the caller simply never learns its position
        (like a 250 lost on the wire: the sender retries, and delivery is at-least-once).

        ``durable``: called with the position on the event loop, outside any task, once the
        record is durable and before this returns; even if this task is cancelled meanwhile.
        Never called when the batch failed (this raises instead). See the module's notes.

        ``patient``: nobody waits on this record but this call; its batch may be held up to
        ``patience`` for more records, until one comes that is not patient.
        """
        check_record(rtype, payload, self._log.max_record_size)  # before it joins a batch
        with self._cv:
            if self._closing:
                raise JournalClosedError("journal is closing; no more appends")
            batch = self._open
            index = len(batch.items)
            batch.items.append((rtype, payload))
            if durable is not None:
                batch.callbacks.append((index, durable))
            if not patient:
                batch.impatient += 1
            if index == 0 or (not patient and batch.impatient == 1):
                # the writer's first record; or the first a held batch of patient ones waits
                # for (``_gather``): no waiting for nobody's records, write now
                self._cv.notify()
        await batch.done.wait()
        if batch.error is not None:
            _reraise(batch.error)
        return batch.positions[index]

    async def rotate(self) -> int:
        """Seal the active segment; returns the number of the new one."""
        return cast(int, await self._job(_step_once(self._log.rotate)))

    async def compact(self, dead: Container[Position]) -> Compaction:
        """Copy every record not named ``dead`` out of the sealed segments, then delete the
        sealed segments (a record the caller has not heard of yet is kept).

        Returns where each copied record now stands (``relocated``); until the next
        compaction, ``read()`` of an old position follows the move. Appends keep flowing
        between compaction steps."""
        return cast(Compaction, await self._job(self._log.compact_steps(dead)))

    async def read(self, position: Position) -> Record:
        """One record by position, read in a worker thread."""
        return await trio.to_thread.run_sync(self._log.read, position)

    async def read_then(self, position: Position, then: Callable[[Record], T]) -> T:
        """Read one record and apply ``then`` to it in the same worker thread: one thread
        hop for read-and-process (a delivery reads a body and signs it)."""
        return await trio.to_thread.run_sync(lambda: then(self._log.read(position)))

    def records(self, first: int = 0, last: int | None = None) -> Iterator[Record]:
        """Every record in seq order; only those with a seq within ``first``..``last`` when
        given (found by bisection, the others never read). Blocking: iterate it in a worker
        thread, e.g. ``await trio.to_thread.run_sync(lambda: fold(journal.records()))``."""
        return self._log.records(first, last)

    def newest_from(self, count: int) -> int:
        """The seq from which on the journal holds its newest ``count`` records, 0 when it
        holds no more (``records(journal.newest_from(n))``: the newest n)."""
        return self._log.newest_from(count)

    def extent(self) -> Extent:
        """Where the journal stands now (journal/_extent.py)."""
        return extent_of(self._log)

    def offsets(self, extent: Extent) -> dict[int, list[int]]:
        """Where each record ``extent`` covers stands: its offsets, by segment, ascending."""
        return offsets_within(self._log, extent)

    def records_since(self, extent: Extent) -> Iterator[Record]:
        """The records written after ``extent``, in seq order (blocking, as ``records``);
        ``ExtentMismatch`` when the journal has changed under it (journal/_extent.py)."""
        return records_since(self._log, extent)

    @property
    def active_segment(self) -> int:
        return self._log.active_segment

    async def _job(self, steps: Generator[None, None, object]) -> object:
        job = _Job(steps)
        with self._cv:
            if self._closing:
                steps.close()
                raise JournalClosedError("journal is closing")
            self._jobs.append(job)
            self._cv.notify()
        await job.done.wait()
        if job.error is not None:
            _reraise(job.error)
        return job.result

    async def aclose(self) -> None:
        """Stop taking appends, let the owner thread write what it holds, attest it with a
        final sync mark, and close the files. Waits at most CLOSE_TIMEOUT, even if cancelled.

        Raises ``JournalFatalError`` once if the final mark could not be written: every
        acknowledged record was already durable, but the disk is failing."""
        with self._cv:
            already = self._closing
            self._closing = True
            self._cv.notify()
        if not already and not self._thread.is_alive() and not self._stopped.is_set():
            self._stopped.set()  # never started
        # Bounded in real time (a thread join), not on trio's clock: under a virtual clock a
        # trio deadline would pass at once while the thread is still writing.
        with trio.CancelScope(shield=True):
            if self._thread.is_alive():
                await trio.to_thread.run_sync(self._thread.join, CLOSE_TIMEOUT)
            if self._thread.is_alive():
                log.error("journal: writer thread did not finish within %ss", CLOSE_TIMEOUT)
            else:
                await self._stopped.wait()
        with contextlib.suppress(KeyError):  # added by _start; a late event still gets set
            trio.lowlevel.remove_instrument(self._waker)  # through run_sync_soon
        if self._close_error is not None:
            error, self._close_error = self._close_error, None
            _reraise(error)

    # -- the owner thread ----------------------------------------------------------
    def _start(self) -> None:
        trio.lowlevel.add_instrument(self._waker)
        self._thread.start()

    def _notify(self, event: trio.Event, batch: _Batch | None = None) -> None:
        """Wake trio waiters from the owner thread (a no-op once the trio run has ended)."""
        self._waker.events.append((event, batch))
        try:
            self._token.run_sync_soon(self._waker.set_queued, idempotent=True)
        except trio.RunFinishedError:
            log.warning("journal: trio run ended before the writer finished")

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._open.items and not self._jobs and not self._closing:
                        self._cv.wait()
                    self._gather()
                    batch: _Batch | None = None
                    job: _Job | None = None
                    if self._open.items:
                        batch, self._open = self._open, _Batch()
                    elif self._jobs:
                        job = self._jobs[0]
                    else:
                        break  # closing, and nothing is left
                if batch is not None:
                    self._write(batch)
                elif job is not None:
                    self._step(job)
        finally:
            try:
                self._log.close()
            except JournalError as exc:
                self._close_error = exc
            self._notify(self._stopped)

    def gathered(self) -> None:
        """No more records are on their way: a writer waiting for them (``gather``) writes
        what it has now. From any thread; a no-op when the writer is not waiting."""
        with self._cv:
            if self._gathering:
                self._gathering = False
                self._cv.notify()

    def _gather(self) -> None:
        """Wait, as ``gather`` says, for more records to join the open batch, until the time
        is up or ``gathered`` is called; a batch of patient records only, as ``patience``
        says (cv held; the waits release it)."""
        if not self._open.items or self._closing:
            return
        if not self._open.impatient and self.patience > 0:
            # patient records only: held until one comes that is not, or the time is up
            self._hold(min(self.patience, MAX_GATHER), lambda: not self._open.impatient)
        if self.gather is None or not self._open.impatient or self._closing:
            return
        try:
            wait = max(0.0, min(float(self.gather()), MAX_GATHER))
        except Exception:  # a waiting policy's bug must not stop the writer
            log.exception("journal: gather raised; writing at once")
            return
        if wait <= 0:
            return
        self._gathering = True
        self._hold(wait, lambda: self._gathering)
        self._gathering = False

    def _hold(self, seconds: float, holding: Callable[[], bool]) -> None:
        """Wait on the lock's condition up to ``seconds`` while ``holding()`` says so and the
        journal is not closing (cv held; the wait releases it)."""
        deadline = time.monotonic() + seconds
        while holding() and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)

    def _write(self, batch: _Batch) -> None:
        took = 0.0
        try:
            started = time.monotonic()
            batch.positions = self._log.write_batch(batch.items)
            self.batches += 1
            self.appends += len(batch.items)
            took = time.monotonic() - started
        except Exception as exc:  # the waiters get it; the thread goes on (the log poisons)
            batch.error = exc
        self._notify(batch.done, batch)
        if batch.error is None and self.on_batch is not None:
            self.on_batch(len(batch.items), took)

    def _step(self, job: _Job) -> None:
        try:
            next(job.steps)
            return
        except StopIteration as stop:
            job.result = stop.value
        except Exception as exc:
            job.error = exc
        with self._cv:
            self._jobs.popleft()
        self._notify(job.done)


@asynccontextmanager
async def open_journal(
    directory: str,
    *,
    fs: FS | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
) -> AsyncIterator[Journal]:
    """Recover the journal in ``directory`` and keep it open for the block.

    Recovery runs in a worker thread; ``journal.recovery`` says what it found. Raises
    ``CorruptJournalError`` (nothing modified) when acknowledged bytes are damaged. On exit
    the journal is closed (see ``Journal.aclose``).
    """
    opener = partial(
        Log.open,
        fs if fs is not None else OsFS(),
        directory,
        segment_size=segment_size,
        max_record_size=max_record_size,
    )
    log_, report = await trio.to_thread.run_sync(opener)
    journal = Journal(log_, report)
    journal._start()
    try:
        yield journal
    finally:
        await journal.aclose()
