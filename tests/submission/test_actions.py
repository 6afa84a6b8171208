"""PolicyActions against a real account store: complaints suppress and pause at 0.08%,
rule hits become labels once, and a domain already paused keeps its first pause."""

from __future__ import annotations

from pathlib import Path

import trio

from atmosrelay.accounts import domains
from atmosrelay.accounts.store import AsyncStore, Store
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.rules import RuleHit
from atmosrelay.queue.events import Bounced, Complained, Delivered
from atmosrelay.submission.actions import PolicyActions
from atmosrelay.submission.members import MemberDirectory

DID = "did:plc:abcdefghijklmnopqrstuvwx"
T0 = 1_800_000_000.0


def make(tmp: Path) -> tuple[Store, PolicyActions, list[int]]:
    store = Store(tmp / "a.sqlite3")
    store.add_member(DID, "alice.test")
    domains.enroll(store, DID, "example.org", limit=2, clock_now=0)
    store.mark_verified("example.org", without_dns=True)
    bumps: list[int] = []
    async_store = AsyncStore(store)
    members = MemberDirectory(async_store, lambda: len(bumps))
    actions = PolicyActions(async_store, Policy(), members, lambda: bumps.append(1))
    return store, actions, bumps


async def drain(actions: PolicyActions, writes: int) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(actions.run)
        with trio.fail_after(10):
            while actions.written < writes:  # noqa: ASYNC110 - the writer task's count
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_complaints_suppress_and_pause_at_their_threshold(tmp_path: Path) -> None:
    store, actions, bumps = make(tmp_path)
    for i in range(2000):
        actions.on_event(Delivered("q", DID, "alice@example.org", f"r{i}@example.net", T0 + i))
    actions.on_event(Complained(DID, "alice@example.org", "angry1@example.net", T0 + 2001))
    assert "example.org" not in actions.paused_now  # 1/2000 = 0.05%
    actions.on_event(Complained(DID, "alice@example.org", "angry2@example.net", T0 + 2002))
    assert "example.org" in actions.paused_now  # 2/2000 = 0.1%: refused at once
    await drain(actions, 3)  # two suppressions, one pause
    assert {(s.address, s.source) for s in store.suppressions(DID)} == {
        ("angry1@example.net", "complaint"),
        ("angry2@example.net", "complaint"),
    }
    assert store.domain("example.org").paused_reason == (
        "complaint rate 2/2000 = 0.10% over 24 h (threshold 0.08%)"
    )
    assert not actions.paused_now  # the store has it now
    assert len(bumps) == 3  # each write moved the generation on


async def test_a_rule_hit_becomes_a_label_once(tmp_path: Path) -> None:
    store, actions, _ = make(tmp_path)
    hit = RuleHit("velocity", "throttled", "figures")
    actions.rule_hits(DID, [hit])
    actions.rule_hits(DID, [hit])  # the member snapshot does not have it yet: still once
    await drain(actions, 1)
    assert store.member(DID).labels == ("throttled",)
    assert actions.written == 1
    assert actions._send.statistics().current_buffer_used == 0  # and nothing more queued


async def test_a_shadow_note_is_logged_and_never_written(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    store, actions, _ = make(tmp_path)
    caplog.set_level("INFO", logger="atmosrelay.policy")
    actions.rule_hits(DID, [RuleHit("shadow:throttled", "", "would have refused 1")])
    assert actions._send.statistics().current_buffer_used == 0
    assert f"shadow:throttled for {DID}: would have refused 1" in caplog.text
    assert store.member(DID).labels == ()


async def test_a_failed_store_write_is_logged_and_the_pause_holds_in_memory(
    tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    store, actions, bumps = make(tmp_path)
    for i in range(10):
        actions.on_event(Delivered("q", DID, "alice@example.org", f"r{i}@example.net", T0 + i))
    store.close()  # every write now fails with sqlite3.ProgrammingError
    actions.on_event(
        Bounced("q", DID, "alice@example.org", "gone@example.net", "5.1.1", "550", T0 + 20)
    )
    await drain(actions, 2)  # the suppression and the pause both fail; the task goes on
    assert "policy write failed (pause example.org); it is lost" in caplog.text
    assert "example.org" in actions.paused_now  # still refused until a restart
    assert bumps == []


async def test_a_label_the_operator_removed_can_be_added_again(tmp_path: Path) -> None:
    store, actions, _ = make(tmp_path)
    hit = RuleHit("spray", "throttled", "figures")
    actions.rule_hits(DID, [hit])
    await drain(actions, 1)
    store.set_label(DID, "throttled", False)  # the operator
    actions.rule_hits(DID, [hit])  # the rule fires again on the member without it
    await drain(actions, 2)
    assert store.member(DID).labels == ("throttled",)
