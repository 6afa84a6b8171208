"""Auto-pause, spray and velocity (each in enforce and shadow mode), the header From rule
and suppression, as pure decisions over a fake clock."""

from __future__ import annotations

import email.utils

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmosrelay.policy.counters import Counters
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.limits import DAY, HOUR
from atmosrelay.policy.member import MemberSnapshot, MemberStatus, SuppressionSource
from atmosrelay.policy.rules import RuleHit, pause_reason, sent_key
from atmosrelay.policy.sender import (
    _SIMPLE,
    addresses,
    check_header_addresses,
    check_recipient,
    check_sender_domain,
    unsubscribed,
)
from atmosrelay.policy.settings import Mode, PolicySettings
from atmosrelay.refusals import Code, Refusal

DID = "did:plc:abcdefghijklmnopqrstuvwx"
T0 = 1_800_000_000.0


def member(**kw: object) -> MemberSnapshot:
    base = MemberSnapshot(
        DID,
        MemberStatus.ACTIVE,
        T0,
        verified=frozenset({"example.org", "news.example.com"}),
        pending=frozenset({"pending.example"}),
    )
    return attrs.evolve(base, **kw)


# -- auto-pause -----------------------------------------------------------------------------


def test_a_domain_pauses_at_five_percent_bounces_with_ten_messages() -> None:
    p = Policy()
    now = T0 + 20 * DAY
    for i in range(19):
        p.delivered("a@example.org", now + i)
    reason = p.bounced("a@example.org", now + 20)  # 1 of 20: 5%
    assert reason == "bounce rate 1/20 = 5.0% over 24 h (threshold 5.00%)"
    q = Policy()
    for i in range(20):
        q.delivered("a@example.org", now + i)
    assert q.bounced("a@example.org", now + 20) is None  # 1 of 21: 4.8%


def test_below_ten_messages_nothing_pauses_and_under_five_percent_neither() -> None:
    p = Policy()
    now = T0
    for i in range(8):
        p.bounced("a@example.org", now + i)  # 8 of 8 bounced, but only 8 finished
    assert pause_reason(p.counters, "example.org", now + 9, p.settings) is None
    q = Policy()
    for i in range(20):
        q.delivered("a@example.org", now + i)
    assert q.bounced("a@example.org", now + 30) is None  # 1/21 = 4.8%
    assert q.bounced("a@example.org", now + 31) is not None  # 2/22 = 9.1%


def test_the_rate_window_rolls_and_other_domains_are_not_touched() -> None:
    p = Policy()
    for i in range(10):
        p.bounced("a@example.org", T0 + i)
    assert pause_reason(p.counters, "example.org", T0 + 10, p.settings) is not None
    assert pause_reason(p.counters, "news.example.com", T0 + 10, p.settings) is None
    # a day and a bucket later the bounces have left the window
    assert pause_reason(p.counters, "example.org", T0 + DAY + 120, p.settings) is None


def test_complaints_pause_at_their_own_threshold() -> None:
    p = Policy()
    for i in range(2000):
        p.delivered("a@example.org", T0 + i)
    assert p.complained("a@example.org", T0 + 2001) is None  # 1/2000 = 0.05%
    assert p.complained("a@example.org", T0 + 2002) is not None  # 2/2000 = 0.1%


def test_after_a_pause_only_what_came_later_counts() -> None:
    p = Policy()
    for i in range(10):
        p.bounced("a@example.org", T0 + i)
    p.fresh_since["example.org"] = T0 + 10  # paused here; the operator unpauses later
    assert p.bounced("a@example.org", T0 + 200) is None  # 1 finished since: under 10
    for i in range(9):
        p.delivered("a@example.org", T0 + 300 + i)
    assert p.bounced("a@example.org", T0 + 400) is not None  # 2/11 since the pause


