"""Delivery's schedule: built from the folded state, kept current by the queue's events,
moved by the dispatcher (postpone, crash retry, restart spread, retry now) without ever
touching the fold."""

from __future__ import annotations

import random

import attrs
import pytest
from msgspec.structs import replace

from atmosrelay.queue.events import AttemptOutcome, MessageAccepted
from atmosrelay.queue.records import Outcome, Recipient, RecipientState, new_queue_id
from atmosrelay.queue.schedule import Schedule
from atmosrelay.queue.state import QueueState, fold
from journal import Position
from tests.queue.factories import accepted_record
from tests.queue.test_state import BOUNCE_CAROL, DEFER, QID, SENT_BOB, accepted, delivery


def outcome_event(o: Outcome, qid: str = QID) -> AttemptOutcome:
    return AttemptOutcome(qid, "did:plc:x", "alice@example.org", o, "mx", 0.0)


def test_from_state_then_events_to_terminal() -> None:
    state = fold([accepted(), delivery(2, DEFER)])
    schedule = Schedule.from_state(state)
    # carol was never tried: due since acceptance; bob at his retry time, not before
    assert schedule.next_due() == 1_800_000_000.0
    assert schedule.take_due(1_800_000_200.0) == [(QID, "carol@example.org")]
    assert schedule.next_due() == 1_800_000_220.0
    assert schedule.take_due(1_800_000_219.9) == []
    assert schedule.take_due(1_800_000_220.0) == [(QID, "bob@example.net")]
    assert schedule.next_due() is None  # both taken: the lanes have them
    state.apply(delivery(3, SENT_BOB, BOUNCE_CAROL))
    for o in (SENT_BOB, BOUNCE_CAROL):
        schedule.on_event(outcome_event(o))
    assert schedule.next_due() is None


def test_a_later_time_replaces_an_earlier_one() -> None:
    state = fold([accepted(), delivery(2, DEFER)])
    schedule = Schedule.from_state(state)
    schedule.take_due(1_800_000_000.0)  # carol out to a lane
    assert schedule.retry_now(QID, 1_800_000_050.0) == 2  # operator: retry both now
    again = replace(DEFER, attempt=2, next_at=1_800_000_500.0)
    state.apply(delivery(3, again))
    schedule.on_event(outcome_event(again))
    # bob's stale entries (220 from the first deferral, 50 from the forced retry) are gone
    assert schedule.take_due(1_800_000_400.0) == [(QID, "carol@example.org")]
    assert schedule.take_due(1_800_000_500.0) == [(QID, "bob@example.net")]


def test_overdue_retries_are_spread_after_a_restart() -> None:
    ids = [new_queue_id(1_800_000_000.0) for _ in range(10)]
    records = []
    for n, qid in enumerate(ids):
        records += [
            accepted(qid),
            delivery(2 + n, DEFER, replace(DEFER, recipient="carol@example.org"), qid=qid),
        ]
    schedule = Schedule.from_state(fold(records))
    now = 1_800_001_000.0
    assert schedule.spread_overdue(now, 60.0, random.Random(3)) == 20
    times = []
    while (at := schedule.next_due()) is not None:
        times.append(at)
        schedule.take_due(at)
    assert times == pytest.approx([now + 3.0 * i for i in range(20)])  # evenly, none at once


def test_accepted_messages_are_due_at_once_but_not_their_unsubscribed_recipients() -> None:
    state = QueueState()
    schedule = Schedule(state)
    record = accepted_record(
        "bob@example.net",
        Recipient("optout@example.net", suppressed=True),
        queue_id=QID,
    )
    state.add_accepted(record, Position(1, 32), 10)
    schedule.on_event(MessageAccepted(record))
    assert state.messages[QID].recipient_states["optout@example.net"] == RecipientState.SUPPRESSED
    assert schedule.take_due(record.accepted_at) == [(QID, "bob@example.net")]


def test_a_deleted_message_is_never_handed_out() -> None:
    state = fold([accepted()])
    schedule = Schedule.from_state(state)
    state.add_deleted(QID, Position(1, 500))
    assert schedule.take_due(1_800_000_000.0) == []
    assert schedule.next_due() is None


