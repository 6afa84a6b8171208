"""Warming tiers, per-member limits and labels -> a member's limits; the rate decision.

Limits count **recipients**, not messages: each recipient is one delivery to some mailbox
provider, and that is what a shared IP's reputation is made of.

    tier            age of the member (from ``member add``)       hourly  daily  (defaults)
    warming 1       under 7 days                                   5       50
    warming 2       under 14 days                                  20      200
    steady          from then on, or with the label highly_trusted 50      500

``member limits DID --hourly N --daily N`` replaces the tier's numbers for one member; the
label ``throttled`` then halves the hourly cap (at least 1).
"""

from __future__ import annotations

from typing import Final

import attrs

from atmosrelay.policy.counters import Counters
from atmosrelay.policy.member import HIGHLY_TRUSTED, THROTTLED, MemberSnapshot
from atmosrelay.policy.settings import PolicySettings
from atmosrelay.refusals import Code, Refusal, refuse
from atmosrelay.smtp import replies as R

HOUR: Final = 3600.0
DAY: Final = 86400.0


@attrs.frozen
class Limits:
    tier: str  # "warming 1 (days 0-7)", "steady", ...
    hourly: int
    daily: int
    warming: bool
    custom: bool = False  # the operator set this member's numbers
    throttled: bool = False


def recipients_key(did: str) -> str:
    return f"rcpt|{did}"


def limits_for(member: MemberSnapshot, now: float, settings: PolicySettings) -> Limits:
    age = (now - member.created_at) / DAY
    tier, hourly, daily, warming = "steady", settings.hourly, settings.daily, False
    if not member.has(HIGHLY_TRUSTED):
        start = 0.0
        for i, t in enumerate(settings.tiers):
            if age < t.until_day:
                tier = f"warming {i + 1} (days {start:g}-{t.until_day:g})"
                hourly, daily, warming = t.hourly, t.daily, True
                break
            start = t.until_day
    else:
        tier = "steady (highly_trusted)"
    custom = member.hourly_limit is not None or member.daily_limit is not None
    if member.hourly_limit is not None:
        hourly = member.hourly_limit
    if member.daily_limit is not None:
        daily = member.daily_limit
    throttled = member.has(THROTTLED)
    if throttled:
        hourly = max(1, hourly // 2)
    return Limits(tier, hourly, daily, warming, custom, throttled)


def _describe(which: str, cap: int, limits: Limits) -> str:
    extra = [limits.tier]
    if limits.custom:
        extra.append("set by the operator")
    if limits.throttled:
        extra.append("halved: throttled")
    return f"{which} limit of {cap} recipient(s) ({', '.join(extra)})"


def next_change(member: MemberSnapshot, now: float, settings: PolicySettings) -> float:
    """When ``limits_for`` may next give another answer for this snapshot (a tier ends)."""
    if member.has(HIGHLY_TRUSTED):
        return float("inf")
    for t in settings.tiers:
        end = member.created_at + t.until_day * DAY
        if now < end:
            return end
    return float("inf")


def check_rate(
    member: MemberSnapshot,
    counters: Counters,
    now: float,
    n: int,
    settings: PolicySettings,
    limits: Limits | None = None,
    pending: int = 0,
) -> Refusal | None:
    """Whether ``n`` more recipients fit in the member's hourly and daily limits now, besides
    ``pending`` ones of the same transaction not counted yet (at RCPT); the refusal says
    which limit and when it frees (``retry_after``). ``limits``: the member's, when the
    caller has them at hand."""
    if limits is None:
        limits = limits_for(member, now, settings)
    key = recipients_key(member.did)
    worst: tuple[float, str] | None = None
    for which, span, cap in (("Hourly", HOUR, limits.hourly), ("Daily", DAY, limits.daily)):
        if counters.total(key, now, span) + pending + n <= cap:
            continue
        described = _describe(which, cap, limits)
        if n > cap:
            return refuse(
                Code.RATE_LIMITED,
                reply=R.RATE_LIMITED_SPLIT,
                log=f"{n} recipients in one message, over the {described}",
                n=n,
                limit=described,
            )
        if pending + n <= cap:
            frees = counters.frees_at(key, now, span, cap - pending, n)
            assert frees is not None
        else:  # this transaction alone fills it: free once its own recipients leave
            frees = (now // counters.bucket) * counters.bucket + counters.bucket + span
        if worst is None or frees > worst[0]:
            worst = (frees, described)
    if worst is None:
        return None
    wait = max(1.0, worst[0] - now)
    return refuse(
        Code.RATE_LIMITED,
        retry_after=wait,
        log=f"{worst[1]} reached; frees in {wait:.0f} s",
        limit=worst[1],
        wait=f"{wait:.0f}",
    )
