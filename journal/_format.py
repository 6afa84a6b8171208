"""The on-disk format of the journal: segment headers and frames.

FROZEN FORMAT (version 1). Changing anything below needs a new FORMAT_VERSION and a reader
for the old one.

A journal is a directory of segments named ``NNNNNNNNNNNNNNNN.seg`` (16 decimal digits, the
segment number). A segment is a header followed by frames, nothing else::

    segment header, 32 bytes, little-endian
    +---------+-----------+-----------+-----------+--------+
    | magic   | version   | number    | first_seq | crc32  |
    | 8 bytes | u32       | u64       | u64       | u32    |
    +---------+-----------+-----------+-----------+--------+
    magic = b"ATMOSJNL"; crc32 over the 28 bytes before it.

    frame, 17-byte header then the payload
    +--------+--------+-------+------+------------------+
    | length | crc32  | seq   | type | payload          |
    | u32    | u32    | u64   | u8   | `length` bytes   |
    +--------+--------+-------+------+------------------+
    crc32 (zlib) over seq | type | payload.

``number`` in the header must match the file name, so a segment file renamed or reused under
another number never passes as current data. ``first_seq`` is the first sequence number that a
*new* record in this segment may carry; every new record's ``seq`` is strictly greater than the
one before it in the same segment. A record whose ``seq`` is below ``first_seq`` is a copy that
compaction carried forward from an older segment; it keeps its original ``seq`` (a record's
identity), which is why replay orders by ``seq`` and drops duplicates.

Type 0 is the *sync mark*, internal to the journal: the writer begins every batch with one.
Its payload is a u64 ``durable_end``: the offset in this segment up to which every byte had been
fsynced before the mark was written; its ``seq`` is the newest sequence number those bytes held.
Recovery uses marks to tell a torn tail (bytes that were never acknowledged) from corruption
of bytes that had been acknowledged (see ``_segment.py``). Types 1..255 belong to the caller.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Final

import attrs

from journal.errors import CorruptJournalError

MAGIC: Final = b"ATMOSJNL"
FORMAT_VERSION: Final = 1

_HEADER: Final = struct.Struct("<8sIQQ")  # magic, version, number, first_seq
_HEADER_CRC: Final = struct.Struct("<I")
HEADER_SIZE: Final = _HEADER.size + _HEADER_CRC.size  # 32

_FRAME: Final = struct.Struct("<IIQB")  # length, crc, seq, type
_FRAME_TAIL: Final = struct.Struct("<QB")  # seq, type: the part of the header the CRC covers
FRAME_HEADER_SIZE: Final = _FRAME.size  # 17
frame_header: Final = _FRAME.unpack_from  # (length, crc, seq, type) at an offset

MARK_TYPE: Final = 0
_MARK_PAYLOAD: Final = struct.Struct("<Q")
MARK_SIZE: Final = FRAME_HEADER_SIZE + _MARK_PAYLOAD.size  # 25
# The length field of a mark, as it appears on disk: recovery searches for it.
MARK_LENGTH_BYTES: Final = struct.pack("<I", _MARK_PAYLOAD.size)

MAX_SEQ: Final = 2**63 - 1

SEGMENT_SUFFIX: Final = ".seg"


def segment_name(number: int) -> str:
    return f"{number:016d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The segment number of a file name, or None when the name is not a segment's."""
    stem, dot, suffix = name.partition(".")
    if dot and "." + suffix == SEGMENT_SUFFIX and len(stem) == 16 and stem.isdigit():
        return int(stem)
    return None


@attrs.frozen
class SegmentHeader:
    number: int
    first_seq: int


def encode_header(header: SegmentHeader) -> bytes:
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, header.number, header.first_seq)
    return body + _HEADER_CRC.pack(zlib.crc32(body))


