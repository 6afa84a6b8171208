"""The hand-off: sessions in other processes give their messages to the journal's owner.

With ``smtp.processes = N`` the SMTP sessions run in N *session processes*
(server/workers.py) and the process that owns the journal runs none of the submission
listeners' sessions. A session process does all of a session (TLS, AUTH, the policy, the
message's checks and headers) and, where a session in the owner would append its ACCEPTED
record, hands the record's payload to the owner over a socketpair; the owner appends it with
the journal's group commit and answers the moment it is durable; the session writes its 250
then, and not before. So the durability contract is the owner's, as in one process: a 250
means the record is fsynced in the one journal.

    session process                                   owner
    RemoteQueue.accept(record, message) --ACCEPT n-->  decode the head, QueueStore.accept
                                   <--OK n-----------  ... durable: the state has it
    then(): the 250

**Frames.** Binary and small: a header (``struct``) and a body. From a session process:
ACCEPT (the request's number; the body is the ACCEPTED payload as ``encode_accepted`` makes
it), COUNT (no body), STATS (a pickled dict, once a second: what /metrics reports of its
sessions). Every frame from a session process carries how many of its sessions are in a data
phase (server/context.py, ``in_data``): the owner's journal waits for those records as it
waits for its own sessions' (``gather``), and a COUNT frame says when the last has arrived.
From the owner: OK, FULL (the disk is full: 452), FAILED (any other failure of the append:
451; its number is the request's, its body says whether the journal is poisoned), DRAIN
(stop: the number says whether at once), RELOAD (SIGHUP reached the owner).

**Failures.** A session process that dies leaves nothing half-done in the owner: an append it
asked for completes (its client, whose connection died, sends again: at least once, as a crash
between the fsync and the 250 always was). An owner that dies (end of file on the
socketpair) fails every append in hand with ``HandoffLost``, a JournalError: the session
answers 451 and the session process exits, since nothing can be accepted without the
journal. The owner never trusts a frame: a head that does not decode is refused (FAILED)
and logged, and a malformed frame ends that link.
"""

from __future__ import annotations

import collections
import logging
import math
import pickle
import struct
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from atmosrelay.queue.events import EventFeed
from atmosrelay.queue.records import Accepted, decode_accepted, encode_accepted
from atmosrelay.server.context import SessionContext
from atmosrelay.stream_io import StreamIO
from journal import JournalError, JournalFatalError, JournalFullError

log = logging.getLogger("atmosrelay.smtp")

# from a session process: body length, kind, number, sessions in a data phase
UP: Final = struct.Struct("<IBII")
# from the owner: body length, kind, number
DOWN: Final = struct.Struct("<IBI")

ACCEPT: Final = 1
COUNT: Final = 2
STATS: Final = 3

OK: Final = 1
FULL: Final = 2
FAILED: Final = 3
DRAIN: Final = 4
RELOAD: Final = 5

READ_SIZE: Final = 256 * 1024
MAX_BODY: Final = 1 << 31  # a length past this is a broken link, not a record


class HandoffLost(JournalError):
    """The owner went away: the append's outcome is unknown to this process."""


