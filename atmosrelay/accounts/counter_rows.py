"""The account store's counter rows (a part of ``Store``): the policy's counts, shared by
every relay process on the store, with the sequence numbers that let each read back what the
others added, the marks of what each journal has counted, and which relay wrote last
(submission/counting.py says how they are used)."""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any


class CounterRows:
    """Mixed into ``Store``: it provides ``_tx``, ``_snapshot`` and ``_rows``."""

    if TYPE_CHECKING:

        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _snapshot(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]: ...

    def exchange_counts(
        self,
        deltas: dict[tuple[str, float], int],
        after: int,
        *,
        journal: str,
        until: float,
        mark: bool = False,
        relay: str = "",
    ) -> tuple[list[tuple[str, float, int]], int, bool]:
        """Add each ``(key, bucket start) -> n`` of ``deltas`` (key ``kind|subject``; several
        processes add to the same rows) and mark this ``journal``'s records counted up to
        ``until`` (``flushed_until``; no ``journal``, no mark), when there is anything to
        add or ``mark`` says so; then, in the same transaction, every row any process added
        to after sequence number ``after``, as (key, bucket start, total), the sequence
        number reached, and whether a relay other than ``relay`` added any of them. Writers
        take the database's write lock in turn, so the sequence numbers follow the commits:
        no row is missed."""
        if not deltas and not (mark and journal):
            with self._snapshot() as db:  # the rows and the number agree
                return self._counts_after(db, after, relay)
        with self._tx() as db:
            if deltas:
                self._add_counts(db, deltas, relay)
            if journal:
                db.execute(
                    "INSERT INTO counter_marks (journal, flushed_until) VALUES (?, ?)"
                    " ON CONFLICT (journal) DO UPDATE SET flushed_until = excluded.flushed_until",
                    (journal, until),
                )
            return self._counts_after(db, after, relay)

    def _add_counts(
        self, db: sqlite3.Connection, deltas: dict[tuple[str, float], int], relay: str
    ) -> None:
        db.execute("UPDATE counter_seq SET seq = seq + 1")
        (seq,) = db.execute("SELECT seq FROM counter_seq").fetchone()
        db.execute(
            "INSERT INTO counter_writers (relay, seq) VALUES (?, ?)"
            " ON CONFLICT (relay) DO UPDATE SET seq = excluded.seq",
            (relay, seq),
        )
        rows = []
        for (key, start), n in deltas.items():
            kind, _, subject = key.partition("|")
            rows.append((subject, kind, start, n, seq))
        db.executemany(
            "INSERT INTO counters (did, name, window_start, value, seq) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (did, name, window_start) DO UPDATE"
            " SET value = value + excluded.value, seq = excluded.seq",
            rows,
        )

    @staticmethod
    def _counts_after(
        db: sqlite3.Connection, after: int, relay: str
    ) -> tuple[list[tuple[str, float, int]], int, bool]:
        (seq,) = db.execute("SELECT seq FROM counter_seq").fetchone()
        rows = db.execute(
            "SELECT name, did, window_start, value FROM counters WHERE seq > ?", (after,)
        ).fetchall()
        foreign = db.execute(
            "SELECT 1 FROM counter_writers WHERE seq > ? AND relay != ? LIMIT 1", (after, relay)
        ).fetchone()
        return [(f"{r[0]}|{r[1]}", r[2], r[3]) for r in rows], int(seq), foreign is not None

    def counts_and_seq_since(self, since: float) -> tuple[list[tuple[str, float, int]], int]:
        """``counts_since`` and the sequence number they reflect, from one snapshot: what a
        process loads at its start, before it reads others' additions past that number."""
        with self._snapshot() as db:
            rows = self.counts_since(since)
            (seq,) = db.execute("SELECT seq FROM counter_seq").fetchone()
        return rows, int(seq)

    def flushed_until(self, journal: str) -> float:
        """Up to when this journal's records are counted in the store (0: never)."""
        rows = self._rows("SELECT flushed_until FROM counter_marks WHERE journal = ?", journal)
        return float(rows[0][0]) if rows else 0.0

    def counts_since(
        self, since: float, subject: str | None = None
    ) -> list[tuple[str, float, int]]:
        """(key, bucket start, n) of buckets starting at or after ``since``."""
        sql = "SELECT name, did, window_start, value FROM counters WHERE window_start >= ?"
        args: list[Any] = [since]
        if subject is not None:
            sql += " AND did = ?"
            args.append(subject)
        return [(f"{r[0]}|{r[1]}", r[2], r[3]) for r in self._rows(sql, *args)]

    def prune_counts(self, before: float) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM counters WHERE window_start < ?", (before,)).rowcount
