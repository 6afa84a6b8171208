"""When each pending recipient is next tried: delivery's schedule, kept apart from the fold.

``QueueState`` changes only by folding journal records. The schedule is what delivery
makes of them, plus moves that are nobody's record: a recipient postponed because its lane
is parked, put back a minute after an attempt crashed, spread out after a restart, or
retried now by the operator. So it lives here, owned by the dispatcher:

* built from the folded state at startup (``from_state``): a recipient never tried is due at
  its acceptance, a deferred one at the next time its last outcome gave;
* kept current by the queue's typed events (``on_event``, queue/events.py): an accepted
  message's recipients are due at once (not the unsubscribed ones), a deferred outcome at
  its next time, a final outcome takes the recipient off;
* a heap of (time, queue id, recipient) with ``_at`` as the authority: an entry whose time
  is no longer the recipient's is stale and skipped, so finding what is due costs
  O(log n) per recipient, never a scan of the queue.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable

from atmosrelay.queue.events import AttemptOutcome, MessageAccepted, QueueEvent
from atmosrelay.queue.records import PENDING, RecipientState
from atmosrelay.queue.state import QueuedMessage, QueueState

Entry = tuple[float, str, str]  # (when, queue id, recipient)


class Schedule:
    def __init__(self, state: QueueState) -> None:
        self.state = state
        self._heap: list[tuple[float, str, str]] = []
        self._at: dict[tuple[str, str], float] = {}

    @classmethod
    def from_state(cls, state: QueueState) -> Schedule:
        schedule = cls(state)
        fresh, deferred = _entries(state.messages.values())
        schedule._extend(fresh + deferred)
        return schedule

    def add(self, messages: Iterable[QueuedMessage], now: float) -> list[tuple[str, str]]:
        """Messages a start decoded after delivery began (queue/store.py, ``load_rest``):
        their recipients on the schedule, except the deferred ones whose time passed while
        the relay was down, returned instead for ``spread`` once every message is in."""
        fresh, deferred = _entries(messages)
        overdue = [(queue_id, rcpt) for at, queue_id, rcpt in deferred if at < now]
        self._extend(fresh + [e for e in deferred if e[0] >= now])
        return overdue

    def _extend(self, entries: list[Entry]) -> None:
        # many at once: one heapify, not a push each (a restart with 100,000 queued spent
        # 0.17 s pushing); a few onto a large heap: a push each, not a heapify of it all
        if len(entries) < len(self._heap) // 8:
            for entry in entries:
                heapq.heappush(self._heap, entry)
        else:
            self._heap.extend(entries)
            heapq.heapify(self._heap)
        self._at.update({(queue_id, rcpt): at for at, queue_id, rcpt in entries})

    def on_event(self, event: QueueEvent) -> None:
        """The queue-event subscriber."""
        if isinstance(event, MessageAccepted):
            record = event.record
            for r in record.recipients:
                if not r.suppressed:
                    self.put(record.id, r.addr, record.accepted_at)
        elif isinstance(event, AttemptOutcome):
            o = event.outcome
            if o.outcome == RecipientState.DEFERRED and o.next_at is not None:
                self.put(event.queue_id, o.recipient, o.next_at)
            elif o.outcome != RecipientState.DEFERRED:
                self._at.pop((event.queue_id, o.recipient), None)

    def put(self, queue_id: str, recipient: str, at: float) -> None:
        """Try ``recipient`` of ``queue_id`` at ``at`` (replacing any earlier time)."""
        self._at[(queue_id, recipient)] = at
        heapq.heappush(self._heap, (at, queue_id, recipient))

    def _valid(self, entry: tuple[float, str, str]) -> bool:
        at, queue_id, recipient = entry
        return self._at.get((queue_id, recipient)) == at

    def next_due(self) -> float | None:
        """When the earliest scheduled recipient is due (None: nothing scheduled)."""
        while self._heap and not self._valid(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def take_due(self, now: float, limit: int | None = None) -> list[tuple[str, str]]:
        """(queue id, recipient) of what is due by ``now`` (at most ``limit``, earliest
        first), taken off the schedule: the caller delivers them, and their outcomes
        schedule them again if need be. A recipient no longer pending (its message deleted,
        or finished meanwhile) is dropped."""
        out: list[tuple[str, str]] = []
        messages = self.state.messages
        while self._heap and self._heap[0][0] <= now:
            if limit is not None and len(out) >= limit:
                break
            entry = heapq.heappop(self._heap)
            if self._valid(entry):
                del self._at[(entry[1], entry[2])]
                msg = messages.get(entry[1])
                if msg is not None and msg.recipient_states.get(entry[2]) in PENDING:
                    out.append((entry[1], entry[2]))
        return out

    def spread_overdue(self, now: float, window: float, rng: random.Random) -> int:
        """After a restart: deferred recipients whose time passed while the relay was down
        are spread over ``window`` seconds instead of all retrying at once (recipients never
        tried go at once). Returns how many were spread."""
        return self.spread(self._overdue(now), now, window, rng)

    def _overdue(self, now: float) -> list[tuple[str, str]]:
        overdue = []
        for msg in self.state.messages.values():
            if not msg.next_at:  # never tried, or nothing deferred: most of a deep queue
                continue
            for rcpt in msg.next_at:
                at = self._at.get((msg.id, rcpt))
                if (
                    at is not None
                    and at < now
                    and msg.recipient_states.get(rcpt) == RecipientState.DEFERRED
                ):
                    overdue.append((msg.id, rcpt))
        return overdue

    def spread(
        self, overdue: list[tuple[str, str]], now: float, window: float, rng: random.Random
    ) -> int:
        """(queue id, recipient) pairs evenly spaced over ``window`` seconds from ``now``."""
        rng.shuffle(overdue)  # evenly spaced, in random order: a trickle, not a stampede
        step = window / max(1, len(overdue))
        for i, (queue_id, recipient) in enumerate(overdue):
            self.put(queue_id, recipient, now + i * step)
        return len(overdue)

    def retry_now(self, queue_id: str, now: float) -> int:
        """Every pending recipient of ``queue_id`` due at ``now``. Returns how many."""
        msg = self.state.messages[queue_id]
        pending = [r for r, s in msg.recipient_states.items() if s in PENDING]
        for r in pending:
            self.put(queue_id, r, now)
        return len(pending)


def _entries(messages: Iterable[QueuedMessage]) -> tuple[list[Entry], list[Entry]]:
    """The schedule's entries for ``messages``: recipients never tried (due at acceptance),
    and deferred ones (due at their next time)."""
    fresh: list[Entry] = []
    deferred: list[Entry] = []
    for msg in messages:
        for rcpt, rstate in msg.recipient_states.items():
            if rstate == RecipientState.ACCEPTED:
                fresh.append((msg.record.accepted_at, msg.id, rcpt))
            elif rstate == RecipientState.DEFERRED and rcpt in msg.next_at:
                deferred.append((msg.next_at[rcpt], msg.id, rcpt))
    return fresh, deferred