class Outbox:
    """Frames to write, written together: every frame queued while the last write was
    under way goes in the next one (one system call, however many sessions answered)."""

    def __init__(self, io: StreamIO) -> None:
        self.io = io
        self._parts: list[bytes] = []
        self._ready = trio.Event()
        self._finishing = False
        self._finished = trio.Event()

    def put(self, *parts: bytes) -> None:
        self._parts.extend(parts)
        self._ready.set()

    async def run(self) -> None:
        while not (self._finishing and not self._parts):
            await self._ready.wait()
            self._ready = trio.Event()
            data, self._parts = b"".join(self._parts), []
            try:
                await self.io.write(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break  # the other end is gone: its reader says so
        self._finished.set()

    async def finish(self) -> None:
        """Return once every frame queued so far is written (``run`` then ends)."""
        self._finishing = True
        self._ready.set()
        await self._finished.wait()


class Frames:
    """Whole frames from a stream: (kind, number, extra, body); ``extra`` is the data-phase
    count of a frame from a session process, 0 from the owner."""

    def __init__(self, io: StreamIO, header: struct.Struct) -> None:
        self.io = io
        self.header = header
        self._buffer = bytearray()
        self._ready: list[tuple[int, int, int, bytes]] = []

    async def batch(self) -> list[tuple[int, int, int, bytes]]:
        """Every whole frame that has arrived (at least one); [] once the other end has
        closed. Raises ValueError for a frame no peer of ours would send."""
        header, size = self.header, self.header.size
        while not self._ready:
            data = await self.io.read(READ_SIZE)
            if not data:
                if self._buffer:
                    raise ValueError("the link closed inside a frame")
                return []
            buffer = self._buffer
            buffer += data
            start = 0
            while len(buffer) - start >= size:
                fields = header.unpack_from(buffer, start)
                length = fields[0]
                if length > MAX_BODY:
                    raise ValueError("a frame longer than any record")
                end = start + size + length
                if end > len(buffer):
                    break
                extra = fields[3] if len(fields) > 3 else 0
                self._ready.append((fields[1], fields[2], extra, bytes(buffer[start + size : end])))
                start = end
            del buffer[:start]
        ready, self._ready = self._ready, []
        return ready


# -- the session process's side ---------------------------------------------------------


class RemoteJournal:
    """What a session process's context asks of "the journal" (server/context.py): whether
    it is poisoned (as the owner last said), and ``gathered`` (tell the owner that no record
    of this process is on its way)."""

    def __init__(self, link: RemoteQueue) -> None:
        self._link = link
        self.gather: Callable[[], float] | None = None  # the owner's writer waits, not ours
        self.poisoned = False

    def gathered(self) -> None:
        self._link.send_count()


class RemoteQueue:
    """The queue as a session process sees it: ``accept`` hands the record to the owner and
    returns once it is durable there, having called ``then`` the moment the owner said so
    (as ``QueueStore.accept``). Raises JournalFullError, JournalFatalError (the owner's
    journal is poisoned), JournalError (any other failure there) or HandoffLost."""

    def __init__(self, io: StreamIO, in_data: Callable[[], int] = lambda: 0) -> None:
        self.io = io
        self.out = Outbox(io)
        self.events = EventFeed()  # nothing is published here: the owner's queue has them
        self.journal = RemoteJournal(self)
        self.in_data = in_data
        self._waiting: dict[int, tuple[trio.Event, Callable[[], None] | None, list[int]]] = {}
        self._next = 0
        self.lost = False
        self.on_drain: Callable[[bool], None] = lambda now: None
        self.on_reload: Callable[[], None] = lambda: None

    async def accept(
        self, record: Accepted, message: bytes, then: Callable[[], None] | None = None
    ) -> None:
        if self.lost:
            raise HandoffLost("the journal's owner is gone")
        payload = encode_accepted(record, message)
        self._next = number = (self._next + 1) & 0xFFFFFFFF
        done = trio.Event()
        answer: list[int] = []
        self._waiting[number] = (done, then, answer)
        self.out.put(UP.pack(len(payload), ACCEPT, number, self.in_data()), payload)
        try:
            await done.wait()
        finally:
            self._waiting.pop(number, None)
        if not answer:
            raise HandoffLost("the journal's owner is gone")
        kind = answer[0]
        if kind == FULL:
            raise JournalFullError("the journal's disk is full")
        if kind == FAILED:
            if self.journal.poisoned:
                raise JournalFatalError("the journal is poisoned")
            raise JournalError("the owner could not append the record")

    def send_count(self) -> None:
        if not self.lost:
            self.out.put(UP.pack(0, COUNT, 0, self.in_data()))

    def send_stats(self, stats: dict[str, Any]) -> None:
        if not self.lost:
            body = pickle.dumps(stats, protocol=pickle.HIGHEST_PROTOCOL)
            self.out.put(UP.pack(len(body), STATS, 0, self.in_data()), body)

    async def run(self) -> None:
        """Read the owner's answers until it closes; then every append in hand fails."""
        frames = Frames(self.io, DOWN)
        try:
            while batch := await frames.batch():
                for kind, number, _, body in batch:
                    self._answered(kind, number, body)
        except (trio.BrokenResourceError, ValueError) as exc:
            log.error("session process: the link to the journal's owner broke (%s)", exc)
        finally:
            self.lost = True
            for done, _, _ in list(self._waiting.values()):
                done.set()  # no answer: HandoffLost

    def _answered(self, kind: int, number: int, body: bytes) -> None:
        if kind == DRAIN:
            self.on_drain(bool(number))
            return
        if kind == RELOAD:
            self.on_reload()
            return
        waiting = self._waiting.pop(number, None)
        if waiting is None:
            return  # its session left (cancelled); the record is durable all the same
        done, then, answer = waiting
        answer.append(kind)
        if kind == FAILED and body == b"poisoned":
            self.journal.poisoned = True
        if kind == OK and then is not None:
            then()  # the 250, from here: as the owner's journal callback would
        done.set()


# -- the owner's side --------------------------------------------------------------------


@attrs.define(eq=False)
class _Link:
    """What the owner knows of one session process."""

    out: Outbox
    # up to when it has flushed its policy counts (its reports; from the link's start until
    # the first): the owner marks the journal counted up to the earliest of them
    # (submission/counting.py, ``counted_until``)
    counted: float
    in_data: int = 0  # its sessions in a data phase, as its last frame said
    sessions: int = 0  # its sessions open, at its last report
    final: bool = False  # its last report came after its last flush
    # what it handed over since its last report (accepted at, queue id): had it died before
    # its last flush, it had counted those in memory only
    pending: collections.deque[tuple[float, str]] = attrs.field(factory=collections.deque)


class Handoff:
    """The owner's end of every session process's link: appends what they hand over and
    answers. Their sessions in a data phase count in the owner's ``ctx.in_data``, so its
    journal waits for their records as for its own sessions' (server/context.py)."""

    def __init__(self, queue: Any, ctx: SessionContext) -> None:
        self.queue = queue  # the QueueStore (typed loosely: session processes import this)
        self.ctx = ctx
        self.links: dict[int, _Link] = {}
        # the owner counts what a process that died before its last flush had not flushed
        self.on_lost: Callable[[list[str], float], None] = lambda ids, since: None

    def counted_until(self) -> float:
        return min((link.counted for link in self.links.values()), default=math.inf)

    def _count(self, link: _Link, n: int) -> None:
        ctx = self.ctx
        delta = n - link.in_data
        if not delta:
            return
        link.in_data = n
        ctx.in_data += delta
        if ctx.in_data == 0 and delta < 0:
            ctx.queue.journal.gathered()  # nothing more on its way: write what waits

    def _sessions(self) -> None:
        self.ctx.sessions_elsewhere = sum(link.sessions for link in self.links.values())

    def send_all(self, kind: int, number: int = 0) -> None:
        for link in self.links.values():
            link.out.put(DOWN.pack(0, kind, number))

    async def serve(self, index: int, io: StreamIO) -> None:
        """Serve one session process until it closes its end (or the link breaks, or it
        sends what no session process would); then close ours."""
        link = self.links[index] = _Link(Outbox(io), counted=time.time())
        frames = Frames(io, UP)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.out.run)
                try:
                    while batch := await frames.batch():
                        for kind, number, in_data, body in batch:
                            if kind == ACCEPT:
                                nursery.start_soon(self._append, link, number, body)
                            elif kind == STATS:
                                self._stats(index, link, body)
                            self._count(link, in_data)
                except ValueError as exc:
                    log.error("session process %d sent a malformed frame (%s)", index, exc)
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()  # its outbox; appends in hand are shielded
        finally:
            del self.links[index]
            self._sessions()
            if not link.final:  # it flushed on its way out, unless it died first
                lost = [qid for at, qid in link.pending if at > link.counted]
                if lost:
                    self.on_lost(lost, link.counted)
            self._count(link, 0)
            with trio.CancelScope(shield=True):
                await io.aclose()

    def _stats(self, index: int, link: _Link, body: bytes) -> None:
        try:
            stats = pickle.loads(body)
            refused = dict(stats["refused"])
            tls = int(stats["tls_failures"])
            seconds = [float(s) for s in stats["data_reply"]]
            sessions = int(stats["sessions"])
            counted = float(stats["counted"])
        except Exception:  # a bad frame is logged, never raised into the loop
            log.error("session process %d sent unreadable statistics", index)
            return
        link.sessions = sessions
        self._sessions()
        link.counted = max(link.counted, counted)
        while link.pending and link.pending[0][0] <= counted:
            link.pending.popleft()  # in the store: its flush had it
        link.final = bool(stats.get("final"))
        ctx = self.ctx
        ctx.pipeline.refused.update(refused)
        ctx.tls_failures += tls
        for s in seconds:
            ctx.on_data_reply(s)

    async def _append(self, link: _Link, number: int, payload: bytes) -> None:
        out = link.out
        try:
            record, offset = decode_accepted(payload)
        except ValueError as exc:  # RecordError among them
            log.error("session process handed over a record that does not decode: %s", exc)
            out.put(DOWN.pack(0, FAILED, number))
            return

        def durable() -> None:
            self.ctx.pipeline.accepted["smtp"] += 1
            out.put(DOWN.pack(0, OK, number))
            link.pending.append((record.accepted_at, record.id))

        with trio.CancelScope(shield=True):  # appended is appended: finish and answer
            try:
                await self.queue.accept_payload(record, payload, offset, durable)
            except JournalFullError:
                out.put(DOWN.pack(0, FULL, number))
            except JournalError as exc:
                poisoned = b"poisoned" if self.queue.journal.poisoned else b""
                log.error("journal: %s appending a handed-over record", type(exc).__name__)
                out.put(DOWN.pack(len(poisoned), FAILED, number), poisoned)
            except Exception:
                log.exception("queue: adding a handed-over record failed")
                out.put(DOWN.pack(0, FAILED, number))
