"""The queue state: a pure fold of journal records.

``QueueState.apply(record)`` is the only way state changes, so replaying the journal after a
restart rebuilds exactly the state the relay had. No I/O here: the caller reads records and
hands them over (the relay in a worker thread at startup, the CLI offline).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from atmosrelay.queue.records import Accepted, RecordError, RecordType, decode_accepted
from journal import Position, Record


@attrs.define
class QueuedMessage:
    record: Accepted
    position: Position  # where the ACCEPTED record (and the body) stands in the journal
    body_offset: int  # where the message bytes start in the record's payload
    recipient_states: dict[str, str]  # recipient address -> "accepted" (delivery adds more)

    @property
    def id(self) -> str:
        return self.record.id


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@attrs.define
class QueueState:
    messages: dict[str, QueuedMessage] = attrs.field(factory=dict)
    unknown_records: int = 0  # types from a newer build, kept in the journal, not understood

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
        else:
            self.unknown_records += 1

    def add_accepted(self, accepted: Accepted, position: Position, body_offset: int) -> None:
        """What applying an ACCEPTED record does (for a writer that has the record decoded)."""
        if accepted.id in self.messages:
            return  # a replayed duplicate: the fold is idempotent
        self.messages[accepted.id] = QueuedMessage(
            accepted, position, body_offset, {r.addr: "accepted" for r in accepted.recipients}
        )

    def pending_by_destination(self) -> dict[str, list[tuple[str, str]]]:
        """Recipient domain -> [(queue id, recipient)] still to deliver."""
        out: dict[str, list[tuple[str, str]]] = {}
        for msg in self.messages.values():
            for addr, state in msg.recipient_states.items():
                if state == "accepted":
                    out.setdefault(domain_of(addr), []).append((msg.id, addr))
        return out


def fold(records: Iterable[Record]) -> QueueState:
    state = QueueState()
    for record in records:
        state.apply(record)
    return state
