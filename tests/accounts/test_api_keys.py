"""API keys: issue, verify, revoke, rotate, the cache, and brute-force brakes on virtual time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import trio
import trio.testing

from atmosrelay.accounts import api_keys
from atmosrelay.accounts.api_keys import AuthSettings, KeyChecker, Refused, Verified
from atmosrelay.accounts.store import AsyncStore, Store

ALICE = "did:plc:abcdefghijklmnopqrstuvwx"
BOB = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"  # not a member
FAST = AuthSettings(bcrypt_cost=4, half_life=1e9, revocation_poll=1.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "accounts.sqlite3")
    s.add_member(ALICE, "alice.test")
    yield s
    s.close()


def checker(store: Store, settings: AuthSettings = FAST) -> KeyChecker:
    return KeyChecker(AsyncStore(store), settings)


def test_issued_key_format_and_storage(store: Store) -> None:
    issued = api_keys.issue(store, ALICE, cost=4)
    assert issued.secret.startswith("atmos_")
    assert len(issued.secret) == 49 <= 72  # within bcrypt's limit
    assert issued.key_id == issued.secret[6:14]
    stored = store.key(issued.key_id)
    assert stored.bcrypt_hash.startswith(b"$2b$04$")
    assert issued.secret.encode() not in stored.bcrypt_hash
    assert issued.secret not in repr(issued)
    other = api_keys.issue(store, ALICE, cost=4)
    assert other.secret != issued.secret


def test_key_ids_never_look_like_command_line_options() -> None:
    # One id in 32 would start with "-" or "_" if drawn plainly; "key revoke -Lx..." then
    # fails in argparse. 3,000 draws miss a regression with probability ~1e-41.
    firsts = {api_keys.new_secret()[6] for _ in range(3000)}
    assert not firsts & {"-", "_"}
    assert len(firsts) > 50  # still drawn from the rest of the alphabet


async def test_verify_by_did_and_by_handle_then_from_the_cache(store: Store) -> None:
    issued = api_keys.issue(store, ALICE, cost=4)
    kc = checker(store)
    first = await kc.verify(ALICE, issued.secret, "192.0.2.1")
    assert first == Verified(ALICE, issued.key_id, cached=False)
    calls = kc.bcrypt_calls
    again = await kc.verify(ALICE, issued.secret, "192.0.2.2")
    assert again == Verified(ALICE, issued.key_id, cached=True)
    assert kc.bcrypt_calls == calls  # no second bcrypt
    by_handle = await kc.verify("Alice.Test", issued.secret, "192.0.2.1")
    assert isinstance(by_handle, Verified)
    assert by_handle.did == ALICE
    assert store.key(issued.key_id).last_used_at is not None


@pytest.mark.parametrize(
    ("username", "secret", "reason"),
    [
        (ALICE, "atmos_" + "A" * 43, "bad-key"),
        (ALICE, "not-a-key", "bad-key"),
        ("did:plc:zzzzzzzzzzzzzzzzzzzzzzzz", None, "unknown-user"),
        ("nobody.test", None, "unknown-user"),
        ("not a username", None, "unknown-user"),
    ],
)
async def test_refusals_cost_a_bcrypt_all_the_same(
    store: Store, username: str, secret: str | None, reason: str
) -> None:
    issued = api_keys.issue(store, ALICE, cost=4)
    kc = checker(store)
    result = await kc.verify(username, secret or issued.secret, "192.0.2.9")
    assert isinstance(result, Refused)
    assert result.reason == reason
    assert kc.bcrypt_calls == 1  # unknown users are not answered faster


@pytest.mark.parametrize("cost", [4, 12])
def test_the_unknown_users_hash_costs_what_a_real_key_costs(store: Store, cost: int) -> None:
    """Made without hashing, it names the same algorithm and cost as an issued key's hash
    (bcrypt spends what the string names), and nothing matches it."""
    issued = api_keys.issue(store, ALICE, cost=4)
    real = store.key(issued.key_id).bcrypt_hash
    dummy = api_keys.dummy_hash(cost)
    assert len(dummy) == len(real) == 60
    assert dummy[:7] == real[:4] + b"%02d$" % cost
    assert dummy != api_keys.dummy_hash(cost)  # a fresh salt each time
    if cost == 4:  # checking against it runs bcrypt and refuses, never raises
        assert not bcrypt.checkpw(issued.secret.encode(), dummy)
        assert not bcrypt.checkpw(b"", dummy)


async def test_revoke_drops_the_cache_at_once_and_rotation_keeps_working(store: Store) -> None:
    old = api_keys.issue(store, ALICE, cost=4)
    new = api_keys.issue(store, ALICE, cost=4)
    kc = checker(store)
    assert isinstance(await kc.verify(ALICE, old.secret, "192.0.2.1"), Verified)
    assert isinstance(await kc.verify(ALICE, new.secret, "192.0.2.1"), Verified)
    await kc.revoke(old.key_id)
    refused = await kc.verify(ALICE, old.secret, "192.0.2.1")
    assert isinstance(refused, Refused)
    assert refused.reason == "bad-key"
    still = await kc.verify(ALICE, new.secret, "192.0.2.1")
    assert still == Verified(ALICE, new.key_id, cached=True)


async def test_revocation_by_another_process_is_noticed_within_the_poll(
    store: Store, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    issued = api_keys.issue(store, ALICE, cost=4)
    kc = checker(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(kc.watch_revocations)
        assert isinstance(await kc.verify(ALICE, issued.secret, "192.0.2.1"), Verified)
        cli = Store(tmp_path / "accounts.sqlite3")  # the operator CLI's own connection
        cli.revoke_key(issued.key_id)
        cli.close()
        start = trio.current_time()
        await trio.sleep(FAST.revocation_poll + 0.01)
        assert trio.current_time() - start < 1.1
        result = await kc.verify(ALICE, issued.secret, "192.0.2.1")
        assert isinstance(result, Refused)
        nursery.cancel_scope.cancel()


async def test_escalating_delay_then_lockout_at_exact_virtual_times(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    issued = api_keys.issue(store, ALICE, cost=4)
    kc = checker(store)
    waits = []
    for _ in range(10):
        t = trio.current_time()
        result = await kc.verify(ALICE, "atmos_" + "B" * 43, "198.51.100.7")
        assert isinstance(result, Refused)
        waits.append(round(trio.current_time() - t, 3))
    # 3 free failures, then 0.5 s doubling up to 8 s; the 10th locks out (and is delayed).
    assert waits == [0, 0, 0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    calls = kc.bcrypt_calls
    t = trio.current_time()
    locked = await kc.verify(ALICE, issued.secret, "198.51.100.7")  # even the right key
    assert isinstance(locked, Refused)
    assert locked.reason == "locked-out"
    # Locked when the 10th failure was counted; its 8 s delay has passed since.
    assert locked.retry_after == pytest.approx(FAST.lockout_seconds - waits[-1])
    assert trio.current_time() == t  # answered at once...
    assert kc.bcrypt_calls == calls  # ...without a bcrypt
    await trio.sleep(FAST.lockout_seconds)
    assert isinstance(await kc.verify(ALICE, issued.secret, "198.51.100.7"), Verified)


async def test_a_stranger_cannot_lock_a_member_out(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """Failures against a member's DID from one address lock that address, never the
    member: the right key from an address that has not failed works at once."""
    issued = api_keys.issue(store, ALICE, cost=4)
    kc = checker(store)
    for _ in range(12):
        await kc.verify(ALICE, "atmos_" + "C" * 43, "203.0.113.66")
    attacker = await kc.verify(ALICE, issued.secret, "203.0.113.66")  # even the right key
    assert isinstance(attacker, Refused)
    assert attacker.reason == "locked-out"
    t, calls = trio.current_time(), kc.bcrypt_calls
    member = await kc.verify(ALICE, issued.secret, "198.51.100.1")
    assert member == Verified(ALICE, issued.key_id, cached=False)
    assert trio.current_time() == t  # no delay for the right key
    assert kc.bcrypt_calls == calls + 1
    by_handle = await kc.verify("alice.test", issued.secret, "198.51.100.2")
    assert isinstance(by_handle, Verified)


async def test_failures_spread_over_addresses_only_slow_the_failures(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """An account's score (shared by its handle and its DID) delays wrong keys, from any
    address, but never refuses or delays the right one."""
    issued = api_keys.issue(store, ALICE, cost=4)
    kc = checker(store)
    for i in range(6):  # a new address each time, alternating the two names of the member
        await kc.verify(ALICE if i % 2 else "alice.test", "atmos_" + "E" * 43, f"192.0.2.{i}")
    t = trio.current_time()
    wrong = await kc.verify(ALICE, "atmos_" + "E" * 43, "192.0.2.100")
    assert isinstance(wrong, Refused)
    assert wrong.reason == "bad-key"
    assert trio.current_time() - t == 4.0  # the 7th failure on the account: 0.5 * 2**3
    t = trio.current_time()
    right = await kc.verify("alice.test", issued.secret, "192.0.2.101")
    assert isinstance(right, Verified)
    assert trio.current_time() == t


async def test_ipv6_addresses_are_scored_by_their_64(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    issued = api_keys.issue(store, ALICE, cost=4)
    kc = checker(store)
    for i in range(10):  # ten addresses, one /64
        await kc.verify(BOB, "atmos_" + "F" * 43, f"2001:db8:0:1::{i + 1:x}")
    locked = await kc.verify(ALICE, issued.secret, "2001:db8:0:1:ffff::9")
    assert isinstance(locked, Refused)
    assert locked.reason == "locked-out"
    assert isinstance(await kc.verify(ALICE, issued.secret, "2001:db8:0:2::1"), Verified)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::abcd:1", "2001:db8::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not an address", "not an address"),
    ],
)
def test_address_key(ip: str, key: str) -> None:
    assert api_keys.address_key(ip) == key


async def test_scores_decay_with_the_half_life(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    api_keys.issue(store, ALICE, cost=4)
    kc = checker(store, AuthSettings(bcrypt_cost=4, half_life=600.0))
    for _ in range(5):
        await kc.verify(ALICE, "atmos_" + "D" * 43, "192.0.2.50")
    await trio.sleep(600 * 4)  # four half-lives: a score of ~5 becomes ~0.3
    t = trio.current_time()
    await kc.verify(ALICE, "atmos_" + "D" * 43, "192.0.2.50")
    assert trio.current_time() == t  # free again: no delay


async def test_cache_is_bounded(store: Store) -> None:
    keys = [api_keys.issue(store, ALICE, cost=4) for _ in range(3)]
    kc = checker(store, AuthSettings(bcrypt_cost=4, cache_size=2))
    for k in keys:
        await kc.verify(ALICE, k.secret, "192.0.2.1")
    assert len(kc._cache) == 2
    first = await kc.verify(ALICE, keys[0].secret, "192.0.2.1")
    assert isinstance(first, Verified)
    assert not first.cached  # the oldest was evicted
