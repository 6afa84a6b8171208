"""The queue checkpoint: the folded queue, written at a clean stop, read at the next start.

A start folds every record of the journal into the queue state (queue/state.py). With
100,000 messages queued that reads and checks every body (132 MB) a second time after the
journal's open did, and decodes every head: 1.2-2 s of the start. A relay that stops cleanly
writes what its fold holds to ``<data_dir>/queue.checkpoint``, with the journal's ``Extent``
(where it stood); the next start decodes that file instead and folds only the records
written since (``Journal.records_since``). A restart after ``kill -9`` uses it too, as long
as it still matches: the records the killed run wrote are all in the journal after the
extent.

Why it cannot lose mail. The checkpoint is a cache of a fold, never the only copy of
anything: the journal keeps every record, and a start that cannot use the checkpoint folds
the whole journal as before, saying why. It is not used when

* its bytes fail their CRC or length, or it was written by another checkpoint layout or
  ``CHECKPOINT_VERSION`` (a change to what the fold keeps must bump it);
* the journal has changed under it (compaction deleted or copied records, a torn tail was
  cut below it, another journal was put in place: journal/_extent.py);

and it is not written when the state held in memory is not exactly the fold of the journal's
records: the relay's state is updated by each task after its append completes, and an append
whose task was cancelled at shutdown may be durable without the state having heard of it
(journal/_journal.py, ``append``). So before writing, every position the state knows is
compared with every record position the journal holds up to the extent; one missing or one
extra and the checkpoint is skipped (the old one, if any, stays: it and the records after it
are still the whole truth). A record type this build does not know is also a reason to skip.

The file: ``MAGIC | u32 CRC-32 of the body | u64 body length | body``, the body msgpack
(msgspec) of ``_Checkpoint``. Written to a temporary name, fsynced, renamed, directory
fsynced: a crash leaves the old file or the new one whole, and the CRC catches the rest.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Final

import msgspec

from atmosrelay.queue.records import (
    Accepted,
    Delivery,
    RecipientState,
    RecordError,
    decode_inbound,
    encode_inbound,
    settle_accepted,
    settle_delivery,
)
from atmosrelay.queue.state import NOTHING_YET, PendingInbound, QueuedMessage, QueueState, fold
from journal import FS, Extent, ExtentMismatch, Journal, Position, Record, replace_file

CHECKPOINT_NAME: Final = "queue.checkpoint"
# Bump when the fold keeps something new or keeps it differently (queue/state.py): a
# checkpoint of another version is not used.
CHECKPOINT_VERSION: Final = 1
MAGIC: Final = b"ATMOSQCP"
_HEAD: Final = struct.Struct("<8sIQ")


class _Message(msgspec.Struct, array_like=True):
    record: Accepted
    positions: Annotated[tuple[tuple[int, int], ...], msgspec.Meta(min_length=1)]
    body_offset: int
    states: dict[str, RecipientState]
    next_at: dict[str, float]
    history: tuple[Delivery, ...]
    dsn_covered: tuple[str, ...]
    delay_covered: tuple[str, ...]


class _Inbound(msgspec.Struct, array_like=True):
    head: bytes  # the INBOUND record's payload without the message: its codec, reused
    position: tuple[int, int]
    body_offset: int


class _Checkpoint(msgspec.Struct, array_like=True):
    version: int
    layout: str  # a digest of this file's schema: another build's layout is not read
    written_at: float
    segments: tuple[tuple[int, int, int], ...]  # the journal's Extent
    newest_seq: int
    messages: list[_Message]
    graveyard: list[tuple[int, int]]
    inbound: list[_Inbound]
    kept: dict[str, tuple[tuple[int, int], ...]]
    orphan_outcomes: int


LAYOUT: Final = hashlib.sha256(msgspec.json.encode(msgspec.json.schema(_Checkpoint))).hexdigest()
_DECODER: Final = msgspec.msgpack.Decoder(_Checkpoint)


class CheckpointUnusable(Exception):
    """The checkpoint cannot stand in for the fold; the text says why."""


def _pos(p: Position) -> tuple[int, int]:
    return (p.segment, p.offset)


def unapplied(state: QueueState, journal_offsets: dict[int, list[int]]) -> str | None:
    """Why ``state`` is not exactly the fold of the records at ``journal_offsets`` (the
    journal up to an extent, by segment), or None when it is: every record applied, nothing
    else. Compared as sorted offsets per segment: sets of 100,000 positions took ten times
    as long, at a stop."""
    if state.unknown_records:
        return f"the journal holds {state.unknown_records} record(s) of types unknown here"
    held: dict[int, list[int]] = collections.defaultdict(list)
    every = itertools.chain(
        state.graveyard,
        itertools.chain.from_iterable(m.positions for m in state.messages.values()),
        (p.position for p in state.inbound.values()),
        itertools.chain.from_iterable(state.kept.values()),
    )
    for p in every:
        held[p.segment].append(p.offset)
    for offsets in held.values():
        offsets.sort()
    if held == journal_offsets:
        return None
    ours = collections.Counter((n, o) for n, offsets in held.items() for o in offsets)
    theirs = collections.Counter((n, o) for n, offsets in journal_offsets.items() for o in offsets)
    return (
        f"the queue in memory is not the journal's fold ({(theirs - ours).total()} record(s) "
        f"not applied, {(ours - theirs).total()} position(s) not in the journal)"
    )


def _message(m: QueuedMessage) -> _Message:
    # the common case spelled out (one position, nothing deferred or covered): a third of
    # the time of the general one, for 100,000 messages at a stop
    ps = m.positions
    return _Message(
        m.record,
        ((ps[0].segment, ps[0].offset),) if len(ps) == 1 else tuple(map(_pos, ps)),
        m.body_offset,
        m.recipient_states,
        dict(m.next_at) if m.next_at else {},
        m.history,
        tuple(sorted(m.dsn_covered)) if m.dsn_covered else (),
        tuple(sorted(m.delay_covered)) if m.delay_covered else (),
    )


def encode(state: QueueState, extent: Extent, now: float) -> bytes:
    """The checkpoint file's bytes for ``state`` as of ``extent``."""
    body = msgspec.msgpack.encode(
        _Checkpoint(
            version=CHECKPOINT_VERSION,
            layout=LAYOUT,
            written_at=now,
            segments=extent.segments,
            newest_seq=extent.newest_seq,
            messages=[_message(m) for m in state.messages.values()],
            graveyard=sorted(map(_pos, state.graveyard)),
            inbound=[
                _Inbound(encode_inbound(p.record, b""), _pos(p.position), p.body_offset)
                for p in state.inbound.values()
            ],
            kept={q: tuple(map(_pos, ps)) for q, ps in state.kept.items()},
            orphan_outcomes=state.orphan_outcomes,
        )
    )
    return _HEAD.pack(MAGIC, zlib.crc32(body), len(body)) + body


