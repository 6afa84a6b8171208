"""Reading a segment's records in order: the runs its index holds, and a window over its file.

Shared by the replay (``Log.records``), compaction and ``Journal.records_since``.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Iterator, Sequence
from typing import Final

from journal._fs import File

READ_AHEAD: Final = 1024 * 1024  # what records() reads of a segment at a time


def segment_runs(
    segment: int,
    seqs: Sequence[int],
    offsets: Sequence[int],
    lengths: Sequence[int],
    first: int = 0,
    last: int | None = None,
) -> Iterator[tuple[int, int, int, int]]:
    """A segment's records as one sorted stream (it holds a few sorted runs: copies, new);
    only those whose seq is within ``first``..``last``, found by bisection in each run."""
    starts = [0] + [i for i in range(1, len(seqs)) if seqs[i] <= seqs[i - 1]] + [len(seqs)]
    streams = []
    for a, b in itertools.pairwise(starts):
        lo = bisect.bisect_left(seqs, first, a, b) if first else a
        hi = b if last is None else bisect.bisect_right(seqs, last, lo, b)
        if lo < hi:
            streams.append((seqs[i], segment, offsets[i], lengths[i]) for i in range(lo, hi))
    return heapq.merge(*streams)


class ReadAhead:
    """Reads of one segment's file in ascending order, served from a window of READ_AHEAD
    bytes: the replay of 100,000 records made 100,000 system calls, one a record. A read the
    window does not hold moves the window there; a read larger than the window goes to the
    file."""

    def __init__(self, file: File) -> None:
        self.file = file
        self._start = 0
        self._data = b""

    def read(self, offset: int, size: int) -> tuple[bytes, int]:
        """Bytes holding ``size`` bytes at ``offset`` (fewer at the end of the file), and
        where in them ``offset`` is."""
        at = offset - self._start
        if at >= 0 and at + size <= len(self._data):
            return self._data, at
        if size >= READ_AHEAD:
            return self.file.pread(offset, size), 0
        self._start, self._data = offset, self.file.pread(offset, READ_AHEAD)
        return self._data, 0
