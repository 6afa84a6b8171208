"""Counts per key in time buckets, with sliding-window totals in amortised O(1).

A key is a string such as ``rcpt|did:plc:...`` (recipients a member sent) or
``sent|example.org``. Counts fall into buckets of ``bucket`` seconds (60 by default) and a
window of ``span`` seconds ending at ``now`` counts every bucket any part of which lies in
it: a send is counted for up to one bucket longer than the window, never shorter. So the
limits hold in every exact window (the property test checks it), and a member waits at most
one bucket longer than strictly needed.

Each series keeps, for each window span it was asked about, where the window starts and its
sum; ``now`` only moves forward there, so a total costs what fell out since the last call.
A clock that steps back is taken as not having moved (a window never grows back).

What is added is also kept as *unflushed* deltas, keyed by (key, bucket start), for the
store (``take_unflushed``); counts loaded from the store (``load``) are not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

DEFAULT_BUCKET: Final = 60.0
KEEP: Final = 8 * 86400.0  # the longest history a rule reads (velocity: 7 days) and a margin
# What the account store keeps of the counters: /member/deliverability reads 14 days back.
STORE_KEEP: Final = 30 * 86400.0


class _Series:
    __slots__ = ("counts", "starts", "windows")

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.counts: list[int] = []
        self.windows: dict[float, list[float]] = {}  # span -> [first index, sum, last now]


class Counters:
    def __init__(self, bucket: float = DEFAULT_BUCKET, keep: float = KEEP) -> None:
        self.bucket = bucket
        self.keep = keep
        self._series: dict[str, _Series] = {}
        self._unflushed: dict[tuple[str, float], int] = {}
        self._memo: dict[str, tuple[tuple[str, float, float], int]] = {}

    def _start(self, now: float) -> float:
        return (now // self.bucket) * self.bucket

    def add(self, key: str, now: float, n: int = 1) -> None:
        """Count ``n`` at ``now`` (``n`` may be negative: a refund of a reservation that was
        never used)."""
        if n == 0:
            return
        self._bump(key, self._start(now), n)
        slot = (key, self._start(now))
        self._unflushed[slot] = self._unflushed.get(slot, 0) + n

    def add_many(self, counts: Iterable[tuple[str, float, int]]) -> None:
        """``add`` each (key, now, n), summed per bucket first: the recount at a start adds
        one per queued message, and 100,000 of them fall in a few hundred buckets."""
        slots: dict[tuple[str, float], int] = {}
        bucket = self.bucket  # ``_start`` inline: 100,000 calls at a deep queue's restart
        for key, now, n in counts:
            slot = (key, (now // bucket) * bucket)
            slots[slot] = slots.get(slot, 0) + n
        for slot in sorted(slots, key=lambda s: s[1]):  # oldest first: appends, no inserts
            n = slots[slot]
            if n:
                self._bump(slot[0], slot[1], n)
                self._unflushed[slot] = self._unflushed.get(slot, 0) + n

    def load(self, key: str, bucket_start: float, n: int) -> None:
        """A count read back from the store (not flushed again)."""
        self._bump(key, self._start(bucket_start), n)

    def _bump(self, key: str, start: float, n: int) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        if series.starts and series.starts[-1] == start:
            series.counts[-1] += n
            for window in series.windows.values():
                if window[0] < len(series.starts):
                    window[1] += n
            return
        if not series.starts or series.starts[-1] < start:
            series.starts.append(start)
            series.counts.append(n)
            for window in series.windows.values():
                window[1] += n
            self._prune(series)
            return
        # out of order (loading history, or a clock that stepped back): insert, recount
        i = 0
        while i < len(series.starts) and series.starts[i] < start:
            i += 1
        if i < len(series.starts) and series.starts[i] == start:
            series.counts[i] += n
        else:
            series.starts.insert(i, start)
            series.counts.insert(i, n)
        series.windows.clear()

    def _prune(self, series: _Series) -> None:
        """Drop buckets older than ``keep`` once they are a good share of the series."""
        cutoff = series.starts[-1] - self.keep
        if series.starts[0] >= cutoff or len(series.starts) < 64:
            return
        drop = 0
        while drop < len(series.starts) and series.starts[drop] < cutoff:
            drop += 1
        if drop * 4 < len(series.starts):
            return
        del series.starts[:drop]
        del series.counts[:drop]
        for window in series.windows.values():
            if window[0] < drop:  # a window longer than keep: recount next time
                series.windows.clear()
                return
            window[0] -= drop

    def total(self, key: str, now: float, span: float) -> int:
        """Everything counted in the window of ``span`` seconds ending at ``now``."""
        series = self._series.get(key)
        if series is None:
            return 0
        window = series.windows.get(span)
        if window is None:
            window = series.windows[span] = [0, float(sum(series.counts)), now]
        elif now < window[2]:
            now = window[2]
        window[2] = now
        edge = now - span
        i, starts, counts, bucket = int(window[0]), series.starts, series.counts, self.bucket
        while i < len(starts) and starts[i] + bucket <= edge:
            window[1] -= counts[i]
            i += 1
        window[0] = i
        return int(window[1])

    def frees_at(self, key: str, now: float, span: float, limit: int, n: int) -> float | None:
        """When ``n`` more fit under ``limit`` in the window (``now`` if they fit already);
        None when they never will (``n`` alone is over the limit)."""
        if n > limit:
            return None
        excess = self.total(key, now, span) + n - limit
        if excess <= 0:
            return now
        series = self._series[key]
        i = int(series.windows[span][0])
        while i < len(series.starts):
            excess -= series.counts[i]
            if excess <= 0:
                return series.starts[i] + self.bucket + span
            i += 1
        return now + span  # only negative refunds could bring us here

    def between(self, key: str, start: float, end: float, *, memo: bool = False) -> int:
        """The counts of buckets wholly inside [start, end) (for long looks back). With
        ``memo`` the answer is reused until ``end`` reaches the next bucket (the velocity
        rule asks on every message of a busy member; the week behind it moves by minutes)."""
        series = self._series.get(key)
        if series is None:
            return 0
        b = self.bucket
        slot = (key, float(-(-start // b)), float(end // b))  # which buckets qualify
        if memo and self._memo.get(key, (None, 0))[0] == slot:
            return self._memo[key][1]
        total = sum(
            c
            for s, c in zip(series.starts, series.counts, strict=True)
            if s >= start and s + self.bucket <= end
        )
        if memo:
            self._memo[key] = (slot, total)
        return total

    def keys(self) -> list[str]:
        return list(self._series)

    def take_unflushed(self) -> dict[tuple[str, float], int]:
        """The deltas added since the last call, for the store; forgets them here."""
        out, self._unflushed = self._unflushed, {}
        return {k: v for k, v in out.items() if v}

    def restore_unflushed(self, deltas: dict[tuple[str, float], int]) -> None:
        """Deltas a failed flush could not write: keep them for the next one."""
        for slot, n in deltas.items():
            self._unflushed[slot] = self._unflushed.get(slot, 0) + n
