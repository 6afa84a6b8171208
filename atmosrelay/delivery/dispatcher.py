"""The dispatcher and its lanes: from the queue's schedule to delivery attempts, one lane per
destination.

    dispatcher: take what the schedule says is due (O(log n) each, never a scan of the
                queue) -> resolve its domain (cached a minute) -> the lane of that
                destination (keyed by its MX set, so domains at one provider share a lane)
                -> a work item (message, recipients; one recipient per item for bulk mail,
                whose List-Unsubscribe is made for each recipient)
    lane:       a channel of work and up to ``concurrency`` workers, started on demand;
                each worker holds one connection and reuses it (RSET between messages)
                while the lane has work, closes it after ``idle`` seconds without, and the
                lane is forgotten when its last worker leaves
    attempt:    read the body back from the journal, prepare it (List-Unsubscribe, the
                DKIM signatures; in a worker thread), one transaction, then the outcomes:
                a DELIVERY record through the journal's group commit, then the state

Deferred recipients get their next time from the retry policy; past ``max_age`` they bounce
with 5.4.7. A permanent resolution failure bounces at once; a temporary one defers. A bounce
the sender asked to hear about queues an RFC 3464 DSN to them (null sender, through the same
lanes); the DSN's ACCEPTED record names what it reports, so a restart between the bounce and
the DSN still sends it, once.

Workers run under ``supervise()``: a crash is logged and the worker restarted, within
bounds; the recipients it held go back on the schedule a minute later. A lane whose worker
keeps crashing past those bounds (a bug that one remote triggers every time) is *parked*:
its waiting work and whatever is routed to it go back on the schedule for when the park
ends (``PARK_BASE``, doubling per park in a row up to ``PARK_MAX``), a CRITICAL log line
says so, and every other destination goes on. Nothing is ever started in a nursery that
is being cancelled. (The alternative, stopping the relay so a service manager restarts it,
would let one remote halt all delivery; see docs/security.md.) ``drain(grace)``
stops taking work; workers finish the transaction in hand and leave; at the deadline the
rest is cancelled (nothing is recorded for it, so it is tried again after the restart).

Times are the ``clock`` (wall time in the relay; trio's virtual time in tests); waiting is
on trio's clock.
"""

from __future__ import annotations

import collections
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Final

import attrs
import trio

from atmosrelay.delivery.backoff import RetryPolicy
from atmosrelay.delivery.client_session import (
    Connect,
    ConnectFailed,
    Envelope,
    Remote,
    open_remote,
)
from atmosrelay.delivery.resolver import Destination, ResolutionFailed, Resolver
from atmosrelay.message.dsn import RecipientStatus, build_dsn
from atmosrelay.queue.records import (
    PENDING,
    Accepted,
    Delivery,
    Outcome,
    Recipient,
    new_queue_id,
)
from atmosrelay.queue.state import DSN_FOR, DSN_RECIPIENTS, QueuedMessage, domain_of
from atmosrelay.queue.store import QueueStore
from atmosrelay.supervise import GaveUp, supervise
from journal import Record

log = logging.getLogger("atmosrelay.delivery")

IDLE_POLL: Final = 60.0  # with nothing due, look again at least this often
# Work waiting in the lanes' channels, at most: a deep queue (100,000 after a restart) is
# fed to the lanes as they drain, so the first deliveries start at once, memory stays flat,
# and a destination that is due later is not stuck behind everything due now.
MAX_BACKLOG: Final = 2000
CRASH_RETRY: Final = 60.0  # recipients of a crashed attempt are tried again after this
PARK_BASE: Final = 300.0  # a lane whose worker kept crashing rests this long first ...
PARK_MAX: Final = 6 * 3600.0  # ... doubling per park in a row, up to this

OpenRemote = Callable[..., Awaitable[Remote]]
# (message, its recipients in this transaction, body) -> the bytes to send (signed)
Prepare = Callable[[QueuedMessage, tuple[str, ...], bytes], bytes]


@attrs.define
class DeliverySettings:
    helo: str
    tls: ssl.SSLContext
    operator_domain: str = "localhost"
    policy: RetryPolicy = attrs.field(factory=RetryPolicy)
    concurrency: int = 4  # connections per destination
    require_tls: frozenset[str] = frozenset()  # recipient domains that must get TLS
    idle: float = 5.0  # a worker keeps its connection this long without work
    destination_ttl: float = 60.0  # a resolved destination is reused this long
    restart_spread: float = 60.0  # overdue retries after a restart spread over this


