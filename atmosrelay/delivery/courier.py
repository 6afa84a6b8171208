"""The delivery process: attempts carried on the second core.

The relay is one process per core it can use. The accepting process (the owner) keeps
everything that must be exact and single: the journal and its group commit, the queue state,
the schedule, the lanes, the policy, the control socket. The delivery process (this module,
``python -m atmosrelay.delivery.courier FD``, started and supervised by the owner through
``CourierLink``) does the work that is heavy and has no state worth keeping: it reads a
message's body from the journal **read-only**, adds List-Unsubscribe, signs it three times,
and runs the SMTP transaction, holding the connections the owner's lane workers hold
handles to. It writes nothing: the owner records every outcome, so the durability contract,
exactly-one-DSN, the limits and ``crashtest`` see one writer, as before (docs/delivery.md).

The two talk over a socketpair in frames (u32 length, little-endian, then a pickle; both
ends are this program, started by the owner with its own interpreter):

    owner -> courier   ("hello", CourierSettings)       first, once
                       ("attempt", id, token | None, Job)
                       ("close", token)                  a lane worker let its connection go
    courier -> owner   ("ready", pid)
                       ("done", id, token | None, host, tls, mta, outcomes, opened)
                       ("moved", id)                     compaction moved the record: the
                                                         owner sends the job again, with body
                       ("crashed", id, traceback)        a bug; the owner's lane counts it

Secrets never cross the pipe: the delivery process reads the DKIM keys from the account
store and the DKIM directory, and the unsubscribe key from its file, as the owner does.
End of file from the owner (it stopped, or was killed) ends the delivery process: attempts
in hand are cancelled (the owner recorded nothing for them, so they are tried again), open
connections get a QUIT within ``QUIT_GRACE`` seconds.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import signal
import socket
import ssl
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from atmosrelay import logs
from atmosrelay.accounts.dkim_keys import OperatorKey, ensure_operator_key
from atmosrelay.accounts.store import Store
from atmosrelay.delivery.carry import Job, transact
from atmosrelay.delivery.client_session import Remote, open_remote
from atmosrelay.delivery.destination import Destination
from atmosrelay.delivery.prepare import Preparer, load_or_create_secret
from atmosrelay.queue.records import RecordType
from atmosrelay.stream_io import StreamIO
from journal import read_at

log = logging.getLogger("atmosrelay.delivery")

QUIT_GRACE: Final = 5.0  # at the end, open connections get this long for their QUIT
READ_SIZE: Final = 256 * 1024
INLINE_SIZE: Final = 256 * 1024  # a message up to this size is prepared on the event loop


@attrs.frozen
class CourierSettings:
    """What the delivery process needs from the relay's config (no secret: paths to them)."""

    journal_dir: str
    max_record_size: int
    accounts_db: str
    dkim_dir: str
    operator_domain: str
    unsubscribe_key: str
    unsubscribe_url: str
    helo: str
    tls_verify: bool
    ca_file: str
    chunking: bool = True  # BDAT to remotes that offer CHUNKING
    log_level: str = "INFO"
    log_format: str = "text"


def client_context(verify: bool, ca_file: str) -> ssl.SSLContext:
    """The TLS context for STARTTLS to remote servers: opportunistic (RFC 7435, not verified)
    unless ``verify``."""
    if verify:
        return ssl.create_default_context(cafile=ca_file or None)
    # the same context create_default_context makes, but for the certificate store it
    # loads (144 CA certificates, 30-50 ms at the start of every delivery process) that an
    # unverified handshake never reads
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- frames -----------------------------------------------------------------------------


def frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "little") + data


class Frames:
    """The messages the other end sends, one at a time, in order."""

    def __init__(self, io: StreamIO) -> None:
        self.io = io
        self._buffer = bytearray()
        self._ready: collections.deque[tuple[Any, ...]] = collections.deque()

    async def next(self) -> tuple[Any, ...] | None:
        """The next message; None once the other end has closed."""
        while not self._ready:
            data = await self.io.read(READ_SIZE)
            if not data:
                return None
            buffer = self._buffer
            buffer += data
            start = 0
            while len(buffer) - start >= 4:
                end = start + 4 + int.from_bytes(buffer[start : start + 4], "little")
                if end > len(buffer):
                    break
                self._ready.append(pickle.loads(buffer[start + 4 : end]))
                start = end
            del buffer[:start]
        return self._ready.popleft()


class Outbox:
    """Frames to write, written together: one system call carries every reply that became
    ready while the last one was being written."""

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._ready = trio.Event()

    def put(self, message: object) -> None:
        self._frames.append(frame(message))
        self._ready.set()

    async def run(self, io: StreamIO) -> None:
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            data, self._frames = b"".join(self._frames), []
            await io.write(data)


# -- the delivery process ---------------------------------------------------------------


