"""A restart delivers before its whole queue is decoded, and ends where a whole start would.

After a clean stop (queue/checkpoint.py: the first part, then the chunks): a real relay
queues mail over SMTP with delivery off and stops; offline, some of that mail is given a
deferred outcome whose retry time has passed and some a bounce, and the checkpoint is written
again in a first part of 5 messages and chunks of 7; the relay then starts with delivery to
aiosmtpd. After ``kill -9`` (queue/window.py: the never-tried messages among the journal's
newest records, then the whole fold): the same, behind a history of delivered mail longer
than the window, and the outcomes left as records since the checkpoint, or with no
checkpoint at all. Shown: every message arrives once, each bounce gets its one DSN, the
overdue retries are spread together (one spread, not one per chunk), and the policy's
counters count each outcome once (a message of the first part is counted before it is
tried, a chunk's messages as they are added)."""

from __future__ import annotations

import logging
import smtplib
import time
from pathlib import Path

import pytest
import trio
import trustme

from atmosrelay.accounts.store import Store
from atmosrelay.config import Config
from atmosrelay.policy.rules import bounced_key, sent_key
from atmosrelay.queue import checkpoint
from atmosrelay.queue.records import Delivery, Outcome
from atmosrelay.queue.state import fold
from atmosrelay.queue.store import QueueStore
from atmosrelay.runtime import run_relay
from journal import OsFS, open_journal
from tests.queue.factories import accepted_record
from tests.relay.harness import Relay, make_config, running_relay
from tests.sink import Sink, aiosmtpd_sink

MESSAGES = 30
# which of them (in the order accepted) have a retry time already past at the restart, spread
# over three of the chunks; and which bounced, owing a DSN to the sender
DEFERRED = (0, 9, 18, 27)
BOUNCED = (1, 2)
FIRST, CHUNK = 5, 7


def submit(relay: Relay) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", relay.implicit_port, context=relay.client_context(), timeout=10
    ) as smtp:
        smtp.login("alice.test", relay.key)
        for i in range(MESSAGES):
            body = (
                f"From: alice@example.org\r\nTo: bob{i}@example.net\r\nSubject: m{i}\r\n"
                "X-Atmos-Category: transactional\r\n\r\nhello\r\n"
            )
            smtp.sendmail("alice@example.org", [f"bob{i}@example.net"], body.encode())


async def rewrite_checkpoint(config: Config, *, killed: bool = False) -> None:
    """The outcomes a run before might have left, then the checkpoint of it all in small
    parts, as a clean stop writes it; or, ``killed``, none: the outcomes are records since
    the checkpoint, as a relay killed after writing them leaves them."""
    path = str(config.data_dir / checkpoint.CHECKPOINT_NAME)
    async with open_journal(str(config.journal_dir)) as journal:
        queue = await QueueStore.recover(journal, checkpoint=(OsFS(), path))
        assert "from the checkpoint" in queue.recovered
        assert len(queue.state.messages) == MESSAGES + (HISTORY if killed else 0)
        now = time.time()
        queued = sorted(
            (m for m in queue.state.messages.values() if not m.terminal),
            key=lambda m: m.record.accepted_at,
        )
        assert len(queued) == MESSAGES
        for msg in (queued[i] for i in DEFERRED):
            rcpt = msg.record.recipients[0].addr
            later = Outcome(rcpt, "deferred", "4.2.0", "451 later", 1, now - 30)
            await queue.record(Delivery(msg.id, now, "mx.example.net", (later,)))
        for msg in (queued[i] for i in BOUNCED):
            rcpt = msg.record.recipients[0].addr
            gone = Outcome(rcpt, "bounced", "5.1.1", "550 5.1.1 no such user", 1)
            await queue.record(Delivery(msg.id, now, "mx.example.net", (gone,)))
        if killed:
            return
        said = await trio.to_thread.run_sync(
            lambda: checkpoint.save(OsFS(), path, queue.state, journal, first=FIRST, chunk=CHUNK)
        )
        assert said.startswith(f"queue checkpoint: {MESSAGES} message(s)"), said


def counted(config: Config, key: str) -> int:
    store = Store(config.accounts_db)
    try:
        return sum(n for name, _, n in store.counts_since(0) if name == key)
    finally:
        store.close()


def delivered(sink: Sink) -> bool:
    counts = sink.subject_counts()
    messages = sum(1 for i in range(MESSAGES) if counts[f"m{i}"])
    return messages == MESSAGES - len(BOUNCED) and len(sink.snapshot()) >= MESSAGES


