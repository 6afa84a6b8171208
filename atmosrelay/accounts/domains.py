"""Sending domains: enrollment, the DNS ownership proof, and what to publish.

A domain belongs to one member; a subdomain is a separate domain. Enrollment creates a random
challenge token (bound to that member and domain by its row) and the domain's DKIM keys.
Proof: a TXT record ``_atmos-challenge.<domain>`` holding ``atmos-verify=<token>``. A failed
verification says exactly what DNS returned, so the operator can fix the record.

DKIM rotation is two-phase, so no message is ever signed with a key receivers cannot find:
``start_rotation`` makes the next pair (a new selector stem) and prints its records while the
relay keeps signing with the current pair; ``activate_rotation`` (after the operator has
published, checked in DNS unless told otherwise) makes the next pair the signing pair and
deletes the old one, whose records should stay published a while for mail in transit.
"""

from __future__ import annotations

import secrets
from typing import Final

import attrs
import dns.asyncresolver

from atmosrelay.accounts import dkim_keys
from atmosrelay.accounts.identity import ResolutionError, hostname_ok, txt_records
from atmosrelay.accounts.store import Domain, Store

CHALLENGE_PREFIX: Final = "_atmos-challenge"
VERIFY_PREFIX: Final = "atmos-verify="
DMARC_VALUE: Final = "v=DMARC1; p=reject; adkim=r; aspf=r"


class DomainError(ValueError):
    """A bad domain request; the message says what to do."""


def normalize_domain(name: str) -> str:
    d = name.strip().lower().rstrip(".")
    try:
        d = d.encode("idna").decode("ascii")
    except UnicodeError:
        raise DomainError(f"{name!r} is not a valid domain name") from None
    if not hostname_ok(d):
        raise DomainError(f"{name!r} is not a valid domain name (e.g. mail.example.com)")
    return d


def forward_address(text: str, domain: str) -> str:
    """A forward-to address for ``domain`` (normalised), checked: one address, not at
    ``domain`` itself (its replies would come back to the relay in a loop)."""
    local, at, host = text.strip().rpartition("@")
    if not at or not local or any(c.isspace() or ord(c) < 32 or c in "<>,;" for c in text):
        raise DomainError(f"{text[:80]!r} is not an email address")
    address = f"{local}@{normalize_domain(host)}"
    if address.rpartition("@")[2] == domain:
        raise DomainError(f"{address} is at {domain} itself: its replies would come back here")
    return address


def challenge_name(domain: str) -> str:
    return f"{CHALLENGE_PREFIX}.{domain}"


def enroll(store: Store, did: str, name: str, *, limit: int, clock_now: float) -> Domain:
    """Enroll a domain for a member (pending until verified), with fresh DKIM keys."""
    domain = normalize_domain(name)
    store.member(did)
    rsa_key, ed_key = dkim_keys.generate_rsa(), dkim_keys.generate_ed25519()
    return store.add_domain(
        Domain(
            name=domain,
            did=did,
            status="pending",
            challenge_token=secrets.token_urlsafe(24),
            verified_at=None,
            verified_without_dns=False,
            dkim_selector_stem=dkim_keys.selector_stem(),
            dkim_rsa_private=rsa_key.private,
            dkim_ed25519_private=ed_key.private,
            forward_to=None,
            created_at=clock_now,
        ),
        limit=limit,
    )


async def check_challenge(resolver: dns.asyncresolver.Resolver, domain: Domain) -> None:
    """Raise DomainError naming what was found unless the challenge record is there."""
    name = challenge_name(domain.name)
    expected = VERIFY_PREFIX + domain.challenge_token
    try:
        found = await txt_records(resolver, name)
    except ResolutionError as exc:
        raise DomainError(f'{exc}; publish TXT {name} "{expected}"') from None
    if expected in found:
        return
    shown = ", ".join(repr(f) for f in found) or "nothing"
    raise DomainError(f'TXT {name} holds {shown}; expected "{expected}"')


@attrs.frozen
class DnsRecord:
    name: str
    type: str
    strings: tuple[str, ...]
    note: str = ""

    @property
    def value(self) -> str:
        return "".join(self.strings)

    def zone_line(self) -> str:
        if self.type != "TXT":  # MX: "10 host." as it stands
            return f"{self.name}. IN {self.type} {self.value}"
        quoted = " ".join(f'"{s}"' for s in self.strings)
        return f"{self.name}. IN {self.type} {quoted}"


