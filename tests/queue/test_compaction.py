"""Disk follows the live queue: finished and deleted messages are compacted away, live ones
are copied forward and stay readable, and a crash after compaction replays the same queue."""

from __future__ import annotations

from atmosrelay.queue.records import (
    Accepted,
    Delivery,
    Inbound,
    InboundRecipient,
    Outcome,
    Recipient,
    encode_accepted,
    new_queue_id,
)
from atmosrelay.queue.schedule import Schedule
from atmosrelay.queue.state import DSN_FOR, DSN_RECIPIENTS
from atmosrelay.queue.store import QueueStore
from journal import open_journal
from journal._format import FRAME_HEADER_SIZE
from journal.testing import CrashableMemFS
from tests.queue.factories import accepted_record

BODY = b"Subject: x\r\n\r\n" + b"y" * 4000 + b"\r\n"


def record(qid: str, rcpt: str) -> Accepted:
    return accepted_record(
        Recipient(rcpt, ("NEVER",)), queue_id=qid, category="receipt", size=len(BODY)
    )


async def test_compaction_keeps_the_live_queue_and_frees_the_rest() -> None:
    fs = CrashableMemFS()
    async with open_journal("/q", fs=fs, segment_size=64 * 1024) as journal:
        queue = QueueStore(journal)
        ids = []
        for i in range(60):
            qid = new_queue_id()
            await queue.accept(record(qid, f"r{i}@example.net"), BODY)
            ids.append(qid)
        assert journal.active_segment > 3  # 60 x 4 KiB filled several 64 KiB segments
        assert not queue.compaction_due()  # but nothing in them is dead yet
        for i, qid in enumerate(ids[:45]):  # 45 delivered, 1 deleted, 14 still pending
            outcome = Outcome(f"r{i}@example.net", "sent", "2.0.0", "250 ok")
            await queue.record(Delivery(qid, 1_800_000_100.0, "mx", (outcome,)))
        await queue.delete(ids[45], "operator", 1_800_000_200.0)
        await journal.rotate()  # seal the newest records too
        assert queue.compaction_due()
        before = len(fs.listdir("/q"))
        result = await queue.compact()
        assert result.copied == 14  # the pending ones, copied forward with their seq
        assert len(fs.listdir("/q")) < before
        assert sorted(queue.state.messages) == sorted(ids[46:])
        for qid in ids[46:]:  # the bodies read back from where they moved
            msg = queue.state.messages[qid]
            assert msg.position.segment >= journal.active_segment - 1
            payload = (await journal.read(msg.position)).payload
            assert payload[msg.body_offset :] == BODY
        assert queue.state.dead_positions() == set()
        assert not queue.compaction_due()
    async with open_journal("/q", fs=fs.crash_clone(), segment_size=64 * 1024) as journal:
        again = await QueueStore.recover(journal)
        assert sorted(again.state.messages) == sorted(ids[46:])
        assert all(
            m.recipient_states == {m.record.recipients[0].addr: "accepted"}
            for m in again.state.messages.values()
        )
        assert Schedule.from_state(again.state).next_due() is not None


def inbound(n: int) -> Inbound:
    return Inbound(
        id=new_queue_id(),
        received_at=1_800_000_000.0 + n,
        sender="",
        recipients=(InboundRecipient("abuse@relay.test", "role"),),
        client={"ip": "127.0.0.1", "helo": "mx", "tls": None},
        size=len(BODY),
    )


async def test_processed_inbound_records_are_compacted_and_pending_ones_survive() -> None:
    """An INBOUND record lives until its INBOUND_DONE; both then go, and one not yet
    processed is copied forward, readable, and still pending after a crash."""
    fs = CrashableMemFS()
    async with open_journal("/q", fs=fs, segment_size=64 * 1024) as journal:
        queue = QueueStore(journal)
        records = [inbound(i) for i in range(40)]
        for r in records:
            await queue.receive(r, BODY)
        for r in records[:30]:
            await queue.inbound_done(r.id, "role", 1_800_000_100.0)
        await journal.rotate()
        assert queue.compaction_due()
        result = await queue.compact()
        assert result.copied == 10
        assert sorted(queue.pending_inbound()) == sorted(r.id for r in records[30:])
        for r in records[30:]:
            pending = queue.inbound_pending(r.id)
            assert pending is not None and pending.record == r
            payload = (await journal.read(pending.position)).payload
            assert payload[pending.body_offset :] == BODY
        assert queue.state.dead_positions() == set()
    async with open_journal("/q", fs=fs.crash_clone(), segment_size=64 * 1024) as journal:
        again = await QueueStore.recover(journal)
        assert sorted(again.pending_inbound()) == sorted(r.id for r in records[30:])
        assert again.state.messages == {}


