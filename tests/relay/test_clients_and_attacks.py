"""Real clients (implicit-TLS smtplib, aiosmtplib through trio-asyncio, swaks) and attacks
(SMTP smuggling, STARTTLS injection) against the real listener with TLS and AUTH."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest
import trio
import trio_asyncio

from atmosrelay.queue.records import decode_accepted
from journal import read_records
from tests.protocol.test_data import VARIANTS
from tests.relay.dialog import Dialog
from tests.relay.harness import ALICE, Relay, running_relay
from tests.relay.test_refusals import plain

BODY = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def queued(relay: Relay) -> dict[str, bytes]:
    out = {}
    for record in read_records(str(relay.config.journal_dir)):
        accepted, offset = decode_accepted(record.payload)
        out[accepted.id] = record.payload[offset:]
    return out


def tls_of(relay: Relay) -> list[object]:
    """What each queued message's record says of its connection's TLS."""
    records = read_records(str(relay.config.journal_dir))
    return [decode_accepted(r.payload)[0].client["tls"] for r in records]


async def test_smtplib_implicit_tls(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:

        def send() -> dict[str, object]:
            with smtplib.SMTP_SSL(
                "127.0.0.1", relay.implicit_port, context=relay.client_context(), timeout=10
            ) as smtp:
                smtp.login(ALICE, relay.key)
                return smtp.sendmail(
                    "alice@example.org", ["bob@example.net", "carol@example.net"], BODY
                )

        assert await trio.to_thread.run_sync(send) == {}  # no recipient refused
        (body,) = queued(relay).values()
        assert body.endswith(b"\r\n\r\nHello.\r\n")
        (tls,) = tls_of(relay)  # implicit TLS is recorded as STARTTLS is
        assert isinstance(tls, str) and tls.startswith("TLSv1.3 TLS_"), tls


async def test_aiosmtplib_inside_the_same_trio_run(tmp_path: Path) -> None:
    import aiosmtplib

    async with running_relay(tmp_path) as relay:
        async with trio_asyncio.open_loop():

            async def send() -> tuple[object, str]:
                return await aiosmtplib.send(
                    BODY,
                    sender="alice@example.org",
                    recipients=["bob@example.net"],
                    hostname="127.0.0.1",
                    port=relay.starttls_port,
                    start_tls=True,
                    tls_context=relay.client_context(),
                    username="alice.test",
                    password=relay.key,
                    timeout=10,
                )

            with trio.fail_after(20):
                errors, reply = await trio_asyncio.aio_as_trio(send)()
        assert errors == {}
        queue_id = reply.rsplit(" ", 1)[1]
        assert queue_id in queued(relay)
        (tls,) = tls_of(relay)
        assert isinstance(tls, str) and tls.startswith("TLSv1.3 TLS_"), tls


@pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks is not installed (.ci/run installs it)"
)
async def test_swaks(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        cmd = [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(relay.starttls_port),
            "--tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            ALICE,
            "--auth-password",
            relay.key,
            "--from",
            "alice@example.org",
            "--to",
            "bob@example.net",
            "--header",
            "Subject: from swaks",
            "--body",
            "Sent by swaks.",
        ]
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        )
        assert result.returncode == 0, result.stdout + result.stderr
        match = re.search(r"<~  250 2\.0\.0 Ok: queued as (\w+)", result.stdout)
        assert match, result.stdout
        body = queued(relay)[match.group(1)]
        assert b"Subject: from swaks" in body


# The protocol tests' end-of-data variants, now against the real listener with TLS and AUTH.
SMUGGLE = VARIANTS[:8]


@pytest.mark.parametrize("variant", SMUGGLE, ids=[v.hex() for v in SMUGGLE])
async def test_smuggling_against_the_real_listener(tmp_path: Path, variant: bytes) -> None:
    async with running_relay(tmp_path) as relay:

        def attack() -> list[bytes]:
            with Dialog(relay.implicit_port, relay.client_context()) as d:
                d.reply()
                d.cmd(b"EHLO attacker.test")
                assert d.cmd(plain(ALICE, relay.key)).startswith(b"235")
                out = [
                    d.cmd(b"MAIL FROM:<alice@example.org>"),
                    d.cmd(b"RCPT TO:<bob@example.net>"),
                    d.cmd(b"DATA"),
                ]
                smuggled = (
                    b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
                    b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\nforged\r\n"
                )
                out.append(d.cmd(BODY + b"part" + variant + smuggled + b"\r\n.\r\n"))
                out.append(d.cmd(b"QUIT"))
                return out

        replies = await trio.to_thread.run_sync(attack)
        assert [r[:3] for r in replies] == [b"250", b"250", b"354", replies[3][:3], b"221"]
        messages = queued(relay)
        assert len(messages) <= 1, "a second message was smuggled in"
        if messages:
            (body,) = messages.values()
            assert body.count(b"Subject:") == 2  # one message: the smuggled text is inside it
        else:
            assert replies[3].startswith(b"554 5.6.0")


async def test_starttls_injection_against_the_real_listener(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:

        def attack() -> bytes:
            with Dialog(relay.starttls_port) as d:
                d.reply()
                d.sock.sendall(
                    b"EHLO attacker.test\r\nSTARTTLS\r\nMAIL FROM:<alice@example.org>\r\n"
                )
                got = b""
                while True:
                    chunk = d.sock.recv(65536)
                    if not chunk:
                        return got
                    got += chunk

        got = await trio.to_thread.run_sync(attack)
        assert got.endswith(b"220 2.0.0 Ready to start TLS\r\n")  # then closed, nothing more
        assert b"Sender" not in got
        assert not queued(relay)