# -- spray and velocity --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "label"), [(Mode.ENFORCE, "throttled"), (Mode.SHADOW, "shadow:throttled")]
)
def test_spray_fires_past_fifty_domains_in_an_hour_while_warming(mode: Mode, label: str) -> None:
    p = Policy(settings=PolicySettings(spray_mode=mode))
    m = member(hourly_limit=1000, daily_limit=1000)  # warming, but room to spray
    hits: list[RuleHit] = []
    for i in range(51):
        result = p.admit(m, T0 + i, [f"x@d{i}.example"])
        assert not isinstance(result, Refusal)
        hits += result
    assert [h.rule for h in hits] == ["spray"]
    assert hits[0].label == label
    assert "51 distinct recipient domains" in hits[0].detail
    # once labelled, the rule has nothing left to do
    labelled = attrs.evolve(m, labels=frozenset({label}))
    assert p.admit(labelled, T0 + 60, ["x@d99.example"]) == []


def test_spray_forgets_after_an_hour_and_ignores_steady_members() -> None:
    p = Policy()
    m = member(hourly_limit=1000, daily_limit=1000)
    for i in range(50):
        assert p.admit(m, T0 + i, [f"x@d{i}.example"]) == []
    assert p.admit(m, T0 + HOUR + 60, ["x@new.example"]) == []  # the 50 are past the hour
    steady = member(created_at=T0 - 30 * DAY, hourly_limit=1000, daily_limit=1000)
    q = Policy()
    for i in range(60):
        assert q.admit(steady, T0 + i, [f"x@d{i}.example"]) == []


@pytest.mark.parametrize(
    ("mode", "label"), [(Mode.ENFORCE, "throttled"), (Mode.SHADOW, "shadow:throttled")]
)
def test_velocity_fires_over_four_times_the_weekly_mean_and_over_one_hundred(
    mode: Mode, label: str
) -> None:
    p = Policy(settings=PolicySettings(velocity_mode=mode))
    m = member(created_at=T0 - 30 * DAY, hourly_limit=10_000, daily_limit=100_000)
    counters = p.counters
    # a week of 30 an hour before the last hour: the mean is 30, four times is 120
    for h in range(168):
        counters.add(f"rcpt|{DID}", T0 - HOUR - h * HOUR - 1800, 30)
    hits: list[RuleHit] = []
    for i in range(121):
        result = p.admit(m, T0 + i, ["x@example.net"])
        assert not isinstance(result, Refusal)
        hits += result
    assert [h.rule for h in hits] == ["velocity"]
    assert hits[0].label == label
    assert "121 recipients in the last hour" in hits[0].detail


def test_velocity_needs_more_than_the_minimum_even_from_nothing() -> None:
    p = Policy()
    m = member(created_at=T0 - 30 * DAY, hourly_limit=10_000, daily_limit=100_000)
    for i in range(100):
        assert p.admit(m, T0 + i, ["x@example.net"]) == []  # 100 is not over 100
    result = p.admit(m, T0 + 101, ["x@example.net"])
    assert not isinstance(result, Refusal) and [h.rule for h in result] == ["velocity"]


# -- who a message may claim to be from ------------------------------------------------------


@pytest.mark.parametrize(
    ("from_value", "ok"),
    [
        ("Alice <alice@example.org>", True),
        ("alice@EXAMPLE.ORG", True),
        ("Alice <alice@mail.example.org>", True),  # a subdomain of a verified domain
        ('"security@paypal.com" <alice@example.org>', True),  # the address is what counts
        ("Security <security@paypal.com>", False),
        ("alice@example.org.evil.com", False),
        ("alice@notexample.org", False),
        ("alice@pending.example", False),  # enrolled, not verified
        ("alice@example.org, bob@example.org", False),  # two addresses
        ("undisclosed-recipients:;", False),
        ("", False),
    ],
)
def test_header_from_must_be_one_address_of_a_verified_domain(from_value: str, ok: bool) -> None:
    refusal = check_header_addresses(member(), [from_value], [])
    assert (refusal is None) == ok, refusal
    if refusal is not None:
        assert refusal.code is Code.FROM_NOT_ALLOWED
        assert (refusal.reply.code, refusal.reply.enhanced) == (550, "5.7.1")


