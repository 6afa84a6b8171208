"""Carrying an attempt: its body from the journal, prepared, over one SMTP transaction.

The dispatcher decides *what* to try and records what came of it; a carrier does the part in
between, where the CPU goes (reading the body, the three DKIM signatures, the SMTP client):

    Job          what the dispatcher knows of one attempt: the work, the envelope, where the
                 body stands in the journal, what signing needs; small and picklable
    transact()   one transaction on the connection a lane's worker holds, or on a new one
    Carried      the connection to keep (or None), the host that answered, the outcomes
    LocalCarrier all of it in this process (the dispatcher's own default: its unit tests on
                 virtual time, and ``delivery.processes = 0``)
    CourierLink  all of it in the delivery processes (delivery/courier_link.py; the relay's
                 default)

A connection is whatever the carrier hands back: a ``Remote`` here, a handle naming one in
the delivery process there. The lane only keeps it, gives it back, and closes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import attrs
import trio

from atmosrelay.delivery.client_session import ConnectFailed, Envelope, Remote
from atmosrelay.delivery.destination import Destination
from atmosrelay.delivery.prepare import Signing
from atmosrelay.queue.records import Outcome, RecordType
from journal import Journal, Position, Record

# (what signing needs, the recipients of this transaction, the body) -> the bytes to send
Prepare = Callable[[Signing, tuple[str, ...], bytes], bytes]
# (destination, TLS required) -> an open, greeted connection; raises ConnectFailed
Open = Callable[[Destination, bool], Awaitable[Remote]]


@attrs.frozen
class Job:
    queue_id: str
    recipients: tuple[str, ...]
    destination: Destination
    envelope: Envelope
    require_tls: bool
    position: Position  # the ACCEPTED record, with the body
    body_offset: int  # where the message starts in its payload
    signing: Signing
    # (the account store's generation, the operator's DKIM selector): a delivery process
    # looks at its keys again when either moved
    keys: tuple[int, str] = (0, "")
    body: bytes | None = None  # given when the delivery process could not find the record
    size: int | None = None  # the message's octets, when known (how it will be prepared)

    def body_of(self, record: Record) -> bytes:
        if (
            record.type != RecordType.ACCEPTED
            or self.queue_id.encode() not in record.payload[: self.body_offset]
        ):
            raise ValueError(f"{self.queue_id}: the record at {self.position} is not its body")
        return record.payload[self.body_offset :]


class Connection(Protocol):
    host: str
    tls: bool
    usable: bool

    async def aclose(self) -> None: ...


@attrs.frozen
class Carried:
    remote: Connection | None  # the connection to keep
    mta: str | None  # the host that gave the outcomes (None: none would take a connection)
    outcomes: tuple[Outcome, ...]
    opened: bool  # a new connection was opened for it


class CarrierLost(Exception):
    """The delivery process went away during the attempt: nothing is known of it."""


class Carrier(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    async def carry(self, job: Job, remote: Connection | None) -> Carried: ...

    async def aclose(self) -> None: ...


async def transact(job: Job, body: bytes, remote: Remote | None, open_: Open) -> Carried:
    """One transaction, on ``remote`` when it is still open and fits (a worker's connection
    without TLS does not carry mail whose domain requires it). A reused connection that turns
    out dead (the server dropped it while idle) is replaced once, without counting an
    attempt. No host taking a connection is the outcomes of ``ConnectFailed``."""
    if remote is not None and job.require_tls and not remote.tls:
        await remote.aclose()
        remote = None
    if remote is not None and remote.usable:
        outcomes = await remote.send(job.envelope, body)
        if remote.usable:
            return Carried(remote, remote.host, outcomes, False)
    if remote is not None:
        await remote.aclose()
    try:
        remote = await open_(job.destination, job.require_tls)
    except ConnectFailed as failed:
        return Carried(None, None, failed.outcomes(job.recipients), False)
    outcomes = await remote.send(job.envelope, body)
    if remote.usable:
        return Carried(remote, remote.host, outcomes, True)
    await remote.aclose()
    return Carried(None, remote.host, outcomes, True)


class LocalCarrier:
    """Attempts carried in this process: the body read and prepared in a worker thread."""

    def __init__(self, journal: Journal, prepare: Prepare | None, open_: Open) -> None:
        self.journal = journal
        self.prepare = prepare
        self.open = open_

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def carry(self, job: Job, remote: Connection | None) -> Carried:
        assert remote is None or isinstance(remote, Remote)
        body = await self.journal.read_then(job.position, partial(_prepared, self.prepare, job))
        return await transact(job, body, remote, self.open)

    async def aclose(self) -> None:
        pass


def _prepared(prepare: Prepare | None, job: Job, record: Record) -> bytes:
    body = job.body_of(record)
    return body if prepare is None else prepare(job.signing, job.recipients, body)
