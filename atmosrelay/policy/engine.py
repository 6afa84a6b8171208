"""``Policy``: the in-memory half of the policy (counters, the spray tracker) and the
decisions over it. No I/O: ``atmosrelay.submission`` loads and persists around it.

Admission is check-then-count with nothing awaited in between, so concurrent sessions on
one event loop can never both take the last place under a limit.
"""

from __future__ import annotations

from typing import Any

import attrs

from atmosrelay.policy.counters import Counters
from atmosrelay.policy.limits import (
    DAY,
    HOUR,
    Limits,
    check_rate,
    limits_for,
    next_change,
    recipients_key,
)
from atmosrelay.policy.member import (
    AUTO_SUSPENDED,
    HIGHLY_TRUSTED,
    SHADOW_PREFIX,
    THROTTLED,
    MemberSnapshot,
)
from atmosrelay.policy.rules import (
    RuleHit,
    SprayTracker,
    bounced_key,
    complaint_key,
    pause_reason,
    sent_key,
    spray,
    velocity,
)
from atmosrelay.policy.settings import Mode, PolicySettings
from atmosrelay.refusals import Refusal


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@attrs.define(eq=False)
class Policy:
    settings: PolicySettings = attrs.field(factory=PolicySettings)
    counters: Counters = attrs.field(factory=Counters)
    spray: SprayTracker = attrs.field(factory=SprayTracker)
    # domain -> when it was last paused: its bounce rate counts only what came after, so an
    # operator's unpause is a fresh start (loaded from the store's paused_at at startup)
    fresh_since: dict[str, float] = attrs.field(factory=dict)
    # did -> (the snapshot, valid until, its limits): a snapshot's limits change only when
    # a tier ends, and they are asked for several times per message
    _limits: dict[str, tuple[MemberSnapshot, float, Limits]] = attrs.field(factory=dict)
    # did -> [its Limits, recipients that surely still fit]: a window's total only falls as
    # time passes, so room measured once stays a lower bound, less what is admitted since.
    # The hot path (a member far from its limits) then never sums a window.
    _room: dict[str, list[Any]] = attrs.field(factory=dict)

    def reload(self, settings: PolicySettings) -> None:
        """New limits and rules (SIGHUP): what was cached from the old ones is dropped; the
        counters stay, so a member's hour so far counts against the new limits."""
        self.settings = settings
        self._limits.clear()
        self._room.clear()

    def limits(self, member: MemberSnapshot, now: float) -> Limits:
        cached = self._limits.get(member.did)
        if cached is not None and cached[0] is member and now < cached[1]:
            return cached[2]
        limits = limits_for(member, now, self.settings)
        self._limits[member.did] = (member, next_change(member, now, self.settings), limits)
        return limits

    def _fits(self, did: str, limits: Limits, n: int) -> bool:
        room = self._room.get(did)
        return room is not None and room[0] is limits and room[1] >= n

    def _measure(self, did: str, limits: Limits, now: float) -> None:
        key = recipients_key(did)
        hour = limits.hourly - self.counters.total(key, now, HOUR)
        day = limits.daily - self.counters.total(key, now, DAY)
        self._room[did] = [limits, min(hour, day)]

    def check_rate(
        self, member: MemberSnapshot, now: float, n: int = 1, pending: int = 0
    ) -> Refusal | None:
        """Would ``n`` more recipients fit now, besides ``pending`` ones of the transaction?
        (At MAIL one, at RCPT one besides those before it; only ``admit`` counts.)"""
        limits = self.limits(member, now)
        if self._fits(member.did, limits, n + pending):
            return None
        refusal = check_rate(member, self.counters, now, n, self.settings, limits, pending)
        if refusal is None:
            self._measure(member.did, limits, now)
        return refusal

    def admit(
        self, member: MemberSnapshot, now: float, recipients: list[str]
    ) -> Refusal | list[RuleHit]:
        """Count ``recipients`` against the member's limits, or refuse them all. Returns
        the rules the send triggered (the caller applies their labels)."""
        n = len(recipients)
        limits = self.limits(member, now)
        if self._fits(member.did, limits, n):
            self._room[member.did][1] -= n
        else:
            refusal = check_rate(member, self.counters, now, n, self.settings, limits)
            if refusal is not None:
                if SHADOW_PREFIX + HIGHLY_TRUSTED in member.labels:
                    refusal = self._shadow_trusted(member, now, n, refusal)
                return refusal
            self._measure(member.did, limits, now)
            self._room[member.did][1] -= n
        hits: list[RuleHit] = self._shadows(member, now, n) if member.labels else []
        self.counters.add(recipients_key(member.did), now, n)
        if limits.warming and not self._labelled(member, self.settings.spray_mode):
            distinct = self.spray.add(member.did, {_domain(r) for r in recipients}, now)
            hit = spray(distinct, True, self.settings)
            if hit is not None:
                hits.append(hit)
        if not self._labelled(member, self.settings.velocity_mode):
            hit = velocity(self.counters, member.did, now, self.settings)
            if hit is not None:
                hits.append(hit)
        return hits

    def _shadows(self, member: MemberSnapshot, now: float, n: int) -> list[RuleHit]:
        """What the member's shadow labels would have done to this send (logged, never
        enforced; a hit with no label to add)."""
        notes = []
        if SHADOW_PREFIX + AUTO_SUSPENDED in member.labels:
            notes.append(
                RuleHit(
                    SHADOW_PREFIX + AUTO_SUSPENDED,
                    "",
                    f"would have refused {n} recipient(s): suspended",
                )
            )
        if SHADOW_PREFIX + THROTTLED in member.labels and THROTTLED not in member.labels:
            throttled = attrs.evolve(member, labels=member.labels | {THROTTLED})
            limits = limits_for(throttled, now, self.settings)
            refusal = check_rate(throttled, self.counters, now, n, self.settings, limits)
            if refusal is not None:
                notes.append(
                    RuleHit(
                        SHADOW_PREFIX + THROTTLED,
                        "",
                        f"would have refused {n} recipient(s): {refusal.log}",
                    )
                )
        return notes

    def _shadow_trusted(
        self, member: MemberSnapshot, now: float, n: int, refusal: Refusal
    ) -> Refusal:
        trusted = attrs.evolve(member, labels=member.labels | {HIGHLY_TRUSTED})
        limits = limits_for(trusted, now, self.settings)
        if check_rate(trusted, self.counters, now, n, self.settings, limits) is None:
            return attrs.evolve(
                refusal, log=f"{refusal.log} (shadow:highly_trusted would have admitted it)"
            )
        return refusal

    @staticmethod
    def _labelled(member: MemberSnapshot, mode: Mode) -> bool:
        """Whether the label a rule in ``mode`` would add is there already (then the rule
        has nothing left to do for this member, and is not evaluated)."""
        label = THROTTLED if mode is Mode.ENFORCE else SHADOW_PREFIX + THROTTLED
        return label in member.labels

    def refund(self, did: str, now: float, n: int) -> None:
        """Recipients admitted whose message was then not kept (the journal failed)."""
        self.counters.add(recipients_key(did), now, -n)
        self._room.pop(did, None)  # measured again at the next check

    def delivered(self, sender: str, now: float) -> str | None:
        """Count a delivery; the domain may cross its threshold on one too (a bounce first,
        then the deliveries that make the rule's minimum)."""
        domain = _domain(sender)
        self.counters.add(sent_key(domain), now)
        if not self.counters.total(bounced_key(domain), now, self.settings.rate_window):
            return None  # the common case: no bounce in the window, nothing to decide
        return pause_reason(self.counters, domain, now, self.settings, self.fresh_since.get(domain))

    def bounced(self, sender: str, now: float) -> str | None:
        """Count a bounce; returns why the sender's domain must be paused now, if it must."""
        domain = _domain(sender)
        self.counters.add(bounced_key(domain), now)
        return pause_reason(self.counters, domain, now, self.settings, self.fresh_since.get(domain))

    def complained(self, sender: str, now: float) -> str | None:
        domain = _domain(sender)
        self.counters.add(complaint_key(domain), now)
        return pause_reason(self.counters, domain, now, self.settings, self.fresh_since.get(domain))
