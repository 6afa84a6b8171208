"""The real process, its inbound listener under load from several remotes, ``kill -9`` at
random moments, restart: every message the listener answered 250 ends up in the inbound
log (processed after the restart if the kill came between the fsync and the processing)."""

from __future__ import annotations

import re
import signal
import smtplib
import threading
from pathlib import Path

import pytest

from tests.relay.test_kill import (
    Acks,
    Server,
    cli_json,
    clients_then_signal,
    kill_rounds,
    write_config,
)

ROUNDS = 6


def inbound_port(server: Server) -> int:
    found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(inbound\)", server.text())
    assert found is not None, server.text()
    return int(found.group(1))


def remote(
    port: int,
    acked: Acks,
    stop: threading.Event,
    tag: str,
) -> None:
    """A remote MX handing the relay abuse reports until stopped; each inbound id answered
    250 goes in ``acked``, with its Subject."""
    n = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("mx.remote.test")
            while not stop.is_set():
                n += 1
                subject = f"{tag}-{n}"
                smtp.mail("reports@remote.test")
                smtp.rcpt("abuse@relay.test")
                code, reply = smtp.data(f"Subject: {subject}\r\n\r\na report\r\n".encode())
                if code == 250:
                    acked.add(reply.decode().rsplit(" ", 1)[1], subject)
    except (smtplib.SMTPException, OSError):
        pass  # the relay was killed: that is the point


@pytest.mark.slow
def test_kill_9_during_inbound_acceptance_loses_nothing_that_got_250(tmp_path: Path) -> None:
    config_path, _, _ = write_config(tmp_path)
    text = config_path.read_text().replace(
        'listeners = ["127.0.0.1:0 implicit"]',
        'listeners = ["127.0.0.1:0 implicit", "127.0.0.1:0 inbound"]',
    )
    config_path.write_text(text + "[inbound]\nhourly_per_ip = 1000000\n")
    acked = Acks()
    seed = kill_rounds(
        tmp_path,
        config_path,
        acked,
        lambda server, seconds, tag, answered: clients_then_signal(
            server,
            lambda stop, i: remote(inbound_port(server), acked, stop, f"{tag}-{i}"),
            seconds,
            answered=answered,
        ),
        rounds=ROUNDS,
        queued=False,  # inbound ids, not the queue's: its own check has nothing to hold
    )
    assert acked, "the remotes never got a 250"
    # a last start: whatever was fsynced but not processed is processed before "ready"
    server = Server(tmp_path, config_path, ROUNDS)
    try:
        rows = cli_json(config_path, "inbound", "list", "--limit", "1000000")
        logged = {r["id"]: r for r in rows}
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.finished()
    missing = acked.keys() - logged.keys()
    assert not missing, f"seed {seed}: answered 250 but lost: {sorted(missing)[:5]}"
    assert all(logged[i]["kind"] == "role" for i in acked)
    assert all(logged[i]["rcpt"] == "abuse@relay.test" for i in acked)
