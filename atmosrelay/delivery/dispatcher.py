"""The dispatcher: from the schedule to delivery attempts, and from their outcomes to records.

    dispatcher: take what the schedule says is due (queue/schedule.py: O(log n) each, never
                a scan of the queue) -> resolve its domain (cached a minute) -> the lane of
                that destination (delivery/lane.py; keyed by its MX set, so domains at one
                provider share a lane) -> a work item (message, recipients; one recipient
                per item for bulk mail, whose List-Unsubscribe is made for each recipient)
    attempt:    what a lane's worker does with a work item: a Job handed to the carrier
                (delivery/carry.py), which reads the body back from the journal, prepares
                it (List-Unsubscribe, the DKIM signatures) and runs one transaction, here or
                in a delivery process; then the outcomes (delivery/outcomes.py decides
                retry times, expiry and the DSN): a DELIVERY record through the journal's
                group commit, then the state, then the queue's events. Only this process
                writes records, whichever carries the attempt.

A permanent resolution failure bounces at once; a temporary one defers. A bounce the sender
asked to hear about queues an RFC 3464 DSN to them (null sender, through the same lanes);
the DSN's ACCEPTED record names what it reports, so a restart between the bounce and the
DSN still sends it, once. The recipients of an attempt that crashed go back on the schedule
a minute later; those of an attempt lost with its delivery process, two seconds later,
uncounted. ``drain(grace)`` stops taking work; workers finish the transaction in hand
and leave; at the deadline the rest is cancelled (nothing is recorded for it, so it is tried
again after the restart).

Times are the ``clock`` (wall time in the relay; trio's virtual time in tests); waiting is
on trio's clock.
"""

from __future__ import annotations

import logging
import random
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import attrs
import trio

from atmosrelay.delivery.backoff import RetryPolicy
from atmosrelay.delivery.carry import (
    Carrier,
    CarrierLost,
    Connection,
    Job,
    LocalCarrier,
    Prepare,
)
from atmosrelay.delivery.client_session import Connect, Envelope, Remote, open_remote
from atmosrelay.delivery.lane import Lane, Lanes, Work
from atmosrelay.delivery.outcomes import dsn_record, dsn_statuses, finalize, unresolvable
from atmosrelay.delivery.prepare import Signing
from atmosrelay.delivery.resolver import Destination, ResolutionFailed, Resolver
from atmosrelay.inbound.addresses import ReturnPath
from atmosrelay.logs import fields
from atmosrelay.message.dsn import build_dsn
from atmosrelay.queue.records import PENDING, Delivery, Outcome
from atmosrelay.queue.schedule import Schedule
from atmosrelay.queue.state import QueuedMessage, domain_of
from atmosrelay.queue.store import QueueStore
from journal import JournalError

log = logging.getLogger("atmosrelay.delivery")

IDLE_POLL: Final = 60.0  # with nothing due, look again at least this often
# Work waiting in the lanes' channels, at most: a deep queue (100,000 after a restart) is
# fed to the lanes as they drain, so the first deliveries start at once, memory stays flat,
# and a destination that is due later is not stuck behind everything due now.
MAX_BACKLOG: Final = 2000
CRASH_RETRY: Final = 60.0  # recipients of a crashed attempt are tried again after this

LOST_RETRY: Final = 2.0  # recipients in hand when the delivery process went away


class RecordFailed(Exception):
    """A worker's attempt is refused because an earlier outcome could not be recorded."""


OpenRemote = Callable[..., Awaitable[Remote]]


