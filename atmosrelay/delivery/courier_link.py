"""The owner's side of the delivery processes: start them, carry attempts through them,
restart them.

``CourierLink`` is a carrier (delivery/carry.py): ``carry(job, connection)`` sends the job to
a delivery process (delivery/courier.py: the one holding the connection, else the one with
the fewest attempts in hand) and waits for its outcomes; the connection a lane worker holds
is a ``CourierConnection``, a handle naming one that delivery process keeps open.

    spawn()   start the processes early (the relay does, before it replays its journal), or
              take over the ones the serve command forked (delivery/forked.py); a process
              started again after one exited is always a new interpreter
    run()     take them over (a failure to start one fails the relay's start), then
              watch each: when one exits unasked (killed, crashed), every attempt in hand raises
              ``CarrierLost`` (the dispatcher puts those recipients back on the schedule,
              uncounted: nothing was recorded for them), handles to its connections go stale,
              and another is started after ``RESTART_DELAY``
    aclose()  after the lanes have stopped: end of file to each, which closes its
              connections and exits; killed if it has not within ``STOP_GRACE``

A message it delivered but whose outcome the owner had not recorded when either process died
is delivered again after the restart: the same at-least-once as one process that dies
between a remote's 250 and the journal write.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, Final, Protocol

import attrs
import trio

from atmosrelay.delivery.carry import Carried, CarrierLost, Connection, Job
from atmosrelay.delivery.courier import CourierSettings, Frames, Outbox, frame
from atmosrelay.delivery.forked import Forked
from atmosrelay.stream_io import StreamIO
from journal import Journal

log = logging.getLogger("atmosrelay.delivery")

START_TIMEOUT: Final = 30.0  # the delivery process says "ready" within this
RESTART_DELAY: Final = 1.0
STOP_GRACE: Final = 10.0  # after end of file, it exits within this or is killed


class _Process(Protocol):
    """A delivery process as the owner's child: spawned (``trio.Process``) or forked by the
    serve command (delivery/forked.py)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def kill(self) -> None: ...


class CourierFailed(Exception):
    """The delivery process could not be started."""


class CourierCrashed(Exception):
    """An attempt crashed in the delivery process (a bug); the text is its traceback."""


@attrs.define(eq=False)
class CourierConnection:
    """A connection a delivery process holds open for a lane worker."""

    courier: _Courier
    incarnation: int
    token: int
    host: str
    tls: bool
    usable: bool = True

    @property
    def current(self) -> bool:
        """Its delivery process is the one that opened it, and still up."""
        return self.incarnation == self.courier.incarnation and self.courier.outbox is not None

    async def aclose(self) -> None:
        if self.usable:
            self.usable = False
            if self.current:
                self.courier.put(("close", self.token))


@attrs.define(eq=False)
class _Call:
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: tuple[Any, ...] | None = None  # None: the delivery process went away


