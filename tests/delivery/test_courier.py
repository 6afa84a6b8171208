"""Delivery processes (delivery/courier.py, courier_link.py), started for real: the owner's
journal on disk, the dispatcher carrying attempts through two delivery processes to aiosmtpd.

Shown: the mail arrives signed three times, with List-Unsubscribe, from processes other than
this one; a delivery process killed with an attempt in hand is replaced, and the attempt is
tried again and recorded once sent; a record compacted away under an attempt is sent with
its body by the owner; no secret is in what the owner sends the delivery processes; both end
when the dispatcher stops."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import pickle
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.parser import BytesParser
from pathlib import Path

import attrs
import trio
import trio.testing
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session
from dkim.canonicalization import Relaxed

from atmosrelay.accounts import dkim_keys, domains
from atmosrelay.accounts.store import Store
from atmosrelay.delivery.carry import Job
from atmosrelay.delivery.client_session import Envelope
from atmosrelay.delivery.courier import INLINE_SIZE, CourierSettings, client_context, frame
from atmosrelay.delivery.courier_link import STOP_GRACE, CourierLink
from atmosrelay.delivery.dispatcher import DeliverySettings, Dispatcher
from atmosrelay.delivery.prepare import Preparer, Signing, load_or_create_secret
from atmosrelay.delivery.resolver import Destination
from atmosrelay.queue.store import QueueStore
from journal import Position, open_journal, read_at
from tests.delivery.test_dispatcher import FakeResolver
from tests.processes import exited
from tests.queue.factories import ALICE_DID, accepted_record
from tests.sink import Sink, aiosmtpd_in_thread

LIMIT = 30.0


def message(subject: str) -> bytes:
    return (
        f"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
        "Message-ID: <m@example.org>\r\n\r\nhello\r\n"
    ).encode()


@attrs.define
class HeldSink(Sink):
    """A sink whose DATA waits until ``release`` once ``hold`` is set."""

    hold: threading.Event = attrs.field(factory=threading.Event)
    entered: threading.Event = attrs.field(factory=threading.Event)
    release: threading.Event = attrs.field(factory=threading.Event)

    async def handle_DATA(self, server: object, session: Session, envelope: AioEnvelope) -> str:
        if self.hold.is_set():
            self.entered.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, LIMIT)
        return await super().handle_DATA(server, session, envelope)


@asynccontextmanager
async def held_sink() -> AsyncIterator[HeldSink]:
    from aiosmtpd.smtp import SMTP as AioSMTP

    sink = HeldSink()

    def factory(loop: asyncio.AbstractEventLoop) -> AioSMTP:
        return AioSMTP(sink, hostname="mx.example.net", decode_data=False, loop=loop)

    with aiosmtpd_in_thread(factory) as port:
        sink.port = port
        try:
            yield sink
        finally:
            sink.release.set()


def courier_settings(tmp: Path) -> CourierSettings:
    return CourierSettings(
        journal_dir=str(tmp / "journal"),
        max_record_size=16 * 1024 * 1024,
        accounts_db=str(tmp / "accounts.sqlite3"),
        dkim_dir=str(tmp / "dkim"),
        operator_domain="relay.test",
        unsubscribe_key=str(tmp / "unsubscribe.key"),
        unsubscribe_url="https://relay.test",
        helo="relay.test",
        tls_verify=False,
        ca_file="",
        log_level="WARNING",
    )


def enroll(tmp: Path) -> None:
    """What the relay makes before it starts delivery processes: the account store, the
    operator's key, the unsubscribe key."""
    dkim_keys.ensure_operator_key(tmp / "dkim", "relay.test")
    load_or_create_secret(tmp / "unsubscribe.key")
    store = Store(tmp / "accounts.sqlite3")
    store.add_member(ALICE_DID, "alice.test")
    domains.enroll(store, ALICE_DID, "example.org", limit=2, clock_now=0)
    store.mark_verified("example.org", without_dns=True)
    store.close()


@attrs.define
class World:
    queue: QueueStore
    dispatcher: Dispatcher
    link: CourierLink
    sink: HeldSink


