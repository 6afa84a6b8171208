"""DSNs (RFC 3464), parsed back with the email package; NOTIFY and no DSN loops."""

from __future__ import annotations

import email
import email.policy

import pytest

from atmosrelay.message.dsn import RecipientStatus, build_dsn, wants_dsn

ORIGINAL = (
    b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"Message-ID: <orig-1@example.org>\r\n\r\nThe body, which a DSN carries only for RET=FULL.\r\n"
)


def dsn(ret_full: bool = False, action: str = "failed") -> email.message.Message:
    raw = build_dsn(
        reporting_mta="mx.relay.test",
        operator_domain="relay.test",
        sender="alice@example.org",
        original=ORIGINAL,
        statuses=[
            RecipientStatus(
                "bob@example.net",
                action,
                "5.1.1",
                "550 5.1.1 <bob@example.net>: no such user",
                "mx.example.net",
                1_800_000_000.0,
                ("rfc822", "Bob@example.net"),
            ),
            RecipientStatus("carol@example.net", action, "4.4.7", None, None, 1_800_000_000.0),
        ],
        envid="QQ314159",
        arrival=1_799_990_000.0,
        ret_full=ret_full,
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_structure_and_fields() -> None:
    msg = dsn()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "no such user" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    per_message, bob, carol = blocks
    assert per_message["Reporting-MTA"] == "dns; mx.relay.test"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Original-Recipient"] == "rfc822; Bob@example.net"
    assert (bob["Action"], bob["Status"]) == ("failed", "5.1.1")
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"  # verbatim
    assert carol["Diagnostic-Code"] is None
    assert headers.get_content_type() == "text/rfc822-headers"
    text = headers.get_payload(decode=True)
    assert b"Message-ID: <orig-1@example.org>" in text
    assert b"The body" not in text


def test_ret_full_carries_the_whole_message_and_delay_dsns() -> None:
    full = dsn(ret_full=True).get_payload()[2]
    assert full.get_content_type() == "message/rfc822"
    assert b"The body" in full.as_bytes()
    delayed = dsn(action="delayed")
    assert delayed["Subject"] == "Delayed Mail (still being retried)"
    assert delayed.get_payload()[1].get_payload()[1]["Action"] == "delayed"


@pytest.mark.parametrize(
    ("sender", "notify", "action", "wanted"),
    [
        ("", None, "failed", False),  # a bounce never gets a bounce
        ("alice@example.org", None, "failed", True),
        ("alice@example.org", ("NEVER",), "failed", False),
        ("alice@example.org", ("SUCCESS",), "failed", False),
        ("alice@example.org", ("FAILURE",), "failed", True),
        ("alice@example.org", ("FAILURE",), "delayed", False),
        ("alice@example.org", ("DELAY", "FAILURE"), "delayed", True),
    ],
)
def test_notify_and_no_dsn_loops(
    sender: str, notify: tuple[str, ...] | None, action: str, wanted: bool
) -> None:
    assert wants_dsn(sender, notify, action) is wanted


def test_a_recorded_reply_goes_into_the_dsn_verbatim_without_control_characters() -> None:
    """The delivery client records a remote's reply escaped (a backslash sequence for an
    escape byte); the DSN keeps that text as it is, and turns a raw CR or LF into a space."""
    status = RecipientStatus(
        "bob@example.net", "failed", "5.1.1", "550 5.1.1 odd \\x1b[31m reply\r\nX-Injected: 1",
        "mx.example.net", 0.0,
    )  # fmt: skip
    dsn = build_dsn(
        reporting_mta="mx.test",
        operator_domain="relay.test",
        sender="alice@example.org",
        original=b"Subject: x\r\n\r\nhi\r\n",
        statuses=[status],
        envid=None,
        arrival=0.0,
        ret_full=False,
    )
    assert b"Diagnostic-Code: smtp; 550 5.1.1 odd \\x1b[31m reply  X-Injected: 1\r\n" in dsn
    assert b"\r\nX-Injected" not in dsn
