"""Our OpenSSL DKIM signer, verified by dkimpy (an independent implementation) against the
records `domain verify` prints."""

from __future__ import annotations

from collections.abc import Callable

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st

from atmosrelay.accounts import dkim_keys
from atmosrelay.message.dkim import (
    Signer,
    SigningKey,
    canonical_body,
    canonical_header,
    parse_private,
)

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


# bodies made of what canonicalisation cares about: runs of spaces and tabs, line ends (bare
# ones too: the submission path refuses them, but the function must not depend on that)
PIECES = st.sampled_from([b"a", b"b c", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r", b"\n", b"."])


@given(st.lists(PIECES, max_size=60).map(b"".join))
def test_relaxed_body_agrees_with_dkimpy(body: bytes) -> None:
    # as a verifier sees the body: SMTP ends it with a CRLF (a body without one is only the
    # HTTP API's, whose last line the relay treats as a line, trailing spaces and all)
    seen = body if body.endswith(b"\r\n") else body + b"\r\n"
    assert canonical_body(body) == Relaxed.canonicalize_body(seen)


def test_a_long_run_of_whitespace_is_one_space() -> None:
    body = b"x" + b" \t" * 50_000 + b"y\r\n" + b" " * 100_001 + b"\r\n"
    assert canonical_body(body) == b"x y\r\n"
    assert canonical_body(body) == Relaxed.canonicalize_body(body)


def test_a_key_is_parsed_once_a_process_and_another_key_for_itself(
    keys: tuple[dkim_keys.KeyPair, ...],
) -> None:
    """Each member domain's signer holds the operator's key too: the second signer uses the
    parsed key the first made. One text is one parsed key, whatever selector it is under;
    another text is parsed for itself."""
    rsa_key, ed_key, operator = keys
    operator_key = SigningKey("relay.test", "atmos20261101r", "rsa", operator.private)
    first = Signer([operator_key])
    second = Signer(
        [
            SigningKey("example.org", "atmos20261121r", "rsa", rsa_key.private),
            SigningKey("example.org", "atmos20261121e", "ed25519", ed_key.private),
            operator_key,
        ]
    )
    reused = Signer([SigningKey("relay.test", "atmos20261201r", "rsa", rsa_key.private)])
    assert second._keys[2][1] is first._keys[0][1]
    assert second._keys[0][1] is reused._keys[0][1]
    assert second._keys[0][1] is not first._keys[0][1]
    assert Signer([second._keys[1][0]])._keys[0][1] is second._keys[1][1]
    # the relay derives the operator's public key at start: that parse is the signers' too
    assert dkim_keys.public_from_private("rsa", operator.private) == operator.public_b64
    assert parse_private("rsa", operator.private) is first._keys[0][1]
    assert dkim_keys.public_from_private("ed25519", ed_key.private) == ed_key.public_b64


def test_many_blank_lines_at_the_end_are_cut_in_one_copy() -> None:
    # a member's body may end in megabytes of blank lines: cut once (cutting two octets at
    # a time copied the body again for each line), also with a bare LF among them
    assert canonical_body(b"x\r\n" + b"\r\n" * 1_000_000) == b"x\r\n"
    body = b"x\r\n\n" + b"\r\n" * 1_000
    assert canonical_body(body) == b"x\r\n\n\r\n" == Relaxed.canonicalize_body(body)


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


def _zone_for(keys: tuple[dkim_keys.KeyPair, ...]) -> tuple[Signer, Callable[..., bytes | None]]:
    rsa_key, ed_key, operator = keys
    signer = Signer(
        [
            SigningKey("example.org", "s1r", "rsa", rsa_key.private),
            SigningKey("example.org", "s1e", "ed25519", ed_key.private),
            SigningKey("relay.test", "s2r", "rsa", operator.private),
        ]
    )
    zone = {
        b"s1r._domainkey.example.org.": dkim_keys.dkim_record_value("rsa", rsa_key.public_b64),
        b"s1e._domainkey.example.org.": dkim_keys.dkim_record_value("ed25519", ed_key.public_b64),
        b"s2r._domainkey.relay.test.": dkim_keys.dkim_record_value("rsa", operator.public_b64),
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        value = zone.get(name)
        return value.encode() if value else None

    return signer, dnsfunc


def _verifies(message: bytes, idx: int, dnsfunc: Callable[..., bytes | None]) -> bool:
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc))
    except dkim.ValidationError:
        return False


ADDED_IN_TRANSIT = [
    pytest.param(b"Reply-To: thief@evil.example\r\n", id="reply-to-added"),
    pytest.param(b"From: security@paypal.example\r\n", id="second-from-on-top"),
    pytest.param(b"Cc: someone@evil.example\r\n", id="cc-added"),
    pytest.param(b"Subject: Urgent: verify your account\r\n", id="second-subject-on-top"),
    pytest.param(b"Content-Type: text/html\r\n", id="content-type-on-top"),
]


@pytest.mark.parametrize("added", ADDED_IN_TRANSIT)
def test_a_header_added_after_signing_breaks_every_signature(
    keys: tuple[dkim_keys.KeyPair, ...], added: bytes
) -> None:
    signer, dnsfunc = _zone_for(keys)
    signatures = signer.sign(MESSAGE)
    signed = signatures + MESSAGE
    for idx in range(3):
        assert _verifies(signed, idx, dnsfunc), idx
    # The signature names each header once more than it occurs (e.g. from:from).
    h = signed.split(b"h=", 1)[1].split(b";", 1)[0].replace(b"\r\n\t", b"").split(b":")
    assert h.count(b"from") == 2
    assert h.count(b"reply-to") == 1  # absent: signed as empty, so it cannot be added
    # Added below the signatures, on top of the member's headers: what a forwarder or an
    # attacker in the path would do.
    tampered = signatures + added + MESSAGE
    for idx in range(3):
        assert not _verifies(tampered, idx, dnsfunc), idx


def test_without_over_signing_the_added_header_would_pass(
    keys: tuple[dkim_keys.KeyPair, ...],
) -> None:
    """The check above can fail: a signature over each present header once and no more
    (what this signer did before; here dkimpy's own signer) still verifies with a Reply-To
    added in transit."""
    _, dnsfunc = _zone_for(keys)
    present = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version"]
    signature = dkim.sign(
        MESSAGE,
        b"s1r",
        b"example.org",
        keys[0].private.encode(),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=present,
    )
    assert _verifies(signature + MESSAGE, 0, dnsfunc)
    assert _verifies(signature + b"Reply-To: thief@evil.example\r\n" + MESSAGE, 0, dnsfunc)
