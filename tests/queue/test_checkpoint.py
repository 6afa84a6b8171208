"""The queue checkpoint stands in for the fold only when it is the fold: a start from it and
the records written since rebuilds exactly the queue a fold of the whole journal rebuilds, and
anything that makes that untrue (compaction, a damaged file, a record the state never heard
of, another journal in place) sends the start back to the whole journal, saying why.

A staged start (delivery begins on the first part, the chunks are decoded after) ends with
that same queue, takes only never-tried messages first, and is staged only when nothing was
written since the checkpoint."""

from __future__ import annotations

import gc
import zlib

import attrs
import msgspec
import pytest
import trio
from hypothesis import event, given, settings
from hypothesis import strategies as st

from atmosrelay.queue import checkpoint
from atmosrelay.queue.records import (
    Delivery,
    Inbound,
    InboundRecipient,
    Outcome,
    Recipient,
    RecordType,
    encode_accepted,
)
from atmosrelay.queue.state import DSN_FOR, DSN_RECIPIENTS, QueuedMessage, QueueState, fold
from atmosrelay.queue.store import QueueStore
from journal import Journal, open_journal
from journal.testing import CrashableMemFS
from tests.queue.factories import accepted_record

DIR = "/var/journal"
PATH = "/var/" + checkpoint.CHECKPOINT_NAME
SEGMENT = 16 * 1024  # small, so a few dozen records fill several segments
BODY = b"Subject: x\r\n\r\n" + b"y" * 900 + b"\r\n"


async def restart(fs: CrashableMemFS) -> tuple[QueueState, QueueState, str]:
    """What a start makes of ``fs``: the state through the checkpoint (and how), and the
    state a fold of the whole journal makes. The same start staged, its first part and its
    chunks added, must end with the same state."""
    async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
        store = await QueueStore.recover(journal, checkpoint=(fs, PATH))
        whole = await trio.to_thread.run_sync(lambda: fold(journal.records()))
        staged = await QueueStore.recover(journal, checkpoint=(fs, PATH), staged=True)
        first = dict(staged.state.messages)
        chunks: list[list[str]] = []

        async def loaded(messages: list[QueuedMessage]) -> None:
            chunks.append([m.id for m in messages])

        added = await staged.load_rest(loaded)
        assert gc.isenabled()
        assert same(staged.state, whole)
        assert added == sum(map(len, chunks)) == len(whole.messages) - len(first)
        assert all(len(c) <= CHUNK for c in chunks)
        if chunks:  # staged: the first part holds messages never tried, and few
            assert "decoded before delivery starts" in staged.recovered
            assert "and 0 record(s) since" in staged.recovered
            assert len(first) <= FIRST
            assert all(not m.history and not m.next_at for m in first.values())
            event(f"staged: {len(chunks)} chunk(s)")
        return store.state, whole, store.recovered


def recover(fs: CrashableMemFS) -> tuple[QueueState, QueueState, str]:
    return trio.run(restart, fs)


def same(state: QueueState, whole: QueueState) -> bool:
    """Equal, but for how many orphaned outcomes each start happened to meet (a diagnostic:
    outcomes compacted away with their message are met by neither)."""
    return attrs.evolve(state, orphan_outcomes=0) == attrs.evolve(whole, orphan_outcomes=0)


FIRST, CHUNK = 3, 4  # small, so a few dozen messages make a first part and several chunks


def save(fs: CrashableMemFS, state: QueueState, journal: Journal) -> str:
    return checkpoint.save(fs, PATH, state, journal, first=FIRST, chunk=CHUNK)


KINDS = ["accept"] * 4 + ["deliver"] * 3 + ["dsn", "delete", "inbound", "inbound_done"]
KINDS += ["rotate", "compact", "checkpoint"]
OPS = st.lists(
    st.tuples(
        st.sampled_from(KINDS), st.integers(0, 50), st.sampled_from(["sent", "deferred", "bounced"])
    ),
    max_size=50,
)


