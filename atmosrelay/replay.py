"""What a start says and shows about replaying the journal: the line naming what recovery
found, and a progress bar over the fold of a large journal on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from journal import Record, RecoveryReport

# From this many records a terminal shows the fold's progress: on this 2-core machine 50,000
# queued messages take 0.6 s to fold and about 2 s to start (the status index and the
# counters are rebuilt from the fold after it).
REPLAY_BAR_RECORDS: Final = 50_000


def progress_bar(total: int) -> Callable[[Iterator[Record]], Iterable[Record]]:
    """A progress bar over the replay's records, on standard error when it is a terminal
    and the journal is large; otherwise the records as they are. The terminal is checked
    here, not left to tqdm's ``disable=None``: a disabled bar still costs its import (30 ms
    of the start's worker thread, holding the interpreter while delivery begins) and a
    monitor thread for the life of the process."""
    if total < REPLAY_BAR_RECORDS or not sys.stderr.isatty():
        return iter

    def bar(records: Iterator[Record]) -> Iterable[Record]:
        from tqdm import tqdm  # here: its import is 30 ms, paid only for a bar drawn

        return tqdm(
            records,
            total=total,
            desc="replaying the journal",
            unit="record",
            unit_scale=True,
            disable=False,
            file=sys.stderr,
            leave=False,
        )

    return bar


def describe(directory: str, report: RecoveryReport) -> str:
    """The start's line about the journal it recovered."""
    text = (
        f"journal at {directory}: {report.segments} segment(s), {report.records} record(s), "
        f"{report.bytes} bytes"
    )
    if report.indexed:
        text += f" ({report.indexed} segment(s) checked whole by the frame index)"
    if report.torn is not None:
        text += (
            f"; repaired a torn tail in segment {report.torn.segment} at offset "
            f"{report.torn.offset} ({report.torn.length} bytes never acknowledged, "
            f"saved to {report.broken_path})"
        )
    return text
