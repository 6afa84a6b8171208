"""Counters: sliding windows over buckets, against a brute-force count of the same events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from atmosrelay.policy.counters import Counters

HOUR = 3600.0


def test_a_window_counts_every_bucket_it_touches() -> None:
    c = Counters(bucket=60.0)
    c.add("k", 0.0, 3)  # bucket [0, 60)
    c.add("k", 59.0, 1)  # same bucket
    c.add("k", 61.0, 2)  # bucket [60, 120)
    assert c.total("k", 61.0, HOUR) == 6
    assert c.total("k", HOUR + 59.0, HOUR) == 6  # [0, 60) still touches (59, 3659]
    assert c.total("k", HOUR + 60.0, HOUR) == 2  # the first bucket has left
    assert c.total("k", HOUR + 120.0, HOUR) == 0
    assert c.total("other", 0.0, HOUR) == 0


def test_frees_at_names_when_the_oldest_counts_leave() -> None:
    c = Counters(bucket=60.0)
    c.add("k", 0.0, 3)
    c.add("k", 600.0, 2)
    assert c.frees_at("k", 700.0, HOUR, limit=5, n=0) == 700.0  # fits already
    assert c.frees_at("k", 700.0, HOUR, limit=5, n=1) == 60.0 + HOUR  # the first bucket
    assert c.frees_at("k", 700.0, HOUR, limit=5, n=4) == 660.0 + HOUR  # both buckets
    assert c.frees_at("k", 700.0, HOUR, limit=5, n=6) is None  # never: over the limit alone


def test_a_clock_that_steps_back_does_not_grow_the_window_back() -> None:
    c = Counters(bucket=60.0)
    c.add("k", 0.0, 1)
    assert c.total("k", 2 * HOUR, HOUR) == 0
    assert c.total("k", 10.0, HOUR) == 0  # treated as 2 h: the count stays gone


def test_loaded_counts_are_not_flushed_again_and_refunds_are() -> None:
    c = Counters(bucket=60.0)
    c.load("k", 120.0, 5)
    c.add("k", 130.0, 2)
    c.add("k", 131.0, -1)
    assert c.total("k", 131.0, HOUR) == 6
    assert c.take_unflushed() == {("k", 120.0): 1}
    assert c.take_unflushed() == {}


def test_history_loaded_out_of_order_is_counted() -> None:
    c = Counters(bucket=60.0)
    c.add("k", 1000.0, 1)
    assert c.total("k", 1000.0, HOUR) == 1
    c.load("k", 500.0, 4)  # older than what is there
    assert c.total("k", 1000.0, HOUR) == 5
    assert c.between("k", 0.0, 1000.0) == 4


def test_old_buckets_are_pruned_and_windows_stay_right() -> None:
    c = Counters(bucket=60.0, keep=2 * HOUR)
    for minute in range(600):  # 10 hours, one a minute
        c.add("k", minute * 60.0, 1)
        assert c.total("k", minute * 60.0, HOUR) == min(minute + 1, 61)
    series = c._series["k"]
    assert len(series.starts) < 300  # pruned, not 600


events = st.lists(
    st.tuples(st.floats(min_value=0, max_value=4 * HOUR), st.integers(1, 5)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events=events, probes=st.lists(st.floats(0, 5 * HOUR), max_size=10))
def test_total_matches_a_brute_force_count_of_touched_buckets(
    events: list[tuple[float, int]], probes: list[float]
) -> None:
    bucket = 60.0
    c = Counters(bucket=bucket)
    for t, n in sorted(events):
        c.add("k", t, n)
    for now in sorted(probes):
        expected = sum(
            n for t, n in events if (t // bucket) * bucket + bucket > now - HOUR and t <= now
        ) + sum(n for t, n in events if t > now)  # the future is counted too (added already)
        assert c.total("k", now, HOUR) == expected


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.floats(0, 4 * HOUR), st.integers(-2, 5)),
        max_size=80,
    ),
    probes=st.lists(st.floats(0, 5 * HOUR), max_size=10),
)
def test_adding_many_at_once_counts_as_adding_each(
    events: list[tuple[str, float, int]], probes: list[float]
) -> None:
    """The start's recount sums per bucket first (``add_many``); in any order, the totals and
    what is left to flush are those of ``add`` called for each."""
    one_by_one, at_once = Counters(), Counters()
    for key, t, n in events:
        one_by_one.add(key, t, n)
    at_once.add_many(events)
    for now in sorted(probes):
        for key in ("a", "b"):
            assert at_once.total(key, now, HOUR) == one_by_one.total(key, now, HOUR)
    flushed = {k: v for k, v in one_by_one.take_unflushed().items() if v}
    assert {k: v for k, v in at_once.take_unflushed().items() if v} == flushed
