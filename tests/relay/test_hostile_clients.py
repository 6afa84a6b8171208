"""A hostile or careless client against the real listener: no key in any log line or reply,
no lockout of a member by a stranger, revocation and suspension that reach open sessions."""

from __future__ import annotations

import base64
import json
import logging
import re
import smtplib
import socket
from pathlib import Path

import pytest
import trio

from atmosrelay.accounts.api_keys import key_id_of
from atmosrelay.accounts.store import Store
from tests.relay.dialog import Dialog
from tests.relay.harness import (
    ALICE,
    Relay,
    running_relay,
    until_the_relay_sees_an_account_change,
)

# Failures are answered after 1-2 ms, not 0.5-8 s, so ten of them take no time; the policy
# and its figures are tested on virtual time in tests/accounts/test_api_keys.py.
FAST_BRAKES = "base_delay = 0.001\nmax_delay = 0.002\n"


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def secret_forms(key: str, username: str) -> list[str]:
    """Every form in which a key can travel in SMTP AUTH: as itself, its secret part, the
    PLAIN token, the LOGIN password line, and the base64 of the key at each of the three
    alignments it can have inside a longer base64 text (the inner characters of each, which
    depend on the key's bytes alone)."""
    forms = [key, key[len("atmos_") + 8 :], b64(f"\0{username}\0{key}").decode(), b64(key).decode()]
    for offset in range(3):
        forms.append(b64("x" * offset + key).decode()[4:-4])
    return forms


def login_dialog(relay: Relay) -> list[bytes]:
    """Every AUTH path: before TLS (alone and pipelined with its SASL lines), malformed,
    cancelled, wrong, swapped username and key, right, and AUTH again after success."""
    key, handle = relay.key, "alice.test"
    replies = []
    with Dialog(relay.starttls_port) as d:
        replies.append(d.reply())
        replies.append(d.cmd(b"EHLO client.test"))
        replies.append(d.cmd(b"AUTH PLAIN " + b64(f"\0{handle}\0{key}")))  # 538: no TLS yet
        d.sock.sendall(b"AUTH LOGIN\r\n" + b64(handle) + b"\r\n" + b64(key) + b"\r\n")
        replies += [d.reply(), d.reply(), d.reply()]  # 538, then two unknown "commands"
        d.starttls(relay.client_context())
        replies.append(d.cmd(b"EHLO client.test"))
        replies.append(d.cmd(b"AUTH PLAIN " + b64(f"{handle}{key}")))  # no NULs: 501
        replies.append(d.cmd(b"AUTH PLAIN " + b64(f"\0{handle}\0{key}")[:-3] + b"!!"))
        replies.append(d.cmd(b"AUTH LOGIN"))
        replies.append(d.cmd(b64(handle)))
        replies.append(d.cmd(b"*"))  # cancelled
        replies.append(d.cmd(b"AUTH LOGIN " + b64(handle)))
        replies.append(d.cmd(b64(key + "x")))  # wrong
        replies.append(d.cmd(b"AUTH PLAIN " + b64(f"\0{key}\0{handle}")))  # swapped
        replies.append(d.cmd(b"AUTH LOGIN"))
        replies.append(d.cmd(b64(handle)))
        replies.append(d.cmd(b64(key)))  # right: 235
        replies.append(d.cmd(b"AUTH PLAIN " + b64(f"\0{handle}\0{key}")))  # 503: again
        d.sock.sendall(b"AUTH LOGIN\r\n" + b64(handle) + b"\r\n" + b64(key) + b"\r\n")
        replies += [d.reply(), d.reply(), d.reply()]
        replies.append(d.cmd(b"QUIT"))
    return replies


async def test_no_form_of_a_key_in_any_log_line_or_reply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_relay(tmp_path) as relay:
        replies = await trio.to_thread.run_sync(login_dialog, relay)
    codes = [r[:3] for r in replies]
    assert codes == [
        b"220", b"250", b"538", b"538", b"500", b"500", b"250", b"501", b"501", b"334",
        b"334", b"501", b"334", b"535", b"535", b"334", b"334", b"235", b"503", b"503",
        b"500", b"500", b"221",
    ]  # fmt: skip
    text = caplog.text
    # What a JSON log formatter would write: every attribute of every record, args included.
    structured = "\n".join(json.dumps(vars(r), default=str) for r in caplog.records)
    assert "auth-failed" in text and f"auth alice.test {ALICE}" in text  # it was logged
    for username in ("alice.test", ALICE):
        for form in secret_forms(relay.key, username):
            for where, haystack in (
                ("text log", text),
                ("structured log", structured),
                ("replies", b"".join(replies).decode("utf-8", "replace")),
            ):
                assert form not in haystack, f"a form of the key is in the {where}"


