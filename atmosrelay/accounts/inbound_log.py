"""The account store's inbound log and forward-to addresses (a part of ``Store``).

The inbound log is one row per message the inbound listener received (atmosrelay/inbound/):
what it was, whom it was attributed to, a summary, and for mail to the operator's role
addresses and anything unrecognised the first 256 KiB of its bytes.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from atmosrelay.accounts.store import Domain


@attrs.frozen
class InboundEntry:
    """A row of the inbound log."""

    id: str
    received_at: float
    kind: str  # bounce, delay, complaint, unsubscribe, reply, role, other
    did: str | None
    queue_id: str | None
    recipient: str | None
    sender: str
    rcpt: str  # the envelope recipients, comma-separated
    client_ip: str | None
    summary: str
    size: int
    message: bytes | None = None  # what is kept of the bytes (role and other mail)


class InboundLog:
    """Mixed into ``Store``: it provides ``_tx``, ``_rows`` and ``domain``."""

    if TYPE_CHECKING:

        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]: ...
        def domain(self, name: str) -> Domain: ...

    def set_forward_to(self, name: str, address: str | None) -> Domain:
        """Where replies to ``name`` are forwarded (None: nowhere; mail to it is refused)."""
        with self._tx() as db:
            cur = db.execute("UPDATE domains SET forward_to = ? WHERE name = ?", (address, name))
            if cur.rowcount == 0:
                raise _not_found(f"no domain {name}")
        return self.domain(name)

    def add_inbound(self, entry: InboundEntry) -> bool:
        """Log what arrived; False if this id is logged already (processed before a crash)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO inbound (id, received_at, kind, did, queue_id, recipient,"
                " sender, rcpt, client_ip, summary, size, message)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(entry),
            )
            return cur.rowcount == 1

    def inbound_logged(self, inbound_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM inbound WHERE id = ?", inbound_id))

    def inbound(
        self, kind: str | None = None, did: str | None = None, limit: int = 100
    ) -> list[InboundEntry]:
        """The newest entries first (without the kept bytes)."""
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if did:
            where.append("did = ?")
            args.append(did)
        sql = (
            "SELECT id, received_at, kind, did, queue_id, recipient, sender, rcpt, client_ip,"
            " summary, size FROM inbound"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY received_at DESC, id DESC LIMIT ?"
        )
        return [InboundEntry(**dict(r)) for r in self._rows(sql, *args, limit)]

    def inbound_message(self, inbound_id: str) -> bytes | None:
        rows = self._rows("SELECT message FROM inbound WHERE id = ?", inbound_id)
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    def inbound_counts(self, since: float, did: str | None = None) -> dict[str, int]:
        sql = "SELECT kind, COUNT(*) FROM inbound WHERE received_at >= ?"
        rows = (
            self._rows(sql + " AND did = ? GROUP BY kind", since, did)
            if did
            else self._rows(sql + " GROUP BY kind", since)
        )
        return {kind: n for kind, n in rows}

    def prune_inbound(self, before: float) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM inbound WHERE received_at < ?", (before,)).rowcount


def _not_found(text: str) -> Exception:
    from atmosrelay.accounts.store import NotFound  # the store's own error

    return NotFound(text)
