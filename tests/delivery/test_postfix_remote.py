"""Delivery to a real Postfix, an MX that is not ours and offers CHUNKING (RFC 3030) and
PIPELINING: the relay's SMTP client sends with BDAT, each recipient gets Postfix's own
reply, and the message Postfix keeps is the one DATA delivers, octet for octet.

Postfix is a throwaway instance (bench/postfix.py) on a loopback port, holding what it
accepts, so the test reads it back with ``postcat``. It needs Postfix installed and root, as
Postfix's master does (.ci/run installs it)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from atmosrelay.delivery.client_session import INLINE_CHUNK, Envelope, open_remote
from atmosrelay.delivery.courier import client_context
from atmosrelay.delivery.destination import Destination
from bench.postfix import Postfix, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("postfix") is None or os.geteuid() != 0,
    reason="needs Postfix (apt-get install postfix) and root, as Postfix's master does",
)

REFUSED = "refused@example.net"
# (with the Date and Message-ID Postfix would add to a message without them)
HEAD = b"Date: Sun, 29 Nov 2026 09:30:08 +0000\r\nMessage-ID: <t@example.org>\r\n"
SMALL = HEAD + (
    b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: chunked\r\n\r\n"
    b".a line that DATA would stuff\r\n..and another\r\n.\r\nthe end\r\n"
)
LARGE = (
    HEAD + b"From: alice@example.org\r\nSubject: large\r\n\r\n" + b".x\r\n" * (INLINE_CHUNK // 3)
)


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[Postfix]:
    peer = Postfix(
        tmp_path / "postfix",
        free_port(),  # its relayhost: never used, everything is held
        hold=True,
        extra={
            "smtpd_recipient_restrictions": (
                f"check_recipient_access inline:{{{REFUSED}=REJECT}}, permit_mynetworks, reject"
            )
        },
    )
    try:
        yield peer
    finally:
        peer.stop()


async def _send(postfix: Postfix, chunking: bool, *messages: tuple[Envelope, bytes]) -> list:
    destination = Destination((("127.0.0.1", postfix.port),))
    with trio.fail_after(30):
        remote = await open_remote(
            destination, helo="relay.test", tls=client_context(False, ""), chunking=chunking
        )
        assert remote.chunking == chunking
        try:
            return [await remote.send(envelope, message) for envelope, message in messages]
        finally:
            await remote.aclose()


def _commands(postfix: Postfix, sessions: int) -> list[str]:
    """The command counts Postfix logged for each session (its disconnect line), once it
    has logged ``sessions`` of them (its log is written by another of its processes)."""
    deadline = time.monotonic() + 30
    while True:
        # (the readiness probe's connection says no EHLO)
        found = re.findall(r"disconnect from \S+ (ehlo=.*)", postfix.log())
        if len(found) >= sessions or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _kept(postfix: Postfix, queue_id: str) -> bytes:
    """The message as Postfix keeps it, without the Received header it put first."""
    text = postfix.message(queue_id)
    return text[text.index(b"\nDate: ") + 1 :]


async def test_postfix_takes_bdat_and_keeps_what_data_would_have_delivered(
    postfix: Postfix,
) -> None:
    envelope = Envelope("alice@example.org", ("bob@example.net", REFUSED, "carol@example.net"))
    single = Envelope("alice@example.org", ("bob@example.net",))
    chunked = await _send(postfix, True, (envelope, SMALL), (single, LARGE))
    plain = await _send(postfix, False, (envelope, SMALL), (single, LARGE))

    for outcomes in (chunked, plain):
        small, large = outcomes
        assert [(o.recipient, o.outcome) for o in small] == [
            ("bob@example.net", "sent"),
            (REFUSED, "bounced"),
            ("carol@example.net", "sent"),
        ]
        assert small[1].status == "5.7.1" and "Recipient address rejected" in (small[1].reply or "")
        assert [o.outcome for o in large] == ["sent"]
    # Postfix's own count of each session's commands: BDAT, then DATA
    first, second = _commands(postfix, 2)
    assert "bdat=2" in first and "data=" not in first, first
    assert "data=2" in second and "bdat=" not in second, second

    held = postfix.held()
    assert len(held) == 4
    kept = sorted(_kept(postfix, q) for q in held)
    expected = sorted([SMALL, SMALL, LARGE, LARGE])
    assert kept == [m.replace(b"\r\n", b"\n") for m in expected]
