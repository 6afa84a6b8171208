"""Reads and writes on a plain (not TLS) TCP stream without trio's per-call machinery, for
the SMTP sessions (server/session.py) and the delivery client (delivery/client_session.py).

A session spends most of its time in its socket calls, not in SMTP: a profile of one message
per connection at 50 sessions put a third of the session's time in ``SocketStream.send_all``
and a fifth in ``receive_some``, nearly all of it trio's wrapping (a conflict detector, an
async context manager, two checkpoints and a cancel scope per call) around a system call of
a few microseconds. A reply is a few dozen bytes and the kernel takes it at once nearly
always, so ``write`` first tries one non-blocking ``os.write`` and waits with ``send_all``
(under the caller's timeout) only for what the kernel would not take. ``read`` waits for
readability through trio (so it is a checkpoint: cancellable, and fair to the other tasks)
and reads with one ``os.read``. ``aclose`` closes a plain socket at once, without
``trio.aclose_forcefully``'s cancellation (about 0.1 ms of CPU a connection here).

Errors become trio's: a reset or a broken pipe is ``trio.BrokenResourceError``, a stream
already closed is ``trio.ClosedResourceError``, as ``SocketStream`` would raise them. Only
for a ``trio.SocketStream``; a TLS stream goes through ``SSLStream`` as before.
"""

from __future__ import annotations

import errno
import math
import os

import trio


class StreamIO:
    """A session's reads and writes on ``stream``: through the fast path for plain TCP,
    through the stream itself for TLS."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def read(self, max_bytes: int) -> bytes:
        """What the peer sent (b"" once it closed); a checkpoint."""
        if self.socket is None:
            return bytes(await self.stream.receive_some(max_bytes))
        while True:
            await trio.lowlevel.wait_readable(self._fd(self.socket))  # closed: raises here
            try:
                # asked again: closed meanwhile, the number may be another file's by now
                return os.read(self._fd(self.socket), max_bytes)
            except BlockingIOError:  # woken without data (it happens): wait again
                continue
            except OSError as exc:
                raise _translated(exc) from exc

    async def write(self, data: bytes, give_up_after: float | None = None) -> None:
        """Write all of ``data``; trio.TooSlowError when the peer has not taken it within
        ``give_up_after`` seconds (None: the caller's own deadline bounds it). Plain TCP: one
        non-blocking write first, which nearly always takes it all (and then no cancel scope
        is entered at all)."""
        if self.socket is not None:
            try:
                data = data[os.write(self._fd(self.socket), data) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _translated(exc) from exc
        if data:
            with trio.fail_after(math.inf if give_up_after is None else give_up_after):
                await self.stream.send_all(data)

    async def aclose(self) -> None:
        """Close at once, waiting for nothing. Plain TCP: the socket is closed here, without
        ``aclose_forcefully``'s cancel scope and the Cancelled raised and caught inside it
        (once a connection, which one message per connection pays every time); TLS: through
        ``aclose_forcefully``, which closes the transport without waiting for close_notify."""
        if self.socket is not None:
            self.socket.close()  # trio's close: tells a task waiting on it first
        else:
            await trio.aclose_forcefully(self.stream)

    @staticmethod
    def _fd(socket: trio.socket.SocketType) -> int:
        fd = socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the stream was closed")
        return fd


def _translated(exc: OSError) -> Exception:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the stream was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc.strerror or exc}")
