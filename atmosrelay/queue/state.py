"""The queue state: a pure fold of journal records.

``QueueState.apply(record)`` is the only way state changes, so replaying the journal after a
restart rebuilds exactly the state the relay had. No I/O here: the caller reads records and
hands them over (the relay in a worker thread at startup, the CLI offline).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from atmosrelay.queue.records import (
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
    position: Position  # where the ACCEPTED record (and the body) stands in the journal
    body_offset: int  # where the message bytes start in the record's payload
    recipient_states: dict[str, str]  # address -> accepted | deferred | sent | bounced | suppressed
    attempts: dict[str, int] = attrs.field(factory=dict)
    next_at: dict[str, float] = attrs.field(factory=dict)  # deferred recipients: when to retry
    history: list[Delivery] = attrs.field(factory=list)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def terminal(self) -> bool:
        return all(s in TERMINAL for s in self.recipient_states.values())


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@attrs.define
class QueueState:
    messages: dict[str, QueuedMessage] = attrs.field(factory=dict)
    unknown_records: int = 0  # types from a newer build, kept in the journal, not understood
    orphan_outcomes: int = 0

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
            self.add_delivery(decode_delivery(record.payload))
        elif record.type == RecordType.DELETED:
            queue_id, _, _ = decode_deleted(record.payload)
            self.messages.pop(queue_id, None)
        else:
            self.unknown_records += 1

    def add_delivery(self, delivery: Delivery) -> None:
        """Apply one attempt's outcomes. Idempotent: a record replayed (after a crash during
        compaction) changes nothing, and an outcome never leaves a terminal state."""
        msg = self.messages.get(delivery.id)
        if msg is None:
            self.orphan_outcomes += 1  # its message was deleted or compacted away
            return
        if delivery in msg.history:
            return
        msg.history.append(delivery)
        for o in delivery.outcomes:
            if msg.recipient_states.get(o.recipient, "accepted") in TERMINAL:
                continue
            msg.recipient_states[o.recipient] = o.outcome
            msg.attempts[o.recipient] = max(msg.attempts.get(o.recipient, 0), o.attempt)
            if o.outcome == "deferred" and o.next_at is not None:
                msg.next_at[o.recipient] = o.next_at
            else:
                msg.next_at.pop(o.recipient, None)

    def add_accepted(self, accepted: Accepted, position: Position, body_offset: int) -> None:
        """What applying an ACCEPTED record does (for a writer that has the record decoded)."""
        if accepted.id in self.messages:
            return  # a replayed duplicate: the fold is idempotent
        self.messages[accepted.id] = QueuedMessage(
            accepted, position, body_offset, {r.addr: "accepted" for r in accepted.recipients}
        )

    def pending_by_destination(self, now: float | None = None) -> dict[str, list[tuple[str, str]]]:
        """Recipient domain -> [(queue id, recipient)] to deliver: never tried, or deferred
        and due by ``now`` (all deferred ones when ``now`` is None)."""
        out: dict[str, list[tuple[str, str]]] = {}
        for msg in self.messages.values():
            for addr, state in msg.recipient_states.items():
                due = state == "accepted" or (
                    state == "deferred" and (now is None or msg.next_at.get(addr, 0.0) <= now)
                )
                if due:
                    out.setdefault(domain_of(addr), []).append((msg.id, addr))
        return out


def fold(records: Iterable[Record]) -> QueueState:
    state = QueueState()
    for record in records:
        state.apply(record)
    return state
