"""Our OpenSSL DKIM signer, verified by dkimpy (an independent implementation) against the
records `domain verify` prints."""

from __future__ import annotations

import dkim
import pytest

from atmosrelay.accounts import dkim_keys
from atmosrelay.message.dkim import Signer, SigningKey, canonical_body, canonical_header

MESSAGE = (
    b"X-Atmos-Member-Did: did:plc:abcdefghijklmnopqrstuvwx\r\n"
    b"Feedback-ID: none:abcdefghijklmnopqrstuvwx:bulk:relay.test\r\n"
    b"From: Alice  <alice@example.org>\r\nTo: bob@example.net\r\n"
    b"Subject: a   folded\r\n\tsubject  \r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
    b"List-Unsubscribe: <https://relay.test/u?t=1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\n"
    b"Hello  Bob,  \r\n\r\n  trailing spaces and blank lines follow   \r\n\r\n\r\n"
)


@pytest.fixture(scope="module")
def keys() -> tuple[dkim_keys.KeyPair, dkim_keys.KeyPair, dkim_keys.KeyPair]:
    return dkim_keys.generate_rsa(), dkim_keys.generate_ed25519(), dkim_keys.generate_rsa()


def test_relaxed_canonicalisation_examples_from_rfc_6376() -> None:
    # RFC 6376 3.4.5's example.
    assert canonical_header(b"A: X\r\n") == b"a:X\r\n"
    assert canonical_header(b"B : Y\t\r\n\tZ  \r\n") == b"b:Y Z\r\n"
    assert canonical_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"
    assert canonical_body(b"") == b""
    assert canonical_body(b"\r\n\r\n") == b""
    assert canonical_body(b"no newline") == b"no newline\r\n"


def test_three_signatures_verify_with_dkimpy(keys: tuple[dkim_keys.KeyPair, ...]) -> None:
    rsa_key, ed_key, operator = keys
    signer = Signer(
        [
            SigningKey("example.org", "atmos20261121r", "rsa", rsa_key.private),
            SigningKey("example.org", "atmos20261121e", "ed25519", ed_key.private),
            SigningKey("relay.test", "atmos20261101r", "rsa", operator.private),
        ]
    )
    signed = signer.sign(MESSAGE) + MESSAGE
    zone = {
        b"atmos20261121r._domainkey.example.org.": dkim_keys.dkim_record_value(
            "rsa", rsa_key.public_b64
        ),
        b"atmos20261121e._domainkey.example.org.": dkim_keys.dkim_record_value(
            "ed25519", ed_key.public_b64
        ),
        b"atmos20261101r._domainkey.relay.test.": dkim_keys.dkim_record_value(
            "rsa", operator.public_b64
        ),
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        value = zone.get(name)
        return value.encode() if value else None

    verifier = dkim.DKIM(signed)
    assert signed.count(b"DKIM-Signature:") == 3
    for idx in range(3):
        assert verifier.verify(idx=idx, dnsfunc=dnsfunc), idx
    h = signed.split(b"h=", 1)[1].split(b";", 1)[0]
    for name in (
        b"from",
        b"to",
        b"subject",
        b"date",
        b"message-id",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"feedback-id",
        b"mime-version",
        b"content-type",
    ):
        assert name in h.split(b":"), name
    # A changed body or a changed signed header no longer verifies.
    for tampered in (
        signed.replace(b"Hello", b"Hullo"),
        signed.replace(b"Subject: a", b"Subject: b"),
    ):
        try:
            ok = dkim.DKIM(tampered).verify(idx=2, dnsfunc=dnsfunc)
        except dkim.ValidationError:
            ok = False
        assert not ok
