"""The policy's counters at a start (submission/counting.py): what the store holds, plus
what the journal holds past the last flush: recipients accepted, sends and bounces."""

from __future__ import annotations

from pathlib import Path

from msgspec.structs import replace

from atmosrelay.accounts.store import Store
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.limits import recipients_key
from atmosrelay.policy.rules import bounced_key, sent_key
from atmosrelay.queue.records import Delivery, Outcome, Recipient
from atmosrelay.queue.state import QueueState
from atmosrelay.submission.counting import load_counters
from journal import Position
from tests.queue.factories import ALICE_DID, accepted_record

NOW = 1_800_003_600.0
MARK = 1_800_000_000.0  # the last flush: what is older is in the store already
OTHER = "did:plc:zyxwvutsrqponmlkjihgfedc"
HOUR = 3600.0


def _state() -> QueueState:
    state = QueueState()
    records = [
        # past the mark: counted, one recipient each
        accepted_record("a@example.net", accepted_at=MARK + 10),
        accepted_record("b@example.net", accepted_at=MARK + 20),
        # three recipients, one unsubscribed from this bulk mail: two count
        accepted_record(
            "c@example.net",
            Recipient("gone@example.net", suppressed=True),
            "d@example.net",
            accepted_at=MARK + 30,
        ),
        # a lone unsubscribed recipient: the message counts nothing
        accepted_record(Recipient("gone@example.net", suppressed=True), accepted_at=MARK + 40),
        # before the mark: the store has it
        accepted_record("old@example.net", accepted_at=MARK - 10),
        # a DSN (empty sender) and a forward from the operator's domain: nobody's
        replace(accepted_record("x@example.net", sender="", accepted_at=MARK + 50), did=OTHER),
        replace(
            accepted_record("y@example.net", sender="fwd@Operator.example", accepted_at=MARK + 60),
            did=OTHER,
        ),
    ]
    for i, record in enumerate(records):
        state.add_accepted(record, Position(1, 100 * (i + 1)), 10)
    # the old message was sent before the mark and bounced after it; the first one sent after
    old, first = records[4], records[0]
    state.add_delivery(
        Delivery(old.id, MARK - 5, None, (Outcome("old@example.net", "deferred", "4.0.0"),))
    )
    state.add_delivery(
        Delivery(old.id, MARK + 100, None, (Outcome("old@example.net", "bounced", "5.1.1"),))
    )
    state.add_delivery(
        Delivery(first.id, MARK + 110, None, (Outcome("a@example.net", "sent", "2.0.0"),))
    )
    return state


def test_a_start_counts_the_journal_past_the_last_flush_and_nothing_twice(
    tmp_path: Path,
) -> None:
    store = Store(str(tmp_path / "accounts.db"))
    store.add_counts({(recipients_key(ALICE_DID), MARK - 60): 7}, journal="j", until=MARK)
    policy = Policy()
    rows, replayed, _ = load_counters(store, policy, _state(), "j", NOW, "operator.example")
    counters = policy.counters
    # 7 from the store, and 1 + 1 + 2 + 0 recipients accepted past the mark
    assert counters.total(recipients_key(ALICE_DID), NOW, 2 * HOUR) == 7 + 4
    assert (rows, replayed) == (1, 4)
    assert counters.total(sent_key("example.org"), NOW, 2 * HOUR) == 1
    assert counters.total(bounced_key("example.org"), NOW, 2 * HOUR) == 1
    assert counters.total(recipients_key(OTHER), NOW, 2 * HOUR) == 0
    assert counters.total(sent_key("operator.example"), NOW, 2 * HOUR) == 0
    # what the journal added is flushed again; what the store gave is not
    assert sum(counters.take_unflushed().values()) == 4 + 1 + 1
    store.close()
