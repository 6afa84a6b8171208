"""The text helpers every log line, record and error message goes through."""

from __future__ import annotations

import pytest

from atmosrelay._text import printable, redact_keys

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
