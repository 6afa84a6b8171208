"""The opt-in ``auto`` listener: one port serves clients that start TLS at once (smtplib's
SMTP_SSL, Nodemailer with an ``smtps://...:PORT`` URL, as an atproto PDS configures it) and
clients that say EHLO and STARTTLS (smtplib), all through to 250."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from tests.relay.harness import ALICE, Relay, running_relay

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
LISTENERS = '[smtp]\nlisteners = ["127.0.0.1:0 auto", "127.0.0.1:0 starttls"]\n'
MESSAGE = "From: alice@example.org\r\nSubject: auto\r\n\r\nhi\r\n"


def _starttls(relay: Relay, port: int) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=relay.client_context())
        client.login(ALICE, relay.key)
        return client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)


def _implicit(relay: Relay, port: int) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP_SSL("127.0.0.1", port, context=relay.client_context(), timeout=10) as c:
        c.login(ALICE, relay.key)
        return c.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)


def nodemailer(node: str, url: str, ca: Path) -> subprocess.CompletedProcess[str]:
    """One message from alice to bob through Nodemailer with this transport URL."""
    return subprocess.run(
        [node, str(NODE_DIR / "send.js"), url, str(ca), "alice@example.org", "bob@example.net"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_DIR,
    )


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "nodemailer").is_dir():
        if os.environ.get("CI"):  # .ci/run installs both: their absence there is a failure
            pytest.fail("node or tests/node's nodemailer is not installed")
        pytest.skip("needs node and 'npm install --prefix tests/node' (as .ci/run does)")
    return node


async def test_starttls_implicit_tls_and_nodemailer_smtps_on_one_auto_port(
    tmp_path: Path,
) -> None:
    node = _node()
    async with running_relay(tmp_path, extra=LISTENERS) as relay:
        port = relay.handle.port("auto")
        assert await trio.to_thread.run_sync(_starttls, relay, port) == {}
        assert await trio.to_thread.run_sync(_implicit, relay, port) == {}

        ca = tmp_path / "ca.pem"
        relay.ca.cert_pem.write_to_path(str(ca))
        url = f"smtps://alice.test:{relay.key}@localhost:{port}"  # the PDS's URL form
        result = await trio.to_thread.run_sync(nodemailer, node, url, ca)
        assert result.returncode == 0, result.stdout + result.stderr
        reply = json.loads(result.stdout)
        assert reply["ok"] and reply["response"].startswith("250 2.0.0 Ok: queued as "), reply
        assert len(relay.handle.ctx.queue.state.messages) == 3

        # the same smtps:// URL on a plain starttls port fails as it does elsewhere: the
        # auto mode is what makes it work
        plain = f"smtps://alice.test:{relay.key}@localhost:{relay.starttls_port}"
        failed = await trio.to_thread.run_sync(nodemailer, node, plain, ca)
        assert failed.returncode == 1 and not json.loads(failed.stdout)["ok"]
        assert relay.key[10:] not in failed.stdout + failed.stderr + result.stdout


async def test_a_plain_client_gets_the_greeting_after_the_window(tmp_path: Path) -> None:
    extra = LISTENERS + "auto_tls_window = 0.3\n"
    async with running_relay(tmp_path, extra=extra) as relay:

        def greeting() -> tuple[bytes, float]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", relay.handle.port("auto"))) as sock:
                return sock.recv(512), time.monotonic() - started

        banner, waited = await trio.to_thread.run_sync(greeting)
        assert banner.startswith(b"220 mx.test ")
        assert waited >= 0.3  # the window passes first (a lower bound: never early)
