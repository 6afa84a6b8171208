"""The trusted-network listener, and what the session logs (and never logs)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trustme

from atmosrelay.runtime import run_relay
from tests.relay.dialog import Dialog
from tests.relay.harness import ALICE, enroll, make_config, running_relay
from tests.relay.test_refusals import plain


async def test_trusted_listener_submits_as_the_trusted_member_without_auth(tmp_path: Path) -> None:
    extra = f'[smtp]\nlisteners = ["127.0.0.1:0 trusted", "127.0.0.1:0 implicit"]\ntrusted_did = "{ALICE}"\n'
    async with running_relay(tmp_path, extra=extra) as relay:

        def send() -> list[bytes]:
            with Dialog(relay.handle.port("trusted")) as d:
                d.reply()
                ehlo = d.cmd(b"EHLO app.local")
                assert b"AUTH" not in ehlo and b"STARTTLS" not in ehlo
                return [
                    d.cmd(b"MAIL FROM:<app@example.org>"),
                    d.cmd(b"RCPT TO:<bob@example.net>"),
                    d.cmd(b"DATA"),
                    d.cmd(b"From: app@example.org\r\n\r\nhi\r\n."),
                    d.cmd(b"MAIL FROM:<app@mallory.example>"),  # still only the member's domains
                ]

        replies = await trio.to_thread.run_sync(send)
        assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"250", b"550"]


async def test_trusted_listener_needs_a_trusted_did(tmp_path: Path) -> None:
    config = make_config(tmp_path, trustme.CA(), '[smtp]\nlisteners = ["127.0.0.1:0 trusted"]\n')
    enroll(config)
    with pytest.raises(ValueError, match=r"smtp\.trusted_did is not set"):
        await run_relay(config, announce=lambda _: None, handle_signals=False)


async def test_session_log_lines_escape_peer_bytes_and_never_show_a_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atmosrelay.smtp")
    async with running_relay(tmp_path) as relay:

        def session() -> None:
            with Dialog(relay.implicit_port, relay.client_context()) as d:
                d.reply()
                d.cmd(b"EHLO c")
                d.cmd(b"\x1b[31mBOGUS\x07 command")  # logged as "refused 500 -": no verb known
                d.cmd(plain("\x1b[31mBOGUS\x07", "atmos_" + "x" * 43))  # the username is logged
                d.cmd(plain(ALICE, relay.key + "x"))  # a wrong key: logged as a failure, not shown
                d.cmd(plain(ALICE, relay.key))
                d.cmd(b"MAIL FROM:<alice@example.org>")
                d.cmd(b"RCPT TO:<bob@example.net>")
                d.cmd(b"DATA")
                d.cmd(b"From: alice@example.org\r\n\r\nhi\r\n.")
                d.cmd(b"QUIT")

        await trio.to_thread.run_sync(session)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "atmosrelay.smtp")
    for what in (
        "connect implicit",
        "refused 500 -",
        "auth-failed",
        "auth did:plc:",
        "queued ",
        "close",
    ):
        assert what in text, what
    assert relay.key[6:] not in text  # never the secret part of a key (the key id may appear)
    assert "\x1b" not in text and "\x07" not in text
    assert "auth-failed \\x1b[31mBOGUS\\x07 unknown-user" in text  # escaped for log viewers
    assert "command" not in text  # a refused line is never logged, only its verb if known


async def test_shutdown_idle_session_gets_421_and_one_in_data_finishes(tmp_path: Path) -> None:
    from tests.relay.test_clients_and_attacks import queued

    async with running_relay(tmp_path) as relay:
        # Connecting does the TLS handshake: in a worker thread, not on the relay's event loop.
        idle, busy = await trio.to_thread.run_sync(
            lambda: (
                Dialog(relay.implicit_port, relay.client_context()),
                Dialog(relay.implicit_port, relay.client_context()),
            )
        )
        try:

            def prepare() -> None:
                for d in (idle, busy):
                    d.reply()
                    d.cmd(b"EHLO c")
                    assert d.cmd(plain(ALICE, relay.key)).startswith(b"235")
                busy.cmd(b"MAIL FROM:<alice@example.org>")
                busy.cmd(b"RCPT TO:<bob@example.net>")
                assert busy.cmd(b"DATA").startswith(b"354")
                busy.sock.sendall(
                    b"From: alice@example.org\r\nSubject: in flight\r\n\r\nfirst half\r\n"
                )

            await trio.to_thread.run_sync(prepare)
            # The busy session is in DATA from the moment it sent its 354 (read above), so
            # stopping now finds one session waiting for a command and one inside DATA.
            relay.handle.stop()
            assert (
                await trio.to_thread.run_sync(idle.reply)
                == b"421 4.3.2 Service shutting down, closing connection\r\n"
            )

            def finish() -> tuple[bytes, bytes]:
                busy.sock.sendall(b"second half\r\n.\r\n")
                return busy.reply(), busy.reply()

            done, then = await trio.to_thread.run_sync(finish)
            assert done.startswith(b"250 2.0.0 Ok: queued as ")
            assert then == b"421 4.3.2 Service shutting down, closing connection\r\n"
            (body,) = queued(relay).values()
            assert body.endswith(b"first half\r\nsecond half\r\n")
        finally:
            idle.close()
            busy.close()
