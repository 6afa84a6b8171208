"""Warming tiers, per-member limits, labels and the rate decision, over a fake clock."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmosrelay.config import parse_config
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.limits import DAY, HOUR, limits_for
from atmosrelay.policy.member import MemberSnapshot, MemberStatus
from atmosrelay.policy.settings import PolicySettings
from atmosrelay.refusals import Code, Refusal

DID = "did:plc:abcdefghijklmnopqrstuvwx"
T0 = 1_800_000_000.0  # the member joined here
DEFAULTS = PolicySettings()


def member(**kw: object) -> MemberSnapshot:
    base = MemberSnapshot(DID, MemberStatus.ACTIVE, T0, verified=frozenset({"example.org"}))
    return attrs.evolve(base, **kw)


@pytest.mark.parametrize(
    ("age_days", "tier", "hourly", "daily"),
    [
        (0, "warming 1 (days 0-7)", 5, 50),
        (6.999, "warming 1 (days 0-7)", 5, 50),
        (7, "warming 2 (days 7-14)", 20, 200),
        (13.999, "warming 2 (days 7-14)", 20, 200),
        (14, "steady", 50, 500),
        (400, "steady", 50, 500),
    ],
)
def test_every_tier_boundary(age_days: float, tier: str, hourly: int, daily: int) -> None:
    limits = limits_for(member(), T0 + age_days * DAY, DEFAULTS)
    assert (limits.tier, limits.hourly, limits.daily) == (tier, hourly, daily)
    assert limits.warming == (age_days < 14)


def test_labels_act_and_shadow_or_unknown_ones_do_not() -> None:
    now = T0 + DAY
    assert limits_for(member(labels=frozenset({"highly_trusted"})), now, DEFAULTS).hourly == 50
    assert limits_for(member(labels=frozenset({"throttled"})), now, DEFAULTS).hourly == 2
    both = member(labels=frozenset({"throttled", "highly_trusted"}))
    assert limits_for(both, now, DEFAULTS).hourly == 25
    for inert in ("shadow:throttled", "shadow:highly_trusted", "friendly", "shadow:auto_suspended"):
        m = member(labels=frozenset({inert}))
        assert limits_for(m, now, DEFAULTS).hourly == 5, inert
        assert not m.suspended
    assert member(labels=frozenset({"auto_suspended"})).suspended
    assert member(status=MemberStatus.SUSPENDED).suspended


def test_operator_limits_replace_the_tier_and_throttled_still_halves() -> None:
    now = T0 + DAY
    custom = limits_for(member(hourly_limit=1000, daily_limit=9000), now, DEFAULTS)
    assert (custom.hourly, custom.daily, custom.custom) == (1000, 9000, True)
    only_daily = limits_for(member(daily_limit=7), now, DEFAULTS)
    assert (only_daily.hourly, only_daily.daily) == (5, 7)
    throttled = member(hourly_limit=1000, labels=frozenset({"throttled"}))
    assert limits_for(throttled, now, DEFAULTS).hourly == 500
    assert (
        limits_for(member(hourly_limit=1, labels=frozenset({"throttled"})), now, DEFAULTS).hourly
        == 1
    )


def test_configured_tiers() -> None:
    s = parse_config("[policy]\ntiers = [[3, 2, 10]]\nhourly = 7\ndaily = 70\n").policy
    assert limits_for(member(), T0 + 2 * DAY, s).hourly == 2
    assert limits_for(member(), T0 + 3 * DAY, s).hourly == 7


def test_the_sixth_recipient_of_the_first_hour_is_refused_with_when_it_frees() -> None:
    p = Policy()
    m = member()
    now = T0 + 10.0
    for i in range(5):
        assert p.admit(m, now + i, [f"r{i}@example.net"]) == []
    refusal = p.admit(m, now + 5, ["r5@example.net"])
    assert isinstance(refusal, Refusal)
    assert refusal.code is Code.RATE_LIMITED
    assert refusal.reply.code == 451 and refusal.reply.enhanced == "4.7.1"
    assert "Hourly limit of 5 recipient(s) (warming 1 (days 0-7))" in refusal.reply.text
    # the first five sat in the bucket starting at T0: free once it leaves the hour
    assert refusal.retry_after == pytest.approx(T0 + 60 + HOUR - (now + 5))
    assert refusal.retryable and refusal.http_status == 429
    assert refusal.retry_after_header == str(int(T0 + 60 + HOUR - (now + 5)))
    assert p.check_rate(m, T0 + 60 + HOUR, 5) is None  # and then five fit again


def test_the_daily_limit_binds_across_hours() -> None:
    p = Policy()
    m = member()
    for burst in range(10):  # 5 every 2 hours, 50 in 20 hours: the daily cap of week 1
        for i in range(5):
            assert p.admit(m, T0 + burst * 2 * HOUR + 60 * i, ["x@example.net"]) == []
    refusal = p.check_rate(m, T0 + 20 * HOUR, 1)
    assert refusal is not None and "Daily limit of 50" in refusal.reply.text


def test_more_recipients_than_the_limit_in_one_message_is_not_retryable() -> None:
    p = Policy()
    refusal = p.admit(member(), T0, [f"r{i}@example.net" for i in range(6)])
    assert isinstance(refusal, Refusal)
    assert refusal.retry_after is None and not refusal.retryable
    assert refusal.reply.text == (
        "6 recipients are over the Hourly limit of 5 recipient(s) (warming 1 (days 0-7)); "
        "send fewer at once"
    )


def test_a_refund_gives_the_places_back() -> None:
    p = Policy()
    m = member()
    assert p.admit(m, T0, [f"r{i}@example.net" for i in range(5)]) == []
    assert p.check_rate(m, T0 + 1, 1) is not None
    p.refund(DID, T0 + 1, 5)
    assert p.check_rate(m, T0 + 2, 5) is None


# -- the property: whatever the history, no window ever holds more than the limit --------------

sends = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=30 * DAY, allow_nan=False),  # when (member's age)
        st.integers(min_value=1, max_value=8),  # recipients in the message
    ),
    min_size=1,
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(
    history=sends,
    labels=st.sets(st.sampled_from(["throttled", "highly_trusted", "shadow:throttled", "x"])),
    custom=st.one_of(st.none(), st.tuples(st.integers(1, 30), st.integers(1, 300))),
)
def test_a_member_never_gets_more_than_its_limit_in_any_window(
    history: list[tuple[float, int]],
    labels: set[str],
    custom: tuple[int, int] | None,
) -> None:
    p = Policy()
    m = member(labels=frozenset(labels))
    if custom is not None:
        m = attrs.evolve(m, hourly_limit=custom[0], daily_limit=custom[1])
    admitted: list[tuple[float, int]] = []
    for offset, n in sorted(history):
        now = T0 + offset
        result = p.admit(m, now, [f"r{i}@d{i}.example" for i in range(n)])
        if not isinstance(result, Refusal):
            admitted.append((now, n))
    for now, _ in admitted:  # every window that ends at an admission
        limits = limits_for(m, now, DEFAULTS)
        hour = sum(n for t, n in admitted if now - HOUR < t <= now)
        day = sum(n for t, n in admitted if now - DAY < t <= now)
        assert hour <= limits.hourly, (now, hour, limits)
        assert day <= limits.daily, (now, day, limits)


def test_at_rcpt_the_transactions_own_recipients_count_before_they_are_admitted() -> None:
    p = Policy()
    m = member()
    now = T0 + 130.0
    assert p.check_rate(m, now, 1, pending=4) is None  # the fifth fits
    refusal = p.check_rate(m, now, 1, pending=5)  # the sixth does not ...
    assert refusal is not None and refusal.retryable
    # ... until this transaction's five, counted in the bucket of now, leave the hour
    assert refusal.retry_after == pytest.approx(120.0 + 60.0 + HOUR - 130.0)
    p.admit(m, T0, ["a@example.net", "b@example.net"])
    later = p.check_rate(m, now, 1, pending=3)  # 2 sent + 3 pending: full
    assert later is not None
    assert later.retry_after == pytest.approx(60.0 + HOUR - 130.0)  # the two sent leave first


def test_shadow_labels_report_what_they_would_have_done_and_change_nothing() -> None:
    p = Policy()
    m = member(labels=frozenset({"shadow:throttled", "shadow:auto_suspended"}))
    for i in range(2):  # the throttled cap would be 2: these fit either way
        notes = p.admit(m, T0 + i, ["x@example.net"])
        assert [n.rule for n in notes] == ["shadow:auto_suspended"]  # type: ignore[union-attr]
    notes = p.admit(m, T0 + 2, ["x@example.net"])  # admitted: the real cap is 5
    assert not isinstance(notes, Refusal)
    assert [(n.rule, n.label) for n in notes] == [
        ("shadow:auto_suspended", ""),
        ("shadow:throttled", ""),
    ]
    assert "would have refused 1 recipient(s): Hourly limit of 2" in notes[1].detail
    trusted = member(labels=frozenset({"shadow:highly_trusted"}))
    q = Policy()
    assert q.admit(trusted, T0, [f"r{i}@example.net" for i in range(5)]) == []
    refusal = q.admit(trusted, T0 + 1, ["r5@example.net"])
    assert isinstance(refusal, Refusal)  # still refused: shadow labels never act
    assert refusal.log.endswith("(shadow:highly_trusted would have admitted it)")
