"""The queue's trio facade: append records durably through the journal's group commit.

``QueueStore.accept()`` returns only after the fsync that covers the record: the caller may
then answer 250. It never holds message bodies; the state keeps positions.
"""

from __future__ import annotations

import attrs
import trio

from atmosrelay.queue.records import Accepted, RecordType, encode_accepted
from atmosrelay.queue.state import QueueState, fold
from journal import Journal, Position


@attrs.define
class QueueStore:
    journal: Journal
    state: QueueState = attrs.field(factory=QueueState)

    @classmethod
    async def recover(cls, journal: Journal) -> QueueStore:
        """Fold every record of the journal (in a worker thread: it reads the disk)."""
        state = await trio.to_thread.run_sync(lambda: fold(journal.records()))
        return cls(journal, state)

    async def accept(self, record: Accepted, message: bytes) -> Position:
        """Append and fsync the ACCEPTED record, then add it to the state. Raises the
        journal's errors (JournalFullError, JournalFatalError, ...) unchanged."""
        payload = encode_accepted(record, message)
        position = await self.journal.append(RecordType.ACCEPTED, payload)
        self.state.add_accepted(record, position, len(payload) - len(message))
        return position