@attrs.define
class DeliverySettings:
    helo: str
    tls: ssl.SSLContext
    operator_domain: str = "localhost"
    policy: RetryPolicy = attrs.field(factory=RetryPolicy)
    concurrency: int = 4  # connections per destination
    require_tls: frozenset[str] = frozenset()  # recipient domains that must get TLS
    chunking: bool = True  # BDAT to remotes that offer CHUNKING
    idle: float = 5.0  # a worker keeps its connection this long without work
    destination_ttl: float = 60.0  # a resolved destination is reused this long
    restart_spread: float = 60.0  # overdue retries after a restart spread over this
    # VERP (inbound/addresses.py): the envelope sender of member mail becomes
    # bounces+TOKEN@<operator domain>, so later bounces reach the inbound listener
    return_path: ReturnPath | None = None


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
        carrier: Carrier | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.queue = queue
        self.resolver = resolver
        self.settings = settings
        self.prepare = prepare  # what the relay reloads the operator key into (runtime.py)
        self.open_fn = open_fn
        self.connect = connect
        self.clock = clock
        self.rng = rng or random.Random()
        # where attempts are carried: here, or in the delivery process (delivery/carry.py)
        self.carrier: Carrier = carrier or LocalCarrier(queue.journal, prepare, self._open)
        # (the account store's generation, the operator's DKIM selector), given to the
        # carrier with each attempt; the relay sets it (runtime.py)
        self.keys: Callable[[], tuple[int, str]] = lambda: (0, "")
        self.schedule = Schedule.from_state(queue.state)
        queue.events.subscribe(self.schedule.on_event)
        self.in_flight: set[tuple[str, str]] = set()
        self.connections = 0
        self._lanes = Lanes(
            concurrency=settings.concurrency,
            idle=settings.idle,
            attempt=self._attempt,
            postpone=self._postpone,
            woken=self.notify,
            clock=clock,
        )
        self._destinations: dict[str, tuple[float, Destination]] = {}
        self._wake = trio.Event()
        self._overdue: list[tuple[str, str]] = []  # from ``loaded``, for ``all_loaded``
        # A worker's carried attempt whose outcome is not recorded yet, set when it is: the
        # worker may start its next attempt meanwhile, but waits for it before handing that
        # one's outcome on. So a journal slow to write holds the lanes back, and a kill
        # leaves at most two messages a connection delivered but not recorded (delivered
        # again after the restart), where a worker recording in line left one.
        self._unrecorded: dict[trio.lowlevel.Task, trio.Event] = {}
        self._recorders: trio.Nursery | None = None  # where those are recorded (``run``)
        self._record_failures = 0  # each fails the next attempt a worker starts

    @property
    def lanes(self) -> dict[str, Lane]:
        return self._lanes.lanes

    @property
    def draining(self) -> bool:
        return self._lanes.draining

    def parked(self) -> dict[str, float]:
        """Parked lanes: destination key -> when the park ends (the clock's time)."""
        return self._lanes.parked()

    def notify(self) -> None:
        """Something changed (a message was accepted): look again now."""
        self._wake.set()

    async def loaded(self, messages: list[QueuedMessage]) -> None:
        """Messages the start decoded after delivery began (queue/store.py, ``load_rest``):
        scheduled, and any DSN they owe queued; their overdue retries wait for
        ``all_loaded`` to be spread with every other one."""
        now = self.clock()
        self._overdue.extend(self.schedule.add(messages, now))
        for msg in messages:
            if msg.history:
                await self._owed_dsns(msg, now)
        self.notify()

    def all_loaded(self) -> None:
        """The start's last messages are in: spread the overdue retries ``loaded`` kept."""
        overdue, self._overdue = self._overdue, []
        self._spread(self.schedule.spread(overdue, self.clock(), self._window, self.rng))

    @property
    def _window(self) -> float:
        return self.settings.restart_spread

    def _spread(self, spread: int) -> None:
        if spread:
            log.info("%d overdue retries spread over %gs", spread, self._window)

    def drain(self, grace: float) -> None:
        """Stop taking work; what is in hand gets ``grace`` seconds, then is cancelled."""
        self._lanes.draining = True
        self._wake.set()
        if self._lanes.nursery is not None:
            self._lanes.nursery.cancel_scope.deadline = trio.current_time() + grace

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until ``drain()``; returns when the lanes have stopped."""
        state = self.queue.state
        self._spread(self.schedule.spread_overdue(self.clock(), self._window, self.rng))
        async with trio.open_nursery() as carrying:  # outside the lanes' drain deadline
            await carrying.start(self.carrier.run)
            self._recorders = carrying  # outcomes recorded after the lanes stopped, too
            async with trio.open_nursery() as nursery:
                self._lanes.nursery = nursery
                task_status.started()
                for msg in [m for m in state.messages.values() if m.history]:
                    # the relay stopped between an outcome and its DSN (a message never
                    # tried owes none: most of a deep queue after a restart)
                    await self._owed_dsns(msg, self.clock())
                while not self.draining:
                    self._wake = trio.Event()
                    await self._dispatch()
                    backlog = self._lanes.backlog()
                    wait = IDLE_POLL if backlog >= MAX_BACKLOG else self._until_next_due()
                    with trio.move_on_after(wait):  # an attempt ending wakes it early
                        await self._wake.wait()
                self._lanes.close()
            await self.carrier.aclose()  # the lanes closed their connections first

    def _until_next_due(self) -> float:
        at = self.schedule.next_due()
        return IDLE_POLL if at is None else min(IDLE_POLL, max(0.0, at - self.clock()))

    async def _dispatch(self) -> None:
        room = MAX_BACKLOG - self._lanes.backlog()
        if room <= 0:
            return
        by_domain: dict[str, list[tuple[str, str]]] = {}
        for queue_id, rcpt in self.schedule.take_due(self.clock(), room):
            if (queue_id, rcpt) not in self.in_flight:
                by_domain.setdefault(domain_of(rcpt), []).append((queue_id, rcpt))
        for domain, items in by_domain.items():
            try:
                destination = await self._destination(domain)
            except ResolutionFailed as exc:
                for queue_id, rcpts in _by_message(items).items():
                    await self._record(queue_id, None, unresolvable(rcpts, exc))
                continue
            self.in_flight.update(items)
            for queue_id, rcpts in _by_message(items).items():
                msg = self.queue.state.messages[queue_id]
                groups = [(r,) for r in rcpts] if msg.record.bulk else [tuple(rcpts)]
                for group in groups:
                    self._lanes.route(Work(queue_id, group, destination))

    async def _destination(self, domain: str) -> Destination:
        now = trio.current_time()
        cached = self._destinations.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        destination = await self.resolver.destination(domain)
        self._destinations[domain] = (now + self.settings.destination_ttl, destination)
        return destination

    def _postpone(self, work: Work, at: float) -> None:
        for rcpt in work.recipients:
            self.in_flight.discard((work.queue_id, rcpt))
            self.schedule.put(work.queue_id, rcpt, at)

    async def _attempt(self, work: Work, remote: Connection | None) -> Connection | None:
        """Deliver ``work``, on ``remote`` if it still fits; returns the connection to keep.
        Its outcomes are recorded by a task of their own (``_record_attempt``), so the
        worker goes on to its next transaction while the journal gathers them."""
        settled = False  # nothing goes back on the schedule: deleted, or lost (postponed)
        handed = False  # the recording task settles it
        try:
            if self._record_failures:
                self._record_failures -= 1
                await trio.lowlevel.checkpoint()
                raise RecordFailed("an earlier attempt's outcome could not be recorded")
            msg = self.queue.state.messages.get(work.queue_id)
            if msg is None:  # deleted meanwhile
                settled = True
                await trio.lowlevel.checkpoint()  # a schedule point on every path (lane.py)
                return remote
            job = Job(
                work.queue_id,
                work.recipients,
                work.destination,
                _envelope(msg, work.recipients, self.settings.return_path),
                any(domain_of(r) in self.settings.require_tls for r in work.recipients),
                msg.position,
                msg.body_offset,
                Signing.of(msg),
                self.keys(),
                size=msg.record.size,
            )
            try:
                carried = await self.carrier.carry(job, remote)
            except CarrierLost:
                # the delivery process went away (it is started again): try soon, uncounted
                settled = True
                self._postpone(work, self.clock() + LOST_RETRY)
                return None
            self.connections += carried.opened
            assert self._recorders is not None  # lanes run only inside ``run``
            worker = trio.lowlevel.current_task()
            earlier = self._unrecorded.get(worker)
            if earlier is not None:  # one outcome of a worker's waits, at most
                with trio.CancelScope(shield=True):  # what was delivered gets recorded
                    await earlier.wait()
            done = self._unrecorded[worker] = trio.Event()
            self._recorders.start_soon(
                self._record_attempt, work, carried.mta, carried.outcomes, worker, done
            )
            handed = True
            return carried.remote
        finally:
            if not handed:
                self._settle(work, settled)

    async def _record_attempt(
        self,
        work: Work,
        mta: str | None,
        outcomes: Sequence[Outcome],
        worker: trio.lowlevel.Task,
        done: trio.Event,
    ) -> None:
        """Record what an attempt did (a patient append: the journal may hold it a few
        milliseconds for others to share its fsync), then let its recipients go and its
        worker record its next attempt (``_unrecorded``). A failure
        (a full disk) puts them back on the schedule and fails the next attempt a worker
        starts, as the worker itself failed when it recorded in line: lanes whose outcomes
        cannot be recorded crash, and rest (lane.py), rather than deliver on unrecorded."""
        recorded = False
        try:
            await self._record(work.queue_id, mta, outcomes, patient=True)
            recorded = True
        except Exception as exc:
            log.error(
                "%s: recording its attempt's outcome failed (%s); tried again in %gs",
                work.queue_id,
                exc,
                CRASH_RETRY,
                exc_info=not isinstance(exc, JournalError),
                extra=fields("delivery", queue_id=work.queue_id),
            )
            self._record_failures += 1
        finally:
            done.set()
            if self._unrecorded.get(worker) is done:
                del self._unrecorded[worker]
            self._settle(work, recorded)

    def _settle(self, work: Work, settled: bool) -> None:
        """``work`` is no longer in hand; unless ``settled``, its pending recipients go back
        on the schedule (an attempt that crashed)."""
        for rcpt in work.recipients:
            self.in_flight.discard((work.queue_id, rcpt))
            if not settled and not self.draining:  # a crash: back on the schedule
                msg = self.queue.state.messages.get(work.queue_id)
                if msg is not None and msg.recipient_states.get(rcpt) in PENDING:
                    self.schedule.put(work.queue_id, rcpt, self.clock() + CRASH_RETRY)
        self._wake.set()

    async def _open(self, destination: Destination, require_tls: bool) -> Remote:
        kwargs = {"connect": self.connect} if self.connect is not None else {}
        return await self.open_fn(
            destination,
            helo=self.settings.helo,
            tls=self.settings.tls,
            require_tls=require_tls,
            chunking=self.settings.chunking,
            **kwargs,
        )

    async def _record(
        self,
        queue_id: str,
        mta: str | None,
        outcomes: Sequence[Outcome],
        *,
        patient: bool = False,
    ) -> None:
        """Decide retry times and expiry (delivery/outcomes.py), make the attempt durable
        and apply it; then queue the DSN a bounce may owe."""
        msg = self.queue.state.messages.get(queue_id)
        if msg is None:
            return
        now = self.clock()
        final = finalize(outcomes, msg, now, self.settings.policy, self.rng)
        mta = None if mta is None else sys.intern(mta)  # a few hosts, kept per outcome
        await self.queue.record(Delivery(queue_id, now, mta, final), patient=patient)
        for o in final:
            log.info(
                "%s %s %s %s via %s: %s",
                queue_id,
                o.recipient,
                o.outcome,
                o.status,
                mta or "-",
                o.reply or "",
                extra=fields(
                    "delivery",
                    queue_id=queue_id,
                    recipient=o.recipient,
                    outcome=str(o.outcome),
                    status=o.status,
                    mta=mta,
                ),
            )
        await self._owed_dsns(msg, now)

    async def _owed_dsns(self, msg: QueuedMessage, now: float) -> None:
        """Queue the DSNs ``msg`` owes now: for bounced recipients, and once for recipients
        deferred past the policy's ``delay_warning`` (when their sender asked for it)."""
        owed = msg.dsn_owed()
        if owed:
            await self._queue_dsn(msg, owed, "failed")
        if self.settings.policy.warn_delayed(
            accepted_at=msg.record.accepted_at, now=now, warned=False
        ):
            delayed = msg.delay_owed()
            if delayed:
                await self._queue_dsn(msg, delayed, "delayed")

    async def _queue_dsn(self, msg: QueuedMessage, owed: list[str], action: str) -> None:
        """Queue a DSN of ``action`` for ``owed`` (to the envelope sender, from the null
        sender); its record covers them, so it is never sent twice."""
        original = await self.queue.journal.read(msg.position)
        now = self.clock()
        dsn = build_dsn(
            reporting_mta=self.settings.helo,
            operator_domain=self.settings.operator_domain,
            sender=msg.record.sender,
            original=original.payload[msg.body_offset :],
            statuses=dsn_statuses(msg, owed, action),
            envid=msg.record.envid,
            arrival=msg.record.accepted_at,
            ret_full=msg.record.ret == "FULL" and action == "failed",  # a delay: headers
        )
        record = dsn_record(msg, owed, len(dsn), now, action)
        await self.queue.accept(record, dsn)
        log.info(
            "%s: DSN (%s) %s queued to %s for %s",
            msg.id,
            action,
            record.id,
            msg.record.sender,
            owed,
            extra=fields(
                "dsn", queue_id=msg.id, dsn_id=record.id, did=msg.record.did, action=action
            ),
        )
        self._wake.set()


