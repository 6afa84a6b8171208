"""The certificate the relay generates when none is configured: a verifying client that
trusts the file (as the README says) connects by 127.0.0.1, localhost or the hostname."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from cryptography import x509

from atmosrelay.config import Config, parse_config
from atmosrelay.runtime import RelayHandle, run_relay
from atmosrelay.server.tls import generate_self_signed
from tests.relay.harness import running_relay


def config_text(tmp: Path) -> str:
    return (
        f'[relay]\ndata_dir = "{tmp / "var"}"\n[operator]\ndomain = "relay.test"\n'
        "[auth]\nbcrypt_cost = 4\n[delivery]\nenabled = false\n[http]\nlisteners = []\n"
        '[smtp]\nhostname = "mx.relay.test"\n'
        'listeners = ["127.0.0.1:0 starttls", "127.0.0.1:0 implicit"]\n'
    )


@asynccontextmanager
async def started(config: Config) -> AsyncIterator[RelayHandle]:
    """The relay on ``config`` again (its member enrolled by the first start)."""
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            lambda task_status: run_relay(
                config, announce=lambda _: None, handle_signals=False, task_status=task_status
            )
        )
        try:
            yield handle
        finally:
            handle.stop()


def ehlo_verified(host: str, implicit_port: int, starttls_port: int, cafile: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(cafile))  # verifies chain and name
    with smtplib.SMTP_SSL(host, implicit_port, context=ctx, timeout=10) as smtp:
        assert smtp.ehlo()[0] == 250
    with smtplib.SMTP(host, starttls_port, timeout=10) as smtp:
        smtp.starttls(context=ctx)
        assert smtp.ehlo()[0] == 250


async def test_a_verifying_client_accepts_the_generated_certificate(tmp_path: Path) -> None:
    config = parse_config(config_text(tmp_path), source="test")
    async with running_relay(tmp_path, config=config) as relay:
        cafile = tmp_path / "var" / "tls" / "cert.pem"
        for host in ("127.0.0.1", "localhost"):
            await trio.to_thread.run_sync(
                ehlo_verified, host, relay.implicit_port, relay.starttls_port, cafile
            )
    cert = x509.load_pem_x509_certificate(cafile.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"mx.relay.test", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}

    # an older build's certificate (localhost only) is generated again on the next start,
    # and one that already names everything is kept
    old = tmp_path / "old"
    generate_self_signed(old, "localhost")
    (tmp_path / "var" / "tls" / "cert.pem").write_bytes((old / "cert.pem").read_bytes())
    (tmp_path / "var" / "tls" / "key.pem").write_bytes((old / "key.pem").read_bytes())
    async with started(config) as handle:
        await trio.to_thread.run_sync(
            ehlo_verified, "127.0.0.1", handle.port("implicit"), handle.port("starttls"), cafile
        )
    kept = cafile.read_bytes()
    async with started(config):
        pass
    assert cafile.read_bytes() == kept
