"""Delivery processes forked from the serve command before its event loop starts.

A delivery process started as a new interpreter (``python -m atmosrelay.delivery.courier``)
imports the relay again before it can say "ready": 0.37-0.42 s of a core each (trio, the
SMTP client, DKIM, OpenSSL's bindings). At a restart those imports share the machine's two
cores with the owner's own start (its imports, the journal's open, the queue checkpoint's
decoding), and the first delivery waits for both. The serve command has already imported
all of it by the time it has read its config, so it forks its delivery processes there: a
child starts with every module loaded, and its start is the Courier's keys and store only.

Why there, and only there:

* **No threads yet.** ``fork`` copies one thread. A lock another thread held at that moment
  (the logging module's, an allocator's, SQLite's) stays held in the child forever. Before
  ``trio.run`` the serve command is one thread (checked: with more, nothing is forked and
  the processes are spawned as before). Once the relay runs, its worker threads exist, so
  a delivery process started again after one died is spawned as a new interpreter
  (courier_link.py), never forked.
* **No event loop yet.** A child forked inside ``trio.run`` inherits the run's state and
  cannot start a run of its own.
* **Nothing of the owner's open yet.** The data directory's lock, the journal, the
  listeners and the account store are opened after, inside ``run_relay``, so no child holds
  any of them. The child closes every descriptor but standard error and output and its own
  socket, as ``subprocess`` does for a spawned one: the owner ends of its siblings'
  socketpairs above all, or a delivery process would keep a sibling's socket open after the
  owner died and that sibling would never read end of file.

What a child runs is what a spawned one runs (``courier.main``), on the socket the owner
will say hello on; it leaves with ``os._exit`` whatever happens, never returning into the
serve command. The owner reaps it as its child (``Forked``: a pidfd says when it exits).
Processes forked but never taken over (the start failed first) are ended by ``release``.

Linux only (``os.pidfd_open``); elsewhere nothing is forked.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import attrs
import trio

from atmosrelay.delivery import courier


@attrs.define(eq=False)
class Forked:
    """One forked delivery process, as the owner's child: what ``courier_link`` needs of a
    process (``pid``, ``returncode``, ``wait``, ``kill``) and the owner's end of its socket
    until ``claim`` takes it."""

    pid: int
    sock: socket.socket | None
    returncode: int | None = None

    def claim(self) -> socket.socket | None:
        """The owner's end of the socket, once; None when it was taken or released."""
        sock, self.sock = self.sock, None
        return sock

    async def wait(self) -> int:
        if self.returncode is None:
            fd = os.pidfd_open(self.pid)
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        code = self.poll()  # it has exited: the pidfd said so
        assert code is not None
        return code

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:  # not reaped: the pid cannot have been reused
            os.kill(self.pid, signal.SIGKILL)

    def end(self, deadline: float) -> None:
        """Wait until ``deadline`` (monotonic) for it to exit, then kill it; reaped."""
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.poll() is None:
            self.kill()
            self._reaped(os.waitpid(self.pid, 0)[1])

    def _reaped(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)


def fork_couriers(count: int) -> list[Forked]:
    """``count`` delivery processes forked now, waiting for the owner's hello; none when
    this process already has more than one thread or cannot watch a child by pidfd."""
    return fork_processes(count, lambda fd: courier.main([str(fd)]))


def fork_processes(count: int, run: Callable[[int], None]) -> list[Forked]:
    """``count`` children forked now, each running ``run`` on the descriptor of its end of
    a socketpair (the owner keeps the other, ``Forked.sock``); none when this process
    already has more than one thread or cannot watch a child by pidfd. The session
    processes (server/workers.py) are forked the same way."""
    if count <= 0 or threading.active_count() != 1 or not hasattr(os, "pidfd_open"):
        return []
    sys.stdout.flush()  # or a child would write the owner's buffered lines again
    sys.stderr.flush()
    forked: list[Forked] = []
    for _ in range(count):
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            _child(theirs, [ours] + [f.sock for f in forked if f.sock is not None], run)
        theirs.close()
        forked.append(Forked(pid, ours))
    return forked


def _child(
    sock: socket.socket, owners: Sequence[socket.socket], run: Callable[[int], None]
) -> None:
    code = 1
    try:
        for s in owners:
            s.close()
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        run(sock.detach())
        code = 0
    except BaseException:  # whatever it was, this child ends here
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def release(forked: Sequence[Forked], grace: float = 5.0) -> None:
    """End the forked processes the relay did not reap (its start failed before it took
    them over): end of file to the ones never claimed, which exit; any left after
    ``grace`` seconds are killed. Blocking; the serve command's last step."""
    for f in forked:
        sock = f.claim()
        if sock is not None:
            sock.close()
    deadline = time.monotonic() + grace
    for f in forked:
        f.end(deadline)
