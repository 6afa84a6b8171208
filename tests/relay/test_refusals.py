"""Every refusal of the submission path, against the real listener with TLS and AUTH."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from atmosrelay.accounts.store import Store
from journal import read_records
from tests.relay.dialog import Dialog
from tests.relay.harness import (
    ALICE,
    MALLORY,
    Relay,
    running_relay,
    until_the_relay_sees_an_account_change,
)

LIMITS = "[smtp]\nmax_recipients = 3\nmax_message_size = 4096\nmax_connections_per_ip = 3\n"


def plain(username: str, key: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{username}\0{key}".encode())


def authed(relay: Relay, key: str | None = None, username: str = ALICE) -> Dialog:
    d = Dialog(relay.implicit_port, relay.client_context())
    assert d.reply().startswith(b"220 mx.test")
    assert d.cmd(b"EHLO client.test").startswith(b"250-mx.test")
    reply = d.cmd(plain(username, key or relay.key))
    assert reply.startswith(b"235 2.7.0"), reply
    return d


def after_auth(relay: Relay, line: bytes) -> bytes:
    with authed(relay) as d:
        return d.cmd(line)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


async def test_implicit_tls_and_auth_only_over_tls(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:

        def check() -> None:
            d = Dialog(relay.starttls_port)
            assert d.reply().startswith(b"220 ")
            ehlo = d.cmd(b"EHLO client.test")
            assert b"250 STARTTLS\r\n" in ehlo and b"AUTH" not in ehlo
            assert (
                d.cmd(plain(ALICE, relay.key))
                == b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
            )
            assert d.cmd(b"MAIL FROM:<alice@example.org>").startswith(b"530 5.7.0")
            d.starttls(relay.client_context())
            ehlo = d.cmd(b"EHLO client.test")
            assert b"AUTH PLAIN LOGIN" in ehlo and b"STARTTLS" not in ehlo
            d.close()
            with authed(relay) as d2:  # implicit TLS
                assert d2.cmd(b"QUIT").startswith(b"221")

        await in_thread(check)


@pytest.mark.parametrize(
    ("key", "username"),
    [("atmos_" + "x" * 43, ALICE), ("not-a-key", ALICE), (None, "nobody.test"), (None, MALLORY)],
)
async def test_wrong_keys_are_535(tmp_path: Path, key: str | None, username: str) -> None:
    async with running_relay(tmp_path) as relay:

        def check() -> None:
            with Dialog(relay.implicit_port, relay.client_context()) as d:
                d.reply()
                d.cmd(b"EHLO c")
                assert (
                    d.cmd(plain(username, key or relay.key))
                    == b"535 5.7.8 Authentication failed\r\n"
                )

        await in_thread(check)


async def test_revoked_key_is_refused(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        await in_thread(lambda: authed(relay).close())  # verified once: now in the cache

        before = relay.handle.ctx.keys.generation
        store = Store(relay.config.accounts_db)
        key_id = relay.key[6:14]
        store.revoke_key(key_id)  # as the operator CLI would, from another connection
        store.close()
        await until_the_relay_sees_an_account_change(relay, before)

        def check() -> None:
            with Dialog(relay.implicit_port, relay.client_context()) as d:
                d.reply()
                d.cmd(b"EHLO c")
                assert d.cmd(plain(ALICE, relay.key)).startswith(b"535 5.7.8")

        await in_thread(check)


@pytest.mark.parametrize(
    ("sender", "reply"),
    [
        (
            b"<alice@other.example>",
            b"550 5.1.0 Sender domain other.example is not enrolled for this account\r\n",
        ),
        (
            b"<alice@pending.example.org>",
            b"550 5.1.0 Sender domain pending.example.org is enrolled but not verified yet; "
            b"publish its TXT record, then run 'atmosrelay domain verify pending.example.org'"
            b"\r\n",
        ),
        (
            b"<eve@mallory.example>",
            b"550 5.1.0 Sender domain mallory.example is not enrolled for this account\r\n",
        ),
        (
            b"<alice@sub.example.org>",
            b"550 5.1.0 Sender domain sub.example.org is not enrolled for this account\r\n",
        ),
        (b"<>", b"550 5.7.1 Null reverse-path not accepted for submission\r\n"),
        (b"<alice@EXAMPLE.org>", b"250 2.1.0 Sender ok\r\n"),
    ],
)
async def test_sender_domain_policy(tmp_path: Path, sender: bytes, reply: bytes) -> None:
    async with running_relay(tmp_path) as relay:
        got = await in_thread(after_auth, relay, b"MAIL FROM:" + sender)
        assert got == reply


async def test_suspended_member_gets_521_at_auth_and_the_connection_closes(
    tmp_path: Path,
) -> None:
    async with running_relay(tmp_path) as relay:
        store = Store(relay.config.accounts_db)
        store.set_status(ALICE, "suspended", "complaints")
        store.close()

        def check() -> None:
            with Dialog(relay.implicit_port, relay.client_context()) as d:
                d.reply()
                d.cmd(b"EHLO client.test")
                assert d.cmd(plain(ALICE, relay.key)) == (
                    b"521 5.7.1 Account suspended; no mail accepted\r\n"
                )
                assert d.reply() == b""  # closed

        await in_thread(check)


def transaction(d: Dialog, body: bytes, rcpts: int = 1) -> list[bytes]:
    with d:
        out = [d.cmd(b"MAIL FROM:<alice@example.org>")]
        out += [d.cmd(b"RCPT TO:<r%d@example.net>" % i) for i in range(rcpts)]
        out.append(d.cmd(b"DATA"))
        if out[-1].startswith(b"354"):
            out.append(d.cmd(body + b".\r\n"))
        return out


GOOD = b"From: alice@example.org\r\nSubject: x\r\n\r\nhi\r\n"


@pytest.mark.parametrize(
    ("body", "rcpts", "expected"),
    [
        (GOOD, 4, [b"250", b"250", b"250", b"250", b"452 4.5.3", b"354", b"250 2.0.0 Ok: queued"]),
        (GOOD + b"x" * 5000 + b"\r\n", 1, [b"250", b"250", b"354", b"552 5.3.4"]),
        (
            b"From: a@example.org\r\nX-Atmos-Tags: "
            + b",".join(b"t%d" % i for i in range(11))
            + b"\r\n\r\nx\r\n",
            1,
            [
                b"250",
                b"250",
                b"354",
                b"554 5.6.0 Failed to parse message: X-Atmos-Tags has 11 tags",
            ],
        ),
        (
            b"From: a@example.org\r\nX-Atmos-Metadata: [1, 2]\r\n\r\nx\r\n",
            1,
            [
                b"250",
                b"250",
                b"354",
                b"554 5.6.0 Failed to parse message: X-Atmos-Metadata must be a JSON object",
            ],
        ),
        (
            b"From: a@example.org\r\nX-Atmos-Category: two words\r\n\r\nx\r\n",
            1,
            [b"250", b"250", b"354", b"554 5.6.0 Failed to parse message: X-Atmos-Category"],
        ),
        (
            b"this is not a header\r\n\r\nx\r\n",
            1,
            [b"250", b"250", b"354", b"554 5.6.0 Failed to parse message: header line 1"],
        ),
        (
            b"Subject: no from\r\n\r\nx\r\n",
            1,
            [b"250", b"250", b"354", b"554 5.6.0 Failed to parse message: no From header"],
        ),
    ],
)
async def test_transaction_refusals(
    tmp_path: Path, body: bytes, rcpts: int, expected: list[bytes]
) -> None:
    async with running_relay(tmp_path, extra=LIMITS) as relay:
        replies = await in_thread(lambda: transaction(authed(relay), body, rcpts))
        assert len(replies) == len(expected)
        for got, want in zip(replies, expected, strict=True):
            assert got.startswith(want), (got, want)
        queued = [r for r in replies if r.startswith(b"250 2.0.0 Ok: queued")]
        assert len(read_records(str(relay.config.journal_dir))) == len(queued)


async def test_declared_size_over_the_limit(tmp_path: Path) -> None:
    async with running_relay(tmp_path, extra=LIMITS) as relay:
        got = await in_thread(after_auth, relay, b"MAIL FROM:<alice@example.org> SIZE=5000")
        assert got.startswith(b"552 5.3.4")


async def test_connection_limit_per_ip(tmp_path: Path) -> None:
    async with running_relay(tmp_path, extra=LIMITS) as relay:

        def check() -> None:
            held = [Dialog(relay.starttls_port) for _ in range(3)]
            for d in held:
                assert d.reply().startswith(b"220 ")
            with Dialog(relay.starttls_port) as extra:
                assert extra.reply() == b"421 4.7.0 Too many connections, try again later\r\n"
                assert extra.sock.recv(10) == b""  # and closed
            held[0].cmd(b"QUIT")
            for d in held:
                d.close()

        await in_thread(check)
        # The relay frees the slots when it has seen the three sessions end, which it
        # learns from the sockets: wait for exactly that, bounded, not for a guessed time.
        limits = relay.handle.limits
        assert limits is not None
        with trio.fail_after(10):
            while limits.active:  # noqa: ASYNC110 - the relay's own state, in this trio run
                await trio.sleep(0.01)

        def reconnect() -> bytes:
            with Dialog(relay.starttls_port) as d:
                return d.reply()

        assert (await in_thread(reconnect)).startswith(b"220 ")


async def test_a_full_in_flight_budget_refuses_data_with_452_4_3_1(tmp_path: Path) -> None:
    # 1 KiB of budget: not even the 64 KiB a message reserves when DATA starts
    async with running_relay(tmp_path, extra="[smtp]\ninflight_budget = 1024\n") as relay:

        def check() -> None:
            with authed(relay) as d:
                assert d.cmd(b"MAIL FROM:<alice@example.org>").startswith(b"250")
                assert d.cmd(b"RCPT TO:<bob@example.net>").startswith(b"250")
                assert d.cmd(b"DATA") == b"452 4.3.1 Insufficient system storage; retry later\r\n"

        await in_thread(check)