class Courier:
    def __init__(self, settings: CourierSettings, reply: Callable[[object], None]) -> None:
        self.settings = settings
        self.reply = reply
        self.store = Store(settings.accounts_db)
        secret = Path(settings.unsubscribe_key)
        if not secret.exists():
            raise FileNotFoundError(f"{secret}: no unsubscribe key (the relay makes it first)")
        self.prepare = Preparer(
            self.store,
            self.operator_key(),
            unsubscribe_secret=load_or_create_secret(secret),
            unsubscribe_url=settings.unsubscribe_url,
        )
        self.generation = 0
        self.prepare.generation = lambda: self.generation
        self.tls = client_context(settings.tls_verify, settings.ca_file)
        self.remotes: dict[int, Remote] = {}
        self.tokens = itertools.count(1)

    def operator_key(self) -> OperatorKey:
        """The operator's signing key, as the relay made it (never made here: two processes
        must not each make one)."""
        directory = Path(self.settings.dkim_dir)
        if not any((directory / f).exists() for f in ("operator-selector", "operator-rsa.pem")):
            raise FileNotFoundError(f"{directory}: no operator DKIM key (the relay makes it first)")
        operator, _ = ensure_operator_key(directory, self.settings.operator_domain)
        return operator

    async def open(self, destination: Destination, require_tls: bool) -> Remote:
        return await open_remote(
            destination,
            helo=self.settings.helo,
            tls=self.tls,
            require_tls=require_tls,
            chunking=self.settings.chunking,
        )

    def in_hand(self, job: Job) -> bool:
        """Whether ``body`` is quick enough to run on the event loop: a message of at most
        ``INLINE_SIZE`` octets (one read, of the page cache nearly always; hashed and signed
        in well under a millisecond) whose signer is cached and current. A worker thread
        costs more than that here: without the hop to it and back (and its GIL handovers),
        end to end carries 9-15% more messages a second (bench/README.md). A larger message,
        a signer to build (an account store read that may wait on SQLite's lock, keys to
        parse) or a new operator key go to a thread, so the loop never waits long for the
        disk or a lock."""
        if self._operator_rotated(job):
            return False
        return (
            job.size is not None and job.size <= INLINE_SIZE and self.prepare.in_hand(job.signing)
        )

    def _operator_rotated(self, job: Job) -> bool:
        """Takes the job's account-store generation (the signer cache compares it); whether
        the job names an operator selector other than the one this process signs with."""
        generation, selector = job.keys
        self.generation = generation
        return bool(selector) and selector != self.prepare.operator.selector

    def body(self, job: Job) -> bytes | None:
        """The bytes to send (on the event loop when ``in_hand``, else in a worker thread);
        None when the record has moved."""
        if self._operator_rotated(job):  # a rotation activated
            self.prepare.set_operator(self.operator_key())
        body = job.body
        if body is None:
            record = read_at(
                self.settings.journal_dir,
                job.position,
                RecordType.ACCEPTED,
                max_record_size=self.settings.max_record_size,
            )
            if record is None:
                return None
            body = job.body_of(record)
        return self.prepare(job.signing, job.recipients, body)

    async def attempt(self, request: int, token: int | None, job: Job) -> None:
        remote = self.remotes.pop(token, None) if token is not None else None
        try:
            if self.in_hand(job):
                body = self.body(job)
            else:
                body = await trio.to_thread.run_sync(self.body, job)
            if body is None:
                if remote is not None and token is not None:
                    self.remotes[token] = remote
                self.reply(("moved", request))
                return
            carried = await transact(job, body, remote, self.open)
        except Exception:
            # a bug: the owner's lane logs and counts it like one of its own
            self.reply(("crashed", request, traceback.format_exc()))
            if remote is not None:
                await _quit(remote)
            return
        kept = carried.remote
        new = None
        if kept is not None:
            assert isinstance(kept, Remote)
            new = next(self.tokens)
            self.remotes[new] = kept
        tls = kept.tls if kept is not None else False
        host = kept.host if kept is not None else ""
        self.reply(("done", request, new, host, tls, carried.mta, carried.outcomes, carried.opened))

    def close(self, token: int, nursery: trio.Nursery) -> None:
        remote = self.remotes.pop(token, None)
        if remote is not None:
            nursery.start_soon(_quit, remote)


async def _quit(remote: Remote) -> None:
    with trio.move_on_after(QUIT_GRACE):
        await remote.aclose()


async def serve(sock: socket.socket) -> None:
    io = StreamIO(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    outbox = Outbox()
    messages = Frames(io)
    hello = await messages.next()
    if hello is None:
        return  # the owner went away before saying hello
    assert hello[0] == "hello"
    assert isinstance(hello[1], CourierSettings)
    settings = hello[1]
    logs.configure(settings.log_level, settings.log_format)
    courier = await trio.to_thread.run_sync(Courier, settings, outbox.put)
    outbox.put(("ready", os.getpid()))
    async with trio.open_nursery() as closing:
        async with trio.open_nursery() as work:
            work.start_soon(outbox.run, io)
            while (message := await messages.next()) is not None:
                if message[0] == "attempt":
                    _, request, token, job = message
                    assert isinstance(job, Job)
                    work.start_soon(courier.attempt, request, token, job)
                elif message[0] == "close":
                    courier.close(message[1], closing)
            work.cancel_scope.cancel()  # the owner is gone: attempts in hand go unrecorded
        for token in list(courier.remotes):
            courier.close(token, closing)
    courier.store.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # Only the owner stops a delivery process (end of file on the pipe, which its death
    # gives too). A signal sent to the whole process group (Ctrl-C in a terminal, `timeout`,
    # `kill -TERM -PGID`, `pkill -f atmosrelay`) reaches this process as well as the owner:
    # it must not cut the attempts in hand that the owner's drain lets finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    sock.setblocking(False)
    trio.run(serve, sock)


if __name__ == "__main__":
    # run as a module, this file is ``__main__``; the frames name the classes of
    # ``atmosrelay.delivery.courier``, so serve from that module
    from atmosrelay.delivery import courier

    courier.main()
