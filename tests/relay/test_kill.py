"""The real process under load: kill -9 at random moments, restart, and every queue id that
was answered 250 is in 'atmosrelay queue list'; a graceful SIGTERM mid-load loses nothing."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.relay.harness import ALICE, enroll, make_config

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 10
CLIENTS = 4


class Server:
    """``atmosrelay serve`` as a real process. A thread drains its stdout line by line (so the
    pipe never fills) and sets ``ready`` when the relay says so: no polling."""

    def __init__(self, tmp: Path, config_path: Path, round_: int) -> None:
        self.err = tmp / f"serve-{round_}.err"
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.said = threading.Condition()
        with self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "atmosrelay", "serve", "--config", str(config_path)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.ready.wait(30), (
            f"relay did not become ready: {self.text()}{self.err.read_text()}"
        )
        self.port = int(
            re.search(r"listening on 127\.0\.0\.1:(\d+) \(implicit\)", self.text()).group(1)
        )  # type: ignore[union-attr]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.said:
                self.lines.append(line)
                self.said.notify_all()
            if "atmosrelay: ready;" in line:  # not "ready" alone: a path may contain it
                self.ready.set()
        self.proc.stdout.close()
        self.ready.set()  # exited: let the waiter see why
        with self.said:
            self.said.notify_all()

    def wait_for(self, text: str, after: int = 0, timeout: float = 30) -> str:
        """The first line from the ``after``-th on that contains ``text`` (waiting for it,
        woken by each new line, up to ``timeout`` seconds)."""
        with self.said:
            found = self.said.wait_for(
                lambda: (
                    next((x for x in self.lines[after:] if text in x), None)
                    or self.proc.poll() is not None
                ),
                timeout,
            )
            line = next((x for x in self.lines[after:] if text in x), None)
        assert found and line, f"never said {text!r}: {self.text()}{self.err.read_text()}"
        return line

    def text(self) -> str:
        return "".join(self.lines)

    def finished(self) -> str:
        """All it printed, once it has exited."""
        self.reader.join(15)
        return self.text()


class Acks(dict[str, str]):
    """What a load's client threads were answered: each acknowledged id (a queue id, an
    inbound id) mapped to what names its message (a Subject, a Message-ID), and ``first``,
    the event a round whose clock starts at its first answer waits on (``timed``)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.first: threading.Event | None = None

    def add(self, ack: str, name: str) -> None:
        with self._lock:
            self[ack] = name
        if (first := self.first) is not None:
            first.set()

    def timed(self, from_first: bool) -> threading.Event | None:
        """A new round: the event its first answer sets, if its clock starts there."""
        self.first = threading.Event() if from_first else None
        return self.first


def load(
    port: int, ctx: ssl.SSLContext, key: str, acked: Acks, stop: threading.Event, tag: str
) -> None:
    """Submit until stopped; each queue id answered 250 goes in ``acked``, with its
    Subject."""
    n = 0
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10) as smtp:
            smtp.login(ALICE, key)
            while not stop.is_set():
                n += 1
                subject = f"{tag}-{n}"
                smtp.mail("alice@example.org")
                smtp.rcpt("bob@example.net")
                code, reply = smtp.data(
                    b"From: alice@example.org\r\nSubject: %s\r\n\r\nload\r\n" % subject.encode()
                )
                if code == 250:
                    acked.add(reply.decode().rsplit(" ", 1)[1], subject)
    except (smtplib.SMTPException, OSError):
        pass  # the server went away (that is the point) or is shutting down


def load_then_signal(
    server: Server,
    ctx: ssl.SSLContext,
    key: str,
    acked: Acks,
    seconds: float,
    tag: str,
    sig: signal.Signals,
    answered: threading.Event | None = None,
) -> int:
    """CLIENTS sessions submit for ``seconds`` of real time (from their first 250, with
    ``answered``: ``acked.timed(True)``), then the relay gets ``sig``; once it has exited
    the sessions stop. Returns its exit status."""
    return clients_then_signal(
        server,
        lambda stop, i: load(server.port, ctx, key, acked, stop, f"{tag}-{i}"),
        seconds,
        sig,
        answered,
    )


def clients_then_signal(
    server: Server,
    client: Callable[[threading.Event, int], object],
    seconds: float,
    sig: signal.Signals = signal.SIGKILL,
    answered: threading.Event | None = None,
) -> int:
    """CLIENTS threads run ``client(stop, i)`` for ``seconds`` of real time, then the relay
    gets ``sig``; once it has exited, ``stop`` is set and the threads joined. Returns the
    relay's exit status. With ``answered``, the clock starts once the clients set it (their
    first success), so the load is real however slow the machine is that second."""
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(stop, i), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    if answered is not None:
        assert answered.wait(60), "the load never got a first success"
    time.sleep(seconds)  # real load for a random real time: the moment of the kill is the test
    server.proc.send_signal(sig)
    status = server.proc.wait(60)
    stop.set()
    for t in threads:
        t.join(15)
    return status


def queue_states(config_path: Path) -> dict[str, list[str]]:
    """Queue id -> its recipients' states, from 'atmosrelay queue list --json'."""
    return {m["id"]: [r["state"] for r in m["recipients"]] for m in _queue_list(config_path)}


def queue_ids(config_path: Path) -> set[str]:
    return set(queue_states(config_path))


def _queue_list(config_path: Path) -> list[dict[str, Any]]:
    return list(cli_json(config_path, "queue", "list", "--all"))


