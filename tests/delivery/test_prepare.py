"""The preparer's signer cache: a store change that leaves a domain's keys alone keeps the
parsed signer (parsing private keys is the costliest step of signing, and the store changes
every second while counters are flushed); a rotation or a removal reaches the next message."""

from __future__ import annotations

from pathlib import Path

from atmosrelay.accounts import dkim_keys, domains
from atmosrelay.accounts.store import Store
from atmosrelay.delivery.prepare import Preparer, Signing
from tests.queue.factories import ALICE_DID


def test_the_signer_is_parsed_again_only_when_the_keys_change(tmp_path: Path) -> None:
    store = Store(tmp_path / "accounts.sqlite3")
    store.add_member(ALICE_DID, "alice.test")
    domains.enroll(store, ALICE_DID, "example.org", limit=2, clock_now=0)
    store.mark_verified("example.org", without_dns=True)
    operator, _ = dkim_keys.ensure_operator_key(tmp_path / "dkim", "relay.test")
    prepare = Preparer(store, operator, unsubscribe_secret=b"s" * 32, unsubscribe_url="")
    generation = 0
    prepare.generation = lambda: generation

    first = prepare.signer("example.org")
    generation += 1  # the store changed (a counter flush, another member): same keys
    store.set_limits(ALICE_DID, hourly=10, daily=100)
    assert prepare.signer("example.org") is first

    domains.start_rotation(store, "example.org")  # a pending rotation signs nothing yet
    generation += 1
    assert prepare.signer("example.org") is first

    store.activate_next_dkim("example.org")
    generation += 1
    rotated = prepare.signer("example.org")
    assert rotated is not first
    stem = store.domain("example.org").dkim_selector_stem
    signed = rotated.sign(b"From: a@example.org\r\n\r\nhi\r\n")
    assert f"s={stem}r;".encode() in signed and f"s={stem}e;".encode() in signed

    store.remove_domain("example.org")
    generation += 1
    assert prepare.signer("example.org") is prepare.operator_only
    store.close()


def test_a_signer_is_in_hand_only_while_cached_and_current(tmp_path: Path) -> None:
    """The delivery process prepares a message on its event loop only when this says so: no
    store read and no key to parse, which may wait on a lock or take tens of milliseconds."""
    store = Store(tmp_path / "accounts.sqlite3")
    store.add_member(ALICE_DID, "alice.test")
    domains.enroll(store, ALICE_DID, "example.org", limit=2, clock_now=0)
    store.mark_verified("example.org", without_dns=True)
    operator, _ = dkim_keys.ensure_operator_key(tmp_path / "dkim", "relay.test")
    prepare = Preparer(store, operator, unsubscribe_secret=b"s" * 32, unsubscribe_url="")
    generation = 0
    prepare.generation = lambda: generation
    member = Signing("alice@example.org", ALICE_DID, False)

    assert prepare.in_hand(Signing("", ALICE_DID, False))  # a DSN: the operator's key only
    assert not prepare.in_hand(member)  # never built
    prepare(member, ("bob@example.net",), b"From: alice@example.org\r\n\r\nhi\r\n")
    assert prepare.in_hand(member)
    assert not prepare.in_hand(Signing("carol@example.com", ALICE_DID, False))  # another domain
    generation += 1  # the store changed: looked at again, in a thread
    assert not prepare.in_hand(member)
    prepare.signer("example.org")
    assert prepare.in_hand(member)
    prepare.set_operator(operator)  # a rotation of the operator's key empties the cache
    assert not prepare.in_hand(member)
    store.close()
