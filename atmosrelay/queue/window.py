"""A start after ``kill -9`` delivers before its queue is whole: from the journal's newest
records.

A clean stop leaves the queue checkpoint, and the next start delivers from its first part
while the rest is decoded (queue/checkpoint.py). After ``kill -9`` there is no checkpoint, or
one with records written since, and those may concern any message: until every record is
read, no message is known to be still undelivered. Folding 100,000 queued messages takes
1.4-1.8 s on the development VM, and delivery waited for all of it.

It need not wait for all of it. Records are folded in seq order, and every record about a
message comes after the message's ACCEPTED record: its outcomes, a DSN reporting on it, its
deletion (compaction copies a record with its seq). So a message whose ACCEPTED record is
among the journal's newest ``WINDOW`` records has every record about it in that window, and
a fold of the window alone leaves it exactly as the fold of the whole journal does. The start
folds that window (``newest``: a few tens of milliseconds), keeps up to ``EARLY`` of the
messages it accepted that were never tried (like the checkpoint's first part: they owe no
DSN, carry no retry to spread, and the policy counts them before the first attempt), and
delivery starts on them.

The whole fold then runs in a worker thread, up to the seq the journal ended at when the
start began (``last``): every later record is one this start appended and applied itself.
``merge`` adds what the fold found beside the early messages; those stay as this start has
kept them since. The end is the state a fold of the whole journal makes, which the queue
checkpoint's property test checks for journals of every shape, staged this way too.

When the window holds the whole journal, its fold is the whole fold: nothing is staged. While
the rest is folded only delivery runs: the listeners, the control socket, the inbound
processor and compaction start when the queue is whole (runtime.py), so nothing but the
early messages' own deliveries and DSNs is appended meanwhile.
"""

from __future__ import annotations

from typing import Final

from atmosrelay.queue.state import QueuedMessage, QueueState, fold
from journal import Journal

WINDOW: Final = 1_000  # the newest records folded before delivery starts: 15-30 ms
# At most this many of their messages delivered meanwhile: enough to start on, few enough
# that their signing and sending leave the cores to the whole fold (2,000 of them made the
# queue whole 1 s later than 200 did, with 100,000 queued; the first delivery was no sooner).
EARLY: Final = 200


def newest(
    journal: Journal, window: int = WINDOW, early: int = EARLY
) -> tuple[QueueState, int | None]:
    """Up to ``early`` never-tried messages accepted among the journal's newest ``window``
    records (the first accepted first), as the whole fold holds them, and the seq the
    journal ends at (the whole fold stops there); or, when the window is the whole journal,
    its whole fold and None. Blocking."""
    first = journal.newest_from(window)
    last = journal.extent().newest_seq
    scratch = fold(journal.records(first, last))
    if first == 0:
        return scratch, None
    start = QueueState()
    for m in scratch.messages.values():
        if len(start.messages) == early:
            break
        if not m.history and not m.next_at:
            start.messages[m.id] = m
    return start, last


def merge(live: QueueState, whole: QueueState) -> list[QueuedMessage]:
    """Bring into ``live`` (the early messages, and what this start has applied to them
    since) what ``whole`` (the fold up to ``last``) knows besides them; the messages it
    holds that ``live`` does not, in the fold's order, for the caller to add and schedule."""
    live.graveyard |= whole.graveyard
    for reported, positions in whole.kept.items():
        live.kept[reported] = (*positions, *live.kept.get(reported, ()))
    for inbound_id, pending in whole.inbound.items():
        live.inbound.setdefault(inbound_id, pending)
    live.unknown_records += whole.unknown_records
    live.orphan_outcomes += whole.orphan_outcomes
    return [m for q, m in whole.messages.items() if q not in live.messages]