def cli_json(config_path: Path, *args: str) -> Any:
    """``atmosrelay ARGS --json`` in a process of its own, as the operator runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "atmosrelay", *args, "--json", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_config(
    tmp_path: Path, delivery: str = "enabled = false\n", smtp: str = ""
) -> tuple[Path, ssl.SSLContext, str]:
    """The harness's settings as a file for the real process; ``delivery`` is the body of
    its [delivery] section (off by default: these rounds test acceptance); ``smtp``, more
    lines for [smtp]."""
    ca = trustme.CA()
    config = make_config(tmp_path, ca, '[smtp]\nlisteners = ["127.0.0.1:0 implicit"]\n')
    key, _ = enroll(config)
    text = tmp_path / "relay.toml"
    cert = tmp_path / "tls.pem"
    text.write_text(
        f'[relay]\ndata_dir = "{tmp_path / "var"}"\nlog_level = "warning"\n'
        '[operator]\ndomain = "relay.test"\n[auth]\nbcrypt_cost = 4\n'
        f'[smtp]\nlisteners = ["127.0.0.1:0 implicit"]\nhostname = "mx.test"\n'
        f'tls_cert = "{cert}"\ntls_key = "{cert}"\nshutdown_grace = 10.0\n{smtp}'
        f"[delivery]\n{delivery}"
        '[http]\nlisteners = ["127.0.0.1:0"]\n'
    )
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return text, ctx, key


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, ssl.SSLContext, str]:
    return write_config(tmp_path)


def kill_rounds(
    tmp_path: Path,
    config_path: Path,
    acked: Acks,
    load_then_kill: Callable[[Server, float, str, threading.Event | None], object],
    rounds: int = ROUNDS,
    *,
    queued: bool = True,
) -> int:
    """Start the relay, check it recovered at least every acknowledged message (where the
    ids ``acked`` holds are the queue's: ``queued``), load it for a random time and kill it
    (``load_then_kill(server, seconds, tag, answered)``), ``rounds`` times. Returns the
    seed of the random times (for the failure messages).

    The first round's time starts at its load's first success (``answered``, which
    ``acked`` sets), so every run has acknowledged something however slow the machine is;
    the other rounds' start with the relay, so a kill may come before any answer."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    started = time.monotonic()
    for round_ in range(rounds):
        assert time.monotonic() - started < 180, "kill loop over its time budget"
        server = Server(tmp_path, config_path, round_)
        recovered = int(re.search(r"queue: (\d+) message", server.text()).group(1))  # type: ignore[union-attr]
        assert recovered >= len(acked) or not queued, (
            f"seed {seed}: round {round_} recovered {recovered} < {len(acked)}"
        )
        load_then_kill(server, rng.uniform(0.2, 1.0), f"r{round_}", acked.timed(round_ == 0))
    return seed


@pytest.mark.slow
def test_kill_9_under_load_loses_no_250(
    tmp_path: Path, setup: tuple[Path, ssl.SSLContext, str]
) -> None:
    config_path, ctx, key = setup
    acked = Acks()
    seed = kill_rounds(
        tmp_path,
        config_path,
        acked,
        lambda server, seconds, tag, answered: load_then_signal(
            server, ctx, key, acked, seconds, tag, signal.SIGKILL, answered
        ),
    )
    assert acked, "the load never got a 250"  # how many is a speed figure, not a property
    missing = acked.keys() - queue_ids(config_path)
    assert not missing, f"seed {seed}: answered 250 but lost: {sorted(missing)[:5]}"


@pytest.mark.slow
def test_sigterm_mid_load_loses_nothing(
    tmp_path: Path, setup: tuple[Path, ssl.SSLContext, str]
) -> None:
    config_path, ctx, key = setup
    acked = Acks()
    server = Server(tmp_path, config_path, 0)
    answered = acked.timed(True)
    status = load_then_signal(server, ctx, key, acked, 0.8, "term", signal.SIGTERM, answered)
    assert status == 0, server.err.read_text()
    text = server.finished()
    assert "SIGTERM received" in text and "listeners closed" in text and "journal closed" in text
    assert acked
    assert acked.keys() <= queue_ids(config_path)
    assert f"queue checkpoint: {len(queue_ids(config_path))} message(s) written" in text
    again = Server(tmp_path, config_path, 1)  # and it starts again from what is on disk
    assert f"queue: {len(queue_ids(config_path))} message(s) recovered from the checkpoint" in (
        again.text()
    )
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(30) == 0


@pytest.mark.slow
def test_kill_9_after_a_clean_stop_starts_from_the_checkpoint_and_loses_no_250(
    tmp_path: Path, setup: tuple[Path, ssl.SSLContext, str]
) -> None:
    """A SIGTERM writes the queue checkpoint; the starts after each kill -9 that follows read
    it and the records the killed runs wrote since, and hold exactly the messages a fold of
    the whole journal holds (``queue list`` folds it, offline). The journal's frame index,
    written by the clean stop, still vouches for what the segments held then."""
    config_path, ctx, key = setup
    acked = Acks()
    plan = [signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]
    for round_, sig in enumerate(plan):
        folded = len(queue_ids(config_path)) if round_ else 0
        server = Server(tmp_path, config_path, round_)
        opened = server.wait_for("journal at ")
        assert ("checked whole by the frame index" in opened) == (round_ > 0), opened
        recovered = server.wait_for("queue: ")
        assert f"queue: {folded} message(s) recovered" in recovered
        assert ("from the checkpoint" in recovered) == (round_ > 0), recovered
        first = acked.timed(round_ == 0)  # its clock from the first 250
        status = load_then_signal(server, ctx, key, acked, 0.5, f"k{round_}", sig, first)
        assert status == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert acked, "the load never got a 250"
    missing = acked.keys() - queue_ids(config_path)
    assert not missing, f"answered 250 but lost: {sorted(missing)[:5]}"