async def play(fs: CrashableMemFS, ops: list[tuple[object, ...]]) -> bool:
    """Run ``ops`` against a real queue store; True when the newest checkpoint written still
    matches the journal at the end (no compaction removed or copied anything since)."""
    ids: list[str] = []
    inbound_ids: list[str] = []
    valid = False
    async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
        queue = QueueStore(journal)
        for n, op in enumerate(ops):
            kind, arg = op[0], op[1]
            now = 1_800_000_000.0 + n
            if kind == "accept":
                assert isinstance(arg, int)
                rcpts = [Recipient(f"r{n}-{i}@example.net") for i in range(1 + arg % 3)]
                record = accepted_record(*rcpts, accepted_at=now, size=len(BODY))
                await queue.accept(record, BODY)
                ids.append(record.id)
            elif kind in ("deliver", "dsn", "delete") and ids:
                assert isinstance(arg, int)
                qid = ids[arg % len(ids)]
                msg = queue.state.messages.get(qid)
                if msg is None:
                    continue
                addrs = [r.addr for r in msg.record.recipients]
                if kind == "deliver":
                    kinds = ["sent", "deferred", "bounced"]
                    first = kinds.index(str(op[2]))  # a mix: each recipient the next kind
                    outcomes = tuple(
                        Outcome(
                            a, k, "4.0.0", "451 later", 1, now + 600 if k == "deferred" else None
                        )
                        for i, a in enumerate(addrs)
                        for k in [kinds[(first + i) % 3]]
                    )
                    await queue.record(Delivery(qid, now, "mx.example.net", outcomes))
                elif kind == "dsn":
                    meta = {DSN_FOR: qid, DSN_RECIPIENTS: "\n".join(addrs)}
                    dsn = accepted_record("alice@example.org", sender="", metadata=meta)
                    await queue.accept(dsn, BODY)
                    ids.append(dsn.id)
                else:
                    await queue.delete(qid, "operator", now)
            elif kind == "inbound":
                inbound = Inbound(
                    f"in{n}", now, "", (InboundRecipient("abuse@relay.test", "role"),), {}, 3
                )
                await queue.receive(inbound, b"x\r\n")
                inbound_ids.append(inbound.id)
            elif kind == "inbound_done" and inbound_ids:
                assert isinstance(arg, int)
                await queue.inbound_done(inbound_ids[arg % len(inbound_ids)], "role", now)
            elif kind == "rotate":
                await journal.rotate()
            elif kind == "compact":
                result = await queue.compact()
                valid = valid and not result.removed_segments and not result.copied
            elif kind == "checkpoint":
                said = await trio.to_thread.run_sync(save, fs, queue.state, journal)
                assert said.startswith("queue checkpoint: "), said
                valid = True
    return valid


@settings(max_examples=300, deadline=None)
@given(OPS, OPS, st.booleans())
def test_a_start_from_the_checkpoint_rebuilds_the_queue_the_fold_rebuilds(
    before: list[tuple[object, ...]], after: list[tuple[object, ...]], clean_stop: bool
) -> None:
    fs = CrashableMemFS()
    if clean_stop:  # the checkpoint last: nothing written since, so the start is staged
        after = []
    valid = trio.run(play, fs, [*before, ("checkpoint", 0, ""), *after])
    state, whole, how = recover(fs.crash_clone())
    event(f"checkpoint used: {valid}")
    event(f"messages: {min(len(whole.messages), 5)}+; pending inbound: {bool(whole.inbound)}")
    event(f"deferred: {any(m.next_at for m in whole.messages.values())}")
    event(f"dsn covered: {any(m.dsn_covered for m in whole.messages.values())}")
    assert same(state, whole)
    assert ("from the checkpoint" in how) == valid, how


