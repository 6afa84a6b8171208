"""Reports as providers send them, written by hand after the RFCs' examples (RFC 3464
appendix, RFC 5965 section B) and the shapes Postfix, Exchange, qmail, Yahoo and AOL-style
feedback loops produce. Each takes the addresses that vary per test."""

from __future__ import annotations

RETURNED_HEADERS = (
    "From: Alice <alice@example.org>\r\n"
    "To: {rcpt}\r\n"
    "Subject: the newsletter\r\n"
    "Message-ID: {message_id}\r\n"
    "X-Atmos-Member-Did: {did}\r\n"
    "Feedback-ID: none:{member}:newsletter:relay.test\r\n"
    "Return-Path: <{return_path}>\r\n"
)


def _headers(rcpt: str, did: str, return_path: str, message_id: str = "<n1@example.org>") -> str:
    member = did.split(":", 2)[2] if did.count(":") >= 2 else did
    return RETURNED_HEADERS.format(
        rcpt=rcpt, did=did, member=member, return_path=return_path, message_id=message_id
    )


def postfix_dsn(
    to: str, rcpt: str, *, status: str = "5.1.1", action: str = "failed", did: str = ""
) -> bytes:
    """Postfix's bounce: text part, message/delivery-status, text/rfc822-headers."""
    diagnostic = (
        f"smtp; 550 {status} <{rcpt}>: Recipient address rejected: User unknown"
        if action == "failed"
        else f"smtp; 451 {status} <{rcpt}>: try again later"
    )
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        '\tboundary="B1.1764172800/mx.example.net"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
        "--B1.1764172800/mx.example.net\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n"
        "\r\n"
        "--B1.1764172800/mx.example.net\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n"
        "X-Postfix-Queue-ID: 4ABCD123\r\n"
        "Arrival-Date: Wed, 26 Nov 2026 10:00:00 +0000 (UTC)\r\n"
        "\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\n"
        f"Original-Recipient: rfc822;{rcpt}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        "Remote-MTA: dns; inner.example.net\r\n"
        f"Diagnostic-Code: {diagnostic}\r\n"
        "\r\n"
        "--B1.1764172800/mx.example.net\r\n"
        "Content-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        f"{_headers(rcpt, did, to)}"
        "\r\n"
        "--B1.1764172800/mx.example.net--\r\n"
    ).encode()


def exchange_dsn(to: str, rcpt: str, *, status: str = "5.2.2") -> bytes:
    """Exchange's NDR shape: multipart/report with the whole message returned."""
    return (
        "From: postmaster@outlook.example\r\n"
        f"To: {to}\r\n"
        "Subject: Undeliverable: the newsletter\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type="delivery-status"; boundary="_000_X"\r\n'
        "\r\n"
        "--_000_X\r\n"
        'Content-Type: text/plain; charset="us-ascii"\r\n'
        "\r\n"
        "Delivery has failed to these recipients or groups.\r\n"
        "\r\n"
        "--_000_X\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns;EX01.outlook.example\r\n"
        "Received-From-MTA: dns;mx.relay.test\r\n"
        "\r\n"
        f"Final-recipient: RFC822;{rcpt.upper()}\r\n"
        "Action: failed\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-code: smtp;554 {status} mailbox full\r\n"
        "\r\n"
        "--_000_X\r\n"
        "Content-Type: message/rfc822\r\n"
        "\r\n"
        f"From: alice@example.org\r\nTo: {rcpt}\r\nSubject: the newsletter\r\n\r\nhello\r\n"
        "\r\n"
        "--_000_X--\r\n"
    ).encode()


def qmail_bounce(to: str, rcpt: str) -> bytes:
    """Not a DSN: qmail's plain text, from MAILER-DAEMON, the status in parentheses."""
    return (
        "From: MAILER-DAEMON@mx.example.net\r\n"
        f"To: {to}\r\n"
        "Subject: failure notice\r\n"
        "\r\n"
        "Hi. This is the qmail-send program at mx.example.net.\r\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\r\n"
        "\r\n"
        f"<{rcpt}>:\r\n"
        "Sorry, no mailbox here by that name. (#5.1.1)\r\n"
    ).encode()


def arf(
    to: str,
    *,
    rcpt: str = "",
    did: str = "",
    return_path: str = "",
    agent: str = "SomeGenerator/1.0",
    redact: bool = False,
    headers_only: bool = False,
    message_id: str = "<n1@example.org>",
) -> bytes:
    """RFC 5965's example report (section B.1/B.2 shape): text, message/feedback-report,
    the reported message. ``redact``: the complainant withheld, as Yahoo and others do.
    ``headers_only``: text/rfc822-headers, as some loops send."""
    shown = "redacted@example.net" if redact else rcpt
    original_rcpt = "" if redact else f"Original-Rcpt-To: {rcpt}\r\n"
    reported = _headers(shown, did, return_path, message_id)
    part = (
        "Content-Type: text/rfc822-headers\r\n\r\n" + reported
        if headers_only
        else "Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        + reported
        + "\r\nthe newsletter body\r\n"
    )
    return (
        "From: <abusedesk@example.net>\r\n"
        "Date: Thu, 26 Nov 2026 12:00:00 +0000\r\n"
        "Subject: FW: the newsletter\r\n"
        f"To: <{to}>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report;\r\n\tboundary="part1_13d.2e68ed54_boundary"\r\n'
        "\r\n"
        "--part1_13d.2e68ed54_boundary\r\n"
        'Content-Type: text/plain; charset="US-ASCII"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "This is an email abuse report for an email message received from IP\r\n"
        "192.0.2.1 on Thu, 26 Nov 2026 11:00:00 +0000.\r\n"
        "\r\n"
        "--part1_13d.2e68ed54_boundary\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        "Feedback-Type: abuse\r\n"
        f"User-Agent: {agent}\r\n"
        "Version: 1\r\n"
        "Original-Mail-From: <alice@example.org>\r\n"
        f"{original_rcpt}"
        "Arrival-Date: Thu, 26 Nov 2026 11:00:00 +0000\r\n"
        "Reporting-MTA: dns; mail.example.net\r\n"
        "Source-IP: 192.0.2.1\r\n"
        "Authentication-Results: mail.example.net; spf=pass smtp.mail=relay.test\r\n"
        "Reported-Domain: example.org\r\n"
        "\r\n"
        "--part1_13d.2e68ed54_boundary\r\n" + part + "\r\n"
        "--part1_13d.2e68ed54_boundary--\r\n"
    ).encode()