def _by_message(items: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(queue id, recipient) pairs grouped by queue id, in order."""
    out: dict[str, list[str]] = {}
    for queue_id, rcpt in items:
        out.setdefault(queue_id, []).append(rcpt)
    return out


def _envelope(
    msg: QueuedMessage, recipients: tuple[str, ...], return_path: ReturnPath | None = None
) -> Envelope:
    record = msg.record
    notify = {r.addr: r.notify for r in record.recipients}
    orcpt = {r.addr: r.orcpt for r in record.recipients}
    return Envelope(
        verp_sender(msg, recipients, return_path),
        recipients,
        notify,
        orcpt,
        record.ret,
        record.envid,
    )


def verp_sender(
    msg: QueuedMessage, recipients: tuple[str, ...], return_path: ReturnPath | None
) -> str:
    """The envelope sender on the wire: the VERP address for a member's message (naming
    the recipient when the transaction carries one, else the whole message: index 0);
    the record's own for the relay's mail (a DSN's null sender, a forward's SRS address)."""
    sender = msg.record.sender
    if return_path is None or not sender or domain_of(sender) == return_path.domain.lower():
        return sender
    index = 0
    if len(recipients) == 1:
        index = next(
            (i for i, r in enumerate(msg.record.recipients, 1) if r.addr == recipients[0]), 0
        )
    return return_path.address(msg.id, index if index <= 999 else 0)
