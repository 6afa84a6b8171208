"""The journal's synchronous core: recovery, batch writes, rotation, reads, compaction.

Blocking on purpose. Exactly one thread writes (the owner thread of ``_journal.Journal``,
or a test or command-line tool calling it directly); reads may come from any thread. Every
public method raises ``JournalFatalError`` once the log is poisoned.

Durability rules kept here (ARCHITECTURE.md section 2):

* a batch is written whole, then fsynced once; positions are returned only after the fsync;
* a failed fsync, or a failed write that is not ENOSPC, poisons the log for good;
* ENOSPC during a write truncates the partial batch away and fsyncs the truncation, so no
  frame of a failed append can come back after a crash; the log stays usable;
* a new segment (header written, file fsynced) counts only after its directory is fsynced;
* at open, the newest segment and the directory are fsynced before the first batch, because
  after ``kill -9`` what recovery read may still be only in the page cache, and the next sync
  mark must not vouch for bytes that are not on disk yet.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import posixpath
import threading
import zlib
from collections.abc import Container, Generator, Iterable, Iterator, Sequence
from typing import Final

import attrs

from journal._format import (
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    MARK_TYPE,
    SegmentHeader,
    encode_frame,
    encode_header,
    encode_mark,
    frame_at,
    parse_segment_name,
    read_frame,
    segment_name,
)
from journal._fs import FS, File
from journal._index import load_index, save_index
from journal._read import ReadAhead, segment_runs
from journal._segment import SegmentScan, TornTail, scan_segment
from journal.errors import (
    CorruptJournalError,
    JournalClosedError,
    JournalFatalError,
    JournalFullError,
    JournalReadError,
    RecordTooLargeError,
)

log = logging.getLogger("journal")

DEFAULT_SEGMENT_SIZE: Final = 64 * 1024 * 1024
DEFAULT_MAX_RECORD_SIZE: Final = 64 * 1024 * 1024
# Bytes copied per compaction step, so appends interleave. A step holds its records about
# three times over (read, framed, joined for the write): 4 MiB steps were ~12 MB more at the
# relay's peak of memory for no gain in speed (the copy is bound by the reading).
COMPACTION_CHUNK: Final = 1024 * 1024
OPEN_WINDOWS: Final = 4  # segments a sorted read holds a window of at once


@attrs.frozen(order=True)
class Position:
    """Where a record stands: segment number and the frame's offset in it."""

    segment: int
    offset: int

    def __str__(self) -> str:
        return f"{self.segment}:{self.offset}"


@attrs.frozen
class Record:
    seq: int
    type: int
    payload: bytes
    position: Position


@attrs.frozen
class RecoveryReport:
    segments: int
    records: int
    bytes: int
    torn: TornTail | None = None
    broken_path: str | None = None
    indexed: int = 0  # segments whose frames the frame index vouched for (journal/_index.py)


@attrs.frozen
class Compaction:
    removed_segments: tuple[int, ...]
    copied: int
    relocated: dict[Position, Position]


def check_record(rtype: int, payload: bytes, max_record_size: int) -> None:
    """The caller's mistakes, refused before anything is written: ValueError for a type
    outside 1..255 (0 is the journal's own), RecordTooLargeError for a payload too big."""
    if not 1 <= rtype <= 255:
        raise ValueError(f"record type must be 1..255 (0 is the journal's own), got {rtype}")
    if len(payload) > max_record_size:
        raise RecordTooLargeError(
            f"record of {len(payload)} bytes over the limit of {max_record_size}"
        )


def _make_dirs(fs: FS, directory: str) -> None:
    """Create ``directory`` and any missing parents, then fsync it and every ancestor.

    A directory entry is no more durable than a file's until its parent is synced, and an
    existing directory is no proof: an earlier run may have died between its mkdir and the
    sync. So every open syncs the whole chain, a few directory fsyncs at startup.
    """
    chain = []
    path = posixpath.abspath(directory)
    while True:
        chain.append(path)
        parent = posixpath.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(chain):  # root first
        if not fs.exists(path):
            fs.mkdir(path)
    for path in chain:  # the journal directory first, then up to the root
        fs.sync_dir(path)


