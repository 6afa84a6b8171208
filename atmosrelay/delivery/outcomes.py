"""Outcome and bounce decisions, as pure functions (beside backoff.py): no I/O, no clock.

finalize         an attempt's raw outcomes -> what is recorded: every outcome numbered
                 (attempt n), a deferred one given its next time by the retry policy or,
                 past ``max_age``, turned into a bounce with 5.4.7
unresolvable     a destination that did not resolve: bounced when permanent, else deferred
dsn_statuses     a bounced message's per-recipient DSN fields, from its recorded history
dsn_record       the ACCEPTED record of the DSN itself: null sender, to the envelope
                 sender, naming the message and the recipients it reports (so a restart
                 between the bounce and the DSN sends it, once)
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Sequence

from msgspec.structs import replace

from atmosrelay.delivery.backoff import RetryPolicy
from atmosrelay.delivery.resolver import ResolutionFailed
from atmosrelay.message.dsn import RecipientStatus
from atmosrelay.queue.records import (
    Accepted,
    Delivery,
    Outcome,
    Recipient,
    RecipientState,
    new_queue_id,
)
from atmosrelay.queue.state import DSN_ACTION, DSN_FOR, DSN_RECIPIENTS, QueuedMessage

EXPIRED = "5.4.7"  # RFC 3463: delivery time expired


def finalize(
    outcomes: Iterable[Outcome],
    msg: QueuedMessage,
    now: float,
    policy: RetryPolicy,
    rng: random.Random,
) -> tuple[Outcome, ...]:
    final = []
    own = {r: r for r in msg.recipient_states}
    for o in outcomes:
        # the state keeps every outcome of a message until compaction drops it: a status
        # code is one of a few strings, one object each, and the recipient is the message's
        # own string (the delivery process sent a copy)
        o = replace(o, recipient=own.get(o.recipient, o.recipient), status=sys.intern(o.status))
        attempt = msg.attempts.get(o.recipient, 0) + 1
        if o.outcome == RecipientState.DEFERRED:
            at = policy.next_attempt(
                accepted_at=msg.record.accepted_at, now=now, attempt=attempt, rng=rng
            )
            if at is None:
                final.append(
                    replace(o, outcome=RecipientState.BOUNCED, status=EXPIRED, attempt=attempt)
                )
                continue
            final.append(replace(o, attempt=attempt, next_at=at))
        else:
            final.append(replace(o, attempt=attempt))
    return tuple(final)


def unresolvable(recipients: Sequence[str], exc: ResolutionFailed) -> list[Outcome]:
    outcome = RecipientState.BOUNCED if exc.permanent else RecipientState.DEFERRED
    return [Outcome(r, outcome, exc.status, str(exc)) for r in recipients]


def last_outcomes(msg: QueuedMessage) -> dict[str, tuple[Delivery, Outcome]]:
    out: dict[str, tuple[Delivery, Outcome]] = {}
    for delivery in msg.history:
        for o in delivery.outcomes:
            out[o.recipient] = (delivery, o)
    return out


def dsn_statuses(
    msg: QueuedMessage, owed: Sequence[str], action: str = "failed"
) -> list[RecipientStatus]:
    last = last_outcomes(msg)
    orcpt = {r.addr: r.orcpt for r in msg.record.recipients}
    return [
        RecipientStatus(
            recipient=r,
            action=action,
            status=last[r][1].status,
            diagnostic=last[r][1].reply,
            remote_mta=last[r][0].mta,
            last_attempt=last[r][0].at,
            original_recipient=orcpt.get(r),
        )
        for r in owed
    ]


def dsn_record(
    msg: QueuedMessage, owed: Sequence[str], size: int, now: float, action: str = "failed"
) -> Accepted:
    return Accepted(
        id=new_queue_id(now),
        accepted_at=now,
        did=msg.record.did,
        sender="",
        recipients=(Recipient(msg.record.sender),),
        ret=None,
        envid=None,
        category="transactional",
        bulk=False,
        tags=(),
        metadata={
            DSN_FOR: msg.id,
            DSN_RECIPIENTS: "\n".join(owed),
            **({DSN_ACTION: action} if action != "failed" else {}),
        },
        client={},
        size=size,
    )
