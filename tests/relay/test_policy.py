"""The policy through the real listener, with smtplib: warming limits, suppression at RCPT
and at the end of DATA, header From, suspension by label, paused domains, the header
aliases; and a kill -9 that does not hand a member a fresh hourly allowance."""

from __future__ import annotations

import signal
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio

from atmosrelay.accounts import api_keys, domains
from atmosrelay.accounts.store import Store
from atmosrelay.config import Config
from tests.relay.harness import (
    ALICE,
    Relay,
    running_relay,
    until_the_relay_sees_an_account_change,
)
from tests.relay.test_kill import Server, cli_json, write_config

NEWBIE = "did:plc:nnnnnnnnnnnnnnnnnnnnnnnn"
ROOT = Path(__file__).resolve().parents[2]


def add_newbie(config: Config) -> str:
    """A member enrolled a moment ago: the first warming tier (5 an hour, 50 a day)."""
    store = Store(config.accounts_db)
    try:
        store.add_member(NEWBIE, "newbie.test")
        domains.enroll(store, NEWBIE, "newbie.example", limit=2, clock_now=0)
        store.mark_verified("newbie.example", without_dns=True)
        return api_keys.issue(store, NEWBIE, cost=4).secret
    finally:
        store.close()


def connect(port: int, ctx: ssl.SSLContext, username: str, key: str) -> smtplib.SMTP_SSL:
    smtp = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10)
    smtp.login(username, key)
    return smtp


def message(sender: str, *, category: str = "", extra: str = "") -> bytes:
    head = f"From: {sender}\r\nTo: someone@example.net\r\nSubject: hi\r\n"
    if category:
        head += f"X-Atmos-Category: {category}\r\n"
    return (head + extra + "\r\nhello\r\n").encode()


async def in_thread(fn, *args):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(fn, *args)


async def store_change(relay: Relay, change) -> None:  # type: ignore[no-untyped-def]
    """Change the account store as another process would, and wait for the relay to see it."""
    before = relay.handle.ctx.keys.generation
    store = Store(relay.config.accounts_db)
    try:
        change(store)
    finally:
        store.close()
    await until_the_relay_sees_an_account_change(relay, before)


async def test_warming_refuses_the_sixth_recipient_of_the_hour_with_451_4_7_1(
    tmp_path: Path,
) -> None:
    async with running_relay(tmp_path) as relay:
        key = add_newbie(relay.config)

        def send() -> None:
            with connect(relay.implicit_port, relay.client_context(), "newbie.test", key) as s:
                assert s.mail("n@newbie.example")[0] == 250
                for i in range(5):
                    assert s.rcpt(f"r{i}@example.net")[0] == 250
                code, text = s.rcpt("r5@example.net")
                assert code == 451, text
                assert text.startswith(
                    b"4.7.1 Hourly limit of 5 recipient(s) (warming 1 (days 0-7)) reached; "
                    b"retry in "
                ), text
                wait = int(text.rsplit(b"retry in ", 1)[1].split()[0])
                assert 3500 < wait <= 3660  # the hour, plus at most one counting bucket
                code, text = s.data(message("n@newbie.example"))
                assert code == 250, text  # the five that fit
                code, text = s.mail("n@newbie.example")
                assert (code, text[:5]) == (451, b"4.7.1")  # no room for even one more

        await in_thread(send)
        [record] = [m.record for m in relay.handle.ctx.queue.state.messages.values()]
        assert len(record.recipients) == 5
        # the relay writes its counters every second: `member show` then sees the five
        with trio.fail_after(10):
            while await in_thread(counted, relay.config) < 5:  # noqa: ASYNC110 - the relay's flush
                await trio.sleep(0.05)
        shown = await in_thread(member_show, relay.config)
    assert shown["standing"]["last_hour"] == 5
    assert shown["standing"]["hourly_limit"] == 5
    assert shown["standing"]["tier"] == "warming 1 (days 0-7)"