def decode_header(data: bytes | memoryview, *, expect_number: int) -> SegmentHeader:
    """Decode a segment header; raise CorruptJournalError(segment, 0) when it is not one."""
    if len(data) < HEADER_SIZE:
        raise CorruptJournalError(expect_number, 0, "segment shorter than its header")
    body = bytes(data[: _HEADER.size])
    (crc,) = _HEADER_CRC.unpack_from(data, _HEADER.size)
    magic, version, number, first_seq = _HEADER.unpack(body)
    if magic != MAGIC:
        raise CorruptJournalError(expect_number, 0, "bad magic: not a journal segment")
    if zlib.crc32(body) != crc:
        raise CorruptJournalError(expect_number, 0, "segment header checksum mismatch")
    if version != FORMAT_VERSION:
        raise CorruptJournalError(
            expect_number, 0, f"format version {version}, this build reads {FORMAT_VERSION}"
        )
    if number != expect_number:
        raise CorruptJournalError(
            expect_number, 0, f"header names segment {number}, file name says {expect_number}"
        )
    return SegmentHeader(number=number, first_seq=first_seq)


def encode_frame(seq: int, rtype: int, payload: bytes | memoryview) -> bytes:
    tail = _FRAME_TAIL.pack(seq, rtype)
    crc = zlib.crc32(payload, zlib.crc32(tail))
    return _FRAME.pack(len(payload), crc, seq, rtype) + payload


def encode_mark(newest_seq: int, durable_end: int) -> bytes:
    return encode_frame(newest_seq, MARK_TYPE, _MARK_PAYLOAD.pack(durable_end))


def decode_mark(payload: bytes | memoryview) -> int:
    (durable_end,) = _MARK_PAYLOAD.unpack(payload)
    return int(durable_end)


@attrs.frozen
class Frame:
    offset: int
    seq: int
    type: int
    payload_offset: int
    length: int

    @property
    def end(self) -> int:
        return self.payload_offset + self.length


def frame_at(
    data: bytes | memoryview, offset: int, max_length: int
) -> tuple[int, int, int, int] | None:
    """(seq, type, payload start, payload end) of the frame at ``offset`` if it is whole and
    its checksum holds, else None.

    None covers every way a frame can be bad (short header, length beyond the data or beyond
    ``max_length``, checksum mismatch); the caller decides whether that is a torn tail or
    corruption, because only the caller knows what follows. A tuple, not a ``Frame``: the
    scan at open and the replay call this once per record, 100,000 times for a deep queue.
    """
    if offset + FRAME_HEADER_SIZE > len(data):
        return None
    length, crc, seq, rtype = _FRAME.unpack_from(data, offset)
    start = offset + FRAME_HEADER_SIZE
    end = start + length
    if length > max_length or end > len(data):
        return None
    view = memoryview(data)
    if zlib.crc32(view[start:end], zlib.crc32(view[offset + 8 : start])) != crc:
        return None
    return seq, rtype, start, end


def decode_frame(data: bytes | memoryview, offset: int, max_length: int) -> Frame | None:
    """``frame_at`` as a ``Frame``."""
    found = frame_at(data, offset, max_length)
    if found is None:
        return None
    seq, rtype, start, end = found
    return Frame(offset=offset, seq=seq, type=rtype, payload_offset=start, length=end - start)


def read_frame(
    pread: Callable[[int, int], bytes], offset: int, length: int | None, max_length: int
) -> tuple[tuple[int, int, int, int], bytes] | None:
    """``frame_at`` for the frame at ``offset`` of a file read through ``pread(offset,
    size)``, and the bytes read (its length taken from its header unless given); None when
    it is not whole or its checksum fails. The owner's reads and a read-only reader's
    (``read_at``) share it."""
    if length is None:
        head = pread(offset, FRAME_HEADER_SIZE)
        if len(head) < FRAME_HEADER_SIZE:
            return None
        length = int.from_bytes(head[:4], "little")
    data = pread(offset, FRAME_HEADER_SIZE + min(length, max_length))
    found = frame_at(data, 0, max_length)
    return None if found is None else (found, data)
