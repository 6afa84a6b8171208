"""The frame index (journal/_index.py): an open that uses it finds what a full scan finds,
and it never vouches for bytes that are not the ones it was written for.

The state machine (test_state_machine.py) compares indexed and full-scan opens over random
histories with crashes; the fault test (test_faults.py) fails every operation on the index
file. Here: damage it must not hide, files it must not trust, and the real file system."""

from __future__ import annotations

from pathlib import Path

import pytest

from journal import CorruptJournalError, Log, OsFS
from journal._format import HEADER_SIZE, segment_name
from journal._index import INDEX_NAME
from journal.testing import CrashableMemFS

DIR = "/j"
SEGMENT = 4096


def _written(fs: CrashableMemFS | OsFS, directory: str = DIR, fill: bytes = b"x") -> None:
    """A journal of several segments (the last one active), closed cleanly."""
    log, _ = Log.open(fs, directory, segment_size=SEGMENT)
    for i in range(40):
        log.write_batch([(1, b"record %03d " % i + fill * 300)])
    log.close()


def _replace(fs: CrashableMemFS, path: str, data: bytes) -> None:
    fs.remove(path)
    f = fs.create(path)
    f.append(data)
    f.sync()
    f.close()


def _flip(fs: CrashableMemFS, path: str, offset: int) -> None:
    data = bytearray(fs.read_file(path))
    data[offset] ^= 0x01
    _replace(fs, path, bytes(data))


def _open(fs: CrashableMemFS, **kwargs: int) -> tuple[Log, int, int]:
    log, report = Log.open(fs, DIR, segment_size=SEGMENT, **kwargs)
    return log, report.indexed, report.segments


def test_a_clean_close_lets_the_next_open_check_every_segment_by_its_crc() -> None:
    fs = CrashableMemFS()
    _written(fs)
    log, indexed, segments = _open(fs)
    assert segments > 2
    assert indexed == segments
    assert [r.payload[:10] for r in log.records()] == [b"record %03d" % i for i in range(40)]


@pytest.mark.parametrize("where", ["header", "first frame", "middle", "last byte"])
def test_damage_in_a_sealed_segment_is_found_where_a_full_scan_finds_it(where: str) -> None:
    fs = CrashableMemFS()
    _written(fs)
    path = f"{DIR}/{segment_name(1)}"
    size = len(fs.read_file(path))
    offset = {"header": 9, "first frame": HEADER_SIZE + 20, "middle": size // 2}.get(
        where, size - 1
    )
    _flip(fs, path, offset)
    with pytest.raises(CorruptJournalError) as indexed:
        Log.open(fs, DIR, segment_size=SEGMENT)
    fs.remove(f"{DIR}/{INDEX_NAME}")
    with pytest.raises(CorruptJournalError) as scanned:
        Log.open(fs, DIR, segment_size=SEGMENT)
    assert (indexed.value.segment, indexed.value.offset) == (
        scanned.value.segment,
        scanned.value.offset,
    )
    assert indexed.value.segment == 1


def test_damage_in_the_active_segment_is_found_too() -> None:
    fs = CrashableMemFS()
    _written(fs)
    newest = max(n for n in fs.listdir(DIR) if n.endswith(".seg"))
    _flip(fs, f"{DIR}/{newest}", HEADER_SIZE + 30)  # acknowledged bytes: a sync mark vouches
    with pytest.raises(CorruptJournalError, match="durable"):
        Log.open(fs, DIR, segment_size=SEGMENT)


@pytest.mark.parametrize("damage", ["truncated", "a flipped bit", "empty", "foreign"])
def test_an_index_that_is_not_whole_is_not_used(damage: str) -> None:
    fs = CrashableMemFS()
    _written(fs)
    path = f"{DIR}/{INDEX_NAME}"
    data = fs.read_file(path)
    _replace(
        fs,
        path,
        {
            "truncated": data[:-7],
            "a flipped bit": data[:100] + bytes([data[100] ^ 4]) + data[101:],
            "empty": b"",
            "foreign": b"not an index at all, but long enough to hold a tail" * 3,
        }[damage],
    )
    log, indexed, segments = _open(fs)
    assert (indexed, segments > 2) == (0, True)
    assert len(list(log.records())) == 40


def test_an_index_of_other_bytes_is_not_used_for_them() -> None:
    """Another journal's index in place (the same segment numbers, other contents)."""
    ours, theirs = CrashableMemFS(), CrashableMemFS()
    _written(ours)
    _written(theirs, fill=b"y")  # the same frames, other bytes in every one
    _replace(ours, f"{DIR}/{INDEX_NAME}", theirs.read_file(f"{DIR}/{INDEX_NAME}"))
    log, indexed, _ = _open(ours)
    assert indexed == 0
    assert [r.payload[:10] for r in log.records()] == [b"record %03d" % i for i in range(40)]


def test_frames_longer_than_this_open_allows_are_refused_as_without_the_index() -> None:
    fs = CrashableMemFS()
    _written(fs)
    with pytest.raises(CorruptJournalError, match="sealed"):
        Log.open(fs, DIR, segment_size=SEGMENT, max_record_size=100)


def test_after_kill_the_last_clean_close_still_covers_what_the_segments_held(
    tmp_path: Path,
) -> None:
    """Segments only grow until compaction deletes them: an index written at a clean close
    vouches for their first bytes after later runs were killed, and the rest is scanned."""
    fs, directory = OsFS(), str(tmp_path / "j")
    _written(fs, directory)
    log, _ = Log.open(fs, directory, segment_size=SEGMENT)
    for i in range(40, 45):
        log.write_batch([(1, b"record %03d " % i + b"x" * 300)])
    # no close: the next open finds what a killed run left (every batch fsynced)
    reopened, report = Log.open(fs, directory, segment_size=SEGMENT)
    assert report.indexed == report.segments - 1  # the new segment(s) are scanned
    assert [r.payload[:10] for r in reopened.records()] == [b"record %03d" % i for i in range(45)]
    log.close()
    reopened.close()


def test_a_compaction_leaves_the_deleted_segments_entries_unused(tmp_path: Path) -> None:
    fs, directory = OsFS(), str(tmp_path / "j")
    _written(fs, directory)
    log, _ = Log.open(fs, directory, segment_size=SEGMENT)
    dead = {r.position for r in log.records() if int(r.payload[7:10]) % 2}
    removed = log.compact(dead).removed_segments
    left = [r.payload for r in log.records()]
    log.close()
    reopened, report = Log.open(fs, directory, segment_size=SEGMENT)
    assert removed and min(removed) == 1
    assert report.indexed == report.segments
    assert [r.payload for r in reopened.records()] == left
    reopened.close()
