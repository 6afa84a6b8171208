"""The dispatcher and its lanes: from the queue state to delivery attempts, one lane per
destination.

    dispatcher: every recipient that is due (never tried, or deferred and its time come) ->
                resolve its domain -> the lane of that destination (keyed by its MX set, so
                domains at one provider share a lane) -> work item (message, recipients)
    lane:       at most ``concurrency`` deliveries at once to its destination; each reads the
                body back from the journal, signs it (in a worker thread), runs one attempt
                (client_session.deliver), and records the outcomes (DELIVERY record through
                the journal's group commit, then the queue state)

Deferred recipients get their next time from the retry policy; past ``max_age`` they bounce
with 5.4.7. A permanent resolution failure bounces at once; a temporary one defers. Lanes run
under ``supervise()``: a crash is logged and the lane restarted, within bounds. Times are the
``clock`` (wall time in the relay; trio's virtual time in tests); waiting is on trio's clock.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from atmosrelay.delivery.backoff import RetryPolicy
from atmosrelay.delivery.client_session import AttemptResult, Connect, Envelope, deliver
from atmosrelay.delivery.resolver import Destination, ResolutionFailed, Resolver
from atmosrelay.queue.records import Delivery, Outcome, RecordType, encode_delivery
from atmosrelay.queue.state import QueuedMessage, domain_of
from atmosrelay.queue.store import QueueStore
from atmosrelay.supervise import supervise

log = logging.getLogger("atmosrelay.delivery")

IDLE_POLL: Final = 60.0  # with nothing due, look again at least this often

Deliver = Callable[..., Awaitable[AttemptResult]]
Sign = Callable[[QueuedMessage, bytes], bytes]  # returns the signature headers to prepend


@attrs.define
class DeliverySettings:
    helo: str
    tls: ssl.SSLContext
    policy: RetryPolicy = attrs.field(factory=RetryPolicy)
    concurrency: int = 4  # connections per destination
    require_tls: frozenset[str] = frozenset()  # recipient domains that must get TLS


def _by_message(items: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(queue id, recipient) pairs grouped by queue id, in order."""
    out: dict[str, list[str]] = {}
    for queue_id, rcpt in items:
        out.setdefault(queue_id, []).append(rcpt)
    return out


@attrs.frozen
class Work:
    queue_id: str
    recipients: tuple[str, ...]
    destination: Destination


