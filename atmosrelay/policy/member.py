"""What the policy knows of a member: a snapshot loaded from the account store."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

import attrs


class MemberStatus(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    REMOVED = "removed"


class SuppressionSource(enum.StrEnum):
    """Why an address is suppressed, which decides what it blocks (docs/policy.md)."""

    UNSUBSCRIBE = "unsubscribe"  # blocks bulk mail only, decided at the end of DATA
    HARD_BOUNCE = "hard-bounce"  # the address does not exist: refused at RCPT, any category
    COMPLAINT = "complaint"  # the recipient reported spam: refused at RCPT, any category
    OPERATOR = "operator"  # added by hand: refused at RCPT, any category

    @property
    def blocks_transactional(self) -> bool:
        return self is not SuppressionSource.UNSUBSCRIBE


# Labels that act; anything else is stored and shown but does nothing. A label written
# "shadow:<label>" is recorded and logged, never enforced.
THROTTLED: Final = "throttled"  # halves the hourly cap
HIGHLY_TRUSTED: Final = "highly_trusted"  # skips warming
AUTO_SUSPENDED: Final = "auto_suspended"  # suspends
ACTING_LABELS: Final = frozenset({THROTTLED, HIGHLY_TRUSTED, AUTO_SUSPENDED})
SHADOW_PREFIX: Final = "shadow:"


@attrs.frozen
class MemberSnapshot:
    did: str
    status: MemberStatus
    created_at: float
    labels: frozenset[str] = frozenset()
    status_reason: str | None = None
    hourly_limit: int | None = None  # the operator's per-member limits, when set
    daily_limit: int | None = None
    verified: frozenset[str] = frozenset()  # sending domains, lower case
    pending: frozenset[str] = frozenset()  # enrolled, not yet verified
    paused: Mapping[str, str] = attrs.field(factory=dict)  # domain -> why it is paused
    suppressed: Mapping[str, SuppressionSource] = attrs.field(factory=dict)  # lower-case address

    def has(self, label: str) -> bool:
        """Whether an acting label applies (a shadow label never does)."""
        return label in self.labels

    @property
    def suspended(self) -> bool:
        return self.status is not MemberStatus.ACTIVE or self.has(AUTO_SUSPENDED)

    @property
    def suspension_reason(self) -> str:
        if self.has(AUTO_SUSPENDED) and self.status is MemberStatus.ACTIVE:
            return "label auto_suspended"
        return f"member {self.status.value}" + (
            f" ({self.status_reason})" if self.status_reason else ""
        )