async def test_a_strangers_failures_lock_the_stranger_not_the_member(tmp_path: Path) -> None:
    """Ten wrong keys for Alice's DID from 127.0.0.2 lock 127.0.0.2 (the right key included);
    Alice from 127.0.0.3 gets in at once, by DID and by handle."""
    async with running_relay(tmp_path, auth=FAST_BRAKES) as relay:

        def login(source: str, username: str, key: str) -> int:
            client = smtplib.SMTP_SSL(
                "127.0.0.1",
                relay.implicit_port,
                source_address=(source, 0),
                context=relay.client_context(),
                timeout=10,
            )
            try:
                client.login(username, key)
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
            finally:
                client.close()
            return 235

        def attack() -> list[int]:
            wrong = "atmos_" + "W" * 43
            codes = [login("127.0.0.2", ALICE, wrong) for _ in range(10)]
            codes.append(login("127.0.0.2", ALICE, relay.key))  # locked: the right key too
            codes.append(login("127.0.0.3", ALICE, relay.key))
            codes.append(login("127.0.0.3", "alice.test", relay.key))
            return codes

        codes = await trio.to_thread.run_sync(attack)
    assert codes == [535] * 11 + [235, 235]


def authed(relay: Relay) -> Dialog:
    d = Dialog(relay.implicit_port, relay.client_context())
    assert d.reply().startswith(b"220")
    d.cmd(b"EHLO client.test")
    assert d.cmd(b"AUTH PLAIN " + b64(f"\0{ALICE}\0{relay.key}")).startswith(b"235")
    return d


def send_one(d: Dialog) -> bytes:
    reply = d.cmd(b"MAIL FROM:<alice@example.org>")
    if not reply.startswith(b"250"):
        return reply
    assert d.cmd(b"RCPT TO:<bob@example.net>").startswith(b"250")
    assert d.cmd(b"DATA").startswith(b"354")
    return d.cmd(b"From: alice@example.org\r\nSubject: x\r\n\r\nhi\r\n.")


