"""``records_since(extent)``: the records written after an extent, in seq order, or a refusal
naming what changed when the segments it saw do not hold what they held."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from journal import ExtentMismatch, Position, open_journal
from journal._read import segment_runs
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


async def test_records_within_seqs_are_the_ones_a_whole_read_holds_there() -> None:
    """``records(first, last)`` and ``newest_from(n)``, also once compaction has copied old
    records into a segment after newer ones, and after a restart (the index rebuilt)."""
    fs = CrashableMemFS()
    async with open_journal("/j", fs=fs, segment_size=SEGMENT) as journal:
        positions = [await journal.append(1, b"%d " % i + b"." * 500) for i in range(30)]
        await journal.rotate()
        for i in range(30, 33):  # newer records first...
            await journal.append(1, b"%d " % i + b"." * 500)
        await journal.compact(dead=set(positions[::2]))  # ...then the even ones copied
        where = {r.seq: r.position.segment for r in journal.records()}
        assert where[2] > where[31]  # older seqs in a later segment: order is by seq
        for i in range(33, 40):
            await journal.append(1, b"%d " % i + b"." * 500)
    for journal_fs in (fs, fs.crash_clone()):
        async with open_journal("/j", fs=journal_fs, segment_size=SEGMENT) as journal:
            whole = [r.seq for r in journal.records()]
            assert whole == [s for s in range(1, 41) if s > 30 or s % 2 == 0]
            for first, last in [(0, None), (5, 12), (13, 35), (36, None), (41, None), (7, 7)]:
                got = list(journal.records(first, last))
                assert [r.seq for r in got] == [
                    s for s in whole if s >= first and (last is None or s <= last)
                ]
                assert all(r.payload.startswith(b"%d " % (r.seq - 1)) for r in got)
            assert journal.newest_from(1) == 40
            assert journal.newest_from(10) == 31
            assert journal.newest_from(12) == 28  # ...29 is dead: 28, 30, 31-40
            assert [r.seq for r in journal.records(journal.newest_from(12))] == whole[-12:]
            assert journal.newest_from(len(whole)) == 0  # the journal holds no more
            assert journal.newest_from(len(whole) - 1) == whole[1]
            with pytest.raises(ValueError, match="at least 1"):
                journal.newest_from(0)


# One segment's index as compaction and appends leave it: a few runs, each ascending (the
# copies of older records, then new ones, then copies made by a later compaction...).
_runs = st.lists(
    st.lists(st.integers(1, 400), min_size=1, max_size=25, unique=True).map(sorted),
    min_size=1,
    max_size=5,
)


@given(runs=_runs, first=st.integers(0, 410), span=st.none() | st.integers(0, 410))
@example(runs=[[5, 9, 40], [1, 2, 3, 20], [10, 11]], first=3, span=8)  # runs in one segment
def test_one_segments_runs_read_within_seqs_are_the_ones_it_holds_there(
    runs: list[list[int]], first: int, span: int | None
) -> None:
    """``segment_runs`` bisects each run on its own: bisecting the segment as one sorted list
    would drop or keep the wrong records of every run after the first."""
    seqs = list(dict.fromkeys(s for run in runs for s in run))  # a seq lives once
    offsets = [100 * i for i in range(len(seqs))]
    lengths = [s % 7 + 1 for s in seqs]
    last = None if span is None else first + span
    got = list(segment_runs(4, seqs, offsets, lengths, first, last))
    wanted = sorted(
        (s, 4, 100 * i, s % 7 + 1)
        for i, s in enumerate(seqs)
        if s >= first and (last is None or s <= last)
    )
    assert got == wanted