async def test_a_record_the_state_never_applied_stops_the_checkpoint() -> None:
    """An append whose task was cancelled may be durable with the state none the wiser: the
    checkpoint is then not written, and the older one, with the records after it, still
    gives the whole queue."""
    fs = CrashableMemFS()
    async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
        queue = QueueStore(journal)
        first = accepted_record("a@example.net")
        await queue.accept(first, BODY)
        assert save(fs, queue.state, journal).startswith("queue checkpoint: 1 message")
        older = fs.read_file(PATH)
        unheard = accepted_record("b@example.net")
        await journal.append(RecordType.ACCEPTED, encode_accepted(unheard, BODY))
        said = save(fs, queue.state, journal)
        assert said.startswith("queue checkpoint not written: the queue in memory is not the")
        assert "1 record(s) not applied" in said
        assert fs.read_file(PATH) == older
    state, whole, how = await restart(fs.crash_clone())
    assert sorted(state.messages) == sorted([first.id, unheard.id])
    assert state == whole
    assert "from the checkpoint" in how and "1 record(s) since" in how


async def test_a_cancelled_accept_is_queued_all_the_same_once_durable() -> None:
    """The queue hears of an ACCEPTED record from the journal's callback, on the event loop,
    when the record is durable: whether the task that appended it is still there or not."""
    fs = CrashableMemFS()
    async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
        queue = QueueStore(journal)
        record = accepted_record("a@example.net")
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled before the fsync could answer: the record is queued
            await queue.accept(record, BODY)
    assert list(queue.state.messages) == [record.id]  # durable by the close: the state has it
    async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
        assert len(list(journal.records())) == 1
        assert save(fs, queue.state, journal).startswith("queue checkpoint: ")


async def test_a_record_the_state_never_heard_of_stops_the_checkpoint() -> None:
    fs = CrashableMemFS()
    async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
        queue = QueueStore(journal)
        await queue.accept(accepted_record("a@example.net"), BODY)
        # appended past the queue: as an outcome whose task was cancelled before it applied it
        await journal.append(RecordType.ACCEPTED, encode_accepted(accepted_record("b@x.net"), BODY))
        said = save(fs, queue.state, journal)
        assert "1 record(s) not applied" in said
    assert not fs.exists(PATH)


def checkpointed(n: int = 3) -> tuple[CrashableMemFS, list[str]]:
    fs = CrashableMemFS()

    async def main() -> list[str]:
        async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
            queue = QueueStore(journal)
            ids = []
            for i in range(n):
                record = accepted_record(f"r{i}@example.net")
                await queue.accept(record, BODY)
                ids.append(record.id)
            assert save(fs, queue.state, journal).startswith("queue checkpoint: ")
            return ids

    return fs, trio.run(main)


def rewrite(fs: CrashableMemFS, data: bytes) -> None:
    fs.remove(PATH)
    f = fs.create(PATH)
    f.append(data)
    f.sync()
    f.close()


def test_a_damaged_checkpoint_is_not_used() -> None:
    fs, ids = checkpointed()
    good = fs.read_file(PATH)
    cases = [
        ("its length or checksum is wrong", good[:-1] + bytes([good[-1] ^ 1])),
        ("its length or checksum is wrong", good[:-7]),
        ("it is not a queue checkpoint", b"X" + good[1:]),
        ("it is shorter than its header", good[:5]),
    ]
    for reason, data in cases:
        rewrite(fs, data)
        state, whole, how = recover(fs)
        assert f"the queue checkpoint was not used ({reason})" in how
        assert sorted(state.messages) == sorted(ids) and state == whole


def test_a_checkpoint_of_another_version_is_not_used() -> None:
    fs, ids = checkpointed()
    data = fs.read_file(PATH)
    written = checkpoint._DECODER.decode(data[checkpoint._HEAD.size :])
    for changed in (
        msgspec.structs.replace(written, version=checkpoint.CHECKPOINT_VERSION + 1),
        msgspec.structs.replace(written, layout="another layout"),
    ):
        body = msgspec.msgpack.encode(changed)
        rewrite(fs, checkpoint._HEAD.pack(checkpoint.MAGIC, zlib.crc32(body), len(body)) + body)
        state, whole, how = recover(fs)
        assert "(it was written by another version)" in how
        assert sorted(state.messages) == sorted(ids) and state == whole


