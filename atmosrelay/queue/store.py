"""The queue's trio facade: append records durably through the journal's group commit.

``QueueStore.accept()`` returns only after the fsync that covers the record, and its ``then``
runs only after it: the caller may answer 250 from either. It never holds message bodies;
the state keeps positions.
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial
from typing import Final

import attrs
import msgspec
import trio

from atmosrelay.collector import give_back
from atmosrelay.queue import checkpoint as checkpoints
from atmosrelay.queue import window as windows
from atmosrelay.queue.events import (
    AttemptOutcome,
    Bounced,
    Delivered,
    EventFeed,
    MessageAccepted,
    MessageDeleted,
)
from atmosrelay.queue.records import (
    TERMINAL,
    Accepted,
    Delivery,
    Inbound,
    RecipientState,
    RecordType,
    encode_accepted,
    encode_deleted,
    encode_delivery,
    encode_inbound,
    encode_inbound_done,
)
from atmosrelay.queue.state import PendingInbound, QueuedMessage, QueueState, dsn_report, fold
from journal import FS, Compaction, Journal, Position, Record

# Compact when at least this share of the records in sealed segments is dead: copying the
# live rest forward then costs less than the disk it frees.
DEAD_SHARE: Final = 0.5


@attrs.define
class QueueStore:
    journal: Journal
    state: QueueState = attrs.field(factory=QueueState)
    on_accept: Callable[[], None] | None = None  # the dispatcher's notify, when delivering
    events: EventFeed = attrs.field(factory=EventFeed)  # queue/events.py
    on_inbound: Callable[[str], None] | None = None  # the inbound processor's notify
    recovered: str = ""  # how ``recover`` got the state, when it was not the plain fold
    # the queue checkpoint's chunks a staged ``recover`` left for ``load_rest``
    unloaded: list[msgspec.Raw] = attrs.field(factory=list)
    # the whole fold a staged ``recover`` after kill -9 left for ``load_rest`` (queue/window.py)
    rest: Callable[[], tuple[QueueState, str]] | None = None
    checkpoint: tuple[FS, str] | None = None  # where ``recover`` read it
    restored: int = 0  # the messages the start found in the journal (``recover``, ``load_rest``)

    @classmethod
    async def recover(
        cls,
        journal: Journal,
        progress: Callable[[Iterator[Record]], Iterable[Record]] = iter,
        checkpoint: tuple[FS, str] | None = None,
        *,
        staged: bool = False,
        window: int = windows.WINDOW,
        early: int = windows.EARLY,
    ) -> QueueStore:
        """Fold every record of the journal (in a worker thread: it reads the disk), each
        passing through ``progress`` (the serve command's bar on a terminal); or, given a
        ``checkpoint`` file (queue/checkpoint.py) that still matches the journal, read it
        and fold only the records written since. ``recovered`` then says which it was.

        The cyclic garbage collector is paused while the fold allocates (a deep queue is
        millions of small objects, none of them garbage: each collection would scan them
        all again, a third of the fold's time at 100,000 messages), and what survives is
        then frozen out of later collections.

        ``staged``: the start may hold only the messages delivery can begin with, and
        ``load_rest`` then adds the others: after a clean stop, the checkpoint's first part
        (queue/checkpoint.py); otherwise (no checkpoint, or records since: ``kill -9``) up
        to ``early`` never-tried messages among the journal's newest ``window`` records
        (queue/window.py). The collector stays paused until ``load_rest`` has run."""
        gc.disable()
        unloaded: list[msgspec.Raw] = []
        rest: Callable[[], tuple[QueueState, str]] | None = None
        how = ""
        try:
            start = None
            if staged and checkpoint is not None:
                fs, path = checkpoint
                start, how, unloaded = await trio.to_thread.run_sync(
                    lambda: checkpoints.recover(fs, path, journal, progress, staged=True)
                )
            if start is None and staged:
                start, last = await trio.to_thread.run_sync(windows.newest, journal, window, early)
                if last is not None:
                    rest = partial(_whole, journal, progress, checkpoint, last)
            if start is not None:
                state = start
            else:
                state, how = await trio.to_thread.run_sync(
                    _whole, journal, progress, checkpoint, None
                )
        finally:
            if not unloaded and rest is None:
                _recovered()
        return cls(
            journal,
            state,
            recovered=how,
            unloaded=unloaded,
            rest=rest,
            checkpoint=checkpoint,
            restored=len(state.messages),
        )

    async def load_rest(
        self, loaded: Callable[[list[QueuedMessage]], Awaitable[None]] | None = None
    ) -> int:
        """Add what a staged ``recover`` left, a chunk at a time on the event loop (30-40
        ms each, so delivery goes on between them), each chunk's messages added to the state
        and then given to ``loaded`` (the dispatcher schedules them); how many. Nothing when
        nothing was left. What was left is the checkpoint's chunks, decoded here; or the
        whole fold, run in a worker thread first while delivery goes on (queue/window.py).

        A chunk that does not decode (the file's CRC and layout matched: a fault of this
        program's) raises ``CheckpointUnusable`` with the file removed, so the next start
        folds the whole journal instead of meeting it again."""
        if not self.unloaded and self.rest is None:
            return 0
        before = self.restored
        try:
            if self.rest is not None:
                await self._merge_whole(self.rest, loaded)
            while self.unloaded:
                try:
                    messages = checkpoints.load_chunk(self.state, self.unloaded.pop(0))
                except checkpoints.CheckpointUnusable:
                    if self.checkpoint is not None:
                        fs, path = self.checkpoint
                        fs.remove(path)
                    raise
                self.restored += len(messages)
                if loaded is not None:
                    await loaded(messages)
                await trio.lowlevel.checkpoint()
        finally:
            self.unloaded.clear()
            self.rest = None
            _recovered()  # the collector, paused since ``recover``
        return self.restored - before

    async def _merge_whole(
        self,
        rest: Callable[[], tuple[QueueState, str]],
        loaded: Callable[[list[QueuedMessage]], Awaitable[None]] | None,
    ) -> None:
        early = len(self.state.messages)
        whole, how = await trio.to_thread.run_sync(rest)
        others = windows.merge(self.state, whole)
        del whole
        self.recovered = (
            f"{how} (delivery began on {early} message(s) of the journal's newest records "
            "before the rest was read)"
        )
        into = self.state.messages
        for i in range(0, len(others), checkpoints.CHUNK):
            part = others[i : i + checkpoints.CHUNK]
            for m in part:
                into[m.id] = m
            self.restored += len(part)
            if loaded is not None:
                await loaded(part)
            await trio.lowlevel.checkpoint()

    async def accept(
        self, record: Accepted, message: bytes, then: Callable[[], None] | None = None
    ) -> Position:
        """Append and fsync the ACCEPTED record. The moment it is durable, on the event loop
        before this task resumes (even if it was cancelled meanwhile: journal/_journal.py),
        the state gets the message, its event is published, and ``then`` is called: a
        session's 250 goes out there, so whatever the 250 prompts finds the message queued.
        Raises the journal's errors (JournalFullError, JournalFatalError, ...) unchanged,
        and whatever adding the message to the state raised (``then`` is not called then)."""
        payload = encode_accepted(record, message)
        return await self.accept_payload(record, payload, len(payload) - len(message), then)

    async def accept_payload(
        self,
        record: Accepted,
        payload: bytes,
        body_offset: int,
        then: Callable[[], None] | None = None,
    ) -> Position:
        """``accept`` of a payload already encoded (``encode_accepted``; ``record`` is its
        head and ``body_offset`` where its message starts): a session process's hand-off
        (server/handoff.py), which the owner appends as it came."""
        failed: list[Exception] = []

        def durable(position: Position) -> None:
            try:
                self.state.add_accepted(record, position, body_offset)
                self.events.publish(MessageAccepted(record))
                if self.on_accept is not None:
                    self.on_accept()
            except Exception as exc:  # raised in the appender, below
                failed.append(exc)
                return
            if then is not None:
                then()

        position = await self.journal.append(RecordType.ACCEPTED, payload, durable)
        if failed:
            raise failed[0]
        return position

    async def record(self, delivery: Delivery, *, patient: bool = False) -> None:
        """Append and fsync one attempt's outcomes, then apply them. ``patient``: the
        journal may hold the record a few milliseconds for others to share its fsync
        (nothing waits on it but this call: journal/_journal.py)."""
        payload = encode_delivery(delivery)
        position = await self.journal.append(RecordType.DELIVERY, payload, patient=patient)
        msg = self.state.messages.get(delivery.id)
        states = msg.recipient_states if msg is not None else {}
        before = {o.recipient: states.get(o.recipient) for o in delivery.outcomes}
        self.state.add_delivery(delivery, position)
        if msg is None:
            return
        record, publish = msg.record, self.events.publish
        for o in delivery.outcomes:
            if before[o.recipient] in TERMINAL:
                continue  # the fold ignored it
            publish(
                AttemptOutcome(delivery.id, record.did, record.sender, o, delivery.mta, delivery.at)
            )
            if o.outcome == RecipientState.SENT:
                publish(Delivered(delivery.id, record.did, record.sender, o.recipient, delivery.at))
            elif o.outcome == RecipientState.BOUNCED:
                publish(
                    Bounced(
                        delivery.id,
                        record.did,
                        record.sender,
                        o.recipient,
                        o.status,
                        o.reply,
                        delivery.at,
                    )
                )

    async def receive(self, record: Inbound, message: bytes) -> Position:
        """Append and fsync an INBOUND record (the inbound listener's 250 waits for it)."""
        payload = encode_inbound(record, message)
        position = await self.journal.append(RecordType.INBOUND, payload)
        self.state.add_inbound(record, position, len(payload) - len(message))
        if self.on_inbound is not None:
            self.on_inbound(record.id)
        return position

    def pending_inbound(self) -> list[str]:
        """Inbound ids accepted and not yet processed (after a restart: those to redo)."""
        return list(self.state.inbound)

    def inbound_pending(self, inbound_id: str) -> PendingInbound | None:
        return self.state.inbound.get(inbound_id)

    async def inbound_done(self, inbound_id: str, kind: str, now: float) -> None:
        """Its effects are applied: an INBOUND_DONE record, and both are dead."""
        payload = encode_inbound_done(inbound_id, now, kind)
        position = await self.journal.append(RecordType.INBOUND_DONE, payload)
        self.state.add_inbound_done(inbound_id, position)

    async def delete(self, queue_id: str, reason: str, now: float) -> None:
        """Remove a message, with a record saying who and why (raises KeyError if unknown)."""
        msg = self.state.messages.get(queue_id)
        if msg is None:
            raise KeyError(queue_id)
        report = dsn_report(msg.record)  # a DSN: what it reported stays reported
        payload = encode_deleted(queue_id, now, reason, report)
        position = await self.journal.append(RecordType.DELETED, payload)
        self.state.add_deleted(queue_id, position, report)
        self.events.publish(MessageDeleted(queue_id, reason, now))

    def compaction_due(self) -> bool:
        """Whether enough of the sealed segments is dead to be worth a compaction: the
        records ``dead_positions`` would name, counted in one pass, no set built."""
        active = self.journal.active_segment
        state = self.state
        dead = sum(p.segment < active for p in state.graveyard)
        live = 0
        for m in state.messages.values():
            sealed = sum(p.segment < active for p in m.positions)
            if state.droppable(m, active):
                dead += sealed
            else:
                live += sealed
        live += sum(p.segment < active for kept in state.kept.values() for p in kept)
        live += sum(p.position.segment < active for p in state.inbound.values())
        return dead > 0 and dead >= DEAD_SHARE * (dead + live)

    async def compact(self) -> Compaction:
        """Drop the records of finished and deleted messages from the sealed segments."""
        dead = self.state.dead_positions(self.journal.active_segment)
        result = await self.journal.compact(dead)
        del dead  # freed before the state lets go of what the compaction removed
        self.state.compacted(result.removed_segments, result.relocated)
        give_back()  # the copied records and the positions they replace
        return result


def _whole(
    journal: Journal,
    progress: Callable[[Iterator[Record]], Iterable[Record]],
    checkpoint: tuple[FS, str] | None,
    last: int | None,
) -> tuple[QueueState, str]:
    """The queue as a start that is not staged reads it (up to seq ``last``, if given), and
    the words for how. Blocking."""
    if checkpoint is None:
        return fold(progress(journal.records(0, last))), ""
    fs, path = checkpoint
    state, how, _ = checkpoints.recover(fs, path, journal, progress, last=last)
    assert state is not None  # not staged: always a state
    return state, how


def _recovered() -> None:
    gc.enable()
    gc.freeze()
    give_back()  # the records it read were freed: their pages go back (collector.py)
