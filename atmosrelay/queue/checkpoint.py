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
records: an ACCEPTED record reaches the state from the journal's callback the moment it is
durable (queue/store.py), but every other record is applied by the task that appended it,
after its append completes, and an append whose task was cancelled at shutdown (a delivery's
outcomes) may be durable without the state having heard of it (journal/_journal.py). So
before writing, every position the state knows is compared with every record position the
journal holds up to the extent; one missing or one extra and the checkpoint is skipped (the
old one, if any, stays: it and the records after it are still the whole truth). A record
type this build does not know is also a reason to skip.

Delivery starts before the whole file is decoded. Decoding 100,000 messages is 0.6-0.8 s
of the start, and the first delivery needs only a few of them. So the file holds up to
``FIRST`` messages never tried first (``messages``), and the rest in chunks of ``CHUNK``
(``more``: each an encoded list, kept as raw bytes by the first decode). A start that uses
the checkpoint with nothing written since (a restart after a clean stop: the tail is empty)
may take only the first part (``recover(staged=True)``), start delivering those, and decode
the chunks afterwards on the event loop (``QueueStore.load_rest``), each added to the
schedule as it lands. Every message is whole when it is added: its state, history and
DSN coverage are the fold's. A message of the later chunks cannot be tried before it is
added, since nothing schedules it; the messages of the first part were never tried, so
they owe no DSN and carry no retry to spread. With records after the extent (a start after
``kill -9``) the first part cannot be trusted, since a record may concern any message: such
a start begins on the never-tried messages among the journal's newest records instead
(queue/window.py), and the checkpoint with the records since is read whole afterwards.

The file: ``MAGIC | u32 CRC-32 of the body | u64 body length | body``, the body msgpack
(msgspec) of ``_Checkpoint``; the CRC covers the chunks too. Written to a temporary name,
fsynced, renamed, directory fsynced: a crash leaves the old file or the new one whole, and
the CRC catches the rest.
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
CHECKPOINT_VERSION: Final = 2
FIRST: Final = 1_000  # messages decoded before delivery starts
CHUNK: Final = 5_000  # the rest, this many at a time: 30-40 ms of the event loop each
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
    messages: list[_Message]  # never tried: the first deliveries of a restart
    more: list[msgspec.Raw]  # every other message, in chunks: each an encoded list[_Message]
    graveyard: list[tuple[int, int]]
    inbound: list[_Inbound]
    kept: dict[str, tuple[tuple[int, int], ...]]
    orphan_outcomes: int


LAYOUT: Final = hashlib.sha256(msgspec.json.encode(msgspec.json.schema(_Checkpoint))).hexdigest()
_DECODER: Final = msgspec.msgpack.Decoder(_Checkpoint)
_CHUNK_DECODER: Final = msgspec.msgpack.Decoder(list[_Message])


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


def encode(
    state: QueueState, extent: Extent, now: float, *, first: int = FIRST, chunk: int = CHUNK
) -> bytes:
    """The checkpoint file's bytes for ``state`` as of ``extent``: up to ``first`` messages
    never tried, then the rest in chunks of ``chunk``."""
    lead: list[_Message] = []
    rest: list[_Message] = []
    for m in state.messages.values():
        if len(lead) < first and not m.history and not m.next_at:
            lead.append(_message(m))
        else:
            rest.append(_message(m))
    more = [
        msgspec.Raw(msgspec.msgpack.encode(rest[i : i + chunk])) for i in range(0, len(rest), chunk)
    ]
    body = msgspec.msgpack.encode(
        _Checkpoint(
            version=CHECKPOINT_VERSION,
            layout=LAYOUT,
            written_at=now,
            segments=extent.segments,
            newest_seq=extent.newest_seq,
            messages=lead,
            more=more,
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


def decode(data: bytes) -> tuple[QueueState, Extent, float, list[msgspec.Raw]]:
    """The state holding the first part's messages, the extent it is the fold of (with the
    chunks added: ``load_chunk``), when it was written, and the chunks, not decoded yet;
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
    _add(state, cp.messages)
    for i in cp.inbound:
        inbound, _ = decode_inbound(i.head)
        state.inbound[inbound.id] = PendingInbound(inbound, Position(*i.position), i.body_offset)
    return state, Extent(cp.segments, cp.newest_seq), cp.written_at, cp.more


def load_chunk(state: QueueState, chunk: msgspec.Raw) -> list[QueuedMessage]:
    """Decode one of ``decode``'s chunks into ``state``; its messages. The file's CRC and
    layout were checked whole by ``decode``, so a chunk that does not decode is a fault of
    this program's, raised as ``CheckpointUnusable``."""
    try:
        messages = _CHUNK_DECODER.decode(chunk)
    except msgspec.DecodeError as exc:
        raise CheckpointUnusable(f"a chunk of its messages does not decode ({exc})") from None
    return _add(state, messages)


def _add(state: QueueState, messages: list[_Message]) -> list[QueuedMessage]:
    added = []
    into, at = state.messages, Position
    for m in messages:  # 100,000 times for a deep queue: the common case spelled out
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
        into[record.id] = msg
        added.append(msg)
    return added


def save(
    fs: FS,
    path: str,
    state: QueueState,
    journal: Journal,
    *,
    first: int = FIRST,
    chunk: int = CHUNK,
) -> str:
    """Write the checkpoint of ``state`` if it is exactly the fold of ``journal`` (the relay
    has stopped appending); the line a stop says about it."""
    started = time.monotonic()
    extent = journal.extent()
    reason = unapplied(state, journal.offsets(extent))
    if reason is not None:
        return f"queue checkpoint not written: {reason}; the next start folds the journal"
    data = encode(state, extent, time.time(), first=first, chunk=chunk)
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
    *,
    staged: bool = False,
    last: int | None = None,
) -> tuple[QueueState | None, str, list[msgspec.Raw]]:
    """The queue folded from the checkpoint and the records since, or from the whole journal
    when there is no usable checkpoint; the words for how; and, when ``staged`` and no
    record was written since the checkpoint, its chunks not decoded yet (``load_chunk``
    each into the state), else none. Blocking: a worker thread.

    ``staged`` asks only for that start: where the checkpoint is missing, unusable or has
    records since (a start after ``kill -9``), the state is None, with why the checkpoint
    was not used, and the caller starts from the journal's newest records instead
    (queue/window.py). ``last``: fold no record past this seq (what the start appends is
    the caller's to apply)."""
    how = ""
    if fs.exists(path):
        try:
            state, extent, written_at, more = decode(fs.read_file(path))
            tail = iter(journal.records_since(extent))
            first = next(tail, None)
            if first is not None and staged:
                return None, "", []
            if first is not None or not staged:
                for chunk in more:
                    load_chunk(state, chunk)
                more = []
        except (CheckpointUnusable, ExtentMismatch, RecordError) as exc:
            how = f"; the queue checkpoint was not used ({exc}): the whole journal was folded"
        except OSError as exc:
            how = (
                f"; the queue checkpoint could not be read ({exc.strerror}): "
                "the whole journal was folded"
            )
        else:
            replayed = 0
            since = itertools.chain([first] if first is not None else [], tail)
            for record in itertools.takewhile(lambda r: last is None or r.seq <= last, since):
                state.apply(record)
                replayed += 1
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(written_at))
            how = f" from the checkpoint of {stamp} and {replayed} record(s) since"
            if more:
                how += f" ({len(state.messages)} decoded before delivery starts, the rest after)"
            return state, how, more
    if staged:
        return None, how, []
    return fold(progress(journal.records(0, last))), how, []
