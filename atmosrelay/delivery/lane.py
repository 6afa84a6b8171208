"""Lanes: one per destination (an MX host set), each a channel of work and its workers.

    route(work)   into the lane of its destination, started on demand; a parked lane's
                  work goes back on the schedule for when the park ends
    workers       up to ``concurrency`` per lane, started while work waits; each holds one
                  connection and reuses it (RSET between messages) while the lane has work,
                  closes it after ``idle`` seconds without, and the lane is forgotten when
                  its last worker leaves
    supervision   workers run under ``supervise()``: a crash is logged and the worker
                  restarted, within bounds; past them (a bug that one remote triggers every
                  time) the lane is *parked*: its waiting work and whatever is routed to it
                  wait on the schedule for ``PARK_BASE`` (doubling per park in a row, up to
                  ``PARK_MAX``), a CRITICAL log line says so, and every other destination
                  goes on (the alternative, stopping the relay so a service manager
                  restarts it, would let one remote halt all delivery; docs/security.md)

Nothing is started in a nursery that is being cancelled. What a worker does with a piece of
work is the dispatcher's (``attempt``): this module only runs lanes.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from atmosrelay.delivery.carry import Connection
from atmosrelay.delivery.destination import Destination
from atmosrelay.supervise import GaveUp, supervise

log = logging.getLogger("atmosrelay.delivery")

PARK_BASE: Final = 300.0  # a lane whose worker kept crashing rests this long first ...
PARK_MAX: Final = 6 * 3600.0  # ... doubling per park in a row, up to this


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


# (work, the connection a worker holds or None) -> the connection to keep, or None
Attempt = Callable[[Work, Connection | None], Awaitable[Connection | None]]


class Lanes:
    def __init__(
        self,
        *,
        concurrency: int,
        idle: float,
        attempt: Attempt,
        postpone: Callable[[Work, float], None],
        woken: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        self.concurrency = concurrency
        self.idle = idle
        self.attempt = attempt
        self.postpone = postpone  # work back on the schedule, for this time
        self.woken = woken  # a park frees the dispatcher to look again
        self.clock = clock
        self.lanes: dict[str, Lane] = {}
        self.draining = False
        self.nursery: trio.Nursery | None = None

    def backlog(self) -> int:
        """Work waiting in the lanes' channels."""
        return sum(lane.receive.statistics().current_buffer_used for lane in self.lanes.values())

    def parked(self) -> dict[str, float]:
        """Parked lanes: destination key -> when the park ends (the clock's time)."""
        now = self.clock()
        return {k: lane.parked_until for k, lane in self.lanes.items() if lane.parked_until > now}

    def route(self, work: Work) -> None:
        key = work.destination.key
        lane = self.lanes.get(key)
        if lane is None:
            send, receive = trio.open_memory_channel[Work](float("inf"))
            lane = self.lanes[key] = Lane(key, send, receive)
        if lane.parked_until > self.clock():
            self.postpone(work, lane.parked_until)
            return
        lane.send.send_nowait(work)  # straight to a waiting worker, if there is one
        self._staff(lane)

    def close(self) -> None:
        """Stop taking work: idle workers leave; busy ones after their transaction."""
        self.draining = True
        for lane in self.lanes.values():
            lane.send.close()

    def _staff(self, lane: Lane) -> None:
        """One more worker when work waits in the buffer and the lane has room for one;
        never into a nursery that is being cancelled, nor for a parked lane."""
        assert self.nursery is not None
        if self.draining or self.nursery.cancel_scope.cancel_called:
            return
        waiting = lane.receive.statistics().current_buffer_used
        if waiting and lane.workers < self.concurrency:
            lane.workers += 1
            self.nursery.start_soon(self._run_worker, lane)

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
            self.postpone(work, lane.parked_until)
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
        self.woken()

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

    async def _next(self, lane: Lane) -> Work | None:
        """The lane's next work, or None after ``idle`` seconds without any. Work already
        waiting (the dispatcher keeps a backlog in the channel while the lane is busy) is
        taken without a timer: entering and leaving a cancel scope with a deadline, one a
        delivered message, was 4-9% of the accepting process's delivery work. Not a
        schedule point then, only a cancellation point: the attempt that follows always
        is one (``Dispatcher._attempt`` checkpoints on its every path)."""
        try:
            work = lane.receive.receive_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self.idle):
                return await lane.receive.receive()
            return None
        await trio.lowlevel.checkpoint_if_cancelled()
        return work

    async def _worker(self, lane: Lane) -> None:
        remote: Connection | None = None
        try:
            while not self.draining:
                try:
                    work = await self._next(lane)
                except trio.EndOfChannel:
                    return
                if work is None:  # idle for ``idle`` seconds
                    return
                remote = await self.attempt(work, remote)
                lane.parks = 0  # an attempt that ended without a crash
        finally:
            if remote is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await remote.aclose()