class CourierLink:
    """``count`` delivery processes; an attempt goes to the one holding its connection, or
    to the one with the fewest attempts in hand."""

    def __init__(
        self, settings: CourierSettings, count: int = 1, forked: Sequence[Forked] = ()
    ) -> None:
        """``forked``: processes the serve command forked for this (delivery/forked.py),
        taken over in place of spawning that many."""
        # where a job whose record moved is read (set once the owner has opened it)
        self.journal: Journal | None = None
        self.couriers = [
            _Courier(settings, forked[i] if i < len(forked) else None) for i in range(count)
        ]
        self._ids = itertools.count(1)
        self._running = False

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.couriers if c.pid is not None]

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self.couriers)

    async def carry(self, job: Job, remote: Connection | None) -> Carried:
        while True:
            token = None
            if isinstance(remote, CourierConnection) and remote.usable and remote.current:
                courier, token = remote.courier, remote.token
                remote.usable = False  # the delivery process has it now
            else:
                up = [c for c in self.couriers if c.outbox is not None]
                if not up:
                    raise CarrierLost("no delivery process is running")
                courier = min(up, key=lambda c: len(c.calls))
            request = next(self._ids)
            call = courier.calls[request] = _Call()
            courier.put(("attempt", request, token, job))
            try:
                await call.done.wait()
            except BaseException:
                # cancelled (the drain's deadline): what it sends back is closed unread
                courier.calls.pop(request, None)
                raise
            reply = call.reply
            if reply is None:
                raise CarrierLost("the delivery process exited during the attempt")
            if reply[0] == "done":
                _, _, new, host, tls, mta, outcomes, opened = reply
                kept = None
                if new is not None:
                    kept = CourierConnection(courier, courier.incarnation, new, host, tls)
                return Carried(kept, mta, outcomes, opened)
            if reply[0] == "moved":  # compacted since it was queued: the owner reads it
                assert self.journal is not None
                record = await self.journal.read(job.position)
                job = attrs.evolve(job, body=job.body_of(record))
                if isinstance(remote, CourierConnection) and token is not None:
                    remote.usable = True  # it kept the connection under the same token
                continue
            raise CourierCrashed(str(reply[2]))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the delivery processes (a failure fails the start), then keep them up.

        All of them before reporting started, though each start is 0.4 s of a core that a
        restart's replay could use: a lane worker keeps its connection, and so its delivery
        process, so the processes that come up after the first attempts would be left
        nearly idle (tried, bench/README.md, the ninth run)."""
        if self._running:
            raise RuntimeError("the delivery processes are run once (by the dispatcher)")
        self._running = True
        async with trio.open_nursery() as nursery:
            for courier in self.couriers:  # each gets ready while the next starts
                nursery.start_soon(courier.run)
            for courier in self.couriers:
                await courier.up.wait()
            task_status.started()

    async def spawn(self) -> None:
        """Start the processes early; ``run`` takes them over (see _Courier.spawn)."""
        for courier in self.couriers:
            await courier.spawn()

    async def discard(self) -> None:
        """Kill what ``spawn`` started and ``run`` never took over."""
        for courier in self.couriers:
            await courier.discard()

    async def aclose(self) -> None:
        """End the delivery processes once the lanes have stopped (their connections are
        closed); returns when they have exited."""
        async with trio.open_nursery() as nursery:
            for courier in self.couriers:
                nursery.start_soon(courier.aclose)


class _Courier:
    """One delivery process, started again when it exits unasked."""

    def __init__(self, settings: CourierSettings, forked: Forked | None = None) -> None:
        self.settings = settings
        self._forked = forked  # its first process, forked by the serve command, if any
        self.incarnation = 0  # which process; handles to an earlier one's connections are stale
        self.pid: int | None = None
        self.restarts = 0
        self.calls: dict[int, _Call] = {}
        self.outbox: Outbox | None = None  # None while no process is up
        self._stream: trio.SocketStream | None = None
        self._closing = False
        self._stopped = trio.Event()
        self.up = trio.Event()  # it has said "ready" once
        self._spawned: tuple[_Process, trio.SocketStream] | None = None

    @property
    def starting(self) -> int | None:
        """The pid of a process spawned early and not yet taken over by ``run``."""
        return self._spawned[0].pid if self._spawned is not None else None

    def put(self, message: object) -> None:
        assert self.outbox is not None
        self.outbox.put(message)

    async def run(self) -> None:
        """Take over the spawned process (or spawn one), then start another whenever it
        exits unasked; ``up`` is set at the first "ready"."""
        started = False
        try:
            while not self._closing:
                try:
                    process, stream, messages, pid = await self._start()
                except CourierFailed as exc:
                    if not started:
                        raise
                    log.error("%s; trying again in %gs", exc, RESTART_DELAY)
                    await trio.sleep(RESTART_DELAY)
                    continue
                if self._closing:  # the stop came while it started: no end of file was sent
                    with trio.CancelScope(shield=True):
                        await _end(process, stream)
                    return
                self.incarnation += 1
                self.pid, self._stream = pid, stream
                outbox = self.outbox = Outbox()
                if not started:
                    self.up.set()
                    started = True
                try:
                    await self._serve(stream, messages, outbox)
                finally:
                    self.outbox, self.pid = None, None
                    self._lose_calls()
                    with trio.CancelScope(shield=True):
                        await _reap(process, stream, STOP_GRACE if self._closing else 0.0)
                if self._closing:
                    return
                self.restarts += 1
                log.error(
                    "the delivery process (pid %d) exited (%s); the attempts it had in hand "
                    "are tried again; starting another in %gs",
                    pid,
                    _exit_text(process.returncode),
                    RESTART_DELAY,
                )
                await trio.sleep(RESTART_DELAY)
        finally:
            self._stopped.set()

    async def aclose(self) -> None:
        self._closing = True
        stream = self._stream
        if stream is not None and self.outbox is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_eof()
        with trio.move_on_after(STOP_GRACE + 5):
            await self._stopped.wait()

    async def spawn(self) -> None:
        """Start the process (or take the forked one) and say hello; ``run`` waits for its
        "ready" (so it gets ready while the owner does something else: replays its
        journal)."""
        forked, self._forked = self._forked, None
        ours = forked.claim() if forked is not None else None
        process: _Process
        if forked is not None and ours is not None:
            process = forked
        else:
            process, ours = await _spawn()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await StreamIO(stream).write(frame(("hello", self.settings)))  # it reads it later
        self._spawned = (process, stream)

    async def discard(self) -> None:
        """Kill a process spawned but never run (the owner failed to start)."""
        if self._spawned is not None:
            process, stream = self._spawned
            self._spawned = None
            with trio.CancelScope(shield=True):
                await _reap(process, stream, 0.0)

    async def _start(self) -> tuple[_Process, trio.SocketStream, Frames, int]:
        if self._spawned is None:
            await self.spawn()
        assert self._spawned is not None
        process, stream = self._spawned
        self._spawned = None
        messages = Frames(StreamIO(stream))
        with trio.move_on_after(START_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                ready = await messages.next()
                if ready is not None and ready[0] == "ready":
                    return process, stream, messages, int(ready[1])
        with trio.CancelScope(shield=True):
            await _reap(process, stream, 0.0)
        raise CourierFailed(
            f"the delivery process did not start ({_exit_text(process.returncode)}); "
            "its error is logged above"
        )

    async def _serve(self, stream: trio.SocketStream, messages: Frames, outbox: Outbox) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_until_broken, outbox, messages.io)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while (message := await messages.next()) is not None:
                    self._answered(message)
            nursery.cancel_scope.cancel()

    def _answered(self, message: tuple[Any, ...]) -> None:
        call = self.calls.pop(message[1], None)
        if call is not None:
            call.reply = message
            call.done.set()
        elif message[0] == "done" and message[2] is not None and self.outbox is not None:
            self.outbox.put(("close", message[2]))  # its worker was cancelled

    def _lose_calls(self) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.done.set()  # reply None: CarrierLost


async def _write_until_broken(outbox: Outbox, io: StreamIO) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await outbox.run(io)  # broken: the reader sees the end too


async def _spawn() -> tuple[trio.Process, socket.socket]:
    """A new interpreter running delivery/courier.py, and the owner's end of its socket."""
    ours, theirs = socket.socketpair()
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "atmosrelay.delivery.courier", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        ours.close()
        raise CourierFailed(f"cannot start the delivery process: {exc}") from None
    finally:
        theirs.close()
    return process, ours


async def _end(process: _Process, stream: trio.SocketStream) -> None:
    """End of file to a process that has nothing in hand; it exits (or is killed)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_eof()
    await _reap(process, stream, STOP_GRACE)


async def _reap(process: _Process, stream: trio.SocketStream, grace: float) -> None:
    """Wait ``grace`` seconds for the process to exit, then kill it; close our end."""
    with trio.move_on_after(grace):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    await stream.aclose()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
