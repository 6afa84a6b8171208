"""The policy's counters across restarts: where they live, and what a crash can forget.

**Home.** The account store's ``counters`` table: one row per (subject, kind, minute
bucket), e.g. (``did:plc:...``, ``rcpt``, 1764172800) -> 12. Every relay process adds its
own deltas to the rows with an UPSERT (``value = value + excluded.value``), so several
processes on one host share the same totals without coordinating; several hosts would do
the same against a shared store (the account store moved to PostgreSQL, or these rows to
Redis ``INCRBY`` on ``kind|subject|bucket`` keys with a TTL: the same add-only protocol).
Today a process reads the table at startup only; reading the other processes' deltas
back every few seconds is the step that makes a second process on this host see them
(not built: one process runs per data directory).

**Writes.** The hot path only counts in memory (policy/counters.py); ``flush_loop``
writes the deltas every ``policy.counter_flush`` seconds (1 s) in one transaction, with
the time up to which this journal's ACCEPTED records are counted (``counter_marks``). An
idle second writes nothing: with no delta, nothing was accepted or delivered since the
last mark, so it still holds.

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

import trio

from atmosrelay.accounts.store import AsyncStore, Store
from atmosrelay.policy.counters import KEEP
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.limits import recipients_key
from atmosrelay.policy.rules import bounced_key, sent_key
from atmosrelay.queue.records import RecipientState
from atmosrelay.queue.state import QueuedMessage, QueueState, domain_of

log = logging.getLogger("atmosrelay.policy")


def load_counters(
    store: Store,
    policy: Policy,
    state: QueueState,
    journal: str,
    now: float,
    own_domain: str = "",
) -> tuple[int, int, float]:
    """Fill ``policy``'s counters from the store, then from the journal's records past the
    last flush (those ``state`` holds); also when each domain was last paused. Returns (rows
    loaded, records replayed, the last flush's mark). Run once at startup, before anything
    listens, and before any message ``state`` holds is tried; messages the start adds later
    (queue/store.py, ``load_rest``) are counted by ``recount`` with the same mark, before
    they are tried."""
    counters = policy.counters
    rows = store.counts_since(now - KEEP)
    for key, start, n in rows:
        counters.load(key, start, n)
    mark = store.flushed_until(journal)
    replayed = recount(policy, state.messages.values(), mark, own_domain)
    for domain in store.domains():
        if domain.paused_at is not None:
            policy.fresh_since[domain.name] = domain.paused_at
    return len(rows), replayed, mark


def recount(
    policy: Policy, messages: Iterable[QueuedMessage], mark: float, own_domain: str = ""
) -> int:
    """Count what ``messages`` hold past ``mark`` (the last flush) into ``policy``'s
    counters: each accepted message's recipients, each delivery outcome. Returns how many
    messages were accepted past it."""
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
        for delivery in msg.history:
            if delivery.at <= mark:
                continue
            for o in delivery.outcomes:
                if o.outcome == RecipientState.SENT:
                    counted.append((sent_key(sender_domain), delivery.at, 1))
                elif o.outcome == RecipientState.BOUNCED:
                    counted.append((bounced_key(sender_domain), delivery.at, 1))
    policy.counters.add_many(counted)
    return replayed


async def flush_loop(
    store: AsyncStore,
    policy: Policy,
    journal: str,
    clock: Callable[[], float],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Flush every ``counter_flush`` seconds until cancelled; a last flush on the way out."""
    task_status.started()
    try:
        while True:
            await trio.sleep(policy.settings.counter_flush)
            await _flush_once(store, policy, journal, clock())
    finally:
        with trio.CancelScope(shield=True):
            await _flush_once(store, policy, journal, clock())


async def flush_counters(store: AsyncStore, policy: Policy, journal: str, now: float) -> None:
    """Write what was counted since the last flush now (the inbound processor commits the
    counts a report changed before it marks the report done)."""
    await _flush_once(store, policy, journal, now)


async def _flush_once(store: AsyncStore, policy: Policy, journal: str, now: float) -> None:
    # the deltas are taken on the event loop (no send can interleave), written in the thread
    deltas = policy.counters.take_unflushed()
    if not deltas:
        return  # nothing happened since the last flush: its mark still holds, no write
    try:
        await store.run(partial(store.sync.add_counts, deltas, journal=journal, until=now))
    except (OSError, sqlite3.Error):  # the disk: keep the deltas, say so, try next time
        policy.counters.restore_unflushed(deltas)
        log.exception("could not write the policy counters; they are kept for the next try")
