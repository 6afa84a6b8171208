"""250 means durable: the real relay with its journal on a crashable FS, crashed at every
operation while clients submit; and a failing fsync that must never be followed by a 250."""

from __future__ import annotations

import errno
import smtplib
import threading
from pathlib import Path

import pytest
import trio

from atmosrelay.queue.state import fold
from journal import Log
from journal.testing import CrashableMemFS, FaultFS
from tests.journal.helpers import SnapshotFS
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


@pytest.mark.parametrize("mode", ["synced-only", "unsynced-kept", "garbage"])
async def test_crash_at_every_sync_keeps_every_250(tmp_path: Path, mode: str) -> None:
    crash = {
        "synced-only": {},
        "unsynced-kept": {"keep_unsynced": 0.5},
        "garbage": {"keep_unsynced": 0.3, "garbage": True},
    }[mode]
    base = CrashableMemFS()
    acked: set[str] = set()
    lock = threading.Lock()
    fs = SnapshotFS(base, acked, **crash)  # type: ignore[arg-type]
    with trio.fail_after(60):
        async with running_relay(tmp_path, fs=fs) as relay, trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(trio.to_thread.run_sync, client, relay, 5, acked, lock, k * 100)
    assert len(acked) == 20
    assert len(fs.snapshots) > 20
    for snap in fs.snapshots:
        missing = snap.acked - recovered_ids(snap.fs, relay)
        assert not missing, f"{mode} snapshot {snap.index} after {snap.after}: lost {missing}"
    assert recovered_ids(base, relay) == acked


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
async def test_failed_fsync_gives_451_and_no_250_after(tmp_path: Path, error: int) -> None:
    base = CrashableMemFS()
    # Syncs 0-2 are the journal's own at open; the 4th message's fsync fails.
    fs = FaultFS(base, only="sync", fail_at=6, error=error)
    acked: set[str] = set()
    with trio.fail_after(60):
        async with running_relay(tmp_path, fs=fs) as relay:
            codes = await trio.to_thread.run_sync(client, relay, 8, acked, threading.Lock(), 0)
    first_failure = codes.index(451)
    assert first_failure >= 1
    assert codes[:first_failure] == [250] * first_failure
    assert codes[first_failure:] == [451] * (
        len(codes) - first_failure
    )  # poisoned: never 250 again
    assert acked <= recovered_ids(base.crash_clone(), relay)
