"""Domain enrollment, the DNS proof against a real DNS server, and DKIM records that verify."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import trio

from atmosrelay.accounts import domains
from atmosrelay.accounts.dkim_keys import ensure_operator_key
from atmosrelay.accounts.identity import DnsSettings, make_resolver
from atmosrelay.accounts.store import Conflict, NotFound, Store
from tests.accounts.dns_server import DnsServer

ALICE = "did:plc:abcdefghijklmnopqrstuvwx"
BOB = "did:plc:zyxwvutsrqponmlkjihgfedc"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "accounts.sqlite3")
    s.add_member(ALICE, "alice.test")
    s.add_member(BOB, "bob.test")
    yield s
    s.close()


def enroll(store: Store, did: str, name: str, limit: int = 2) -> domains.Domain:
    return domains.enroll(store, did, name, limit=limit, clock_now=0.0)


def test_limits_and_ownership(store: Store) -> None:
    d = enroll(store, ALICE, "Mail.Example.ORG.")
    assert (d.name, d.status, d.did) == ("mail.example.org", "pending", ALICE)
    enroll(store, ALICE, "sub.mail.example.org")  # a subdomain is a separate domain
    with pytest.raises(Conflict, match="already has 2 domain"):
        enroll(store, ALICE, "third.example.org")
    with pytest.raises(Conflict, match="already enrolled by another member"):
        enroll(store, BOB, "mail.example.org")
    with pytest.raises(Conflict, match="already enrolled by this member"):
        enroll(store, ALICE, "mail.example.org", limit=5)
    with pytest.raises(NotFound, match="no member"):
        enroll(store, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "x.example.org")
    for bad in ("localhost", "exa mple.org", "-x.example.org", "example..org"):
        with pytest.raises(domains.DomainError):
            enroll(store, BOB, bad)


def test_tokens_are_random_and_keys_are_per_domain(store: Store) -> None:
    a = enroll(store, ALICE, "a.example.org")
    b = enroll(store, BOB, "b.example.org")
    assert a.challenge_token != b.challenge_token
    assert len(a.challenge_token) >= 32
    assert a.dkim_rsa_private != b.dkim_rsa_private
    assert re.fullmatch(r"atmos\d{8}", a.dkim_selector_stem)
    assert "PRIVATE" not in repr(a)  # never shown in logs


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


async def check(dns: DnsServer, d: domains.Domain) -> None:
    resolver = make_resolver(DnsSettings(nameservers=(dns.address,), timeout=0.5))
    with trio.fail_after(10):
        await domains.check_challenge(resolver, d)


async def test_proof_found(store: Store, dns: DnsServer) -> None:
    d = enroll(store, ALICE, "mail.example.org")
    dns.txt("_atmos-challenge.mail.example.org", "google-site-verification=xyz")
    dns.txt("_atmos-challenge.mail.example.org", f"atmos-verify={d.challenge_token}")
    await check(dns, d)


async def test_proof_in_several_strings(store: Store, dns: DnsServer) -> None:
    d = enroll(store, ALICE, "mail.example.org")
    value = f"atmos-verify={d.challenge_token}"
    dns.txt("_atmos-challenge.mail.example.org", (value[:10], value[10:]))
    await check(dns, d)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d, t: None, "_atmos-challenge.mail.example.org does not exist (NXDOMAIN)"),
        (
            lambda d, t: d.txt("_atmos-challenge.mail.example.org", "atmos-verify=WRONG"),
            "holds 'atmos-verify=WRONG'; expected",
        ),
        (
            lambda d, t: d.txt("_atmos-challenge.mail.example.org", f"atmos-verify={t} "),
            "holds 'atmos-verify=",
        ),
        (
            lambda d, t: d.a("_atmos-challenge.mail.example.org", "127.0.0.1"),
            "exists but has no TXT record",
        ),
        (
            lambda d, t: d.silent("_atmos-challenge.mail.example.org"),
            "no answer for _atmos-challenge.mail.example.org within 0.5 s",
        ),
    ],
)
async def test_proof_failures_say_what_was_found(
    store: Store, dns: DnsServer, setup: object, message: str
) -> None:
    d = enroll(store, ALICE, "mail.example.org")
    setup(dns, d.challenge_token)  # type: ignore[operator]
    with pytest.raises(domains.DomainError, match=re.escape(message)) as info:
        await check(dns, d)
    assert f'atmos-verify={d.challenge_token}"' in str(info.value)  # says what to publish


def test_published_records_verify_signatures_with_dkimpy(store: Store) -> None:
    d = enroll(store, ALICE, "mail.example.org")
    records = domains.records_to_publish(d, spf_include="_spf.relay.example")
    by_name = {r.name + ".": r for r in records}
    stem = d.dkim_selector_stem
    rsa = by_name[f"{stem}r._domainkey.mail.example.org."]
    ed = by_name[f"{stem}e._domainkey.mail.example.org."]
    assert all(len(s) <= 255 for s in rsa.strings)
    assert len(rsa.strings) == 2
    assert ed.value.startswith("v=DKIM1; k=ed25519; p=")
    assert by_name["mail.example.org."].value == "v=spf1 include:_spf.relay.example -all"
    assert by_name["_dmarc.mail.example.org."].value == "v=DMARC1; p=reject; adkim=r; aspf=r"
    # A zone line carries every string, quoted.
    assert rsa.zone_line().count('"') == 4

    message = (
        b"From: Alice <alice@mail.example.org>\r\nTo: bob@example.net\r\n"
        b"Subject: signed\r\nMessage-ID: <1@mail.example.org>\r\n\r\nHello.\r\n"
    )
    headers = [b"from", b"to", b"subject", b"message-id"]
    signed_rsa = dkim.sign(
        message,
        f"{stem}r".encode(),
        b"mail.example.org",
        d.dkim_rsa_private.encode(),
        include_headers=headers,
    )
    signed_ed = dkim.sign(
        message,
        f"{stem}e".encode(),
        b"mail.example.org",
        d.dkim_ed25519_private.encode(),
        signature_algorithm=b"ed25519-sha256",
        include_headers=headers,
    )
    zone = {name.encode(): r.value.encode() for name, r in by_name.items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return zone.get(name)

    both = signed_ed + signed_rsa + message
    verifier = dkim.DKIM(both)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc)  # Ed25519
    assert verifier.verify(idx=1, dnsfunc=dnsfunc)  # RSA
    tampered = both.replace(b"Hello.", b"Hullo.")
    try:  # dkimpy reports a body hash mismatch by raising
        tampered_ok = dkim.DKIM(tampered).verify(idx=1, dnsfunc=dnsfunc)
    except dkim.ValidationError:
        tampered_ok = False
    assert not tampered_ok


def test_operator_key_generated_once_with_mode_0600(tmp_path: Path) -> None:
    key, created = ensure_operator_key(tmp_path / "dkim", "relay.example")
    again, created_again = ensure_operator_key(tmp_path / "dkim", "relay.example")
    assert created
    assert not created_again
    assert key.key.public_b64 == again.key.public_b64
    mode = (tmp_path / "dkim" / "operator-rsa.pem").stat().st_mode & 0o777
    assert mode == 0o600
    assert key.selector.startswith("atmos")
    assert key.selector.endswith("r")
