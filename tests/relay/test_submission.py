"""Submission end to end with real clients over real sockets and real TLS."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
import trio

from atmosrelay.queue.records import decode_accepted
from journal import read_records
from tests.relay.harness import ALICE, Relay, running_relay

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"X-Atmos-Category: password-reset\r\nX-Atmos-Tags: welcome, v2\r\n"
    b'X-Atmos-Metadata: {"user": "42"}\r\n\r\n.dot line\r\nBody.\r\n'
)


def send_starttls(
    relay: Relay, username: str, mechanism: str = "PLAIN", message: bytes = MESSAGE
) -> str:
    with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.starttls(context=relay.client_context())
        smtp.ehlo("client.test")
        smtp.user, smtp.password = username, relay.key
        code, _ = smtp.auth(mechanism, smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login)
        assert code == 235
        smtp.mail("alice@example.org")
        smtp.rcpt("bob@example.net")
        code, reply = smtp.data(message)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


def journal_messages(relay: Relay) -> dict[str, tuple[object, bytes]]:
    out = {}
    for record in read_records(str(relay.config.journal_dir)):
        accepted, offset = decode_accepted(record.payload)
        out[accepted.id] = (accepted, record.payload[offset:])
    return out


@pytest.mark.parametrize(("username", "mechanism"), [(ALICE, "PLAIN"), ("Alice.Test", "LOGIN")])
async def test_starttls_auth_and_queue_id(tmp_path: Path, username: str, mechanism: str) -> None:
    with trio.fail_after(30):
        async with running_relay(tmp_path) as relay:
            queue_id = await trio.to_thread.run_sync(send_starttls, relay, username, mechanism)
            assert len(queue_id) == 26
            messages = journal_messages(relay)
    accepted, body = messages[queue_id]
    assert accepted.did == ALICE  # type: ignore[attr-defined]
    assert accepted.sender == "alice@example.org"  # type: ignore[attr-defined]
    assert [r.addr for r in accepted.recipients] == ["bob@example.net"]  # type: ignore[attr-defined]
    assert (accepted.category, accepted.bulk, accepted.tags) == (
        "password-reset",
        False,
        ("welcome", "v2"),
    )  # type: ignore[attr-defined]
    assert accepted.metadata == {"user": "42"}  # type: ignore[attr-defined]
    assert accepted.client["tls"].startswith("TLSv1.")  # type: ignore[attr-defined]
    head, _, rest = body.partition(b"\r\n\r\n")
    assert (
        rest == b".dot line\r\nBody.\r\n"
    )  # the body is untouched (smtplib stuffed it, we unstuffed it)
    assert head.startswith(
        f"X-Atmos-Member-Did: {ALICE}\r\nFeedback-ID: welcome:abcdefghijklmnopqrstuvwx:password-reset:relay.test\r\n".encode()
    )
    assert (
        b"X-Atmos-Category" not in head
        and b"X-Atmos-Tags" not in head
        and b"X-Atmos-Metadata" not in head
    )
    assert b"\r\nDate: " in head and b"\r\nMessage-ID: <" in head
