"""The [policy] settings, typed (defaults from the reference relay; docs/policy.md)."""

from __future__ import annotations

import enum
from typing import Any

import attrs


class Mode(enum.StrEnum):
    ENFORCE = "enforce"  # a triggered rule adds the label that acts
    SHADOW = "shadow"  # ... adds "shadow:<label>": recorded and logged, never enforced


@attrs.frozen
class Tier:
    until_day: float  # a member younger than this many days is in this tier
    hourly: int
    daily: int


@attrs.frozen
class PolicySettings:
    tiers: tuple[Tier, ...] = (Tier(7, 5, 50), Tier(14, 20, 200))
    hourly: int = 50  # the steady state, after the last tier
    daily: int = 500
    bounce_pause_rate: float = 0.05  # per sending domain over the rolling window ...
    complaint_pause_rate: float = 0.0008
    rate_window: float = 86400.0
    rate_min_messages: int = 10  # ... once it has at least this many finished deliveries
    spray_domains: int = 50  # distinct recipient domains in an hour, while warming
    spray_mode: Mode = Mode.ENFORCE
    velocity_factor: float = 4.0  # the last hour over this times the 7-day hourly mean ...
    velocity_min: int = 100  # ... and over this
    velocity_mode: Mode = Mode.ENFORCE
    counter_flush: float = 1.0  # seconds between writes of the counters to the store

    @property
    def warming_days(self) -> float:
        return max((t.until_day for t in self.tiers), default=0.0)

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> PolicySettings:
        tiers = tuple(
            Tier(float(t[0]), int(t[1]), int(t[2]))
            for t in sorted(values["tiers"], key=lambda t: float(t[0]))
        )
        return cls(
            tiers=tiers,
            hourly=values["hourly"],
            daily=values["daily"],
            bounce_pause_rate=float(values["bounce_pause_rate"]),
            complaint_pause_rate=float(values["complaint_pause_rate"]),
            rate_min_messages=values["rate_min_messages"],
            spray_domains=values["spray_domains"],
            spray_mode=Mode(values["spray_mode"]),
            velocity_factor=float(values["velocity_factor"]),
            velocity_min=values["velocity_min"],
            velocity_mode=Mode(values["velocity_mode"]),
            counter_flush=float(values["counter_flush"]),
        )