def decode(data: bytes) -> tuple[QueueState, Extent, float]:
    """The state, the extent it is the fold of, and when it was written;
    ``CheckpointUnusable`` for bytes that are not a whole checkpoint of this layout."""
    if len(data) < _HEAD.size:
        raise CheckpointUnusable("it is shorter than its header")
    magic, crc, length = _HEAD.unpack_from(data)
    body = memoryview(data)[_HEAD.size :]
    if magic != MAGIC:
        raise CheckpointUnusable("it is not a queue checkpoint")
    if len(body) != length or zlib.crc32(body) != crc:
        raise CheckpointUnusable("its length or checksum is wrong")
    try:
        cp = _DECODER.decode(body)
    except msgspec.DecodeError:
        raise CheckpointUnusable("it was written by another version") from None
    if cp.version != CHECKPOINT_VERSION or cp.layout != LAYOUT:
        raise CheckpointUnusable("it was written by another version")
    state = QueueState(orphan_outcomes=cp.orphan_outcomes)
    state.graveyard = {Position(*p) for p in cp.graveyard}
    state.kept = {q: tuple(Position(*p) for p in ps) for q, ps in cp.kept.items()}
    messages, at = state.messages, Position
    for m in cp.messages:  # 100,000 times for a deep queue: the common case spelled out
        record = settle_accepted(m.record)
        ps, history = m.positions, m.history
        msg = QueuedMessage(
            record,
            (at(*ps[0]),) if len(ps) == 1 else tuple([at(*p) for p in ps]),
            m.body_offset,
            m.states,
            m.next_at or NOTHING_YET,
            tuple(map(settle_delivery, history)) if history else (),
        )
        if m.dsn_covered:
            msg.dsn_covered = frozenset(m.dsn_covered)
        if m.delay_covered:
            msg.delay_covered = frozenset(m.delay_covered)
        messages[record.id] = msg
    for i in cp.inbound:
        inbound, _ = decode_inbound(i.head)
        state.inbound[inbound.id] = PendingInbound(inbound, Position(*i.position), i.body_offset)
    return state, Extent(cp.segments, cp.newest_seq), cp.written_at


def save(fs: FS, path: str, state: QueueState, journal: Journal) -> str:
    """Write the checkpoint of ``state`` if it is exactly the fold of ``journal`` (the relay
    has stopped appending); the line a stop says about it."""
    started = time.monotonic()
    extent = journal.extent()
    reason = unapplied(state, journal.offsets(extent))
    if reason is not None:
        return f"queue checkpoint not written: {reason}; the next start folds the journal"
    data = encode(state, extent, time.time())
    try:
        replace_file(fs, path, [data], durable=True)
    except OSError as exc:  # a cache: the next start folds the journal instead
        return (
            f"queue checkpoint not written: {exc.strerror or exc}; the next start folds the journal"
        )
    return (
        f"queue checkpoint: {len(state.messages)} message(s) written in "
        f"{time.monotonic() - started:.2f} s"
    )


def recover(
    fs: FS,
    path: str,
    journal: Journal,
    progress: Callable[[Iterator[Record]], Iterable[Record]],
) -> tuple[QueueState, str]:
    """The queue folded from the checkpoint and the records since, or from the whole journal
    when there is no usable checkpoint; and the words for how (blocking: a worker thread)."""
    how = ""
    if fs.exists(path):
        try:
            state, extent, written_at = decode(fs.read_file(path))
            tail = journal.records_since(extent)
        except (CheckpointUnusable, ExtentMismatch, RecordError) as exc:
            how = f"; the queue checkpoint was not used ({exc}): the whole journal was folded"
        except OSError as exc:
            how = (
                f"; the queue checkpoint could not be read ({exc.strerror}): "
                "the whole journal was folded"
            )
        else:
            replayed = 0
            for record in tail:
                state.apply(record)
                replayed += 1
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(written_at))
            return state, f" from the checkpoint of {stamp} and {replayed} record(s) since"
    return fold(progress(journal.records())), how
