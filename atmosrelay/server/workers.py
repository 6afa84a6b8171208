"""Session processes, as the owner sees them: forked, handed the listeners, drained.

``smtp.processes = N`` (0 by default: every session in this process) forks N session
processes beside the delivery processes, before the event loop starts (delivery/forked.py
says why there). Once the journal is replayed and the listeners are bound, the owner hands
each of them every submission listener (starttls, implicit, trusted, auto) as descriptors
over its socketpair; they all accept on the same sockets, and the kernel gives each
connection to one of them. The inbound listener stays in the owner: its sessions write the
queue's own INBOUND records. Each process then hands its messages to the owner to journal
(server/handoff.py) and runs everything else of a session itself (server/session_process.py).

The owner:

* **Stops** them as it stops its own sessions: on SIGTERM it stops accepting, tells each
  to drain (DRAIN: close its listeners, let its sessions finish within
  ``smtp.shutdown_grace``), and waits for their links to close; a second signal hurries
  them (their sessions are cancelled at once). Only then does delivery drain.
* **Outlives** them: a session process that dies (killed, a crash) leaves its siblings
  accepting on the same listeners; when none is left, the owner serves the listeners itself
  and says so. It does not start new ones: a process forked from a running event loop would
  inherit it, and the sessions are served either way.
* **Reloads** them: SIGHUP is passed on, and each reloads its TLS certificate, log level and
  policy limits as the owner does (reload.py).
* **Reports** for them: /metrics counts what they accepted (the owner appends it) and what
  they refused, their TLS failures and their end-of-data-to-250 times, sent once a second.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final

import trio

from atmosrelay.config import Config
from atmosrelay.delivery.forked import Forked, fork_processes
from atmosrelay.sections import ListenerMode
from atmosrelay.server.context import SessionContext
from atmosrelay.server.handoff import DRAIN, RELOAD, Handoff
from atmosrelay.stream_io import StreamIO
from atmosrelay.submission.counting import recount

log = logging.getLogger("atmosrelay.smtp")

Serve = Callable[[trio.SocketListener, ListenerMode], Awaitable[None]]

EXIT_WAIT: Final = 2.0  # seconds a session process whose link closed gets to exit
HELLO: Final = struct.Struct("<H")  # the length of the hello's text (the listeners' modes)


def fork_session_processes(config: Config) -> list[Forked]:
    """``smtp.processes`` session processes, forked now; waiting for the owner's hello."""
    count = config.smtp.processes

    def run(fd: int) -> None:
        _session_child(fd, config, count)

    return fork_processes(count, run)


def _session_child(fd: int, config: Config, processes: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the owner stops and reloads us
    os.environ.pop("NOTIFY_SOCKET", None)  # systemd hears from the owner only
    link = socket.socket(fileno=fd)
    # the hello's length, with the descriptors; then exactly its text: a frame the owner
    # sends right after it (a DRAIN) stays in the socket for the event loop to read
    head, fds, _, _ = socket.recv_fds(link, HELLO.size, 64, socket.MSG_WAITALL)
    if len(head) < HELLO.size:
        return  # the owner never took us over (its start failed)
    (length,) = HELLO.unpack(head)
    hello = link.recv(length, socket.MSG_WAITALL)
    modes = [ListenerMode(m) for m in hello.decode("ascii").split(",")]
    listeners = [(socket.socket(fileno=f), m) for f, m in zip(fds, modes, strict=True)]
    from atmosrelay.server import session_process

    trio.run(session_process.serve, config, link, listeners, processes)


class SessionProcesses:
    """The owner's side of its session processes (none: every session is served here)."""

    def __init__(self, forked: Sequence[Forked], queue: Any, ctx: SessionContext) -> None:
        self.forked = list(forked)
        self.handoff = Handoff(queue, ctx)
        self.handoff.on_lost = partial(_count_lost, queue, ctx)
        self.draining = False
        self._links: list[tuple[Forked, socket.socket]] = []
        self._left = 0  # links still open

    async def start(
        self,
        listeners: Sequence[tuple[trio.SocketListener, ListenerMode]],
        serve: Serve,
        acceptors: trio.Nursery,
        sessions: trio.Nursery,
    ) -> None:
        """Hand the submission listeners to the session processes (the inbound ones, or all
        when there are none, are served in this process), and serve their links."""
        mine: list[tuple[trio.SocketListener, ListenerMode]] = [
            (lst, mode) for lst, mode in listeners if mode is ListenerMode.INBOUND
        ]
        theirs = [(lst, mode) for lst, mode in listeners if mode is not ListenerMode.INBOUND]
        if theirs and self.forked:
            text = ",".join(str(mode) for _, mode in theirs).encode("ascii")
            hello = HELLO.pack(len(text)) + text
            fds = [lst.socket.fileno() for lst, _ in theirs]
            for f in self.forked:
                sock = f.claim()
                if sock is None:
                    continue
                try:
                    socket.send_fds(sock, [hello], fds)
                except OSError as exc:  # it died before its hello
                    log.error("session process %d could not be started: %s", f.pid, exc)
                    sock.close()
                    continue
                self._links.append((f, sock))
        if not self._links:
            mine = list(listeners)
        for lst, mode in mine:
            acceptors.start_soon(serve, lst, mode)
        self._left = len(self._links)

        async def link(index: int, f: Forked, sock: socket.socket) -> None:
            io = StreamIO(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
            await self.handoff.serve(index, io)  # until it closes (or dies)
            self._left -= 1
            if self.draining:
                return
            with trio.move_on_after(EXIT_WAIT):  # its end of the link closes as it exits
                await f.wait()
            code = f.poll()
            log.error(
                "session process %d ended (%s); %s",
                f.pid,
                "still running" if code is None else f"exit code {code}",
                "the others serve its listeners"
                if self._left
                else "no session process is left: this process serves the listeners",
            )
            if code is None:
                f.kill()
            if not self._left:
                for lst, mode in theirs:
                    acceptors.start_soon(serve, lst, mode)

        for index, (f, sock) in enumerate(self._links):
            sessions.start_soon(link, index, f, sock)

    @property
    def pids(self) -> list[int]:
        return [f.pid for f, _ in self._links]

    def drain(self, now: bool = False) -> None:
        """Stop: each closes its listeners and finishes its sessions (at once: ``now``)."""
        self.draining = True
        self.handoff.send_all(DRAIN, int(now))

    def reload(self) -> None:
        self.handoff.send_all(RELOAD)


def _count_lost(queue: Any, ctx: SessionContext, ids: list[str], since: float) -> None:
    """A session process died before flushing what it accepted after ``since``: those
    messages' recipients count here (this process's next flush writes them)."""
    messages = [m for m in map(queue.state.messages.get, ids) if m is not None]
    n = recount(
        ctx.pipeline.policy,
        messages,
        since,
        ctx.operator_domain.lower(),
        deliveries=False,  # counted here as they came
    )
    log.warning("policy: %d message(s) a session process had not counted yet counted here", n)
