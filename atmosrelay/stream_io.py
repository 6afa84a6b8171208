"""Reads and writes on a session's TCP stream, plain or TLS, without trio's per-call
machinery, for the SMTP sessions (server/session.py) and the delivery client
(delivery/client_session.py).

**Plain TCP.** A session spends most of its time in its socket calls, not in SMTP: a profile
of one message per connection at 50 sessions put a third of the session's time in
``SocketStream.send_all`` and a fifth in ``receive_some``, nearly all of it trio's wrapping (a
conflict detector, an async context manager, two checkpoints and a cancel scope per call)
around a system call of a few microseconds. A reply is a few dozen bytes and the kernel takes
it at once nearly always, so ``write`` first tries one non-blocking ``os.write`` and waits
with ``send_all`` (under the caller's timeout) only for what the kernel would not take.
``read`` waits for readability through trio (so it is a checkpoint: cancellable, and fair to
the other tasks) and reads with one ``os.read``. ``aclose`` closes a plain socket at once,
without ``trio.aclose_forcefully``'s cancellation (about 0.1 ms of CPU a connection here).
Errors become trio's: a reset or a broken pipe is ``trio.BrokenResourceError``, a stream
already closed is ``trio.ClosedResourceError``, as ``SocketStream`` would raise them.

**TLS** goes the same way. ``start_tls`` wraps a ``trio.SocketStream`` in a ``TLSStream``
(any other stream, such as a test's in-memory pair, in ``trio.SSLStream``, which needs no
socket).

Why: every real submission is TLS (587 requires STARTTLS, 465 is implicit), and with 50 TLS
sessions a profile of the relay put a quarter of its event loop's time in
``SSLStream.receive_some`` and ``send_all``, nearly none of it in OpenSSL. ``SSLStream`` is
general: any number of tasks may send and receive at once, so every call goes through conflict
detectors, two locks, a retry loop that re-checks what the other tasks did, and the transport
stream's own wrapping (above). A session, and the delivery
client, is one task that writes a reply and then reads the next command.

How: the same ``ssl.SSLObject`` over two ``MemoryBIO`` objects that ``SSLStream`` uses, with
the socket read and written as plain TCP is above: ``read`` waits for readability
through trio (a checkpoint), then one ``os.read``; ``write`` encrypts and hands the
ciphertext to one non-blocking ``os.write``, waiting (under the caller's timeout) only for
what the kernel would not take. A read decrypts every whole TLS record it has, up to the size
asked for, not one record a call.

Rules kept:

* one task reads and one writes at a time (``trio.BusyResourceError`` otherwise); they may be
  two different tasks. Ciphertext that a read makes (a TLS 1.2 renegotiation's flight)
  joins the queue the writer sends from, in the order OpenSSL made it; the read hands the
  kernel what it takes of it at once, and the next write sends the rest first;
* the handshake is always explicit (``do_handshake``) before any read or write, because
  OpenSSL's implicit handshake skips Python's hostname check;
* errors are trio's, as ``SSLStream`` raises them: a TLS error, a reset, or the peer's EOF
  without ``close_notify`` is ``trio.BrokenResourceError`` (its ``__cause__`` says which);
  the peer's ``close_notify`` is EOF (``b""``); a closed stream is ``trio.ClosedResourceError``;
* ``write_now`` (plain or TLS) writes without waiting and is no checkpoint, for a reply made
  outside the session's task (the 250 from the journal's callback, server/session.py): what
  the kernel does not take then goes first in the next ``write``; it refuses (False) while a
  write is under way, so bytes are never interleaved;
* ``aclose`` sends ``close_notify`` if the kernel takes it at once, then closes the socket
  without waiting for anything, even when cancelled (a session's last step);
* a write OpenSSL can make only after reading (a TLS 1.2 renegotiation under way) breaks
  the stream, where ``SSLStream`` would read first: OpenSSL 3 refuses a client's
  renegotiation anyway, and a remote server asking for one mid-delivery costs a retry.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import ssl
from typing import Any, Final

import trio

_QUICKACK: Final = getattr(socket, "TCP_QUICKACK", None)


class StreamIO:
    """A session's reads and writes on ``stream``: through the fast paths for plain TCP and
    for a ``TLSStream``, through the stream itself otherwise (a test's in-memory stream)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.tls = stream if isinstance(stream, TLSStream) else None
        self._unsent = b""  # plain TCP: what ``write_now`` could not hand the kernel
        self._writing = False  # plain TCP: a write waits for the kernel to take the rest

    async def read(self, max_bytes: int) -> bytes:
        """What the peer sent (b"" once it closed); a checkpoint."""
        if self.tls is not None:
            return await self.tls.read(max_bytes)
        if self.socket is None:
            return bytes(await self.stream.receive_some(max_bytes))
        while True:
            await trio.lowlevel.wait_readable(fileno(self.socket))  # closed: raises here
            try:
                # asked again: closed meanwhile, the number may be another file's by now
                return os.read(fileno(self.socket), max_bytes)
            except BlockingIOError:  # woken without data (it happens): wait again
                continue
            except OSError as exc:
                raise translated(exc) from exc

    async def write(self, data: bytes, give_up_after: float | None = None) -> None:
        """Write all of ``data``; trio.TooSlowError when the peer has not taken it within
        ``give_up_after`` seconds (None: the caller's own deadline bounds it). Plain TCP: one
        non-blocking write first, which nearly always takes it all (and then no cancel scope
        is entered at all); a ``TLSStream`` the same way."""
        if self.tls is not None:
            await self.tls.write(data, give_up_after)
            return
        if self.socket is not None:
            data = self._hand_over(data)
        if data:
            self._writing = True
            try:
                with trio.fail_after(math.inf if give_up_after is None else give_up_after):
                    await self.stream.send_all(data)
            finally:
                self._writing = False

    def write_now(self, data: bytes) -> bool:
        """Hand the kernel what it takes of ``data`` now, without waiting; the rest goes
        first in the next ``write`` (``unsent`` says there is some: ``write(b"")`` sends
        it). Not a checkpoint: the journal's callbacks call it on the event loop
        (server/session.py, ``_accept``). False, having done nothing, on a stream without
        the fast paths or while a write is under way; raises trio's errors as ``write``."""
        if self.tls is not None:
            return self.tls.write_now(data)
        if self.socket is None or self._writing:
            return False
        self._unsent = self._hand_over(data)
        return True

    def _hand_over(self, data: bytes) -> bytes:
        """What waits, then ``data``: one non-blocking write; returns what the kernel did
        not take (OSError as trio's)."""
        assert self.socket is not None
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        try:
            return data[os.write(fileno(self.socket), data) :]
        except BlockingIOError:
            return data
        except OSError as exc:
            raise translated(exc) from exc

    @property
    def unsent(self) -> bool:
        return bool(self._unsent) or (self.tls is not None and bool(self.tls.unsent))

    def ack_now(self) -> None:
        """Acknowledge what has arrived at once, where the kernel would delay it (Linux's
        TCP_QUICKACK sends an ACK it has pending). For a peer with Nagle's algorithm on
        that sent part of its answer and holds the rest until that part is acknowledged:
        without this, the rest waits for our delayed ACK (40 ms on Linux). No-op elsewhere."""
        sock = self.socket if self.tls is None else self.tls.socket
        if sock is not None and _QUICKACK is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    async def aclose(self) -> None:
        """Close at once, waiting for nothing. Plain TCP: the socket is closed here, without
        ``aclose_forcefully``'s cancel scope and the Cancelled raised and caught inside it
        (once a connection, which one message per connection pays every time); a
        ``TLSStream`` likewise, after its close_notify if the kernel takes it at once; any
        other stream through ``aclose_forcefully``."""
        if self.socket is not None:
            self.socket.close()  # trio's close: tells a task waiting on it first
        elif self.tls is not None:
            self.tls.close()
        else:
            await trio.aclose_forcefully(self.stream)


def fileno(socket: trio.socket.SocketType) -> int:
    """The socket's descriptor, asked anew each time: once closed, its number may be another
    file's, so a closed socket is trio.ClosedResourceError."""
    fd = socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the stream was closed")
    return fd


def translated(exc: OSError) -> Exception:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the stream was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc.strerror or exc}")


