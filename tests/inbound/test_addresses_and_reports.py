"""The tokens of the inbound addresses, and what the report parser makes of real shapes."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmosrelay.inbound.addresses import (
    ReturnPath,
    Srs,
    _b32,
    derive_key,
    parse_unsubscribe_subject,
)
from atmosrelay.inbound.reports import parse
from atmosrelay.message.dsn import RecipientStatus, build_dsn
from atmosrelay.message.headers import unsubscribe_headers, unsubscribe_token
from atmosrelay.queue.records import new_queue_id
from fuzz.fuzz_reports import check_one
from tests.inbound import samples

KEY = derive_key(b"k" * 32, "verp")
RP = ReturnPath(KEY, "relay.test")
SRS = Srs(derive_key(b"k" * 32, "srs"), "relay.test")
DAY = 86400.0


@given(index=st.integers(0, 999), now=st.floats(0, 2**40 / 1000))
@settings(max_examples=200)
def test_verp_round_trips_within_the_local_part_limit(index: int, now: float) -> None:
    queue_id = new_queue_id(now)
    address = RP.address(queue_id, index)
    local, _, domain = address.rpartition("@")
    assert domain == "relay.test"
    assert len(local) <= 64  # RFC 5321 4.5.3.1.1
    assert RP.verify(local) == (queue_id, index)
    assert RP.verify(local.lower()) == (queue_id, index)  # an MTA that folds the case
    assert RP.verify(local.upper()) == (queue_id, index)


@given(data=st.binary(min_size=10, max_size=10) | st.binary(max_size=32))
@settings(max_examples=300)
def test_the_mac_digits_are_rfc4648_base32(data: bytes) -> None:
    assert _b32(data) == base64.b32encode(data).decode("ascii").lower().rstrip("=")


def test_a_verp_address_made_before_the_table_still_is_the_same() -> None:
    """Bounces come back days after the message left: an address made before an upgrade
    must verify after it. Pinned from the code that encoded with ``base64.b32encode``."""
    address = "bounces+01KB2ZQ7Y8ABCDEFGHJKMNPQRS-3-wvlb2oljseaasj24@relay.test"
    assert RP.address("01KB2ZQ7Y8ABCDEFGHJKMNPQRS", 3) == address
    assert RP.verify(address.partition("@")[0]) == ("01KB2ZQ7Y8ABCDEFGHJKMNPQRS", 3)


def test_a_forged_or_altered_verp_token_is_refused() -> None:
    queue_id = new_queue_id()
    local = RP.address(queue_id, 1).rpartition("@")[0]
    other = new_queue_id()
    assert RP.verify(local.replace(queue_id, other)) is None  # another message
    assert RP.verify(local.replace(f"{queue_id}-1-", f"{queue_id}-2-")) is None  # recipient
    flipped = local[:-1] + ("a" if local[-1] != "a" else "b")
    assert RP.verify(flipped) is None  # the MAC
    assert ReturnPath(derive_key(b"x" * 32, "verp"), "relay.test").verify(local) is None
    assert RP.verify("bounces+nothing") is None
    assert RP.verify("postmaster") is None


def test_srs_reverses_its_own_addresses_only_while_fresh() -> None:
    now = 1_790_000_000.0
    address = SRS.forward("Stranger@remote.test", now)
    local, _, domain = address.rpartition("@")
    assert domain == "relay.test" and local.startswith("SRS0=")
    assert SRS.reverse(local, now) == "Stranger@remote.test"
    assert SRS.reverse(local.lower(), now) == "stranger@remote.test"  # case folded on the way
    assert SRS.reverse(local, now + 21 * DAY) == "Stranger@remote.test"
    assert SRS.reverse(local, now + 22 * DAY) is None  # expired
    forged = local.replace("remote.test", "victim.test")
    assert SRS.reverse(forged, now) is None
    assert Srs(derive_key(b"x" * 32, "srs"), "relay.test").reverse(local, now) is None


def test_the_unsubscribe_mailto_carries_what_verifies_it() -> None:
    did, rcpt = "did:plc:alice", "bob@example.net"
    header = unsubscribe_headers(
        secret=b"s" * 32, did=did, recipient=rcpt, base_url="https://r", mailto_domain="relay.test"
    )
    msg = email.message_from_bytes(header + b"\r\n", policy=email.policy.default)
    mailto = str(msg["List-Unsubscribe"]).split(", ")[1].strip("<>")
    assert mailto.startswith("mailto:unsubscribe@relay.test?subject=")
    from urllib.parse import unquote

    subject = unquote(mailto.partition("subject=")[2])
    assert parse_unsubscribe_subject(subject) == (
        did,
        rcpt,
        unsubscribe_token(b"s" * 32, did, rcpt),
    )
    assert parse_unsubscribe_subject("Re: " + subject) is not None
    assert parse_unsubscribe_subject("unsubscribe") is None
    assert parse_unsubscribe_subject("hello there") is None


def test_a_postfix_dsn_is_read_per_recipient() -> None:
    report = parse(samples.postfix_dsn("bounces+x@relay.test", "bob@example.net", did="did:plc:a"))
    assert report.shape == "dsn"
    (r,) = report.recipients
    assert (r.recipient, r.action, r.status) == ("bob@example.net", "failed", "5.1.1")
    assert r.remote_mta == "inner.example.net"
    assert "User unknown" in r.diagnostic
    assert report.about["x-atmos-member-did"] == "did:plc:a"


def test_a_delay_dsn_and_an_exchange_ndr() -> None:
    delayed = parse(
        samples.postfix_dsn("b@relay.test", "bob@example.net", status="4.4.7", action="delayed")
    )
    assert delayed.recipients[0].action == "delayed"
    assert delayed.recipients[0].status == "4.4.7"
    ndr = parse(samples.exchange_dsn("b@relay.test", "bob@example.net"))
    assert ndr.shape == "dsn"
    assert ndr.recipients[0].recipient == "bob@example.net"  # case folded
    assert ndr.recipients[0].status == "5.2.2"
    assert ndr.about["to"] == "bob@example.net"


def test_a_plain_bounce_gives_its_status_from_the_text() -> None:
    report = parse(samples.qmail_bounce("b@relay.test", "bob@example.net"))
    assert report.shape == "plain"
    assert report.text_status == "5.1.1"
    assert report.from_address == "mailer-daemon@mx.example.net"


@pytest.mark.parametrize("headers_only", [False, True])
def test_an_arf_report_is_read(headers_only: bool) -> None:
    report = parse(
        samples.arf(
            "fbl@relay.test",
            rcpt="bob@example.net",
            did="did:plc:a",
            return_path="bounces+x@relay.test",
            headers_only=headers_only,
        )
    )
    assert report.shape == "arf"
    assert report.feedback_type == "abuse"
    assert report.original_rcpt_to == ("bob@example.net",)
    assert report.source_ip == "192.0.2.1"
    assert report.about["x-atmos-member-did"] == "did:plc:a"
    assert report.about["feedback-id"] == "none:a:newsletter:relay.test"
    redacted = parse(samples.arf("fbl@relay.test", rcpt="bob@example.net", redact=True))
    assert redacted.original_rcpt_to == ()


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_fuzz_twin_no_input_makes_the_parser_raise_or_leak_control_bytes(raw: bytes) -> None:
    check_one(raw)  # fuzz/fuzz_reports.py's invariant


def test_our_own_dsn_reads_back() -> None:
    dsn = build_dsn(
        reporting_mta="mx.relay.test",
        operator_domain="relay.test",
        sender="alice@example.org",
        original=b"Subject: hi\r\n\r\nhello\r\n",
        statuses=[
            RecipientStatus(
                recipient="bob@example.net",
                action="failed",
                status="5.1.1",
                diagnostic="550 5.1.1 no such user",
                remote_mta="mx.example.net",
                last_attempt=0.0,
            )
        ],
        envid=None,
        arrival=0.0,
        ret_full=False,
    )
    report = parse(dsn)
    assert report.shape == "dsn"
    (r,) = report.recipients
    assert (r.recipient, r.action, r.status) == ("bob@example.net", "failed", "5.1.1")


@given(st.text(max_size=300))
@settings(max_examples=200)
def test_a_report_skeleton_with_any_body_never_raises(body: str) -> None:
    raw = (
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        f"--b\r\nContent-Type: message/delivery-status\r\n\r\n{body}\r\n--b--\r\n"
    ).encode("utf-8", "surrogateescape")
    assert parse(raw).shape in ("dsn", "unparseable")
