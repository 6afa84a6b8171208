"""The status index: what became of each message, for as long as the operator keeps it.

The journal forgets a message once compaction drops its records; members still ask what
became of it (``GET /v1/messages/{id}``), and ``queue show`` still answers. So a second
SQLite file (``status.sqlite3`` in the data directory, WAL, ``synchronous=FULL``) keeps,
per member message: the envelope, category, tags, metadata, each recipient's status
(``accepted``, ``deferred``, ``sent``, ``bounced``, ``suppressed``) and every attempt (time,
remote host, status, reply), and an HTTP send's ``Idempotency-Key``.

**Fed by events, never by scanning.** It subscribes to the queue's typed events
(queue/events.py): an event is queued in memory and a writer task commits what has piled up
every ``FLUSH_EVERY`` seconds, in one transaction in a worker thread. Readers call
``flush`` first, so a member reads its own writes.

**Rebuilt from the journal.** At startup ``run(rebuild=state)`` writes every message the
journal still holds whose row is missing or behind (a row counts the records it has seen:
``version``). So a lost or deleted index file comes back with whatever the journal holds,
and a ``kill -9`` between an event and its commit loses nothing: the journal still holds
the record. The relay does not wait for it (100,000 messages take over a second): it
accepts and delivers meanwhile, their events pile up in memory and are committed after the
rebuild (they share its one worker thread), and ``flush`` waits for the rebuild, so the
compactor never drops a record the index has not committed yet. A message may come both
ways (its row written by the rebuild, its new attempt by an event): attempts are keyed, so
it counts once. What the journal no longer holds must already be in the index: the
compactor calls ``flush`` before it compacts.

**Retention.** Finished messages (no recipient left to deliver) are dropped
``retention`` seconds after they finished (30 days by default); messages still queued
never are. Idempotency keys are honoured for ``idempotency_ttl`` (24 hours).

DSNs (empty envelope sender) are the relay's own mail, not a member's: not indexed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import orjson
import trio

from atmosrelay.queue.events import (
    AttemptOutcome,
    MessageAccepted,
    MessageDeleted,
    QueueEvent,
    Reported,
)
from atmosrelay.queue.records import TERMINAL, Accepted, RecipientState
from atmosrelay.queue.state import QueuedMessage, QueueState
from atmosrelay.queue.status_rows import (
    SCHEMA,
    SUMMARY_UPDATE,
    UNSUBSCRIBED,
    Attempt,
    MessageStatus,
    Remembered,
    remembered,
)

__all__ = ["UNSUBSCRIBED", "Attempt", "MessageStatus", "Remembered", "StatusIndex"]

log = logging.getLogger("atmosrelay.status")

FLUSH_EVERY: Final = 1.0  # seconds between the writer's commits when events arrive
PRUNE_EVERY: Final = 3600.0


class StatusIndex:
    """The index over one SQLite connection; every call of the trio side runs in a worker
    thread, one at a time (``_limiter``)."""

    def __init__(
        self,
        path: Path,
        *,
        retention: float = 30 * 86400.0,
        idempotency_ttl: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        self.path = path
        self.retention = retention
        self.idempotency_ttl = idempotency_ttl
        self.clock = clock
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        if fresh:
            os.chmod(path, 0o600)  # envelopes and metadata of members' mail
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._db.row_factory = sqlite3.Row
        self._pending: list[QueueEvent] = []
        self._keys: dict[tuple[str, str], Remembered] = {}  # accepted, not yet committed
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        self._rebuilding: trio.Event | None = None  # set once the start's rebuild is done
        self.written = 0  # events committed since start

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- events in ------------------------------------------------------------------------
    def on_event(self, event: QueueEvent) -> None:
        """A queue event (called on the event loop: quick, never raises)."""
        if isinstance(event, MessageAccepted):
            record = event.record
            if not record.sender:
                return
            found = remembered(record)
            if found is not None and record.idem is not None:
                self._keys[(record.did, record.idem.key)] = found
        elif isinstance(event, AttemptOutcome):
            if not event.sender:
                return  # a DSN's own delivery: DSNs are not indexed
        elif not isinstance(event, MessageDeleted | Reported):
            return
        self._pending.append(event)
        self._wake.set()

    async def run(
        self,
        *,
        rebuild: QueueState | None = None,
        announce: Callable[[str], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """With ``rebuild``, first write what the journal holds and the index lacks (started
        at once: the caller goes on meanwhile). Then commit pending events every FLUSH_EVERY
        seconds; prune every PRUNE_EVERY."""
        if rebuild is not None:
            messages = list(rebuild.messages.values())  # taken on the event loop: whole
            self._rebuilding = done = trio.Event()
            task_status.started()
            try:
                written = await self._run(self.rebuild, messages)
            finally:
                done.set()
            if written and announce is not None:
                announce(f"status index: {written} message(s) written from the journal")
        else:
            task_status.started()
        next_prune = trio.current_time()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.flush()
                if trio.current_time() >= next_prune:
                    await self._run(self._prune, self.clock())
                    next_prune = trio.current_time() + PRUNE_EVERY
            except sqlite3.Error as exc:  # kept for the next round; the relay goes on
                log.error("status index: write failed (%s); will retry", exc)
            await trio.sleep(FLUSH_EVERY)

    async def flush(self) -> None:
        """Commit every event received so far (readers call it first), after the start's
        rebuild."""
        if self._rebuilding is not None:
            await self._rebuilding.wait()
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await self._run(self._write, batch, self.clock())
        except BaseException:
            self._pending[:0] = batch  # not committed: the next flush tries again
            raise
        for event in batch:
            if isinstance(event, MessageAccepted) and event.record.idem is not None:
                self._keys.pop((event.record.did, event.record.idem.key), None)
        self.written += len(batch)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- writes (worker thread) ----------------------------------------------------------------
    def _write(self, batch: Iterable[QueueEvent], now: float) -> None:
        events = list(batch)
        with self._lock, self._transaction():
            # Every message first, in two statements: an attempt comes after its message.
            self._insert([e.record for e in events if isinstance(e, MessageAccepted)], 0)
            touched: set[str] = set()
            for event in events:
                if isinstance(event, AttemptOutcome):
                    o = event.outcome
                    self._attempt(
                        event.queue_id,
                        o.recipient,
                        event.at,
                        o.outcome.value,
                        o.status,
                        event.mta,
                        o.reply,
                    )
                    touched.add(event.queue_id)
                elif isinstance(event, Reported):
                    self._reported(event)
                    touched.add(event.queue_id)
                elif isinstance(event, MessageDeleted):
                    self._db.execute(
                        "UPDATE messages SET deleted = ?, version = version + 1 WHERE id = ?",
                        (event.reason, event.queue_id),
                    )
                    touched.add(event.queue_id)
            for queue_id in touched:  # a new message's summary is "accepted" already
                self._db.execute(SUMMARY_UPDATE, {"id": queue_id, "now": now})

    def _transaction(self) -> sqlite3.Connection:
        self._db.execute("BEGIN")
        return self._db  # the context manager commits, or rolls back on error

    def _insert(self, records: list[Accepted], version: int) -> None:
        if not records:
            return
        self._db.executemany(
            "INSERT OR IGNORE INTO messages (id, did, accepted_at, sender, message_id, "
            "category, tags, metadata, size, status, version, idem_key, idem_digest, "
            "idem_rejected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'accepted', ?, ?, ?, ?)",
            [
                (
                    r.id,
                    r.did,
                    r.accepted_at,
                    r.sender,
                    r.message_id,
                    r.category,
                    orjson.dumps(r.tags).decode(),
                    orjson.dumps(r.metadata).decode(),
                    r.size,
                    version,
                    r.idem.key if r.idem else None,
                    r.idem.digest if r.idem else None,
                    orjson.dumps(r.idem.rejected).decode() if r.idem else None,
                )
                for r in records
            ],
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO recipients (id, addr, status, pos) VALUES (?, ?, ?, ?)",
            [
                (record.id, r.addr, "suppressed" if r.suppressed else "accepted", i)
                for record in records
                for i, r in enumerate(record.recipients)
            ],
        )

    def _attempt(
        self,
        queue_id: str,
        addr: str,
        at: float,
        status: str,
        code: str,
        mta: str | None,
        reply: str | None,
    ) -> None:
        added = self._db.execute(
            "INSERT OR IGNORE INTO attempts (id, addr, at, status, code, mta, reply) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (queue_id, addr, at, status, code, mta, reply),
        ).rowcount
        if not added:
            return  # seen already (a rebuild and an event can both bring it)
        terminal = tuple(s.value for s in TERMINAL)
        self._db.execute(
            f"UPDATE recipients SET status = ? WHERE id = ? AND addr = ? "
            f"AND status NOT IN ({','.join('?' * len(terminal))})",
            (status, queue_id, addr, *terminal),
        )
        self._db.execute("UPDATE messages SET version = version + 1 WHERE id = ?", (queue_id,))

    def _reported(self, event: Reported) -> None:
        """A remote's later report: an attempt row, and a bounce overrides "sent" (the
        remote took the message, then could not deliver it)."""
        added = self._db.execute(
            "INSERT OR IGNORE INTO attempts (id, addr, at, status, code, mta, reply) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event.queue_id,
                event.recipient,
                event.at,
                event.outcome,
                event.status,
                event.mta,
                event.reply,
            ),
        ).rowcount
        if not added:
            return
        if event.outcome == RecipientState.BOUNCED:
            self._db.execute(
                "UPDATE recipients SET status = 'bounced' WHERE id = ? AND addr = ? "
                "AND status != 'suppressed'",
                (event.queue_id, event.recipient),
            )
        # no version bump: ``version`` counts journal records, and this is none

    def rebuild(self, queued: Iterable[QueuedMessage]) -> int:
        """Write every message of ``queued`` whose row is missing or behind it (startup, in a
        worker thread). Returns how many. It asks only for the rows of the messages the
        journal holds (the file keeps a month more)."""
        now = self.clock()
        messages = [m for m in queued if m.record.sender]
        behind: list[QueuedMessage] = []
        with self._lock:
            for i in range(0, len(messages), 500):
                chunk = messages[i : i + 500]
                marks = ",".join("?" * len(chunk))
                versions = {
                    row["id"]: row["version"]
                    for row in self._db.execute(
                        f"SELECT id, version FROM messages WHERE id IN ({marks})",
                        [m.id for m in chunk],
                    )
                }
                behind += [m for m in chunk if versions.get(m.id, -1) < _version(m)]
            if not behind:
                return 0
            with self._transaction():
                # every row in a few statements (a restart with 100,000 messages queued and
                # no index spent 2.7 s here one message at a time); then the attempts of
                # those that have any (a message without is "accepted" as inserted)
                for i in range(0, len(behind), 5000):
                    self._insert([m.record for m in behind[i : i + 5000]], 0)
                for msg in behind:
                    if msg.history:
                        self._rebuild_attempts(msg, now)
        return len(behind)

    def _rebuild_attempts(self, msg: QueuedMessage, now: float) -> None:
        for delivery in msg.history:
            for o in delivery.outcomes:
                self._attempt(
                    msg.id,
                    o.recipient,
                    delivery.at,
                    o.outcome.value,
                    o.status,
                    delivery.mta,
                    o.reply,
                )
        self._db.execute(SUMMARY_UPDATE, {"id": msg.id, "now": now})

    def _prune(self, now: float) -> int:
        with self._lock, self._transaction():
            old = [
                row["id"]
                for row in self._db.execute(
                    "SELECT id FROM messages WHERE finished_at IS NOT NULL AND finished_at < ?",
                    (now - self.retention,),
                )
            ]
            for table in ("attempts", "recipients", "messages"):
                self._db.executemany(f"DELETE FROM {table} WHERE id = ?", [(q,) for q in old])
        if old:
            log.info("status index: %d finished message(s) past retention dropped", len(old))
        return len(old)

    async def prune(self) -> int:
        return int(await self._run(self._prune, self.clock()))

    # -- reads ----------------------------------------------------------------------------------
    async def get(self, queue_id: str, did: str | None = None) -> MessageStatus | None:
        """One message (``did``: only if it is that member's)."""
        await self.flush()
        return await self._run(self._get, queue_id, did)  # type: ignore[no-any-return]

    async def by_message_id(self, did: str, message_id: str) -> MessageStatus | None:
        """The member's newest message with this Message-ID (a feedback report names the
        message it reports by its headers only)."""
        await self.flush()
        return await self._run(self._by_message_id, did, message_id)  # type: ignore[no-any-return]

    def _by_message_id(self, did: str, message_id: str) -> MessageStatus | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM messages WHERE did = ? AND message_id = ? "
                "ORDER BY accepted_at DESC LIMIT 1",
                (did, message_id),
            ).fetchone()
            return None if row is None else self._status(row, attempts=False)

    def lookup(self, queue_id: str) -> MessageStatus | None:
        """One message, for a program outside the relay (``queue show``): committed rows
        only."""
        return self._get(queue_id, None)

    def _get(self, queue_id: str, did: str | None) -> MessageStatus | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM messages WHERE id = ?" + (" AND did = ?" if did else ""),
                (queue_id, did) if did else (queue_id,),
            ).fetchone()
            if row is None:
                return None
            return self._status(row, attempts=True)

    def _status(self, r: sqlite3.Row, *, attempts: bool) -> MessageStatus:
        recipients = {
            addr: status
            for addr, status in self._db.execute(
                "SELECT addr, status FROM recipients WHERE id = ? ORDER BY pos", (r["id"],)
            )
        }
        tried: tuple[Attempt, ...] = ()
        if attempts:
            tried = tuple(
                Attempt(at, addr, status, code, mta, reply)
                for addr, at, status, code, mta, reply in self._db.execute(
                    "SELECT addr, at, status, code, mta, reply FROM attempts WHERE id = ? "
                    "ORDER BY at, rowid",
                    (r["id"],),
                )
            )
        return MessageStatus(
            id=r["id"],
            did=r["did"],
            accepted_at=r["accepted_at"],
            sender=r["sender"],
            message_id=r["message_id"],
            category=r["category"],
            tags=tuple(json.loads(r["tags"])),
            metadata=json.loads(r["metadata"]),
            size=r["size"],
            status=r["status"],
            finished_at=r["finished_at"],
            deleted=r["deleted"],
            recipients=recipients,
            attempts=tried,
        )

    async def page(
        self,
        did: str,
        *,
        status: str | None = None,
        since: float | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[MessageStatus]:
        """The member's messages, newest first; ``before``: the (accepted_at, id) of the
        last one of the previous page (a keyset cursor: stable while new mail arrives)."""
        await self.flush()
        return await self._run(self._page, did, status, since, limit, before)  # type: ignore[no-any-return]

    def _page(
        self,
        did: str,
        status: str | None,
        since: float | None,
        limit: int,
        before: tuple[float, str] | None,
    ) -> list[MessageStatus]:
        where, args = ["did = ?"], [did]
        if status is not None:
            where.append(
                "EXISTS (SELECT 1 FROM recipients r WHERE r.id = messages.id AND r.status = ?)"
            )
            args.append(status)
        if since is not None:
            where.append("accepted_at >= ?")
            args.append(since)  # type: ignore[arg-type]
        if before is not None:
            where.append("(accepted_at, id) < (?, ?)")
            args.extend(before)  # type: ignore[arg-type]
        sql = (
            f"SELECT * FROM messages WHERE {' AND '.join(where)} "
            "ORDER BY accepted_at DESC, id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
            return [self._status(row, attempts=False) for row in rows]

    async def idempotent(self, did: str, key: str) -> Remembered | None:
        """What ``key`` answered for ``did`` within the TTL, if anything."""
        found = self._keys.get((did, key))
        if found is not None:
            return found
        return await self._run(self._idempotent, did, key, self.clock())  # type: ignore[no-any-return]

    def _idempotent(self, did: str, key: str, now: float) -> Remembered | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, idem_digest, message_id, idem_rejected FROM messages "
                "WHERE did = ? AND idem_key = ? AND accepted_at >= ? "
                "ORDER BY accepted_at DESC LIMIT 1",
                (did, key, now - self.idempotency_ttl),
            ).fetchone()
            if row is None:
                return None
            queue_id, digest, message_id, rejected = row
            recipients = self._db.execute(
                "SELECT addr, status FROM recipients WHERE id = ? ORDER BY pos", (queue_id,)
            ).fetchall()
        # The answer as first given: recipients it took, and those it refused.
        kept = tuple(a for a, s in recipients if s != "suppressed")
        refused = tuple((str(a), str(c), str(r)) for a, c, r in json.loads(rejected or "[]"))
        refused += tuple(
            (a, "RECIPIENT_SUPPRESSED", UNSUBSCRIBED) for a, s in recipients if s == "suppressed"
        )
        return Remembered(queue_id, digest, message_id, kept, refused)


def _version(msg: QueuedMessage) -> int:
    """How many outcome rows a fully written row of ``msg`` has seen."""
    return sum(len(d.outcomes) for d in msg.history)
