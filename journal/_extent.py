"""Where the journal stood at one moment (an ``Extent``), and the records written since.

A caller that keeps a summary of what the records up to some moment meant (the relay's queue
checkpoint) takes an ``Extent`` when it writes the summary, and at the next open asks for
``records_since(extent)``: only the records written after it, in seq order. That is sound only
while the segments the extent names still hold exactly what they held then, so the request is
refused (``ExtentMismatch``, with the reason) when they do not:

* a segment the extent names is gone (compaction deleted it) or is another file (another
  first seq in its header);
* a segment that was sealed then has another length now, or the segment that was active then
  is shorter than it was (a torn tail was cut below the extent's end);
* a segment the extent does not name stands among the ones it names;
* a record written after the extent carries a seq the extent already covered (compaction
  copied records forward since: the summary may count them as they were before).

Every refusal leaves the caller with what it had without the summary: the whole journal. The
extent compares segment numbers, first seqs and lengths; it does not hash the bytes (a segment
is append-only and never rewritten in place; the open checks every frame's CRC anyway).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import attrs

from journal._log import Log, Record
from journal._read import segment_runs
from journal._segment import SegmentScan


@attrs.frozen
class Extent:
    """Each segment as (number, first seq in its header, end of its last record), oldest
    first, and the newest seq any of them holds."""

    segments: tuple[tuple[int, int, int], ...]
    newest_seq: int


class ExtentMismatch(ValueError):
    """The journal no longer holds what the extent saw: the text says what changed."""


def _first_seq(scan: SegmentScan) -> int:
    return scan.header.first_seq if scan.header else 0


def extent_of(log: Log) -> Extent:
    """The journal as it stands now (records a writer has not finished are not in it)."""
    with log._lock:
        scans = sorted(log._index.items())
        segments = tuple((n, _first_seq(s), s.valid_end) for n, s in scans)
        newest = max((max(s.seqs) for _, s in scans if s.seqs), default=0)
    return Extent(segments, newest)


def offsets_within(log: Log, extent: Extent) -> dict[int, list[int]]:
    """The offset of every record the extent covers, by segment, in file order (ascending;
    a duplicate left by a compaction that crashed is there under both its offsets)."""
    out: dict[int, list[int]] = {}
    with log._lock:
        for n, _, end in extent.segments:
            scan = log._index.get(n)
            if scan is None:
                raise ExtentMismatch(f"segment {n} is gone")
            offsets = [off for off in scan.offsets if off < end]
            if offsets:
                out[n] = offsets
    return out


def records_since(log: Log, extent: Extent) -> Iterator[Record]:
    """The records written after ``extent``, in seq order; ``ExtentMismatch`` (raised here,
    before anything is read) when the segments it names have changed since."""
    log._check_usable()
    named = {n: (first, end) for n, first, end in extent.segments}
    last = extent.segments[-1][0] if extent.segments else 0
    runs = []
    with log._lock:
        for n, (first, end) in named.items():
            scan = log._index.get(n)
            if scan is None:
                raise ExtentMismatch(f"segment {n} is gone (compacted or removed)")
            if _first_seq(scan) != first:
                raise ExtentMismatch(f"segment {n} is another file than the one it was")
            if scan.valid_end < end or (n != last and scan.valid_end != end):
                raise ExtentMismatch(
                    f"segment {n} ends at {scan.valid_end}, not at {end} as it did"
                )
        for n, scan in sorted(log._index.items()):
            if n < last and n not in named:
                raise ExtentMismatch(f"segment {n} appeared among the segments it saw")
            if n < last:
                continue
            end = named[n][1] if n == last else 0
            keep = [i for i in range(len(scan.offsets)) if scan.offsets[i] >= end]
            seqs = [scan.seqs[i] for i in keep]
            if any(seq <= extent.newest_seq for seq in seqs):
                raise ExtentMismatch(f"segment {n} holds records copied forward since")
            offsets = [scan.offsets[i] for i in keep]
            lengths = [scan.lengths[i] for i in keep]
            runs.append(segment_runs(n, seqs, offsets, lengths))
    return log._read_sorted(heapq.merge(*runs))
