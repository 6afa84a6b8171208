"""The account store: migrations, concurrency, permissions."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from atmosrelay.accounts.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Conflict,
    NotFound,
    Store,
    StoreError,
)

DID = "did:plc:abcdefghijklmnopqrstuvwx"


def test_migrates_an_empty_file(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite3")
    assert store.version == SCHEMA_VERSION == 7
    tables = {r[0] for r in store._rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"members", "handles", "domains", "api_keys", "suppressions", "counters"} <= tables
    assert "counter_marks" in tables
    assert (tmp_path / "a.sqlite3").stat().st_mode & 0o777 == 0o600
    mode = store._rows("PRAGMA journal_mode")[0][0]
    assert mode == "wal"
    assert store._rows("PRAGMA synchronous")[0][0] == 2  # FULL


@pytest.mark.parametrize("from_version", range(SCHEMA_VERSION))
def test_migrates_from_each_earlier_version_keeping_data(tmp_path: Path, from_version: int) -> None:
    path = tmp_path / "old.sqlite3"
    # An older build: its database migrated only up to from_version.
    conn = sqlite3.connect(path, isolation_level=None)
    for version in range(from_version):
        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version + 1}")
    if from_version >= 1:
        conn.execute("INSERT INTO members (did, created_at) VALUES (?, 1.0)", (DID,))
        conn.execute(
            "INSERT INTO handles (handle, did, added_at) VALUES ('alice.test', ?, 1.0)", (DID,)
        )
    conn.close()
    store = Store(path)
    assert store.version == SCHEMA_VERSION
    if from_version >= 1:
        assert store.member(DID).handles == ("alice.test",)
    store.add_member("did:plc:zyxwvutsrqponmlkjihgfedc", "bob.test")
    store.suppress("did:plc:zyxwvutsrqponmlkjihgfedc", "x@example.org", "test")


def test_concurrent_use_from_several_threads(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite3")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            did = (
                "did:plc:"
                + f"{n:02d}".translate(str.maketrans("0123456789", "abcdefghij"))
                + "a" * 22
            )
            store.add_member(did, f"user{n}.test")
            for i in range(20):
                store.suppress(did, f"r{i}@example.org", "test")
            assert len(store.suppressions(did)) == 20
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(store.members()) == 8
    # A second connection (another process, e.g. the CLI) sees it all, and data_version moves.
    other = Store(tmp_path / "c.sqlite3")
    before = store.data_version()
    other.add_member("did:plc:zzzzzzzzzzzzzzzzzzzzzzzz", None)
    assert store.data_version() != before
    assert len(store.members()) == 9


def test_member_errors_are_clear(tmp_path: Path) -> None:
    store = Store(tmp_path / "e.sqlite3")
    store.add_member(DID, "alice.test")
    with pytest.raises(Conflict, match="already exists"):
        store.add_member(DID, None)
    with pytest.raises(Conflict, match="alice.test already belongs to " + DID):
        store.add_member("did:plc:zyxwvutsrqponmlkjihgfedc", "alice.test")
    with pytest.raises(NotFound, match="atmosrelay member add"):
        store.member("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    with pytest.raises(StoreError, match="status must be one of"):
        store.set_status(DID, "sleeping", None)
    member = store.set_status(DID, "suspended", "spam complaints")
    assert (member.status, member.status_reason) == ("suspended", "spam complaints")


def test_a_second_store_in_the_process_leaves_the_first_reading_what_others_write(
    tmp_path: Path,
) -> None:
    """Opening another Store on the same file (a test beside an in-process relay, a tool)
    must not drop the first connection's locks: a writer in another process that then
    closes would take itself for the last, delete the WAL, and leave the first reading a
    stale snapshot for good (what opening and closing a raw descriptor of the file did)."""
    path = tmp_path / "a.sqlite3"
    first = Store(path)
    first.add_member("did:plc:abcdefghijklmnopqrstuvwx", None)
    Store(path).close()  # a second connection in this process, opened and closed
    opening = "import sys; from atmosrelay.accounts.store import Store; s = Store(sys.argv[1]); "
    for then in ("", "s.add_member('did:plc:bbbbbbbbbbbbbbbbbbbbbbbb', None); "):
        # an operator's command that only reads (it closes: WAL gone, if it thinks itself
        # the last), then one that writes (a new WAL the first would never look at)
        script = opening + then + "s.close()"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    assert {m.did for m in first.members()} == {
        "did:plc:abcdefghijklmnopqrstuvwx",
        "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb",
    }
    first.close()