async def test_outcomes_left_behind_by_their_message_are_freed_by_the_next_compaction() -> None:
    """A delivered message's ACCEPTED record goes with a sealed segment while its outcome
    sits in the active one: that outcome is dead from then on (a fold of what is left would
    find it orphaned), so it is not copied forward at every compaction after."""
    fs = CrashableMemFS()
    async with open_journal("/q", fs=fs, segment_size=64 * 1024) as journal:
        queue = QueueStore(journal)
        qid = new_queue_id()
        await queue.accept(record(qid, "r@example.net"), BODY)
        await journal.rotate()
        outcome = Outcome("r@example.net", "sent", "2.0.0", "250 ok")
        await queue.record(Delivery(qid, 1_800_000_100.0, "mx", (outcome,)))
        first = await queue.compact()
        assert first.removed_segments and qid not in queue.state.messages
        left = queue.state.dead_positions()
        assert len(left) == 1  # the outcome, in the segment that was active
        await journal.rotate()
        second = await queue.compact()
        assert second.copied == 0 and [p.segment for p in left] == list(second.removed_segments)
        assert queue.state.dead_positions() == set()
    async with open_journal("/q", fs=fs.crash_clone(), segment_size=64 * 1024) as journal:
        assert list(journal.records()) == []


async def accept_two(queue: QueueStore, second: str) -> str:
    """A message to gone@example.net (to bounce) and ``second``; its queue id."""
    qid = new_queue_id()
    await queue.accept(
        accepted_record(Recipient("gone@example.net"), Recipient(second), queue_id=qid), BODY
    )
    return qid


async def test_a_deleted_dsn_still_covers_its_recipients_after_compaction() -> None:
    """Deleting a DSN does not make its report owed again, before a compaction or after one,
    live or after a restart: its DELETED record says what it reported, and lives as long as
    the message it reports on."""
    fs = CrashableMemFS()
    async with open_journal("/q", fs=fs, segment_size=64 * 1024) as journal:
        queue = QueueStore(journal)
        qid = await accept_two(queue, "slow@example.net")
        bounced = Outcome("gone@example.net", "bounced", "5.1.1", "550 no such user")
        await queue.record(Delivery(qid, 1_800_000_100.0, "mx", (bounced,)))
        assert queue.state.messages[qid].dsn_owed() == ["gone@example.net"]
        meta = {DSN_FOR: qid, DSN_RECIPIENTS: "gone@example.net"}
        dsn = accepted_record("alice@example.org", sender="", metadata=meta)
        await queue.accept(dsn, BODY)
        await queue.delete(dsn.id, "operator", 1_800_000_200.0)
        await journal.rotate()
        await queue.compact()
        assert queue.state.messages[qid].dsn_owed() == []
    async with open_journal("/q", fs=fs.crash_clone(), segment_size=64 * 1024) as journal:
        again = await QueueStore.recover(journal)
        assert dsn.id not in again.state.messages
        assert again.state.messages[qid].dsn_owed() == []


