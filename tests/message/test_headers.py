"""The headers ``process`` adds: the Date header made once a second is the one the standard
library writes for that moment. (Within a microsecond of the next second the standard library
rounds up to it; the relay says the second the moment is in.)"""

from __future__ import annotations

import email.utils

from hypothesis import given
from hypothesis import strategies as st

from atmosrelay.message.headers import process

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def added_date(now: float) -> bytes:
    processed = process(
        MESSAGE, did="did:plc:abc", operator_domain="relay.test", hostname="relay.test", now=now
    )
    (line,) = [h for h in processed.message.split(b"\r\n") if h.startswith(b"Date: ")]
    return line


@given(
    st.lists(st.tuples(st.integers(0, 4_000_000_000), st.floats(0, 0.999)), min_size=1, max_size=20)
)
def test_the_added_date_is_formatdates_for_each_moment(moments: list[tuple[int, float]]) -> None:
    for second, fraction in moments + moments:  # the second time from the cache
        now = second + fraction
        assert added_date(now) == f"Date: {email.utils.formatdate(now, usegmt=True)}".encode()


def test_a_date_already_there_is_kept_and_none_is_added() -> None:
    dated = b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n" + MESSAGE
    processed = process(
        dated, did="did:plc:abc", operator_domain="relay.test", hostname="relay.test", now=1.5
    )
    assert processed.message.count(b"\r\nDate: ") == 1
    assert b"\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n" in processed.message
