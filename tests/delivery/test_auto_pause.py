"""Bounces feed the policy end to end: a stand-in MX (aiosmtpd) refuses one recipient with
550 5.1.1; nine messages are delivered and one bounces, so the sending domain reaches a
bounce rate of 10% over at least 10 messages and is paused; its next MAIL is refused, the
bounced address is suppressed for the member, and an operator's unpause lets it send again."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from atmosrelay.accounts.store import Store
from tests.accounts.dns_server import DnsServer
from tests.delivery.test_end_to_end import delivering
from tests.relay.harness import ALICE, Relay, until_the_relay_sees_an_account_change

GONE = "nobody@example.net"


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def send(relay: Relay, recipient: str, n: int) -> list[tuple[int, bytes]]:
    out = []
    with smtplib.SMTP_SSL(
        "127.0.0.1", relay.implicit_port, context=relay.client_context(), timeout=10
    ) as smtp:
        smtp.login("alice.test", relay.key)
        for i in range(n):
            smtp.mail("alice@example.org")
            code, text = smtp.rcpt(recipient)
            if code != 250:
                out.append((code, text))
                smtp.rset()
                continue
            body = (
                f"From: alice@example.org\r\nTo: {recipient}\r\nSubject: m{i}\r\n"
                "X-Atmos-Category: transactional\r\n\r\nhello\r\n"
            )
            out.append(smtp.data(body.encode()))
    return out


def mail_from(relay: Relay) -> tuple[int, bytes]:
    with smtplib.SMTP_SSL(
        "127.0.0.1", relay.implicit_port, context=relay.client_context(), timeout=10
    ) as smtp:
        smtp.login("alice.test", relay.key)
        return smtp.mail("alice@example.org")


def paused_reason(relay: Relay) -> str | None:
    store = Store(relay.config.accounts_db)
    try:
        return store.domain("example.org").paused_reason
    finally:
        store.close()


async def test_bounces_over_five_percent_pause_the_domain(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    refuse = {GONE: "550 5.1.1 <nobody@example.net>: no such user"}
    async with delivering(tmp_path, dns_server, refuse) as (relay, sink):
        replies = await trio.to_thread.run_sync(send, relay, "bob@example.net", 9)
        replies += await trio.to_thread.run_sync(send, relay, GONE, 1)
        assert [code for code, _ in replies] == [250] * 10
        state = relay.handle.ctx.queue.state
        with trio.fail_after(20):  # the nine delivered, the one bounced (and its DSN)
            while not (  # noqa: ASYNC110 - the relay's own tasks record the outcomes
                len(state.messages) == 11 and all(m.terminal for m in state.messages.values())
            ):
                await trio.sleep(0.02)
        actions = relay.handle.ctx.pipeline.actions
        with trio.fail_after(10):  # the pause and the suppression reach the store
            while actions.written < 2:  # noqa: ASYNC110 - the relay's writer task
                await trio.sleep(0.02)
        reason = await trio.to_thread.run_sync(paused_reason, relay)
        assert reason == "bounce rate 1/10 = 10.0% over 24 h (threshold 5.00%)"
        code, text = await trio.to_thread.run_sync(mail_from, relay)
        assert (code, text) == (
            550,
            b"5.7.1 Sending domain example.org is paused: bounce rate 1/10 = 10.0% over "
            b"24 h (threshold 5.00%); contact the operator",
        )

        store = Store(relay.config.accounts_db)
        try:
            [suppressed] = store.suppressions(ALICE)
        finally:
            store.close()
        assert (suppressed.address, suppressed.source) == (GONE, "hard-bounce")
        assert suppressed.detail == "5.1.1 550 5.1.1 <nobody@example.net>: no such user"

        # the operator unpauses (another process): the domain sends again, and the
        # suppressed address is now refused at RCPT
        before = relay.handle.ctx.keys.generation
        store = Store(relay.config.accounts_db)
        try:
            store.set_paused("example.org", None)
        finally:
            store.close()
        await until_the_relay_sees_an_account_change(relay, before)
        assert (await trio.to_thread.run_sync(mail_from, relay))[0] == 250
        [refused] = await trio.to_thread.run_sync(send, relay, GONE, 1)
        assert refused == (550, b"5.7.1 Recipient suppressed (hard-bounce) for this sender")
    assert len(sink.snapshot()) == 10  # nine to bob, the DSN to alice
