"""The replay's read (``records()``): a segment is read a window at a time (READ_AHEAD
bytes), so a record may start in one window and end past it, be larger than a window, or
lie beyond the window read before the file grew. Each must come back whole, in order, and
checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from journal import CorruptJournalError, Position, open_journal
from journal._format import segment_name
from journal._read import READ_AHEAD

# around and across the window: small ones, one ending just short of a window's end, one
# that straddles two windows, two larger than a window, and small ones after
SIZES = [10, 300, READ_AHEAD - 400, 1000, 5, READ_AHEAD + 7, 77, 2 * READ_AHEAD, 1, 600]


def body(i: int, size: int) -> bytes:
    return (b"%d:" % i + bytes(range(256)) * (size // 256 + 1))[:size]


async def test_records_across_and_beyond_the_window_come_back_whole(tmp_path: Path) -> None:
    directory = str(tmp_path / "j")
    async with open_journal(directory, max_record_size=4 * READ_AHEAD) as journal:
        positions = [await journal.append(1 + i % 3, body(i, n)) for i, n in enumerate(SIZES)]
        got = list(journal.records())
    assert [r.payload for r in got] == [body(i, n) for i, n in enumerate(SIZES)]
    assert [r.position for r in got] == positions
    assert [r.type for r in got] == [1 + i % 3 for i in range(len(SIZES))]
    assert [r.seq for r in got] == sorted({r.seq for r in got})


async def test_a_replay_reads_what_it_was_given_while_the_segment_grows(tmp_path: Path) -> None:
    directory = str(tmp_path / "j")
    async with open_journal(directory) as journal:
        first = [await journal.append(1, body(i, 2000)) for i in range(5)]
        replay = journal.records()
        assert next(replay).position == first[0]  # its window ends where the file ended
        later = [await journal.append(1, body(i, 2000)) for i in range(5, 10)]
        rest = list(replay)
        assert [r.position for r in rest] == first[1:]  # what records() was called on
        again = list(journal.records())
    assert [r.position for r in again] == first + later
    assert [r.payload for r in again] == [body(i, 2000) for i in range(10)]


@pytest.mark.parametrize("victim", [1, 3, 5])  # in a window, across two, larger than one
async def test_a_record_damaged_after_the_open_stops_the_replay(
    tmp_path: Path, victim: int
) -> None:
    directory = str(tmp_path / "j")
    async with open_journal(directory, max_record_size=4 * READ_AHEAD) as journal:
        positions = [await journal.append(1, body(i, n)) for i, n in enumerate(SIZES)]
        target: Position = positions[victim]
        path = tmp_path / "j" / segment_name(target.segment)
        data = bytearray(path.read_bytes())
        data[target.offset + 17 + SIZES[victim] // 2] ^= 0x01  # inside its payload
        path.write_bytes(bytes(data))
        replay = journal.records()
        for _ in range(victim):
            next(replay)
        with pytest.raises(CorruptJournalError) as caught:
            next(replay)
    assert (caught.value.segment, caught.value.offset) == (target.segment, target.offset)
