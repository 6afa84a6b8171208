"""The retry schedule: pure, so exact times can be asserted.

Postfix-like defaults: the first retry after ``initial`` (1 minute), doubling each attempt up
to ``cap`` (1 hour), with jitter so that deferred messages spread out instead of retrying in
lock-step; a recipient still deferred ``max_age`` (5 days) after acceptance bounces. An
optional delay notification (RFC 3464 ``Action: delayed``) after ``delay_warning``.

After a restart, retry times come from the journal (each DEFERRED record carries its next
attempt time), so nothing resets; ``Schedule.spread_overdue`` staggers the ones already due
so a restart does not stampede a destination.
"""

from __future__ import annotations

import random
from typing import Final

import attrs

MINUTE: Final = 60.0
HOUR: Final = 3600.0
DAY: Final = 86400.0


@attrs.frozen
class RetryPolicy:
    initial: float = 1 * MINUTE
    cap: float = 1 * HOUR
    jitter: float = 0.2  # +/- this share of each delay
    max_age: float = 5 * DAY
    delay_warning: float | None = 4 * HOUR

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.cap, self.initial * 2.0 ** (attempt - 1))
        return base * (1.0 + rng.uniform(-self.jitter, self.jitter))

    def next_attempt(
        self, *, accepted_at: float, now: float, attempt: int, rng: random.Random
    ) -> float | None:
        """When to try again after failed attempt ``attempt``, or None: give up (bounce)."""
        at = now + self.delay(attempt, rng)
        if at - accepted_at > self.max_age:
            return None
        return at

    def warn_delayed(self, *, accepted_at: float, now: float, warned: bool) -> bool:
        """Whether a delay DSN is due now: once per recipient (the dispatcher passes
        ``warned=False`` and leaves the once to the journal: a delay DSN's record covers
        the recipients it reported, ``QueuedMessage.delay_covered``)."""
        return (
            self.delay_warning is not None
            and not warned
            and now - accepted_at >= self.delay_warning
        )
