"""Member snapshots for the policy, from the account store, cached per generation.

A snapshot is reloaded when the account store changed since it was loaded: ``generation``
(KeyChecker's) moves on when another process writes the store (polled every second) and
when this relay writes it (a label, a suppression, a pause: actions.py). A session asks at
AUTH and at every MAIL; the cached answer costs no thread hop.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from atmosrelay.accounts.store import AsyncStore, NotFound, Store
from atmosrelay.policy.member import MemberSnapshot, SuppressionSource


def load_snapshot(store: Store, did: str) -> MemberSnapshot | None:
    """The member as the policy sees it; None when there is no such member (removed)."""
    try:
        member = store.member(did)
    except NotFound:
        return None
    domains = store.domains(did)
    suppressed: dict[str, SuppressionSource] = {}
    for s in store.suppressions(did):
        try:
            source = SuppressionSource(s.source)
        except ValueError:
            source = SuppressionSource.OPERATOR  # an unknown source blocks, to be safe
        suppressed[s.address.lower()] = source
    return MemberSnapshot(
        did=member.did,
        status=member.status,
        created_at=member.created_at,
        labels=frozenset(member.labels),
        status_reason=member.status_reason,
        hourly_limit=member.hourly_limit,
        daily_limit=member.daily_limit,
        verified=frozenset(d.name for d in domains if d.status == "verified"),
        pending=frozenset(d.name for d in domains if d.status != "verified"),
        paused={d.name: d.paused_reason for d in domains if d.paused_reason is not None},
        suppressed=suppressed,
    )


class MemberDirectory:
    """One snapshot object per member and generation: sessions that look at once (fifty
    of them at their next MAIL after a change) share one load and get the same object,
    which the policy's per-member caches key on."""

    def __init__(self, store: AsyncStore, generation: Callable[[], int]) -> None:
        self.store = store
        self.generation = generation
        self._cache: dict[str, tuple[int, MemberSnapshot | None]] = {}
        self._loading: dict[tuple[str, int], trio.Event] = {}
        self.loads = 0  # store reads, for tests

    async def get(self, did: str) -> MemberSnapshot | None:
        while True:
            generation = self.generation()
            cached = self._cache.get(did)
            if cached is not None and cached[0] == generation:
                return cached[1]
            loading = self._loading.get((did, generation))
            if loading is None:
                break
            await loading.wait()  # another session is loading it: take its answer
        done = self._loading[(did, generation)] = trio.Event()
        try:
            self.loads += 1
            snapshot = await self.store.run(load_snapshot, self.store.sync, did)
            current = self._cache.get(did)
            if current is None or current[0] <= generation:
                self._cache[did] = (generation, snapshot)
            return snapshot
        finally:
            del self._loading[(did, generation)]
            done.set()

    def invalidate(self, did: str | None = None) -> None:
        if did is None:
            self._cache.clear()
        else:
            self._cache.pop(did, None)
