"""The delivery client's STARTTLS over a real loopback socket to an independent server
(aiosmtpd, tests/sink.py), through the relay's own TLS stream (atmosrelay/stream_io.py): a
certificate from a CA the client trusts carries the message encrypted; one from a CA it does
not know is refused at the handshake, and the destination is deferred with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trustme

from atmosrelay.delivery.client_session import ConnectFailed, Envelope, open_remote
from atmosrelay.delivery.courier import client_context
from atmosrelay.delivery.resolver import Destination
from tests.sink import aiosmtpd_sink

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: over tls\r\n\r\nhi\r\n"
ENVELOPE = Envelope("alice@example.org", ("bob@example.net",))


def destination(port: int) -> Destination:
    return Destination((("mx.example.net", port),), addresses={"mx.example.net": ("127.0.0.1",)})


async def test_verified_starttls_to_aiosmtpd_and_a_stranger_refused(tmp_path: Path) -> None:
    ours, stranger = trustme.CA(), trustme.CA()
    ours.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    verifying = client_context(True, str(tmp_path / "ca.pem"))

    with aiosmtpd_sink(ours) as sink:
        with trio.fail_after(20):
            remote = await open_remote(
                destination(sink.port), helo="relay.test", tls=verifying, require_tls=True
            )
            assert remote.tls
            (outcome,) = await remote.send(ENVELOPE, MESSAGE)
            await remote.aclose()
        assert (outcome.outcome, outcome.recipient) == ("sent", "bob@example.net")
        (got,) = sink.snapshot()
        assert got.tls and got.content.replace(b"\r\n", b"\n").endswith(b"\n\nhi\n")

    with aiosmtpd_sink(stranger) as sink:
        with trio.fail_after(20), pytest.raises(ConnectFailed) as failed:
            await open_remote(
                destination(sink.port), helo="relay.test", tls=verifying, require_tls=True
            )
        assert failed.value.status == "4.7.5"  # deferred, tried again later, saying why
        reason = "TLS handshake with mx.example.net failed: CERTIFICATE_VERIFY_FAILED"
        assert failed.value.reply == reason
        assert sink.snapshot() == []
