"""The queue state: a pure fold of journal records.

``QueueState.apply(record)`` is the only way state changes, so replaying the journal after a
restart rebuilds exactly the state the relay had. No I/O here: the caller reads records and
hands them over (the relay in a worker thread at startup, the CLI offline).

Besides the per-recipient states the fold keeps what delivery and compaction need (when to
try each recipient is delivery's own schedule, queue/schedule.py, built from this state and
kept current by the queue's events; nothing but a record changes the state):

* each deferred recipient's next time, as its last outcome gave it;
* every record's position per message, so compaction can name what is dead: the records of
  a message that is terminal and owes no DSN, and of a deleted one;
* which bounced recipients a DSN already covers (a DSN's own ACCEPTED record names them),
  so a DSN owed when the relay stopped is sent after the restart, and only once.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs

from atmosrelay.message.dsn import wants_dsn
from atmosrelay.queue.records import (
    TERMINAL,
    Accepted,
    Delivery,
    Inbound,
    RecipientState,
    RecordError,
    RecordType,
    decode_accepted,
    decode_deleted,
    decode_delivery,
    decode_inbound,
    decode_inbound_done,
)
from journal import Position, Record

NOTHING_YET: Final[Mapping[str, Any]] = MappingProxyType({})


@attrs.define
class QueuedMessage:
    record: Accepted
    # where its records stand in the journal: the ACCEPTED one (with the body) first, then
    # its DELIVERY records (a tuple: a list of two held 64 bytes more, for every message)
    positions: tuple[Position, ...]
    body_offset: int  # where the message bytes start in the ACCEPTED record's payload
    recipient_states: dict[str, RecipientState]
    # Until a recipient is deferred, one shared empty map (read-only: ``add_delivery``, the
    # only writer, makes a message its own when it needs one); the history starts empty.
    # A restart holds every queued message, and every delivered one until compaction.
    next_at: Mapping[str, float] = NOTHING_YET  # deferred recipients: when to retry
    history: tuple[Delivery, ...] = ()
    # bounced recipients a DSN reported, deferred ones a delay DSN reported: nearly always
    # none, so one shared empty frozenset until then (two empty sets were 432 of the
    # 1,900 bytes a queued message held; a restart holds every message)
    dsn_covered: frozenset[str] = frozenset()
    delay_covered: frozenset[str] = frozenset()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def attempts(self) -> dict[str, int]:
        """How many attempts each recipient has had: the highest attempt number its
        outcomes carry (derived from the history rather than kept beside it: a dict of its
        own was 184 bytes a delivered message)."""
        counts: dict[str, int] = {}
        for delivery in self.history:
            for o in delivery.outcomes:
                counts[o.recipient] = max(counts.get(o.recipient, 0), o.attempt)
        return counts

    @property
    def position(self) -> Position:
        """Where the ACCEPTED record (and the body) stands."""
        return self.positions[0]

    @property
    def terminal(self) -> bool:
        return all(s in TERMINAL for s in self.recipient_states.values())

    def dsn_owed(self) -> list[str]:
        """Bounced recipients whose sender wants a DSN that is not queued yet."""
        return self._owed(RecipientState.BOUNCED, self.dsn_covered, "failed")

    def delay_owed(self) -> list[str]:
        """Deferred recipients whose sender wants a delay DSN (RFC 3464 ``Action: delayed``)
        and has not had one; whether one is due yet is the retry policy's call."""
        return self._owed(RecipientState.DEFERRED, self.delay_covered, "delayed")

    def _owed(self, state: RecipientState, covered: frozenset[str], action: str) -> list[str]:
        if state not in self.recipient_states.values():  # the common case: nothing owed
            return []
        notify = {r.addr: r.notify for r in self.record.recipients}
        return [
            r
            for r, s in self.recipient_states.items()
            if s == state
            and r not in covered
            and wants_dsn(self.record.sender, notify.get(r), action)
        ]

    @property
    def dead(self) -> bool:
        """Nothing left to do for it: its records may be compacted away."""
        return self.terminal and not self.dsn_owed()


@attrs.frozen
class PendingInbound:
    """A message the inbound listener accepted whose effects are not applied yet."""

    record: Inbound
    position: Position
    body_offset: int


