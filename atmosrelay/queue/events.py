"""Typed events of the queue: what happened to a message, as it happens.

``QueueStore`` publishes them to its ``EventFeed`` right after the record that says so is
durable and folded into the state, and only then: a subscriber never hears of something a
crash could take back. Replaying the journal at startup publishes nothing (whatever keeps
counts from these events persists them itself, see atmosrelay/submission/counting.py).

    MessageAccepted   an ACCEPTED record (a member's message, or a DSN: sender "")
    AttemptOutcome    one recipient's outcome of one attempt (deferred ones included)
    Delivered         a recipient's final outcome was "sent"
    Bounced           ... was "bounced" (a remote 5xx, a permanent DNS failure, or expiry)
    MessageDeleted    the operator deleted a message
    Reported          a remote's own report, after it took the message, that a recipient
                      bounced (or is delayed): an asynchronous DSN the inbound listener
                      received (atmosrelay/inbound/processor.py)
    Complained        a recipient reported a message as spam (an ARF report the inbound
                      listener received)

Subscribers are called synchronously, in order, on the event loop: they must be quick and
must not raise (hand slow work, such as a store write, to a task through a channel).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from atmosrelay.queue.records import Accepted, Outcome


@attrs.frozen
class MessageAccepted:
    record: Accepted


@attrs.frozen
class AttemptOutcome:
    queue_id: str
    did: str
    sender: str
    outcome: Outcome
    mta: str | None
    at: float


@attrs.frozen
class Delivered:
    queue_id: str
    did: str
    sender: str
    recipient: str
    at: float


@attrs.frozen
class Bounced:
    queue_id: str
    did: str
    sender: str
    recipient: str
    status: str
    reply: str | None
    at: float


@attrs.frozen
class MessageDeleted:
    queue_id: str
    reason: str
    at: float


@attrs.frozen
class Reported:
    queue_id: str
    did: str
    sender: str
    recipient: str
    outcome: str  # "bounced" or "deferred"
    status: str
    reply: str | None
    mta: str | None  # the MTA that reported it
    at: float


@attrs.frozen
class Complained:
    did: str
    sender: str  # the complained-of message's envelope sender (its domain is judged)
    recipient: str
    at: float
    queue_id: str | None = None


QueueEvent = (
    MessageAccepted | AttemptOutcome | Delivered | Bounced | MessageDeleted | Reported | Complained
)
Subscriber = Callable[[QueueEvent], None]


class EventFeed:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def publish(self, event: QueueEvent) -> None:
        for subscriber in self._subscribers:
            subscriber(event)