def test_a_deep_queue_is_handed_out_in_time_order() -> None:
    """from_state builds the heap in one go: 500 messages, never tried or deferred to
    scattered times, come out earliest first, each recipient once."""
    rng = random.Random(7)
    records, expected = [], []
    for n in range(500):
        qid = new_queue_id(1_800_000_000.0 + rng.random() * 1000)
        records.append(attrs.evolve(accepted(qid), seq=2 * n + 1))
        if n % 2:
            at = 1_800_001_000.0 + rng.random() * 1000
            later = replace(DEFER, next_at=at)
            records.append(attrs.evolve(delivery(2 * n + 2, later, qid=qid), seq=2 * n + 2))
            expected.append((at, qid, "bob@example.net"))
        else:
            expected.append((1_800_000_000.0, qid, "bob@example.net"))
        expected.append((1_800_000_000.0, qid, "carol@example.org"))
    schedule = Schedule.from_state(fold(records))
    got = []
    while (at := schedule.next_due()) is not None:
        got += [(at, q, r) for q, r in schedule.take_due(at)]
    assert sorted(got) == sorted(expected)
    assert [t for t, _, _ in got] == sorted(t for t, _, _ in expected)


def test_a_restart_spreads_only_the_overdue_retries() -> None:
    """Never tried: due at once. Deferred and overdue: spread. Deferred to later: kept."""
    fresh, overdue, later = (new_queue_id(1_800_000_000.0) for _ in range(3))
    pushed = replace(DEFER, next_at=1_800_009_000.0)
    carol = {"recipient": "carol@example.org"}
    state = fold(
        [
            attrs.evolve(accepted(fresh), seq=1),
            attrs.evolve(accepted(overdue), seq=2),
            attrs.evolve(accepted(later), seq=3),
            delivery(4, DEFER, replace(DEFER, **carol), qid=overdue),
            delivery(5, pushed, replace(pushed, **carol), qid=later),
        ]
    )
    schedule = Schedule.from_state(state)
    now = 1_800_001_000.0
    assert schedule.spread_overdue(now, 60.0, random.Random(1)) == 2
    first = schedule.take_due(now)  # the two never tried, and the first of the spread
    assert sorted(first[:2]) == [(fresh, "bob@example.net"), (fresh, "carol@example.org")]
    assert len(first) == 3 and first[2][0] == overdue
    assert [q for q, _ in schedule.take_due(now + 30.0)] == [overdue]
    assert schedule.next_due() == 1_800_009_000.0


def test_messages_added_in_parts_come_out_as_from_the_whole() -> None:
    """A staged start (queue/checkpoint.py) adds its messages in parts after the schedule
    was built from the first: the same recipients come out at the same times as from the
    whole queue, except the overdue retries, held back for one spread over every part."""
    rng = random.Random(11)
    records = []
    for n in range(300):
        qid = new_queue_id(1_800_000_000.0 + rng.random() * 1000)
        records.append(attrs.evolve(accepted(qid), seq=2 * n + 1))
        if n % 3 == 0:  # deferred: to before ``now`` (overdue) or after it
            later = replace(DEFER, next_at=1_800_000_500.0 + rng.random() * 1000)
            records.append(attrs.evolve(delivery(2 * n + 2, later, qid=qid), seq=2 * n + 2))
    whole = fold(records)
    now = 1_800_001_000.0
    expected = Schedule.from_state(whole)
    held_back = expected._overdue(now)
    everything = list(whole.messages.values())
    parted = QueueState()
    parted.messages = {m.id: m for m in everything[:40] if not m.next_at}
    schedule = Schedule.from_state(parted)
    rest = [m for m in everything if m.id not in parted.messages]
    overdue = []
    for i in range(0, len(rest), 37):  # parts of 37, some onto a heap eight times larger
        part = rest[i : i + 37]
        parted.messages.update((m.id, m) for m in part)
        overdue += schedule.add(part, now)
    assert sorted(overdue) == sorted(held_back) and overdue
    assert schedule.spread(overdue, now, 60.0, random.Random(3)) == len(held_back)
    assert expected.spread_overdue(now, 60.0, random.Random(3)) == len(held_back)

    def drained(s: Schedule) -> list[tuple[float, str, str]]:
        out = []
        while (at := s.next_due()) is not None:
            out += [(at, q, r) for q, r in s.take_due(at)]
        return out

    # the overdue come in the same order both ways, and the spread shuffles with one seed
    got, want = drained(schedule), drained(expected)
    assert [t for t, _, _ in got] == [t for t, _, _ in want]
    assert sorted(got) == sorted(want)
