"""The status index on its own: what events write, what a rebuild from the journal's state
adds (and only that), retention, and Idempotency-Keys within their time to live."""

from __future__ import annotations

import functools
from pathlib import Path

import msgspec
import trio

from atmosrelay.queue.events import AttemptOutcome, MessageAccepted, MessageDeleted
from atmosrelay.queue.records import Idempotency, Outcome
from atmosrelay.queue.state import fold
from atmosrelay.queue.status import StatusIndex
from tests.queue.factories import ALICE_DID, accepted_record
from tests.queue.test_state import BOUNCE_CAROL, DEFER, QID, SENT_BOB, accepted, delivery

DAY = 86400.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _index(tmp: Path, clock: Clock) -> StatusIndex:
    return StatusIndex(tmp / "status.sqlite3", retention=30 * DAY, clock=clock)


async def test_events_then_a_rebuild_that_adds_only_what_is_missing(tmp_path: Path) -> None:
    clock = Clock(1_800_000_500.0)
    state = fold([accepted(), delivery(2, DEFER), delivery(3, SENT_BOB, BOUNCE_CAROL)])
    index = _index(tmp_path, clock)
    assert index.rebuild(state.messages.values()) == 1  # a missing file: all the journal holds
    assert index.rebuild(state.messages.values()) == 0  # up to date: nothing
    found = await index.get(QID)
    assert found is not None
    assert found.recipients == {"bob@example.net": "sent", "carol@example.org": "bounced"}
    assert [(a.recipient, a.status) for a in found.attempts] == [
        ("bob@example.net", "deferred"),
        ("bob@example.net", "sent"),
        ("carol@example.org", "bounced"),
    ]
    assert found.status == "bounced" and found.finished_at == clock.now
    assert await index.get(QID, "did:plc:someoneelse") is None  # scoped to its member
    index.close()


async def test_the_start_rebuild_runs_on_while_events_arrive(tmp_path: Path) -> None:
    """The relay does not wait for the rebuild: events come meanwhile. Whichever reaches the
    file first, a reader (which waits for the rebuild) sees every attempt once."""
    clock = Clock(1_800_000_500.0)
    state = fold([accepted(), delivery(2, DEFER)])  # what the journal held at the start
    index = _index(tmp_path, clock)
    msg = state.messages[QID]
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(index.run, rebuild=state))
        early = await index.get(QID)  # a reader at once: it waits for the rebuild
        assert early is not None and early.recipients["bob@example.net"] == "deferred"
        # delivered after the start: an event (the rebuild may or may not see it too)
        later = Outcome("bob@example.net", "sent", "2.0.0", "250 ok", 2)
        index.on_event(
            AttemptOutcome(QID, msg.record.did, msg.record.sender, later, "mx", clock.now)
        )
        found = await index.get(QID)  # flushes: after the rebuild, then the event
        nursery.cancel_scope.cancel()
    assert found is not None
    assert [(a.recipient, a.status) for a in found.attempts] == [
        ("bob@example.net", "deferred"),
        ("bob@example.net", "sent"),
    ]
    assert found.recipients == {"bob@example.net": "sent", "carol@example.org": "accepted"}
    assert index.rebuild(state.messages.values()) == 0  # nothing left behind
    index.close()


async def test_events_written_then_pruned_after_retention(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    index = _index(tmp_path, clock)
    done = accepted_record("bob@example.net", accepted_at=clock.now)
    live = accepted_record("carol@example.net", accepted_at=clock.now)
    index.on_event(MessageAccepted(done))
    index.on_event(MessageAccepted(live))
    sent = Outcome("bob@example.net", "sent", "2.0.0", "250 ok")
    index.on_event(AttemptOutcome(done.id, ALICE_DID, done.sender, sent, "mx", clock.now + 1))
    await index.flush()
    page = await index.page(ALICE_DID, limit=10)
    assert {m.id: m.status for m in page} == {done.id: "sent", live.id: "accepted"}
    clock.now += 29 * DAY
    assert await index.prune() == 0
    clock.now += 2 * DAY
    assert await index.prune() == 1  # finished over 30 days ago; the live one stays
    assert await index.get(done.id) is None and await index.get(live.id) is not None
    index.on_event(MessageDeleted(live.id, "by the operator", clock.now))
    found = await index.get(live.id)  # a read commits what is pending first
    assert found is not None and found.deleted == "by the operator"
    assert found.finished_at == clock.now
    index.close()


async def test_an_idempotency_key_within_its_time_to_live(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    index = _index(tmp_path, clock)
    record = msgspec.structs.replace(
        accepted_record("bob@example.net", "gone@example.net", accepted_at=clock.now),
        message_id="<m@x>",
        idem=Idempotency("k1", "d1", (("x@example.net", "RECIPIENT_SUPPRESSED", "why"),)),
    )
    index.on_event(MessageAccepted(record))
    pending = await index.idempotent(ALICE_DID, "k1")  # not committed yet: from memory
    await index.flush()
    committed = await index.idempotent(ALICE_DID, "k1")  # from the file
    other_member = await index.idempotent("did:plc:someoneelse", "k1")
    clock.now += DAY + 1
    expired = await index.idempotent(ALICE_DID, "k1")
    index.close()
    assert pending == committed
    assert committed is not None
    assert (committed.queue_id, committed.digest, committed.message_id) == (
        record.id,
        "d1",
        "<m@x>",
    )
    assert committed.accepted == ("bob@example.net", "gone@example.net")
    assert committed.rejected == (("x@example.net", "RECIPIENT_SUPPRESSED", "why"),)
    assert other_member is None and expired is None


async def test_a_dsn_and_its_deliveries_leave_nothing_behind(tmp_path: Path) -> None:
    """DSNs (null sender) are the relay's own mail: no row, and no orphan attempt rows
    that retention could never find."""
    index = _index(tmp_path, Clock(1_800_000_000.0))
    dsn = accepted_record("alice@example.org", sender="")
    sent = Outcome("alice@example.org", "sent", "2.0.0", "250 ok")
    index.on_event(MessageAccepted(dsn))
    index.on_event(AttemptOutcome(dsn.id, ALICE_DID, "", sent, "mx", 1_800_000_001.0))
    await index.flush()
    rows = index._db.execute(
        "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM attempts)"
    )
    assert rows.fetchone()[0] == 0
    assert await index.get(dsn.id) is None
    index.close()
