"""Hypothesis twins of the journal fuzz harnesses (fuzz/): same check, run in the suite."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuzz.fuzz_journal_recover import GOOD, check_one


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000))
@example(b"")
@example(b"\xff")  # keep the whole segment, append nothing
@example(b"\xff" + b"\x00" * 64)  # a zero-filled tail
def test_recovery_of_arbitrary_tail_is_a_prefix_or_corruption(data: bytes) -> None:
    check_one(data)


def test_harness_sees_the_good_journal() -> None:
    assert len(GOOD) == 24