def counted(config: Config) -> int:
    store = Store(config.accounts_db)
    try:
        return sum(n for key, _, n in store.counts_since(0) if key == f"rcpt|{NEWBIE}")
    finally:
        store.close()


def member_show(config: Config) -> dict[str, Any]:
    """`atmosrelay member show --json`, the operator's own process."""
    path = config.data_dir.parent / "cli.toml"
    path.write_text(f'[relay]\ndata_dir = "{config.data_dir}"\n')
    return dict(cli_json(path, "member", "show", NEWBIE))


async def test_suppressed_recipients_by_reason(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:

        def suppress(store: Store) -> None:
            store.suppress(ALICE, "gone@example.net", "hard-bounce", "5.1.1 no such user")
            store.suppress(ALICE, "optout@example.net", "unsubscribe")

        await store_change(relay, suppress)
        ctx = relay.client_context()

        def send() -> list[tuple[int, bytes]]:
            out = []
            with connect(relay.implicit_port, ctx, "alice.test", relay.key) as s:
                s.mail("alice@example.org")
                out.append(s.rcpt("gone@example.net"))  # refused whatever the category
                s.rset()
                # bulk to an unsubscribed address and another: kept, not delivered to it
                s.mail("alice@example.org")
                s.rcpt("optout@example.net")
                s.rcpt("bob@example.net")
                out.append(s.data(message("alice@example.org")))
                # transactional mail still reaches the unsubscribed address
                s.mail("alice@example.org")
                s.rcpt("optout@example.net")
                out.append(s.data(message("alice@example.org", category="transactional")))
                # bulk to nobody but the unsubscribed address: refused at the end of DATA
                s.mail("alice@example.org")
                s.rcpt("OptOut@example.net")
                out.append(s.data(message("alice@example.org")))
            return out

        gone, bulk, transactional, nobody = await in_thread(send)
    assert gone == (550, b"5.7.1 Recipient suppressed (hard-bounce) for this sender")
    assert bulk[0] == 250 and transactional[0] == 250
    assert nobody == (550, b"5.7.1 All recipients suppressed")
    states = {
        m.record.category: m.recipient_states
        for m in relay.handle.ctx.queue.state.messages.values()
    }
    assert states == {
        "bulk": {"optout@example.net": "suppressed", "bob@example.net": "accepted"},
        "transactional": {"optout@example.net": "accepted"},
    }


@pytest.mark.parametrize(
    ("from_header", "reply"),
    [
        (
            "Security <security@paypal.com>",
            b"5.7.1 From header domain paypal.com is not one of this account's verified "
            b"sending domains (or a subdomain of one)",
        ),
        (
            "alice@example.org, eve@example.org",
            b"5.7.1 The From header must hold exactly one address",
        ),
        (
            "alice@mallory.example",  # Mallory's domain, verified, but not Alice's
            b"5.7.1 From header domain mallory.example is not one of this account's verified "
            b"sending domains (or a subdomain of one)",
        ),
        ("News <news@mail.example.org>", None),  # a subdomain of Alice's verified domain
    ],
)
async def test_header_from_must_be_the_members_own(
    tmp_path: Path, from_header: str, reply: bytes | None
) -> None:
    async with running_relay(tmp_path) as relay:

        def send() -> tuple[int, bytes]:
            with connect(relay.implicit_port, relay.client_context(), "alice.test", relay.key) as s:
                s.mail("alice@example.org")
                s.rcpt("bob@example.net")
                return s.data(message(from_header))

        code, text = await in_thread(send)
    if reply is None:
        assert code == 250, text
    else:
        assert (code, text) == (550, reply)
        assert not relay.handle.ctx.queue.state.messages


async def test_two_from_headers_are_refused(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:

        def send() -> tuple[int, bytes]:
            with connect(relay.implicit_port, relay.client_context(), "alice.test", relay.key) as s:
                s.mail("alice@example.org")
                s.rcpt("bob@example.net")
                return s.data(message("alice@example.org", extra="From: x@paypal.com\r\n"))

        assert await in_thread(send) == (
            554,
            b"5.6.0 Failed to parse message: more than one From header",
        )


async def test_the_auto_suspended_label_suspends_and_a_shadow_label_does_not(
    tmp_path: Path,
) -> None:
    async with running_relay(tmp_path) as relay:
        ctx = relay.client_context()
        await store_change(relay, lambda s: s.set_label(ALICE, "shadow:auto_suspended", True))

        def login() -> tuple[int, bytes]:
            s = smtplib.SMTP_SSL("127.0.0.1", relay.implicit_port, context=ctx, timeout=10)
            try:
                s.ehlo()
                return s.docmd("AUTH", "PLAIN " + _plain("alice.test", relay.key))
            finally:
                s.close()

        assert (await in_thread(login))[0] == 235
        await store_change(relay, lambda s: s.set_label(ALICE, "auto_suspended", True))
        assert await in_thread(login) == (521, b"5.7.1 Account suspended; no mail accepted")


def _plain(user: str, key: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{key}".encode()).decode()


async def test_a_paused_domain_is_refused_at_mail_and_the_others_keep_sending(
    tmp_path: Path,
) -> None:
    async with running_relay(tmp_path) as relay:

        def pause(store: Store) -> None:
            domains.enroll(store, ALICE, "second.example", limit=3, clock_now=0)
            store.mark_verified("second.example", without_dns=True)
            store.set_paused("example.org", "bounce rate 3/10 = 30.0% over 24 h")

        await store_change(relay, pause)

        def send() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with connect(relay.implicit_port, relay.client_context(), "alice.test", relay.key) as s:
                paused = s.mail("alice@example.org")
                s.rset()
                other = s.mail("alice@second.example")
                return paused, other

        paused, other = await in_thread(send)
        assert paused == (
            550,
            b"5.7.1 Sending domain example.org is paused: bounce rate 3/10 = 30.0% over 24 h; "
            b"contact the operator",
        )
        assert other[0] == 250


async def test_postscale_headers_are_read_as_ours_and_removed(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        extra = 'X-Postscale-Tags: welcome, onboarding\r\nX-Postscale-Metadata: {"user": "42"}\r\n'

        def send() -> tuple[int, bytes]:
            with connect(relay.implicit_port, relay.client_context(), "alice.test", relay.key) as s:
                s.mail("alice@example.org")
                s.rcpt("bob@example.net")
                return s.data(message("alice@example.org", extra=extra))

        assert (await in_thread(send))[0] == 250
        [msg] = relay.handle.ctx.queue.state.messages.values()
        assert msg.record.tags == ("welcome", "onboarding")
        assert msg.record.metadata == {"user": "42"}
        body = await relay.handle.ctx.queue.journal.read(msg.position)
        assert b"X-Postscale" not in body.payload[msg.body_offset :]


@pytest.mark.slow
def test_kill_9_does_not_give_a_member_a_fresh_hourly_allowance(tmp_path: Path) -> None:
    """Four recipients, kill -9 right after the 250 (the counters may or may not have been
    written: the journal holds the message either way), restart: one more fits, not five."""
    config_path, ctx, _ = write_config(tmp_path)
    from atmosrelay.config import load_config

    key = add_newbie(load_config(str(config_path)))
    for round_ in range(2):
        server = Server(tmp_path, config_path, round_)
        try:
            with connect(server.port, ctx, "newbie.test", key) as s:
                if round_ == 0:
                    s.mail("n@newbie.example")
                    for i in range(4):
                        assert s.rcpt(f"r{i}@example.net")[0] == 250
                    assert s.data(message("n@newbie.example"))[0] == 250
                    server.proc.send_signal(signal.SIGKILL)
                else:
                    s.mail("n@newbie.example")
                    assert s.rcpt("r4@example.net")[0] == 250
                    code, text = s.rcpt("r5@example.net")
                    assert (code, text[:40]) == (451, b"4.7.1 Hourly limit of 5 recipient(s) (wa")
                    assert s.data(message("n@newbie.example"))[0] == 250
        finally:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(30)
        if round_ == 0:
            assert server.proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_second_relay_sharing_the_account_store_counts_the_first_ones_sends(
    tmp_path: Path,
) -> None:
    """Two relay processes, each with its own data directory and journal, one account store:
    five recipients through the first use the member's hourly allowance at the second too,
    within two flush intervals (policy.counter_flush, 1 s: docs/policy.md states the bound).
    Before the second saw them it would take five more."""
    from atmosrelay.config import load_config

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # each relay in one process: the line b prints below is then said by the process that
    # admits b's sessions (session processes read the others' counts the same way, but each
    # at its own flush: docs/sessions.md)
    config_a, ctx, _ = write_config(tmp_path / "a", smtp="processes = 0\n")
    shared = load_config(str(config_a)).accounts_db
    text = config_a.read_text().replace(str(tmp_path / "a" / "var"), str(tmp_path / "b" / "var"))
    config_b = tmp_path / "b" / "relay.toml"
    config_b.write_text(text + f'[accounts]\ndatabase = "{shared}"\n')
    assert load_config(str(config_b)).accounts_db == shared
    key = add_newbie(load_config(str(config_a)))
    a = Server(tmp_path / "a", config_a, 0)
    try:
        b = Server(tmp_path / "b", config_b, 0)
        try:
            with connect(b.port, ctx, "newbie.test", key) as s:
                s.mail("n@newbie.example")  # b has its allowance before a sends anything
                assert s.rcpt("before@example.net")[0] == 250
                s.rset()
            with connect(a.port, ctx, "newbie.test", key) as s:
                s.mail("n@newbie.example")
                for i in range(5):
                    assert s.rcpt(f"r{i}@example.net")[0] == 250
                assert s.data(message("n@newbie.example"))[0] == 250
            # b says so once it counts another process's additions: no polling
            b.wait_for("policy: another relay process adds to the account store's counters")
            with connect(b.port, ctx, "newbie.test", key) as s:
                # no place left at all: refused at MAIL already
                code, text_ = s.mail("n@newbie.example")
                assert (code, text_[:40]) == (451, b"4.7.1 Hourly limit of 5 recipient(s) (wa")
        finally:
            b.proc.send_signal(signal.SIGTERM)
            b.proc.wait(30)
    finally:
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(30)


async def test_a_removed_member_is_refused_at_auth_and_its_open_sessions_at_mail(
    tmp_path: Path,
) -> None:
    async with running_relay(tmp_path) as relay:
        ctx = relay.client_context()
        open_session = await in_thread(connect, relay.implicit_port, ctx, "alice.test", relay.key)
        try:
            await store_change(relay, lambda s: s.set_status(ALICE, "removed", "left"))

            def login() -> tuple[int, bytes]:
                with smtplib.SMTP_SSL("127.0.0.1", relay.implicit_port, context=ctx) as s:
                    s.ehlo()
                    return s.docmd("AUTH", "PLAIN " + _plain("alice.test", relay.key))

            assert await in_thread(login) == (535, b"5.7.8 Authentication failed")
            assert await in_thread(open_session.mail, "alice@example.org") == (
                421,
                b"4.7.8 Credentials no longer valid, closing connection",
            )
        finally:
            open_session.close()


async def test_the_limits_apply_to_the_trusted_listener_too(tmp_path: Path) -> None:
    extra = (
        '[smtp]\nlisteners = ["127.0.0.1:0 trusted", "127.0.0.1:0 implicit"]\n'
        f'trusted_did = "{NEWBIE}"\n'
    )
    async with running_relay(tmp_path, extra=extra) as relay:
        add_newbie(relay.config)

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", relay.handle.port("trusted"), timeout=10) as s:
                s.ehlo()
                assert s.mail("app@newbie.example") == (250, b"2.1.0 Sender ok")
                for i in range(5):
                    assert s.rcpt(f"r{i}@example.net")[0] == 250
                return s.rcpt("r5@example.net")

        code, text = await in_thread(send)
        assert (code, text[:48]) == (451, b"4.7.1 Hourly limit of 5 recipient(s) (warming 1 ")