async def test_revoking_the_key_closes_open_sessions_at_their_next_mail(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        d = await trio.to_thread.run_sync(authed, relay)
        try:
            assert (await trio.to_thread.run_sync(send_one, d)).startswith(b"250 2.0.0")
            before = relay.handle.ctx.keys.generation
            cli = Store(relay.config.accounts_db)  # the operator CLI's own connection
            key_id = key_id_of(relay.key)
            assert key_id is not None
            cli.revoke_key(key_id)
            cli.close()
            await until_the_relay_sees_an_account_change(relay, before)
            reply = await trio.to_thread.run_sync(send_one, d)
            assert reply == b"421 4.7.8 Credentials no longer valid, closing connection\r\n"
            assert await trio.to_thread.run_sync(d.reply) == b""  # closed
        finally:
            d.close()

        def again() -> bytes:  # the cached verification was dropped too
            with Dialog(relay.implicit_port, relay.client_context()) as d2:
                d2.reply()
                d2.cmd(b"EHLO client.test")
                return d2.cmd(b"AUTH PLAIN " + b64(f"\0{ALICE}\0{relay.key}"))

        assert (await trio.to_thread.run_sync(again)).startswith(b"535 5.7.8")


async def test_suspending_the_member_refuses_the_next_mail_in_open_sessions(
    tmp_path: Path,
) -> None:
    async with running_relay(tmp_path) as relay:
        d = await trio.to_thread.run_sync(authed, relay)
        try:
            assert (await trio.to_thread.run_sync(send_one, d)).startswith(b"250 2.0.0")
            before = relay.handle.ctx.keys.generation
            cli = Store(relay.config.accounts_db)
            cli.set_status(ALICE, "suspended", "test")
            cli.close()
            await until_the_relay_sees_an_account_change(relay, before)
            reply = await trio.to_thread.run_sync(send_one, d)
            assert reply == b"550 5.7.1 Account suspended; contact the operator\r\n"
        finally:
            d.close()


async def test_a_dribbled_command_is_cut_at_the_idle_limit_over_a_real_socket(
    tmp_path: Path,
) -> None:
    """Slowloris: one byte of a command every 0.2 s never completes it; the 421 comes at the
    1 s idle limit, long before the dribble would have ended (8 s)."""
    async with running_relay(tmp_path, extra="idle_timeout = 1.0\n") as relay:

        def dribble() -> tuple[int, bytes]:
            with Dialog(relay.implicit_port, relay.client_context()) as d:
                d.reply()
                d.cmd(b"EHLO client.test")
                command = b"NOOP" + b" " * 36 + b"\r\n"
                d.sock.settimeout(0.2)
                for sent in range(1, len(command) + 1):
                    d.sock.sendall(command[sent - 1 : sent])
                    try:
                        return sent, d.reply()
                    except TimeoutError:
                        continue
                return len(command), b""

        sent, reply = await trio.to_thread.run_sync(dribble)
    assert reply == b"421 4.4.2 Idle timeout, closing connection\r\n"
    assert sent < 40  # the command never completed


@pytest.mark.parametrize("suffix", ["", "s", "st"])
def test_secret_forms_find_a_key_at_every_alignment(suffix: str) -> None:
    """The check itself: a key inside any base64 text is found by one of the forms."""
    key = "atmos_" + "k" * 20 + "Q" * 23
    for prefix in range(6):
        text = b64("p" * prefix + key + suffix).decode()
        assert any(form in text for form in secret_forms(key, "u")[4:])


@pytest.mark.parametrize(
    ("mail", "message", "reply"),
    [
        ("", b"From: alice@example.org\r\n\r\nline 1\r\nli\x00ne 2\r\n",
         b"554 5.6.0 Failed to parse message: NUL octet on line 4\r\n"),
        ("", b"From: alice@example.org\r\nSubject: a\x00b\r\n\r\nbody\r\n",
         b"554 5.6.0 Failed to parse message: NUL octet on line 2\r\n"),
        (" BODY=8BITMIME", b"From: alice@example.org\r\nSubject: caf\xc3\xa9\r\n\r\nbody\r\n",
         b"554 5.6.7 Failed to parse message: 8-bit octet in header line 2 without SMTPUTF8 "
         b"(RFC 6531)\r\n"),
        (" SMTPUTF8", b"From: alice@example.org\r\nSubject: caf\xc3\xa9\r\n\r\nbody\r\n", b"250"),
        ("", b"From: alice@example.org\r\n\r\ncaf\xc3\xa9\r\n",
         b"554 5.6.0 Failed to parse message: 8-bit octet on line 3 of the message without "
         b"BODY=8BITMIME (RFC 6152)\r\n"),
        (" BODY=8BITMIME", b"From: alice@example.org\r\n\r\ncaf\xc3\xa9\r\n", b"250"),
    ],
    ids=["nul-body", "nul-header", "8bit-header", "8bit-header-smtputf8", "8bit-body",
         "8bit-body-8bitmime"],
)  # fmt: skip
async def test_nul_and_unannounced_8bit_are_refused_naming_the_line(
    tmp_path: Path, mail: str, message: bytes, reply: bytes
) -> None:
    async with running_relay(tmp_path) as relay:

        def send() -> bytes:
            with authed(relay) as d:
                assert d.cmd(f"MAIL FROM:<alice@example.org>{mail}".encode()).startswith(b"250")
                assert d.cmd(b"RCPT TO:<bob@example.net>").startswith(b"250")
                assert d.cmd(b"DATA").startswith(b"354")
                return d.cmd(message + b".")

        got = await trio.to_thread.run_sync(send)
    assert got.startswith(reply) if reply == b"250" else got == reply


async def test_a_failed_handshake_is_logged_with_openssls_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain text where TLS was due, on the implicit port and after STARTTLS: each failure is
    counted and logged with why (OpenSSL's reason), so an operator can tell a scanner or a
    client without TLS from a certificate problem."""
    caplog.set_level(logging.INFO)
    async with running_relay(tmp_path) as relay:

        def plain_where_tls_is_due() -> None:
            with socket.create_connection(("127.0.0.1", relay.implicit_port), timeout=10) as s:
                s.sendall(b"EHLO plain.example\r\n")
                s.recv(100)  # OpenSSL's alert, or the end
            with Dialog(relay.starttls_port) as d:
                assert d.reply().startswith(b"220 ")  # the greeting
                assert d.cmd(b"EHLO plain.example").startswith(b"250")
                assert d.cmd(b"STARTTLS").startswith(b"220 ")
                d.sock.sendall(b"EHLO still.plain\r\n")
                d.sock.recv(100)

        await trio.to_thread.run_sync(plain_where_tls_is_due)
        with trio.fail_after(10):
            while caplog.text.count("tls-failed") < 2:  # noqa: ASYNC110 - the log is the sign
                await trio.sleep(0.01)
    failed = [r.getMessage() for r in caplog.records if "tls-failed" in r.getMessage()]
    assert len(failed) == 2, failed
    for line in failed:  # OpenSSL 3.0 says WRONG_VERSION_NUMBER; another may word it so
        assert re.search(r" tls-failed [A-Z][A-Z0-9_]+$", line), line
