"""Fuzz the inbound report parser (atmosrelay/inbound/reports.py): whatever a remote sends
to the inbound listener goes through ``parse``.

Invariant (fuzz/README.md): no exception, ever (a report that cannot be read is a value,
"unparseable"); every text field it hands on (to the log, the inbound log, the status
index) is bounded and has no CR, LF or other control character; a status is an enhanced
code or empty; parsing twice gives the same report. The first byte picks the input's
frame: as is, inside a delivery-status report skeleton, or inside a feedback-report one,
so the fuzzer reaches the per-recipient and ARF readers without finding MIME itself.
"""

from __future__ import annotations

import re

from atmosrelay.inbound.reports import MAX_FIELD, Report, parse
from fuzz._harness import atheris_main

_STATUS = re.compile(r"([245]\.\d{1,3}\.\d{1,3})?")
_FRAMES = (
    b"%s",
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: message/delivery-status\r\n\r\n%s\r\n--b--\r\n",
    b'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: message/feedback-report\r\n\r\n%s\r\n"
    b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\n%s\r\n--b--\r\n",
)


def _clean(text: str) -> bool:
    return len(text) <= MAX_FIELD and not any(ord(c) < 32 or ord(c) == 127 for c in text)


def _texts(report: Report) -> list[str]:
    out = [report.subject, report.from_address, report.feedback_type, report.problem]
    out += [report.original_mail_from, report.source_ip, *report.original_rcpt_to]
    out += [*report.about.keys(), *report.about.values()]
    for r in report.recipients:
        out += [r.recipient, r.original, r.action, r.diagnostic, r.remote_mta]
    return out


def check_one(data: bytes) -> None:
    if not data:
        return
    frame = _FRAMES[data[0] % len(_FRAMES)]
    body = data[1:]
    raw = frame.replace(b"%s", body) if b"%s" in frame else body
    report = parse(raw)
    assert report.shape in ("dsn", "arf", "plain", "unparseable"), report.shape
    for text in _texts(report):
        assert _clean(text), f"an unclean field: {text[:80]!r}"
    assert _STATUS.fullmatch(report.text_status)
    for r in report.recipients:
        assert _STATUS.fullmatch(r.status), r.status
    assert parse(raw) == report, "two parses disagree"


if __name__ == "__main__":  # pragma: no cover
    atheris_main(check_one)
