"""200 means durable, for HTTP too: the real process under HTTP load, killed with SIGKILL at
random moments and restarted; every id answered 200 is in the journal after each restart,
and once the relay delivers, every one of them reaches the stand-in MX. And an
Idempotency-Key outlives a kill -9 between a send and its retry."""

from __future__ import annotations

import re
import signal
import threading
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.relay.harness import ALICE
from tests.relay.test_kill import (
    Acks,
    Server,
    clients_then_signal,
    kill_rounds,
    queue_ids,
    write_config,
)
from tests.sink import Sink, aiosmtpd_sink

ROUNDS = 5
CLIENTS = 4


def http_port(server: Server) -> int:
    found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(http\)", server.text())
    assert found, server.text()
    return int(found.group(1))


def _load(
    port: int,
    key: str,
    acked: Acks,
    stop: threading.Event,
    tag: str,
) -> None:
    """Send until stopped; each id answered 200 goes in ``acked``, with its Message-ID."""
    headers = {"Authorization": f"Bearer {key}", "X-Atmos-DID": ALICE}
    n = 0
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while not stop.is_set():
                n += 1
                body = {
                    "from": "alice@example.org",
                    "to": "bob@example.net",
                    "subject": f"{tag}-{n}",
                    "text": "load",
                    "category": "transactional",
                }
                r = client.post("/v1/send", json=body, headers=headers)
                if r.status_code == 200:
                    acked.add(r.json()["id"], r.json()["messageId"])
    except httpx.HTTPError:
        pass  # the server went away (that is the point)


def _delivered_ids(sink: Sink) -> set[str]:
    out = set()
    for r in sink.snapshot():
        found = re.search(rb"(?im)^Message-ID:\s*(<[^>]+>)", r.content)
        if found:
            out.add(found.group(1).decode())
    return out


@pytest.mark.slow
def test_kill_9_under_http_load_loses_no_200(tmp_path: Path) -> None:
    with aiosmtpd_sink() as sink:
        # Nothing is delivered while the kills go on (delivery off), then one start that
        # delivers everything: each 200 must reach the sink.
        config_path, _, key = write_config(tmp_path)
        acked = Acks()
        seed = kill_rounds(
            tmp_path,
            config_path,
            acked,
            lambda server, seconds, tag, answered: clients_then_signal(
                server,
                lambda stop, i: _load(http_port(server), key, acked, stop, f"{tag}-{i}"),
                seconds,
                answered=answered,
            ),
            ROUNDS,
        )
        assert acked, "the load never got a 200"
        missing = acked.keys() - queue_ids(config_path)
        assert not missing, f"seed {seed}: answered 200 but lost: {sorted(missing)[:5]}"
        text = config_path.read_text().replace(
            "[delivery]\nenabled = false\n",
            f'[delivery]\nsmarthost = "127.0.0.1:{sink.port}"\nconcurrency = 8\n',
        )
        config_path.write_text(text)
        final = Server(tmp_path, config_path, ROUNDS)
        try:
            want = set(acked.values())
            # (the queue also holds messages whose 200 the kill cut off: delivered too)
            sink.wait(lambda: want <= _delivered_ids(sink), 120)
            undelivered = want - _delivered_ids(sink)
        finally:
            final.proc.send_signal(signal.SIGTERM)
            final.proc.wait(60)
    assert not undelivered, f"seed {seed}: answered 200, never delivered: {sorted(undelivered)[:5]}"


@pytest.mark.slow
def test_an_idempotency_key_outlives_a_kill_9(tmp_path: Path) -> None:
    config_path, _, key = write_config(tmp_path)
    headers = {"Authorization": f"Bearer {key}", "X-Atmos-DID": ALICE, "Idempotency-Key": "inv-1"}
    body = {"from": "alice@example.org", "to": "bob@example.net", "text": "your invoice"}
    server = Server(tmp_path, config_path, 0)
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port(server)}", timeout=10) as client:
        first = client.post("/v1/send", json=body, headers=headers)
    server.proc.send_signal(signal.SIGKILL)  # before the status index could commit it
    server.proc.wait(30)
    again = Server(tmp_path, config_path, 1)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port(again)}", timeout=10) as client:
            retry = client.post("/v1/send", json=body, headers=headers)
            changed = client.post("/v1/send", json={**body, "text": "changed"}, headers=headers)
    finally:
        again.proc.send_signal(signal.SIGTERM)
        again.proc.wait(30)
    assert first.status_code == 200, first.text
    assert retry.status_code == 200 and retry.json() == first.json()
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert changed.status_code == 422 and changed.json()["code"] == "IDEMPOTENCY_CONFLICT"
    assert queue_ids(config_path) == {first.json()["id"]}


@pytest.mark.slow
def test_sigterm_under_http_load_answers_every_send_it_queued(tmp_path: Path) -> None:
    """A graceful stop mid-load: the HTTP listener closes with the SMTP ones, requests in
    hand finish, and no send that reached the journal loses its 200: the queue holds
    exactly the messages that were answered 200 (one more would be a cut-off answer).
    The stop waits for requests in hand, not for the clients' keep-alive connections: it
    takes well under the grace (10 s here), which it once took in full one time in four."""
    config_path, _, key = write_config(tmp_path)
    server = Server(tmp_path, config_path, 0)
    acked = Acks()
    port = http_port(server)
    answered = acked.timed(True)
    status = clients_then_signal(  # real load, from its first 200, then the stop
        server,
        lambda stop, i: _load(port, key, acked, stop, f"t{i}"),
        0.8,
        signal.SIGTERM,
        answered,
    )
    text = server.finished()
    assert status == 0, server.err.read_text()
    assert acked
    assert queue_ids(config_path) == set(acked)
    took = _logged_at(text, "journal closed; stopped") - _logged_at(text, "SIGTERM received")
    assert took < 5, f"the stop took {took:.1f} s of its 10 s grace:\n{text}"


def _logged_at(text: str, what: str) -> float:
    """When the relay logged the line that says ``what`` (seconds, by its own clock)."""
    found = re.search(rf"^(\S+)Z atmosrelay: [^\n]*{re.escape(what)}", text, re.M)
    assert found, f"no line says {what!r}:\n{text}"
    return datetime.fromisoformat(found.group(1)).timestamp()
