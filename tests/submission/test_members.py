"""The member directory: one store read and one snapshot object for sessions that ask at
once, a fresh one after the store changes."""

from __future__ import annotations

from pathlib import Path

import trio

from atmosrelay.accounts.store import AsyncStore, Store
from atmosrelay.submission.members import MemberDirectory

DID = "did:plc:abcdefghijklmnopqrstuvwx"


async def test_concurrent_lookups_share_one_load_and_one_object(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite3")
    store.add_member(DID, "alice.test")
    generation = [0]
    directory = MemberDirectory(AsyncStore(store), lambda: generation[0])
    got = []

    async def look() -> None:
        got.append(await directory.get(DID))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(look)
    assert directory.loads == 1
    assert len({id(s) for s in got}) == 1 and got[0] is not None
    assert await directory.get(DID) is got[0]  # cached
    store.set_label(DID, "throttled", True)
    generation[0] += 1  # as KeyChecker.changed() or the data_version poll would
    fresh = await directory.get(DID)
    assert directory.loads == 2
    assert fresh is not None and fresh.labels == frozenset({"throttled"})
    assert await directory.get("did:plc:zzzzzzzzzzzzzzzzzzzzzzzz") is None  # no such member
    store.close()
