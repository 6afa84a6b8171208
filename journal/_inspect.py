"""Read-only inspection of a journal directory: ``check`` and ``dump``.

Neither modifies anything, so an operator can run them on a journal the relay refused to open.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterator

import attrs

from journal._format import (
    FRAME_HEADER_SIZE,
    MARK_TYPE,
    parse_segment_name,
    read_frame,
    segment_name,
)
from journal._fs import FS, OsFS
from journal._log import DEFAULT_MAX_RECORD_SIZE, Position, Record
from journal._segment import SegmentScan, TornTail, scan_segment
from journal.errors import CorruptJournalError

EXIT_HEALTHY = 0
EXIT_TORN = 1
EXIT_CORRUPT = 2


@attrs.frozen
class SegmentSummary:
    number: int
    records: int
    bytes: int
    first_seq: int | None
    last_seq: int | None


@attrs.frozen
class CheckReport:
    directory: str
    segments: tuple[SegmentSummary, ...]
    torn: TornTail | None
    corruption: CorruptJournalError | None
    broken_files: tuple[str, ...]

    @property
    def records(self) -> int:
        return sum(s.records for s in self.segments)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    @property
    def exit_code(self) -> int:
        if self.corruption is not None:
            return EXIT_CORRUPT
        return EXIT_TORN if self.torn is not None else EXIT_HEALTHY

    def to_json(self) -> dict[str, object]:
        corrupt = self.corruption
        return {
            "directory": self.directory,
            "status": ("corrupt", "torn-tail", "healthy")[
                (EXIT_CORRUPT, EXIT_TORN, EXIT_HEALTHY).index(self.exit_code)
            ],
            "segments": [attrs.asdict(s) for s in self.segments],
            "records": self.records,
            "bytes": self.bytes,
            "torn_tail": None if self.torn is None else attrs.asdict(self.torn),
            "corruption": None
            if corrupt is None
            else {"segment": corrupt.segment, "offset": corrupt.offset, "reason": corrupt.reason},
            "broken_files": list(self.broken_files),
        }


def _numbers(fs: FS, directory: str) -> list[int]:
    return sorted(n for n in (parse_segment_name(x) for x in fs.listdir(directory)) if n)


def _scans(fs: FS, directory: str, max_record_size: int) -> Iterator[tuple[SegmentScan, bytes]]:
    """Each segment's scan with the bytes it was made from (one read per segment)."""
    numbers = _numbers(fs, directory)
    for i, n in enumerate(numbers):
        data = fs.read_file(posixpath.join(directory, segment_name(n)))
        newest = i == len(numbers) - 1
        yield scan_segment(data, n, newest=newest, max_record_size=max_record_size), data


def check_journal(
    directory: str,
    *,
    fs: FS | None = None,
    max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Verify every frame of every segment. Raises FileNotFoundError for a missing directory.
    ``progress(done, total)`` is called with segments checked so far after each one."""
    fs = fs if fs is not None else OsFS()
    total = len(_numbers(fs, directory)) if progress is not None else 0
    summaries: list[SegmentSummary] = []
    torn: TornTail | None = None
    corruption: CorruptJournalError | None = None
    try:
        for scan, _ in _scans(fs, directory, max_record_size):
            seqs = scan.seqs
            summaries.append(
                SegmentSummary(
                    number=scan.number,
                    records=scan.records,
                    bytes=scan.valid_end,
                    first_seq=min(seqs) if seqs else None,
                    last_seq=max(seqs) if seqs else None,
                )
            )
            torn = scan.torn or torn
            if progress is not None:
                progress(len(summaries), total)
    except CorruptJournalError as exc:
        corruption = exc
    broken = tuple(sorted(x for x in fs.listdir(directory) if ".broken" in x))
    return CheckReport(directory, tuple(summaries), torn, corruption, broken)


@attrs.frozen
class DumpLine:
    seq: int
    type: int
    position: Position
    size: int


def dump_journal(
    directory: str, *, fs: FS | None = None, max_record_size: int = DEFAULT_MAX_RECORD_SIZE
) -> Iterator[DumpLine]:
    """Every record in file order (copies made by compaction where they stand).

    Raises CorruptJournalError where ``check`` would report corruption; stops quietly at a
    torn tail (``check`` reports it).
    """
    fs = fs if fs is not None else OsFS()
    for scan, _ in _scans(fs, directory, max_record_size):
        for seq, off, length, rtype in zip(
            scan.seqs, scan.offsets, scan.lengths, scan.types, strict=True
        ):
            yield DumpLine(seq, rtype, Position(scan.number, off), length)


def read_records(
    directory: str, *, fs: FS | None = None, max_record_size: int = DEFAULT_MAX_RECORD_SIZE
) -> list[Record]:
    """Every record, each seq once, in seq order, without modifying anything (a torn tail is
    left alone, not repaired). For tools that read a journal a relay may be writing."""
    fs = fs if fs is not None else OsFS()
    out: dict[int, Record] = {}
    for scan, data in _scans(fs, directory, max_record_size):  # the bytes the scan judged
        for seq, off, length, rtype in zip(
            scan.seqs, scan.offsets, scan.lengths, scan.types, strict=True
        ):
            if seq not in out:
                start = off + FRAME_HEADER_SIZE
                out[seq] = Record(
                    seq, rtype, data[start : start + length], Position(scan.number, off)
                )
    return [out[k] for k in sorted(out)]


def read_at(
    directory: str,
    position: Position,
    rtype: int,
    *,
    max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
) -> Record | None:
    """The record of type ``rtype`` at ``position``, read (opened read-only) by a process
    that does not own the journal (the delivery process); None when it is not there any more.

    A segment is never written again where it has been written, so the frame at a position
    is the one the owner wrote there, until compaction copies it forward and removes the
    segment: then the file is gone (None), and the owner, which knows where the copy went,
    must be asked. The type and the checksum are checked, so a torn frame or a mark cannot
    pass for the record."""
    path = posixpath.join(directory, segment_name(position.segment))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        found = read_frame(
            lambda offset, size: os.pread(fd, size, offset), position.offset, None, max_record_size
        )
    finally:
        os.close(fd)
    if found is None or found[0][1] != rtype or rtype == MARK_TYPE:
        return None
    (seq, _, start, end), data = found
    return Record(seq, rtype, data[start:end], position)
