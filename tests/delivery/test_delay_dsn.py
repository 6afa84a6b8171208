"""Delay DSNs (RFC 3464 Action: delayed): a recipient still deferred past
``delivery.delay_warning`` gets one, once, across retries and restarts; a recipient that
asked NOTIFY=NEVER (or FAILURE only) gets none. Real relay, real DNS server, aiosmtpd."""

from __future__ import annotations

import email
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from atmosrelay.queue.records import RecipientState
from atmosrelay.queue.state import DSN_FOR
from atmosrelay.runtime import run_relay
from tests.accounts.dns_server import DnsServer
from tests.delivery.test_end_to_end import TRANSACTIONAL, config_for, publish, submit
from tests.relay.harness import running_relay
from tests.sink import Received, aiosmtpd_sink

BUSY = "451 4.2.1 mailbox busy, try later"


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def delay_dsns(received: list[Received]) -> list[Received]:
    return [r for r in received if r.mail_from == "<>" and b"Action: delayed" in r.content]


async def test_one_delay_dsn_for_a_deferred_recipient_none_for_notify_never(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    ca = trustme.CA()
    more = "retry_initial = 1.0\nretry_cap = 1.0\ndelay_warning = 1.0\n"
    with aiosmtpd_sink(ca) as sink:
        sink.refuse.update({"bob@example.net": BUSY, "carol@example.net": BUSY})
        config = config_for(tmp_path, ca, dns_server, sink, more)
        async with running_relay(tmp_path, config=config, ca=ca) as relay:
            publish(config, dns_server)
            await trio.to_thread.run_sync(
                lambda: submit(relay, TRANSACTIONAL, "bob@example.net")  # no NOTIFY: DELAY too
            )
            await trio.to_thread.run_sync(
                lambda: submit(
                    relay, TRANSACTIONAL, "carol@example.net", rcpt_options=["NOTIFY=NEVER"]
                )
            )
            await trio.to_thread.run_sync(
                lambda: submit(
                    relay, TRANSACTIONAL, "dave@example.net", rcpt_options=["NOTIFY=FAILURE"]
                )
            )
            sink.refuse["dave@example.net"] = BUSY  # dave's first attempt may already be done
            state = relay.handle.ctx.queue.state
            bob, carol = sorted(state.messages)[:2]
            with trio.fail_after(30):  # retries every second: past the delay, several times
                while state.messages[bob].attempts.get("bob@example.net", 0) < 4 or (  # noqa: ASYNC110
                    state.messages[carol].attempts.get("carol@example.net", 0) < 4
                ):
                    await trio.sleep(0.05)
                while len(delay_dsns(sink.snapshot())) < 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            dsn_ids = [q for q, m in state.messages.items() if m.record.metadata.get(DSN_FOR)]
            assert [state.messages[q].record.metadata[DSN_FOR] for q in dsn_ids] == [bob]
            with trio.fail_after(10):  # the DSN's own delivery is recorded after the sink's 250
                while not state.messages[dsn_ids[0]].terminal:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            # the DSN's record says bob was told: it is kept while bob's message lives
            assert not set(state.messages[dsn_ids[0]].positions) & state.dead_positions()

        (dsn,) = delay_dsns(sink.snapshot())
        assert dsn.rcpt_tos == ("alice@example.org",)
        report = email.message_from_bytes(dsn.content)
        assert report["Subject"] == "Delayed Mail (still being retried)"
        human, status, original = report.get_payload()  # type: ignore[misc]
        _, per_recipient = status.get_payload()  # one recipient block: bob's alone
        assert per_recipient["Final-Recipient"] == "rfc822; bob@example.net"
        assert per_recipient["Action"] == "delayed" and per_recipient["Status"] == "4.2.1"
        assert original.get_content_type() == "text/rfc822-headers"  # headers only
        assert "<bob@example.net>" in human.get_payload()
        assert "carol" not in human.get_payload() and "dave" not in human.get_payload()

        # a restart (the journal folded again): still deferred, never a second delay DSN
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                lambda task_status: run_relay(
                    config, announce=lambda _: None, handle_signals=False, task_status=task_status
                )
            )
            state = handle.ctx.queue.state
            before = state.messages[bob].attempts["bob@example.net"]
            with trio.fail_after(30):
                while state.messages[bob].attempts["bob@example.net"] < before + 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert state.messages[bob].recipient_states["bob@example.net"] == (
                RecipientState.DEFERRED
            )
            handle.stop()
        assert len(delay_dsns(sink.snapshot())) == 1
