"""Sessions in session processes (``smtp.processes``; server/workers.py), as the operator
runs them: ``atmosrelay serve`` as a real process, real TLS and AUTH from smtplib, kill -9
of the owner and of the session processes. What a 250 promises holds as in one process; a
session process that dies leaves the others (then the owner) serving; the owner's death
ends them; SIGTERM drains them; /metrics counts what they accepted and refused."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.processes import exited
from tests.relay.harness import ALICE
from tests.relay.test_kill import (
    Acks,
    Server,
    kill_rounds,
    load_then_signal,
    queue_ids,
    write_config,
)

PROCESSES = "processes = 2\n"


class Relay(NamedTuple):
    config_path: Path
    ctx: ssl.SSLContext
    key: str
    server: Server
    pids: list[int]  # its session processes'


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    """The relay with two session processes, started; killed at the test's end if it still
    runs (its session processes follow their owner out)."""
    config_path, ctx, key = write_config(tmp_path, smtp=PROCESSES)
    server = Server(tmp_path, config_path, 0)
    try:
        yield Relay(config_path, ctx, key, server, session_pids(server.text()))
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)


MESSAGE = b"From: alice@example.org\r\nSubject: %s\r\n\r\nbody\r\n"


def session_pids(text: str) -> list[int]:
    found = re.search(r"session processes started \(pid ([\d, ]+)\)", text)
    assert found, f"no session processes started: {text}"
    return [int(p) for p in found.group(1).split(", ")]


def send(port: int, ctx: ssl.SSLContext, key: str, tag: str, n: int, acked: Acks) -> None:
    """One session over implicit TLS with AUTH: ``n`` messages, each answered 250."""
    with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30) as smtp:
        smtp.login(ALICE, key)
        for i in range(n):
            subject = f"{tag}-{i}"
            smtp.mail("alice@example.org")
            smtp.rcpt("bob@example.net")
            code, reply = smtp.data(MESSAGE % subject.encode())
            assert code == 250, reply
            acked.add(reply.decode().rsplit(" ", 1)[1], subject)


def logged(server: Server, text: str, timeout: float = 15) -> str:
    """The line of the relay's log (its standard error) that contains ``text``, once there."""
    deadline = time.monotonic() + timeout
    while True:
        line = next((x for x in server.err.read_text().splitlines() if text in x), None)
        if line is not None:
            return line
        assert time.monotonic() < deadline, f"never logged {text!r}: {server.err.read_text()}"
        time.sleep(0.05)


def metric(server: Server, name: str) -> float:
    port = re.search(r"listening on 127\.0\.0\.1:(\d+) \(http\)", server.text()).group(1)  # type: ignore[union-attr]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_sessions_in_processes_answer_250_only_for_what_the_owner_journaled(
    relay: Relay,
) -> None:
    config_path, ctx, key, server, pids = relay
    assert len(pids) == 2 and server.proc.pid not in pids
    acked = Acks()
    threads = [
        threading.Thread(target=send, args=(server.port, ctx, key, f"c{i}", 10, acked))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(acked) == 40
    with smtplib.SMTP_SSL("127.0.0.1", server.port, context=ctx, timeout=30) as smtp:
        smtp.login(ALICE, key)
        code, _ = smtp.mail("alice@pending.example.org")  # enrolled, never verified
        assert code == 550
    assert metric(server, 'atmosrelay_messages_accepted_total{via="smtp"}') == 40
    # refusals come with the session process's next report (once a second)
    deadline = time.monotonic() + 15
    name = 'atmosrelay_messages_refused_total{code="DOMAIN_MISMATCH",via="smtp"}'
    while metric(server, name) != 1:
        assert time.monotonic() < deadline, "the refusal never reached /metrics"
        time.sleep(0.2)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.err.read_text()
    text = server.finished()
    assert "journal: 40 append(s)" in text
    # its own session processes' counts came back to it (at least one flush interval has
    # passed) without it taking them for another relay's
    assert "another relay process" not in text
    assert exited(pids, 15)
    assert set(acked) == queue_ids(config_path)


@pytest.mark.slow
def test_kill_9_of_the_owner_loses_no_250_and_ends_its_session_processes(
    tmp_path: Path,
) -> None:
    config_path, ctx, key = write_config(tmp_path, smtp=PROCESSES)
    acked = Acks()
    lingering: list[int] = []

    def load_then_kill(
        server: Server, seconds: float, tag: str, answered: threading.Event | None
    ) -> None:
        pids = session_pids(server.text())
        load_then_signal(server, ctx, key, acked, seconds, tag, signal.SIGKILL, answered)
        if not exited(pids, 15):  # they read end of file and leave
            lingering.extend(pids)

    seed = kill_rounds(tmp_path, config_path, acked, load_then_kill, rounds=5)
    assert not lingering, f"seed {seed}: session processes outlived their owner"
    assert acked, "the load never got a 250"
    missing = acked.keys() - queue_ids(config_path)
    assert not missing, f"seed {seed}: answered 250 but lost: {sorted(missing)[:5]}"


def test_a_session_process_that_dies_leaves_the_others_then_the_owner_serving(
    relay: Relay,
) -> None:
    config_path, ctx, key, server, (first, second) = relay
    acked = Acks()
    send(server.port, ctx, key, "before", 2, acked)
    os.kill(first, signal.SIGKILL)
    said = logged(server, f"session process {first} ended")
    assert "the others serve its listeners" in said
    for i in range(4):  # every connection now goes to the one left
        send(server.port, ctx, key, f"one-left-{i}", 1, acked)
    os.kill(second, signal.SIGKILL)
    said = logged(server, f"session process {second} ended")
    assert "no session process is left: this process serves the listeners" in said
    send(server.port, ctx, key, "owner", 3, acked)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.err.read_text()
    assert len(acked) == 9
    assert set(acked) == queue_ids(config_path)


def test_sigterm_lets_a_session_in_data_finish(relay: Relay) -> None:
    config_path, ctx, key, server, pids = relay
    smtp = smtplib.SMTP_SSL("127.0.0.1", server.port, context=ctx, timeout=30)
    try:
        smtp.login(ALICE, key)
        smtp.mail("alice@example.org")
        smtp.rcpt("bob@example.net")
        code, _ = smtp.docmd("DATA")
        assert code == 354
        smtp.send(b"From: alice@example.org\r\nSubject: in flight\r\n\r\n")
        after = len(server.lines)
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for("listeners closed", after)
        smtp.send(b"the rest\r\n.\r\n")
        code, reply = smtp.getreply()
        assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[1]
        assert smtp.docmd("NOOP")[0] == 421  # and then it is told the relay is stopping
    finally:
        smtp.close()
    assert server.proc.wait(30) == 0, server.err.read_text()
    assert exited(pids, 15)
    assert queue_ids(config_path) == {queue_id}