def test_a_journal_cut_below_the_checkpoint_is_folded_whole() -> None:
    """A segment shorter than the checkpoint saw it (an older copy of the journal restored,
    say): the checkpoint would name messages the journal no longer holds."""
    fs, ids = checkpointed()
    segment = f"{DIR}/" + sorted(n for n in fs.listdir(DIR) if n.endswith(".seg"))[-1]
    data = fs.read_file(segment)
    cut = data.rindex(b"Subject: x") - 200  # inside the last record: a torn tail to repair
    f = fs.open(segment)
    f.truncate(cut)
    f.sync()
    f.close()
    state, whole, how = recover(fs)
    assert "the queue checkpoint was not used (segment" in how and "not at" in how, how
    assert state == whole
    assert sorted(state.messages) == sorted(ids[:-1])


def test_another_journal_in_place_is_folded_whole() -> None:
    fs, _ = checkpointed()
    other, other_ids = checkpointed(2)
    for name in other.listdir(DIR):
        if fs.exists(f"{DIR}/{name}"):
            fs.remove(f"{DIR}/{name}")
        f = fs.create(f"{DIR}/{name}")
        f.append(other.read_file(f"{DIR}/{name}"))
        f.sync()
        f.close()
    state, whole, how = recover(fs)
    assert "the queue checkpoint was not used" in how
    assert sorted(state.messages) == sorted(other_ids) and state == whole


def test_a_chunk_that_does_not_decode_fails_the_start_and_removes_the_checkpoint() -> None:
    """Its CRC and layout match (so no check before delivery starts can see it): the start
    stops with the reason, and without the file the next start folds the whole journal."""
    fs, ids = checkpointed(FIRST + 2 * CHUNK)
    written = checkpoint._DECODER.decode(fs.read_file(PATH)[checkpoint._HEAD.size :])
    assert len(written.more) == 2
    broken = msgspec.structs.replace(written, more=[written.more[0], msgspec.Raw(b"\x91\x01")])
    body = msgspec.msgpack.encode(broken)
    rewrite(fs, checkpoint._HEAD.pack(checkpoint.MAGIC, zlib.crc32(body), len(body)) + body)

    async def start() -> None:
        async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
            store = await QueueStore.recover(journal, checkpoint=(fs, PATH), staged=True)
            assert len(store.state.messages) == FIRST
            with pytest.raises(checkpoint.CheckpointUnusable, match="does not decode"):
                await store.load_rest()
            assert len(store.state.messages) == FIRST + CHUNK  # the first chunk was added
            assert gc.isenabled()

    trio.run(start)
    assert not fs.exists(PATH)
    state, whole, how = recover(fs)
    assert "checkpoint" not in how and sorted(state.messages) == sorted(ids) and state == whole


def test_records_written_since_the_checkpoint_stage_the_start_on_the_newest_records() -> None:
    """After a kill -9 the records since may concern any message, so the checkpoint's first
    part is not staged: the start takes the never-tried messages among the newest records
    (queue/window.py), and the rest, the checkpoint and the records since, comes after."""
    fs, ids = checkpointed(FIRST + CHUNK + 1)

    async def start() -> None:
        async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
            queue = await QueueStore.recover(journal, checkpoint=(fs, PATH))
            sent = Outcome(f"r{len(ids) - 1}@example.net", "sent", "2.0.0")
            await queue.record(Delivery(ids[-1], 1.0, "mx", (sent,)))
        async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
            # the newest three records: the last two accepted, and the outcome of the last
            store = await QueueStore.recover(journal, checkpoint=(fs, PATH), staged=True, window=3)
            assert not store.unloaded and store.rest is not None and not gc.isenabled()
            assert list(store.state.messages) == [ids[-2]]  # the last was tried
            assert await store.load_rest() == len(ids) - 1
            assert gc.isenabled()
            assert sorted(store.state.messages) == sorted(ids)
            assert store.state.messages[ids[-1]].history
            assert "1 record(s) since" in store.recovered
            assert "(delivery began on 1 message(s) of the journal's newest" in store.recovered
            assert "decoded before delivery starts" not in store.recovered
            assert same(store.state, fold(journal.records()))

    trio.run(start)


