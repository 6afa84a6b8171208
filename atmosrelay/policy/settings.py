"""The [policy] settings, typed, each declared once (defaults from the reference relay;
docs/policy.md). This class is both the config section and the object the policy engine uses;
SIGHUP applies a change to any of them but counter_flush."""

from __future__ import annotations

import enum
from typing import Any

import attrs

from atmosrelay.settings import custom, integer, number, string


class Mode(enum.StrEnum):
    ENFORCE = "enforce"  # a triggered rule adds the label that acts
    SHADOW = "shadow"  # ... adds "shadow:<label>": recorded and logged, never enforced


@attrs.frozen
class Tier:
    until_day: float  # a member younger than this many days is in this tier
    hourly: int
    daily: int


def _check_tiers(v: Any) -> str | None:
    expected = "a list of [until day, hourly, daily] (numbers > 0, days increasing)"
    if not isinstance(v, list):
        return expected
    last = 0.0
    for t in v:
        if not (
            isinstance(t, list)
            and len(t) == 3
            and isinstance(t[0], int | float)
            and not isinstance(t[0], bool)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in t[1:])
            and t[0] > last
            and t[1] >= 1
            and t[2] >= 1
        ):
            return f"{expected} (not {t!r})"
        last = float(t[0])
    return None


def _tiers(v: Any) -> tuple[Tier, ...]:
    # in increasing order of days: the check requires it
    return tuple(t if isinstance(t, Tier) else Tier(float(t[0]), int(t[1]), int(t[2])) for t in v)


def _share(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "a share > 0 and <= 1 (0.05 is 5%)"


@attrs.frozen
class PolicySettings:
    tiers: tuple[Tier, ...] = custom(
        [[7, 5, 50], [14, 20, 200]],
        _check_tiers,
        convert=_tiers,
        reload=True,
        doc="Warming tiers (docs/policy.md): [until day, hourly, daily] for a member younger "
        "than that many days; the limits count recipients (each is one delivery). Then the "
        "steady state. An operator sets one member's own numbers with 'atmosrelay member "
        "limits'.",
    )
    hourly: int = integer(50, 1, reload=True)  # the steady state, after the last tier
    daily: int = integer(500, 1, reload=True)
    bounce_pause_rate: float = custom(
        0.05,
        _share,
        convert=float,
        reload=True,
        doc="A sending domain is paused when, over the rolling 24 h and with at least "
        "rate_min_messages finished deliveries, bounces or complaints reach these shares.",
    )
    complaint_pause_rate: float = custom(0.0008, _share, convert=float, reload=True)
    rate_min_messages: int = integer(10, 1, reload=True)
    spray_domains: int = integer(
        50,
        1,
        reload=True,
        doc='Rules that add the label "throttled" ("enforce") or only record '
        '"shadow:throttled" ("shadow"): spray = more than spray_domains distinct recipient '
        "domains in an hour while warming; velocity = the last hour over velocity_factor x "
        "the 7-day hourly mean and over velocity_min recipients.",
    )
    spray_mode: Mode = string(
        "enforce", choices=tuple(Mode), convert=Mode, reload=True, note="enforce or shadow"
    )
    velocity_factor: float = number(4.0, 1, reload=True)
    velocity_min: int = integer(100, 1, reload=True)
    velocity_mode: Mode = string(
        "enforce", choices=tuple(Mode), convert=Mode, reload=True, note="enforce or shadow"
    )
    counter_flush: float = number(
        1.0,
        0.05,
        doc="Seconds between writes of the counters to the account store (a kill -9 forgets "
        "at most this much, and only of messages already delivered and compacted; "
        "docs/policy.md).",
    )
    rate_window: float = 86400.0  # the rolling window of the pause rates (not a setting)

    @property
    def warming_days(self) -> float:
        return max((t.until_day for t in self.tiers), default=0.0)
