"""``read_at``: a record read by a process that does not own the journal (the relay's
delivery processes), from the segment file, read-only; None whenever the bytes there are not
that record any more."""

from __future__ import annotations

from pathlib import Path

from journal import Position, open_journal, read_at
from journal._format import segment_name


async def test_a_record_is_read_where_the_owner_wrote_it(tmp_path: Path) -> None:
    directory = str(tmp_path / "j")
    async with open_journal(directory) as journal:
        first = await journal.append(1, b"the first body")
        second = await journal.append(2, b"x" * 70_000)
        record = read_at(directory, first, 1)
        assert record is not None
        assert (record.payload, record.type, record.position) == (b"the first body", 1, first)
        record = read_at(directory, second, 2)
        assert record is not None and record.payload == b"x" * 70_000
        assert read_at(directory, first, 2) is None  # another type: not the record asked for
        assert read_at(directory, Position(first.segment, first.offset + 1), 1) is None
        assert read_at(directory, Position(first.segment + 7, 0), 1) is None  # no such file
        assert read_at(directory, Position(first.segment, 10**9), 1) is None  # past its end


async def test_a_damaged_frame_is_not_a_record(tmp_path: Path) -> None:
    directory = str(tmp_path / "j")
    async with open_journal(directory) as journal:
        position = await journal.append(1, b"a body to damage")
    path = tmp_path / "j" / segment_name(position.segment)
    data = bytearray(path.read_bytes())
    data[data.index(b"a body to damage")] ^= 0xFF  # the checksum no longer holds
    path.write_bytes(bytes(data))
    assert read_at(directory, position, 1) is None
    # and read_at wrote nothing: the file is as damaged as it was
    assert path.read_bytes() == bytes(data)
