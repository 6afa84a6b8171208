"""Delivery to a real Postfix, an MX that is not ours and offers CHUNKING (RFC 3030) and
PIPELINING: the relay's SMTP client sends with BDAT, each recipient gets Postfix's own
reply, and the message Postfix keeps is the one DATA delivers, octet for octet; and the
relay itself, a real process, delivers there with BDAT or DATA as ``delivery.chunking``
says, from this process or from its delivery processes, three DKIM signatures intact.

Postfix is a throwaway instance (bench/postfix.py) on a loopback port, holding what it
accepts, so the test reads it back with ``postcat``. It needs Postfix installed and root, as
Postfix's master does (.ci/run installs it)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import trio

from atmosrelay.config import load_config
from atmosrelay.delivery.client_session import INLINE_CHUNK, Envelope, open_remote
from atmosrelay.delivery.courier import client_context
from atmosrelay.delivery.destination import Destination
from bench.postfix import Postfix, free_port
from tests.accounts.dns_server import DnsServer
from tests.delivery.test_end_to_end import dnsfunc, publish
from tests.relay.harness import ALICE
from tests.relay.test_kill import Server, queue_states, write_config

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


def _held(postfix: Postfix, n: int) -> list[str]:
    """The hold queue once it has ``n`` messages (Postfix holds a message before its 250,
    but the relay records the 250 after; this waits for the relay's side)."""
    deadline = time.monotonic() + 30
    while len(held := postfix.held()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def _kept(postfix: Postfix, queue_id: str) -> bytes:
    """The message as Postfix keeps it, without the Received header it put first (its first
    line and the folded lines after it)."""
    lines = postfix.message(queue_id).split(b"\n")
    assert lines[0].startswith(b"Received: "), lines[0]
    rest = 1
    while lines[rest][:1] in (b" ", b"\t"):
        rest += 1
    return b"\n".join(lines[rest:])


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


@pytest.mark.parametrize(
    ("processes", "chunking"), [(0, True), (2, True), (2, False)], ids=["here", "couriers", "data"]
)
def test_the_relay_delivers_by_bdat_or_data_as_configured(
    tmp_path: Path, postfix: Postfix, processes: int, chunking: bool
) -> None:
    settings = (
        f'smarthost = "127.0.0.1:{postfix.port}"\nprocesses = {processes}\n'
        f"chunking = {str(chunking).lower()}\n"
    )
    config_path, ctx, key = write_config(tmp_path, settings)
    server = Server(tmp_path, config_path, 0)
    try:
        with smtplib.SMTP_SSL("127.0.0.1", server.port, context=ctx, timeout=10) as smtp:
            smtp.login(ALICE, key)
            smtp.sendmail("alice@example.org", ["bob@example.net"], SMALL)
        (queue_id,) = _held(postfix, 1)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    assert list(queue_states(config_path).values()) == [["sent"]]
    (session,) = _commands(postfix, 1)
    assert ("bdat=1" in session) == chunking and ("data=1" in session) != chunking, session

    # what Postfix keeps carries the relay's three signatures, and they verify
    kept = _kept(postfix, queue_id).replace(b"\n", b"\r\n")
    with DnsServer() as dns_server:
        publish(load_config(str(config_path)), dns_server)
        for idx in range(3):
            assert dkim.DKIM(kept).verify(idx=idx, dnsfunc=dnsfunc(dns_server)), idx
    assert b".a line that DATA would stuff\r\n..and another\r\n.\r\nthe end\r\n" in kept
