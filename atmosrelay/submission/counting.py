"""The policy's counters across restarts: where they live, and what a crash can forget.

**Home.** The account store's ``counters`` table: one row per (subject, kind, minute
bucket), e.g. (``did:plc:...``, ``rcpt``, 1764172800) -> 12. Every relay process adds its
own deltas to the rows with an UPSERT (``value = value + excluded.value``), so several
processes on one host share the same totals without coordinating; several hosts would do
the same against a shared store (the account store moved to PostgreSQL, or these rows to
Redis ``INCRBY`` on ``kind|subject|bucket`` keys with a TTL: the same add-only protocol).

**Others' counts.** Each transaction that adds to the table takes the next number of a
sequence and stamps the rows it touched with it. ``CounterSync`` remembers the number it
last read and the total it last saw of each row; every ``policy.counter_flush`` seconds,
in the same transaction as its own additions, it reads the rows stamped past that number:
a row's new total, less what this process last saw of it and less what it has just added
itself, is what the others added, and goes into the counters as a load (never flushed
again). So another process's send counts here at most two flush intervals after it was
counted there (its flush, then this process's next read): with the default of 1 s, a
member may exceed a limit by what the other processes accept for it within about 2 s,
and no more. The spray rule's distinct domains stay each process's own (memory only).

**Writes.** The hot path only counts in memory (policy/counters.py); ``CounterSync.run``
writes the deltas every ``policy.counter_flush`` seconds (1 s) in one transaction, with
the time up to which this journal's ACCEPTED records are counted (``counter_marks``). An
idle second writes nothing (it only reads the others' rows): with no delta, nothing was
accepted or delivered since the last mark, so it still holds.

**After a crash.** Startup loads the table (the last 8 days), then adds what the journal
still holds past that mark: each ACCEPTED record's recipients, and each DELIVERY record's
sent and bounced outcomes. So a ``kill -9`` forgets only what was both accepted after the
last flush *and* compacted out of the journal before the crash; compaction only touches
sealed segments of finished messages, checked every ``journal.compact_interval`` (30 s),
so in practice nothing. The bound stated in docs/policy.md: at most one flush interval of
sends, and only for messages already delivered and compacted. A failed flush keeps its
deltas for the next one.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from functools import partial
from typing import Final

import attrs
import trio

from atmosrelay.accounts.store import AsyncStore
from atmosrelay.policy.counters import KEEP, STORE_KEEP
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.limits import recipients_key
from atmosrelay.policy.rules import bounced_key, sent_key
from atmosrelay.queue.records import RecipientState
from atmosrelay.queue.state import QueuedMessage, QueueState, domain_of

log = logging.getLogger("atmosrelay.policy")

PRUNE_EVERY: Final = 3600.0  # seconds between sweeps of ``seen`` and of the store's rows


@attrs.define(eq=False)
class CounterSync:
    """This process's counters and the store's rows, kept in step both ways: its own
    deltas written, the others' additions read back (see the module's docstring)."""

    store: AsyncStore
    policy: Policy
    journal: str  # whose records ``counter_marks`` says are counted up to when
    seq: int = 0  # the store's sequence number as last read
    seen: dict[tuple[str, float], int] = attrs.field(factory=dict)  # row totals as last read
    # Called once, the first time another process's additions are counted here (the relay
    # says so on its standard output: the operator learns the store is shared).
    on_shared: Callable[[], None] | None = None
    # With session processes (server/workers.py), the owner's: the time up to which every
    # process accepting for this journal has flushed its counts (they count what they accept,
    # and mark nothing: their ``journal`` is ""). The mark written is never past it, so a
    # restart recounts what they may not have flushed, and the mark moves with it even when
    # this process has nothing to add.
    counted_until: Callable[[], float] | None = None
    relay: str = ""  # whose counts these are: ``journal`` unless set (a session process's)
    flushed: float = 0.0  # the ``now`` of the last flush that reached the store
    _lock: trio.Lock = attrs.field(factory=trio.Lock)  # one exchange at a time, applied in turn
    _pruned: float = 0.0
    _marked: float = 0.0  # the mark this process last wrote

    def load(self, state: QueueState, now: float, own_domain: str = "") -> tuple[int, int, float]:
        """Fill the policy's counters from the store, then from the journal's records past
        the last flush (those ``state`` holds); also when each domain was last paused.
        Returns (rows loaded, records replayed, the last flush's mark). Run once at startup
        (in a thread), before anything listens, and before any message ``state`` holds is
        tried; messages the start adds later (queue/store.py, ``load_rest``) are counted by
        ``recount`` with the same mark, before they are tried."""
        store, counters = self.store.sync, self.policy.counters
        rows, self.seq = store.counts_and_seq_since(now - KEEP)
        for key, start, n in rows:
            counters.load(key, start, n)
            self.seen[(key, start)] = n
        self._pruned = now
        mark = store.flushed_until(self.journal)
        replayed = recount(self.policy, state.messages.values(), mark, own_domain)
        for domain in store.domains():
            if domain.paused_at is not None:
                self.policy.fresh_since[domain.name] = domain.paused_at
        return len(rows), replayed, mark

    async def flush(self, now: float) -> None:
        """Write what was counted since the last flush, and read back what the other
        processes added since the last read. A failed write keeps its deltas for the next
        one and reads nothing (the transaction rolled back)."""
        async with self._lock:
            # the deltas are taken on the event loop (no send can interleave)
            deltas = self.policy.counters.take_unflushed()
            until, mark = now, False
            if self.counted_until is not None:
                until = min(now, self.counted_until())
                mark = until > self._marked
            exchange = partial(
                self.store.sync.exchange_counts,
                deltas,
                self.seq,
                journal=self.journal,
                until=until,
                mark=mark,
                relay=self.relay or self.journal,
            )
            try:
                rows, seq, foreign = await self.store.run(exchange)
            except trio.Cancelled:  # waiting for the store's thread: the exchange never ran
                self.policy.counters.restore_unflushed(deltas)
                raise
            except (OSError, sqlite3.Error):  # the disk: keep the deltas, say so, try next time
                self.policy.counters.restore_unflushed(deltas)
                log.exception("could not write the policy counters; they are kept for the next try")
                return
            self._apply(rows, seq, deltas, foreign)
            self.flushed = now
            if deltas or mark:
                self._marked = until
            if now - self._pruned > PRUNE_EVERY:
                await self._prune(now)

    def _apply(
        self,
        rows: list[tuple[str, float, int]],
        seq: int,
        mine: dict[tuple[str, float], int],
        foreign: bool,  # another relay (not this one's session processes) added some
    ) -> None:
        counters, seen = self.policy.counters, self.seen
        shared = False
        for key, start, total in rows:
            slot = (key, start)
            others = total - seen.get(slot, 0) - mine.get(slot, 0)
            seen[slot] = total
            if others:
                counters.load(key, start, others)
                shared = True
        self.seq = seq
        if shared and foreign and self.on_shared is not None:
            self.on_shared()
            self.on_shared = None

    async def _prune(self, now: float) -> None:
        """Hourly: forget the rows no rule reads any more, and drop from the store what no
        reader reads (``STORE_KEEP``; every process sharing the store does it: the second
        DELETE finds nothing)."""
        self._pruned = now
        for slot in [s for s in self.seen if s[1] < now - KEEP]:
            del self.seen[slot]
        try:
            await self.store.run(self.store.sync.prune_counts, now - STORE_KEEP)
        except (OSError, sqlite3.Error):
            log.exception("could not prune the policy counters; trying again in an hour")

    async def run(
        self,
        clock: Callable[[], float],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Flush every ``counter_flush`` seconds until cancelled; a last flush on the way
        out."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.policy.settings.counter_flush)
                await self.flush(clock())
        finally:
            with trio.CancelScope(shield=True):
                await self.flush(clock())


def recount(
    policy: Policy,
    messages: Iterable[QueuedMessage],
    mark: float,
    own_domain: str = "",
    *,
    deliveries: bool = True,
) -> int:
    """Count what ``messages`` hold past ``mark`` (the last flush) into ``policy``'s
    counters: each accepted message's recipients, each delivery outcome (unless not
    ``deliveries``: a session process's acceptances, whose deliveries this process counted
    as they came; server/workers.py). Returns how many messages were accepted past it."""
    counted: list[tuple[str, float, int]] = []
    replayed = 0
    # a deep queue holds many messages of few senders and members: each one's domain and
    # key made once (100,000 queued took 0.2 s here, one string operation a message)
    domains: dict[str, str] = {}
    keys: dict[str, str] = {}
    for msg in messages:
        record = msg.record
        sender = record.sender
        if not sender:
            continue  # a DSN: the relay's own mail counts against nobody
        sender_domain = domains.get(sender)
        if sender_domain is None:
            sender_domain = domains[sender] = domain_of(sender)
        if sender_domain == own_domain:
            continue  # forwards: the relay's own mail too
        if record.accepted_at > mark:
            rcpts = record.recipients
            if len(rcpts) == 1:  # most messages: no generator (half of the recount's time)
                n = 0 if rcpts[0].suppressed else 1
            else:
                n = sum(1 for r in rcpts if not r.suppressed)
            member_key = keys.get(record.did)
            if member_key is None:
                member_key = keys[record.did] = recipients_key(record.did)
            counted.append((member_key, record.accepted_at, n))
            replayed += 1
        for delivery in msg.history if deliveries else ():
            if delivery.at <= mark:
                continue
            for o in delivery.outcomes:
                if o.outcome == RecipientState.SENT:
                    counted.append((sent_key(sender_domain), delivery.at, 1))
                elif o.outcome == RecipientState.BOUNCED:
                    counted.append((bounced_key(sender_domain), delivery.at, 1))
    policy.counters.add_many(counted)
    return replayed