def _close_quietly(f: File) -> None:
    """Close a handle whose data is already synced (or no longer matters): a failing close
    changes nothing durable, so it is logged, not raised."""
    try:
        f.close()
    except OSError as exc:
        log.warning("journal: closing a file failed: %s", exc)


def _unique_path(fs: FS, path: str) -> str:
    candidate, n = path, 0
    while fs.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


class Log:
    def __init__(self, fs: FS, directory: str, segment_size: int, max_record_size: int) -> None:
        self.fs = fs
        self.directory = directory
        self.segment_size = segment_size
        self.max_record_size = max_record_size
        self._index: dict[int, SegmentScan] = {}
        self._lock = threading.Lock()  # guards _index and _relocated against readers
        self._relocated: dict[Position, Position] = {}
        self._active: File | None = None
        self._active_number = 0
        self._active_size = 0
        self._attested = 0  # durable_end of the newest sync mark in the active segment
        self._next_seq = 1
        self._poison: BaseException | None = None
        self._closed = False
        self.syncs = 0  # file fsyncs done by this log: the benchmark reads it

    # -- opening and recovery --------------------------------------------------------
    @classmethod
    def open(
        cls,
        fs: FS,
        directory: str,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
    ) -> tuple[Log, RecoveryReport]:
        """Open (creating if needed) and recover the journal in ``directory``.

        Raises ``CorruptJournalError`` without modifying anything when acknowledged bytes
        are damaged; repairs a torn tail of the newest segment (saved to ``*.broken``).
        Raises ``JournalFatalError`` when the disk fails during recovery.
        """
        try:
            return cls._open(fs, directory, segment_size, max_record_size)
        except OSError as exc:
            raise JournalFatalError(f"cannot open the journal in {directory}: {exc}") from exc

    @classmethod
    def _open(
        cls, fs: FS, directory: str, segment_size: int, max_record_size: int
    ) -> tuple[Log, RecoveryReport]:
        self = cls(fs, directory, segment_size, max_record_size)
        _make_dirs(fs, directory)
        numbers = sorted(
            n for n in (parse_segment_name(name) for name in fs.listdir(directory)) if n
        )
        index = load_index(fs, directory) if numbers else {}
        scans = [
            scan_segment(
                fs.read_file(self._path(n)),
                n,
                newest=(i == len(numbers) - 1),
                max_record_size=max_record_size,
                prefix=index.pop(n, None),
            )
            for i, n in enumerate(numbers)
        ]
        torn = scans[-1].torn if scans else None
        broken = self._repair(scans[-1]) if scans and torn is not None else None
        if scans and scans[-1].header is None:
            scans.pop()
        for scan in scans:
            self._index[scan.number] = scan
            self._next_seq = max(self._next_seq, scan.newest_seq + 1)
        if scans:
            last = scans[-1]
            self._active_number = last.number
            self._active = fs.open(self._path(last.number))
            self._active_size = last.valid_end
            self._sync(self._active)
            fs.sync_dir(directory)
        else:
            self._new_segment(numbers[-1] if numbers else 1)
        report = RecoveryReport(
            segments=len(self._index),
            records=sum(s.records for s in self._index.values()),
            bytes=sum(s.valid_end for s in self._index.values()),
            torn=torn,
            broken_path=broken,
            indexed=sum(s.indexed for s in self._index.values()),
        )
        return self, report

    def _repair(self, scan: SegmentScan) -> str:
        """Save a torn tail to ``<segment>.broken`` (durably), then cut it off (durably)."""
        assert scan.torn is not None
        path = self._path(scan.number)
        data = self.fs.read_file(path)
        broken = _unique_path(self.fs, path + ".broken")
        f = self.fs.create(broken)
        try:
            f.append(data[scan.torn.offset :])
            self._sync(f)
        finally:
            _close_quietly(f)
        if scan.header is None:
            self.fs.remove(path)
        else:
            seg = self.fs.open(path)
            try:
                seg.truncate(scan.torn.offset)
                self._sync(seg)
            finally:
                _close_quietly(seg)
        self.fs.sync_dir(self.directory)
        log.warning(
            "journal: torn tail in segment %d at offset %d (%d bytes, never acknowledged) "
            "saved to %s and truncated",
            scan.number,
            scan.torn.offset,
            scan.torn.length,
            broken,
        )
        return broken

    # -- helpers -----------------------------------------------------------------------
    def _path(self, number: int) -> str:
        return posixpath.join(self.directory, segment_name(number))

    @property
    def poisoned(self) -> bool:
        """An I/O failure poisoned the log: nothing more is written until a reopen."""
        return self._poison is not None

    def _check_usable(self) -> None:
        if self._poison is not None:
            raise JournalFatalError(
                "journal poisoned by an earlier I/O failure; restart to re-read the disk"
            ) from self._poison
        if self._closed:
            raise JournalClosedError("journal is closed")

    def _poisoned(self, exc: BaseException) -> JournalFatalError:
        self._poison = exc
        log.critical("journal: I/O failure, no more writes until restart: %s", exc)
        return JournalFatalError(f"journal write failed, durability unknown: {exc}")

    def _sync(self, f: File) -> None:
        f.sync()
        self.syncs += 1

    def _new_segment(self, number: int) -> None:
        path = self._path(number)
        f = self.fs.create(path)
        header = encode_header(SegmentHeader(number=number, first_seq=self._next_seq))
        try:
            f.append(header)
            self._sync(f)
            self.fs.sync_dir(self.directory)
        except BaseException:
            _close_quietly(f)
            raise
        old, self._active = self._active, f
        if old is not None:
            _close_quietly(old)
        scan = SegmentScan(
            number=number,
            header=SegmentHeader(number, self._next_seq),
            size=HEADER_SIZE,
            valid_end=HEADER_SIZE,
            newest_seq=self._next_seq - 1,
            crc=zlib.crc32(header),
        )
        with self._lock:
            self._index[number] = scan
        self._active_number = number
        self._active_size = HEADER_SIZE
        self._attested = 0

    # -- writing (owner thread only) -----------------------------------------------
    @property
    def active_segment(self) -> int:
        return self._active_number

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def rotate(self) -> int:
        """Seal the active segment and start the next; returns the new segment's number."""
        self._check_usable()
        number = self._active_number + 1
        try:
            self._new_segment(number)
        except OSError as exc:
            self._rotation_failed(number, exc)
        return number

    def _rotation_failed(self, number: int, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            try:
                if self.fs.exists(self._path(number)):
                    self.fs.remove(self._path(number))
                    self.fs.sync_dir(self.directory)
            except OSError as cleanup:
                raise self._poisoned(cleanup) from exc
            raise JournalFullError("no space left for a new journal segment") from exc
        raise self._poisoned(exc) from exc

    def write_batch(self, items: Sequence[tuple[int, bytes]]) -> list[Position]:
        """Append new records (type, payload) as one batch; return their positions once
        fsynced. Raises RecordTooLargeError, JournalFullError or JournalFatalError."""
        for rtype, payload in items:
            check_record(rtype, payload, self.max_record_size)
        first = self._next_seq
        return self._write([(first + i, t, p) for i, (t, p) in enumerate(items)], new=True)

    def _write(self, items: Sequence[tuple[int, int, bytes]], *, new: bool) -> list[Position]:
        self._check_usable()
        if not items:
            return []
        batch_bytes = sum(FRAME_HEADER_SIZE + len(p) for _, _, p in items)
        if self._active_size > HEADER_SIZE and self._active_size + batch_bytes > self.segment_size:
            self.rotate()
        start = self._active_size
        newest = self._next_seq - 1
        frames = [encode_mark(newest, start)]
        offsets = []
        offset = start + len(frames[0])
        for seq, rtype, payload in items:
            frame = encode_frame(seq, rtype, payload)
            frames.append(frame)
            offsets.append(offset)
            offset += len(frame)
        assert self._active is not None
        joined = b"".join(frames)
        try:
            self._active.append(joined)
        except OSError as exc:
            self._write_failed(start, exc)
        try:
            self._sync(self._active)
        except OSError as exc:
            raise self._poisoned(exc) from exc
        self._active_size = offset
        self._attested = start
        scan = self._index[self._active_number]
        with self._lock:
            for (seq, rtype, payload), off in zip(items, offsets, strict=True):
                scan.seqs.append(seq)
                scan.offsets.append(off)
                scan.lengths.append(len(payload))
                scan.types.append(rtype)
            scan.valid_end = scan.size = offset
            scan.crc = zlib.crc32(joined, scan.crc)
            scan.marks += 1  # what a scan of these bytes would count and find newest
            scan.newest_seq = max(scan.newest_seq, newest, items[-1][0] if new else 0)
        if new:
            self._next_seq = items[-1][0] + 1
        return [Position(self._active_number, off) for off in offsets]

    def _write_failed(self, start: int, exc: OSError) -> None:
        if exc.errno != errno.ENOSPC:
            raise self._poisoned(exc) from exc
        assert self._active is not None
        try:
            self._active.truncate(start)
            self._sync(self._active)
        except OSError as cleanup:
            raise self._poisoned(cleanup) from exc
        raise JournalFullError("no space left on the journal's disk; append refused") from exc

    def close(self) -> None:
        """Attest everything written with a final sync mark, then close. Idempotent."""
        if self._closed:
            return
        try:
            unattested = self._active_size > max(self._attested, HEADER_SIZE)
            if self._poison is None and self._active is not None and unattested:
                mark = encode_mark(self._next_seq - 1, self._active_size)
                try:
                    self._active.append(mark)
                    self._sync(self._active)
                except OSError as exc:
                    raise self._poisoned(exc) from exc
                self._active_size += len(mark)
                self._attested = self._active_size
                scan = self._index[self._active_number]
                with self._lock:
                    scan.valid_end = scan.size = self._active_size
                    scan.crc = zlib.crc32(mark, scan.crc)
                    scan.marks += 1
                    scan.newest_seq = max(scan.newest_seq, self._next_seq - 1)
            if self._poison is None:
                save_index(self.fs, self.directory, self._index.values())
        finally:
            self._closed = True
            if self._active is not None:
                _close_quietly(self._active)
                self._active = None

    # -- reading (any thread) --------------------------------------------------------
    def _read_frame(self, f: File, pos: Position, length: int | None) -> Record:
        found = read_frame(f.pread, pos.offset, length, self.max_record_size)
        frame, data = found if found is not None else (None, b"")
        return _record(frame, data, pos)

    def read(self, position: Position) -> Record:
        """The record at ``position`` (following a move made by the last compaction)."""
        self._check_usable()
        for _ in range(2):
            with self._lock:
                pos = self._relocated.get(position, position)
            try:
                f = self.fs.open(self._path(pos.segment))
            except FileNotFoundError:
                continue  # compacted away while we looked: the relocation is there now
            except OSError as exc:
                raise JournalReadError(f"cannot read the record at {pos}: {exc}") from exc
            try:
                return self._read_frame(f, pos, None)
            except OSError as exc:
                raise JournalReadError(f"cannot read the record at {pos}: {exc}") from exc
            finally:
                _close_quietly(f)
        raise KeyError(f"no record at {position}: its segment was compacted away")

    def records(self, first: int = 0, last: int | None = None) -> Iterator[Record]:
        """Every record, each seq once, in seq order (copies made by compaction included);
        only those whose seq is within ``first``..``last`` when given."""
        self._check_usable()
        with self._lock:
            runs = [
                segment_runs(n, s.seqs[:], s.offsets[:], s.lengths[:], first, last)
                for n, s in sorted(self._index.items())
            ]
        return self._read_sorted(heapq.merge(*runs))

    def newest_from(self, count: int) -> int:
        """The seq from which on the journal holds its newest ``count`` records (0 when it
        holds no more than that): ``records(newest_from(n))`` reads those alone."""
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            every = itertools.chain.from_iterable(s.seqs for s in self._index.values())
            newest = heapq.nlargest(count + 1, every)
        return newest[count - 1] if len(newest) > count else 0

    def _read_sorted(self, entries: Iterable[tuple[int, int, int, int]]) -> Iterator[Record]:
        """Read (seq, segment, offset, length) entries sorted by seq, each seq once: after a
        crash in compaction a record and its copy may both exist; one is enough."""
        windows: dict[int, ReadAhead] = {}
        try:
            last = 0
            for seq, segment, offset, length in entries:
                if seq == last:
                    continue
                last = seq
                try:
                    window = windows.get(segment)
                    if window is None:
                        if len(windows) >= OPEN_WINDOWS:  # the oldest opened goes
                            _close_quietly(windows.pop(next(iter(windows))).file)
                        window = windows[segment] = ReadAhead(self.fs.open(self._path(segment)))
                    data, at = window.read(offset, FRAME_HEADER_SIZE + length)
                except OSError as exc:
                    raise JournalReadError(f"reading segment {segment} failed: {exc}") from exc
                position = Position(segment, offset)
                record = _record(frame_at(data, at, self.max_record_size), data, position)
                if record.seq != seq:
                    raise CorruptJournalError(segment, offset, "record changed since it was read")
                yield record
        finally:
            for window in windows.values():
                _close_quietly(window.file)

    # -- compaction (owner thread) -------------------------------------------------
    def compact_steps(self, dead: Container[Position]) -> Generator[None, None, Compaction]:
        """Copy every record of the sealed segments that is not named ``dead`` forward, then
        delete those segments.

        The caller names what is dead, not what is live, so a record it has not heard of yet
        (its append completed, its task not yet resumed) is kept: forgetting costs disk, never
        an acknowledged record.

        A generator: each ``next()`` copies about COMPACTION_CHUNK bytes, so the owner thread
        can write waiting batches between steps. Copies keep their seq, so a crash at any point
        leaves at worst duplicates, which replay drops. Segments are removed oldest first, the
        directory fsynced after each, so a crash leaves a suffix of them: a record made dead by
        a later record never comes back without that later record.
        """
        self._check_usable()
        sealed = sorted(n for n in self._index if n != self._active_number)
        # The live records in seq order, streamed from the sealed segments' own arrays (only
        # this thread changes a sealed segment's index): a sorted list of them was ~8 MB of
        # tuples at 50,000 live records, at the moment the relay's memory peaks.
        scans = [(n, self._index[n]) for n in sealed]
        runs = [segment_runs(n, s.seqs, s.offsets, s.lengths) for n, s in scans]
        wanted = (e for e in heapq.merge(*runs) if Position(e[1], e[2]) not in dead)
        relocated: dict[Position, Position] = {}
        chunk: list[Record] = []
        size = 0
        for record in self._read_sorted(wanted):
            chunk.append(record)
            size += len(record.payload)
            if size >= COMPACTION_CHUNK:
                relocated.update(self._copy(chunk))
                chunk, size = [], 0
                yield
        relocated.update(self._copy(chunk))
        with self._lock:
            self._relocated = relocated  # shared with the caller, who only reads it
        for n in sealed:
            try:
                self.fs.remove(self._path(n))
                self.fs.sync_dir(self.directory)
            except OSError as exc:
                raise self._poisoned(exc) from exc
            with self._lock:
                del self._index[n]
        return Compaction(tuple(sealed), len(relocated), relocated)

    def _copy(self, chunk: list[Record]) -> Iterable[tuple[Position, Position]]:
        if not chunk:
            return []
        new_positions = self._write([(r.seq, r.type, r.payload) for r in chunk], new=False)
        return zip((r.position for r in chunk), new_positions, strict=True)

    def compact(self, dead: Container[Position]) -> Compaction:
        """``compact_steps`` run to the end, for callers without an owner thread."""
        steps = self.compact_steps(dead)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                result: Compaction = stop.value
                return result


def _record(frame: tuple[int, int, int, int] | None, data: bytes, pos: Position) -> Record:
    """The record of the frame ``frame_at`` found in ``data`` (read at ``pos``); a
    ``CorruptJournalError`` when it found none, or a sync mark, where a record should be."""
    if frame is None or frame[1] == MARK_TYPE:
        raise CorruptJournalError(pos.segment, pos.offset, "no valid record at this position")
    seq, rtype, start, end = frame
    return Record(seq, rtype, data[start:end], pos)
