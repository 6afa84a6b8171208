"""The dispatcher and lanes on virtual time: fake resolver, fake MX servers built from our
own ServerConnection, the real journal on a crashable FS."""

from __future__ import annotations

import email
import errno
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

import journal._journal as journal_module
from atmosrelay.delivery.backoff import RetryPolicy
from atmosrelay.delivery.client_session import open_remote
from atmosrelay.delivery.dispatcher import DeliverySettings, Dispatcher
from atmosrelay.delivery.resolver import Destination, ResolutionFailed
from atmosrelay.queue.records import Delivery, Outcome, RecordType, decode_delivery
from atmosrelay.queue.store import QueueStore
from atmosrelay.smtp import Reply
from journal import open_journal
from journal.testing import CrashableMemFS, FaultFS
from tests.delivery.test_client_session import MESSAGE, FakeMX, Host, fake_mx, tls
from tests.queue.factories import accepted_record

NO_JITTER = RetryPolicy(jitter=0.0)


class FakeResolver:
    def __init__(self, table: dict[str, Destination | ResolutionFailed]) -> None:
        self.table = table

    async def destination(self, domain: str) -> Destination:
        value = self.table.get(domain, ResolutionFailed("4.4.3", f"{domain}: not in the table"))
        if isinstance(value, ResolutionFailed):
            raise value
        return value


async def accept(queue: QueueStore, *recipients: str) -> str:
    record = accepted_record(*recipients, accepted_at=trio.current_time(), size=len(MESSAGE))
    await queue.accept(record, MESSAGE)
    return record.id


@attrs.define
class World:
    queue: QueueStore
    dispatcher: Dispatcher
    mx: FakeMX


@asynccontextmanager
async def world(
    hosts: dict[str, Host], table: dict[str, Destination | ResolutionFailed], **settings: object
) -> AsyncIterator[World]:
    open_fn = settings.pop("open_fn", open_remote)
    before = settings.pop("before", None)  # fills the queue before the dispatcher starts
    fs = settings.pop("fs", None) or CrashableMemFS()
    async with open_journal("/q", fs=fs) as journal, fake_mx(**hosts) as mx:  # type: ignore[arg-type]
        queue = QueueStore(journal)
        if before is not None:
            await before(queue)  # type: ignore[operator]
        dispatcher = Dispatcher(
            queue,
            FakeResolver(table),
            DeliverySettings(
                helo="relay.test", tls=tls(), operator_domain="relay.test", **settings
            ),  # type: ignore[arg-type]
            open_fn=open_fn,  # type: ignore[arg-type]
            connect=mx.connect,
            clock=trio.current_time,  # type: ignore[arg-type]
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            yield World(queue, dispatcher, mx)
            nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool], limit: float = 3600) -> None:
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - polling state on the autojump clock
            await trio.sleep(5.0)


def deliveries(w: World) -> list[tuple[float, str, str]]:
    out = []
    for record in w.queue.journal.records():
        if record.type == RecordType.DELIVERY:
            d = decode_delivery(record.payload)
            out += [(d.at, o.recipient, o.outcome) for o in d.outcomes]
    return out


MX1 = Destination((("mx1", 25),))