DSN_FOR = "atmos-dsn-for"  # metadata of a DSN's ACCEPTED record: the queue id it reports on
DSN_RECIPIENTS = "atmos-dsn-rcpts"  # ... and the recipients, one per line
DSN_ACTION = "atmos-dsn-action"  # ... and "delayed" for a delay DSN (absent: "failed")
DSN_METADATA = frozenset({DSN_FOR, DSN_RECIPIENTS, DSN_ACTION})


def dsn_report(record: Accepted) -> dict[str, str] | None:
    """What a DSN's record says it reports (its ``atmos-dsn-*`` metadata); None for any
    other message."""
    if record.sender or DSN_FOR not in record.metadata:
        return None
    return {k: v for k, v in record.metadata.items() if k in DSN_METADATA}


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@attrs.define
class QueueState:
    messages: dict[str, QueuedMessage] = attrs.field(factory=dict)
    unknown_records: int = 0  # types from a newer build, kept in the journal, not understood
    # outcomes this process's fold met whose message was gone (deleted or compacted away): a
    # diagnostic of what was replayed, so a start from the checkpoint counts other ones
    orphan_outcomes: int = 0
    graveyard: set[Position] = attrs.field(factory=set)  # records of deleted messages
    inbound: dict[str, PendingInbound] = attrs.field(factory=dict)  # not processed yet
    # the DELETED records of DSNs, by the queue id they report on: they still say its
    # recipients were reported, so they live as long as that message does (as a DSN's own
    # records do), and join the graveyard when it goes
    kept: dict[str, tuple[Position, ...]] = attrs.field(factory=dict)

    # -- compaction -------------------------------------------------------------------
    def dead_positions(self, active: int | None = None) -> set[Position]:
        """What a compaction may drop. Given the ``active`` segment (which a compaction
        keeps), a finished message is named only once its ACCEPTED record is in a sealed
        segment: an ACCEPTED record copied forward into a segment after its outcomes must
        never outlive them, or a restart would find the message undelivered again."""
        dead = set(self.graveyard)
        for msg in self.messages.values():
            if self.droppable(msg, active):
                dead.update(msg.positions)
        return dead

    def droppable(self, msg: QueuedMessage, active: int | None = None) -> bool:
        """Whether a compaction may drop ``msg``'s records (``dead_positions``)."""
        return (
            msg.dead
            # a DSN's record is what says its message's recipients were reported: it lives
            # as long as that message does, or a restart would report them again
            and msg.record.metadata.get(DSN_FOR) not in self.messages
            and (active is None or msg.position.segment < active)
        )

    def compacted(
        self, removed_segments: Collection[int], relocated: dict[Position, Position]
    ) -> None:
        """After a compaction that deleted ``removed_segments``, having first copied forward
        (``relocated``) every record of theirs it was not told was dead: a position there
        that did not move is gone. (No set of the removed positions is built: with a deep
        queue it was megabytes, at the moment memory peaks.)"""

        def gone(p: Position) -> bool:
            return p.segment in removed_segments and p not in relocated

        # a record deleted while the compaction ran was copied: its copy is as dead
        self.graveyard = {relocated.get(p, p) for p in self.graveyard if not gone(p)}
        for queue_id in [q for q, m in self.messages.items() if gone(m.position)]:
            # its outcomes written after the sealed segments are orphans now, as a fold of
            # what is left would find them (and so are the deleted DSNs kept for it): dead,
            # so the next compaction frees them too
            left = (*self.messages.pop(queue_id).positions[1:], *self.kept.pop(queue_id, ()))
            self.graveyard.update(relocated.get(p, p) for p in left if not gone(p))
        for msg in self.messages.values():
            if any(p in relocated for p in msg.positions):
                msg.positions = tuple(relocated.get(p, p) for p in msg.positions)
        for reported, positions in list(self.kept.items()):
            left = tuple(relocated.get(p, p) for p in positions if not gone(p))
            if left and reported in self.messages:
                self.kept[reported] = left
            else:  # what is left of a deleted DSN is a fold's graveyard
                del self.kept[reported]
                self.graveyard.update(left)
        for key, pending in list(self.inbound.items()):
            if pending.position in relocated:
                self.inbound[key] = attrs.evolve(pending, position=relocated[pending.position])

    # -- the fold ---------------------------------------------------------------------
    def apply(self, record: Record) -> None:
        if record.type == RecordType.ACCEPTED:
            try:
                accepted, offset = decode_accepted(record.payload)
            except (RecordError, KeyError, TypeError) as exc:
                raise RecordError(
                    f"journal record seq {record.seq} at {record.position} is not a valid "
                    f"ACCEPTED record ({exc}); nothing was modified"
                ) from None
            self.add_accepted(accepted, record.position, offset)
        elif record.type == RecordType.DELIVERY:
            self.add_delivery(decode_delivery(record.payload), record.position)
        elif record.type == RecordType.DELETED:
            queue_id, _, _, report = decode_deleted(record.payload)
            self.add_deleted(queue_id, record.position, report)
        elif record.type == RecordType.INBOUND:
            inbound, offset = decode_inbound(record.payload)
            self.add_inbound(inbound, record.position, offset)
        elif record.type == RecordType.INBOUND_DONE:
            self.add_inbound_done(decode_inbound_done(record.payload), record.position)
        else:
            self.unknown_records += 1

    def add_inbound(self, inbound: Inbound, position: Position, body_offset: int) -> None:
        self.inbound.setdefault(inbound.id, PendingInbound(inbound, position, body_offset))

    def add_inbound_done(self, inbound_id: str, position: Position) -> None:
        """Processed: both records are dead (the DONE alone, if it was replayed twice)."""
        pending = self.inbound.pop(inbound_id, None)
        self.graveyard.add(position)
        if pending is not None:
            self.graveyard.add(pending.position)

    def add_delivery(self, delivery: Delivery, position: Position | None = None) -> None:
        """Apply one attempt's outcomes. Idempotent: a record replayed (after a crash during
        compaction) changes nothing, and an outcome never leaves a terminal state."""
        msg = self.messages.get(delivery.id)
        if msg is None:
            self.orphan_outcomes += 1  # its message was deleted or compacted away
            if position is not None:
                self.graveyard.add(position)
            return
        if delivery in msg.history:
            return
        msg.history = (*msg.history, delivery)
        if position is not None:
            msg.positions = (*msg.positions, position)
        next_at = dict(msg.next_at)  # a few entries at most
        for o in delivery.outcomes:
            if msg.recipient_states.get(o.recipient, RecipientState.ACCEPTED) in TERMINAL:
                continue
            msg.recipient_states[o.recipient] = o.outcome
            if o.outcome == RecipientState.DEFERRED and o.next_at is not None:
                next_at[o.recipient] = o.next_at
            else:
                next_at.pop(o.recipient, None)
        msg.next_at = next_at or NOTHING_YET

    def add_accepted(self, accepted: Accepted, position: Position, body_offset: int) -> None:
        """What applying an ACCEPTED record does (for a writer that has the record decoded)."""
        if accepted.id in self.messages:
            return  # a replayed duplicate: the fold is idempotent
        self.messages[accepted.id] = QueuedMessage(
            accepted,
            (position,),
            body_offset,
            {
                r.addr: RecipientState.SUPPRESSED if r.suppressed else RecipientState.ACCEPTED
                for r in accepted.recipients
            },
        )
        report = dsn_report(accepted)
        if report is not None:
            self._cover(report)

    def _cover(self, report: Mapping[str, str]) -> QueuedMessage | None:
        """Mark the recipients a DSN's ``report`` (its metadata) names as reported in the
        message it reports on; that message, if it is still here."""
        reported = self.messages.get(report.get(DSN_FOR, ""))
        if reported is not None:
            covered = frozenset(report.get(DSN_RECIPIENTS, "").split("\n"))
            if report.get(DSN_ACTION) == "delayed":
                reported.delay_covered |= covered
            else:
                reported.dsn_covered |= covered
        return reported

    def add_deleted(
        self, queue_id: str, position: Position, report: Mapping[str, str] | None = None
    ) -> None:
        """A message deleted. A deleted DSN's record carries its ``report``: what it covered
        stays covered (no second report), even once compaction has dropped the DSN's own
        records, so the DELETED record lives as long as the message it reports on."""
        msg = self.messages.pop(queue_id, None)
        self.graveyard.update(self.kept.pop(queue_id, ()))  # DSNs deleted that reported on it
        if msg is not None:
            self.graveyard.update(msg.positions)
        reported = self._cover(report) if report else None
        if reported is None:
            self.graveyard.add(position)
        else:
            self.kept[reported.id] = (*self.kept.get(reported.id, ()), position)


def fold(records: Iterable[Record]) -> QueueState:
    state = QueueState()
    for record in records:
        state.apply(record)
    return state