def test_a_journal_within_the_window_is_folded_whole_at_once() -> None:
    fs, ids = checkpointed(4)
    fs.remove(PATH)

    async def start() -> None:
        async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
            store = await QueueStore.recover(journal, checkpoint=(fs, PATH), staged=True, window=4)
            assert store.rest is None and not store.unloaded and gc.isenabled()
            assert sorted(store.state.messages) == sorted(ids)
            assert store.recovered == "" and await store.load_rest() == 0

    trio.run(start)


def test_the_early_messages_are_the_first_accepted_of_the_window_up_to_the_cap() -> None:
    fs, ids = checkpointed(8)

    async def start() -> None:
        async with open_journal(DIR, fs=fs, segment_size=SEGMENT) as journal:
            store = await QueueStore.recover(journal, staged=True, window=5, early=2)
            assert list(store.state.messages) == ids[3:5]
            assert await store.load_rest() == 6 and sorted(store.state.messages) == sorted(ids)

    trio.run(start)


LIVE = st.lists(
    st.tuples(st.integers(0, 50), st.sampled_from(["sent", "deferred", "bounced", "dsn"])),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(OPS, OPS, st.booleans(), st.integers(1, 10), st.integers(1, 4), LIVE)
def test_a_start_from_the_newest_records_ends_with_the_queue_the_fold_rebuilds(
    before: list[tuple[object, ...]],
    after: list[tuple[object, ...]],
    checkpointed: bool,
    window: int,
    cap: int,
    live: list[tuple[int, str]],
) -> None:
    """A staged start after kill -9 (queue/window.py): its early messages are the fold's
    own, never tried; then it appends outcomes and DSNs about them (its deliveries), and once
    the rest is merged its queue is the fold of the whole journal, those records included."""
    fs = CrashableMemFS()
    trio.run(play, fs, [*before, *([("checkpoint", 0, "")] if checkpointed else []), *after])
    clone = fs.crash_clone()

    async def start() -> None:
        async with open_journal(DIR, fs=clone, segment_size=SEGMENT) as journal:
            records = sum(1 for _ in journal.records())
            # told of a checkpoint file or not, whether one was written (an odd window: told)
            store = await QueueStore.recover(
                journal,
                checkpoint=(clone, PATH) if checkpointed or window % 2 else None,
                staged=True,
                window=window,
                early=cap,
            )
            now = fold(journal.records())
            early = dict(store.state.messages)
            if store.rest is not None:
                assert records > window and not store.unloaded and len(early) <= cap
                for q, m in early.items():
                    assert m == now.messages[q] and not m.history and not m.next_at
                event(f"window: {min(len(early), 3)}+ early, live records: {bool(live)}")
            else:
                event("the checkpoint's first part" if store.unloaded else "whole at once")
            for i, (n, kind) in enumerate(live):
                if not early:
                    break
                msg = store.state.messages[sorted(early)[n % len(early)]]
                addrs = [r.addr for r in msg.record.recipients]
                if kind == "dsn":
                    meta = {DSN_FOR: msg.id, DSN_RECIPIENTS: "\n".join(addrs)}
                    dsn = accepted_record("alice@example.org", sender="", metadata=meta)
                    await store.accept(dsn, BODY)
                else:
                    at = 1_900_000_000.0 + i
                    outcomes = tuple(
                        Outcome(a, kind, "4.0.0", "451", 1, at if kind == "deferred" else None)
                        for a in addrs
                    )
                    await store.record(Delivery(msg.id, at, "mx.example.net", outcomes))
            if store.rest is not None:  # the whole fold ends where the journal did at the start
                whole, _ = await trio.to_thread.run_sync(store.rest)
                assert set(whole.messages) <= set(now.messages)
            loaded: list[str] = []

            async def add(messages: list[QueuedMessage]) -> None:
                loaded.extend(m.id for m in messages)

            added = await store.load_rest(add)
            assert gc.isenabled() and store.rest is None
            assert added == len(loaded) and not set(loaded) & set(early)
            assert same(store.state, fold(journal.records()))

    trio.run(start)