def operator_records(operator: dkim_keys.OperatorKey, hostname: str) -> list[DnsRecord]:
    """What the operator's own domain publishes: its DKIM key (every message carries its
    signature), the MX of the inbound listener (VERP bounces, feedback reports come back to
    it: docs/inbound.md), SPF for the return path it is now the domain of, and DMARC."""
    domain = operator.domain
    return [
        DnsRecord(
            f"{operator.selector}._domainkey.{domain}",
            "TXT",
            dkim_keys.split_txt(dkim_keys.dkim_record_value("rsa", operator.key.public_b64)),
        ),
        DnsRecord(domain, "MX", (f"10 {hostname}.",), note="the inbound listener's host"),
        DnsRecord(
            domain,
            "TXT",
            (f"v=spf1 a:{hostname} -all",),
            note="list every address the relay sends from",
        ),
        DnsRecord(f"_dmarc.{domain}", "TXT", (DMARC_VALUE,)),
    ]


def dkim_records(name: str, stem: str, rsa_private: str, ed_private: str) -> list[DnsRecord]:
    """The two DKIM records of one key pair (selectors ``<stem>r`` and ``<stem>e``)."""
    rsa_pub = dkim_keys.public_from_private("rsa", rsa_private)
    ed_pub = dkim_keys.public_from_private("ed25519", ed_private)
    return [
        DnsRecord(
            f"{stem}r._domainkey.{name}",
            "TXT",
            dkim_keys.split_txt(dkim_keys.dkim_record_value("rsa", rsa_pub)),
        ),
        DnsRecord(
            f"{stem}e._domainkey.{name}",
            "TXT",
            dkim_keys.split_txt(dkim_keys.dkim_record_value("ed25519", ed_pub)),
        ),
    ]


def next_dkim_records(domain: Domain) -> list[DnsRecord]:
    """The records of a rotation in progress ([] when there is none)."""
    if not (domain.dkim_next_stem and domain.dkim_next_rsa_private):
        return []
    assert domain.dkim_next_ed25519_private is not None
    return dkim_records(
        domain.name,
        domain.dkim_next_stem,
        domain.dkim_next_rsa_private,
        domain.dkim_next_ed25519_private,
    )


def next_stem(current: str, today: str | None = None) -> str:
    """A selector stem for the next pair: today's (``atmos<YYYYMMDD>``), with a letter added
    when the current stem is already today's, so the two pairs never share a selector."""
    base = today or dkim_keys.selector_stem()
    if not current.startswith(base):
        return base
    suffix = current[len(base) :] or "a"
    return base + chr(ord(suffix[-1]) + 1) if suffix[-1] < "z" else current + "a"


def start_rotation(store: Store, name: str) -> Domain:
    """Make the next key pair (or keep the one a rotation in progress already has)."""
    domain = store.domain(name)
    if domain.dkim_next_stem:
        return domain
    rsa_key, ed_key = dkim_keys.generate_rsa(), dkim_keys.generate_ed25519()
    stem = next_stem(domain.dkim_selector_stem)
    return store.set_next_dkim(name, stem, rsa_key.private, ed_key.private)


async def check_published(resolver: dns.asyncresolver.Resolver, records: list[DnsRecord]) -> None:
    """Raise DomainError naming the first record DNS does not serve as given."""
    for record in records:
        try:
            found = await txt_records(resolver, record.name)
        except ResolutionError as exc:
            raise DomainError(f"{exc}; publish {record.zone_line()}") from None
        if _public_key(record.value) not in {_public_key(f) for f in found}:
            shown = ", ".join(repr(f[:60]) for f in found) or "nothing"
            raise DomainError(f"TXT {record.name} holds {shown}; publish {record.zone_line()}")


def _public_key(value: str) -> str:
    """The p= tag of a DKIM record, without the spaces RFC 6376 allows in it."""
    for tag in value.split(";"):
        key, _, content = tag.strip().partition("=")
        if key.strip() == "p":
            return "".join(content.split())
    return ""


def records_to_publish(domain: Domain, *, spf_include: str | None) -> list[DnsRecord]:
    """The DKIM, SPF and DMARC records this domain needs, exactly as to publish them."""
    out = dkim_records(
        domain.name,
        domain.dkim_selector_stem,
        domain.dkim_rsa_private,
        domain.dkim_ed25519_private,
    )
    if spf_include:
        out.append(
            DnsRecord(
                domain.name,
                "TXT",
                (f"v=spf1 include:{spf_include} -all",),
                note="if the domain already has an SPF record, add the include to it instead",
            )
        )
    out.append(DnsRecord(f"_dmarc.{domain.name}", "TXT", (DMARC_VALUE,)))
    return out
