"""Where to deliver: MX resolution (RFC 5321 section 5.1, RFC 7505), behind a Protocol so
lanes can be tested with a fake.

* MX records in preference order; equal preferences in random order (RFC 5321 5.1).
* No MX but the name exists: the implicit MX is the domain itself (its A/AAAA records).
* A null MX (a single ``0 .`` record, RFC 7505): the domain accepts no mail, bounce 5.1.10.
* NXDOMAIN, or no MX and no address: bounce 5.1.2 (bad destination system address).
* SERVFAIL and timeouts: temporary, defer 4.4.3 (directory server failure).
* MX host names are turned into addresses by this same resolver, so a delivery never asks
  the system's resolver anything; MX hosts without an address are skipped.

``smarthost`` sends everything to one host:port (like Postfix's relayhost), for operators who
route through another server, and for tests. Destinations are keyed by their sorted MX host
set, so domains hosted by the same provider share a lane (MX rollup).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

from atmosrelay.accounts.identity import DnsSettings, make_resolver
from atmosrelay.delivery.destination import Destination

__all__ = ["Destination", "DnsResolver", "ResolutionFailed", "Resolver", "order_mx"]


# Answers that say "ask again later" (SERVFAIL from every server, no answer in time).
_TEMPORARY = (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout)


class ResolutionFailed(Exception):
    """``permanent`` failures bounce (``status`` 5.x.x); others defer (4.x.x)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.permanent = status.startswith("5")


class Resolver(Protocol):
    async def destination(self, domain: str) -> Destination:
        """Where mail for ``domain`` goes. Raises ResolutionFailed."""


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[str]:
    """Hosts by preference; ties shuffled."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return [host for _, host in sorted(shuffled, key=lambda r: r[0])]


class DnsResolver:
    """MX resolution with dnspython under trio."""

    def __init__(
        self,
        settings: DnsSettings | None = None,
        *,
        smarthost: tuple[str, int] | None = None,
        port: int = 25,
        rng: random.Random | None = None,
    ) -> None:
        self._resolver: dns.asyncresolver.Resolver = make_resolver(settings or DnsSettings())
        self.smarthost = smarthost
        self.port = port
        self._rng = rng or random.Random()

    async def destination(self, domain: str) -> Destination:
        if self.smarthost is not None:
            return Destination((self.smarthost,))
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise ResolutionFailed("5.1.2", f"{domain} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            return await self._implicit(domain)
        except _TEMPORARY as exc:
            raise ResolutionFailed(
                "4.4.3", f"MX lookup for {domain} failed: {type(exc).__name__}"
            ) from None
        records = [(int(r.preference), r.exchange.to_text().rstrip(".").lower()) for r in answer]
        if len(records) == 1 and records[0][1] == "":
            raise ResolutionFailed("5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
        hosts = [h for h in order_mx(records, self._rng) if h]
        addresses: dict[str, tuple[str, ...]] = {}
        temporary: ResolutionFailed | None = None
        for host in hosts:
            try:
                addresses[host] = await self._addresses(host)
            except ResolutionFailed as exc:  # this MX is unusable; the others may do
                temporary = temporary or (None if exc.permanent else exc)
        usable = [h for h in hosts if addresses.get(h)]
        if not usable:
            raise temporary or ResolutionFailed(
                "4.4.4", f"no MX host of {domain} has an address"
            )  # RFC 5321 5.1: a DNS problem of the receiver, retried
        return Destination(tuple((h, self.port) for h in usable), addresses=addresses)

    async def _addresses(self, host: str) -> tuple[str, ...]:
        """A then AAAA records of ``host`` (empty when it has none)."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except dns.resolver.NoAnswer:
                continue
            except dns.resolver.NXDOMAIN:
                break
            except _TEMPORARY as exc:
                raise ResolutionFailed(
                    "4.4.3", f"address lookup for {host} failed: {type(exc).__name__}"
                ) from None
            found += [r.to_text() for r in answer]
        return tuple(found)

    async def _implicit(self, domain: str) -> Destination:
        found = await self._addresses(domain)
        if not found:
            raise ResolutionFailed("5.1.2", f"{domain} has no MX and no address records")
        return Destination(((domain, self.port),), implicit=True, addresses={domain: found})