@attrs.frozen
class Work:
    queue_id: str
    recipients: tuple[str, ...]
    destination: Destination


@attrs.define(eq=False)
class Lane:
    key: str
    send: trio.MemorySendChannel[Work]
    receive: trio.MemoryReceiveChannel[Work]
    workers: int = 0
    parked_until: float = 0.0  # the clock's time; work for it waits on the schedule till then
    parks: int = 0  # parks in a row (an attempt that ends without a crash resets it)
    crashes: collections.deque[float] = attrs.field(factory=collections.deque)  # all workers'


class Dispatcher:
    def __init__(
        self,
        queue: QueueStore,
        resolver: Resolver,
        settings: DeliverySettings,
        *,
        prepare: Prepare | None = None,
        open_fn: OpenRemote = open_remote,
        connect: Connect | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.queue = queue
        self.resolver = resolver
        self.settings = settings
        self.prepare = prepare
        self.open_fn = open_fn
        self.connect = connect
        self.clock = clock
        self.rng = rng or random.Random()
        self.in_flight: set[tuple[str, str]] = set()
        self.lanes: dict[str, Lane] = {}
        self.connections = 0
        self.draining = False
        self._destinations: dict[str, tuple[float, Destination]] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    def notify(self) -> None:
        """Something changed (a message was accepted): look again now."""
        self._wake.set()

    def drain(self, grace: float) -> None:
        """Stop taking work; what is in hand gets ``grace`` seconds, then is cancelled."""
        self.draining = True
        self._wake.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = trio.current_time() + grace

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until ``drain()``; returns when the lanes have stopped."""
        state = self.queue.state
        spread = state.spread_overdue(self.clock(), self.settings.restart_spread, self.rng)
        if spread:
            log.info("%d overdue retries spread over %gs", spread, self.settings.restart_spread)
        async with trio.open_nursery() as lanes:
            self._nursery = lanes
            task_status.started()
            for msg in list(state.messages.values()):
                if msg.dsn_owed():  # the relay stopped between a bounce and its DSN
                    await self._queue_dsn(msg)
            while not self.draining:
                self._wake = trio.Event()
                await self._dispatch()
                wait = IDLE_POLL if self._backlog() >= MAX_BACKLOG else self._until_next_due()
                with trio.move_on_after(wait):  # an attempt ending wakes it early
                    await self._wake.wait()
            for lane in self.lanes.values():
                lane.send.close()  # idle workers leave; busy ones after their transaction

    def _until_next_due(self) -> float:
        at = self.queue.state.next_due()
        return IDLE_POLL if at is None else min(IDLE_POLL, max(0.0, at - self.clock()))

    def _backlog(self) -> int:
        return sum(lane.receive.statistics().current_buffer_used for lane in self.lanes.values())

    async def _dispatch(self) -> None:
        room = MAX_BACKLOG - self._backlog()
        if room <= 0:
            return
        by_domain: dict[str, list[tuple[str, str]]] = {}
        for queue_id, rcpt in self.queue.state.take_due(self.clock(), room):
            if (queue_id, rcpt) not in self.in_flight:
                by_domain.setdefault(domain_of(rcpt), []).append((queue_id, rcpt))
        for domain, items in by_domain.items():
            try:
                destination = await self._destination(domain)
            except ResolutionFailed as exc:
                await self._resolution_failed(items, exc)
                continue
            self.in_flight.update(items)
            for queue_id, rcpts in _by_message(items).items():
                msg = self.queue.state.messages[queue_id]
                groups = [(r,) for r in rcpts] if msg.record.bulk else [tuple(rcpts)]
                for group in groups:
                    self._route(Work(queue_id, group, destination))

    async def _destination(self, domain: str) -> Destination:
        now = trio.current_time()
        cached = self._destinations.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        destination = await self.resolver.destination(domain)
        self._destinations[domain] = (now + self.settings.destination_ttl, destination)
        return destination

    def parked(self) -> dict[str, float]:
        """Parked lanes: destination key -> when the park ends (the clock's time)."""
        now = self.clock()
        return {k: lane.parked_until for k, lane in self.lanes.items() if lane.parked_until > now}

    def _route(self, work: Work) -> None:
        key = work.destination.key
        lane = self.lanes.get(key)
        if lane is None:
            send, receive = trio.open_memory_channel[Work](float("inf"))
            lane = self.lanes[key] = Lane(key, send, receive)
        if lane.parked_until > self.clock():
            self._postpone(work, lane.parked_until)
            return
        lane.send.send_nowait(work)  # straight to a waiting worker, if there is one
        self._staff(lane)

    def _postpone(self, work: Work, at: float) -> None:
        for rcpt in work.recipients:
            self.in_flight.discard((work.queue_id, rcpt))
            self.queue.state.schedule(work.queue_id, rcpt, at)

    def _staff(self, lane: Lane) -> None:
        """One more worker when work waits in the buffer and the lane has room for one;
        never into a nursery that is being cancelled, nor for a parked lane."""
        assert self._nursery is not None
        if self.draining or self._nursery.cancel_scope.cancel_called:
            return
        waiting = lane.receive.statistics().current_buffer_used
        if waiting and lane.workers < self.settings.concurrency:
            lane.workers += 1
            self._nursery.start_soon(self._run_worker, lane)

    def _park(self, lane: Lane, gave_up: GaveUp) -> None:
        """Rest a lane whose worker kept crashing; its waiting work goes back on the
        schedule for when the park ends. Another worker of the lane that gives up while
        it is parked changes nothing."""
        if lane.parked_until > self.clock():
            return
        rest = min(PARK_MAX, PARK_BASE * 2.0**lane.parks)
        lane.parks += 1
        lane.parked_until = self.clock() + rest
        postponed = 0
        while True:
            try:
                work = lane.receive.receive_nowait()
            except trio.WouldBlock:
                break
            self._postpone(work, lane.parked_until)
            postponed += 1
        log.critical(
            "lane %s parked for %gs (park %d in a row): its worker %s; %d waiting "
            "transaction(s) and all new work for it wait until then; other destinations "
            "are unaffected",
            lane.key,
            rest,
            lane.parks,
            gave_up,
            postponed,
        )
        self._wake.set()

    async def _run_worker(self, lane: Lane) -> None:
        try:
            await supervise(f"lane {lane.key}", lambda: self._worker(lane), crashes=lane.crashes)
        except GaveUp as gave_up:
            self._park(lane, gave_up)
        finally:
            lane.workers -= 1
            # nothing awaits between these checks and the removal: no work can slip in
            self._staff(lane)
            idle = lane.workers == 0 and lane.parked_until <= self.clock()
            if idle and self.lanes.get(lane.key) is lane:
                del self.lanes[lane.key]

    async def _worker(self, lane: Lane) -> None:
        remote: Remote | None = None
        try:
            while not self.draining:
                try:
                    with trio.move_on_after(self.settings.idle) as idle:
                        work = await lane.receive.receive()
                except trio.EndOfChannel:
                    return
                if idle.cancelled_caught:
                    return
                remote = await self._attempt(work, remote)
                lane.parks = 0  # an attempt that ended without a crash
        finally:
            if remote is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await remote.aclose()

    async def _attempt(self, work: Work, remote: Remote | None) -> Remote | None:
        """Deliver ``work``, on ``remote`` if it still fits; returns the connection to keep."""
        recorded = False
        try:
            msg = self.queue.state.messages.get(work.queue_id)
            if msg is None:  # deleted meanwhile
                recorded = True
                return remote
            body = await self.queue.journal.read_then(
                msg.position, partial(self._prepared, msg, work.recipients)
            )
            require = any(domain_of(r) in self.settings.require_tls for r in work.recipients)
            if remote is not None and require and not remote.tls:
                await remote.aclose()
                remote = None
            try:
                remote, outcomes = await self._transaction(
                    work, _envelope(msg, work.recipients), body, remote, require
                )
            except ConnectFailed as failed:
                await self._record(work.queue_id, None, failed.outcomes(work.recipients))
                recorded = True
                return None
            await self._record(work.queue_id, remote.host, outcomes)
            recorded = True
            if remote.usable:
                return remote
            await remote.aclose()
            return None
        finally:
            for rcpt in work.recipients:
                self.in_flight.discard((work.queue_id, rcpt))
                if not recorded and not self.draining:  # a crash: back on the schedule
                    msg = self.queue.state.messages.get(work.queue_id)
                    if msg is not None and msg.recipient_states.get(rcpt) in PENDING:
                        self.queue.state.schedule(work.queue_id, rcpt, self.clock() + CRASH_RETRY)
            self._wake.set()

    def _prepared(self, msg: QueuedMessage, recipients: tuple[str, ...], record: Record) -> bytes:
        """The bytes to send (in the worker thread that read the record)."""
        body = record.payload[msg.body_offset :]
        return body if self.prepare is None else self.prepare(msg, recipients, body)

    async def _transaction(
        self,
        work: Work,
        envelope: Envelope,
        body: bytes,
        remote: Remote | None,
        require_tls: bool,
    ) -> tuple[Remote, tuple[Outcome, ...]]:
        """One transaction, on ``remote`` when it is still open. A reused connection that
        turns out dead (the server dropped it while idle) is replaced once, without
        counting an attempt. Raises ConnectFailed when no host will take a new one."""
        if remote is not None and remote.usable:
            outcomes = await remote.send(envelope, body)
            if remote.usable:
                return remote, outcomes
        if remote is not None:
            await remote.aclose()
        remote = await self._open(work.destination, require_tls)
        return remote, await remote.send(envelope, body)

    async def _open(self, destination: Destination, require_tls: bool) -> Remote:
        kwargs = {"connect": self.connect} if self.connect is not None else {}
        remote = await self.open_fn(
            destination,
            helo=self.settings.helo,
            tls=self.settings.tls,
            require_tls=require_tls,
            **kwargs,
        )
        self.connections += 1
        return remote

    async def _resolution_failed(self, items: list[tuple[str, str]], exc: ResolutionFailed) -> None:
        for queue_id, rcpts in _by_message(items).items():
            outcome = "bounced" if exc.permanent else "deferred"
            outcomes = [Outcome(r, outcome, exc.status, str(exc)) for r in rcpts]
            await self._record(queue_id, None, outcomes)

    async def _record(self, queue_id: str, mta: str | None, outcomes: Sequence[Outcome]) -> None:
        """Give deferred outcomes their next time (or bounce them when too old), make the
        attempt durable and apply it; then queue the DSN a bounce may owe."""
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
        await self.queue.record(Delivery(queue_id, now, mta, tuple(final)))
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
        if msg.dsn_owed():
            await self._queue_dsn(msg)

    async def _queue_dsn(self, msg: QueuedMessage) -> None:
        """Queue the DSN for ``msg``'s bounced recipients (to its envelope sender, from the
        null sender); its record covers them, so it is never sent twice."""
        owed = msg.dsn_owed()
        last = _last_outcomes(msg)
        orcpt = {r.addr: r.orcpt for r in msg.record.recipients}
        statuses = [
            RecipientStatus(
                recipient=r,
                action="failed",
                status=last[r][1].status,
                diagnostic=last[r][1].reply,
                remote_mta=last[r][0].mta,
                last_attempt=last[r][0].at,
                original_recipient=orcpt.get(r),
            )
            for r in owed
        ]
        original = await self.queue.journal.read(msg.position)
        now = self.clock()
        dsn = build_dsn(
            reporting_mta=self.settings.helo,
            operator_domain=self.settings.operator_domain,
            sender=msg.record.sender,
            original=original.payload[msg.body_offset :],
            statuses=statuses,
            envid=msg.record.envid,
            arrival=msg.record.accepted_at,
            ret_full=msg.record.ret == "FULL",
        )
        record = Accepted(
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
            metadata={DSN_FOR: msg.id, DSN_RECIPIENTS: "\n".join(owed)},
            client={},
            size=len(dsn),
        )
        await self.queue.accept(record, dsn)
        log.info("%s: DSN %s queued to %s for %s", msg.id, record.id, msg.record.sender, owed)
        self._wake.set()


def _by_message(items: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(queue id, recipient) pairs grouped by queue id, in order."""
    out: dict[str, list[str]] = {}
    for queue_id, rcpt in items:
        out.setdefault(queue_id, []).append(rcpt)
    return out


def _envelope(msg: QueuedMessage, recipients: tuple[str, ...]) -> Envelope:
    notify = {r.addr: r.notify for r in msg.record.recipients}
    orcpt = {r.addr: r.orcpt for r in msg.record.recipients}
    return Envelope(msg.record.sender, recipients, notify, orcpt, msg.record.ret, msg.record.envid)


def _last_outcomes(msg: QueuedMessage) -> dict[str, tuple[Delivery, Outcome]]:
    out: dict[str, tuple[Delivery, Outcome]] = {}
    for delivery in msg.history:
        for o in delivery.outcomes:
            out[o.recipient] = (delivery, o)
    return out
