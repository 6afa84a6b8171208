"""The account store: SQLite through the standard library, numbered migrations.

One file (``accounts.sqlite3`` in the data directory, mode 0600: it holds DKIM private keys and
bcrypt hashes) in WAL mode with ``synchronous=FULL``: an acknowledged change survives power loss.
``Store`` is synchronous and thread-safe (one connection behind a lock); the relay calls it
through ``AsyncStore``, which runs every call in a worker thread so the event loop never waits
on the disk. The operator CLI uses ``Store`` directly.

Schema versions live in ``PRAGMA user_version``; the migrations are in ``schema.py``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import trio

from atmosrelay.accounts.counter_rows import CounterRows
from atmosrelay.accounts.inbound_log import InboundLog
from atmosrelay.accounts.schema import MIGRATIONS
from atmosrelay.policy.member import MemberStatus

T = TypeVar("T")

SCHEMA_VERSION: Final = len(MIGRATIONS)

MEMBER_STATUSES: Final = tuple(MemberStatus)


class StoreError(Exception):
    """A request the store refuses; the message says what to do."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


@attrs.frozen
class Member:
    did: str
    status: MemberStatus = attrs.field(converter=MemberStatus)
    status_reason: str | None
    status_changed_at: float | None
    labels: tuple[str, ...]
    created_at: float
    handles: tuple[str, ...]
    hourly_limit: int | None = None
    daily_limit: int | None = None


@attrs.frozen
class Domain:
    name: str
    did: str
    status: str
    challenge_token: str
    verified_at: float | None
    verified_without_dns: bool
    dkim_selector_stem: str
    dkim_rsa_private: str = attrs.field(repr=False)
    dkim_ed25519_private: str = attrs.field(repr=False)
    forward_to: str | None
    created_at: float
    paused_at: float | None = None
    paused_reason: str | None = None
    # a rotation in progress: the next stem and key pair (None when there is none)
    dkim_next_stem: str | None = None
    dkim_next_rsa_private: str | None = attrs.field(default=None, repr=False)
    dkim_next_ed25519_private: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class ApiKey:
    key_id: str
    did: str
    bcrypt_hash: bytes = attrs.field(repr=False)
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


@attrs.frozen
class Suppression:
    did: str
    address: str
    source: str
    created_at: float
    detail: str | None = None


