"""The queue state: a pure fold of journal records.

``QueueState.apply(record)`` is the only way state changes, so replaying the journal after a
restart rebuilds exactly the state the relay had. No I/O here: the caller reads records and
hands them over (the relay in a worker thread at startup, the CLI offline).

Besides the per-recipient states the fold keeps what delivery and compaction need:

* a schedule: a heap of (time, queue id, recipient) for every recipient still to try, with
  ``_scheduled`` as the authority (an entry whose time is no longer the recipient's is stale
  and skipped), so finding what is due costs O(log n) per recipient, not a scan of the queue;
* every record's position per message, so compaction can name what is dead: the records of
  a message that is terminal and owes no DSN, and of a deleted one;
* which bounced recipients a DSN already covers (a DSN's own ACCEPTED record names them),
  so a DSN owed when the relay stopped is sent after the restart, and only once.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable

import attrs

from atmosrelay.message.dsn import wants_dsn
from atmosrelay.queue.records import (
    PENDING,
    TERMINAL,
    Accepted,
    Delivery,
    RecordError,
    RecordType,
    decode_accepted,
    decode_deleted,
    decode_delivery,
)
from journal import Position, Record


@attrs.define
class QueuedMessage:
    record: Accepted
    # where its records stand in the journal: the ACCEPTED one (with the body) first, then
    # its DELIVERY records
    positions: list[Position]
    body_offset: int  # where the message bytes start in the ACCEPTED record's payload
    recipient_states: dict[str, str]  # address -> accepted | deferred | sent | bounced | suppressed
    attempts: dict[str, int] = attrs.field(factory=dict)
    next_at: dict[str, float] = attrs.field(factory=dict)  # deferred recipients: when to retry
    history: list[Delivery] = attrs.field(factory=list)
    dsn_covered: set[str] = attrs.field(factory=set)  # bounced recipients a DSN reported

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def position(self) -> Position:
        """Where the ACCEPTED record (and the body) stands."""
        return self.positions[0]

    @property
    def terminal(self) -> bool:
        return all(s in TERMINAL for s in self.recipient_states.values())

    def dsn_owed(self) -> list[str]:
        """Bounced recipients whose sender wants a DSN that is not queued yet."""
        if "bounced" not in self.recipient_states.values():
            return []
        notify = {r.addr: r.notify for r in self.record.recipients}
        return [
            r
            for r, state in self.recipient_states.items()
            if state == "bounced"
            and r not in self.dsn_covered
            and wants_dsn(self.record.sender, notify.get(r), "failed")
        ]

    @property
    def dead(self) -> bool:
        """Nothing left to do for it: its records may be compacted away."""
        return self.terminal and not self.dsn_owed()


DSN_FOR = "atmos-dsn-for"  # metadata of a DSN's ACCEPTED record: the queue id it reports on
DSN_RECIPIENTS = "atmos-dsn-rcpts"  # ... and the recipients, one per line


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@attrs.define
class QueueState:
    messages: dict[str, QueuedMessage] = attrs.field(factory=dict)
    unknown_records: int = 0  # types from a newer build, kept in the journal, not understood
    orphan_outcomes: int = 0
    graveyard: set[Position] = attrs.field(factory=set)  # records of deleted messages
    _schedule: list[tuple[float, str, str]] = attrs.field(factory=list)
    _scheduled: dict[tuple[str, str], float] = attrs.field(factory=dict)

    # -- the schedule ------------------------------------------------------------------
    def schedule(self, queue_id: str, recipient: str, at: float) -> None:
        """Try ``recipient`` of ``queue_id`` at ``at`` (replacing any earlier time)."""
        self._scheduled[(queue_id, recipient)] = at
        heapq.heappush(self._schedule, (at, queue_id, recipient))

    def _valid(self, entry: tuple[float, str, str]) -> bool:
        at, queue_id, recipient = entry
        return self._scheduled.get((queue_id, recipient)) == at

    def next_due(self) -> float | None:
        """When the earliest scheduled recipient is due (None: nothing scheduled)."""
        while self._schedule and not self._valid(self._schedule[0]):
            heapq.heappop(self._schedule)
        return self._schedule[0][0] if self._schedule else None

    def take_due(self, now: float, limit: int | None = None) -> list[tuple[str, str]]:
        """(queue id, recipient) of what is due by ``now`` (at most ``limit``, earliest
        first), taken off the schedule: the caller delivers them, and their outcomes
        schedule them again if need be."""
        out: list[tuple[str, str]] = []
        while self._schedule and self._schedule[0][0] <= now:
            if limit is not None and len(out) >= limit:
                break
            entry = heapq.heappop(self._schedule)
            if self._valid(entry):
                del self._scheduled[(entry[1], entry[2])]
                msg = self.messages.get(entry[1])
                if msg is not None and msg.recipient_states.get(entry[2]) in PENDING:
                    out.append((entry[1], entry[2]))
        return out

    def spread_overdue(self, now: float, window: float, rng: random.Random) -> int:
        """After a restart: deferred recipients whose time passed while the relay was down
        are spread over ``window`` seconds instead of all retrying at once (recipients never
        tried go at once). Returns how many were spread."""
        overdue = [
            key
            for key, at in self._scheduled.items()
            if at < now and self.messages[key[0]].recipient_states.get(key[1]) == "deferred"
        ]
        rng.shuffle(overdue)  # evenly spaced, in random order: a trickle, not a stampede
        step = window / max(1, len(overdue))
        for i, (queue_id, recipient) in enumerate(overdue):
            self.schedule(queue_id, recipient, now + i * step)
        return len(overdue)

    def retry_now(self, queue_id: str, now: float) -> int:
        """Every pending recipient of ``queue_id`` due at ``now``. Returns how many."""
        msg = self.messages[queue_id]
        pending = [r for r, s in msg.recipient_states.items() if s in PENDING]
        for r in pending:
            self.schedule(queue_id, r, now)
        return len(pending)

    # -- compaction -------------------------------------------------------------------
    def dead_positions(self) -> set[Position]:
        dead = set(self.graveyard)
        for msg in self.messages.values():
            if msg.dead:
                dead.update(msg.positions)
        return dead

    def compacted(self, removed: set[Position], relocated: dict[Position, Position]) -> None:
        """After a compaction that dropped ``removed`` and moved what it kept."""
        self.graveyard -= removed
        for queue_id in [q for q, m in self.messages.items() if m.position in removed]:
            del self.messages[queue_id]
        for msg in self.messages.values():
            msg.positions = [relocated.get(p, p) for p in msg.positions]

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
            queue_id, _, _ = decode_deleted(record.payload)
            self.add_deleted(queue_id, record.position)
        else:
            self.unknown_records += 1

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
        msg.history.append(delivery)
        if position is not None:
            msg.positions.append(position)
        for o in delivery.outcomes:
            if msg.recipient_states.get(o.recipient, "accepted") in TERMINAL:
                continue
            msg.recipient_states[o.recipient] = o.outcome
            msg.attempts[o.recipient] = max(msg.attempts.get(o.recipient, 0), o.attempt)
            if o.outcome == "deferred" and o.next_at is not None:
                msg.next_at[o.recipient] = o.next_at
                self.schedule(msg.id, o.recipient, o.next_at)
            else:
                msg.next_at.pop(o.recipient, None)
                self._scheduled.pop((msg.id, o.recipient), None)

    def add_accepted(self, accepted: Accepted, position: Position, body_offset: int) -> None:
        """What applying an ACCEPTED record does (for a writer that has the record decoded)."""
        if accepted.id in self.messages:
            return  # a replayed duplicate: the fold is idempotent
        self.messages[accepted.id] = QueuedMessage(
            accepted,
            [position],
            body_offset,
            {r.addr: "suppressed" if r.suppressed else "accepted" for r in accepted.recipients},
        )
        for r in accepted.recipients:
            if not r.suppressed:
                self.schedule(accepted.id, r.addr, accepted.accepted_at)
        reported = self.messages.get(accepted.metadata.get(DSN_FOR, ""))
        if not accepted.sender and reported is not None:
            reported.dsn_covered.update(accepted.metadata.get(DSN_RECIPIENTS, "").split("\n"))

    def add_deleted(self, queue_id: str, position: Position) -> None:
        msg = self.messages.pop(queue_id, None)
        self.graveyard.add(position)
        if msg is not None:
            self.graveyard.update(msg.positions)
            for r in msg.recipient_states:
                self._scheduled.pop((queue_id, r), None)


def fold(records: Iterable[Record]) -> QueueState:
    state = QueueState()
    for record in records:
        state.apply(record)
    return state
