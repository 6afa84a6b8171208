"""Rules that watch a member's or a domain's traffic and act on it.

    auto-pause   per sending domain over ``rate_window`` (24 h), once at least
                 ``rate_min_messages`` deliveries finished: bounces at ``bounce_pause_rate``
                 (5%) or complaints at ``complaint_pause_rate`` (0.08%) pause the domain
    spray        while warming, the last hour's recipients spread over more than
                 ``spray_domains`` (50) distinct domains
    velocity     the last hour's recipients above ``velocity_factor`` (4) times the member's
                 hourly mean over the 7 days before it, and above ``velocity_min`` (100)

Spray and velocity add the label ``throttled`` (mode ``enforce``) or ``shadow:throttled``
(mode ``shadow``: recorded and logged, never enforced). Pure: the caller keeps the counts.
"""

from __future__ import annotations

from typing import Final

import attrs

from atmosrelay.policy.counters import Counters
from atmosrelay.policy.limits import DAY, HOUR, recipients_key
from atmosrelay.policy.member import SHADOW_PREFIX, THROTTLED
from atmosrelay.policy.settings import Mode, PolicySettings

WEEK: Final = 7 * DAY


def sent_key(domain: str) -> str:
    return f"sent|{domain}"


def bounced_key(domain: str) -> str:
    return f"bounced|{domain}"


def complaint_key(domain: str) -> str:
    return f"complaint|{domain}"


def pause_reason(
    counters: Counters,
    domain: str,
    now: float,
    settings: PolicySettings,
    fresh_since: float | None = None,
) -> str | None:
    """Why ``domain`` must be paused now, or None. ``fresh_since``: when it was last paused;
    only the buckets wholly after that count (an unpause is a fresh start)."""
    span = settings.rate_window
    if fresh_since is not None and fresh_since > now - span:
        start = fresh_since + counters.bucket  # past the bucket of the pause itself
        sent = counters.between(sent_key(domain), start, now + counters.bucket)
        bounced = counters.between(bounced_key(domain), start, now + counters.bucket)
        complaints = counters.between(complaint_key(domain), start, now + counters.bucket)
    else:
        sent = counters.total(sent_key(domain), now, span)
        bounced = counters.total(bounced_key(domain), now, span)
        complaints = counters.total(complaint_key(domain), now, span)
    finished = sent + bounced
    if finished < settings.rate_min_messages:
        return None
    hours = f"{span / HOUR:g} h"
    if bounced / finished >= settings.bounce_pause_rate:
        return (
            f"bounce rate {bounced}/{finished} = {bounced / finished:.1%} over {hours} "
            f"(threshold {settings.bounce_pause_rate:.2%})"
        )
    if complaints / finished >= settings.complaint_pause_rate:
        return (
            f"complaint rate {complaints}/{finished} = {complaints / finished:.2%} over {hours} "
            f"(threshold {settings.complaint_pause_rate:.2%})"
        )
    return None


@attrs.frozen
class RuleHit:
    rule: str  # "spray", "velocity", or a shadow label that would have acted
    label: str  # to add: "throttled" or "shadow:throttled"; "" for a note to log only
    detail: str  # the figures, for the log


def _label(mode: Mode) -> str:
    return THROTTLED if mode is Mode.ENFORCE else SHADOW_PREFIX + THROTTLED


def spray(distinct_domains: int, warming: bool, settings: PolicySettings) -> RuleHit | None:
    if not warming or distinct_domains <= settings.spray_domains:
        return None
    return RuleHit(
        "spray",
        _label(settings.spray_mode),
        f"{distinct_domains} distinct recipient domains in the last hour while warming "
        f"(over {settings.spray_domains})",
    )


def velocity(counters: Counters, did: str, now: float, settings: PolicySettings) -> RuleHit | None:
    key = recipients_key(did)
    last_hour = counters.total(key, now, HOUR)
    if last_hour <= settings.velocity_min:
        return None  # the cheap test first: the 7-day look back is rare
    mean = counters.between(key, now - HOUR - WEEK, now - HOUR, memo=True) / (WEEK / HOUR)
    if last_hour <= settings.velocity_factor * mean:
        return None
    return RuleHit(
        "velocity",
        _label(settings.velocity_mode),
        f"{last_hour} recipients in the last hour, over {settings.velocity_factor:g}x the "
        f"7-day hourly mean of {mean:.1f} and over {settings.velocity_min}",
    )


class SprayTracker:
    """Distinct recipient domains per member in the last hour (memory only: a restart
    forgets them, which delays the rule by at most an hour; docs/policy.md)."""

    def __init__(self, cap: int = 1000) -> None:
        self.cap = cap
        self._seen: dict[str, dict[str, float]] = {}

    def add(self, did: str, domains: set[str], now: float) -> int:
        """Note ``domains`` at ``now``; returns the distinct domains of the last hour."""
        seen = self._seen.setdefault(did, {})
        for d in domains:
            seen.pop(d, None)
            seen[d] = now  # most recent last
        edge = now - HOUR
        while seen:  # oldest first: stop at the first one still inside the hour
            oldest = next(iter(seen))
            if seen[oldest] > edge:
                break
            del seen[oldest]
        while len(seen) > self.cap:  # past the rule's threshold the figure is moot
            del seen[next(iter(seen))]
        return len(seen)
