"""The preparer's signer cache: a store change that leaves a domain's keys alone keeps the
parsed signer (parsing private keys is the costliest step of signing, and the store changes
every second while counters are flushed); a rotation or a removal reaches the next message."""

from __future__ import annotations

from pathlib import Path

from atmosrelay.accounts import dkim_keys, domains
from atmosrelay.accounts.dkim_keys import OperatorKey
from atmosrelay.accounts.store import Store
from atmosrelay.delivery.prepare import Preparer, Signing
from tests.queue.factories import ALICE_DID


class Generation:
    """The account store's generation, as the relay's KeyChecker gives it; moved by hand."""

    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


def prepare_operator(tmp: Path) -> OperatorKey:
    return dkim_keys.ensure_operator_key(tmp / "dkim", "relay.test")[0]


def enrolled(tmp: Path) -> tuple[Store, Preparer, Generation]:
    """A store with example.org enrolled and verified for Alice, and a preparer over it."""
    store = Store(tmp / "accounts.sqlite3")
    store.add_member(ALICE_DID, "alice.test")
    domains.enroll(store, ALICE_DID, "example.org", limit=2, clock_now=0)
    store.mark_verified("example.org", without_dns=True)
    prepare = Preparer(
        store, prepare_operator(tmp), unsubscribe_secret=b"s" * 32, unsubscribe_url=""
    )
    prepare.generation = generation = Generation()
    return store, prepare, generation


def test_the_signer_is_parsed_again_only_when_the_keys_change(tmp_path: Path) -> None:
    store, prepare, generation = enrolled(tmp_path)

    first = prepare.signer("example.org")
    generation.value += 1  # the store changed (a counter flush, another member): same keys
    store.set_limits(ALICE_DID, hourly=10, daily=100)
    assert prepare.signer("example.org") is first

    domains.start_rotation(store, "example.org")  # a pending rotation signs nothing yet
    generation.value += 1
    assert prepare.signer("example.org") is first

    store.activate_next_dkim("example.org")
    generation.value += 1
    rotated = prepare.signer("example.org")
    assert rotated is not first
    stem = store.domain("example.org").dkim_selector_stem
    signed = rotated.sign(b"From: a@example.org\r\n\r\nhi\r\n")
    assert f"s={stem}r;".encode() in signed and f"s={stem}e;".encode() in signed

    store.remove_domain("example.org")
    generation.value += 1
    assert prepare.signer("example.org") is prepare.operator_only
    store.close()


def test_a_signer_is_in_hand_only_while_cached_and_current(tmp_path: Path) -> None:
    """The delivery process prepares a message on its event loop only when this says so: no
    store read and no key to parse, which may wait on a lock or take tens of milliseconds."""
    store, prepare, generation = enrolled(tmp_path)
    member = Signing("alice@example.org", ALICE_DID, False)

    assert prepare.in_hand(Signing("", ALICE_DID, False))  # a DSN: the operator's key only
    assert not prepare.in_hand(member)  # never built
    prepare(member, ("bob@example.net",), b"From: alice@example.org\r\n\r\nhi\r\n")
    assert prepare.in_hand(member)
    assert not prepare.in_hand(Signing("carol@example.com", ALICE_DID, False))  # another domain
    generation.value += 1  # the store changed: looked at again, in a thread
    assert not prepare.in_hand(member)
    prepare.signer("example.org")
    assert prepare.in_hand(member)
    # a rotation of the operator's key empties the cache
    prepare.set_operator(prepare_operator(tmp_path))
    assert not prepare.in_hand(member)
    store.close()