def test_sender_header_is_held_to_the_same_rule() -> None:
    m = member()
    assert check_header_addresses(m, ["a@example.org"], ["b@news.example.com"]) is None
    refusal = check_header_addresses(m, ["a@example.org"], ["b@paypal.com"])
    assert refusal is not None and "Sender header domain paypal.com" in refusal.reply.text
    two = check_header_addresses(m, ["a@example.org", "b@example.org"], [])
    assert two is not None and "exactly one From header, not 2" in two.reply.text


def test_envelope_sender_domain() -> None:
    m = member(paused={"news.example.com": "bounce rate 3/10"})
    assert check_sender_domain(m, "EXAMPLE.org") is None
    paused = check_sender_domain(m, "news.example.com")
    assert paused is not None and paused.code is Code.DOMAIN_PAUSED
    assert paused.reply.text == (
        "Sending domain news.example.com is paused: bounce rate 3/10; contact the operator"
    )
    pending = check_sender_domain(m, "pending.example")
    assert pending is not None and "atmosrelay domain verify pending.example" in pending.reply.text
    other = check_sender_domain(m, "mail.example.org")  # envelope: exact domains only
    assert other is not None and other.code is Code.DOMAIN_MISMATCH
    assert (other.reply.code, other.reply.enhanced) == (550, "5.1.0")


def test_suppression_sources_decide_what_they_block() -> None:
    m = member(
        suppressed={
            "gone@example.net": SuppressionSource.HARD_BOUNCE,
            "angry@example.net": SuppressionSource.COMPLAINT,
            "manual@example.net": SuppressionSource.OPERATOR,
            "optout@example.net": SuppressionSource.UNSUBSCRIBE,
        }
    )
    for address in ("gone@example.net", "ANGRY@example.net", "manual@example.net"):
        refusal = check_recipient(m, address)
        assert refusal is not None and refusal.code is Code.RECIPIENT_SUPPRESSED
        assert (refusal.reply.code, refusal.reply.enhanced) == (550, "5.7.1")
    assert check_recipient(m, "optout@example.net") is None  # decided at the end of DATA
    assert unsubscribed(m, "OptOut@example.net")
    assert not unsubscribed(m, "gone@example.net")
    assert check_recipient(m, "fine@example.net") is None


def test_counters_between_is_what_the_velocity_rule_reads() -> None:
    c = Counters()
    c.add(sent_key("x"), T0, 2)
    assert c.between(sent_key("x"), T0 - 60, T0 + 60) == 2
    assert c.between(sent_key("x"), T0 + 1, T0 + 60) == 0  # the bucket starts before


FROM_ALPHABET = 'ab.@<> "(),:;[]\\x-'


@settings(max_examples=2000, deadline=None)
@given(value=st.text(alphabet=FROM_ALPHABET, max_size=30))
def test_the_fast_from_parser_agrees_with_the_standard_library(value: str) -> None:
    """Wherever the shortcut for plain From values applies, it finds what email.utils
    finds (its twin, the full parser, handles everything else)."""
    if _SIMPLE.fullmatch(value) is None:
        return
    assert addresses(value) == [a for _, a in email.utils.getaddresses([value]) if a]


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.org",
        "Alice <alice@example.org>",
        "  Alice Smith   <alice@example.org>  ",
        "<alice@example.org>",
        "a.b-c@mail.example.org",
    ],
)
def test_plain_from_values_take_the_shortcut(value: str) -> None:
    assert _SIMPLE.fullmatch(value) is not None
    assert addresses(value) == [a for _, a in email.utils.getaddresses([value]) if a]


@settings(max_examples=1000, deadline=None)
@given(value=st.from_regex(_SIMPLE, fullmatch=True))
def test_every_value_the_shortcut_takes_parses_the_same_in_full(value: str) -> None:
    assert addresses(value) == [a for _, a in email.utils.getaddresses([value]) if a]
