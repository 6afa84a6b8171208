"""The frame index: what the journal knew of each segment's frames when it last wrote it down,
so that the next open checks a segment's bytes with one CRC instead of frame by frame.

Every open reads every segment and checks every frame (``scan_segment``), one frame at a
time in Python: 0.3 s of a start for 100,000 records, before anything is served. The index
file (``frames.index`` in the journal's directory) holds, for each segment, the length of
a prefix of it, the CRC-32 of those bytes, and the frames in them as the scan indexes them
(seqs, offsets, lengths, types, and the scan's running state at that point). An open that
finds a segment's first bytes with the CRC of its entry takes the entry for them and scans
only the bytes after; a CRC-32 of 64 MB is one call into zlib, 30 ms, and lets other threads
run.

Why it cannot hide damage or invent a record:

* the entry is used only when the file's bytes are the bytes it was made from (their
  CRC-32 matches); a scan is a function of the bytes, so it would find what the entry holds
  (``tests/journal/test_state_machine.py`` compares an indexed open with a full scan, field
  by field, over random histories with crashes; ``tests/journal/test_index.py`` damages
  segments under a valid index). Damage anywhere in the prefix changes the
  CRC, and the segment is scanned frame by frame as before, which names the damaged frame
  (guarantee 3 of docs/journal.md holds unchanged; CRC-32 misses a random change with the
  same 2^-32 as each frame's own CRC);
* an entry whose frames are longer than this open's ``max_record_size`` is not used (the
  scan would refuse them);
* the file is a cache: written under a temporary name, then renamed, never fsynced. A torn
  or half-written file fails its own CRC, an entry of a segment since compacted away names
  no file, a stale one fails the segment's CRC, and each is then simply not used. A failure
  to write it is logged and changes nothing: it never poisons the journal.

It is written at a clean close, from the journal's own index of its segments, which the
writer keeps with each batch together with the CRC of the bytes so far. Segments only grow
until compaction deletes them, so after a ``kill -9`` the entries of the last clean close
still cover what the segments held then, and only what was written since is scanned.
It is not also written at each rotation: a compaction rotates often, and each time the whole
index would be written again.
"""

from __future__ import annotations

import logging
import posixpath
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from typing import Final

from journal._fs import FS, replace_file
from journal._segment import SegmentScan

log = logging.getLogger("journal")

INDEX_NAME: Final = "frames.index"
_MAGIC: Final = b"ATMOSJIX"
_VERSION: Final = 1
# After the entries: their count, their bytes, their CRC-32, the version, the magic. At the
# end, so the file is written an entry at a time (the whole of it is ~25 bytes a record, and
# is never held in memory at once).
_TAIL: Final = struct.Struct("<QQII8s")
# number, end, crc, newest_seq, marks, records; then the arrays: seqs, offsets, lengths (u64
# each, little-endian) and types (a byte each)
_ENTRY: Final = struct.Struct("<QQIQQQ")


def _little(a: array[int]) -> array[int]:
    """``a`` in little-endian order (the file's), copied only on a big-endian machine."""
    if sys.byteorder == "little":
        return a
    b = array(a.typecode, a)
    b.byteswap()
    return b


def encode_index(scans: Iterable[SegmentScan]) -> Iterator[bytes]:
    """The index of ``scans`` (each as far as its ``valid_end``, whose CRC is its ``crc``),
    in pieces: one segment's at a time, then the tail."""
    count = length = crc = 0
    for s in scans:
        entry = _ENTRY.pack(s.number, s.valid_end, s.crc, s.newest_seq, s.marks, s.records)
        arrays = (_little(a).tobytes() for a in (s.seqs, s.offsets, s.lengths))
        for part in (entry, *arrays, bytes(s.types)):
            crc = zlib.crc32(part, crc)
            length += len(part)
            yield part
        count += 1
    yield _TAIL.pack(count, length, crc, _VERSION, _MAGIC)


def _array(data: memoryview, at: int, n: int) -> array[int]:
    a = array("Q")
    a.frombytes(data[at : at + 8 * n])
    if sys.byteorder != "little":
        a.byteswap()
    return a


def decode_index(data: bytes) -> dict[int, SegmentScan]:
    """The scans of the segments' prefixes it holds, by segment number (``header`` None:
    the open decodes it again from the file); ValueError when the bytes are not a whole
    index."""
    if len(data) < _TAIL.size:
        raise ValueError("shorter than its tail")
    count, length, crc, version, magic = _TAIL.unpack_from(data, len(data) - _TAIL.size)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError("not a frame index of this version")
    body = memoryview(data)[: len(data) - _TAIL.size]
    if len(body) != length or zlib.crc32(body) != crc:
        raise ValueError("its length or checksum is wrong")
    at, out = 0, {}
    for _ in range(count):
        number, end, ecrc, newest, marks, n = _ENTRY.unpack_from(body, at)
        at += _ENTRY.size
        seqs = _array(body, at, n)
        offsets = _array(body, at + 8 * n, n)
        lengths = _array(body, at + 16 * n, n)
        types = bytearray(body[at + 24 * n : at + 25 * n])
        at += 25 * n
        out[number] = SegmentScan(
            number, None, end, end, seqs, offsets, lengths, types, marks, newest, crc=ecrc
        )
    if at != len(body):
        raise ValueError("its entries do not fill it")
    return out


def load_index(fs: FS, directory: str) -> dict[int, SegmentScan]:
    """The index in ``directory``, or nothing when it is absent, unreadable or not whole:
    every segment is then scanned frame by frame."""
    path = posixpath.join(directory, INDEX_NAME)
    try:
        if not fs.exists(path):
            return {}
        return decode_index(fs.read_file(path))
    except (OSError, ValueError, struct.error) as exc:
        log.info("journal: frame index not used (%s); every frame is checked", exc)
        return {}


def save_index(fs: FS, directory: str, scans: Iterable[SegmentScan]) -> None:
    """Write the index (best effort: it is a cache, see the module's docstring)."""
    try:
        replace_file(fs, posixpath.join(directory, INDEX_NAME), encode_index(scans), durable=False)
    except OSError as exc:
        log.warning("journal: frame index not written (%s); the next open checks every frame", exc)
