"""250 means durable: the real relay with its journal on a crashable FS, crashed at every
operation while clients submit; and a failing fsync that must never be followed by a 250."""

from __future__ import annotations

import base64
import errno
import logging
import smtplib
import threading
from pathlib import Path

import pytest
import trio

from atmosrelay.queue.state import fold
from journal import Log
from journal.testing import CrashableMemFS, FaultFS
from tests.journal.helpers import SnapshotFS
from tests.relay.dialog import Dialog
from tests.relay.harness import ALICE, Relay, running_relay

BODY = b"From: alice@example.org\r\nSubject: durable %d\r\n\r\nHello.\r\n"


def client(relay: Relay, n: int, acked: set[str], lock: threading.Lock, base: int) -> list[int]:
    codes = []
    with smtplib.SMTP_SSL(
        "127.0.0.1", relay.implicit_port, context=relay.client_context(), timeout=20
    ) as smtp:
        smtp.login(ALICE, relay.key)
        for i in range(n):
            smtp.mail("alice@example.org")
            smtp.rcpt("bob@example.net")
            code, reply = smtp.data(BODY % (base + i))
            codes.append(code)
            if code == 250:
                with lock:
                    acked.add(reply.decode().rsplit(" ", 1)[1])  # queue id, after the 250 arrived
    return codes


def recovered_ids(fs: CrashableMemFS, relay: Relay) -> set[str]:
    log, _ = Log.open(fs, str(relay.config.journal_dir))
    try:
        return set(fold(log.records()).messages)
    finally:
        log.close()


async def power_cuts(
    tmp_path: Path, *, skip_file_sync: bool = False, **crash: object
) -> tuple[set[str], list[str], set[str]]:
    """The power-loss mode: the real relay (listener, TLS, AUTH, sessions) with its journal
    on a crashable FS, power cut after every FS operation while 4 clients submit 20
    messages. A cut keeps only what was fsynced (``crash`` may keep unsynced sectors, or
    garbage, as real disks do). Returns (acknowledged, one line per cut that lost an
    acknowledged message, what the FS holds at the end)."""
    base = CrashableMemFS()
    acked: set[str] = set()
    lock = threading.Lock()
    fs = SnapshotFS(base, acked, skip_file_sync=skip_file_sync, **crash)
    with trio.fail_after(60):
        async with running_relay(tmp_path, fs=fs) as relay, trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(trio.to_thread.run_sync, client, relay, 5, acked, lock, k * 100)
    assert len(fs.snapshots) > 20
    losses = []
    for snap in fs.snapshots:
        missing = set(snap.acked) - recovered_ids(snap.fs, relay)
        if missing:
            losses.append(f"cut {snap.index} after {snap.after}: lost {sorted(missing)}")
    return acked, losses, recovered_ids(base, relay)


@pytest.mark.parametrize("mode", ["synced-only", "unsynced-kept", "garbage"])
async def test_crash_at_every_sync_keeps_every_250(tmp_path: Path, mode: str) -> None:
    crash = {
        "synced-only": {},
        "unsynced-kept": {"keep_unsynced": 0.5},
        "garbage": {"keep_unsynced": 0.3, "garbage": True},
    }[mode]
    acked, losses, final = await power_cuts(tmp_path, **crash)
    assert len(acked) == 20
    assert not losses, f"{mode}: {losses[:3]}"
    assert final == acked


async def test_the_power_cut_check_catches_a_missing_fsync(tmp_path: Path) -> None:
    """The mutation check of the mode above: with the journal's file fsyncs answered but
    never done, the relay still answers 250 (it cannot tell), and the power cuts must find
    acknowledged messages lost. (kill -9 could not: the page cache survives it.)"""
    acked, losses, _ = await power_cuts(tmp_path, skip_file_sync=True)
    assert len(acked) == 20
    assert losses, "a journal that never fsyncs passed the power-cut check"


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
async def test_a_failed_fsync_stops_the_relay_taking_mail(
    tmp_path: Path, error: int, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failed fsync the journal is poisoned: the message being stored gets 451 (it
    may or may not be on disk), the next MAIL on an open session gets 421 4.3.0 and the
    session closes, a new connection gets 421 4.3.0 instead of a greeting, nothing is read
    that could not be kept, no 250 ever follows, and the log says a restart is needed."""
    base = CrashableMemFS()
    # Syncs 0-2 are the journal's own at open; the 4th message's fsync fails.
    fs = FaultFS(base, only="sync", fail_at=6, error=error)
    acked: set[str] = set()
    failed = b"421 4.3.0 Mail system failure, not accepting mail; try again later\r\n"

    def session(relay: Relay) -> list[bytes]:
        replies = []
        with Dialog(relay.implicit_port, relay.client_context()) as d:
            d.reply()
            d.cmd(b"EHLO client.test")
            assert (
                d.cmd(b"AUTH PLAIN " + base64.b64encode(f"\0{ALICE}\0{relay.key}".encode()))[:3]
                == b"235"
            )
            for i in range(8):
                reply = d.cmd(b"MAIL FROM:<alice@example.org>")
                if not reply.startswith(b"250"):
                    replies.append(reply)
                    replies.append(d.reply())  # b"": closed after the 421
                    break
                assert d.cmd(b"RCPT TO:<bob@example.net>").startswith(b"250")
                assert d.cmd(b"DATA").startswith(b"354")
                reply = d.cmd(BODY % i + b".")
                replies.append(reply)
                if reply.startswith(b"250"):
                    acked.add(reply.decode().rsplit(" ", 1)[1].strip())
        with Dialog(relay.implicit_port, relay.client_context()) as again:
            replies.append(again.reply())
            replies.append(again.reply())  # b"": closed
        return replies

    with trio.fail_after(60):
        async with running_relay(tmp_path, fs=fs) as relay:
            replies = await trio.to_thread.run_sync(session, relay)
    codes = [r[:3] for r in replies]
    stored = codes.index(b"451")  # the message whose fsync failed
    assert stored >= 1
    assert codes == [b"250"] * stored + [b"451", b"421", b"", b"421", b""]
    assert replies[stored + 1] == replies[stored + 3] == failed
    assert acked <= recovered_ids(base.crash_clone(), relay)
    # The journal says what failed; the relay says, once, what that means for mail.
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert {r.name for r in critical} == {"journal", "atmosrelay.smtp"}
    critical = [r for r in critical if r.name == "atmosrelay.smtp"]
    assert len(critical) == 1
    assert "until the relay is restarted" in critical[0].getMessage()
