"""The text helpers every log line, record and error message goes through."""

from __future__ import annotations

import logging

import pytest

from atmosrelay._text import RedactKeys, printable, redact_keys

KEY = "atmos_AbCd1234" + "s3cr3t-_" * 4 + "xyz"


def test_printable_escapes_and_bounds() -> None:
    assert printable(b"a\x1b[31m\r\n\xff") == "a\\x1b[31m\\r\\n\ufffd"  # controls escaped
    assert printable("x" * 10, 4) == "xxxx...(+6 chars)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"no API key {KEY}; see key list", "no API key atmos_AbCd1234…; see key list"),
        (f"'{KEY}x' is not a DID", "'atmos_AbCd1234…' is not a DID"),
        ("atmos_ab", "atmos_ab…"),  # a truncated key: its id part is all there is
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redact_keys_keeps_the_id_only(text: str, expected: str) -> None:
    assert redact_keys(text) == expected


def test_the_log_filter_redacts_the_formatted_message() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "user %s key %s", ("u", KEY), None)
    assert RedactKeys().filter(record)
    assert record.getMessage() == "user u key atmos_AbCd1234…"
    assert "s3cr3t" not in logging.Formatter("%(message)s").format(record)


def test_the_log_filter_hands_on_finished_text() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s queued %d", ("s1", 3), None)
    assert RedactKeys().filter(record)
    assert (record.msg, record.args) == ("s1 queued 3", None)
    assert logging.Formatter("%(message)s").format(record) == "s1 queued 3"