async def test_a_finished_message_copied_past_its_outcomes_is_not_revived() -> None:
    """A message waits for its DSN while a compaction copies its ACCEPTED record forward;
    the segment in hand is full, so the copy lands in a new one, after the segment that holds
    its outcomes. Once the DSN is queued the message is finished. The next compaction must not
    drop the outcomes while the copy stays behind in the active segment: a restart would find
    the message undelivered and send it again."""
    fs = CrashableMemFS()
    async with open_journal("/q", fs=fs, segment_size=64 * 1024) as journal:
        queue = QueueStore(journal)
        qid = await accept_two(queue, "ok@example.net")
        await journal.rotate()
        outcomes = (
            Outcome("gone@example.net", "bounced", "5.1.1", "550 no such user"),
            Outcome("ok@example.net", "sent", "2.0.0", "250 ok"),
        )
        await queue.record(Delivery(qid, 1_800_000_100.0, "mx", outcomes))
        outcome_segment = journal.active_segment
        end = 0
        while 64 * 1024 - end > 1500:  # fill it with small messages: the copy will not fit
            small = accepted_record("later@example.net", size=100)
            at = await queue.accept(small, b"x" * 100)
            assert at.segment == outcome_segment
            end = at.offset + FRAME_HEADER_SIZE + len(encode_accepted(small, b"x" * 100))
        await queue.compact()  # the message owes a DSN: copied forward
        copied_to = queue.state.messages[qid].position.segment
        assert copied_to > outcome_segment == queue.state.messages[qid].positions[1].segment
        meta = {DSN_FOR: qid, DSN_RECIPIENTS: "gone@example.net"}
        await queue.accept(accepted_record("alice@example.org", sender="", metadata=meta), BODY)
        assert queue.state.messages[qid].dead
        if journal.active_segment != copied_to:  # a compaction keeps the active segment
            assert queue.state.messages[qid].position.segment < journal.active_segment
        await queue.compact()
    async with open_journal("/q", fs=fs.crash_clone(), segment_size=64 * 1024) as journal:
        again = await QueueStore.recover(journal)
        revived = again.state.messages.get(qid)
        assert revived is None or revived.terminal, revived


async def test_a_dsn_kept_for_its_live_message_does_not_make_a_compaction_due() -> None:
    """A delivered DSN's records live as long as the message it reports on (they say its
    recipients were reported): counting them dead made a compaction due that could free
    nothing, and every such compaction copied the whole sealed queue forward for nothing."""
    fs = CrashableMemFS()
    async with open_journal("/q", fs=fs, segment_size=64 * 1024) as journal:
        queue = QueueStore(journal)
        reported = []
        for i in range(5):  # each bounced, and still deferred for another recipient
            qid = new_queue_id()
            rcpts = (Recipient(f"gone{i}@example.net"), Recipient(f"later{i}@example.net"))
            await queue.accept(accepted_record(*rcpts, queue_id=qid, size=len(BODY)), BODY)
            outcomes = (
                Outcome(f"gone{i}@example.net", "bounced", "5.1.1", "550 no"),
                Outcome(f"later{i}@example.net", "deferred", "4.0.0", "451", 1, 1.9e9),
            )
            await queue.record(Delivery(qid, 1_800_000_100.0, "mx", outcomes))
            reported.append(qid)
        for i, qid in enumerate(reported):  # each one's DSN, delivered: finished, but kept
            meta = {DSN_FOR: qid, DSN_RECIPIENTS: f"gone{i}@example.net"}
            dsn = accepted_record("alice@example.org", sender="", metadata=meta, size=len(BODY))
            await queue.accept(dsn, BODY)
            sent = Outcome("alice@example.org", "sent", "2.0.0", "250 ok")
            await queue.record(Delivery(dsn.id, 1_800_000_200.0, "mx", (sent,)))
            assert queue.state.messages[dsn.id].dead
        await journal.rotate()
        assert queue.state.dead_positions(journal.active_segment) == set()
        assert not queue.compaction_due()
        for qid in reported:  # the reported messages finish: now all of it is dead
            sent = tuple(
                Outcome(f"later{i}@example.net", "sent", "2.0.0", "250 ok")
                for i in [reported.index(qid)]
            )
            await queue.record(Delivery(qid, 1_800_000_300.0, "mx", sent))
        await journal.rotate()
        assert queue.compaction_due()
        result = await queue.compact()  # the DSNs' records outlive what they report on...
        assert result.copied == 10 and set(queue.state.messages).isdisjoint(reported)
        await journal.rotate()
        assert queue.compaction_due()  # ...and go with the next compaction
        result = await queue.compact()
        assert result.copied == 0 and queue.state.messages == {}
