"""What a compaction holds in memory while it copies: a bounded window, not the live records.

It runs while the relay holds its whole queue, so what it adds is what the peak is made of.
Traced with ``tracemalloc`` (deterministic: the same code allocates the same objects), the
memory at its peak above what it returns (where each copied record now stands, which is
proportional to the live records by nature) must not grow with the number of live records:
a sorted list of every live record, or a read window kept per segment, would."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from journal import Log, OsFS
from journal._log import COMPACTION_CHUNK, OPEN_WINDOWS
from journal._read import READ_AHEAD

RECORD = b"x" * 1000


def transient(directory: Path, records: int) -> tuple[int, int]:
    """(records copied, bytes of the compaction's peak above what it still holds after)."""
    log, _ = Log.open(OsFS(), str(directory), segment_size=4 * 1024 * 1024)
    try:
        positions = []
        for _ in range(records // 500):
            positions += log.write_batch([(1, RECORD)] * 500)
        log.rotate()
        dead = set(positions[::2])
        tracemalloc.start()
        try:
            result = log.compact(dead)
            held, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [log.read(result.relocated[p]).payload for p in positions[1:4:2]] == [RECORD] * 2
        return result.copied, peak - held
    finally:
        log.close()


def test_a_compaction_holds_a_window_not_the_live_records(tmp_path: Path) -> None:
    copied_small, small = transient(tmp_path / "small", 20_000)  # 10 MB live, 5 segments
    copied_large, large = transient(tmp_path / "large", 80_000)  # 40 MB live, 20 segments
    assert (copied_small, copied_large) == (10_000, 40_000)
    # the read windows it keeps open, plus one step's records read, framed and joined, with room
    bound = OPEN_WINDOWS * READ_AHEAD + 4 * COMPACTION_CHUNK
    assert small < bound and large < bound, (small, large, bound)
    assert large - small < 1024 * 1024, (small, large)