@asynccontextmanager
async def world(tmp: Path, **journal: int) -> AsyncIterator[World]:
    enroll(tmp)
    async with held_sink() as sink, open_journal(str(tmp / "journal"), **journal) as j:
        queue = QueueStore(j)
        link = CourierLink(courier_settings(tmp), 2)
        link.journal = j
        dispatcher = Dispatcher(
            queue,
            FakeResolver({"example.net": Destination((("127.0.0.1", sink.port),))}),
            DeliverySettings(helo="relay.test", tls=client_context(False, "")),
            carrier=link,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)  # which runs the link
            yield World(queue, dispatcher, link, sink)
            dispatcher.drain(5)


async def accept(queue: QueueStore, subject: str, category: str = "transactional") -> str:
    body = message(subject)
    record = accepted_record(
        "bob@example.net", accepted_at=time.time(), category=category, size=len(body)
    )
    await queue.accept(record, body)
    return record.id


async def until(condition: object, limit: float = LIMIT) -> None:
    assert callable(condition)
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - the delivery processes are real
            await trio.sleep(0.02)


def alive(pid: int) -> bool:
    """Running (a zombie whose parent has not reaped it yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_mail_goes_out_through_the_delivery_processes_signed(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        pids = w.link.pids
        assert len(pids) == 2
        assert os.getpid() not in pids
        assert all(alive(p) for p in pids)
        ids = [await accept(w.queue, f"m{i}") for i in range(10)]
        ids.append(await accept(w.queue, "bulk", category="bulk"))
        w.dispatcher.notify()
        await until(lambda: all(w.queue.state.messages[q].terminal for q in ids))
        assert all(
            w.queue.state.messages[q].recipient_states == {"bob@example.net": "sent"} for q in ids
        )
        received = {r.subject: r for r in w.sink.snapshot()}
        assert set(received) == {f"m{i}" for i in range(10)} | {"bulk"}
        for r in received.values():
            parsed = BytesParser().parsebytes(r.content)
            signatures = parsed.get_all("DKIM-Signature") or []
            selectors = sorted(s.split("d=")[1].split(";")[0] for s in signatures)
            assert selectors == ["example.org", "example.org", "relay.test"], r.subject
            assert ("List-Unsubscribe" in parsed) == (r.subject == "bulk")
    # the dispatcher stopped: so did the delivery processes
    assert await trio.to_thread.run_sync(exited, pids, LIMIT)


async def test_messages_either_side_of_the_inline_size_arrive_whole_and_signed(
    tmp_path: Path,
) -> None:
    """A message up to INLINE_SIZE is prepared on the delivery process's event loop once its
    signer is in hand; a larger one (or the first of a domain) in a worker thread. Both
    arrive with the body as accepted and three signatures over it."""
    line = b"x" * 76 + b"\r\n"
    bodies = {
        "small": line * 10,
        "at-the-limit": line * ((INLINE_SIZE - 200) // len(line)),
        "large": line * (INLINE_SIZE // len(line) + 100),
    }
    async with world(tmp_path) as w:
        ids = []
        for subject, body in bodies.items():
            content = message(subject).replace(b"hello\r\n", body)
            record = accepted_record("bob@example.net", accepted_at=time.time(), size=len(content))
            await w.queue.accept(record, content)
            ids.append(record.id)
            w.dispatcher.notify()
            await until(lambda: w.queue.state.messages[ids[-1]].terminal)
        received = {r.subject: r for r in w.sink.snapshot()}
        for subject, body in bodies.items():
            parsed = BytesParser().parsebytes(received[subject].content)
            assert parsed.get_payload(decode=False).encode() == body, subject
            signatures = parsed.get_all("DKIM-Signature") or []
            assert len(signatures) == 3, subject
            # each signature's body hash is the one dkimpy computes for the body received
            digest = hashlib.sha256(Relaxed.canonicalize_body(body)).digest()
            bh = "bh=" + base64.b64encode(digest).decode()
            assert all(bh in "".join(s.split()) for s in signatures), subject
        sizes = [w.queue.state.messages[q].record.size for q in ids]
        assert sizes[1] <= INLINE_SIZE < sizes[2]


async def test_a_killed_delivery_process_is_replaced_and_its_attempt_tried_again(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        first = w.link.pids
        w.sink.hold.set()
        queue_id = await accept(w.queue, "held")
        w.dispatcher.notify()
        assert await trio.to_thread.run_sync(w.sink.entered.wait, LIMIT)
        # the attempt is in hand (its DATA waits at the sink): kill every delivery process
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        await until(lambda: w.link.restarts == 2 and len(w.link.pids) == 2)
        assert not set(w.link.pids) & set(first)
        w.sink.hold.clear()
        w.sink.release.set()  # the killed attempt's DATA completes at the sink, unrecorded
        await until(lambda: w.queue.state.messages[queue_id].terminal)
        msg = w.queue.state.messages[queue_id]
        assert msg.recipient_states == {"bob@example.net": "sent"}
        # nothing was recorded for the lost attempt: one attempt, the one that was sent
        assert [o.outcome for d in msg.history for o in d.outcomes] == ["sent"]
        assert msg.attempts["bob@example.net"] == 1
        # at least once: the killed attempt's copy may have reached the sink too
        assert 1 <= w.sink.subject_counts()["held"] <= 2


async def test_a_record_compacted_away_is_sent_with_the_body_the_owner_reads(
    tmp_path: Path,
) -> None:
    async with world(tmp_path, segment_size=4096) as w:
        queue_id = await accept(w.queue, "moved")
        old = w.queue.state.messages[queue_id].position
        for _ in range(40):  # seal its segment
            await w.queue.journal.append(250, b"x" * 200)  # no record of ours
        await w.queue.journal.compact(dead=set())  # copy every record forward
        assert read_at(str(tmp_path / "journal"), old, 1) is None  # its segment is gone
        job = Job(
            queue_id,
            ("bob@example.net",),
            Destination((("127.0.0.1", w.sink.port),)),
            Envelope("alice@example.org", ("bob@example.net",)),
            False,
            old,
            w.queue.state.messages[queue_id].body_offset,
            Signing("alice@example.org", ALICE_DID, False),
        )
        carried = await w.link.carry(job, None)
        assert [o.outcome for o in carried.outcomes] == ["sent"]
        assert w.sink.subject_counts()["moved"] == 1
        if carried.remote is not None:
            await carried.remote.aclose()


def test_no_secret_goes_to_the_delivery_process(tmp_path: Path) -> None:
    enroll(tmp_path)
    store = Store(tmp_path / "accounts.sqlite3")
    operator, _ = dkim_keys.ensure_operator_key(tmp_path / "dkim", "relay.test")
    secret = load_or_create_secret(tmp_path / "unsubscribe.key")
    domain = store.domain("example.org")
    prepare = Preparer(store, operator, unsubscribe_secret=secret, unsubscribe_url="")
    store.close()
    job = Job(
        "q1",
        ("bob@example.net",),
        Destination((("127.0.0.1", 25),)),
        Envelope("alice@example.org", ("bob@example.net",)),
        False,
        Position(1, 0),
        10,
        Signing("alice@example.org", ALICE_DID, True),
        (3, prepare.operator.selector),
    )
    sent = frame(("hello", courier_settings(tmp_path))) + frame(("attempt", 1, None, job))
    assert pickle.loads(sent[4 : 4 + int.from_bytes(sent[:4], "little")])[0] == "hello"
    private_parts = [
        secret,
        secret.hex().encode(),
        operator.key.private.encode(),
        domain.dkim_rsa_private.encode(),
        domain.dkim_ed25519_private.encode(),
    ]
    for part in private_parts:
        assert part not in sent
    for line in operator.key.private.splitlines()[1:-1]:  # nor any line of a PEM body
        assert line.encode() not in sent


async def test_a_stop_while_a_delivery_process_starts_ends_it(tmp_path: Path) -> None:
    """A stop (``aclose``) that comes while a delivery process is starting (one started
    again after another died, when SIGTERM arrives): no end of file could be sent then, so
    when it says "ready" it gets one at once and exits, and the stop returns. It used to be served as if nothing had happened, and the stop waited out its
    grace and left it running. The process is held stopped (SIGSTOP) until the stop has
    begun, so it cannot be ready before."""
    enroll(tmp_path)
    link = CourierLink(courier_settings(tmp_path), 1)
    [courier] = link.couriers
    await link.spawn()
    pid = courier.starting
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    with trio.fail_after(STOP_GRACE / 2):  # the old code waited STOP_GRACE + 5, then hung
        async with trio.open_nursery() as nursery:
            nursery.start_soon(courier.run)
            await trio.testing.wait_all_tasks_blocked()  # it waits for "ready"
            nursery.start_soon(courier.aclose)
            await trio.testing.wait_all_tasks_blocked()  # the stop waits for it to end
            os.kill(pid, signal.SIGCONT)
    assert not courier.up.is_set()
    assert await trio.to_thread.run_sync(exited, [pid], LIMIT)
