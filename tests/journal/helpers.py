"""Shared pieces of the journal tests: a workload, a snapshotting FS, and the prefix check."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence

import attrs
import trio

from journal import Log, Record, open_journal
from journal._fs import FS, File
from journal.testing import CrashableMemFS

DIR = "/data/journal"


def payload(i: int, rng: random.Random | None = None) -> bytes:
    """A unique, self-describing payload; sizes vary so frames straddle sectors."""
    size = (rng or random.Random(i)).choice([0, 7, 100, 511, 513, 1500, 5000])
    return b"rec-%08d|" % i + bytes([i % 251]) * size


def ident(record_payload: bytes) -> int:
    return int(record_payload[4:12])


class HookedFile:
    """Forwards to a real File and calls ``after(op, inner)`` after each mutating call."""

    def __init__(
        self, inner: File, after: Callable[[str, File], None], skip_sync: bool = False
    ) -> None:
        self._inner = inner
        self._after = after
        self._skip_sync = skip_sync

    def append(self, data: bytes) -> None:
        self._inner.append(data)
        self._after("append", self._inner)

    def pread(self, offset: int, size: int) -> bytes:
        return self._inner.pread(offset, size)

    def size(self) -> int:
        return self._inner.size()

    def truncate(self, size: int) -> None:
        self._inner.truncate(size)
        self._after("truncate", self._inner)

    def sync(self) -> None:
        if not self._skip_sync:
            self._inner.sync()
        self._after("sync", self._inner)

    def close(self) -> None:
        self._inner.close()


@attrs.define
class Snapshot:
    index: int
    after: str
    fs: CrashableMemFS
    acked: frozenset[int] | frozenset[str]


class SnapshotFS:
    """Wraps a CrashableMemFS and takes a crash clone after every mutating operation,
    remembering which appends had been acknowledged at that instant."""

    def __init__(
        self,
        inner: CrashableMemFS,
        acked: set[int] | set[str],
        *,
        skip_file_sync: bool = False,
        **crash: object,
    ) -> None:
        """``skip_file_sync``: the mutant for the power-cut tests' own check. Every file
        fsync is answered but never reaches the disk, as if the journal had lost its
        fsync call: a power cut must then be seen to lose acknowledged records."""
        self.inner = inner
        self.acked = acked
        self.crash = crash
        self.skip_file_sync = skip_file_sync
        self.snapshots: list[Snapshot] = []
        self._lock = threading.Lock()

    def snap(self, after: str) -> None:
        with self._lock:
            n = len(self.snapshots)
            clone = self.inner.crash_clone(seed=n, **self.crash)  # type: ignore[arg-type]
            self.snapshots.append(Snapshot(n, after, clone, frozenset(self.acked)))

    def _after(self, op: str, _: File) -> None:
        self.snap(op)

    def create(self, path: str) -> File:
        f = HookedFile(self.inner.create(path), self._after, self.skip_file_sync)
        self.snap("create")
        return f

    def open(self, path: str) -> File:
        return HookedFile(self.inner.open(path), self._after, self.skip_file_sync)

    def read_file(self, path: str) -> bytes:
        return self.inner.read_file(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def mkdir(self, path: str) -> None:
        self.inner.mkdir(path)
        self.snap("mkdir")

    def remove(self, path: str) -> None:
        self.inner.remove(path)
        self.snap("remove")

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)
        self.snap("rename")

    def sync_dir(self, path: str) -> None:
        self.inner.sync_dir(path)
        self.snap("sync_dir")


async def concurrent_workload(
    fs: FS,
    acked: set[int],
    *,
    count: int = 120,
    appenders: int = 8,
    segment_size: int = 16 * 1024,
    compact_every: int | None = None,
) -> None:
    """``appenders`` tasks append ``count`` records in all; acknowledged ids go to ``acked``.
    Small segments force rotations; ``compact_every`` adds compactions that keep every
    third record live (the others are named dead)."""
    async with open_journal(DIR, fs=fs, segment_size=segment_size) as journal:
        next_id = iter(range(count))
        positions: dict[int, object] = {}

        async def appender() -> None:
            for i in next_id:
                positions[i] = await journal.append(1 + i % 3, payload(i))
                acked.add(i)
                if compact_every and i % compact_every == compact_every - 1:
                    dead = {p for k, p in positions.items() if k % 3 != 0}
                    result = await journal.compact(dead)  # type: ignore[arg-type]
                    for k, p in list(positions.items()):
                        positions[k] = result.relocated.get(p, p)  # type: ignore[call-overload]

        async with trio.open_nursery() as nursery:
            for _ in range(appenders):
                nursery.start_soon(appender)


def recover(fs: FS) -> list[Record]:
    log, _ = Log.open(fs, DIR)
    try:
        return list(log.records())
    finally:
        log.close()


def assert_prefix(
    recovered: Sequence[Record],
    written: Sequence[Record],
    acked: frozenset[int] | set[int],
    *,
    context: str,
    is_dead: Callable[[int], bool] = lambda _: False,
) -> None:
    """What recovered is exactly a prefix of what was written (by seq: no hole, no
    reordering, nothing invented), and holds every acknowledged append that is not dead."""
    written_live = [(r.seq, r.payload) for r in written if not is_dead(ident(r.payload))]
    got = [(r.seq, r.payload) for r in recovered if not is_dead(ident(r.payload))]
    assert got == written_live[: len(got)], f"{context}: not a prefix of what was written"
    ids = {ident(p) for _, p in got}
    missing = {i for i in acked if not is_dead(i)} - ids
    assert not missing, f"{context}: acknowledged appends lost: {sorted(missing)[:10]}"
