"""The retry schedule at exact times."""

from __future__ import annotations

import random

from atmosrelay.delivery.backoff import DAY, HOUR, MINUTE, RetryPolicy

NO_JITTER = RetryPolicy(jitter=0.0)


def test_doubling_from_one_minute_to_the_one_hour_cap() -> None:
    rng = random.Random(1)
    delays = [NO_JITTER.delay(n, rng) for n in range(1, 10)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


def test_jitter_stays_within_its_share_and_is_seeded() -> None:
    policy = RetryPolicy(jitter=0.2)
    a = [policy.delay(3, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]  # same seed, same schedule
    for seed in range(200):
        d = policy.delay(3, random.Random(seed))
        assert 240 * 0.8 <= d <= 240 * 1.2


def test_bounce_after_max_age() -> None:
    rng = random.Random(0)
    accepted = 1_000_000.0
    assert (
        NO_JITTER.next_attempt(accepted_at=accepted, now=accepted + 60, attempt=1, rng=rng)
        == accepted + 120
    )
    late = accepted + 5 * DAY - 30 * MINUTE
    assert NO_JITTER.next_attempt(accepted_at=accepted, now=late, attempt=20, rng=rng) is None


def test_delay_warning_once_after_four_hours() -> None:
    assert not NO_JITTER.warn_delayed(accepted_at=0, now=4 * HOUR - 1, warned=False)
    assert NO_JITTER.warn_delayed(accepted_at=0, now=4 * HOUR, warned=False)
    assert not NO_JITTER.warn_delayed(accepted_at=0, now=5 * HOUR, warned=True)
    assert not RetryPolicy(delay_warning=None).warn_delayed(accepted_at=0, now=DAY, warned=False)
