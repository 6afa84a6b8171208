"""The queue's trio facade: append records durably through the journal's group commit.

``QueueStore.accept()`` returns only after the fsync that covers the record: the caller may
then answer 250. It never holds message bodies; the state keeps positions.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Final

import attrs
import trio

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
    RecipientState,
    RecordType,
    encode_accepted,
    encode_deleted,
    encode_delivery,
)
from atmosrelay.queue.state import QueueState, fold
from journal import Compaction, Journal, Position

# Compact when at least this share of the records in sealed segments is dead: copying the
# live rest forward then costs less than the disk it frees.
DEAD_SHARE: Final = 0.5


@attrs.define
class QueueStore:
    journal: Journal
    state: QueueState = attrs.field(factory=QueueState)
    on_accept: Callable[[], None] | None = None  # the dispatcher's notify, when delivering
    events: EventFeed = attrs.field(factory=EventFeed)  # queue/events.py

    @classmethod
    async def recover(cls, journal: Journal) -> QueueStore:
        """Fold every record of the journal (in a worker thread: it reads the disk).

        The cyclic garbage collector is paused while the fold allocates (a deep queue is
        millions of small objects, none of them garbage: each collection would scan them
        all again, a third of the fold's time at 100,000 messages), and what survives is
        then frozen out of later collections."""
        gc.disable()
        try:
            state = await trio.to_thread.run_sync(lambda: fold(journal.records()))
        finally:
            gc.enable()
        gc.freeze()
        return cls(journal, state)

    async def accept(self, record: Accepted, message: bytes) -> Position:
        """Append and fsync the ACCEPTED record, then add it to the state. Raises the
        journal's errors (JournalFullError, JournalFatalError, ...) unchanged."""
        payload = encode_accepted(record, message)
        position = await self.journal.append(RecordType.ACCEPTED, payload)
        self.state.add_accepted(record, position, len(payload) - len(message))
        self.events.publish(MessageAccepted(record))
        if self.on_accept is not None:
            self.on_accept()
        return position

    async def record(self, delivery: Delivery) -> None:
        """Append and fsync one attempt's outcomes, then apply them."""
        position = await self.journal.append(RecordType.DELIVERY, encode_delivery(delivery))
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

    async def delete(self, queue_id: str, reason: str, now: float) -> None:
        """Remove a message, with a record saying who and why (raises KeyError if unknown)."""
        if queue_id not in self.state.messages:
            raise KeyError(queue_id)
        payload = encode_deleted(queue_id, now, reason)
        position = await self.journal.append(RecordType.DELETED, payload)
        self.state.add_deleted(queue_id, position)
        self.events.publish(MessageDeleted(queue_id, reason, now))

    def compaction_due(self) -> bool:
        """Whether enough of the sealed segments is dead to be worth a compaction."""
        active = self.journal.active_segment
        dead = sum(p.segment < active for p in self.state.graveyard)
        live = 0
        for m in self.state.messages.values():  # one pass, no set built
            sealed = sum(p.segment < active for p in m.positions)
            if m.dead:
                dead += sealed
            else:
                live += sealed
        return dead > 0 and dead >= DEAD_SHARE * (dead + live)

    async def compact(self) -> Compaction:
        """Drop the records of finished and deleted messages from the sealed segments."""
        dead = self.state.dead_positions()
        result = await self.journal.compact(dead)
        removed = {p for p in dead if p.segment in result.removed_segments}
        self.state.compacted(removed, result.relocated)
        return result
