"""``records_since(extent)``: the records written after an extent, in seq order, or a refusal
naming what changed when the segments it saw do not hold what they held."""

from __future__ import annotations

import pytest

from journal import ExtentMismatch, Position, open_journal
from journal.testing import CrashableMemFS

SEGMENT = 4096


async def test_records_since_an_extent_are_the_ones_written_after_it() -> None:
    fs = CrashableMemFS()
    async with open_journal("/j", fs=fs, segment_size=SEGMENT) as journal:
        for i in range(20):  # several segments
            await journal.append(1, b"before %d" % i + b"." * 500)
        extent = journal.extent()
        assert len(extent.segments) > 2 and extent.newest_seq == 20
        assert sum(map(len, journal.offsets(extent).values())) == 20
        for i in range(10):
            await journal.append(1, b"after %d" % i + b"." * 500)
        since = list(journal.records_since(extent))
        assert [r.seq for r in since] == list(range(21, 31))
        assert [r.payload[:7] for r in since] == [b"after %d" % i for i in range(10)]
        assert all(isinstance(r.position, Position) for r in since)
    async with open_journal("/j", fs=fs.crash_clone(), segment_size=SEGMENT) as journal:
        assert [r.seq for r in journal.records_since(extent)] == list(range(21, 31))
        assert list(journal.records_since(journal.extent())) == []


async def test_a_compaction_since_the_extent_is_refused() -> None:
    fs = CrashableMemFS()
    async with open_journal("/j", fs=fs, segment_size=SEGMENT) as journal:
        positions = [await journal.append(1, b"x" * 500) for _ in range(20)]
        extent = journal.extent()
        await journal.rotate()
        await journal.compact(dead=set(positions[:5]))  # the rest is copied forward
        with pytest.raises(ExtentMismatch, match="segment 1 is gone"):
            journal.records_since(extent)


async def test_a_segment_cut_or_replaced_since_the_extent_is_refused() -> None:
    fs = CrashableMemFS()
    async with open_journal("/j", fs=fs, segment_size=SEGMENT) as journal:
        for _ in range(3):
            await journal.append(1, b"x" * 500)
        extent = journal.extent()
    [name] = [n for n in fs.listdir("/j") if n.endswith(".seg")]
    f = fs.open(f"/j/{name}")
    f.truncate(f.size() - 700)  # the last record torn: recovery cuts it off
    f.sync()
    f.close()
    async with open_journal("/j", fs=fs, segment_size=SEGMENT) as journal:
        with pytest.raises(ExtentMismatch, match=r"segment 1 ends at \d+, not at \d+"):
            journal.records_since(extent)
    fs.remove(f"/j/{name}")
    async with open_journal("/j", fs=fs, segment_size=SEGMENT) as journal:
        await journal.append(1, b"another journal")
        with pytest.raises(ExtentMismatch, match="segment 1 ends at"):
            journal.records_since(extent)