async def test_two_domains_one_provider_share_a_lane(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({"mx1": Host()}, {"example.net": MX1, "example.com": MX1}) as w:
        qid = await accept(w.queue, "bob@example.net", "carol@example.com")
        w.dispatcher.notify()
        await until(lambda: w.queue.state.messages[qid].terminal)
        assert w.queue.state.messages[qid].recipient_states == {
            "bob@example.net": "sent",
            "carol@example.com": "sent",
        }
        assert list(w.dispatcher.lanes) == ["mx1:25"]  # MX rollup
        assert len(w.mx.hosts["mx1"].received) == 2
        assert {r for _, r, o in deliveries(w) if o == "sent"} == {
            "bob@example.net",
            "carol@example.com",
        }


async def test_deferred_then_retried_at_exactly_one_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    busy = Host(rcpt={"bob@example.net": Reply(450, "4.2.1", ("busy",))})
    async with world({"mx1": busy}, {"example.net": MX1}, policy=NO_JITTER) as w:
        t0 = trio.current_time()
        qid = await accept(w.queue, "bob@example.net")
        w.dispatcher.notify()
        await until(
            lambda: w.queue.state.messages[qid].recipient_states["bob@example.net"] == "deferred"
        )
        assert w.queue.state.messages[qid].next_at["bob@example.net"] == pytest.approx(
            t0 + 60, abs=0.01
        )
        busy.rcpt.clear()  # the mailbox frees up
        await until(lambda: w.queue.state.messages[qid].terminal)
        (first, _, o1), (second, _, o2) = deliveries(w)  # times recorded by the dispatcher
        assert (o1, o2) == ("deferred", "sent")
        assert second - first == pytest.approx(60, abs=0.01)


async def test_bounce_when_retries_run_past_max_age(autojump_clock: trio.testing.MockClock) -> None:
    busy = Host(rcpt={"bob@example.net": Reply(451, "4.3.0", ("later",))})
    policy = RetryPolicy(jitter=0.0, max_age=100)
    table = {"example.net": MX1, "example.org": MX1}
    async with world({"mx1": busy}, table, policy=policy) as w:
        qid = await accept(w.queue, "bob@example.net")
        w.dispatcher.notify()
        await until(lambda: w.queue.state.messages[qid].terminal)
        outcomes = deliveries(w)
        assert [o for _, _, o in outcomes[:2]] == ["deferred", "bounced"]
        last = w.queue.state.messages[qid].history[-1].outcomes[0]
        assert (last.status, last.reply) == ("5.4.7", "451 4.3.0 later")
        # the sender hears of it: a DSN to alice, delivered through the same lane
        await until(lambda: len(busy.received) == 1)
        report = email.message_from_bytes(busy.received[0])
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload()[1].get_payload()[1]  # type: ignore[index,union-attr]
        assert status["Status"] == "5.4.7"
        assert status["Diagnostic-Code"] == "smtp; 451 4.3.0 later"
        assert w.queue.state.messages[qid].dead  # nothing owed any more: compactable


async def test_a_dsn_owed_when_the_relay_stopped_is_sent_when_it_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A bounce recorded, then the relay stopped before its DSN was queued: the dispatcher's
    start queues it (once), beside a message never tried, which is simply delivered."""
    ids: list[str] = []

    async def bounced_then_stopped(queue: QueueStore) -> None:
        ids.append(await accept(queue, "bob@example.net", "carol@example.org"))
        ids.append(await accept(queue, "dave@example.net"))
        gone = Outcome("carol@example.org", "bounced", "5.1.1", "550 5.1.1 no such user")
        sent = Outcome("bob@example.net", "sent", "2.0.0", "250 ok")
        await queue.record(Delivery(ids[0], trio.current_time(), "mx1", (sent, gone)))
        assert queue.state.messages[ids[0]].dsn_owed() == ["carol@example.org"]

    mx = Host()
    table = {"example.net": MX1, "example.org": MX1}
    async with world({"mx1": mx}, table, before=bounced_then_stopped) as w:
        await until(lambda: len(mx.received) == 2)  # dave's message, and the DSN to alice
        await trio.sleep(600)
        assert len(mx.received) == 2
        reports = [email.message_from_bytes(m) for m in mx.received]
        dsn = next(r for r in reports if r.get_content_type() == "multipart/report")
        status = dsn.get_payload()[1].get_payload()[1]  # type: ignore[index,union-attr]
        assert status["Final-Recipient"] == "rfc822; carol@example.org"
        assert not w.queue.state.messages[ids[0]].dsn_owed()
        assert w.queue.state.messages[ids[1]].terminal


async def test_per_destination_concurrency_is_held(autojump_clock: trio.testing.MockClock) -> None:
    slow = Host(delay=5.0)
    async with world({"mx1": slow}, {"example.net": MX1}, concurrency=2) as w:
        ids = [await accept(w.queue, f"r{i}@example.net") for i in range(6)]
        w.dispatcher.notify()
        await until(lambda: all(w.queue.state.messages[q].terminal for q in ids))
        assert slow.max_active == 2
        assert len(slow.received) == 6


async def test_resolution_failures_bounce_or_defer(autojump_clock: trio.testing.MockClock) -> None:
    table: dict[str, Destination | ResolutionFailed] = {
        "nomail.example": ResolutionFailed("5.1.10", "nomail.example accepts no mail (null MX)"),
        "flaky.example": ResolutionFailed("4.4.3", "MX lookup failed"),
    }
    async with world({}, table, policy=NO_JITTER) as w:
        qid = await accept(w.queue, "x@nomail.example", "y@flaky.example")
        w.dispatcher.notify()
        await until(lambda: "accepted" not in w.queue.state.messages[qid].recipient_states.values())
        states = w.queue.state.messages[qid].recipient_states
        assert states == {"x@nomail.example": "bounced", "y@flaky.example": "deferred"}


async def test_a_crashing_lane_is_restarted_by_supervise(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def flaky_open(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the lane")
        return await open_remote(*args, **kwargs)  # type: ignore[arg-type]

    async with world({"mx1": Host()}, {"example.net": MX1}, open_fn=flaky_open) as w:
        t0 = trio.current_time()
        qid = await accept(w.queue, "bob@example.net")
        w.dispatcher.notify()
        await until(lambda: w.queue.state.messages[qid].terminal)
        assert calls == 2
        # the crashed attempt recorded nothing; its recipient went back on the schedule
        ((at, rcpt, outcome),) = deliveries(w)
        assert (rcpt, outcome) == ("bob@example.net", "sent")
        assert at - t0 == pytest.approx(60, abs=5)


def task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    return count(trio.lowlevel.current_root_task())


async def test_a_lane_that_keeps_crashing_is_parked_while_the_rest_delivers(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug that one remote triggers on every attempt (injected through open_fn): the lane
    is parked after its worker exhausts its restarts, with growing rests, while a message a
    minute to another destination is delivered for an hour; tasks stay few."""
    crashes = 0

    async def hostile_open(destination: Destination, **kwargs: object) -> object:
        nonlocal crashes
        if destination.key == "mx-bad:25":
            crashes += 1
            raise RuntimeError("a bug this remote triggers")
        return await open_remote(destination, **kwargs)  # type: ignore[arg-type]

    bad_mx = Destination((("mx-bad", 25),))
    hosts = {"mx1": Host(), "mx-bad": Host()}
    async with world(hosts, {"example.net": MX1, "bad.example": bad_mx}, open_fn=hostile_open) as w:
        stuck = [await accept(w.queue, f"r{i}@bad.example") for i in range(20)]
        good = []
        most_tasks = 0
        for minute in range(60):
            good.append(await accept(w.queue, f"g{minute}@example.net"))
            w.dispatcher.notify()
            await trio.sleep(60)
            most_tasks = max(most_tasks, task_count())
        await until(lambda: all(w.queue.state.messages[q].terminal for q in good))
        assert len(w.mx.hosts["mx1"].received) == 60  # the other destination never stopped
        assert len(w.mx.hosts["mx-bad"].received) == 0
        assert all(not w.queue.state.messages[q].terminal for q in stuck)  # kept, not lost
        assert "mx-bad:25" in w.dispatcher.parked()
        # Restarts within bounds, then parks of 300 s, 600 s, 1,200 s...: over an hour, a
        # few rounds of at most concurrency x (max_restarts + 1) crashes, not a spin.
        assert 6 <= crashes <= 100
        assert most_tasks < 40
    parks = [r.getMessage() for r in caplog.records if "parked for" in r.getMessage()]
    assert parks[0].startswith("lane mx-bad:25 parked for 300s (park 1 in a row)")
    assert parks[1].startswith("lane mx-bad:25 parked for 600s (park 2 in a row)")
    assert all(r.levelno == logging.CRITICAL for r in caplog.records if "parked" in r.message)


async def test_connections_are_reused_with_rset_while_the_lane_has_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mx = Host()
    async with world({"mx1": mx}, {"example.net": MX1}, concurrency=1) as w:
        ids = [await accept(w.queue, f"r{i}@example.net") for i in range(5)]
        w.dispatcher.notify()
        await until(lambda: all(w.queue.state.messages[q].terminal for q in ids))
        assert len(mx.received) == 5
        assert mx.connections == 1  # one connection, five transactions
        assert w.dispatcher.connections == 1
        await trio.sleep(10)  # past the idle time: the worker leaves, the lane is forgotten
        assert not w.dispatcher.lanes
        qid = await accept(w.queue, "late@example.net")
        w.dispatcher.notify()
        await until(lambda: w.queue.state.messages[qid].terminal)
        assert mx.connections == 2


async def test_a_dropped_idle_connection_is_replaced_without_an_attempt_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mx = Host(close_after=1)  # hangs up after each transaction, without a word
    async with world({"mx1": mx}, {"example.net": MX1}, concurrency=1) as w:
        ids = [await accept(w.queue, f"r{i}@example.net") for i in range(3)]
        w.dispatcher.notify()
        await until(lambda: all(w.queue.state.messages[q].terminal for q in ids))
        assert len(mx.received) == 3
        assert [o for _, _, o in deliveries(w)] == ["sent"] * 3  # no deferral in between


async def test_no_dsn_for_a_dsn(autojump_clock: trio.testing.MockClock) -> None:
    refuses = Host(
        rcpt={
            "bob@example.net": Reply(550, "5.1.1", ("no such user",)),
            "alice@example.org": Reply(550, "5.1.1", ("no such sender either",)),
        }
    )
    table = {"example.net": MX1, "example.org": MX1}
    async with world({"mx1": refuses}, table) as w:
        qid = await accept(w.queue, "bob@example.net")
        w.dispatcher.notify()
        await until(lambda: len(w.queue.state.messages) == 2)
        dsn_id = next(q for q in w.queue.state.messages if q != qid)
        await until(lambda: w.queue.state.messages[dsn_id].terminal)
        await trio.sleep(120)
        assert len(w.queue.state.messages) == 2  # the bounced DSN made no DSN of its own
        assert w.queue.state.messages[dsn_id].recipient_states == {"alice@example.org": "bounced"}
        assert w.queue.state.messages[dsn_id].dead and w.queue.state.messages[qid].dead


async def test_a_worker_hands_on_one_outcome_at_a_time_while_the_journal_holds_it(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcomes are patient appends (journal/_journal.py): the worker goes on to its next
    message while the journal holds the last outcome for others to share its fsync, but
    hands on no second outcome before the first is durable. Here the journal holds patient
    records until an impatient one comes (its patience far beyond the test)."""
    monkeypatch.setattr(journal_module, "MAX_GATHER", 3600.0)
    mx = Host()
    async with world({"mx1": mx}, {"example.net": MX1}, concurrency=1) as w:
        w.queue.journal.patience = 3600.0
        ids = [await accept(w.queue, f"r{i}@example.net") for i in range(4)]
        w.dispatcher.notify()
        await until(lambda: len(mx.received) == 2)
        await trio.sleep(600)
        # the first outcome is held; the second message went out meanwhile; no third
        assert len(mx.received) == 2
        assert deliveries(w) == []
        assert not any(w.queue.state.messages[q].terminal for q in ids)
        await accept(w.queue, "later@example.net")  # a message's record: written at once
        await until(lambda: len(mx.received) == 3)
        assert [o for _, _, o in deliveries(w)] == ["sent"]  # the first one's only
        assert sum(w.queue.state.messages[q].terminal for q in ids) == 1
        await trio.sleep(600)
        assert len(mx.received) == 3  # the second outcome is held now


async def test_an_outcome_that_cannot_be_recorded_is_tried_again_and_crashes_the_next_attempt(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk is full when the first outcome is written: its recipient goes back on the
    schedule a minute later, and the next attempt a worker starts fails (a lane crash,
    supervised) instead of delivering mail whose outcomes cannot be recorded; once the
    disk has room, the message is delivered and recorded. The remote got it twice (the
    first delivery was never recorded): at least once, never lost."""
    fs = FaultFS(CrashableMemFS(), only="append", error=errno.ENOSPC)
    mx = Host()
    async with world({"mx1": mx}, {"example.net": MX1}, concurrency=1, fs=fs) as w:
        t0 = trio.current_time()
        qid = await accept(w.queue, "bob@example.net")
        fs.fail_at = fs._counted  # the next write: the outcome's
        w.dispatcher.notify()
        await until(lambda: w.queue.state.messages[qid].terminal)
        ((at, rcpt, outcome),) = deliveries(w)
        assert (rcpt, outcome) == ("bob@example.net", "sent")
        # tried again a minute later: refused (the failure), then a minute later delivered
        assert at - t0 == pytest.approx(120, abs=10)
        assert len(mx.received) == 2
    text = caplog.text
    assert f"{qid}: recording its attempt's outcome failed" in text
    assert "an earlier attempt's outcome could not be recorded" in text