async def restart_and_deliver(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> str:
    """The relay started again, delivering to aiosmtpd until every message has arrived;
    checked: each arrived once, each bounce its one DSN, one spread, each outcome counted
    once. The start's "queue:" line."""
    with aiosmtpd_sink() as sink:
        delivery = (
            f'[delivery]\nsmarthost = "127.0.0.1:{sink.port}"\nprocesses = 0\n'
            "restart_spread = 1\ntls_verify = false\n"
        )
        again = make_config(tmp_path, ca, delivery)
        lines: list[str] = []
        caplog.set_level(logging.INFO, logger="atmosrelay.delivery")
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                lambda task_status: run_relay(
                    again, announce=lines.append, handle_signals=False, task_status=task_status
                )
            )
            # the sink's own thread wakes the wait as each message arrives
            arrived = await trio.to_thread.run_sync(sink.wait, lambda: delivered(sink), 30)
            handle.stop()
            assert arrived, sink.subject_counts()
        counts = sink.subject_counts()
        assert [counts[f"m{i}"] for i in range(MESSAGES)] == [
            0 if i in BOUNCED else 1 for i in range(MESSAGES)
        ], counts
        dsns = [r for r in sink.snapshot() if r.rcpt_tos == ("alice@example.org",)]
        assert len(dsns) == len(BOUNCED)
    spread = [r.getMessage() for r in caplog.records if "overdue retries spread" in r.getMessage()]
    assert spread == [f"{len(DEFERRED)} overdue retries spread over 1s"]
    # counted once: the outcomes recorded offline by the recount, this run's by the policy
    assert counted(again, sent_key("example.org")) == MESSAGES - len(BOUNCED)
    assert counted(again, bounced_key("example.org")) == len(BOUNCED)
    return next(line for line in lines if line.startswith("queue: "))


@pytest.mark.slow
async def test_a_restart_delivers_from_the_first_part_and_ends_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    async with running_relay(tmp_path, ca=ca) as relay:  # delivery off: mail only queues
        await trio.to_thread.run_sync(submit, relay)
        config = relay.config
    await rewrite_checkpoint(config)
    recovered = await restart_and_deliver(tmp_path, ca, caplog)
    assert f"queue: {MESSAGES} message(s) recovered from the checkpoint" in recovered
    assert f"({FIRST} decoded before delivery starts, the rest after)" in recovered


HISTORY = 600  # delivered before the mail above: 1,200 records, more than the window
OLD = b"From: old@history.example\r\nSubject: old\r\n\r\nold\r\n"


async def write_history(config: Config) -> None:
    """Mail accepted and delivered before the test's own, its records first in the journal."""
    async with open_journal(str(config.journal_dir)) as journal:
        queue = QueueStore(journal)

        async def some(start: int) -> None:
            for i in range(start, HISTORY, 50):
                rcpt = f"old{i}@example.net"
                record = accepted_record(rcpt, sender="old@history.example", size=len(OLD))
                await queue.accept(record, OLD)
                sent = Outcome(rcpt, "sent", "2.0.0", "250 ok", 1)
                await queue.record(Delivery(record.id, time.time(), "mx.example.net", (sent,)))

        async with trio.open_nursery() as nursery:  # 50 at a time: group commit
            for start in range(50):
                nursery.start_soon(some, start)


@pytest.mark.slow
@pytest.mark.parametrize("left", ["records since the checkpoint", "no checkpoint"])
async def test_a_restart_after_kill_delivers_from_the_newest_records_and_ends_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, left: str
) -> None:
    ca = trustme.CA()
    config = make_config(tmp_path, ca)
    await write_history(config)
    async with running_relay(tmp_path, ca=ca, config=config) as relay:
        await trio.to_thread.run_sync(submit, relay)
    await rewrite_checkpoint(config, killed=True)
    if left == "no checkpoint":
        (config.data_dir / checkpoint.CHECKPOINT_NAME).unlink()
    recovered = await restart_and_deliver(tmp_path, ca, caplog)
    early = MESSAGES - len(DEFERRED) - len(BOUNCED)  # the never-tried, all in the window
    assert recovered.startswith(f"queue: {MESSAGES + HISTORY} message(s) recovered"), recovered
    assert f"(delivery began on {early} message(s) of the journal's newest" in recovered
    since = len(DEFERRED) + len(BOUNCED)
    assert (f"and {since} record(s) since" in recovered) == (left != "no checkpoint"), recovered
    async with open_journal(str(config.journal_dir)) as journal:
        state = await trio.to_thread.run_sync(lambda: fold(journal.records()))
    old = [m for m in state.messages.values() if m.record.sender == "old@history.example"]
    assert len(old) == HISTORY and all(len(m.history) == 1 for m in old)  # none sent again