# What one read of a TLS socket takes: a 100 KiB message arrives in two reads, not seven.
SOCKET_READ: Final = 64 * 1024


class TLSStream(trio.abc.Stream):
    """TLS over ``transport``'s socket. Call ``do_handshake`` first."""

    def __init__(
        self,
        transport: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.transport_stream = transport
        self.socket = transport.socket
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._unsent = bytearray()  # ciphertext taken from OpenSSL, not yet by the kernel
        self._handshook = False
        self._broken = False
        self._closed = False
        self._reading = False
        self._writing = False

    # -- what the session logs ---------------------------------------------------------------
    def version(self) -> str | None:
        return self._ssl.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    # -- the handshake -----------------------------------------------------------------------
    async def do_handshake(self) -> None:
        """Complete the handshake (waiting for the peer: a checkpoint). A failure, or the
        peer leaving, is trio.BrokenResourceError; the stream is then only good to close."""
        self._check()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        self._claim(reading=True, writing=True)
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._drain()  # what we must say before the peer answers
                    await self._fill()
                except ssl.SSLError as exc:
                    with contextlib.suppress(OSError):  # the alert that says why, if taken
                        self._take_outgoing()
                        self._send_now()
                    raise self._break(exc) from exc
            self._handshook = True
            await self._drain()  # our last flight (and a TLS 1.3 server's session tickets)
        except OSError as exc:
            raise self._break(exc) from exc
        finally:
            self._reading = self._writing = False

    # -- reading -----------------------------------------------------------------------------
    async def read(self, max_bytes: int) -> bytes:
        """Plaintext from the peer, up to ``max_bytes``; b"" once it sent ``close_notify``.
        Always a checkpoint."""
        self._ready()
        self._claim(reading=True)
        try:
            waited = False
            while True:
                try:
                    data = self._ssl.read(max_bytes)
                    break
                except ssl.SSLWantReadError:
                    self._answer()  # what the peer may be waiting for before it goes on
                    await self._fill()
                    waited = True
                except ssl.SSLZeroReturnError:
                    data = b""
                    break
                except ssl.SSLError as exc:
                    raise self._break(exc) from exc
            if data:
                data = self._more(data, max_bytes)
            self._answer()
            if not waited:  # plaintext OpenSSL already held: still a checkpoint
                await trio.lowlevel.checkpoint()
            return data
        except OSError as exc:
            raise self._break(exc) from exc
        finally:
            self._reading = False

    def _answer(self) -> None:
        """Send what a read made OpenSSL say (a TLS 1.2 renegotiation's flight, for one; a
        TLS 1.3 key update's answer waits for our next write, which sends it first), as far
        as the kernel takes it now. With a write under way in another task, that write sends
        it, in order, before its own."""
        if self._outgoing.pending:
            self._take_outgoing()
            if not self._writing:
                self._send_now()

    def _more(self, data: bytes, max_bytes: int) -> bytes:
        """``data`` and every whole record after it already received, up to ``max_bytes``
        (OpenSSL gives one record a call)."""
        if len(data) >= max_bytes or not (self._incoming.pending or self._ssl.pending()):
            return data
        parts = [data]
        size = len(data)
        while size < max_bytes and (self._incoming.pending or self._ssl.pending()):
            try:
                part = self._ssl.read(max_bytes - size)
            except ssl.SSLError:
                break  # half a record, or the end: the next read says so
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    async def _fill(self) -> None:
        """Wait until the socket is readable (a checkpoint), then hand what it has to
        OpenSSL; the peer's EOF becomes the incoming side's EOF."""
        await trio.lowlevel.wait_readable(self._fd())  # closed meanwhile: raises here
        try:
            raw = os.read(self._fd(), SOCKET_READ)
        except BlockingIOError:  # woken without data (it happens): the caller asks again
            return
        if raw:
            self._incoming.write(raw)
        else:
            self._incoming.write_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.read(SOCKET_READ if max_bytes is None else max_bytes)

    # -- writing -----------------------------------------------------------------------------
    async def write(self, data: bytes, give_up_after: float | None = None) -> None:
        """Encrypt and send all of ``data``; trio.TooSlowError when the peer has not taken it
        within ``give_up_after`` seconds (None: the caller's own deadline bounds it). Not a
        checkpoint when the kernel takes it all at once, as ``StreamIO.write``."""
        self._ready()
        self._claim(writing=True)
        try:
            if data:  # an empty write is OpenSSL's EOF
                try:
                    self._ssl.write(data)
                except ssl.SSLError as exc:
                    raise self._break(exc) from exc
                self._take_outgoing()
            self._send_now()
            if self._unsent:
                with trio.fail_after(math.inf if give_up_after is None else give_up_after):
                    await self._drain()
        except OSError as exc:
            raise self._break(exc) from exc
        finally:
            self._writing = False

    def write_now(self, data: bytes) -> bool:
        """Encrypt ``data`` and hand the kernel what it takes now, without waiting; the rest
        is sent first by the next ``write`` (``write(b"")`` sends only it). Not a
        checkpoint. False, having done nothing, while a write is under way."""
        self._ready()
        if self._writing:
            return False
        try:
            self._ssl.write(data)
            self._take_outgoing()
            self._send_now()
        except OSError as exc:
            raise self._break(exc) from exc
        return True

    @property
    def unsent(self) -> int:
        """Bytes of ciphertext the kernel has not taken yet."""
        return len(self._unsent)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.write(bytes(data))
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self._fd())

    def _take_outgoing(self) -> None:
        self._unsent += self._outgoing.read()

    def _send_now(self) -> None:
        """Hand the kernel what it takes of the queue without waiting (OSError as is)."""
        if self._unsent:
            try:
                sent = os.write(self._fd(), self._unsent)
            except BlockingIOError:
                return
            del self._unsent[:sent]

    async def _drain(self) -> None:
        """Send the whole queue, waiting for the socket as needed."""
        self._take_outgoing()
        self._send_now()
        while self._unsent:
            await trio.lowlevel.wait_writable(self._fd())
            self._send_now()

    # -- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Send ``close_notify`` if the kernel takes it now, then close the socket (a task
        waiting on it is woken with trio.ClosedResourceError). Waits for nothing."""
        if self._closed:
            return
        self._closed = True
        if self._handshook and not self._broken:
            with contextlib.suppress(OSError):  # SSLWantReadError: theirs is not awaited
                self._ssl.unwrap()
            with contextlib.suppress(OSError):
                self._take_outgoing()
                self._send_now()
        self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    # -- state -------------------------------------------------------------------------------
    def _fd(self) -> int:
        return fileno(self.socket)

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._broken:
            raise trio.BrokenResourceError("the TLS stream broke earlier")

    def _ready(self) -> None:
        self._check()
        if not self._handshook:
            raise RuntimeError("TLSStream: do_handshake first")

    def _claim(self, *, reading: bool = False, writing: bool = False) -> None:
        if (reading and self._reading) or (writing and self._writing):
            raise trio.BusyResourceError("another task is using this direction of the stream")
        self._reading = self._reading or reading
        self._writing = self._writing or writing

    def _break(self, exc: OSError) -> Exception:
        """What a failure (a TLS error, or the socket's) is to the caller: the stream is
        broken for good."""
        self._broken = True
        if isinstance(exc, ssl.SSLError):
            return trio.BrokenResourceError(f"TLS failed: {exc.reason or type(exc).__name__}")
        return translated(exc)


def start_tls(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
) -> TLSStream | trio.SSLStream[trio.abc.Stream]:
    """``stream`` wrapped for TLS, not yet shaken hands (call ``do_handshake``)."""
    if isinstance(stream, trio.SocketStream):
        return TLSStream(stream, context, server_side=server_side, server_hostname=server_hostname)
    return trio.SSLStream(stream, context, server_side=server_side, server_hostname=server_hostname)


def tls_name(stream: trio.abc.Stream) -> str | None:
    """What a message's record says of its connection's TLS ("TLSv1.3 TLS_AES_256_GCM_SHA384"),
    None for a stream without TLS."""
    if not isinstance(stream, (TLSStream, trio.SSLStream)):
        return None
    cipher = stream.cipher()
    return f"{stream.version()} {cipher[0] if cipher else ''}".strip()


def tls_failure(exc: trio.BrokenResourceError) -> str:
    """Why a TLS handshake failed, for a log line or a deferral: OpenSSL's reason
    ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER"), never anything the peer sent."""
    reason = getattr(exc.__cause__, "reason", None)
    return str(reason) if reason else "the connection was lost"
