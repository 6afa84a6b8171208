"""SIGHUP on the real process: a new certificate is served to new connections while an open
session goes on, the PID stays, a broken certificate is refused and the old one kept; settings
that need a restart are named. And a second SIGTERM cuts the drain short."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path

import trustme

from tests.relay.harness import ALICE
from tests.relay.test_kill import Server, write_config

MESSAGE = b"From: alice@example.org\r\nSubject: reload\r\n\r\nhi\r\n"


def presented(port: int, ctx: ssl.SSLContext) -> bytes:
    """The certificate a new implicit-TLS connection is shown (DER)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert: trustme.LeafCert) -> bytes:
    return first_certificate(cert.cert_chain_pems[0].bytes().decode())


def first_certificate(pem: str) -> bytes:
    found = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", pem, re.S)
    assert found, pem
    return ssl.PEM_cert_to_DER_cert(found.group(0))


def test_sighup_reloads_the_certificate_and_keeps_sessions_and_pid(tmp_path: Path) -> None:
    config, ctx, key = write_config(tmp_path)
    pem = tmp_path / "tls.pem"
    old_der = first_certificate(pem.read_text())
    server = Server(tmp_path, config, 0)
    try:
        pid = server.proc.pid
        assert presented(server.port, ctx) == old_der
        with smtplib.SMTP_SSL("127.0.0.1", server.port, context=ctx, timeout=10) as open_session:
            open_session.login(ALICE, key)
            assert open_session.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}

            # certbot's renewal: a new pair under the same name; and two setting changes
            ca = trustme.CA()
            renewed = ca.issue_cert("localhost", "127.0.0.1")
            renewed.private_key_and_cert_chain_pem.write_to_path(str(pem))
            config.write_text(
                config.read_text().replace('log_level = "warning"', 'log_level = "info"')
                + "[policy]\nhourly = 7\n"
            )
            config.write_text(
                config.read_text().replace("shutdown_grace = 10.0", "shutdown_grace = 9.0")
            )
            mark = len(server.lines)
            server.proc.send_signal(signal.SIGHUP)
            line = server.wait_for("reloaded", mark)
            assert "needs restart to apply: smtp.shutdown_grace" in line, line
            assert "policy" not in line.split("needs restart")[1]  # applied, not postponed
            new_ctx = ssl.create_default_context()
            ca.configure_trust(new_ctx)
            assert presented(server.port, new_ctx) == der_of(renewed)

            # the session opened before the reload goes on, on its old certificate
            assert open_session.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
            der = open_session.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            assert der == old_der

            # a broken file: refused, the renewed certificate stays in use
            pem.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
            mark = len(server.lines)
            server.proc.send_signal(signal.SIGHUP)
            line = server.wait_for("reload refused", mark)
            assert "the running one is kept" in line and str(pem) in line, line
            assert presented(server.port, new_ctx) == der_of(renewed)
            assert open_session.noop()[0] == 250
        assert server.proc.poll() is None and server.proc.pid == pid
        assert (tmp_path / "var" / "relay.lock").read_text().strip() == str(pid)
        # the new log level is in force: info lines (the sessions above) now reach stderr
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert " INFO atmosrelay.smtp: " in server.err.read_text()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_a_second_sigterm_ends_the_drain_at_once(tmp_path: Path) -> None:
    config, ctx, key = write_config(tmp_path)
    config.write_text(config.read_text().replace("shutdown_grace = 10.0", "shutdown_grace = 600.0"))
    server = Server(tmp_path, config, 0)
    try:
        with smtplib.SMTP_SSL("127.0.0.1", server.port, context=ctx, timeout=30) as client:
            client.login(ALICE, key)
            client.mail("alice@example.org")
            client.rcpt("bob@example.net")
            client.putcmd("data")
            assert client.getreply()[0] == 354  # inside DATA: the drain waits for it
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for("session(s) get 600 s to finish")
            assert server.proc.poll() is None  # waiting for the message in DATA
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(30) == 0
            assert time.monotonic() - started < 30  # not the 600 s grace
        assert "received again; ending the drain now" in server.finished()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
