"""``finalize``: what an attempt's raw outcomes become before they are recorded, and what
the state then keeps of them until compaction (the delivery process sends copies of the
strings it was given; the state keeps one of each)."""

from __future__ import annotations

import random
import sys

from atmosrelay.delivery.backoff import RetryPolicy
from atmosrelay.delivery.outcomes import finalize
from atmosrelay.queue.records import Delivery, Outcome, RecipientState
from atmosrelay.queue.state import QueueState
from journal import Position
from tests.queue.factories import accepted_record

NOW = 1_800_000_100.0


def copy(text: str) -> str:
    """An equal string that is not the same object (as unpickled from the other process)."""
    return "".join(list(text))


def test_outcomes_are_numbered_timed_and_keep_the_messages_own_strings() -> None:
    state = QueueState()
    record = accepted_record("bob@example.net", "carol@example.net")
    state.add_accepted(record, Position(1, 0), 10)
    msg = state.messages[record.id]
    raw = [
        Outcome(copy("bob@example.net"), RecipientState.SENT, copy("2.0.0"), "250 ok"),
        Outcome(copy("carol@example.net"), RecipientState.DEFERRED, copy("4.2.0"), "451 later"),
    ]
    final = finalize(raw, msg, NOW, RetryPolicy(jitter=0.0), random.Random(1))
    assert [(o.recipient, o.outcome, o.attempt) for o in final] == [
        ("bob@example.net", RecipientState.SENT, 1),
        ("carol@example.net", RecipientState.DEFERRED, 1),
    ]
    assert final[0].next_at is None and final[1].next_at == NOW + 60.0
    keys = list(msg.recipient_states)
    assert all(o.recipient is k for o, k in zip(final, keys, strict=True))
    assert final[0].status is sys.intern("2.0.0") and final[1].status is sys.intern("4.2.0")

    state.add_delivery(Delivery(record.id, NOW, "mx.example.net", final), Position(1, 500))
    again = finalize(
        [Outcome(copy("carol@example.net"), RecipientState.DEFERRED, "4.2.0", "451 later")],
        msg,
        NOW + 60,
        RetryPolicy(jitter=0.0),
        random.Random(1),
    )
    assert again[0].attempt == 2 and again[0].next_at == NOW + 60 + 120.0
    assert again[0].recipient is keys[1]


def test_an_outcome_for_a_recipient_the_message_lacks_keeps_its_own_string() -> None:
    state = QueueState()
    record = accepted_record("bob@example.net")
    state.add_accepted(record, Position(1, 0), 10)
    stray = copy("eve@example.net")
    final = finalize(
        [Outcome(stray, RecipientState.SENT, "2.0.0")],
        state.messages[record.id],
        NOW,
        RetryPolicy(),
        random.Random(1),
    )
    assert final[0].recipient is stray