class Dispatcher:
    def __init__(
        self,
        queue: QueueStore,
        resolver: Resolver,
        settings: DeliverySettings,
        *,
        sign: Sign | None = None,
        deliver_fn: Deliver = deliver,
        connect: Connect | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.queue = queue
        self.resolver = resolver
        self.settings = settings
        self.sign = sign
        self.deliver_fn = deliver_fn
        self.connect = connect
        self.clock = clock
        self.rng = rng or random.Random()
        self.in_flight: set[tuple[str, str]] = set()
        self.lanes: dict[str, trio.MemorySendChannel[Work]] = {}
        self._wake = trio.Event()

    def notify(self) -> None:
        """Something changed (a message was accepted): look again now."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as lanes:
            task_status.started()
            while True:
                self._wake = trio.Event()
                await self._dispatch(lanes)
                with trio.move_on_after(self._until_next_due()):
                    await self._wake.wait()

    def _until_next_due(self) -> float:
        now = self.clock()
        waits = [
            at - now
            for msg in self.queue.state.messages.values()
            for rcpt, at in msg.next_at.items()
            if (msg.id, rcpt) not in self.in_flight
        ]
        return max(0.0, min([IDLE_POLL, *waits]))

    async def _dispatch(self, lanes: trio.Nursery) -> None:
        now = self.clock()
        due = self.queue.state.pending_by_destination(now)
        for domain, items in due.items():
            items = [(q, r) for q, r in items if (q, r) not in self.in_flight]
            if not items:
                continue
            try:
                destination = await self.resolver.destination(domain)
            except ResolutionFailed as exc:
                await self._resolution_failed(items, exc)
                continue
            channel = self.lanes.get(destination.key)
            if channel is None:
                send, receive = trio.open_memory_channel[Work](float("inf"))
                self.lanes[destination.key] = channel = send
                lanes.start_soon(
                    supervise, f"lane {destination.key}", lambda r=receive: self._lane(r)
                )
            self.in_flight.update(items)
            for queue_id, rcpts in _by_message(items).items():
                channel.send_nowait(Work(queue_id, tuple(rcpts), destination))

    async def _resolution_failed(self, items: list[tuple[str, str]], exc: ResolutionFailed) -> None:
        for queue_id, rcpts in _by_message(items).items():
            outcome = "bounced" if exc.permanent else "deferred"
            outcomes = [Outcome(r, outcome, exc.status, str(exc)) for r in rcpts]
            await self._record(queue_id, None, outcomes)

    async def _lane(self, receive: trio.MemoryReceiveChannel[Work]) -> None:
        limiter = trio.CapacityLimiter(self.settings.concurrency)
        async with trio.open_nursery() as attempts:
            async for work in receive:
                token = object()  # the attempt, not the lane, holds the slot
                await limiter.acquire_on_behalf_of(token)
                attempts.start_soon(self._attempt, work, limiter, token)

    async def _attempt(self, work: Work, limiter: trio.CapacityLimiter, token: object) -> None:
        try:
            msg = self.queue.state.messages.get(work.queue_id)
            if msg is None:
                return
            record = await self.queue.journal.read(msg.position)
            body = record.payload[msg.body_offset :]
            if self.sign is not None:
                body = await trio.to_thread.run_sync(self.sign, msg, body) + body
            notify = {r.addr: r.notify for r in msg.record.recipients}
            orcpt = {r.addr: r.orcpt for r in msg.record.recipients}
            envelope = Envelope(
                msg.record.sender, work.recipients, notify, orcpt, msg.record.ret, msg.record.envid
            )
            require = any(domain_of(r) in self.settings.require_tls for r in work.recipients)
            kwargs = {"connect": self.connect} if self.connect is not None else {}
            result = await self.deliver_fn(
                work.destination,
                envelope,
                body,
                helo=self.settings.helo,
                tls=self.settings.tls,
                require_tls=require,
                **kwargs,
            )
            await self._record(work.queue_id, result.mta, list(result.outcomes))
        finally:
            for rcpt in work.recipients:
                self.in_flight.discard((work.queue_id, rcpt))
            limiter.release_on_behalf_of(token)
            self._wake.set()

    async def _record(self, queue_id: str, mta: str | None, outcomes: list[Outcome]) -> None:
        """Give deferred outcomes their next time (or bounce them when too old), then make
        the attempt durable and apply it."""
        msg = self.queue.state.messages.get(queue_id)
        if msg is None:
            return
        now = self.clock()
        final = []
        for o in outcomes:
            attempt = msg.attempts.get(o.recipient, 0) + 1
            if o.outcome == "deferred":
                at = self.settings.policy.next_attempt(
                    accepted_at=msg.record.accepted_at, now=now, attempt=attempt, rng=self.rng
                )
                if at is None:
                    final.append(
                        attrs.evolve(o, outcome="bounced", status="5.4.7", attempt=attempt)
                    )
                    continue
                final.append(attrs.evolve(o, attempt=attempt, next_at=at))
            else:
                final.append(attrs.evolve(o, attempt=attempt))
        delivery = Delivery(queue_id, now, mta, tuple(final))
        await self.queue.journal.append(RecordType.DELIVERY, encode_delivery(delivery))
        self.queue.state.add_delivery(delivery)
        for o in final:
            log.info(
                "%s %s %s %s via %s: %s",
                queue_id,
                o.recipient,
                o.outcome,
                o.status,
                mta or "-",
                o.reply or "",
            )