class Store(InboundLog, CounterRows):
    """Synchronous, thread-safe access to the account database."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # created 0600, never world-readable. Only when missing: closing a descriptor
            # of a database file drops every POSIX lock this process holds on it, the
            # locks of another connection in this process included (fcntl locks are per
            # process), and a writer elsewhere that then closes its connection believes
            # it is the last, deletes the WAL, and leaves that connection reading a stale
            # snapshot for ever (tests/accounts/test_store.py shows it).
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        os.chmod(self.path, 0o600)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        self.migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every SELECT in it sees the same committed state."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @property
    def version(self) -> int:
        return int(self._rows("PRAGMA user_version")[0][0])

    def data_version(self) -> int:
        """Changes whenever another connection (another process) commits: a cheap signal
        that cached answers may be stale."""
        return int(self._rows("PRAGMA data_version")[0][0])

    def migrate(self, *, target: int = SCHEMA_VERSION) -> None:
        """Bring the schema to ``target`` (each migration in its own transaction)."""
        while self.version < target:
            version = self.version
            with self._tx() as db:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")

    # -- members --------------------------------------------------------------------------
    def add_member(self, did: str, handle: str | None) -> Member:
        now = self.clock()
        try:
            with self._tx() as db:
                db.execute("INSERT INTO members (did, created_at) VALUES (?, ?)", (did, now))
                if handle:
                    db.execute(
                        "INSERT INTO handles (handle, did, added_at) VALUES (?, ?, ?)",
                        (handle, did, now),
                    )
        except sqlite3.IntegrityError as exc:
            if "handles" in str(exc):
                owner = self.did_for_handle(handle or "")
                raise Conflict(
                    f"handle {handle} already belongs to {owner}; a handle names one member "
                    f"('atmosrelay member show {owner}')"
                ) from None
            raise Conflict(
                f"member {did} already exists; 'atmosrelay member show {did}' shows it"
            ) from None
        return self.member(did)

    def member(self, did: str) -> Member:
        rows = self._rows("SELECT * FROM members WHERE did = ?", did)
        if not rows:
            raise NotFound(
                f"no member {did}; add it with 'atmosrelay member add {did} --handle HANDLE'"
            )
        return self._member(rows[0])

    def _member(self, row: sqlite3.Row) -> Member:
        handles = tuple(
            r[0]
            for r in self._rows(
                "SELECT handle FROM handles WHERE did = ? ORDER BY handle", row["did"]
            )
        )
        return Member(
            did=row["did"],
            status=row["status"],
            status_reason=row["status_reason"],
            status_changed_at=row["status_changed_at"],
            labels=tuple(json.loads(row["labels"])),
            created_at=row["created_at"],
            handles=handles,
            hourly_limit=row["hourly_limit"],
            daily_limit=row["daily_limit"],
        )

    def members(self) -> list[Member]:
        return [
            self._member(r) for r in self._rows("SELECT * FROM members ORDER BY created_at, did")
        ]

    def did_for_handle(self, handle: str) -> str | None:
        rows = self._rows("SELECT did FROM handles WHERE handle = ?", handle)
        return rows[0][0] if rows else None

    def set_status(self, did: str, status: str, reason: str | None) -> Member:
        if status not in MEMBER_STATUSES:
            raise StoreError(f"status must be one of {', '.join(MEMBER_STATUSES)}")
        self.member(did)
        with self._tx() as db:
            db.execute(
                "UPDATE members SET status = ?, status_reason = ?, status_changed_at = ?"
                " WHERE did = ?",
                (status, reason, self.clock(), did),
            )
        return self.member(did)

    def set_limits(self, did: str, hourly: int | None, daily: int | None) -> Member:
        """The member's own limits (None: the tier's)."""
        self.member(did)
        with self._tx() as db:
            db.execute(
                "UPDATE members SET hourly_limit = ?, daily_limit = ? WHERE did = ?",
                (hourly, daily, did),
            )
        return self.member(did)

    def set_label(self, did: str, label: str, present: bool) -> tuple[Member, bool]:
        """Add (``present``) or remove a label; also whether that changed anything."""
        with self._tx() as db:
            row = db.execute("SELECT labels FROM members WHERE did = ?", (did,)).fetchone()
            if row is None:
                raise NotFound(
                    f"no member {did}; add it with 'atmosrelay member add {did} --handle HANDLE'"
                )
            labels = list(json.loads(row[0]))
            changed = (label in labels) != present
            if changed:
                labels = sorted({*labels, label}) if present else [x for x in labels if x != label]
                db.execute("UPDATE members SET labels = ? WHERE did = ?", (json.dumps(labels), did))
        return self.member(did), changed

    # -- domains --------------------------------------------------------------------------
    def add_domain(self, domain: Domain, *, limit: int) -> Domain:
        with self._tx() as db:
            owner = db.execute("SELECT did FROM domains WHERE name = ?", (domain.name,)).fetchone()
            if owner is not None:
                who = "this member" if owner[0] == domain.did else "another member"
                raise Conflict(
                    f"domain {domain.name} is already enrolled by {who}; "
                    f"'atmosrelay domain remove {domain.name}' frees it"
                )
            (count,) = db.execute(
                "SELECT count(*) FROM domains WHERE did = ?", (domain.did,)
            ).fetchone()
            if count >= limit:
                raise Conflict(
                    f"{domain.did} already has {count} domain(s), the limit is {limit}; "
                    "remove one or raise accounts.max_domains_per_member"
                )
            db.execute(
                "INSERT INTO domains (name, did, status, challenge_token, verified_at,"
                " verified_without_dns, dkim_selector_stem, dkim_rsa_private,"
                " dkim_ed25519_private, forward_to, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    domain.name,
                    domain.did,
                    domain.status,
                    domain.challenge_token,
                    domain.verified_at,
                    int(domain.verified_without_dns),
                    domain.dkim_selector_stem,
                    domain.dkim_rsa_private,
                    domain.dkim_ed25519_private,
                    domain.forward_to,
                    domain.created_at,
                ),
            )
        return self.domain(domain.name)

    def domain(self, name: str) -> Domain:
        rows = self._rows("SELECT * FROM domains WHERE name = ?", name)
        if not rows:
            raise NotFound(
                f"no enrolled domain {name}; enroll it with 'atmosrelay domain add DID {name}'"
            )
        return _domain(rows[0])

    def domains(self, did: str | None = None) -> list[Domain]:
        if did is None:
            return [_domain(r) for r in self._rows("SELECT * FROM domains ORDER BY did, name")]
        return [
            _domain(r) for r in self._rows("SELECT * FROM domains WHERE did = ? ORDER BY name", did)
        ]

    def remove_domain(self, name: str) -> None:
        """Delete the domain and, with its row, its DKIM keys (current and next)."""
        with self._tx() as db:
            if db.execute("DELETE FROM domains WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no enrolled domain {name}; 'atmosrelay domain list' shows them")

    def set_next_dkim(self, name: str, stem: str, rsa_private: str, ed_private: str) -> Domain:
        """Store a rotation's next key pair (nothing signs with it yet)."""
        with self._tx() as db:
            db.execute(
                "UPDATE domains SET dkim_next_stem = ?, dkim_next_rsa_private = ?,"
                " dkim_next_ed25519_private = ? WHERE name = ?",
                (stem, rsa_private, ed_private, name),
            )
        return self.domain(name)

    def activate_next_dkim(self, name: str) -> Domain:
        """The next pair becomes the signing pair; the old pair is deleted."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE domains SET dkim_selector_stem = dkim_next_stem,"
                " dkim_rsa_private = dkim_next_rsa_private,"
                " dkim_ed25519_private = dkim_next_ed25519_private, dkim_next_stem = NULL,"
                " dkim_next_rsa_private = NULL, dkim_next_ed25519_private = NULL"
                " WHERE name = ? AND dkim_next_stem IS NOT NULL",
                (name,),
            )
            if cur.rowcount == 0:
                raise StoreError(
                    f"no DKIM rotation of {name} to activate; start one with "
                    f"'atmosrelay domain rotate-dkim {name}'"
                )
        return self.domain(name)

    def mark_verified(self, name: str, *, without_dns: bool) -> Domain:
        self.domain(name)
        with self._tx() as db:
            db.execute(
                "UPDATE domains SET status = 'verified', verified_at = ?, verified_without_dns = ?"
                " WHERE name = ?",
                (self.clock(), int(without_dns), name),
            )
        return self.domain(name)

    def set_paused(self, name: str, reason: str | None) -> Domain:
        """Pause a sending domain (``reason``), or unpause it (None). A domain is paused
        while ``paused_reason`` is set; ``paused_at`` stays the time of its last pause (its
        bounce rate counts only what came after)."""
        self.domain(name)
        with self._tx() as db:
            if reason is None:
                db.execute("UPDATE domains SET paused_reason = NULL WHERE name = ?", (name,))
            else:
                db.execute(
                    "UPDATE domains SET paused_at = ?, paused_reason = ? WHERE name = ?",
                    (self.clock(), reason, name),
                )
        return self.domain(name)

    # -- API keys --------------------------------------------------------------------------
    def add_key(self, key_id: str, did: str, bcrypt_hash: bytes) -> ApiKey:
        self.member(did)
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO api_keys (key_id, did, bcrypt_hash, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (key_id, did, bcrypt_hash, self.clock()),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"key id {key_id} exists by chance; issue the key again") from None
        return self.key(key_id)

    def key(self, key_id: str) -> ApiKey:
        rows = self._rows("SELECT * FROM api_keys WHERE key_id = ?", key_id)
        if not rows:
            raise NotFound(f"no API key {key_id}; 'atmosrelay key list DID' shows a member's keys")
        return _key(rows[0])

    def keys(self, did: str) -> list[ApiKey]:
        return [
            _key(r)
            for r in self._rows("SELECT * FROM api_keys WHERE did = ? ORDER BY created_at", did)
        ]

    def revoke_key(self, key_id: str) -> ApiKey:
        key = self.key(key_id)
        if key.revoked_at is not None:
            raise Conflict(
                f"key {key_id} was already revoked; 'atmosrelay key issue DID' makes a new one"
            )
        with self._tx() as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (self.clock(), key_id)
            )
        return self.key(key_id)

    def revoked_keys(self) -> set[str]:
        return {
            r[0] for r in self._rows("SELECT key_id FROM api_keys WHERE revoked_at IS NOT NULL")
        }

    def touch_key(self, key_id: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE key_id = ?", (self.clock(), key_id)
            )

    # -- suppressions ----------------------------------------------------------------------
    def suppress(
        self, did: str, address: str, source: str, detail: str | None = None
    ) -> Suppression:
        """Suppress ``address`` for ``did``. An address already suppressed keeps its first
        entry, unless the new source blocks more (a hard bounce after an unsubscribe)."""
        self.member(did)
        with self._tx() as db:
            db.execute(
                "INSERT INTO suppressions (did, address, source, created_at, detail)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (did, address) DO UPDATE SET"
                " source = excluded.source, detail = excluded.detail,"
                " created_at = excluded.created_at"
                " WHERE suppressions.source = 'unsubscribe' AND excluded.source != 'unsubscribe'",
                (did, address, source, self.clock(), detail),
            )
        rows = self._rows("SELECT * FROM suppressions WHERE did = ? AND address = ?", did, address)
        return Suppression(**dict(rows[0]))

    def unsuppress(self, did: str, address: str) -> None:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM suppressions WHERE did = ? AND address = ?", (did, address)
            )
            if cur.rowcount == 0:
                raise NotFound(f"{address} is not suppressed for {did}")

    def suppressions(self, did: str) -> list[Suppression]:
        self.member(did)
        rows = self._rows("SELECT * FROM suppressions WHERE did = ? ORDER BY address", did)
        return [Suppression(**dict(r)) for r in rows]

    # -- counters (policy/counters.py) ----------------------------------------------------------


def _domain(row: sqlite3.Row) -> Domain:
    return Domain(
        name=row["name"],
        did=row["did"],
        status=row["status"],
        challenge_token=row["challenge_token"],
        verified_at=row["verified_at"],
        verified_without_dns=bool(row["verified_without_dns"]),
        dkim_selector_stem=row["dkim_selector_stem"],
        dkim_rsa_private=row["dkim_rsa_private"],
        dkim_ed25519_private=row["dkim_ed25519_private"],
        forward_to=row["forward_to"],
        created_at=row["created_at"],
        paused_at=row["paused_at"],
        paused_reason=row["paused_reason"],
        dkim_next_stem=row["dkim_next_stem"],
        dkim_next_rsa_private=row["dkim_next_rsa_private"],
        dkim_next_ed25519_private=row["dkim_next_ed25519_private"],
    )


def _key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"],
        did=row["did"],
        bcrypt_hash=bytes(row["bcrypt_hash"]),
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


class AsyncStore:
    """The store for trio code: every call runs in a worker thread, one at a time."""

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
